"""The README's first command, in-process: the whole pipeline on a generated
study read over S3 (the session's embedded endpoint), ending in a report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def test_demo_runs_end_to_end_over_s3(tmp_path, ray_session, s3_server):
    from raypath.demo import DemoConfig, run_demo

    bucket = s3_server.create_bucket("demo-test")
    summary = run_demo(
        DemoConfig(
            workdir=str(tmp_path / "wd"),
            bucket=bucket,
            n_cohorts=3,
            slides_per_cohort=4,
            slide_px=1024,
            mil_epochs=3,
            mil_repeats=1,
        )
    )
    wd = Path(summary["workdir"])
    assert summary["study_uri"].startswith("s3://demo-test/")
    slides = pd.read_parquet(wd / "slides.parquet")
    assert len(slides) == 12 and (slides["status"] == "ok").all()
    assert slides["uri"].str.startswith("s3://").all()  # the slides were read over S3
    tiles = pd.read_parquet(wd / "tiles.parquet")
    assert summary["tiles"] == len(tiles) > 0
    assert len(list((wd / "qc").glob("*.png"))) == 12
    feats = sorted(p.stem for p in Path(summary["features"]).glob("*.parquet"))
    assert feats == sorted(tiles["slide_id"].unique())
    for protocol in ("lodo", "internal"):
        metrics = json.loads((Path(summary["mil"][protocol]) / "metrics.json").read_text())
        assert metrics["protocol"] == protocol
    assert (Path(summary["robustness"]) / "robustness.json").exists()
    index = Path(summary["report"]).read_text()  # links one self-contained page per run
    assert "survival, lodo" in index and "held-out c_index" in index  # MIL headline, not raw JSON keys
    for run in ("mil-lodo", "mil-internal", "robustness"):
        assert f"runs/{run}/report.html" in index
        assert "<img" in (wd / "runs" / run / "report.html").read_text()
    assert json.loads((wd / "demo_summary.json").read_text()) == summary
