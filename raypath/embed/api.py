"""``raypath embed``: tiles -> foundation-model features, streamed with Ray Data.

Pipeline (one Ray Data dataset, streaming, memory bounded by the executor's
budget rather than the cohort's size)::

    slides with tiles (driver: one row per slide to embed)
      -> read tasks, one per slide           (raypath.wsi.reader: each stored JPEG tile decoded once,
                                              yields uint8 batches [n, tile_px, tile_px, 3])
      -> actor pool (ActorPoolStrategy)     (EmbedActor: model loaded once per actor; uint8 -> device,
                                              normalise on the device, bf16/fp16 autocast on GPU;
                                              every forward has exactly batch_size rows, padded)
      -> driver: group rows per slide       (a slide is complete when all its tiles arrived)
      -> features/<model_key>/<slide_id>.parquet, written atomically, + manifest.json

Why the driver writes: a slide's tiles are split across actor batches (and
actors), so something has to see a slide whole; the driver already receives
every row to count progress, features are small (D x 2 bytes per tile), and
writing from one place makes "each slide exactly once" simple: a file appears
only when complete, by an atomic rename / single PUT.

Resuming: each slide's *cache key* (sha256 of the slide fingerprint, its tile
rows, the model key, the weights/adapter sha256, preprocessing and storage
dtype) is stored in the slide file's parquet metadata and in
``manifest.json``.  A re-run skips slides whose file carries the same key;
``force=True`` redoes them.  A driver killed at any point leaves complete files
only, so the re-run embeds each remaining slide exactly once.

Determinism: every forward pass runs on exactly ``batch_size`` tiles (the
last chunk padded), so a tile's features never depend on how Ray Data
happened to batch it with other tiles.

``model_key`` = ``<registry key>-<8 hex>`` where the hex is the start of
sha256(``weights_sha256 + "|" + (adapter_sha256 or "")``): the same model
name with other weights or another adapter gets its own folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.errors import EXIT_SOME_FAILED, RaypathError, StorageUnavailable, cause_of, failure_counts
from raypath.embed.store import (
    CACHE_KEY_META,
    MANIFEST_VERSION,
    file_cache_key,
    read_manifest,
    write_bag_table,
    write_manifest,
)
from raypath.embed.identity import (  # noqa: F401 (make_model_key: API)
    FeatureIdentity,
    derive_identity,
    identity_doc,
    make_model_key,
    slide_cache_key,
    workdir_target_mpp,
)
from raypath.fm.registry import ModelSpec
from raypath.io.storage import S3Options, exists, filesystem_for, is_remote, join, read_parquet, strip_protocol
from raypath.io.storage import activity, as_outage, check_storage
from raypath.embed.preflight import check_resources, check_weights
from raypath.wsi.tile_table import read_slide_tiles, tile_index, tiles_hash  # noqa: F401 (tiles_hash: API)

log = logging.getLogger(__name__)

#: Memory reserved per read task (decoded stored tiles of ~2 rows + a few batches).
READ_TASK_MEMORY_BYTES = 512 * 1024 * 1024
#: Columns of one tile row as carried from the driver to a read task (int64 each).
_TILE_COLS = ("tile_id", "x", "y", "level", "read_px", "tile_px")


class EmbedConfig(StageConfig):
    """Parameters of ``raypath embed``."""

    workdir: str = Field(description="project folder (local or s3://) with slides.parquet and tiles.parquet")
    model: str = Field(description="registry key of the foundation model (phikon, uni, virchow2, ..., tiny-vit)")
    weights: str | None = Field(
        None,
        description="checkpoint file (.safetensors/.bin) or Hugging Face folder; default: HF cache/hub; "
        "'random' = random init (tests/benchmarks)",
    )
    adapter: str | None = Field(None, description="peft adapter folder (adapters/<run>/) merged into the model")
    prompts: str | None = Field(
        None, description="prompt file (.safetensors of PathoTune or VPT prompt tuning, docs/pathotune.md) used by "
        "every forward pass; its sha256 is part of the feature identity (own store)")
    batch_size: int = Field(
        64, ge=0, description="tiles per forward pass (0: chosen by a short probe on one model replica, "
        "see raypath.embed.fast)")
    num_actors: int | None = Field(None, ge=1, description="model replicas (default: one per GPU, or derived from CPUs)")
    num_gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per model replica (default: 1 if the cluster has GPUs, else 0 = CPU)"
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per model replica (CPU: also torch threads)")
    read_threads: int = Field(1, ge=1, description="JPEG decoding threads per read task")
    actor_concurrency: int | None = Field(
        None, ge=1,
        description="batches in flight per model replica (default: 2 on GPU so host-side copies overlap "
        "the forward pass, 1 on CPU)",
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype of the features")
    amp: Literal["auto", "bf16", "fp16", "bf16-weights", "fast", "off"] = Field(
        "auto",
        description="GPU precision: autocast bf16 (auto) or fp16, or bf16-weights = the whole model cast to bf16 "
        "(faster: half the memory traffic of the element-wise ops; numerics differ slightly from autocast), or "
        "fast = bf16 weights + SDPA + torch.compile cached on disk (raypath.embed.fast; fp32 on a CPU)",
    )
    compile: bool = Field(False, description="torch.compile the model (GPU; pays a warm-up per actor)")
    channels_last: bool = Field(False, description="channels-last input layout")
    force: bool = Field(False, description="re-embed slides whose features are already up to date")
    slide_ids: list[str] | None = Field(None, description="only these slides")
    feature_dir: str | None = Field(
        None, description="output feature store (default: <workdir>/features/<model>[+<adapter run>]-<hash>)",
        json_schema_extra={"flag": "--features", "aliases": ["--feature-dir"]})  # one spelling on every verb
    progress_interval_s: float = Field(10.0, gt=0, description="seconds between progress lines")
    object_store_limit_mb: int | None = Field(
        None, ge=64, description="cap on Ray Data's object-store use (small machines)"
    )
    variants: int = Field(
        0, ge=0, description="also write K generated stain/scanner views per slide to <features>/variants/v<k>/ "
        "(one seeded draw per slide and view, applied to all its tiles; for `raypath mil --variant-source generated`)",
    )
    variant_strength: float = Field(
        0.33, ge=0, le=1, description="augmentation strength of the generated views (0 weak, 1/3 strong, 1 max)"
    )
    variant_seed: int = Field(0, description="seed of the generated views' draws")
    damaged_tiles: Literal["skip", "keep"] = Field(
        "skip", description="tiles whose JPEG data is damaged (decode raised or warned): recorded in manifest.json, "
        "then left out of the features (skip) or embedded with the decoder's best effort (keep)",
    )
    decode: Literal["full", "scaled", "gpu"] = Field(
        "full", description="tile decoding: full (exact read_region pixels); scaled (when the read is downsampled, "
        "e.g. 40x slides at 0.5 um/px, JPEG tiles are decoded at 1/2, 1/4 or 1/8 inside libjpeg-turbo: ~2-3x faster "
        "reading); gpu (read tasks ship compressed tiles, the model actor decodes them: nvJPEG on a GPU). "
        "Part of the feature identity",
    )
    max_damaged_fraction: float = Field(
        0.05, ge=0, le=1, description="a slide with more damaged tiles than this is failed (corrupt_tile_data)"
    )

    def s3_options(self) -> S3Options:
        return S3Options.from_env()


@dataclass
class EmbedResult:
    """What a run did.  ``slides`` has one row per slide: status done/skipped/failed."""

    feature_dir: str
    model_key: str
    slides: pd.DataFrame
    tiles_embedded: int = 0
    elapsed_s: float = 0.0
    stats: str = ""
    #: seconds from the call to the first embedded batch at the driver (start-up: Ray, actors, model load)
    first_output_s: float | None = None
    #: tiles/s between the first and the last embedded batch (the pipeline's steady state)
    steady_tiles_per_s: float | None = None

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0


# --------------------------------------------------------------------------- identity
# Defined once for every writer and reader in raypath.embed.identity; the names
# below are kept for code that imports them from here.

ModelIdentity = FeatureIdentity


def model_identity(model: str | ModelSpec, weights: str | None, adapter: str | None,
                   prompts: str | None = None, decode: str = "full") -> FeatureIdentity:
    """Hash the weights and adapter without building the model (driver side):
    :func:`raypath.embed.identity.derive_identity`; ``decode`` is the reader's mode (full / scaled)."""
    from raypath.embed.identity import decode_id

    return derive_identity(model if isinstance(model, str) else model.key, weights, adapter, prompts,
                           decode=decode_id(decode))


