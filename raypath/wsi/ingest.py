"""``raypath ingest``: validate the cohort table and inspect every slide.

Writes ``<workdir>/slides.parquet``: the cohort columns followed by the
columns of :data:`raypath.schemas.SLIDES_META` (size, pyramid, mpp,
objective, vendor, bytes, fingerprint, ``status`` and ``error``).  A slide
that cannot be used gets ``status="failed"`` and the reason in ``error``;
the run goes on and later stages skip it.

Each slide is opened in its own Ray task (slides are independent and opening
one over S3 is latency bound); :func:`inspect_slide` is the plain per-slide
function that tests and notebooks call without Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import pyarrow as pa
from pydantic import Field

from raypath.wsi.cohort import mpp_conflicts, read_cohort
from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.errors import EXIT_OK, EXIT_SOME_FAILED, failure_counts
from raypath.schemas import SLIDE_STATUS_FAILED, SLIDE_STATUS_OK, SLIDES_META
from raypath.wsi.slide_io import DEFAULT_MAX_DAMAGED_FRACTION, NO_MPP, classify_exception, read_metadata
from raypath.io.storage import (S3CacheType, S3Options, activity, as_outage, check_storage, join, makedirs,
                                write_parquet_atomic)

log = logging.getLogger(__name__)

SLIDES_FILE = "slides.parquet"
CONFIG_FILE = "ingest_config.yaml"
MPP_REMEDY = "add an `mpp` column to the cohort table or pass --mpp-override"


class IngestConfig(StageConfig):
    """Parameters of ``raypath ingest``."""

    workdir: str = Field(description="project folder (local path or s3:// URI); slides.parquet goes here")
    cohort: str | None = Field(
        None, description="cohort table (.csv/.parquet, local or s3://); default <workdir>/cohort.csv"
    )
    mpp_override: float | None = Field(
        None, gt=0, description="um/px at level 0 for slides whose file and cohort row give none"
    )
    check_pixels: bool = Field(True, description="decode stored tiles spread over the finest and coarsest level")
    max_damaged_fraction: float = Field(
        DEFAULT_MAX_DAMAGED_FRACTION, ge=0, le=1,
        description="sampled stored tiles that may be damaged (corrupt JPEG data) before a slide is failed",
    )
    use_ray: bool = Field(True, description="one Ray task per slide (False: inspect in this process)")
    max_in_flight: int = Field(64, ge=1, description="slides being inspected at once on the cluster")
    s3_block_size_bytes: int = Field(512 * 1024, ge=4096, description="S3 read block size")
    s3_cache_type: S3CacheType = Field("readahead", description="fsspec cache type for S3 reads")

    def s3_options(self) -> S3Options:
        return S3Options.from_env(block_size_bytes=self.s3_block_size_bytes, cache_type=self.s3_cache_type)

    def cohort_uri(self) -> str:
        return self.cohort or join(self.workdir, "cohort.csv")


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _failed(error: str) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: None for f in SLIDES_META}
    out.update(status=SLIDE_STATUS_FAILED, error=error)
    return out


def inspect_slide(row: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    """Open one slide and return its ``SLIDES_META`` fields (never raises for slide problems).

    Parameters
    ----------
    row
        A cohort row (needs ``uri``; an ``mpp`` value is used when the file has none).
    cfg
        The ingest config (S3 settings, ``mpp_override``).

    Returns
    -------
    dict
        Keys of :data:`raypath.schemas.SLIDES_META`.  ``status`` is ``"ok"``
        or ``"failed"`` with the reason in ``error``.  The mpp is taken from
        the file, else the cohort's ``mpp``, else ``cfg.mpp_override``
        (``mpp_source`` says which).
    """
    uri = str(row["uri"])
    s3 = cfg.s3_options()
    try:
        with activity(f"ingest slide {row.get('slide_id', uri)}"):
            meta = read_metadata(uri, s3, check_pixels=cfg.check_pixels, max_damaged_fraction=cfg.max_damaged_fraction)
    except Exception as e:  # every slide problem becomes a row, never a crash; an outage stops the run
        err = classify_exception(e, uri, s3)
        return _failed(str(err))
    for d in meta.extra.get("damaged_tiles", []):
        log.warning("ingest: slide %s: damaged stored tile (within --max-damaged-fraction): %s",
                    row.get("slide_id", uri), d)
    out = meta.to_dict()
    out.update(status=SLIDE_STATUS_OK, error=None, mpp_source="file")
    if out["mpp_x"] is None:
        cohort_mpp = row.get("mpp")
        if not _missing(cohort_mpp) and float(cohort_mpp) > 0:
            out.update(mpp_x=float(cohort_mpp), mpp_y=float(cohort_mpp), mpp_source="cohort")
        elif cfg.mpp_override is not None:
            out.update(mpp_x=cfg.mpp_override, mpp_y=cfg.mpp_override, mpp_source="override")
        else:
            out.update(
                mpp_source=None,
                status=SLIDE_STATUS_FAILED,
                error=f"{NO_MPP}: the file records no (plausible) microns per pixel; {MPP_REMEDY}",
            )
    return out


def _row_payload(row: pd.Series) -> dict[str, Any]:
    return {k: (None if _missing(v) else v) for k, v in row.items() if k in ("slide_id", "uri", "mpp")}


def _inspect_all_ray(rows: list[dict[str, Any]], cfg: IngestConfig, progress=None) -> list[dict[str, Any]]:
    from raypath.io.ray_env import ensure_ray, task_options

    ray = ensure_ray()
    # num_cpus=1: opening a slide decodes JPEG tiles (CPU) between S3 round trips
    task = ray.remote(num_cpus=1, max_retries=2, **task_options())(inspect_slide)
    cfg_ref = ray.put(cfg)
    results: list[dict[str, Any] | None] = [None] * len(rows)
    pending: dict[Any, int] = {}
    next_i = 0
    while next_i < len(rows) or pending:
        while next_i < len(rows) and len(pending) < cfg.max_in_flight:
            pending[task.remote(rows[next_i], cfg_ref)] = next_i
            next_i += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as e:  # a worker crash on one slide must not stop the cohort; an outage does
                outage = as_outage(e, cfg.s3_options())
                if outage is not None:
                    for r in pending:
                        ray.cancel(r)
                    done_n = sum(x is not None for x in results)
                    raise outage.with_progress(f"{done_n} of {len(rows)} slides were inspected, "
                                               "slides.parquet was not written") from None
                results[i] = _failed(f"unreadable: the worker inspecting this slide died ({type(e).__name__}); "
                                     "re-run ingest; if it dies again drop the slide")
            if progress is not None:
                progress.update()
    return results  # type: ignore[return-value]


def slides_table(cohort: pd.DataFrame, metas: list[dict[str, Any]]) -> pa.Table:
    """Join cohort rows and per-slide metadata into the ``slides.parquet`` table."""
    cohort_tbl = pa.Table.from_pandas(cohort.reset_index(drop=True), preserve_index=False)
    clash = [c for c in cohort_tbl.column_names if c in SLIDES_META.names]
    if clash:
        cohort_tbl = cohort_tbl.drop(clash)
    meta_cols = {f.name: [m.get(f.name) for m in metas] for f in SLIDES_META}
    meta_tbl = pa.Table.from_pydict(meta_cols, schema=SLIDES_META)
    for name in meta_tbl.column_names:
        cohort_tbl = cohort_tbl.append_column(meta_tbl.schema.field(name), meta_tbl.column(name))
    return cohort_tbl


def ingest(cfg: IngestConfig) -> pd.DataFrame:
    """Validate the cohort table, inspect every slide, write ``slides.parquet``.

    Parameters
    ----------
    cfg
        :class:`IngestConfig`.

    Returns
    -------
    pandas.DataFrame
        The rows of ``<workdir>/slides.parquet`` (one per cohort row).

    Raises
    ------
    RaypathError
        When the cohort table is missing or invalid (all problems listed).
        Problems with individual slides never raise; they are rows with
        ``status="failed"``.
    """
    s3 = cfg.s3_options()
    check_storage([cfg.cohort_uri(), cfg.workdir], s3)
    cohort = read_cohort(cfg.cohort_uri(), s3)
    rows = [_row_payload(r) for _, r in cohort.iterrows()]
    check_storage([r.get("uri") for r in rows], s3)  # once, before any slide: an outage is not a bad slide
    log.info("ingest: %d slides from %s", len(rows), cfg.cohort_uri())
    from raypath.io.progress import Progress

    with Progress("ingest", len(rows), "slides") as progress:
        if cfg.use_ray and len(rows) > 0:
            metas = _inspect_all_ray(rows, cfg, progress)
        else:
            metas = []
            for r in rows:
                metas.append(inspect_slide(r, cfg))
                progress.update()
    table = slides_table(cohort, metas)
    makedirs(cfg.workdir, s3)
    out = join(cfg.workdir, SLIDES_FILE)
    write_parquet_atomic(table, out, s3)
    cfg.save(cfg.workdir, name=CONFIG_FILE)
    df = table.to_pandas()
    n_ok = int((df["status"] == SLIDE_STATUS_OK).sum())
    log.info("ingest: %d ok, %d failed -> %s", n_ok, len(df) - n_ok, out)
    for _, r in df[df["status"] != SLIDE_STATUS_OK].iterrows():
        log.warning("ingest: slide %s failed: %s", r["slide_id"], r["error"])
    for msg in mpp_conflicts(df):  # a table mpp that contradicts the file's is never ignored silently
        log.warning("ingest: %s", msg)
    return df


def summarize(df: pd.DataFrame) -> str:
    """A short text report of an ingest result (what the CLI prints), ending with the failures by cause."""
    n_ok = int((df["status"] == SLIDE_STATUS_OK).sum())
    lines = [f"{len(df)} slides: {n_ok} ok, {len(df) - n_ok} failed"]
    for _, r in df[df["status"] != SLIDE_STATUS_OK].iterrows():
        lines.append(f"  FAILED {r['slide_id']}: {r['error']}")
    lines += [f"  MPP CONFLICT {m}" for m in mpp_conflicts(df)]
    lines.append(failure_counts(df.loc[df["status"] != SLIDE_STATUS_OK, "error"]))
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="validate the cohort table and record every slide's metadata in slides.parquet",
        description=(
            "Validate the cohort table, open every slide (one Ray task each), and write "
            "<workdir>/slides.parquet with size, levels, mpp, objective, vendor, bytes, "
            "fingerprint and a status/error per slide. Broken slides are recorded, not fatal."
        ),
    )
    add_config_arguments(p, IngestConfig)

    def run(args) -> int:
        cfg = config_from_args(IngestConfig, args)
        df = ingest(cfg)
        print(summarize(df))
        print(f"wrote {join(cfg.workdir, SLIDES_FILE)}")
        return EXIT_OK if (df["status"] == SLIDE_STATUS_OK).all() else EXIT_SOME_FAILED

    p.set_defaults(func=run)
