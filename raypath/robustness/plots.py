"""Plots of the robustness analysis: 2-D maps, cluster purity, tile galleries.

Every function returns PNG bytes (matplotlib, Agg backend) so the caller
decides where they go (local folder or S3, inlined into the HTML report).
Galleries read the tiles back from the slides through the one fast reader
(:mod:`raypath.wsi.tile_images`).
"""

from __future__ import annotations

import io
import logging
from typing import Sequence

import numpy as np
import pandas as pd


log = logging.getLogger(__name__)

#: Colour cycle for categories (tab10, then tab20 for many cohorts).
_MAX_LEGEND = 20


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def fig_to_png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colours(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------- 2-D maps


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except Exception:  # ImportError, or numba failing to initialise
        return False
    return True


def embed_2d(
    X: np.ndarray, method: str = "tsne", seed: int = 0, perplexity: float = 30.0, iterations: int = 1000
) -> np.ndarray:
    """2-D coordinates of ``X`` by t-SNE (perplexity 30, PCA init) or UMAP.

    Features are L2-normalised first (the geometry of the metrics).
    Perplexity is lowered for tiny sets (t-SNE needs perplexity < n).
    """
    from raypath.robustness.metrics import l2_normalise

    Xn = l2_normalise(X)
    n = len(Xn)
    if n < 5:
        return np.zeros((n, 2), dtype=np.float32)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(Xn)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    # PCA to 50 dims first: the standard speed-up, negligible effect on the map
    if Xn.shape[1] > 50 and n > 50:
        Xn = PCA(n_components=50, random_state=seed).fit_transform(Xn)
    perp = float(min(perplexity, max(2.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed,
                max_iter=max(250, int(iterations))).fit_transform(Xn)


def scatter_by(
    coords: np.ndarray,
    colourings: dict[str, Sequence],
    title: str,
) -> bytes:
    """Side-by-side scatter panels of the same 2-D map, one per colouring."""
    plt = _plt()
    n_panels = max(1, len(colourings))
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 4.8), squeeze=False)
    size = float(np.clip(3000.0 / max(1, len(coords)), 3.0, 25.0))  # visible for 100 or 5000 points
    for ax, (name, values) in zip(axes[0], colourings.items()):
        vals = pd.Series(list(values)).astype(str)
        levels = sorted(vals.unique())
        cols = _colours(len(levels))
        for lev, col in zip(levels, cols):
            sel = (vals == lev).to_numpy()
            ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=col, alpha=0.7, linewidths=0,
                       label=lev if len(levels) <= _MAX_LEGEND else None)
        ax.set_title(f"coloured by {name}")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(levels) <= _MAX_LEGEND:
            ax.legend(markerscale=2.5, fontsize=7, loc="best", frameon=False)
    fig.suptitle(title)
    return fig_to_png(fig)


# --------------------------------------------------------------------------- purity


def purity_per_cluster(clusters: dict, chance_purity: float | None, title: str) -> bytes:
    """Bars of cluster purity (sorted), coloured by the cluster's majority cohort."""
    plt = _plt()
    purity = np.array([np.nan if v is None else v for v in clusters["purity"]], dtype=float)
    size = np.asarray(clusters["size"])
    maj = np.asarray(clusters["majority_cohort"], dtype=object)
    keep = size > 0
    purity, size, maj = purity[keep], size[keep], maj[keep]
    order = np.argsort(-purity, kind="stable")
    levels = sorted(set(maj.tolist()))
    cmap = dict(zip(levels, _colours(len(levels))))
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.06 * len(order) + 5)), 3.6))
    ax.bar(np.arange(len(order)), purity[order], width=1.0,
           color=[cmap[m] for m in maj[order]], edgecolor="white", linewidth=0.4 if len(order) < 80 else 0)
    if chance_purity is not None:
        ax.axhline(chance_purity, color="k", ls="--", lw=1, label=f"chance {chance_purity:.2f}")
    ax.axhline(float(np.nanmean(purity)), color="crimson", lw=1,
               label=f"mean {np.nanmean(purity):.2f}")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=cmap[lev], label=f"majority: {lev}") for lev in levels[:_MAX_LEGEND]]
    ax.set_ylim(0, 1.02)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel("cluster (sorted by purity)")
    ax.set_ylabel("max cohort share")
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig_to_png(fig)


