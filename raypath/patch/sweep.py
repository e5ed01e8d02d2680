"""``raypath sweep`` with ``kind: patch``: Ray Tune + Optuna over the patch benchmark's settings.

A sweep file::

    kind: patch
    objectives: [{metric: val_mean}]             # or val_worst (the default is val_mean)
    fixed:
      patch: {annotations: study/annotations.json, model: tiny-vit, seeds: [42], max_epochs: 5}
    space:
      patch.method: {type: categorical, choices: [lora, dora, full]}
      patch.rank: {type: int, low: 4, high: 32, log: true}
      patch.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      patch.fraction: {type: categorical, choices: [0.1, 1.0]}

Each trial is one :func:`raypath.patch.api.run_patch` run (``runs/sweep-<name>-<key>/``) of
one method under the ``lodo`` protocol (``fixed.patch.protocols`` may change it):
``patch.method`` sets ``methods``, ``patch.fraction`` the label fraction of the fits, any
other ``patch.<field>`` the PatchConfig field (``patch.prompt_tokens`` ...).

Selection uses validation data only.  Every fit is also scored on its *validation patients*:
patients of its training domains held out of training (``val`` of the patient split; the
same patients early stopping watches), never its test patients (``validation.csv`` of the
run).  The objectives are

``val_mean``
    the metric on each fit's pooled validation patients, mean over the trial's fits;
``val_worst``
    per training domain the mean validation score over fits, the worst domain's.

Reported next to them, never selected on (a ``kind: patch`` sweep refuses them as
objectives): ``mean_external`` / ``worst_external``, the held-out domain's test score
(domain never trained on), mean / worst over the domains, and ``mean_internal``, the test
patients of the training domains.  They are the unbiased estimate of the selected
settings only because selection never saw them.
Outputs: ``<workdir>/sweeps/<name>/trials.csv``, ``best_config.yaml`` (a ``raypath patch``
config reproducing the best trial) and ``sweep.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math

import pandas as pd
import yaml

from raypath.errors import RaypathError
from raypath.io.jsonio import to_jsonable
from raypath.io.storage import atomic_write_bytes, join

log = logging.getLogger(__name__)


def trial_patch_config(fixed: dict, params: dict, workdir: str, run: str):
    """The PatchConfig of one trial from the sweep's fixed settings and sampled ``patch.*`` params."""
    from raypath.patch.api import PatchConfig

    d = {**fixed, "workdir": workdir, "run": run}
    d.setdefault("protocols", ["lodo"])
    for key, v in params.items():
        field = key.split(".", 1)[1]
        if field == "method":
            d["methods"] = [v]
        elif field == "fraction":
            d["fractions"] = d["domain_fractions"] = [float(v)]
        else:
            d[field] = v
    return PatchConfig(**d)


def trial_metrics(summary: pd.DataFrame, metric: str, validation: pd.DataFrame | None = None) -> dict:
    """A trial's report: the objectives from the validation patients (``validation``: rows of
    ``validation.csv``) and, alongside, the test-set scores from the run's ``summary``."""
    col = f"{metric}_mean"
    ext = summary[(summary["protocol"] != "scaling") & ~summary["in_domain"]]
    internal = summary[summary["in_domain"] & (summary["test_on"] != "all")]
    per = ext.groupby("test_on")[col].mean() if not ext.empty else pd.Series(dtype=float)
    out = {"mean_external": float(per.mean()) if len(per) else math.nan,
           "worst_external": float(per.min()) if len(per) else math.nan,
           "worst_cohort": str(per.idxmin()) if len(per) else "",
           "mean_internal": float(internal[col].mean()) if not internal.empty else math.nan,
           "folds_done": 1, "complete": True}
    out.update({f"external_{k}": float(v) for k, v in per.items()})
    out.update(selection_metrics(validation, metric))
    return out


def selection_metrics(validation: pd.DataFrame | None, metric: str) -> dict:
    """``val_mean`` (pooled validation patients, mean over fits) and ``val_worst`` (worst training
    domain's mean validation score): what a patch sweep selects on; no test patient enters."""
    out = {"val_mean": math.nan, "val_worst": math.nan, "val_worst_domain": ""}
    if validation is None or validation.empty:
        return out
    pooled = validation[validation["val_on"] == "all"][metric]
    per = validation[validation["val_on"] != "all"].groupby("val_on")[metric].mean()
    if pooled.notna().any():
        out["val_mean"] = float(pooled.mean())
    if per.notna().any():
        out["val_worst"], out["val_worst_domain"] = float(per.min()), str(per.idxmin())
    out.update({f"val_{k}": float(v) for k, v in per.items()})
    return out


def trial_objectives(cfg) -> dict:
    """The report of one finished patch run (``cfg.run_dir()``): objectives + test scores."""
    from raypath.patch.outputs import summarize

    summary = summarize(pd.read_csv(join(cfg.run_dir(), "metrics.csv")))
    validation = _read_csv(join(cfg.run_dir(), "validation.csv"))
    return trial_metrics(summary, cfg.metric, validation)


