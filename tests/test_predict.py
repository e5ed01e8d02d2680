"""Final models and ``raypath predict``: save/load round trip, raw slides to
predictions in one command (on S3), identity checks, failed slides, a cohort
without outcomes, training patients flagged, attention heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError


def _study(out: str, seed: int, slides: int = 4):
    from raypath.synth.study import SynthConfig, synthesize

    return synthesize(SynthConfig(out=out, n_cohorts=2, slides_per_cohort=slides, slide_px=768, seed=seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    """A workdir embedded with tiny-vit and a final survival model fitted on it."""
    from raypath.embed.api import EmbedConfig, embed
    from raypath.mil.api import MilConfig
    from raypath.predict.final import fit_final
    from raypath.wsi.ingest import IngestConfig, ingest
    from raypath.wsi.tiling import TileConfig, tile

    wd = str(tmp_path_factory.mktemp("train_wd"))
    _study(f"{wd}/study", seed=0)
    ingest(IngestConfig(workdir=wd, cohort=f"{wd}/study/cohort.csv"))
    tile(TileConfig(workdir=wd))
    feats = str(embed(EmbedConfig(workdir=wd, model="tiny-vit")).feature_dir)
    cfg = MilConfig(workdir=wd, features=feats, epochs=3, batch_size=4, max_tiles_per_slide=None)
    model_dir = fit_final(cfg, name="final")
    return wd, feats, model_dir


def test_saved_model_round_trips_with_its_metadata(trained):
    from raypath.predict.api import score_slides
    from raypath.predict.model import load_final_model, save_final_model

    wd, feats, model_dir = trained
    meta, module = load_final_model(model_dir)
    assert meta.identity["model"] == "tiny-vit" and meta.identity["weights_sha256"] == "random:0"
    assert meta.task == "survival" and len(meta.cutoffs) == 1 and len(meta.trained_patients) > 0
    ids = sorted(p.stem for p in Path(feats).glob("*.parquet"))
    a, att = score_slides(meta, module.state_dict(), feats, ids)
    copy = save_final_model(str(Path(wd) / "models" / "copy"), meta, module.state_dict())
    meta2, module2 = load_final_model(copy)
    b, _ = score_slides(meta2, module2.state_dict(), feats, ids)
    np.testing.assert_array_equal(a["risk"].to_numpy(), b["risk"].to_numpy())
    sums = att.groupby("slide_id")["attention"].sum()  # attention is a distribution over each slide's tiles
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)


def test_predict_on_training_slides_flags_training_patients(trained):
    from raypath.predict.api import PredictConfig, predict

    wd, feats, model_dir = trained
    res = predict(PredictConfig(model=model_dir, workdir=wd, heatmaps=0, n_boot=0))
    assert res.predictions["trained_on"].all()  # every patient was in the training set
    from raypath.predict.model import load_final_model

    meta, _ = load_final_model(model_dir)  # the cut-off is the median of the training patients' risk as predicted
    per_patient = res.predictions.groupby("patient_id")["risk"].mean()
    assert meta.cutoffs[0] == pytest.approx(float(np.quantile(per_patient, 0.5)), rel=1e-5)
    assert "survival" not in res.metrics and res.metrics["n_trained_on"] == len(res.predictions)


def test_raw_slides_on_s3_to_predictions_in_one_command(trained, s3_server):
    from raypath.cli import main

    _, _, model_dir = trained
    bucket = s3_server.create_bucket("predict-test")
    _study(f"{bucket}/new", seed=7, slides=5)  # another seed: new patients
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url})
    table = pd.read_csv(fs.open(f"{bucket}/new/cohort.csv", "rb"), dtype=str)
    table["patient_id"] = "new_" + table["patient_id"]  # other hospital, other patients
    broken = dict(table.iloc[0], slide_id="broken", uri="slides/missing.svs", patient_id="pbroken", pair_id="")
    cohort = f"{bucket}/new/cohort_plus.csv"  # a slide that fails ingest is reported, the rest goes on
    with fs.open(cohort, "wb") as f:
        pd.concat([table, pd.DataFrame([broken])], ignore_index=True).to_csv(f, index=False)
    wd = f"{bucket}/wd"
    rc = main(["predict", "--model", model_dir, "--workdir", wd, "--cohort", cohort, "--heatmaps", "2",
               "--gallery-tiles", "2", "--n-boot", "50"])
    assert rc == 3  # finished, one slide failed
    run = f"{wd}/runs/predict-final"
    with fs.open(f"{run}/predictions.parquet", "rb") as f:
        pred = pd.read_parquet(f)
    metrics = json.loads(fs.cat(f"{run}/metrics.json"))
    assert len(pred) == len(table) and not pred["trained_on"].any()
    assert set(pred["risk_group"]) <= {"low", "high"}
    assert [r["slide_id"] for r in metrics["failed"]] == ["broken"]
    s = metrics["survival"]
    assert 0 <= s["c_index"] <= 1 and s["ci_low"] <= s["c_index"] <= s["ci_high"] and s["n_comparable_pairs"] >= 10
    assert len(metrics["heatmaps"]) == 2 and fs.exists(f"{run}/km.png") and fs.exists(f"{run}/report.html")
    for files in metrics["heatmaps"].values():
        assert all(fs.exists(f"{run}/{f}") for f in files)


def test_cohort_without_outcomes_and_a_mismatched_store(trained, tmp_path):
    from raypath.embed.api import EmbedConfig, embed
    from raypath.predict.api import PredictConfig, predict
    from raypath.wsi.ingest import IngestConfig, ingest
    from raypath.wsi.tiling import TileConfig, tile

    _, _, model_dir = trained
    wd = str(tmp_path / "wd")
    table = _study(str(tmp_path / "study"), seed=11, slides=2)
    table.drop(columns=["time", "event", "label"]).to_csv(tmp_path / "study" / "plain.csv", index=False)
    ingest(IngestConfig(workdir=wd, cohort=str(tmp_path / "study" / "plain.csv")))
    tile(TileConfig(workdir=wd))
    other = str(embed(EmbedConfig(workdir=wd, model="tiny-vit", weights="random:3")).feature_dir)
    with pytest.raises(RaypathError, match="raypath embed --workdir .* --model tiny-vit --weights random:0"):
        predict(PredictConfig(model=model_dir, workdir=wd, features=other))
    with pytest.raises(RaypathError, match="no feature store .* matches"):
        predict(PredictConfig(model=model_dir, workdir=wd))
    embed(EmbedConfig(workdir=wd, model="tiny-vit"))
    res = predict(PredictConfig(model=model_dir, workdir=wd, heatmaps=1, gallery_tiles=1))
    assert res.metrics["note"].startswith("the cohort has no outcomes") and len(res.predictions) == len(table)
    assert (Path(res.run_dir) / "heatmaps").is_dir()


def test_heatmap_pixels_carry_injected_attention():
    from raypath.predict.heatmap import attention_grid, colorize, overlay

    coords = np.array([[0, 0], [100, 0], [200, 100], [0, 200]], dtype=float)
    values = np.array([0.1, 0.4, 0.2, 0.3])
    grid, origin = attention_grid(coords, 100.0, values)
    assert grid.shape == (3, 3) and tuple(origin) == (0.0, 0.0)
    assert grid[0, 1] == 0.4 and grid[1, 2] == 0.2 and grid[2, 0] == 0.3 and np.isnan(grid[1, 1])
    thumb = np.zeros((30, 30, 3), np.uint8)
    img = overlay(thumb, 0.1, coords, 100.0, values, alpha=1.0)  # 10 thumbnail px per tile
    colours = colorize(values)
    for (x, y), c in zip(coords, colours):
        assert tuple(img[int(y * 0.1) + 5, int(x * 0.1) + 5]) == tuple(c)
    assert tuple(img[15, 15]) == (0, 0, 0)  # no tile there: the thumbnail shows through


def test_bad_model_folder_is_one_sentence(tmp_path, trained):
    import shutil

    from raypath.predict.model import load_final_model

    with pytest.raises(RaypathError, match="not a saved raypath model .*raypath mil --final"):
        load_final_model(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(trained[2], bad)
    (bad / "model.json").write_text("{not json")
    with pytest.raises(RaypathError, match="damaged or incomplete .*model.json"):
        load_final_model(str(bad))
    (bad / "model.json").write_text(json.dumps({"task": "survival"}))
    with pytest.raises(RaypathError, match="damaged or incomplete"):
        load_final_model(str(bad))
    shutil.copy(Path(trained[2]) / "model.json", bad / "model.json")
    (bad / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(RaypathError, match="head.safetensors does not fit"):
        load_final_model(str(bad))


# --------------------------------------------------------------------------- patch classifiers


def _patch_cfg(wd: str, method: str = "linear"):
    from raypath.patch.api import PatchConfig

    return PatchConfig(workdir=wd, synth=True, model="tiny-vit", patch_px=64, mpp=0.5, shift_px=8, methods=[method],
                       seeds=[42], synth_options={"n_domains": 2, "slides_per_domain": 2, "slide_px": 1024,
                                                  "cells_per_slide": 20})


@pytest.fixture(scope="module")
def patch_trained(tmp_path_factory):
    """A final linear probe fitted on the synthetic mitosis study's patches (tiny-vit features)."""
    from raypath.patch.final import fit_final_patch

    wd = str(tmp_path_factory.mktemp("patch_wd"))
    return wd, fit_final_patch(_patch_cfg(wd), name="mito")


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_saved_patch_model_round_trips_with_the_benchmark_probe(patch_trained, method, tmp_path):
    from raypath.patch.api import _features
    from raypath.patch.final import _prepare, fit_final_patch
    from raypath.patch.methods import FitJob, get_method
    from raypath.patch.protocols import Fit
    from raypath.predict.patch_model import load_patch_model, save_patch_model

    wd, model_dir = patch_trained
    cfg = _patch_cfg(wd, method)
    if method != "linear":
        model_dir = fit_final_patch(cfg, name=f"mito-{method}")
    model = load_patch_model(model_dir)
    assert model.kind == "patch" and model.method == method and model.classes == ["imposter", "mitotic_figure"]
    assert model.positive_class == "mitotic_figure" and model.identity["tiling"] == {"target_mpp": 0.5, "tile_px": 64}
    assert model.identity["weights_sha256"] == "random:0" and len(model.trained_slides) == 4
    ctx = _prepare(cfg, None)
    x = _features(cfg, ctx, None)  # cached: not embedded again
    rows = np.arange(len(x))
    fit = Fit("final", "all", method, 1.0, 42, rows, rows[:0], {"all": rows})
    job = FitJob(fit=fit, y=ctx["y"], classes=ctx["classes"], positive=1, cfg=cfg, features=x)
    bench = get_method(method).run(job).probs["all"]  # what the benchmark's probe says on all patches
    np.testing.assert_allclose(model.predict_proba(x), bench, rtol=1e-6, atol=1e-9)
    copy = load_patch_model(save_patch_model(str(tmp_path / "copy"), model))
    np.testing.assert_array_equal(copy.predict_proba(x), model.predict_proba(x))


