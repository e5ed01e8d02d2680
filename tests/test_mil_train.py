"""Training and protocols end to end: planted signal vs noise, resume,
bad clinical input, run_mil outputs and the CLI, Ray Train with 2 workers."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.mil.data import make_synthetic_bags
from raypath.mil.protocols import evaluate_lodo, run_protocol
from raypath.evaluation.splits import make_splits
from raypath.mil.train import LocalContext, TrainParams, run_splits

FAST = dict(epochs=6, lr=1e-3, batch_size=32, max_tiles_per_slide=16, eval_every=3)


@pytest.fixture(scope="module")
def planted():
    return make_synthetic_bags(n_slides=180, n_cohorts=3, dim=12, tiles=(10, 30), signal=1.0, seed=11)


@pytest.fixture(scope="module")
def noise():
    return make_synthetic_bags(n_slides=240, n_cohorts=3, dim=12, tiles=(10, 30), signal=0.0, seed=12)


def test_planted_risk_is_learned_internal_cv(planted):
    bags, clin = planted
    out = run_protocol(bags, clin, TrainParams(**FAST), "internal", folds=3, repeats=1, seed=0)
    assert out.summary["internal"]["mean"] > 0.7
    p = out.predictions
    assert len(p) == len(clin)  # every slide predicted once per repeat
    assert set(p["split"]) == {"internal"}


def test_noise_features_give_chance_c_index(noise):
    bags, clin = noise
    out = run_protocol(bags, clin, TrainParams(**FAST), "internal", folds=4, repeats=1, seed=0)
    # pooled over 240 held-out slides, the sd of C under the null is ~0.03
    assert abs(out.summary["internal"]["mean"] - 0.5) < 0.12


def test_lodo_external_scores_and_evaluate_lodo(planted):
    from raypath.mil.api import MilConfig

    bags, clin = planted
    cfg = MilConfig(protocol="lodo", **FAST, repeats=1)
    res = evaluate_lodo(bags, clin, cfg)
    assert set(res["per_cohort"]) == set(clin["cohort"])
    assert res["worst"] <= res["mean"] <= max(res["per_cohort"].values())
    assert res["mean"] > 0.7
    assert set(res["internal"]) == set(clin["cohort"])


@pytest.mark.parametrize("loss,model", [("nll", "abmil"), ("cox", "clam")])
def test_other_losses_and_heads_learn(planted, loss, model):
    bags, clin = planted
    params = TrainParams(**{**FAST, "epochs": 8}, loss=loss, model=model)
    out = run_protocol(bags, clin, params, "lodo", repeats=1, cohorts=["site0"])
    assert out.summary["per_cohort"]["site0"] > 0.65


def test_classification_pairwise(planted):
    bags, clin = planted
    params = TrainParams(**FAST, task="classification", loss="ce")
    out = run_protocol(bags, clin, params, "pairwise", repeats=1, cohorts=["site1"])
    m = out.summary["matrix"]["site1"]
    assert m["site0"] > 0.75 and m["site2"] > 0.75
    fm = out.fold_metrics
    assert {"auroc", "balanced_accuracy", "f1"} <= set(fm.columns)
    p = out.predictions
    assert set(p["pred_label"]) <= set(clin["label"])
    assert np.allclose(p[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-5)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(planted, tmp_path):
    bags, clin = planted
    params = TrainParams(**{**FAST, "epochs": 4})
    df = clin.reset_index(drop=True)
    splits = make_splits(df, "lodo", "event", repeats=1, cohorts=["site0", "site1"])
    full = run_splits(LocalContext(), bags, df, splits, params)
    ckpt = str(tmp_path / "ckpt")
    # crash in the middle of the second split (after 4 + 2 epochs)
    with pytest.raises(InterruptedError):
        run_splits(LocalContext(ckpt, stop_after_reports=6), bags, df, splits, params)
    ctx = LocalContext(ckpt)
    resumed = run_splits(ctx, bags, df, splits, params)
    assert len(ctx.reports) == 2  # only the last two epochs of split 2 were trained
    for k in full:
        np.testing.assert_allclose(np.asarray(full[k]["scores"]), np.asarray(resumed[k]["scores"]), rtol=1e-5, atol=1e-6)
        assert len(resumed[k]["curves"]) == len(full[k]["curves"])


# ----------------------------------------------------------------- bad input


def _small():
    return make_synthetic_bags(n_slides=60, n_cohorts=3, dim=4, tiles=(3, 6), seed=1)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.assign(time=d["time"].where(d.index != 3, -1.0)), "negative survival time for slide.*s0003"),
        (lambda d: d.assign(time=d["time"].where(d.index != 5, np.nan)), "missing or non-numeric survival time.*s0005"),
        (lambda d: d.assign(event=d["event"].where(d.index != 2, 2)), "event must be 0.*s0002"),
        (lambda d: d.assign(event=np.where(d["cohort"] == "site1", 0, d["event"])), "test cohort 'site1' has no events"),
        (lambda d: d.assign(event=0), "no events"),
        (lambda d: d.drop(columns=["time"]), "lacks column"),
        (lambda d: pd.concat([d, d.iloc[:1]]), "duplicate slide_id"),
        (lambda d: d.assign(cohort="one"), "at least 2 cohorts"),
    ],
)
def test_bad_survival_input_is_named(mutate, match):
    bags, clin = _small()
    with pytest.raises(RaypathError, match=match):
        run_protocol(bags, mutate(clin), TrainParams(epochs=1), "lodo")


def test_single_class_label_is_an_error():
    bags, clin = _small()
    with pytest.raises(RaypathError, match="single class"):
        run_protocol(bags, clin.assign(label=1), TrainParams(epochs=1, task="classification", loss="ce"), "internal")


def test_wrong_loss_for_task_is_an_error():
    bags, clin = _small()
    with pytest.raises(RaypathError, match="does not fit task"):
        run_protocol(bags, clin, TrainParams(epochs=1, task="survival", loss="ce"), "internal", folds=2)


# ----------------------------------------------------------------- workdir API and CLI


def _write_workdir(root, bags, clin):
    from raypath.embed.store import write_bag_table

    fdir = os.path.join(root, "features", "synth")
    for sid, x in bags.items():
        if sid == "s0001":
            continue  # a slide without features is skipped
        write_bag_table(fdir, sid, np.arange(len(x)), np.zeros((len(x), 2)), x)
    clin = clin.copy()
    clin.loc[clin["slide_id"] == "s0002", "status"] = "failed"
    clin.loc[clin["slide_id"] == "s0002", "time"] = -5.0  # ignored: not ok
    clin.to_parquet(os.path.join(root, "slides.parquet"))
    return fdir


def test_run_mil_writes_outputs_and_cli(tmp_path, capsys):
    from raypath.cli import main
    from raypath.mil.api import MilConfig, run_mil

    bags, clin = make_synthetic_bags(n_slides=60, n_cohorts=3, dim=8, seed=4)
    _write_workdir(str(tmp_path), bags, clin)
    cfg = MilConfig(workdir=str(tmp_path), features="synth", protocol="lodo", epochs=3, lr=1e-3, batch_size=16, max_tiles_per_slide=16, repeats=2)
    res = run_mil(cfg)
    run_dir = tmp_path / "runs" / "mil-survival-lodo"
    assert res.run_dir == str(run_dir)
    for f in ("config.yaml", "metrics.json", "predictions.parquet", "curves.parquet", "curves.png", "km.png"):
        assert (run_dir / f).stat().st_size > 0, f
    pred = pd.read_parquet(run_dir / "predictions.parquet")
    assert {"slide_id", "patient_id", "cohort", "fold", "repeat", "split", "risk", "time", "event"} <= set(pred.columns)
    assert not {"s0001", "s0002"} & set(pred["slide_id"])
    ext = pred[pred["split"] == "external"]
    assert (ext["cohort"] == ext["name"]).all()
    assert ext.groupby("repeat").size().tolist() == [58, 58]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    s = metrics["summary"]
    assert set(s["external"]) == {"site0", "site1", "site2"}
    assert s["external"]["site0"]["n"] == 2 and s["external"]["site0"]["sd"] is not None
    curves = pd.read_parquet(run_dir / "curves.parquet")
    assert set(curves["epoch"]) == {0, 1, 2} and {"internal", "external", "train"} <= set(curves["set"])

    rc = main(["mil", "--workdir", str(tmp_path), "--features", "synth", "--protocol", "internal",
               "--folds", "3", "--epochs", "2", "--max-tiles-per-slide", "8", "--run", "cli"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "internal" in out and (tmp_path / "runs" / "cli" / "metrics.json").exists()
    rc = main(["mil", "--workdir", str(tmp_path), "--features", "nope", "--epochs", "1"])
    assert rc == 2
    assert "no feature stores for 'nope'" in capsys.readouterr().err
    assert main(["mil", "--features", "synth"]) == 2
    assert "needs --workdir" in capsys.readouterr().err


# ----------------------------------------------------------------- Ray Train


@pytest.mark.slow  # ~60 s idle: Ray start + 2 torch workers, twice
def test_ray_train_two_workers_ddp_matches_in_process_shape(ray_session, planted, tmp_path):
    bags, clin = planted
    params = TrainParams(**{**FAST, "epochs": 3})
    out = run_protocol(
        bags, clin, params, "lodo", repeats=1, cohorts=["site2"], num_workers=2,
        ray_storage_path=str(tmp_path / "ray"), ray_name="t",
    )
    assert out.summary["per_cohort"]["site2"] > 0.65
    assert len(out.curves[out.curves["set"] == "train"]) == 3
    # checkpoints were written by Ray Train in the run folder (resume point)
    assert any(p.startswith("checkpoint_") for p in os.listdir(tmp_path / "ray" / "t"))
    # re-running the same (storage_path, name) resumes: the finished fold is
    # taken from the checkpoint, not retrained
    again = run_protocol(
        bags, clin, params, "lodo", repeats=1, cohorts=["site2"], num_workers=2,
        ray_storage_path=str(tmp_path / "ray"), ray_name="t",
    )
    pd.testing.assert_frame_equal(again.predictions, out.predictions)
