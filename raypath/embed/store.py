"""The feature store: ``features/<model_key>/`` with one parquet file per slide.

Layout (contract, see docs/CONTRACTS.md)::

    features/<model_key>/
        manifest.json            # model, weights sha256, preprocessing, per-slide cache keys
        <slide_id>.parquet       # slide_id, tile_id, x, y, embedding (fixed-size list)

This module is the *read* side every downstream stage uses (MIL, robustness,
adaptation experiments).  The embed stage writes the files (atomically, one
PUT per slide on S3) and the manifest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import S3Options, filesystem_for, is_remote, join, read_parquet, strip_protocol

MANIFEST = "manifest.json"


def slide_file(feature_dir: str, slide_id: str) -> str:
    return join(feature_dir, f"{slide_id}.parquet")


@dataclass
class Bag:
    """All tiles of one slide: ``features`` [N, D] float32, ``coords`` [N, 2] (x, y level-0 px)."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    tile_ids: np.ndarray

    def tensor(self):
        import torch

        return torch.from_numpy(self.features)


class FeatureStore:
    """Read access to ``features/<model_key>/``.

    Parameters
    ----------
    path
        The feature folder (local or ``s3://``).
    s3
        S3 settings when ``path`` is remote.
    """

    def __init__(self, path: str, s3: S3Options | None = None):
        self.path = str(path).rstrip("/")
        self.s3 = s3
        self._fs = filesystem_for(self.path, s3)

    # ------------------------------------------------------------------ metadata
    def manifest(self) -> dict:
        uri = join(self.path, MANIFEST)
        target = uri if is_remote(uri) else strip_protocol(uri)
        if not self._fs.exists(target):
            return {}
        with self._fs.open(target, "rb") as f:
            return json.loads(f.read().decode())

    def slide_ids(self) -> list[str]:
        """Slides that have a feature file, sorted."""
        base = self.path if is_remote(self.path) else strip_protocol(self.path)
        if not self._fs.exists(base):
            raise RaypathError(
                f"feature store {self.path!r} does not exist: run `raypath embed` first "
                "or pass the folder written by it (features/<model_key>)"
            )
        names = [p.rsplit("/", 1)[-1] for p in self._fs.ls(base, detail=False)]
        return sorted(n[: -len(".parquet")] for n in names if n.endswith(".parquet"))

    def __contains__(self, slide_id: str) -> bool:
        uri = slide_file(self.path, slide_id)
        return self._fs.exists(uri if is_remote(uri) else strip_protocol(uri))

    # ------------------------------------------------------------------ data
    def load_bag(self, slide_id: str) -> Bag:
        """One slide's tiles as float32 features and level-0 coordinates."""
        uri = slide_file(self.path, slide_id)
        if slide_id not in self:
            raise RaypathError(
                f"no features for slide {slide_id!r} in {self.path!r}: embed it "
                "(`raypath embed`) or drop it from the cohort"
            )
        t = read_parquet(uri, self.s3)
        emb = t.column("embedding").combine_chunks()
        dim = emb.type.list_size
        flat = emb.values.to_numpy(zero_copy_only=False)
        feats = flat.reshape(-1, dim).astype(np.float32, copy=False)
        coords = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1)
        return Bag(slide_id, feats, coords, t.column("tile_id").to_numpy())

    def iter_bags(self, slide_ids: Iterable[str] | None = None) -> Iterator[Bag]:
        for sid in slide_ids if slide_ids is not None else self.slide_ids():
            yield self.load_bag(sid)

    def load_bags(self, slide_ids: Iterable[str] | None = None) -> dict[str, Bag]:
        return {b.slide_id: b for b in self.iter_bags(slide_ids)}

    def sample_tiles(
        self,
        tiles_per_slide: int | None = None,
        slide_ids: Iterable[str] | None = None,
        seed: int = 0,
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """Up to ``tiles_per_slide`` random tiles of each slide, as one matrix.

        Returns ``(X [M, D] float32, meta)`` where ``meta`` has slide_id,
        tile_id, x, y per row of X.  Memory is bounded by
        ``tiles_per_slide x n_slides`` whatever the slides' sizes.
        """
        rng = np.random.default_rng(seed)
        xs, metas = [], []
        for bag in self.iter_bags(slide_ids):
            idx = np.arange(len(bag.features))
            if tiles_per_slide is not None and len(idx) > tiles_per_slide:
                idx = np.sort(rng.choice(idx, tiles_per_slide, replace=False))
            xs.append(bag.features[idx])
            metas.append(
                pd.DataFrame(
                    {
                        "slide_id": bag.slide_id,
                        "tile_id": bag.tile_ids[idx],
                        "x": bag.coords[idx, 0],
                        "y": bag.coords[idx, 1],
                    }
                )
            )
        if not xs:
            raise RaypathError(f"feature store {self.path!r} holds no slides")
        return np.concatenate(xs), pd.concat(metas, ignore_index=True)


def write_bag_table(
    feature_dir: str,
    slide_id: str,
    tile_ids: np.ndarray,
    coords: np.ndarray,
    features: np.ndarray,
    dtype: str = "float16",
    s3: S3Options | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write one slide's features atomically in the store's schema.

    Used by the embed stage and by tests/tools that build stores from arrays.
    ``metadata`` goes into the parquet schema metadata (the embed stage puts
    the slide's cache key there, so a file written just before a crash is
    recognised even if the manifest was not updated yet).
    """
    import pyarrow as pa

    from raypath.schemas import features_schema
    from raypath.io.storage import write_parquet_atomic

    features = np.ascontiguousarray(features, dtype=np.dtype(dtype))
    n, dim = features.shape
    pa_type = pa.float16() if dtype == "float16" else pa.float32()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), type=pa_type), dim)
    table = pa.Table.from_arrays(
        [
            pa.array([slide_id] * n, pa.string()),
            pa.array(np.asarray(tile_ids, dtype=np.int64)),
            pa.array(np.asarray(coords[:, 0], dtype=np.int64)),
            pa.array(np.asarray(coords[:, 1], dtype=np.int64)),
            emb,
        ],
        schema=features_schema(dim, pa_type),
    )
    if metadata:
        table = table.replace_schema_metadata({str(k): str(v) for k, v in metadata.items()})
    uri = slide_file(feature_dir, slide_id)
    write_parquet_atomic(table, uri, s3)
    return uri


# --------------------------------------------------------------------------- write side: manifest + cache keys

#: parquet schema-metadata key holding the slide's cache key
CACHE_KEY_META = "raypath.cache_key"
MANIFEST_VERSION = 1


def cache_key(parts: dict) -> str:
    """sha256 of a JSON document (sorted keys): the identity of one slide's features."""
    doc = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    import hashlib

    return hashlib.sha256(doc.encode()).hexdigest()


def read_manifest(feature_dir: str, s3: S3Options | None = None) -> dict:
    """The manifest of a feature folder (``{}`` when there is none yet)."""
    return FeatureStore(feature_dir, s3).manifest()


def write_manifest(feature_dir: str, manifest: dict, s3: S3Options | None = None) -> str:
    """Write ``manifest.json`` atomically (temp + rename locally, one PUT on S3)."""
    from raypath.io.storage import atomic_write_bytes

    uri = join(feature_dir, MANIFEST)
    atomic_write_bytes(uri, json.dumps(manifest, indent=1, sort_keys=True).encode(), s3)
    return uri


def file_cache_key(feature_dir: str, slide_id: str, s3: S3Options | None = None) -> str | None:
    """The cache key stored in a slide file's parquet metadata (``None`` if absent/unreadable)."""
    import pyarrow.parquet as pq

    from raypath.io.storage import open_file

    uri = slide_file(feature_dir, slide_id)
    try:
        with open_file(uri, "rb", s3) as f:
            md = pq.read_schema(f).metadata or {}
    except (OSError, ValueError):
        return None
    v = md.get(CACHE_KEY_META.encode())
    return v.decode() if v else None


# --------------------------------------------------------------------------- interop: HDF5 (CLAM / TRIDENT)


def export_h5(
    feature_dir: str,
    out_dir: str,
    slide_ids: Iterable[str] | None = None,
    s3: S3Options | None = None,
) -> list[str]:
    """Write one ``<slide_id>.h5`` per slide in the layout CLAM and TRIDENT read.

    Each file holds ``features`` ``float32 [N, D]`` and ``coords`` ``int64
    [N, 2]`` (level-0 x, y of the tile's top-left), rows in tile order, plus
    attributes ``slide_id``, ``model_key`` and (on ``coords``) ``patch_size`` /
    ``patch_size_level0`` / ``level`` when the tiling is known from the manifest.

    Parameters
    ----------
    feature_dir
        A ``features/<model_key>`` folder written by ``raypath embed``.
    out_dir
        Output folder (local or ``s3://``; files are built locally and uploaded).
    slide_ids
        Subset of slides (default: all).

    Returns
    -------
    The URIs written.
    """
    import os
    import tempfile

    import h5py

    from raypath.io.storage import atomic_write_bytes

    store = FeatureStore(feature_dir, s3)
    manifest = store.manifest()
    model_key = manifest.get("model_key", feature_dir.rstrip("/").rsplit("/", 1)[-1])
    written = []
    with tempfile.TemporaryDirectory(prefix="raypath-h5-") as tmp:
        for bag in store.iter_bags(slide_ids):
            local = os.path.join(tmp, f"{bag.slide_id}.h5")
            entry = manifest.get("slides", {}).get(bag.slide_id, {})
            with h5py.File(local, "w") as h:
                h.create_dataset("features", data=bag.features.astype(np.float32))
                c = h.create_dataset("coords", data=bag.coords.astype(np.int64))
                h.attrs["slide_id"] = bag.slide_id
                h.attrs["model_key"] = model_key
                for k in ("patch_size", "patch_size_level0", "level", "target_mpp"):
                    if entry.get(k) is not None:
                        c.attrs[k] = entry[k]
            with open(local, "rb") as f:
                uri = join(out_dir, f"{bag.slide_id}.h5")
                atomic_write_bytes(uri, f.read(), s3)
            os.remove(local)
            written.append(uri)
    return written


def resolve_feature_dir(workdir: str | None, features: str | None = None, s3: S3Options | None = None) -> str:
    """The feature folder meant by ``features``.

    ``features`` may be a folder path or URI (returned as given), a full model
    key (``uni-1a2b3c4d``), a registry key (``uni``: the unique
    ``features/uni-*`` folder), or ``None`` (the only store under
    ``<workdir>/features``).  Anything ambiguous or missing is an error that
    lists what exists.
    """
    if features and ("/" in features or "://" in features or features.startswith(".")):
        return features.rstrip("/")
    if not workdir:
        raise RaypathError(f"--features {features!r} is a model key: also pass --workdir, or give the feature folder")
    base = join(workdir, "features")
    fs = filesystem_for(base, s3)
    target = base if is_remote(base) else strip_protocol(base)
    keys: list[str] = []
    if fs.exists(target):
        keys = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(target, detail=False) if fs.isdir(p))
    if features:
        if features in keys:
            return join(base, features)
        # a model name (`uni`, or `uni+<adapter run>`) means its store `<name>-<8 hex>`
        matches = [k for k in keys if re.fullmatch(re.escape(features) + r"-[0-9a-f]{8}", k)] or \
            [k for k in keys if k.startswith(features + "-")]
        if len(matches) == 1:
            return join(base, matches[0])
        found = matches or keys
        raise RaypathError(
            f"{'several' if matches else 'no'} feature stores for {features!r} under {base!r} "
            f"(found {found or 'none'}): pass the full model key or the folder, or run `raypath embed` first"
        )
    if len(keys) != 1:
        raise RaypathError(
            f"no unique feature store under {base!r} (found {keys or 'none'}): pass --features "
            "with a model key or a feature folder"
        )
    return join(base, keys[0])
