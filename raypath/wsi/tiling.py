"""``raypath tile``: tissue segmentation, then a tile grid at a target mpp.

Geometry (plain functions, no I/O):

* :func:`choose_level` picks the pyramid level to read from: the coarsest
  level whose resolution is still at least the target (its mpp is at most
  ``target_mpp * (1 + tolerance)``), and the square side ``read_px`` to read
  there so that, resized to ``tile_px``, the tile has the target mpp.  A 40x
  slide (0.25 um/px) tiled at 0.5 um/px reads 448 px at level 0 and resizes
  to 224; a 20x slide (0.5 um/px) reads 224 px at level 0 with no resize.
* :func:`tile_grid` lays tiles (level-0 px) over the slide with a stride.
* :func:`tissue_fractions` measures each tile's tissue cover from the mask,
  exactly (area-weighted), at any mask resolution.

:func:`tile` runs one Ray Data task per ingested slide (the slide is opened
inside the task: ``TiffSlide`` is not picklable); each task writes its
slide's part of the ``tiles.parquet/`` dataset (:mod:`raypath.wsi.tile_table`)
and its ``qc/<slide_id>.png``, and the driver writes ``tiling_summary.parquet``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field, model_validator

from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.io.jsonio import to_jsonable
from raypath.errors import EXIT_SOME_FAILED, RaypathError, StorageUnavailable, failure_counts
from raypath.schemas import SLIDE_STATUS_OK, TILES, TILING_SUMMARY
from raypath.io.storage import S3Options, atomic_write_bytes, exists, join, makedirs, read_parquet, write_parquet_atomic
from raypath.io.storage import S3CacheType, activity, as_outage, check_storage
from raypath.wsi.tissue import TissueParams

log = logging.getLogger(__name__)

TILES_FILE = "tiles.parquet"
SUMMARY_FILE = "tiling_summary.parquet"
CONFIG_FILE = "tiling_config.yaml"
QC_DIR = "qc"

STATUS_OK = "ok"
STATUS_NO_TISSUE = "no_tissue"
STATUS_FAILED = "failed"


class TileConfig(StageConfig):
    """Parameters of ``raypath tile``."""

    workdir: str = Field(description="project folder with slides.parquet (local path or s3:// URI)")
    target_mpp: float = Field(0.5, gt=0, description="microns per pixel of the output tiles")
    tile_px: int = Field(224, ge=8, description="side of the output tiles in px")
    stride_px: int | None = Field(None, ge=1, description="grid step in output px (default: tile_px, no overlap)")
    overlap_px: int | None = Field(None, ge=0, description="overlap of neighbouring tiles in output px (stride = tile - overlap)")
    min_tissue_fraction: float = Field(0.6, ge=0, le=1, description="keep tiles with at least this tissue cover")
    mpp_tolerance: float = Field(
        0.1, ge=0, lt=1, description="relative mpp difference treated as equal (0.499 vs 0.5: no resize)"
    )
    allow_upsample: bool = Field(
        False, description="tile slides scanned coarser than target_mpp by upsampling (invents no detail)"
    )
    thumbnail_px: int = Field(1024, ge=128, description="minimum long side of the segmentation thumbnail")
    max_thumbnail_px: int = Field(4096, ge=128, description="cap of the thumbnail's long side")
    min_tissue_area_um2: float = Field(20_000.0, ge=0, description="tissue pieces smaller than this are dropped")
    exclude_pen: bool = Field(True, description="remove blue/green/black marker ink from the tissue mask")
    qc: bool = Field(True, description="write qc/<slide_id>.png per slide")
    use_ray: bool = Field(True, description="one Ray Data task per slide (False: tile in this process)")
    s3_block_size_bytes: int = Field(512 * 1024, ge=4096, description="S3 read block size")
    s3_cache_type: S3CacheType = Field("readahead", description="fsspec cache type for S3 reads")

    @model_validator(mode="after")
    def _stride_or_overlap(self) -> "TileConfig":
        if self.stride_px is not None and self.overlap_px is not None:
            if self.stride_px != self.tile_px - self.overlap_px:
                raise ValueError("give stride_px or overlap_px, not both (stride = tile_px - overlap_px)")
        if self.overlap_px is not None and self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px={self.overlap_px} must be smaller than tile_px={self.tile_px}")
        return self

    @property
    def effective_stride_px(self) -> int:
        if self.stride_px is not None:
            return self.stride_px
        if self.overlap_px is not None:
            return self.tile_px - self.overlap_px
        return self.tile_px

    def s3_options(self) -> S3Options:
        return S3Options.from_env(block_size_bytes=self.s3_block_size_bytes, cache_type=self.s3_cache_type)

    def tissue_params(self) -> TissueParams:
        return TissueParams(
            min_area_um2=self.min_tissue_area_um2,
            max_hole_um2=self.min_tissue_area_um2,
            exclude_pen=self.exclude_pen,
        )


# --------------------------------------------------------------------------- geometry


class ResolutionError(ValueError):
    """The slide is scanned coarser than the target mpp."""


def choose_level(
    level0_mpp: float,
    level_downsamples: list[float] | tuple[float, ...],
    target_mpp: float,
    tile_px: int = 224,
    mpp_tolerance: float = 0.1,
    allow_upsample: bool = False,
) -> tuple[int, int]:
    """The pyramid level to read and the square side to read there.

    Parameters
    ----------
    level0_mpp
        Microns per pixel at level 0.
    level_downsamples
        Downsample of each level relative to level 0 (``[1, 4, 16]``).
    target_mpp
        Microns per pixel of the output tile.
    tile_px
        Side of the output tile in px.
    mpp_tolerance
        Relative difference under which a level counts as being at the
        target (no resize: 0.499 um/px reads ``tile_px`` for a 0.5 target).
    allow_upsample
        If the finest level is coarser than the target, read fewer pixels
        at level 0 and upsample instead of raising.

    Returns
    -------
    (level, read_px)
        ``read_px`` is the side read at ``level``; it is resized to ``tile_px``.

    Raises
    ------
    ResolutionError
        When level 0 is coarser than the target (beyond the tolerance) and
        ``allow_upsample`` is false.
    """
    if level0_mpp <= 0 or target_mpp <= 0:
        raise ValueError(f"mpp must be positive (level0_mpp={level0_mpp}, target_mpp={target_mpp})")
    limit = target_mpp * (1 + mpp_tolerance)
    level_mpps = [level0_mpp * float(d) for d in level_downsamples]
    ok = [i for i, m in enumerate(level_mpps) if m <= limit]
    if not ok:
        if not allow_upsample:
            raise ResolutionError(
                f"the slide is scanned at {level0_mpp:.3g} um/px, coarser than the target "
                f"{target_mpp:g} um/px; lower --target-mpp or pass --allow-upsample"
            )
        level = 0
    else:
        # coarsest sufficient level = the one with the largest mpp among them
        level = max(ok, key=lambda i: level_mpps[i])
    ratio = target_mpp / level_mpps[level]
    read_px = tile_px if abs(ratio - 1) <= mpp_tolerance else int(round(tile_px * ratio))
    return level, max(read_px, 1)


def tile_grid(width: int, height: int, tile_l0_px: float, stride_l0_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (level-0 px) of the tiles that fit entirely in the slide.

    Tiles are laid from (0, 0) with step ``stride_l0_px``; partial tiles at the
    right and bottom edges are left out.  Row-major order (y, then x).

    Returns
    -------
    (x, y)
        int64 arrays of equal length.
    """
    if tile_l0_px <= 0 or stride_l0_px <= 0:
        raise ValueError("tile and stride sizes must be positive")
    nx = int(math.floor((width - tile_l0_px) / stride_l0_px)) + 1 if width >= tile_l0_px else 0
    ny = int(math.floor((height - tile_l0_px) / stride_l0_px)) + 1 if height >= tile_l0_px else 0
    xs = np.round(np.arange(nx) * stride_l0_px).astype(np.int64)
    ys = np.round(np.arange(ny) * stride_l0_px).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return gx.ravel(), gy.ravel()


