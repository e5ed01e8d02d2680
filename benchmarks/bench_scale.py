"""Scale: driver (and worker) peak RSS and planning wall time per stage vs cohort size.

A simulated cohort is written without rendering pixels: ``slides.parquet``
(40x Aperio-like metadata), ``tiles.parquet/`` with ``--tiles-per-slide``
tiles per slide (written part by part through the tiling worker's own
function, so the parts carry the footer metadata planning reads), and a
feature store of ``--bag-tiles`` x ``--dim`` float16 features per slide.
Then every stage's *driver* work runs in a fresh Python process, the real
raypath code on the simulated workdir, and the process reports its peak RSS
(``ru_maxrss``, imports included) and the wall time of the stage's planning:

* ``ingest``  -- ``ingest()`` with the per-slide inspection replaced by simulated metadata
  (the driver: read and validate the cohort table, collect one row per slide, write slides.parquet);
* ``tile``    -- ``tile()`` with the per-slide tasks replaced by their summaries (the driver:
  slides.parquet -> task rows, summaries back, stale-part cleanup, tiling_summary.parquet);
* ``embed``   -- ``plan_embed`` (tile index from the parts' footers, cache keys, the read tasks' items);
* ``mil``     -- feature-store listing, clinical table and leave-one-cohort-out splits;
* ``robustness`` -- ``load_sample`` (per-slide sampling while streaming the store, capped in total).

Worker side (also fresh processes): ``embed-worker`` = one read task loading and
checking its slide's tiles; ``mil-worker`` = one Ray Train rank of 4 reading one
epoch's shard and evaluating 1/5 of the slides through the bounded bag cache.

``--baseline`` adds what embed's driver did before (load every tile row's
geometry into pandas), at the given cohort size -- only sensible up to ~1,000 slides.

Usage::

    python benchmarks/bench_scale.py --slides 1000                   # 10M tiles, 1M features
    python benchmarks/bench_scale.py --slides 10000 --workdir /tmp/scale10k
    python benchmarks/bench_scale.py --slides 100 --tiles-per-slide 2000 --json   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
DRIVER_STAGES = ("ingest", "tile", "embed", "mil", "robustness")
WORKER_STAGES = ("embed-worker", "mil-worker")


# --------------------------------------------------------------------------- simulated cohort


def _slides_frame(n: int):
    import pandas as pd

    ids = [f"TCGA-{i:06d}" for i in range(n)]
    rng = np.random.default_rng(0)
    w, h = 100 * 448 + 300, 100 * 448 + 200
    return pd.DataFrame({
        "slide_id": ids,
        "uri": [f"/nonexistent/slides/{s}.svs" for s in ids],
        "patient_id": [f"P{i // 2:06d}" for i in range(n)],
        "cohort": [f"site{i % 7}" for i in range(n)],
        "time": rng.exponential(100.0, n).round(2),
        "event": rng.integers(0, 2, n),
        "scanner": ["aperio"] * n,
        "width": np.full(n, w, np.int64), "height": np.full(n, h, np.int64), "levels": np.full(n, 3, np.int32),
        "level_downsamples": [[1.0, 4.0, 16.0]] * n,
        "level_dimensions": [[[w, h], [w // 4, h // 4], [w // 16, h // 16]]] * n,
        "mpp_x": 0.25, "mpp_y": 0.25, "mpp_source": "file", "objective_power": 40.0, "vendor": "aperio",
        "bytes": np.full(n, 2_000_000_000, np.int64),
        "fingerprint": [f"{i:064x}" for i in range(n)],
        "status": "ok", "error": None,
    })


def _tiles_template(n_tiles: int):
    """Geometry of one slide's tiles (the same grid for every slide, only slide_id differs)."""
    import pyarrow as pa

    from raypath.schemas import TILES

    side = int(np.ceil(np.sqrt(n_tiles)))
    k = np.arange(n_tiles, dtype=np.int64)
    cols = {
        "tile_id": k, "x": (k % side) * 448, "y": (k // side) * 448,
        "level": np.zeros(n_tiles, np.int32), "read_px": np.full(n_tiles, 448, np.int32),
        "tile_px": np.full(n_tiles, 224, np.int32), "target_mpp": np.full(n_tiles, 0.5),
        "tissue_fraction": (0.6 + 0.4 * ((k * 7919) % 1000) / 1000.0).astype(np.float32),
    }
    return lambda sid: pa.Table.from_pydict({"slide_id": pa.array([sid] * n_tiles), **cols}, schema=TILES)


def generate(wd: Path, n: int, tiles_per_slide: int, bag_tiles: int, dim: int) -> dict:
    """Write the simulated workdir (skipped when the same parameters are already there)."""
    from raypath.embed.store import write_bag_table
    from raypath.wsi.tile_table import finish_dataset, prepare_dataset, write_slide_tiles

    marker = wd / "simulated.json"
    params = {"slides": n, "tiles_per_slide": tiles_per_slide, "bag_tiles": bag_tiles, "dim": dim}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return {"generate_s": None}
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    t0 = time.perf_counter()
    slides = _slides_frame(n)
    slides.to_parquet(wd / "slides.parquet", index=False)
    slides[["slide_id", "uri", "patient_id", "cohort", "time", "event", "scanner"]].to_csv(wd / "cohort.csv", index=False)
    make = _tiles_template(tiles_per_slide)
    prepare_dataset(str(wd))
    rng = np.random.default_rng(1)
    fdir = wd / "features" / "sim-00000000"
    coords = np.zeros((bag_tiles, 2), np.int64)
    for sid in slides["slide_id"]:
        write_slide_tiles(str(wd), sid, make(sid))
        feats = rng.standard_normal((bag_tiles, dim), dtype=np.float32)
        write_bag_table(str(fdir), sid, np.arange(bag_tiles), coords, feats)
    finish_dataset(str(wd), list(slides["slide_id"]))
    (wd / "tiling_config.yaml").write_text("config:\n  target_mpp: 0.5\n")
    marker.write_text(json.dumps(params))
    return {"generate_s": round(time.perf_counter() - t0, 1)}


def _du_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


# --------------------------------------------------------------------------- stages (run in a child process)


def _stage_ingest(wd: Path) -> dict:
    import raypath.wsi.ingest as ing

    meta_cols = ("width", "height", "levels", "level_downsamples", "level_dimensions", "mpp_x", "mpp_y",
                 "mpp_source", "objective_power", "vendor", "bytes", "fingerprint", "status", "error")
    sim = _slides_frame(1).iloc[0]
    ing.inspect_slide = lambda row, cfg: {c: sim[c] for c in meta_cols}  # no slide is opened
    out = wd / "ingest_out"
    t0 = time.perf_counter()
    df = ing.ingest(ing.IngestConfig(cohort=str(wd / "cohort.csv"), workdir=str(out), use_ray=False))
    return {"plan_s": time.perf_counter() - t0, "rows": len(df)}


def _stage_tile(wd: Path) -> dict:
    import raypath.wsi.tiling as tiling

    n = json.loads((wd / "simulated.json").read_text())["tiles_per_slide"]

    def summaries(rows, cfg):  # what the tasks send back (their parts are already written)
        return {r["slide_id"]: dict(slide_id=r["slide_id"], n_tiles=n, level=0,
                                    read_px=448, status="ok", warning=None, qc_png=None) for r in rows}

    tiling._tile_all = summaries
    t0 = time.perf_counter()
    summary = tiling.tile(tiling.TileConfig(workdir=str(wd), qc=False))
    return {"plan_s": time.perf_counter() - t0, "tiles": int(summary["n_tiles"].sum())}


def _stage_embed(wd: Path) -> dict:
    from raypath.embed.api import EmbedConfig, model_identity, plan_embed
    from raypath.io.storage import S3Options

    t0 = time.perf_counter()
    cfg = EmbedConfig(workdir=str(wd), model="tiny-vit", weights="random")
    ident = model_identity(cfg.model, cfg.weights, cfg.adapter)
    plan = plan_embed(cfg, ident, str(wd / "features" / ident.model_key), S3Options())
    items = [{"slide_id": t.slide_id, "uri": t.uri, "tiles_sha256": t.tiles_sha256, "tile_px": t.tile_px}
             for t in plan.todo]  # what _build_dataset hands Ray Data
    return {"plan_s": time.perf_counter() - t0, "slides": len(items), "tiles": plan.n_tiles}


def _clinical(wd: Path):
    import pandas as pd

    s = pd.read_parquet(wd / "slides.parquet", columns=["slide_id", "patient_id", "cohort", "time", "event", "status"])
    return s[s["status"] == "ok"].reset_index(drop=True)


def _stage_mil(wd: Path) -> dict:
    from raypath.embed.store import FeatureStore
    from raypath.evaluation.splits import make_splits

    t0 = time.perf_counter()
    have = set(FeatureStore(str(wd / "features" / "sim-00000000")).slide_ids())
    df = _clinical(wd)
    df = df[df["slide_id"].isin(have)].reset_index(drop=True)
    splits = make_splits(df, "lodo", "event", 5, 1, 0, 0.2, None)
    return {"plan_s": time.perf_counter() - t0, "slides": len(df), "splits": len(splits)}


def _stage_robustness(wd: Path) -> dict:
    from raypath.robustness.api import RobustnessConfig, load_sample

    cfg = RobustnessConfig(workdir=str(wd))
    max_total = max(cfg.kmeans_max_samples, cfg.knn_max_samples, cfg.probe_max_samples,
                    cfg.cluster_max_samples, cfg.tsne_max_points)
    t0 = time.perf_counter()
    slides = _clinical(wd)
    X, meta, info = load_sample(str(wd / "features" / "sim-00000000"), slides, cfg.tiles_per_slide, cfg.seed,
                                max_total=max_total, min_per_slide=cfg.tsne_tiles_per_slide)
    return {"plan_s": time.perf_counter() - t0, "sampled_tiles": int(len(X))}


def _stage_embed_worker(wd: Path) -> dict:
    from raypath.embed.api import _TILE_COLS
    from raypath.wsi.tile_table import read_slide_tiles, tiles_hash

    t0 = time.perf_counter()
    t = read_slide_tiles(str(wd), "TCGA-000000", columns=list(_TILE_COLS))
    tiles_hash(t)
    return {"plan_s": time.perf_counter() - t0, "tiles": len(t)}


def _stage_mil_worker(wd: Path) -> dict:
    from raypath.mil.data import BagList, epoch_order, load_bag_arrays, shard

    t0 = time.perf_counter()
    df = _clinical(wd)
    ids = df["slide_id"].tolist()
    bags = load_bag_arrays(str(wd / "features" / "sim-00000000"), ids)
    rng = np.random.default_rng(0)
    order = shard(epoch_order(df["event"].to_numpy(), len(ids), rng), rank=0, world_size=4)
    for i in order:  # one epoch of this rank's shard
        bags[ids[i]]
    ev = BagList(bags, ids[::5])
    for s in range(0, len(ev), 64):  # evaluation, 64 bags per batch
        ev[s : s + 64]
    return {"plan_s": time.perf_counter() - t0, "bag_reads": bags.reads, "cache_mb": bags.cached_bytes / 2**20}


def _baseline_embed_driver(wd: Path) -> dict:
    """Before: embed's driver loaded every tile row's geometry and grouped it by slide."""
    import pandas as pd

    t0 = time.perf_counter()
    tiles = pd.read_parquet(wd / "tiles.parquet", columns=["slide_id", "tile_id", "x", "y", "level", "read_px",
                                                          "tile_px"])
    by_slide = {sid: t for sid, t in tiles.groupby("slide_id", sort=False)}
    return {"plan_s": time.perf_counter() - t0, "tiles": len(tiles), "slides": len(by_slide)}


def run_child(stage: str, wd: Path) -> None:
    fn = {"ingest": _stage_ingest, "tile": _stage_tile, "embed": _stage_embed, "mil": _stage_mil,
          "robustness": _stage_robustness, "embed-worker": _stage_embed_worker, "mil-worker": _stage_mil_worker,
          "baseline-embed": _baseline_embed_driver}[stage]
    out = fn(wd)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(out))


