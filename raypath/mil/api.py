"""``run_mil``: ABMIL survival / classification on a workdir's features.

Reads ``<workdir>/slides.parquet`` (rows with ``status == "ok"`` that have
features) and ``features/<model_key>/``, runs one protocol and writes
``<workdir>/runs/<run>/``::

    config.yaml           resolved MilConfig
    metrics.json          per fold/repeat metrics and the summary
    predictions.parquet   one row per (slide, split of a fold/repeat)
    curves.parquet        per-epoch train loss and internal/external scores
    fold_metrics.parquet  the per fold/repeat metrics as a table
    curves.png            internal vs external score per test cohort over epochs
    km.png                Kaplan-Meier curves of predicted risk groups (survival)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from raypath.config import StageConfig
from raypath.io.jsonio import to_jsonable
from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, exists, is_remote, join, read_parquet, strip_protocol, write_parquet_atomic
from raypath.mil.protocols import ProtocolOutput, run_protocol
from raypath.mil.train import TrainParams

log = logging.getLogger(__name__)


class MilConfig(StageConfig):
    """Configuration of ``raypath mil``."""

    workdir: str | None = Field(None, description="project folder (local path or s3:// URI); required by run_mil")
    features: str | None = Field(
        None, description="feature folder, or a model key under <workdir>/features/; required by run_mil"
    )
    task: Literal["survival", "classification"] = Field("survival", description="what to predict")
    protocol: Literal["lodo", "internal", "pairwise"] = Field("lodo", description="evaluation protocol")
    model: Literal["abmil", "clam"] = Field("abmil", description="MIL head")
    loss: Literal["cox", "nll", "ce"] | None = Field(
        None, description="objective (default: cox for survival, ce for classification)"
    )
    epochs: int = Field(50, ge=0, description="training epochs per fold")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    batch_size: int = Field(64, ge=1, description="slides per batch (padded + masked)")
    max_tiles_per_slide: int | None = Field(1000, description="random tiles per slide per step (None = all)")
    balanced_sampling: bool = Field(True, description="balance events vs censored (or classes) per epoch")
    n_bins: int = Field(4, ge=1, description="time bins of the nll loss")
    nll_alpha: float = Field(0.4, ge=0, le=1, description="weight of the uncensored term of the nll loss")
    folds: int = Field(5, ge=2, description="folds of the internal protocol")
    repeats: int = Field(1, ge=1, description="repeats over seeds")
    internal_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of training-cohort patients held out for internal scores (lodo/pairwise)"
    )
    cohorts: list[str] | None = Field(None, description="only hold out (lodo) / train on (pairwise) these cohorts")
    eval_every: int = Field(1, ge=1, description="evaluate internal/external sets every N epochs")
    seed: int = Field(0, description="base seed (repeat r uses seed + r)")
    num_workers: int = Field(0, ge=0, description="Ray Train workers (0 = in-process, no Ray)")
    use_gpu: bool | None = Field(None, description="Ray Train on GPUs (default: if the cluster has them)")
    run: str | None = Field(None, description="run name under <workdir>/runs/ (default mil-<task>-<protocol>)")
    clinical: str | None = Field(None, description="clinical table (default <workdir>/slides.parquet)")

    def run_name(self) -> str:
        return self.run or f"mil-{self.task}-{self.protocol}"

    def resolved_loss(self) -> str:
        if self.loss is not None:
            return self.loss
        return "cox" if self.task == "survival" else "ce"


@dataclass
class MilResult:
    """What ``run_mil`` wrote and its headline numbers."""

    run_dir: str
    summary: dict[str, Any]
    predictions: pd.DataFrame
    curves: pd.DataFrame
    fold_metrics: pd.DataFrame

    def table(self) -> pd.DataFrame:
        """Headline table: one row per (name, set, cohort) with mean +- sd and CI."""
        return summary_table(self.summary)


def params_from_config(cfg: MilConfig) -> TrainParams:
    return TrainParams(
        task=cfg.task,
        loss=cfg.resolved_loss(),
        model=cfg.model,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        max_tiles_per_slide=cfg.max_tiles_per_slide,
        balanced_sampling=cfg.balanced_sampling,
        n_bins=cfg.n_bins,
        nll_alpha=cfg.nll_alpha,
        eval_every=cfg.eval_every,
    )


def protocol_kwargs(cfg: MilConfig, **overrides: Any) -> dict[str, Any]:
    """The :func:`~raypath.mil.protocols.run_protocol` keyword arguments a
    config decides (splits, repeats, workers); ``overrides`` win."""
    kw: dict[str, Any] = dict(
        folds=cfg.folds,
        repeats=cfg.repeats,
        seed=cfg.seed,
        internal_fraction=cfg.internal_fraction,
        cohorts=cfg.cohorts,
        num_workers=cfg.num_workers,
    )
    kw.update(overrides)
    return kw


def resolve_feature_dir(cfg: MilConfig) -> str:
    """``cfg.features`` as a folder (see :func:`raypath.embed.store.resolve_feature_dir`)."""
    from raypath.embed.store import resolve_feature_dir as _resolve

    return _resolve(cfg.workdir, cfg.features)


def load_clinical(cfg: MilConfig, slide_ids_with_features: list[str]) -> pd.DataFrame:
    """Rows of the clinical table with ``status == 'ok'`` and features."""
    uri = cfg.clinical or join(cfg.workdir, "slides.parquet")
    if not exists(uri):
        raise RaypathError(
            f"clinical table {uri!r} not found: run `raypath ingest` first or pass --clinical"
        )
    if str(uri).endswith(".csv"):
        from raypath.io.storage import open_file

        with open_file(uri, "rb") as f:
            df = pd.read_csv(f)
    else:
        df = read_parquet(uri).to_pandas()
    n0 = len(df)
    if "status" in df.columns:
        df = df[df["status"].astype(str) == "ok"]
    have = set(slide_ids_with_features)
    missing = df[~df["slide_id"].astype(str).isin(have)]
    if len(missing):
        log.warning(
            "%d slide(s) have no features and are skipped (e.g. %s)",
            len(missing), missing["slide_id"].astype(str).tolist()[:5],
        )
    df = df[df["slide_id"].astype(str).isin(have)].reset_index(drop=True)
    if len(df) == 0:
        raise RaypathError(
            f"none of the {n0} slides of {uri!r} has status 'ok' and features in "
            f"{resolve_feature_dir(cfg)!r}: run `raypath embed` first"
        )
    return df


def _fingerprint(cfg: MilConfig) -> str:
    """Checkpoints are only reused by a run with the same training inputs."""
    d = cfg.to_dict()
    for k in ("num_workers", "use_gpu", "run"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def summary_table(summary: dict) -> pd.DataFrame:
    """Flatten ``summary['groups']`` into rows of (name, set, cohort, metric, mean, sd, CI)."""
    rows = []
    for name, sets in summary.get("groups", {}).items():
        for set_name, cohorts in sets.items():
            for cohort, metrics in cohorts.items():
                for m, s in metrics.items():
                    rows.append({"name": name, "set": set_name, "cohort": cohort, "metric": m, **s})
    return pd.DataFrame(rows)


def write_outputs(out: ProtocolOutput, cfg: MilConfig, run_dir: str) -> None:
    import pyarrow as pa

    cfg.save(run_dir)
    doc = {
        "task": cfg.task,
        "protocol": cfg.protocol,
        "model": cfg.model,
        "loss": cfg.resolved_loss(),
        "n_slides": int(out.predictions["slide_id"].nunique()),
        "summary": out.summary,
        "folds": out.fold_metrics.to_dict(orient="records"),
    }
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps(to_jsonable(doc), indent=2).encode())
    for name, df in (
        ("predictions", out.predictions),
        ("curves", out.curves),
        ("fold_metrics", out.fold_metrics),
    ):
        write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), join(run_dir, f"{name}.parquet"))
    from raypath.mil.plots import plot_curves, plot_km

    metric = "c_index" if cfg.task == "survival" else "auroc"
    atomic_write_bytes(join(run_dir, "curves.png"), plot_curves(out.curves, metric))
    if cfg.task == "survival":
        atomic_write_bytes(join(run_dir, "km.png"), plot_km(out.predictions))


def run_mil(cfg: MilConfig) -> MilResult:
    """Run one MIL protocol on ``cfg.workdir`` and write ``runs/<run>/``.

    Re-running the same config resumes from the last checkpoint (finished
    folds are skipped, the current fold continues at its last epoch).
    """
    from raypath.embed.store import FeatureStore

    if not cfg.workdir or not cfg.features:
        raise RaypathError(
            "mil needs --workdir (the project folder) and --features (a feature folder or "
            "a model key under <workdir>/features/)"
        )
    feature_dir = resolve_feature_dir(cfg)
    store = FeatureStore(feature_dir)
    clinical = load_clinical(cfg, store.slide_ids())
    run_dir = join(cfg.workdir, "runs", cfg.run_name())
    fp = _fingerprint(cfg)
    checkpoint_dir = None
    if not is_remote(run_dir):
        checkpoint_dir = os.path.join(strip_protocol(run_dir), "checkpoints", fp)
    out = run_protocol(
        store,
        clinical,
        params_from_config(cfg),
        cfg.protocol,
        **protocol_kwargs(
            cfg,
            checkpoint_dir=checkpoint_dir,
            ray_storage_path=join(run_dir, "ray"),
            ray_name=f"train-{fp}",
            use_gpu=cfg.use_gpu,
        ),
    )
    write_outputs(out, cfg, run_dir)
    return MilResult(str(run_dir), out.summary, out.predictions, out.curves, out.fold_metrics)
