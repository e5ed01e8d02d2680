"""``raypath adapt-experiment``: the paper's before/after experiment in one command.

On a workdir that has been ingested and tiled::

    embed (FM)                     -> features/<key_before>/
    per LODO fold (held-out C):
      adapt on the fold's planned
      training slides (never C)    -> adapters/<run>-<C>/ (tuned_on.json names the slides)
      embed (FM + that adapter)    -> features/<key_after_C>/
    robustness compare             -> runs/<run>-robustness/ (before vs the mean over the folds' adapters)
    ABMIL LODO before              -> runs/<run>-mil-before/
    ABMIL after, fold by fold      -> runs/<run>-mil-after-<C>/ (held-out C scored with C's adapter),
                                      combined in runs/<run>-mil-after/metrics.json
    side-by-side table             -> runs/<run>/experiment.json, experiment.md, config.yaml

An adapter tuned on every cohort would have seen the held-out cohort's
pixels, making the "after" external C-index transductive: each fold's
adapter is tuned only on that fold's planned training slides (from
:func:`raypath.sweep.nested.nested_lodo_plan`, so a technical twin of a
held-out tissue is left out too).  The "after" robustness numbers are the
mean over the folds' adapters (each on all slides), with a paired
bootstrap CI over patients.

Every step is a public API call of its stage and each one resumes or skips
what is already done (feature cache keys, adapter checkpoints, MIL
checkpoints), so re-running after a kill continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from raypath.adapt.api import AdaptConfig, adapt
from raypath.evaluation.meanings import better
from raypath.config import add_config_arguments, config_from_args
from raypath.io.jsonio import to_jsonable
from raypath.io.storage import atomic_write_bytes, join

log = logging.getLogger(__name__)


class ExperimentConfig(AdaptConfig):
    """The adaptation settings (all of ``raypath adapt``) plus the evaluation's."""

    embed_batch_size: int = Field(64, ge=1, description="tiles per forward pass when embedding")
    embed_num_actors: int | None = Field(None, ge=1, description="embedding model replicas (default: derived)")
    biology_column: str = Field("label", description="slides.parquet column with the biology for RI/CRoMa")
    robustness_tiles_per_slide: int = Field(100, ge=1, description="tiles per slide in the robustness analysis")
    kmeans_k: int = Field(200, ge=2, description="KMeans clusters for purity (capped on small data)")
    kmeans_repeats: int = Field(20, ge=1)
    plots: bool = Field(True, description="draw the robustness plots")
    mil_task: Literal["survival", "classification"] = Field("survival")
    mil_epochs: int = Field(50, ge=1, description="ABMIL epochs per fold")
    mil_repeats: int = Field(1, ge=1, description="LODO repeats over seeds (the paper used 20)")
    mil_num_workers: int = Field(0, ge=0, description="Ray Train workers per MIL fit (0 = in-process)")
    held_out: list[str] | None = Field(None, description="LODO folds to run (held-out cohorts; default: every cohort)")

    def adapt_config(self, tune_slides: list[str] | None = None, run: str | None = None) -> AdaptConfig:
        """The adapt settings; with ``tune_slides`` / ``run``: one fold's adapter."""
        d = {k: getattr(self, k) for k in AdaptConfig.model_fields}
        if tune_slides is not None:
            d.update(tune_slides=list(tune_slides), tune_cohorts=None, cohorts=None)
        if run is not None:
            d["run"] = run
        return AdaptConfig(**d)


#: rows of the table: (label, where in the result, direction meaning "more robust / better")
_ROBUSTNESS_ROWS = [
    ("site probe balanced accuracy", "site_probe_balanced_accuracy", better("site_probe_balanced_accuracy")),
    ("site probe chance", "site_probe_chance", None),
    ("KMeans cohort purity", "kmeans_purity", better("kmeans_purity")),
    ("KMeans purity chance", "kmeans_chance_purity", None),
    ("robustness index (RI)", "robustness_index", better("robustness_index")),
    ("CRoMa median", "croma_median", better("croma_median")),
    ("clustering score (ARI bio - ARI centre)", "clustering_score", better("clustering_score")),
    ("cohort silhouette", "cohort_silhouette", better("cohort_silhouette")),
]


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}"