def test_patch_final_refuses_a_fine_tuned_method_in_one_sentence(tmp_path, capsys):
    from raypath.cli import main

    rc = main(["patch", "--workdir", str(tmp_path), "--synth", "--methods", "lora", "--final"])
    err = capsys.readouterr().err
    assert rc == 2 and "--methods linear" in err and "Traceback" not in err


def test_patch_model_maps_every_tile_and_refuses_other_features(patch_trained, tmp_path, ray_session):
    from PIL import Image

    from raypath.embed.api import EmbedConfig, embed
    from raypath.predict.api import PredictConfig, predict
    from raypath.predict.heatmap import colorize
    from raypath.predict.outputs import _extent
    from raypath.report.folder import Folder
    from raypath.report.index import classify, headline

    wd, model_dir = patch_trained
    new = str(tmp_path / "new")
    res = predict(PredictConfig(model=model_dir, workdir=new, cohort=f"{wd}/mitosis_study/cohort.csv", heatmaps=2,
                                gallery_tiles=1))
    run = Path(res.run_dir)
    tiles = pd.read_parquet(run / "tiles_predictions.parquet")
    assert list(tiles.columns) == ["slide_id", "tile", "x", "y", "prob_imposter", "prob_mitotic_figure"]
    np.testing.assert_allclose(tiles[["prob_imposter", "prob_mitotic_figure"]].sum(axis=1), 1.0)
    pred = pd.read_parquet(run / "predictions.parquet")
    assert pred["trained_on"].all() and set(pred["slide_id"]) == set(tiles["slide_id"])  # the training slides
    one = pred.iloc[0]
    t = tiles[tiles["slide_id"] == one["slide_id"]]
    assert one["n_tiles"] == len(t) and one["mean_prob_mitotic_figure"] == pytest.approx(t["prob_mitotic_figure"].mean())
    area = (64 * 0.5 / 1000) ** 2
    assert one["density_mitotic_figure_per_mm2"] == pytest.approx((t["prob_mitotic_figure"] > 0.5).sum() / (len(t) * area))
    assert len(res.metrics["heatmaps"]) == 2
    for sid in res.metrics["heatmaps"]:  # the tile-resolution map carries each tile's probability (scale [0, 1])
        t = tiles[tiles["slide_id"] == sid]
        grid = np.asarray(Image.open(run / "heatmaps" / f"{sid}_prob_grid.png").convert("RGB"))
        cells = np.rint((t[["x", "y"]].to_numpy() - t[["x", "y"]].to_numpy().min(0)) / _extent(t)).astype(int)
        want = colorize(t["prob_mitotic_figure"].to_numpy(), vmax=1.0)
        np.testing.assert_array_equal(grid[cells[:, 1], cells[:, 0]], want)
        assert (run / "heatmaps" / f"{sid}_prob.png").exists() and (run / "heatmaps" / f"{sid}_prob_gallery.png").exists()
    assert "Probability maps" in (run / "report.html").read_text()
    kind, doc = classify(Folder(str(run)))
    assert kind == "predict" and headline(kind, doc).startswith(f"patch model mito: {len(pred)} slides, {len(tiles)} tiles")
    other = str(embed(EmbedConfig(workdir=new, model="tiny-vit", weights="random:3")).feature_dir)
    with pytest.raises(RaypathError, match="does not match: weights_sha256 .*raypath tile --workdir .* --target-mpp 0.5 "
                                           "--tile-px 64 && raypath embed --workdir .* --model tiny-vit --weights random:0"):
        predict(PredictConfig(model=model_dir, workdir=new, features=other))


