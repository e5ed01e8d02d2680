"""The patch table: one row per labelled patch (a cell, a tissue region).

Columns (contract; docs/patch.md):

==============  ========  ==========================================================
column          required  meaning
==============  ========  ==========================================================
``patch_id``    yes       unique id (features and predictions are keyed by it)
``uri``         yes       an image file (PNG/JPEG/TIFF), or a slide (local or ``s3://``)
``label``       yes       class label, as text (``mitotic_figure``, ``imposter``, ``0``...)
``domain``      yes       tumour type, site or scanner: the unit of cross-domain tests
``slide_id``    yes       the slide the patch comes from (splits never cut a slide)
``patient_id``  yes       the patient (splits never cut a patient)
``x``, ``y``    slides    patch centre in level-0 pixels (both or neither)
``mpp``         no        target um/px of the patch read from a slide (default: the run's)
``slide_mpp``   no        level-0 um/px of a slide whose file records none
``split``       no        ``train`` / ``val`` / ``test``: a fixed split (checked for leakage)
==============  ========  ==========================================================

A row with ``x`` and ``y`` is read from a slide around that centre; a row
without them is an image file used whole (resized to the patch size).
Relative ``uri`` values resolve against the table's folder.

:func:`read_patch_table` reads a table with the project's one table reader
(:func:`raypath.wsi.cohort.read_table`: ids always text) and
:func:`validate_patch_table` applies the checks; every problem is reported
at once, naming the file and the rows (counted from 1 after the header).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import S3Options
from raypath.wsi.cohort import _parent, as_id_strings, read_table, resolve_uri, table_problems

REQUIRED = ("patch_id", "uri", "label", "domain", "slide_id", "patient_id")
OPTIONAL = ("x", "y", "mpp", "slide_mpp", "split")
ID_COLUMNS = ("patch_id", "uri", "label", "domain", "slide_id", "patient_id", "split")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_ROWS_SHOWN = 10
_PATCH_ID = re.compile(r"^[^/\\\s]+$")


def rows_text(df: pd.DataFrame, mask, id_col: str = "patch_id") -> str:
    """'rows 2, 5 (patch_id a, b)': data rows counted from 1 after the header."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    shown = idx[:_ROWS_SHOWN]
    more = f" and {len(idx) - len(shown)} more" if len(idx) > len(shown) else ""
    nums = ", ".join(str(i + 1) for i in shown)
    s = "s" if len(idx) > 1 else ""
    if id_col in df.columns:
        ids = ", ".join("<empty>" if pd.isna(v) else str(v) for v in df[id_col].iloc[shown])
        return f"row{s} {nums}{more} ({id_col} {ids})"
    return f"row{s} {nums}{more}"


def _blank(s: pd.Series) -> np.ndarray:
    return (s.isna() | (s.astype("string").str.strip() == "")).to_numpy(dtype=bool)


def _coordinate_problems(df: pd.DataFrame) -> list[str]:
    problems = []
    has_x, has_y = "x" in df.columns, "y" in df.columns
    if has_x != has_y:
        return ["only one of `x`, `y` is a column: give both (patch centre, level-0 px) or neither"]
    if not has_x:
        return []
    for c in ("x", "y"):
        v = pd.to_numeric(df[c], errors="coerce")
        given = ~_blank(df[c].astype("string"))
        bad = given & (v.isna() | (v < 0)).to_numpy(dtype=bool)
        if bad.any():
            problems.append(f"`{c}` not a number >= 0 in {rows_text(df, bad)}: give the patch centre in level-0 pixels")
        df[c] = v.astype(float)
    half = _blank(df["x"].astype("string")) != _blank(df["y"].astype("string"))
    if half.any():
        problems.append(f"`x` without `y` (or `y` without `x`) in {rows_text(df, half)}: give both or neither")
    return problems


