"""MLflow tracking: a store inside the workdir, per-epoch metrics, artifacts, no secrets, never fatal."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("mlflow")

SECRET = "rpMarkerSecret0123456789abcdef"


def _mil_result(run_dir: Path) -> SimpleNamespace:
    rows = []
    for name in ("c0", "c1"):
        for epoch in range(3):
            rows.append(dict(protocol="lodo", name=name, repeat=0, fold=0, epoch=epoch, set="train", cohort="all",
                             metric="loss", value=1.0 - 0.1 * epoch))
            rows.append(dict(protocol="lodo", name=name, repeat=0, fold=0, epoch=epoch, set="external", cohort=name,
                             metric="c_index", value=0.6 + 0.05 * epoch))
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("stage: MilConfig\nconfig:\n  epochs: 3\n  aws_secret_access_key: "
                                         f"{SECRET}\n")
    (run_dir / "metrics.json").write_text(json.dumps({"task": "survival", "protocol": "lodo", "summary": {}}))
    summary = {"metric": "c_index", "mean": 0.7, "worst": 0.65, "per_cohort": {"c0": 0.75, "c1": 0.65}}
    return SimpleNamespace(run_dir=str(run_dir), curves=pd.DataFrame(rows), summary=summary)


def test_mil_run_tracked_inside_the_workdir(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from raypath.mil.api import MilConfig
    from raypath.report import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAYPATH_TRACKING", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    wd = tmp_path / "wd"
    res = _mil_result(wd / "runs" / "mil-lodo")
    cfg = MilConfig(workdir=str(wd), features="tiny-vit", run="mil-lodo", epochs=3)
    tracking.track_mil(cfg, res)

    uri = tracking.tracking_uri(str(wd))
    assert uri == f"sqlite:///{wd}/mlruns.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("raypath wd")
    assert exp.artifact_location == str(wd / "mlruns")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "mil mil-lodo" and run.info.status == "FINISHED"
    hist = client.get_metric_history(run.info.run_id, "c_index_external_c0")
    assert [m.step for m in hist] == [0, 1, 2] and hist[-1].value == pytest.approx(0.7)
    assert run.data.metrics["c_index_mean_external"] == pytest.approx(0.7)
    assert run.data.params["epochs"] == "3"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "report.html"} <= arts
    # no secret in the store or its artifacts
    for f in [wd / "mlruns.db", *(wd / "mlruns").rglob("*")]:
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_tracking_off_and_never_fatal(tmp_path, monkeypatch):
    from raypath.mil.api import MilConfig
    from raypath.report import tracking

    wd = tmp_path / "wd"
    res = _mil_result(wd / "runs" / "r")
    cfg = MilConfig(workdir=str(wd), features="x", run="r")
    monkeypatch.setenv("RAYPATH_TRACKING", "off")
    tracking.track_mil(cfg, res)
    assert not (wd / "mlruns.db").exists() and tracking.tune_callbacks(str(wd), "s") == []
    monkeypatch.delenv("RAYPATH_TRACKING")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unsupported-scheme://nowhere")
    tracking.track_mil(cfg, res)  # a broken store is a warning, not an error
    assert tracking.tracking_uri("s3://bucket/wd") == "unsupported-scheme://nowhere"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri("s3://bucket/wd") is None  # no default store on object storage


def test_flat_params_redacts_and_caps():
    from raypath.report.tracking import flat_params, metric_key

    p = flat_params({"a": {"b": 1, "aws_secret_access_key": SECRET}, "long": "x" * 900, "l": [1, 2]})
    assert SECRET not in json.dumps(p) and p["a.b"] == "1" and len(p["long"]) == 500 and p["l"] == "[1, 2]"
    assert metric_key("c_index", "external", "site #1") == "c_index_external_site -1"
    assert np.isfinite(0.5)
