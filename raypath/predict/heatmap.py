"""Attention heatmaps (where a MIL head looked) and per-tile probability maps, drawn over the slide.

* :func:`attention_grid` -- the tile grid at tile resolution (one cell per
  tile position, NaN where no tile): the full-resolution map as an array,
  written as a colour PNG by :func:`grid_png` (one pixel per tile).
* :func:`overlay` -- the same values drawn on the slide thumbnail, each
  tile's footprint filled with its colour blended over the tissue.
* :func:`gallery_png` -- the top and bottom tiles by attention.

Colours come from one colormap over [0, max attention of the slide] (over
[0, 1] for probabilities: ``vmax=1``), so a pixel's colour maps back to the
value of its tile (tests check it).
"""

from __future__ import annotations

import io

import numpy as np

CMAP = "inferno"


def attention_grid(coords: np.ndarray, extent: float, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(grid [rows, cols] float with NaN where no tile, origin (x0, y0) level-0 px)``.

    ``coords`` [N, 2] level-0 (x, y) of each tile's top-left, ``extent`` the
    tile side in level-0 px (tiles lie on a regular grid of that step).
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(coords) == 0:
        return np.full((1, 1), np.nan), np.zeros(2)
    origin = coords.min(axis=0)
    cell = np.rint((coords - origin) / float(extent)).astype(np.int64)
    grid = np.full((int(cell[:, 1].max()) + 1, int(cell[:, 0].max()) + 1), np.nan)
    grid[cell[:, 1], cell[:, 0]] = values
    return grid, origin


def colorize(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """uint8 RGB of ``values`` under :data:`CMAP` over [0, vmax] (NaN -> white)."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    top = float(np.nanmax(v)) if vmax is None and np.isfinite(v).any() else (vmax or 1.0)
    norm = np.clip(np.nan_to_num(v, nan=0.0) / (top if top > 0 else 1.0), 0, 1)
    rgb = (matplotlib.colormaps[CMAP](norm)[..., :3] * 255).round().astype(np.uint8)
    rgb[~np.isfinite(v)] = 255
    return rgb


def grid_png(grid: np.ndarray, vmax: float | None = None) -> bytes:
    """The tile-resolution map as a PNG (one pixel per tile position)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(colorize(grid, vmax)).save(buf, format="PNG")
    return buf.getvalue()


def overlay(thumb: np.ndarray, scale: float, coords: np.ndarray, extent: float, values: np.ndarray,
            alpha: float = 0.6, vmax: float | None = None) -> np.ndarray:
    """``thumb`` (uint8 RGB, ``scale`` thumbnail px per level-0 px) with each
    tile's footprint blended with the colour of its value (scale [0, ``vmax``],
    default the largest value)."""
    out = np.asarray(thumb, dtype=np.float64).copy()
    colors = colorize(np.asarray(values, dtype=np.float64), vmax).astype(np.float64)
    h, w = out.shape[:2]
    side = max(int(round(extent * scale)), 1)
    for (x, y), c in zip(np.asarray(coords, dtype=np.float64).reshape(-1, 2), colors.reshape(-1, 3)):
        x0, y0 = int(round(x * scale)), int(round(y * scale))
        x1, y1 = min(x0 + side, w), min(y0 + side, h)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = (1 - alpha) * out[y0:y1, x0:x1] + alpha * c
    return out.round().astype(np.uint8)


def overlay_png(thumb: np.ndarray, scale: float, coords, extent: float, values, title: str,
                vmax: float | None = None, label: str = "attention") -> bytes:
    """The overlay with a colour bar (``label``, [0, ``vmax``]) and a title, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = overlay(thumb, scale, coords, extent, values, vmax=vmax)
    fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / max(img.shape[1], 1) + 0.6))
    ax.imshow(img)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    top = vmax if vmax is not None else (float(np.max(values)) if len(values) else 1)
    sm = plt.cm.ScalarMappable(cmap=CMAP, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02, label=label)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def gallery_png(top: list[np.ndarray], bottom: list[np.ndarray], title: str, value: str = "attention") -> bytes:
    """Two rows of tiles: highest and lowest ``value``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(top), len(bottom), 1)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for r, (row, name) in enumerate(((top, f"highest {value}"), (bottom, f"lowest {value}"))):
        for c in range(n):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(row):
                ax.imshow(row[c])
        axes[r][0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
