"""Training objectives for MIL heads, all of the form ``loss(outputs, batch)``.

* ``cox``: negative Cox partial log-likelihood over the batch, with
  Breslow's handling of tied times (every tied event sees the full risk set
  ``{j: t_j >= t_i}``).
* ``nll``: discrete-time survival negative log-likelihood (MCAT style):
  bins from quantiles of uncensored training times, hazards
  ``sigmoid(logits)``, survival ``cumprod(1 - h)``, alpha-weighted
  uncensored term.
* ``ce``: cross-entropy (K >= 3 classes) or BCE with logits (2 classes,
  one output).

Each loss comes with the number of outputs it needs and the rule that turns
outputs into one score per slide (risk for survival: higher = shorter
survival; probability of the positive class / class probabilities for
classification).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raypath.errors import RaypathError

LOSSES = ("cox", "nll", "ce")


def cox_ph_loss(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    reduction: str = "batch",
) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties).

    ``L = -(1/B) sum_i d_i [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]``

    Parameters
    ----------
    risk
        Log-risk ``eta`` [B] (or [B, 1]); higher = earlier event.
    time, event
        Follow-up time [B] and event indicator [B] (1 = event, 0 = censored).
    reduction
        ``"batch"`` divides by B (the DoRA paper's formulation),
        ``"events"`` by the number of events.

    Returns
    -------
    A scalar.  A batch without events gives exactly 0 that is still
    connected to the graph (gradient zero), never NaN.
    """
    eta = risk.reshape(-1)
    t = time.reshape(-1).to(eta.dtype)
    d = event.reshape(-1).to(eta.dtype)
    # at_risk[i, j] = t_j >= t_i.  O(B^2) memory is fine for slide batches
    # and makes ties exact without sorting tricks.
    at_risk = t.unsqueeze(0) >= t.unsqueeze(1)
    # row i always contains j = i, so the logsumexp is finite.
    logits = eta.unsqueeze(0).expand(len(eta), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(logits, dim=1)
    partial = (eta - log_denominator) * d
    if reduction == "events":
        denom = d.sum().clamp(min=1.0)
    elif reduction == "batch":
        denom = torch.tensor(float(max(len(eta), 1)), dtype=eta.dtype, device=eta.device)
    else:
        raise ValueError(f"reduction must be 'batch' or 'events', not {reduction!r}")
    return -partial.sum() / denom


def make_time_bins(time: np.ndarray, event: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Bin edges from quantiles of the *uncensored* times.

    Returns ``n_bins + 1`` increasing edges with the outer ones at 0 and
    ``inf`` so every time (including censored ones beyond the last event)
    falls into a bin.  Duplicate quantiles (many ties) are merged, so fewer
    bins can come back.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    uncensored = time[event] if event.any() else time
    qs = np.quantile(uncensored, np.linspace(0, 1, n_bins + 1)[1:-1]) if len(uncensored) else []
    inner = np.unique(np.asarray(qs, dtype=float))
    return np.concatenate([[0.0], inner, [np.inf]])


def time_to_bin(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the bin ``[edges[k], edges[k+1])`` of each time."""
    idx = np.searchsorted(edges, np.asarray(time, dtype=float), side="right") - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64)


def nll_survival_loss(
    logits: torch.Tensor,
    bin_index: torch.Tensor,
    event: torch.Tensor,
    alpha: float = 0.4,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time survival NLL (hazards = sigmoid(logits)).

    ``L = (1 - alpha) * (L_uncensored + L_censored) + alpha * L_uncensored``,
    averaged over the batch, where for a slide in bin ``y``
    ``L_uncensored = -d [log S(y-1) + log h(y)]`` and
    ``L_censored = -(1-d) log S(y)``, with ``S(-1) = 1``.
    """
    hazards = torch.sigmoid(logits)
    surv = torch.cumprod(1 - hazards, dim=1)
    surv_padded = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)
    y = bin_index.reshape(-1, 1).long()
    d = event.reshape(-1, 1).to(logits.dtype)
    s_before = torch.gather(surv_padded, 1, y).clamp(min=eps)
    s_at = torch.gather(surv_padded, 1, y + 1).clamp(min=eps)
    h_at = torch.gather(hazards, 1, y).clamp(min=eps)
    uncensored = -d * (torch.log(s_before) + torch.log(h_at))
    censored = -(1 - d) * torch.log(s_at)
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def nll_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk from discrete hazards: minus the sum of survival over bins."""
    surv = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
    return -surv.sum(dim=1)


def classification_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """BCE with logits for one output, cross-entropy for K outputs."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), label.to(logits.dtype))
    return F.cross_entropy(logits, label.long())


@dataclass(frozen=True)
class Objective:
    """A loss with the output size it needs and its score rule.

    ``loss(outputs, batch)`` and ``score(outputs)`` take the model outputs
    [B, out_dim]; ``batch`` is the dict made by :func:`raypath.mil.data.collate_bags`.
    ``score`` returns [B] risk (survival) or [B, K] class probabilities.
    """

    name: str
    task: str
    out_dim: int
    loss: Callable[[torch.Tensor, dict], torch.Tensor]
    score: Callable[[torch.Tensor], torch.Tensor]


def _class_probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def make_objective(
    name: str,
    task: str,
    n_classes: int = 2,
    n_bins: int = 4,
    nll_alpha: float = 0.4,
    cox_reduction: str = "batch",
) -> Objective:
    """Build the objective ``name`` for ``task`` (pluggable into the training loop)."""
    if task == "survival":
        if name == "cox":
            return Objective(
                "cox",
                task,
                1,
                lambda out, b: cox_ph_loss(out, b["time"], b["event"], reduction=cox_reduction),
                lambda out: out.reshape(-1),
            )
        if name == "nll":
            return Objective(
                "nll",
                task,
                n_bins,
                lambda out, b: nll_survival_loss(out, b["bin"], b["event"], alpha=nll_alpha),
                nll_risk,
            )
        raise RaypathError(f"loss {name!r} does not fit task 'survival': use --loss cox or nll")
    if task == "classification":
        if name != "ce":
            raise RaypathError(f"loss {name!r} does not fit task 'classification': use --loss ce")
        out_dim = 1 if n_classes == 2 else n_classes
        return Objective(
            "ce", task, out_dim, lambda out, b: classification_loss(out, b["label"]), _class_probs
        )
    raise RaypathError(f"unknown task {task!r}: use 'survival' or 'classification'")
