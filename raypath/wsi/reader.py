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
    """

    def __init__(self, slide_uri: str, s3: S3Options | None = None, num_threads: int = 1):
        import tiffslide

        self.uri = str(slide_uri)
        self.num_threads = max(1, int(num_threads))
        self._remote = is_remote(self.uri)
        self._fd: int | None = None
        self._fs = None
        try:
            if self._remote:
                self._fs = filesystem_for(self.uri, s3)
                # small blocks: the header walk must not pull 50 MiB per seek
                self._fh = self._fs.open(self.uri, "rb", block_size=256 * 1024, cache_type="readahead")
                self.slide = tiffslide.TiffSlide(self._fh)
            else:
                path = strip_protocol(self.uri)
                self.slide = tiffslide.TiffSlide(path)
                self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise RaypathError(f"not_found: slide {self.uri!r} not found: check the uri in slides.parquet") from e
        except Exception as e:
            from raypath.wsi.slide_io import classify_exception

            verdict = classify_exception(e, self.uri, s3)  # raises StorageUnavailable for an outage
            raise RaypathError(f"{verdict}; re-run `raypath ingest` to record it, or drop it from the cohort") from e
        self._levels: dict[int, _Level | None] = {}
        #: damaged stored tiles met so far, ``(level, index) -> what the decoder reported``
        self.damage: dict[tuple[int, int], str] = {}
        #: requested tiles that contain a damaged stored tile, ``tile_id -> cause`` (filled by :meth:`read`)
        self.damaged_tiles: dict[int, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._remote:
            self._fh.close()
        self.slide.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ geometry
    def level(self, level: int) -> _Level | None:
        """Tiled-page description of ``level``, or ``None`` when we must fall back."""
        if level in self._levels:
            return self._levels[level]
        info = None
        s = self.slide
        if not 0 <= level < s.level_count:
            raise RaypathError(
                f"slide {self.uri!r} has {s.level_count} levels; tiles.parquet asks for level {level}: "
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
            if ok:
                jpeg = page.compression == _JPEG
                info = _Level(
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
                    colorspace=jpeg_decode_colorspace(
                        page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
                    )
                    if jpeg
                    else (),
                    downsample=float(s.level_downsamples[level]),
                )
        except Exception as e:  # unusual layouts: the slow, exact path still works
            log.debug("slide %s level %d: fast path unavailable (%s)", self.uri, level, e)
            info = None
        self._levels[level] = info
        return info

    # ------------------------------------------------------------------ bytes + decoding
    def _fetch(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Compressed bytes of stored tiles ``(level, index)``."""
        if not keys:
            return {}
        spans = []
        for lv, i in keys:
            L = self._levels[lv]
            spans.append((int(L.offsets[i]), int(L.bytecounts[i])))
        if not self._remote:
            out = {k: os.pread(self._fd, n, off) if n else b"" for k, (off, n) in zip(keys, spans)}
            for k, (off, n) in zip(keys, spans):
                if len(out[k]) != n:
                    raise self._truncated(k, off, n, len(out[k]))
            return out
        # object storage: merge neighbouring ranges, one batched cat_ranges call
        order = sorted(range(len(keys)), key=lambda j: spans[j][0])
        groups: list[list[int]] = []
        for j in order:
            off, n = spans[j]
            if n == 0:
                continue
            if groups:
                g = groups[-1]
                gend = max(spans[k][0] + spans[k][1] for k in g)
                if off - gend <= _MERGE_GAP_BYTES:
                    g.append(j)
                    continue
            groups.append([j])
        starts = [min(spans[k][0] for k in g) for g in groups]
        ends = [max(spans[k][0] + spans[k][1] for k in g) for g in groups]
        blobs = self._fs.cat_ranges([self.uri] * len(groups), starts, ends) if groups else []
        out = {k: b"" for k, (_, n) in zip(keys, spans) if n == 0}
        for g, start, blob in zip(groups, starts, blobs):
            if isinstance(blob, Exception):
                raise RaypathError(f"reading slide {self.uri!r} failed: {blob}")
            for k in g:
                off, n = spans[k]
                out[keys[k]] = bytes(blob[off - start : off - start + n])
                if len(out[keys[k]]) != n:
                    raise self._truncated(keys[k], off, n, len(out[keys[k]]))
        return out

    def _truncated(self, key, off: int, n: int, got: int) -> RaypathError:
        return RaypathError(
            f"truncated: slide {self.uri!r} is truncated or corrupt: stored tile {key[1]} of level {key[0]} needs bytes "
            f"{off}..{off + n} but only {got} could be read; re-copy the file and re-run `raypath ingest`"
        )

    def _decode(self, key: tuple[int, int], data: bytes) -> np.ndarray:
        L = self._levels[key[0]]
        if not data:  # sparse/empty stored tile: tifffile fills with 0
            return np.zeros((L.tile_h, L.tile_w, 3), np.uint8)
        if L.jpeg:  # libjpeg warnings (corrupt data) are reported, not hidden (raypath.wsi.jpeg)
            from raypath.wsi.jpeg import decode_tile

            arr, problem = decode_tile(data, L.tables, L.colorspace[0], L.colorspace[1], (L.tile_h, L.tile_w))
            if problem is not None:
                self.damage[key] = problem
        else:
            try:
                seg, _, _ = L.page.decode(data, key[1], jpegtables=getattr(L.page, "jpegtables", None))
                arr = seg[0]
            except Exception as e:  # codecs raise many types: a damaged tile, recorded
                self.damage[key] = f"{type(e).__name__}: {e}"[:300]
                arr = np.zeros((L.tile_h, L.tile_w, 3), np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return arr[:, :, :3]

    # ------------------------------------------------------------------ the pass
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
        cols = {c: tiles[c].to_numpy(np.int64) for c in REQUIRED_COLUMNS}
        order = np.lexsort((cols["tile_id"], cols["x"], cols["y"], cols["level"]))  # slide order
        tid, xs, ys, lv, rp, tp = (cols[c][order] for c in REQUIRED_COLUMNS)
        n = len(order)
        batch_tiles = max(1, int(batch_tiles))

        # plan: the stored tiles each requested tile needs, and their last use
        needs: list[list[tuple[int, int]] | None] = []
        origin = np.zeros((n, 2), np.int64)
        last_use: dict[tuple[int, int], int] = {}
        for i in range(n):
            L = self.level(int(lv[i]))
            if L is None:
                needs.append(None)
                continue
            rx0, ry0 = int(xs[i] / L.downsample), int(ys[i] / L.downsample)
            origin[i] = (rx0, ry0)
            x0, x1 = max(rx0, 0), min(rx0 + int(rp[i]), L.width)
            y0, y1 = max(ry0, 0), min(ry0 + int(rp[i]), L.height)
            keys = []
            if x1 > x0 and y1 > y0:
                for r in range(y0 // L.tile_h, (y1 - 1) // L.tile_h + 1):
                    for c in range(x0 // L.tile_w, (x1 - 1) // L.tile_w + 1):
                        k = (int(lv[i]), r * L.across + c)
                        keys.append(k)
                        last_use[k] = i
            needs.append(keys)

        # batches: consecutive runs of at most batch_tiles with one tile_px
        bounds = []
        s = 0
        for i in range(1, n + 1):
            if i == n or i - s >= batch_tiles or tp[i] != tp[s]:
                bounds.append((s, i))
                s = i
        new_keys: list[list[tuple[int, int]]] = []
        seen: set[tuple[int, int]] = set()
        for a, b in bounds:
            ks = []
            for i in range(a, b):
                for k in needs[i] or ():
                    if k not in seen:
                        seen.add(k)
                        ks.append(k)
            new_keys.append(ks)

        cache: dict[tuple[int, int], np.ndarray] = {}
        io_pool = ThreadPoolExecutor(1, thread_name_prefix="raypath-io")
        dec_pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="raypath-dec") if self.num_threads > 1 else None
        try:
            pending: Future = io_pool.submit(self._fetch, new_keys[0])
            for bi, (a, b) in enumerate(bounds):
                blobs = pending.result()
                if bi + 1 < len(bounds):  # overlap next batch's I/O with this batch's decoding
                    pending = io_pool.submit(self._fetch, new_keys[bi + 1])
                ks = new_keys[bi]
                if dec_pool is not None and len(ks) > 1:
                    for k, arr in zip(ks, dec_pool.map(lambda k: self._decode(k, blobs[k]), ks)):
                        cache[k] = arr
                else:
                    for k in ks:
                        cache[k] = self._decode(k, blobs[k])
                del blobs
                out = np.empty((b - a, int(tp[a]), int(tp[a]), 3), np.uint8)
                for j, i in enumerate(range(a, b)):
                    if rp[i] == tp[i] and needs[i] is not None:  # no resize: assemble in place
                        self._assemble_into(out[j], needs[i], cache, origin[i], lv[i])
                    else:
                        out[j] = self._assemble(i, needs[i], cache, origin[i], xs[i], ys[i], lv[i], rp[i], tp[i])
                if self.damage:
                    self._note_damaged(tid, needs, a, b)
                for i in range(a, b):  # drop stored tiles no later tile needs
                    for k in needs[i] or ():
                        if last_use.get(k) == i:
                            cache.pop(k, None)
                yield tid[a:b].copy(), out
        finally:
            io_pool.shutdown(wait=True)
            if dec_pool is not None:
                dec_pool.shutdown(wait=True)

    def _note_damaged(self, tid: np.ndarray, needs, a: int, b: int) -> None:
        """Record requested tiles built from a damaged stored tile (``damaged_tiles``: tile_id -> cause)."""
        for i in range(a, b):
            bad = [k for k in needs[i] or () if k in self.damage]
            if bad:
                k = bad[0]
                self.damaged_tiles[int(tid[i])] = (
                    f"corrupt_tile_data: stored tile {k[1]} of level {k[0]}: {self.damage[k]}")

    def _assemble(self, i, keys, cache, origin, x, y, level, read_px, tile_px) -> np.ndarray:
        read_px, tile_px = int(read_px), int(tile_px)
        if keys is None:  # fallback: tiffslide, identical pixels, slower
            arr = np.asarray(self.slide.read_region((int(x), int(y)), int(level), (read_px, read_px), as_array=True))
            return resize_tile(np.ascontiguousarray(arr[:, :, :3]), tile_px)
        img = np.empty((read_px, read_px, 3), np.uint8)
        self._assemble_into(img, keys, cache, origin, level)
        return resize_tile(img, tile_px)

    def _assemble_into(self, img: np.ndarray, keys, cache, origin, level) -> None:
        """Copy the stored tiles' parts into ``img`` (square, read_px); 0 outside the level."""
        L = self._levels[int(level)]
        read_px = img.shape[0]
        rx0, ry0 = int(origin[0]), int(origin[1])
        if rx0 < 0 or ry0 < 0 or rx0 + read_px > L.width or ry0 + read_px > L.height:
            img[:] = 0  # only tiles crossing the level's edge have pixels no stored tile covers
        for k in keys:
            r, c = divmod(k[1], L.across)
            tx0, ty0 = c * L.tile_w, r * L.tile_h
            # intersection of the stored tile, the request and the level's extent
            ax0, ax1 = max(tx0, rx0, 0), min(tx0 + L.tile_w, rx0 + read_px, L.width)
            ay0, ay1 = max(ty0, ry0, 0), min(ty0 + L.tile_h, ry0 + read_px, L.height)
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

    Yields
    ------
    (tile_ids, images)
        ``int64 [n]`` and ``uint8 [n, tile_px, tile_px, 3]``, in slide order
        (level, y, x).
    """
    with SlideReader(slide_uri, s3=s3, num_threads=num_threads) as r:
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
            if L is None:
                continue
            rx0, ry0 = int(x / L.downsample), int(y / L.downsample)
            x0, x1 = max(rx0, 0), min(rx0 + int(read_px), L.width)
            y0, y1 = max(ry0, 0), min(ry0 + int(read_px), L.height)
            for row in range(y0 // L.tile_h, (y1 - 1) // L.tile_h + 1):
                for c in range(x0 // L.tile_w, (x1 - 1) // L.tile_w + 1):
                    keys.add((int(level), row * L.across + c))
        return sorted(keys)
