"""Writing pyramidal, tiled JPEG TIFF slides in the Aperio SVS layout.

The page order and tags follow what Aperio scanners write, so that both
tiffslide (through tifffile's SVS series) and OpenSlide (its ``aperio``
vendor driver) open the files and decode identical pixels:

====  ==========================================  =================
page  content                                     tags
====  ==========================================  =================
0     level 0, tiled JPEG (YCbCr 2x2 subsampled)   ImageDescription ``Aperio Image Library ...|AppMag = 20|MPP = 0.5``
1     thumbnail, stripped JPEG                     NewSubfileType 0
2..   lower levels (4x, 16x), tiled JPEG           NewSubfileType 0 (a 'reduced' flag would end tifffile's pyramid)
n-2   label, stripped LZW                          NewSubfileType 1, description ``...\\nlabel WxH``
n-1   macro, stripped JPEG                         NewSubfileType 9, description ``...\\nmacro WxH``
====  ==========================================  =================

Level 0 is consumed from an iterator of row strips, and the lower levels are
accumulated by block averaging while it streams, so memory stays at one strip
plus the (16x smaller) lower levels whatever the slide size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

APERIO_VERSION = "Aperio Image Library v12.0.0"


@dataclass(frozen=True)
class SlideGeometry:
    """Size and scan parameters of a slide.

    Parameters
    ----------
    width_px, height_px
        Level-0 size.
    mpp
        Micrometres per pixel at level 0 (0.5 at 20x, 0.25 at 40x).
    objective
        Apparent magnification written as ``AppMag``.
    tile_px
        Side of the stored JPEG tiles (multiple of 16).
    jpeg_quality
        JPEG quality of the pyramid levels (1-100).
    downsamples
        Downsample factors of the lower levels, each a power of 4 times the
        previous one (only levels at least ``min_level_px`` wide are kept).
    """

    width_px: int
    height_px: int
    mpp: float = 0.5
    objective: int = 20
    tile_px: int = 256
    jpeg_quality: int = 90
    downsamples: tuple[int, ...] = (4, 16)
    min_level_px: int = 16

    @property
    def levels(self) -> list[tuple[int, int, int]]:
        """(downsample, width, height) of every level, level 0 first."""
        out = [(1, self.width_px, self.height_px)]
        for d in self.downsamples:
            w, h = self.width_px // d, self.height_px // d
            if min(w, h) >= self.min_level_px:
                out.append((d, w, h))
        return out

    def description(self, extra: str = "") -> str:
        """The Aperio ImageDescription of level 0 (what readers parse for MPP/AppMag)."""
        w, h, t = self.width_px, self.height_px, self.tile_px
        head = f"{APERIO_VERSION}\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q={self.jpeg_quality}"
        fields = [
            f"AppMag = {self.objective}",
            f"MPP = {self.mpp:g}",
            "ScanScope ID = RAYPATH-SYNTH",
        ]
        if extra:
            fields.append(extra)
        return head + "|" + "|".join(fields)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Downsample (h, w, 3) uint8 by averaging f x f blocks (h, w multiples of f).

    Strided adds in uint16 (at most 16 x 16 x 255 fits): several times faster
    than ``reshape(...).sum(axis=(1, 3))``.
    """
    rows = a[0::f].astype(np.uint16)
    for i in range(1, f):
        rows += a[i::f]
    s = rows[:, 0::f].copy()
    for j in range(1, f):
        s += rows[:, j::f]
    s += (f * f) // 2
    s //= f * f
    return s.astype(np.uint8)


def _resize(a: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize(size_wh, Image.Resampling.BILINEAR, reducing_gap=2.0))


