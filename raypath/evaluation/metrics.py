"""Evaluation metrics: survival concordance, classification scores, and
summaries over repeats.

:func:`harrell_c_index` is implemented here (vectorised, O(n^2) in row
chunks) with the same pair definition as
``sksurv.metrics.concordance_index_censored``: a pair (i, j) is comparable
when i has an event and ``t_i < t_j``, or ``t_i == t_j`` and j is censored;
it is concordant when ``risk_i > risk_j`` and counts 1/2 when the risks are
tied (``|risk_i - risk_j| <= tied_tol``).  The tests check it against
sksurv and lifelines on random data with tied times, tied risks and
censoring.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def harrell_c_index(
    time,
    event,
    risk,
    tied_tol: float = 1e-8,
    return_counts: bool = False,
):
    """Harrell's concordance index of a risk score (higher = earlier event).

    Parameters
    ----------
    time, event, risk
        Follow-up time, event indicator (1 = event) and predicted risk.
    tied_tol
        Risks closer than this count as tied (half a concordant pair).
    return_counts
        Also return ``(concordant, discordant, tied_risk, tied_time)``.

    Returns
    -------
    The C-index, or NaN when there is no comparable pair.
    """
    t = np.asarray(time, dtype=float).reshape(-1)
    d = np.asarray(event).astype(bool).reshape(-1)
    r = np.asarray(risk, dtype=float).reshape(-1)
    if not (len(t) == len(d) == len(r)):
        raise ValueError("time, event and risk must have the same length")
    conc = disc = tied_r = tied_t = 0.0
    ev = np.flatnonzero(d)
    chunk = max(1, 4_000_000 // max(len(t), 1))
    for start in range(0, len(ev), chunk):
        i = ev[start : start + chunk]
        ti, ri = t[i][:, None], r[i][:, None]
        comparable = (t[None, :] > ti) | ((t[None, :] == ti) & ~d[None, :])
        diff = ri - r[None, :]
        tie = np.abs(diff) <= tied_tol
        conc += float(np.sum(comparable & ~tie & (diff > 0)))
        disc += float(np.sum(comparable & ~tie & (diff < 0)))
        tied_r += float(np.sum(comparable & tie))
        tied_t += float(np.sum((t[None, :] == ti) & ~d[None, :]))
    total = conc + disc + tied_r
    c = (conc + 0.5 * tied_r) / total if total > 0 else float("nan")
    if return_counts:
        return c, int(conc), int(disc), int(tied_r), int(tied_t)
    return c


def _surv_array(time, event):
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, dtype=float))


def uno_c_index(train_time, train_event, test_time, test_event, risk, tau=None) -> float:
    """Uno's IPCW C-index (sksurv); NaN where it is not defined.

    Censoring weights come from the training set; ``tau`` defaults to the
    largest test time below the training follow-up.
    """
    from sksurv.metrics import concordance_index_ipcw

    try:
        tr = _surv_array(train_time, train_event)
        te = _surv_array(test_time, test_event)
        if tau is None:
            tau = float(np.max(np.asarray(train_time, dtype=float)[np.asarray(train_event) == 1]))
        return float(concordance_index_ipcw(tr, te, np.asarray(risk, dtype=float), tau=tau)[0])
    except Exception:  # noqa: BLE001 - undefined cases (no events, out of range) -> NaN
        return float("nan")


def time_dependent_auc(
    train_time, train_event, test_time, test_event, risk, times=None
) -> tuple[float, np.ndarray, np.ndarray]:
    """Cumulative/dynamic AUC (sksurv) at ``times`` (default: the 25/50/75 %
    quantiles of test event times inside the training follow-up).

    Returns ``(mean_auc, times, auc_at_times)``; NaN where undefined.
    """
    from sksurv.metrics import cumulative_dynamic_auc

    nan = (float("nan"), np.zeros(0), np.zeros(0))
    try:
        tr = _surv_array(train_time, train_event)
        te = _surv_array(test_time, test_event)
        tt = np.asarray(test_time, dtype=float)
        te_ev = np.asarray(test_event).astype(bool)
        if times is None:
            lo = max(tt.min(), np.asarray(train_time, dtype=float).min())
            hi = min(tt.max(), np.asarray(train_time, dtype=float).max())
            cand = tt[te_ev & (tt > lo) & (tt < hi)]
            if len(cand) < 2:
                return nan
            times = np.unique(np.quantile(cand, [0.25, 0.5, 0.75]))
        auc, mean_auc = cumulative_dynamic_auc(tr, te, np.asarray(risk, dtype=float), times)
        return float(mean_auc), np.asarray(times), np.asarray(auc)
    except Exception:  # noqa: BLE001
        return nan


def classification_metrics(label, prob) -> dict[str, float]:
    """AUROC (one-vs-rest for K > 2), balanced accuracy and F1 (macro).

    ``prob`` is [n, K] class probabilities (or [n] probability of class 1).
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(label).astype(int)
    p = np.asarray(prob, dtype=float)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    pred = p.argmax(axis=1)
    out = {
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="macro")),
    }
    try:
        if p.shape[1] == 2:
            out["auroc"] = float(roc_auc_score(y, p[:, 1]))
        else:
            out["auroc"] = float(
                roc_auc_score(y, p, multi_class="ovr", labels=list(range(p.shape[1])))
            )
    except ValueError:  # one class present
        out["auroc"] = float("nan")
    return out


