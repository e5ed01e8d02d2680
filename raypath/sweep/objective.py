"""One sweep trial: for each LODO fold, adapt -> embed -> MIL -> score.

:func:`run_fold` is plain Python (tests call it without Ray, with stub
stages); :func:`trial_function` is the Ray Tune function trainable that
loops over the folds and calls ``ray.tune.report`` after each one, with
``folds_done`` as ASHA's time axis.  Stages that use Ray themselves (the
adapter with ``num_workers >= 1`` runs a ``TorchTrainer``; embedding runs a
Ray Data actor pool) are started from inside the trial: the Train V2 pattern
of a Tune function that builds and fits trainers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.jsonio import to_jsonable
from raypath.io.storage import atomic_write_bytes, exists, join
from raypath.sweep.nested import FoldPlan, audit_plan, check_step
from raypath.sweep.space import SweepSpace, stage_settings

log = logging.getLogger(__name__)



@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled config (sent once via
    ``tune.with_parameters``)."""

    space: SweepSpace
    workdir: str
    sweep_dir: str
    name: str
    plans: list[FoldPlan]
    clinical: pd.DataFrame  # the rows MIL trains/tests on (status ok, with features)
    feature_dir: str | None = None  # kind mil: the fixed features
    torch_threads: int = 1


# --------------------------------------------------------------------------- stages


def adapt_config_for_fold(settings: dict, plan: FoldPlan, run: str):
    """The ``AdaptConfig`` of one fold: tuned on exactly the plan's ``adapt``
    slides (never chosen by cohort name: a technical twin of a held-out
    tissue sits in a training cohort but is not in the plan)."""
    from raypath.adapt.api import AdaptConfig

    d = {k: v for k, v in settings.items() if k not in ("cohorts", "tune_cohorts", "tune_slides")}
    if not plan.adapt:
        raise RaypathError(f"fold holding out {plan.held_out!r} plans no slide for adaptation")
    return AdaptConfig(**{**d, "tune_slides": list(plan.adapt), "run": run})


def _adapt_stage(settings: dict, plan: FoldPlan, run: str) -> str:
    from raypath.adapt.api import adapt

    return adapt(adapt_config_for_fold(settings, plan, run)).adapter_dir


def _adapt_used_slides(adapter_dir: str) -> list[str]:
    """Slides the adapter was trained on, as the adapt stage recorded them (tuned_on.json)."""
    from raypath.adapt.tuning import TUNED_ON_FILE, read_tuned_on

    record = read_tuned_on(adapter_dir)
    if record is None:
        raise RaypathError(f"{join(adapter_dir, TUNED_ON_FILE)} missing: cannot verify which slides the adapter saw")
    return sorted(map(str, record["slide_ids"]))


def _embed_stage(settings: dict, plan: FoldPlan, adapter_dir: str, feature_dir: str) -> str:
    from raypath.embed.api import EmbedConfig, embed

    cfg = EmbedConfig(**{**settings, "adapter": adapter_dir, "slide_ids": plan.embed, "feature_dir": feature_dir})
    res = embed(cfg)
    failed = res.slides[res.slides["status"] == "failed"] if len(res.slides) else res.slides
    if len(failed):
        raise RaypathError(f"embedding failed for slides {failed['slide_id'].tolist()[:5]}")
    from raypath.embed.identity import check_store, derive_identity

    # the fold's features must be this fold's adapter's (the one feature identity)
    want = derive_identity(cfg.model, cfg.weights, adapter_dir)
    check_store(res.feature_dir, {k: getattr(want, k) for k in ("model", "weights_sha256", "adapter_sha256")})
    return res.feature_dir


