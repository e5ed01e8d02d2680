"""``raypath adapt``: DoRA/LoRA adaptation of a foundation model by DINO
self-distillation under strong stain/scanner augmentation (METHODS.md §1).

Data flow::

    tiles.parquet (+ slides.parquet: cohort, uri, status == ok)
      -> N random tiles per slide of the chosen cohorts, drawn once
         (adapters/<run>/training_tiles.parquet)
      -> uint8 tiles (raypath.wsi.reader), a Ray Dataset when num_workers >= 1
      -> per step: multi-crop augmentation on the device (raypath.adapt.augment),
         student = FM + adapter + DINO head on all views, teacher (EMA) on
         the 2 global views, DINO loss (raypath.adapt.dino)
      -> adapters/<run>/: the teacher adapter in peft save_pretrained layout
         (adapter_config.json + adapter_model.safetensors), config.yaml,
         metrics.parquet + metrics.json (one row per epoch)

``num_workers = 0`` trains in this process (no Ray needed);
``num_workers >= 1`` runs a Ray Train ``TorchTrainer`` (DDP, gloo on CPU,
nccl on GPU).  Both checkpoint the same files every
``checkpoint_every_epochs`` (adapter-only: the FM's weights are never
copied) and a re-run with the same ``run`` name resumes from the last one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from pydantic import Field

from raypath.adapt import augment as aug
from raypath.wsi.reader import read_tiles
from raypath.wsi.tile_images import load_tile_images
from raypath.adapt import dino, dino_train
from raypath.config import add_config_arguments, config_from_args
from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, exists, filesystem_for, is_remote, join, read_parquet, strip_protocol, write_parquet_atomic
from raypath.train.checkpoint import COMPLETE
from raypath.train.checkpoint import latest_checkpoint as _latest_under
from raypath.train.context import LocalContext, SimulatedKill, TrainContext  # noqa: F401 (SimulatedKill: re-exported)

log = logging.getLogger(__name__)

#: Files of one checkpoint (a folder): peft layout of both adapters + the rest.
CKPT_TEACHER = "teacher"
CKPT_STUDENT = "student"
CKPT_TENSORS = dino_train.CKPT_TENSORS  # trainable weights of student and teacher, centre
CKPT_STATE = dino_train.CKPT_STATE  # optimiser state, epoch, metrics so far
CKPT_DONE = COMPLETE  # written last: a folder without it is ignored
KEEP_CHECKPOINTS = 2
#: Config fields that may differ between a run and its resumption.
_RESUMABLE_CHANGES = {"workdir", "epochs", "num_workers", "use_gpu", "checkpoint_every_epochs", "device", "stop_after_epochs", "batch_size", "amp"}


class AdaptConfig(dino_train.DinoSettings):
    """Parameters of ``raypath adapt`` (defaults = the paper's, METHODS.md §1;
    the DINO settings are :class:`raypath.adapt.dino_train.DinoSettings`)."""

    workdir: str = Field(..., description="project folder with slides.parquet and tiles.parquet (local or s3://)")
    model: str = Field("phikon", description="registry key of the foundation model")
    weights: str | None = Field(None, description="weights file/folder; default: HF cache/hub ('random' for tiny test models)")
    method: Literal["dora", "lora"] = Field("dora", description="adapter type")
    rank: int = Field(16, ge=1, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="adapter scaling alpha (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="adapter dropout")
    target_modules: list[str] | None = Field(None, description="module-name suffixes to adapt; default: the model spec's")
    cohorts: list[str] | None = Field(None, description="older name of --tune-cohorts")
    tune_cohorts: list[str] | None = Field(None, description="cohorts to tune on (required unless --tune-slides; 'all' = every cohort, on purpose: no cohort is then external for the features it embeds)")
    tune_slides: list[str] | None = Field(None, description="tune on exactly these slides (e.g. a LODO fold's planned training slides); wins over --tune-cohorts")
    run: str = Field("dora", description="run name: outputs in <workdir>/adapters/<run>/; the same name resumes")


@dataclass
class AdaptResult:
    """What :func:`adapt` produced."""

    run_dir: str
    adapter_dir: str
    metrics: pd.DataFrame
    start_epoch: int  # first epoch trained by this call (> 0 when resumed)
    epochs_completed: int
    n_tiles: int
    trainable_params: int = 0
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def _abs(uri: str) -> str:
    # Ray workers chdir into their trial folder: local paths must be absolute.
    return uri if is_remote(uri) else os.path.abspath(strip_protocol(uri))


def run_dir_of(cfg: AdaptConfig) -> str:
    return join(_abs(cfg.workdir), "adapters", cfg.run)


def _seed_of(*parts: Any) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def sample_training_tiles(workdir: str, tiles_per_slide: int, cohorts: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """Draw ``tiles_per_slide`` random tiles of every usable slide.

    Slides come from ``slides.parquet`` (``status == "ok"``, cohort in
    ``cohorts`` when given); tiles from ``tiles.parquet``.  The draw depends
    only on ``seed`` and the slide id.  Returns the tiles.parquet rows plus
    ``uri`` and ``cohort``.
    """
    slides_uri, tiles_uri = join(workdir, "slides.parquet"), join(workdir, "tiles.parquet")
    for u, verb in ((slides_uri, "ingest"), (tiles_uri, "tile")):
        if not exists(u):
            raise RaypathError(f"{u} not found: run `raypath {verb} --workdir {workdir}` first")
    slides = read_parquet(slides_uri).to_pandas()
    slides = slides[slides["status"] == "ok"]
    if cohorts:
        missing = sorted(set(cohorts) - set(slides["cohort"].astype(str)))
        if missing:
            raise RaypathError(f"cohorts {missing} have no usable slides in {slides_uri}; known cohorts: {sorted(slides['cohort'].astype(str).unique())}")
        slides = slides[slides["cohort"].astype(str).isin(cohorts)]
    from raypath.wsi.tile_table import read_slide_tiles, tile_counts

    counts = tile_counts(workdir)
    ids = sorted(set(counts.index[counts > 0]) & set(slides["slide_id"].astype(str)))
    if not ids:
        raise RaypathError(f"no tiles for the selected slides in {tiles_uri}: check --cohorts and the tiling summary")
    picked = []
    for sid in ids:  # one slide's rows at a time: memory does not grow with the cohort
        grp = read_slide_tiles(workdir, sid)
        rng = np.random.default_rng(_seed_of(seed, sid))
        idx = rng.choice(len(grp), size=min(tiles_per_slide, len(grp)), replace=False)
        picked.append(grp.iloc[np.sort(idx)])
    out = pd.concat(picked, ignore_index=True)
    meta = slides[["slide_id", "uri", "cohort"]].astype({"cohort": str})
    return out.merge(meta, on="slide_id", how="left")


def _read_slide_tiles(batch: dict) -> dict:
    """Ray Data UDF: one slide's selected tiles -> rows with an ``image`` column."""
    ids_out, imgs_out, sids = [], [], []
    for sid, uri, rows in zip(batch["slide_id"], batch["uri"], batch["tiles_json"]):
        for ids, imgs in read_tiles(uri, pd.DataFrame(json.loads(rows))):
            ids_out.append(ids)
            imgs_out.append(imgs)
            sids += [sid] * len(ids)
    return {"slide_id": np.array(sids), "tile_id": np.concatenate(ids_out), "image": np.concatenate(imgs_out)}


