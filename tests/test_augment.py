"""Augmentation levels, strength interpolation, scaling, pathology axes, preview."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raypath.adapt import augment as A
from raypath.errors import RaypathError

HE_PNG = Path(A.__file__).resolve().parents[1] / "data" / "he_target_1000.png"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """24 real H&E tiles, 64 px, uint8 [B, H, W, 3]."""
    im = np.asarray(Image.open(HE_PNG).convert("RGB"))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(24):
        y, x = rng.integers(0, im.shape[0] - 128), rng.integers(0, im.shape[1] - 128)
        out.append(np.asarray(Image.fromarray(im[y : y + 128, x : x + 128]).resize((64, 64), Image.BILINEAR)))
    return np.stack(out)


def _identity_params() -> A.AugmentParams:
    return dataclasses.replace(
        A.LEVELS["strong"], global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), aspect=(1.0, 1.0), flip_p=0.0,
        jitter_p=0.0, gray_p=0.0, blur_p=0.0, hed_p=0.0, wb_p=0.0, gamma_p=0.0, jpeg_p=0.0,
    )


def test_strength_endpoints_and_anchors_are_the_levels():
    assert A.params_for(strength=0.0) == A.LEVELS["weak"]
    assert A.params_for(strength=1.0) == A.LEVELS["max"]
    for s, name in [(1 / 3, "strong"), (2 / 3, "heavy")]:
        got, want = A.params_for(strength=s).to_dict(), A.LEVELS[name].to_dict()
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, atol=1e-9, err_msg=k)
    mid = A.params_for(strength=0.5)  # halfway between strong and heavy
    assert mid.brightness == pytest.approx((0.4 + 0.7) / 2)
    assert mid.gray_p == pytest.approx((0.2 + 0.3) / 2)
    assert A.params_for("heavy") == A.params_for() == A.LEVELS["heavy"]  # paper default


def test_paper_table_values():
    t = {n: (p.brightness, p.contrast, p.saturation, p.jitter_p, p.gray_p, p.blur_p) for n, p in A.LEVELS.items()}
    assert t["strong"] == (0.4, 0.4, 0.3, 0.8, 0.2, 0.5)
    assert t["heavy"] == (0.7, 0.7, 0.7, 0.9, 0.3, 0.6)
    assert t["max"] == (0.9, 0.9, 0.9, 0.9, 0.3, 0.8)
    assert A.LEVELS["weak"].global_scale == (0.9, 1.0) and A.LEVELS["weak"].jitter_p == 1.0


def test_bad_level_and_strength_are_user_errors():
    with pytest.raises(RaypathError, match="strength"):
        A.params_for(strength=1.5)
    with pytest.raises(RaypathError, match="unknown augmentation level"):
        A.params_for("extreme")


def _photometric_change(tiles: np.ndarray, prm: A.AugmentParams) -> float:
    """Mean |view - tile| with geometry switched off (same crop, no flips)."""
    prm = dataclasses.replace(prm, global_scale=(1.0, 1.0), aspect=(1.0, 1.0), flip_p=0.0)
    x01 = A.to_unit_float(torch.as_tensor(tiles))
    diffs = []
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        v = A.augment(x01, prm, 64, prm.global_scale, gen)
        diffs.append(float((v - x01).abs().mean()))
    return float(np.mean(diffs))


def test_magnitude_grows_with_level_and_strength(tiles):
    by_level = [_photometric_change(tiles, A.LEVELS[n]) for n in ("weak", "strong", "heavy", "max")]
    assert by_level == sorted(by_level) and len(set(by_level)) == 4, by_level
    by_strength = [_photometric_change(tiles, A.params_for(strength=s)) for s in (0.0, 0.5, 1.0)]
    assert by_strength[0] < by_strength[1] < by_strength[2]
    assert _photometric_change(tiles, _identity_params()) < 1e-5


def test_views_are_scaled_then_normalised(tiles):
    """Identity augmentation must give exactly (tile/255 - mean)/std: the
    original code forgot the /255."""
    mc = A.MultiCrop(_identity_params(), 64, 64, MEAN, STD, n_global=1, n_local=0)
    (v,) = mc(tiles, torch.Generator().manual_seed(0))
    want = (tiles.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(v.permute(0, 2, 3, 1).numpy(), want, atol=1e-4)
    assert float(v.abs().max()) < 3.0  # 0..255 inputs would give values ~1000


def test_multicrop_shapes_and_determinism(tiles):
    g, l = A.crop_sizes(64, 4)
    assert (g, l) == (64, 28)
    assert A.crop_sizes(224, 14) == (224, 98)
    assert A.crop_sizes(224, 16) == (224, 96)
    mc = A.MultiCrop(A.params_for("max"), g, l, MEAN, STD)
    a = mc(tiles[:4], torch.Generator().manual_seed(1))
    b = mc(torch.as_tensor(tiles[:4]), torch.Generator().manual_seed(1))
    assert len(a) == 10
    assert [tuple(x.shape) for x in a] == [(4, 3, 64, 64)] * 2 + [(4, 3, 28, 28)] * 8
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    c = mc(tiles[:4], torch.Generator().manual_seed(2))
    assert not torch.allclose(a[0], c[0])
    # de-normalised views lie in [0, 1]
    for x in a:
        d = A.denormalise(x, MEAN, STD)
        assert float(d.min()) >= -1e-5 and float(d.max()) <= 1 + 1e-5


def test_multicrop_rejects_float_input():
    with pytest.raises(RaypathError, match="uint8"):
        A.MultiCrop(A.LEVELS["weak"], 32, 16, MEAN, STD)(np.zeros((2, 32, 32, 3), np.float32), torch.Generator())


def test_hed_matches_skimage_and_jitter_keeps_shape_and_range(tiles):
    from skimage.color import hed2rgb, rgb2hed

    x01 = A.to_unit_float(torch.as_tensor(tiles[:3])).double()
    hed = A.rgb_to_hed(x01)
    ref = np.stack([rgb2hed(t) for t in tiles[:3]]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(hed.numpy(), ref, atol=1e-6)
    back = A.hed_to_rgb(hed)
    ref_back = np.stack([hed2rgb(h) for h in ref.transpose(0, 2, 3, 1)]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(back.numpy(), ref_back, atol=1e-6)
    exact = A.hed_to_rgb(A.rgb_to_hed(x01, clip=False))
    np.testing.assert_allclose(exact.numpy(), x01.numpy(), atol=1e-6)  # round trip
    x = x01.float()
    out = A.hed_jitter(x, 1.0, 0.2, 0.04, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - x).abs().mean()) > 0.005
    assert torch.equal(A.hed_jitter(x, 0.0, 0.2, 0.04, torch.Generator()), x)
    torch.testing.assert_close(A.hed_jitter(x, 1.0, 0.0, 0.0, torch.Generator()), x, atol=1e-5, rtol=0)


def test_blur_and_jpeg_axes(tiles):
    x = A.to_unit_float(torch.as_tensor(tiles[:4]))
    gen = torch.Generator().manual_seed(0)
    blurred = A.gaussian_blur(x, 1.0, (2.0, 2.0), gen)
    assert blurred.shape == x.shape
    # blur removes high-frequency detail: neighbour differences shrink
    grad = lambda t: float((t[..., 1:] - t[..., :-1]).abs().mean())  # noqa: E731
    assert grad(blurred) < 0.6 * grad(x)
    torch.testing.assert_close(blurred.mean((2, 3)), x.mean((2, 3)), atol=0.02, rtol=0)
    low = A.jpeg_roundtrip(x, 1.0, (5, 5), gen)
    high = A.jpeg_roundtrip(x, 1.0, (100, 100), gen)
    assert float((low - x).abs().mean()) > float((high - x).abs().mean())
    assert torch.equal(A.jpeg_roundtrip(x, 0.0, (5, 5), gen), x)


def test_color_jitter_hue_roundtrip():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(A._hsv_to_rgb(A._rgb_to_hsv(x)), x, atol=1e-5, rtol=0)


def test_augment_preview_cli_writes_png(tmp_path, cmu_slide):
    from raypath.cli import main

    out = tmp_path / "preview.png"
    rc = main(["augment-preview", "--out", str(out), "--strengths", "weak", "0.5", "max", "--n-tiles", "1", "--n-views", "2", "--view-px", "48"])
    assert rc == 0
    im = Image.open(out)
    left, top = 150, 24  # row and column labels (augment.label_grid)
    assert im.size == (left + 3 * 48 + 2 * 2, top + 3 * 48 + 2 * 4)
    out2 = tmp_path / "slide.png"
    assert main(["augment-preview", "--out", str(out2), "--slide", str(cmu_slide), "--strengths", "heavy", "--n-tiles", "2", "--n-views", "1", "--view-px", "32"]) == 0
    assert Image.open(out2).size == (left + 2 * 32 + 2, top + 2 * 32)
    assert main(["augment-preview", "--out", str(out2), "--strengths", "bogus"]) == 2
