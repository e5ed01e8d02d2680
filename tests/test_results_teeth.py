"""Tests with teeth (issue 12, item 8): each deliberate wrong change listed
there makes one of these fail — the weights' identity dropped from the feature
cache key, a non-atomic write, site-probe callers grouping by slide, the DINO
teacher temperature changed, the tissue threshold flipped from >= to >.  (The
sweep's real adapter stage handing the held-out cohort to `adapt` is caught by
tests/test_results_adapter.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embed_helpers import grid_tiles, write_slide


# --------------------------------------------------------------------------- feature cache key


def test_other_weights_into_the_same_folder_are_embedded_not_skipped(ray_session, tmp_path):
    from raypath.embed.api import EmbedConfig, embed
    from raypath.embed.store import FeatureStore

    p = write_slide(tmp_path / "s0.svs", 600, 500, seed=3)
    pd.DataFrame({"slide_id": ["s0"], "uri": [str(p)], "fingerprint": ["fp-s0"], "status": ["ok"],
                  "error": [None]}).to_parquet(tmp_path / "slides.parquet")
    grid_tiles("s0", 600, 500, read_px=64, tile_px=32, stride_px=192).to_parquet(tmp_path / "tiles.parquet")
    folder = str(tmp_path / "features" / "shared")
    kw = dict(workdir=str(tmp_path), model="tiny-vit", feature_dir=folder, batch_size=8, num_actors=1)
    first = embed(EmbedConfig(**kw, weights="random:0"))  # (same weights again: skipped, see test_embed)
    a = FeatureStore(folder).load_bag("s0").features
    assert set(first.slides["status"]) == {"done"}
    other = embed(EmbedConfig(**kw, weights="random:1"))  # other weights, same folder
    assert set(other.slides["status"]) == {"done"}, other.slides
    b = FeatureStore(folder).load_bag("s0").features
    assert a.shape == b.shape and not np.allclose(a, b)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_never_shows_a_partial_object_at_the_final_path(tmp_path, monkeypatch):
    """While the new bytes are being written and synced, readers of the final
    path still see the old object; a failure before the rename leaves it intact."""
    from raypath.io import storage

    target = tmp_path / "obj.bin"
    target.write_bytes(b"old")
    seen: list[bytes] = []
    real_fsync = os.fsync

    def fsync(fd):
        seen.append(target.read_bytes())  # what a reader sees while the data is on its way
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    storage.atomic_write_bytes(str(target), b"new" * 1000)
    assert seen and all(s == b"old" for s in seen) and target.read_bytes() == b"new" * 1000

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        storage.atomic_write_bytes(str(target), b"half")
    assert target.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj.bin"]  # no temporary left behind


# --------------------------------------------------------------------------- site probe callers


def _patient_signature_store(root: Path):
    """Two slides per patient, a strong patient signature, cohorts at random:
    only a probe that groups by slide can 'predict' the cohort (through the patient)."""
    from raypath.embed.store import write_bag_table

    rng = np.random.default_rng(2)
    rows = []
    for p in range(24):
        sig = rng.normal(size=64) * 3.0
        for s in range(2):
            sid = f"p{p}s{s}"
            write_bag_table(str(root / "features" / "fm"), sid, np.arange(6), np.zeros((6, 2)),
                            sig + rng.normal(size=(6, 64)))
            rows.append(dict(slide_id=sid, patient_id=f"p{p}", cohort=f"c{p % 2}", time=1.0 + p, event=1))
    return pd.DataFrame(rows)


def test_sweep_robustness_stage_groups_the_site_probe_by_patient(tmp_path):
    from raypath.robustness import metrics as M
    from raypath.sweep.nested import FoldPlan
    from raypath.sweep.objective import _robustness_stage
    from raypath.sweep.space import parse_space

    clin = _patient_signature_store(tmp_path)
    space = parse_space({"kind": "mil", "features": "x", "robustness": {"enabled": True, "tiles_per_slide": 6,
                                                                         "kmeans_k": 4, "kmeans_repeats": 1,
                                                                         "probe_folds": 4},
                         "space": {"mil.lr": {"type": "float", "low": 0.1, "high": 1}}})
    plan = FoldPlan(held_out="c9", train_cohorts=["c0", "c1"], robustness=sorted(clin.slide_id))
    res = _robustness_stage(str(tmp_path / "features" / "fm"), clin, plan, space)
    from raypath.embed.store import FeatureStore

    X, meta = FeatureStore(str(tmp_path / "features" / "fm")).sample_tiles(6, sorted(clin.slide_id), seed=0)
    cohort = meta.slide_id.map(dict(zip(clin.slide_id, clin.cohort))).to_numpy()
    by_slide = M.site_probe(X, cohort, meta.slide_id.to_numpy(), n_splits=4)["balanced_accuracy"]
    assert res["site_probe_bacc"] < 0.7 < by_slide


# --------------------------------------------------------------------------- DINO teacher temperature


def test_adapt_trains_with_the_papers_dino_temperatures(tmp_path, monkeypatch, cmu_slide):
    """The paper's teacher temperature 0.04 (student 0.1, centre momentum 0.9)
    reaches the loss the training loop uses, and that loss sharpens with it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raypath.adapt import dino
    from raypath.adapt.api import AdaptConfig, adapt

    built: list[dino.DINOLoss] = []

    class Recording(dino.DINOLoss):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(dino, "DINOLoss", Recording)
    slides = pd.DataFrame({"slide_id": ["a", "b"], "uri": [str(cmu_slide)] * 2, "patient_id": ["a", "b"],
                           "cohort": ["A", "B"], "status": ["ok", "ok"]})
    pq.write_table(pa.Table.from_pandas(slides), tmp_path / "slides.parquet")
    tiles = [dict(slide_id=s, tile_id=t, x=300 * t, y=600, level=0, read_px=64, tile_px=32, target_mpp=1.0,
                  tissue_fraction=1.0) for s in "ab" for t in range(2)]
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(tiles)), tmp_path / "tiles.parquet")
    cfg = AdaptConfig(workdir=str(tmp_path), model="tiny-vit", epochs=1, warmup_epochs=0, batch_size=4,
                      tiles_per_slide=2, n_local_crops=2, device="cpu", tune_cohorts=["all"], run="temps")
    assert (cfg.teacher_temp, cfg.student_temp, cfg.center_momentum) == (0.04, 0.1, 0.9)
    adapt(cfg)
    assert built and (built[0].teacher_temp, built[0].student_temp, built[0].center_momentum) == (0.04, 0.1, 0.9)
    loss = built[0]
    loss.center.zero_()
    t = torch.zeros(1, loss.center.shape[1])
    t[0, :3] = torch.tensor([0.10, 0.0, 0.02])
    torch.testing.assert_close(loss.teacher_probs(t)[0], torch.softmax(t[0] / 0.04, dim=0))


