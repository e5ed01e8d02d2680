"""The nested leave-one-dataset-out (LODO) protocol of a sweep trial, as data.

For every held-out cohort C a trial runs one *fold*:

1. **adapt** (kind ``adapter`` only) on the slides of the training cohorts
   (every cohort but C) -- never on C;
2. **embed** the slides MIL needs with that fold's adapter (training cohorts
   *and* C: embedding is inference, it fits nothing);
3. **MIL** trained on ``train`` slides of the training cohorts;
4. **inner selection** (the epoch, when ``inner_selection:
   best_internal_epoch``) and the trial's ``mean_internal`` score on the
   ``selection`` slides: a patient-grouped hold-out of the training cohorts;
5. **robustness** metrics (site probe, KMeans purity) on tiles of the
   training cohorts only, because they can be sweep objectives;
6. **test**: C is scored, and only scored.

:func:`nested_lodo_plan` returns exactly which slides (and cohorts) each of
these steps sees for each fold, computed with the very splitter the MIL stage
uses (:func:`raypath.evaluation.splits.make_splits`), and :func:`audit_plan` raises
if any held-out slide or patient reaches a step that fits or selects.  A
trial calls both before it trains anything and checks, after each step, that
the slides the step actually used are the planned ones
(:func:`check_step`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from raypath.mil.protocols import validate_clinical
from raypath.evaluation.splits import LeakageError, make_splits

#: Steps that fit or select something: the held-out cohort must never reach them.
FITTING_STEPS = ("adapt", "train", "selection", "robustness")


@dataclass
class FoldPlan:
    """What each step of one nested-LODO fold sees (sorted slide ids)."""

    held_out: str
    train_cohorts: list[str]
    adapt: list[str] = field(default_factory=list)  # empty for MIL-only sweeps
    embed: list[str] = field(default_factory=list)  # inference only; includes the held-out cohort
    train: list[str] = field(default_factory=list)
    selection: list[str] = field(default_factory=list)
    robustness: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    #: patients of the held-out cohort (no step that fits may see them either)
    held_out_patients: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def cohorts_seen(self, clinical: pd.DataFrame) -> dict[str, list[str]]:
        """Cohorts of the slides each step sees."""
        cohort_of = dict(zip(clinical["slide_id"].astype(str), clinical["cohort"].astype(str)))
        return {
            step: sorted({cohort_of[s] for s in getattr(self, step)})
            for step in ("adapt", "embed", "train", "selection", "robustness", "test")
        }


def nested_lodo_plan(
    clinical: pd.DataFrame,
    task: str = "survival",
    internal_fraction: float = 0.2,
    seed: int = 0,
    repeats: int = 1,
    cohorts: list[str] | None = None,
    adapt: bool = False,
) -> list[FoldPlan]:
    """For each held-out cohort, the slides each step of a trial sees.

    Parameters
    ----------
    clinical
        One row per slide (slide_id, patient_id, cohort and the task's
        outcome columns); rows whose ``status`` is not ``"ok"`` are dropped,
        as the MIL stage does.
    task, internal_fraction, seed, repeats
        The MIL settings of the trial (they decide the train/selection split;
        the same values must reach the MIL stage).
    cohorts
        Held-out cohorts (folds); default: every cohort.
    adapt
        Whether the trial adapts a model per fold (kind ``adapter``).

    Returns
    -------
    One :class:`FoldPlan` per held-out cohort, in sorted cohort order.
    Training / selection sets are the union over ``repeats``.
    """
    df = clinical
    if "status" in df.columns:
        df = df[df["status"].astype(str) == "ok"]
    df = validate_clinical(df, task)
    target = "event" if task == "survival" else "label_index"
    ids = df["slide_id"].astype(str).to_numpy()
    cohort = df["cohort"].astype(str).to_numpy()
    patients = df["patient_id"].astype(str).to_numpy()
    splits = make_splits(df, "lodo", target, folds=2, repeats=repeats, seed=seed,
                         internal_fraction=internal_fraction, cohorts=cohorts)
    plans: dict[str, FoldPlan] = {}
    for sp in splits:
        c = sp.name
        test_patients = set(patients[sp.external])
        plan = plans.get(c)
        if plan is None:
            train_cohorts = sorted(set(cohort) - {c})
            # adaptation and robustness use whole training cohorts, minus any
            # slide of a held-out patient that also has slides elsewhere
            pool = (cohort != c) & ~np.isin(patients, list(test_patients))
            plan = FoldPlan(
                held_out=c,
                train_cohorts=train_cohorts,
                adapt=sorted(ids[pool]) if adapt else [],
                embed=sorted(ids[pool | (cohort == c)]),
                robustness=sorted(ids[pool]),
                test=sorted(ids[sp.external]),
                held_out_patients=sorted(test_patients),
            )
            plans[c] = plan
        plan.train = sorted(set(plan.train) | set(ids[sp.train]))
        plan.selection = sorted(set(plan.selection) | set(ids[sp.internal]))
    out = [plans[c] for c in sorted(plans)]
    audit_plan(out, clinical)
    return out


def audit_plan(plans: list[FoldPlan], clinical: pd.DataFrame) -> None:
    """Raise :class:`~raypath.evaluation.splits.LeakageError` if, in any fold, a
    slide or a patient of the held-out cohort reaches a step that fits or
    selects (adapt, train, selection, robustness), or if the test set is not
    exactly the held-out cohort."""
    sid = clinical["slide_id"].astype(str)
    cohort_of = dict(zip(sid, clinical["cohort"].astype(str)))
    patient_of = dict(zip(sid, clinical["patient_id"].astype(str)))
    for p in plans:
        held = {s for s, c in cohort_of.items() if c == p.held_out}
        held_patients = {patient_of[s] for s in held}
        for step in FITTING_STEPS:
            seen = set(getattr(p, step))
            leaked = sorted(seen & held)
            if leaked:
                raise LeakageError(
                    f"fold holding out {p.held_out!r}: step {step!r} would see {len(leaked)} slide(s) of the "
                    f"held-out cohort (e.g. {leaked[:5]})"
                )
            shared = sorted({patient_of[s] for s in seen} & held_patients)
            if shared:
                raise LeakageError(
                    f"fold holding out {p.held_out!r}: step {step!r} would see patient(s) {shared[:5]} "
                    "of the held-out cohort"
                )
        if p.held_out in p.train_cohorts:
            raise LeakageError(f"fold holding out {p.held_out!r} lists it among its training cohorts")
        ok_held = {s for s in held if s in set(p.embed)}
        if set(p.test) - held or (p.test and set(p.test) != ok_held):
            raise LeakageError(f"fold holding out {p.held_out!r}: test set is not exactly that cohort's slides")


def check_step(plan: FoldPlan, step: str, used_slide_ids) -> None:
    """Raise :class:`LeakageError` if a step used a slide the plan did not allow.

    Called by the trial with what a stage reports it actually read (e.g. the
    adapter's ``training_tiles.parquet``, the MIL split rows).
    """
    used = {str(s) for s in used_slide_ids}
    allowed = set(getattr(plan, step))
    extra = sorted(used - allowed)
    if extra:
        raise LeakageError(
            f"fold holding out {plan.held_out!r}: step {step!r} used {len(extra)} slide(s) outside its plan "
            f"(e.g. {extra[:5]})"
        )


def steps_seen(plans: list[FoldPlan], clinical: pd.DataFrame) -> pd.DataFrame:
    """One row per (fold, step): the slides and cohorts that step sees.

    Written as ``nested_lodo.parquet`` in the sweep folder.
    """
    rows = []
    for p in plans:
        cohorts = p.cohorts_seen(clinical)
        for step in ("adapt", "embed", "train", "selection", "robustness", "test"):
            slides = getattr(p, step)
            rows.append({
                "held_out": p.held_out,
                "step": step,
                "fits_or_selects": step in FITTING_STEPS,
                "n_slides": len(slides),
                "cohorts": cohorts[step],
                "slide_ids": list(slides),
            })
    return pd.DataFrame(rows)
