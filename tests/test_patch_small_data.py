"""Small data sets stop with one sentence naming the input, what is too small and the remedy
(not a scikit-learn traceback), and splits of small but sufficient tables never crash."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypath.errors import RaypathError
from raypath.patch.protocols import assign_splits, check_leakage, check_training_counts, plan_fits


def _folder(root, per_class: int, classes=("mitosis", "imposter"), domains: tuple[str, ...] | None = None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for dom in domains or ("",):
        for lab in classes:
            d = root / dom / lab
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"c{i}.png")
    return str(root)


def test_a_tiny_image_folder_stops_with_one_line_naming_the_input_and_the_remedy(tmp_path, capsys):
    from raypath.cli import main

    folder = _folder(tmp_path / "imgs", per_class=2)
    rc = main(["patch", "--workdir", str(tmp_path / "w"), "--image-folder", folder, "--model", "tiny-vit",
               "--methods", "linear", "--patch-px", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"--image-folder {folder}" in err and "per class" in err and "'mitosis': 2" in err
    assert "add patches" in err and "ValueError" not in err


def test_a_domain_with_too_few_patients_is_named(tmp_path, capsys):
    from raypath.cli import main

    folder = _folder(tmp_path / "imgs", per_class=1, domains=("siteA",))
    _folder(tmp_path / "imgs", per_class=4, domains=("siteB",))
    rc = main(["patch", "--workdir", str(tmp_path / "w"), "--image-folder", folder, "--domain-level",
               "--model", "tiny-vit", "--methods", "linear", "--patch-px", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "domain 'siteA' has 2 patient(s)" in err and "Traceback" not in err


def _images_table(per_class: int, n_classes: int = 2) -> pd.DataFrame:
    rows = [{"patch_id": f"{c}{i}", "uri": f"{c}{i}.png", "label": f"class{c}", "domain": "all",
             "slide_id": f"{c}{i}", "patient_id": f"{c}{i}"} for c in range(n_classes) for i in range(per_class)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("per_class", [3, 4, 5, 6])
def test_small_but_sufficient_tables_split_without_a_scikit_learn_crash(per_class):
    t = _images_table(per_class)
    for seed in range(6):
        split = assign_splits(t, 0.2, 0.2, seed=seed)  # used to raise sklearn's "n_splits=... cannot be greater"
        check_leakage(t, split)
        assert {"train", "val", "test"} <= set(split)
        try:
            check_training_counts(t, split, 2, "--image-folder x", seed)
        except RaypathError as e:
            assert "--image-folder x" in str(e) and "training patch(es)" in str(e) and "--split-seed" in str(e)


def test_a_training_domain_with_one_class_is_refused_before_any_fit():
    t = _images_table(6)
    t.loc[t["label"] == "class1", "domain"] = "other"
    t.loc[t.index[:3], "domain"] = "other"  # domain 'all' keeps class0 only
    split = np.where(np.arange(len(t)) % 4 == 0, "test", "train")
    with pytest.raises(RaypathError, match=r"protocol 'domain'.*'all'.*only class"):
        plan_fits(t, split, ["linear"], ["scaling", "domain"], [1.0], [42], [1.0])
