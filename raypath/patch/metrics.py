"""Patch-classification metrics with bootstrap confidence intervals.

The five metrics of the mitosis benchmark, computed from (weighted)
confusion matrices and rank sums so that one vectorised code path gives the
point estimate (every weight 1) and a thousand bootstrap replicates (weights
= how often each patch, or each slide's patches, was drawn):

``balanced_accuracy``
    mean recall over the classes present in the truth (``sklearn.metrics.balanced_accuracy_score``);
``f1_weighted``
    per-class F1 weighted by support, 0 for a class never predicted and never true
    (``f1_score(average="weighted", zero_division=0)``);
``auroc``
    binary: the positive class's probability; more classes: macro one-vs-rest
    (``roc_auc_score(multi_class="ovr", average="macro")``); ties count 1/2
    (Mann-Whitney).  NaN when a class is absent from the truth, and
    :func:`evaluate` says which in ``auroc_note``;
``kappa``
    Cohen's kappa of truth and prediction (``cohen_kappa_score``; NaN where sklearn's is undefined);
``accuracy``.

The tests check every metric against scikit-learn on randomised cases
(ties, an absent class, string labels).  Predictions are the argmax of the
probabilities over ``classes`` (sorted label names).
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("balanced_accuracy", "f1_weighted", "auroc", "kappa", "accuracy")


def encode(labels, classes: list[str]) -> np.ndarray:
    """Label names -> class indices (``ValueError`` naming an unknown label)."""
    pos = {c: i for i, c in enumerate(classes)}
    try:
        return np.fromiter((pos[str(v)] for v in labels), dtype=np.int64, count=len(labels))
    except KeyError as e:
        raise ValueError(f"label {e.args[0]!r} is not one of the classes {classes}") from None


def _confusions(y: np.ndarray, pred: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """``(B, k, k)`` weighted confusion matrices (rows: truth, columns: prediction)."""
    b = w.shape[0]
    cell = (np.arange(b)[:, None] * k * k + (y * k + pred)[None, :]).ravel()
    return np.bincount(cell, weights=w.ravel(), minlength=b * k * k).reshape(b, k, k)


def _from_confusions(c: np.ndarray) -> dict[str, np.ndarray]:
    n = c.sum(axis=(1, 2))
    tp = np.einsum("bkk->bk", c)
    support = c.sum(axis=2)
    predicted = c.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), np.nan)
        bacc = np.nanmean(np.where(support > 0, recall, np.nan), axis=1)
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        f1w = (f1 * support).sum(axis=1) / n
        off_obs = n - tp.sum(axis=1)
        off_exp = n - (support * predicted).sum(axis=1) / n
        kappa = np.where(np.abs(off_exp) > 1e-12 * np.maximum(n, 1), 1 - off_obs / np.where(off_exp == 0, 1, off_exp), np.nan)
        acc = tp.sum(axis=1) / n
    return {"balanced_accuracy": bacc, "f1_weighted": f1w, "kappa": kappa, "accuracy": acc}


def _binary_auc(score: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC per row of ``w`` (ties 1/2); NaN without both classes."""
    uniq, inv = np.unique(score, return_inverse=True)
    u = len(uniq)
    b = w.shape[0]
    neg_w = w * (~positive)[None, :]
    pos_w = w * positive[None, :]
    cells = (np.arange(b)[:, None] * u + inv[None, :]).ravel()
    neg_bin = np.bincount(cells, weights=neg_w.ravel(), minlength=b * u).reshape(b, u)
    below = np.cumsum(neg_bin, axis=1) - neg_bin
    per_pos = below[:, inv] + 0.5 * neg_bin[:, inv]
    num = (pos_w * per_pos).sum(axis=1)
    wp, wn = pos_w.sum(axis=1), neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((wp > 0) & (wn > 0), num / np.where((wp > 0) & (wn > 0), wp * wn, 1), np.nan)


def _auroc(y: np.ndarray, prob: np.ndarray, k: int, positive: int | None, w: np.ndarray) -> np.ndarray:
    if k == 2:
        pos = 1 if positive is None else positive
        return _binary_auc(prob[:, pos], y == pos, w)
    per_class = [_binary_auc(prob[:, c], y == c, w) for c in range(k)]
    return np.mean(per_class, axis=0)  # NaN if any class is absent


def scores(y: np.ndarray, prob: np.ndarray, weights: np.ndarray | None = None,
           positive: int | None = None) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights`` (``(B, n)``; ``None`` = one row of ones).

    ``y`` are class indices ``[n]``, ``prob`` ``[n, K]`` class probabilities,
    ``positive`` the index of the positive class for the binary AUROC.
    """
    y = np.asarray(y, np.int64)
    prob = np.asarray(prob, float)
    k = prob.shape[1]
    w = np.ones((1, len(y))) if weights is None else np.asarray(weights, float)
    pred = prob.argmax(axis=1)
    out = _from_confusions(_confusions(y, pred, k, w))
    out["auroc"] = _auroc(y, prob, k, positive, w)
    return {m: out[m] for m in METRICS}


def bootstrap_weights(n: int, n_boot: int, seed: int, groups=None) -> np.ndarray:
    """``(n_boot, n)`` draw counts: patches resampled with replacement, or whole
    groups (slides) when ``groups`` is given (the honest unit when patches of
    one slide are correlated)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        return np.stack([np.bincount(r, minlength=n) for r in idx]).astype(float)
    _, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    m = g.max() + 1
    draws = rng.integers(0, m, size=(n_boot, m))
    counts = np.stack([np.bincount(r, minlength=m) for r in draws]).astype(float)
    return counts[:, g]


def _auroc_note(y: np.ndarray, classes: list[str]) -> str:
    absent = [c for i, c in enumerate(classes) if not (y == i).any()]
    if absent:
        return f"AUROC undefined: class(es) {absent} absent from the evaluated patches"
    return ""


def evaluate(labels, prob, classes: list[str], positive: str | None = None, n_boot: int = 1000,
             ci: float = 0.95, seed: int = 0, groups=None) -> dict:
    """Metrics of one prediction set with percentile bootstrap CIs.

    Returns ``{metric: value, metric + "_ci_low": ..., metric + "_ci_high": ..., "n": n,
    "auroc_note": reason or ""}`` (plain floats; NaN where undefined).
    """
    y = encode(labels, classes)
    pos = classes.index(positive) if positive in classes else None
    point = scores(y, prob, positive=pos)
    out: dict = {m: float(point[m][0]) for m in METRICS}
    out["n"] = int(len(y))
    out["auroc_note"] = _auroc_note(y, classes)
    if n_boot > 0 and len(y) > 1:
        boot = scores(y, prob, bootstrap_weights(len(y), n_boot, seed, groups), positive=pos)
        lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
        for m in METRICS:
            v = boot[m][np.isfinite(boot[m])]
            ok = len(v) >= max(10, n_boot // 2) and not math.isnan(out[m])
            out[f"{m}_ci_low"] = float(np.quantile(v, lo_q)) if ok else float("nan")
            out[f"{m}_ci_high"] = float(np.quantile(v, hi_q)) if ok else float("nan")
    return out
