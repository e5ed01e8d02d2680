"""Train/test splits for the MIL protocols, grouped by patient.

Every split is a :class:`Split` of row positions into the clinical table:

* ``internal``: ``StratifiedGroupKFold`` over all slides, grouped by
  patient, stratified on the event indicator (survival) or the label
  (classification); ``folds`` folds x ``repeats`` shuffles.  The held-out
  fold is the ``internal`` evaluation set; there is no external set.
* ``lodo`` (leave one dataset out): for each cohort, train on all other
  cohorts and test on it (``external``).
* ``pairwise``: for each cohort A, train on A and test on every other
  cohort (``external``, reported per cohort): the matrix of the DoRA
  paper's Figure 1.

For ``lodo`` and ``pairwise`` a patient-grouped ``internal_fraction`` of
the training cohorts is held out as the internal evaluation set, so every
run reports internal and external performance side by side.

:func:`check_no_leakage` raises if a patient is on both sides of a split;
:func:`make_splits` calls it for every split it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from raypath.errors import RaypathError

PROTOCOLS = ("internal", "lodo", "pairwise")


class LeakageError(RaypathError):
    """A patient appears in both the training and an evaluation set."""


@dataclass
class Split:
    """One train/evaluate split (row positions into the clinical table)."""

    protocol: str
    repeat: int
    fold: int
    name: str  # "internal", or the held-out / training cohort
    train: np.ndarray
    internal: np.ndarray
    external: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seed: int = 0
    # lodo: technical twins (same pair_id) of held-out tissues that sit in a
    # training cohort: never trained on, scored with the fold's model for
    # the consistency metrics only (raypath.evaluation.consistency)
    twins: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def key(self) -> str:
        return f"{self.protocol}:{self.name}:r{self.repeat}:f{self.fold}"


def check_no_leakage(
    patient_ids,
    train: np.ndarray,
    *evaluate: np.ndarray,
    where: str = "split",
) -> None:
    """Raise :class:`LeakageError` if a patient is in ``train`` and in any
    evaluation set, or if a slide is used twice.

    Parameters
    ----------
    patient_ids
        Patient of each row of the clinical table.
    train, evaluate
        Row positions of the training set and of each evaluation set.
    where
        Name of the split, for the message.
    """
    patients = np.asarray(patient_ids).astype(str)
    train = np.asarray(train, dtype=np.int64)
    train_patients = set(patients[train])
    for ev in evaluate:
        ev = np.asarray(ev, dtype=np.int64)
        shared_rows = np.intersect1d(train, ev)
        if len(shared_rows):
            raise LeakageError(
                f"{where}: {len(shared_rows)} slide(s) are in both train and test "
                f"(rows {shared_rows[:10].tolist()})"
            )
        shared = sorted(train_patients.intersection(patients[ev]))
        if shared:
            raise LeakageError(
                f"{where}: patient(s) {shared[:10]} are in both train and test; "
                "splits must be grouped by patient_id"
            )


def pair_ids(clinical: pd.DataFrame) -> np.ndarray:
    """``pair_id`` of each row as text, ``""`` for a slide without one."""
    if "pair_id" not in clinical.columns:
        return np.full(len(clinical), "", dtype=object)
    p = clinical["pair_id"]
    return np.where(p.isna(), "", p.astype(str).str.strip()).astype(object)


def linked_groups(clinical: pd.DataFrame) -> np.ndarray:
    """The split unit of each row: its patient, with patients merged when a
    ``pair_id`` links their slides (technical variants of one tissue), so a
    pair is never split.  A merged group is named by its first patient id
    in sorted order; without such links this is ``patient_id`` itself."""
    patients = clinical["patient_id"].astype(str).to_numpy()
    parent = {p: p for p in patients}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    first: dict[str, str] = {}
    for patient, pair in zip(patients, pair_ids(clinical)):
        if not pair:
            continue
        if pair not in first:
            first[pair] = patient
            continue
        a, b = find(first[pair]), find(patient)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(p) for p in patients], dtype=object)


def check_pairs_together(pairs, train: np.ndarray, *evaluate: np.ndarray, where: str = "split") -> None:
    """Raise :class:`LeakageError` if the slides of one ``pair_id`` (technical
    variants of one tissue) are on both sides of a split."""
    pairs = np.asarray(pairs, dtype=object)
    in_train = {p for p in pairs[np.asarray(train, dtype=np.int64)] if p}
    for ev in evaluate:
        shared = sorted(in_train.intersection(p for p in pairs[np.asarray(ev, dtype=np.int64)] if p))
        if shared:
            raise LeakageError(
                f"{where}: pair_id(s) {shared[:10]} have slides in both train and test; technical variants "
                "of one tissue must stay on one side (give them the same patient_id or fix the pair_id)"
            )


def _group_kfold(
    strata: np.ndarray | list[np.ndarray], groups: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped stratified folds.

    ``strata`` may be a list from fine to coarse (e.g. cohort x event, then
    event): when every stratum of one level is smaller than ``n_splits``
    (tiny cohorts) sklearn refuses it and the next, coarser level is used,
    finally a purely grouped split.
    """
    import warnings

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise RaypathError(
            f"{n_groups} patients cannot be split into {n_splits} folds: lower --folds "
            "or add patients"
        )
    levels = list(strata) if isinstance(strata, list) else [strata]
    levels.append(np.zeros(len(groups), dtype=np.int64))
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for level in levels:
        _, counts = np.unique(np.asarray(level), return_counts=True)
        if np.all(counts < n_splits):
            continue
        with warnings.catch_warnings():
            # sklearn warns when a stratum has fewer groups than folds; the
            # split is still valid (grouped), only less balanced.
            warnings.simplefilter("ignore", UserWarning)
            return list(skf.split(np.zeros(len(groups)), level, groups))
    raise RaypathError(f"{len(groups)} slides cannot be split into {n_splits} folds")


