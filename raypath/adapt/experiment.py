"""``raypath adapt-experiment``: the paper's before/after experiment in one command.

On a workdir that has been ingested and tiled::

    embed (FM)                  -> features/<key_before>/
    adapt (DINO + DoRA/LoRA)    -> adapters/<run>/
    embed (FM + adapter)        -> features/<key_after>/
    robustness compare          -> runs/<run>-robustness/ (site probe, KMeans purity, RI, CRoMa ...)
    ABMIL LODO, before & after  -> runs/<run>-mil-before/, runs/<run>-mil-after/
    side-by-side table          -> runs/<run>/experiment.json, experiment.md, config.yaml

Every step is a public API call of its stage and each one resumes or skips
what is already done (feature cache keys, adapter checkpoints, MIL
checkpoints), so re-running after a kill continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Literal

import pandas as pd
from pydantic import Field

from raypath.adapt.api import AdaptConfig, adapt
from raypath.evaluation.meanings import better
from raypath.config import add_config_arguments, config_from_args
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

    def adapt_config(self) -> AdaptConfig:
        return AdaptConfig(**{k: getattr(self, k) for k in AdaptConfig.model_fields})


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


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Embed before and after adaptation, then compare robustness and LODO
    survival side by side.  Returns the experiment document (also written
    to ``runs/<run>/experiment.json`` with a markdown table)."""
    from raypath.embed.api import EmbedConfig, embed
    from raypath.mil.api import MilConfig, run_mil
    from raypath.robustness.api import RobustnessConfig, compare

    t0 = time.time()
    out_dir = join(cfg.workdir, "runs", cfg.run)
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
    ad = timed("adapt", lambda: adapt(cfg.adapt_config()))
    after = timed("embed_after", lambda: embed(EmbedConfig(**ekw, adapter=ad.adapter_dir)))

    rcfg = RobustnessConfig(
        workdir=cfg.workdir, run=f"{cfg.run}-robustness", biology_column=cfg.biology_column,
        tiles_per_slide=cfg.robustness_tiles_per_slide, kmeans_k=cfg.kmeans_k, kmeans_repeats=cfg.kmeans_repeats,
        plots=cfg.plots, gallery=cfg.plots, seed=cfg.seed,
    )
    robust = timed("robustness", lambda: compare(str(before.feature_dir), str(after.feature_dir), rcfg, "before", "after"))

    mil = {}
    for name, emb in (("before", before), ("after", after)):
        mcfg = MilConfig(
            workdir=cfg.workdir, features=str(emb.feature_dir), task=cfg.mil_task, protocol="lodo",
            epochs=cfg.mil_epochs, repeats=cfg.mil_repeats, seed=cfg.seed, num_workers=cfg.mil_num_workers,
            run=f"{cfg.run}-mil-{name}",
        )
        res = timed(f"mil_{name}", lambda mcfg=mcfg: run_mil(mcfg))
        mil[name] = {**{k: res.summary.get(k) for k in ("metric", "mean", "worst", "worst_cohort", "per_cohort")}, "run_dir": str(res.run_dir)}

    table = experiment_table(robust, mil["before"], mil["after"])
    md = table_markdown(table)
    doc = {
        "stage": "adapt-experiment",
        "model": cfg.model,
        "adapter": ad.adapter_dir,
        "adapt_epochs": ad.epochs_completed,
        "adapt_tiles": ad.n_tiles,
        "feature_dirs": {"before": str(before.feature_dir), "after": str(after.feature_dir)},
        "robustness_run": robust.get("run_dir"),
        "mil": mil,
        "table": json.loads(table.to_json(orient="records")),
        "timings_s": {**timings, "total": round(time.time() - t0, 1)},
    }
    atomic_write_bytes(join(out_dir, "experiment.json"), json.dumps(doc, indent=1).encode())
    header = (
        f"# Before/after DINO {cfg.method.upper()} adaptation\n\nmodel `{cfg.model}`, adapter `{ad.adapter_dir}` "
        f"({ad.epochs_completed} epochs on {ad.n_tiles} tiles, augmentation "
        f"{cfg.strength if cfg.strength is not None else cfg.augmentation}), LODO {cfg.mil_task} with ABMIL "
        f"({cfg.mil_epochs} epochs, {cfg.mil_repeats} repeat(s)).\n\n"
    )
    atomic_write_bytes(join(out_dir, "experiment.md"), (header + md + "\n").encode())
    doc["markdown"] = md
    doc["run_dir"] = out_dir
    return doc


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
