"""Harrell's C-index against sksurv and lifelines; other metrics and summaries."""

from __future__ import annotations

import numpy as np
import pytest

from raypath.evaluation.metrics import (
    classification_metrics,
    harrell_c_index,
    summarize,
    survival_metrics,
    time_dependent_auc,
    uno_c_index,
)


def _random_case(rng: np.random.Generator):
    n = int(rng.integers(3, 80))
    # few distinct values -> many tied times and tied risks
    time = rng.integers(1, int(rng.integers(2, 12)), size=n).astype(float)
    if rng.random() < 0.5:
        time = time + rng.random(n) * (rng.random() < 0.5)
    event = rng.random(n) < rng.uniform(0.1, 0.95)
    if not event.any():
        event[rng.integers(n)] = True
    risk = rng.integers(0, int(rng.integers(1, 6)), size=n).astype(float)
    if rng.random() < 0.5:
        risk = risk + rng.normal(size=n)
    return time, event, risk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c_index_matches_sksurv_counts_on_random_cases(seed):
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(1000 + seed)
    for _ in range(100):
        time, event, risk = _random_case(rng)
        ours = harrell_c_index(time, event, risk, return_counts=True)
        ref = concordance_index_censored(event, time, risk)
        assert ours[1:] == tuple(int(x) for x in ref[1:])
        assert ours[0] == pytest.approx(ref[0], abs=1e-12)


def test_c_index_matches_lifelines_on_random_cases():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(200):
        time, event, risk = _random_case(rng)
        ours = harrell_c_index(time, event, risk)
        if np.isnan(ours):
            continue
        # lifelines scores = predicted survival: higher = longer, so -risk
        ref = concordance_index(time, -risk, event)
        assert ours == pytest.approx(ref, abs=1e-12)
        checked += 1
    assert checked > 150


def test_c_index_extremes_and_no_pairs():
    t = np.arange(1, 11, dtype=float)
    e = np.ones(10, dtype=int)
    assert harrell_c_index(t, e, -t) == 1.0  # earlier event = higher risk
    assert harrell_c_index(t, e, t) == 0.0
    assert harrell_c_index(t, e, np.zeros(10)) == 0.5
    assert np.isnan(harrell_c_index(t, np.zeros(10), -t))  # all censored


def test_uno_and_td_auc_follow_the_risk_order():
    rng = np.random.default_rng(3)
    r = rng.normal(size=400)
    t = rng.exponential(1 / np.exp(2 * r))
    c = rng.exponential(2.0, size=400)
    time, event = np.minimum(t, c), (t <= c).astype(int)
    tr, te = slice(0, 200), slice(200, 400)
    good = uno_c_index(time[tr], event[tr], time[te], event[te], r[te])
    bad = uno_c_index(time[tr], event[tr], time[te], event[te], -r[te])
    assert good > 0.7 and bad < 0.3
    auc, times, per_time = time_dependent_auc(time[tr], event[tr], time[te], event[te], r[te])
    assert auc > 0.7 and len(times) == len(per_time) > 0
    m = survival_metrics(time[te], event[te], r[te], time[tr], event[tr])
    assert {"c_index", "uno_c", "td_auc", "n_comparable_pairs"} <= set(m)


def test_classification_metrics_binary_and_multiclass():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.4, 0.8, 0.9, 0.35, 0.2])
    m = classification_metrics(y, p)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    y3 = np.array([0, 1, 2, 2, 1, 0])
    p3 = np.eye(3)[y3] * 0.8 + 0.2 / 3
    m3 = classification_metrics(y3, p3)
    assert m3["auroc"] == 1.0 and m3["f1"] == 1.0


def test_summarize_mean_sd_and_bootstrap_ci():
    v = [0.6, 0.7, 0.65, 0.72, float("nan")]
    s = summarize(v)
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(np.mean(v[:4]))
    assert s["sd"] == pytest.approx(np.std(v[:4], ddof=1))
    assert min(v[:4]) <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= max(v[:4])
    assert summarize([])["mean"] is None