def _consistency_problems(df: pd.DataFrame) -> list[str]:
    """A slide belongs to one patient and one domain."""
    problems = []
    for col in ("patient_id", "domain"):
        n = df.groupby("slide_id", dropna=True)[col].nunique()
        bad_slides = set(n[n > 1].index)
        if bad_slides:
            mask = df["slide_id"].isin(bad_slides).to_numpy(dtype=bool)
            problems.append(
                f"slide(s) {sorted(bad_slides)[:5]} have more than one `{col}` ({rows_text(df, mask)}): "
                f"every patch of a slide must carry the slide's {col}"
            )
    n = df.groupby("patient_id", dropna=True)["domain"].nunique()
    if (n > 1).any():
        bad = sorted(n[n > 1].index)[:5]
        mask = df["patient_id"].isin(set(n[n > 1].index)).to_numpy(dtype=bool)
        problems.append(
            f"patient(s) {bad} appear in more than one `domain` ({rows_text(df, mask)}): a patient belongs to "
            "one tumour domain, or cross-domain tests would leak"
        )
    return problems


def validate_patch_table(df: pd.DataFrame, source: str = "patch table", base: str | None = None) -> pd.DataFrame:
    """Check a patch table and return a normalised copy (every problem at once).

    Parameters
    ----------
    df
        The raw table.
    source
        Its path (named in errors).
    base
        Folder against which relative ``uri`` values resolve (``None``: left as given).

    Raises
    ------
    RaypathError
        Naming ``source``, each problem with its rows and the remedy.
    """
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    for col in [c for c in ID_COLUMNS if c in df.columns]:
        df[col] = as_id_strings(df[col])
    problems = table_problems(df, "patch", REQUIRED)
    if problems and (len(df) == 0 or any(c not in df.columns for c in REQUIRED)):
        raise RaypathError(f"{source}: {problems[0]} (optional: {', '.join(OPTIONAL)})")
    dup = df["patch_id"].duplicated(keep=False).to_numpy(dtype=bool) & ~_blank(df["patch_id"])
    if dup.any():
        problems.append(f"duplicate `patch_id` in {rows_text(df, dup)}: patch ids must be unique")
    bad = ~_blank(df["patch_id"]) & ~df["patch_id"].fillna("").str.fullmatch(_PATCH_ID.pattern).to_numpy(dtype=bool)
    if bad.any():
        problems.append(f"`patch_id` with a space or path separator in {rows_text(df, bad)}: use other characters")
    problems += _coordinate_problems(df)
    for col in ("mpp", "slide_mpp"):
        if col in df.columns:
            m = pd.to_numeric(df[col], errors="coerce")
            bad = ~_blank(df[col].astype("string")) & (m.isna() | ~(m > 0)).to_numpy(dtype=bool)
            if bad.any():
                problems.append(f"`{col}` not a positive number in {rows_text(df, bad)}: give um/px or leave it empty")
            df[col] = m.astype(float)
    if "split" in df.columns:
        bad = ~_blank(df["split"]) & ~df["split"].isin(SPLITS).to_numpy(dtype=bool)
        if bad.any():
            problems.append(f"`split` not one of {', '.join(SPLITS)} in {rows_text(df, bad)}")
    if not problems:
        problems += _consistency_problems(df)
        if df["label"].nunique() < 2:
            problems.append(f"only one label ({df['label'].iloc[0]!r}): a classifier needs at least two classes")
    if problems:
        raise RaypathError(f"{source}: {len(problems)} problem(s) in the patch table:\n  - " + "\n  - ".join(problems))
    if base is not None:
        df["uri"] = [resolve_uri(u, base) for u in df["uri"]]
    order = list(REQUIRED) + [c for c in OPTIONAL if c in df.columns]
    return df[order + [c for c in df.columns if c not in order]].reset_index(drop=True)


def read_patch_table(uri: str, s3: S3Options | None = None, resolve_uris: bool = True) -> pd.DataFrame:
    """Read (CSV/TSV/parquet, local or ``s3://``) and validate a patch table."""
    df = read_table(uri, kind="patch", required=(), id_columns=ID_COLUMNS, s3=s3)
    return validate_patch_table(df, source=str(uri), base=_parent(uri) if resolve_uris else None)


def is_slide_row(df: pd.DataFrame) -> np.ndarray:
    """True where the patch is read from a slide around (x, y)."""
    if "x" not in df.columns:
        return np.zeros(len(df), bool)
    return df["x"].notna().to_numpy(dtype=bool)


def table_digest(df: pd.DataFrame, columns=("patch_id", "uri", "x", "y", "mpp")) -> str:
    """sha256 of what decides a patch's pixels (order-independent)."""
    cols = [c for c in columns if c in df.columns]
    t = df[cols].astype(str).sort_values("patch_id")
    return hashlib.sha256(t.to_csv(index=False).encode()).hexdigest()
