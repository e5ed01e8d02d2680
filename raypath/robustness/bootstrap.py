"""A paired bootstrap over patients for robustness comparisons (before vs after).

A difference between two feature stores is only shown with its uncertainty:
patients (tissues: a patient and any slide linked to it by ``pair_id``) are
resampled with replacement, the *same* draw for both stores, and each
headline metric is recomputed from per-tile (or per-patient) contributions
that were computed once: the site probe's out-of-fold predictions, the
KMeans assignments of every repeat, each tile's SO/OS neighbour counts, its
CRoMa margin and silhouette, the clustering-score assignment, per-cohort
sums for Calinski-Harabasz.  Nothing is refitted per resample (no KMeans,
no probe, no neighbour search), so 1,000 resamples take seconds, and the
resampled statistic on the full sample equals the headline number exactly.

A resample with multiplicities ``w`` equals the metric on a data set in
which every tile of a patient drawn ``w`` times appears ``w`` times.  The
95 % CI is the percentile interval of ``b - a`` over resamples; the verdict
is ``"tie"`` when it contains 0.  Metrics without a bootstrap here
(Davies-Bouldin, between/within distance ratio) get ``verdict: None`` and
the reason, never a winner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Resamples and confidence level of the comparison (issue 12: 1,000, 95 %).
N_BOOT = 1000
CI = 0.95
#: Headline metrics without a per-tile decomposition (shown without a winner).
NOT_RESAMPLED = {
    "cohort_davies_bouldin": "Davies-Bouldin needs each resample's centroids and spreads: not bootstrapped",
    "cohort_between_within_ratio": "mean pairwise distances are not bootstrapped",
}


@dataclass
class Contribution:
    """One metric as a function of patient multiplicities.

    ``units`` are the patient (tissue) ids of the contribution's rows, in the
    order of the first axis ``stat`` expects; ``stat(W)`` maps multiplicities
    ``[B, len(units)]`` to ``B`` metric values.
    """

    units: np.ndarray
    stat: Callable[[np.ndarray], np.ndarray]


def _units(unit_of_row) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted unit ids, unit index of each row)``."""
    return np.unique(np.asarray(unit_of_row).astype(str), return_inverse=True)


def _sum_by_index(inv: np.ndarray, n_units: int, values: np.ndarray) -> np.ndarray:
    """``[n_units, F]`` sums of the rows of ``values`` by unit index ``inv``."""
    from scipy import sparse

    m = sparse.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))), shape=(n_units, len(inv)))
    return np.asarray(m @ np.asarray(values, dtype=np.float64))


