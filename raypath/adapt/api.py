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
import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
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
from raypath.adapt import dino
from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, exists, filesystem_for, is_remote, join, read_parquet, strip_protocol, write_parquet_atomic

log = logging.getLogger(__name__)

#: Files of one checkpoint (a folder): peft layout of both adapters + the rest.
CKPT_TEACHER = "teacher"
CKPT_STUDENT = "student"
CKPT_TENSORS = "dino_state.safetensors"  # heads of student and teacher, centre
CKPT_STATE = "train_state.pt"  # optimiser state, epoch, metrics so far
CKPT_DONE = "COMPLETE"  # written last: a folder without it is ignored
KEEP_CHECKPOINTS = 2
#: Config fields that may differ between a run and its resumption.
_RESUMABLE_CHANGES = {"workdir", "epochs", "num_workers", "use_gpu", "checkpoint_every_epochs", "device", "stop_after_epochs", "batch_size"}


class AdaptConfig(StageConfig):
    """Parameters of ``raypath adapt`` (defaults = the paper's, METHODS.md §1)."""

    workdir: str = Field(..., description="project folder with slides.parquet and tiles.parquet (local or s3://)")
    model: str = Field("phikon", description="registry key of the foundation model")
    weights: str | None = Field(None, description="weights file/folder; default: HF cache/hub ('random' for tiny test models)")
    method: Literal["dora", "lora"] = Field("dora", description="adapter type")
    rank: int = Field(16, ge=1, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="adapter scaling alpha (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="adapter dropout")
    target_modules: list[str] | None = Field(None, description="module-name suffixes to adapt; default: the model spec's")
    augmentation: Literal["weak", "strong", "heavy", "max"] = Field("heavy", description="augmentation level")
    strength: float | None = Field(None, ge=0, le=1, description="continuous augmentation strength in [0,1] (wins over --augmentation)")
    n_local_crops: int = Field(8, ge=0, description="local crops per tile (plus 2 global)")
    epochs: int = Field(100, ge=1)
    warmup_epochs: int = Field(10, ge=0, description="linear lr warm-up epochs (capped at epochs-1)")
    lr: float = Field(5e-4, gt=0, description="peak lr at a global batch of 256 (scaled linearly with the batch)")
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="teacher EMA momentum at the start (cosine to 1)")
    teacher_temp: float = Field(0.04, gt=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    clip_grad: float = Field(3.0, ge=0, description="per-parameter gradient norm clip (0 = off)")
    freeze_last_layer_epochs: int = Field(1, ge=0, description="epochs with the DINO head's last layer frozen")
    head_hidden_dim: int | None = Field(None, description="DINO head hidden width (default 2048; scaled down for tiny models)")
    head_bottleneck_dim: int | None = Field(None, description="DINO head bottleneck (default 256)")
    head_out_dim: int | None = Field(None, description="DINO head prototypes (default 65536)")
    batch_size: int = Field(32, ge=1, description="tiles per step per worker")
    tiles_per_slide: int = Field(10, ge=1, description="random tiles per slide, drawn once")
    cohorts: list[str] | None = Field(None, description="cohorts to tune on (default: all)")
    num_workers: int = Field(0, ge=0, description="0 = train in this process; >= 1 = Ray Train DDP workers")
    use_gpu: bool | None = Field(None, description="Ray workers use GPUs (default: if the cluster has them)")
    device: str = Field("auto", description="in-process device: auto, cpu, cuda")
    checkpoint_every_epochs: int = Field(1, ge=1)
    run: str = Field("dora", description="run name: outputs in <workdir>/adapters/<run>/; the same name resumes")
    seed: int = 0
    stop_after_epochs: int | None = Field(None, description="testing aid: stop as if killed after this many epochs (checkpoint first)")


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


class SimulatedKill(RuntimeError):
    """Raised by ``stop_after_epochs`` to test resumption."""


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


def _enable_dynamic_img_size(model: nn.Module) -> bool:
    """Let a timm ViT take any input side that is a multiple of its patch
    size (local crops are smaller than global ones); position embeddings are
    interpolated per call, as timm does with ``dynamic_img_size=True``."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "dynamic_img_size"):
        return False
    if not model.dynamic_img_size:
        from timm.layers import Format

        model.dynamic_img_size = True
        pe.strict_img_size = False
        pe.flatten = False
        pe.output_fmt = Format.NHWC
    return True


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
        bb = self.backbone
        if bb.spec.family == "hf_vit":
            t = bb.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            if bb.spec.readout == "cls":
                return t[:, 0]
            return torch.cat([t[:, 0], t[:, bb.spec.num_prefix_tokens :].mean(1)], -1)
        return bb(x)

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


def peft_config(cfg: AdaptConfig, spec) -> Any:
    from peft import LoraConfig

    targets = list(cfg.target_modules or spec.adapter_targets)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none", use_dora=cfg.method == "dora")


def build_student(cfg: AdaptConfig, device: str | torch.device = "cpu") -> DINOModel:
    """The FM with a fresh adapter and a DINO head (trainable: adapter + head)."""
    from peft import get_peft_model

    from raypath.fm.backbone import load_backbone

    bb = load_backbone(cfg.model, weights=cfg.weights, device="cpu")
    spec = bb.spec
    if spec.family == "timm":
        _enable_dynamic_img_size(bb.model)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        try:
            bb.model = get_peft_model(bb.model, peft_config(cfg, spec))
        except ValueError as e:
            raise RaypathError(f"adapter target modules {cfg.target_modules or spec.adapter_targets} do not fit model {spec.key!r}: {e}; pass --target-modules with names of its linear layers") from e
        dims = dino.head_dims_for(spec.embed_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_out_dim)
        head = dino.DINOHead(spec.embed_dim, dims)
    return DINOModel(bb, head).to(device)


def make_teacher(student: DINOModel) -> DINOModel:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def trainable_pairs(student: DINOModel, teacher: DINOModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matching (student, teacher) parameters that the EMA moves: the
    adapters and the head (the frozen FM weights are identical in both)."""
    t_params = dict(teacher.named_parameters())
    s, t = [], []
    for n, p in student.named_parameters():
        if p.requires_grad:
            s.append(p)
            t.append(t_params[n])
    return s, t


def _dino_state(student: DINOModel, teacher: DINOModel, loss: dino.DINOLoss) -> dict[str, torch.Tensor]:
    """The trainable state of both models + the centre, as one flat dict."""
    state = {"center": loss.center.detach().cpu().contiguous()}
    tp = dict(teacher.named_parameters())
    for n, p in student.named_parameters():
        if p.requires_grad:
            state[f"student.{n}"] = p.detach().cpu().contiguous()
            state[f"teacher.{n}"] = tp[n].detach().cpu().contiguous()
    return state


def _load_dino_state(state: dict[str, torch.Tensor], student: DINOModel, teacher: DINOModel, loss: dino.DINOLoss) -> None:
    tp = dict(teacher.named_parameters())
    with torch.no_grad():
        loss.center.copy_(state["center"])
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.copy_(state[f"student.{n}"])
                tp[n].copy_(state[f"teacher.{n}"])


# --------------------------------------------------------------------------- checkpoints


def write_checkpoint(local_dir: str, cfg: AdaptConfig, student: DINOModel, teacher: DINOModel, loss: dino.DINOLoss, optimizer, epoch: int, metrics: list[dict]) -> None:
    """Write an adapter-only checkpoint after ``epoch`` completed epochs into a local folder."""
    from safetensors.torch import save_file

    os.makedirs(local_dir, exist_ok=True)
    teacher.backbone.model.save_pretrained(os.path.join(local_dir, CKPT_TEACHER))
    student.backbone.model.save_pretrained(os.path.join(local_dir, CKPT_STUDENT))
    save_file(_dino_state(student, teacher, loss), os.path.join(local_dir, CKPT_TENSORS))
    torch.save({"epoch": int(epoch), "optimizer": optimizer.state_dict(), "metrics": metrics, "config": cfg.model_dump_json()}, os.path.join(local_dir, CKPT_STATE))
    Path(local_dir, CKPT_DONE).write_text(str(epoch))


def read_checkpoint(local_dir: str, cfg: AdaptConfig, student: DINOModel, teacher: DINOModel, loss: dino.DINOLoss, optimizer, where: str = "") -> tuple[int, list[dict]]:
    """Restore from a checkpoint folder after checking it was made with
    compatible settings; returns (epochs completed, metrics so far)."""
    from safetensors.torch import load_file

    st = torch.load(os.path.join(local_dir, CKPT_STATE), map_location="cpu", weights_only=True)
    _check_resumable(json.loads(st["config"]), cfg, where or local_dir)
    _load_dino_state(load_file(os.path.join(local_dir, CKPT_TENSORS)), student, teacher, loss)
    optimizer.load_state_dict(st["optimizer"])
    return int(st["epoch"]), list(st["metrics"])


def _check_resumable(saved: dict, cfg: AdaptConfig, where: str) -> None:
    now = cfg.model_dump()
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        raise RaypathError(
            f"run {cfg.run!r} already exists ({where}) with different {', '.join(diff)}: "
            "pass the same settings to resume, or choose a new --run name"
        )


def _upload_dir(local_dir: str, dest: str) -> None:
    for root, _, files in os.walk(local_dir):
        for f in sorted(files, key=lambda n: n == CKPT_DONE):  # COMPLETE last
            p = os.path.join(root, f)
            rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
            atomic_write_bytes(join(dest, rel), Path(p).read_bytes())


def _download_dir(src: str, local_dir: str) -> None:
    fs = filesystem_for(src)
    base = src if is_remote(src) else strip_protocol(src)
    for p in fs.find(base):
        rel = p[len(strip_protocol(base)) :].lstrip("/") if is_remote(src) else os.path.relpath(p, base)
        dst = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with fs.open(p, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo)


def _checkpoint_names(run_dir: str) -> tuple[object, str, list[str]]:
    root = join(run_dir, "checkpoints")
    fs = filesystem_for(root)
    base = root if is_remote(root) else strip_protocol(root)
    if not fs.exists(base):
        return fs, base, []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    return fs, base, [n for n in names if n.startswith("epoch_")]


def _prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (a DINO head with 65536
    prototypes makes each one a few hundred MB)."""
    fs, base, names = _checkpoint_names(run_dir)
    for name in names[:-keep] if keep > 0 else []:
        fs.rm(f"{base}/{name}", recursive=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete in-process checkpoint ``<run_dir>/checkpoints/epoch_NNNN``."""
    fs, base, names = _checkpoint_names(run_dir)
    for name in reversed(names):
        if fs.exists(f"{base}/{name}/{CKPT_DONE}"):
            return join(run_dir, "checkpoints", name)
    return None


# --------------------------------------------------------------------------- training loop


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    ray: bool = False


def _all_reduce_mean(x: float) -> float:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t.item()) / tdist.get_world_size()
    return x


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
        "target_modules": list(cfg.target_modules or spec.adapter_targets),
        "augmentation": aug.params_for(cfg.augmentation, cfg.strength).to_dict(),
        "epochs": len(metrics),
        "objective": "dino-v1 self-distillation; teacher adapter",
    }
    atomic_write_bytes(join(run_dir, "adapter_info.json"), json.dumps(info, indent=1).encode())
    write_parquet_atomic(pa.Table.from_pylist(metrics), join(run_dir, "metrics.parquet"))
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps({"epochs": metrics, **extra}, indent=1).encode())


