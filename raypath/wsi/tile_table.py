"""``tiles.parquet``: one parquet file per slide in a dataset directory.

Layout (contract, see docs/CONTRACTS.md)::

    <workdir>/tiles.parquet/
        slide-<slide_id>.parquet     # that slide's rows (schema TILES), written by the tiling worker

The directory is an ordinary parquet dataset: ``pd.read_parquet(workdir /
'tiles.parquet')``, ``pyarrow.parquet.read_table`` and ``pyarrow.dataset``
read it whole.  Each part carries, in its parquet key-value metadata
(:data:`META_KEY`), the slide's tile count, geometry and :func:`tiles_hash`,
so :func:`tile_index` plans a cohort from the parts' footers without reading
a single tile row.  A workdir tiled before this layout (one
``tiles.parquet`` file) stays readable through the same functions; only
:func:`tile_index` then has to read its columns (re-run ``raypath tile`` for
the flat-memory path).

Readers use :func:`read_tile_table` (whole table or some slides),
:func:`read_slide_tiles` (one slide's rows) and :func:`tile_index` /
:func:`tile_counts` (per-slide counts without loading rows).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raypath.io.storage import (
    S3Options,
    atomic_write_bytes,
    filesystem_for,
    is_remote,
    join,
    open_file,
    strip_protocol,
)
from raypath.schemas import TILES

TILES_FILE = "tiles.parquet"
#: Part files are ``slide-<slide_id>.parquet`` (no ``key=value`` names: readers must not infer partitions).
PART_PREFIX = "slide-"
#: Written when no slide was tiled, so the dataset still has the TILES schema.
EMPTY_PART = "part-empty.parquet"
#: Parquet key-value metadata of a part: JSON with slide_id, n_tiles, tiles_sha256, level, read_px, tile_px.
META_KEY = "raypath.tiles"
#: Tile columns that define a slide's tile geometry (what :func:`tiles_hash` covers).
GEOMETRY_COLS = ("tile_id", "x", "y", "level", "read_px", "tile_px")
INDEX_COLS = ["slide_id", "n_tiles", "tiles_sha256", "level", "read_px", "tile_px"]
_FOOTER_THREADS = 16


def tiles_uri(workdir: str) -> str:
    return join(workdir, TILES_FILE)


def part_name(slide_id: str) -> str:
    return f"{PART_PREFIX}{slide_id}.parquet"


def slide_part_uri(workdir: str, slide_id: str) -> str:
    return join(tiles_uri(workdir), part_name(slide_id))


def tiles_hash(tiles: pd.DataFrame) -> str:
    """sha256 of a slide's tile geometry (tile_id, x, y, level, read_px, tile_px), order-independent."""
    t = tiles.sort_values("tile_id")
    arr = np.stack([t[c].to_numpy(np.int64) for c in GEOMETRY_COLS], axis=1)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def slide_index_row(slide_id: str, tiles: pd.DataFrame) -> dict:
    """One :func:`tile_index` row computed from a slide's rows."""
    n = len(tiles)
    first = tiles.iloc[0] if n else None
    return {
        "slide_id": str(slide_id),
        "n_tiles": int(n),
        "tiles_sha256": tiles_hash(tiles) if n else "",
        "level": int(first["level"]) if n else -1,
        "read_px": int(first["read_px"]) if n else -1,
        "tile_px": int(first["tile_px"]) if n else -1,
    }


# --------------------------------------------------------------------------- layout


def _fs_path(uri: str, s3: S3Options | None):
    fs = filesystem_for(uri, s3)
    return fs, (uri if is_remote(uri) else strip_protocol(uri))


def layout(workdir: str, s3: S3Options | None = None) -> str | None:
    """``"dataset"`` (a directory of parts), ``"file"`` (a single-file table of an older run) or ``None``."""
    fs, path = _fs_path(tiles_uri(workdir), s3)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)  # s3fs caches listings per process; a worker may have written since
    if fs.isdir(path):
        return "dataset"
    if fs.exists(path):
        return "file"
    return None


