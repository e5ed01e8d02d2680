"""Protocol splits: grouped by patient, leakage checked, errors on bad layouts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.mil.data import make_synthetic_bags
from raypath.evaluation.splits import LeakageError, check_no_leakage, make_splits


@pytest.fixture(scope="module")
def clinical() -> pd.DataFrame:
    # 3 slides per patient so a slide-level split would leak
    _, df = make_synthetic_bags(n_slides=180, n_cohorts=3, dim=4, slides_per_patient=3, seed=5)
    return df


def _patients(df, rows):
    return set(df["patient_id"].to_numpy()[rows])


@pytest.mark.parametrize("protocol", ["internal", "lodo", "pairwise"])
def test_no_patient_on_both_sides(clinical, protocol):
    splits = make_splits(clinical, protocol, "event", folds=5, repeats=2, seed=3)
    assert splits
    for sp in splits:
        train = _patients(clinical, sp.train)
        assert not train & _patients(clinical, sp.internal)
        assert not train & _patients(clinical, sp.external)
        assert len(sp.train) > 0 and len(sp.internal) + len(sp.external) > 0


def test_internal_folds_partition_every_slide_once_per_repeat(clinical):
    splits = make_splits(clinical, "internal", "event", folds=5, repeats=2, seed=0)
    assert len(splits) == 10
    for r in (0, 1):
        held = np.concatenate([s.internal for s in splits if s.repeat == r])
        assert sorted(held.tolist()) == list(range(len(clinical)))
    # repeats shuffle differently
    a = [tuple(sorted(s.internal)) for s in splits if s.repeat == 0]
    b = [tuple(sorted(s.internal)) for s in splits if s.repeat == 1]
    assert set(a) != set(b)


def test_lodo_holds_out_each_cohort(clinical):
    splits = make_splits(clinical, "lodo", "event", repeats=1, internal_fraction=0.2)
    cohorts = clinical["cohort"].to_numpy()
    assert sorted(s.name for s in splits) == sorted(set(cohorts))
    for s in splits:
        assert set(cohorts[s.external]) == {s.name}
        assert s.name not in set(cohorts[s.train]) | set(cohorts[s.internal])
        assert (cohorts == s.name).sum() == len(s.external)


def test_pairwise_trains_on_one_cohort_and_tests_on_the_others(clinical):
    splits = make_splits(clinical, "pairwise", "event")
    cohorts = clinical["cohort"].to_numpy()
    for s in splits:
        assert set(cohorts[s.train]) == {s.name}
        assert set(cohorts[s.external]) == set(cohorts) - {s.name}


def test_lodo_drops_patients_shared_with_the_test_cohort(clinical):
    df = clinical.copy()
    # a patient scanned in two cohorts
    df.loc[0, "patient_id"] = "shared"
    df.loc[3, "patient_id"] = "shared"
    assert df.loc[0, "cohort"] != df.loc[3, "cohort"]
    for s in make_splits(df, "lodo", "event"):
        check_no_leakage(df["patient_id"], s.train, s.internal, s.external)


def test_check_no_leakage_raises():
    pids = np.array(["a", "a", "b", "c"])
    check_no_leakage(pids, np.array([0, 1]), np.array([2, 3]))
    with pytest.raises(LeakageError, match="patient"):
        check_no_leakage(pids, np.array([0, 2]), np.array([1, 3]), where="fold 1")
    with pytest.raises(LeakageError, match="slide"):
        check_no_leakage(pids, np.array([0, 2]), np.array([2]))


def test_lodo_needs_two_cohorts(clinical):
    one = clinical.assign(cohort="only")
    with pytest.raises(RaypathError, match="at least 2 cohorts"):
        make_splits(one, "lodo", "event")
    with pytest.raises(RaypathError, match="not in the clinical table"):
        make_splits(clinical, "lodo", "event", cohorts=["nope"])


def test_tiny_cohorts_still_split_grouped():
    # 3 cohorts x 5 slides: every cohort x event stratum is smaller than the
    # 5 folds of the internal hold-out, which sklearn refuses on its own
    _, df = make_synthetic_bags(n_slides=15, n_cohorts=3, dim=2, seed=0)
    for protocol in ("lodo", "pairwise", "internal"):
        splits = make_splits(df, protocol, "event", folds=3, repeats=2)
        assert all(len(s.train) for s in splits)
