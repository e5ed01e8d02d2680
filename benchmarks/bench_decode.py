"""DCT-scaled JPEG decoding: a 40x slide read for 0.5 um/px, three readers side by side.

One command::

    python benchmarks/bench_decode.py            # 8192 px 40x synthetic slide (raypath.synth, cached)
    python benchmarks/bench_decode.py --quick    # 4096 px, fewer repetitions

The slide is a 40x (0.25 um/px) pyramidal JPEG TIFF from :mod:`raypath.synth.study`; its tiles are
what ``raypath tile --target-mpp 0.5`` lays on it (tissue tiles, 448 px read at level 0, 224 px out).
Methods, 1 thread each, timed interleaved (A B C A B C), median of ``--reps``:

* ``reader full``   -- :func:`raypath.wsi.reader.read_tiles` (the current reader): every stored tile
  decoded at full size once, the 448 px square resized to 224 with PIL bilinear;
* ``reader scaled`` -- the same reader with ``decode="scaled"``: stored tiles decoded at 1/2 inside
  libjpeg-turbo (DCT scaling), the 224 px square assembled directly, no resize;
* ``openslide``     -- ``OpenSlide.read_region((x, y), 0, (448, 448))`` + PIL bilinear resize per tile.

Quality against the full-decode path: PSNR over all tiles (and the 1st percentile per tile), and the
cosine similarity of the features of the tiny test model (``tiny-vit``, random weights: a smoke-level
check of what the model sees; a trained FM is not available offline).

Prints a table and writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import numpy as np  # noqa: E402

from _common import CACHE, median, save, table  # noqa: E402


def slide_40x(px: int) -> tuple[Path, list[float]]:
    """A cached 40x synthetic slide and its level downsamples."""
    import pandas as pd
    import tiffslide

    from raypath.synth.study import SynthConfig, synthesize

    out = CACHE / f"synth40x_{px}"
    if not (out / "cohort.csv").exists():
        t0 = time.perf_counter()
        synthesize(SynthConfig(out=str(out), n_cohorts=1, slides_per_cohort=1, slide_px=px, objective=[40],
                               seed=3, patients_share_slides=0.0))
        print(f"[rendered a 40x {px}px slide in {time.perf_counter() - t0:.1f} s -> {out}]")
    path = (out / pd.read_csv(out / "cohort.csv")["uri"].iloc[0]).resolve()
    with tiffslide.TiffSlide(str(path)) as s:
        return path, [float(d) for d in s.level_downsamples]


def tissue_tiles(path: Path, downsamples: list[float]):
    """The tiles ``raypath tile --target-mpp 0.5`` keeps on the slide."""
    import tempfile

    from raypath.wsi.tiling import TileConfig, tile_slide

    cfg = TileConfig(workdir=tempfile.mkdtemp(prefix="rp-decode-"), target_mpp=0.5, qc=False, use_ray=False)
    tiles, summary = tile_slide({"slide_id": "s40x", "uri": str(path), "mpp_x": 0.25,
                                 "level_downsamples": downsamples}, cfg)
    return tiles.to_pandas()


def read_reader(path, tiles, decode, keep=False):
    from raypath.wsi.reader import read_tiles

    out, n = [], 0
    for tid, imgs in read_tiles(str(path), tiles, batch_tiles=64, decode=decode):
        n += len(tid)
        if keep:
            out.append((tid, imgs))
    return _ordered(out, tiles) if keep else n


def read_openslide(path, tiles, keep=False):
    import openslide
    from PIL import Image

    s = openslide.OpenSlide(str(path))
    out = []
    for x, y, rp, tp in tiles[["x", "y", "read_px", "tile_px"]].itertuples(index=False):
        im = s.read_region((int(x), int(y)), 0, (int(rp), int(rp))).convert("RGB").resize((int(tp), int(tp)),
                                                                                        Image.BILINEAR)
        if keep:
            out.append(np.asarray(im))
    s.close()
    return np.stack(out) if keep else len(tiles)


def _ordered(batches, tiles) -> np.ndarray:
    by = {int(t): im for tid, imgs in batches for t, im in zip(tid, imgs)}
    return np.stack([by[int(t)] for t in tiles["tile_id"]])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def quality(ref: np.ndarray, other: np.ndarray, feats) -> dict:
    per_tile = [min(psnr(r, o), 99.0) for r, o in zip(ref, other)]  # 99 dB stands for identical
    fa, fb = feats(ref), feats(other)
    cos = np.sum(fa * fb, 1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
    return {"psnr_db": psnr(ref, other), "psnr_p1_db": float(np.percentile(per_tile, 1)),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--slide-px", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args()
    px = a.slide_px or (4096 if a.quick else 8192)
    reps = a.reps or (2 if a.quick else 5)
    path, downs = slide_40x(px)
    tiles = tissue_tiles(path, downs)
    print(f"slide {path.name}: {px} px at 0.25 um/px, {len(tiles)} tissue tiles "
          f"(read {int(tiles['read_px'].iloc[0])} px at level {int(tiles['level'].iloc[0])} -> "
          f"{int(tiles['tile_px'].iloc[0])} px)")
    methods = {
        "reader full (current)": lambda: read_reader(path, tiles, "full"),
        "reader scaled (DCT 1/2)": lambda: read_reader(path, tiles, "scaled"),
        "openslide read_region + resize": lambda: read_openslide(path, tiles),
    }
    for fn in methods.values():  # warm the page cache and imports
        fn()
    times = {k: [] for k in methods}
    for _ in range(reps):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    rates = {k: len(tiles) / median(v) for k, v in times.items()}

    from raypath.embed.api import TileEmbedder

    emb = TileEmbedder("tiny-vit", weights=None, adapter=None, batch_size=64, device="cpu", dtype="float32")
    ref = read_reader(path, tiles, "full", keep=True)
    imgs = {"reader scaled (DCT 1/2)": read_reader(path, tiles, "scaled", keep=True),
            "openslide read_region + resize": read_openslide(path, tiles, keep=True)}
    base = rates["reader full (current)"]
    rows = []
    for k, r in rates.items():
        q = quality(ref, imgs[k], emb.embed) if k in imgs else {"psnr_db": float("inf"), "psnr_p1_db": float("inf"),
                                                                 "cosine_mean": 1.0, "cosine_min": 1.0}
        rows.append({"method": k, "tiles_s": r, "x_current": r / base, **q})
    print(table(rows, ["method", "tiles_s", "x_current", "psnr_db", "psnr_p1_db", "cosine_mean", "cosine_min"]))
    save("decode", {"slide_px": px, "n_tiles": len(tiles), "reps": reps, "rows": rows,
                    "times_s": times})


if __name__ == "__main__":
    main()
