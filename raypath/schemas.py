"""The contracts between stages: column names and types of every table.

Stages write exactly these columns (extra cohort columns are carried through
``slides.parquet`` unchanged).  Tests check outputs against these schemas, so
a change here is a change of contract: update docs/CONTRACTS.md with it.
"""

from __future__ import annotations

import pyarrow as pa

# ----------------------------------------------------------------- cohort table (user input)
COHORT_REQUIRED = ("slide_id", "uri", "patient_id", "cohort")
COHORT_OPTIONAL = ("time", "event", "label", "scanner", "pair_id", "mpp")

# ----------------------------------------------------------------- slides.parquet
SLIDE_STATUS_OK = "ok"
SLIDE_STATUS_FAILED = "failed"
SLIDES_META = pa.schema(
    [
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("levels", pa.int32()),
        ("level_downsamples", pa.list_(pa.float64())),
        ("level_dimensions", pa.list_(pa.list_(pa.int64()))),
        ("mpp_x", pa.float64()),  # um/px at level 0 (after override)
        ("mpp_y", pa.float64()),
        ("mpp_source", pa.string()),  # "file" | "cohort" | "override"
        ("objective_power", pa.float64()),
        ("vendor", pa.string()),
        ("bytes", pa.int64()),
        ("fingerprint", pa.string()),
        ("status", pa.string()),  # "ok" | "failed"
        ("error", pa.string()),  # reason when failed, else null
    ]
)

# ----------------------------------------------------------------- tiles.parquet
TILES = pa.schema(
    [
        ("slide_id", pa.string()),
        ("tile_id", pa.int64()),  # 0..n-1 within a slide, row-major over the grid
        ("x", pa.int64()),  # level-0 px, top-left
        ("y", pa.int64()),
        ("level", pa.int32()),  # pyramid level read from
        ("read_px", pa.int32()),  # side of the square read at `level`
        ("tile_px", pa.int32()),  # side of the output tile (after resize)
        ("target_mpp", pa.float64()),
        ("tissue_fraction", pa.float32()),
    ]
)

# per-slide tiling summary (tiling_summary.parquet): one row per slide incl. warnings
TILING_SUMMARY = pa.schema(
    [
        ("slide_id", pa.string()),
        ("n_tiles", pa.int64()),
        ("level", pa.int32()),
        ("read_px", pa.int32()),
        ("status", pa.string()),  # "ok" | "no_tissue" | "failed"
        ("warning", pa.string()),
        ("qc_png", pa.string()),
    ]
)

# ----------------------------------------------------------------- features/<model_key>/<slide_id>.parquet
def features_schema(dim: int, dtype: pa.DataType = pa.float16()) -> pa.Schema:
    return pa.schema(
        [
            ("slide_id", pa.string()),
            ("tile_id", pa.int64()),
            ("x", pa.int64()),
            ("y", pa.int64()),
            ("embedding", pa.list_(dtype, dim)),
        ]
    )
