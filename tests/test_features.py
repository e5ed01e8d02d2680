"""Feature store write side: cache keys in file metadata, manifest, HDF5 export (CLAM/TRIDENT)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from raypath.embed.store import (
    CACHE_KEY_META,
    FeatureStore,
    cache_key,
    export_h5,
    file_cache_key,
    read_manifest,
    write_bag_table,
    write_manifest,
)


def _store(base: str, n_slides=2, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_slides):
        n = 5 + i
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        coords = rng.integers(0, 5000, (n, 2))
        sid = f"slide{i}"
        write_bag_table(base, sid, np.arange(n), coords, feats, metadata={CACHE_KEY_META: f"k{i}"})
        out[sid] = (feats, coords)
    write_manifest(base, {"model_key": "tiny-vit-abc", "slides": {
        "slide0": {"cache_key": "k0", "patch_size": 224, "patch_size_level0": 448, "level": 0}}})
    return out


def test_cache_key_is_stable_and_sensitive():
    a = cache_key({"model": "uni", "tiles": "abc", "dtype": "float16"})
    assert a == cache_key({"dtype": "float16", "tiles": "abc", "model": "uni"})
    assert a != cache_key({"model": "uni", "tiles": "abd", "dtype": "float16"})
    assert len(a) == 64


def test_cache_key_lives_in_the_file_and_the_manifest(tmp_path):
    base = str(tmp_path / "f")
    _store(base)
    assert file_cache_key(base, "slide0") == "k0" and file_cache_key(base, "slide1") == "k1"
    assert file_cache_key(base, "nope") is None
    assert read_manifest(base)["slides"]["slide0"]["cache_key"] == "k0"
    # still readable by plain pandas/pyarrow
    df = pd.read_parquet(tmp_path / "f" / "slide1.parquet")
    assert list(df.columns) == ["slide_id", "tile_id", "x", "y", "embedding"] and len(df) == 6


@pytest.mark.parametrize("where", ["local", "s3"])
def test_export_h5_in_clam_trident_layout(tmp_path, s3_server, where):
    base = str(tmp_path / "f") if where == "local" else s3_server.create_bucket("h5-test") + "/f"
    data = _store(base)
    out = str(tmp_path / "h5")
    paths = export_h5(base, out)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["slide0.h5", "slide1.h5"]
    store = FeatureStore(base)
    for sid, (feats, coords) in data.items():
        with h5py.File(f"{out}/{sid}.h5", "r") as h:
            assert h["features"].dtype == np.float32 and h["features"].shape == feats.shape
            assert h["coords"].shape == (len(feats), 2)
            np.testing.assert_array_equal(h["features"][:], store.load_bag(sid).features)
            np.testing.assert_array_equal(h["coords"][:], coords)
            assert h.attrs["model_key"] == "tiny-vit-abc" and h.attrs["slide_id"] == sid
            if sid == "slide0":
                assert h["coords"].attrs["patch_size"] == 224
                assert h["coords"].attrs["patch_size_level0"] == 448
    assert export_h5(base, str(tmp_path / "one"), slide_ids=["slide1"])[0].endswith("slide1.h5")