def tissue_fractions(
    mask: np.ndarray,
    downsample_x: float,
    downsample_y: float,
    x: np.ndarray,
    y: np.ndarray,
    tile_l0_px: float,
) -> np.ndarray:
    """Fraction of each tile's area covered by tissue, from a low-resolution mask.

    Exact for a mask made of constant pixels: the integral image of the mask
    is piecewise bilinear, so interpolating it bilinearly at the tile corners
    (in mask coordinates, fractional) gives the covered area even when a tile
    spans only part of a mask pixel.

    Parameters
    ----------
    mask
        ``(H, W)`` bool tissue mask.
    downsample_x, downsample_y
        Level-0 px per mask px along each axis.
    x, y
        Tile top-left corners in level-0 px.
    tile_l0_px
        Tile side in level-0 px.

    Returns
    -------
    numpy.ndarray
        float32 in [0, 1], one per tile.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)

    def integral(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        px = np.clip(px, 0, w)
        py = np.clip(py, 0, h)
        x0 = np.minimum(np.floor(px).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(py).astype(np.int64), h - 1)
        u, v = px - x0, py - y0
        return (
            sat[y0, x0] * (1 - u) * (1 - v)
            + sat[y0, x0 + 1] * u * (1 - v)
            + sat[y0 + 1, x0] * (1 - u) * v
            + sat[y0 + 1, x0 + 1] * u * v
        )

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x0, x1 = x / downsample_x, (x + tile_l0_px) / downsample_x
    y0, y1 = y / downsample_y, (y + tile_l0_px) / downsample_y
    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    full = (x1 - x0) * (y1 - y0)
    return np.clip(area / np.maximum(full, 1e-12), 0, 1).astype(np.float32)


@dataclass
class SlidePlan:
    """Tiling geometry of one slide."""

    level: int
    read_px: int
    tile_l0_px: float  # tile side in level-0 px
    stride_l0_px: float


def plan_slide(
    level0_mpp: float, level_downsamples: list[float], cfg: TileConfig
) -> SlidePlan:
    """Level, read size and level-0 tile/stride sizes for one slide."""
    level, read_px = choose_level(
        level0_mpp, level_downsamples, cfg.target_mpp, cfg.tile_px, cfg.mpp_tolerance, cfg.allow_upsample
    )
    ds = float(level_downsamples[level])
    tile_l0 = read_px * ds
    stride_l0 = cfg.effective_stride_px * (read_px / cfg.tile_px) * ds
    return SlidePlan(level=level, read_px=read_px, tile_l0_px=tile_l0, stride_l0_px=stride_l0)


def thumbnail_size(width: int, height: int, tile_l0_px: float, cfg: TileConfig) -> int:
    """Long side of the segmentation thumbnail: at least ``cfg.thumbnail_px``
    and fine enough that a tile spans ~8 mask px, capped at ``max_thumbnail_px``."""
    want = math.ceil(8 * max(width, height) / max(tile_l0_px, 1))
    return int(min(max(cfg.thumbnail_px, want), cfg.max_thumbnail_px, max(width, height)))


def tiles_table(slide_id: str, x: np.ndarray, y: np.ndarray, frac: np.ndarray, plan: SlidePlan, cfg: TileConfig) -> pa.Table:
    n = len(x)
    return pa.Table.from_pydict(
        {
            "slide_id": [slide_id] * n,
            "tile_id": np.arange(n, dtype=np.int64),
            "x": np.asarray(x, np.int64),
            "y": np.asarray(y, np.int64),
            "level": np.full(n, plan.level, np.int32),
            "read_px": np.full(n, plan.read_px, np.int32),
            "tile_px": np.full(n, cfg.tile_px, np.int32),
            "target_mpp": np.full(n, cfg.target_mpp, np.float64),
            "tissue_fraction": np.asarray(frac, np.float32),
        },
        schema=TILES,
    )


# --------------------------------------------------------------------------- one slide


def tile_slide(row: dict[str, Any], cfg: TileConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Segment and tile one ingested slide; write its QC PNG.

    Parameters
    ----------
    row
        A ``slides.parquet`` row (needs ``slide_id``, ``uri``, ``mpp_x``,
        ``level_downsamples``).
    cfg
        :class:`TileConfig`.

    Returns
    -------
    (tiles, summary)
        ``tiles`` follows :data:`raypath.schemas.TILES` (``tile_id`` 0..n-1,
        row-major); ``summary`` is one :data:`TILING_SUMMARY` row.  Problems
        never raise: a slide without tissue gets status ``no_tissue`` and a
        warning, a slide that fails gets status ``failed`` and the reason.
    """
    from raypath.wsi.qc import render_qc
    from raypath.wsi.slide_io import classify_exception, opened_slide
    from raypath.wsi.tissue import segment_slide

    sid = str(row["slide_id"])
    summary: dict[str, Any] = dict(slide_id=sid, n_tiles=0, level=None, read_px=None, status=STATUS_FAILED, warning=None, qc_png=None)
    empty = TILES.empty_table()
    try:
        mpp = float(row["mpp_x"])
        downs = [float(d) for d in row["level_downsamples"]]
        plan = plan_slide(mpp, downs, cfg)
    except ResolutionError as e:
        summary["warning"] = f"resolution: {e}"
        return empty, summary
    except (TypeError, ValueError, KeyError) as e:
        summary["warning"] = f"no usable mpp/levels in slides.parquet ({e}); run `raypath ingest` again"
        return empty, summary
    summary.update(level=plan.level, read_px=plan.read_px)
    try:
        with opened_slide(str(row["uri"]), cfg.s3_options()) as slide:
            w, h = slide.dimensions
            tissue = segment_slide(slide, mpp, thumbnail_size(w, h, plan.tile_l0_px, cfg), cfg.tissue_params())
        x, y = tile_grid(w, h, plan.tile_l0_px, plan.stride_l0_px)
        frac = tissue_fractions(tissue.mask, tissue.downsample_x, tissue.downsample_y, x, y, plan.tile_l0_px)
        keep = frac >= cfg.min_tissue_fraction
        tiles = tiles_table(sid, x[keep], y[keep], frac[keep], plan, cfg)
        summary["n_tiles"] = tiles.num_rows
        if tiles.num_rows == 0:
            summary["status"] = STATUS_NO_TISSUE
            summary["warning"] = (
                f"no tile reaches {cfg.min_tissue_fraction:.0%} tissue (tissue covers "
                f"{tissue.mask.mean():.1%} of the thumbnail); check the QC image, lower "
                "--min-tissue-fraction, or drop the slide"
            )
        else:
            summary["status"] = STATUS_OK
        if cfg.qc:
            png = render_qc(
                tissue.thumbnail, tissue.mask, tissue.downsample_x, tissue.downsample_y,
                x[keep], y[keep], plan.tile_l0_px,
                title=f"{sid}  |  {tiles.num_rows} tiles  |  level {plan.level}, read {plan.read_px} px -> "
                f"{cfg.tile_px} px  |  {mpp:.3g} -> {cfg.target_mpp:g} um/px",
            )
            qc_uri = join(cfg.workdir, QC_DIR, f"{sid}.png")
            atomic_write_bytes(qc_uri, png, cfg.s3_options())
            summary["qc_png"] = qc_uri
        return tiles, summary
    except Exception as e:  # one bad slide never stops the cohort (a storage outage does: exit 4)
        summary["warning"] = str(classify_exception(e, str(row["uri"]), cfg.s3_options()))
        summary["status"] = STATUS_FAILED
        return empty, summary


