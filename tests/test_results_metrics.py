"""C-index that a user can read: cohort-stratified internal C beside the pooled
one, per patient, with its number of comparable pairs (issue 12, item 3);
checked against sksurv and lifelines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raypath.evaluation.metrics import concordance, per_patient, survival_metrics


def _two_sites(n=30, offset=10.0, seed=0):
    """Two cohorts; within each, risk orders survival perfectly; cohort B's risks
    sit ``offset`` higher although B lives longer: a pooled C mixes the two."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, shift_t, shift_r in (("A", 0.0, 0.0), ("B", 50.0, offset)):
        t = rng.uniform(1, 40, n) + shift_t
        rows.append(pd.DataFrame({"cohort": c, "time": t, "event": rng.random(n) < 0.8,
                                  "risk": -t / 40 + shift_r, "patient_id": [f"{c}{i}" for i in range(n)]}))
    return pd.concat(rows, ignore_index=True)


def test_stratified_c_compares_pairs_only_within_a_cohort_and_equals_sksurv_sums():
    from sksurv.metrics import concordance_index_censored

    df = _two_sites()
    pooled = concordance(df.time, df.event, df.risk)
    strat = concordance(df.time, df.event, df.risk, strata=df.cohort)
    assert pooled["c_index"] < 0.6 and strat["c_index"] == 1.0  # the site offset only moves the pooled one
    # counts = the sum of sksurv's per-cohort counts
    conc = tied = n = 0
    rng = np.random.default_rng(1)
    df["risk"] = rng.normal(size=len(df)).round(1)  # tied risks too
    for _, g in df.groupby("cohort"):
        c, cc, dd, tr, _ = concordance_index_censored(g.event.to_numpy(), g.time.to_numpy(), g.risk.to_numpy())
        conc, tied, n = conc + cc, tied + tr, n + cc + dd + tr
    strat = concordance(df.time, df.event, df.risk, strata=df.cohort)
    assert strat["n_comparable_pairs"] == n
    assert strat["c_index"] == pytest.approx((conc + 0.5 * tied) / n, abs=1e-12)


def test_c_per_patient_counts_a_patient_once_and_matches_lifelines():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(3)
    n = 40
    pts = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "time": rng.uniform(1, 10, n),
                        "event": rng.random(n) < 0.7})
    slides = pts.loc[np.repeat(np.arange(n), rng.integers(1, 4, n))].reset_index(drop=True)
    slides["risk"] = -slides["time"] + rng.normal(scale=3.0, size=len(slides))
    m = survival_metrics(slides.time, slides.event, slides.risk, patients=slides.patient_id)
    agg = per_patient(slides)
    assert m["n_patients"] == n and len(agg) == n
    ref = concordance_index(agg.time, -agg.risk, agg.event)
    assert m["c_index"] == pytest.approx(ref, abs=1e-12)
    by_slide = survival_metrics(slides.time, slides.event, slides.risk)
    assert by_slide["n_comparable_pairs"] > m["n_comparable_pairs"]  # slides of one patient were counted twice


def test_fewer_than_10_comparable_pairs_is_nan_with_the_reason():
    m = survival_metrics([1, 2, 3, 4], [1, 1, 0, 0], [4, 3, 2, 1])
    assert m["n_comparable_pairs"] == 5 and math.isnan(m["c_index"])
    assert "only 5 comparable pair(s)" in m["c_index_note"]
    ok = survival_metrics(np.arange(1, 7), np.ones(6), -np.arange(1, 7))
    assert ok["c_index"] == 1.0 and ok["n_comparable_pairs"] == 15 and ok["c_index_note"] is None
    few = survival_metrics([1, 2, 3, 4], [1, 1, 0, 0], [4, 3, 2, 1], [1, 2, 3, 5], [1, 1, 1, 0])
    assert math.isnan(few["uno_c"])  # Uno's C ranks the same pairs: not reported either


def test_lodo_reports_stratified_internal_c_and_pairs_beside_the_pooled_one():
    """Through the protocol: fold metrics hold a 'stratified' internal row, every
    C has n_comparable_pairs, the summary names both internal scores."""
    from raypath.mil.data import make_synthetic_bags
    from raypath.mil.protocols import STRATIFIED, run_protocol
    from raypath.mil.train import TrainParams

    bags, clin = make_synthetic_bags(n_slides=90, n_cohorts=3, dim=6, tiles=(4, 8), signal=1.0, seed=5)
    clin = clin.copy()
    # a second slide (same cohort: rows 3 apart) for some patients: each patient must count once
    two = np.isin(clin.index % 12, [3, 4, 5])
    for col in ("patient_id", "time", "event"):
        clin.loc[two, col] = clin[col].shift(3)[two]
    out = run_protocol(bags, clin, TrainParams(epochs=2, lr=1e-3, batch_size=32, max_tiles_per_slide=8), "lodo",
                       internal_fraction=0.4)
    fm = out.fold_metrics
    st = fm[(fm["set"] == "internal") & (fm["cohort"] == STRATIFIED)]
    assert len(st) == 3 and st["n_comparable_pairs"].gt(0).all()
    pooled = fm[(fm["set"] == "internal") & (fm["cohort"] == "all")]
    assert (pooled["n_comparable_pairs"].to_numpy() >= st["n_comparable_pairs"].to_numpy()).all()
    assert fm["n_comparable_pairs"].notna().all()
    # per patient: the external units are the held-out cohort's patients
    ext = fm[fm["set"] == "external"].set_index("name")
    for c, g in clin.groupby("cohort"):
        assert ext.loc[c, "n_patients"] == g["patient_id"].nunique() < len(g)
    s = out.summary
    assert set(s["internal_stratified"]) == set(s["internal"]) == set(clin["cohort"])
    assert "within a cohort" in s["internal_note"]
    g = s["groups"]["site0"]["internal"][STRATIFIED]
    assert {"c_index", "n_comparable_pairs"} <= set(g) and "uno_c" not in g
