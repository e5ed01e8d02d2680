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
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import RaypathError
from .storage import S3Options, filesystem_for, is_remote, join, read_parquet, strip_protocol

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
) -> str:
    """Write one slide's features atomically in the store's schema.

    Used by the embed stage and by tests/tools that build stores from arrays.
    """
    import pyarrow as pa

    from .schemas import features_schema
    from .storage import write_parquet_atomic

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
    uri = slide_file(feature_dir, slide_id)
    write_parquet_atomic(table, uri, s3)
    return uri
