"""The patch benchmark on a tiny synthetic mitosis study: synth, builders, patch cache (local and
S3), the whole run with its outputs and reuse, and resuming a fine-tuning fit after a kill."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.patch.api import PatchConfig, prepare, run_patch
from raypath.patch.builders import from_point_annotations
from raypath.synth.mitosis import MitosisConfig, synthesize_mitosis

TINY = dict(n_domains=3, slides_per_domain=3, slide_px=640, cells_per_slide=12, min_spacing_um=14.0,
            patients_share_slides=0.0, seed=5)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mitosis") / "study")
    cells = synthesize_mitosis(MitosisConfig(out=out, **TINY))
    return out, cells


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_synthetic_mitosis_study_is_deterministic_and_annotated_like_midog(study, tmp_path):
    out, cells = study
    assert set(cells["label"]) == {"mitotic_figure", "imposter"}
    assert cells["domain"].nunique() == 3 and cells.groupby("domain")["slide_id"].nunique().min() == 3
    assert set(cells["subtype"]) >= {"metaphase", "apoptotic"}
    doc = json.load(open(os.path.join(out, "annotations.json")))
    assert {c["name"] for c in doc["categories"]} == {"mitotic figure", "imposter"}
    a = doc["annotations"][0]
    assert len(a["bbox"]) == 4 and a["bbox"][2] - a["bbox"][0] == 50
    assert {"file_name", "tumor_type", "width"} <= set(doc["images"][0])
    one = {**TINY, "n_domains": 1, "slides_per_domain": 1, "slide_px": 384, "cells_per_slide": 4}
    a = synthesize_mitosis(MitosisConfig(out=str(tmp_path / "a"), **one))
    b = synthesize_mitosis(MitosisConfig(out=str(tmp_path / "b"), **one))
    for name in ("slides/d0_s000.svs", "annotations.json", "cells.csv", "cohort.csv"):
        assert _sha(str(tmp_path / "a" / name)) == _sha(str(tmp_path / "b" / name)), name
    assert a.equals(b)


def test_json_and_csv_annotations_build_the_same_patch_table(study):
    out, cells = study
    a = from_point_annotations(os.path.join(out, "annotations.json"))
    b = from_point_annotations(os.path.join(out, "annotations.csv"), slides=os.path.join(out, "cohort.csv"))
    cols = ["patch_id", "uri", "label", "domain", "slide_id", "patient_id", "x", "y"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False)
    assert len(a) == len(cells) and set(a["label"]) == {"mitotic_figure", "imposter"}


def test_patches_read_from_s3_equal_local_ones(study, s3_server, tmp_path):
    from raypath.io.storage import filesystem_for
    from raypath.patch.images import Geometry, build_patch_cache

    out, _ = study
    bucket = s3_server.create_bucket("patch-test")
    fs = filesystem_for(bucket)
    for name in ("annotations.json", "slides/d1_s000.svs", "slides/d1_s001.svs"):
        fs.put_file(os.path.join(out, name), f"{bucket}/study/{name}")
    remote = from_point_annotations(f"{bucket}/study/annotations.json")
    remote = remote[remote["slide_id"].isin(["d1_s000", "d1_s001"])].reset_index(drop=True)
    local = from_point_annotations(os.path.join(out, "annotations.json"))
    local = local[local["slide_id"].isin(["d1_s000", "d1_s001"])].reset_index(drop=True)
    assert remote["uri"].str.startswith("s3://").all()
    geom = Geometry(48, 0.5, 4)
    a = build_patch_cache(remote, geom, str(tmp_path / "s3cache"))
    b = build_patch_cache(local, geom, str(tmp_path / "localcache"))
    assert a.images.shape == (len(local), 56, 56, 3)
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert np.asarray(a.images).std() > 10  # real tissue, not empty reads


def _cfg(workdir: str, out: str, **kw) -> PatchConfig:
    base = dict(workdir=workdir, annotations=os.path.join(out, "annotations.json"), model="tiny-vit",
                patch_px=48, mpp=0.5, shift_px=4, methods=["linear", "knn", "lora", "e2e-resnet"],
                protocols=["scaling", "domain"], fractions=[0.1, 1.0], seeds=[42], max_epochs=2, patience=2,
                pseudo_epoch=64, lr=1e-3, n_boot=50, e2e_size="tiny", device="cpu")
    return PatchConfig(**{**base, **kw})


def test_benchmark_run_writes_curves_matrix_report_and_reuses_fits_and_features(study, tmp_path):
    out, _ = study
    wd = str(tmp_path / "w")
    doc = run_patch(_cfg(wd, out))
    run = os.path.join(wd, "runs", "patch")
    for name in ("summary.json", "metrics.csv", "summary.csv", "results.md", "scaling.png", "domain_matrix.png",
                 "report.html", "patches.parquet", "config.yaml"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    m = pd.read_csv(os.path.join(run, "metrics.csv"))
    assert len(doc["headline"]["at_full_data"]) == 4 and doc["fits"] == 4 * 2 + 4 * 3
    for col in ("balanced_accuracy", "f1_weighted", "accuracy"):
        assert m[col].between(0, 1).all()
    assert set(m["test_on"]) == {"all", "canine_lymphoma", "canine_soft_tissue_sarcoma", "human_breast_carcinoma"}
    dom = m[m["protocol"] == "domain"]
    assert dom["in_domain"].sum() == 4 * 3 and (~dom["in_domain"]).sum() == 4 * 6
    lin = m[(m["method"] == "linear") & (m["protocol"] == "scaling") & (m["test_on"] == "all") & (m["fraction"] == 1.0)]
    assert lin["balanced_accuracy"].iloc[0] < 0.9  # random-weight tiny model: not trivial
    report = open(os.path.join(run, "report.html")).read()
    assert report.index("Best with all training labels") < report.index("<table")
    assert "LoRA with 10 %" in open(os.path.join(run, "results.md")).read()
    t = pd.read_parquet(os.path.join(run, "patches.parquet"))
    assert (t.groupby("patient_id")["split"].nunique() == 1).all()
    fits_dir = os.path.join(run, "fits")
    stamps = {f: os.path.getmtime(os.path.join(fits_dir, f)) for f in os.listdir(fits_dir)}
    feat_dir = os.path.join(wd, "features", doc["identity"]["model_key"], "patches")
    feats = {f: os.path.getmtime(os.path.join(feat_dir, f)) for f in os.listdir(feat_dir)}
    assert sum(f.endswith(".parquet") for f in feats) == 9  # one file per slide, keyed by patch_id
    from raypath.embed.identity import check_store

    ident = check_store(feat_dir, {"model": "tiny-vit", "tiling": {"target_mpp": 0.5, "tile_px": 48},
                                   "weights_sha256": "random:0"})
    assert ident.model_key == doc["identity"]["model_key"] and ident.inputs_sha256
    with pytest.raises(RaypathError, match="does not match: tiling"):
        check_store(feat_dir, {"tiling": {"target_mpp": 0.5, "tile_px": 224}})
    run_patch(_cfg(wd, out, n_boot=20, methods=["linear", "knn", "lora", "e2e-resnet", "dora"], fractions=[1.0]))
    new = {f for f in os.listdir(fits_dir) if f not in stamps}
    assert new and all("__dora__" in f for f in new)  # only the new method's fits ran
    assert all(os.path.getmtime(os.path.join(fits_dir, f)) == s for f, s in stamps.items())
    assert {f: os.path.getmtime(os.path.join(feat_dir, f)) for f in os.listdir(feat_dir)} == feats


def test_fine_tuning_resumes_after_a_kill_with_the_same_result(study, tmp_path):
    from raypath.patch.finetune import run_finetune
    from raypath.patch.methods import FitJob, get_method
    from raypath.patch.protocols import plan_fits
    from raypath.train import SimulatedKill

    out, _ = study
    cfg = _cfg(str(tmp_path / "w"), out, max_epochs=3, patience=5)
    ctx = prepare(cfg)
    fit = plan_fits(ctx["table"], ctx["split"], ["lora"], ["scaling"], [1.0], [42], [1.0])[0]

    def spec(ckpt: str, kill: int | None):
        job = FitJob(fit=fit, y=ctx["y"], classes=ctx["classes"], positive=ctx["positive"],
                     cfg=cfg.model_copy(update={"kill_at_step": kill}), images_folder=ctx["images"].folder,
                     checkpoint_dir=ckpt)
        return get_method("lora").spec(job)

    whole = run_finetune(spec(str(tmp_path / "ck_whole"), None))
    with pytest.raises(SimulatedKill):
        run_finetune(spec(str(tmp_path / "ck_killed"), 2))
    resumed = run_finetune(spec(str(tmp_path / "ck_killed"), None))
    assert resumed["resumed_from"] and whole["resumed_from"] is None
    assert resumed["epochs"] == whole["epochs"] == 3
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in whole["history"]])
    for name in whole["probs"]:
        np.testing.assert_allclose(resumed["probs"][name], whole["probs"][name], rtol=1e-6, atol=1e-7)


def test_sweep_accepts_a_patch_space_and_runs_trials_on_ray_tune(study, tmp_path, ray_session):
    import yaml

    from raypath.sweep.api import SweepConfig, run_sweep
    from raypath.sweep.space import parse_space

    out, _ = study
    fixed = dict(annotations=os.path.join(out, "annotations.json"), model="tiny-vit", patch_px=48, mpp=0.5,
                 shift_px=4, seeds=[42], max_epochs=1, pseudo_epoch=32, n_boot=0, e2e_size="tiny", device="cpu")
    doc = {"kind": "patch", "objectives": [{"metric": "val_mean"}], "fixed": {"patch": fixed},
           "space": {"patch.method": {"type": "categorical", "choices": ["linear", "lora"]},
                     "patch.rank": {"type": "int", "low": 2, "high": 8, "log": True},
                     "patch.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                     "patch.fraction": {"type": "categorical", "choices": [0.5, 1.0]}},
           "points_to_evaluate": [{"patch.method": "lora", "patch.rank": 4, "patch.lr": 1e-3, "patch.fraction": 1.0}]}
    with pytest.raises(RaypathError, match="patch"):
        parse_space({**doc, "kind": "mil"})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = run_sweep(SweepConfig(workdir=str(tmp_path / "w"), space=str(path), name="p", num_samples=2,
                                max_concurrent_trials=1))
    t = res.trials
    assert len(t) == 2 and (t["error"] == "").all() and t["mean_external"].between(0, 1).all()
    assert t["val_mean"].between(0, 1).all() and t["val_worst"].between(0, 1).all()
    assert {"external_canine_lymphoma", "mean_internal", "param:patch.method", "val_worst_domain"} <= set(t.columns)
    assert res.best["val_mean"] == t["val_mean"].max()  # selected on validation, not on test scores
    assert res.best is not None and os.path.exists(os.path.join(res.sweep_dir, "best_config.yaml"))
    first = t[t["param:patch.method"] == "lora"].iloc[0]
    cfg = yaml.safe_load(open(os.path.join(str(tmp_path / "w"), "runs", first["run"], "config.yaml")))["config"]
    assert cfg["methods"] == ["lora"] and cfg["rank"] == 4 and cfg["fractions"] == [1.0] and cfg["protocols"] == ["lodo"]


def test_fits_run_as_ray_tasks_and_fine_tune_on_ray_train(study, tmp_path, ray_session):
    out, _ = study
    cfg = _cfg(str(tmp_path / "w"), out, methods=["linear", "lora"], protocols=["scaling"], fractions=[1.0],
               executor="ray", train_workers=1, fit_cpus=0.5, max_epochs=2, n_boot=0)
    doc = run_patch(cfg)
    assert doc["fits"] == 2
    rec = json.load(open(os.path.join(cfg.run_dir(), "fits", "scaling__all__lora__f1__s42.json")))
    assert rec["info"]["context"] == "Ray Train" and rec["info"]["epochs"] == 2
    assert 0 < rec["info"]["trainable_params"] < 50000  # adapter + head only (tiny-vit has ~80k weights)


def test_a_mitosis_study_is_reused_only_when_written_by_the_same_generator(tmp_path):
    from raypath.synth import mitosis

    cfg = MitosisConfig(out=str(tmp_path / "s"), **{**TINY, "n_domains": 1, "slides_per_domain": 1, "slide_px": 384,
                                                    "cells_per_slide": 4, "reuse": True})
    synthesize_mitosis(cfg)
    slide = tmp_path / "s" / "slides" / "d0_s000.svs"
    stamp = os.path.getmtime(slide)
    synthesize_mitosis(cfg)
    assert os.path.getmtime(slide) == stamp  # reused
    doc = json.load(open(tmp_path / "s" / "domains.json"))
    doc["generator_version"] -= 1
    (tmp_path / "s" / "domains.json").write_text(json.dumps(doc, indent=2))
    synthesize_mitosis(cfg)
    assert os.path.getmtime(slide) != stamp  # a study of another generator version is rendered again
    assert json.load(open(tmp_path / "s" / "domains.json"))["generator_version"] == mitosis.GENERATOR_VERSION
