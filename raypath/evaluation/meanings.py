"""The one table of metric meanings: label, how to read it, and which
direction is better ("lower" / "higher" / None for reference values such as
chance levels).  Reports, robustness comparisons, the adapt experiment and
the sweep's objectives all read directions from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Meaning:
    label: str
    help: str
    better: str | None  # "lower", "higher" or None (a reference value)

    @property
    def mode(self) -> str | None:
        """The Optuna / Ray Tune mode for this metric ("min" / "max")."""
        return {"lower": "min", "higher": "max"}.get(self.better or "")


METRICS: dict[str, Meaning] = {
    # robustness of a feature store (lower / higher = more robust)
    "site_probe_balanced_accuracy": Meaning(
        "Site probe", "balanced accuracy of a logistic regression predicting the cohort from "
        "features (CV grouped by patient); chance = 1/n_cohorts", "lower"),
    "site_probe_chance": Meaning("Site probe chance", "balanced accuracy of guessing", None),
    "kmeans_purity": Meaning(
        "KMeans cohort purity", "max cohort share per KMeans cluster, mean over clusters and "
        "repeats; compare with the chance purity", "lower"),
    "kmeans_chance_purity": Meaning("Purity at full mixing", "purity with cohort labels shuffled over "
                                    "the same clusters", None),
    "robustness_index": Meaning(
        "Robustness index RI", "share of same-biology/other-centre among typed neighbours "
        "(SO / (SO + OS)); compare with the chance RI (0.5 for a balanced 2x2 design); "
        "1 = biology dominates", "higher"),
    "robustness_index_chance": Meaning("RI of random neighbours", "RI expected by chance for these "
                                       "label/centre frequencies (0.5 only for a balanced 2x2 design)", None),
    "robustness_index_k": Meaning("RI k", "neighbourhood size used for RI", None),
    "croma_median": Meaning("CRoMa median", "per-tile (d_OS - d_SO)/(d_OS + d_SO); > 0 the biological "
                            "match is nearer than the same-centre impostor, 0 neutral", "higher"),
    "croma_worst10_mean": Meaning("CRoMa worst-10% mean", "mean of the lowest 10% of per-tile CRoMa", "higher"),
    "croma_frac_le_0": Meaning("CRoMa fraction <= 0", "share of tiles whose same-centre impostor is at "
                               "least as near as their biological match", "lower"),
    "clustering_score": Meaning("Clustering score", "ARI(biology, KMeans) - ARI(centre, KMeans); > 0 "
                                "clusters follow biology, 0 neutral", "higher"),
    "cohort_silhouette": Meaning("Cohort silhouette", "silhouette with cohorts as clusters; ~0 or "
                                 "below = cohorts mixed", "lower"),
    "cohort_calinski_harabasz": Meaning("Cohort Calinski-Harabasz", "between/within cohort dispersion "
                                        "ratio; ~1 = no cohort structure", "lower"),
    "cohort_davies_bouldin": Meaning("Cohort Davies-Bouldin", "cohort spread relative to centroid "
                                     "separation; large = cohorts overlap", "higher"),
    "cohort_between_within_ratio": Meaning("Between/within cohort distance", "mean centroid distance "
                                           "over mean within-cohort distance", "lower"),
    # task performance
    "c_index": Meaning("Harrell's C-index", "concordance of risk and survival; 0.5 = random", "higher"),
    "uno_c": Meaning("Uno's C", "censoring-weighted concordance; 0.5 = random", "higher"),
    "td_auc": Meaning("time-dependent AUC", "cumulative/dynamic AUC over the follow-up; 0.5 = random", "higher"),
    "auroc": Meaning("AUROC", "area under the ROC curve (macro one-vs-rest); 0.5 = random", "higher"),
    "balanced_accuracy": Meaning("balanced accuracy", "mean recall over classes; 1/n_classes = chance", "higher"),
    # sweep objectives (aggregates over LODO folds)
    "mean_external": Meaning("mean external", "mean over folds of the held-out cohort's C-index / AUROC", "higher"),
    "worst_external": Meaning("worst external", "the worst held-out cohort's C-index / AUROC", "higher"),
    "mean_internal": Meaning("mean internal", "inner selection set (training cohorts), mean over folds", "higher"),
    "site_probe_bacc": Meaning("site probe", "site-probe balanced accuracy on training cohorts' tiles", "lower"),
    "mean_inconsistency": Meaning("mean inconsistency", "mean over folds of the held-out tissues' prediction "
                                  "difference between technical variants (quantile_diff / prob_diff)", "lower"),
    "mean_flip_rate": Meaning("mean flip rate", "mean over folds of the share of held-out variant pairs whose "
                              "risk group / predicted class differs", "lower"),
    # prediction consistency between technical variants of one tissue (raypath.evaluation.consistency)
    "quantile_diff": Meaning("inconsistency (risk quantile difference)", "mean |q_a - q_b| over variant "
                             "pairs, q = a risk's quantile among the model's training risks (0..1)", "lower"),
    "rel_risk_diff": Meaning("relative risk difference", "mean |risk_a - risk_b| over variant pairs, in sd of "
                             "the model's training risks", "lower"),
    "abs_risk_diff": Meaning("absolute risk difference", "mean |risk_a - risk_b| over variant pairs "
                             "(model units: compare within one model only)", "lower"),
    "flip_rate": Meaning("risk-group flip rate", "share of variant pairs on two sides of the training "
                         "median risk", "lower"),
    "group_kappa": Meaning("risk-group kappa", "Cohen's kappa of the two variants' risk groups", "higher"),
    "prob_diff": Meaning("probability difference", "mean total-variation distance of the two variants' "
                         "class probabilities", "lower"),
    "disagreement": Meaning("classification disagreement", "share of variant pairs with another "
                            "predicted class", "lower"),
    "kappa": Meaning("Cohen's kappa", "agreement of the two variants' predicted classes beyond chance", "higher"),
    "n_pairs": Meaning("variant pairs scored", "pairs of technical variants of one tissue scored by the model", None),
    "n_twins": Meaning("twins scored", "lodo: held-out tissues' twins from training cohorts, excluded from "
                       "training and scored with the fold's model", None),
}


def better(key: str) -> str | None:
    """"lower", "higher" or None for a metric key (unknown keys: None)."""
    m = METRICS.get(key)
    return m.better if m else None
