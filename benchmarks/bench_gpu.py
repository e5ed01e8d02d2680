"""GPU throughput: JPEG slides -> features on disk, for ViT-B/16, ViT-L/16, ViT-H/14 and ViT-g/14.

One command (on a machine with a GPU and Ray)::

    python benchmarks/bench_gpu.py            # all four shapes, random weights
    python benchmarks/bench_gpu.py --models vit-l16 --slides 16

For each shape (the registry model with that exact architecture, random
weights): FLOPs per tile (torch FlopCounterMode, one 224 px tile), the
model-only rate (same model, batch, device, bf16 autocast, uint8 tiles fed
from host memory through the same preprocessing), and the pipeline rate of
``raypath embed`` (Ray Data read tasks -> one GPU actor -> parquet files) in
its steady state and end to end including start-up.  Fractions: pipeline /
model-only, and achieved FLOP/s / the GPU's dense bf16 peak.
Start-up (Ray, actors, model load) is reported on its own (``startup_s``); with
``RAY_ADDRESS`` set the run joins that cluster instead of starting one.  ``--decode gpu``
moves JPEG decoding into the GPU actor (nvJPEG), ``--amp fast`` uses bf16 weights + SDPA +
cached torch.compile, ``--check-fp32`` adds the cosine of those features to fp32's, and
``cores_per_1000_tiles_s`` is the machine's CPU use per 1,000 tiles/s of pipeline.
``--smoke`` checks all of it on a CPU with the tiny model.
Prints a table and writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import numpy as np  # noqa: E402

from _common import mosaic_slide, save, table, write_workdir  # noqa: E402

#: shape -> the registry model with that architecture
SHAPES = {"vit-b16": "phikon", "vit-l16": "uni", "vit-h14": "virchow2", "vit-g14": "h-optimus-0"}
#: dense bf16 peak (no sparsity) by device name fragment, FLOP/s
PEAKS = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
         "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for k, v in PEAKS.items():
        if k in name:
            return v
    return None


def model_only(key: str, batch: int, seconds: float, compile: bool, device: str = "cuda",
               amp: str = "bf16") -> tuple[float, float]:
    """(tiles/s, FLOPs per tile) of the model fed uint8 tiles from host memory."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raypath.embed.api import TileEmbedder

    emb = TileEmbedder(key, "random", None, batch, device=device, amp=amp, compile=compile)
    x1 = emb.backbone.preprocess(torch.zeros(1, 224, 224, 3, dtype=torch.uint8)).to(emb.input_dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        emb.backbone(x1)
    flops = float(fc.get_total_flops())
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    for _ in range(3 if not compile else 6):
        emb.embed(imgs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        emb.embed(imgs)
        n += batch
    rate = n / (time.perf_counter() - t0)
    del emb
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate, flops


def cpu_busy_s() -> float:
    """Seconds of CPU time used by the whole machine so far (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def fp32_cosine(key: str, path: Path, amp: str, device: str, n: int = 256) -> tuple[float, float]:
    """(mean, min) cosine between the features of ``amp`` and of fp32 on ``n`` real tiles of one slide."""
    import tiffslide

    from _common import grid_tiles
    from raypath.embed.api import TileEmbedder
    from raypath.wsi.reader import read_tiles

    with tiffslide.TiffSlide(str(path)) as s:
        w, h = s.dimensions
    imgs = np.concatenate([im for _, im in read_tiles(str(path), grid_tiles("s", w, h).head(n), batch_tiles=64)])
    feats = []
    for a in (amp, "off"):
        emb = TileEmbedder(key, "random", None, 64, device=device, amp=a, dtype="float32")
        feats.append(emb.embed(imgs))
        del emb
        gc.collect()
    a, b = feats
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.mean()), float(cos.min())


def pipeline_row(args, root: Path, shape: str, key: str, ids: list[str], mo: float, fl: float) -> dict:
    """``raypath embed`` on ``ids``: steady and end-to-end tiles/s, start-up, CPU cores used."""
    from raypath.embed.api import EmbedConfig, embed

    busy0 = cpu_busy_s()
    res = embed(EmbedConfig(workdir=str(root), model=key, weights="random", batch_size=args.batch_size,
                            slide_ids=ids, force=True, compile=args.compile, progress_interval_s=5, amp=args.amp,
                            actor_concurrency=args.actor_concurrency, decode=args.decode,
                            feature_dir=str(root / "features" / shape)))
    cores = (cpu_busy_s() - busy0) / max(res.elapsed_s, 1e-9)  # whole machine, start-up included
    steady = res.steady_tiles_per_s or float("nan")
    return {
        "shape": shape, "model": key, "gflops_per_tile": fl / 1e9, "tiles": res.tiles_embedded,
        "model_only_tiles_s": mo, "pipeline_tiles_s": steady,
        "end_to_end_tiles_s": res.tiles_per_s, "startup_s": res.first_output_s or float("nan"),
        "frac_model_only": steady / mo, "all_slides_ok": bool((res.slides.status == "done").all()),
        "decode": args.decode, "cpu_cores_used": cores,
        "cores_per_1000_tiles_s": cores / max(res.tiles_per_s / 1000, 1e-9),
    }


def _make(args):
    path, px, seed = args
    return mosaic_slide(Path(path), px, px, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES) + ["tiny"])
    ap.add_argument("--slides", type=int, default=48, help="slides in the cohort")
    ap.add_argument("--slide-px", type=int, default=8192, help="side of each slide (level 0)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--model-only-s", type=float, default=8.0, help="seconds of model-only timing")
    ap.add_argument("--pipeline-s", type=float, default=30.0,
                    help="aim for about this many seconds of pipeline per model (slides are subset)")
    ap.add_argument("--compile", action="store_true", help="torch.compile in both measurements")
    ap.add_argument("--actor-concurrency", type=int, default=None)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "bf16-weights", "fast"],
                    help="precision in both measurements (bf16 = autocast; fast = bf16 weights + SDPA + compile)")
    ap.add_argument("--decode", default="full", choices=["full", "scaled", "gpu"],
                    help="tile decoding in the pipeline (gpu: the model actor decodes with nvJPEG)")
    ap.add_argument("--check-fp32", action="store_true", help="cosine of --amp features vs fp32 on 256 real tiles")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the GPU is not known")
    ap.add_argument("--workdir", default=None, help="reuse slides here (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script with a tiny model")
    args = ap.parse_args(argv)
    device = "cuda"
    if args.smoke:
        SHAPES["tiny"] = "tiny-vit"
        args.models, args.slides, args.slide_px, args.model_only_s, device = ["tiny"], 2, 1024, 1.0, "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA device; run this on a GPU machine (see benchmarks/README.md)")
        return 2
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke test)"
    peak = peak_flops(gpu, args.peak_tflops)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="raypath-gpu-bench-"))
    sd = root / "slides"
    sd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(str(sd / f"m{i:03d}.svs"), args.slide_px, i) for i in range(args.slides)]
    todo = [j for j in jobs if not Path(j[0]).exists()]
    with ProcessPoolExecutor(min(16, os.cpu_count() or 4)) as pool:
        list(pool.map(_make, todo))
    sdf, tdf = write_workdir(root, [(Path(p).stem, Path(p)) for p, _, _ in jobs])
    per_slide = len(tdf) // len(sdf)
    print(f"[{len(sdf)} slides x {per_slide} tiles written in {time.perf_counter() - t0:.1f} s; GPU {gpu}]")

    from raypath.io.ray_env import ensure_ray

    t_ray = time.perf_counter()
    ensure_ray()  # joins $RAY_ADDRESS when set
    print(f"[Ray ready in {time.perf_counter() - t_ray:.1f} s ({'joined ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'started locally'})]")
    rows = []
    for shape in args.models:
        key = SHAPES[shape]
        mo, fl = model_only(key, args.batch_size, args.model_only_s, args.compile, device, args.amp)
        n_sl = int(min(len(sdf), max(4, np.ceil(mo * args.pipeline_s / per_slide))))
        row = pipeline_row(args, root, shape, key, sorted(sdf.slide_id)[:n_sl], mo, fl)
        if args.check_fp32:
            row["cos_fp32_mean"], row["cos_fp32_min"] = fp32_cosine(key, Path(jobs[0][0]), args.amp, device)
        if peak:
            row["frac_bf16_peak_model_only"] = fl * mo / peak
            row["frac_bf16_peak_pipeline"] = fl * row["pipeline_tiles_s"] / peak
        rows.append(row)
        print(table([row], list(row)))
        save("gpu_partial", {"gpu": gpu, "rows": rows})  # survives a run cut short
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    cols = ["shape", "model", "gflops_per_tile", "tiles", "model_only_tiles_s", "pipeline_tiles_s",
            "frac_model_only", "end_to_end_tiles_s", "startup_s", "cores_per_1000_tiles_s"]
    cols += ["cos_fp32_mean", "cos_fp32_min"] if args.check_fp32 else []
    if peak:
        cols += ["frac_bf16_peak_model_only", "frac_bf16_peak_pipeline"]
    print()
    print(f"GPU: {gpu}; dense bf16 peak used: {peak / 1e12 if peak else 'unknown'} TFLOP/s; batch {args.batch_size}; "
          f"slides {args.slide_px}px, 224px level-0 tiles, {per_slide} per slide")
    print(table(rows, cols))
    save("gpu" if not args.smoke else "gpu_smoke", {"gpu": gpu, "peak_bf16_flops": peak, "batch_size": args.batch_size, "slide_px": args.slide_px,
                 "tiles_per_slide": per_slide, "compile": args.compile, "amp": args.amp, "decode": args.decode,
                 "ray_address": os.environ.get("RAY_ADDRESS") or None, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