def _tile_and_write(row: dict[str, Any], cfg: TileConfig) -> dict[str, Any]:
    """Tile one slide and write its rows as ``tiles.parquet/slide-<id>.parquet`` (worker side);
    only the summary goes back to the driver, so its memory does not grow with the tiles."""
    from raypath.wsi.tile_table import write_slide_tiles

    with activity(f"tile slide {row['slide_id']}"):
        tiles, summary = tile_slide(row, cfg)
    if tiles.num_rows:
        try:
            write_slide_tiles(cfg.workdir, str(row["slide_id"]), tiles, cfg.s3_options())
        except Exception as e:  # storage error: the slide is recorded as failed, the run goes on
            if as_outage(e, cfg.s3_options()) is not None:
                raise as_outage(e, cfg.s3_options()) from None
            summary.update(status=STATUS_FAILED, n_tiles=0,
                           warning=f"writing its tiles failed ({type(e).__name__}: {e}); re-run `raypath tile`")
    return summary


def _tile_row(item: dict[str, Any], cfg: TileConfig) -> dict[str, Any]:
    """Ray Data map: one slide in, its summary out (the tiles are written by the task)."""
    row = json.loads(item["row_json"])
    try:
        summary = _tile_and_write(row, cfg)
    except StorageUnavailable as e:  # handed to the driver as data: it stops the run, no task traceback
        summary = {"slide_id": row["slide_id"], "status": "storage_unavailable", "warning": e.as_record()}
    return {"slide_id": row["slide_id"], "summary_json": json.dumps(summary)}