def _names(workdir: str, s3: S3Options | None) -> list[str]:
    """File names in the dataset directory (locally without a stat per file: 10,000 parts list in ms)."""
    fs, path = _fs_path(tiles_uri(workdir), s3)
    if not is_remote(workdir):
        return os.listdir(path) if os.path.isdir(path) else []
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] if fs.isdir(path) else []


def _part_paths(workdir: str, s3: S3Options | None) -> list[str]:
    """Data files of the dataset directory, sorted (what pyarrow.dataset would read)."""
    names = _names(workdir, s3)
    keep = sorted(n for n in names if n.endswith(".parquet") and not n.startswith((".", "_")))
    return [join(tiles_uri(workdir), n) for n in keep]


def write_slide_tiles(workdir: str, slide_id: str, tiles: pa.Table, s3: S3Options | None = None) -> dict:
    """Write one slide's rows as ``tiles.parquet/slide-<slide_id>.parquet``, atomically (tiling worker).

    Returns the slide's :func:`tile_index` row (also stored in the part's metadata).
    """
    row = slide_index_row(slide_id, tiles.select(list(GEOMETRY_COLS)).to_pandas())
    meta = dict(tiles.schema.metadata or {})
    meta[META_KEY.encode()] = json.dumps(row).encode()
    buf = io.BytesIO()
    pq.write_table(tiles.replace_schema_metadata(meta), buf, compression="zstd")
    atomic_write_bytes(slide_part_uri(workdir, slide_id), buf.getvalue(), s3)
    return row


def prepare_dataset(workdir: str, s3: S3Options | None = None) -> None:
    """Before tiling: make ``tiles.parquet`` a directory (a single file of an older run is removed)."""
    fs, path = _fs_path(tiles_uri(workdir), s3)
    if layout(workdir, s3) == "file":
        fs.rm(path)
    if not is_remote(workdir):
        os.makedirs(path, exist_ok=True)


def finish_dataset(workdir: str, slide_ids: Iterable[str], s3: S3Options | None = None) -> None:
    """After tiling: drop parts of slides not tiled by this run (stale) and temp files of killed writes;
    write an empty part when no slide was tiled so the dataset keeps its schema."""
    keep = {part_name(s) for s in slide_ids}
    fs, path = _fs_path(tiles_uri(workdir), s3)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    for n in _names(workdir, s3):
        if n not in keep and (n.startswith(PART_PREFIX) or n == EMPTY_PART or ".tmp-" in n):
            fs.rm(join(path, n) if is_remote(workdir) else os.path.join(path, n))
    if not keep:
        buf = io.BytesIO()
        pq.write_table(TILES.empty_table(), buf, compression="zstd")
        atomic_write_bytes(join(tiles_uri(workdir), EMPTY_PART), buf.getvalue(), s3)


# --------------------------------------------------------------------------- reading rows


def _read_file(uri: str, s3: S3Options | None, columns=None, filters=None) -> pa.Table:
    if is_remote(uri):
        with open_file(uri, "rb", s3) as f:
            return pq.read_table(f, columns=columns, filters=filters)
    return pq.read_table(strip_protocol(uri), columns=columns, filters=filters)


def _read_dataset(workdir: str, s3: S3Options | None, columns=None, filters=None) -> pa.Table:
    fs, path = _fs_path(tiles_uri(workdir), s3)
    t = pq.read_table(path, filesystem=fs if is_remote(workdir) else None, columns=columns, filters=filters)
    return t.replace_schema_metadata(None)


def _read_parts(paths: list[str], s3: S3Options | None, columns=None) -> pa.Table:
    tables = [_read_file(p, s3, columns).replace_schema_metadata(None) for p in paths]
    if not tables:
        return TILES.empty_table() if columns is None else TILES.empty_table().select(list(columns))
    return pa.concat_tables(tables)


