"""MIL results that stay right (issue 12): a resume never reuses folds of other
inputs, `--clinical` keeps ids as text (CSV and TSV), and features from an
adapter that saw a held-out patient stop a LODO run."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.mil.data import make_synthetic_bags

FAST = dict(epochs=2, lr=1e-3, batch_size=16, max_tiles_per_slide=8)


def _workdir(root, ids=None, seed=4, n=36):
    from raypath.embed.store import write_bag_table

    bags, clin = make_synthetic_bags(n_slides=n, n_cohorts=3, dim=6, tiles=(4, 8), seed=seed)
    if ids is not None:
        ren = dict(zip(clin["slide_id"], ids))
        bags = {ren[k]: v for k, v in bags.items()}
        clin["slide_id"] = clin["slide_id"].map(ren)
    fdir = os.path.join(root, "features", "synth")
    for sid, x in bags.items():
        write_bag_table(fdir, sid, np.arange(len(x)), np.zeros((len(x), 2)), x)
    clin.drop(columns=["risk_true"]).to_parquet(os.path.join(root, "slides.parquet"))
    return fdir, clin


@pytest.mark.parametrize("sep,suffix", [(",", "csv"), ("\t", "tsv")])
def test_clinical_table_keeps_ids_that_look_like_numbers(tmp_path, sep, suffix):
    """`--clinical` CSV read `007` as 7, so those slides dropped as 'no features'; `.tsv` was not read."""
    from raypath.mil.api import MilConfig, load_clinical, run_mil

    ids = [f"{i:03d}" for i in range(36)]  # 000 .. 035
    _, clin = _workdir(str(tmp_path), ids=ids)
    path = tmp_path / f"clinical.{suffix}"
    clin.drop(columns=["status"]).to_csv(path, sep=sep, index=False)
    cfg = MilConfig(workdir=str(tmp_path), features="synth", clinical=str(path), protocol="lodo",
                    cohorts=["site0"], run=f"clin-{suffix}", **FAST)
    assert load_clinical(cfg, ids)["slide_id"].tolist() == clin["slide_id"].tolist()  # no slide dropped
    if suffix == "tsv":
        return  # the same rows: one MIL run is enough
    res = run_mil(cfg)
    ext = res.predictions[res.predictions["split"] == "external"]
    assert sorted(ext["slide_id"]) == sorted(clin.slide_id[clin.cohort == "site0"])


def test_changed_inputs_never_resume_stale_folds(tmp_path, caplog):
    """Finished folds are stored by row position: after slides.parquet changes
    order, a re-run must equal a fresh run on the new table, not re-attach old
    predictions to other slides."""
    from raypath.mil.api import MilConfig, run_mil

    _, clin = _workdir(str(tmp_path))
    cfg = MilConfig(workdir=str(tmp_path), features="synth", protocol="lodo", cohorts=["site1"], **FAST)
    first = run_mil(cfg)
    run_dir = tmp_path / "runs" / cfg.run_name()
    fp1 = json.loads((run_dir / "inputs.json").read_text())["fingerprint"]
    clin.iloc[::-1].drop(columns=["risk_true"]).to_parquet(tmp_path / "slides.parquet")  # same rows, new order
    with caplog.at_level("WARNING"):
        again = run_mil(cfg)
    assert "clinical changed since the last run: starting fresh" in caplog.text
    fresh = run_mil(cfg.model_copy(update={"run": "fresh"}))
    key = ["slide_id", "split", "repeat"]
    a = again.predictions.sort_values(key).reset_index(drop=True)
    b = fresh.predictions.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["time", "risk"]], b[key + ["time", "risk"]])
    # each slide's prediction row carries its own outcome (no stale row positions)
    truth = clin.set_index("slide_id")["time"]
    assert np.allclose(again.predictions["time"], truth.loc[again.predictions["slide_id"]].to_numpy())
    fp2 = json.loads((run_dir / "inputs.json").read_text())["fingerprint"]
    assert fp2 != fp1 and {p.name for p in (run_dir / "checkpoints").iterdir()} == {fp1, fp2}
    assert first.summary["inputs"]["fingerprint"] == fp1


def test_fingerprint_covers_features_and_clinical_not_workers(tmp_path):
    from raypath.embed.store import FeatureStore, write_bag_table
    from raypath.mil.api import MilConfig, run_fingerprint

    fdir, clin = _workdir(str(tmp_path))
    cfg = MilConfig(workdir=str(tmp_path), features="synth", **FAST)
    store = FeatureStore(fdir)
    fp, parts = run_fingerprint(cfg, store, clin)
    assert run_fingerprint(cfg.model_copy(update={"num_workers": 2, "run": "x"}), store, clin)[0] == fp
    assert run_fingerprint(cfg, store, clin.assign(time=clin["time"] + 1))[0] != fp
    assert run_fingerprint(cfg, store, clin.iloc[::-1])[0] != fp
    x = np.ones((5, 6), np.float32)
    os.utime(write_bag_table(fdir, "s0003", np.arange(5), np.zeros((5, 2)), x), ns=(1, 1))  # new features
    fp3, parts3 = run_fingerprint(cfg, store, clin)
    assert fp3 != fp and parts3["features"] != parts["features"] and parts3["clinical"] == parts["clinical"]
    # with a manifest, the per-slide cache keys are the identity
    (tmp_path / "features" / "synth" / "manifest.json").write_text(json.dumps(
        {"model_key": "synth", "slides": {s: {"cache_key": f"k-{s}"} for s in clin["slide_id"]}}))
    fp4 = run_fingerprint(cfg, store, clin)[0]
    (tmp_path / "features" / "synth" / "manifest.json").write_text(json.dumps(
        {"model_key": "synth", "slides": {s: {"cache_key": f"k-{s}" + ("x" if s == "s0007" else "")}
                                          for s in clin["slide_id"]}}))
    assert run_fingerprint(cfg, store, clin)[0] != fp4


def _adapter(tmp_path, name, slide_ids, record=True):
    d = tmp_path / "adapters" / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    if record:
        (d / "tuned_on.json").write_text(json.dumps({"slide_ids": slide_ids, "cohorts": [], "patient_ids": []}))
    return d


def _manifest(fdir, adapter):
    with open(os.path.join(fdir, "manifest.json"), "w") as f:
        json.dump({"model_key": "synth", "adapter": str(adapter), "slides": {}}, f)


def test_lodo_on_features_of_an_adapter_that_saw_a_held_out_slide_stops(tmp_path, capsys):
    from raypath.cli import main
    from raypath.mil.api import MilConfig, run_mil

    fdir, clin = _workdir(str(tmp_path))
    site0 = sorted(clin.slide_id[clin.cohort == "site0"])
    others = sorted(clin.slide_id[clin.cohort != "site0"])
    _manifest(fdir, _adapter(tmp_path, "all", site0[:2] + others))
    cfg = MilConfig(workdir=str(tmp_path), features="synth", protocol="lodo", **FAST)
    with pytest.raises(RaypathError, match=r"tuned on 2 slide\(s\) of patients held out in 'site0'"):
        run_mil(cfg)
    rc = main(["mil", "--workdir", str(tmp_path), "--features", "synth", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "adapt-experiment" in err and "Traceback" not in err
    # holding out only cohorts the adapter never saw is fine
    _manifest(fdir, _adapter(tmp_path, "fold0", others))
    res = run_mil(cfg.model_copy(update={"cohorts": ["site0"], "run": "ok"}))
    assert res.summary["inputs"]["adapter"]["status"] == "checked"
    with pytest.raises(RaypathError, match="held out in 'site1'"):
        run_mil(cfg.model_copy(update={"cohorts": ["site1"], "run": "bad"}))


def test_an_adapter_that_saw_a_held_out_patients_twin_stops_too(tmp_path):
    """A technical twin (same patient, other cohort) in the adapter's tuning set
    leaks the held-out tissue, although no held-out slide itself was seen."""
    from raypath.mil.api import MilConfig, run_mil

    fdir, clin = _workdir(str(tmp_path))
    clin = clin.copy()
    twin, held = clin.index[clin.cohort == "site1"][0], clin.index[clin.cohort == "site0"][0]
    clin.loc[twin, "patient_id"] = clin.loc[held, "patient_id"]
    clin.drop(columns=["risk_true"]).to_parquet(tmp_path / "slides.parquet")
    seen = [clin.loc[twin, "slide_id"]]
    _manifest(fdir, _adapter(tmp_path, "twin", seen))
    cfg = MilConfig(workdir=str(tmp_path), features="synth", protocol="lodo", cohorts=["site0"], **FAST)
    with pytest.raises(RaypathError, match=f"held out in 'site0' .*{seen[0]}"):
        run_mil(cfg)
    # an adapter without a record cannot be verified: the run says so
    _manifest(fdir, _adapter(tmp_path, "norecord", [], record=False))
    res = run_mil(cfg.model_copy(update={"run": "unverified"}))
    assert res.summary["inputs"]["adapter"]["status"].startswith("unverified")
