"""`raypath adapt`: tile sampling, outputs, adapter round trip, kill-and-resume, Ray DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypath.adapt.api import AdaptConfig, SimulatedKill, adapt, latest_checkpoint, sample_training_tiles
from raypath.errors import RaypathError

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """4 slides in 2 cohorts (all views of the CMU sample slide) with 12 random 64 px tiles each,
    plus one failed slide that must be skipped."""
    wd = tmp_path_factory.mktemp("adapt_wd")
    ids = ["a1", "a2", "b1", "b2", "bad"]
    slides = pd.DataFrame({
        "slide_id": ids, "uri": [str(CMU)] * 4 + ["/nonexistent.svs"], "patient_id": ids,
        "cohort": ["A", "A", "B", "B", "B"], "status": ["ok"] * 4 + ["failed"],
    })
    rng = np.random.default_rng(0)
    rows = [
        dict(slide_id=sid, tile_id=t, x=int(rng.integers(0, 2000)), y=int(rng.integers(0, 2800)), level=0,
             read_px=128, tile_px=64, target_mpp=1.0, tissue_fraction=1.0)
        for sid in ids for t in range(12)
    ]
    pq.write_table(pa.Table.from_pandas(slides), wd / "slides.parquet")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), wd / "tiles.parquet")
    return str(wd)


def _cfg(workdir: str, **kw) -> AdaptConfig:
    base = dict(workdir=workdir, model="tiny-vit", epochs=2, warmup_epochs=1, batch_size=8, tiles_per_slide=4,
                n_local_crops=4, lr=0.5, device="cpu", tune_cohorts=["all"])
    base.update(kw)
    return AdaptConfig(**base)


def test_sample_training_tiles(workdir):
    t = sample_training_tiles(workdir, 4, seed=1)
    assert sorted(t.slide_id.unique()) == ["a1", "a2", "b1", "b2"]  # failed slide skipped
    assert t.groupby("slide_id").size().tolist() == [4, 4, 4, 4]
    assert {"uri", "cohort", "x", "y", "level", "read_px", "tile_px"} <= set(t.columns)
    pd.testing.assert_frame_equal(t, sample_training_tiles(workdir, 4, seed=1))
    assert not t.equals(sample_training_tiles(workdir, 4, seed=2))
    only_a = sample_training_tiles(workdir, 50, cohorts=["A"])
    assert set(only_a.cohort) == {"A"} and len(only_a) == 24
    with pytest.raises(RaypathError, match="cohorts"):
        sample_training_tiles(workdir, 4, cohorts=["Z"])
    with pytest.raises(RaypathError, match="raypath ingest"):
        sample_training_tiles(str(Path(workdir) / "nowhere"), 4)


def test_adapt_outputs_and_adapter_round_trip(workdir):
    """DoRA run writes the peft layout + metrics; the adapter loads through
    load_backbone (merged) and gives the same features as unmerged."""
    from peft import PeftModel

    from raypath.fm.backbone import load_backbone

    res = adapt(_cfg(workdir, run="dora-rt"))
    d = Path(res.adapter_dir)
    for f in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.parquet", "metrics.json", "training_tiles.parquet"):
        assert (d / f).exists(), f
    acfg = json.loads((d / "adapter_config.json").read_text())
    assert acfg["use_dora"] is True and acfg["r"] == 16 and acfg["target_modules"] == ["qkv"]
    m = pd.read_parquet(d / "metrics.parquet")
    assert m.epoch.tolist() == [0, 1]
    assert {"loss", "teacher_entropy", "center_norm", "lr", "momentum", "weight_decay"} <= set(m.columns)
    assert np.isfinite(m.loss).all() and (m.center_norm > 0).all()
    assert m.momentum.iloc[-1] == pytest.approx(1.0) and m.lr.iloc[-1] == pytest.approx(1e-6)
    assert m.weight_decay.iloc[-1] == pytest.approx(0.4)
    assert res.n_tiles == 16 and res.start_epoch == 0

    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    merged = load_backbone("tiny-vit", adapter=str(d)).embed(x)
    un = load_backbone("tiny-vit")
    base = un.embed(x)
    un.model = PeftModel.from_pretrained(un.model, str(d)).eval()
    unmerged = un.embed(x)
    assert float((merged - unmerged).abs().max()) < 1e-4
    assert float((merged - base).abs().max()) > 1e-3  # the adapter did learn something


def test_lora_on_hf_vit(workdir):
    """LoRA on the Hugging Face family (query/key/value targets, local crops at a smaller size)."""
    from raypath.fm.backbone import load_backbone

    res = adapt(_cfg(workdir, model="tiny-hf-vit", method="lora", epochs=1, rank=4, alpha=8, run="lora-hf"))
    acfg = json.loads((Path(res.adapter_dir) / "adapter_config.json").read_text())
    # peft also lists transformers 5's q_proj/k_proj/v_proj names for the same layers
    assert acfg["use_dora"] is False and {"key", "query", "value"} <= set(acfg["target_modules"])
    bb = load_backbone("tiny-hf-vit", adapter=res.adapter_dir)
    assert bb.embed(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 64)


def test_kill_and_resume_matches_uninterrupted(workdir):
    full = adapt(_cfg(workdir, epochs=3, run="full"))
    with pytest.raises(SimulatedKill):
        adapt(_cfg(workdir, epochs=3, run="killed", stop_after_epochs=1))
    run_dir = Path(workdir) / "adapters" / "killed"
    assert latest_checkpoint(str(run_dir)).endswith("epoch_0001")
    assert not (run_dir / "adapter_model.safetensors").exists()
    with pytest.raises(RaypathError, match="different rank"):
        adapt(_cfg(workdir, epochs=3, run="killed", rank=8))
    resumed = adapt(_cfg(workdir, epochs=3, run="killed"))
    assert resumed.start_epoch == 1
    assert resumed.metrics.epoch.tolist() == [0, 1, 2]
    np.testing.assert_allclose(resumed.metrics.loss, full.metrics.loss, rtol=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(Path(full.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # a finished run is not retrained, and not silently reused with other settings
    again = adapt(_cfg(workdir, epochs=3, run="killed"))
    assert again.start_epoch == 3 and len(again.metrics) == 3
    with pytest.raises(RaypathError, match="different method"):
        adapt(_cfg(workdir, epochs=3, run="killed", method="lora"))
    # only the newest checkpoints are kept
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]


def test_cli_adapt_and_bad_model(workdir, capsys):
    from raypath.cli import main

    rc = main(["adapt", "--workdir", workdir, "--model", "tiny-vit", "--epochs", "1", "--batch-size", "16",
               "--tiles-per-slide", "2", "--n-local-crops", "2", "--strength", "0.8", "--run", "cli", "--device", "cpu",
               "--tune-cohorts", "all"])
    assert rc == 0
    assert "adapters/cli" in capsys.readouterr().out
    cfg = (Path(workdir) / "adapters" / "cli" / "config.yaml").read_text()
    assert "strength: 0.8" in cfg
    assert main(["adapt", "--workdir", workdir, "--model", "tiny-vti", "--run", "bad"]) == 2


def test_two_worker_ddp_through_ray_train(workdir, ray_session):
    """One 2-worker TorchTrainer run (gloo): both ranks step, rank 0 writes the adapter."""
    res = adapt(_cfg(workdir, epochs=2, num_workers=2, batch_size=4, run="ddp"))
    d = Path(res.adapter_dir)
    assert (d / "adapter_model.safetensors").exists()
    assert res.metrics.epoch.tolist() == [0, 1]
    assert (res.metrics.steps == 2).all()  # 16 tiles / 2 workers / batch 4
    info = json.loads((d / "metrics.json").read_text())
    assert info["world_size"] == 2
    assert any(p.name.startswith("checkpoint") for p in (d / "ray" / "train").iterdir())


def test_experiment_table_and_verb():
    from raypath.cli import build_parser
    from raypath.adapt.experiment import ExperimentConfig, experiment_table, table_markdown

    robust = {"delta": {"site_probe_balanced_accuracy": {"a": 0.9, "b": 0.6}, "kmeans_purity": {"a": 0.8, "b": 0.5}}}
    before = {"metric": "c_index", "mean": 0.60, "worst": 0.55, "per_cohort": {"C0": 0.6, "C1": 0.55}}
    after = {"metric": "c_index", "mean": 0.64, "worst": 0.50, "per_cohort": {"C0": 0.7, "C1": 0.50}}
    t = experiment_table(robust, before, after).set_index("metric")
    assert t.loc["site probe balanced accuracy", "delta"] == pytest.approx(-0.3)
    assert t.loc["KMeans cohort purity", "better_if"] == "lower"
    assert t.loc["LODO external c_index (worst cohort)", "delta"] == pytest.approx(-0.05)
    assert t.loc["  c_index, held-out C0", "after"] == 0.7
    md = table_markdown(t.reset_index())
    assert "| site probe balanced accuracy | 0.900 | 0.600 | -0.300 | lower |" in md
    assert "| robustness index (RI) | n/a | n/a | n/a | higher |" in md
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"adapt", "adapt-experiment", "augment-preview"} <= set(sub)
    cfg = ExperimentConfig(workdir="wd", model="tiny-vit", rank=4, mil_epochs=3)
    assert cfg.adapt_config().rank == 4 and not hasattr(cfg.adapt_config(), "mil_epochs")
