"""The adapter never sees the held-out cohort (issue 12, item 2): `adapt` names
its tuning set and records it; the sweep's real adapter stage tunes on the
fold's planned slides, also on a study with technical-variant twins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypath.errors import RaypathError

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
TINY = dict(model="tiny-vit", weights="random", epochs=1, warmup_epochs=0, batch_size=8, tiles_per_slide=2,
            n_local_crops=2, device="cpu")


def twins_workdir(wd: Path, per_cohort: int = 6) -> pd.DataFrame:
    """3 cohorts of real-pixel slides (views of the CMU slide) + one tissue scanned
    twice: patient 'pt' has slide A-t in cohort A and its twin B-t in cohort B."""
    from raypath.embed.store import write_bag_table

    rows = []
    for c in "ABC":
        for i in range(per_cohort):
            rows.append(dict(slide_id=f"{c}{i}", patient_id=f"{c}p{i}", cohort=c, time=5.0 + 3 * i, event=i % 2,
                             pair_id=None))
    rows += [dict(slide_id="A-t", patient_id="pt", cohort="A", time=4.0, event=1, pair_id="t"),
             dict(slide_id="B-t", patient_id="pt", cohort="B", time=4.0, event=1, pair_id="t")]
    clin = pd.DataFrame(rows).assign(uri=str(CMU), status="ok", label=lambda d: d.event)
    pq.write_table(pa.Table.from_pandas(clin, preserve_index=False), wd / "slides.parquet")
    rng = np.random.default_rng(0)
    tiles = [dict(slide_id=s, tile_id=t, x=int(rng.integers(0, 2000)), y=int(rng.integers(0, 2800)), level=0,
                  read_px=128, tile_px=32, target_mpp=1.0, tissue_fraction=1.0) for s in clin.slide_id for t in range(4)]
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(tiles)), wd / "tiles.parquet")
    for s, t in zip(clin.slide_id, clin.time):  # fixed features for the MIL step (risk follows time)
        x = rng.normal(size=(6, 8)).astype(np.float32)
        x[:, 0] -= t / 10
        write_bag_table(str(wd / "features" / "fixed"), s, np.arange(6), np.zeros((6, 2)), x)
    return clin


def test_adapt_names_its_tuning_set_and_records_it(tmp_path):
    from raypath.adapt.api import AdaptConfig, adapt
    from raypath.adapt.tuning import read_tuned_on

    twins_workdir(tmp_path)
    with pytest.raises(RaypathError, match="--tune-cohorts"):
        adapt(AdaptConfig(workdir=str(tmp_path), run="silent", **TINY))
    assert not (tmp_path / "adapters" / "silent").exists()  # nothing written: a corrected re-run is not blocked
    res = adapt(AdaptConfig(workdir=str(tmp_path), run="two", tune_slides=["A0", "B-t"], **TINY))
    rec = read_tuned_on(res.adapter_dir)
    assert rec["slide_ids"] == ["A0", "B-t"] and rec["cohorts"] == ["A", "B"]
    assert rec["patient_ids"] == ["Ap0", "pt"] and rec["selection"] == "slides"
    assert set(pd.read_parquet(Path(res.adapter_dir) / "training_tiles.parquet").slide_id) == {"A0", "B-t"}
    on_c = read_tuned_on(adapt(AdaptConfig(workdir=str(tmp_path), run="c", tune_cohorts=["C"], **TINY)).adapter_dir)
    assert on_c["cohorts"] == ["C"] and on_c["tune_cohorts"] == ["C"] and len(on_c["slide_ids"]) == 6
    with pytest.raises(RaypathError, match="different tune_slides"):
        adapt(AdaptConfig(workdir=str(tmp_path), run="two", tune_slides=["A0"], **TINY))


def test_real_adapter_stage_tunes_on_the_fold_plan_with_twins(tmp_path):
    """The sweep's own adapter stage (no inline copy): on a study whose held-out
    tissue has a twin in a training cohort, the fold's adapter sees exactly the
    planned slides (not the twin, not the held-out cohort) and the fold record
    names them; the MIL step then runs on the fold."""
    from raypath.sweep.nested import nested_lodo_plan
    from raypath.sweep.objective import Stages, TrialContext, _adapt_stage, _adapt_used_slides, run_fold
    from raypath.sweep.space import parse_space, stage_settings

    clin = twins_workdir(tmp_path)
    space = parse_space({"kind": "adapter", "robustness": {"enabled": False},
                         "fixed": {"adapt": TINY, "mil": {"internal_fraction": 0.25, "epochs": 1, "batch_size": 8}},
                         "space": {"adapt.rank": {"type": "int", "low": 2, "high": 4}}})
    plans = nested_lodo_plan(clin, internal_fraction=0.25, adapt=True)
    plan = next(p for p in plans if p.held_out == "A")
    assert "B-t" not in plan.adapt and "B" in plan.train_cohorts  # the twin sits in a training cohort
    settings = stage_settings(space, {"adapt.rank": 2}, str(tmp_path))
    adapter = _adapt_stage(settings["adapt"], plan, "fold-A")
    used = _adapt_used_slides(adapter)
    assert used == plan.adapt
    rec = json.loads((Path(adapter) / "tuned_on.json").read_text())
    assert "pt" not in rec["patient_ids"] and not {"A"} & set(rec["cohorts"])

    ctx = TrialContext(space=space, workdir=str(tmp_path), sweep_dir=str(tmp_path / "sweeps" / "s"), name="s",
                       plans=plans, clinical=clin)
    stages = Stages(adapt=lambda s, p, run: _adapt_stage(s, p, run), adapt_used_slides=_adapt_used_slides,
                    embed=lambda s, p, a, f: str(tmp_path / "features" / "fixed"))
    res = run_fold(plan, settings, ctx, "t0", stages)
    assert res["adapter_slides"] == plan.adapt and res["adapter_cohorts"] == ["B", "C"]
    assert 0.0 <= res["external"] <= 1.0


def _fake_embed(root: Path):
    """Embedding stand-in (the real one is exercised in test_embed): writes a store
    whose manifest names the adapter, as `raypath embed --adapter` does."""
    from types import SimpleNamespace

    from raypath.embed.store import write_bag_table, write_manifest

    def embed(cfg):
        key = "fm" if cfg.adapter is None else f"fm-{Path(cfg.adapter).name}"
        fdir = str(root / "features" / key)
        src = root / "features" / "fixed"
        for f in sorted(src.glob("*.parquet")):
            t = pd.read_parquet(f)
            x = np.stack(t.embedding.to_numpy()).astype(np.float32) + (0.0 if cfg.adapter is None else 0.1)
            write_bag_table(fdir, f.stem, t.tile_id.to_numpy(), t[["x", "y"]].to_numpy(), x)
        write_manifest(fdir, {"model_key": key, "adapter": cfg.adapter, "slides": {}})
        return SimpleNamespace(feature_dir=fdir)

    return embed


def test_adapt_experiment_tunes_one_adapter_per_fold_and_scores_each_fold_with_its_own(tmp_path, monkeypatch):
    """`adapt-experiment`: no adapter sees its fold's held-out cohort (nor the
    held-out tissue's twin); the 'after' external C-index of cohort C comes from
    C's adapter; 'after' robustness is the mean over the folds' adapters with a CI."""
    import raypath.embed.api
    from raypath.adapt.experiment import ExperimentConfig, run_experiment
    from raypath.adapt.tuning import read_tuned_on

    clin = twins_workdir(tmp_path, per_cohort=5)
    clin["label"] = np.arange(len(clin)) % 2
    clin.to_parquet(tmp_path / "slides.parquet")
    monkeypatch.setattr(raypath.embed.api, "embed", _fake_embed(tmp_path))
    patient_of = dict(zip(clin.slide_id, clin.patient_id))
    base = dict(workdir=str(tmp_path), run="exp", **{k: v for k, v in TINY.items() if k != "device"},
                robustness_tiles_per_slide=4, kmeans_k=4, kmeans_repeats=1, plots=False, mil_epochs=1)
    with pytest.raises(RaypathError, match="one adapter per leave-one-dataset-out fold"):
        run_experiment(ExperimentConfig(**base, tune_cohorts=["all"]))
    doc = run_experiment(ExperimentConfig(**base))
    assert doc["per_fold_adapters"] and sorted(doc["adapters"]) == ["A", "B", "C"]
    for c, adapter in doc["adapters"].items():
        rec = read_tuned_on(adapter)
        held = set(clin.patient_id[clin.cohort == c])
        assert c not in rec["cohorts"] and not {patient_of[s] for s in rec["slide_ids"]} & held, c
    after = json.loads((tmp_path / "runs" / "exp-mil-after" / "metrics.json").read_text())["summary"]
    assert set(after["external"]) == {"A", "B", "C"} and "one adapter per LODO fold" in after["note"]
    for c in "ABC":  # each fold's MIL run used that fold's adapter's features, checked against leakage
        run = json.loads((tmp_path / "runs" / f"exp-mil-after-{c}" / "metrics.json").read_text())["summary"]
        assert run["inputs"]["adapter"]["adapter"] == doc["adapters"][c] and run["inputs"]["adapter"]["status"] == "checked"
    comp = json.loads((tmp_path / "runs" / "exp-robustness" / "comparison.json").read_text())
    assert len(comp["feature_dirs"]["b"]) == 3 and comp["b"]["note"] == "mean over 3 feature stores"
    d = comp["delta"]["site_probe_balanced_accuracy"]
    assert d["ci_low"] is not None and d["more_robust"] in ("a", "b", "tie")
    md = (tmp_path / "runs" / "exp" / "experiment.md").read_text()
    assert "one adapter per leave-one-dataset-out fold" in md and "held-out A: tuned on" in md
