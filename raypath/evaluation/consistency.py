"""Prediction robustness between technical variants of the same tissue.

Two scans / stains (or two generated stain-scanner views) of one tissue
should get the same prediction.  For every pair of scored views of a tissue:

survival
    ``quantile_diff`` (the headline "inconsistency"): mean ``|q_a - q_b|``
    where ``q`` is a risk's quantile among the model's training-slide risks
    (0..1, mid-rank for ties): scale-free, so a Cox model cannot look
    consistent by shrinking all its risks, and 0.5 means a tissue moves from
    the middle to an end of the risk distribution;
    ``abs_risk_diff``: mean ``|r_a - r_b|`` (in the model's risk units);
    ``rel_risk_diff``: the same divided by the sd of the model's risk over
    its training slides (scale-free: a Cox model cannot look consistent by
    shrinking its risks); ``flip_rate``: share of pairs whose risk group
    (high = risk above the median risk of the training slides) differs;
    ``group_kappa``: Cohen's kappa of the two views' risk groups.
classification
    ``prob_diff``: mean total-variation distance between the two views'
    class probabilities (``|p_a - p_b|`` for two classes);
    ``disagreement``: share of pairs with a different predicted class;
    ``kappa``: Cohen's kappa of the two views' predicted classes.

``n_pairs`` counts the pairs.  A tissue with m scored views gives
m (m - 1) / 2 pairs; within a pair, view a is the first in table order
(the original before its generated views).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

SURVIVAL_METRICS = ("quantile_diff", "rel_risk_diff", "abs_risk_diff", "flip_rate", "group_kappa", "n_pairs")
CLASSIFICATION_METRICS = ("prob_diff", "disagreement", "kappa", "n_pairs")


def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two raters' labels (NaN when chance agreement is 1)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if len(a) != len(b):
        raise ValueError("the two raters must label the same items")
    if len(a) == 0:
        return float("nan")
    labels = np.union1d(a, b)
    p_o = float(np.mean(a == b))
    p_e = float(sum(np.mean(a == k) * np.mean(b == k) for k in labels))
    if math.isclose(p_e, 1.0):
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def risk_quantile(r, reference) -> np.ndarray:
    """Mid-rank quantile (0..1) of each risk among the ``reference`` risks."""
    ref = np.sort(np.asarray(reference, dtype=float).reshape(-1))
    r = np.asarray(r, dtype=float)
    if len(ref) == 0:
        return np.full(r.shape, math.nan)
    lo = np.searchsorted(ref, r, side="left")
    hi = np.searchsorted(ref, r, side="right")
    return (lo + hi) / (2.0 * len(ref))


def survival_consistency(r_a, r_b, threshold: float, scale: float | None = None,
                         reference=None) -> dict[str, float]:
    """Consistency of two views' risks (see the module docstring); ``reference``:
    the training risks that define ``quantile_diff``."""
    r_a = np.asarray(r_a, dtype=float)
    r_b = np.asarray(r_b, dtype=float)
    n = len(r_a)
    if n == 0:
        return {"n_pairs": 0, "quantile_diff": math.nan, "abs_risk_diff": math.nan, "rel_risk_diff": math.nan,
                "flip_rate": math.nan, "group_kappa": math.nan}
    diff = float(np.mean(np.abs(r_a - r_b)))
    g_a, g_b = r_a > threshold, r_b > threshold
    rel = diff / scale if scale is not None and np.isfinite(scale) and scale > 0 else math.nan
    q = (float(np.mean(np.abs(risk_quantile(r_a, reference) - risk_quantile(r_b, reference))))
         if reference is not None and len(np.asarray(reference).reshape(-1)) else math.nan)
    return {
        "n_pairs": n,
        "quantile_diff": q,
        "abs_risk_diff": diff,
        "rel_risk_diff": rel,
        "flip_rate": float(np.mean(g_a != g_b)),
        "group_kappa": cohen_kappa(g_a.astype(int), g_b.astype(int)),
    }


def classification_consistency(p_a, p_b) -> dict[str, float]:
    """Consistency of two views' class probabilities [n, K]."""
    p_a = np.atleast_2d(np.asarray(p_a, dtype=float))
    p_b = np.atleast_2d(np.asarray(p_b, dtype=float))
    n = len(p_a) if p_a.size else 0
    if n == 0:
        return {"n_pairs": 0, "prob_diff": math.nan, "disagreement": math.nan, "kappa": math.nan}
    y_a, y_b = p_a.argmax(1), p_b.argmax(1)
    return {
        "n_pairs": n,
        "prob_diff": float(np.mean(0.5 * np.abs(p_a - p_b).sum(1))),
        "disagreement": float(np.mean(y_a != y_b)),
        "kappa": cohen_kappa(y_a, y_b),
    }


