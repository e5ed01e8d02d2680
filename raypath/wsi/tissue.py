"""Tissue segmentation on a slide thumbnail (plain numpy / scikit-image).

The mask answers "is this part of the slide tissue?" at thumbnail
resolution; tiling then keeps the tiles whose area is mostly tissue.

Method: median-blur the thumbnail, threshold saturation and darkness with
Otsu (bounded by floors so that an empty slide yields no tissue rather than
its noise), drop glass, black scanner padding and pen marks (blue, green,
black), close small gaps, fill small holes, and remove objects smaller than a
minimum physical area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class TissueParams:
    """Knobs of :func:`tissue_mask` (defaults suit H&E brightfield).

    Parameters
    ----------
    median_px
        Median-filter size on the thumbnail (odd), removing JPEG noise and dust.
    min_saturation
        Floor of the saturation threshold (0-1): glass is ~0-0.05, pale
        tissue > 0.07.  Otsu's threshold is used when higher.
    max_grey
        Ceiling of the darkness threshold (0-1): pixels darker than
        ``min(otsu, max_grey)`` count as tissue even if unsaturated.
    min_grey_contrast
        The darkness rule only applies when the thumbnail's grey range
        (p99 - p1) exceeds this; a blank slide's noise has no contrast.
    min_area_um2, max_hole_um2
        Objects smaller than ``min_area_um2`` are dropped and holes smaller
        than ``max_hole_um2`` filled, capped at ``*_fraction`` of the slide
        area (so small slides keep their small pieces).  Without a known mpp
        only the fractions apply.
    exclude_pen, min_pen_area_um2
        Remove blue, green and black marker ink; ink patches smaller than
        ``min_pen_area_um2`` are ignored (dense nuclei can look like ink).
    """

    median_px: int = 5
    min_saturation: float = 0.07
    max_grey: float = 0.86
    min_grey_contrast: float = 0.15
    min_area_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0
    min_area_fraction: float = 0.0005
    max_hole_fraction: float = 0.0005
    closing_px: int = 2
    exclude_pen: bool = True
    min_pen_area_um2: float = 5_000.0


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) == float(values.min()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def rgb_to_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] of a uint8 RGB image."""
    f = rgb.astype(np.float32) / 255.0
    mx = f.max(axis=-1)
    mn = f.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return sat.astype(np.float32), mx


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density ``-log10(I / 255)`` of a uint8 RGB image."""
    return -np.log10((rgb.astype(np.float32) + 1.0) / 256.0)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink.

    Decided in optical density, where stains are fixed directions:
    haematoxylin absorbs red and green about equally (OD_R/OD_G ~ 0.7-0.9),
    eosin absorbs mostly green.  Blue ink absorbs red more than green
    (OD_R/OD_G >= 1) and little blue; green ink absorbs red and blue but little
    green; black ink absorbs every channel strongly and evenly.  Stray hits
    inside tissue become small holes that hole filling closes again.
    """
    od = optical_density(rgb[..., :3])
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    odmax = od.max(axis=-1)
    odmin = od.min(axis=-1)
    blue = (odmax > 0.5) & (r >= 1.0 * g) & (r > 2.0 * b)
    green = (odmax > 0.4) & (g < 0.6 * np.minimum(r, b))
    black = (odmin > 0.6) & (odmin > 0.7 * odmax)
    return blue | green | black


def _disk(radius: int) -> np.ndarray:
    from skimage.morphology import disk

    return disk(max(int(radius), 0)).astype(bool)


