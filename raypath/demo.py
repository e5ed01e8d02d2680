"""``raypath demo``: the main job end to end on an embedded default.

local Ray + the embedded S3 endpoint + a generated multi-cohort study + a tiny
model: synth -> (upload to S3) -> ingest -> tile -> QC -> embed -> MIL (lodo,
internal) -> robustness -> report.  Every stage is called through its public
Python API, exactly as a notebook user would; the demo adds no logic of its
own beyond wiring.

With ``--bucket s3://...`` and a real endpoint in the environment the same
job runs against real object storage; with ``--no-s3`` it stays on local disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.io.storage import atomic_write_bytes, is_remote, join, makedirs

log = logging.getLogger(__name__)


class DemoConfig(StageConfig):
    workdir: str = Field("demo_out", description="folder or s3:// prefix for all outputs (s3:// on multi-node clusters)")
    n_cohorts: int = Field(3, description="cohorts (sites) in the generated study")
    slides_per_cohort: int = Field(12, description="slides per cohort")
    slide_px: int = Field(2048, description="level-0 side of each generated slide, px")
    texture: Literal["synthetic", "real"] = Field("synthetic", description="tissue texture")
    seed: int = 0
    s3: bool = Field(True, description="put slides on the embedded S3 endpoint (else local disk)")
    bucket: str | None = Field(
        None, description="use this s3:// prefix (endpoint from AWS_ENDPOINT_URL) instead of the embedded one"
    )
    model: str = Field("tiny-vit", description="registry key of the feature extractor")
    weights: str | None = Field(None, description="weights file/folder for --model (tiny models may be random)")
    mil_epochs: int = Field(20, description="ABMIL epochs per fold")
    mil_repeats: int = Field(2, description="repeats over seeds per protocol")
    small: bool = Field(False, description="a smaller, faster study (tests, cluster smoke runs)")
    sweep: bool = Field(False, description="also run a CPU-sized Ray Tune + Optuna MIL sweep (nested LODO)")
    sweep_space: str = Field(
        "sweeps/examples/mil_small.yaml", description="sweep YAML for --sweep (relative to the repository or cwd)"
    )
    sweep_samples: int = Field(4, description="trials of the --sweep step")


def _stage(name: str):
    """Context manager printing a stage's wall time."""

    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()
            print(f"[demo] {name} ...", flush=True)

        def __exit__(self, *exc):
            if exc[0] is None:
                print(f"[demo] {name} done in {time.perf_counter() - self.t0:.1f} s", flush=True)

    return _T()


def _c_index_table(table):
    """The headline rows of a MIL result: C-index per split group and set
    (external = the held-out cohort; internal = held-out patients of the
    training cohorts, all of them together)."""
    t = table[(table["metric"] == "c_index") & ((table["set"] == "external") | (table["cohort"] == "all"))]
    t = t.assign(c_index=[f"{m:.3f} +- {s:.3f}" for m, s in zip(t["mean"], t["sd"].fillna(0.0))])
    return t[["name", "set", "cohort", "c_index", "n"]].rename(columns={"name": "fold", "n": "repeats"})


