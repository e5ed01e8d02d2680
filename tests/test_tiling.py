"""Tiling: level/mpp math, grid, tissue fraction, segmentation, and the stage on Ray (local + S3)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_slides import render, tissue_slide

from raypath.wsi.tiling import (
    ResolutionError,
    TileConfig,
    choose_level,
    plan_slide,
    tile,
    tile_grid,
    tile_slide,
    tissue_fractions,
)
from raypath.wsi.tissue import rgb_to_saturation_value, tissue_mask

# ----------------------------------------------------------------------------- level / mpp


@pytest.mark.parametrize(
    "mpp0, downs, target, expected",
    [
        (0.25, [1, 4, 16], 0.5, (0, 448)),  # 40x tiled at 20x-equivalent: read 448, resize to 224
        (0.5, [1, 4, 16], 0.5, (0, 224)),  # 20x at 0.5: native
        (0.499, [1.0], 0.5, (0, 224)),  # CMU: within tolerance, no resize
        (0.25, [1, 2, 4], 0.5, (1, 224)),  # a 2x level exists: read it natively
        (0.5, [1, 4, 16], 1.0, (0, 448)),  # 20x at 1.0 mpp
        (0.5, [1, 2, 8], 1.0, (1, 224)),
        (0.25, [1, 4, 16], 2.0, (1, 448)),  # coarsest level still fine enough is level 1 (1.0 um/px)
        (0.2527, [1, 4.0003, 16.001], 0.5, (0, 443)),  # odd scanner mpp: read size follows
    ],
)
def test_choose_level(mpp0, downs, target, expected):
    assert choose_level(mpp0, downs, target, tile_px=224) == expected


def test_choose_level_never_reads_coarser_than_target():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mpp0 = rng.uniform(0.1, 0.6)
        downs = np.cumprod([1] + list(rng.choice([2, 4], size=rng.integers(0, 4)))).tolist()
        target = rng.uniform(mpp0, 4.0)
        level, read_px = choose_level(mpp0, downs, target, tile_px=224, mpp_tolerance=0.1)
        level_mpp = mpp0 * downs[level]
        assert level_mpp <= target * 1.1
        # no finer level was chosen when a coarser one would do
        coarser = [d for d in downs if mpp0 * d <= target * 1.1 and d > downs[level]]
        assert not coarser
        # the read square covers the tile's field of view (um) within the tolerance
        assert read_px * level_mpp == pytest.approx(224 * target, rel=0.1)


def test_slide_coarser_than_target_is_refused_unless_upsampling():
    with pytest.raises(ResolutionError, match="allow-upsample"):
        choose_level(1.0, [1, 4], 0.5, tile_px=224)
    assert choose_level(1.0, [1, 4], 0.5, tile_px=224, allow_upsample=True) == (0, 112)


def test_plan_slide_stride_and_overlap_in_level0_px():
    cfg = TileConfig(workdir="x", target_mpp=0.5, tile_px=224, overlap_px=56)
    plan = plan_slide(0.25, [1, 4, 16], cfg)
    assert (plan.level, plan.read_px, plan.tile_l0_px) == (0, 448, 448)
    assert plan.stride_l0_px == pytest.approx((224 - 56) * 2)
    plan = plan_slide(0.25, [1, 2, 8], TileConfig(workdir="x", stride_px=112))
    assert (plan.level, plan.read_px, plan.tile_l0_px, plan.stride_l0_px) == (1, 224, 448, 224)


def test_config_rejects_inconsistent_stride_and_overlap():
    with pytest.raises(ValueError, match="stride_px or overlap_px"):
        TileConfig(workdir="x", stride_px=200, overlap_px=10)
    with pytest.raises(ValueError, match="smaller than tile_px"):
        TileConfig(workdir="x", overlap_px=224)


# ----------------------------------------------------------------------------- grid


def test_tile_grid_fits_inside_and_is_row_major():
    x, y = tile_grid(1000, 500, 224, 224)
    assert sorted(set(x.tolist())) == [0, 224, 448, 672]
    assert sorted(set(y.tolist())) == [0, 224]
    assert len(x) == 8
    assert (x + 224 <= 1000).all() and (y + 224 <= 500).all()
    order = np.lexsort((x, y))  # sort by y, then x
    assert (order == np.arange(len(x))).all()


def test_tile_grid_with_overlap_and_small_slides():
    x, y = tile_grid(1000, 224, 224, 112)  # 50 % overlap
    assert x.tolist() == [0, 112, 224, 336, 448, 560, 672] and set(y.tolist()) == {0}
    x, y = tile_grid(200, 1000, 224, 224)
    assert len(x) == 0 and len(y) == 0


# ----------------------------------------------------------------------------- tissue fraction


def test_tissue_fraction_on_half_mask():
    mask = np.zeros((10, 20), bool)
    mask[:, :10] = True  # left half tissue; 1 mask px = 10 level-0 px
    x = np.array([0, 150, 50, 95])
    y = np.array([0, 0, 0, 0])
    frac = tissue_fractions(mask, 10.0, 10.0, x, y, 100)
    assert frac.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.05])


def test_tissue_fraction_matches_brute_force_at_subpixel_positions():
    rng = np.random.default_rng(1)
    mask = rng.random((12, 16)) < 0.4
    ds = 8  # level-0 px per mask px
    full = np.kron(mask, np.ones((ds, ds), bool))  # the mask at level-0 resolution
    x = rng.integers(0, 16 * ds - 20, 50)
    y = rng.integers(0, 12 * ds - 20, 50)
    got = tissue_fractions(mask, ds, ds, x, y, 20)
    want = [full[j : j + 20, i : i + 20].mean() for i, j in zip(x, y)]
    assert got == pytest.approx(np.array(want), abs=1e-6)


# ----------------------------------------------------------------------------- segmentation


def test_tissue_mask_finds_tissue_and_excludes_pen_and_glass():
    img = render(400, 300, [(0.35, 0.5, 0.2, 0.3)], seed=3)
    img[40:60, 250:390] = (30, 60, 170)  # blue marker
    img[100:115, 250:390] = (40, 150, 60)  # green marker
    img[200:215, 250:390] = (20, 20, 20)  # black marker
    mask = tissue_mask(img, thumb_mpp=None)
    yy, xx = np.mgrid[0:300, 0:400]
    blob = ((xx - 140) / 80.0) ** 2 + ((yy - 150) / 90.0) ** 2 <= 0.9
    assert mask[blob].mean() > 0.98
    assert not mask[40:60, 250:390].any()
    assert not mask[100:115, 250:390].any()
    assert not mask[200:215, 250:390].any()
    assert mask[:, 300:].mean() < 0.01  # glass right of the blob


def test_blank_slide_has_no_tissue():
    assert not tissue_mask(render(300, 200, [], seed=4)).any()


def test_small_debris_removed_by_physical_area():
    img = render(400, 300, [(0.3, 0.5, 0.2, 0.3)], seed=5)
    img[20:27, 350:357] = (205, 120, 170)  # 7x7 px speck
    at_10um = tissue_mask(img, thumb_mpp=10.0)  # speck ~4900 um^2: debris on a 4x3 mm slide
    assert not at_10um[20:27, 350:357].any()
    assert at_10um[150, 120]  # the big piece stays
    at_100um = tissue_mask(img, thumb_mpp=100.0)  # speck ~0.5 mm^2: a real piece
    assert at_100um[22:25, 352:355].all()


def test_pen_stroke_over_tissue_is_excluded():
    img = render(400, 300, [(0.5, 0.5, 0.35, 0.4)], seed=6)
    yy, xx = np.mgrid[0:300, 0:400]
    stroke = np.abs(yy - 0.6 * xx - 20) < 6  # a diagonal stroke from glass across the tissue
    img[stroke] = (40, 50, 150)
    mask = tissue_mask(img, thumb_mpp=8.0)
    assert not mask[stroke].any()
    blob = ((xx - 200) / 140.0) ** 2 + ((yy - 150) / 120.0) ** 2 <= 0.8
    assert mask[blob & ~stroke].mean() > 0.9


# ----------------------------------------------------------------------------- one slide, no Ray


def test_tile_slide_40x_reads_level0_and_resizes(tmp_path):
    path = tissue_slide(tmp_path / "s40.svs", width=2048, height=1536, mpp=0.25, app_mag=40)
    row = {"slide_id": "s40", "uri": str(path), "mpp_x": 0.25, "level_downsamples": [1.0, 4.0]}
    cfg = TileConfig(workdir=str(tmp_path), target_mpp=0.5, tile_px=224)
    tiles, summary = tile_slide(row, cfg)
    df = tiles.to_pandas()
    assert summary["status"] == "ok" and summary["n_tiles"] == len(df) > 0
    assert (df["level"] == 0).all() and (df["read_px"] == 448).all() and (df["tile_px"] == 224).all()
    assert df["tile_id"].tolist() == list(range(len(df)))
    assert (df["tissue_fraction"] >= 0.6).all()
    assert (df["x"] % 448 == 0).all() and (df["x"] + 448 <= 2048).all()
    assert (tmp_path / "qc" / "s40.png").exists()


def _tile_is_tissue(slide, x, y, level, read_px) -> float:
    region = np.asarray(slide.read_region((int(x), int(y)), int(level), (int(read_px), int(read_px))).convert("RGB"))
    sat, val = rgb_to_saturation_value(region)
    return float(((sat > 0.1) | (val < 0.75)).mean())


def test_real_cmu_slide_tiles_sit_on_tissue(cmu_slide, tmp_path):
    import tiffslide

    row = {"slide_id": "cmu", "uri": str(cmu_slide), "mpp_x": 0.499, "level_downsamples": [1.0]}
    tiles, summary = tile_slide(row, TileConfig(workdir=str(tmp_path)))
    df = tiles.to_pandas()
    assert summary["status"] == "ok" and len(df) >= 20
    assert (df["read_px"] == 224).all()  # 0.499 um/px counts as 0.5
    with tiffslide.TiffSlide(str(cmu_slide)) as slide:
        cover = [_tile_is_tissue(slide, r.x, r.y, r.level, r.read_px) for r in df.itertuples()]
        # and glass is glass: the top-left corner of the slide is empty
        glass = _tile_is_tissue(slide, 0, 0, 0, 224)
    assert min(cover) > 0.5, cover
    assert glass < 0.1
    qc = Image.open(tmp_path / "qc" / "cmu.png")
    assert qc.size[0] > 500 and qc.mode == "RGB"


# ----------------------------------------------------------------------------- stage errors


def test_tile_without_ingest_names_the_remedy(tmp_path):
    from raypath.errors import RaypathError

    with pytest.raises(RaypathError, match="raypath ingest"):
        tile(TileConfig(workdir=str(tmp_path)))
