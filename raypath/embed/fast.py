"""The fastest exact-enough model path on a GPU (``raypath embed --amp fast``), and a batch-size probe.

``--amp fast`` on a CUDA actor:

* the whole model in **bf16 weights** (not autocast: half the memory traffic of the
  element-wise ops and no per-op casts);
* **SDPA** attention (``torch.nn.functional.scaled_dot_product_attention``: flash / memory-
  efficient kernels) -- timm ViTs are switched to their fused path, Hugging Face models are
  built with ``attn_implementation="sdpa"`` already (:mod:`raypath.fm.families`);
* **torch.compile** of the backbone, for the one input shape every forward has, with
  Inductor's FX-graph and autograd caches on disk (:func:`enable_compile_cache`), so a second
  run (or a second actor on the machine) reuses the compiled kernels instead of recompiling.

On a CPU actor ``fast`` is plain fp32 (bf16 matmuls are slow on most CPUs); the same
function runs there in the smoke test with ``compile=False``.

``--batch-size 0`` picks the batch by a short probe (:func:`probe_batch_size`): doubling
from 32 while throughput still grows by 5 % and memory allows, run once in a GPU task
before the pipeline starts.

Measured on an H100 (benchmarks/README.md): ViT-L/16 2,135 tiles/s with bf16 autocast,
2,941 with bf16 weights + compile.  Whether ``fast`` keeps features within cosine 0.999 of
fp32 is measured by ``benchmarks/bench_gpu.py --check-fp32`` on the GPU machine.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: Where Inductor keeps compiled kernels between runs (``$TORCHINDUCTOR_CACHE_DIR`` wins).
DEFAULT_COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "raypath", "inductor")
#: Batch sizes the probe tries, in order.
PROBE_SIZES = (32, 64, 128, 256, 512, 1024)


def enable_compile_cache(path: str | None = None) -> str:
    """Turn on Inductor's on-disk caches (before the first ``torch.compile``); returns the folder."""
    folder = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path or DEFAULT_COMPILE_CACHE)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.makedirs(folder, exist_ok=True)
    return folder


def use_sdpa(module) -> int:
    """Switch every timm attention block under ``module`` to its fused SDPA path; returns how many."""
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn") and not getattr(m, "fused_attn"):
            m.fused_attn = True
            n += 1
        elif hasattr(m, "fused_attn"):
            n += 1
    return n


def fast_path(backbone, device: str, compile: bool = True) -> tuple[Callable, Any]:
    """Apply ``--amp fast`` to ``backbone``: ``(forward, input dtype)``.

    CUDA: bf16 weights, SDPA, ``torch.compile`` with the disk cache (``compile=False`` skips it).
    CPU: fp32 and SDPA; bf16 weights only when ``RAYPATH_FAST_BF16_ON_CPU=1`` (the smoke test).
    """
    import torch

    n = use_sdpa(backbone)
    on_gpu = str(device).startswith("cuda")
    dtype = torch.bfloat16 if on_gpu or os.environ.get("RAYPATH_FAST_BF16_ON_CPU") == "1" else torch.float32
    backbone.to(dtype)
    forward = backbone
    if compile and on_gpu:
        enable_compile_cache()
        forward = torch.compile(backbone)
    log.info("fast path: %s weights, SDPA in %d attention block(s), compile %s", dtype, n, bool(compile and on_gpu))
    return forward, dtype


def probe_batch_size(make_embedder: Callable[[int], Any], img_size: int, sizes=PROBE_SIZES,
                     seconds: float = 1.0, min_gain: float = 0.05) -> tuple[int, dict[int, float]]:
    """The batch size with the best tiles/s, doubling while it still grows by ``min_gain``.

    ``make_embedder(batch)`` returns an object with ``embed(uint8 [n, s, s, 3])`` (a
    :class:`raypath.embed.api.TileEmbedder`, not compiled: every size would recompile).
    A size that runs out of memory ends the probe.  Returns ``(best, {size: tiles/s})``.
    """
    import torch

    rates: dict[int, float] = {}
    for b in sizes:
        try:
            emb = make_embedder(b)
            x = np.zeros((b, img_size, img_size, 3), np.uint8)
            emb.embed(x)  # warm-up (kernels, allocator)
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < seconds:
                emb.embed(x)
                n += b
            rates[b] = n / (time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            log.info("batch probe: %d runs out of memory", b)
            break
        finally:
            emb = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if len(rates) > 1 and rates[b] < (1 + min_gain) * max(v for k, v in rates.items() if k != b):
            break
    if not rates:
        raise RuntimeError(f"batch probe: even {sizes[0]} tiles do not fit")
    best = max(rates, key=rates.get)
    log.info("batch probe: %s -> %d", {k: round(v) for k, v in rates.items()}, best)
    return best, rates