def ri_curve(curve: dict, k_selected: int, title: str, chance: float | None = None) -> bytes:
    """RI as a function of k with the selected k and the chance RI (random neighbours) marked."""
    plt = _plt()
    ks = sorted(int(k) for k in curve)
    vals = [curve[str(k)] for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ks, vals, "o-")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"random neighbours {chance:.2f}")
    ax.axvline(k_selected, color="crimson", lw=1, label=f"k = {k_selected}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("k (neighbours, other slides)")
    ax.set_ylabel("RI = SO / (SO + OS)")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return fig_to_png(fig)


def croma_histogram(values: np.ndarray, title: str) -> bytes:
    """Distribution of per-tile CRoMa with 0 (centre vs biology boundary) marked."""
    plt = _plt()
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(v, bins=40, range=(-1, 1), color="steelblue")
    ax.axvline(0, color="crimson", lw=1)
    if len(v):
        ax.axvline(float(np.median(v)), color="k", ls="--", lw=1, label=f"median {np.median(v):.3f}")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("CRoMa per tile  (< 0: same-centre impostor nearer)")
    ax.set_ylabel("tiles")
    ax.set_title(title)
    return fig_to_png(fig)


# --------------------------------------------------------------------------- galleries


def select_gallery_tiles(
    X: np.ndarray,
    assign: np.ndarray,
    centres: np.ndarray,
    purity: Sequence,
    n_clusters: int = 4,
    n_per_band: int = 4,
) -> list[dict]:
    """Pick clusters and, in each, tiles near / at median / far from the centre.

    Clusters: half the purest and half the most mixed among clusters with at
    least ``3 * n_per_band`` tiles, so the gallery shows both what a
    site-specific cluster and a mixed cluster look like.

    Returns a list of ``{"cluster", "purity", "bands": {"near"|"medium"|"far": row indices}}``.
    """
    from raypath.robustness.metrics import l2_normalise

    Xn = l2_normalise(X)
    sizes = np.bincount(assign, minlength=len(centres))
    pur = np.array([np.nan if v is None else v for v in purity], dtype=float)
    eligible = np.flatnonzero((sizes >= 3 * n_per_band) & np.isfinite(pur))
    if len(eligible) == 0:
        eligible = np.flatnonzero(sizes >= 3)
    order = eligible[np.argsort(-pur[eligible], kind="stable")]
    n_top = (n_clusters + 1) // 2
    chosen = list(order[:n_top]) + [c for c in order[::-1][: n_clusters - n_top] if c not in order[:n_top]]
    out = []
    for c in chosen:
        rows = np.flatnonzero(assign == c)
        d = np.linalg.norm(Xn[rows] - centres[c][None, :], axis=1)
        srt = rows[np.argsort(d, kind="stable")]
        n = min(n_per_band, len(srt) // 3)
        mid = len(srt) // 2
        out.append({
            "cluster": int(c),
            "purity": None if not np.isfinite(pur[c]) else float(pur[c]),
            "size": int(len(rows)),
            "bands": {
                "near": srt[:n].tolist(),
                "medium": srt[max(0, mid - n // 2): max(0, mid - n // 2) + n].tolist(),
                "far": srt[len(srt) - n:].tolist(),
            },
        })
    return out


def gallery(
    selection: list[dict],
    images: dict[int, np.ndarray],
    row_labels: dict[int, str],
    title: str,
) -> bytes:
    """Grid: one row per cluster, columns near | medium | far tiles (images by row index)."""
    plt = _plt()
    n_rows = len(selection)
    n_cols = max(sum(len(v) for v in s["bands"].values()) for s in selection) if selection else 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 0.6, 1.45 * n_rows + 0.6),
                             squeeze=False)
    for r, sel in enumerate(selection):
        col = 0
        for band in ("near", "medium", "far"):
            for i, row in enumerate(sel["bands"][band]):
                ax = axes[r][col]
                img = images.get(int(row))
                if img is not None:
                    ax.imshow(img)
                else:
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center")
                if r == 0 and i == 0:
                    ax.set_title(band, fontsize=9, loc="left")
                ax.set_xlabel(row_labels.get(int(row), ""), fontsize=6)
                col += 1
        for c in range(n_cols):
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if c >= col:
                axes[r][c].axis("off")
        pur = "" if sel["purity"] is None else f"purity {sel['purity']:.2f}"
        axes[r][0].set_ylabel(f"cluster {sel['cluster']}\n{pur}\nn={sel['size']}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig_to_png(fig)