def tissue_mask(rgb: np.ndarray, thumb_mpp: float | None = None, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 thumbnail (an alpha channel is ignored).
    thumb_mpp
        Microns per thumbnail pixel (level-0 mpp x thumbnail downsample);
        sets the minimum object and hole sizes.  ``None`` uses fractions of
        the thumbnail area instead.
    params
        :class:`TissueParams`.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool, True on tissue.
    """
    p = params or TissueParams()
    rgb = np.ascontiguousarray(rgb[..., :3]).astype(np.uint8)
    sat, _ = rgb_to_saturation_value(rgb)
    sat8 = np.round(sat * 255).astype(np.uint8)
    grey8 = np.round(rgb.astype(np.float32).mean(axis=-1)).astype(np.uint8)
    if p.median_px > 1:
        from skimage.filters.rank import median

        # blur the two channels that are thresholded (histogram-based rank filter)
        footprint = np.ones((p.median_px, p.median_px), bool)
        sat8 = median(sat8, footprint)
        grey8 = median(grey8, footprint)
    sat = sat8.astype(np.float32) / 255.0
    grey = grey8.astype(np.float32) / 255.0

    # Black scanner padding and glass are excluded before Otsu so they do not
    # drag the thresholds.
    padding = grey < 0.08
    candidates = ~padding
    t_sat = max(_otsu(sat[candidates]), p.min_saturation)
    tissue = sat > t_sat
    lo, hi = np.percentile(grey[candidates], [1, 99]) if candidates.any() else (0.0, 0.0)
    if hi - lo > p.min_grey_contrast:
        t_grey = min(_otsu(grey[candidates]), p.max_grey)
        tissue |= grey < t_grey
    tissue &= ~padding

    if p.closing_px > 0:
        tissue = ndi.binary_closing(tissue, structure=_disk(p.closing_px), border_value=0)
    n_px = tissue.size
    frac_obj = p.min_area_fraction * n_px
    frac_hole = p.max_hole_fraction * n_px
    if thumb_mpp and thumb_mpp > 0:
        # physical sizes, but never more than a fraction of the slide: a tiny
        # test slide (0.5 mm) must not lose all its tissue to a 0.02 mm^2 rule
        px_area_um2 = thumb_mpp * thumb_mpp
        min_obj = min(p.min_area_um2 / px_area_um2, frac_obj)
        max_hole = min(p.max_hole_um2 / px_area_um2, frac_hole)
        min_pen = min(p.min_pen_area_um2 / px_area_um2, frac_obj)
    else:
        min_obj, max_hole, min_pen = frac_obj, frac_hole, frac_obj
    min_obj, max_hole, min_pen = (max(int(v), 1) for v in (min_obj, max_hole, min_pen))
    # holes = background components not touching the border
    tissue = tissue | _small_components(~tissue, max_hole, keep_border=False)
    if p.exclude_pen:
        # Removed after hole filling: the blurred rim of a stroke looks like
        # tissue and would otherwise enclose the stroke as a "hole".  Tiny ink
        # hits (dense nuclei that look bluish) are ignored.
        pen = pen_mask(rgb)
        pen &= ~_small_components(pen, min_pen)
        tissue &= ~ndi.binary_dilation(pen, structure=_disk(3))
    tissue = tissue & ~_small_components(tissue, min_obj)
    return tissue.astype(bool)


def _small_components(mask: np.ndarray, max_px: int, keep_border: bool = True) -> np.ndarray:
    """Connected components of ``mask`` with fewer than ``max_px`` pixels.

    With ``keep_border=False`` components touching the image border are never
    reported (a hole is enclosed background, not the glass around tissue).
    """
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    small = sizes < max_px
    small[0] = False
    if not keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small[border] = False
    return small[labels]


@dataclass
class SlideTissue:
    """A slide's thumbnail and tissue mask, with the thumbnail's downsample
    (level-0 px per thumbnail px, per axis)."""

    thumbnail: np.ndarray
    mask: np.ndarray
    downsample_x: float
    downsample_y: float


#: Rows of a pyramid level decoded at once when building a thumbnail: memory
#: stays bounded for slides without a usable low-resolution level.
THUMBNAIL_STRIP_ROWS = 2048


def slide_thumbnail(slide, max_px: int) -> tuple[np.ndarray, float, float]:
    """RGB thumbnail of a tiffslide slide whose long side is at most ``max_px``.

    Reads the coarsest pyramid level that is still at least the thumbnail
    size, in strips of rows that are shrunk by an integer box filter as they
    are read (a single-level 100k px slide never sits in memory whole).

    Returns
    -------
    (rgb, downsample_x, downsample_y)
        uint8 ``(H, W, 3)`` and the level-0 px per thumbnail px on each axis.
    """
    from PIL import Image

    w0, h0 = slide.dimensions
    level = slide.get_best_level_for_downsample(max(w0, h0) / max_px)
    lw, lh = slide.level_dimensions[level]
    ds = float(slide.level_downsamples[level])
    factor = max(1, int(math.ceil(max(lw, lh) / max_px)))
    strip = max(factor, (THUMBNAIL_STRIP_ROWS // factor) * factor)
    parts = []
    for y in range(0, lh, strip):
        rows = min(strip, lh - y)
        region = slide.read_region((0, int(round(y * ds))), level, (lw, rows), as_array=True)[..., :3]
        img = Image.fromarray(np.ascontiguousarray(region).astype(np.uint8))
        if factor > 1:
            img = img.reduce(factor)  # box filter; a partial last block is averaged over what exists
        parts.append(np.asarray(img))
    rgb = np.concatenate(parts, axis=0)
    return rgb, w0 / rgb.shape[1], h0 / rgb.shape[0]


def segment_slide(slide, mpp: float | None, thumbnail_px: int = 2048, params: TissueParams | None = None) -> SlideTissue:
    """Thumbnail + tissue mask of an open slide (``mpp`` = level-0 um/px or ``None``)."""
    rgb, dsx, dsy = slide_thumbnail(slide, thumbnail_px)
    thumb_mpp = mpp * (dsx + dsy) / 2 if mpp else None
    return SlideTissue(rgb, tissue_mask(rgb, thumb_mpp, params), dsx, dsy)