def experiment_table(robust: dict, mil_before: dict, mil_after: dict) -> pd.DataFrame:
    """Side-by-side rows: metric, before, after, delta, which direction is better."""
    rows = []
    delta = robust.get("delta", {})
    for label, key, direction in _ROBUSTNESS_ROWS:
        d = delta.get(key, {})
        a, b = d.get("a"), d.get("b")
        rows.append({"metric": label, "before": a, "after": b, "delta": None if a is None or b is None else b - a, "better_if": direction or ""})
    metric = mil_before.get("metric", "c_index")
    for label, key in (("LODO external " + metric + " (mean over held-out cohorts)", "mean"), ("LODO external " + metric + " (worst cohort)", "worst")):
        a, b = mil_before.get(key), mil_after.get(key)
        rows.append({"metric": label, "before": a, "after": b, "delta": None if a is None or b is None else b - a, "better_if": "higher"})
    for cohort in sorted(set(mil_before.get("per_cohort", {})) | set(mil_after.get("per_cohort", {}))):
        a, b = mil_before.get("per_cohort", {}).get(cohort), mil_after.get("per_cohort", {}).get(cohort)
        rows.append({"metric": f"  {metric}, held-out {cohort}", "before": a, "after": b, "delta": None if a is None or b is None else b - a, "better_if": "higher"})
    return pd.DataFrame(rows)


def table_markdown(df: pd.DataFrame) -> str:
    lines = ["| metric | before | after | delta | better if |", "|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {r.metric} | {_fmt(r.before)} | {_fmt(r.after)} | {_fmt(r.delta)} | {r.better_if} |")
    return "\n".join(lines)