def read_tile_table(
    workdir: str,
    s3: S3Options | None = None,
    slide_ids: Iterable[str] | None = None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """The tiles table (every slide, or ``slide_ids``) as a DataFrame, rows grouped by slide.

    With ``slide_ids`` on the dataset layout only those slides' parts are read.
    """
    kind = layout(workdir, s3)
    if kind is None:
        raise FileNotFoundError(tiles_uri(workdir))
    want = None if slide_ids is None else sorted({str(s) for s in slide_ids})
    filters = None if want is None else [("slide_id", "in", want)]
    if kind == "file":
        return _read_file(tiles_uri(workdir), s3, columns, filters).to_pandas()
    if want is not None:  # the slides' own parts when they exist (no listing, no scan)
        parts = [slide_part_uri(workdir, s) for s in want]
        fs = filesystem_for(parts[0], s3) if parts else None
        if all(fs.exists(p if is_remote(p) else strip_protocol(p)) for p in parts):
            return _read_parts(parts, s3, columns).to_pandas()
    return _read_dataset(workdir, s3, columns, filters).to_pandas()


def read_slide_tiles(
    workdir: str, slide_id: str, s3: S3Options | None = None, columns: list[str] | None = None
) -> pd.DataFrame:
    """One slide's rows of the tiles table (empty when it has none)."""
    return read_tile_table(workdir, s3, [slide_id], columns)


# --------------------------------------------------------------------------- per-slide index


def _part_meta(uri: str, s3: S3Options | None) -> dict | None:
    if is_remote(uri):
        with open_file(uri, "rb", s3) as f:
            md = pq.read_schema(f).metadata or {}
    else:
        md = pq.read_schema(strip_protocol(uri)).metadata or {}
    v = md.get(META_KEY.encode())
    return json.loads(v) if v else None


def _index_from_rows(tiles: pd.DataFrame) -> list[dict]:
    return [slide_index_row(sid, grp) for sid, grp in tiles.groupby("slide_id", sort=True)]


def tile_index(
    workdir: str, s3: S3Options | None = None, slide_ids: Iterable[str] | None = None
) -> pd.DataFrame:
    """One row per slide with tiles: ``slide_id, n_tiles, tiles_sha256, level, read_px, tile_px``.

    On the dataset layout this reads only the parts' footers (in threads);
    parts without raypath metadata and single-file tables are summarised from
    their geometry columns.  Slides with no tiles have ``n_tiles == 0`` or no row.
    """
    kind = layout(workdir, s3)
    if kind is None:
        raise FileNotFoundError(tiles_uri(workdir))
    want = None if slide_ids is None else {str(s) for s in slide_ids}
    cols = ["slide_id", *GEOMETRY_COLS]
    if kind == "file":
        rows = _index_from_rows(read_tile_table(workdir, s3, want, cols))
        return pd.DataFrame(rows, columns=INDEX_COLS)
    paths = _part_paths(workdir, s3)
    if want is not None:
        paths = [p for p in paths if not p.rsplit("/", 1)[-1].startswith(PART_PREFIX)
                 or p.rsplit("/", 1)[-1][len(PART_PREFIX):-len(".parquet")] in want]
    with ThreadPoolExecutor(_FOOTER_THREADS) as pool:
        metas = list(pool.map(lambda p: _part_meta(p, s3), paths))
    rows = [m for m in metas if m is not None]
    plain = [p for p, m in zip(paths, metas) if m is None]
    if plain:  # parts written by hand: summarise their rows, one part at a time
        for p in plain:
            rows.extend(_index_from_rows(_read_file(p, s3, cols).to_pandas()))
    out = pd.DataFrame(rows, columns=INDEX_COLS)
    if want is not None:
        out = out[out["slide_id"].isin(want)]
    return out.sort_values("slide_id", kind="stable").reset_index(drop=True)


def tile_counts(workdir: str, s3: S3Options | None = None) -> pd.Series:
    """Tiles per slide (index ``slide_id``), from the parts' footers on the dataset layout
    (a single-file table: from its ``slide_id`` column)."""
    if layout(workdir, s3) == "file":
        sid = read_tile_table(workdir, s3, columns=["slide_id"])["slide_id"]
        return sid.value_counts().sort_index().astype(np.int64).rename("n_tiles").rename_axis("slide_id")
    idx = tile_index(workdir, s3)
    return idx.groupby("slide_id", sort=True)["n_tiles"].sum().astype(np.int64)