# --------------------------------------------------------------------------- per-item logic (no Ray)


def _error_row(slide_id: str, tile_px: int, msg: str) -> dict[str, np.ndarray]:
    """The one row that records a slide that could not be read (the driver marks it failed)."""
    return {
        "slide_id": np.array([slide_id], dtype=object),
        "tile_id": np.array([-1], np.int64),
        "x": np.array([0], np.int64),
        "y": np.array([0], np.int64),
        "image": np.zeros((1, tile_px, tile_px, 3), np.uint8),
        "error": np.array([msg[:2000]], dtype=object),
        "damage": np.array([""], dtype=object),
    }


def _read_failure(e: BaseException, uri: str, s3: S3Options | None) -> str:
    """A read failure as ``"<cause>: ... ; <remedy>"``; an outage raises :class:`StorageUnavailable` instead."""
    from raypath.wsi.slide_io import SlideError, classify_exception

    verdict = classify_exception(e, uri, s3)  # raises for an outage: the run stops, the slide is not blamed
    if isinstance(e, RaypathError) and not isinstance(e, SlideError) and cause_of(str(e)) not in ("other", "unknown"):
        return str(e)  # the reader's own message already starts with its cause
    return str(verdict)


def read_slide_batches(slide_id: str, uri: str, tiles: pd.DataFrame, batch_size: int,
                       num_threads: int = 1, s3: S3Options | None = None,
                       decode: str = "full") -> Iterator[dict[str, np.ndarray]]:
    """Yield uint8 tile batches of one slide as Ray Data rows; a failure becomes one error row."""
    from raypath.wsi.reader import read_tiles

    pos = tiles.set_index("tile_id")[["x", "y"]]
    if decode == "gpu":
        yield from _packet_batches(slide_id, uri, tiles, pos, batch_size, s3)
        return
    damaged: dict[int, str] = {}  # tile_id -> cause, filled by the reader (raypath.wsi.jpeg)
    try:
        with activity(f"embed slide {slide_id}"):
            for tid, imgs in read_tiles(uri, tiles, s3=s3, batch_tiles=batch_size, num_threads=num_threads,
                                        damaged=damaged, decode=decode):
                xy = pos.loc[tid].to_numpy(np.int64)
                yield {
                    "slide_id": np.full(len(tid), slide_id, dtype=object),
                    "tile_id": tid,
                    "x": xy[:, 0],
                    "y": xy[:, 1],
                    "image": imgs,
                    "error": np.full(len(tid), "", dtype=object),
                    "damage": np.array([damaged.get(int(t), "") for t in tid], dtype=object),
                }
    except Exception as e:  # a bad slide is recorded, never stops the run (an outage does: exit 4)
        px = int(tiles["tile_px"].iloc[0]) if len(tiles) else 224
        # an outage raises here: the task fails, Ray Data stops at once (an error row would wait for the
        # actors to pass it on), and the driver stops the run with exit 4
        msg = _read_failure(e, uri, s3)
        log.warning("embed: slide %s failed while reading: %s", slide_id, msg)
        yield _error_row(slide_id, px, msg)


def _packet_batches(slide_id: str, uri: str, tiles: pd.DataFrame, pos: pd.DataFrame, batch_size: int,
                    s3: S3Options | None) -> Iterator[dict[str, np.ndarray]]:
    """decode="gpu": rows carry compressed-tile packets (raypath.embed.gpu_decode) instead of pixels."""
    from raypath.embed.gpu_decode import slide_packets

    try:
        for tid, packets in slide_packets(uri, tiles, batch_size, s3):
            xy = pos.loc[tid].to_numpy(np.int64)
            packet = np.empty(len(packets), dtype=object)
            packet[:] = packets
            yield {"slide_id": np.full(len(tid), slide_id, dtype=object), "tile_id": tid, "x": xy[:, 0],
                   "y": xy[:, 1], "packet": packet, "error": np.full(len(tid), "", dtype=object),
                   "damage": np.full(len(tid), "", dtype=object)}
    except Exception as e:  # a bad slide is recorded, never stops the run (an outage does: exit 4)
        msg = _read_failure(e, uri, s3)
        log.warning("embed: slide %s failed while reading: %s", slide_id, msg)
        yield _error_row(slide_id, 224, msg)


