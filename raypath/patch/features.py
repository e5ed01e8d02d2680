"""Frozen-backbone features of patches, cached in the feature store by ``patch_id``.

Layout (next to the slide features of ``raypath embed``)::

    features/<model_key>/patches/<slide_id>.parquet   # patch_id, embedding (float16 list)

Each file carries its cache key in the parquet metadata: sha256 of the
model identity (registry key, weights and adapter sha256, preprocessing),
the patch geometry (side, mpp) and the slide's patch rows (ids, uri,
centres, mpp).  A run reuses every file whose key matches, so probes with
other seeds, fractions or C never re-embed; a change of model, weights,
geometry or annotations re-embeds exactly the slides it touches.  Images
are embedded batch by batch from the patch cache's memory map: memory is
bounded by the batch, not by the number of patches.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from raypath.embed.store import CACHE_KEY_META, cache_key, file_cache_key
from raypath.io.storage import S3Options, exists, join, read_parquet, write_parquet_atomic
from raypath.patch.images import PatchImages

log = logging.getLogger(__name__)

PATCH_FOLDER = "patches"


def feature_identity(model: str, weights: str | None) -> dict:
    """What identifies a model's features: key, weights/adapter sha256, preprocessing."""
    from raypath.embed.api import model_identity

    ident = model_identity(model, weights, None)
    return {
        "model_key": ident.model_key,
        "arch": [ident.spec.family, ident.spec.arch, ident.spec.arch_kwargs],
        "weights_sha256": ident.weights_sha256,
        "adapter_sha256": ident.adapter_sha256,
        "preprocessing": ident.spec.preprocessing(),
    }


def feature_dir(workdir: str, identity: dict) -> str:
    return join(workdir, "features", identity["model_key"], PATCH_FOLDER)


def _slide_key(identity: dict, rows: pd.DataFrame, geometry: dict) -> str:
    cols = [c for c in ("patch_id", "uri", "x", "y", "mpp") if c in rows.columns]
    return cache_key({"identity": identity, "geometry": geometry,
                      "patches": rows[cols].astype(str).sort_values("patch_id").to_numpy().tolist()})


def _write(uri: str, patch_ids, feats: np.ndarray, key: str, s3: S3Options | None) -> None:
    import pyarrow as pa

    n, dim = feats.shape
    emb = pa.FixedSizeListArray.from_arrays(pa.array(feats.astype(np.float16).reshape(-1), pa.float16()), dim)
    t = pa.Table.from_arrays([pa.array([str(p) for p in patch_ids], pa.string()), emb], names=["patch_id", "embedding"])
    write_parquet_atomic(t.replace_schema_metadata({CACHE_KEY_META: key}), uri, s3)


def _read(uri: str, s3: S3Options | None) -> tuple[np.ndarray, np.ndarray]:
    t = read_parquet(uri, s3)
    emb = t.column("embedding").combine_chunks()
    feats = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size).astype(np.float32)
    return t.column("patch_id").to_numpy(zero_copy_only=False).astype(str), feats


def patch_features(table: pd.DataFrame, images: PatchImages, workdir: str, model: str, weights: str | None,
                   device: str = "auto", batch_size: int = 64, s3: S3Options | None = None) -> np.ndarray:
    """``[len(table), D]`` float32 features in table order (cached; see the module doc)."""
    identity = feature_identity(model, weights)
    folder = feature_dir(workdir, identity)
    geometry = {"patch_px": images.geometry.patch_px, "mpp": images.geometry.mpp}
    out: np.ndarray | None = None
    todo: list[tuple[str, pd.DataFrame, str]] = []
    pos = {p: i for i, p in enumerate(table["patch_id"].astype(str))}
    for sid, rows in table.groupby("slide_id", sort=True):
        uri, key = join(folder, f"{sid}.parquet"), _slide_key(identity, rows, geometry)
        if exists(uri, s3) and file_cache_key(folder, sid, s3) == key:
            ids, feats = _read(uri, s3)
            out = np.zeros((len(table), feats.shape[1]), np.float32) if out is None else out
            out[[pos[p] for p in ids]] = feats
        else:
            todo.append((uri, rows, key))
    if todo:
        embedder = _embedder(model, weights, device, batch_size)
        for uri, rows, key in todo:
            feats = embedder(images, images.rows(rows["patch_id"].astype(str).tolist()))
            _write(uri, rows["patch_id"], feats, key, s3)
            out = np.zeros((len(table), feats.shape[1]), np.float32) if out is None else out
            out[[pos[p] for p in rows["patch_id"].astype(str)]] = feats.astype(np.float16).astype(np.float32)
        log.info("patch: embedded %d slide(s) of patches with %s -> %s", len(todo), identity["model_key"], folder)
    return out


def _embedder(model: str, weights: str | None, device: str, batch_size: int):
    """A function (patch cache, rows) -> float32 features, reading and embedding ``batch_size`` at a time."""
    from raypath.embed.api import TileEmbedder

    dev = None if device == "auto" else device
    emb = TileEmbedder(model, weights, None, batch_size, device=dev, dtype="float32")

    def run(images: PatchImages, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), emb.backbone.spec.embed_dim), np.float32)
        for i in range(0, len(rows), batch_size):
            out[i:i + batch_size] = emb.embed(images.centre(rows[i:i + batch_size]))
        return out

    return run