def _mil_stage(mil_settings: dict, feature_dir: str, clinical: pd.DataFrame, plan: FoldPlan, ray_dir: str):
    from raypath.embed.store import FeatureStore
    from raypath.mil.protocols import params_from_config, protocol_kwargs
    from raypath.mil.protocols import run_protocol

    cfg = mil_config(mil_settings, feature_dir, plan.held_out)
    store = FeatureStore(feature_dir)
    have = set(store.slide_ids())
    rows = clinical[clinical["slide_id"].astype(str).isin(have)].reset_index(drop=True)
    out = run_protocol(
        store, rows, params_from_config(cfg), "lodo",
        **protocol_kwargs(cfg, cohorts=[plan.held_out], ray_storage_path=ray_dir, use_gpu=cfg.use_gpu),
    )
    ids = rows["slide_id"].astype(str).to_numpy()
    for sp in out.splits:
        check_step(plan, "train", ids[sp.train])
        check_step(plan, "selection", ids[sp.internal])
        check_step(plan, "test", ids[sp.external])
    return out


def mil_config(mil_settings: dict, feature_dir: str, held_out: str | None):
    """The ``MilConfig`` of one fold (protocol lodo, in-process by default)."""
    from raypath.mil.api import MilConfig

    d = dict(mil_settings)
    d.update(features=feature_dir, protocol="lodo")
    if held_out is not None:
        d["cohorts"] = [held_out]
    d.setdefault("num_workers", 0)
    return MilConfig(**d)


def _robustness_stage(feature_dir: str, clinical: pd.DataFrame, plan: FoldPlan, space: SweepSpace) -> dict:
    from raypath.embed.store import FeatureStore
    from raypath.robustness import metrics as M

    rs = space.robustness
    ids = [s for s in plan.robustness if s in set(FeatureStore(feature_dir).slide_ids())]
    if len(plan.train_cohorts) < 2 or not ids:
        return {"site_probe_bacc": math.nan, "kmeans_purity": math.nan}
    X, meta = FeatureStore(feature_dir).sample_tiles(rs.tiles_per_slide, ids, seed=0)
    info = clinical.set_index(clinical["slide_id"].astype(str))
    centre = info.loc[meta["slide_id"], "cohort"].astype(str).to_numpy()
    patients = info.loc[meta["slide_id"], "patient_id"].astype(str).to_numpy()
    probe = M.site_probe(X, centre, patients, n_splits=rs.probe_folds, seed=0)
    purity = M.kmeans_purity(X, centre, k=rs.kmeans_k, repeats=rs.kmeans_repeats, seed=0, min_cluster_size=5)
    return {
        "site_probe_bacc": float(probe.get("balanced_accuracy", math.nan)),
        "kmeans_purity": float(purity.get("purity", math.nan)),
    }


@dataclass
class Stages:
    """The stage functions a fold calls (tests swap in stubs)."""

    adapt: Callable[[dict, FoldPlan, str], str] = _adapt_stage
    adapt_used_slides: Callable[[str], list[str]] = _adapt_used_slides
    embed: Callable[[dict, FoldPlan, str, str], str] = _embed_stage
    mil: Callable[..., Any] = _mil_stage
    robustness: Callable[..., dict] = _robustness_stage


# --------------------------------------------------------------------------- one fold


def select_fold_score(out, held_out: str, inner_selection: str) -> dict:
    """External and internal score of one fold after inner model selection.

    ``last_epoch``: the model after the last epoch (what ``raypath mil``
    reports).  ``best_internal_epoch``: per repeat, the epoch with the best
    score on the selection set (training cohorts only); the held-out score
    is read at that epoch.  Either way C's score never drives a choice.
    """
    s = out.summary
    if inner_selection == "last_epoch":
        internal = s.get("internal", {}).get(held_out, {})
        return {
            "external": _f(s["per_cohort"].get(held_out)),
            "internal": _f(internal.get("mean") if isinstance(internal, dict) else None),
            "epoch": None,
        }
    c = out.curves
    metric = s["metric"]
    c = c[(c["metric"] == metric) & (c["name"] == held_out)]
    ext, intl, epochs = [], [], []
    for _, g in c.groupby("repeat"):
        inner = g[(g["set"] == "internal") & (g["cohort"] == "all")].dropna(subset=["value"])
        if inner.empty:
            raise RaypathError(
                "inner_selection best_internal_epoch needs a selection set: set mil.internal_fraction > 0"
            )
        best = inner.loc[inner["value"].idxmax()]
        e = int(best["epoch"])
        outer = g[(g["set"] == "external") & (g["cohort"] == held_out) & (g["epoch"] == e)]
        ext.append(float(outer["value"].iloc[0]) if len(outer) else math.nan)
        intl.append(float(best["value"]))
        epochs.append(e)
    return {"external": float(np.mean(ext)), "internal": float(np.mean(intl)), "epoch": epochs}


