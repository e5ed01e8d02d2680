"""DCT-scaled JPEG decoding in the fast reader (decode="scaled")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raypath.errors import RaypathError
from raypath.wsi.reader import SlideReader, decode_scale, read_tiles
from tiny_slides import render, write_svs


def _grid(w: int, h: int, read_px: int, tile_px: int = 224) -> pd.DataFrame:
    ys, xs = np.mgrid[0 : h - read_px + 1 : read_px, 0 : w - read_px + 1 : read_px]
    n = xs.size
    return pd.DataFrame({"tile_id": np.arange(n), "x": xs.ravel(), "y": ys.ravel(), "level": 0,
                         "read_px": read_px, "tile_px": tile_px})


def _read(path: Path, tiles: pd.DataFrame, decode: str, damaged=None) -> np.ndarray:
    by = {}
    for tid, imgs in read_tiles(str(path), tiles, batch_tiles=7, decode=decode, damaged=damaged):
        by.update(zip(tid.tolist(), imgs))
    return np.stack([by[t] for t in tiles["tile_id"]])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def slide40x(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("x40") / "x40.svs"
    blobs = [(0.35, 0.5, 0.3, 0.4), (0.75, 0.5, 0.2, 0.3)]
    return write_svs(p, render(1792, 1344, blobs, seed=4), mpp=0.25, app_mag=40)


def test_scaled_decode_matches_full_decode_closely(slide40x):
    tiles = _grid(1792, 1344, 448)  # 40x read for 0.5 um/px: 448 px squares -> 224 px tiles
    full = _read(slide40x, tiles, "full")
    scaled = _read(slide40x, tiles, "scaled")
    assert scaled.shape == full.shape == (len(tiles), 224, 224, 3)
    assert _psnr(full, scaled) >= 35
    # off-grid origins and a read that is not an exact multiple (443 px: 0.2527 um/px scanners)
    odd = _grid(1792, 1344, 443).assign(x=lambda d: d.x + 3, y=lambda d: d.y + 5)
    odd = odd[(odd.x + 443 <= 1792) & (odd.y + 443 <= 1344)]
    assert _psnr(_read(slide40x, odd, "full"), _read(slide40x, odd, "scaled")) >= 30
    # no downsampling: the scaled mode decodes at full size, pixels identical
    same = _grid(1792, 1344, 224)
    np.testing.assert_array_equal(_read(slide40x, same, "full"), _read(slide40x, same, "scaled"))


def test_decode_scale_choice(slide40x):
    with SlideReader(str(slide40x), decode="scaled") as r:
        L = r.level(0)
        assert decode_scale(L, 448, 224, "scaled") == 2
        assert decode_scale(L, 443, 224, "scaled") == 2  # 221.5 px, within the slack, resized up
        assert decode_scale(L, 896, 224, "scaled") == 4
        assert decode_scale(L, 2000, 224, "scaled") == 8
        assert decode_scale(L, 300, 224, "scaled") == 1
        assert decode_scale(L, 448, 224, "full") == 1
    with pytest.raises(RaypathError, match="decode mode"):
        SlideReader(str(slide40x), decode="fast")


def test_damaged_tiles_are_reported_on_the_scaled_path(slide40x, tmp_path):
    bad = tmp_path / "bad.svs"
    data = bytearray(slide40x.read_bytes())
    with tifffile.TiffFile(slide40x) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[8], page.databytecounts[8]  # stored tile row 1, col 1 (7 tiles across)
    data[off + n // 2 : off + n // 2 + 64] = bytes(range(64))  # garbage in the entropy-coded data
    bad.write_bytes(bytes(data))
    tiles = _grid(1792, 1344, 448)
    found = {}
    for mode in ("full", "scaled"):
        damaged: dict[int, str] = {}
        _read(bad, tiles, mode, damaged)
        found[mode] = damaged
    assert found["full"], "the corruption must be detectable"
    assert set(found["scaled"]) == set(found["full"])
    assert all(v.startswith("corrupt_tile_data:") for v in found["scaled"].values())


def test_embed_read_task_uses_the_decode_mode_and_it_is_in_the_identity(slide40x, tmp_path):
    import pyarrow as pa

    from raypath.embed.api import model_identity, read_planned_slide
    from raypath.embed.identity import DEFAULT_DECODE, slide_cache_key
    from raypath.schemas import TILES
    from raypath.wsi.tile_table import prepare_dataset, tiles_hash, write_slide_tiles

    tiles = _grid(1792, 1344, 448).assign(slide_id="x40", target_mpp=0.5, tissue_fraction=1.0)
    prepare_dataset(str(tmp_path))
    write_slide_tiles(str(tmp_path), "x40", pa.Table.from_pandas(tiles[TILES.names], schema=TILES, preserve_index=False))
    sha = tiles_hash(tiles)
    got = {}
    for mode in ("full", "scaled"):
        rows = list(read_planned_slide("x40", str(slide40x), str(tmp_path), sha, 224, 8, decode=mode))
        assert all(not e for r in rows for e in r["error"])
        got[mode] = np.concatenate([r["image"] for r in rows])
    assert _psnr(got["full"], got["scaled"]) >= 35 and not np.array_equal(got["full"], got["scaled"])
    full, scaled = (model_identity("tiny-vit", "random", None, decode=m) for m in ("full", "scaled"))
    assert full.decode == DEFAULT_DECODE and scaled.decode != full.decode
    assert slide_cache_key("fp", sha, full, "float16") != slide_cache_key("fp", sha, scaled, "float16")


def test_gpu_decode_path_on_cpu_matches_the_reader(slide40x):
    """decode="gpu" without a GPU: packets from the read side, decoded by torchvision on the CPU (smoke)."""
    import torch

    from raypath.embed.api import TileEmbedder
    from raypath.embed.gpu_decode import decode_packets, slide_packets

    for read_px, min_db in ((224, 40), (448, 30)):
        tiles = _grid(1792, 1344, read_px).assign(x=lambda d: d.x + 100)  # off the stored-tile grid
        tiles = tiles[tiles.x + read_px <= 1792]
        ref = _read(slide40x, tiles, "full")
        got = {}
        for tid, packets in slide_packets(str(slide40x), tiles, batch_tiles=5):
            imgs = decode_packets(packets, np.ones(len(packets), bool), "cpu")
            assert imgs.dtype == torch.uint8 and tuple(imgs.shape[1:]) == (224, 224, 3)
            got.update(zip(tid.tolist(), imgs.numpy()))
        assert _psnr(ref, np.stack([got[t] for t in tiles["tile_id"]])) >= min_db
    emb = TileEmbedder("tiny-vit", weights=None, adapter=None, batch_size=4, device="cpu", dtype="float32")
    t = torch.from_numpy(ref[:3])
    np.testing.assert_allclose(emb.embed(t), emb.embed(ref[:3]), rtol=1e-5, atol=1e-5)