def train_loop(cfg: AdaptConfig, images: np.ndarray | None, run_dir: str, dist_info: _Dist, device: torch.device, n_rows: int | None = None) -> dict:
    """The DINO loop shared by the in-process and the Ray Train paths.

    ``images`` is the uint8 tile array in process; under Ray it is ``None``
    and batches come from ``ray.train.get_dataset_shard("train")`` (which
    holds ``n_rows`` rows in all, split equally between the workers).
    """
    from raypath.fm.registry import get_spec

    spec = get_spec(cfg.model)
    gpx, lpx = aug.crop_sizes(spec.img_size, spec.patch_size)
    mc = aug.MultiCrop(aug.params_for(cfg.augmentation, cfg.strength), gpx, lpx, spec.mean, spec.std, n_global=2, n_local=cfg.n_local_crops)

    student = build_student(cfg, device)
    teacher = make_teacher(student)
    s_params, t_params = trainable_pairs(student, teacher)
    n_trainable = sum(p.numel() for p in s_params)
    loss_fn = dino.DINOLoss(student.head.last_layer.weight.shape[0], 2, cfg.teacher_temp, cfg.student_temp, cfg.center_momentum).to(device)
    opt = torch.optim.AdamW(dino.param_groups(student))

    # ---- resume
    start_epoch, metrics = 0, []
    if dist_info.ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start_epoch, metrics = read_checkpoint(d, cfg, student, teacher, loss_fn, opt, "Ray Train checkpoint")
    else:
        last = latest_checkpoint(run_dir)
        if last is not None:
            with tempfile.TemporaryDirectory() as d:
                _download_dir(last, d)
                start_epoch, metrics = read_checkpoint(d, cfg, student, teacher, loss_fn, opt, last)
    if start_epoch:
        log.info("run %s: resuming after epoch %d", cfg.run, start_epoch)

    model = student
    if dist_info.ray and dist_info.world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(student, move_to_device=False)

    # ---- data and schedules
    if images is not None:
        n_rows = len(images)
    else:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        n_rows = int(n_rows or 0)
    n_rows_per_worker = n_rows // dist_info.world
    steps = max(1, math.ceil(n_rows_per_worker / cfg.batch_size))
    total = cfg.epochs * steps
    global_batch = cfg.batch_size * dist_info.world
    lr_sched = dino.cosine_schedule(dino.lr_for_batch(cfg.lr, global_batch), cfg.min_lr, total, min(cfg.warmup_epochs, cfg.epochs - 1) * steps)
    wd_sched = dino.cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
    mom_sched = dino.cosine_schedule(cfg.momentum_teacher, 1.0, total)
    last_layer = dino.last_layer_params(student.head)
    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        # per-epoch seeds: a resumed run draws exactly what an uninterrupted one would
        torch.manual_seed(_seed_of(cfg.seed, "dropout", epoch, dist_info.rank))
        if images is not None:
            order = np.random.default_rng(_seed_of(cfg.seed, "order", epoch)).permutation(len(images))
            batches = (images[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]] for i in range(steps))
        else:
            batches = (
                b["image"]
                for b in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", local_shuffle_buffer_size=min(4 * cfg.batch_size, 1024), local_shuffle_seed=_seed_of(cfg.seed, "order", epoch, dist_info.rank))
            )
        student.train()
        sums = {"loss": 0.0, "teacher_entropy": 0.0, "grad_norm_max": 0.0}
        n_done = 0
        for it, batch in enumerate(batches):
            if it >= steps:
                break  # DDP ranks must take the same number of steps
            step = epoch * steps + it
            dino.set_schedules(opt, float(lr_sched[step]), float(wd_sched[step]))
            gen = torch.Generator().manual_seed(_seed_of(cfg.seed, "aug", epoch, it, dist_info.rank))
            views = mc(torch.as_tensor(np.ascontiguousarray(batch)), gen, device=device)
            with amp():
                with torch.no_grad():
                    t_out = teacher(views[:2])
                s_out = model(views)
                loss = loss_fn([s.float() for s in s_out], [t.float() for t in t_out])
            if not torch.isfinite(loss):
                raise RaypathError(f"DINO loss is {float(loss)} at epoch {epoch} step {it}: lower --lr or raise --warmup-epochs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gmax = dino.clip_gradients(s_params, cfg.clip_grad) if cfg.clip_grad > 0 else 0.0
            if epoch < cfg.freeze_last_layer_epochs:
                for p in last_layer:
                    p.grad = None
            opt.step()
            dino.ema_update(t_params, s_params, float(mom_sched[step]))
            sums["loss"] += float(loss.detach())
            sums["teacher_entropy"] += dino.teacher_entropy(loss_fn, t_out)
            sums["grad_norm_max"] = max(sums["grad_norm_max"], gmax)
            n_done += 1
        row = {
            "epoch": epoch,
            "loss": _all_reduce_mean(sums["loss"] / max(1, n_done)),
            "teacher_entropy": _all_reduce_mean(sums["teacher_entropy"] / max(1, n_done)),
            "center_norm": float(loss_fn.center.norm()),
            "lr": float(lr_sched[min(step, total - 1)]) if n_done else float("nan"),
            "weight_decay": float(wd_sched[min(step, total - 1)]) if n_done else float("nan"),
            "momentum": float(mom_sched[min(step, total - 1)]) if n_done else float("nan"),
            "grad_norm_max": sums["grad_norm_max"],
            "steps": n_done,
            "epoch_s": time.time() - t0,
        }
        metrics.append(row)
        if n_done and row["teacher_entropy"] > 0.98 * math.log(loss_fn.center.shape[1]):
            # centring won over sharpening: the teacher is uniform and the loss carries no signal
            log.warning("adapt %s epoch %d: teacher entropy %.3f ~ log(out_dim) = %.3f: DINO has collapsed to the uniform "
                        "distribution; lower --lr or raise --warmup-epochs", cfg.run, epoch + 1, row["teacher_entropy"],
                        math.log(loss_fn.center.shape[1]))
        log.info("adapt %s epoch %d/%d loss %.4f teacher entropy %.3f (%.1f s)", cfg.run, epoch + 1, cfg.epochs, row["loss"], row["teacher_entropy"], row["epoch_s"])
        done = epoch + 1
        want_ckpt = done % cfg.checkpoint_every_epochs == 0 or done == cfg.epochs or done == cfg.stop_after_epochs
        if dist_info.ray:
            import ray.train

            if want_ckpt and dist_info.rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    write_checkpoint(d, cfg, student, teacher, loss_fn, opt, done, metrics)
                    ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(row)  # a barrier: every rank reports
        elif want_ckpt:
            with tempfile.TemporaryDirectory() as d:
                write_checkpoint(d, cfg, student, teacher, loss_fn, opt, done, metrics)
                dest = join(run_dir, "checkpoints", f"epoch_{done:04d}")
                if is_remote(dest):
                    _upload_dir(d, dest)
                else:
                    if os.path.exists(dest):
                        shutil.rmtree(dest)
                    shutil.copytree(d, dest)
                _prune_checkpoints(run_dir, keep=KEEP_CHECKPOINTS)
        if cfg.stop_after_epochs is not None and done >= cfg.stop_after_epochs and done < cfg.epochs:
            raise SimulatedKill(f"stopped after epoch {done} (stop_after_epochs)")

    extra = {"start_epoch": start_epoch, "trainable_params": n_trainable, "n_tiles": int(n_rows_per_worker * dist_info.world), "world_size": dist_info.world}
    if dist_info.rank == 0:
        _publish_outputs(run_dir, teacher, metrics, cfg, extra)
    return {"metrics": metrics, **extra}


def _ray_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    cfg = AdaptConfig.model_validate(config["cfg"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    dist_info = _Dist(ctx.get_world_rank(), ctx.get_world_size(), True)
    return train_loop(cfg, None, config["run_dir"], dist_info, ray.train.torch.get_device(), n_rows=int(config["n_rows"]))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    cfg.save(run_dir)
    sel_uri = join(run_dir, "training_tiles.parquet")
    if exists(sel_uri):
        tiles = read_parquet(sel_uri).to_pandas()  # drawn once, reused on resume
    else:
        import pyarrow as pa

        tiles = sample_training_tiles(_abs(cfg.workdir), cfg.tiles_per_slide, cfg.cohorts, cfg.seed)
        write_parquet_atomic(pa.Table.from_pandas(tiles, preserve_index=False), sel_uri)
    log.info("adapt %s: %d tiles from %d slides", cfg.run, len(tiles), tiles["slide_id"].nunique())

    if cfg.num_workers == 0:
        images = load_tile_images(tiles)
        out = train_loop(cfg, images, run_dir, _Dist(), _resolve_device(cfg.device))
    else:
        out = _fit_ray(cfg, tiles, run_dir)
    metrics = pd.DataFrame(out["metrics"])
    return AdaptResult(run_dir, run_dir, metrics, out["start_epoch"], len(metrics), out["n_tiles"], out["trainable_params"])


def _fit_ray(cfg: AdaptConfig, tiles: pd.DataFrame, run_dir: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raypath.io.ray_env import cluster_cpus, cluster_gpus, ensure_ray

    ensure_ray()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() >= cfg.num_workers
    if use_gpu and cluster_gpus() < 1:
        raise RaypathError("--use-gpu was given but the Ray cluster has no GPUs: drop the flag or add GPU workers")
    ds = tiles_dataset(tiles)
    n_rows = ds.count()
    storage = join(run_dir, "ray")
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg.model_dump(), "run_dir": run_dir, "n_rows": n_rows, "threads": max(1, int(cluster_cpus() // max(1, cfg.num_workers)))},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name="train", storage_path=storage, checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)),
        datasets={"train": ds},
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, RaypathError):
            raise cause from e
        if "SimulatedKill" in repr(e):
            raise SimulatedKill(str(e)) from e
        raise
    return result.return_value


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

    # the before/after experiment lives in its own module; cli.py lists only this one
    from raypath.adapt.experiment import add_cli as add_experiment_cli

    add_experiment_cli(sub)