# --------------------------------------------------------------------------- tissue threshold


def test_a_tile_exactly_at_the_tissue_threshold_is_kept(tmp_path, monkeypatch, cmu_slide):
    """`keep tiles with at least this tissue cover`: equal to the threshold is in, just below is out."""
    from raypath.wsi import tiling

    real = tiling.tissue_fractions
    picked: dict[str, tuple[int, int]] = {}

    def fractions(mask, dsx, dsy, x, y, tile_l0_px):
        frac = np.asarray(real(mask, dsx, dsy, x, y, tile_l0_px), dtype=np.float64).copy()
        order = np.argsort(-frac)  # two tiles that would be kept
        i, j = int(order[0]), int(order[1])
        frac[i], frac[j] = 0.5, np.nextafter(0.5, 0.0)
        picked.update(at=(int(x[i]), int(y[i])), below=(int(x[j]), int(y[j])))
        return frac

    monkeypatch.setattr(tiling, "tissue_fractions", fractions)
    row = {"slide_id": "cmu", "uri": str(cmu_slide), "mpp_x": 0.499, "level_downsamples": [1.0]}
    tiles, summary = tiling.tile_slide(row, tiling.TileConfig(workdir=str(tmp_path), min_tissue_fraction=0.5))
    xy = set(zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist()))
    assert picked["at"] in xy and picked["below"] not in xy
