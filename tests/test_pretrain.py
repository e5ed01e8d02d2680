"""`raypath pretrain`: a 2-step DINO run from scratch of raypath-small, its
weights loaded through the same path as real FM weights, resume, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypath.adapt.pretrain import PretrainConfig, pretrain
from raypath.errors import RaypathError

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """4 slides in 2 cohorts (views of the CMU sample slide), 8 random 64 px tiles each."""
    wd = tmp_path_factory.mktemp("pretrain_wd")
    ids = ["a1", "a2", "b1", "b2"]
    slides = pd.DataFrame({"slide_id": ids, "uri": [str(CMU)] * 4, "patient_id": ids,
                           "cohort": ["A", "A", "B", "B"], "status": ["ok"] * 4})
    rng = np.random.default_rng(0)
    rows = [dict(slide_id=sid, tile_id=t, x=int(rng.integers(0, 2000)), y=int(rng.integers(0, 2800)), level=0,
                 read_px=128, tile_px=64, target_mpp=1.0, tissue_fraction=1.0) for sid in ids for t in range(8)]
    pq.write_table(pa.Table.from_pandas(slides), wd / "slides.parquet")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), wd / "tiles.parquet")
    return str(wd)


def _cfg(workdir: str, **kw) -> PretrainConfig:
    # 16 tiles / batch 8 = 2 steps per epoch
    base = dict(workdir=workdir, epochs=1, warmup_epochs=0, batch_size=8, tiles_per_slide=4, n_local_crops=2,
                device="cpu", run="t")
    return PretrainConfig(**{**base, **kw})


def test_two_step_pretrain_writes_fm_weights_and_resumes(workdir):
    from raypath.fm.backbone import load_backbone

    res = pretrain(_cfg(workdir))
    assert res.metrics["steps"].tolist() == [2] and np.isfinite(res.metrics["loss"]).all()
    assert res.n_params == 2_383_488 <= 2_500_000 and res.n_tiles == 16
    d = Path(res.run_dir)
    assert d == Path(workdir) / "pretrain" / "t"
    info = json.loads((d / "model_info.json").read_text())
    blob = (d / "model.safetensors").read_bytes()
    assert info["sha256"] == hashlib.sha256(blob).hexdigest() and info["size_bytes"] == len(blob) < 12_000_000
    assert info["command"].startswith(f"raypath pretrain --workdir {workdir}") and "--epochs 1" in info["command"] and "--lr" not in info["command"]
    assert (d / "checkpoints" / "epoch_0001" / "dino_state.safetensors").exists()  # full state, not adapter-only

    # the same loader as downloaded FM weights (strict: every key must match the registry architecture)
    tiles = torch.randint(0, 256, (3, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trained = load_backbone("raypath-small", weights=res.weights)
    assert trained.weights_sha256 == info["sha256"]
    f = trained.embed(tiles)
    assert f.shape == (3, 192) and torch.isfinite(f).all()
    init = load_backbone("raypath-small", weights="random:0").embed(tiles)
    assert float((f - init).abs().max()) > 0  # the teacher moved (EMA of the trained student)

    # more epochs resume after the checkpoint of epoch 1; other settings are refused
    with pytest.raises(RaypathError, match="different lr"):
        pretrain(_cfg(workdir, epochs=2, lr=1e-3))
    more = pretrain(_cfg(workdir, epochs=2))
    assert more.start_epoch == 1 and more.metrics["epoch"].tolist() == [0, 1]
    again = pretrain(_cfg(workdir, epochs=2))  # finished: not retrained
    assert again.start_epoch == 2 and again.weights == more.weights


def test_cli_pretrain_help_and_bad_model(workdir, capsys):
    from raypath.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0 and "--amp" in capsys.readouterr().out
    assert main(["pretrain", "--workdir", workdir, "--model", "raypath-smal", "--run", "bad"]) == 2
    assert "Did you mean 'raypath-small'" in capsys.readouterr().err
    assert not (Path(workdir) / "pretrain" / "bad").exists()