def tiles_dataset(tiles: pd.DataFrame):
    """A materialised Ray Dataset of the selected tiles (read once, reused every epoch)."""
    import ray.data

    cols = ["tile_id", "x", "y", "level", "read_px", "tile_px"]
    items = [
        {"slide_id": sid, "uri": uri, "tiles_json": grp[cols].to_json(orient="records")}
        for (sid, uri), grp in tiles.groupby(["slide_id", "uri"], sort=False)
    ]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
    # plain tasks: no per-slide state worth an actor, and tasks start faster
    return ds.map_batches(_read_slide_tiles, batch_size=1, batch_format="numpy").materialize()


# --------------------------------------------------------------------------- models


class DINOModel(nn.Module):
    """Backbone (with its peft adapter) + DINO head, on a list of views.

    Views of the same side are concatenated into one backbone call (DINO's
    multi-crop wrapper), so DDP sees one forward per step.
    """

    def __init__(self, backbone: nn.Module, head: dino.DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # the backbone's one read-out (raypath.fm.backbone.read_out), at any view size
        return self.backbone(x)

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(views)
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            feats = self.features(torch.cat(views[start:end]))
            chunks = self.head(feats).chunk(end - start)
            out[start:end] = chunks
            start = end
        return out  # type: ignore[return-value]


def build_student(cfg: AdaptConfig, device: str | torch.device = "cpu") -> DINOModel:
    """The FM with a fresh adapter and a DINO head (trainable: adapter + head).

    The adapter is the tuning layer's (raypath.fm.tuning: targets per method and family)."""
    from raypath.fm.backbone import load_backbone
    from raypath.fm.tuning import apply_method

    bb = load_backbone(cfg.model, weights=cfg.weights, device="cpu").allow_any_input_size()
    spec = bb.spec
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        apply_method(bb, cfg.method, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.target_modules)
        dims = dino.head_dims_for(spec.embed_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_out_dim)
        head = dino.DINOHead(spec.embed_dim, dims)
    return DINOModel(bb, head).to(device)


make_teacher = dino_train.make_teacher
trainable_pairs = dino_train.trainable_pairs


# --------------------------------------------------------------------------- checkpoints


def _save_adapters(folder: str, student: DINOModel, teacher: DINOModel) -> None:
    """Both adapters in peft layout inside a checkpoint (adapter-only: the FM is never copied)."""
    teacher.backbone.model.save_pretrained(os.path.join(folder, CKPT_TEACHER))
    student.backbone.model.save_pretrained(os.path.join(folder, CKPT_STUDENT))


def _check_resumable(saved: dict, cfg: AdaptConfig, where: str) -> None:
    now = cfg.model_dump()
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        raise RaypathError(
            f"run {cfg.run!r} already exists ({where}) with different {', '.join(diff)}: "
            "pass the same settings to resume, or choose a new --run name"
        )


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete in-process checkpoint ``<run_dir>/checkpoints/epoch_NNNN``."""
    return _latest_under(join(run_dir, "checkpoints"), "epoch_")


# --------------------------------------------------------------------------- training loop


def _publish_outputs(run_dir: str, teacher: DINOModel, metrics: list[dict], cfg: AdaptConfig, extra: dict) -> None:
    """Write the teacher adapter (peft layout), metrics and info into the run folder."""
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as tmp:
        teacher.backbone.model.save_pretrained(tmp)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            atomic_write_bytes(join(run_dir, f), Path(tmp, f).read_bytes())
    from raypath.fm.registry import get_spec

    spec = get_spec(cfg.model)
    info = {
        "model": spec.key,
        "weights": cfg.weights,
        "method": cfg.method,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "target_modules": sorted(teacher.backbone.model.peft_config["default"].target_modules),
        "augmentation": aug.params_for(cfg.augmentation, cfg.strength).to_dict(),
        "epochs": len(metrics),
        "objective": "dino-v1 self-distillation; teacher adapter",
    }
    atomic_write_bytes(join(run_dir, "adapter_info.json"), json.dumps(info, indent=1).encode())
    write_parquet_atomic(pa.Table.from_pylist(metrics), join(run_dir, "metrics.parquet"))
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps({"epochs": metrics, **extra}, indent=1).encode())


def adapt_recipe(cfg: AdaptConfig, run_dir: str) -> dino_train.DinoRecipe:
    """The adapter-specific pieces of the DINO loop (:mod:`raypath.adapt.dino_train`)."""
    from raypath.fm.registry import get_spec

    return dino_train.DinoRecipe(
        cfg=cfg,
        spec=get_spec(cfg.model),
        build_student=lambda device: build_student(cfg, device),
        check_resumable=lambda saved, where: _check_resumable(saved, cfg, where),
        publish=lambda teacher, metrics, extra: _publish_outputs(run_dir, teacher, metrics, cfg, extra),
        save_models=_save_adapters,
        name="adapt",
    )


def train_loop(cfg: AdaptConfig, run_dir: str, ctx: TrainContext, images: np.ndarray | None = None, n_rows: int | None = None) -> dict:
    """Train (or resume) the adapter through ``ctx`` (see :func:`raypath.adapt.dino_train.train_loop`)."""
    return dino_train.train_loop(adapt_recipe(cfg, run_dir), ctx, images, n_rows)


def _recipe_from_dict(cfg: dict, run_dir: str) -> dino_train.DinoRecipe:
    """The recipe rebuilt on a Ray Train worker (a module-level function pickles by reference)."""
    return adapt_recipe(AdaptConfig.model_validate(cfg), run_dir)


def adapt(cfg: AdaptConfig) -> AdaptResult:
    """Train (or resume) a DoRA/LoRA adapter by DINO self-distillation.

    Returns an :class:`AdaptResult`; the adapter folder is
    ``<workdir>/adapters/<run>/`` (use it with ``raypath embed --adapter``).
    A re-run with the same ``run`` resumes from the last checkpoint; a
    finished run is not retrained.
    """
    run_dir = run_dir_of(cfg)
    if exists(join(run_dir, "config.yaml")):
        import yaml

        with filesystem_for(run_dir).open(join(run_dir, "config.yaml") if is_remote(run_dir) else strip_protocol(join(run_dir, "config.yaml"))) as f:
            saved = (yaml.safe_load(f) or {}).get("config", {})
        _check_resumable(saved, cfg, join(run_dir, "config.yaml"))
    if exists(join(run_dir, "metrics.json")) and exists(join(run_dir, "adapter_model.safetensors")):
        with filesystem_for(run_dir).open(join(run_dir, "metrics.json") if is_remote(run_dir) else strip_protocol(join(run_dir, "metrics.json"))) as f:
            doc = json.load(f)
        if doc["epochs"] and doc["epochs"][-1]["epoch"] + 1 >= cfg.epochs:
            log.info("run %s already finished (%d epochs): %s", cfg.run, cfg.epochs, run_dir)
            return AdaptResult(run_dir, run_dir, pd.DataFrame(doc["epochs"]), cfg.epochs, cfg.epochs, doc.get("n_tiles", 0), doc.get("trainable_params", 0))
    from raypath.adapt import tuning  # which slides: named explicitly, recorded in tuned_on.json

    tuning.tuning_choice(cfg)  # no silent "all": fail before anything is written
    cfg.save(run_dir)
    sel_uri = join(run_dir, "training_tiles.parquet")
    if exists(sel_uri):
        tiles = read_parquet(sel_uri).to_pandas()  # drawn once, reused on resume
    else:
        import pyarrow as pa

        tiles = tuning.select_tuning_tiles(cfg.model_copy(update={"workdir": _abs(cfg.workdir)}), sample_training_tiles)
        write_parquet_atomic(pa.Table.from_pandas(tiles, preserve_index=False), sel_uri)
    if not exists(join(run_dir, tuning.TUNED_ON_FILE)):
        tuning.write_tuned_on(run_dir, tuning.tuned_on_record(cfg, tiles, _abs(cfg.workdir)))
    log.info("adapt %s: %d tiles from %d slides", cfg.run, len(tiles), tiles["slide_id"].nunique())

    if cfg.num_workers == 0:
        ctx = LocalContext(join(run_dir, "checkpoints"), device=cfg.device, amp=cfg.amp, keep=KEEP_CHECKPOINTS)
        out = train_loop(cfg, run_dir, ctx, images=load_tile_images(tiles))
    else:
        out = _fit_ray(cfg, tiles, run_dir)
    metrics = pd.DataFrame(out["metrics"])
    from raypath.report.tracking import track_adapt

    track_adapt(cfg, run_dir, metrics)  # MLflow run, from the driver (RAYPATH_TRACKING=off to skip)
    return AdaptResult(run_dir, run_dir, metrics, out["start_epoch"], len(metrics), out["n_tiles"], out["trainable_params"])


def _fit_ray(cfg: AdaptConfig, tiles: pd.DataFrame, run_dir: str) -> dict:
    from raypath.io.ray_env import ensure_ray
    from raypath.train.launch import resolve_use_gpu

    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu, cfg.num_workers)  # before reading tiles: fail fast
    return dino_train.fit_on_ray(_recipe_from_dict, cfg, tiles_dataset(tiles), run_dir, use_gpu, keep=KEEP_CHECKPOINTS)


# --------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="DoRA/LoRA-tune a foundation model by DINO self-distillation under strong augmentation",
        description=(
            "Writes <workdir>/adapters/<run>/ (teacher adapter in peft layout, config.yaml, metrics). "
            "Re-running with the same --run resumes from the last checkpoint. "
            "Use the result with `raypath embed --adapter <workdir>/adapters/<run>`."
        ),
    )
    add_config_arguments(p, AdaptConfig)

    def run(args: argparse.Namespace) -> int:
        cfg = config_from_args(AdaptConfig, args)
        res = adapt(cfg)
        last = res.metrics.iloc[-1] if len(res.metrics) else None
        print(f"adapter: {res.adapter_dir}")
        if last is not None:
            print(f"epochs: {res.epochs_completed}  loss: {last['loss']:.4f}  teacher entropy: {last['teacher_entropy']:.3f}")
        return 0

    p.set_defaults(func=run)