def _read_csv(uri: str) -> pd.DataFrame | None:
    from raypath.io.storage import exists, open_file

    if not exists(uri):
        return None
    with open_file(uri, "rb") as f:
        data = f.read()
    return pd.read_csv(io.BytesIO(data)) if data.strip() else pd.DataFrame()


def patch_trial(config: dict, space, fixed: dict, workdir: str, name: str) -> None:
    """Ray Tune function trainable: one patch run, one report."""
    from ray import tune

    from raypath.patch.api import run_patch
    from raypath.sweep.space import decode_params

    params = decode_params(space, config)
    key = hashlib.sha256(json.dumps(to_jsonable(params), sort_keys=True).encode()).hexdigest()[:10]
    cfg = trial_patch_config(fixed, params, workdir, f"sweep-{name}-{key}")
    doc = run_patch(cfg)
    tune.report({**trial_objectives(cfg), "run": cfg.run, "elapsed_s": doc["elapsed_s"]})


def run_patch_sweep(cfg, space, sweep_dir: str, searcher, tune_name: str = "tune", callbacks: list | None = None):
    """Run a ``kind: patch`` sweep: ``raypath sweep`` calls this with its SweepConfig, the parsed
    space, the sweep folder and the Optuna searcher it built."""
    from ray import tune

    from raypath.io.ray_env import ensure_ray
    from raypath.patch.api import prepare
    from raypath.sweep.outputs import SweepResult

    fixed = dict(space.fixed.get("patch", {}))
    cfg.save(sweep_dir)
    ctx = prepare(trial_patch_config(fixed, {}, cfg.workdir, "sweep-check"))  # bad input fails here; cache once
    if not (ctx["split"] == "val").any():
        raise RaypathError("a patch sweep selects on validation patients, and the split has none: keep "
                           "fixed.patch.val_fraction above 0 (or give `val` rows in the table's split column)")
    ray = ensure_ray()
    cpus = cfg.cpus_per_trial or 1.0
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
    trainable = tune.with_resources(
        tune.with_parameters(patch_trial, space=space, fixed=fixed, workdir=cfg.workdir, name=cfg.name),
        {"cpu": cpus, "gpu": gpus})
    limit = cfg.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=cfg.num_samples, max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=tune_name, storage_path=sweep_dir, callbacks=callbacks or [], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    grid = tuner.fit()
    trials, best = _write(grid, cfg, space, fixed, sweep_dir)
    return SweepResult(sweep_dir=sweep_dir, trials=trials, best=best, n_folds=1)


def _write(grid, cfg, space, fixed: dict, sweep_dir: str) -> tuple[pd.DataFrame, dict | None]:
    from raypath.sweep.space import decode_params

    rows = []
    for r in grid:
        params = decode_params(space, r.config or {})
        rows.append({"trial_id": (r.metrics or {}).get("trial_id"), "error": str(r.error) if r.error else "",
                     **{f"param:{k}": v for k, v in params.items()},
                     **{k: v for k, v in (r.metrics or {}).items() if k in ("mean_external", "worst_external",
                        "worst_cohort", "mean_internal", "run") or k.startswith(("external_", "val_"))}})
    trials = pd.DataFrame(rows)
    atomic_write_bytes(join(sweep_dir, "trials.csv"), trials.to_csv(index=False).encode())
    best = None
    obj = space.objectives[0]
    ok = trials[trials["error"] == ""] if "error" in trials else trials
    if obj.metric in ok and ok[obj.metric].notna().any():
        i = ok[obj.metric].idxmax() if obj.mode == "max" else ok[obj.metric].idxmin()
        best = to_jsonable(ok.loc[i].to_dict())
        params = {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:")}
        best_cfg = trial_patch_config(fixed, params, cfg.workdir, f"best-{cfg.name}")
        atomic_write_bytes(join(sweep_dir, "best_config.yaml"),
                           yaml.safe_dump({"stage": "PatchConfig", "config": best_cfg.to_dict()}, sort_keys=False).encode())
    doc = {"sweep": cfg.name, "kind": "patch", "objectives": [o.model_dump() for o in space.objectives],
           "selected_on": "validation patients of each fit's training domains (never a test patient); "
                          "mean_external / worst_external / mean_internal are test scores, reported only",
           "best": best, "n_trials": len(trials),
           "command": f"raypath patch --config {join(sweep_dir, 'best_config.yaml')}" if best else None}
    atomic_write_bytes(join(sweep_dir, "sweep.json"), json.dumps(to_jsonable(doc), indent=1).encode())
    return trials, best


__all__ = ["patch_trial", "run_patch_sweep", "selection_metrics", "trial_metrics", "trial_objectives",
           "trial_patch_config"]
