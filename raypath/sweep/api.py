"""``run_sweep``: a Ray Tune + Optuna search with a nested-LODO objective.

The driver (this module) reads the sweep file, computes the nested-LODO plan
once, derives per-trial resources from ``ray.cluster_resources()``, and runs
a ``Tuner`` whose trials are :func:`raypath.sweep.objective.trial_function`.
Search: ``OptunaSearch`` (TPE; several objectives = multi-objective TPE) with
its study in an Optuna storage (SQLite in the sweep folder by default, or an
RDB URL); ASHA stops weak trials between folds (``time_attr="folds_done"``).
Everything lands in ``<workdir>/sweeps/<name>/``; ``resume=True`` continues
an interrupted sweep with ``Tuner.restore`` (finished trials are kept, errored
ones are retried, the rest run).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pandas as pd
from pydantic import Field, field_validator

from raypath.config import StageConfig
from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, exists, is_remote, join, strip_protocol
from raypath.sweep.nested import FoldPlan, nested_lodo_plan, steps_seen
from raypath.sweep.objective import TrialContext, trial_function
from raypath.sweep.space import SweepSpace, load_space, optuna_space
from raypath.sweep.outputs import SweepResult, write_outputs

log = logging.getLogger(__name__)

TUNE_NAME = "tune"


class SweepConfig(StageConfig):
    """Configuration of ``raypath sweep``."""

    workdir: str = Field(..., description="project folder (local path or s3:// URI)")
    space: str = Field(..., description="sweep YAML file (search space, objectives; see sweeps/examples/)")
    name: str = Field("sweep", description="sweep name: outputs in <workdir>/sweeps/<name>/")
    num_samples: int = Field(8, ge=1, description="trials in total (--resume keeps the number the sweep started with)")
    resume: bool = Field(False, description="continue an interrupted sweep of the same name (Tuner.restore)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: derived from the cluster's CPUs/GPUs")
    cpus_per_trial: float | None = Field(None, gt=0, description="default: derived from the sweep kind and the cluster")
    gpus_per_trial: float | None = Field(None, ge=0, description="default: 1 per trial (MIL: a share) when the cluster has GPUs")
    optuna_storage: str | None = Field(
        None,
        description="Optuna storage URL (e.g. postgresql://user@host/db on clusters); default: "
        "sqlite in the sweep folder (local workdir) or in memory (s3 workdir); 'memory' = in memory",
    )
    seed: int = Field(0, description="seed of the TPE sampler")
    features: str | None = Field(
        None,
        description="kind mil: feature folder or model key under <workdir>/features (overrides the sweep "
        "file's `features`; default: the only store there)",
    )

    @field_validator("workdir", "space")
    @classmethod
    def _absolute(cls, v):
        """Trials run in another directory: a relative local path is resolved here, once."""
        import os

        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
            return os.path.abspath(v)
        return v


# --------------------------------------------------------------------------- inputs


def sweep_dir_of(cfg: SweepConfig) -> str:
    d = join(cfg.workdir, "sweeps", cfg.name)
    return d if is_remote(d) else os.path.abspath(strip_protocol(d))


def load_inputs(space: SweepSpace, workdir: str) -> tuple[pd.DataFrame, str | None]:
    """(clinical rows the MIL stage will use, fixed feature folder or None)."""
    from raypath.mil.api import MilConfig, load_clinical, resolve_feature_dir

    mil_fixed = dict(space.fixed.get("mil", {}))
    if space.kind == "mil":
        from raypath.embed.store import FeatureStore
        from raypath.robustness.api import resolve_feature_dir as only_store

        if not space.features:
            space.features = only_store(workdir, None)
        cfg = MilConfig(**{**mil_fixed, "workdir": workdir, "features": space.features})
        feature_dir = resolve_feature_dir(cfg)
        clinical = load_clinical(cfg, FeatureStore(feature_dir).slide_ids())
        return clinical, feature_dir
    from raypath.robustness.api import load_slides

    slides = load_slides(workdir)
    if mil_fixed.get("clinical"):
        cfg = MilConfig(**{**mil_fixed, "workdir": workdir, "features": "unused"})
        slides = load_clinical(cfg, slides["slide_id"].astype(str).tolist())
    return slides.reset_index(drop=True), None


def make_plan(space: SweepSpace, clinical: pd.DataFrame) -> list[FoldPlan]:
    mil = space.fixed.get("mil", {})
    return nested_lodo_plan(
        clinical,
        task=mil.get("task", "survival"),
        internal_fraction=mil.get("internal_fraction", 0.2),
        seed=mil.get("seed", 0),
        repeats=mil.get("repeats", 1),
        cohorts=space.cohorts,
        adapt=space.kind == "adapter",
    )


# --------------------------------------------------------------------------- resources


def trial_resources(
    space: SweepSpace,
    cluster: dict[str, float],
    num_samples: int,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
) -> tuple[dict[str, float], int, int]:
    """(per-trial resource request, max concurrent trials, torch threads per trial).

    MIL-only trials train in the trial process: 1 CPU each (or what is
    given) and, on GPU clusters, a share of a GPU so that several small MIL
    models share a device.  Adapter trials mostly drive other Ray work (the
    adapter's ``TorchTrainer`` workers, the embedding actor pool): the trial
    itself holds little, and the number of concurrent trials is bounded by
    what those stages will ask for, so they never wait on each other.
    """
    cpus = float(cluster.get("CPU", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    if space.kind == "mil":
        cpu = cpus_per_trial or 1.0
        gpu = gpus_per_trial if gpus_per_trial is not None else (0.25 if gpus >= 1 else 0.0)
        limit = int(cpus // cpu)
        if gpu > 0:
            limit = min(limit, int(gpus // gpu))
        threads = max(1, int(cpu))
    else:
        adapt = space.fixed.get("adapt", {})
        embed = space.fixed.get("embed", {})
        workers = int(adapt.get("num_workers", 0))
        in_process = workers == 0
        # in-process adaptation trains in the trial; otherwise the trial only drives a TorchTrainer
        cpu = cpus_per_trial or (0.5 if in_process else 0.25)
        gpu = gpus_per_trial if gpus_per_trial is not None else (1.0 if (gpus >= 1 and in_process) else 0.0)
        actors = int(embed.get("num_actors") or 1)
        per_actor = float(embed.get("num_cpus_per_actor", 1.0))
        # + 1 CPU for the embedding's slide-reading tasks, which must fit next to the actors
        need_cpu = cpu + workers * 1.0 + actors * per_actor + 1.0
        if need_cpu > cpus:
            raise RaypathError(
                f"one adapter trial needs {need_cpu:g} CPUs (trial {cpu:g} + adapter workers {workers} + "
                f"embed actors {actors}x{per_actor:g} + 1 for slide reading) but the cluster has {cpus:g}: "
                "lower fixed.embed.num_actors / num_cpus_per_actor or fixed.adapt.num_workers"
            )
        limit = int(cpus // need_cpu)
        if gpus >= 1:
            embed_gpu = actors * float(embed.get("num_gpus_per_actor", 1.0))
            need_gpu = gpu + (workers if not in_process else 0) + embed_gpu
            if need_gpu > gpus:
                raise RaypathError(
                    f"one adapter trial needs {need_gpu:g} GPUs (trial {gpu:g} + adapter workers + embed actors "
                    f"{embed_gpu:g}) but the cluster has {gpus:g}: e.g. --gpus-per-trial 0.5 and "
                    "fixed.embed.num_gpus_per_actor: 0.5"
                )
            if need_gpu > 0:
                limit = min(limit, int(gpus // need_gpu))
        threads = max(1, int(cpu))
    limit = max(1, min(limit, num_samples))
    if max_concurrent is not None:
        limit = max_concurrent
    req = {"cpu": cpu}
    if gpu > 0:
        if gpus <= 0:
            raise RaypathError(
                f"--gpus-per-trial {gpu} but the Ray cluster has no GPUs: drop the flag or connect to a GPU cluster"
            )
        req["gpu"] = gpu
    return req, limit, threads


# --------------------------------------------------------------------------- search


def optuna_storage(cfg: SweepConfig, sweep_dir: str):
    """An Optuna ``BaseStorage`` (``OptunaSearch`` takes an instance, not a URL)."""
    import optuna

    url = cfg.optuna_storage
    if url == "memory":
        return None
    if url is None:
        if is_remote(sweep_dir):
            log.info("sweep folder is remote: Optuna study kept in memory (pass --optuna-storage URL to persist it)")
            return None
        os.makedirs(sweep_dir, exist_ok=True)
        url = f"sqlite:///{os.path.join(sweep_dir, 'optuna.db')}"
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # bad URL, driver missing, server unreachable
        from raypath.io.storage import redact

        raise RaypathError(
            f"cannot open Optuna storage {redact(url)!r}: {type(e).__name__}: {e}. Pass an SQLAlchemy URL "
            "(sqlite:///path.db, postgresql://user:pass@host/db) with its driver installed, or 'memory'"
        ) from e


def build_searcher(space: SweepSpace, cfg: SweepConfig, sweep_dir: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = space.metric_names, space.modes
    single = len(metrics) == 1
    points = [{k: _encode_point(space, k, v) for k, v in p.items()} for p in space.points_to_evaluate]
    return OptunaSearch(
        space=optuna_space(space),
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        points_to_evaluate=points or None,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        study_name=cfg.name,
        storage=optuna_storage(cfg, sweep_dir),
    )


def _encode_point(space: SweepSpace, key: str, value: Any) -> Any:
    from raypath.sweep.space import encode_choice

    return encode_choice(value) if space.space[key].type == "categorical" else value


def build_scheduler(space: SweepSpace, n_folds: int):
    from ray.tune.schedulers import ASHAScheduler

    if space.scheduler.type == "none" or n_folds < 2:
        return None
    return ASHAScheduler(
        time_attr="folds_done",
        metric=space.objectives[0].metric,
        mode=space.objectives[0].mode,
        max_t=n_folds,
        grace_period=min(space.scheduler.grace_period, n_folds),
        reduction_factor=space.scheduler.reduction_factor,
    )


# --------------------------------------------------------------------------- run


def _driver_callbacks(cfg: SweepConfig, sweep_dir: str) -> list:
    """Tune callbacks that run in the driver: the progress line (and experiment tracking)."""
    from raypath.io.progress import tune_progress
    from raypath.report.tracking import tune_callbacks

    return [tune_progress(f"sweep {cfg.name}", cfg.num_samples), *tune_callbacks(cfg.workdir, cfg.name)]


def run_sweep(cfg: SweepConfig, callbacks: list | None = None) -> SweepResult:
    """Run (or resume) a sweep and write its outputs.

    Parameters
    ----------
    cfg
        The sweep's settings; ``cfg.space`` names the YAML file.
    callbacks
        Extra ``ray.tune.Callback`` objects (tests use one to interrupt).

    Returns
    -------
    SweepResult with the trials table and the best trial (None if no trial
    finished every fold).
    """
    from ray import tune

    from raypath.io.ray_env import ensure_ray

    space = load_space(cfg.space)
    if space.kind == "patch":  # the patch benchmark's own trial (raypath.patch.sweep)
        from raypath.patch.sweep import run_patch_sweep

        sweep_dir = sweep_dir_of(cfg)
        return run_patch_sweep(cfg, space, sweep_dir, build_searcher(space, cfg, sweep_dir), TUNE_NAME, callbacks)
    if cfg.features:
        space.features = cfg.features
    sweep_dir = sweep_dir_of(cfg)
    tune_path = join(sweep_dir, TUNE_NAME)
    cfg, already = _check_resume(cfg, sweep_dir, tune_path)
    ray = ensure_ray()
    clinical, feature_dir = load_inputs(space, cfg.workdir)
    if feature_dir is not None:
        space.features = feature_dir  # resolved once: trials and best_config use the folder
    plans = make_plan(space, clinical)
    n_folds = len(plans)
    cfg.save(sweep_dir)
    import yaml

    atomic_write_bytes(join(sweep_dir, "space.yaml"),
                       yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False).encode())
    _write_plan(cfg, sweep_dir, plans, clinical, already)
    resources, max_conc, threads = trial_resources(
        space, ray.cluster_resources(), cfg.num_samples, cfg.cpus_per_trial, cfg.gpus_per_trial,
        cfg.max_concurrent_trials,
    )
    log.info("sweep %s: %d folds (held out: %s), trials request %s, up to %d at once",
             cfg.name, n_folds, [p.held_out for p in plans], resources, max_conc)
    ctx = TrialContext(space=space, workdir=cfg.workdir, sweep_dir=sweep_dir, name=cfg.name, plans=plans,
                       clinical=clinical, feature_dir=feature_dir, torch_threads=threads)
    trainable = tune.with_resources(tune.with_parameters(trial_function, ctx=ctx), resources)
    tuner = _tuner(cfg, trainable, space, sweep_dir, tune_path, n_folds, max_conc, already, callbacks)
    grid = tuner.fit()
    result = write_outputs(grid, cfg, space, plans, sweep_dir, clinical)
    from raypath.report.tracking import track_sweep

    track_sweep(cfg, sweep_dir, result)  # the summary run; each trial was logged by tune_callbacks
    return result


def _check_resume(cfg: SweepConfig, sweep_dir: str, tune_path: str) -> tuple[SweepConfig, bool]:
    """Whether a sweep of this name exists (refused without --resume); on
    --resume, the trial count the sweep was started with."""
    already = exists(join(tune_path, "tuner.pkl"))
    if already and not cfg.resume:
        raise RaypathError(
            f"sweep {cfg.name!r} already exists in {sweep_dir}: pass --resume to continue it, "
            "or choose another --name"
        )
    if cfg.resume and not already:
        log.info("nothing to resume in %s: starting a new sweep", sweep_dir)

    if already and cfg.resume and exists(join(sweep_dir, "config.yaml")):
        from raypath.io.storage import open_file
        import yaml as _yaml

        with open_file(join(sweep_dir, "config.yaml"), "rb") as f:
            before = (_yaml.safe_load(f) or {}).get("config", {})
        n0 = before.get("num_samples")
        if n0 is not None and n0 != cfg.num_samples:
            log.warning("sweep %s was started with --num-samples %s; Tune keeps that number on --resume "
                        "(start a new --name to run more trials)", cfg.name, n0)
            cfg = cfg.model_copy(update={"num_samples": n0})
    return cfg, already


def _write_plan(cfg: SweepConfig, sweep_dir: str, plans, clinical: pd.DataFrame, already: bool) -> None:
    """Record which slides each fold's steps see; a resumed sweep whose slides
    changed is refused (its finished trials were scored on other folds)."""
    seen = steps_seen(plans, clinical)
    from raypath.io.storage import write_parquet_atomic
    import pyarrow as pa

    plan_uri = join(sweep_dir, "nested_lodo.parquet")
    if already and exists(plan_uri):
        from raypath.io.storage import read_parquet

        before = read_parquet(plan_uri).to_pandas()
        if _plan_key(before) != _plan_key(seen):
            raise RaypathError(
                f"the slides of {cfg.workdir!r} changed since sweep {cfg.name!r} started, so its finished "
                "trials were scored on other folds: start a new sweep (--name) instead of --resume"
            )
    write_parquet_atomic(pa.Table.from_pandas(seen, preserve_index=False), plan_uri)


def _tuner(cfg: SweepConfig, trainable, space, sweep_dir: str, tune_path: str, n_folds: int, max_conc: int,
           already: bool, callbacks: list | None):
    """A new Tuner, or the restored one on --resume."""
    from ray import tune

    if already and cfg.resume:
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(space, cfg, sweep_dir),
            scheduler=build_scheduler(space, n_folds),
            num_samples=cfg.num_samples,
            max_concurrent_trials=max_conc,
            # one worker process per concurrent trial: torch is imported once
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=sweep_dir,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[*(callbacks or []), *_driver_callbacks(cfg, sweep_dir)],
            verbose=0,  # one progress line per finished trial instead of Tune's status tables
        ),
    )


def _plan_key(seen: pd.DataFrame) -> list:
    return sorted((str(r.held_out), str(r.step), tuple(sorted(map(str, r.slide_ids)))) for r in seen.itertuples())
