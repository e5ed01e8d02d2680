"""Protocols of the patch benchmark: splits, label fractions and the list of fits.

Splits
    Within each domain, whole patients are held out: ``test_fraction`` of the
    patients for testing, then ``val_fraction`` of the rest for validation
    (early stopping), stratified by label where the patient count allows
    (``StratifiedGroupKFold``).  A ``split`` column in the patch table is used
    instead when present.  Either way :func:`check_leakage` refuses a split
    that puts one slide or one patient on two sides: the original study split
    by cell, and neighbouring cells of one slide share stain, focus and
    tissue, so such a test set measures memory, not generalisation.

Fractions
    :func:`fraction_subsets` draws, for each seed, one random order of the
    training patches inside every (label x domain) stratum and takes the first
    ``round(f x n_stratum)`` of each for fraction ``f``: stratified by label and
    domain, and *nested* (each smaller set lies inside every larger one, so a
    curve over fractions compares like with like).  Every class keeps at least
    ``min_per_class`` patches (2: a 0.1 % set of a small study would otherwise
    be empty).

Fits
    :func:`plan_fits` lists every (protocol, training domains, method,
    fraction, seed) fit with its train/val rows and the sets it is
    evaluated on (``evals``): its test sets (``test:<domain>``, ``test:all``)
    and its validation patients (``val:all``, ``val:<training domain>``: what a
    sweep selects on, never the test sets): ``scaling`` (all domains, every
    fraction, tested in-domain on the pooled test set and on each domain's),
    ``domain`` (train on one domain, test on each: the domain matrix) and
    ``lodo`` (train on all but one domain, test on it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.evaluation.splits import LeakageError

PROTOCOLS = ("scaling", "domain", "lodo")


def check_leakage(table: pd.DataFrame, split: np.ndarray, where: str = "patch split") -> None:
    """Raise :class:`LeakageError` if a slide or a patient has patches in two of train/val/test."""
    split = np.asarray(split, dtype=object)
    for col in ("slide_id", "patient_id"):
        sides = pd.DataFrame({"id": table[col].astype(str).to_numpy(), "split": split}).groupby("id")["split"].nunique()
        shared = sorted(sides[sides > 1].index)
        if shared:
            raise LeakageError(
                f"{where}: {len(shared)} {col.replace('_id', '')}(s) have patches in more than one of "
                f"train/val/test (e.g. {shared[:5]}); split by patient, never by cell: give all patches of a "
                "patient the same `split` (or drop the column to let raypath split by patient)"
            )


def _holdout(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): about ``fraction`` of the patients of ``rows`` held out, label-stratified
    where the counts allow (``StratifiedGroupKFold``), else a random draw of whole patients."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups[rows]))
    n_splits = min(max(2, int(round(1.0 / fraction))), n_groups) if fraction > 0 else 0
    if n_splits < 2:
        return rows, rows[:0]
    if np.unique(labels[rows], return_counts=True)[1].max() < n_splits:  # too few to stratify
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1618]))
        ids = np.unique(groups[rows])
        held_ids = rng.permutation(ids)[: min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))]
        held = np.isin(groups[rows], held_ids)
        return rows[~held], rows[held]
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer groups than folds in a class: still grouped
        keep, held = next(iter(skf.split(np.zeros(len(rows)), labels[rows], groups[rows])))
    return rows[keep], rows[held]


def check_split_counts(table: pd.DataFrame, val_fraction: float = 0.2, source: str = "patch table") -> None:
    """Refuse, before splitting, a table too small for a patient split: every domain needs a patient
    for each of train/val/test and every class a patient on each side (one sentence naming ``source``)."""
    sides = 3 if val_fraction > 0 else 2
    what = "train, validation and test" if sides == 3 else "train and test"
    for dom, g in table.groupby("domain", sort=True):
        n = g["patient_id"].astype(str).nunique()
        if n < sides:
            raise RaypathError(
                f"{source}: domain {dom!r} has {n} patient(s), too few for a patient split (at least {sides}: one "
                f"each for {what}); add patients (images) to the domain or merge it with another"
            )
    per_class = table.groupby(table["label"].astype(str))["patient_id"].nunique()
    small = per_class[per_class < sides]
    if len(small):
        shown = ", ".join(f"{c!r}: {int(n)}" for c, n in small.items())
        raise RaypathError(
            f"{source}: too few patients per class for a patient split ({shown}; at least {sides} each, one for "
            f"each of {what}; without a groups table every image is its own patient); add patches of "
            "other patients to those classes"
        )


def check_training_counts(table: pd.DataFrame, split: np.ndarray, min_per_class: int, source: str = "patch table",
                          seed: int = 0) -> None:
    """Refuse a split whose training patients hold fewer than ``min_per_class`` patches of some class."""
    labels = table["label"].astype(str).to_numpy()
    train = np.asarray(split, dtype=object) == "train"
    for c in sorted(set(labels)):
        n = int((train & (labels == c)).sum())
        if n < min_per_class:
            raise RaypathError(
                f"{source}: after the patient split (--split-seed {seed}) class {c!r} has {n} training patch(es) of "
                f"{int((labels == c).sum())} (at least --min-per-class {min_per_class}); add patients of that class, "
                "lower --test-fraction/--val-fraction or --min-per-class, or try another --split-seed"
            )


def assign_splits(table: pd.DataFrame, test_fraction: float = 0.2, val_fraction: float = 0.2,
                  seed: int = 0, source: str = "patch table") -> np.ndarray:
    """``train`` / ``val`` / ``test`` per patch: the table's ``split`` column if it has one
    (checked), else patients held out within each domain (see the module doc)."""
    if "split" in table.columns and table["split"].notna().any():
        split = table["split"].astype(object).to_numpy()
        if pd.isna(split).any():
            raise RaypathError(f"{source}: `split` is empty for some rows: give every row train, val or test, "
                               "or drop the column")
        check_leakage(table, split)
        return split
    check_split_counts(table, val_fraction, source)
    labels = table["label"].astype(str).to_numpy()
    groups = table["patient_id"].astype(str).to_numpy()
    split = np.full(len(table), "train", dtype=object)
    for dom, rows in table.groupby("domain", sort=True).indices.items():
        rest, test = _holdout(np.asarray(rows), labels, groups, test_fraction, seed)
        _, val = _holdout(rest, labels, groups, val_fraction, seed + 1)
        split[test] = "test"
        split[val] = "val"
    check_leakage(table, split)
    return split


def fraction_subsets(rows: np.ndarray, labels: np.ndarray, domains: np.ndarray, fractions: list[float],
                     seed: int, min_per_class: int = 2) -> dict[float, np.ndarray]:
    """Nested, (label x domain)-stratified subsets of ``rows`` for each fraction (sorted row arrays)."""
    rows = np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 271828]))
    strata: dict[tuple[str, str], np.ndarray] = {}
    for key in sorted(set(zip(labels[rows], domains[rows]))):
        members = rows[(labels[rows] == key[0]) & (domains[rows] == key[1])]
        strata[key] = members[rng.permutation(len(members))]
    floor = {k: 0 for k in strata}
    for lab in sorted(set(labels[rows])):
        mine = sorted((k for k in strata if k[0] == lab), key=lambda k: (-len(strata[k]), k[1]))
        need = min(min_per_class, sum(len(strata[k]) for k in mine))
        while need > 0:
            for k in mine:
                if need and floor[k] < len(strata[k]):
                    floor[k] += 1
                    need -= 1
    out = {}
    for f in fractions:
        take = [s[: max(int(np.floor(f * len(s) + 0.5)), floor[k])] for k, s in strata.items()]
        out[f] = np.sort(np.concatenate(take)) if take else rows[:0]
    return out


@dataclass
class Fit:
    """One fit: which rows train, which validate, which test sets it is scored on."""

    protocol: str
    train_on: str  # "all", a domain, or "all-but-<domain>"
    method: str
    fraction: float
    seed: int
    train: np.ndarray
    val: np.ndarray
    evals: dict[str, np.ndarray] = field(default_factory=dict)  # "test:<d>"/"val:<d>" -> rows (see plan_fits)

    @property
    def key(self) -> str:
        return f"{self.protocol}__{self.train_on}__{self.method}__f{self.fraction:g}__s{self.seed}"


def _tests(domains: np.ndarray, split: np.ndarray, include_all: bool) -> dict[str, np.ndarray]:
    out = {f"test:{d}": np.flatnonzero((split == "test") & (domains == d)) for d in sorted(set(domains))}
    if include_all:
        out["test:all"] = np.flatnonzero(split == "test")
    return out


def _vals(domains: np.ndarray, val_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The fit's validation patients (training domains only), pooled and per domain: what a sweep selects on."""
    if not len(val_rows):
        return {}
    out = {f"val:{d}": val_rows[domains[val_rows] == d] for d in sorted(set(domains[val_rows]))}
    return {"val:all": val_rows, **out}