#: A C-index from fewer comparable pairs is not reported (NaN, with the reason).
MIN_COMPARABLE_PAIRS = 10


def concordance(time, event, risk, strata=None, min_pairs: int = MIN_COMPARABLE_PAIRS) -> dict:
    """Harrell's C with its number of comparable pairs, optionally stratified.

    Parameters
    ----------
    time, event, risk
        One row per unit (patient).
    strata
        Optional stratum per row (e.g. the cohort): pairs are only compared
        within a stratum and the counts summed over strata, so an offset of
        the predicted risk between strata (sites) cannot move the score.
    min_pairs
        Below this many comparable pairs the C-index is NaN and
        ``c_index_note`` says why.

    Returns
    -------
    ``{"c_index", "n_comparable_pairs", "c_index_note"}`` (note None when reported).
    """
    t, d, r = (np.asarray(x).reshape(-1) for x in (time, event, risk))
    groups = [np.arange(len(t))] if strata is None else [
        np.flatnonzero(np.asarray(strata).astype(str) == g) for g in sorted(set(np.asarray(strata).astype(str)))]
    conc = disc = tied = 0
    for rows in groups:
        _, c_, d_, tr_, _ = harrell_c_index(t[rows], d[rows], r[rows], return_counts=True)
        conc, disc, tied = conc + c_, disc + d_, tied + tr_
    n = int(conc + disc + tied)
    if n < min_pairs:
        return {"c_index": float("nan"), "n_comparable_pairs": n,
                "c_index_note": f"only {n} comparable pair(s) (< {min_pairs}): C-index not reported"}
    return {"c_index": (conc + 0.5 * tied) / n, "n_comparable_pairs": n, "c_index_note": None}


def per_patient(frame, by=("patient_id",)):
    """One row per patient (per ``by`` group): the mean risk of its slides, its
    time and event (a patient with two slides counts once in a C-index)."""
    cols = list(by)
    g = frame.groupby(cols, sort=True, dropna=False)
    return g.agg(time=("time", "first"), event=("event", "max"), risk=("risk", "mean")).reset_index()


def survival_metrics(
    time, event, risk, train_time=None, train_event=None, patients=None, strata=None
) -> dict[str, float]:
    """Harrell's C (with ``n_comparable_pairs``), and Uno's C and mean
    time-dependent AUC when training times are given.

    With ``patients`` the slides are first averaged per patient (mean risk);
    with ``strata`` (e.g. cohort per slide) the C-index compares pairs only
    within a stratum, and a patient with slides in two strata counts once in
    each; Uno's C and the AUC are then not computed (they pool all pairs).
    """
    import pandas as pd

    frame = pd.DataFrame({"time": np.asarray(time, dtype=float).reshape(-1),
                          "event": np.asarray(event).astype(int).reshape(-1),
                          "risk": np.asarray(risk, dtype=float).reshape(-1)})
    by = []
    if strata is not None:
        frame["stratum"] = np.asarray(strata).astype(str)
        by.append("stratum")
    if patients is not None:
        frame["patient_id"] = np.asarray(patients).astype(str)
        by.append("patient_id")
        frame = per_patient(frame, by)
    out = concordance(frame["time"], frame["event"], frame["risk"],
                      frame["stratum"] if strata is not None else None)
    if train_time is not None and strata is None:
        # Uno's C ranks the same pairs (censoring-weighted): not reported when Harrell's is not
        out["uno_c"] = (uno_c_index(train_time, train_event, frame["time"], frame["event"], frame["risk"])
                        if out["c_index_note"] is None else float("nan"))
        out["td_auc"] = time_dependent_auc(train_time, train_event, frame["time"], frame["event"], frame["risk"])[0]
    out["n_patients" if patients is not None else "n_units"] = int(len(frame))
    return out


def summarize(values: Iterable[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean, sample sd, n and a percentile bootstrap CI of the mean over
    repeats/folds (NaNs dropped)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"mean": None, "sd": None, "n": 0, "ci_low": None, "ci_high": None}
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if len(v) > 1:
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    else:
        lo = hi = v[0]
    return {"mean": float(v.mean()), "sd": sd, "n": int(len(v)), "ci_low": float(lo), "ci_high": float(hi)}