def read_planned_slide(slide_id: str, uri: str, workdir: str, tiles_sha256: str, tile_px: int,
                       batch_size: int, num_threads: int = 1,
                       s3: S3Options | None = None, decode: str = "full") -> Iterator[dict[str, np.ndarray]]:
    """A read task's work for one slide: load the slide's own rows of ``tiles.parquet`` (one part),
    check they are the rows the driver planned (same :func:`tiles_hash`), then read them."""
    try:
        tiles = read_slide_tiles(workdir, slide_id, s3, columns=list(_TILE_COLS)).sort_values("tile_id")
    except Exception as e:
        if as_outage(e, s3) is not None:
            raise as_outage(e, s3) from None
        yield _error_row(slide_id, tile_px, f"unreadable: reading its rows of tiles.parquet failed "
                         f"({type(e).__name__}: {e}); re-run `raypath tile`")
        return
    if tiles_hash(tiles) != tiles_sha256:
        yield _error_row(slide_id, tile_px, "tiles.parquet changed since the run was planned (re-tiled?): "
                         "re-run `raypath embed`")
        return
    yield from read_slide_batches(slide_id, uri, tiles, batch_size, num_threads, s3, decode)


def _read_fn(batch: dict[str, np.ndarray], workdir: str, batch_size: int,
             num_threads: int, decode: str = "full") -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read UDF: one planned slide (slide_id, uri, tiles_sha256, tile_px) per input row."""
    for sid, uri, sha, px in zip(batch["slide_id"], batch["uri"], batch["tiles_sha256"], batch["tile_px"]):
        for row in read_planned_slide(str(sid), str(uri), workdir, str(sha), int(px), batch_size,
                                      num_threads, S3Options.from_env(), decode):
            if decode == "gpu" and "image" in row:  # an error row: one block schema (packets, no pixels)
                row.pop("image")
                row["packet"] = np.array([b""], dtype=object)
            yield row


def _precision(backbone, device: str, amp: str, compile: bool):
    """``(forward, input dtype, autocast dtype | None, compiled?)`` of ``--amp`` on ``device``."""
    import torch

    from raypath.train.precision import resolve_precision  # the one resolver (train/)

    on_gpu = device.startswith("cuda")
    forward, input_dtype, amp_dtype = backbone, torch.float32, None
    if amp == "fast":  # bf16 weights + SDPA + cached torch.compile on a GPU (raypath.embed.fast)
        from raypath.embed.fast import fast_path

        forward, input_dtype = fast_path(backbone, device, compile=True)
        compile = on_gpu
    elif on_gpu and amp == "bf16-weights":
        backbone.to(torch.bfloat16)
        input_dtype = torch.bfloat16
    elif on_gpu and amp != "off":
        amp_dtype = resolve_precision(device, amp).dtype  # bf16, or fp16 where the GPU lacks bf16
    if compile and forward is backbone:
        forward = torch.compile(backbone)
    return forward, input_dtype, amp_dtype, compile


class TileEmbedder:
    """Model + fixed-shape batching, usable without Ray (the actor wraps it)."""

    def __init__(self, model: str, weights: str | None, adapter: str | None, batch_size: int,
                 device: str | None = None, amp: str = "auto", compile: bool = False,
                 channels_last: bool = False, num_threads: int | None = None, dtype: str = "float16",
                 prompts: str | None = None):
        import torch

        from raypath.fm.backbone import load_backbone

        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        from raypath.train.precision import resolve_device  # the one resolver (train/)

        device = str(resolve_device(device or "auto"))
        self.device = device
        self.batch_size = int(batch_size)
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.backbone = load_backbone(model, weights=weights, adapter=adapter, device=device)
        if prompts:  # PathoTune (TVP + TTP + IVP) or plain VPT tokens: a tuned embedder
            from raypath.fm.pathotune import load_prompt_file

            load_prompt_file(self.backbone, prompts)
        self.backbone.channels_last = bool(channels_last)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self._forward, self.input_dtype, self.amp_dtype, compile = _precision(self.backbone, device, amp, compile)
        import threading

        self._local = threading.local()  # one CUDA stream per calling thread (actor concurrency > 1)
        if compile:
            # compile now, on one thread, for the one input shape every forward has (fixed batch,
            # img_size): concurrent first calls from the actor's threads would race in dynamo
            s = self.backbone.spec.img_size
            self.embed(np.zeros((self.batch_size, s, s, 3), np.uint8))

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[n, H, W, 3]`` -> features ``[n, D]`` (storage dtype); forward passes of exactly batch_size."""
        import torch

        n = len(images)
        out = np.empty((n, self.backbone.spec.embed_dim), self.dtype)
        B = self.batch_size
        stream_ctx = contextlib.nullcontext()
        if self.device.startswith("cuda"):
            if getattr(self._local, "stream", None) is None:
                self._local.stream = torch.cuda.Stream(device=self.device)
            stream_ctx = torch.cuda.stream(self._local.stream)
        with stream_ctx:
            self._embed_chunks(images, out, B)
        return out

    def _embed_chunks(self, images: np.ndarray, out: np.ndarray, B: int) -> None:
        import torch

        n = len(images)
        for s in range(0, n, B):
            chunk = images[s : s + B]
            m = len(chunk)
            on_device = isinstance(chunk, torch.Tensor)  # decode="gpu": tiles decoded on the actor's device
            if m < B:  # pad: a tile's features must not depend on its batch-mates' count
                if on_device:
                    chunk = torch.cat([chunk, chunk.new_zeros((B - m,) + tuple(chunk.shape[1:]))])
                else:
                    chunk = np.concatenate([chunk, np.zeros((B - m,) + chunk.shape[1:], np.uint8)])
            t = chunk if on_device else torch.from_numpy(np.ascontiguousarray(chunk))
            with torch.inference_mode():
                x = self.backbone.preprocess(t).to(self.input_dtype)
                ctx = (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None
                       else contextlib.nullcontext())
                with ctx:
                    f = self._forward(x)
                out[s : s + m] = f[:m].float().cpu().numpy().astype(self.dtype)


