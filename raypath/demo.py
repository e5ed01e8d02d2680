"""``raypath demo``: the main job end to end on an embedded default.

local Ray + the embedded S3 endpoint + a generated multi-cohort study (with
technical variants) + the project's small reference model (``raypath-small-ref``,
shipped in the package): synth -> (upload to S3) -> ingest -> tile -> QC ->
embed -> MIL (lodo, internal) -> MIL with the robustness losses between
technical variants -> robustness -> a short DoRA adaptation with its
before/after table (``adapt-experiment``) -> a small patch-classification
benchmark (generated mitotic figures) -> a final model from the LODO run's
settings applied by ``raypath predict`` to a cohort generated later with
another seed (raw slides to predictions and heatmaps) -> report.  Every stage is called through its
public Python API, exactly as a notebook user would; the demo adds no logic
of its own beyond wiring.  It ends by printing where the report is and how
long each step took.

With ``--bucket s3://...`` and a real endpoint in the environment the same
job runs against real object storage; with ``--no-s3`` it stays on local disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.io.storage import atomic_write_bytes, is_remote, join, makedirs

log = logging.getLogger(__name__)


_STUDY, _STEPS = {"group": "generated study"}, {"group": "demo steps"}  # --help sections


class DemoConfig(StageConfig):
    workdir: str = Field("demo_out", description="folder or s3:// prefix for all outputs (s3:// on multi-node clusters)")
    n_cohorts: int = Field(3, description="cohorts (sites) in the generated study", json_schema_extra=_STUDY)
    slides_per_cohort: int = Field(12, description="slides per cohort", json_schema_extra=_STUDY)
    slide_px: int = Field(2048, description="level-0 side of each generated slide, px", json_schema_extra=_STUDY)
    texture: Literal["synthetic", "real"] = Field("synthetic", description="tissue texture", json_schema_extra=_STUDY)
    seed: int = Field(0, description="seed of the study and of every stage")
    s3: bool = Field(True, description="put slides on the embedded S3 endpoint (else local disk)")
    bucket: str | None = Field(
        None, description="use this s3:// prefix (endpoint from AWS_ENDPOINT_URL) instead of the embedded one"
    )
    pair_fraction: float = Field(0.25, ge=0, le=1, description="tissues re-rendered under another site (technical "
                                 "variants for the robustness losses and RI)", json_schema_extra=_STUDY)
    model: str = Field("raypath-small-ref", description="registry key of the feature extractor (default: the "
                       "reference model shipped with raypath; tiny-vit = random test model)")
    weights: str | None = Field(None, description="weights file/folder for --model (default: the registered ones; "
                                "'random' for test models)")
    mil_epochs: int = Field(20, description="ABMIL epochs per fold", json_schema_extra=_STEPS)
    mil_repeats: int = Field(2, description="repeats over seeds per protocol", json_schema_extra=_STEPS)
    adapt_folds: int = Field(
        3, ge=0, description="leave-one-dataset-out folds of the DoRA before/after experiment, each with its own "
        "adapter tuned only on that fold's training cohorts (0 = skip the adaptation step; --small: at most 1)",
        json_schema_extra=_STEPS)
    adapt_epochs: int = Field(2, ge=1, description="DINO epochs of each demo adapter", json_schema_extra=_STEPS)
    robust_losses: bool = Field(True, description="also train ABMIL with the robustness losses between technical "
                                "variants (InfoNCE + score loss) and compare it with the plain LODO run",
                                json_schema_extra=_STEPS)
    patch: bool = Field(True, description="also run a small patch-classification benchmark (linear probe vs LoRA "
                        "on generated mitotic figures)", json_schema_extra=_STEPS)
    predict: bool = Field(True, description="also fit a final model with the LODO run's settings and apply it to a "
                          "cohort generated later (another seed): raw slides -> predictions, metrics, heatmaps",
                          json_schema_extra=_STEPS)
    external_slides: int = Field(10, ge=2, description="slides of the later cohort of the --predict step",
                                 json_schema_extra=_STEPS)
    small: bool = Field(False, description="a smaller, faster study (tests, cluster smoke runs)",
                        json_schema_extra=_STEPS)
    sweep: bool = Field(False, description="also run a CPU-sized Ray Tune + Optuna MIL sweep (nested LODO)",
                        json_schema_extra=_STEPS)
    sweep_space: str = Field(
        "sweeps/examples/mil_small.yaml", description="sweep YAML for --sweep (relative to the repository or cwd)"
    , json_schema_extra=_STEPS)
    sweep_samples: int = Field(4, description="trials of the --sweep step", json_schema_extra=_STEPS)


class _Steps:
    """Prints ``[demo] step ...`` / ``done in N s`` and keeps each step's wall time."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        steps = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()
                print(f"[demo] {name} ...", flush=True)

            def __exit__(self, *exc):
                if exc[0] is None:
                    steps.times[name] = round(time.perf_counter() - self.t0, 1)
                    print(f"[demo] {name} done in {steps.times[name]:.1f} s", flush=True)

        return _T()


