"""Cohort table validation: every problem reported at once, naming the rows."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from raypath.wsi.cohort import read_cohort, resolve_uri, validate_cohort
from raypath.errors import RaypathError


def _table(**overrides):
    base = {
        "slide_id": ["s1", "s2", "s3"],
        "uri": ["a.svs", "b.svs", "c.svs"],
        "patient_id": ["p1", "p2", "p3"],
        "cohort": ["A", "A", "B"],
    }
    base.update(overrides)
    return pd.DataFrame(base)


def test_valid_table_is_normalised_and_extra_columns_kept():
    df = _table(time=["1.5", "0", "20"], event=[1, 0, 1], site_note=["x", "y", "z"])
    out = validate_cohort(df)
    assert list(out.columns[:6]) == ["slide_id", "uri", "patient_id", "cohort", "time", "event"]
    assert "site_note" in out.columns
    assert out["time"].tolist() == [1.5, 0.0, 20.0]
    assert out["event"].tolist() == [1, 0, 1]


def test_missing_required_columns_are_named():
    df = _table().drop(columns=["patient_id", "cohort"])
    with pytest.raises(RaypathError) as ei:
        validate_cohort(df, source="my.csv")
    msg = str(ei.value)
    assert "my.csv" in msg and "patient_id" in msg and "cohort" in msg


def test_all_row_problems_reported_together():
    df = _table(
        slide_id=["s1", "s1", "s3"],
        uri=["a.svs", "b.svs", ""],
        time=[5.0, -1.0, 3.0],
        event=[1, 0, 2],
    )
    with pytest.raises(RaypathError) as ei:
        validate_cohort(df)
    msg = str(ei.value)
    assert "4 problem(s)" in msg
    # duplicate ids: rows 1 and 2
    assert "duplicate `slide_id` in rows 1, 2 (slide_id s1, s1)" in msg
    # negative time: row 2; bad event: row 3; empty uri: row 3
    assert "negative `time` in row 2 (slide_id s1)" in msg
    assert "`event` not in {0, 1} in row 3 (slide_id s3)" in msg
    assert "empty `uri` in row 3 (slide_id s3)" in msg


def test_missing_time_and_text_event_are_errors():
    df = _table(time=[1.0, None, 2.0], event=["1", "yes", "0"])
    with pytest.raises(RaypathError) as ei:
        validate_cohort(df)
    msg = str(ei.value)
    assert "`time` in row 2" in msg
    assert "`event` not in {0, 1} in row 2" in msg


def test_time_without_event_column_is_an_error():
    with pytest.raises(RaypathError, match="without an `event` column"):
        validate_cohort(_table(time=[1.0, 2.0, 3.0]))


def test_bad_mpp_named_but_empty_mpp_allowed():
    out = validate_cohort(_table(mpp=[0.25, None, 0.5]))
    assert out["mpp"].isna().tolist() == [False, True, False]
    with pytest.raises(RaypathError, match=r"`mpp` not a positive number in row 1"):
        validate_cohort(_table(mpp=[-0.25, None, 0.5]))


def test_relative_uris_resolve_against_table_folder(tmp_path):
    sub = tmp_path / "study"
    sub.mkdir()
    _table(uri=["slides/a.svs", "/abs/b.svs", "s3://bkt/c.svs"]).to_csv(sub / "cohort.csv", index=False)
    df = read_cohort(str(sub / "cohort.csv"))
    assert df["uri"].tolist() == [str(sub / "slides" / "a.svs"), "/abs/b.svs", "s3://bkt/c.svs"]
    # missing files are not a table error: ingest records them per slide
    assert not os.path.exists(df["uri"][0])


def test_resolve_uri_on_s3_prefix():
    assert resolve_uri("slides/x.svs", "s3://bkt/study") == "s3://bkt/study/slides/x.svs"
    assert resolve_uri("../other/x.svs", "s3://bkt/study") == "s3://bkt/other/x.svs"


def test_ids_stay_text_and_parquet_tables_work(tmp_path):
    df = _table(slide_id=["007", "010", "3"])
    df.to_parquet(tmp_path / "c.parquet")
    (tmp_path / "c.csv").write_text(df.to_csv(index=False))
    for name in ("c.parquet", "c.csv"):
        out = read_cohort(str(tmp_path / name))
        assert out["slide_id"].tolist() == ["007", "010", "3"]


def test_missing_table_file_has_remedy(tmp_path):
    with pytest.raises(RaypathError, match="not found"):
        read_cohort(str(tmp_path / "nope.csv"))


def test_cohort_table_on_s3(s3_server, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    _table().to_csv(folder / "cohort.csv", index=False)
    base = s3_server.upload_dir(folder, "cohort-test")
    df = read_cohort(f"{base}/cohort.csv")
    assert df["uri"].tolist() == [f"{base}/a.svs", f"{base}/b.svs", f"{base}/c.svs"]
