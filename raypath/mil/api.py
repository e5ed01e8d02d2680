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
import os
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from raypath.config import StageConfig
from raypath.train.precision import AMP_HELP
from raypath.io.jsonio import to_jsonable
from raypath.errors import RaypathError
from raypath.embed.identity import check_store, features_digest  # one feature identity for every reader
from raypath.io.storage import atomic_write_bytes, exists, is_remote, join, read_parquet, strip_protocol, write_parquet_atomic
from raypath.mil.protocols import ProtocolOutput, params_from_config, protocol_kwargs, run_protocol

log = logging.getLogger(__name__)


class MilConfig(StageConfig):
    """Configuration of ``raypath mil``."""

    workdir: str | None = Field(None, description="project folder (local path or s3:// URI) [required]")
    features: str | None = Field(
        None, description="feature store: a folder, or a model name (`uni`, `uni+<adapter run>`) or store "
        "name under <workdir>/features/ [required]"
    )
    task: Literal["survival", "classification"] = Field("survival", description="what to predict")
    protocol: Literal["lodo", "internal", "pairwise"] = Field("lodo", description="evaluation protocol")
    model: str = Field("abmil", description="MIL head: abmil, clam, or one a plugin registers (--plugin)")
    loss: str | None = Field(
        None, description="objective: cox, nll (survival), ce (classification) or a plugin's "
        "(default: cox for survival, ce for classification)"
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
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description=AMP_HELP)
    run: str | None = Field(None, description="run name under <workdir>/runs/ (default mil-<task>-<protocol>)")
    clinical: str | None = Field(None, description="clinical table (default <workdir>/slides.parquet)")
    time_unit: str | None = Field(None, description="unit of the cohort table's time column, for plot axes (e.g. months)")
    # robustness losses between technical variants of a tissue (docs/mil.md, "Robustness losses")
    lambda_emb: float = Field(0.0, ge=0, description="weight of the InfoNCE loss between two variants' slide embeddings")
    lambda_score: float = Field(0.0, ge=0, description="weight of the score loss between two variants' risks/logits")
    tau: float = Field(0.1, gt=0, description="InfoNCE temperature")
    score_loss: Literal["abs", "squared"] = Field("abs", description="score loss: |s_a - s_b| or (s_a - s_b)^2")
    variant_source: Literal["pairs", "generated", "none"] = Field(
        "pairs",
        description="technical variants: slides sharing a pair_id, or the views of `raypath embed --variants K` "
        "(generated); used by the losses and the consistency metrics",
    )
    variant_batches: bool | None = Field(
        None, description="pair-aware batches, two views per tissue per step (default: when a lambda > 0)"
    )

    @field_validator("model")
    @classmethod
    def _known_head(cls, v: str) -> str:
        from raypath.mil.models import MODELS
        from raypath.plugins import mil_head_names

        if v not in MODELS and v not in mil_head_names():
            raise ValueError(f"unknown MIL head {v!r}: use {', '.join(MODELS + tuple(mil_head_names()))} "
                             "or register one with a plugin (--plugin module:attr)")
        return v

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str | None) -> str | None:
        from raypath.plugins import loss_names

        if v is not None and v not in ("cox", "nll", "ce") and v not in loss_names():
            raise ValueError(f"unknown loss {v!r}: use cox, nll, ce{''.join(', ' + n for n in loss_names())} "
                             "or register one with a plugin (--plugin module:attr)")
        return v

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


def resolve_feature_dir(cfg: MilConfig) -> str:
    """``cfg.features`` as a folder (see :func:`raypath.embed.store.resolve_feature_dir`)."""
    from raypath.embed.store import resolve_feature_dir as _resolve

    return _resolve(cfg.workdir, cfg.features)


def load_clinical(cfg: MilConfig, slide_ids_with_features: list[str]) -> pd.DataFrame:
    """Rows of the clinical table with ``status == 'ok'`` and features.

    ``cfg.clinical`` (CSV, TSV or parquet) is read by the one table reader
    (:func:`raypath.wsi.cohort.read_table`): ids stay text (``007`` is not 7).
    """
    from raypath.wsi.cohort import read_table

    if cfg.clinical:
        uri = cfg.clinical
        df = read_table(uri, kind="clinical", required=("slide_id", "patient_id", "cohort"))
    else:
        uri = join(cfg.workdir, "slides.parquet")
        if not exists(uri):
            raise RaypathError(f"clinical table {uri!r} not found: run `raypath ingest` first or pass --clinical")
        df = read_parquet(uri).to_pandas()
    df["slide_id"] = df["slide_id"].astype(str)
    n0 = len(df)
    if "status" in df.columns:
        df = df[df["status"].astype(str) == "ok"]
    have = set(slide_ids_with_features)
    missing = df[~df["slide_id"].isin(have)]
    if len(missing):
        log.warning(
            "%d slide(s) have no features and are skipped (e.g. %s)",
            len(missing), missing["slide_id"].tolist()[:5],
        )
    df = df[df["slide_id"].isin(have)].reset_index(drop=True)
    if len(df) == 0:
        raise RaypathError(
            f"none of the {n0} slides of {uri!r} has status 'ok' and features in "
            f"{resolve_feature_dir(cfg)!r}: run `raypath embed` first"
        )
    return df


