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
    """Build the objective ``name`` for ``task`` (pluggable into the training loop);
    a name registered by a plugin (:func:`raypath.plugins.register_loss`) builds that one."""
    if name not in ("cox", "nll", "ce"):
        from raypath.plugins import loss

        factory = loss(name)
        if factory is not None:
            return factory(task=task, n_classes=n_classes, n_bins=n_bins, nll_alpha=nll_alpha,
                           cox_reduction=cox_reduction)
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


# --------------------------------------------------------------------------- robustness losses
#
# Henriksen, ..., Kleppe 2026 (METHODS.md §3): two technical variants of one
# tissue (a re-scan / re-stain, or a generated stain/scanner view) should get
# the same slide embedding and the same prediction.  The paper names an
# InfoNCE embedding loss and a score loss; the formulation below is ours
# (docs/mil.md, "Robustness losses").

SCORE_LOSSES = ("abs", "squared")


def info_nce(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    tau: float = 0.1,
    groups: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    extra_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between two views of P tissues.

    Embeddings are L2-normalised; similarities are cosines divided by
    ``tau``.  For view ``a_i`` the positive is ``b_i`` and the negatives are
    the other tissues' ``b_j`` plus the ``extra`` embeddings (slides of the
    batch without a second view); symmetrically for ``b_i``.  The loss is
    ``0.5 * (CE(a -> b) + CE(b -> a))``, each a mean over the P tissues.

    Parameters
    ----------
    z_a, z_b
        [P, d] embeddings of the two views (row i = tissue i).
    tau
        Temperature (> 0).
    groups, extra_groups
        Optional integer ids (e.g. patient) of the P tissues and of the
        extra rows: a candidate with the same id as the anchor, other than
        its own positive, is not used as a negative (a tissue drawn twice in
        a batch, or a patient's other block, is no negative of itself).
    extra
        [E, d] extra negatives (may be None or empty).

    Returns
    -------
    A scalar; 0 (attached to the graph) when P == 0.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, not {tau}")
    p = len(z_a)
    if p == 0:
        return z_a.sum() * 0.0
    a = F.normalize(z_a, dim=1)
    b = F.normalize(z_b, dim=1)
    e = F.normalize(extra, dim=1) if extra is not None and len(extra) else a[:0]
    logits_ab = a @ torch.cat([b, e]).T / tau  # [P, P+E]
    logits_ba = b @ torch.cat([a, e]).T / tau
    if groups is not None:
        g = groups.reshape(-1).to(a.device)
        ge = extra_groups.reshape(-1).to(a.device) if len(e) else g[:0]
        cand = torch.cat([g, ge])
        same = g.unsqueeze(1) == cand.unsqueeze(0)
        same[torch.arange(p), torch.arange(p)] = False  # the positive stays
        logits_ab = logits_ab.masked_fill(same, float("-inf"))
        logits_ba = logits_ba.masked_fill(same, float("-inf"))
    target = torch.arange(p, device=a.device)
    return 0.5 * (F.cross_entropy(logits_ab, target) + F.cross_entropy(logits_ba, target))


def score_consistency_loss(s_a: torch.Tensor, s_b: torch.Tensor, kind: str = "abs") -> torch.Tensor:
    """Mean over tissues of ``|s_a - s_b|`` (``kind="abs"``) or ``(s_a - s_b)^2``
    (``"squared"``); several outputs per tissue (K logits) are averaged too."""
    if kind not in SCORE_LOSSES:
        raise RaypathError(f"unknown score loss {kind!r}: choose one of {', '.join(SCORE_LOSSES)}")
    if len(s_a) == 0:
        return s_a.sum() * 0.0
    d = s_a - s_b
    return (d.abs() if kind == "abs" else d * d).mean()


def consistency_score(objective: Objective, out: torch.Tensor) -> torch.Tensor:
    """The output the score loss compares: Cox log-risk, the discrete-time
    risk ``-sum_k S_k`` (nll), or the logit(s) (classification)."""
    if objective.name == "cox":
        return out.reshape(-1)
    if objective.name == "nll":
        return objective.score(out)
    return out if out.shape[1] > 1 else out.reshape(-1)


@dataclass(frozen=True)
class RobustWeights:
    """Weights of ``L = L_task + lambda_emb * InfoNCE + lambda_score * score_loss``."""

    lambda_emb: float = 0.0
    lambda_score: float = 0.0
    tau: float = 0.1
    score_loss: str = "abs"

    @property
    def active(self) -> bool:
        return self.lambda_emb > 0 or self.lambda_score > 0


def robust_loss(
    objective: Objective,
    out_a: torch.Tensor,
    out_b: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    paired: torch.Tensor,
    targets: dict,
    weights: RobustWeights,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The robust MIL objective of one batch of U tissues.

    Parameters
    ----------
    out_a, z_a
        Outputs [U, o] and embeddings [U, d] of every tissue's first view.
    out_b, z_b
        Outputs [P, o] and embeddings [P, d] of the second view of the P
        tissues that have one (``paired`` [P] = their positions in 0..U-1).
    targets
        The tissues' targets (time/event/bin or label, [U]): the two views
        of a tissue share its outcome.
    groups
        Optional [U] ids (patient) that are never negatives of each other.

    The task loss is the mean of the objective over the two views; a tissue
    without a second view counts its first view twice, so every tissue
    appears exactly once in each Cox risk set.  InfoNCE and the score loss
    run over the P paired tissues; the other tissues' embeddings are extra
    negatives.  Returns ``(loss, parts)`` with the float value of each term.
    """
    paired = paired.reshape(-1).long()
    out_b_full = out_a.index_put((paired,), out_b)
    task = 0.5 * (objective.loss(out_a, targets) + objective.loss(out_b_full, targets))
    loss = task
    parts = {"task": float(task.detach())}
    if weights.lambda_emb > 0:
        lone = torch.ones(len(out_a), dtype=torch.bool, device=out_a.device)
        lone[paired] = False
        g = groups.reshape(-1).to(out_a.device) if groups is not None else None
        emb = info_nce(
            z_a[paired], z_b, weights.tau,
            groups=None if g is None else g[paired],
            extra=z_a[lone],
            extra_groups=None if g is None else g[lone],
        )
        loss = loss + weights.lambda_emb * emb
        parts["info_nce"] = float(emb.detach())
    if weights.lambda_score > 0:
        s_a = consistency_score(objective, out_a[paired])
        s_b = consistency_score(objective, out_b)
        sc = score_consistency_loss(s_a, s_b, weights.score_loss)
        loss = loss + weights.lambda_score * sc
        parts["score"] = float(sc.detach())
    return loss, parts