def _find_space(path: str) -> str:
    """A sweep file given relative to the cwd or to the raypath checkout."""
    for cand in (Path(path), Path(__file__).resolve().parents[1] / path):
        if cand.exists():
            return str(cand)
    from raypath.errors import RaypathError

    raise RaypathError(f"sweep file {path!r} not found: pass --sweep-space PATH (see sweeps/examples/ in the repository)")


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole pipeline; returns a summary dict (also written to
    ``<workdir>/demo_summary.json``)."""
    from raypath.io.ray_env import ensure_ray

    # A cluster run keeps its workdir on object storage (every node sees it).
    workdir = cfg.workdir if is_remote(cfg.workdir) else str(Path(cfg.workdir).resolve())
    makedirs(workdir)
    if cfg.small:
        cfg = cfg.model_copy(update=dict(slides_per_cohort=min(cfg.slides_per_cohort, 5), slide_px=min(cfg.slide_px, 1024), mil_epochs=min(cfg.mil_epochs, 8), mil_repeats=1))
    cfg.save(workdir, "demo_config.yaml")
    summary: dict = {"workdir": workdir}
    server = None
    try:
        if cfg.s3 and not cfg.bucket:
            from raypath.io.s3server import start_embedded_s3

            server = start_embedded_s3()
            study_uri = server.create_bucket("raypath-demo") + "/study"
            print(f"[demo] embedded S3 endpoint {server.endpoint_url}; study at {study_uri}")
        elif cfg.bucket:
            study_uri = cfg.bucket.rstrip("/") + "/study"
        else:
            study_uri = join(workdir, "study")
        summary["study_uri"] = study_uri
        ensure_ray()

        from raypath.synth.study import SynthConfig, synthesize

        with _stage("synth"):
            cohort = synthesize(
                SynthConfig(
                    out=study_uri,
                    n_cohorts=cfg.n_cohorts,
                    slides_per_cohort=cfg.slides_per_cohort,
                    slide_px=cfg.slide_px,
                    texture=cfg.texture,
                    seed=cfg.seed,
                )
            )
        summary["slides"] = int(len(cohort))

        from raypath.wsi.ingest import IngestConfig, ingest

        with _stage("ingest"):
            slides = ingest(IngestConfig(cohort=f"{study_uri}/cohort.csv", workdir=workdir))
        summary["slides_ok"] = int((slides["status"] == "ok").sum())

        from raypath.wsi.tiling import TileConfig, tile

        with _stage("tile + QC"):
            tiling = tile(TileConfig(workdir=workdir))
        summary["tiles"] = int(tiling["n_tiles"].sum())
        print(f"[demo] QC images in {join(workdir, 'qc')}")

        if _available("raypath.embed.api"):
            from raypath.embed.api import EmbedConfig, embed

            with _stage(f"embed ({cfg.model})"):
                emb = embed(EmbedConfig(workdir=workdir, model=cfg.model, weights=cfg.weights))
            summary["features"] = str(emb.feature_dir)

            if _available("raypath.mil.api"):
                from raypath.mil.api import MilConfig, run_mil

                summary["mil"] = {}
                for protocol in ("lodo", "internal"):
                    with _stage(f"ABMIL survival, protocol {protocol}"):
                        res = run_mil(
                            MilConfig(
                                workdir=workdir,
                                features=str(emb.feature_dir),
                                task="survival",
                                protocol=protocol,
                                epochs=cfg.mil_epochs,
                                repeats=cfg.mil_repeats,
                                run=f"mil-{protocol}",
                                seed=cfg.seed,
                            )
                        )
                    summary["mil"][protocol] = str(res.run_dir)
                    print(f"[demo] ABMIL survival, protocol {protocol}: Harrell's C-index, mean +- sd over repeats")
                    print(_c_index_table(res.table()).to_string(index=False), flush=True)
            if _available("raypath.robustness.api"):
                from raypath.robustness.api import RobustnessConfig, run_robustness

                with _stage("robustness"):
                    rob = run_robustness(
                        RobustnessConfig(workdir=workdir, features=str(emb.feature_dir), run="robustness")
                    )
                summary["robustness"] = rob.get("run_dir") if isinstance(rob, dict) else str(rob)
                head = rob.get("headline", {}) if isinstance(rob, dict) else {}
                if head:
                    print("[demo] robustness of the features (see docs/robustness.md for how to read them):")
                    for k, v in head.items():
                        print(f"    {k:32s} {v:.3f}" if isinstance(v, float) else f"    {k:32s} {v}")
            if cfg.sweep:
                from raypath.sweep.api import SweepConfig, run_sweep

                with _stage(f"sweep ({cfg.sweep_samples} trials)"):
                    sw = run_sweep(
                        SweepConfig(
                            workdir=workdir,
                            space=_find_space(cfg.sweep_space),
                            name="demo-sweep",
                            num_samples=cfg.sweep_samples,
                            features=str(emb.feature_dir),
                        )
                    )
                summary["sweep"] = str(sw.sweep_dir)
                if sw.best:
                    print(f"[demo] best trial: {json.dumps(sw.best, default=str)[:400]}")
            if _available("raypath.report.pages"):
                from raypath.report.pages import write_workdir_report

                with _stage("report"):
                    summary["report"] = str(write_workdir_report(workdir))
                print(f"[demo] open {summary['report']} in a browser")
    finally:
        if server is not None:
            server.stop()
    atomic_write_bytes(join(workdir, "demo_summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a generated study (local Ray, embedded S3, tiny model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=lambda a: print(json.dumps(run_demo(config_from_args(DemoConfig, a)), indent=2)))