def fit_test_sets(fit: "Fit") -> dict[str, np.ndarray]:
    """The fit's test sets (``test:*`` evaluation sets), without its validation sets."""
    return {n: r for n, r in fit.evals.items() if n.startswith("test:")}


def plan_fits(table: pd.DataFrame, split: np.ndarray, methods: list[str], protocols: list[str],
              fractions: list[float], seeds: list[int], domain_fractions: list[float],
              min_per_class: int = 2) -> list[Fit]:
    """Every fit of the benchmark (see the module doc), in a stable order."""
    labels = table["label"].astype(str).to_numpy()
    domains = table["domain"].astype(str).to_numpy()
    doms = sorted(set(domains))
    pool, val = split == "train", split == "val"
    groups: list[tuple[str, str, np.ndarray, list[float]]] = []
    if "scaling" in protocols:
        groups.append(("scaling", "all", np.ones(len(table), bool), fractions))
    if "domain" in protocols:
        groups += [("domain", d, domains == d, domain_fractions) for d in doms]
    if "lodo" in protocols and len(doms) > 1:
        groups += [("lodo", f"all-but-{d}", domains != d, domain_fractions) for d in doms]
    fits = []
    for protocol, name, sel, fracs in groups:
        present = sorted(set(labels[pool & sel]))
        if len(present) < 2:
            raise RaypathError(
                f"protocol {protocol!r}: the training patients of {name!r} hold only class(es) {present}, so no "
                f"classifier can be trained on them; add patients of the other classes or leave {protocol!r} out "
                "of --protocols"
            )
        tests = _tests(domains, split, include_all=protocol == "scaling")
        for seed in seeds:
            subsets = fraction_subsets(np.flatnonzero(pool & sel), labels, domains, fracs, seed, min_per_class)
            val_rows = np.flatnonzero(val & sel)
            evals = {**tests, **_vals(domains, val_rows)}
            for f in fracs:
                for m in methods:
                    fits.append(Fit(protocol, name, m, f, seed, subsets[f], val_rows, dict(evals)))
    return fits
