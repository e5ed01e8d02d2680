"""Patch pixels: read once from slides or image files into a local uint8 cache.

Every patch is stored as a *context* square of ``patch_px + 2 * shift_px``
pixels at the target mpp, centred on its cell: training crops ``patch_px``
with a random shift of up to ``shift_px`` (the small random shift of the
paper's code), evaluation and embedding crop the centre.

Slide patches are read with the fast tile reader
(:func:`raypath.wsi.reader.read_tiles`: each stored JPEG tile decoded at
most once per slide, local or ``s3://``) at the pyramid level
:func:`raypath.wsi.tiling.choose_level` picks for the target mpp, then
resized to the context size; image files are resized to ``patch_px`` and
reflect-padded to the context size.

The cache is one ``.npy`` file opened as a memory map, so memory stays at
one read batch while it is filled and one training batch while it is used,
whatever the number of patches.  Its folder is named by the digest of the
patch table's pixel-deciding columns, the fingerprints of the files read
(size, mtime/ETag, first bytes) and the geometry; it is written to a
temporary folder and renamed when complete, so a killed run never leaves a
half cache that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import S3Options
from raypath.patch.table import is_slide_row, table_digest

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class Geometry:
    """Patch geometry: side ``patch_px`` at ``mpp`` um/px, random shift up to ``shift_px``."""

    patch_px: int = 224
    mpp: float = 0.25
    shift_px: int = 16

    @property
    def context_px(self) -> int:
        return self.patch_px + 2 * self.shift_px


class PatchImages:
    """An opened cache: ``images`` uint8 ``[N, C, C, 3]`` (memory map), ``row_of`` patch_id -> row."""

    def __init__(self, folder: str):
        self.folder = folder
        if not os.path.exists(os.path.join(folder, _COMPLETE)):
            raise RaypathError(
                f"patch cache {folder!r} is not on this machine: a fit on another Ray node needs the cache "
                "there too; pass --cache-dir on a file system every node mounts"
            )
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        ids = pd.read_parquet(os.path.join(folder, "index.parquet"))["patch_id"].astype(str)
        self.patch_ids = ids.to_numpy()
        self.row_of = {p: i for i, p in enumerate(self.patch_ids)}
        with open(os.path.join(folder, "geometry.json")) as f:
            self.geometry = Geometry(**json.load(f)["geometry"])

    def rows(self, patch_ids) -> np.ndarray:
        return np.fromiter((self.row_of[p] for p in patch_ids), dtype=np.int64, count=len(patch_ids))

    def centre(self, rows: np.ndarray) -> np.ndarray:
        """uint8 ``[n, patch_px, patch_px, 3]``: the centre crops of ``rows``."""
        s = self.geometry.shift_px
        p = self.geometry.patch_px
        return np.ascontiguousarray(self.images[np.asarray(rows, np.int64), s:s + p, s:s + p])


def source_fingerprints(table: pd.DataFrame, s3: S3Options | None = None) -> dict[str, str]:
    """``uri -> fingerprint`` (size, mtime/ETag, first bytes) of every slide and image file the
    table reads: a file replaced under the same name gets new cache keys."""
    from raypath.wsi.slide_io import SlideError, file_info, fingerprint, read_head

    out = {}
    for uri in sorted(set(table["uri"].astype(str))):
        try:
            out[uri] = fingerprint(file_info(uri, s3), read_head(uri, s3, 65536))
        except SlideError as e:
            rows = np.flatnonzero(table["uri"].astype(str).to_numpy() == uri)
            raise RaypathError(f"patch table rows {', '.join(str(r + 1) for r in rows[:5])}: {uri!r} cannot be read "
                               f"({e.detail}); fix the uri or drop the rows") from None
    return out


def cache_key(table: pd.DataFrame, geom: Geometry, fingerprints: dict[str, str] | None = None) -> str:
    doc = json.dumps({"v": CACHE_VERSION, "table": table_digest(table), "geometry": asdict(geom),
                      "files": sorted((fingerprints or {}).items())}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _slide_tiles(row_idx: np.ndarray, sub: pd.DataFrame, meta, geom: Geometry, default_mpp: float) -> pd.DataFrame:
    """Reader rows (tile_id = table row) for the patches of one slide."""
    from raypath.wsi.tiling import ResolutionError, choose_level

    level0 = sub["slide_mpp"].iloc[0] if "slide_mpp" in sub.columns and pd.notna(sub["slide_mpp"].iloc[0]) else meta.mpp_x
    if not level0:
        raise RaypathError(
            f"slide {sub['uri'].iloc[0]!r} (slide_id {sub['slide_id'].iloc[0]}) records no um/px: add a `slide_mpp` "
            "column to the patch table with its level-0 um/px"
        )
    target = sub["mpp"].fillna(default_mpp).to_numpy(float) if "mpp" in sub.columns else np.full(len(sub), default_mpp)
    out = []
    for mpp in np.unique(target):
        sel = target == mpp
        try:
            level, read_px = choose_level(float(level0), meta.level_downsamples, float(mpp), geom.context_px)
        except ResolutionError as e:
            raise RaypathError(f"slide {sub['slide_id'].iloc[0]}: {e}") from None
        ds = float(meta.level_downsamples[level])
        half = read_px * ds / 2
        out.append(pd.DataFrame({
            "tile_id": row_idx[sel],
            "x": np.round(sub["x"].to_numpy(float)[sel] - half).astype(np.int64),
            "y": np.round(sub["y"].to_numpy(float)[sel] - half).astype(np.int64),
            "level": level, "read_px": read_px, "tile_px": geom.context_px,
        }))
    return pd.concat(out, ignore_index=True)


def _fill_slides(images: np.ndarray, table: pd.DataFrame, geom: Geometry, s3: S3Options | None,
                 batch: int, num_threads: int) -> None:
    from raypath.wsi.reader import read_tiles
    from raypath.wsi.slide_io import SlideError, read_metadata

    mask = is_slide_row(table)
    for uri, sub in table[mask].groupby("uri", sort=True):
        try:
            meta = read_metadata(uri, s3, check_pixels=False)
        except SlideError as e:
            raise RaypathError(f"patch table: slide {uri!r} (slide_id {sub['slide_id'].iloc[0]}) cannot be read: {e}; "
                               "fix the uri or drop its rows") from None
        tiles = _slide_tiles(sub.index.to_numpy(), sub, meta, geom, geom.mpp)
        for tid, imgs in read_tiles(uri, tiles, s3=s3, batch_tiles=batch, num_threads=num_threads):
            images[tid] = imgs


def _fill_images(images: np.ndarray, table: pd.DataFrame, geom: Geometry) -> None:
    from PIL import Image

    s = geom.shift_px
    for i in np.flatnonzero(~is_slide_row(table)):
        uri = table["uri"].iloc[i]
        try:
            with Image.open(uri) as im:
                img = np.asarray(im.convert("RGB").resize((geom.patch_px, geom.patch_px), Image.BILINEAR))
        except (OSError, ValueError) as e:
            raise RaypathError(f"patch table row {i + 1} (patch_id {table['patch_id'].iloc[i]}): image {uri!r} "
                               f"cannot be read ({type(e).__name__}: {e}); fix or drop the row") from None
        images[i] = np.pad(img, ((s, s), (s, s), (0, 0)), mode="reflect") if s else img


def default_cache_dir(workdir: str) -> str:
    from raypath.io.storage import is_remote, strip_protocol

    if is_remote(workdir):
        return os.path.join(os.path.expanduser("~"), ".cache", "raypath", "patches")
    return os.path.join(strip_protocol(workdir), "cache", "patches")


def build_patch_cache(table: pd.DataFrame, geom: Geometry, cache_dir: str, s3: S3Options | None = None,
                      batch: int = 64, num_threads: int = 1, fingerprints: dict[str, str] | None = None) -> PatchImages:
    """The cache of ``table``'s patches under ``cache_dir`` (built if missing); see the module doc.

    ``fingerprints`` (:func:`source_fingerprints`, computed when ``None``) go into the cache's name."""
    table = table.reset_index(drop=True)
    if fingerprints is None:
        fingerprints = source_fingerprints(table, s3)
    folder = os.path.join(cache_dir, f"patches-{cache_key(table, geom, fingerprints)}")
    if os.path.exists(os.path.join(folder, _COMPLETE)):
        return PatchImages(folder)
    tmp = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        c = geom.context_px
        images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+", dtype=np.uint8,
                                           shape=(len(table), c, c, 3))
        _fill_slides(images, table, geom, s3, batch, num_threads)
        _fill_images(images, table, geom)
        images.flush()
        del images
        pd.DataFrame({"patch_id": table["patch_id"].astype(str)}).to_parquet(os.path.join(tmp, "index.parquet"))
        with open(os.path.join(tmp, "geometry.json"), "w") as f:
            json.dump({"geometry": asdict(geom), "n": len(table), "version": CACHE_VERSION}, f)
        open(os.path.join(tmp, _COMPLETE), "w").close()
        if os.path.exists(folder):  # a concurrent builder won: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("patch: cached %d patches (%d px context) in %s", len(table), geom.context_px, folder)
    return PatchImages(folder)