def view_pairs(views: pd.DataFrame) -> pd.DataFrame:
    """All pairs of views of each tissue.

    ``views`` has one row per scored view: ``tissue``, ``set``, ``cohort``
    and the score columns (``risk`` or ``prob_*``).  Returns one row per pair
    with the columns suffixed ``_a`` and ``_b``.
    """
    cols = [c for c in views.columns if c != "tissue"]
    rows = []
    for tissue, g in views.groupby("tissue", sort=True):
        recs = g[cols].to_dict(orient="records")
        for ra, rb in itertools.combinations(recs, 2):
            rows.append({"tissue": tissue, **{f"{k}_a": v for k, v in ra.items()},
                         **{f"{k}_b": v for k, v in rb.items()}})
    out_cols = ["tissue"] + [f"{c}_{s}" for s in ("a", "b") for c in cols]
    return pd.DataFrame(rows, columns=out_cols)


def select_pairs(pairs: pd.DataFrame, set_name: str, cohort: str) -> pd.DataFrame:
    """The pairs that belong to one evaluation group of a fold.

    ``internal`` / ``all``: both views in the internal set; ``internal`` /
    cohort C: both internal, one of them from C; ``external`` / C: both views
    scored outside training (external set or a held-out tissue's twin from a
    training cohort), at least one in the external set of cohort C.
    """
    if len(pairs) == 0:
        return pairs
    sa, sb = pairs["set_a"], pairs["set_b"]
    ca, cb = pairs["cohort_a"].astype(str), pairs["cohort_b"].astype(str)
    if set_name == "internal":
        m = (sa == "internal") & (sb == "internal")
        if cohort != "all":
            m &= (ca == cohort) | (cb == cohort)
        return pairs[m]
    scored = sa.isin(["external", "twin"]) & sb.isin(["external", "twin"])
    hit = ((sa == "external") & (ca == cohort)) | ((sb == "external") & (cb == cohort))
    return pairs[scored & hit]


def group_consistency(pairs: pd.DataFrame, task: str, threshold: float | None = None,
                      scale: float | None = None, reference=None) -> dict[str, float]:
    """The metrics of the module docstring over ``pairs`` (from :func:`view_pairs`)."""
    if task == "survival":
        return survival_consistency(pairs.get("risk_a", []), pairs.get("risk_b", []),
                                    threshold if threshold is not None else 0.0, scale, reference)
    prob = sorted(c[: -len("_a")] for c in pairs.columns if c.startswith("prob_") and c.endswith("_a"))
    if not prob or len(pairs) == 0:
        return classification_consistency(np.zeros((0, 2)), np.zeros((0, 2)))
    return classification_consistency(pairs[[f"{c}_a" for c in prob]].to_numpy(),
                                      pairs[[f"{c}_b" for c in prob]].to_numpy())


def metric_names(task: str) -> tuple[str, ...]:
    return SURVIVAL_METRICS if task == "survival" else CLASSIFICATION_METRICS


def split_views(preds: pd.DataFrame, tissue, task: str, view_scores: np.ndarray | None = None) -> pd.DataFrame:
    """The scored views of one split, for :func:`view_pairs`.

    Parameters
    ----------
    preds
        The split's prediction rows (``split`` = internal / external / twin,
        ``cohort``, ``risk`` or ``prob_*``).
    tissue
        Tissue id of each prediction row (pair_id for real pairs, slide_id
        for generated views; None = a slide without variants).
    view_scores
        Generated views: [K, n] risks or [K, n, C] probabilities of the same
        rows (views 1..K; view 0 is ``preds`` itself).
    """
    score_cols = ["risk"] if task == "survival" else sorted(c for c in preds.columns if c.startswith("prob_"))
    base = pd.DataFrame({"tissue": pd.Series(list(tissue), dtype=object).to_numpy(),
                         "set": preds["split"].to_numpy(), "cohort": preds["cohort"].astype(str).to_numpy(),
                         "view": 0})
    for c in score_cols:
        base[c] = preds[c].to_numpy()
    frames = [base]
    for k, vs in enumerate(view_scores if view_scores is not None else [], start=1):
        f = base.copy()
        f["view"] = k
        vs = np.asarray(vs)
        if task == "survival":
            f["risk"] = vs.reshape(-1)
        else:
            for j, c in enumerate(score_cols):
                f[c] = vs[:, j]
        frames.append(f)
    views = pd.concat(frames, ignore_index=True)
    views = views[views["tissue"].notna()]
    return views.sort_values(["tissue", "view"], kind="stable").drop(columns="view").reset_index(drop=True)