def fold_consistency_score(out, held_out: str) -> dict:
    """The held-out tissues' prediction inconsistency between technical variants
    (last epoch; empty when the cohort has no variants): ``quantile_diff`` /
    ``flip_rate`` for survival, ``prob_diff`` / ``disagreement`` for classification."""
    per = (out.summary.get("consistency") or {}).get("per_cohort", {}).get(held_out)
    if not per:
        return {}
    survival = "quantile_diff" in per
    return {
        "mean_inconsistency": _f(per.get("quantile_diff" if survival else "prob_diff")),
        "mean_flip_rate": _f(per.get("flip_rate" if survival else "disagreement")),
        "n_pairs": _f(per.get("n_pairs")),
    }


def _f(v) -> float:
    return math.nan if v is None else float(v)


def run_fold(
    plan: FoldPlan,
    settings: dict[str, dict],
    ctx: TrialContext,
    tag: str,
    stages: Stages | None = None,
) -> dict:
    """Run one nested-LODO fold and return its scores.

    Parameters
    ----------
    plan
        What each step may see (from :func:`~raypath.sweep.nested.nested_lodo_plan`).
    settings
        Per-stage settings of the trial (:func:`~raypath.sweep.space.stage_settings`).
    tag
        Unique name of the trial, used in run names and folders.
    """
    stages = stages or Stages()
    t0 = time.perf_counter()
    c = plan.held_out
    res: dict[str, Any] = {"held_out": c, "adapter_dir": None}
    if ctx.space.kind == "adapter":
        run = f"sweep-{ctx.name}-{tag}-{c}"
        adapter_dir = stages.adapt(settings["adapt"], plan, run)
        used = stages.adapt_used_slides(adapter_dir)
        check_step(plan, "adapt", used)
        cohort_of = dict(zip(ctx.clinical["slide_id"].astype(str), ctx.clinical["cohort"].astype(str)))
        res["adapter_slides"] = sorted(map(str, used))  # the trial's record names what its adapter saw
        res["adapter_cohorts"] = sorted({cohort_of.get(str(u), "?") for u in used})
        embed_settings = {
            **settings["embed"],
            "model": settings["adapt"].get("model", settings["embed"].get("model")),
            "weights": settings["adapt"].get("weights", settings["embed"].get("weights")),
        }
        feature_dir = stages.embed(embed_settings, plan, adapter_dir, join(ctx.sweep_dir, "features", f"{tag}-{c}"))
        res["adapter_dir"] = adapter_dir
    else:
        feature_dir = ctx.feature_dir
    res["feature_dir"] = feature_dir
    ray_dir = join(ctx.sweep_dir, "trials", tag, f"mil-{c}")
    out = stages.mil(settings["mil"], feature_dir, ctx.clinical, plan, ray_dir)
    res.update(select_fold_score(out, c, ctx.space.inner_selection))
    res.update(fold_consistency_score(out, c))
    if ctx.space.robustness_enabled:
        res.update(stages.robustness(feature_dir, ctx.clinical, plan, ctx.space))
    res["time_s"] = time.perf_counter() - t0
    return res


