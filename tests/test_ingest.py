"""Ingest: every slide opened, every broken file reported with its reason, the run goes on."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from tiny_slides import broken_files, render, tissue_slide, write_svs

from raypath import cli
from raypath.wsi.ingest import IngestConfig, ingest, inspect_slide
from raypath.schemas import COHORT_REQUIRED, SLIDES_META
from raypath.io.storage import read_parquet


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    """A folder mixing good slides with broken files of many kinds."""
    root = tmp_path_factory.mktemp("mixed")
    good = tissue_slide(root / "good1.svs", seed=1)
    tissue_slide(root / "good2.svs", width=1024, height=768, seed=2)
    files = broken_files(root / "bad", good)
    # kinds beyond the obvious ones
    files["head_only"] = root / "bad" / "head_only.svs"
    files["head_only"].write_bytes(good.read_bytes()[:100])
    files["random"] = root / "bad" / "random.svs"
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["grey"] = root / "bad" / "grey.tif"
    tifffile.imwrite(files["grey"], np.zeros((300, 300), np.uint8), tile=(256, 256))
    files["corrupt"] = root / "bad" / "corrupt.svs"  # right size, tile data zeroed
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tf:
        page = tf.series[0].levels[0].pages[0]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset : offset + count] = bytes(count)
    files["corrupt"].write_bytes(bytes(data))
    files["codec"] = root / "bad" / "codec.svs"
    write_svs(files["codec"], render(512, 512), compression="zlib", downsamples=())
    with tifffile.TiffFile(files["codec"], mode="r+b") as tf:
        for page in tf.pages:
            page.tags["Compression"].overwrite(60123)  # a codec nobody has
    return root, files


EXPECTED_KIND = {
    "truncated": "truncated:",
    "head_only": "truncated:",
    "text": "not_a_slide:",
    "png": "not_a_slide:",
    "random": "not_a_slide:",
    "empty": "empty_file:",
    "nompp": "no_mpp:",
    "grey": "unsupported_layout:",
    "codec": "unsupported_compression:",
    "corrupt": "corrupt_tile_data:",
}


def _cohort(root, files, cmu_slide):
    rows = [
        ("good1", "good1.svs", 0.0),
        ("good2", "good2.svs", np.nan),
        ("cmu", str(cmu_slide), np.nan),
        ("missing", "does/not/exist.svs", np.nan),
    ]
    rows += [(k, str(p.relative_to(root)), np.nan) for k, p in files.items()]
    df = pd.DataFrame(rows, columns=["slide_id", "uri", "mpp"])
    df["mpp"] = df["mpp"].replace(0.0, np.nan)
    df["patient_id"] = "p_" + df["slide_id"]
    df["cohort"] = ["A", "B"] * (len(df) // 2) + ["A"] * (len(df) % 2)
    df["time"] = np.arange(len(df), dtype=float)
    df["event"] = [0, 1] * (len(df) // 2) + [0] * (len(df) % 2)
    df.to_csv(root / "cohort.csv", index=False)
    return root / "cohort.csv"


@pytest.mark.parametrize("kind", sorted(EXPECTED_KIND))
def test_inspect_slide_reports_each_broken_kind(slide_dir, kind):
    _, files = slide_dir
    cfg = IngestConfig(workdir="unused", use_ray=False)
    out = inspect_slide({"uri": str(files[kind])}, cfg)
    assert out["status"] == "failed"
    assert out["error"].startswith(EXPECTED_KIND[kind]), out["error"]
    assert set(out) == set(SLIDES_META.names)


def test_missing_file_is_a_status_not_a_crash(tmp_path):
    out = inspect_slide({"uri": str(tmp_path / "nope.svs")}, IngestConfig(workdir="x"))
    assert out["status"] == "failed" and out["error"].startswith("not_found:")


def test_real_cmu_slide_metadata(cmu_slide):
    out = inspect_slide({"uri": str(cmu_slide)}, IngestConfig(workdir="x"))
    assert out["status"] == "ok", out["error"]
    assert (out["width"], out["height"], out["levels"]) == (2220, 2967, 1)
    assert out["mpp_x"] == pytest.approx(0.499) and out["mpp_source"] == "file"
    assert out["objective_power"] == 20 and out["vendor"] == "aperio"
    assert out["bytes"] == cmu_slide.stat().st_size
    assert "head_sha256=" in out["fingerprint"]


def test_missing_mpp_uses_cohort_then_override(slide_dir):
    _, files = slide_dir
    uri = str(files["nompp"])
    out = inspect_slide({"uri": uri, "mpp": 0.25}, IngestConfig(workdir="x", mpp_override=1.0))
    assert (out["status"], out["mpp_x"], out["mpp_source"]) == ("ok", 0.25, "cohort")
    out = inspect_slide({"uri": uri, "mpp": None}, IngestConfig(workdir="x", mpp_override=1.0))
    assert (out["status"], out["mpp_x"], out["mpp_source"]) == ("ok", 1.0, "override")
    out = inspect_slide({"uri": uri}, IngestConfig(workdir="x"))
    assert out["status"] == "failed" and "--mpp-override" in out["error"] and "`mpp` column" in out["error"]


def test_fingerprint_changes_with_content(tmp_path):
    a = tissue_slide(tmp_path / "a.svs", width=512, height=512, seed=1)
    fa = inspect_slide({"uri": str(a)}, IngestConfig(workdir="x"))["fingerprint"]
    assert inspect_slide({"uri": str(a)}, IngestConfig(workdir="x"))["fingerprint"] == fa
    tissue_slide(a, width=512, height=512, seed=2)
    assert inspect_slide({"uri": str(a)}, IngestConfig(workdir="x"))["fingerprint"] != fa


def _check_slides_table(df, files):
    assert list(df.columns[:4]) == list(COHORT_REQUIRED)
    by_id = df.set_index("slide_id")
    for sid in ("good1", "good2", "cmu"):
        assert by_id.loc[sid, "status"] == "ok", by_id.loc[sid, "error"]
        assert pd.isna(by_id.loc[sid, "error"])
    assert by_id.loc["good1", "level_downsamples"].tolist() == [1.0, 4.0]
    assert by_id.loc["missing", "error"].startswith("not_found:")
    for kind in files:
        assert by_id.loc[kind, "status"] == "failed"
        assert by_id.loc[kind, "error"].startswith(EXPECTED_KIND[kind])


def test_ingest_mixed_folder_through_ray(slide_dir, cmu_slide, tmp_path, ray_session):
    root, files = slide_dir
    cohort = _cohort(root, files, cmu_slide)
    df = ingest(IngestConfig(cohort=str(cohort), workdir=str(tmp_path / "wd")))
    _check_slides_table(df, files)
    table = pq.read_table(tmp_path / "wd" / "slides.parquet")
    for field in SLIDES_META:
        assert table.schema.field(field.name).type == field.type
    assert table.num_rows == len(pd.read_csv(cohort))
    assert (tmp_path / "wd" / "ingest_config.yaml").exists()


def test_ingest_over_embedded_s3(slide_dir, cmu_slide, ray_session, s3_server, tmp_path):
    root, files = slide_dir
    local = tmp_path / "study"
    shutil.copytree(root, local)
    shutil.copy(cmu_slide, local / "cmu.svs")
    cohort = _cohort(local, {k: local / p.relative_to(root) for k, p in files.items()}, "cmu.svs")
    base = s3_server.upload_dir(local, "ingest-test")
    df = ingest(IngestConfig(cohort=f"{base}/{cohort.name}", workdir=f"{base}/wd"))
    _check_slides_table(df, files)
    by_id = df.set_index("slide_id")
    assert by_id.loc["good1", "uri"] == f"{base}/good1.svs"
    assert "etag=" in by_id.loc["good1", "fingerprint"]
    back = read_parquet(f"{base}/wd/slides.parquet").to_pandas()
    assert back["status"].tolist() == df["status"].tolist()


def test_cli_bad_table_exits_2_naming_rows(tmp_path, capsys):
    pd.DataFrame(
        {"slide_id": ["a", "a"], "uri": ["x", "y"], "patient_id": ["p", "q"], "cohort": ["c", "c"]}
    ).to_csv(tmp_path / "c.csv", index=False)
    rc = cli.main(["ingest", "--cohort", str(tmp_path / "c.csv"), "--workdir", str(tmp_path / "w")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "duplicate `slide_id` in rows 1, 2" in err
    assert not (tmp_path / "w" / "slides.parquet").exists()


def test_cli_ingest_in_process(slide_dir, tmp_path, capsys):
    root, _ = slide_dir
    pd.DataFrame(
        {"slide_id": ["g", "nompp"], "uri": ["good2.svs", "bad/nompp.svs"], "patient_id": ["p", "q"], "cohort": ["c", "c"]}
    ).to_csv(root / "two.csv", index=False)
    rc = cli.main(
        ["ingest", "--cohort", str(root / "two.csv"), "--workdir", str(tmp_path), "--mpp-override", "0.5", "--no-use-ray"]
    )
    assert rc == 0
    df = pd.read_parquet(tmp_path / "slides.parquet")
    assert df["status"].tolist() == ["ok", "ok"]
    assert df["mpp_source"].tolist() == ["file", "override"]


def test_open_slide_over_s3_uses_explicit_block_size_and_same_pixels(s3_server, cmu_slide, tmp_path):
    import tiffslide

    from raypath.wsi.slide_io import opened_slide
    from raypath.io.storage import S3Options

    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(cmu_slide, folder / "cmu.svs")
    base = s3_server.upload_dir(folder, "blocks")
    opts = S3Options.from_env(block_size_bytes=256 * 1024, cache_type="bytes")
    with opened_slide(f"{base}/cmu.svs", opts) as remote:
        fh = remote._raypath_fh
        assert fh.blocksize == 256 * 1024  # never s3fs's 50 MiB default
        assert type(fh.cache).__name__ == "BytesCache"
        got = remote.read_region((1000, 1500), 0, (224, 224), as_array=True)
    with tiffslide.TiffSlide(str(cmu_slide)) as local:
        want = local.read_region((1000, 1500), 0, (224, 224), as_array=True)
    assert np.array_equal(got, want)