def test_probability_overlay_pixels_carry_injected_probabilities():
    from raypath.predict.heatmap import attention_grid, colorize, grid_png, overlay

    coords = np.array([[0, 0], [50, 0], [100, 50]], dtype=float)
    probs = np.array([0.05, 0.5, 0.8])  # the largest is not 1: colours stay on the [0, 1] scale
    img = overlay(np.zeros((20, 30, 3), np.uint8), 0.2, coords, 50.0, probs, alpha=1.0, vmax=1.0)
    want = colorize(probs, vmax=1.0)
    assert not np.array_equal(want, colorize(probs))  # per-slide max scaling would give other colours
    for (x, y), c in zip(coords, want):
        assert tuple(img[int(y * 0.2) + 5, int(x * 0.2) + 5]) == tuple(c)
    import io

    from PIL import Image

    grid, _ = attention_grid(coords, 50.0, probs)
    png = np.asarray(Image.open(io.BytesIO(grid_png(grid, vmax=1.0))).convert("RGB"))
    assert tuple(png[1, 2]) == tuple(want[2]) and tuple(png[1, 0]) == (255, 255, 255)


def test_index_gives_predict_runs_a_kind_and_headline(tmp_path):
    from raypath.report.folder import Folder
    from raypath.report.index import classify, headline

    def run(name: str, doc: dict):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(doc))
        return classify(Folder(str(d)))

    base = {"stage": "predict", "model": "w/models/final", "n_slides": 12, "failed": [{"slide_id": "x", "reason": "r"}]}
    kind, doc = run("surv", {**base, "survival": {"c_index": 0.712, "ci_low": 0.6, "ci_high": 0.8, "n_patients": 10}})
    assert kind == "predict"
    assert headline(kind, doc) == ("model final: C-index 0.712 (95% CI 0.600\u20130.800) on 10 new patients (12 slides "
                                   "scored); 1 slide(s) not scored")
    kind, doc = run("plain", {**base, "failed": [], "note": "the cohort has no outcomes: predictions only"})
    assert headline(kind, doc) == "model final: 12 slides scored, no outcomes"
    kind, doc = run("cls", {**base, "failed": [], "classification": {"auroc": 0.9, "auroc_ci_low": 0.8,
                                                                     "auroc_ci_high": 0.95, "n_slides": 12}})
    assert headline(kind, doc).startswith("model final: AUROC 0.900 (95% CI 0.800\u20130.950) on 12 new slides")


def test_index_lists_runs_of_a_nested_project_apart_from_its_own_tables(tmp_path):
    """The demo's later cohort lives in <workdir>/external/ (a project of its own): the workdir's index links
    its predict run, and never folds it into this project's tables."""
    from raypath.report.pages import write_workdir_report

    run = tmp_path / "external" / "runs" / "predict-final"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"stage": "predict", "model": "w/models/final", "n_slides": 4,
                                                   "failed": [], "survival": {"c_index": 0.7, "ci_low": 0.6,
                                                                              "ci_high": 0.8, "n_patients": 4}}))
    (run / "report.html").write_text("<html>predict page</html>")
    (tmp_path / "runs" / "other").mkdir(parents=True)
    page = Path(write_workdir_report(str(tmp_path))).read_text()
    assert 'href="external/runs/predict-final/report.html"' in page
    assert "C-index 0.700" in page and "external/runs/predict-final" in page
    assert (run / "report.html").read_text() == "<html>predict page</html>"  # its own page is kept
