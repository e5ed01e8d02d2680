"""A patch sweep selects on validation patients only: its objectives do not move when only the
test patients' labels change (the test scores, reported alongside, do), and a test-set score
cannot be named as a patch sweep's objective."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.patch.api import run_patch
from raypath.patch.sweep import trial_objectives, trial_patch_config
from test_patch_reuse import write_patch_table


def test_the_objective_ignores_test_labels_and_the_test_scores_do_not(tmp_path):
    table = write_patch_table(tmp_path, per_class=8, domains=("siteA", "siteB"))
    fixed = dict(patches=table, model="tiny-vit", patch_px=16, shift_px=2, mpp=0.5, seeds=[42], n_boot=0,
                 device="cpu")
    cfg = trial_patch_config(fixed, {"patch.method": "linear", "patch.fraction": 1.0}, str(tmp_path / "w"), "t")
    assert cfg.protocols == ["lodo"]
    run_patch(cfg)
    before = trial_objectives(cfg)
    t = pd.read_csv(table)
    test = np.flatnonzero(t["split"] == "test")
    t.loc[test[::2], "label"] = np.where(t.loc[test[::2], "label"] == "mitosis", "imposter", "mitosis")
    t.to_csv(table, index=False)  # only test patients' labels change
    run_patch(cfg)  # refits (the results key covers labels)
    after = trial_objectives(cfg)
    for k in ("val_mean", "val_worst", "val_siteA", "val_siteB"):
        assert np.isfinite(before[k]) and after[k] == before[k], k
    assert before["val_worst_domain"] == after["val_worst_domain"]
    changed = [k for k in ("mean_external", "external_siteA", "external_siteB") if after[k] != before[k]]
    assert changed  # the test scores saw the new labels; the objective did not
    v = pd.read_csv(f"{cfg.run_dir()}/validation.csv")
    assert set(v["val_on"]) == {"all", "siteA", "siteB"} and set(v["protocol"]) == {"lodo"}
    split = t["split"].to_numpy()
    pred = pd.read_parquet(f"{cfg.run_dir()}/predictions/lodo__all-but-siteA__linear__f1__s42.parquet")
    assert set(split[pred.loc[pred["eval"].str.startswith("val:"), "row"]]) == {"val"}
    assert set(t.loc[pred.loc[pred["eval"] == "val:all", "row"], "domain"]) == {"siteB"}  # training domain only


def test_a_patch_sweep_refuses_test_set_objectives_and_defaults_to_validation():
    from raypath.sweep.space import parse_space

    doc = {"kind": "patch", "space": {"patch.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    assert parse_space(doc).metric_names == ["val_mean"] and parse_space(doc).modes == ["max"]
    assert parse_space({**doc, "objectives": [{"metric": "val_worst"}]}).metric_names == ["val_worst"]
    for metric in ("mean_external", "worst_external", "mean_internal"):
        with pytest.raises(RaypathError, match="test-set scores.*validation"):
            parse_space({**doc, "objectives": [{"metric": metric}]})
    with pytest.raises(RaypathError, match="kind: patch"):
        parse_space({"kind": "mil", "objectives": [{"metric": "val_mean"}],
                     "space": {"mil.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})


def test_a_patch_sweep_without_validation_patients_is_refused_before_any_trial(tmp_path):
    from raypath.patch.sweep import run_patch_sweep
    from raypath.sweep.api import SweepConfig
    from raypath.sweep.space import parse_space

    table = write_patch_table(tmp_path, per_class=8)
    t = pd.read_csv(table)
    t["split"] = t["split"].replace("val", "train")
    t.to_csv(table, index=False)
    fixed = dict(patches=table, model="tiny-vit", patch_px=16, shift_px=2, mpp=0.5, seeds=[42], device="cpu")
    space = parse_space({"kind": "patch", "fixed": {"patch": fixed},
                         "space": {"patch.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    cfg = SweepConfig(workdir=str(tmp_path / "w"), space=str(tmp_path / "unused.yaml"), name="noval")
    with pytest.raises(RaypathError, match="validation patients.*val_fraction"):
        run_patch_sweep(cfg, space, str(tmp_path / "w" / "sweeps" / "noval"), searcher=None)