def _run_ray(rows: list[dict[str, Any]], cfg: TileConfig, progress=None) -> list[dict[str, Any]]:
    from raypath.io.ray_env import ensure_ray, task_options

    ensure_ray()
    import ray

    items = [{"row_json": json.dumps(to_jsonable(r))} for r in rows]
    # one block per slide -> one task per slide; slides are opened inside the task
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(_tile_row, fn_kwargs={"cfg": cfg}, num_cpus=1, **task_options())
    outs = []
    for out in ds.iter_rows():  # one small summary per slide, never tile rows
        outage = StorageUnavailable.from_record(json.loads(out["summary_json"]).get("warning"))
        if outage is not None:
            raise outage
        outs.append(out)
        if progress is not None:
            progress.update()
    return outs


def _run_isolated(rows: list[dict[str, Any]], cfg: TileConfig, progress=None) -> list[dict[str, Any]]:
    """One Ray task per slide, each awaited on its own: a slide that kills its
    worker (a crashing codec) becomes a ``failed`` row instead of failing the run."""
    import ray

    from raypath.io.ray_env import task_options

    task = ray.remote(num_cpus=1, max_retries=1, **task_options())(_tile_row)
    refs = [task.remote({"row_json": json.dumps(to_jsonable(r))}, cfg) for r in rows]
    outs = []
    for r, ref in zip(rows, refs):
        try:
            outs.append(ray.get(ref))
        except Exception as e:
            if as_outage(e, cfg.s3_options()) is not None:
                raise as_outage(e, cfg.s3_options()) from None
            summary = dict(slide_id=r["slide_id"], n_tiles=0, level=None, read_px=None, status=STATUS_FAILED,
                           warning=f"unreadable: the worker tiling this slide died ({type(e).__name__})", qc_png=None)
            outs.append({"slide_id": r["slide_id"], "summary_json": json.dumps(summary)})
        if progress is not None:
            progress.update()
    return outs