class EmbedActor:
    """Ray Data actor: one model per actor, loaded once in ``__init__``."""

    def __init__(self, **kw: Any):
        from raypath.plugins import load_plugins

        load_plugins(kw.pop("plugins", None))  # the driver's plugins (a private model) in this worker too
        self.variant = kw.pop("variant", None)  # generated view: raypath.embed.variants.VariantSpec
        self.embedder = TileEmbedder(**kw)

    def _decoded(self, batch: dict[str, np.ndarray]):
        """decode="gpu": the batch's packets decoded on this actor's device (raypath.embed.gpu_decode)."""
        from raypath.embed.gpu_decode import decode_packets

        ok = np.array([not e for e in np.asarray(batch["error"], dtype=object)], bool)
        images = decode_packets(batch["packet"], ok, self.embedder.device)
        return images.cpu().numpy() if self.variant is not None else images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"] if "packet" not in batch else self._decoded(batch)
        if self.variant is not None:
            from raypath.embed.variants import apply_variant

            images = apply_variant(images, batch["slide_id"], self.variant)
        err = np.asarray(batch["error"], dtype=object)
        ok = np.array([not e for e in err], bool)
        dim = self.embedder.backbone.spec.embed_dim
        emb = np.zeros((len(err), dim), self.embedder.dtype)
        if ok.any():
            idx = np.flatnonzero(ok)
            if images.dtype == object:  # tiles of different sizes in one batch: embed per size
                groups: dict[tuple, list[int]] = {}
                for i in idx:
                    groups.setdefault(np.asarray(images[i]).shape, []).append(i)
                for ids in groups.values():
                    emb[ids] = self.embedder.embed(np.stack([np.asarray(images[i]) for i in ids]))
            else:
                emb[idx] = self.embedder.embed(images[idx] if not ok.all() else images)
        return {
            "slide_id": batch["slide_id"],
            "tile_id": batch["tile_id"],
            "x": batch["x"],
            "y": batch["y"],
            "embedding": emb,
            "error": err,
            "damage": batch["damage"] if "damage" in batch else np.full(len(err), "", dtype=object),
        }


# --------------------------------------------------------------------------- driver


@dataclass
class SlideTask:
    """One slide to embed, as the driver holds it: a few fields, never its tile rows."""

    slide_id: str
    uri: str
    n_tiles: int
    tiles_sha256: str
    tile_px: int
    entry: dict


@dataclass
class EmbedPlan:
    """The driver's plan, from ``slides.parquet`` and the per-slide tile index (footers of
    ``tiles.parquet``'s parts): memory grows with the number of slides, not of tiles."""

    rows: list[dict]  # slides not embedded this run: no_tiles / skipped
    todo: list[SlideTask]
    entries: dict[str, dict]  # manifest entries (slides up to date)

    @property
    def n_tiles(self) -> int:
        return sum(t.n_tiles for t in self.todo)


def _load_inputs(cfg: EmbedConfig, s3: S3Options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ok slides of ``slides.parquet``, their :func:`raypath.wsi.tile_table.tile_index`)."""
    slides_uri = join(cfg.workdir, "slides.parquet")
    tiles_uri = join(cfg.workdir, "tiles.parquet")
    for uri, verb in ((slides_uri, "raypath ingest"), (tiles_uri, "raypath tile")):
        if not exists(uri, s3):
            raise RaypathError(f"{uri} not found: run `{verb}` on this workdir first")
    slides = read_parquet(slides_uri, s3).to_pandas()
    if "status" in slides.columns:
        slides = slides[slides["status"].fillna("ok") == "ok"]
    if cfg.slide_ids:
        unknown = sorted(set(cfg.slide_ids) - set(slides["slide_id"]))
        if unknown:
            raise RaypathError(
                f"--slide-ids {unknown[:5]} are not ok slides of {slides_uri}: check the ids or re-run ingest"
            )
        slides = slides[slides["slide_id"].isin(cfg.slide_ids)]
    index = tile_index(cfg.workdir, s3, slide_ids=set(slides["slide_id"].astype(str)))
    return slides.reset_index(drop=True), index


def _slide_entry(slide, ix, ident: ModelIdentity, dtype: str) -> dict:
    """Manifest entry (with the cache key) of one slide from its slides.parquet row and tile-index row."""
    fp = str(getattr(slide, "fingerprint", "") or "")
    ds = 1.0
    lds = getattr(slide, "level_downsamples", None)
    if lds is not None and len(lds) > int(ix.level):
        ds = float(lds[int(ix.level)])
    return {
        "cache_key": slide_cache_key(fp, str(ix.tiles_sha256), ident, dtype),
        "slide_fingerprint": fp,
        "tiles_sha256": str(ix.tiles_sha256),
        "n_tiles": int(ix.n_tiles),
        "patch_size": int(ix.tile_px),
        "patch_size_level0": int(round(int(ix.read_px) * ds)),
        "read_px": int(ix.read_px),
        "level": int(ix.level),
    }


#: parquet metadata key of a slide file's damaged-tile record (``{"damaged_tiles": ..., "damaged_policy": ...}``)
DAMAGE_META = "raypath.damaged_tiles"


def _file_damage(feature_dir: str, slide_id: str, s3: S3Options) -> dict:
    """The damaged-tile record a slide file carries in its parquet metadata (``{}`` when none)."""
    import pyarrow.parquet as pq

    from raypath.embed.store import slide_file
    from raypath.io.storage import open_file

    try:
        with open_file(slide_file(feature_dir, slide_id), "rb", s3) as f:
            raw = (pq.read_schema(f).metadata or {}).get(DAMAGE_META.encode())
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


def _read_manifest_or_fallback(feature_dir: str, s3: S3Options) -> dict:
    """``manifest.json``, or ``{}`` when it is corrupt: each slide file carries its own cache key
    (parquet metadata), so nothing is lost; the run rewrites the manifest."""
    try:
        manifest = read_manifest(feature_dir, s3)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        log.warning("embed: %s/manifest.json is corrupt (%s); using the cache keys stored in each slide file "
                    "and rewriting it", feature_dir, type(e).__name__)
        return {}
    if not isinstance(manifest, dict):
        log.warning("embed: %s/manifest.json is not a JSON object; rewriting it", feature_dir)
        return {}
    return manifest


def plan_embed(cfg: EmbedConfig, ident: ModelIdentity, feature_dir: str, s3: S3Options) -> EmbedPlan:
    """Which slides to embed, from per-slide tile counts and hashes (no tile row is loaded here)."""
    slides, index = _load_inputs(cfg, s3)
    by_slide = {str(r.slide_id): r for r in index.itertuples(index=False)}
    manifest = _read_manifest_or_fallback(feature_dir, s3)
    if manifest.get("model_key") not in (None, ident.model_key):
        log.warning("embed: %s held %s; entries of other models are dropped", feature_dir, manifest.get("model_key"))
        manifest = {}
    plan = EmbedPlan([], [], dict(manifest.get("slides", {})))
    present = _existing(feature_dir, s3)
    for r in slides.itertuples(index=False):
        sid = str(r.slide_id)
        ix = by_slide.get(sid)
        if ix is None or int(ix.n_tiles) == 0:
            plan.rows.append({"slide_id": sid, "status": "no_tiles", "n_tiles": 0, "error": None})
            continue
        entry = _slide_entry(r, ix, ident, cfg.dtype)
        up_to_date = False
        if not cfg.force and sid in present:
            old = plan.entries.get(sid, {})
            same_policy = old.get("damaged_policy", cfg.damaged_tiles) == cfg.damaged_tiles  # skip/keep changed
            if old.get("cache_key") == entry["cache_key"] and same_policy:
                up_to_date = True
            elif not old and file_cache_key(feature_dir, sid, s3) == entry["cache_key"]:  # written before a
                up_to_date = True  # crash, or the manifest was lost: the file's own metadata says what it holds
                plan.entries[sid] = dict(entry, **_file_damage(feature_dir, sid, s3))
        if up_to_date:
            plan.rows.append({"slide_id": sid, "status": "skipped", "n_tiles": int(ix.n_tiles), "error": None})
        else:
            plan.todo.append(SlideTask(sid, str(r.uri), int(ix.n_tiles), str(ix.tiles_sha256), int(ix.tile_px), entry))
    return plan


def _base_manifest(cfg: EmbedConfig, ident: ModelIdentity) -> dict:
    spec = ident.spec
    return {
        "version": MANIFEST_VERSION,
        "model_key": ident.model_key,
        "model": spec.key,
        "family": spec.family,
        "arch": spec.arch,
        "embed_dim": spec.embed_dim,
        "dtype": cfg.dtype,
        "weights": cfg.weights if cfg.weights else (spec.hf_repo or "random:0"),
        "weights_sha256": ident.weights_sha256,
        "adapter": cfg.adapter,
        "adapter_sha256": ident.adapter_sha256,
        "preprocessing": spec.preprocessing(),
        "resize": ("JPEG tiles decoded at 1/2, 1/4 or 1/8 (DCT scaling) when read_px >= 2 tile_px, then "
                   if cfg.decode == "scaled" else "")
        + "PIL bilinear read_px -> tile_px (reader), then bilinear+antialias tile_px -> img_size (device)",
        "decode": cfg.decode,
        "schema": "slide_id string, tile_id int64, x int64, y int64, embedding fixed_size_list<"
        + cfg.dtype + ">[" + str(spec.embed_dim) + "]",
        **({"variant": ident.variant} if ident.variant is not None else {}),
    }


def _assemble_slide(parts: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tile_ids sorted and de-duplicated (retried reads), xy [n, 2], features [n, D]) of one slide."""
    tid, first = np.unique(np.concatenate([p["tile_id"] for p in parts]), return_index=True)
    xy = np.stack([np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])], axis=1)
    return tid, xy[first], np.concatenate([p["embedding"] for p in parts])[first]


