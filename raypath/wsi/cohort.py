"""The cohort table: the user's list of slides, read and validated.

A cohort table (CSV or parquet, local or ``s3://``) has one row per slide
with the required columns ``slide_id``, ``uri``, ``patient_id`` and
``cohort`` and the optional columns ``time``, ``event``, ``label``,
``scanner``, ``pair_id`` and ``mpp`` (see :mod:`raypath.schemas`).  Extra
columns are kept and carried into ``slides.parquet``.

Validation collects every problem of the table and raises them together as
one :class:`~raypath.errors.RaypathError` naming the rows, so a user fixes
the table in one pass.  Whether each ``uri`` points to a readable slide is
*not* checked here: that is a per-slide status decided by ingest, so one
missing file never blocks a cohort.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Iterable

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.schemas import COHORT_OPTIONAL, COHORT_REQUIRED
from raypath.io.storage import S3Options, is_remote, open_file, strip_protocol

#: Columns read as text whatever they look like (ids like ``007`` stay ``007``).
_TEXT_COLUMNS = ("slide_id", "uri", "patient_id", "cohort", "scanner", "pair_id")
#: Rows listed per problem in an error message; the count says how many more.
_MAX_ROWS_SHOWN = 10


def read_cohort(uri: str, s3: S3Options | None = None, resolve_uris: bool = True) -> pd.DataFrame:
    """Read and validate a cohort table.

    Parameters
    ----------
    uri
        ``.csv``/``.tsv``/``.parquet`` file, a local path or an ``s3://`` URI.
    s3
        S3 settings; ``None`` reads them from the environment.
    resolve_uris
        Resolve relative slide ``uri`` values against the table's folder
        (local folder or S3 prefix), so a table can sit next to its slides.

    Returns
    -------
    pandas.DataFrame
        The validated table: required columns first, then the optional ones
        present, then any extra columns; text ids as strings, ``time`` and
        ``mpp`` as float, ``event`` as int.

    Raises
    ------
    RaypathError
        If the file cannot be read or the table is invalid (all problems at once).
    """
    df = _read_table(uri, s3)
    df = validate_cohort(df, source=uri)
    if resolve_uris:
        base = _parent(uri)
        df["uri"] = [resolve_uri(u, base) for u in df["uri"]]
    return df


def _read_table(uri: str, s3: S3Options | None) -> pd.DataFrame:
    lower = str(uri).lower()
    try:
        with open_file(uri, "rb", s3) as f:
            raw = f.read()
    except FileNotFoundError:
        raise RaypathError(
            f"cohort table {uri!r} not found: pass the path of a .csv or .parquet file "
            f"with columns {', '.join(COHORT_REQUIRED)}"
        ) from None
    except Exception as e:  # permissions, unreachable S3 ...
        raise RaypathError(f"cannot read cohort table {uri!r}: {type(e).__name__}: {e}") from e
    dtypes = {c: "string" for c in _TEXT_COLUMNS}
    try:
        if lower.endswith((".parquet", ".pq")):
            df = pd.read_parquet(io.BytesIO(raw))
        elif lower.endswith((".tsv", ".tab")):
            df = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=dtypes, skipinitialspace=True)
        elif lower.endswith(".csv") or "." not in posixpath.basename(lower):
            df = pd.read_csv(io.BytesIO(raw), dtype=dtypes, skipinitialspace=True)
        else:
            raise RaypathError(
                f"cohort table {uri!r}: unknown format; use a .csv, .tsv or .parquet file"
            )
    except RaypathError:
        raise
    except Exception as e:
        raise RaypathError(
            f"cohort table {uri!r} could not be parsed ({type(e).__name__}: {e}); "
            "write it as a CSV with a header row or as parquet"
        ) from e
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _rows(df: pd.DataFrame, mask: Iterable[bool]) -> str:
    """'rows 2, 5 (slide_id a, b)': data rows counted from 1 (the header is row 0)."""
    mask = np.asarray(list(mask), dtype=bool)
    idx = np.flatnonzero(mask)
    shown = idx[:_MAX_ROWS_SHOWN]
    nums = ", ".join(str(i + 1) for i in shown)
    more = f" and {len(idx) - len(shown)} more" if len(idx) > len(shown) else ""
    if "slide_id" in df.columns:
        ids = ", ".join(
            "<empty>" if pd.isna(v) or str(v).strip() == "" else str(v)
            for v in df["slide_id"].iloc[shown]
        )
        return f"row{'s' if len(idx) > 1 else ''} {nums}{more} (slide_id {ids})"
    return f"row{'s' if len(idx) > 1 else ''} {nums}{more}"


def _blank(series: pd.Series) -> np.ndarray:
    return (series.isna() | (series.astype("string").str.strip() == "")).to_numpy(dtype=bool)


def validate_cohort(df: pd.DataFrame, source: str = "cohort table") -> pd.DataFrame:
    """Check a cohort table and return a normalised copy.

    Checks: required columns present; no empty ``slide_id``, ``uri``,
    ``patient_id`` or ``cohort``; unique ``slide_id``; when ``time`` exists,
    every time is a number >= 0 and an ``event`` column exists; every
    ``event`` is 0 or 1; every given ``mpp`` is a positive number.

    Parameters
    ----------
    df
        The raw table.
    source
        Name of the table used in error messages (its path).

    Raises
    ------
    RaypathError
        One error listing every problem, each with the offending rows
        (data rows counted from 1) and the remedy.
    """
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in COHORT_REQUIRED if c not in df.columns]
    if missing:
        raise RaypathError(
            f"{source}: missing required column(s) {', '.join(missing)}; a cohort table needs "
            f"{', '.join(COHORT_REQUIRED)} (optional: {', '.join(COHORT_OPTIONAL)}). "
            f"Columns found: {', '.join(map(str, df.columns)) or 'none'}"
        )
    if len(df) == 0:
        raise RaypathError(f"{source}: the cohort table has no rows; add one row per slide")

    problems: list[str] = []
    for col in _TEXT_COLUMNS:
        if col in df.columns:
            df[col] = df[col].astype("string").str.strip()
    for col in COHORT_REQUIRED:
        bad = _blank(df[col])
        if bad.any():
            problems.append(f"empty `{col}` in {_rows(df, bad)}: fill in a value for every slide")

    ids = df["slide_id"]
    dup = ids.duplicated(keep=False).to_numpy(dtype=bool) & ~_blank(ids)
    if dup.any():
        problems.append(
            f"duplicate `slide_id` in {_rows(df, dup)}: slide ids must be unique "
            "(outputs are named by them)"
        )
    bad_chars = ids.fillna("").str.contains(r"[/\\]|^\.\.?$", regex=True).to_numpy(dtype=bool)
    if bad_chars.any():
        problems.append(
            f"`slide_id` with a path separator in {_rows(df, bad_chars)}: ids name output files; "
            "use letters, digits, '-', '_' or '.'"
        )

    if "time" in df.columns:
        t = pd.to_numeric(df["time"], errors="coerce")
        bad = (t.isna() | (t < 0)).to_numpy(dtype=bool)
        if bad.any():
            problems.append(
                f"missing, non-numeric or negative `time` in {_rows(df, bad)}: survival times "
                "must be numbers >= 0 (drop the rows or the column if survival is unknown)"
            )
        df["time"] = t.astype(float)
        if "event" not in df.columns:
            problems.append(
                "`time` given without an `event` column: add `event` (1 = event observed, "
                "0 = censored) or drop `time`"
            )
    if "event" in df.columns:
        e = pd.to_numeric(df["event"].replace({True: 1, False: 0}), errors="coerce")
        bad = ~e.isin([0, 1]).to_numpy(dtype=bool)
        if bad.any():
            problems.append(
                f"`event` not in {{0, 1}} in {_rows(df, bad)}: use 1 for an observed event "
                "and 0 for censored"
            )
        else:
            df["event"] = e.astype("int64")
    if "mpp" in df.columns:
        m = pd.to_numeric(df["mpp"], errors="coerce")
        given = ~_blank(df["mpp"].astype("string"))
        bad = given & (m.isna() | ~(m > 0)).to_numpy(dtype=bool)
        if bad.any():
            problems.append(
                f"`mpp` not a positive number in {_rows(df, bad)}: give microns per pixel at "
                "level 0 (e.g. 0.25 for 40x, 0.5 for 20x) or leave it empty to use the file's"
            )
        df["mpp"] = m.astype(float)

    if problems:
        raise RaypathError(
            f"{source}: {len(problems)} problem(s) in the cohort table:\n  - "
            + "\n  - ".join(problems)
        )
    order = list(COHORT_REQUIRED) + [c for c in COHORT_OPTIONAL if c in df.columns]
    order += [c for c in df.columns if c not in order]
    return df[order].reset_index(drop=True)


def _parent(uri: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return uri.rsplit("/", 1)[0] if "/" in uri.split("://", 1)[1] else uri
    return os.path.dirname(os.path.abspath(strip_protocol(uri)))


def resolve_uri(uri: str, base: str) -> str:
    """Resolve a slide ``uri`` from a cohort table against the table's folder.

    Absolute local paths and URIs with a scheme (``s3://``, ``file://``) are
    returned as they are; ``~`` is expanded; relative paths are joined to
    ``base`` (a local folder or an ``s3://bucket/prefix``) and normalised.
    """
    uri = str(uri).strip()
    if "://" in uri:
        return uri
    uri = os.path.expanduser(uri)
    if os.path.isabs(uri):
        return os.path.normpath(uri)
    if is_remote(base):
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.normpath(posixpath.join(rest, uri.replace(os.sep, "/")))
    return os.path.normpath(os.path.join(base, uri))