def _tile_all(rows: list[dict[str, Any]], cfg: TileConfig) -> dict[str, dict[str, Any]]:
    """Summary per slide id; every slide's tiles are written by whoever tiled it."""
    from raypath.io.progress import Progress

    if not (cfg.use_ray and rows):
        local: dict[str, dict[str, Any]] = {}
        with Progress("tile", len(rows), "slides") as progress:
            for r in rows:
                local[r["slide_id"]] = _tile_and_write(r, cfg)
                progress.update()
        return local
    try:
        with Progress("tile", len(rows), "slides") as progress:
            outs = _run_ray(rows, cfg, progress)
    except Exception as e:  # Ray Data gives up on the dataset when a task keeps dying
        if as_outage(e, cfg.s3_options()) is not None:  # not a dying task: stop, the re-run resumes
            raise as_outage(e, cfg.s3_options()).with_progress("tiles.parquet is incomplete") from None
        log.warning("tile: Ray Data run failed (%s: %s); tiling slide by slide", type(e).__name__, e)
        with Progress("tile (slide by slide)", len(rows), "slides") as progress:
            outs = _run_isolated(rows, cfg, progress)
    return {out["slide_id"]: json.loads(out["summary_json"]) for out in outs}


# --------------------------------------------------------------------------- stage