def _c_index_table(table):
    """The headline rows of a MIL result: C-index per split group and set
    (external = the held-out cohort; internal "all" = held-out patients of the
    training cohorts pooled across cohorts; internal "stratified" = the same
    patients, pairs compared only within a cohort)."""
    t = table[(table["metric"] == "c_index")
              & ((table["set"] == "external") | table["cohort"].isin(["all", "stratified"]))]
    fmt = [("n/a" if m != m or m is None else f"{m:.3f} +- {s:.3f}") for m, s in zip(t["mean"], t["sd"].fillna(0.0))]
    t = t.assign(c_index=fmt)
    return t[["name", "set", "cohort", "c_index", "n"]].rename(columns={"name": "fold", "n": "repeats"})


def _find_space(path: str) -> str:
    """A sweep file given relative to the cwd or to the raypath checkout."""
    for cand in (Path(path), Path(__file__).resolve().parents[1] / path):
        if cand.exists():
            return str(cand)
    from raypath.errors import RaypathError

    raise RaypathError(f"sweep file {path!r} not found: pass --sweep-space PATH (see sweeps/examples/ in the repository)")


def _scaled(cfg: DemoConfig) -> DemoConfig:
    if not cfg.small:
        return cfg
    return cfg.model_copy(update=dict(slides_per_cohort=min(cfg.slides_per_cohort, 5), slide_px=min(cfg.slide_px, 1024),
                                      mil_epochs=min(cfg.mil_epochs, 8), mil_repeats=1,
                                      adapt_epochs=min(cfg.adapt_epochs, 1), adapt_folds=min(cfg.adapt_folds, 1),
                                      external_slides=min(cfg.external_slides, 6)))


def _study_location(cfg: DemoConfig, workdir: str):
    """(embedded S3 server or None, where the study's slides go)."""
    if cfg.s3 and not cfg.bucket:
        from raypath.io.s3server import start_embedded_s3

        server = start_embedded_s3()
        study_uri = server.create_bucket("raypath-demo") + "/study"
        print(f"[demo] embedded S3 endpoint {server.endpoint_url}; study at {study_uri}")
        return server, study_uri
    if cfg.bucket:
        return None, cfg.bucket.rstrip("/") + "/study"
    return None, join(workdir, "study")


def _prepare(cfg: DemoConfig, workdir: str, study_uri: str, step: _Steps, summary: dict) -> None:
    """synth -> ingest -> tile + QC."""
    from raypath.synth.study import SynthConfig, synthesize
    from raypath.wsi.ingest import IngestConfig, ingest
    from raypath.wsi.tiling import TileConfig, tile

    with step("synth"):
        cohort = synthesize(SynthConfig(out=study_uri, n_cohorts=cfg.n_cohorts, slides_per_cohort=cfg.slides_per_cohort,
                                        slide_px=cfg.slide_px, texture=cfg.texture, seed=cfg.seed,
                                        pair_fraction=cfg.pair_fraction))
    summary["slides"] = int(len(cohort))
    with step("ingest"):
        slides = ingest(IngestConfig(cohort=f"{study_uri}/cohort.csv", workdir=workdir))
    summary["slides_ok"] = int((slides["status"] == "ok").sum())
    with step("tile + QC"):
        tiling = tile(TileConfig(workdir=workdir))
    summary["tiles"] = int(tiling["n_tiles"].sum())
    print(f"[demo] QC images in {join(workdir, 'qc')}")


def _evaluate(cfg: DemoConfig, workdir: str, features: str, step: _Steps, summary: dict) -> None:
    """ABMIL survival (lodo, internal) and the robustness of the features."""
    from raypath.mil.api import MilConfig, run_mil
    from raypath.robustness.api import RobustnessConfig, run_robustness

    summary["mil"] = {}
    for protocol in ("lodo", "internal"):
        with step(f"ABMIL survival, protocol {protocol}"):
            res = run_mil(MilConfig(workdir=workdir, features=features, task="survival", protocol=protocol,
                                    epochs=cfg.mil_epochs, repeats=cfg.mil_repeats, run=f"mil-{protocol}",
                                    seed=cfg.seed, time_unit="months"))
        summary["mil"][protocol] = str(res.run_dir)
        print(f"[demo] ABMIL survival, protocol {protocol}: Harrell's C-index, mean +- sd over repeats")
        print(_c_index_table(res.table()).to_string(index=False), flush=True)
    with step("robustness"):
        rob = run_robustness(RobustnessConfig(workdir=workdir, features=features, run="robustness"))
    summary["robustness"] = rob.get("run_dir") if isinstance(rob, dict) else str(rob)
    head = rob.get("headline", {}) if isinstance(rob, dict) else {}
    if head:
        print("[demo] robustness of the features (see docs/robustness.md for how to read them):")
        for k, v in head.items():
            print(f"    {k:32s} {v:.3f}" if isinstance(v, float) else f"    {k:32s} {v}")