def write_svs(
    path: str | os.PathLike,
    geom: SlideGeometry,
    strips: Iterable[np.ndarray],
    *,
    label: np.ndarray | None = None,
    thumbnail_px: int = 768,
    macro_px: int = 640,
    description_extra: str = "",
) -> dict:
    """Write an Aperio-like pyramidal SVS file from level-0 row strips.

    Parameters
    ----------
    path
        Output file (``.svs``).
    geom
        Size and scan parameters.
    strips
        Level-0 pixels as consecutive (``geom.tile_px``, W, 3) uint8 row
        strips, top to bottom, where W is the width rounded up to a whole
        number of tiles; the last strip may extend below the slide (the extra
        rows are cropped by readers, so rendering them avoids black padding).
        ``ceil(height_px / tile_px)`` strips are consumed.
    label
        Label image (h, w, 3) uint8; a blank white label if ``None``.
    thumbnail_px, macro_px
        Longest side of the thumbnail and macro images.
    description_extra
        Extra ``key = value`` pairs appended to the level-0 description.

    Returns
    -------
    dict with ``bytes`` (file size), ``levels`` (list of (downsample, w, h)).
    """
    import tifffile

    t = geom.tile_px
    if t % 16:
        raise ValueError(f"tile_px={t} must be a multiple of 16 (JPEG MCU / TIFF tiles)")
    levels = geom.levels
    w_pad = -(-geom.width_px // t) * t
    n_strips = -(-geom.height_px // t)
    h_pad = n_strips * t
    # lower levels are built while level 0 streams; 4 divides the strip height
    # (4x is always kept: the thumbnail is made from it on slides too small for lower levels)
    lower = {d: np.empty((h_pad // d, w_pad // d, 3), np.uint8) for d in {4, *(d for d, _, _ in levels[1:])}}
    tiles = _level0_tiles(strips, n_strips, t, w_pad, lower)
    jpeg = dict(compression="jpeg", compressionargs={"level": int(geom.jpeg_quality)})
    common = dict(photometric="rgb", metadata=None, software=False)
    res = 1e4 / geom.mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=(geom.width_px * geom.height_px * 3 > 3.5e9)) as tw:
        tw.write(
            tiles,
            shape=(geom.height_px, geom.width_px, 3),
            dtype=np.uint8,
            tile=(t, t),
            description=geom.description(description_extra),
            subfiletype=0,
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            **jpeg,
            **common,
        )
        crops = {d: lower[d][: geom.height_px // d, : geom.width_px // d] for d in lower}
        thumb = _write_reduced_pages(tw, geom, crops, thumbnail_px, jpeg, common)
        _write_label_and_macro(tw, thumb, label, macro_px, jpeg, common)
    return {"bytes": os.path.getsize(path), "levels": levels}


def _level0_tiles(strips: Iterable[np.ndarray], n_strips: int, t: int, w_pad: int,
                  lower: dict[int, np.ndarray]) -> Iterator[np.ndarray]:
    """Level-0 tiles in TIFF order from row strips; fills the lower levels
    (block means, 4 divides the strip height) while level 0 streams."""
    it = iter(strips)
    for s in range(n_strips):
        strip = next(it)
        if strip.shape != (t, w_pad, 3) or strip.dtype != np.uint8:
            raise ValueError(f"strip {s}: expected {(t, w_pad, 3)} uint8, got {strip.shape} {strip.dtype}")
        prev, prev_d = strip, 1
        for d in sorted(lower):
            step = d // prev_d
            small = _block_mean(prev, step)
            rows = t // d
            lower[d][s * rows : (s + 1) * rows] = small
            prev, prev_d = small, d
        for x in range(0, w_pad, t):
            yield strip[:, x : x + t]


def _write_reduced_pages(tw, geom: SlideGeometry, crops: dict[int, np.ndarray], thumbnail_px: int,
                         jpeg: dict, common: dict) -> np.ndarray:
    """The thumbnail page and the lower pyramid levels; returns the thumbnail."""
    t = geom.tile_px
    # like Aperio: at most thumbnail_px, and never more than a quarter of level 0
    scale = min(thumbnail_px / max(geom.width_px, geom.height_px), 0.25)
    tw_px = (max(int(round(geom.width_px * scale)), 1), max(int(round(geom.height_px * scale)), 1))
    # the smallest accumulated level that is still at least as big as the thumbnail
    src_d = max(d for d in crops if crops[d].shape[1] >= tw_px[0] or d == 4)
    thumb = _resize(crops[src_d], tw_px)
    tw.write(
        thumb,
        description=f"{APERIO_VERSION}\r\n{geom.width_px}x{geom.height_px} -> {tw_px[0]}x{tw_px[1]} - |AppMag = {geom.objective}|MPP = {geom.mpp:g}",
        subfiletype=0,
        rowsperstrip=16,
        **jpeg,
        **common,
    )
    for d, w, h in geom.levels[1:]:
        tw.write(
            crops[d],
            tile=(t, t),
            description=f"{APERIO_VERSION}\r\n{geom.width_px}x{geom.height_px} -> {w}x{h} - |AppMag = {geom.objective}|MPP = {geom.mpp * d:g}",
            subfiletype=0,
            **jpeg,
            **common,
        )
    return thumb


def _write_label_and_macro(tw, thumb: np.ndarray, label: np.ndarray | None, macro_px: int,
                           jpeg: dict, common: dict) -> None:
    """The label (LZW) and macro (JPEG) associated images, as Aperio writes them."""
    if label is None:
        label = np.full((463, 387, 3), 255, np.uint8)
    tw.write(
        label,
        description=f"{APERIO_VERSION}\r\nlabel {label.shape[1]}x{label.shape[0]}",
        subfiletype=1,
        compression="lzw",
        rowsperstrip=16,
        **common,
    )
    macro = _macro_image(thumb, label, macro_px)
    tw.write(
        macro,
        description=f"{APERIO_VERSION}\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
        subfiletype=9,
        rowsperstrip=16,
        **jpeg,
        **common,
    )


def _macro_image(thumb: np.ndarray, label: np.ndarray, macro_px: int) -> np.ndarray:
    """A photo of the whole glass slide: label on the left, the tissue area on the right."""
    mh = max(macro_px * 26 // 76, 16)  # a 76 x 26 mm glass slide
    macro = np.full((mh, macro_px, 3), 232, np.uint8)
    lab_w = macro_px // 4
    macro[:, :lab_w] = _resize(label, (lab_w, mh))
    area_w = macro_px - lab_w - 8
    s = min(area_w / thumb.shape[1], (mh - 8) / thumb.shape[0])
    tw, th = max(int(thumb.shape[1] * s), 1), max(int(thumb.shape[0] * s), 1)
    y = (mh - th) // 2
    x = lab_w + 4 + (area_w - tw) // 2
    macro[y : y + th, x : x + tw] = _resize(thumb, (tw, th))
    return macro


def make_label(text_bits: int, seed: int = 0) -> np.ndarray:
    """A label image with a 2-D barcode-like pattern that encodes ``text_bits``.

    No font rendering is needed: the pattern is a deterministic function of
    the integer, which is all a label has to be for tests (and it keeps
    patient identifiers out of the pixels, as de-identified slides should).
    """
    lab = np.full((463, 387, 3), 250, np.uint8)
    bits = np.array([(int(text_bits) >> i) & 1 for i in range(24)], bool)
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(text_bits)]))
    grid = rng.random((16, 16)) < 0.5
    grid[0, :] = grid[:, 0] = True  # finder edges
    grid[-1, :8] = bits[:8]
    grid[-2, :16] = np.concatenate([bits[8:], bits[8:16]])[:16]
    cell = 14
    y0, x0 = 120, (387 - 16 * cell) // 2
    for i, j in zip(*np.nonzero(grid)):
        lab[y0 + i * cell : y0 + (i + 1) * cell, x0 + j * cell : x0 + (j + 1) * cell] = 20
    return lab