def tile(cfg: TileConfig) -> pd.DataFrame:
    """Tile every ingested slide of ``<workdir>/slides.parquet``.

    Writes ``<workdir>/tiles.parquet/`` (a parquet dataset directory: one
    part per slide with tiles, written by the task that tiled it, schema
    :data:`TILES`; read it with :mod:`raypath.wsi.tile_table` or
    ``pd.read_parquet``), ``<workdir>/tiling_summary.parquet``
    (:data:`TILING_SUMMARY`, one row per slide incl. slides that failed
    ingest), ``<workdir>/qc/<slide_id>.png`` and ``<workdir>/tiling_config.yaml``.
    The driver only ever holds one summary row per slide.

    Returns
    -------
    pandas.DataFrame
        The tiling summary (one row per slide: ``n_tiles``, ``status``, ``warning`` ...).

    Raises
    ------
    RaypathError
        If ``slides.parquet`` is missing (run ``raypath ingest`` first).
    """
    from raypath.wsi.tile_table import finish_dataset, prepare_dataset

    s3 = cfg.s3_options()
    slides_uri = join(cfg.workdir, "slides.parquet")
    check_storage([cfg.workdir], s3)
    if not exists(slides_uri, s3):
        raise RaypathError(f"{slides_uri} not found: run `raypath ingest --workdir {cfg.workdir}` first")
    cols = ["slide_id", "uri", "mpp_x", "level_downsamples"]
    try:  # only what tiling uses (the driver holds one row per slide)
        slides = read_parquet(slides_uri, s3, columns=[*cols, "status", "error"]).to_pandas()
    except (KeyError, ValueError):  # pyarrow: a column is missing (a hand-written table)
        slides = read_parquet(slides_uri, s3).to_pandas()
    ok = slides[slides["status"] == SLIDE_STATUS_OK]
    rows = [{c: r[c] for c in cols} for _, r in ok.iterrows()]
    for r in rows:
        r["level_downsamples"] = [float(d) for d in r["level_downsamples"]]
    log.info("tile: %d of %d slides ingested ok", len(rows), len(slides))
    check_storage([r["uri"] for r in rows], s3)
    makedirs(cfg.workdir, s3)
    if cfg.qc:
        makedirs(join(cfg.workdir, QC_DIR), s3)
    prepare_dataset(cfg.workdir, s3)
    results = _tile_all(rows, cfg)
    summaries = []
    for sid, err in zip(slides["slide_id"].astype(str), slides.get("error", [None] * len(slides))):
        summaries.append(results.get(sid) or dict(  # cohort order, not completion order
            slide_id=sid, n_tiles=0, level=None, read_px=None, status=STATUS_FAILED,
            warning=f"{err or 'unknown: ingest failed'} [not tiled: ingest failed]", qc_png=None))
    finish_dataset(cfg.workdir, [s["slide_id"] for s in summaries if s["n_tiles"] > 0], s3)
    summary_tbl = pa.Table.from_pylist(summaries, schema=TILING_SUMMARY)
    write_parquet_atomic(summary_tbl, join(cfg.workdir, SUMMARY_FILE), s3)
    cfg.save(cfg.workdir, name=CONFIG_FILE)
    for s in summaries:
        if s["status"] != STATUS_OK:
            log.warning("tile: slide %s %s: %s", s["slide_id"], s["status"], s["warning"])
    n_with = sum(s["n_tiles"] > 0 for s in summaries)
    log.info("tile: %d tiles from %d slides -> %s", sum(s["n_tiles"] for s in summaries), n_with,
             join(cfg.workdir, TILES_FILE))
    return summary_tbl.to_pandas()


def read_summary(workdir: str, s3: S3Options | None = None) -> pd.DataFrame:
    """``tiling_summary.parquet`` of a workdir as a DataFrame."""
    return read_parquet(join(workdir, SUMMARY_FILE), s3).to_pandas()


def summarize(summary: pd.DataFrame) -> str:
    """A short text report of a tiling run (what the CLI prints)."""
    counts = summary["status"].value_counts().to_dict()
    lines = [
        f"{int(summary['n_tiles'].sum())} tiles from {len(summary)} slides "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    ]
    for _, r in summary[summary["status"] != STATUS_OK].iterrows():
        lines.append(f"  {r['status'].upper()} {r['slide_id']}: {r['warning']}")
    lines.append(failure_counts(summary.loc[summary["status"] == STATUS_FAILED, "warning"]))
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "tile",
        help="segment tissue and lay a tile grid at a target mpp (tiles.parquet + QC PNGs)",
        description=(
            "For every slide ingested ok: tissue mask on a thumbnail, tile grid at --target-mpp "
            "and --tile-px (reading the right pyramid level and resizing when needed), tiles with "
            "at least --min-tissue-fraction tissue. One Ray Data task per slide. Writes "
            "<workdir>/tiles.parquet, tiling_summary.parquet and qc/<slide_id>.png."
        ),
    )
    add_config_arguments(p, TileConfig)

    def run(args) -> int:
        cfg = config_from_args(TileConfig, args)
        tile(cfg)
        summary = read_summary(cfg.workdir, cfg.s3_options())
        print(summarize(summary))
        print(f"wrote {join(cfg.workdir, TILES_FILE)}")
        return EXIT_SOME_FAILED if (summary["status"] == STATUS_FAILED).any() else 0

    p.set_defaults(func=run)
