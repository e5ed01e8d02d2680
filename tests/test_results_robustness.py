"""Robustness numbers that stay right (issue 12): RI/CRoMa and the site probe
group by patient / pair_id, never by slide (items 4 and 8), and a comparison
names a winner only when the paired bootstrap CI over patients excludes 0 (item 7)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raypath.robustness import metrics as M
from raypath.robustness.api import RobustnessConfig, analyse, tissue_units

FAST = dict(workdir="unused", tiles_per_slide=10, kmeans_k=8, kmeans_repeats=2, cluster_score_k=3, plots=False,
            gallery=False, knn_k=5)


def twins(n_tissues=24, tiles=8, dim=16, seed=0, linked_by="patient"):
    """Each tissue is scanned at two sites (slides t<i>a at c0, t<i>b at c1): the
    twin's tiles are near copies; biology is random noise relative to the site.
    ``linked_by='pair'``: the twins have different patient ids and share a pair_id."""
    rng = np.random.default_rng(seed)
    site = rng.normal(size=(2, dim)) * 0.3
    X, rows = [], []
    for i in range(n_tissues):
        tissue = rng.normal(size=dim) * 2.0 + 0.3 * rng.normal(size=(tiles, dim))
        bio = f"class{i % 2}"
        for s, suffix in enumerate("ab"):
            X.append(tissue + site[s] + 0.05 * rng.normal(size=(tiles, dim)))
            patient = f"p{i}" if linked_by == "patient" else f"p{i}{suffix}"
            rows += [dict(slide_id=f"t{i}{suffix}", patient_id=patient, pair_id=f"pair{i}", cohort=f"c{s}",
                          label=bio)] * tiles
    return np.concatenate(X).astype(np.float32), pd.DataFrame(rows)


@pytest.mark.parametrize("linked_by", ["patient", "pair"])
def test_a_tiles_own_twin_is_never_its_same_biology_other_centre_neighbour(linked_by):
    X, meta = twins(linked_by=linked_by)
    units = tissue_units(meta)
    assert len(set(units)) == 24  # one unit per tissue, whether linked by patient or by pair_id
    res, _ = analyse(X, meta, RobustnessConfig(**FAST))
    by_slide = M.robustness_index(X, meta.label, meta.cohort, meta.slide_id, k=5)
    by_tissue = M.robustness_index(X, meta.label, meta.cohort, units, k=5)
    assert by_slide["ri"] > 0.95  # the twin (same tissue, other site) fills the neighbourhood
    assert res["robustness_index"]["ri"] == pytest.approx(by_tissue["ri"]) and by_tissue["ri"] < 0.8
    cr_slide = M.croma(X, meta.label, meta.cohort, meta.slide_id)["median"]
    assert res["croma"]["median"] == pytest.approx(M.croma(X, meta.label, meta.cohort, units)["median"])
    assert res["croma"]["median"] < cr_slide - 0.3


def test_site_probe_is_grouped_by_patient_not_slide():
    """Two slides per patient, a strong patient signature and no site signal:
    grouped by slide, the probe recognises the patient (and so its cohort) in
    the held-out fold; grouped by patient it is at chance."""
    rng = np.random.default_rng(1)
    X, rows = [], []
    for p in range(30):
        sig = rng.normal(size=64) * 3.0
        for s in range(2):
            X.append(sig + rng.normal(size=(6, 64)))
            rows += [dict(slide_id=f"p{p}s{s}", patient_id=f"p{p}", cohort=f"c{p % 2}", label="x")] * 6
    X, meta = np.concatenate(X).astype(np.float32), pd.DataFrame(rows)
    res, _ = analyse(X, meta, RobustnessConfig(**FAST))
    probe = res["site_probe"]
    assert probe["n_patients"] == 30  # CV groups = patients (60 if grouped by slide)
    assert probe["balanced_accuracy"] < 0.7
    leaky = M.site_probe(X, meta.cohort, meta.slide_id)
    assert leaky["balanced_accuracy"] > probe["balanced_accuracy"] + 0.2  # what grouping by slide would report


def test_bootstrap_statistics_equal_the_headline_on_the_full_sample():
    """Each resampled statistic with every patient drawn once is the reported number."""
    from raypath.robustness.bootstrap import contributions

    X, meta = twins(n_tissues=20, linked_by="pair")
    meta["label"] = np.where(np.arange(len(meta)) % 3 == 0, "a", "b")  # tile-level mix: several clusters
    res, arrays = analyse(X, meta, RobustnessConfig(**{**FAST, "cluster_score_k": None}))
    contrib = contributions(X, arrays)
    assert set(contrib) >= {"site_probe_balanced_accuracy", "kmeans_purity", "robustness_index", "croma_median",
                            "croma_worst10_mean", "croma_frac_le_0", "clustering_score", "cohort_silhouette",
                            "cohort_calinski_harabasz"}
    for key, c in contrib.items():
        assert c.stat(np.ones((1, len(c.units))))[0] == pytest.approx(res["headline"][key], rel=1e-6, abs=1e-9), key
    # a patient drawn twice counts twice: equal to duplicating its tiles
    c = contrib["croma_median"]
    w = np.ones((1, len(c.units)))
    w[0, 0], w[0, 1] = 3, 0
    vals, units = np.asarray(arrays["croma"]), np.asarray(arrays["units"])[arrays["croma_rows"]]
    expanded = np.concatenate([vals[units == u].repeat(int(w[0, i])) for i, u in enumerate(c.units)])
    assert c.stat(w)[0] == pytest.approx(np.median(expanded[np.isfinite(expanded)]))


def _store(wd, key, X, meta):
    from raypath.embed.store import write_bag_table

    for sid, grp in meta.groupby("slide_id", sort=False):
        write_bag_table(str(wd / "features" / key), sid, np.arange(len(grp)), np.zeros((len(grp), 2), int),
                        X[grp.index.to_numpy()], dtype="float32")


def test_compare_calls_noise_a_tie_and_a_real_change_a_winner(tmp_path, capsys):
    from raypath.cli import main
    from raypath.robustness.api import compare

    X, meta = twins(n_tissues=16, linked_by="pair")
    wd = tmp_path / "wd"
    wd.mkdir()
    meta.drop_duplicates("slide_id").assign(status="ok", uri="x.svs").to_parquet(wd / "slides.parquet")
    rng = np.random.default_rng(7)
    _store(wd, "fm", X, meta)
    _store(wd, "fm-noise", X + 1e-3 * rng.normal(size=X.shape).astype(np.float32), meta)
    site = np.where(meta.cohort.to_numpy()[:, None] == "c0", 3.0, -3.0) * np.ones((1, X.shape[1]))
    _store(wd, "fm-site", X + site.astype(np.float32), meta)  # far more site information
    cfg = RobustnessConfig(**{**FAST, "workdir": str(wd), "bootstrap_resamples": 300})
    noise = compare("fm", "fm-noise", cfg.model_copy(update={"run": "noise"}))["delta"]
    for key in ("site_probe_balanced_accuracy", "robustness_index", "croma_median", "kmeans_purity",
                "cohort_silhouette"):
        d = noise[key]
        assert d["ci_low"] <= 0 <= d["ci_high"] and d["more_robust"] == "tie", (key, d)
    real = compare("fm", "fm-site", cfg.model_copy(update={"run": "site"}))["delta"]
    for key in ("cohort_silhouette", "cohort_calinski_harabasz"):
        assert real[key]["more_robust"] == "a" and real[key]["ci_low"] > 0, (key, real[key])
    assert real["cohort_davies_bouldin"]["more_robust"] is None and "not bootstrapped" in real["cohort_davies_bouldin"]["note"]
    doc = json.loads((wd / "runs" / "site" / "comparison.json").read_text())
    assert "paired bootstrap over patients (300 resamples" in doc["uncertainty"]
    rc = main(["robustness", "--workdir", str(wd), "--features", "fm", "--compare-to", "fm-noise", "--run", "cli",
               "--no-plots", "--kmeans-k", "8", "--kmeans-repeats", "1", "--bootstrap-resamples", "200",
               "--knn-k", "5", "--cluster-score-k", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "tie (CI contains 0)" in out and "95% CI" in out