def aggregate(folds: list[dict], n_folds: int) -> dict:
    """Metrics reported after each fold (running over the folds done)."""
    # fold records read back from folds.json hold null where a score was NaN (too few comparable pairs)
    ext = np.array([_f(f["external"]) for f in folds], dtype=float)
    intl = np.array([_f(f["internal"]) for f in folds], dtype=float)
    worst_i = int(np.nanargmin(ext)) if np.isfinite(ext).any() else 0
    out: dict[str, Any] = {
        "folds_done": len(folds),
        "complete": len(folds) == n_folds,
        "mean_external": float(np.nanmean(ext)) if np.isfinite(ext).any() else math.nan,
        "worst_external": float(np.nanmin(ext)) if np.isfinite(ext).any() else math.nan,
        "worst_cohort": folds[worst_i]["held_out"],
        "mean_internal": float(np.nanmean(intl)) if np.isfinite(intl).any() else math.nan,
        "time_s": float(sum(f["time_s"] for f in folds)),
    }
    for key in ("site_probe_bacc", "kmeans_purity", "mean_inconsistency", "mean_flip_rate"):
        vals = np.array([_f(f[key]) for f in folds if key in f], dtype=float)
        if len(vals):
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
    for f in folds:
        out[f"external_{f['held_out']}"] = f["external"]
        out[f"internal_{f['held_out']}"] = f["internal"]
        if f.get("adapter_slides") is not None:
            out[f"adapted_on_{f['held_out']}"] = (
                f"{'+'.join(f.get('adapter_cohorts', []))} ({len(f['adapter_slides'])} slides)")
    return out


# --------------------------------------------------------------------------- the Tune trainable


def trial_function(config: dict, ctx: TrialContext) -> None:
    """Ray Tune function trainable: one trial over every fold of the plan.

    Folds already recorded for this trial id and config (a trial restarted
    after the driver was killed) are reported again, not recomputed.
    """
    import torch
    from ray import tune

    torch.set_num_threads(max(1, ctx.torch_threads))
    tag = tune.get_context().get_trial_id()
    audit_plan(ctx.plans, ctx.clinical)
    settings = stage_settings(ctx.space, config, ctx.workdir)
    done = {f["held_out"]: f for f in read_trial_record(ctx.sweep_dir, config)}
    if done:
        log.info("trial %s: reusing %d finished fold(s) %s", tag, len(done), sorted(done))
    folds: list[dict] = []
    n = len(ctx.plans)
    for plan in ctx.plans:
        fold = done.get(plan.held_out)
        if fold is None:
            fold = run_fold(plan, settings, ctx, tag)
            fold["computed_at"] = time.time()
            fold["trial_id"] = tag
            folds.append(fold)
            _write_trial_record(ctx, tag, config, folds)
        else:
            folds.append(fold)
        tune.report(aggregate(folds, n))


def config_key(config: dict) -> str:
    """Stable id of a trial's sampled config (fold records are stored under it)."""
    import hashlib

    text = json.dumps(to_jsonable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_uri(sweep_dir: str, config: dict) -> str:
    return join(sweep_dir, "trials", config_key(config), "folds.json")


def _write_trial_record(ctx: TrialContext, tag: str, config: dict, folds: list[dict]) -> None:
    doc = {"trial_id": tag, "config_key": config_key(config), "config": config, "folds": folds}
    atomic_write_bytes(record_uri(ctx.sweep_dir, config), json.dumps(to_jsonable(doc), indent=2).encode())


def read_trial_record(sweep_dir: str, config: dict) -> list[dict]:
    """Folds already computed for this exact config in this sweep (empty if none).

    Records are keyed by the config, not the trial id: a trial whose result
    the driver never registered (driver killed right after the trial finished)
    is suggested again by the restored searcher with the same config, and its
    folds are reused instead of recomputed.
    """
    from raypath.io.storage import open_file

    uri = record_uri(sweep_dir, config)
    if not exists(uri):
        return []
    with open_file(uri, "rb") as f:
        doc = json.load(f)
    return list(doc.get("folds", []))
