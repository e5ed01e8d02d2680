"""The page of a sweep (``sweeps/<name>/`` written by ``raypath sweep``).

It opens with the best trial, its objectives and the command that
reproduces it; then every trial (numbered as in ``trials.csv``: params,
objectives, status, failure reason), the Pareto front, and parameter
importances only when enough trials completed.  Ray Tune's own state
(``tune/``, pickles under ``.json`` names) is never shown.
"""

from __future__ import annotations

import math
from typing import Any

from raypath.evaluation.meanings import METRICS
from raypath.report.folder import Folder
from raypath.report.html import is_number, num

#: fANOVA / PED-ANOVA importances from fewer complete trials rank noise
MIN_TRIALS_FOR_IMPORTANCE = 10


def is_sweep(folder_files: set[str], doc: Any) -> bool:
    return "trials.csv" in folder_files or (isinstance(doc, dict) and isinstance(doc.get("best"), (dict, type(None)))
                                             and "objectives" in doc)


def objective_label(metric: str) -> str:
    m = METRICS.get(metric)
    return m.label if m else metric


def _trial_no(v: Any) -> str:
    return str(int(v)) if is_number(v) and not math.isnan(float(v)) else "?"


def trial_rows(trials, objectives: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(param columns, one row per trial in trials.csv order of ``trial_index``)."""
    params = [c for c in trials.columns if c.startswith("param:")]
    # kind adapter: what each fold's adapter was tuned on (cohorts, number of slides)
    params += [c for c in trials.columns if c.startswith("adapted_on_")]
    t = trials.sort_values("trial_index") if "trial_index" in trials.columns else trials
    rows = []
    for r in t.to_dict("records"):
        err = r.get("error")
        rows.append({
            "no": _trial_no(r.get("trial_index")),
            "trial_id": r.get("trial_id"),
            "status": r.get("status"),
            "folds_done": r.get("folds_done"),
            "objectives": [r.get(o) for o in objectives],
            "params": [r.get(p) for p in params],
            "pareto": bool(r.get("pareto")) if r.get("pareto") == r.get("pareto") else False,
            "error": err if isinstance(err, str) and err else "",
        })
    return [p.removeprefix("param:").replace("adapted_on_", "adapter of fold ") for p in params], rows


def best_trial_no(trials, trial_id: str | None) -> str:
    if trials is None or trial_id is None or "trial_index" not in trials.columns:
        return "?"
    hit = trials[trials["trial_id"].astype(str) == str(trial_id)]
    return _trial_no(hit["trial_index"].iloc[0]) if len(hit) else "?"


def verdict(doc: dict, best_no: str) -> str:
    n = doc.get("n_trials", 0)
    counts = (f"{n} trial{'s' if n != 1 else ''}: {doc.get('n_complete', 0)} complete, "
              f"{doc.get('n_stopped', 0)} stopped early, {doc.get('n_failed', 0)} failed")
    best = doc.get("best")
    if not best and doc.get("n_complete"):
        return (f"No trial has a finite objective, so there is no best configuration ({counts}): every fold's "
                "score was undefined (for example too few comparable pairs for a C-index on a small study).")
    if not best:
        return f"No trial finished every fold, so there is no best configuration yet ({counts})."
    objs = ", ".join(f"{objective_label(k)} {num(v)}" for k, v in (best.get("objectives") or {}).items())
    worst = (best.get("metrics") or {}).get("worst_cohort")
    return (f"Best trial #{best_no} ({best.get('trial_id')}): {objs}"
            f"{f' (worst held-out cohort {worst})' if worst else ''}.  {counts}.")


def importances(folder: Folder, n_complete: int) -> dict[str, Any]:
    imp = folder.json_or_none("param_importances.json") or {}
    enough = n_complete >= MIN_TRIALS_FOR_IMPORTANCE and bool(imp)
    return {"show": enough, "values": sorted(imp.items(), key=lambda kv: -kv[1]) if enough else [],
            "caveat": (f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials; this "
                       f"sweep has {n_complete}, so they are not shown (with few trials they rank noise)."
                       if not enough else
                       f"From {n_complete} complete trials: indicative only, a ranking of how much each "
                       "parameter moved the first objective in this search, not a causal effect.")}


def context(folder: Folder, doc: dict) -> dict[str, Any]:
    files = set(folder.files(max_depth=1))
    trials = folder.csv("trials.csv") if "trials.csv" in files else None
    objectives = [o["metric"] for o in doc.get("objectives", [])]
    modes = {o["metric"]: o.get("mode", "max") for o in doc.get("objectives", [])}
    param_cols, rows = trial_rows(trials, objectives) if trials is not None else ([], [])
    best = doc.get("best") or {}
    best_no = best_trial_no(trials, best.get("trial_id"))
    db = folder.uri + "/optuna.db" if "optuna.db" in files else None
    held = doc.get("held_out_cohorts") or []
    return {
        "title": f"Sweep {doc.get('name', folder.name)}",
        "subtitle": (f"{doc.get('kind', '')} sweep under nested leave-one-dataset-out (held-out cohorts "
                     f"{', '.join(held) or '?'}); objectives: "
                     + ", ".join(f"{objective_label(o)} ({'higher' if modes[o] == 'max' else 'lower'} is better)"
                                 for o in objectives)),
        "verdict": verdict(doc, best_no),
        "best": best, "best_no": best_no,
        "commands": best.get("commands") or [],
        "objectives": objectives, "objective_labels": [objective_label(o) for o in objectives],
        "param_cols": param_cols, "trials": rows,
        "any_score": any(is_number(v) for r in rows for v in r["objectives"]),
        "importance": importances(folder, int(doc.get("n_complete") or 0)),
        "optuna_db": db,
        "study_name": doc.get("name", folder.name),
        "nested": doc.get("nested_lodo") or {},
    }