def _safe(name: str) -> str:
    """A cohort name usable in a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def fold_plans(cfg: ExperimentConfig) -> list:
    """The LODO folds and what each step may see (the sweep's nested-LODO plan)."""
    from raypath.errors import RaypathError
    from raypath.robustness.api import load_slides
    from raypath.sweep.nested import nested_lodo_plan

    if cfg.tune_cohorts or cfg.tune_slides or cfg.cohorts:
        raise RaypathError(
            "adapt-experiment tunes one adapter per leave-one-dataset-out fold, on that fold's training slides: "
            "drop --tune-cohorts / --tune-slides / --cohorts (choose the folds with --held-out)"
        )
    return nested_lodo_plan(load_slides(cfg.workdir), task=cfg.mil_task, seed=cfg.seed, repeats=cfg.mil_repeats,
                            cohorts=cfg.held_out, adapt=True)


def _fold_adapters(cfg: ExperimentConfig, plans: list, ekw: dict, timed) -> dict[str, dict]:
    """Per fold: an adapter tuned on the planned training slides, then every slide embedded with it."""
    from raypath.adapt.tuning import read_tuned_on
    from raypath.embed.api import EmbedConfig, embed

    folds = {}
    for p in plans:
        c = p.held_out
        ad = timed(f"adapt_{c}", lambda p=p: adapt(cfg.adapt_config(p.adapt, f"{cfg.run}-{_safe(p.held_out)}")))
        emb = timed(f"embed_after_{c}", lambda ad=ad: embed(EmbedConfig(**ekw, adapter=ad.adapter_dir)))
        rec = read_tuned_on(ad.adapter_dir) or {}
        folds[c] = {"adapter": ad.adapter_dir, "feature_dir": str(emb.feature_dir), "epochs": ad.epochs_completed,
                    "n_tiles": ad.n_tiles, "tuned_on_cohorts": rec.get("cohorts", []),
                    "n_tuned_on_slides": len(rec.get("slide_ids", []))}
    return folds


def _mil_runs(cfg: ExperimentConfig, before_dir: str, folds: dict[str, dict], timed) -> dict[str, dict]:
    """ABMIL LODO on the FM's features, and fold by fold on each fold's adapted features."""
    from raypath.mil.api import MilConfig, run_mil

    base = dict(workdir=cfg.workdir, task=cfg.mil_task, protocol="lodo", epochs=cfg.mil_epochs,
                repeats=cfg.mil_repeats, seed=cfg.seed, num_workers=cfg.mil_num_workers)
    keys = ("metric", "mean", "worst", "worst_cohort", "per_cohort", "internal_stratified")
    res = timed("mil_before", lambda: run_mil(MilConfig(**base, features=before_dir, cohorts=sorted(folds),
                                                       run=f"{cfg.run}-mil-before")))
    mil = {"before": {**{k: res.summary.get(k) for k in keys}, "run_dir": str(res.run_dir)}}
    per_fold = {}
    for c, f in folds.items():
        mcfg = MilConfig(**base, features=f["feature_dir"], cohorts=[c], run=f"{cfg.run}-mil-after-{_safe(c)}")
        per_fold[c] = timed(f"mil_after_{c}", lambda mcfg=mcfg: run_mil(mcfg))
    mil["after"] = combine_fold_runs(cfg, per_fold)
    return mil


def combine_fold_runs(cfg: ExperimentConfig, per_fold: dict) -> dict:
    """One LODO summary from per-fold runs (held-out C scored with C's adapter),
    written as ``runs/<run>-mil-after/metrics.json`` so it reads like one run."""
    ext = {c: r.summary["external"][c] for c, r in per_fold.items()}
    means = [v["mean"] for v in ext.values() if v.get("mean") is not None]
    summary = {
        "metric": next(iter(per_fold.values())).summary["metric"] if per_fold else "c_index",
        "external": ext,
        "per_cohort": {c: v["mean"] for c, v in ext.items()},
        "mean": float(np.mean(means)) if means else None,
        "worst": float(np.min(means)) if means else None,
        "worst_cohort": min(ext, key=lambda c: np.inf if ext[c]["mean"] is None else ext[c]["mean"]) if means else None,
        "internal": {c: r.summary["internal"][c] for c, r in per_fold.items()},
        "internal_stratified": {c: (r.summary.get("internal_stratified") or {}).get(c) for c, r in per_fold.items()},
        "note": "one adapter per LODO fold: held-out cohort C scored with features of the adapter that never saw C",
        "fold_runs": {c: str(r.run_dir) for c, r in per_fold.items()},
    }
    run_dir = join(cfg.workdir, "runs", f"{cfg.run}-mil-after")
    doc = {"task": cfg.mil_task, "protocol": "lodo", "per_fold_adapters": True, "summary": summary}
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps(to_jsonable(doc), indent=2).encode())
    return {**{k: summary.get(k) for k in ("metric", "mean", "worst", "worst_cohort", "per_cohort",
                                         "internal_stratified")}, "run_dir": run_dir}


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Embed before and after adaptation (one adapter per LODO fold), then
    compare robustness and LODO survival side by side.  Returns the
    experiment document (also written to ``runs/<run>/experiment.json`` with
    a markdown table)."""
    from raypath.embed.api import EmbedConfig, embed
    from raypath.robustness.api import RobustnessConfig, compare

    t0 = time.time()
    out_dir = join(cfg.workdir, "runs", cfg.run)
    plans = fold_plans(cfg)  # bad choices fail before anything runs
    cfg.save(out_dir)
    timings: dict[str, float] = {}

    def timed(name, fn):
        t = time.time()
        r = fn()
        timings[name] = round(time.time() - t, 1)
        log.info("adapt-experiment %s: %s done in %.1f s", cfg.run, name, timings[name])
        return r

    ekw = dict(workdir=cfg.workdir, model=cfg.model, weights=cfg.weights, batch_size=cfg.embed_batch_size, num_actors=cfg.embed_num_actors)
    before = timed("embed_before", lambda: embed(EmbedConfig(**ekw)))
    folds = _fold_adapters(cfg, plans, ekw, timed)
    rcfg = RobustnessConfig(
        workdir=cfg.workdir, run=f"{cfg.run}-robustness", biology_column=cfg.biology_column,
        tiles_per_slide=cfg.robustness_tiles_per_slide, kmeans_k=cfg.kmeans_k, kmeans_repeats=cfg.kmeans_repeats,
        plots=cfg.plots, gallery=cfg.plots, seed=cfg.seed,
    )
    robust = timed("robustness", lambda: compare(str(before.feature_dir), [f["feature_dir"] for f in folds.values()],
                                                 rcfg, "before", "after (mean over the folds' adapters)"))
    mil = _mil_runs(cfg, str(before.feature_dir), folds, timed)
    table = experiment_table(robust, mil["before"], mil["after"])
    md = table_markdown(table)
    doc = {
        "stage": "adapt-experiment",
        "model": cfg.model,
        "per_fold_adapters": True,
        "adapters": {c: f["adapter"] for c, f in folds.items()},
        "folds": folds,
        "adapt_epochs": cfg.epochs,
        "adapt_tiles": int(sum(f["n_tiles"] for f in folds.values())),
        "feature_dirs": {"before": str(before.feature_dir), "after": {c: f["feature_dir"] for c, f in folds.items()}},
        "robustness_run": robust.get("run_dir"),
        "robustness_note": "after = mean over the LODO folds' adapters, each measured on all slides; "
                           "B - A with a 95 % paired bootstrap CI over patients",
        "mil": mil,
        "table": json.loads(table.to_json(orient="records")),
        "timings_s": {**timings, "total": round(time.time() - t0, 1)},
    }
    atomic_write_bytes(join(out_dir, "experiment.json"), json.dumps(to_jsonable(doc), indent=1).encode())
    atomic_write_bytes(join(out_dir, "experiment.md"), (_header(cfg, folds) + md + "\n").encode())
    doc["markdown"] = md
    doc["run_dir"] = out_dir
    return doc


def _header(cfg: ExperimentConfig, folds: dict[str, dict]) -> str:
    tuned = "; ".join(f"held-out {c}: tuned on {f['n_tuned_on_slides']} slides of {'+'.join(f['tuned_on_cohorts'])}"
                      for c, f in folds.items())
    return (
        f"# Before/after DINO {cfg.method.upper()} adaptation\n\nmodel `{cfg.model}`, one adapter per "
        f"leave-one-dataset-out fold ({cfg.epochs} epochs each, augmentation "
        f"{cfg.strength if cfg.strength is not None else cfg.augmentation}; {tuned}), LODO {cfg.mil_task} with "
        f"ABMIL ({cfg.mil_epochs} epochs, {cfg.mil_repeats} repeat(s)). The held-out cohort of a fold is scored "
        "with the features of the adapter that never saw it; 'after' robustness numbers are the mean over the "
        "folds' adapters, each measured on all slides.\n\n"
    )


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt-experiment",
        help="embed before/after DoRA adaptation, compare site probe, KMeans purity and LODO C-index",
        description="Runs embed -> adapt -> embed --adapter -> robustness compare -> ABMIL LODO (before and after) "
        "and writes runs/<run>/experiment.md with the side-by-side table.",
    )
    add_config_arguments(p, ExperimentConfig)

    def run(args: argparse.Namespace) -> int:
        doc = run_experiment(config_from_args(ExperimentConfig, args))
        print(doc["markdown"])
        print(f"\n{doc['run_dir']}/experiment.md")
        return 0

    p.set_defaults(func=run)
