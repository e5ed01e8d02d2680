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


# --------------------------------------------------------------------------- one reader for every user table


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_extra_field_in_data_rows_is_refused_not_shifted(tmp_path):
    """pandas takes the first column as an index when data rows have one more
    field than the header, shifting every column: refused, naming the rows."""
    from raypath.wsi.cohort import read_table

    text = "slide_id,uri,patient_id,cohort\ns1,a.svs,p1,A,oops\ns2,b.svs,p2,B\ns3,c.svs,p3,B,x\n"
    uri = _write(tmp_path / "c.csv", text)
    with pytest.raises(RaypathError, match=r"data row\(s\) 1, 3 have more fields than the header"):
        read_cohort(uri)
    with pytest.raises(RaypathError, match="more fields"):
        read_table(uri, kind="clinical")
    # a delimiter closing every line (header too) is only an empty column: fine
    ok = _write(tmp_path / "t.csv", "slide_id,uri,patient_id,cohort,\ns1,a.svs,p1,A,\n")
    assert list(read_cohort(ok).columns) == ["slide_id", "uri", "patient_id", "cohort"]


@pytest.mark.parametrize("bad", ["slide 1", "-s1", ".hidden", "a/b", "s1;rm", "é1"])
def test_slide_ids_outside_the_contract_are_refused(tmp_path, bad):
    df = _table(slide_id=["s0", bad, "s2"])
    with pytest.raises(RaypathError, match=r"letters, digits.*row 2"):
        validate_cohort(df)
    uri = _write(tmp_path / "c.tsv", df.to_csv(sep="\t", index=False))
    with pytest.raises(RaypathError, match="row 2"):
        read_cohort(uri)
    # ids with - _ . inside are fine
    assert validate_cohort(_table(slide_id=["a-1", "b_2.svs", "C.3-x"]))["slide_id"].tolist() == ["a-1", "b_2.svs", "C.3-x"]


def test_tsv_and_every_kind_keep_ids_as_text(tmp_path):
    from raypath.wsi.cohort import TABLE_KINDS, read_table

    text = "slide_id\tpatient_id\tcohort\ttime\tevent\n007\tNA\t01\t5.5\t1\n010\t0010\t02\t3\t0\n"
    uri = _write(tmp_path / "clin.tsv", text)
    for kind in TABLE_KINDS:
        if kind in ("cohort", "prediction"):
            continue  # need uri
        df = read_table(uri, kind=kind)
        assert df["slide_id"].tolist() == ["007", "010"]
        assert df["patient_id"].tolist() == ["NA", "0010"] and df["cohort"].tolist() == ["01", "02"]
        assert df["time"].tolist() == [5.5, 3.0]
    with pytest.raises(RaypathError, match="missing required column.*uri"):
        read_table(uri, kind="prediction")
    with pytest.raises(RaypathError, match="missing required column.*label"):
        read_table(uri, kind="clinical", required=["slide_id", "label"])
    with pytest.raises(RaypathError, match="unknown format"):
        read_table(_write(tmp_path / "x.xlsx", "a"), kind="clinical")
    with pytest.raises(RaypathError, match="not UTF-8"):
        (tmp_path / "l.csv").write_bytes("slide_id\nsl\xe9\n".encode("latin-1"))
        read_table(str(tmp_path / "l.csv"), kind="clinical")


def test_cohort_mpp_contradicting_the_file_is_reported(tmp_path, cmu_slide):
    """CMU-1-Small-Region records 0.499 um/px: a table saying 0.25 is named in
    the ingest summary (the file's value is used), one saying 0.5 is not."""
    from raypath.wsi.cohort import mpp_conflicts
    from raypath.wsi.ingest import IngestConfig, ingest, summarize

    df = _table(uri=[str(cmu_slide)] * 3, mpp=[0.25, 0.5, None])
    df.to_csv(tmp_path / "c.csv", index=False)
    out = ingest(IngestConfig(cohort=str(tmp_path / "c.csv"), workdir=str(tmp_path / "wd"), use_ray=False))
    assert (out["mpp_source"] == "file").all() and out["mpp_x"].round(3).tolist() == [0.499] * 3
    msgs = mpp_conflicts(out)
    assert len(msgs) == 1 and "slide s1" in msgs[0] and "0.25" in msgs[0] and "0.499" in msgs[0]
    text = summarize(out)
    assert "MPP CONFLICT slide s1" in text and "s2" not in text.split("MPP CONFLICT", 1)[1]
