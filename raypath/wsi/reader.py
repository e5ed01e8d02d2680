"""Fast tile reading: decode each stored JPEG tile of a slide at most once per pass.

``openslide``/``tiffslide`` ``read_region`` loops decode every stored tile a
requested region touches, on every call: a 224 px tile on a 256 px stored
grid touches up to four stored tiles, so a grid pass decodes each stored tile
~2-4 times and pays per-call overhead on top.  :func:`read_tiles` instead

1. plans the pass: sorts the requested tiles in slide order (level, y, x),
   maps each to the stored tiles (``TileOffsets``/``TileByteCounts`` of the
   pyramid level's TIFF page) it intersects, and notes when each stored tile
   is needed for the last time;
2. fetches the bytes of the stored tiles a batch needs first, one batch
   ahead in a background thread (local: ``os.pread``; S3: one fsspec
   ``cat_ranges`` call per batch with adjacent ranges merged);
3. decodes each stored tile once (``imagecodecs.jpeg8_decode`` with the
   page's ``JPEGTables`` and the colour-space handling tifffile uses, so
   pixels are exactly tifffile's/tiffslide's), in ``num_threads`` threads
   (the decoder releases the GIL), and keeps it only while later requested
   tiles still need it;
4. assembles each requested tile by copying the intersecting parts.

Geometry contract (same everywhere in raypath)
----------------------------------------------
A row of ``tiles.parquet`` reads the ``read_px`` x ``read_px`` square at
pyramid ``level`` whose top-left is ``(int(x / ds), int(y / ds))`` with ``ds``
the level's downsample as tiffslide computes it -- exactly
``TiffSlide.read_region((x, y), level, (read_px, read_px))``.  Pixels outside
the level are 0 (black), which is what tiffslide's ``read_region`` pads with
(and what OpenSlide's transparent pixels become in RGB).  If
``read_px != tile_px`` the square is resized with PIL
``Image.resize((tile_px, tile_px), Image.BILINEAR)``.

Slides whose pages are not tiled, or not 8-bit RGB, fall back to tiffslide
``read_region`` (same pixels, slower).  Non-JPEG tiled pages (LZW, deflate,
JPEG 2000 ...) use tifffile's own decoder through the same once-per-pass plan.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import S3Options, filesystem_for, is_remote, strip_protocol

log = logging.getLogger(__name__)

_JPEG = 7
#: Byte ranges closer than this are fetched as one request on object storage.
_MERGE_GAP_BYTES = 64 * 1024
REQUIRED_COLUMNS = ("tile_id", "x", "y", "level", "read_px", "tile_px")
#: ``"full"``: every stored tile decoded at full size, read square resized with PIL (exact ``read_region``
#: pixels); ``"scaled"``: when the read is downsampled, stored JPEG tiles decoded at 1/2, 1/4 or 1/8
#: inside libjpeg-turbo (DCT scaling), see :func:`decode_scale`.
DECODE_MODES = ("full", "scaled")
#: The scaled path may leave the read square this much below ``tile_px`` (then resized up): a 40x scan
#: at 0.2527 um/px read for 0.5 um/px is 443 px, 221 px at 1/2, resized to 224.
SCALE_SLACK = 0.05
_JCS_RGB, _JCS_YCBCR = 2, 3  # libjpeg colour spaces (tifffile's jpeg_decode_colorspace values)


@dataclass
class _Level:
    """What the reader needs to know about one pyramid level's TIFF page."""

    page: object
    width: int
    height: int
    tile_w: int
    tile_h: int
    across: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    jpeg: bool
    tables: bytes | None
    colorspace: tuple
    downsample: float


def resize_tile(img: np.ndarray, tile_px: int) -> np.ndarray:
    """The raypath resize convention: PIL bilinear to ``tile_px`` x ``tile_px``."""
    if img.shape[0] == tile_px and img.shape[1] == tile_px:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((tile_px, tile_px), Image.BILINEAR))