#: Clinical columns a MIL run reads: a change in any of them (or in their row order) is a new run.
_INPUT_COLUMNS = ("slide_id", "patient_id", "cohort", "time", "event", "label", "pair_id")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(cfg: MilConfig, store, clinical: pd.DataFrame) -> tuple[str, dict]:
    """``(fingerprint, parts)``: checkpoints are only reused by a run with the
    same config, the same features and the same clinical rows in the same order.

    Finished folds are stored by split and by row position, so a change of
    ``slides.parquet``, the clinical table or the feature store must start a
    fresh run: it gets a new fingerprint, hence a new checkpoint folder.
    """
    d = cfg.to_dict()
    for k in ("num_workers", "use_gpu", "run", "time_unit"):  # how it runs or is drawn, not what it computes
        d.pop(k, None)
    cols = [c for c in _INPUT_COLUMNS if c in clinical.columns]
    parts = {
        "config": _digest(d),
        "features": features_digest(store, clinical["slide_id"].astype(str).tolist()),
        "clinical": _digest([cols, clinical[cols].astype(str).to_numpy().tolist()]),
        "n_slides": int(len(clinical)),
    }
    return _digest(parts)[:12], parts


def _note_input_changes(run_dir: str, fp: str, parts: dict) -> None:
    """Record the run's inputs (``inputs.json``) and say when they changed since the last run."""
    from raypath.io.storage import open_file

    uri = join(run_dir, "inputs.json")
    if exists(uri):
        with open_file(uri, "rb") as f:
            before = json.load(f)
        if before.get("fingerprint") != fp:
            changed = [k for k in ("config", "features", "clinical") if before.get("parts", {}).get(k) != parts[k]]
            log.warning("mil %s: the %s changed since the last run: starting fresh (finished folds of the "
                        "earlier inputs are not reused)", run_dir, " and ".join(changed) or "inputs")
    atomic_write_bytes(uri, json.dumps({"fingerprint": fp, "parts": parts}, indent=1).encode())


def held_out_slides(cfg: MilConfig, clinical: pd.DataFrame) -> dict[str, list[str]]:
    """``{split name: slide ids scored as external}`` of the protocol (empty for internal)."""
    cohort = clinical["cohort"].astype(str)
    chosen = cfg.cohorts or sorted(set(cohort))
    ids = clinical["slide_id"].astype(str)
    if cfg.protocol == "lodo":
        return {c: ids[cohort == c].tolist() for c in chosen}
    if cfg.protocol == "pairwise":
        return {c: ids[cohort != c].tolist() for c in chosen}
    return {}


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
        *([("view_predictions", out.view_predictions)] if getattr(out, "view_predictions", None) is not None else []),
    ):
        write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), join(run_dir, f"{name}.parquet"))
    from raypath.mil.plots import plot_curves, plot_km

    metric = "c_index" if cfg.task == "survival" else "auroc"
    atomic_write_bytes(join(run_dir, "curves.png"), plot_curves(out.curves, metric))
    if cfg.task == "survival":
        atomic_write_bytes(join(run_dir, "km.png"), plot_km(out.predictions, cfg.time_unit))


def run_mil(cfg: MilConfig) -> MilResult:
    """Run one MIL protocol on ``cfg.workdir`` and write ``runs/<run>/``.

    Re-running the same config on the same inputs resumes from the last
    checkpoint (finished folds are skipped, the current fold continues at its
    last epoch); changed inputs (features, clinical rows or their order)
    start fresh.  Features embedded with an adapter that saw a held-out
    patient stop the run (lodo/pairwise).
    """
    from raypath.adapt.tuning import check_features_for_held_out
    from raypath.embed.store import FeatureStore

    if not cfg.workdir or not cfg.features:
        raise RaypathError(
            "mil needs --workdir (the project folder) and --features (a feature folder or "
            "a model key under <workdir>/features/)"
        )
    feature_dir = resolve_feature_dir(cfg)
    store = FeatureStore(feature_dir)
    clinical = load_clinical(cfg, store.slide_ids())
    check_store(feature_dir, slides=clinical)  # features made from other slide files than the cohort lists
    adapter_check = check_features_for_held_out(feature_dir, store.manifest(), clinical, held_out_slides(cfg, clinical))
    run_dir = join(cfg.workdir, "runs", cfg.run_name())
    fp, parts = run_fingerprint(cfg, store, clinical)
    _note_input_changes(run_dir, fp, parts)
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
    out.summary["inputs"] = {"fingerprint": fp, **parts, "adapter": adapter_check}
    write_outputs(out, cfg, run_dir)
    result = MilResult(str(run_dir), out.summary, out.predictions, out.curves, out.fold_metrics)
    from raypath.report.tracking import track_mil

    track_mil(cfg, result)  # MLflow run, from the driver (RAYPATH_TRACKING=off to skip)
    return result
