"""DINO v1 self-distillation pieces: head, loss with centring, schedules, EMA.

Plain torch, no Ray: the training loop in :mod:`raypath.adapt.api` wires these
together (see METHODS.md §1).

- :class:`DINOHead`: MLP ``d -> hidden -> hidden -> bottleneck`` (GELU),
  L2-normalise, then a weight-normalised ``Linear(bottleneck, out_dim)``
  whose norm is fixed at 1 (only the direction is learnt).
- :class:`DINOLoss`: teacher probabilities ``softmax((g_t - c) / T_t)``,
  student log-probabilities ``log_softmax(g_s / T_s)``; the loss is the mean
  over every (teacher global view x, student view x' != x) pair of the
  cross-entropy; the centre ``c`` is an EMA of the teacher outputs.
- :func:`cosine_schedule`: per-step values with linear warm-up then cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class HeadDims:
    """DINO head sizes; the paper's are 2048 / 256 / 65536."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 65536


def head_dims_for(embed_dim: int, hidden_dim: int | None = None, bottleneck_dim: int | None = None, out_dim: int | None = None) -> HeadDims:
    """Head sizes for a backbone of width ``embed_dim``: the paper's for real
    FMs (``embed_dim >= 384``), scaled down for tiny test models so the head
    does not dwarf the backbone.  Explicit values win."""
    if embed_dim >= 384:
        auto = HeadDims()
    else:
        hid = max(64, 4 * embed_dim)
        auto = HeadDims(hidden_dim=hid, bottleneck_dim=max(16, embed_dim), out_dim=max(256, 8 * hid))
    return HeadDims(
        hidden_dim=hidden_dim or auto.hidden_dim,
        bottleneck_dim=bottleneck_dim or auto.bottleneck_dim,
        out_dim=out_dim or auto.out_dim,
    )


class DINOHead(nn.Module):
    """Projection head of DINO v1 (3-layer MLP, L2 norm, weight-normed last layer)."""

    def __init__(self, in_dim: int, dims: HeadDims = HeadDims()):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, dims.hidden_dim),
            nn.GELU(),
            nn.Linear(dims.hidden_dim, dims.hidden_dim),
            nn.GELU(),
            nn.Linear(dims.hidden_dim, dims.bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(dims.bottleneck_dim, dims.out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        # weight = g * v / ||v|| with g fixed at 1: the output is a cosine
        # similarity to out_dim learnt prototypes.
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def last_layer_params(head: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the head's last layer (frozen in epoch 0)."""
    return [p for n, p in head.named_parameters() if "last_layer" in n and p.requires_grad]


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student outputs.

    Parameters
    ----------
    out_dim
        Width of the head output (size of the centre).
    n_global
        Number of global views (the teacher sees only these).
    teacher_temp, student_temp
        0.04 and 0.1 in the paper.
    center_momentum
        ``c <- m c + (1 - m) mean(g_t)``; 0.9 in the paper.  The batch mean is
        averaged over all DDP ranks.
    """

    def __init__(self, out_dim: int, n_global: int = 2, teacher_temp: float = 0.04, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_global = n_global
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor) -> torch.Tensor:
        return F.softmax((teacher_out - self.center) / self.teacher_temp, dim=-1)

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], update_center: bool = True) -> torch.Tensor:
        """``student_out``: one ``[B, K]`` tensor per view (globals first);
        ``teacher_out``: one per global view.  Returns the scalar loss and
        (if ``update_center``) moves the centre towards the teacher mean."""
        t_probs = [self.teacher_probs(t.detach()) for t in teacher_out]
        s_logp = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_out]
        total, n_pairs = 0.0, 0
        for i, pt in enumerate(t_probs):
            for j, ls in enumerate(s_logp):
                if j == i:
                    continue  # same view for teacher and student
                total = total + torch.sum(-pt * ls, dim=-1).mean()
                n_pairs += 1
        if update_center:
            self.update_center(teacher_out)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        t = torch.cat([x.detach() for x in teacher_out])
        batch_mean = _all_reduce_mean(t.mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))


@torch.no_grad()
def teacher_entropy(loss: DINOLoss, teacher_out: Sequence[torch.Tensor]) -> float:
    """Mean entropy (nats) of the teacher's centred, sharpened distribution:
    ~0 means collapse to one prototype, ``log K`` means uniform collapse."""
    p = loss.teacher_probs(torch.cat([t.detach() for t in teacher_out]))
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear ``warmup_start -> base`` over ``warmup_steps``,
    then half a cosine ``base -> final`` over the remaining steps (the last
    step equals ``final``)."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    if n == 1:
        cos = np.array([base])
    else:
        i = np.arange(n)
        cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(1, n - 1)))
    return np.concatenate([warm, cos])


def param_groups(module: nn.Module) -> list[dict]:
    """Trainable parameters split for weight decay: matrices (``ndim >= 2``)
    are regularised, vectors (biases, DoRA magnitudes, norms) are not."""
    reg, no_reg = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (reg if p.ndim >= 2 else no_reg).append(p)
    return [{"params": reg, "apply_wd": True}, {"params": no_reg, "apply_wd": False, "weight_decay": 0.0}]


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
        g["weight_decay"] = weight_decay if g.get("apply_wd", True) else 0.0


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip each parameter's gradient to ``max_norm`` separately (as DINO
    does); returns the largest norm seen before clipping."""
    largest = 0.0
    for p in params:
        if p.grad is None:
            continue
        n = float(p.grad.detach().norm(2))
        largest = max(largest, n)
        coef = max_norm / (n + 1e-6)
        if coef < 1:
            p.grad.detach().mul_(coef)
    return largest


@torch.no_grad()
def ema_update(teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor], momentum: float) -> None:
    """``teacher <- m teacher + (1 - m) student`` (in place)."""
    for t, s in zip(teacher_params, student_params):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1 - momentum)


def lr_for_batch(base_lr: float, global_batch: int) -> float:
    """DINO's linear scaling rule: ``base_lr x global_batch / 256``."""
    return base_lr * global_batch / 256.0


__all__ = [
    "DINOHead",
    "DINOLoss",
    "HeadDims",
    "head_dims_for",
    "cosine_schedule",
    "param_groups",
    "set_schedules",
    "clip_gradients",
    "ema_update",
    "teacher_entropy",
    "last_layer_params",
    "lr_for_batch",
]