def _external_means(f) -> dict:
    """Mean over repeats and held-out cohorts of the external C-index and the consistency metrics."""
    f = f[f["set"] == "external"]
    cols = [c for c in ("c_index", "quantile_diff", "flip_rate") if c in f.columns]
    return {c: float(f[c].mean()) for c in cols}


def _robust_losses(cfg: DemoConfig, workdir: str, features: str, step: _Steps, summary: dict) -> None:
    """ABMIL under LODO with the robustness losses between real technical variants (pair_id), beside the plain run."""
    from raypath.io.storage import read_parquet
    from raypath.mil.api import MilConfig, run_mil

    base = dict(workdir=workdir, features=features, task="survival", protocol="lodo", epochs=cfg.mil_epochs,
                repeats=cfg.mil_repeats, seed=cfg.seed, time_unit="months", variant_source="pairs")
    # "off" is the plain LODO run of _evaluate: the same settings, its consistency metrics over the same pairs
    off_dir = summary["mil"]["lodo"]
    with step("ABMIL survival with robustness losses (InfoNCE + score loss between variants)"):
        on = run_mil(MilConfig(**base, run="mil-lodo-robust", lambda_emb=0.5, lambda_score=1.0))
    summary["robust_losses"] = {"off": off_dir, "on": str(on.run_dir)}
    a = _external_means(read_parquet(join(off_dir, "fold_metrics.parquet")).to_pandas())
    b = _external_means(on.fold_metrics)
    print("[demo] robustness losses, LODO external (mean over held-out cohorts and repeats): off -> on")
    for k in a:
        print(f"    {k:16s} {a[k]:.3f} -> {b.get(k, float('nan')):.3f}", flush=True)


def _patch(cfg: DemoConfig, workdir: str, step: _Steps, summary: dict) -> None:
    """The patch-classification benchmark, CPU-sized: linear probe vs LoRA over label fractions and domains."""
    from raypath.patch.api import PatchConfig, run_patch
    from raypath.patch.outputs import headline_sentences

    pcfg = PatchConfig(workdir=workdir, run="patch", preset="cpu-small", model=cfg.model, weights=cfg.weights,
                       methods=["linear", "lora"], seeds=[42], fractions=[0.1, 1.0], max_epochs=3, patience=2,
                       n_boot=100, synth_options={"n_domains": 3, "slides_per_domain": 4, "slide_px": 768,
                                                  "cells_per_slide": 16, "seed": cfg.seed})
    with step("patch classification (linear probe vs LoRA, generated mitotic figures)"):
        doc = run_patch(pcfg)
    summary["patch"] = pcfg.run_dir()
    for line in headline_sentences(doc["headline"]):
        print("[demo] patch: " + line, flush=True)


def _predict(cfg: DemoConfig, workdir: str, features: str, study_uri: str, step: _Steps, summary: dict) -> None:
    """A final model with the LODO run's settings, applied to a cohort generated later (raw slides, one command)."""
    from raypath.mil.api import MilConfig
    from raypath.predict.api import PredictConfig, predict
    from raypath.predict.final import fit_final
    from raypath.synth.study import SynthConfig, synthesize

    with step("final model (all slides, the LODO run's settings)"):
        model_dir = fit_final(MilConfig(workdir=workdir, features=features, task="survival", protocol="lodo",
                                        epochs=cfg.mil_epochs, seed=cfg.seed, time_unit="months", run="final"),
                              name="final")
    ext_study = study_uri.rstrip("/") + "-external"
    ext_workdir = join(workdir, "external")
    with step("predict on a later cohort (raw slides -> ingest, tile, embed, predict)"):
        synthesize(SynthConfig(out=ext_study, n_cohorts=1, slides_per_cohort=cfg.external_slides,
                               slide_px=cfg.slide_px, texture=cfg.texture, seed=cfg.seed + 1, id_prefix="ext-"))
        res = predict(PredictConfig(model=model_dir, workdir=ext_workdir, cohort=f"{ext_study}/cohort.csv",
                                    heatmaps=3, n_boot=200))
    summary["final_model"] = model_dir
    summary["predict"] = res.run_dir
    s = (res.metrics or {}).get("survival") or {}
    c = (f"; C-index {s['c_index']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] (95 % bootstrap CI)"
         if isinstance(s.get("c_index"), float) and s["c_index"] == s["c_index"] else "")
    print(f"[demo] predict: {len(res.predictions)} slides of the later cohort scored{c}; heatmaps and report in "
          f"{res.run_dir}", flush=True)


