"""Patch benchmark pieces without slides: metrics = scikit-learn, splits refuse leakage,
fractions nested and stratified, bad annotation files named with file and row, LoRA steps."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.evaluation.splits import LeakageError
from raypath.patch.metrics import bootstrap_weights, evaluate
from raypath.patch.protocols import assign_splits, check_leakage, fit_test_sets, fraction_subsets, plan_fits
from raypath.patch.table import validate_patch_table


# --------------------------------------------------------------------------- metrics


def _sklearn(y, prob, classes, pos):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    pred = np.array(classes)[prob.argmax(1)]
    ref = {"balanced_accuracy": balanced_accuracy_score(y, pred), "accuracy": accuracy_score(y, pred),
           "f1_weighted": f1_score(y, pred, average="weighted"), "kappa": cohen_kappa_score(y, pred)}
    try:
        if len(classes) == 2:
            ref["auroc"] = roc_auc_score(y == pos, prob[:, classes.index(pos)])
        else:
            yi = np.array([classes.index(v) for v in y])
            ref["auroc"] = roc_auc_score(yi, prob, multi_class="ovr", average="macro", labels=list(range(len(classes))))
    except ValueError:  # a class absent from the truth
        ref["auroc"] = float("nan")
    return ref


def test_metrics_equal_sklearn_on_random_cases_with_ties_absent_classes_and_string_labels():
    rng = np.random.default_rng(7)
    n_absent = n_nan_auc = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in range(120):
            k = int(rng.integers(2, 5))
            classes = sorted(["mitotic figure", "imposter", "lymph-ocyte", "Z"][:k])
            present = rng.choice(k, size=int(rng.integers(1 if case % 5 == 0 else 2, k + 1)), replace=False)
            n = int(rng.integers(4, 50))
            y = np.array(classes)[rng.choice(present, n)]
            logits = np.round(rng.normal(size=(n, k)), 1)  # coarse: many tied scores and tied argmaxes
            prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            pos = classes[-1]
            got = evaluate(y, prob, classes, positive=pos, n_boot=0)
            ref = _sklearn(y, prob, classes, pos)
            n_absent += len(present) < k
            for m, v in ref.items():
                if np.isnan(v):
                    n_nan_auc += m == "auroc"
                    assert np.isnan(got[m]), (case, m)
                else:
                    assert got[m] == pytest.approx(v, abs=1e-12), (case, m, got[m], v)
            if np.isnan(got["auroc"]) and len(present) < k:
                assert "absent" in got["auroc_note"] and got["auroc_note"]
    assert n_absent > 10 and n_nan_auc > 5  # the hard cases were exercised


def test_bootstrap_ci_brackets_the_point_estimate_and_slide_resampling_is_wider():
    rng = np.random.default_rng(0)
    n = 400
    slides = np.repeat(np.arange(20), 20)
    effect = rng.normal(0, 1.0, 20)[slides]  # patches of one slide are correlated
    y = (effect + rng.normal(0, 1, n) > 0).astype(int)
    p1 = 1 / (1 + np.exp(-(effect + rng.normal(0, 1, n))))
    prob = np.stack([1 - p1, p1], 1)
    classes = ["a", "b"]
    lab = np.array(classes)[y]
    by_patch = evaluate(lab, prob, classes, positive="b", n_boot=500, seed=1)
    by_slide = evaluate(lab, prob, classes, positive="b", n_boot=500, seed=1, groups=slides)
    for m in ("balanced_accuracy", "auroc"):
        assert by_patch[f"{m}_ci_low"] <= by_patch[m] <= by_patch[f"{m}_ci_high"]
        width = lambda r: r[f"{m}_ci_high"] - r[f"{m}_ci_low"]  # noqa: E731
        assert width(by_slide) > width(by_patch)
    w = bootstrap_weights(10, 50, 0, groups=np.repeat([0, 1], 5))
    assert w.shape == (50, 10) and (w.sum(1) == 10).all()
    assert (w[:, :5] == w[:, [0]]).all()  # a slide's patches are drawn together


# --------------------------------------------------------------------------- splits and fractions


def _table(n_domains=3, patients=5, slides_per_patient=2, cells=8, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_domains):
        for p in range(patients):
            for s in range(slides_per_patient):
                for c in range(cells):
                    sid = f"d{d}p{p}s{s}"
                    rows.append({"patch_id": f"{sid}_{c}", "uri": "x.svs", "label": ["mit", "imp"][int(rng.random() < 0.6)],
                                 "domain": f"dom{d}", "slide_id": sid, "patient_id": f"d{d}p{p}", "x": 10.0, "y": 10.0})
    return validate_patch_table(pd.DataFrame(rows))


def test_patient_split_never_shares_a_patient_or_slide_and_a_cell_split_is_refused():
    t = _table()
    split = assign_splits(t, 0.2, 0.2, seed=3)
    assert set(split) == {"train", "val", "test"}
    for col in ("patient_id", "slide_id"):
        assert (pd.DataFrame({"id": t[col], "s": split}).groupby("id")["s"].nunique() == 1).all()
    for dom in t["domain"].unique():  # every domain has test and val patients
        assert {"train", "val", "test"} <= set(split[t["domain"].to_numpy() == dom])
    by_cell = np.where(np.arange(len(t)) % 5 == 0, "test", "train")  # the original study's split by cell
    with pytest.raises(LeakageError, match="split by patient"):
        check_leakage(t, by_cell)
    t2 = t.assign(split=by_cell)
    with pytest.raises(RaypathError, match="slide"):
        assign_splits(t2)
    # a split by slide that still cuts a patient is refused too
    by_slide = np.where(t["slide_id"].str.endswith("s1"), "test", "train")
    with pytest.raises(LeakageError, match="patient"):
        check_leakage(t, by_slide)


def test_fractions_are_nested_stratified_and_keep_two_per_class():
    t = _table(patients=6, cells=20, seed=1)
    labels, domains = t["label"].to_numpy(str), t["domain"].to_numpy(str)
    rows = np.flatnonzero(np.arange(len(t)) % 3 != 0)
    fr = [0.001, 0.01, 0.1, 0.5, 1.0]
    sub = fraction_subsets(rows, labels, domains, fr, seed=42)
    for small, big in zip(fr, fr[1:]):
        assert set(sub[small]) <= set(sub[big])
    assert set(sub[1.0]) == set(rows)
    for f in fr:
        got = sub[f]
        for lab in set(labels):
            assert (labels[got] == lab).sum() >= 2
        if f >= 0.1:
            for key in set(zip(labels[rows], domains[rows])):
                n_s = ((labels[rows] == key[0]) & (domains[rows] == key[1])).sum()
                k = ((labels[got] == key[0]) & (domains[got] == key[1])).sum()
                assert k == max(int(np.floor(f * n_s + 0.5)), k if k <= 2 else 0)
    assert len(sub[0.001]) == 4  # 2 per class
    again = fraction_subsets(rows, labels, domains, fr, seed=42)
    other = fraction_subsets(rows, labels, domains, fr, seed=43)
    assert all((again[f] == sub[f]).all() for f in fr)
    assert not (set(other[0.1]) == set(sub[0.1]))


def test_plan_lists_scaling_domain_and_lodo_fits_with_disjoint_train_and_test():
    t = _table()
    split = assign_splits(t)
    fits = plan_fits(t, split, ["linear", "lora"], ["scaling", "domain", "lodo"], [0.1, 1.0], [42, 43], [1.0])
    keys = [f.key for f in fits]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2 + 3 * 2 * 2 + 3 * 2 * 2
    dom = t["domain"].to_numpy()
    for f in fits:
        test_rows = np.concatenate(list(fit_test_sets(f).values()))
        assert not set(f.train) & set(test_rows) and not set(f.val) & set(test_rows)
        vals = {n: r for n, r in f.evals.items() if n.startswith("val:")}  # what a sweep selects on
        assert set(vals) | set(fit_test_sets(f)) == set(f.evals) and (vals["val:all"] == f.val).all()
        assert set(split[vals["val:all"]]) == {"val"} and not set(vals["val:all"]) & set(f.train)
        assert {n.removeprefix("val:") for n in vals} - {"all"} == set(dom[f.val])
        if f.protocol == "domain":
            assert set(dom[f.train]) == {f.train_on}
        if f.protocol == "lodo":
            assert f.train_on.removeprefix("all-but-") not in set(dom[f.train])


# --------------------------------------------------------------------------- bad input


def test_patch_table_problems_are_all_named_with_rows():
    t = _table(n_domains=1, patients=1, slides_per_patient=1, cells=4)
    t.loc[1, "patch_id"] = t.loc[0, "patch_id"]
    t["x"] = t["x"].astype(object)
    t.loc[2, "x"] = "left"
    with pytest.raises(RaypathError) as ei:
        validate_patch_table(t, source="cells.csv")
    msg = str(ei.value)
    assert "cells.csv" in msg and "duplicate `patch_id`" in msg and "rows 1, 2" in msg
    assert "`x` not a number" in msg and "row 3" in msg
    with pytest.raises(RaypathError, match="missing required column.*domain"):
        validate_patch_table(t.drop(columns="domain"), source="cells.csv")


def test_bad_annotation_files_name_the_file_and_the_row(tmp_path):
    from raypath.patch.builders import from_point_annotations

    bad_json = tmp_path / "midog.json"
    bad_json.write_text('{"images": [{"id": 1, "file_name": "a.tiff"}], "annotations": [\n  {"bbox": [1, 2, 3, 4],}\n]}')
    with pytest.raises(RaypathError, match=r"midog.json.*not valid JSON \(line 2"):
        from_point_annotations(str(bad_json))
    doc = {"images": [{"id": 1, "file_name": "a.tiff"}], "categories": [{"id": 1, "name": "mitotic figure"}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]},
                           {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50]}]}
    bad_json.write_text(json.dumps(doc))
    with pytest.raises(RaypathError, match=r"midog.json.*annotations entry 2 \(id 11\).*bbox"):
        from_point_annotations(str(bad_json))
    doc["annotations"][1] = {"id": 11, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5]}
    bad_json.write_text(json.dumps(doc))
    with pytest.raises(RaypathError, match=r"entry 2 \(id 11\) names image_id 7"):
        from_point_annotations(str(bad_json))
    slides = tmp_path / "slides.csv"
    slides.write_text("slide_id,uri,patient_id,cohort\ns1,s1.svs,p1,A\n")
    bad_csv = tmp_path / "cells.csv"
    bad_csv.write_text("slide_id,x,y,label\ns1,10,10,mitosis\ns1,abc,12,imposter\n")
    with pytest.raises(RaypathError, match=r"cells.csv.*`x` is not a number.*row 2 \(slide_id s1\)"):
        from_point_annotations(str(bad_csv), str(slides))
    bad_csv.write_text("slide_id,x,y,label\ns1,10,10,mitosis\ns9,11,12,imposter\n")
    with pytest.raises(RaypathError, match=r"cells.csv.*not in the slide table.*row 2 \(slide 's9'\)"):
        from_point_annotations(str(bad_csv), str(slides))


def test_cli_reports_a_bad_annotation_file_without_traceback(tmp_path, capsys):
    from raypath.cli import main

    bad = tmp_path / "ann.json"
    bad.write_text("{not json")
    rc = main(["patch", "--workdir", str(tmp_path / "w"), "--annotations", str(bad), "--methods", "linear"])
    err = capsys.readouterr().err
    assert rc == 2 and "ann.json" in err and "Traceback" not in err


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("tuning", ["lora", "dora"])
def test_an_adapter_step_changes_only_adapter_and_head_weights(tuning):
    import torch

    from raypath.patch.nets import augment, build_fm_net

    net = build_fm_net("tiny-vit", "random", tuning, n_out=1, seed=0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = augment(torch.randint(0, 255, (4, 40, 40, 3), dtype=torch.uint8), 32, 4, gen, torch.device("cpu"))
    net.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    loss.backward()
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(n.startswith("head.") for n in changed) and any("lora_" in n for n in changed)
    frozen = [n for n in before if n not in trainable]
    assert len(frozen) > 10 and not (set(frozen) & changed)


def test_methods_are_pluggable():
    from raypath.patch.methods import METHODS, FitResult, get_method, register_method

    class Majority:
        name, description, inputs = "majority-test", "predicts the most frequent training class", "features"

        def run(self, job):
            k = np.bincount(job.y[job.fit.train], minlength=len(job.classes))
            return FitResult({n: np.tile(k / k.sum(), (len(r), 1)) for n, r in job.fit.evals.items()})

    try:
        register_method(Majority())
        assert get_method("majority-test").inputs == "features"
        with pytest.raises(ValueError, match="already registered"):
            register_method(Majority())
    finally:
        METHODS.pop("majority-test", None)
    with pytest.raises(RaypathError, match="unknown patch method"):
        get_method("majority-test")


def test_the_lora_claim_is_checked_per_seed_and_not_judged_at_chance_level():
    from raypath.patch.outputs import headline_sentences, lora_check

    def table(small, full):
        rows = [{"protocol": "scaling", "test_on": "all", "method": "lora", "fraction": f, "seed": s,
                 "balanced_accuracy": v} for f, vals in ((0.1, small), (1.0, full)) for s, v in zip((42, 43), vals)]
        return pd.DataFrame(rows)

    ok = lora_check(table([0.88, 0.90], [0.90, 0.91]), "balanced_accuracy")
    assert ok["testable"] and ok["holds"] and ok["ratio_min"] == pytest.approx(0.88 / 0.90)
    no = lora_check(table([0.70, 0.80], [0.90, 0.90]), "balanced_accuracy")
    assert no["testable"] and not no["holds"] and no["ratio_mean"] == pytest.approx(0.75 / 0.9)
    noise = lora_check(table([0.55, 0.52], [0.50, 0.53]), "balanced_accuracy")
    assert not noise["testable"] and not noise["holds"]  # ratio > 1, but both at chance
    line = headline_sentences({"metric": "balanced_accuracy", "lora_10pct": {"lora": noise}})[0]
    assert "cannot be tested here" in line
    assert "does not hold" in headline_sentences({"metric": "balanced_accuracy", "lora_10pct": {"lora": no}})[0]


def test_tiles_with_a_label_column_become_patches_centred_on_each_tile(tmp_path):
    from raypath.patch.builders import from_tiles

    wd = tmp_path / "wd"
    wd.mkdir()
    slides = pd.DataFrame({"slide_id": ["s1", "s2"], "uri": ["/d/s1.svs", "/d/s2.svs"], "patient_id": ["p1", "p2"],
                           "cohort": ["A", "B"], "level_downsamples": [[1.0, 4.0], [1.0, 4.0]]})
    slides.to_parquet(wd / "slides.parquet")
    tiles = pd.DataFrame({"slide_id": ["s1", "s1", "s2"], "tile_id": [0, 1, 0], "x": [0, 896, 0], "y": [0, 0, 448],
                          "level": [1, 1, 0], "read_px": [56, 56, 224], "tile_px": [224, 224, 224],
                          "target_mpp": [0.5, 0.5, 0.5], "tissue_fraction": [1.0, 1.0, 1.0],
                          "grade": ["tumour", None, "stroma"]})
    tiles.to_parquet(wd / "tiles.parquet")
    t = from_tiles(str(wd), label_column="grade")
    assert list(t["patch_id"]) == ["s1_t0", "s2_t0"]  # unlabelled tiles are left out
    assert list(t["x"]) == [112.0, 112.0] and list(t["y"]) == [112.0, 560.0]  # centre: read_px x downsample / 2
    assert list(t["domain"]) == ["A", "B"] and list(t["mpp"]) == [0.5, 0.5]
    with pytest.raises(RaypathError, match="no column 'label'"):
        from_tiles(str(wd))


def test_an_image_folder_per_class_becomes_a_table_and_a_patch_cache(tmp_path):
    from PIL import Image

    from raypath.patch.builders import from_image_folder
    from raypath.patch.images import Geometry, build_patch_cache

    rng = np.random.default_rng(0)
    for dom in ("siteA", "siteB"):
        for lab in ("mitosis", "imposter"):
            (tmp_path / "imgs" / dom / lab).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / dom / lab / f"c{i}.png")
    t = from_image_folder(str(tmp_path / "imgs"), domain_level=True)
    assert len(t) == 8 and set(t["domain"]) == {"siteA", "siteB"} and set(t["label"]) == {"mitosis", "imposter"}
    assert t["slide_id"].is_unique  # without a groups table every image is its own slide
    cache = build_patch_cache(t, Geometry(patch_px=16, mpp=0.5, shift_px=2), str(tmp_path / "cache"))
    assert cache.images.shape == (8, 20, 20, 3) and cache.centre(np.arange(8)).shape == (8, 16, 16, 3)
    with pytest.raises(RaypathError, match="is not at <label>/<image>"):
        from_image_folder(str(tmp_path / "imgs"))