class _Collector:
    """Driver side: output rows -> complete slides -> feature files (threads) + manifest; holds slides in flight."""

    def __init__(self, cfg: EmbedConfig, plan: EmbedPlan, ident: ModelIdentity, feature_dir: str, s3: S3Options):
        self.cfg, self.ident, self.feature_dir, self.s3 = cfg, ident, feature_dir, s3
        self.base, self.entries, self.failed = _base_manifest(cfg, ident), plan.entries, {}
        self.target_mpp = workdir_target_mpp(cfg.workdir, s3)  # the identity's tiling
        self.expected = {t.slide_id: t.n_tiles for t in plan.todo}
        self.entry_of = {t.slide_id: t.entry for t in plan.todo}
        self.acc: dict[str, list[dict[str, np.ndarray]]] = {}
        self.seen: dict[str, set] = {}
        self.progress = _Progress(len(plan.todo), plan.n_tiles, cfg.progress_interval_s)
        self.writer = ThreadPoolExecutor(2, thread_name_prefix="raypath-write")
        self.pending: list[tuple[str, Future]] = []
        self.last_flush = time.perf_counter()
        self.tiles_done = 0
        self.damaged: dict[str, dict[str, str]] = {}  # slide -> {tile_id: cause} (decode raised or warned)
        self.outage = None  # a StorageUnavailable met while writing: the run stops

    def flush(self) -> None:
        doc = dict(self.base, identity=identity_doc(self.ident, self.entries, self.target_mpp),
                   slides=dict(sorted(self.entries.items())), failed=dict(sorted(self.failed.items())))
        bad = {sid: d for sid, d in self.damaged.items() if sid in self.failed}
        if bad:  # damaged tiles of slides that failed for them (those of written slides are in their entry)
            doc["failed_damaged_tiles"] = dict(sorted(bad.items()))
        write_manifest(self.feature_dir, doc, self.s3)

    def reap(self, block: bool = False) -> None:
        keep = []
        for sid, fut in self.pending:
            if block or fut.done():
                try:
                    fut.result()
                    self.entries[sid] = self.entry_of[sid]
                    self.progress.done += 1
                except Exception as e:  # storage errors: recorded, the slide is retried next run
                    self.outage = self.outage or as_outage(e, self.s3)
                    self.failed[sid] = f"unreadable: writing its features failed ({type(e).__name__}: {e}); re-run"
                    self.progress.failed += 1
            else:
                keep.append((sid, fut))
        self.pending[:] = keep
        if self.outage is not None:
            raise self.outage
        if block or time.perf_counter() - self.last_flush > 5.0:
            self.flush()
            self.last_flush = time.perf_counter()

    def add(self, out: dict[str, np.ndarray]) -> None:
        """One output batch of the actor pool."""
        sids = np.asarray(out["slide_id"], dtype=object)
        errs = np.asarray(out["error"], dtype=object)
        for sid in pd.unique(sids):
            m = sids == sid
            if sid in self.failed or sid not in self.expected:
                continue
            bad = [e for e in errs[m] if e]
            if bad and StorageUnavailable.from_record(bad[0]) is not None:
                raise StorageUnavailable.from_record(bad[0])  # the run stops; the slide is not blamed
            if bad:
                self.failed[sid] = str(bad[0])
                self.acc.pop(sid, None)
                self.progress.failed += 1
                log.warning("embed: slide %s failed: %s", sid, bad[0])
                continue
            part = {k: np.asarray(out[k])[m] for k in ("tile_id", "x", "y", "embedding", "damage") if k in out}
            self.acc.setdefault(sid, []).append(part)
            got = self.seen.setdefault(sid, set())
            before = len(got)
            got.update(part["tile_id"].tolist())
            self.progress.tiles += len(got) - before
            if len(got) >= self.expected[sid]:
                self._write(sid)
        self.reap()
        self.progress.maybe_log()

    def _write(self, sid: str) -> None:
        self.seen.pop(sid)
        parts = self.acc.pop(sid)
        tid, xy, feats = _assemble_slide(parts)
        damage = {int(t): str(m) for p in parts for t, m in zip(p["tile_id"], p.get("damage", ())) if m}
        if damage:
            kept = self._judge_damage(sid, tid, damage)
            if kept is None:
                return
            tid, xy, feats = tid[kept], xy[kept], feats[kept]
        self.tiles_done += len(tid)
        meta = {CACHE_KEY_META: self.entry_of[sid]["cache_key"], "model_key": self.ident.model_key}
        if "damaged_tiles" in self.entry_of[sid]:  # also in the file: a lost manifest loses no record
            meta[DAMAGE_META] = json.dumps({k: self.entry_of[sid][k] for k in ("damaged_tiles", "damaged_policy")})
        self.pending.append((sid, self.writer.submit(
            write_bag_table, self.feature_dir, sid, tid, xy, feats, self.cfg.dtype, self.s3, meta)))

    def _judge_damage(self, sid: str, tid: np.ndarray, damage: dict[int, str]) -> np.ndarray | None:
        """Record a slide's damaged tiles; the rows to write (``None``: the slide fails)."""
        self.damaged[sid] = {str(t): m for t, m in sorted(damage.items())}
        first_t, first_m = min(damage.items())
        if len(damage) > self.cfg.max_damaged_fraction * len(tid) or len(damage) == len(tid):
            self.failed[sid] = (f"corrupt_tile_data: {len(damage)} of {len(tid)} tiles are damaged (tile {first_t}: "
                                f"{first_m}); copy the slide again from the source or re-scan it, or raise "
                                "--max-damaged-fraction to embed the rest")
            self.progress.failed += 1
            log.warning("embed: slide %s failed: %s", sid, self.failed[sid])
            return None
        skip = self.cfg.damaged_tiles == "skip"
        self.entry_of[sid] = dict(self.entry_of[sid], damaged_tiles=self.damaged[sid],
                                  damaged_policy=self.cfg.damaged_tiles)
        log.warning("embed: slide %s: %d damaged tile(s) %s (tile %d: %s)", sid, len(damage),
                    "left out" if skip else "kept", first_t, first_m)
        return ~np.isin(tid, list(damage)) if skip else np.ones(len(tid), bool)

    def close(self) -> None:
        self.reap(block=True)
        self.writer.shutdown(wait=True)
        for sid in self.expected:
            if sid not in self.entries and sid not in self.failed:
                self.failed[sid] = f"incomplete: {len(self.seen.get(sid, ()))}/{self.expected[sid]} tiles came back"
        self.flush()


