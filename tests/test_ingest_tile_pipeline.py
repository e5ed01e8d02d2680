"""synth -> ingest -> tile through Ray, on local disk and on the embedded S3.

The study mixes synthetic slides (20x and 40x sites, a blank slide, pen
marks), the real CMU slide, a tiny 40x slide with a 2x-free pyramid, and
broken files; every broken file must be reported with its reason and every
good slide tiled.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from tiny_slides import broken_files, render, write_svs

from raypath import cli
from raypath.wsi.ingest import IngestConfig, ingest
from raypath.schemas import TILES, TILING_SUMMARY
from raypath.io.storage import exists, read_parquet
from raypath.synth.study import SynthConfig, synthesize
from raypath.wsi.tiling import TileConfig, tile

BROKEN = {"truncated": "truncated:", "text": "not_a_slide:", "png": "not_a_slide:", "empty": "empty_file:", "nompp": "no_mpp:"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, cmu_slide):
    root = tmp_path_factory.mktemp("pipeline_study")
    table = synthesize(
        SynthConfig(
            out=str(root), n_cohorts=2, slides_per_cohort=2, slide_px=1024, objective=[20, 40],
            n_blank_slides=1, pen_fraction=0.5, seed=11,
        )
    )
    good = root / table["uri"].iloc[0]
    bad = broken_files(root / "broken", good)
    shutil.copy(cmu_slide, root / "cmu.svs")
    write_svs(root / "x40.svs", render(1536, 1024, [(0.5, 0.5, 0.35, 0.35)], seed=8), mpp=0.25, app_mag=40, downsamples=(4,))
    extra = [("cmu", "cmu.svs"), ("x40", "x40.svs"), ("missing", "slides/not_there.svs")]
    extra += [(k, str(p.relative_to(root))) for k, p in bad.items()]
    rows = pd.DataFrame(extra, columns=["slide_id", "uri"])
    rows["patient_id"] = "px_" + rows["slide_id"]
    rows["cohort"] = "extra"
    rows["time"] = 10.0
    rows["event"] = 0
    cohort = pd.concat([pd.read_csv(root / "cohort.csv"), rows], ignore_index=True)
    cohort.to_csv(root / "cohort.csv", index=False)
    return root, cohort


def _check(slides: pd.DataFrame, tiles: pd.DataFrame, summary: pd.DataFrame, cohort: pd.DataFrame, qc_exists):
    assert len(slides) == len(cohort)
    s = slides.set_index("slide_id")
    synth_ids = cohort.loc[cohort["cohort"] != "extra", "slide_id"].tolist()
    for sid in synth_ids + ["cmu", "x40"]:
        assert s.loc[sid, "status"] == "ok", (sid, s.loc[sid, "error"])
    assert s.loc["missing", "error"].startswith("not_found:")
    for kind, prefix in BROKEN.items():
        assert s.loc[kind, "status"] == "failed" and s.loc[kind, "error"].startswith(prefix)
    # synth's 40x site is read at level 0 with 448 px and resized to 224
    by_obj = cohort.set_index("slide_id")["true_objective"].dropna()
    sm = summary.set_index("slide_id")
    for sid, obj in by_obj.items():
        assert sm.loc[sid, "read_px"] == (448 if obj == 40 else 224)
    blanks = cohort.loc[cohort["true_blank"] == True, "slide_id"].tolist()  # noqa: E712 (NaN rows)
    assert blanks
    for sid in blanks:
        assert sm.loc[sid, "status"] == "no_tissue" and sm.loc[sid, "n_tiles"] == 0
        assert sm.loc[sid, "warning"]
    tissue_ids = [sid for sid in synth_ids if sid not in blanks] + ["cmu", "x40"]
    for sid in tissue_ids:
        assert sm.loc[sid, "status"] == "ok" and sm.loc[sid, "n_tiles"] > 0, sm.loc[sid].to_dict()
        assert qc_exists(sid)
        t = tiles[tiles["slide_id"] == sid]
        assert t["tile_id"].tolist() == list(range(len(t)))
        assert (t["tissue_fraction"] >= 0.6).all()
    failed = [k for k in s.index if s.loc[k, "status"] == "failed"]
    assert set(sm.loc[failed, "status"]) == {"failed"}
    assert set(tiles["slide_id"]) == set(tissue_ids)


def test_pipeline_local(study, tmp_path, ray_session):
    root, cohort = study
    wd = tmp_path / "wd"
    slides = ingest(IngestConfig(cohort=str(root / "cohort.csv"), workdir=str(wd)))
    tile(TileConfig(workdir=str(wd)))
    t = pq.read_table(wd / "tiles.parquet")
    s = pq.read_table(wd / "tiling_summary.parquet")
    assert t.schema.equals(TILES) and s.schema.equals(TILING_SUMMARY)
    _check(slides, t.to_pandas(), s.to_pandas(), cohort, lambda sid: (wd / "qc" / f"{sid}.png").exists())
    assert (wd / "ingest_config.yaml").exists() and (wd / "tiling_config.yaml").exists()


def test_pipeline_over_embedded_s3(study, tmp_path, ray_session, s3_server):
    root, cohort = study
    base = s3_server.upload_dir(root, "pipeline")
    wd = f"{base}/wd"
    slides = ingest(IngestConfig(cohort=f"{base}/cohort.csv", workdir=wd))
    assert slides.set_index("slide_id").loc["cmu", "uri"] == f"{base}/cmu.svs"
    tile(TileConfig(workdir=wd))
    t = read_parquet(f"{wd}/tiles.parquet")
    s = read_parquet(f"{wd}/tiling_summary.parquet")
    assert t.schema.equals(TILES)
    _check(slides, t.to_pandas(), s.to_pandas(), cohort, lambda sid: exists(f"{wd}/qc/{sid}.png"))


def test_cli_verbs_in_process(study, tmp_path, capsys):
    root, cohort = study
    sub = cohort[cohort["slide_id"].isin(["cmu", "text"])]
    sub.to_csv(root / "small.csv", index=False)
    wd = str(tmp_path / "cli")
    from raypath.errors import EXIT_SOME_FAILED

    # "text" is not a slide: both verbs finish the cohort and exit 3 (some slides failed)
    assert cli.main(["ingest", "--cohort", str(root / "small.csv"), "--workdir", wd, "--no-use-ray"]) == EXIT_SOME_FAILED
    assert cli.main(["tile", "--workdir", wd, "--no-use-ray", "--tile-px", "256", "--overlap-px", "64",
                     "--target-mpp", "1.0"]) == EXIT_SOME_FAILED
    out = capsys.readouterr().out
    assert "FAILED text" in out
    tiles = pd.read_parquet(f"{wd}/tiles.parquet")
    assert set(tiles["slide_id"]) == {"cmu"}
    # 0.499 um/px read for 1.0 um/px: 513 px squares, stride (256-64) * 513/256 level-0 px
    assert (tiles["read_px"] == 513).all() and (tiles["tile_px"] == 256).all()
    xs = sorted(set(tiles["x"]))
    assert min(b - a for a, b in zip(xs, xs[1:])) == pytest.approx(192 * 513 / 256, abs=1)


def test_tiling_falls_back_to_isolated_tasks(study, tmp_path, ray_session, monkeypatch):
    import raypath.wsi.tiling as tiling

    root, cohort = study
    sub = cohort[cohort["slide_id"].isin(["cmu", "text"])]
    sub.to_csv(root / "fallback.csv", index=False)
    wd = str(tmp_path / "fb")
    ingest(IngestConfig(cohort=str(root / "fallback.csv"), workdir=wd, use_ray=False))

    def dataset_fails(rows, cfg):
        raise RuntimeError("a task kept dying")

    monkeypatch.setattr(tiling, "_run_ray", dataset_fails)
    returned = tile(TileConfig(workdir=wd))
    tiles = pd.read_parquet(f"{wd}/tiles.parquet")
    summary = pd.read_parquet(f"{wd}/tiling_summary.parquet").set_index("slide_id")
    assert returned.set_index("slide_id")["n_tiles"].to_dict() == summary["n_tiles"].to_dict()
    assert summary.loc["cmu", "status"] == "ok" and summary.loc["cmu", "n_tiles"] == len(tiles) > 0
    assert summary.loc["text", "status"] == "failed"
