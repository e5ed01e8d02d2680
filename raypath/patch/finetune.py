"""Fine-tuning a patch classifier: LoRA/DoRA/full fine-tuning of an FM and end-to-end baselines.

Training as in Ammeling et al. 2025 and their code (METHODS.md §2): Adam
(lr 1e-4), BCE on one logit for two classes (cross-entropy for more), batches
of 16 with half of them mitotic figures (the positive class; with more
classes, classes drawn uniformly), pseudo-epochs of 1,280 sampled patches,
at most 100 epochs, early stopping on the validation loss (patience 20, the
best epoch's weights kept), the light augmentation of :mod:`raypath.patch.nets`.

:func:`train_fit` is one fit's training function.  It runs through the
project's one training context (:func:`raypath.train.current_context`): in
this process (checkpoints under the run's ``checkpoints/<fit>/``), or as a
Ray Train worker (:func:`run_finetune` with ``train_workers >= 1``: DDP,
checkpoints in Ray's run storage).  Every epoch is checkpointed with the
trainable weights (adapter + head only for LoRA/DoRA/prompts: the frozen FM
is never copied; every weight and buffer otherwise), the best epoch's
weights, the optimiser, the early-stopping state and every random generator
(sampler, augmentation, dropout), so a run killed at any point resumes where
it was and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raypath.patch.images import PatchImages
from raypath.patch.nets import PatchNet, augment, build_e2e_net, build_fm_net, centre

log = logging.getLogger(__name__)

#: Tuning methods whose checkpoints hold only the trainable tensors (the FM stays as loaded).
ADAPTER_TUNINGS = ("lora", "dora", "prompt", "pathotune")


@dataclass
class TrainSpec:
    """Everything one fine-tuning fit needs (plain data: it travels to Ray workers)."""

    method: str  # the patch method name (lora, dora, full, e2e-resnet, e2e-vit, ...)
    tuning: str | None  # tuning-layer method for FM-based methods, None for end-to-end baselines
    model: str
    weights: str | None
    cache_folder: str
    y: np.ndarray  # class index of every patch of the table
    train: np.ndarray
    val: np.ndarray
    evals: dict[str, np.ndarray]
    n_classes: int
    positive: int | None
    seed: int
    patch_px: int
    shift_px: int
    e2e_size: str = "tiny"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] | None = None
    lr: float = 1e-4
    batch_size: int = 16
    max_epochs: int = 100
    patience: int = 20
    pseudo_epoch: int = 1280
    positive_share: float = 0.5
    eval_batch: int = 64
    device: str = "auto"
    amp: str = "auto"
    checkpoint_dir: str | None = None
    kill_at_step: int | None = None
    context: str = "auto"  # "local": this process even inside a Tune trial; "auto": current_context()
    extra: dict = field(default_factory=dict)  # method-specific options (plug-in methods)

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    @property
    def adapter_only(self) -> bool:
        return self.tuning in ADAPTER_TUNINGS


def build_net(spec: TrainSpec) -> PatchNet:
    n_out = 1 if spec.binary else spec.n_classes
    if spec.tuning is None:
        return build_e2e_net(spec.method, spec.e2e_size, n_out, spec.seed)
    if spec.tuning == "pathotune":  # raypath.fm.pathotune: TVP/TTP/IVP on the frozen FM (spec.extra["pathotune"])
        from raypath.fm.backbone import load_backbone
        from raypath.fm.pathotune import PathoTuneConfig, apply_pathotune

        bb = load_backbone(spec.model, weights=spec.weights)
        torch.manual_seed(spec.seed)
        apply_pathotune(bb, PathoTuneConfig(**spec.extra.get("pathotune", {})))
        return PatchNet(bb, bb.spec.embed_dim, n_out, bb.spec.img_size, bb.spec.mean, bb.spec.std)
    return build_fm_net(spec.model, spec.weights, spec.tuning, n_out, spec.seed, spec.rank, spec.alpha,
                        spec.dropout, spec.targets)


# --------------------------------------------------------------------------- batches and losses


def _by_class(spec: TrainSpec) -> list[np.ndarray]:
    return [spec.train[spec.y[spec.train] == c] for c in range(spec.n_classes)]


def balanced_batch(rng: np.random.Generator, by_class: list[np.ndarray], batch: int, positive: int | None,
                   positive_share: float = 0.5) -> np.ndarray:
    """Rows of one batch: ``positive_share`` of them from the positive class (two classes), else
    classes drawn uniformly; patches drawn uniformly within a class, with replacement."""
    k = len(by_class)
    if k == 2 and positive is not None:
        n_pos = int(round(batch * positive_share))
        cls = np.r_[np.full(n_pos, positive), np.full(batch - n_pos, 1 - positive)]
    else:
        cls = rng.integers(0, k, batch)
    return np.array([by_class[c][rng.integers(len(by_class[c]))] for c in cls], dtype=np.int64)


def _loss(logits: torch.Tensor, y: torch.Tensor, spec: TrainSpec) -> torch.Tensor:
    if spec.binary:
        pos = 1 if spec.positive is None else spec.positive
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), (y == pos).float())
    return F.cross_entropy(logits.float(), y)


def _probs(logits: torch.Tensor, spec: TrainSpec) -> np.ndarray:
    if spec.binary:
        p = torch.sigmoid(logits[:, 0].float()).cpu().numpy()
        pos = 1 if spec.positive is None else spec.positive
        return np.stack([1 - p, p], 1) if pos == 1 else np.stack([p, 1 - p], 1)
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def _images(images: PatchImages, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.images[rows]))


@torch.no_grad()
def predict(net: torch.nn.Module, images: PatchImages, rows: np.ndarray, spec: TrainSpec, ctx) -> tuple[np.ndarray, float]:
    """(class probabilities ``[n, K]``, mean loss) of ``rows`` (centre crops, eval mode)."""
    net.eval()
    probs, losses = [], []
    for i in range(0, len(rows), spec.eval_batch):
        r = rows[i : i + spec.eval_batch]
        with ctx.autocast():
            logits = net(centre(_images(images, r), spec.patch_px, ctx.device))
        y = torch.from_numpy(spec.y[r]).to(ctx.device)
        losses.append(float(_loss(logits, y, spec)) * len(r))
        probs.append(_probs(logits, spec))
    k = spec.n_classes
    return (np.concatenate(probs) if probs else np.zeros((0, k))), (sum(losses) / max(len(rows), 1))


def predict_sets(net: torch.nn.Module, images: PatchImages, spec: TrainSpec, ctx) -> dict[str, np.ndarray]:
    """Probabilities of every evaluation set, each patch predicted once."""
    union = np.unique(np.concatenate([np.asarray(r, np.int64) for r in spec.evals.values()] or [np.zeros(0, np.int64)]))
    p = predict(net, images, union, spec, ctx)[0]
    return {name: p[np.searchsorted(union, rows)] for name, rows in spec.evals.items()}


# --------------------------------------------------------------------------- state


@dataclass
class _Loop:
    epoch: int = 0
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad: int = 0
    history: list = field(default_factory=list)


def _rng_state(np_rng: np.random.Generator, gen: torch.Generator) -> dict:
    out = {"np": json.dumps(np_rng.bit_generator.state), "aug": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict, np_rng: np.random.Generator, gen: torch.Generator) -> None:
    np_rng.bit_generator.state = json.loads(s["np"])
    gen.set_state(s["aug"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _checkpoint(net, opt, loop: _Loop, best: dict, np_rng, gen, spec: TrainSpec, ctx) -> dict:
    from raypath.train import module_state

    return {"model": module_state(net, trainable_only=spec.adapter_only), "best": best,
            "optimizer": opt.state_dict(), "loop": {**asdict(loop), "history": json.dumps(loop.history)},
            "rng": _rng_state(np_rng, gen), **ctx.amp_state()}


def _restore(state: dict, net, opt, np_rng, gen, spec: TrainSpec, ctx) -> tuple[_Loop, dict]:
    from raypath.train import load_module_state

    load_module_state(net, state["model"], trainable_only=spec.adapter_only)
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], np_rng, gen)
    ctx.load_amp_state(state)
    lp = dict(state["loop"])
    lp["history"] = json.loads(lp["history"])
    return _Loop(**lp), state["best"]


# --------------------------------------------------------------------------- the loop


def _train_epoch(net, opt, images, spec: TrainSpec, by_class, np_rng, gen, ctx) -> float:
    net.train()
    steps = max(1, spec.pseudo_epoch // (spec.batch_size * ctx.world_size))
    total = 0.0
    for _ in range(steps):
        rows = balanced_batch(np_rng, by_class, spec.batch_size, spec.positive, spec.positive_share)
        x = augment(_images(images, rows), spec.patch_px, spec.shift_px, gen, ctx.device)
        y = torch.from_numpy(spec.y[rows]).to(ctx.device)
        with ctx.autocast():
            loss = _loss(net(x), y, spec)
        opt.zero_grad(set_to_none=True)
        ctx.backward(loss)
        ctx.step(opt)
        total += float(loss.detach())
    return ctx.all_reduce_mean(total / steps)


def _optimizer(spec: TrainSpec, params: list) -> torch.optim.Optimizer:
    """Adam (the paper's), or ``spec.extra["optimizer"]`` (PathoTune: RAdam)."""
    name = spec.extra.get("optimizer", "adam")
    if name == "adam":
        return torch.optim.Adam(params, lr=spec.lr)
    from raypath.fm.pathotune import make_optimizer

    return make_optimizer(params, name, lr=spec.lr)


def _save_prompts(net, spec: TrainSpec, ctx, out: dict) -> None:
    """PathoTune fits write their trained prompts (``spec.extra["prompts_out"]``) and name the file's sha256."""
    path = spec.extra.get("prompts_out")
    if spec.tuning != "pathotune" or not path or ctx.rank != 0:
        return
    from raypath.fm.pathotune import save_pathotune

    out["prompts"], out["prompt_sha256"] = path, save_pathotune(ctx.unwrap(net).encoder, path)


def train_fit(config: dict) -> dict:
    """Train one fit (any training context) and return its predictions on every evaluation set."""
    from raypath.train import LocalContext, current_context, load_module_state, module_state

    spec = TrainSpec(**config)
    t0 = time.perf_counter()
    if spec.context == "local":  # a fit inside a sweep trial reports to the trial, not to Tune
        ctx = LocalContext(spec.checkpoint_dir, spec.kill_at_step, device=spec.device, amp=spec.amp, keep=1)
    else:
        ctx = current_context(device=spec.device, amp=spec.amp, checkpoint_dir=spec.checkpoint_dir,
                              kill_at_step=spec.kill_at_step, keep=1)
    images = PatchImages(spec.cache_folder)
    torch.manual_seed(spec.seed + 1000 * ctx.rank)
    net = ctx.prepare(build_net(spec))
    opt = _optimizer(spec, [p for p in net.parameters() if p.requires_grad])
    np_rng = np.random.default_rng(np.random.SeedSequence([spec.seed, ctx.rank, 4711]))
    gen = torch.Generator().manual_seed(spec.seed * 7919 + ctx.rank)
    state = ctx.restore()
    loop, best = (_Loop(), {}) if state is None else _restore(state, net, opt, np_rng, gen, spec, ctx)
    by_class = _by_class(spec)
    for epoch in range(loop.epoch, spec.max_epochs):
        train_loss = _train_epoch(net, opt, images, spec, by_class, np_rng, gen, ctx)
        val_loss = predict(net, images, spec.val, spec, ctx)[1] if len(spec.val) else train_loss
        if val_loss < loop.best_loss:
            loop.best_loss, loop.best_epoch, loop.bad = val_loss, epoch, 0
            # clone: on the CPU module_state's tensors share storage with the live parameters
            best = {k: v.clone() for k, v in module_state(net, trainable_only=spec.adapter_only).items()}
        else:
            loop.bad += 1
        loop.epoch = epoch + 1
        loop.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        ctx.report({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss},
                   checkpoint=_checkpoint(net, opt, loop, best, np_rng, gen, spec, ctx), step=epoch + 1)
        if loop.bad >= spec.patience:
            break
    if best:
        load_module_state(net, best, trainable_only=spec.adapter_only)
    probs = predict_sets(net, images, spec, ctx)
    n_train = sum(p.numel() for p in ctx.unwrap(net).parameters() if p.requires_grad)
    out = {"probs": probs, "history": loop.history, "best_epoch": loop.best_epoch, "epochs": loop.epoch,
           "trainable_params": int(n_train), "train_s": time.perf_counter() - t0,
           "resumed_from": ctx.restored_from, "context": ctx.kind, "precision": ctx.precision.name}
    _save_prompts(net, spec, ctx, out)
    return out


def run_finetune(spec: TrainSpec, train_workers: int = 0, storage: str | None = None, name: str = "fit") -> dict:
    """Run :func:`train_fit` here (``train_workers=0``) or on ``train_workers`` Ray Train workers."""
    config: dict[str, Any] = asdict(spec)
    if train_workers <= 0:
        return train_fit({**config, "context": "local"})
    from raypath.train.launch import fit_on_ray_train

    config["checkpoint_dir"] = None
    result = fit_on_ray_train(train_fit, config, num_workers=train_workers, storage_path=storage, name=name, keep=1)
    return result.return_value
