"""Storage: local and S3 behave the same; atomic writes; secrets never leak."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from raypath.io import storage
from raypath.embed.store import FeatureStore, write_bag_table
from raypath.io.storage import S3Options, redact


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    storage.atomic_write_bytes(str(target), b"hello")
    storage.atomic_write_bytes(str(target), b"world")
    assert target.read_bytes() == b"world"
    assert sorted(os.listdir(target.parent)) == ["a.bin"]


def test_s3_options_never_use_s3fs_default_readahead():
    opts = S3Options(endpoint_url="http://127.0.0.1:1").storage_options()
    assert opts["default_block_size"] <= 4 * 1024 * 1024  # not 50 MiB
    assert opts["default_cache_type"] in ("readahead", "bytes", "none", "blockcache")
    assert opts["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:1"


def test_redact_masks_secrets_and_url_credentials():
    doc = {
        "aws_secret_access_key": "abc",
        "hf_token": "hf_x",
        "nested": [{"password": "p"}],
        "uri": "s3://user:pass@host/bucket",
        "tile_px": 224,
        "num_register_tokens": 4,
        "RAY_AUTH_TOKEN": "t",
    }
    out = redact(doc)
    assert out["aws_secret_access_key"] == "***"
    assert out["hf_token"] == "***"
    assert out["nested"][0]["password"] == "***"
    assert "pass" not in out["uri"]
    assert out["tile_px"] == 224
    assert out["num_register_tokens"] == 4
    assert out["RAY_AUTH_TOKEN"] == "***"


def test_parquet_round_trip_on_embedded_s3(s3_server):
    bucket = s3_server.create_bucket("storage-test")
    uri = f"{bucket}/t/x.parquet"
    table = pa.table({"a": [1, 2, 3]})
    storage.write_parquet_atomic(table, uri)
    assert storage.exists(uri)
    assert storage.read_parquet(uri).column("a").to_pylist() == [1, 2, 3]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_feature_store_round_trip(tmp_path, s3_server, where):
    base = str(tmp_path / "f") if where == "local" else s3_server.create_bucket("fs-test") + "/f"
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    coords = rng.integers(0, 1000, size=(7, 2))
    write_bag_table(base, "s1", np.arange(7), coords, feats, dtype="float32")
    store = FeatureStore(base)
    assert store.slide_ids() == ["s1"]
    bag = store.load_bag("s1")
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    X, meta = store.sample_tiles(tiles_per_slide=3, seed=1)
    assert X.shape == (3, 5) and list(meta.columns) == ["slide_id", "tile_id", "x", "y"]


def test_feature_dir_resolution_by_registry_key(tmp_path):
    from raypath.errors import RaypathError
    from raypath.embed.store import resolve_feature_dir

    feats = np.zeros((2, 3), np.float32)
    for key in ("uni-1a2b3c4d", "phikon-00000000", "phikon-11111111"):
        write_bag_table(str(tmp_path / "features" / key), "s1", np.arange(2), np.zeros((2, 2)), feats)
    wd = str(tmp_path)
    assert resolve_feature_dir(wd, "uni").endswith("features/uni-1a2b3c4d")
    assert resolve_feature_dir(wd, "phikon-11111111").endswith("features/phikon-11111111")
    with pytest.raises(RaypathError, match="several feature stores for 'phikon'"):
        resolve_feature_dir(wd, "phikon")
    with pytest.raises(RaypathError, match="no unique feature store"):
        resolve_feature_dir(wd, None)
    assert resolve_feature_dir(wd, "./x/") == "./x"


def test_a_damaged_parquet_table_is_one_sentence(tmp_path):
    from raypath.errors import RaypathError
    from raypath.io.storage import read_parquet

    bad = tmp_path / "slides.parquet"
    bad.write_bytes(b"PAR1 cut short")
    with pytest.raises(RaypathError, match="slides.parquet is not a readable parquet table .* re-run the step"):
        read_parquet(str(bad))
