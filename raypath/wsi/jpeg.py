"""Decoding one stored JPEG tile of a TIFF slide, reporting damage instead of hiding it.

libjpeg recovers from most corrupt data (a bad Huffman code, a stream cut
short, bytes before a marker) and only *warns*; ``imagecodecs.jpeg8_decode``
(what tifffile and tiffslide use) drops those warnings, so a bit-flipped tile
decodes to plausible-looking garbage.  :func:`decode_tile` decodes with
libjpeg-turbo through simplejpeg in strict mode, where a warning is an error,
and returns the pixels together with what was wrong (``None`` for a sound
tile).  A damaged tile is decoded again leniently, so callers can keep its
best-effort pixels or skip it.

Pixels are exactly those of tifffile/tiffslide: the abbreviated tile stream is
completed with the page's ``JPEGTables`` and an Adobe marker that states the
colour transform tifffile would request (RGB stored as RGB, or YCbCr), so
libjpeg-turbo decodes it the same way (ISLOW DCT, fancy upsampling).
Colour spaces other than RGB/YCbCr/unspecified -> RGB fall back to imagecodecs (damage is
then reported only when the decoder raises).
"""

from __future__ import annotations

import numpy as np

_SOI = b"\xff\xd8"
_RGB, _YCBCR = 2, 3  # libjpeg J_COLOR_SPACE values (as tifffile passes them)


def _adobe(transform: int) -> bytes:
    # APP14 "Adobe": version 100, flags 0, 0, transform (0 = no colour transform, 1 = YCbCr)
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def _fit(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``arr`` cropped/padded (with 0) to ``shape``; RGB uint8."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = arr[:, :, :3]
    if arr.shape[:2] == tuple(shape):
        return arr
    out = np.zeros((shape[0], shape[1], 3), np.uint8)
    h, w = min(shape[0], arr.shape[0]), min(shape[1], arr.shape[1])
    out[:h, :w] = arr[:h, :w]
    return out


def _imagecodecs(data: bytes, tables, colorspace, outcolorspace, shape) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(data, tables=tables, colorspace=colorspace, outcolorspace=outcolorspace,
                                    shape=shape)


def jpeg_stream(data: bytes, tables: bytes | None, colorspace) -> bytes:
    """A stored tile as a complete JPEG any decoder reads as tifffile does: the page's ``JPEGTables``
    merged in, and an Adobe marker stating the colour transform (RGB stored as RGB, or YCbCr)."""
    stream = _SOI
    if colorspace is not None:  # None: libjpeg's own guess (JFIF/component ids), as tifffile leaves it
        stream += _adobe(0 if colorspace == _RGB else 1)
    if tables:
        stream += bytes(tables[2:-2])  # the tables' own SOI/EOI removed
    return stream + bytes(data[2:])


def decode_tile(data: bytes, tables: bytes | None, colorspace, outcolorspace,
                shape: tuple[int, int], scale: int = 1) -> tuple[np.ndarray, str | None]:
    """Decode a stored JPEG tile; return ``(rgb uint8 [h, w, 3], damage)``.

    Parameters
    ----------
    data
        The tile's bytes (``TileOffsets``/``TileByteCounts``).
    tables
        The page's ``JPEGTables`` (``None`` when each tile is a full JPEG).
    colorspace, outcolorspace
        As ``tifffile.tifffile.jpeg_decode_colorspace`` gives them.
    shape
        ``(tile_h, tile_w)`` of the page's tiles.
    scale
        Decode at 1/scale (2, 4 or 8: DCT scaling inside libjpeg-turbo, the raypath reader's
        ``decode="scaled"`` path); the result is ``shape // scale``.  Damage is reported the same way.

    Returns
    -------
    (pixels, damage)
        ``damage`` is ``None`` for a sound tile, else what libjpeg reported
        (``"Corrupt JPEG data: bad Huffman code"``...).  Pixels of a damaged
        tile are libjpeg's best effort, or 0 where nothing could be decoded.
    """
    if scale > 1:
        shape = (shape[0] // scale, shape[1] // scale)
        kw = dict(min_factor=scale, min_height=shape[0], min_width=shape[1])
    else:
        kw = {}
    if colorspace not in (_RGB, _YCBCR, None) or outcolorspace != _RGB:
        try:
            arr = _imagecodecs(data, tables, colorspace, outcolorspace, (shape[0] * scale, shape[1] * scale))
            if scale > 1:  # no DCT scaling in this decoder: block means
                arr = _fit(arr, (shape[0] * scale, shape[1] * scale)).reshape(shape[0], scale, shape[1], scale, 3)
                arr = arr.mean(axis=(1, 3)).round().astype(np.uint8)
            return _fit(arr, shape), None
        except Exception as e:  # codecs raise many types
            return np.zeros((shape[0], shape[1], 3), np.uint8), f"{type(e).__name__}: {e}"
    import simplejpeg

    if not data.startswith(_SOI):
        return np.zeros((shape[0], shape[1], 3), np.uint8), "not a JPEG stream (no start-of-image marker)"
    stream = jpeg_stream(data, tables, colorspace)
    try:
        arr = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True, **kw)
        damage = None if arr.shape[:2] == tuple(shape) else (
            f"decoded size {arr.shape[1]}x{arr.shape[0]} is not the tile size {shape[1]}x{shape[0]}")
        return _fit(arr, shape), damage
    except ValueError as e:
        damage = str(e) or "corrupt JPEG data"
    try:
        arr = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=False, **kw)
        return _fit(arr, shape), damage
    except ValueError:
        return np.zeros((shape[0], shape[1], 3), np.uint8), damage
