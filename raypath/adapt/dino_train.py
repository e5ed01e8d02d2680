"""The DINO self-distillation loop shared by ``raypath adapt`` and ``raypath pretrain``.

What differs between tuning an adapter on a foundation model and training a
small ViT from scratch is given as a :class:`DinoRecipe` (how the student is
built, what a checkpoint adds, what the run publishes); the rest -- multi-crop
views, student/teacher forward, DINO loss with centring, schedules, gradient
clipping, the frozen last layer in the first epochs, teacher EMA, per-epoch
metrics, checkpoints and resume -- is this one loop, run through a training
context (:mod:`raypath.train.context`): in process, on Ray Train workers
(DDP) or in a Tune trial alike.

Checkpoints hold the *trainable* state of student and teacher
(``dino_state.safetensors``: the adapter + head for ``adapt``, adapter-only;
every weight for ``pretrain``, full) and ``train_state.pt`` (optimiser,
epoch, metrics so far, the config for the resumability check).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from raypath.adapt import augment as aug
from raypath.adapt import dino
from raypath.config import StageConfig
from raypath.errors import RaypathError
from raypath.train.context import SimulatedKill, TrainContext
from raypath.train.precision import AMP_HELP

log = logging.getLogger(__name__)

CKPT_TENSORS = "dino_state.safetensors"  # trainable weights of student and teacher, centre
CKPT_STATE = "train_state.pt"  # optimiser state, epoch, metrics so far, config


class DinoSettings(StageConfig):
    """The DINO v1 settings shared by ``raypath adapt`` (an adapter on a frozen FM)
    and ``raypath pretrain`` (a small ViT from scratch): the loop below reads them.
    Defaults are the DoRA paper's (METHODS.md §1); a subclass overrides sizes."""

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
    head_hidden_dim: int | None = Field(None, description="DINO head hidden width (default 2048; 4 x width for small models)")
    head_bottleneck_dim: int | None = Field(None, description="DINO head bottleneck (default 256; the width for small models)")
    head_out_dim: int | None = Field(None, description="DINO head prototypes (default 65536; 8 x hidden for small models)")
    batch_size: int = Field(32, ge=1, description="tiles per step per worker")
    tiles_per_slide: int = Field(10, ge=1, description="random tiles per slide, drawn once")
    num_workers: int = Field(0, ge=0, description="0 = train in this process; >= 1 = Ray Train DDP workers")
    use_gpu: bool | None = Field(None, description="Ray workers use GPUs (default: if the cluster has them)")
    device: str = Field("auto", description="in-process device: auto, cpu, cuda")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description=AMP_HELP)
    checkpoint_every_epochs: int = Field(1, ge=1)
    seed: int = Field(0, description="seed of the tile draw, crops, dropout (and a from-scratch init)")
    stop_after_epochs: int | None = Field(None, description="testing aid: stop as if killed after this many epochs (checkpoint first)")


def seed_of(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and runs)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


