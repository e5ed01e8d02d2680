"""The tile reader: same pixels as read_region, each stored tile decoded once, local == S3."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tiffslide

from embed_helpers import grid_tiles, reference_tile, write_slide
from raypath.errors import RaypathError
from raypath.wsi.reader import SlideReader, read_tiles


def _collect(it):
    ids, imgs = [], []
    for tid, im in it:
        ids.append(tid)
        imgs.append(im)
    return np.concatenate(ids), np.concatenate(imgs)


def _max_diff_vs_tiffslide(path, tiles, ids, imgs):
    slide = tiffslide.TiffSlide(str(path))
    worst = 0
    by_id = {int(t): i for i, t in enumerate(ids)}
    for r in tiles.itertuples(index=False):
        ref = reference_tile(slide, r.x, r.y, r.level, r.read_px, r.tile_px)
        got = imgs[by_id[int(r.tile_id)]]
        assert got.shape == ref.shape
        worst = max(worst, int(np.abs(got.astype(int) - ref.astype(int)).max()))
    slide.close()
    return worst


def test_real_cmu_slide_equals_read_region_including_edges(cmu_slide):
    # offset grid so tiles straddle stored-tile borders and the slide's edges
    tiles = grid_tiles("cmu", 2220, 2967, read_px=300, tile_px=300, start=(-60, -37), stride_px=400)
    ids, imgs = _collect(read_tiles(str(cmu_slide), tiles, batch_tiles=7))
    assert sorted(ids.tolist()) == tiles["tile_id"].tolist()
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (300, 300, 3)
    assert _max_diff_vs_tiffslide(cmu_slide, tiles, ids, imgs) <= 1
    # outside the slide is black, like tiffslide's padding
    first = imgs[list(ids).index(0)]
    assert first[:37, :60].max() == 0


def test_real_cmu_slide_equals_openslide(cmu_slide):
    openslide = pytest.importorskip("openslide")
    tiles = grid_tiles("cmu", 2220, 2967, read_px=224, tile_px=224, start=(16, 8), stride_px=700)
    ids, imgs = _collect(read_tiles(str(cmu_slide), tiles))
    s = openslide.OpenSlide(str(cmu_slide))
    for r in tiles.itertuples(index=False):
        ref = np.asarray(s.read_region((r.x, r.y), 0, (224, 224)).convert("RGB"))
        got = imgs[list(ids).index(r.tile_id)]
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_pyramid_level_and_resize_follow_the_contract(tmp_path):
    path = write_slide(tmp_path / "s.svs", 1500, 1100, downsamples=(4,))
    slide = tiffslide.TiffSlide(str(path))
    assert slide.level_count == 2
    ds = slide.level_downsamples[1]
    lvl1 = grid_tiles("s", 1500, 1100, read_px=120, tile_px=64, level=1, downsample=ds, start=(8, 4))
    lvl0 = grid_tiles("s", 1500, 1100, read_px=448, tile_px=224, level=0, start=(100, 30))
    tiles = pd.concat([lvl0, lvl1.assign(tile_id=lvl1.tile_id + len(lvl0))], ignore_index=True)
    ids, imgs = [], []
    for tid, im in read_tiles(str(path), tiles, batch_tiles=5):
        assert len(tid) <= 5 and len(tid) == len(im)
        ids.append(tid)
        imgs.append(im)
    by_id = {int(t): im for tid, ims in zip(ids, imgs) for t, im in zip(tid, ims)}
    for r in tiles.itertuples(index=False):
        ref = reference_tile(slide, r.x, r.y, r.level, r.read_px, r.tile_px)
        assert np.abs(by_id[r.tile_id].astype(int) - ref.astype(int)).max() <= 1


def test_each_stored_tile_decoded_once_and_threads_agree(tmp_path, monkeypatch):
    path = write_slide(tmp_path / "s.svs", 1300, 1000)
    tiles = grid_tiles("s", 1300, 1000, read_px=224, tile_px=224, start=(10, 10))
    calls = []
    orig = SlideReader._decode

    def counting(self, key, data):
        calls.append(key)
        return orig(self, key, data)

    monkeypatch.setattr(SlideReader, "_decode", counting)
    ids1, imgs1 = _collect(read_tiles(str(path), tiles, batch_tiles=8))
    # every stored tile touched exactly once: 6 x 4 stored 256-px tiles cover the 1300 x 1000 level
    assert len(calls) == len(set(calls)) == 6 * 4
    ids2, imgs2 = _collect(read_tiles(str(path), tiles, batch_tiles=8, num_threads=2))
    assert np.array_equal(ids1, ids2) and np.array_equal(imgs1, imgs2)
    # slide order: row-major over (y, x)
    order = tiles.set_index("tile_id").loc[ids1]
    assert list(zip(order.y, order.x)) == sorted(zip(order.y, order.x))


@pytest.mark.parametrize("kind", ["deflate", "stripped"])
def test_other_layouts_give_the_same_pixels(tmp_path, kind):
    kw = dict(compression="zlib") if kind == "deflate" else dict(tiled=False)
    path = write_slide(tmp_path / f"{kind}.tif", 700, 520, downsamples=(), **kw)
    tiles = grid_tiles("s", 700, 520, read_px=200, tile_px=100, start=(-20, 30))
    ids, imgs = _collect(read_tiles(str(path), tiles))
    assert _max_diff_vs_tiffslide(path, tiles, ids, imgs) == 0


def test_s3_reads_equal_local(tmp_path, s3_server):
    path = write_slide(tmp_path / "s.svs", 1100, 800)
    bucket = s3_server.create_bucket("reader-test")
    uri = f"{bucket}/slides/s.svs"
    s3_server.filesystem().put_file(str(path), uri)
    tiles = grid_tiles("s", 1100, 800, read_px=256, tile_px=224, start=(5, 5))
    local = _collect(read_tiles(str(path), tiles, batch_tiles=6))
    remote = _collect(read_tiles(uri, tiles, s3=s3_server.options, batch_tiles=6))
    assert np.array_equal(local[0], remote[0]) and np.array_equal(local[1], remote[1])


def test_bad_inputs_name_the_remedy(tmp_path, cmu_slide):
    with pytest.raises(RaypathError, match="not found"):
        list(read_tiles(str(tmp_path / "missing.svs"), grid_tiles("x", 300, 300)))
    with pytest.raises(RaypathError, match="levels"):
        list(read_tiles(str(cmu_slide), grid_tiles("x", 300, 300, level=3)))
    with pytest.raises(RaypathError, match="lacks columns"):
        list(read_tiles(str(cmu_slide), pd.DataFrame({"x": [0]})))


def test_truncated_slide_is_an_error_not_black_tiles(tmp_path):
    path = write_slide(tmp_path / "s.svs", 900, 700)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(RaypathError, match="truncated"):
        list(read_tiles(str(bad), grid_tiles("s", 900, 700)))
