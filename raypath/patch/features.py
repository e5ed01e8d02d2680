"""Frozen-backbone features of patches, cached in the feature store by ``patch_id``.

Layout (inside the model's feature store)::

    features/<model_key>/patches/
        manifest.json            # the feature identity (raypath.embed.identity) + one entry per slide
        <slide_id>.parquet       # patch_id, embedding (float16 fixed-size list)

The identity is the project's one feature identity
(:func:`raypath.embed.identity.derive_identity`: model, weights and adapter
sha256, preprocessing, decode path) with the patch geometry as its tiling
(``target_mpp`` = the patch mpp, ``tile_px`` = the patch side) and the
digest of the inputs (each slide file's fingerprint and its patch rows).
Each slide file carries its cache key (identity without inputs + the
slide's fingerprint + its patch rows) in the parquet metadata: a run reuses
every file whose key matches, so probes with other seeds, fractions or C
never re-embed, and a change of model, weights, geometry, annotations or
slide file re-embeds exactly the slides it touches.  Images are embedded
batch by batch from the patch cache's memory map: memory is bounded by the
batch, not by the number of patches.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pandas as pd

from raypath.embed.store import CACHE_KEY_META, file_cache_key, read_manifest, write_manifest
from raypath.io.storage import S3Options, exists, join, read_parquet, write_parquet_atomic
from raypath.patch.images import PatchImages

log = logging.getLogger(__name__)

PATCH_FOLDER = "patches"


def feature_identity(model: str, weights: str | None, patch_px: int | None = None, mpp: float | None = None):
    """The :class:`~raypath.embed.identity.FeatureIdentity` of patch features (inputs not yet set)."""
    from raypath.embed.identity import derive_identity

    ident = derive_identity(model, weights)
    return ident.replace(tiling={"target_mpp": mpp, "tile_px": patch_px})


def feature_dir(workdir: str, identity) -> str:
    return join(workdir, "features", identity.model_key, PATCH_FOLDER)


def _slide_entry(identity, rows: pd.DataFrame, fingerprints: dict[str, str]) -> dict:
    cols = [c for c in ("patch_id", "uri", "x", "y", "mpp") if c in rows.columns]
    patches = rows[cols].astype(str).sort_values("patch_id").to_numpy().tolist()
    fps = sorted({fingerprints.get(u, "") for u in rows["uri"].astype(str)})
    doc = {"identity": {**identity.to_dict(), "inputs_sha256": None}, "fingerprints": fps, "patches": patches}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return {"cache_key": key, "slide_fingerprint": "|".join(fps),
            "tiles_sha256": hashlib.sha256(json.dumps(patches).encode()).hexdigest(), "n_patches": int(len(rows))}


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
                   fingerprints: dict[str, str], device: str = "auto", batch_size: int = 64,
                   s3: S3Options | None = None) -> np.ndarray:
    """``[len(table), D]`` float32 features in table order (cached; see the module doc)."""
    g = images.geometry
    identity = feature_identity(model, weights, g.patch_px, g.mpp)
    folder = feature_dir(workdir, identity)
    pos = {p: i for i, p in enumerate(table["patch_id"].astype(str))}
    out = np.zeros((len(table), identity.spec.embed_dim), np.float32)
    entries, todo = {}, []
    for sid, rows in table.groupby("slide_id", sort=True):
        entry = entries[str(sid)] = _slide_entry(identity, rows, fingerprints)
        uri = join(folder, f"{sid}.parquet")
        if exists(uri, s3) and file_cache_key(folder, str(sid), s3) == entry["cache_key"]:
            ids, feats = _read(uri, s3)
            out[[pos[p] for p in ids]] = feats
        else:
            todo.append((uri, rows, entry["cache_key"]))
    if todo:
        embedder = _embedder(model, weights, device, batch_size)
        for uri, rows, key in todo:
            feats = embedder(images, images.rows(rows["patch_id"].astype(str).tolist()))
            _write(uri, rows["patch_id"], feats, key, s3)
            out[[pos[p] for p in rows["patch_id"].astype(str)]] = feats.astype(np.float16).astype(np.float32)
        log.info("patch: embedded %d slide(s) of patches with %s -> %s", len(todo), identity.model_key, folder)
    _update_manifest(folder, identity, entries, s3)
    return out


def _update_manifest(folder: str, identity, entries: dict, s3: S3Options | None) -> None:
    """``manifest.json`` in the store's layout: every slide file there, the identity over them."""
    old = read_manifest(folder, s3)
    slides = {**(old.get("slides") or {}), **entries} if old.get("model_key") == identity.model_key else dict(entries)
    doc = {"model": identity.model, "model_key": identity.model_key, "kind": "patches",
           "identity": identity.with_inputs(slides).to_dict(), "slides": slides}
    if doc != old:
        write_manifest(folder, doc, s3)


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
