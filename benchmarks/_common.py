"""Shared helpers of the benchmarks: slides, tile tables, timing, result files.

Two slide sources:

* ``synth_slide``: a slide from :mod:`raypath.synth.study` (rendered H&E, the project's
  synthetic cohort generator), cached in ``$RAYPATH_BENCH_CACHE`` (default
  ``/tmp/raypath-bench``) because a 10k x 10k render takes ~15-30 s;
* ``mosaic_slide``: a fast Aperio-like slide tiled from the real H&E image
  shipped in ``raypath/data`` (random flips/rotations per 1000 px block, JPEG
  q=80, 256 px tiles, pyramid 4x/16x), for when many large slides are needed
  quickly (the GPU benchmark on a leased machine).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

CACHE = Path(os.environ.get("RAYPATH_BENCH_CACHE", "/tmp/raypath-bench"))
RESULTS = Path(__file__).parent / "results"
APERIO = "Aperio Image Library v12.0.0\r\n{w}x{h} (256x256) JPEG/RGB Q={q}|AppMag = 20|MPP = 0.5"


def synth_slide(slide_px: int, seed: int = 0) -> Path:
    """A cached raypath.synth.study slide of ``slide_px`` x ``slide_px`` (level 0, 256 px JPEG tiles)."""
    from raypath.synth.study import SynthConfig, synthesize

    out = CACHE / f"synth_{slide_px}_{seed}"
    done = out / "cohort.csv"
    if not done.exists():
        t0 = time.perf_counter()
        synthesize(SynthConfig(out=str(out), n_cohorts=1, slides_per_cohort=1, slide_px=slide_px, seed=seed,
                               patients_share_slides=0.0))
        print(f"[rendered synthetic {slide_px}px slide in {time.perf_counter() - t0:.1f} s -> {out}]")
    table = pd.read_csv(done)
    return (out / table["uri"].iloc[0]).resolve()


def mosaic_slide(path: Path, width: int, height: int, seed: int = 0, quality: int = 80) -> Path:
    """An Aperio-like pyramidal JPEG TIFF made of real H&E blocks (fast: ~1-2 s per 8k slide)."""
    import tifffile
    from PIL import Image

    import raypath

    src = np.asarray(Image.open(Path(raypath.__file__).parent / "data" / "he_target_1000.png").convert("RGB"))
    rng = np.random.default_rng(seed)
    b = 1000
    img = np.empty((height, width, 3), np.uint8)
    for y in range(0, height, b):
        for x in range(0, width, b):
            blk = np.rot90(src, int(rng.integers(4)))
            if rng.random() < 0.5:
                blk = blk[:, ::-1]
            h, w = min(b, height - y), min(b, width - x)
            img[y : y + h, x : x + w] = blk[:h, :w]
    kw = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None, maxworkers=4)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), description=APERIO.format(w=width, h=height, q=quality), **kw)
        tw.write(np.ascontiguousarray(img[::32, ::32]), description="Aperio Image Library v12.0.0\r\nthumbnail",
                 **{k: v for k, v in kw.items() if k != "maxworkers"})
        for ds in (4, 16):
            tw.write(np.ascontiguousarray(img[::ds, ::ds]), tile=(256, 256), subfiletype=0, **kw)
    return path


def grid_tiles(slide_id: str, width: int, height: int, tile_px: int = 224, level: int = 0) -> pd.DataFrame:
    """Level-0 ``tile_px`` tiles in grid (row-major) order covering the slide, TILES columns."""
    ys, xs = np.mgrid[0 : height - tile_px + 1 : tile_px, 0 : width - tile_px + 1 : tile_px]
    n = xs.size
    return pd.DataFrame({
        "slide_id": slide_id, "tile_id": np.arange(n, dtype=np.int64), "x": xs.ravel().astype(np.int64),
        "y": ys.ravel().astype(np.int64), "level": np.int32(level), "read_px": np.int32(tile_px),
        "tile_px": np.int32(tile_px), "target_mpp": 0.5, "tissue_fraction": np.float32(1.0),
    })


def write_workdir(root: Path, slides: list[tuple[str, Path]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """slides.parquet + tiles.parquet (whole-slide grid) for ``(slide_id, path)`` pairs."""
    import tiffslide

    root.mkdir(parents=True, exist_ok=True)
    srows, tiles = [], []
    for sid, p in slides:
        with tiffslide.TiffSlide(str(p)) as s:
            w, h = s.dimensions
        st = os.stat(p)
        srows.append({"slide_id": sid, "uri": str(Path(p).resolve()), "fingerprint": f"{st.st_size}-{st.st_mtime_ns}",
                      "status": "ok", "width": w, "height": h})
        tiles.append(grid_tiles(sid, w, h))
    sdf, tdf = pd.DataFrame(srows), pd.concat(tiles, ignore_index=True)
    sdf.to_parquet(root / "slides.parquet")
    tdf.to_parquet(root / "tiles.parquet")
    return sdf, tdf


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def save(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = dict(doc, machine=machine(), written_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=float))
    out = os.environ.get("OUT")  # the leased GPU machine's return folder
    if out:
        Path(out, f"{name}.json").write_text(path.read_text())
    print(f"[wrote {path}]")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    w = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(w[c]) for c in cols), "-+-".join("-" * w[c] for c in cols)]
    lines += [" | ".join(fmt(r.get(c, "")).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)
