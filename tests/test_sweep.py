"""raypath sweep: nested-LODO plan (no Ray), one fold with real stage code, and a
small Ray Tune + Optuna MIL sweep with a failing trial, an interruption and a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from raypath.errors import RaypathError
from raypath.embed.store import write_bag_table
from raypath.mil.data import make_synthetic_bags
from raypath.evaluation.splits import LeakageError, make_splits
from raypath.io.storage import write_parquet_atomic
from raypath.sweep.nested import FITTING_STEPS, audit_plan, check_step, nested_lodo_plan, steps_seen
from raypath.sweep.space import parse_space, stage_settings

MODEL_KEY = "tiny-vit"


def make_workdir(wd: Path, n_slides: int = 36, seed: int = 0, tiles: bool = False) -> pd.DataFrame:
    """Synthetic features (3 cohorts) + slides.parquet (+ a tiles.parquet for the adapt stage)."""
    bags, clin = make_synthetic_bags(n_slides=n_slides, n_cohorts=3, dim=8, tiles=(8, 16), seed=seed, signal=1.5)
    fd = wd / "features" / MODEL_KEY
    for sid, x in bags.items():
        n = len(x)
        write_bag_table(str(fd), sid, np.arange(n), np.stack([np.arange(n) * 32, np.zeros(n)], 1), x)
    clin = clin.drop(columns=["risk_true"])
    clin["uri"] = [f"{s}.svs" for s in clin["slide_id"]]
    write_parquet_atomic(pa.Table.from_pandas(clin, preserve_index=False), str(wd / "slides.parquet"))
    if tiles:
        rows = [dict(slide_id=s, tile_id=i, x=32 * i, y=0, level=0, read_px=32, tile_px=32, target_mpp=0.5,
                     tissue_fraction=1.0) for s in clin["slide_id"] for i in range(4)]
        write_parquet_atomic(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), str(wd / "tiles.parquet"))
    return clin


def shared_patient_table() -> pd.DataFrame:
    """3 cohorts; patient pX has one slide in cohort A and one in cohort B."""
    rows = []
    for c in "ABC":
        for i in range(8):
            rows.append(dict(slide_id=f"{c}{i}", patient_id=f"{c}p{i}", cohort=c, time=10.0 + i, event=i % 2,
                             status="ok"))
    rows.append(dict(slide_id="A-x", patient_id="pX", cohort="A", time=5.0, event=1, status="ok"))
    rows.append(dict(slide_id="B-x", patient_id="pX", cohort="B", time=5.0, event=1, status="ok"))
    rows.append(dict(slide_id="C-bad", patient_id="Cp-bad", cohort="C", time=1.0, event=1, status="failed"))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- nested LODO (no Ray)


def test_held_out_cohort_never_reaches_adaptation_or_selection():
    clin = shared_patient_table()
    plans = nested_lodo_plan(clin, task="survival", internal_fraction=0.25, seed=3, adapt=True)
    assert [p.held_out for p in plans] == ["A", "B", "C"]
    cohort_of = dict(zip(clin.slide_id, clin.cohort))
    patient_of = dict(zip(clin.slide_id, clin.patient_id))
    ok = clin[clin.status == "ok"]
    for p in plans:
        held = set(ok.slide_id[ok.cohort == p.held_out])
        held_patients = {patient_of[s] for s in held}
        assert set(p.test) == held  # the held-out cohort is scored ...
        assert held <= set(p.embed)  # ... embedded with the fold's adapter (inference) ...
        for step in FITTING_STEPS:  # ... and nothing that fits or selects sees it
            seen = getattr(p, step)
            assert seen, step
            assert {cohort_of[s] for s in seen} <= set(p.train_cohorts)
            assert not {patient_of[s] for s in seen} & held_patients, (p.held_out, step)
        assert p.held_out not in p.train_cohorts
        assert "C-bad" not in p.embed + p.test  # failed slides are nobody's input
    # pX is held out with A: its slide in B must not reach adaptation or training for that fold
    fold_a = plans[0]
    assert "B-x" not in fold_a.adapt and "B-x" not in fold_a.train and "B-x" not in fold_a.robustness
    # the plan's train/selection sets are exactly what the MIL stage's splitter produces
    df = clin[clin.status == "ok"].reset_index(drop=True)
    for sp in make_splits(df, "lodo", "event", seed=3, internal_fraction=0.25):
        p = next(q for q in plans if q.held_out == sp.name)
        assert sorted(df.slide_id.iloc[sp.train]) == p.train
        assert sorted(df.slide_id.iloc[sp.internal]) == p.selection
    seen = steps_seen(plans, clin)
    assert set(seen.step) == {"adapt", "embed", "train", "selection", "robustness", "test"}
    row = seen[(seen.held_out == "C") & (seen.step == "adapt")].iloc[0]
    assert row.cohorts == ["A", "B"] and row.fits_or_selects


def test_audit_rejects_a_plan_that_leaks():
    clin = shared_patient_table()
    plans = nested_lodo_plan(clin, internal_fraction=0.25, adapt=True)
    plans[1].adapt = sorted(plans[1].adapt + [plans[1].test[0]])
    with pytest.raises(LeakageError, match="step 'adapt'"):
        audit_plan(plans, clin)
    plans = nested_lodo_plan(clin, internal_fraction=0.25, adapt=True)
    plans[0].selection = sorted(plans[0].selection + ["B-x"])  # patient pX is held out with A
    with pytest.raises(LeakageError, match="patient"):
        audit_plan(plans, clin)
    with pytest.raises(LeakageError, match="outside its plan"):
        check_step(plans[2], "train", plans[2].train + plans[2].test[:1])


def test_space_validation_and_settings():
    doc = yaml.safe_load((Path(__file__).parents[1] / "sweeps/examples/adapter_lodo.yaml").read_text())
    space = parse_space(doc)
    params = {"adapt.rank": 4, "adapt.alpha_over_rank": 2.0, "adapt.target_modules": "qkv+proj", "mil.lr": 1e-3}
    s = stage_settings(space, params, "/wd")
    assert s["adapt"]["alpha"] == 8.0 and s["adapt"]["target_modules"] == ["qkv", "proj"]
    assert s["mil"]["lr"] == 1e-3 and s["mil"]["workdir"] == "/wd" and s["embed"]["num_actors"] == 1
    parse_space(yaml.safe_load((Path(__file__).parents[1] / "sweeps/examples/mil_small.yaml").read_text()))
    for bad, msg in [
        ({"space": {"mil.seed": {"type": "int", "low": 0, "high": 3}}}, "cannot be searched"),
        ({"space": {"adapt.rank": {"type": "int", "low": 2, "high": 4}}}, "kind: mil"),
        ({"space": {"mil.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "low"),
        ({"space": {"mil.lr": {"type": "float", "low": 0.1, "high": 1}}, "objectives": [{"metric": "auc"}]},
         "unknown objective"),
    ]:
        with pytest.raises(RaypathError, match=msg):
            parse_space({"kind": "mil", "features": "x", **bad})


def test_trial_resources_follow_the_cluster():
    from raypath.sweep.api import trial_resources

    mil = parse_space({"kind": "mil", "features": "x", "space": {"mil.lr": {"type": "float", "low": 0.1, "high": 1}}})
    assert trial_resources(mil, {"CPU": 2.0}, 8) == ({"cpu": 1.0}, 2, 1)
    req, n, _ = trial_resources(mil, {"CPU": 16.0, "GPU": 2.0}, 100)
    assert req == {"cpu": 1.0, "gpu": 0.25} and n == 8
    assert trial_resources(mil, {"CPU": 16.0}, 3)[1] == 3  # never more than the samples
    ad = parse_space({"kind": "adapter", "fixed": {"adapt": {"num_workers": 2}},
                      "space": {"adapt.rank": {"type": "int", "low": 2, "high": 8}}})
    req, n, _ = trial_resources(ad, {"CPU": 32.0, "GPU": 4.0}, 10)
    assert req == {"cpu": 0.25} and n == 1  # a TorchTrainer on 2 GPUs + an embedding actor on 1
    ex = parse_space(yaml.safe_load((Path(__file__).parents[1] / "sweeps/examples/adapter_lodo.yaml").read_text()))
    assert trial_resources(ex, {"CPU": 2.0}, 4)[:2] == ({"cpu": 0.5}, 1)  # 0.5 + actor 0.5 + reader 1
    with pytest.raises(RaypathError, match="num_actors"):
        trial_resources(ad, {"CPU": 2.0}, 4)
    with pytest.raises(RaypathError, match="no GPUs"):
        trial_resources(mil, {"CPU": 4.0}, 4, gpus_per_trial=1)


def _fold_ctx(tmp_path, clin):
    from raypath.sweep.objective import TrialContext

    space = parse_space({
        "kind": "adapter",
        "fixed": {"adapt": {"model": "tiny-vit", "weights": "random", "tiles_per_slide": 2},
                  "mil": {"internal_fraction": 0.25, "epochs": 1, "batch_size": 8, "max_tiles_per_slide": 8}},
        "robustness": {"enabled": False},
        "space": {"adapt.rank": {"type": "int", "low": 2, "high": 4}},
    })
    plans = nested_lodo_plan(clin, internal_fraction=0.25, adapt=True)
    ctx = TrialContext(space=space, workdir=str(tmp_path), sweep_dir=str(tmp_path / "sweeps" / "s"), name="s",
                       plans=plans, clinical=clin)
    return space, plans, ctx


def test_fold_adapts_and_selects_on_training_cohorts_only(tmp_path):
    """One adapter fold through the real adapt tile selection and the real MIL
    stage (embedding stubbed by the fixed features): what each step used is
    recorded and matches the plan."""
    from raypath.adapt.api import sample_training_tiles
    from raypath.adapt.tuning import select_tuning_tiles
    from raypath.sweep.objective import Stages, adapt_config_for_fold, run_fold

    clin = make_workdir(tmp_path, n_slides=60, tiles=True)  # >= 10 comparable pairs in the selection set
    space, plans, ctx = _fold_ctx(tmp_path, clin)
    seen: dict[str, list] = {}

    def adapt(settings, plan, run):  # the stage's own config and tile selection; training skipped
        cfg = adapt_config_for_fold(settings, plan, run)
        tiles = select_tuning_tiles(cfg, sample_training_tiles)
        seen["adapt"] = sorted(set(tiles.slide_id))
        return run

    def embed(settings, plan, adapter_dir, feature_dir):
        seen["embed"] = list(plan.embed)
        return str(tmp_path / "features" / MODEL_KEY)

    stages = Stages(adapt=adapt, adapt_used_slides=lambda d: seen["adapt"], embed=embed)
    settings = stage_settings(space, {"adapt.rank": 2}, str(tmp_path))
    plan = plans[1]
    res = run_fold(plan, settings, ctx, "t0", stages)
    held = set(clin.slide_id[clin.cohort == plan.held_out])
    assert seen["adapt"] and not set(seen["adapt"]) & held
    assert held <= set(seen["embed"])
    assert 0.0 <= res["external"] <= 1.0 and 0.0 <= res["internal"] <= 1.0

    # an adapter that (wrongly) read a held-out slide fails the fold
    stages.adapt_used_slides = lambda d: seen["adapt"] + [sorted(held)[0]]
    with pytest.raises(LeakageError):
        run_fold(plan, settings, ctx, "t1", stages)


def test_inner_selection_uses_the_training_cohorts_only():
    """best_internal_epoch picks the epoch on the selection set; the held-out
    score is read at that epoch, never maximised."""
    from types import SimpleNamespace

    from raypath.sweep.objective import select_fold_score

    rows = []
    internal = {0: 0.55, 1: 0.70, 2: 0.60}
    external = {0: 0.90, 1: 0.52, 2: 0.95}  # the held-out optimum is elsewhere on purpose
    for e in range(3):
        rows.append(dict(name="C", repeat=0, epoch=e, set="internal", cohort="all", metric="c_index", value=internal[e]))
        rows.append(dict(name="C", repeat=0, epoch=e, set="external", cohort="C", metric="c_index", value=external[e]))
    out = SimpleNamespace(curves=pd.DataFrame(rows),
                          summary={"metric": "c_index", "per_cohort": {"C": 0.95}, "internal": {"C": {"mean": 0.6}}})
    best = select_fold_score(out, "C", "best_internal_epoch")
    assert best == {"external": 0.52, "internal": 0.70, "epoch": [1]}
    assert select_fold_score(out, "C", "last_epoch") == {"external": 0.95, "internal": 0.6, "epoch": None}


# --------------------------------------------------------------------------- Ray Tune


SMALL_SPACE = {
    "kind": "mil",  # features: the only store under <workdir>/features
    "objectives": [{"metric": "mean_external", "mode": "max"}, {"metric": "worst_external", "mode": "max"}],
    "scheduler": {"type": "none"},
    "fixed": {"mil": {"task": "survival", "internal_fraction": 0.25, "seed": 0, "batch_size": 8,
                      "max_tiles_per_slide": 16}},
    "space": {
        "mil.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "mil.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "mil.epochs": {"type": "int", "low": 1, "high": 2},
        "mil.model": {"type": "categorical", "choices": ["abmil", "clam"]},
    },
    # the first trial has an invalid epoch count: it must fail alone
    "points_to_evaluate": [{"mil.lr": 1e-3, "mil.weight_decay": 1e-4, "mil.epochs": -1, "mil.model": "abmil"}],
}


def _finished_folds(sweep_dir: Path, n_folds: int) -> dict[str, list[float]]:
    """config key -> computed_at of each fold, for configs whose every fold is recorded."""
    out = {}
    for f in sweep_dir.glob("trials/*/folds.json"):
        try:
            doc = json.loads(f.read_text())
        except ValueError:
            continue
        if len(doc["folds"]) == n_folds:
            out[doc["config_key"]] = [fold["computed_at"] for fold in doc["folds"]]
    return out


#: The sweep driver, killed by itself with SIGKILL the moment Tune registers its
#: 2nd complete trial: the kill lands at the same point on every run (polling the
#: folders from outside let a 3rd trial finish before the kill on a fast machine).
KILL_AFTER_TWO = r"""
import os, signal, sys
from ray import tune
from raypath.sweep.api import SweepConfig, run_sweep

