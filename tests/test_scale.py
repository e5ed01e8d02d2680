"""Flat memory in cohort size: lazy MIL bags, and driver peak RSS of planning at 100 vs 1,000 slides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raypath.embed.store import FeatureStore, write_bag_table
from raypath.errors import RaypathError
from raypath.mil.data import BagList, StoreBags, load_bag_arrays

ROOT = Path(__file__).resolve().parents[1]


def _store(path: Path, n: int, tiles: int = 50, dim: int = 8) -> FeatureStore:
    rng = np.random.default_rng(0)
    for i in range(n):
        f = rng.normal(size=(tiles, dim)).astype(np.float32)
        write_bag_table(str(path), f"s{i:03d}", np.arange(tiles), np.zeros((tiles, 2), np.int64), f)
    return FeatureStore(str(path))


def test_store_bags_read_on_use_with_a_bounded_cache(tmp_path):
    store = _store(tmp_path / "f", 12)
    ids = store.slide_ids()
    one = 50 * 8 * 2  # bytes of one float16 bag
    bags = load_bag_arrays(store, ids, max_bytes=3 * one)
    assert isinstance(bags, StoreBags) and bags.reads == 0 and len(bags) == 12
    np.testing.assert_array_equal(bags["s004"], store.load_bag("s004").features.astype(np.float16))
    for sid in ids:
        bags[sid]
    assert bags.reads == 13 and bags.cached_bytes <= 3 * one  # s004 evicted and read again; LRU holds 3
    bags["s011"]
    assert bags.reads == 13  # most recent: still cached
    seq = BagList(bags, ["s000", "s001"])
    assert len(seq) == 2 and [b.shape for b in seq[0:2]] == [(50, 8), (50, 8)]
    bags["extra"] = np.ones((3, 8), np.float16)  # assigned entries are held, never evicted
    assert "extra" in bags and bags["extra"].shape == (3, 8)
    with pytest.raises(RaypathError, match="no features for slide"):
        load_bag_arrays(store, ["s000", "nope"])


@pytest.mark.timeout(300)
def test_driver_planning_memory_is_flat_in_cohort_size(tmp_path):
    """Peak RSS of the driver's planning (tile index, embed plan, MIL/robustness planning) in a fresh
    subprocess at 100 and 1,000 simulated slides: growth below 10 %."""
    peaks, stages = {}, {}
    for n in (100, 1000):
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--slides", str(n),
             "--tiles-per-slide", "2000", "--bag-tiles", "200", "--workdir", str(tmp_path / f"c{n}"),
             "--stages", "tile,embed,mil", "--json"],
            capture_output=True, text=True, timeout=280, cwd=ROOT,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[n] = res["driver_peak_rss_mb"]
        stages[n] = {k: v["peak_rss_mb"] for k, v in res["stages"].items()}
        assert res["stages"]["embed"]["tiles"] == n * 2000
    assert peaks[1000] / peaks[100] - 1 < 0.10, peaks
    # the stages whose inputs grow with the tiles (not only with the slides) stay flat one by one
    # (robustness is not listed: its tile sample grows with the cohort up to its cap, by design)
    for stage in ("embed", "tile", "mil"):
        assert stages[1000][stage] / stages[100][stage] - 1 < 0.10, (stage, stages)
