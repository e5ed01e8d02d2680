"""Embedding pipeline efficiency on CPU, a naive baseline, and memory vs cohort size.

One command::

    python benchmarks/bench_embed.py            # tiny-vit, batch 64, 1 model thread
    python benchmarks/bench_embed.py --quick

* ``model-only``: the same model (``TileEmbedder``: uint8 -> normalise -> forward,
  fixed batch, 1 torch thread = one CPU actor's share) fed uint8 tiles from memory;
* ``pipeline``: ``raypath embed`` end to end (Ray Data read tasks -> 1 CPU actor ->
  parquet files + manifest), steady state (first to last embedded batch) and
  including start-up;
* ``naive``: per slide, an OpenSlide ``read_region`` loop, then the same model, in one process;
* efficiency = pipeline steady tiles/s / model-only tiles/s (1.0 = reading fully hidden);
* memory: peak RSS and USS (driver + its Ray cluster's processes, sampled every 0.5 s) of an embed run over 10
  and over 100 slides of the same size.

Slides: Aperio-like mosaics of real H&E (benchmarks/_common.py), 224 px level-0
grid tiles.  Timings are medians over ``--reps`` interleaved runs.  Prints a
table and writes benchmarks/results/embed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import numpy as np  # noqa: E402

from _common import CACHE, median, mosaic_slide, save, table, write_workdir  # noqa: E402


def slides(n: int, px: int) -> list[tuple[str, Path]]:
    d = CACHE / f"mosaic_{px}"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"m{i:04d}.svs"
        if not p.exists():
            mosaic_slide(p, px, px, seed=i)
        out.append((p.stem, p))
    return out


def model_only(model: str, batch: int, n_tiles: int) -> float:
    from raypath.embed.api import TileEmbedder

    emb = TileEmbedder(model, "random", None, batch, device="cpu", num_threads=1)
    imgs = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    emb.embed(imgs)
    t0 = time.perf_counter()
    done = 0
    while done < n_tiles:
        emb.embed(imgs)
        done += batch
    return done / (time.perf_counter() - t0)


def naive(model: str, batch: int, sdf, tdf) -> float:
    import openslide
    import torch

    from raypath.embed.api import TileEmbedder

    torch.set_num_threads(1)
    emb = TileEmbedder(model, "random", None, batch, device="cpu", num_threads=1)
    t0 = time.perf_counter()
    n = 0
    for sid, uri in zip(sdf.slide_id, sdf.uri):
        s = openslide.OpenSlide(uri)
        t = tdf[tdf.slide_id == sid]
        buf = []
        for x, y in t[["x", "y"]].itertuples(index=False):
            buf.append(np.asarray(s.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB")))
            if len(buf) == batch:
                emb.embed(np.stack(buf))
                n += len(buf)
                buf = []
        if buf:
            emb.embed(np.stack(buf))
            n += len(buf)
        s.close()
    return n / (time.perf_counter() - t0)


class RssSampler:
    """Peak RSS of this process + Ray worker processes (MiB), sampled in a thread."""

    def __init__(self, interval_s: float = 0.5):
        import psutil

        self.psutil, self.interval_s = psutil, interval_s
        self.peak_total = self.peak_driver = self.peak_uss = 0.0
        self._stop = threading.Event()

    def _sample(self):
        # this process and its descendants only: the local Ray cluster's raylet/GCS are the driver's
        # children and the workers the raylet's, so other users' Ray processes are not counted
        me = self.psutil.Process()
        while not self._stop.is_set():
            total = uss = 0
            drv = me.memory_info().rss
            for p in [me, *me.children(recursive=True)]:
                try:
                    mi = p.memory_full_info()
                    total += mi.rss
                    uss += mi.uss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
            self.peak_total = max(self.peak_total, total / 2**20)
            self.peak_uss = max(self.peak_uss, uss / 2**20)
            self.peak_driver = max(self.peak_driver, drv / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--slide-px", type=int, default=8192)
    ap.add_argument("--naive-slides", type=int, default=2, help="slides for the (slow) naive loop's rate")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--memory-slides", type=int, nargs=2, default=[10, 100])
    ap.add_argument("--quick", action="store_true", help="fewer/smaller slides, 1 rep")
    args = ap.parse_args(argv)
    if args.quick:
        args.slides, args.slide_px, args.reps, args.naive_slides = 4, 4096, 1, 1

    from raypath.embed.api import EmbedConfig, embed
    from raypath.io.ray_env import ensure_ray

    ensure_ray()
    root = Path(tempfile.mkdtemp(prefix="raypath-embed-bench-"))
    sdf, tdf = write_workdir(root / "eff", slides(args.slides, args.slide_px))
    n = len(tdf)
    res = {"model_only": [], "naive": [], "pipeline_steady": [], "pipeline_end_to_end": [], "startup_s": []}
    for _ in range(args.reps):  # interleaved A B C A B C
        res["model_only"].append(model_only(args.model, args.batch_size, n))
        sub = sdf.head(args.naive_slides)
        res["naive"].append(naive(args.model, args.batch_size, sub, tdf[tdf.slide_id.isin(sub.slide_id)]))
        r = embed(EmbedConfig(workdir=str(root / "eff"), model=args.model, batch_size=args.batch_size, force=True,
                              progress_interval_s=30))
        assert (r.slides.status == "done").all(), r.slides
        res["pipeline_steady"].append(r.steady_tiles_per_s)
        res["pipeline_end_to_end"].append(r.tiles_per_s)
        res["startup_s"].append(r.first_output_s)
    med = {k: median(v) for k, v in res.items()}
    rows = [
        {"measure": "model-only (memory -> model)", "tiles_s": med["model_only"], "vs_model_only": 1.0},
        {"measure": "raypath embed, steady state", "tiles_s": med["pipeline_steady"],
         "vs_model_only": med["pipeline_steady"] / med["model_only"]},
        {"measure": "raypath embed, incl. start-up", "tiles_s": med["pipeline_end_to_end"],
         "vs_model_only": med["pipeline_end_to_end"] / med["model_only"]},
        {"measure": "naive openslide loop -> model", "tiles_s": med["naive"],
         "vs_model_only": med["naive"] / med["model_only"]},
    ]
    print(f"model {args.model}, batch {args.batch_size}, CPU (1 model thread), {args.slides} slides x "
          f"{n // args.slides} tiles, {os.cpu_count()} cores, start-up {med['startup_s']:.1f} s")
    print(table(rows, ["measure", "tiles_s", "vs_model_only"]))

    mem = []
    for k in args.memory_slides:
        sdf_k, tdf_k = write_workdir(root / f"mem{k}", slides(k, 1024))
        with RssSampler() as s:
            r = embed(EmbedConfig(workdir=str(root / f"mem{k}"), model=args.model, batch_size=args.batch_size,
                                  force=True, progress_interval_s=30))
        mem.append({"slides": k, "tiles": len(tdf_k), "peak_rss_total_mib": s.peak_total,
                    "peak_uss_total_mib": s.peak_uss,
                    "peak_rss_driver_mib": s.peak_driver, "all_done": bool((r.slides.status == "done").all())})
    print()
    print(table(mem, ["slides", "tiles", "peak_rss_total_mib", "peak_uss_total_mib", "peak_rss_driver_mib",
                      "all_done"]))
    save("embed", {"model": args.model, "batch_size": args.batch_size, "slides": args.slides,
                   "slide_px": args.slide_px, "tiles": n, "raw": res, "median": med, "rows": rows, "memory": mem,
                   "efficiency": med["pipeline_steady"] / med["model_only"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