def _holdout(
    rows: np.ndarray, strata: list[np.ndarray], groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (train, internal) with ~``fraction`` of patients held out."""
    if fraction <= 0:
        return rows, np.zeros(0, dtype=np.int64)
    n_splits = max(2, int(round(1.0 / fraction)))
    n_splits = min(n_splits, len(np.unique(groups[rows])))
    if n_splits < 2:
        return rows, np.zeros(0, dtype=np.int64)
    tr, te = _group_kfold([s[rows] for s in strata], groups[rows], n_splits, seed)[0]
    return rows[tr], rows[te]


def make_splits(
    clinical: pd.DataFrame,
    protocol: str,
    target: str = "event",
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    internal_fraction: float = 0.2,
    cohorts: list[str] | None = None,
) -> list[Split]:
    """All splits of ``protocol`` over ``clinical`` (checked for leakage).

    Parameters
    ----------
    clinical
        Table with ``patient_id``, ``cohort`` and the ``target`` column.
    protocol
        ``"internal"``, ``"lodo"`` or ``"pairwise"``.
    target
        Column to stratify on (``"event"`` or ``"label"``).
    folds
        Folds of the internal protocol.
    repeats
        Repeats with seeds ``seed + repeat``.
    internal_fraction
        Share of training-cohort patients held out as internal evaluation
        set in ``lodo`` / ``pairwise`` (0 = none).
    cohorts
        Restrict the held-out (lodo) / training (pairwise) cohorts to these.
    """
    if protocol not in PROTOCOLS:
        raise RaypathError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    groups = linked_groups(clinical)  # patients, merged across pair_id links
    pairs = pair_ids(clinical)
    cohort = clinical["cohort"].astype(str).to_numpy()
    y = clinical[target].astype(str).to_numpy()
    rows_all = np.arange(len(clinical))
    all_cohorts = sorted(set(cohort))
    chosen = list(cohorts) if cohorts else all_cohorts
    unknown = sorted(set(chosen) - set(all_cohorts))
    if unknown:
        raise RaypathError(f"cohort(s) {unknown} not in the clinical table (have {all_cohorts})")
    if protocol in ("lodo", "pairwise") and len(all_cohorts) < 2:
        raise RaypathError(
            f"protocol {protocol!r} needs at least 2 cohorts, the table has {all_cohorts}: "
            "use --protocol internal"
        )
    # Stratify on cohort x target when several cohorts are pooled, so the
    # internal set mirrors the training mix.
    strata = [np.char.add(np.char.add(cohort.astype(str), "|"), y), y]
    splits: list[Split] = []
    for r in range(repeats):
        s = seed + r
        if protocol == "internal":
            for f, (tr, te) in enumerate(_group_kfold(y, groups, folds, s)):
                splits.append(Split(protocol, r, f, "internal", tr, te, seed=s))
        elif protocol == "lodo":
            for c in chosen:
                test = rows_all[cohort == c]
                # a patient with slides in several cohorts never trains on
                # the cohort it is tested in
                test_patients = set(groups[test])
                pool = rows_all[(cohort != c) & ~np.isin(groups, list(test_patients))]
                tr, internal = _holdout(pool, strata, groups, internal_fraction, s)
                test_pairs = [p for p in set(pairs[test]) if p]
                twins = rows_all[(cohort != c) & np.isin(pairs, test_pairs)] if test_pairs else rows_all[:0]
                splits.append(Split(protocol, r, 0, c, tr, internal, test, seed=s, twins=twins))
        else:  # pairwise
            for c in chosen:
                pool = rows_all[cohort == c]
                tr, internal = _holdout(pool, strata, groups, internal_fraction, s)
                train_patients = set(groups[np.concatenate([tr, internal])])
                ext = rows_all[(cohort != c) & ~np.isin(groups, list(train_patients))]
                splits.append(Split(protocol, r, 0, c, tr, internal, ext, seed=s))
    _check_splits(clinical, splits, groups, pairs)
    return splits


def _check_splits(clinical: pd.DataFrame, splits: list[Split], groups: np.ndarray, pairs: np.ndarray) -> None:
    """No patient, linked patient group or technical-variant pair on two sides of any split."""
    patients = clinical["patient_id"].astype(str).to_numpy()
    for sp in splits:
        check_no_leakage(patients, sp.train, sp.internal, sp.external, sp.twins, where=sp.key)
        check_no_leakage(groups, sp.train, sp.internal, sp.external, sp.twins, where=sp.key)
        check_pairs_together(pairs, sp.train, sp.internal, sp.external, sp.twins, where=sp.key)
        check_pairs_together(pairs, sp.internal, sp.external, where=sp.key)
