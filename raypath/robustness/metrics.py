"""Robustness metrics: how much of the feature space is site, how much is biology.

Plain functions over arrays (``X [N, D]`` and per-row label arrays) that tests
and notebooks call directly; :mod:`raypath.robustness.api` feeds them from a
feature store.  Definitions follow ``METHODS.md`` ("Robustness metrics") and
the PathoROB / ``croma`` reference (RI, CRoMa, clustering score).

Geometry: every distance-based metric works on L2-normalised features, so
features of different models (or before/after adaptation, whose norms differ)
are compared on one scale; Euclidean distance on the unit sphere is a
monotone function of cosine distance.

Memory: neighbour searches are exact but chunked over query rows, so the
largest temporary is ``chunk_rows x N`` floats (bounded by
``memory_bytes``), never ``N x N``.  :func:`cap_per_group` subsamples
slide-balanced when ``N`` is too large for the time budget.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from raypath.errors import RaypathError

log = logging.getLogger(__name__)

#: Candidate neighbourhood sizes for RI when k is chosen by kNN balanced accuracy.
DEFAULT_K_CANDIDATES = (1, 3, 5, 10, 20, 30, 50)
#: Rows above which KMeans runs as MiniBatchKMeans.
MINIBATCH_KMEANS_ABOVE = 10_000
#: Default budget for one chunk of the distance matrix.
DEFAULT_MEMORY_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- helpers


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / (norms + 1e-12)


def codes(values: Sequence) -> tuple[np.ndarray, list]:
    """Integer codes in order of first appearance and the list of levels."""
    c, levels = pd.factorize(pd.Series(list(values) if not isinstance(values, pd.Series) else values))
    return c.astype(np.int64), list(levels)


def cap_per_group(groups: np.ndarray, max_total: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a slide-balanced subsample of at most ``max_total`` rows.

    Every group (slide) keeps ``min(n_group, t)`` random rows with the largest
    ``t`` that fits, so small slides are never dropped in favour of big ones.
    Returns sorted indices (all rows when ``max_total`` is None or not exceeded).
    """
    n = len(groups)
    if max_total is None or n <= max_total:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    g, _ = codes(groups)
    counts = np.bincount(g)
    # largest per-group cap t with sum(min(counts, t)) <= max_total
    lo, hi = 0, int(counts.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= max_total:
            lo = mid
        else:
            hi = mid - 1
    t = max(lo, 1)
    # rank of each row within its group under a random order
    perm = rng.permutation(n)
    order = perm[np.argsort(g[perm], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    keep = np.flatnonzero(rank < t)
    if len(keep) > max_total:  # t == 1 with more groups than max_total
        keep = np.sort(rng.choice(keep, max_total, replace=False))
    return keep


def chunk_rows_for(
    n_columns: int, memory_bytes: int = DEFAULT_MEMORY_BYTES, bytes_per_cell: int = 24
) -> int:
    """Query rows per chunk so that the ``rows x n_columns`` temporaries fit the budget.

    ``bytes_per_cell`` counts every temporary of one cell: float32 distances,
    their masked and partitioned copies, int64 partition indices, boolean masks.
    """
    return int(max(1, min(n_columns, memory_bytes // max(1, bytes_per_cell * n_columns))))


def iter_cosine_distance_chunks(
    Xn: np.ndarray, chunk_rows: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, D)`` with ``D = 1 - Xn[start:stop] @ Xn.T`` (cosine distance)."""
    n = len(Xn)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        D = Xn[start:stop] @ Xn.T
        np.subtract(1.0, D, out=D)
        yield start, stop, D


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y_true, y_pred))


# --------------------------------------------------------------------------- neighbours


def neighbours_excluding_groups(
    X: np.ndarray,
    groups: np.ndarray,
    k: int,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k nearest neighbours of every row, ignoring rows of its own group.

    Parameters
    ----------
    X
        ``[N, D]`` features (normalised here).
    groups
        ``[N]`` group per row (slide id): neighbours from the same group are
        never counted (tiles of one slide are not independent).
    k
        Neighbours per row.
    memory_bytes
        Budget for one chunk of the distance matrix.

    Returns
    -------
    (idx, dist)
        ``[N, k]`` neighbour indices sorted by distance (``-1`` where fewer than
        ``k`` rows of other groups exist) and their cosine distances (``inf``).
    """
    Xn = l2_normalise(X)
    g, _ = codes(groups)
    n = len(Xn)
    k = int(k)
    idx_out = np.full((n, k), -1, dtype=np.int64)
    dist_out = np.full((n, k), np.inf, dtype=np.float32)
    if n < 2 or k < 1:
        return idx_out, dist_out
    kk = min(k, n - 1)
    for start, stop, D in iter_cosine_distance_chunks(Xn, chunk_rows_for(n, memory_bytes)):
        D[g[start:stop, None] == g[None, :]] = np.inf
        part = np.argpartition(D, kk - 1, axis=1)[:, :kk]
        pd_ = np.take_along_axis(D, part, axis=1)
        order = np.argsort(pd_, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        pd_ = np.take_along_axis(pd_, order, axis=1)
        invalid = ~np.isfinite(pd_)
        part[invalid] = -1
        idx_out[start:stop, :kk] = part
        dist_out[start:stop, :kk] = pd_
    return idx_out, dist_out


def knn_balanced_accuracy_by_k(
    labels: np.ndarray, neigh_idx: np.ndarray, k_values: Sequence[int]
) -> dict[int, float]:
    """Balanced accuracy of a k-NN majority vote predicting ``labels`` (leave-group-out).

    ``neigh_idx`` comes from :func:`neighbours_excluding_groups`; rows without
    any neighbour are left out.
    """
    y, _ = codes(labels)
    n_labels = int(y.max()) + 1 if len(y) else 0
    out: dict[int, float] = {}
    for k in k_values:
        k = int(k)
        sub = neigh_idx[:, :k]
        valid = sub >= 0
        used = valid.any(axis=1)
        if not used.any():
            continue
        # invalid slots vote for a phantom label that never wins over a real one
        lab = np.where(valid, y[np.where(valid, sub, 0)], n_labels)
        counts = np.zeros((len(lab), n_labels + 1), dtype=np.int64)
        rows = np.repeat(np.arange(len(lab)), lab.shape[1])
        np.add.at(counts, (rows, lab.ravel()), 1)
        pred = counts[:, :n_labels].argmax(axis=1)
        out[k] = balanced_accuracy(y[used], pred[used])
    return out


# --------------------------------------------------------------------------- RI


def robustness_index_chance(biology: np.ndarray, centre: np.ndarray, groups: np.ndarray) -> float:
    """RI expected if neighbours were drawn at random among tiles of other slides.

    0.5 only for a balanced 2 x 2 design; with C centres and B classes balanced
    it is ``(C-1) / ((C-1) + (B-1))`` (e.g. 0.75 for 4 centres, 2 classes), so
    an RI must be read against this value, not against 0.5.
    """
    df = pd.DataFrame({"b": codes(biology)[0], "c": codes(centre)[0], "g": codes(groups)[0]})
    n = len(df)
    n_b = df.groupby("b")["b"].transform("size").to_numpy()
    n_c = df.groupby("c")["c"].transform("size").to_numpy()
    n_bc = df.groupby(["b", "c"])["b"].transform("size").to_numpy()
    n_g = df.groupby("g")["g"].transform("size").to_numpy()
    n_gb = df.groupby(["g", "b"])["g"].transform("size").to_numpy()
    n_gc = df.groupby(["g", "c"])["g"].transform("size").to_numpy()
    n_gbc = df.groupby(["g", "b", "c"])["g"].transform("size").to_numpy()
    # SO/OS candidates among other slides (same-slide ones removed)
    so = (n_b - n_bc) - (n_gb - n_gbc)
    os_ = (n_c - n_bc) - (n_gc - n_gbc)
    others = np.maximum(n - n_g, 1)
    p_so, p_os = so / others, os_ / others
    tot = float((p_so + p_os).sum())
    return float(p_so.sum() / tot) if tot > 0 else 0.5



def robustness_index(
    X: np.ndarray,
    biology: np.ndarray,
    centre: np.ndarray,
    groups: np.ndarray,
    k: int | None = None,
    k_candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> dict:
    """Robustness index RI(k) (PathoROB / croma definition).

    For each tile, take its ``k`` nearest neighbours by cosine distance among
    tiles of *other* slides; count SO neighbours (same biology, other centre)
    and OS neighbours (other biology, same centre).
    ``RI = sum SO / (sum SO + sum OS)``: 1 = biology dominates the
    neighbourhoods, 0 = centre dominates, 0.5 = neutral.

    Parameters
    ----------
    X, biology, centre, groups
        Features ``[N, D]`` and per-row biology label, centre (cohort/site)
        and group (slide) — neighbours from the same group are excluded.
    k
        Neighbourhood size; ``None`` picks the candidate with the best k-NN
        balanced accuracy for predicting biology (croma's rule; first best wins).
    k_candidates
        Candidates for the selection; also the k's of the reported RI curve.

    Returns
    -------
    dict
        ``ri``, ``chance`` (RI of random neighbours, see
        :func:`robustness_index_chance`), ``k``, ``k_selection``, ``curve`` {k: RI}, ``knn_balanced_accuracy``
        {k: BA}, ``n_so``, ``n_os`` at ``k``, ``support`` (fraction of tiles with
        at least one SO or OS neighbour), ``n_samples``.
    """
    b, _ = codes(biology)
    c, _ = codes(centre)
    cands = sorted({int(v) for v in k_candidates} | ({int(k)} if k is not None else set()))
    if not cands or min(cands) < 1:
        raise RaypathError(f"RI k candidates must be positive integers, got {list(k_candidates)}")
    kmax = max(cands)
    idx, _dist = neighbours_excluding_groups(X, groups, kmax, memory_bytes)
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    same_b = b[safe] == b[:, None]
    same_c = c[safe] == c[:, None]
    so = np.cumsum(valid & same_b & ~same_c, axis=1)
    os_ = np.cumsum(valid & ~same_b & same_c, axis=1)

    def ri_at(kv: int) -> tuple[float, int, int, float]:
        s, o = int(so[:, kv - 1].sum()), int(os_[:, kv - 1].sum())
        informative = (so[:, kv - 1] + os_[:, kv - 1]) > 0
        return (s / (s + o) if s + o > 0 else 0.5), s, o, float(informative.mean())

    curve = {kv: ri_at(kv)[0] for kv in cands}
    order = [int(v) for v in dict.fromkeys(k_candidates)] if k is None else cands
    ba = knn_balanced_accuracy_by_k(b, idx, cands)
    if k is None:
        scored = [kv for kv in order if kv in ba]
        k_sel = max(scored, key=lambda kv: (ba[kv], -scored.index(kv))) if scored else order[0]
        how = "knn_balanced_accuracy"
    else:
        k_sel, how = int(k), "fixed"
    ri, s, o, support = ri_at(k_sel)
    return {
        # per-tile SO / OS counts at k (a bootstrap over patients resamples these, never the neighbours)
        "so_per_sample": so[:, k_sel - 1].copy(),
        "os_per_sample": os_[:, k_sel - 1].copy(),
        "ri": ri,
        "chance": robustness_index_chance(biology, centre, groups),
        "k": k_sel,
        "k_selection": how,
        "curve": {str(kv): v for kv, v in curve.items()},
        "knn_balanced_accuracy": {str(kv): v for kv, v in ba.items()},
        "n_so": s,
        "n_os": o,
        "support": support,
        "n_samples": int(len(b)),
    }


# --------------------------------------------------------------------------- CRoMa


def croma_per_sample(
    X: np.ndarray,
    biology: np.ndarray,
    centre: np.ndarray,
    groups: np.ndarray,
    m: int = 5,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> np.ndarray:
    """Per-tile cross-confounder robustness margin ``(d_OS - d_SO) / (d_OS + d_SO)``.

    ``d_SO`` / ``d_OS`` are the mean cosine distances to the ``m`` nearest SO
    (same biology, other centre) and OS (other biology, same centre) tiles of
    other slides.  NaN where fewer than ``m`` of either kind exist or both
    distances are 0.  Exact: each chunk of rows sees every candidate.
    """
    Xn = l2_normalise(X)
    b, _ = codes(biology)
    c, _ = codes(centre)
    g, _ = codes(groups)
    n = len(Xn)
    out = np.full(n, np.nan, dtype=np.float64)
    m = int(m)
    if n < 2 or m < 1:
        return out
    for start, stop, D in iter_cosine_distance_chunks(Xn, chunk_rows_for(n, memory_bytes, 40)):
        other_group = g[start:stop, None] != g[None, :]
        same_b = b[start:stop, None] == b[None, :]
        same_c = c[start:stop, None] == c[None, :]
        means = []
        for mask in (other_group & same_b & ~same_c, other_group & ~same_b & same_c):
            Dm = np.where(mask, D, np.inf)
            mm = min(m, n)
            near = np.partition(Dm, mm - 1, axis=1)[:, :mm].astype(np.float64)
            means.append(near.mean(axis=1) if mm == m else np.full(stop - start, np.inf))
        d_so, d_os = means
        with np.errstate(invalid="ignore", divide="ignore"):
            val = (d_os - d_so) / (d_os + d_so)
        val[~np.isfinite(d_so) | ~np.isfinite(d_os) | ((d_os + d_so) == 0)] = np.nan
        out[start:stop] = val
    return out


def croma_summary(values: np.ndarray, alpha: float = 0.10) -> dict:
    """Median, worst-``alpha`` tail mean, and fraction <= 0 of per-tile CRoMa values.

    The tail is the values at or below the ``alpha`` quantile (croma's
    ``ltm_alpha``).  NaN values (tiles without enough typed neighbours) are left
    out and counted in ``n_undefined``.
    """
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if len(finite) == 0:
        return {"median": None, "worst_tail_mean": None, "q_alpha": None,
                "frac_le_0": None, "alpha": alpha, "n": 0, "n_undefined": int(len(v))}
    q = float(np.percentile(finite, alpha * 100))
    return {
        "median": float(np.median(finite)),
        "worst_tail_mean": float(finite[finite <= q].mean()),
        "q_alpha": q,
        "frac_le_0": float(np.mean(finite <= 0.0)),
        "alpha": alpha,
        "n": int(len(finite)),
        "n_undefined": int(len(v) - len(finite)),
    }


def croma(
    X: np.ndarray,
    biology: np.ndarray,
    centre: np.ndarray,
    groups: np.ndarray,
    m: int = 5,
    alpha: float = 0.10,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> dict:
    """CRoMa: per-tile margins summarised (see :func:`croma_per_sample`, :func:`croma_summary`).

    > 0 = the biological match is nearer than the same-centre impostor
    (robust); < 0 = centre wins.  Neutral 0.
    """
    vals = croma_per_sample(X, biology, centre, groups, m, memory_bytes)
    return {**croma_summary(vals, alpha), "m": int(m)}


# --------------------------------------------------------------------------- site probe


def site_probe(
    X: np.ndarray,
    centre: np.ndarray,
    patients: np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """Balanced accuracy of a logistic regression predicting the centre from features.

    Cross-validated with ``StratifiedGroupKFold`` grouped by patient, so no
    patient is in train and test; out-of-fold predictions are pooled.
    Lower = less site information; chance = 1 / n_centres.

    Returns
    -------
    dict
        ``balanced_accuracy``, ``chance``, ``n_splits``, ``fold_balanced_accuracy``,
        ``n_samples``, ``n_classes``, ``n_patients``; or ``skipped`` with a reason.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y, levels = codes(centre)
    grp, _ = codes(patients)
    n_classes, n_groups = len(levels), int(grp.max()) + 1 if len(grp) else 0
    if n_classes < 2:
        return {"skipped": f"site probe needs >= 2 centres, found {n_classes}"}
    splits = int(min(n_splits, n_groups))
    if splits < 2:
        return {"skipped": f"site probe needs >= 2 patients, found {n_groups}"}
    cv = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    pred = np.full(len(y), -1, dtype=np.int64)
    fold_ba = []
    Xf = np.asarray(X, dtype=np.float32)
    for train, test in cv.split(Xf, y, grp):
        if len(np.unique(y[train])) < 2:
            # one centre in the training fold: the classifier can only say that centre
            pred[test] = y[train][0]
        else:
            clf = make_pipeline(
                StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
            )
            clf.fit(Xf[train], y[train])
            pred[test] = clf.predict(Xf[test])
        # a fold holding one centre only has no balanced accuracy of its own
        fold_ba.append(balanced_accuracy(y[test], pred[test]) if len(np.unique(y[test])) > 1 else None)
    return {
        "balanced_accuracy": balanced_accuracy(y, pred),
        "oof_pred": pred,  # out-of-fold prediction per row (resampled by the comparison's bootstrap)
        "y": y,
        "chance": 1.0 / n_classes,
        "n_splits": splits,
        "fold_balanced_accuracy": fold_ba,
        "n_samples": int(len(y)),
        "n_classes": n_classes,
        "n_patients": n_groups,
        "classes": [str(v) for v in levels],
    }


# --------------------------------------------------------------------------- cohort-as-cluster


def _mean_pairwise_distance(A: np.ndarray, B: np.ndarray | None = None) -> float:
    """Mean Euclidean distance over pairs (within A excluding the diagonal, or A x B)."""
    same = B is None
    B = A if B is None else B
    sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    d = np.sqrt(np.maximum(sq, 0.0))
    if same:
        n = len(A)
        return float((d.sum() - np.trace(d)) / max(1, n * (n - 1)))
    return float(d.mean())


def cohort_cluster_metrics(
    X: np.ndarray,
    centre: np.ndarray,
    seed: int = 0,
    max_per_cohort: int = 2000,
    silhouette_max_samples: int = 10000,
) -> dict:
    """Cohorts seen as clusters in feature space (L2-normalised features).

    Returns
    -------
    dict
        ``within_cohort_distance`` (mean pairwise distance inside a cohort,
        averaged over cohorts; per cohort too), ``between_centroid_distance``
        (mean distance between cohort centroids), their ``ratio``
        (between / within: ~0 = cohorts overlap), ``silhouette`` (-1..1, ~0 or
        below = cohorts mixed), ``calinski_harabasz`` (higher = cohorts more
        separated), ``davies_bouldin`` (lower = more separated).
    """
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

    Xn = l2_normalise(X)
    y, levels = codes(centre)
    if len(levels) < 2:
        return {"skipped": f"cohort-as-cluster metrics need >= 2 cohorts, found {len(levels)}"}
    rng = np.random.default_rng(seed)
    within = {}
    centroids = []
    for ci, name in enumerate(levels):
        rows = np.flatnonzero(y == ci)
        centroids.append(Xn[rows].mean(0))
        if len(rows) > max_per_cohort:
            rows = rng.choice(rows, max_per_cohort, replace=False)
        within[str(name)] = _mean_pairwise_distance(Xn[rows].astype(np.float64)) if len(rows) > 1 else 0.0
    cent = np.stack(centroids).astype(np.float64)
    between = _mean_pairwise_distance(cent)
    within_mean = float(np.mean(list(within.values())))
    n_sil = min(len(Xn), silhouette_max_samples)
    sil_rows, sil_values = silhouette_per_sample(Xn, y, n_sil, seed)
    return {
        "within_cohort_distance": within_mean,
        "within_cohort_distance_per_cohort": within,
        "between_centroid_distance": between,
        "between_within_ratio": between / within_mean if within_mean > 0 else None,
        "silhouette": float(np.mean(sil_values)),
        "silhouette_rows": sil_rows,
        "silhouette_per_sample": sil_values,
        "silhouette_n_samples": int(n_sil),
        "calinski_harabasz": float(calinski_harabasz_score(Xn, y)),
        "davies_bouldin": float(davies_bouldin_score(Xn, y)),
        "n_samples": int(len(Xn)),
        "n_cohorts": len(levels),
    }


def silhouette_per_sample(Xn: np.ndarray, y: np.ndarray, n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, values)``: per-sample silhouette on the subsample
    ``sklearn.metrics.silhouette_score(..., sample_size=n_samples, random_state=seed)``
    draws, so ``values.mean()`` is that score exactly (all rows when ``n_samples >= N``)."""
    from sklearn.metrics import silhouette_samples
    from sklearn.utils import check_random_state

    rows = np.arange(len(Xn))
    if n_samples < len(Xn):
        rows = check_random_state(seed).permutation(len(Xn))[:n_samples]
    return rows, silhouette_samples(Xn[rows], np.asarray(y)[rows])


# --------------------------------------------------------------------------- KMeans purity


def _kmeans(Xn: np.ndarray, k: int, seed: int, n_init: int = 1):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    # Full Lloyd is O(N k D) per iteration and needs many iterations: measured
    # here at ~5 min per repeat for 20k x 384, k=200 on a loaded 2-core machine.
    # Beyond 10k rows the mini-batch variant gives the same purity picture in a
    # fraction of the time.
    if len(Xn) > MINIBATCH_KMEANS_ABOVE:
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=4096).fit(Xn)
    return KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(Xn)


def cluster_purity(assign: np.ndarray, labels: np.ndarray, n_clusters: int | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Purity = max label share per cluster, averaged over non-empty clusters.

    Returns ``(mean purity, per-cluster purity, per-cluster [n_clusters, n_labels] counts)``.
    """
    y, levels = codes(labels)
    k = int(n_clusters if n_clusters is not None else assign.max() + 1)
    counts = np.zeros((k, len(levels)), dtype=np.int64)
    np.add.at(counts, (assign, y), 1)
    sizes = counts.sum(1)
    nonempty = sizes > 0
    purity = np.full(k, np.nan)
    purity[nonempty] = counts[nonempty].max(1) / sizes[nonempty]
    return float(np.nanmean(purity)), purity, counts


def effective_kmeans_k(k: int, n_samples: int, min_cluster_size: int = 20) -> int:
    """``k`` capped so clusters hold ~``min_cluster_size`` tiles on average.

    With tiny clusters purity is high by chance (a 2-tile cluster is pure
    half of the time), so small data sets get fewer clusters.
    """
    return int(max(2, min(int(k), n_samples // max(1, min_cluster_size))))


def kmeans_purity(
    X: np.ndarray,
    centre: np.ndarray,
    k: int = 200,
    repeats: int = 20,
    seed: int = 0,
    min_cluster_size: int = 20,
    n_permutations: int = 5,
) -> dict:
    """KMeans cohort purity (Bøe et al.): cluster, then how cohort-pure are the clusters?

    Each repeat runs KMeans with a new seed on L2-normalised features; purity
    = max cohort share per cluster, mean over clusters.  Lower = more mixing.
    ``chance_purity`` is the same statistic with cohort labels shuffled across
    tiles (same clusters), i.e. what full mixing would give for these cluster
    sizes; ``majority_share`` is the largest cohort's overall share.

    Returns
    -------
    dict
        ``purity`` (mean over repeats), ``purity_std``, ``purity_per_repeat``,
        ``chance_purity``, ``majority_share``, ``k`` (used), ``k_requested``,
        ``repeats``, ``n_samples``, and ``clusters`` of the first repeat
        (size, purity, majority cohort per cluster) for plots; ``assign`` and
        ``centres`` of the first repeat are returned for galleries.
    """
    Xn = l2_normalise(X)
    y, levels = codes(centre)
    n = len(Xn)
    if n < 4:
        return {"skipped": f"KMeans purity needs >= 4 tiles, found {n}"}
    k_used = effective_kmeans_k(k, n, min_cluster_size)
    rng = np.random.default_rng(seed)
    per_repeat, chance, assign_all = [], [], []
    first = None
    for r in range(int(repeats)):
        km = _kmeans(Xn, k_used, seed + r)
        assign = km.labels_.astype(np.int64)
        assign_all.append(assign)
        p, per_cluster, counts = cluster_purity(assign, y, k_used)
        per_repeat.append(p)
        for _ in range(int(n_permutations)):
            chance.append(cluster_purity(assign, rng.permutation(y), k_used)[0])
        if first is None:
            first = (assign, km.cluster_centers_, per_cluster, counts)
    assign, centres_, per_cluster, counts = first
    majority = counts.argmax(1)
    return {
        "purity": float(np.mean(per_repeat)),
        "purity_std": float(np.std(per_repeat)),
        "purity_per_repeat": [float(v) for v in per_repeat],
        "chance_purity": float(np.mean(chance)) if chance else None,
        "majority_share": float(np.bincount(y).max() / n),
        "k": k_used,
        "k_requested": int(k),
        "repeats": int(repeats),
        "n_samples": int(n),
        "cohorts": [str(v) for v in levels],
        "clusters": {
            "size": counts.sum(1).tolist(),
            "purity": [None if not np.isfinite(v) else float(v) for v in per_cluster],
            "majority_cohort": [str(levels[i]) for i in majority],
            "counts": counts.tolist(),
        },
        "assign": assign,
        "assign_all": np.stack(assign_all),  # [repeats, N]: fixed clusters for the comparison's bootstrap
        "centres": centres_,
    }


# --------------------------------------------------------------------------- clustering score


def clustering_score(
    X: np.ndarray,
    biology: np.ndarray,
    centre: np.ndarray,
    k: int | None = None,
    k_candidates: Sequence[int] = tuple(range(2, 11)),
    seed: int = 0,
    n_init: int = 2,
    silhouette_max_samples: int = 5000,
) -> dict:
    """PathoROB clustering score ``ARI(biology, KMeans) - ARI(centre, KMeans)``.

    KMeans on L2-normalised features; ``k`` = the candidate with the best
    cosine silhouette when not given (PathoROB's rule).  Range -1..1: > 0 =
    clusters follow biology more than centre, 0 neutral, < 0 = clusters follow
    centre.
    """
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    Xn = l2_normalise(X)
    n = len(Xn)
    if k is None:
        cands = [int(v) for v in k_candidates if 2 <= int(v) < n]
        if not cands:
            return {"skipped": f"clustering score needs more tiles than clusters (n={n})"}
        sil = {}
        for kv in cands:
            assign = _kmeans(Xn, kv, seed, n_init).labels_
            sil[kv] = float(
                silhouette_score(
                    Xn, assign, metric="cosine",
                    sample_size=min(n, silhouette_max_samples) if n > silhouette_max_samples else None,
                    random_state=seed,
                )
            )
        k_sel, how = max(cands, key=lambda kv: sil[kv]), "silhouette"
    else:
        k_sel, how, sil = int(k), "fixed", {}
    assign = _kmeans(Xn, k_sel, seed, n_init).labels_
    ari_b = float(adjusted_rand_score(codes(biology)[0], assign))
    ari_c = float(adjusted_rand_score(codes(centre)[0], assign))
    return {
        "score": ari_b - ari_c,
        "ari_biology": ari_b,
        "ari_centre": ari_c,
        "k": k_sel,
        "k_selection": how,
        "silhouette_by_k": {str(kv): v for kv, v in sil.items()},
        "n_samples": int(n),
        "assign": np.asarray(assign, dtype=np.int64),
    }
