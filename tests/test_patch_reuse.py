"""Fit results and fine-tuning checkpoints are reused only on the same inputs: the results key
covers the patch table's rows (labels, domains, coordinates), the split and the feature identity;
a re-run on identical inputs still skips finished fits and resumes a killed one."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from raypath.patch.api import PatchConfig, inputs_digest, prepare, run_patch


def write_patch_table(root, per_class: int = 8, domains=("siteA",), seed: int = 0) -> str:
    """Random images, one patient each, with a fixed split column (so labels can change alone)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for dom in domains:
        for lab in ("mitosis", "imposter"):
            for i in range(per_class):
                pid = f"{dom}_{lab}_{i}"
                arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                arr[..., 0] = np.clip(arr[..., 0] // 2 + (100 if lab == "mitosis" else 0), 0, 255)
                Image.fromarray(arr).save(root / "img" / f"{pid}.png")
                split = ("test", "val", "train", "train")[i % 4]
                rows.append({"patch_id": pid, "uri": f"img/{pid}.png", "label": lab, "domain": dom,
                             "slide_id": pid, "patient_id": pid, "split": split})
    path = root / "patches.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _cfg(tmp_path, table: str, **kw) -> PatchConfig:
    base = dict(workdir=str(tmp_path / "w"), patches=table, model="tiny-vit", patch_px=16, shift_px=2, mpp=0.5,
                methods=["linear", "knn"], protocols=["scaling"], fractions=[1.0], seeds=[42], n_boot=0,
                max_epochs=3, patience=5, pseudo_epoch=32, batch_size=8, lr=1e-3, device="cpu")
    return PatchConfig(**{**base, **kw})


def _stamps(cfg: PatchConfig) -> dict[str, float]:
    d = os.path.join(cfg.run_dir(), "fits")
    return {f: os.path.getmtime(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def _relabel(table: str, row: int) -> None:
    t = pd.read_csv(table)
    t.loc[row, "label"] = "imposter" if t.loc[row, "label"] == "mitosis" else "mitosis"
    t.to_csv(table, index=False)


def test_identical_inputs_skip_fits_and_an_edited_label_refits(tmp_path):
    table = write_patch_table(tmp_path)
    cfg = _cfg(tmp_path, table)
    run_patch(cfg)
    first = _stamps(cfg)
    assert len(first) == 2
    run_patch(cfg)
    assert _stamps(cfg) == first  # same inputs: every fit reused
    train_row = int(np.flatnonzero(pd.read_csv(table)["split"] == "train")[0])
    _relabel(table, train_row)  # the annotation file edited in place, same --run
    run_patch(cfg)
    after = _stamps(cfg)
    assert set(after) == set(first) and all(after[f] != first[f] for f in first)
    rec = json.load(open(os.path.join(cfg.run_dir(), "fits", "scaling__all__linear__f1__s42.json")))
    assert rec["results_key"] == cfg.results_key(inputs_digest(cfg, prepare(cfg)))


def test_inputs_digest_covers_labels_domains_coordinates_split_and_model(tmp_path):
    table = write_patch_table(tmp_path)
    cfg = _cfg(tmp_path, table)
    ctx = prepare(cfg)
    ref = inputs_digest(cfg, ctx)
    assert inputs_digest(cfg, prepare(cfg)) == ref  # deterministic
    t = ctx["table"]
    for col, value in (("label", "other"), ("domain", "siteB"), ("patient_id", "someone")):
        changed = t.copy()
        changed.loc[0, col] = value
        assert inputs_digest(cfg, {**ctx, "table": changed}) != ref, col
    split = ctx["split"].copy()
    split[[0, 1]] = split[[1, 0]] if split[0] != split[1] else ("train", "test")
    assert inputs_digest(cfg, {**ctx, "split": split}) != ref
    assert inputs_digest(cfg.model_copy(update={"model": "tiny-vit-reg"}), ctx) != ref
    assert inputs_digest(cfg.model_copy(update={"weights": "random:1"}), ctx) != ref


def test_a_killed_fine_tuning_fit_resumes_only_on_the_same_inputs(tmp_path):
    from raypath.train import SimulatedKill

    table = write_patch_table(tmp_path)
    cfg = _cfg(tmp_path, table, methods=["lora"], rank=2)
    rec_path = os.path.join(cfg.run_dir(), "fits", "scaling__all__lora__f1__s42.json")
    with pytest.raises(SimulatedKill):
        run_patch(cfg.model_copy(update={"kill_at_step": 1}))
    _relabel(table, int(np.flatnonzero(pd.read_csv(table)["split"] == "train")[0]))
    run_patch(cfg)  # other labels: must not resume the checkpoint written on the old ones
    rec = json.load(open(rec_path))
    assert not rec["info"]["resumed_from"] and rec["info"]["epochs"] == 3
    assert not os.listdir(os.path.join(cfg.run_dir(), "checkpoints"))  # the stale checkpoint is gone too
    _relabel(table, int(np.flatnonzero(pd.read_csv(table)["split"] == "train")[0]))  # back to the first labels
    with pytest.raises(SimulatedKill):
        run_patch(cfg.model_copy(update={"kill_at_step": 1}))
    run_patch(cfg)  # identical inputs: resumes
    rec = json.load(open(rec_path))
    assert rec["info"]["resumed_from"] and rec["info"]["epochs"] == 3


def test_end_to_end_baselines_alone_need_no_fm_weights_for_the_key(tmp_path):
    from raypath.errors import RaypathError
    from raypath.patch.api import _model_identity

    missing = str(tmp_path / "no_such_weights.bin")
    e2e = PatchConfig(workdir=str(tmp_path), synth=True, model="phikon", weights=missing, methods=["e2e-resnet"])
    assert _model_identity(e2e) == {"model": "phikon", "weights": missing}
    with pytest.raises(RaypathError):
        _model_identity(e2e.model_copy(update={"methods": ["e2e-resnet", "linear"]}))