def _adaptation(cfg: DemoConfig, workdir: str, step: _Steps, summary: dict) -> None:
    """A short DoRA adaptation: the DoRA paper's before/after experiment on ``adapt_folds`` LODO folds."""
    from raypath.adapt.experiment import ExperimentConfig, run_experiment
    from raypath.io.storage import read_parquet

    slides = read_parquet(join(workdir, "slides.parquet"), columns=["cohort", "status"]).to_pandas()
    cohorts = sorted(slides.loc[slides["status"] == "ok", "cohort"].astype(str).unique())
    held_out = cohorts[: cfg.adapt_folds]
    ecfg = ExperimentConfig(
        workdir=workdir, model=cfg.model, weights=cfg.weights, method="dora", run="dora", seed=cfg.seed,
        epochs=cfg.adapt_epochs, warmup_epochs=0, tiles_per_slide=8, n_local_crops=2, batch_size=16,
        robustness_tiles_per_slide=20, kmeans_repeats=3, plots=False, mil_epochs=cfg.mil_epochs, mil_repeats=1,
        held_out=held_out)
    with step(f"DoRA adaptation, before/after (held out: {', '.join(held_out)})"):
        doc = run_experiment(ecfg)
    summary["adaptation"] = doc["run_dir"]
    print(f"[demo] DoRA adaptation, one adapter per held-out cohort ({ecfg.epochs} DINO epochs; a short run "
          "that tests the pipeline, docs/VALIDATION.md has the study): before / after")
    print(doc["markdown"], flush=True)


def _sweep(cfg: DemoConfig, workdir: str, features: str, step: _Steps, summary: dict) -> None:
    from raypath.sweep.api import SweepConfig, run_sweep

    with step(f"sweep ({cfg.sweep_samples} trials)"):
        sw = run_sweep(SweepConfig(workdir=workdir, space=_find_space(cfg.sweep_space), name="demo-sweep",
                                   num_samples=cfg.sweep_samples, features=features))
    summary["sweep"] = str(sw.sweep_dir)
    if sw.best:
        print(f"[demo] best trial: {json.dumps(sw.best.get('objectives'), default=str)}")


def _pipeline(cfg: DemoConfig, workdir: str, study_uri: str, step: _Steps, summary: dict) -> None:
    from raypath.embed.api import EmbedConfig, embed
    from raypath.report.pages import write_workdir_report

    _prepare(cfg, workdir, study_uri, step, summary)
    with step(f"embed ({cfg.model})"):
        emb = embed(EmbedConfig(workdir=workdir, model=cfg.model, weights=cfg.weights))
    features = str(emb.feature_dir)
    summary["features"] = features
    _evaluate(cfg, workdir, features, step, summary)
    if cfg.robust_losses and cfg.pair_fraction > 0:
        _robust_losses(cfg, workdir, features, step, summary)
    if cfg.adapt_folds > 0:
        _adaptation(cfg, workdir, step, summary)
    if cfg.patch:
        _patch(cfg, workdir, step, summary)
    if cfg.predict:
        _predict(cfg, workdir, features, study_uri, step, summary)
    if cfg.sweep:
        _sweep(cfg, workdir, features, step, summary)
    with step("report"):
        summary["report"] = str(write_workdir_report(workdir))


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole pipeline; returns a summary dict (also written to
    ``<workdir>/demo_summary.json``, with each step's wall time in seconds)."""
    from raypath.io.ray_env import ensure_ray

    # A cluster run keeps its workdir on object storage (every node sees it).
    workdir = cfg.workdir if is_remote(cfg.workdir) else str(Path(cfg.workdir).resolve())
    makedirs(workdir)
    cfg = _scaled(cfg)
    cfg.save(workdir, "demo_config.yaml")
    summary: dict = {"workdir": workdir}
    step = _Steps()
    t0 = time.perf_counter()
    server = None
    try:
        server, summary["study_uri"] = _study_location(cfg, workdir)
        ensure_ray()
        _pipeline(cfg, workdir, summary["study_uri"], step, summary)
    finally:
        if server is not None:
            server.stop()
    summary["step_times_s"] = {**step.times, "total": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(join(workdir, "demo_summary.json"), json.dumps(summary, indent=2).encode())
    print("[demo] time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["step_times_s"].items()))
    print(f"[demo] report: open {summary['report']} in a browser (one page per run, linked from it)", flush=True)
    return summary


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a generated study (local Ray, embedded S3, the shipped small FM)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, DemoConfig)

    def _main(args: argparse.Namespace) -> int:
        summary = run_demo(config_from_args(DemoConfig, args))
        print(json.dumps({k: summary[k] for k in ("workdir", "report", "step_times_s")}, indent=2))
        return 0

    p.set_defaults(func=_main)
