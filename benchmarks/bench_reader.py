"""Tile reading: raypath's reader vs an openslide read_region loop vs the JPEG decode bound.

One command::

    python benchmarks/bench_reader.py              # CMU real slide + synthetic 10k x 10k slide
    python benchmarks/bench_reader.py --quick      # fewer repetitions, 4k synthetic slide

Coordinates: level-0 224 px tiles in grid order covering each slide (the
same list for every method).  Methods, timed A B A B (interleaved, median of
``--reps`` runs):

* ``raypath``: :func:`raypath.wsi.reader.read_tiles`, 1 thread, and with
  ``--threads`` decoding threads;
* ``openslide``: ``OpenSlide.read_region(...).convert("RGB")`` per tile (what
  CLAM/TRIDENT loops do);
* ``tiffslide``: ``TiffSlide.read_region(..., as_array=True)`` per tile;
* ``decode bound``: every stored JPEG tile the pass needs decoded exactly once
  from bytes already in memory, nothing else (the physical bound of a CPU
  reader on one core), expressed as requested tiles per second.

Prints a table and writes benchmarks/results/reader.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import numpy as np  # noqa: E402

from _common import grid_tiles, median, save, synth_slide, table  # noqa: E402

CMU = Path(__file__).parent.parent / "tests" / "data" / "cmu_small_region.svs"


def run_raypath(path, tiles, threads):
    from raypath.wsi.reader import read_tiles

    n = 0
    for tid, _ in read_tiles(str(path), tiles, batch_tiles=64, num_threads=threads):
        n += len(tid)
    return n


def run_openslide(path, tiles):
    import openslide

    s = openslide.OpenSlide(str(path))
    for x, y in tiles[["x", "y"]].itertuples(index=False):
        np.asarray(s.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
    s.close()
    return len(tiles)


def run_tiffslide(path, tiles):
    import tiffslide

    s = tiffslide.TiffSlide(str(path))
    for x, y in tiles[["x", "y"]].itertuples(index=False):
        s.read_region((int(x), int(y)), 0, (224, 224), as_array=True)
    s.close()
    return len(tiles)


def decode_bound_setup(path, tiles):
    """Bytes of every stored tile the pass needs, and a function decoding them all once."""
    import imagecodecs

    from raypath.wsi.reader import SlideReader, decode_bound_keys

    keys = decode_bound_keys(str(path), tiles)
    with SlideReader(str(path)) as r:
        r.level(0)
        blobs = r._fetch(keys)
        L = r._levels[0]
    tables, cs = L.tables, L.colorspace

    def run():
        for k in keys:
            imagecodecs.jpeg8_decode(blobs[k], tables=tables, colorspace=cs[0], outcolorspace=cs[1],
                                     shape=(L.tile_h, L.tile_w))
        return len(tiles)

    return run, len(keys)


def bench_slide(name, path, reps, threads):
    import tiffslide

    with tiffslide.TiffSlide(str(path)) as s:
        w, h = s.dimensions
    tiles = grid_tiles(name, w, h)
    bound, n_stored = decode_bound_setup(path, tiles)
    methods = {
        "raypath 1 thread": lambda: run_raypath(path, tiles, 1),
        f"raypath {threads} threads": lambda: run_raypath(path, tiles, threads),
        "openslide read_region": lambda: run_openslide(path, tiles),
        "tiffslide read_region": lambda: run_tiffslide(path, tiles),
        "decode bound (1 core)": bound,
    }
    for fn in methods.values():  # warm the page cache and imports
        fn()
    times = {k: [] for k in methods}
    for _ in range(reps):
        for k, fn in methods.items():  # interleaved A B A B
            t0 = time.perf_counter()
            n = fn()
            times[k].append(time.perf_counter() - t0)
    rates = {k: len(tiles) / median(v) for k, v in times.items()}
    ours = rates["raypath 1 thread"]
    rows = []
    for k, r in rates.items():
        rows.append({"slide": name, "method": k, "tiles_s": r, "x_openslide": r / rates["openslide read_region"],
                     "frac_decode_bound": r / rates["decode bound (1 core)"]})
    summary = {
        "slide": name, "width": w, "height": h, "tiles": len(tiles), "stored_tiles_decoded": n_stored,
        "reps": reps, "threads": threads,
        "raypath_vs_openslide": ours / rates["openslide read_region"],
        "raypath_frac_decode_bound": ours / rates["decode bound (1 core)"],
        "threads_speedup": rates[f"raypath {threads} threads"] / ours,
        "times_s": times,
    }
    return rows, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synth-px", type=int, default=10000)
    ap.add_argument("--quick", action="store_true", help="3 reps, 4096 px synthetic slide")
    ap.add_argument("--only", choices=["cmu", "synth"], default=None, help="one slide only")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.synth_px = 3, 4096
    slides = []
    if args.only in (None, "cmu"):
        slides.append(("cmu-small-region (real)", CMU))
    if args.only in (None, "synth"):
        slides.append((f"synthetic {args.synth_px}px", synth_slide(args.synth_px)))
    rows, summaries = [], []
    for name, path in slides:
        r, s = bench_slide(name, path, args.reps, args.threads)
        rows += r
        summaries.append(s)
        print(table(r, ["slide", "method", "tiles_s", "x_openslide", "frac_decode_bound"]))
        print()
    print("targets: raypath 1 thread >= 4x openslide and >= 0.70 of the decode bound")
    for s in summaries:
        print(f"  {s['slide']}: {s['raypath_vs_openslide']:.2f}x openslide, "
              f"{s['raypath_frac_decode_bound']:.2f} of decode bound, {args.threads} threads: "
              f"{s['threads_speedup']:.2f}x one thread")
    save("reader" if args.only is None else f"reader_{args.only}", {"rows": rows, "summaries": summaries})
    return 0


if __name__ == "__main__":
    sys.exit(main())
