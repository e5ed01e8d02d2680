"""CPU smoke tests of the GPU model paths (raypath.embed.fast): bf16 weights + SDPA, batch probe."""

from __future__ import annotations

import numpy as np

from raypath.embed.api import TileEmbedder


def _tiles(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def test_fast_path_runs_and_stays_close_to_fp32(monkeypatch):
    x = _tiles()
    ref = TileEmbedder("tiny-vit", None, None, batch_size=4, device="cpu", amp="off", dtype="float32").embed(x)
    fast = TileEmbedder("tiny-vit", None, None, batch_size=4, device="cpu", amp="fast", dtype="float32")
    np.testing.assert_array_equal(fast.embed(x), ref)  # CPU: fp32 (+ SDPA, the same kernels here)
    monkeypatch.setenv("RAYPATH_FAST_BF16_ON_CPU", "1")  # the GPU's bf16 weights, on the CPU
    bf16 = TileEmbedder("tiny-vit", None, None, batch_size=4, device="cpu", amp="fast", dtype="float32")
    got = bf16.embed(x)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos


def test_batch_probe_picks_a_size_and_stops_when_it_stops_paying():
    from raypath.embed.fast import probe_batch_size

    def make(b):
        return TileEmbedder("tiny-vit", None, None, batch_size=b, device="cpu", amp="off")

    best, rates = probe_batch_size(make, 224, sizes=(2, 4, 8), seconds=0.05, min_gain=10.0)
    assert best in rates and set(rates) <= {2, 4, 8}
    assert len(rates) == 2  # a 10x gain is never reached: the probe stops after the second size