class SlideReader:
    """An open slide (local path or ``s3://``) that reads tiles in planned passes.

    Parameters
    ----------
    slide_uri
        Local path or ``s3://bucket/key``.
    s3
        S3 settings for remote slides (default: from the environment).
    num_threads
        Threads decoding stored tiles (JPEG decoding releases the GIL).
    decode
        ``"full"`` (exact ``read_region`` pixels) or ``"scaled"`` (DCT-scaled JPEG decoding when the
        read is downsampled, see :func:`decode_scale`).
    """

    def __init__(self, slide_uri: str, s3: S3Options | None = None, num_threads: int = 1, decode: str = "full"):
        if decode not in DECODE_MODES:
            raise RaypathError(f"decode mode {decode!r} is not one of {DECODE_MODES}: pick one of them")
        self.uri = str(slide_uri)
        self.num_threads = max(1, int(num_threads))
        self.decode = decode
        self._remote = is_remote(self.uri)
        self.slide, self._fh, self._fd, self._fs = _open_slide(self.uri, s3)
        self._levels: dict[int, _Level | None] = {}
        #: damaged stored tiles met so far, ``(level, index) -> what the decoder reported``
        self.damage: dict[tuple[int, int], str] = {}
        #: requested tiles that contain a damaged stored tile, ``tile_id -> cause`` (filled by :meth:`read`)
        self.damaged_tiles: dict[int, str] = {}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._fh is not None:
            self._fh.close()
        self.slide.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def level(self, level: int) -> _Level | None:
        """Tiled-page description of ``level``, or ``None`` when we must fall back."""
        if level not in self._levels:
            self._levels[level] = _level_info(self.slide, level, self.uri)
        return self._levels[level]

    def _fetch(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Compressed bytes of stored tiles ``(level, index)``."""
        return _fetch_bytes(self, keys)

    def _decode(self, key: tuple[int, int, int], data: bytes) -> np.ndarray:
        """Stored tile ``(level, index, scale)`` decoded at 1/scale; damage recorded under ``(level, index)``."""
        return _decode_stored(self, key, data)

    def read(self, tiles: pd.DataFrame, batch_tiles: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(tile_ids [n], images uint8 [n, tile_px, tile_px, 3])`` batches in slide order.

        ``tiles`` are rows of ``tiles.parquet`` for this slide.  Batches hold
        tiles of one ``tile_px`` (a new batch starts when it changes).
        """
        missing = [c for c in REQUIRED_COLUMNS if c not in tiles.columns]
        if missing:
            raise RaypathError(f"tiles table for {self.uri!r} lacks columns {missing}: pass rows of tiles.parquet")
        if len(tiles) == 0:
            return
        yield from _run_pass(self, _plan_pass(self, tiles, max(1, int(batch_tiles))))

    def _note_damaged(self, tid: np.ndarray, needs, a: int, b: int) -> None:
        """Record requested tiles built from a damaged stored tile (``damaged_tiles``: tile_id -> cause)."""
        for i in range(a, b):
            bad = [k for k in needs[i] or () if k[:2] in self.damage]
            if bad:
                k = bad[0]
                self.damaged_tiles[int(tid[i])] = (
                    f"corrupt_tile_data: stored tile {k[1]} of level {k[0]}: {self.damage[k[:2]]}")


# --------------------------------------------------------------------------- opening, levels, bytes


def _open_slide(uri: str, s3: S3Options | None):
    """``(TiffSlide, remote file handle | None, local fd | None, fsspec fs | None)``; open errors carry their cause."""
    import tiffslide

    fh = fd = fs = None
    try:
        if is_remote(uri):
            fs = filesystem_for(uri, s3)
            # small blocks: the header walk must not pull 50 MiB per seek
            fh = fs.open(uri, "rb", block_size=256 * 1024, cache_type="readahead")
            slide = tiffslide.TiffSlide(fh)
        else:
            path = strip_protocol(uri)
            slide = tiffslide.TiffSlide(path)
            fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as e:
        raise RaypathError(f"not_found: slide {uri!r} not found: check the uri in slides.parquet") from e
    except Exception as e:
        from raypath.wsi.slide_io import classify_exception

        verdict = classify_exception(e, uri, s3)  # raises StorageUnavailable for an outage
        raise RaypathError(f"{verdict}; re-run `raypath ingest` to record it, or drop it from the cohort") from e
    return slide, fh, fd, fs


def _level_info(s, level: int, uri: str) -> _Level | None:
    """The fast path's description of one pyramid level's TIFF page (``None``: fall back to tiffslide)."""
    if not 0 <= level < s.level_count:
        raise RaypathError(
            f"slide {uri!r} has {s.level_count} levels; tiles.parquet asks for level {level}: "
            "re-run `raypath tile` on this slide"
        )
    try:
        from tifffile.tifffile import jpeg_decode_colorspace

        idx = s.properties.get("tiffslide.series-index", 0)
        page = s.ts_tifffile.series[idx].levels[level].keyframe
        ok = (
            page.is_tiled
            and page.dtype == np.uint8
            and page.samplesperpixel in (3, 4)
            and page.planarconfig == 1
            and page.imagedepth == 1
            and (page.imagewidth, page.imagelength) == tuple(s.level_dimensions[level])
        )
        if not ok:
            return None
        jpeg = page.compression == _JPEG
        return _Level(
            page=page,
            width=page.imagewidth,
            height=page.imagelength,
            tile_w=page.tilewidth,
            tile_h=page.tilelength,
            across=-(-page.imagewidth // page.tilewidth),
            offsets=np.asarray(page.dataoffsets, dtype=np.int64),
            bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
            jpeg=jpeg,
            tables=page.jpegtables if jpeg else None,
            colorspace=jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
            if jpeg else (),
            downsample=float(s.level_downsamples[level]),
        )
    except Exception as e:  # unusual layouts: the slow, exact path still works
        log.debug("slide %s level %d: fast path unavailable (%s)", uri, level, e)
        return None


def _truncated(uri: str, key, off: int, n: int, got: int) -> RaypathError:
    return RaypathError(
        f"truncated: slide {uri!r} is truncated or corrupt: stored tile {key[1]} of level {key[0]} needs bytes "
        f"{off}..{off + n} but only {got} could be read; re-copy the file and re-run `raypath ingest`"
    )


def _fetch_bytes(r: SlideReader, keys: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """Compressed bytes of stored tiles ``(level, index)``: ``os.pread`` locally, one ``cat_ranges`` on S3."""
    if not keys:
        return {}
    spans = [(int(r._levels[lv].offsets[i]), int(r._levels[lv].bytecounts[i])) for lv, i in keys]
    if not r._remote:
        out = {k: os.pread(r._fd, n, off) if n else b"" for k, (off, n) in zip(keys, spans)}
        for k, (off, n) in zip(keys, spans):
            if len(out[k]) != n:
                raise _truncated(r.uri, k, off, n, len(out[k]))
        return out
    # object storage: merge neighbouring ranges, one batched cat_ranges call
    groups: list[list[int]] = []
    for j in sorted(range(len(keys)), key=lambda j: spans[j][0]):
        off, n = spans[j]
        if n == 0:
            continue
        if groups and off - max(spans[k][0] + spans[k][1] for k in groups[-1]) <= _MERGE_GAP_BYTES:
            groups[-1].append(j)
        else:
            groups.append([j])
    starts = [min(spans[k][0] for k in g) for g in groups]
    ends = [max(spans[k][0] + spans[k][1] for k in g) for g in groups]
    blobs = r._fs.cat_ranges([r.uri] * len(groups), starts, ends) if groups else []
    out = {k: b"" for k, (_, n) in zip(keys, spans) if n == 0}
    for g, start, blob in zip(groups, starts, blobs):
        if isinstance(blob, Exception):
            raise RaypathError(f"reading slide {r.uri!r} failed: {blob}")
        for k in g:
            off, n = spans[k]
            out[keys[k]] = bytes(blob[off - start : off - start + n])
            if len(out[keys[k]]) != n:
                raise _truncated(r.uri, keys[k], off, n, len(out[keys[k]]))
    return out


# --------------------------------------------------------------------------- decoding


def decode_scale(L: _Level | None, read_px: int, tile_px: int, mode: str) -> int:
    """The DCT scale (1, 2, 4 or 8) at which a pass decodes ``L``'s stored JPEG tiles for one requested tile.

    ``"scaled"`` mode picks the largest of 8, 4, 2 that the stored tile size divides and that keeps
    the read square at least ``tile_px`` (up to :data:`SCALE_SLACK` less, then resized up): a 40x
    slide read for 0.5 um/px (448 px -> 224) decodes its stored tiles at 1/2 and needs no resize.
    Anything else (``"full"``, no downsampling, non-JPEG or unusual colour spaces) decodes at 1.
    """
    if mode != "scaled" or L is None or not L.jpeg or not L.colorspace:
        return 1
    if L.colorspace[0] not in (_JCS_RGB, _JCS_YCBCR, None) or L.colorspace[1] != _JCS_RGB:
        return 1  # decoded by imagecodecs (raypath.wsi.jpeg): no DCT scaling there
    for s in (8, 4, 2):
        if L.tile_w % s == 0 and L.tile_h % s == 0 and read_px / s >= tile_px * (1 - SCALE_SLACK):
            return s
    return 1


def _decode_stored(r: SlideReader, key: tuple[int, int, int], data: bytes) -> np.ndarray:
    L = r._levels[key[0]]
    s = key[2]
    if not data:  # sparse/empty stored tile: tifffile fills with 0
        return np.zeros((L.tile_h // s, L.tile_w // s, 3), np.uint8)
    if L.jpeg:  # libjpeg warnings (corrupt data) are reported, not hidden (raypath.wsi.jpeg), at any scale
        from raypath.wsi.jpeg import decode_tile

        arr, problem = decode_tile(data, L.tables, L.colorspace[0], L.colorspace[1], (L.tile_h, L.tile_w), scale=s)
        if problem is not None:
            r.damage[key[:2]] = problem
    else:
        try:
            seg, _, _ = L.page.decode(data, key[1], jpegtables=getattr(L.page, "jpegtables", None))
            arr = seg[0]
        except Exception as e:  # codecs raise many types: a damaged tile, recorded
            r.damage[key[:2]] = f"{type(e).__name__}: {e}"[:300]
            arr = np.zeros((L.tile_h, L.tile_w, 3), np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr[:, :, :3]


# --------------------------------------------------------------------------- the pass


@dataclass
class _Pass:
    """A planned pass over one slide's requested tiles (slide order)."""

    tid: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    lv: np.ndarray
    rp: np.ndarray
    tp: np.ndarray
    scale: np.ndarray  # DCT scale of each requested tile's stored tiles
    origin: np.ndarray  # top-left of the square to assemble, in px of the level at that scale
    side: np.ndarray  # side of that square (read_px at scale 1)
    needs: list  # per tile: stored tiles (level, index, scale), or None (tiffslide fallback)
    last_use: dict
    bounds: list  # batches: (start, end) runs of one tile_px
    new_keys: list  # per batch: stored tiles decoded first in that batch


def _stored_tiles(L: _Level, x0: int, y0: int, side: int) -> list[int]:
    """Indices of the stored tiles of ``L`` that the square ``(x0, y0, side)`` (level px) intersects."""
    x0, x1 = max(x0, 0), min(x0 + side, L.width)
    y0, y1 = max(y0, 0), min(y0 + side, L.height)
    if x1 <= x0 or y1 <= y0:
        return []
    return [r * L.across + c for r in range(y0 // L.tile_h, (y1 - 1) // L.tile_h + 1)
            for c in range(x0 // L.tile_w, (x1 - 1) // L.tile_w + 1)]


def _plan_pass(r: SlideReader, tiles: pd.DataFrame, batch_tiles: int) -> _Pass:
    """Sort the tiles in slide order, map each to its stored tiles and scale, note last uses, cut batches."""
    cols = {c: tiles[c].to_numpy(np.int64) for c in REQUIRED_COLUMNS}
    order = np.lexsort((cols["tile_id"], cols["x"], cols["y"], cols["level"]))  # slide order
    tid, xs, ys, lv, rp, tp = (cols[c][order] for c in REQUIRED_COLUMNS)
    n = len(order)
    scale, side, origin = np.ones(n, np.int64), rp.copy(), np.zeros((n, 2), np.int64)
    needs: list = []
    last_use: dict = {}
    for i in range(n):
        L = r.level(int(lv[i]))
        if L is None:
            needs.append(None)
            continue
        s = scale[i] = decode_scale(L, int(rp[i]), int(tp[i]), r.decode)
        rx0, ry0 = int(xs[i] / L.downsample), int(ys[i] / L.downsample)
        if s > 1:  # the read square on the 1/s grid: corner and side rounded to whole scaled px
            rx0, ry0, side[i] = rx0 // s, ry0 // s, max(1, int(round(rp[i] / s)))
        origin[i] = (rx0, ry0)
        keys = [(int(lv[i]), k, int(s)) for k in _stored_tiles(L, rx0 * s, ry0 * s, int(side[i]) * s)]
        for k in keys:
            last_use[k] = i
        needs.append(keys)
    bounds, start = [], 0
    for i in range(1, n + 1):  # consecutive runs of at most batch_tiles with one tile_px
        if i == n or i - start >= batch_tiles or tp[i] != tp[start]:
            bounds.append((start, i))
            start = i
    new_keys, seen = [], set()
    for a, b in bounds:
        ks = [k for i in range(a, b) for k in needs[i] or () if not (k in seen or seen.add(k))]
        new_keys.append(ks)
    return _Pass(tid, xs, ys, lv, rp, tp, scale, origin, side, needs, last_use, bounds, new_keys)


def _fetch_keys(keys: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return list(dict.fromkeys(k[:2] for k in keys))


def _run_pass(r: SlideReader, p: _Pass) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fetch one batch ahead, decode each stored tile once, assemble, drop stored tiles no later tile needs."""
    cache: dict[tuple[int, int, int], np.ndarray] = {}
    io_pool = ThreadPoolExecutor(1, thread_name_prefix="raypath-io")
    dec_pool = ThreadPoolExecutor(r.num_threads, thread_name_prefix="raypath-dec") if r.num_threads > 1 else None
    try:
        pending: Future = io_pool.submit(r._fetch, _fetch_keys(p.new_keys[0]))
        for bi, (a, b) in enumerate(p.bounds):
            blobs = pending.result()
            if bi + 1 < len(p.bounds):  # overlap next batch's I/O with this batch's decoding
                pending = io_pool.submit(r._fetch, _fetch_keys(p.new_keys[bi + 1]))
            ks = p.new_keys[bi]
            if dec_pool is not None and len(ks) > 1:
                cache.update(zip(ks, dec_pool.map(lambda k: r._decode(k, blobs[k[:2]]), ks)))
            else:
                cache.update((k, r._decode(k, blobs[k[:2]])) for k in ks)
            blobs = None  # the bytes are not kept past their decode
            out = np.empty((b - a, int(p.tp[a]), int(p.tp[a]), 3), np.uint8)
            for j, i in enumerate(range(a, b)):
                _assemble_tile(r, p, i, cache, out[j])
            if r.damage:
                r._note_damaged(p.tid, p.needs, a, b)
            for i in range(a, b):  # drop stored tiles no later tile needs
                for k in p.needs[i] or ():
                    if p.last_use.get(k) == i:
                        cache.pop(k, None)
            yield p.tid[a:b].copy(), out
    finally:
        io_pool.shutdown(wait=True)
        if dec_pool is not None:
            dec_pool.shutdown(wait=True)


def _assemble_tile(r: SlideReader, p: _Pass, i: int, cache: dict, out: np.ndarray) -> None:
    """Requested tile ``i`` into ``out`` (tile_px square): copy the stored tiles' parts, resize if needed."""
    tile_px, keys = int(p.tp[i]), p.needs[i]
    if keys is None:  # fallback: tiffslide, identical pixels, slower
        rp = int(p.rp[i])
        arr = np.asarray(r.slide.read_region((int(p.xs[i]), int(p.ys[i])), int(p.lv[i]), (rp, rp), as_array=True))
        out[:] = resize_tile(np.ascontiguousarray(arr[:, :, :3]), tile_px)
        return
    L, side, s = r._levels[int(p.lv[i])], int(p.side[i]), int(p.scale[i])
    if side == tile_px:  # no resize: assemble in place
        _assemble_into(L, out, keys, cache, p.origin[i], s)
        return
    img = np.empty((side, side, 3), np.uint8)
    _assemble_into(L, img, keys, cache, p.origin[i], s)
    out[:] = resize_tile(img, tile_px)


def _assemble_into(L: _Level, img: np.ndarray, keys, cache, origin, s: int = 1) -> None:
    """Copy the stored tiles' parts (decoded at 1/s) into the square ``img``; 0 outside the level."""
    tw, th = L.tile_w // s, L.tile_h // s
    width, height = -(-L.width // s), -(-L.height // s)
    side = img.shape[0]
    rx0, ry0 = int(origin[0]), int(origin[1])
    if rx0 < 0 or ry0 < 0 or rx0 + side > width or ry0 + side > height:
        img[:] = 0  # only tiles crossing the level's edge have pixels no stored tile covers
    for k in keys:
        row, c = divmod(k[1], L.across)
        tx0, ty0 = c * tw, row * th
        # intersection of the stored tile, the request and the level's extent
        ax0, ax1 = max(tx0, rx0, 0), min(tx0 + tw, rx0 + side, width)
        ay0, ay1 = max(ty0, ry0, 0), min(ty0 + th, ry0 + side, height)
        if ax1 <= ax0 or ay1 <= ay0:
            continue
        img[ay0 - ry0 : ay1 - ry0, ax0 - rx0 : ax1 - rx0] = cache[k][ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]


def read_tiles(
    slide_uri: str,
    tiles: pd.DataFrame,
    s3: S3Options | None = None,
    batch_tiles: int = 64,
    num_threads: int = 1,
    damaged: dict[int, str] | None = None,
    decode: str = "full",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read one slide's tiles, each stored tile decoded at most once.

    Parameters
    ----------
    slide_uri
        Local path or ``s3://`` URI of the slide.
    tiles
        Rows of ``tiles.parquet`` for this slide (``tile_id, x, y, level,
        read_px, tile_px``; x, y level-0 px of the top-left).
    s3
        S3 settings (default: from the environment).
    batch_tiles
        Tiles per yielded batch.
    num_threads
        Decoding threads.
    damaged
        If given, filled with ``tile_id -> cause`` for every tile built from a
        stored tile whose decode raised or warned (libjpeg's "Corrupt JPEG
        data"); such tiles are still yielded, with the decoder's best effort.
    decode
        ``"full"`` (default: exact ``read_region`` pixels) or ``"scaled"``: when a read is
        downsampled, stored JPEG tiles are decoded at 1/2, 1/4 or 1/8 inside libjpeg-turbo
        (:func:`decode_scale`); damage is reported the same way.

    Yields
    ------
    (tile_ids, images)
        ``int64 [n]`` and ``uint8 [n, tile_px, tile_px, 3]``, in slide order
        (level, y, x).
    """
    with SlideReader(slide_uri, s3=s3, num_threads=num_threads, decode=decode) as r:
        for out in r.read(tiles, batch_tiles=batch_tiles):
            if damaged is not None:
                damaged.update(r.damaged_tiles)
            yield out


def decode_bound_keys(slide_uri: str, tiles: pd.DataFrame) -> list[tuple[int, int]]:
    """The distinct stored tiles a pass over ``tiles`` decodes (for the decode-bound benchmark)."""
    with SlideReader(slide_uri) as r:
        keys: set[tuple[int, int]] = set()
        for x, y, level, read_px in tiles[["x", "y", "level", "read_px"]].itertuples(index=False):
            L = r.level(int(level))
            if L is not None:
                rx0, ry0 = int(x / L.downsample), int(y / L.downsample)
                keys.update((int(level), k) for k in _stored_tiles(L, rx0, ry0, int(read_px)))
        return sorted(keys)