def _child(stage: str, wd: Path) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(HERE), "--child", stage, "--workdir", str(wd)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--tiles-per-slide", type=int, default=10_000)
    ap.add_argument("--bag-tiles", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="simulated workdir (default /tmp/raypath-bench/scale-<slides>)")
    ap.add_argument("--stages", default=",".join(DRIVER_STAGES + WORKER_STAGES))
    ap.add_argument("--baseline", action="store_true", help="also embed's old driver (all tile rows in pandas)")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for tests)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    wd = Path(a.workdir or f"/tmp/raypath-bench/scale-{a.slides}")
    if a.child:
        run_child(a.child, wd)
        return {}
    res = {"slides": a.slides, "tiles_per_slide": a.tiles_per_slide, "bag_tiles": a.bag_tiles, "dim": a.dim,
           **generate(wd, a.slides, a.tiles_per_slide, a.bag_tiles, a.dim)}
    res["workdir_mb"] = round(_du_mb(wd), 1)
    stages = [s for s in a.stages.split(",") if s] + (["baseline-embed"] if a.baseline else [])
    res["stages"] = {s: _child(s, wd) for s in stages}
    drivers = [v["peak_rss_mb"] for k, v in res["stages"].items() if k in DRIVER_STAGES]
    res["driver_peak_rss_mb"] = max(drivers) if drivers else None
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{a.slides} slides x {a.tiles_per_slide} tiles, features {a.bag_tiles} x {a.dim}; "
              f"workdir {res['workdir_mb']:.0f} MB (generated in {res['generate_s']} s)")
        print(f"{'stage':<16}{'peak RSS MB':>12}{'plan s':>9}  detail")
        for k, v in res["stages"].items():
            detail = {x: y for x, y in v.items() if x not in ("peak_rss_mb", "plan_s")}
            print(f"{k:<16}{v['peak_rss_mb']:>12.0f}{v['plan_s']:>9.2f}  {detail}")
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    main()
