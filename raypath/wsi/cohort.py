"""The one reader of user tables: cohort, clinical, patch and annotation
tables, prediction cohorts.

:func:`read_table` reads a CSV, TSV or parquet file (local or ``s3://``)
the same way for every kind of table: id columns are always text (``007``
stays ``007``, ``NA`` stays ``NA``), a data row with more fields than the
header is an error (pandas would silently shift the columns), slide ids
must be letters, digits and ``-_.`` (not starting with ``-`` or ``.``), and
every problem of the table is reported at once, naming the rows.

:func:`read_cohort` adds the cohort table's own checks (``time``/``event``,
``mpp``) and resolves relative slide ``uri`` values.  A cohort table (one
row per slide) has the required columns ``slide_id``, ``uri``,
``patient_id`` and ``cohort`` and the optional columns ``time``, ``event``,
``label``, ``scanner``, ``pair_id`` and ``mpp`` (see :mod:`raypath.schemas`).
Extra columns are kept and carried into ``slides.parquet``.

Whether each ``uri`` points to a readable slide is *not* checked here: that
is a per-slide status decided by ingest, so one missing file never blocks a
cohort.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.schemas import COHORT_OPTIONAL, COHORT_REQUIRED
from raypath.io.storage import S3Options, is_remote, open_file, strip_protocol

#: Columns read as text whatever they look like (ids like ``007`` stay ``007``).
ID_COLUMNS = ("slide_id", "uri", "patient_id", "cohort", "scanner", "pair_id")
_TEXT_COLUMNS = ID_COLUMNS  # the former name
#: Rows listed per problem in an error message; the count says how many more.
_MAX_ROWS_SHOWN = 10
#: A slide id names output files and appears on command lines: letters,
#: digits, ``-_.``, and it must not start with ``-`` (an option) or ``.`` (hidden, ``..``).
SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: Relative difference above which a table's ``mpp`` contradicts the file's.
MPP_CONFLICT_REL_TOL = 0.05

_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": None, ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class TableKind:
    """What one kind of user table must hold."""

    name: str  # "cohort table", "clinical table", ...
    required: tuple[str, ...]
    unique: tuple[str, ...] = ("slide_id",)  # columns whose values must be unique
    remedy: str = ""


#: The kinds of user table and their default checks; callers may add required columns.
TABLE_KINDS: dict[str, TableKind] = {
    "cohort": TableKind("cohort table", COHORT_REQUIRED, remedy="one row per slide (see docs/CONTRACTS.md)"),
    "clinical": TableKind("clinical table", ("slide_id",),
                          remedy="one row per slide with patient_id, cohort and the outcome columns"),
    "patch": TableKind("patch table", ("slide_id",), unique=(), remedy="one row per labelled patch"),
    "annotation": TableKind("annotation table", ("slide_id",), unique=(), remedy="one row per annotation"),
    "prediction": TableKind("prediction cohort", ("slide_id", "uri"), remedy="one row per slide to predict"),
}


def read_table(
    uri: str,
    kind: str = "cohort",
    required: Sequence[str] | None = None,
    id_columns: Sequence[str] | None = None,
    s3: S3Options | None = None,
) -> pd.DataFrame:
    """Read and check one user table (CSV, TSV or parquet; local or ``s3://``).

    Parameters
    ----------
    uri
        ``.csv``, ``.tsv``/``.tab`` or ``.parquet``/``.pq`` file (``.txt`` and
        no extension: CSV, or TSV when the header holds tabs and no commas).
    kind
        ``"cohort"``, ``"clinical"``, ``"patch"``, ``"annotation"`` or
        ``"prediction"`` (:data:`TABLE_KINDS`): sets the default required
        columns, the unique ones, and the wording of errors.
    required
        Columns that must be present (default: the kind's).
    id_columns
        Columns read as text, stripped, never parsed as numbers or NA
        (default: :data:`ID_COLUMNS`; extra ones are added to them).
    s3
        S3 settings; ``None`` reads them from the environment.

    Returns
    -------
    pandas.DataFrame
        The table with id columns as pandas ``string`` (blank -> ``<NA>``),
        other columns as pandas infers them.

    Raises
    ------
    RaypathError
        If the file cannot be read or parsed, or any check fails (every
        problem listed at once, rows counted from 1 after the header).

    Examples
    --------
    >>> df = read_table("clinical.tsv", kind="clinical", required=["slide_id", "time", "event"])  # doctest: +SKIP
    """
    tk = _kind(kind)
    ids = tuple(dict.fromkeys([*ID_COLUMNS, *(id_columns or ())]))
    raw = _read_bytes(uri, tk, s3)
    df = _parse(raw, uri, tk, ids)
    problems = table_problems(df, tk, required if required is not None else tk.required)
    if problems:
        raise RaypathError(f"{uri}: {len(problems)} problem(s) in the {tk.name}:\n  - " + "\n  - ".join(problems))
    return df


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
    tk = TABLE_KINDS["cohort"]
    df = _parse(_read_bytes(uri, tk, s3), uri, tk, ID_COLUMNS)
    df = validate_cohort(df, source=uri)
    if resolve_uris:
        base = _parent(uri)
        df["uri"] = [resolve_uri(u, base) for u in df["uri"]]
    return df


def _kind(kind: str) -> TableKind:
    if kind not in TABLE_KINDS:
        raise ValueError(f"unknown table kind {kind!r}; one of {sorted(TABLE_KINDS)}")
    return TABLE_KINDS[kind]


def _read_bytes(uri: str, tk: TableKind, s3: S3Options | None) -> bytes:
    try:
        with open_file(uri, "rb", s3) as f:
            return f.read()
    except FileNotFoundError:
        raise RaypathError(
            f"{tk.name} {uri!r} not found: pass the path of a .csv, .tsv or .parquet file "
            f"with columns {', '.join(tk.required)} ({tk.remedy})"
        ) from None
    except IsADirectoryError:
        raise RaypathError(f"{tk.name} {uri!r} is a folder: pass the table file inside it") from None
    except Exception as e:  # permissions, unreachable S3 ...
        raise RaypathError(f"cannot read {tk.name} {uri!r}: {type(e).__name__}: {e}") from e


def _format_of(uri: str, text_head: bytes) -> str:
    """``","``, ``"\\t"`` or ``"parquet"`` from the file name (sniffing only ``.txt``/no suffix)."""
    base = posixpath.basename(str(uri).lower())
    ext = os.path.splitext(base)[1]
    fmt = _EXTENSIONS.get(ext, "unknown") if ext else None
    if fmt is None:  # .txt or no suffix: tabs and no commas in the header -> TSV
        first = text_head.split(b"\n", 1)[0]
        fmt = "\t" if b"\t" in first and b"," not in first else ","
    return fmt


def _parse(raw: bytes, uri: str, tk: TableKind, id_columns: Sequence[str]) -> pd.DataFrame:
    fmt = _format_of(uri, raw[:4096])
    if fmt == "unknown":
        raise RaypathError(f"{tk.name} {uri!r}: unknown format; use a .csv, .tsv or .parquet file")
    try:
        if fmt == "parquet":
            df = pd.read_parquet(io.BytesIO(raw))
        else:
            df = _parse_delimited(raw, fmt, uri, tk, id_columns)
    except RaypathError:
        raise
    except Exception as e:
        raise RaypathError(
            f"{tk.name} {uri!r} could not be parsed ({type(e).__name__}: {e}); "
            "write it as a CSV/TSV with a header row or as parquet"
        ) from e
    df.columns = [str(c).strip() for c in df.columns]
    dup = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup:
        raise RaypathError(f"{tk.name} {uri!r}: column(s) {dup} appear more than once; name every column once")
    for col in [c for c in id_columns if c in df.columns]:
        df[col] = as_id_strings(df[col])
    return df


def _parse_delimited(raw: bytes, sep: str, uri: str, tk: TableKind, id_columns: Sequence[str]) -> pd.DataFrame:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RaypathError(f"{tk.name} {uri!r} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=sep, skipinitialspace=True) if any(f.strip() for f in r)]
    if not rows:
        raise RaypathError(f"{tk.name} {uri!r} is empty: write a header row and {tk.remedy}")
    header = rows[0]
    long_rows = [i for i, r in enumerate(rows[1:], start=1) if len(r) > len(header)]
    if long_rows:
        shown = ", ".join(str(i) for i in long_rows[:_MAX_ROWS_SHOWN])
        more = f" and {len(long_rows) - _MAX_ROWS_SHOWN} more" if len(long_rows) > _MAX_ROWS_SHOWN else ""
        name = "tab" if sep == "\t" else repr(sep)
        raise RaypathError(
            f"{tk.name} {uri!r}: data row(s) {shown}{more} have more fields than the header "
            f"({len(rows[long_rows[0]])} vs {len(header)}); the columns would shift: remove the extra "
            f"{name} (a trailing delimiter?) or quote values that contain it"
        )
    present = [c for c in id_columns if c in {h.strip() for h in header}]
    raw_names = {h.strip(): h for h in header}
    df = pd.read_csv(io.StringIO(text), sep=sep, skipinitialspace=True, index_col=False,
                     converters={raw_names[c]: str for c in present})
    # a delimiter closing every line, the header too, makes an empty unnamed last column
    empty = [c for c in df.columns if str(c).startswith("Unnamed:") and df[c].isna().all()]
    return df.drop(columns=empty)


def as_id_strings(series: pd.Series) -> pd.Series:
    """Ids as stripped text (pandas ``string``; blank -> ``<NA>``); integral
    floats (a parquet id column with gaps) lose their ``.0``."""
    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return pd.NA
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v).strip()

    out = pd.Series([one(v) for v in series], index=series.index, dtype="string")
    return out.mask(out == "")


def table_problems(df: pd.DataFrame, tk: TableKind | str, required: Sequence[str]) -> list[str]:
    """The checks every user table gets: required columns, no rows, blank or
    duplicate ids, slide ids outside ``[A-Za-z0-9_.-]`` (all problems, each with its rows)."""
    tk = _kind(tk) if isinstance(tk, str) else tk
    missing = [c for c in required if c not in df.columns]
    if missing:
        return [
            f"missing required column(s) {', '.join(missing)}; a {tk.name} needs {', '.join(required)} "
            f"({tk.remedy}). Columns found: {', '.join(map(str, df.columns)) or 'none'}"
        ]
    if len(df) == 0:
        return [f"the {tk.name} has no rows: {tk.remedy}"]
    problems: list[str] = []
    for col in required:
        bad = _blank(df[col])
        if bad.any():
            problems.append(f"empty `{col}` in {_rows(df, bad)}: fill in a value for every row")
    for col in tk.unique:
        if col in df.columns:
            ids = df[col]
            dup = ids.duplicated(keep=False).to_numpy(dtype=bool) & ~_blank(ids)
            if dup.any():
                problems.append(
                    f"duplicate `{col}` in {_rows(df, dup)}: {col} values must be unique (outputs are named by them)"
                )
    if "slide_id" in df.columns:
        sid = df["slide_id"].astype("string")
        bad = (~_blank(sid)) & ~sid.fillna("").str.fullmatch(SLIDE_ID_PATTERN.pattern).to_numpy(dtype=bool)
        if bad.any():
            problems.append(
                f"`slide_id` not made of letters, digits, '-', '_', '.' (or starting with '-' or '.') in "
                f"{_rows(df, bad)}: ids name output files and appear on command lines; rename them "
                "(e.g. spaces -> '_')"
            )
    return problems


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

    Checks (every problem reported at once): the checks of every user table
    (:func:`table_problems`: required columns, blank or duplicate
    ``slide_id``, ids outside ``[A-Za-z0-9_.-]``); when ``time`` exists,
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
    for col in ID_COLUMNS:
        if col in df.columns:
            df[col] = as_id_strings(df[col])
    problems = table_problems(df, "cohort", COHORT_REQUIRED)
    if problems and (len(df) == 0 or any(c not in df.columns for c in COHORT_REQUIRED)):
        raise RaypathError(f"{source}: {problems[0]} (optional: {', '.join(COHORT_OPTIONAL)})")
    problems += _outcome_problems(df)
    if problems:
        raise RaypathError(
            f"{source}: {len(problems)} problem(s) in the cohort table:\n  - "
            + "\n  - ".join(problems)
        )
    order = list(COHORT_REQUIRED) + [c for c in COHORT_OPTIONAL if c in df.columns]
    order += [c for c in df.columns if c not in order]
    return df[order].reset_index(drop=True)


def _outcome_problems(df: pd.DataFrame) -> list[str]:
    """``time``/``event``/``mpp`` checks; normalises those columns in place."""
    problems: list[str] = []
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
    return problems


def mpp_conflicts(slides: pd.DataFrame, rel_tol: float = MPP_CONFLICT_REL_TOL) -> list[str]:
    """Slides whose cohort-table ``mpp`` contradicts the mpp recorded in the file.

    ``slides`` is an ingest result (cohort columns + ``mpp_x``/``mpp_source``).
    The table's ``mpp`` only fills in files that record none, so where the
    file has its own value that value is used; a table value more than
    ``rel_tol`` away from it is a contradiction the user must see.  Returns
    one message per slide (empty when none).
    """
    need = {"mpp", "mpp_x", "mpp_source", "slide_id"}
    if not need <= set(slides.columns):
        return []
    table = pd.to_numeric(slides["mpp"], errors="coerce").to_numpy(dtype=float)
    file_ = pd.to_numeric(slides["mpp_x"], errors="coerce").to_numpy(dtype=float)
    from_file = (slides["mpp_source"].astype("string") == "file").fillna(False).to_numpy(dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        bad = from_file & np.isfinite(table) & np.isfinite(file_) & (np.abs(table - file_) > rel_tol * file_)
    return [
        f"slide {sid}: the cohort table says mpp {t:g} but the file records {f:g} um/px; the file's value "
        "is used (the table's `mpp` only fills in files without one): correct or remove the table's value"
        for sid, t, f in zip(slides["slide_id"].astype(str)[bad], table[bad], file_[bad])
    ]


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