def derive_resources(cfg: EmbedConfig) -> tuple[int, float, float]:
    """(actors, gpus per actor, cpus per actor) from the config and ``ray.cluster_resources()``."""
    from raypath.io.ray_env import cluster_cpus, cluster_gpus

    gpus = cluster_gpus()
    per = cfg.num_gpus_per_actor
    if per is None:
        per = 1.0 if gpus >= 1 else 0.0
    if per > 0 and gpus <= 0:
        raise RaypathError(
            f"--num-gpus-per-actor {per} but the Ray cluster has no GPUs: drop the flag (CPU fallback) "
            "or connect to a cluster with GPUs (RAY_ADDRESS)"
        )
    if cfg.num_actors is not None:
        n = cfg.num_actors
    elif per > 0:
        n = max(1, int(gpus // per))
    else:  # CPU: leave about a quarter of the cores to the read tasks
        n = max(1, int((cluster_cpus() * 0.75) // cfg.num_cpus_per_actor))
    check_resources(n, cfg.num_cpus_per_actor, per)  # never wait forever for resources that cannot come
    return n, per, cfg.num_cpus_per_actor


class _Progress:
    def __init__(self, total_slides: int, total_tiles: int, interval_s: float):
        self.total_slides, self.total_tiles = total_slides, total_tiles
        self.interval_s = interval_s
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.done = self.failed = self.tiles = 0

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.tiles / dt
        left = self.total_tiles - self.tiles
        eta = f"{left / rate / 60:.1f} min" if rate > 0 else "?"
        return (f"embed: {self.done}/{self.total_slides} slides done, {self.failed} failed, "
                f"{self.tiles}/{self.total_tiles} tiles, {rate:.0f} tiles/s, ETA {eta}")

    def maybe_log(self) -> None:
        now = time.perf_counter()
        if now - self.last >= self.interval_s:
            self.last = now
            log.info(self.line())


@contextlib.contextmanager
def _data_context(cfg: EmbedConfig, batch_bytes: int):
    """Ray Data settings for this run, restored afterwards (the context is process-global)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old_block = ctx.target_max_block_size
    old_limits = ctx.execution_options.resource_limits
    old_order = ctx.execution_options.preserve_order
    # blocks of about 2 read batches: a read task hands tiles on early instead of buffering 128 MiB
    ctx.target_max_block_size = max(2 * batch_bytes, 4 << 20)
    ctx.execution_options.preserve_order = False
    if cfg.object_store_limit_mb:
        ctx.execution_options.resource_limits = old_limits.copy(
            object_store_memory=cfg.object_store_limit_mb * 1024 * 1024
        )
    try:
        yield ctx
    finally:
        ctx.target_max_block_size = old_block
        ctx.execution_options.resource_limits = old_limits
        ctx.execution_options.preserve_order = old_order


def _existing(feature_dir: str, s3: S3Options) -> set[str]:
    fs = filesystem_for(feature_dir, s3)
    base = feature_dir if is_remote(feature_dir) else strip_protocol(feature_dir)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(base)  # s3fs caches listings per process; another driver may have written since
    if not fs.exists(base):
        return set()
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
    if not is_remote(feature_dir):  # temp files of a killed run (an atomic rename never happened)
        for n in names:
            if ".parquet.tmp-" in n or ".json.tmp-" in n:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(base, n))
    return {n[: -len(".parquet")] for n in names if n.endswith(".parquet")}


def _absolute_paths(cfg: EmbedConfig) -> EmbedConfig:
    """Actors and read tasks may run in another working directory: hand them absolute local paths."""
    local = {k: os.path.abspath(v) for k in ("weights", "adapter", "prompts", "workdir")
             if (v := getattr(cfg, k)) and not is_remote(v) and os.path.exists(v)}
    return cfg.model_copy(update=local) if local else cfg


def _build_dataset(cfg: EmbedConfig, plan: EmbedPlan, spec: ModelSpec, variant=None):
    """Ray Data: one input row per planned slide -> read tasks (each loads its slide's tiles) -> actors."""
    import ray.data

    from raypath.io.ray_env import task_options

    n_actors, gpus, cpus = derive_resources(cfg)
    items = [{"slide_id": t.slide_id, "uri": t.uri, "tiles_sha256": t.tiles_sha256, "tile_px": t.tile_px}
             for t in plan.todo]
    from raypath.plugins import plugin_specs

    actor_kw = dict(model=spec.key, weights=cfg.weights, adapter=cfg.adapter, prompts=cfg.prompts,
                    batch_size=cfg.batch_size,
                    device="cuda" if gpus > 0 else "cpu", amp=cfg.amp, compile=cfg.compile,
                    channels_last=cfg.channels_last, num_threads=None if gpus > 0 else int(cpus),
                    dtype=cfg.dtype, variant=variant, plugins=plugin_specs())
    concurrency = cfg.actor_concurrency or (2 if gpus > 0 else 1)
    log.info("embed: %d actor(s) x (%g GPU, %g CPU), batch %d, %d batch(es) in flight per actor, %s",
             n_actors, gpus, cpus, cfg.batch_size, concurrency, "GPU" if gpus > 0 else "CPU")
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The memory request differs from the actors' resources on purpose: operators with equal
    # resources are fused, and reading must run in its own tasks, overlapping the forward
    # passes.  A retried read may re-send tiles; the driver de-duplicates by tile_id.
    ds = ds.map_batches(_read_fn, batch_size=1, batch_format="numpy", num_cpus=1, memory=READ_TASK_MEMORY_BYTES,
                        fn_kwargs=dict(workdir=cfg.workdir, batch_size=cfg.batch_size, num_threads=cfg.read_threads,
                                       decode=cfg.decode),
                        **task_options())  # this driver's S3 settings, also on a cluster started earlier
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=actor_kw,
        compute=ray.data.ActorPoolStrategy(size=n_actors, max_concurrent_calls_per_actor=concurrency),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=gpus,
        num_cpus=cpus,
        **task_options(),
    )


def _run_pipeline(cfg: EmbedConfig, plan: EmbedPlan, spec: ModelSpec, col: _Collector, variant=None) -> dict:
    """Stream the planned slides through Ray Data into ``col``; timing of the first/last output."""
    from raypath.io.quiet import drop_stderr_lines
    from raypath.io.ray_env import ensure_ray

    ensure_ray()
    tile_px = max(t.tile_px for t in plan.todo)
    t = {"first": None, "last": None, "tiles_at_first": 0, "stats": ""}
    # drop_stderr_lines: Ray 2.60 logs a false-alarm ERROR per actor pool (see raypath.io.quiet)
    with _data_context(cfg, cfg.batch_size * tile_px * tile_px * 3), drop_stderr_lines():
        ds = _build_dataset(cfg, plan, spec, variant)
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                now = time.perf_counter()
                if t["first"] is None:
                    t["first"], t["tiles_at_first"] = now, len(out["tile_id"])
                t["last"] = now
                col.add(out)
        except Exception as e:
            outage = as_outage(e, col.s3) or col.outage
            if outage is not None:  # keep what is written; do not wait on the storage that is down
                col.writer.shutdown(wait=False, cancel_futures=True)
                raise outage.with_progress(f"{col.progress.done} of {len(plan.todo)} slides were embedded and "
                                           "are kept") from None
            col.reap(block=True)
            col.writer.shutdown(wait=True)
            raise RaypathError(
                f"embedding failed after {col.progress.done} slides ({type(e).__name__}: {e}); finished slides "
                "are kept: fix the cause and re-run the same command to resume"
            ) from e
        col.close()
        with contextlib.suppress(Exception):
            t["stats"] = ds.stats()
    return t


def _probe_batch(cfg: EmbedConfig) -> int:
    """``--batch-size 0``: the batch size :func:`raypath.embed.fast.probe_batch_size` picks on one replica
    (a Ray task with the actors' resources; the eager model: compiling each size would cost minutes)."""
    from raypath.io.ray_env import ensure_ray

    ray = ensure_ray()
    _, gpus, cpus = derive_resources(cfg)
    amp = "bf16-weights" if cfg.amp == "fast" else cfg.amp

    def probe() -> int:
        from raypath.embed.fast import probe_batch_size
        from raypath.fm.registry import get_spec

        def make(b: int) -> TileEmbedder:
            return TileEmbedder(cfg.model, cfg.weights, cfg.adapter, b, amp=amp, dtype=cfg.dtype, prompts=cfg.prompts,
                                num_threads=None if gpus > 0 else int(cpus))

        return probe_batch_size(make, get_spec(cfg.model).img_size)[0]

    best = int(ray.get(ray.remote(num_gpus=gpus, num_cpus=cpus)(probe).remote()))
    log.info("embed: --batch-size 0 -> %d (probe)", best)
    return best


def embed(cfg: EmbedConfig) -> EmbedResult:
    """Embed every tile of ``cfg.workdir``'s slides; see the module docstring.

    Returns
    -------
    EmbedResult with one row per slide (``status``: done / skipped / failed).
    """
    t_start = time.perf_counter()
    s3 = cfg.s3_options()
    cfg = _absolute_paths(cfg)
    check_weights(cfg.model, cfg.weights)  # on the driver, before Ray: never 200 lines of actor traceback
    ident = model_identity(cfg.model, cfg.weights, cfg.adapter, prompts=cfg.prompts, decode=cfg.decode)
    from raypath.embed.identity import default_store_dir

    feature_dir = cfg.feature_dir or default_store_dir(cfg.workdir, ident.model_key, cfg.adapter, s3)
    check_storage([cfg.workdir, feature_dir], s3)
    plan = plan_embed(cfg, ident, feature_dir, s3)
    check_storage([t.uri for t in plan.todo], s3)
    if cfg.batch_size == 0 and plan.todo:
        cfg = cfg.model_copy(update={"batch_size": _probe_batch(cfg)})
    log.info("embed: model %s -> %s; %d slides to embed (%d tiles), %d up to date", ident.spec.key, feature_dir,
             len(plan.todo), plan.n_tiles, sum(r["status"] == "skipped" for r in plan.rows))
    cfg.save(feature_dir)
    col = _Collector(cfg, plan, ident, feature_dir, s3)
    rows = list(plan.rows)
    first_output_s = steady = None
    stats = ""
    if plan.todo:
        t = _run_pipeline(cfg, plan, ident.spec, col)
        stats = t["stats"]
        log.info(col.progress.line())
        for task in plan.todo:
            err = col.failed.get(task.slide_id)
            rows.append({"slide_id": task.slide_id, "status": "failed" if err else "done",
                         "n_tiles": task.n_tiles, "error": err,
                         "damaged_tiles": len(col.damaged.get(task.slide_id, {}))})
        if t["first"] is not None:
            first_output_s = t["first"] - t_start
            if t["last"] > t["first"]:
                steady = (col.progress.tiles - t["tiles_at_first"]) / (t["last"] - t["first"])
    else:
        col.flush()
    res = EmbedResult(
        feature_dir, ident.model_key,
        pd.DataFrame(rows, columns=["slide_id", "status", "n_tiles", "error", "damaged_tiles"]).fillna({"damaged_tiles": 0}),
        tiles_embedded=col.tiles_done, elapsed_s=time.perf_counter() - t_start, stats=stats,
        first_output_s=first_output_s, steady_tiles_per_s=steady,
    )
    if cfg.variants:  # generated stain/scanner views -> <feature_dir>/variants/v<k>/
        res = embed_variants(cfg, ident, feature_dir, s3, res)
        res.elapsed_s = time.perf_counter() - t_start
    return res


# --------------------------------------------------------------------------- CLI


def summarize(res: EmbedResult) -> str:
    c = res.slides["status"].value_counts().to_dict()
    lines = [
        f"features: {res.feature_dir}",
        f"model_key: {res.model_key}",
        "slides: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())),
        f"tiles embedded: {res.tiles_embedded} in {res.elapsed_s:.1f} s ({res.tiles_per_s:.0f} tiles/s overall)",
    ]
    for r in res.slides[res.slides["status"] == "failed"].itertuples(index=False):
        lines.append(f"  failed {r.slide_id}: {r.error}")
    if "damaged_tiles" in res.slides and res.slides["damaged_tiles"].fillna(0).sum() > 0:
        d = res.slides[(res.slides["damaged_tiles"].fillna(0) > 0) & (res.slides["status"] != "failed")]
        lines += [f"  {r.slide_id}: {int(r.damaged_tiles)} damaged tile(s) recorded in manifest.json"
                  for r in d.itertuples(index=False)]
    lines.append(failure_counts(res.slides.loc[res.slides["status"] == "failed", "error"]))
    return "\n".join(lines)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed tiles with a foundation model (Ray Data actor pool) -> features/<model_key>/",
        description="Read tiles.parquet's tiles from the slides, embed them with a registered foundation model "
        "on GPU/CPU actors, and write one parquet file per slide plus manifest.json. Re-runs skip "
        "slides whose cache key matches; --force redoes them.",
    )
    add_config_arguments(p, EmbedConfig)

    def run(args: argparse.Namespace) -> int:
        cfg = config_from_args(EmbedConfig, args)
        res = embed(cfg)
        print(summarize(res))
        return EXIT_SOME_FAILED if (res.slides["status"] == "failed").any() else 0

    p.set_defaults(func=run)

    h = subparsers.add_parser(
        "export-h5",
        help="export a feature folder to one .h5 per slide (CLAM/TRIDENT layout: features, coords)",
    )
    io = h.add_argument_group("inputs and outputs")
    io.add_argument("--features", metavar="PATH", help="feature store: a folder, or a model name/key under "
                    "<workdir>/features/ (with --workdir) [required]")
    io.add_argument("--workdir", metavar="PATH", help="project folder, to name --features by model [default: none]")
    io.add_argument("--out", metavar="PATH", help="output folder for <slide_id>.h5 files [required]")
    io.add_argument("--slide-ids", nargs="+", default=None, metavar="SLIDE", help="only these slides [default: all]")
    h.add_argument("feature_dir", nargs="?", help=argparse.SUPPRESS)  # older spelling: positional FEATURES OUT
    h.add_argument("out_dir", nargs="?", help=argparse.SUPPRESS)

    def run_h5(args: argparse.Namespace) -> int:
        from raypath.embed.store import export_h5, resolve_feature_dir

        features, out = args.features or args.feature_dir, args.out or args.out_dir
        if not features or not out:
            raise RaypathError("export-h5 needs --features (a feature folder or model name) and --out FOLDER")
        args.out_dir = out
        paths = export_h5(resolve_feature_dir(args.workdir, features), out, args.slide_ids)
        print(f"wrote {len(paths)} .h5 files to {args.out_dir}")
        return 0

    h.set_defaults(func=run_h5)


def embed_variants(cfg, ident, feature_dir: str, s3, res):
    """Embed views 1..``cfg.variants`` into ``<feature_dir>/variants/v<k>/``;
    their rows (``slide_id`` = ``<slide>@v<k>``) are appended to ``res.slides``."""
    import dataclasses

    import pandas as pd

    from raypath.embed.variants import VariantSpec
    from raypath.io.storage import join

    if not 0.0 <= cfg.variant_strength <= 1.0:
        raise RaypathError(f"--variant-strength {cfg.variant_strength} is outside [0, 1]: 0 = weak, 1 = max")
    rows = [res.slides]
    for k in range(1, cfg.variants + 1):
        spec = VariantSpec(k, cfg.variant_strength, cfg.variant_seed)
        vid = dataclasses.replace(ident, variant=spec.identity())
        vdir = join(feature_dir, "variants", f"v{k}")
        plan = plan_embed(cfg, vid, vdir, s3)
        log.info("embed: view v%d (strength %.2f) -> %s; %d slides to embed", k, spec.strength, vdir, len(plan.todo))
        col = _Collector(cfg, plan, vid, vdir, s3)
        part = [dict(r) for r in plan.rows]
        if plan.todo:
            _run_pipeline(cfg, plan, vid.spec, col, variant=spec)
            res.tiles_embedded += col.tiles_done
            for task in plan.todo:
                err = col.failed.get(task.slide_id)
                part.append({"slide_id": task.slide_id, "status": "failed" if err else "done",
                             "n_tiles": task.n_tiles, "error": err})
        else:
            col.flush()
        for r in part:
            r["slide_id"] = f"{r['slide_id']}@v{k}"
        rows.append(pd.DataFrame(part, columns=list(res.slides.columns)))
    res.slides = pd.concat(rows, ignore_index=True)
    return res