def add_consistency(fold_rows: list[dict], pairs: pd.DataFrame, task: str, threshold: float | None = None,
                    scale: float | None = None, reference=None) -> list[dict]:
    """Add the consistency metrics of each fold row's group (``set``, ``cohort``)
    to the rows (in place) and return them."""
    for row in fold_rows:
        sub = select_pairs(pairs, row["set"], str(row["cohort"]))
        row.update(group_consistency(sub, task, threshold, scale, reference))
    return fold_rows


def fold_consistency(fold_rows: list[dict], preds: pd.DataFrame, tissue, task: str, result: dict) -> list[dict]:
    """Add the consistency metrics to one split's fold rows.

    ``preds`` are the split's prediction rows (internal, external and twin
    slides), ``tissue`` their tissue ids, ``result`` the training result
    (``train_median``, ``train_sd``, ``train_risks`` for survival; ``view_scores`` for
    generated views).  The external row of a lodo fold also gets
    ``n_twins``: the held-out tissues' twins scored from training cohorts.
    """
    vs = result.get("view_scores")
    views = split_views(preds, tissue, task, None if vs is None else np.asarray(vs))
    pairs = view_pairs(views)
    threshold = result.get("train_median")
    ref = result.get("train_risks")
    add_consistency(fold_rows, pairs, task, threshold, result.get("train_sd"),
                    None if ref is None else np.asarray(ref))
    n_twins = int((preds["split"] == "twin").sum())
    for row in fold_rows:
        if row["set"] == "external":
            row["n_twins"] = n_twins
    return fold_rows


def view_predictions(preds: pd.DataFrame, view_scores, task: str) -> pd.DataFrame:
    """Generated views' predictions as rows like ``preds`` plus ``view`` (1..K)."""
    vs = np.asarray(view_scores)
    frames = []
    keep = [c for c in preds.columns if c not in ("risk", "pred_index", "pred_label") and not c.startswith("prob_")]
    for k in range(len(vs)):
        f = preds[keep].copy()
        f.insert(1, "view", k + 1)
        if task == "survival":
            f["risk"] = vs[k].reshape(-1)
        else:
            for j in range(vs.shape[2]):
                f[f"prob_{j}"] = vs[k][:, j]
            f["pred_index"] = vs[k].argmax(axis=1)
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def consistency_headline(groups: dict, task: str, protocol: str) -> dict:
    """The consistency numbers a reader looks at first, from a summary's
    ``groups[name][set][cohort][metric]``.

    lodo: per held-out cohort (external set: its tissues and their twins)
    the mean over repeats of each metric, plus the mean over cohorts
    (``mean_<metric>``) and the pairs scored per repeat (``n_pairs``).
    internal / pairwise: the pooled internal set, or per training cohort
    the external cohorts pooled per repeat.
    """
    names = [m for m in metric_names(task)]
    out: dict = {"metrics": names}
    per: dict[str, dict] = {}
    for name, sets in groups.items():
        if protocol == "lodo":
            g = sets.get("external", {}).get(name, {})
        elif protocol == "internal":
            g = sets.get("internal", {}).get("all", {})
        else:
            g = sets.get("internal", {}).get("all", {})
        if g.get("n_pairs", {}).get("mean"):
            per[name] = {m: g[m]["mean"] for m in names if m in g}
            if "n_twins" in g:
                per[name]["n_twins"] = g["n_twins"]["mean"]
    out["per_cohort" if protocol != "internal" else "per_name"] = per
    for m in names:
        vals = [v[m] for v in per.values() if v.get(m) is not None and np.isfinite(v[m])]
        out[f"mean_{m}"] = float(np.mean(vals)) if vals else None
    return out