def _by_unit(unit_of_row, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the rows of ``values`` ``[N, F]`` per unit: ``(unit ids, [n_units, F] sums)``."""
    ids, inv = _units(unit_of_row)
    return ids, _sum_by_index(inv, len(ids), values)


def _cell_counts(unit_of_row, cells: np.ndarray, n_cells: int):
    """Sparse ``[n_units, n_cells]`` counts of each row's cell (e.g. cluster x cohort) per unit."""
    from scipy import sparse

    ids, inv = _units(unit_of_row)
    m = sparse.csr_matrix((np.ones(len(inv)), (inv, np.asarray(cells, dtype=np.int64))), shape=(len(ids), n_cells))
    return ids, m


def _apply(W: np.ndarray, sums) -> np.ndarray:
    """``W @ sums`` for dense or sparse ``sums`` (dense ``[B, F]`` result)."""
    return np.asarray((sums.T @ W.T).T) if hasattr(sums, "tocsr") else W @ sums


def balanced_accuracy_contrib(units, y, pred) -> Contribution:
    """Balanced accuracy (mean recall over the classes present) of fixed predictions."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    n = int(max(y.max(), pred.max())) + 1
    ids, sums = _cell_counts(units, y + n * (y == pred), 2 * n)  # [total per class | correct per class]

    def stat(W):
        agg = _apply(W, sums)
        total, correct = agg[:, :n] + agg[:, n:], agg[:, n:]
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(total > 0, correct / total, np.nan)
        return np.nanmean(recall, axis=1)

    return Contribution(ids, stat)


def purity_contrib(units, assign_all: np.ndarray, centre: np.ndarray, k: int) -> Contribution:
    """KMeans cohort purity from the fixed assignments of every repeat."""
    centre = np.asarray(centre, dtype=np.int64)
    n_l = int(centre.max()) + 1
    per_repeat = [_cell_counts(units, np.asarray(a, dtype=np.int64) * n_l + centre, k * n_l) for a in assign_all]
    ids = per_repeat[0][0]

    def stat(W):
        values = []
        for _, sums in per_repeat:
            counts = _apply(W, sums).reshape(len(W), k, n_l)
            size = counts.sum(-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                pur = np.where(size > 0, counts.max(-1) / size, np.nan)
            values.append(np.nanmean(pur, axis=1))
        return np.mean(values, axis=0)

    return Contribution(ids, stat)


def ratio_contrib(units, num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> Contribution:
    """``sum(num) / sum(den)`` (RI = SO / (SO + OS); a mean = sum / count)."""
    ids, sums = _by_unit(units, np.stack([num, den], axis=1).astype(np.float64))

    def stat(W):
        agg = W @ sums
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(agg[:, 1] > 0, agg[:, 0] / agg[:, 1], empty)

    return Contribution(ids, stat)


def _ari(cont: np.ndarray) -> np.ndarray:
    """Adjusted Rand index of ``[B, n_a, n_b]`` contingency tables (sklearn's formula)."""
    def comb2(x):
        return x * (x - 1) / 2.0

    n = cont.sum(axis=(1, 2))
    s_ij = comb2(cont).sum(axis=(1, 2))
    s_a, s_b = comb2(cont.sum(2)).sum(1), comb2(cont.sum(1)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = s_a * s_b / comb2(n)
        mx = (s_a + s_b) / 2.0
        out = (s_ij - expected) / (mx - expected)
    return np.where(mx == expected, 1.0, out)


def clustering_score_contrib(units, assign, biology, centre) -> Contribution:
    """ARI(biology, clusters) - ARI(centre, clusters) of a fixed assignment."""
    assign, biology, centre = (np.asarray(v, dtype=np.int64) for v in (assign, biology, centre))
    k = int(assign.max()) + 1
    nb, nc = int(biology.max()) + 1, int(centre.max()) + 1
    ids, bio = _cell_counts(units, biology * k + assign, nb * k)
    _, cen = _cell_counts(units, centre * k + assign, nc * k)

    def stat(W):
        return _ari(_apply(W, bio).reshape(-1, nb, k)) - _ari(_apply(W, cen).reshape(-1, nc, k))

    return Contribution(ids, stat)


def calinski_harabasz_contrib(units, Xn: np.ndarray, centre: np.ndarray) -> Contribution:
    """Calinski-Harabasz with cohorts as clusters, from per-patient, per-cohort
    counts, sums and sums of squares (exact for a resample)."""
    centre = np.asarray(centre, dtype=np.int64)
    n_l = int(centre.max()) + 1
    X = np.asarray(Xn, dtype=np.float64)
    ids, inv = _units(units)
    n_c = np.zeros((len(ids), n_l))
    S = np.zeros((len(ids), n_l, X.shape[1]))
    Q = np.zeros((len(ids), n_l))
    for c in range(n_l):
        rows = np.flatnonzero(centre == c)
        feats = np.concatenate([np.ones((len(rows), 1)), X[rows], (X[rows] ** 2).sum(1, keepdims=True)], axis=1)
        part = _sum_by_index(inv[rows], len(ids), feats)
        n_c[:, c], S[:, c], Q[:, c] = part[:, 0], part[:, 1:-1], part[:, -1]

    def stat(W):
        nn = W @ n_c
        SS = np.einsum("bp,pld->bld", W, S)
        QQ = W @ Q
        n, k = nn.sum(1), (nn > 0).sum(1)
        mean = SS.sum(1) / n[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            cent = SS / nn[:, :, None]
            between = np.nansum(nn * ((cent - mean[:, None, :]) ** 2).sum(-1), axis=1)
            within = np.nansum(QQ - (SS * SS).sum(-1) / nn, axis=1)
            return np.where((k > 1) & (within > 0), between * (n - k) / (within * (k - 1)), np.nan)

    return Contribution(ids, stat)


def croma_contribs(units, values: np.ndarray, alpha: float = 0.10) -> dict[str, Contribution]:
    """CRoMa median, worst-``alpha`` tail mean and fraction <= 0 of a resample,
    as ``numpy.median`` / ``numpy.percentile`` (linear) would give on the
    data set with every tile repeated by its patient's multiplicity."""
    ok = np.isfinite(values)
    order = np.argsort(values[ok], kind="stable")
    v = values[ok][order]
    ids, inv = np.unique(np.asarray(units).astype(str)[ok][order], return_inverse=True)

    def at(cw, j):  # element at 0-based position j of the expanded, sorted data
        return v[np.minimum(np.searchsorted(cw, j, side="right"), len(v) - 1)]

    def summary(W) -> np.ndarray:
        out = np.full((len(W), 3), np.nan)
        for b in range(len(W)):
            w = W[b, inv]
            cw = np.cumsum(w)
            tot = cw[-1] if len(cw) else 0
            if tot <= 0:
                continue
            out[b, 0] = (at(cw, (tot - 1) // 2) + at(cw, tot // 2)) / 2.0
            h = (tot - 1) * alpha
            lo, hi = at(cw, np.floor(h)), at(cw, np.ceil(h))
            q = lo + (h - np.floor(h)) * (hi - lo)
            tail = v <= q
            out[b, 1] = (w * v)[tail].sum() / w[tail].sum()
            out[b, 2] = w[v <= 0].sum() / tot
        return out

    def col(i):
        return lambda W: summary(W)[:, i]

    return {name: Contribution(ids, col(i))
            for i, name in enumerate(("croma_median", "croma_worst10_mean", "croma_frac_le_0"))}


def paired_bootstrap(
    contrib_a: dict[str, Contribution],
    contrib_b: dict[str, Contribution] | list[dict[str, Contribution]],
    n_boot: int = N_BOOT,
    ci: float = CI,
    seed: int = 0,
    chunk: int = 100,
) -> dict[str, dict]:
    """Percentile CI of ``b - a`` per metric, one patient draw shared by A and B.

    ``contrib_b`` may be a list (several B stores, e.g. one per LODO fold): the
    difference is then ``mean_i(b_i) - a`` under the same draw.  Returns
    ``{key: {"ci_low", "ci_high", "n_boot", "n_units"}}`` for the keys every
    side has.
    """
    bs = contrib_b if isinstance(contrib_b, list) else [contrib_b]
    keys = [k for k in contrib_a if all(k in b for b in bs)]
    if not keys or n_boot <= 0:
        return {}
    units = np.unique(np.concatenate([c[k].units.astype(str) for k in keys for c in [contrib_a, *bs]]))
    idx = {k: [np.searchsorted(units, c[k].units.astype(str)) for c in [contrib_a, *bs]] for k in keys}
    rng = np.random.default_rng(seed)
    deltas: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        W = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=m).astype(np.float64)
        for k in keys:
            ia, *ibs = idx[k]
            b_mean = np.mean([b[k].stat(W[:, ib]) for b, ib in zip(bs, ibs)], axis=0)
            deltas[k].append(b_mean - contrib_a[k].stat(W[:, ia]))
    out = {}
    for k in keys:
        d = np.concatenate(deltas[k])
        d = d[np.isfinite(d)]
        lo, hi = (np.quantile(d, [(1 - ci) / 2, 1 - (1 - ci) / 2]) if len(d) else (np.nan, np.nan))
        out[k] = {"ci_low": float(lo), "ci_high": float(hi), "n_boot": int(len(d)), "n_units": int(len(units))}
    return out


def verdict(delta: float | None, ci_low: float | None, ci_high: float | None, direction: str | None) -> str | None:
    """``"a"`` / ``"b"`` (the more robust side), ``"tie"`` when the CI contains 0,
    None without a direction or a CI."""
    if delta is None or direction is None or ci_low is None or ci_high is None:
        return None
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)) or ci_low <= 0.0 <= ci_high:
        return "tie"
    return "b" if (delta < 0) == (direction == "lower") else "a"


def contributions(X: np.ndarray, arrays: dict) -> dict[str, Contribution]:
    """Per-metric contributions of one analysis (:func:`raypath.robustness.api.analyse`'s
    ``arrays``), keyed by headline name; metrics that were skipped are absent.

    ``arrays["units"]`` is the patient (tissue) of each analysed tile; every
    other entry names the tiles (``rows``) a metric used and what it kept of
    them (predictions, assignments, neighbour counts, per-tile values).
    """
    from raypath.robustness.metrics import codes, l2_normalise

    units = np.asarray(arrays["units"]).astype(str)
    out: dict[str, Contribution] = {}
    if "probe" in arrays:
        a = arrays["probe"]
        out["site_probe_balanced_accuracy"] = balanced_accuracy_contrib(units[a["rows"]], a["y"], a["pred"])
    if "kmeans" in arrays and "assign_all" in arrays["kmeans"]:
        a = arrays["kmeans"]
        out["kmeans_purity"] = purity_contrib(units[a["rows"]], a["assign_all"], a["centre"], int(a["k"]))
    if "ri" in arrays:
        a = arrays["ri"]
        out["robustness_index"] = ratio_contrib(units[a["rows"]], a["so"], a["so"] + a["os"], empty=0.5)
    if "croma_rows" in arrays:
        out.update(croma_contribs(units[arrays["croma_rows"]], np.asarray(arrays["croma"], dtype=float)))
    if "clustering" in arrays:
        a = arrays["clustering"]
        out["clustering_score"] = clustering_score_contrib(units[a["rows"]], a["assign"], a["biology"], a["centre"])
    if "silhouette" in arrays:
        a = arrays["silhouette"]
        out["cohort_silhouette"] = ratio_contrib(units[a["rows"]], a["values"], np.ones(len(a["rows"])))
    if "ch" in arrays:
        a = arrays["ch"]
        out["cohort_calinski_harabasz"] = calinski_harabasz_contrib(
            units[a["rows"]], l2_normalise(X[a["rows"]]), codes(a["centre"])[0])
    return out