class KillAfter(tune.Callback):
    def __init__(self, n):
        self.n, self.done, self.pid = n, 0, os.getpid()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        # Tuner.restore brings its callbacks back in the resuming process: only this driver dies
        if self.done >= self.n and os.getpid() == self.pid:
            os.kill(self.pid, signal.SIGKILL)  # no chance to save anything

cfg = SweepConfig(workdir=sys.argv[1], space=sys.argv[2], name="small", num_samples=4, max_concurrent_trials=1)
run_sweep(cfg, callbacks=[KillAfter(2)])
"""


@pytest.mark.filterwarnings("ignore:Fixed parameter")  # the deliberately invalid first point
def test_mil_sweep_kill_resume_and_best_config(ray_session, tmp_path):
    """The sweep driver is killed with SIGKILL right after its 2nd finished trial;
    --resume finishes the sweep without recomputing them; the failing trial is
    recorded; the exported best config reproduces the best score through `raypath mil`."""
    import subprocess
    import sys

    from raypath.mil.api import MilConfig, run_mil
    from raypath.sweep.api import SweepConfig, run_sweep

    make_workdir(tmp_path, n_slides=24)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(SMALL_SPACE))
    d = tmp_path / "sweeps" / "small"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO, str(tmp_path), str(space_file)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == -9, "the sweep driver ended before it was killed"
    finished = _finished_folds(d, 3)
    assert len(finished) == 2

    cfg = SweepConfig(workdir=str(tmp_path), space=str(space_file), name="small", num_samples=4)
    with pytest.raises(RaypathError, match="--resume"):
        run_sweep(cfg)
    res = run_sweep(cfg.model_copy(update={"resume": True}))
    t = res.trials
    assert t.trial_id.is_unique
    failed = t[t.status == "error"]
    assert len(failed) == 1 and "epochs" in failed.error.iloc[0]
    # the trials finished before the kill are in the table, complete, and none of their folds was recomputed
    assert len(t) in (4, 5)  # 5 if a finished trial was unknown to the restored state and not re-suggested
    assert (t.status == "complete").sum() == len(t) - 1
    assert set(t.folds_done[t.status == "complete"]) == {3}
    after = _finished_folds(d, 3)
    assert set(finished) <= set(after)
    for key, stamps in finished.items():
        assert after[key] == stamps
    assert len(after) == (t.status == "complete").sum()

    for f in ("trials.parquet", "trials.csv", "best_config.yaml", "sweep.json", "config.yaml", "space.yaml",
              "objective_per_trial.png", "param_importances.png", "pareto_front.png", "nested_lodo.parquet",
              "optuna.db"):
        assert (d / f).exists(), f
    table = pd.read_parquet(d / "trials.parquet")
    assert len(table) == len(t) and table.pareto.any()
    summary = json.loads((d / "sweep.json").read_text())
    assert summary["n_failed"] == 1 and summary["held_out_cohorts"] == ["site0", "site1", "site2"]
    best = yaml.safe_load((d / "best_config.yaml").read_text())
    assert best["trial_id"] in set(t.trial_id[t.pareto])
    assert best["commands"] == [f"raypath mil --config {d / 'best' / 'mil.yaml'}"]

    # the exported config reproduces the best trial's score through `raypath mil`
    mil_cfg = MilConfig.load(d / "best" / "mil.yaml")
    out = run_mil(mil_cfg)
    assert out.summary["mean"] == pytest.approx(best["objectives"]["mean_external"], abs=0.02)
    assert out.summary["worst"] == pytest.approx(best["objectives"]["worst_external"], abs=0.02)


def test_exit_code_counts_failures_by_cause_and_needs_a_complete_trial(capsys):
    from raypath.sweep.cli import exit_code

    t = pd.DataFrame({"trial_id": ["a", "b"], "status": ["error", "error"],
                      "error": ["ValidationError: epochs >= 0", "RuntimeError: CUDA out of memory"]})
    assert exit_code(t) == 1
    err = capsys.readouterr().err
    assert "first failure (trial a): ValidationError: epochs >= 0" in err and "RuntimeError x1" in err
    assert exit_code(t.assign(status=["error", "complete"])) == 0
    assert exit_code(pd.DataFrame(columns=["trial_id", "status", "error"])) == 1


@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_sweep_with_no_complete_trial_exits_non_zero_with_the_reason(ray_session, tmp_path, capsys):
    from raypath.cli import main

    make_workdir(tmp_path, n_slides=24)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(SMALL_SPACE))  # its first point has an invalid epoch count
    rc = main(["sweep", "--workdir", str(tmp_path), "--space", str(space_file), "--name", "bad", "--num-samples", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "no trial completed; first failure" in err and "epochs" in err