@dataclass
class DinoRecipe:
    """What a DINO run needs besides the loop.

    Attributes
    ----------
    cfg
        A config with the DINO fields of :class:`raypath.adapt.api.AdaptConfig`
        (``epochs, lr, batch_size, augmentation, n_local_crops, teacher_temp, ...``).
    spec
        The model spec (input side, patch size, normalisation).
    build_student
        ``device -> model``: forward takes a list of views, ``.head`` is the :class:`dino.DINOHead`.
    check_resumable
        ``(saved config dict, where)``: raise if the checkpoint was made with other settings.
    publish
        ``(teacher, metrics, extra)``: write the run's outputs (rank 0, after the last epoch).
    save_models
        Optional ``(folder, student, teacher)``: extra files in every checkpoint.
    """

    cfg: Any
    spec: Any
    build_student: Callable[[torch.device], nn.Module]
    check_resumable: Callable[[dict, str], None]
    publish: Callable[[nn.Module, list, dict], None]
    save_models: Callable[[str, nn.Module, nn.Module], None] | None = None
    name: str = "adapt"


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def trainable_pairs(student: nn.Module, teacher: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matching (student, teacher) parameters that the EMA moves: the trainable
    ones (adapters and head; everything when training from scratch)."""
    t_params = dict(teacher.named_parameters())
    s, t = [], []
    for n, p in student.named_parameters():
        if p.requires_grad:
            s.append(p)
            t.append(t_params[n])
    return s, t


def dino_state(student: nn.Module, teacher: nn.Module, loss: dino.DINOLoss) -> dict[str, torch.Tensor]:
    """The trainable state of both models + the centre, as one flat dict."""
    state = {"center": loss.center.detach().cpu().contiguous()}
    tp = dict(teacher.named_parameters())
    for n, p in student.named_parameters():
        if p.requires_grad:
            state[f"student.{n}"] = p.detach().cpu().contiguous()
            state[f"teacher.{n}"] = tp[n].detach().cpu().contiguous()
    return state


def load_dino_state(state: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module, loss: dino.DINOLoss) -> None:
    tp = dict(teacher.named_parameters())
    with torch.no_grad():
        loss.center.copy_(state["center"])
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.copy_(state[f"student.{n}"])
                tp[n].copy_(state[f"teacher.{n}"])


def check_resumable(saved: dict, now: dict, run: str, where: str, may_change: set[str] | frozenset[str]) -> None:
    """Raise unless a saved config equals ``now`` on every field outside ``may_change``."""
    diff = sorted(k for k in now if k not in may_change and saved.get(k) != now[k])
    if diff:
        raise RaypathError(
            f"run {run!r} already exists ({where}) with different {', '.join(diff)}: "
            "pass the same settings to resume, or choose a new --run name"
        )


# --------------------------------------------------------------------------- one run


@dataclass
class _Run:
    """The models, optimiser and per-step schedules of one DINO run."""

    student: nn.Module
    teacher: nn.Module
    model: nn.Module  # the student as the context prepared it (DDP-wrapped with > 1 worker)
    loss_fn: dino.DINOLoss
    opt: torch.optim.Optimizer
    mc: Any
    s_params: list = field(default_factory=list)
    t_params: list = field(default_factory=list)
    last_layer: list = field(default_factory=list)
    steps: int = 1  # per epoch and worker
    sched: dict[str, np.ndarray] = field(default_factory=dict)


def _build(recipe: DinoRecipe, ctx: TrainContext) -> _Run:
    cfg, spec = recipe.cfg, recipe.spec
    gpx, lpx = aug.crop_sizes(spec.img_size, spec.patch_size)
    mc = aug.MultiCrop(aug.params_for(cfg.augmentation, cfg.strength), gpx, lpx, spec.mean, spec.std,
                       n_global=2, n_local=cfg.n_local_crops)
    student = recipe.build_student(ctx.device)
    teacher = make_teacher(student)
    s_params, t_params = trainable_pairs(student, teacher)
    loss_fn = dino.DINOLoss(student.head.last_layer.weight.shape[0], 2, cfg.teacher_temp, cfg.student_temp,
                            cfg.center_momentum).to(ctx.device)
    opt = torch.optim.AdamW(dino.param_groups(student))
    return _Run(student, teacher, student, loss_fn, opt, mc, s_params, t_params, dino.last_layer_params(student.head))


def _schedules(cfg, run: _Run, n_rows_per_worker: int, world_size: int) -> None:
    run.steps = max(1, math.ceil(n_rows_per_worker / cfg.batch_size))
    total = cfg.epochs * run.steps
    lr = dino.lr_for_batch(cfg.lr, cfg.batch_size * world_size)
    run.sched = {
        "lr": dino.cosine_schedule(lr, cfg.min_lr, total, min(cfg.warmup_epochs, cfg.epochs - 1) * run.steps),
        "weight_decay": dino.cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total),
        "momentum": dino.cosine_schedule(cfg.momentum_teacher, 1.0, total),
    }


def _read_checkpoint(folder: str, recipe: DinoRecipe, run: _Run, ctx: TrainContext) -> tuple[int, list[dict]]:
    """Restore from a checkpoint folder after checking it was made with
    compatible settings; returns (epochs completed, metrics so far)."""
    import json

    from safetensors.torch import load_file

    st = torch.load(os.path.join(folder, CKPT_STATE), map_location="cpu", weights_only=True)
    recipe.check_resumable(json.loads(st["config"]), ctx.restored_from or folder)
    load_dino_state(load_file(os.path.join(folder, CKPT_TENSORS)), run.student, run.teacher, run.loss_fn)
    run.opt.load_state_dict(st["optimizer"])
    ctx.load_amp_state(st)
    return int(st["epoch"]), list(st["metrics"])


def _checkpoint_writer(recipe: DinoRecipe, run: _Run, ctx: TrainContext, epoch: int, metrics: list[dict]) -> Callable[[str], None]:
    def write(folder: str) -> None:
        from safetensors.torch import save_file

        if recipe.save_models is not None:
            recipe.save_models(folder, run.student, run.teacher)
        save_file(dino_state(run.student, run.teacher, run.loss_fn), os.path.join(folder, CKPT_TENSORS))
        torch.save({"epoch": int(epoch), "optimizer": run.opt.state_dict(), "metrics": metrics,
                    "config": recipe.cfg.model_dump_json(), **ctx.amp_state()}, os.path.join(folder, CKPT_STATE))

    return write


# --------------------------------------------------------------------------- epochs and steps


def _batches(cfg, ctx: TrainContext, images: np.ndarray | None, shard, epoch: int, steps: int) -> Iterator[np.ndarray]:
    if images is not None:
        order = np.random.default_rng(seed_of(cfg.seed, "order", epoch)).permutation(len(images))
        return (images[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]] for i in range(steps))
    return (
        b["image"]
        for b in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=min(4 * cfg.batch_size, 1024),
                                    local_shuffle_seed=seed_of(cfg.seed, "order", epoch, ctx.rank))
    )


def _step(cfg, run: _Run, ctx: TrainContext, batch: np.ndarray, epoch: int, it: int) -> tuple[float, float, float]:
    """One optimisation step; returns (loss, teacher entropy, largest gradient norm)."""
    step = epoch * run.steps + it
    dino.set_schedules(run.opt, float(run.sched["lr"][step]), float(run.sched["weight_decay"][step]))
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "aug", epoch, it, ctx.rank))
    views = run.mc(torch.as_tensor(np.ascontiguousarray(batch)), gen, device=ctx.device)
    with ctx.autocast():
        with torch.no_grad():
            t_out = run.teacher(views[:2])
        s_out = run.model(views)
        loss = run.loss_fn([s.float() for s in s_out], [t.float() for t in t_out])
    if not torch.isfinite(loss):
        raise RaypathError(f"DINO loss is {float(loss)} at epoch {epoch} step {it}: lower --lr or raise --warmup-epochs")

    def clip_and_freeze() -> float:
        gmax = dino.clip_gradients(run.s_params, cfg.clip_grad) if cfg.clip_grad > 0 else 0.0
        if epoch < cfg.freeze_last_layer_epochs:
            for p in run.last_layer:
                p.grad = None
        return gmax

    run.opt.zero_grad(set_to_none=True)
    ctx.backward(loss)
    gmax = ctx.step(run.opt, before_step=clip_and_freeze)
    dino.ema_update(run.t_params, run.s_params, float(run.sched["momentum"][step]))
    return float(loss.detach()), dino.teacher_entropy(run.loss_fn, t_out), gmax


def _epoch(recipe: DinoRecipe, run: _Run, ctx: TrainContext, batches: Iterator[np.ndarray], epoch: int) -> dict:
    """Train one epoch; returns its metrics row (means over the ranks)."""
    cfg = recipe.cfg
    t0 = time.time()
    # per-epoch seeds: a resumed run draws exactly what an uninterrupted one would
    torch.manual_seed(seed_of(cfg.seed, "dropout", epoch, ctx.rank))
    run.student.train()
    sums = {"loss": 0.0, "teacher_entropy": 0.0, "grad_norm_max": 0.0}
    n_done = 0
    for it, batch in enumerate(batches):
        if it >= run.steps:
            break  # DDP ranks must take the same number of steps
        loss, ent, gmax = _step(cfg, run, ctx, batch, epoch, it)
        sums["loss"] += loss
        sums["teacher_entropy"] += ent
        sums["grad_norm_max"] = max(sums["grad_norm_max"], gmax)
        n_done += 1
    last = min(epoch * run.steps + n_done - 1, cfg.epochs * run.steps - 1)
    row = {
        "epoch": epoch,
        "loss": ctx.all_reduce_mean(sums["loss"] / max(1, n_done)),
        "teacher_entropy": ctx.all_reduce_mean(sums["teacher_entropy"] / max(1, n_done)),
        "center_norm": float(run.loss_fn.center.norm()),
        **{k: float(v[last]) if n_done else float("nan") for k, v in run.sched.items()},
        "grad_norm_max": sums["grad_norm_max"],
        "steps": n_done,
        "epoch_s": time.time() - t0,
    }
    _log_epoch(recipe, run, row, n_done)
    return row


def _log_epoch(recipe: DinoRecipe, run: _Run, row: dict, n_done: int) -> None:
    cfg, out_dim = recipe.cfg, run.loss_fn.center.shape[1]
    if n_done and row["teacher_entropy"] > 0.98 * math.log(out_dim):
        # centring won over sharpening: the teacher is uniform and the loss carries no signal
        log.warning("%s %s epoch %d: teacher entropy %.3f ~ log(out_dim) = %.3f: DINO has collapsed to the uniform "
                    "distribution; lower --lr or raise --warmup-epochs", recipe.name, cfg.run, row["epoch"] + 1,
                    row["teacher_entropy"], math.log(out_dim))
    from raypath.io.progress import format_duration

    eta = format_duration((cfg.epochs - row["epoch"] - 1) * row["epoch_s"])  # the progress line of every DINO run
    log.info("%s %s: epoch %d/%d, %.1f s/epoch, ETA %s; loss %.4f, teacher entropy %.3f", recipe.name, cfg.run,
             row["epoch"] + 1, cfg.epochs, row["epoch_s"], eta, row["loss"], row["teacher_entropy"])


def train_loop(recipe: DinoRecipe, ctx: TrainContext, images: np.ndarray | None = None, n_rows: int | None = None) -> dict:
    """Train (or resume) a DINO run through ``ctx``.

    ``images``: the uint8 tile array in process; ``None`` under Ray Train,
    where batches come from ``ctx.dataset_shard("train")`` (``n_rows`` rows
    in all, split equally between the workers).  Returns ``{"metrics": rows,
    "start_epoch", "trainable_params", "n_tiles", "world_size"}``; rank 0
    calls ``recipe.publish`` at the end.
    """
    cfg = recipe.cfg
    run = _build(recipe, ctx)
    restored = ctx.restore(read=lambda d: _read_checkpoint(d, recipe, run, ctx))
    start_epoch, metrics = restored if restored is not None else (0, [])
    if start_epoch:
        log.info("run %s: resuming after epoch %d", cfg.run, start_epoch)
    run.model = ctx.prepare(run.student)
    shard = ctx.dataset_shard("train") if images is None else None
    n_rows_per_worker = (len(images) if images is not None else int(n_rows or 0)) // ctx.world_size
    _schedules(cfg, run, n_rows_per_worker, ctx.world_size)
    for epoch in range(start_epoch, cfg.epochs):
        row = _epoch(recipe, run, ctx, _batches(cfg, ctx, images, shard, epoch, run.steps), epoch)
        metrics.append(row)
        done = epoch + 1
        want_ckpt = done % cfg.checkpoint_every_epochs == 0 or done == cfg.epochs or done == cfg.stop_after_epochs
        ckpt = _checkpoint_writer(recipe, run, ctx, done, metrics) if want_ckpt else None
        ctx.report(row, checkpoint=ckpt, step=done)
        if cfg.stop_after_epochs is not None and cfg.stop_after_epochs <= done < cfg.epochs:
            raise SimulatedKill(f"stopped after epoch {done} (stop_after_epochs)")
    extra = {"start_epoch": start_epoch, "trainable_params": sum(p.numel() for p in run.s_params),
             "n_tiles": int(n_rows_per_worker * ctx.world_size), "world_size": ctx.world_size}
    if ctx.is_main:
        recipe.publish(run.teacher, metrics, extra)
    return {"metrics": metrics, **extra}


# --------------------------------------------------------------------------- Ray Train


def ray_worker(config: dict) -> dict:
    """Ray Train entry point of every DINO run: the recipe is rebuilt on the
    worker by ``config["make_recipe"](cfg_dict, run_dir)`` (a module-level function)."""
    from raypath.train.context import RayTrainContext

    recipe = config["make_recipe"](config["cfg"], config["run_dir"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    return train_loop(recipe, RayTrainContext(amp=recipe.cfg.amp), n_rows=int(config["n_rows"]))


def fit_on_ray(make_recipe: Callable[[dict, str], DinoRecipe], cfg, dataset, run_dir: str, use_gpu: bool, keep: int = 2) -> dict:
    """Run a DINO recipe on ``cfg.num_workers`` Ray Train workers (DDP) over a
    materialised Ray Dataset of tiles (column ``image``); checkpoints in
    ``<run_dir>/ray/train`` (a re-run resumes).  Returns rank 0's result."""
    from raypath.io.ray_env import cluster_cpus
    from raypath.io.storage import join
    from raypath.train.launch import fit_on_ray_train

    config = {"make_recipe": make_recipe, "cfg": cfg.model_dump(), "run_dir": run_dir, "n_rows": dataset.count(),
              "threads": max(1, int(cluster_cpus() // max(1, cfg.num_workers)))}
    result = fit_on_ray_train(ray_worker, config, num_workers=cfg.num_workers, storage_path=join(run_dir, "ray"),
                              name="train", use_gpu=use_gpu, datasets={"train": dataset}, keep=keep)
    return result.return_value
