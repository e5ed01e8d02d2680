"""One feature-store identity (raypath.embed.identity): derived once, checked by every reader."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from raypath.embed.identity import (
    FeatureIdentity,
    check_store,
    derive_identity,
    identity_of_manifest,
    inputs_digest,
    make_model_key,
    slide_cache_key,
    store_identity,
)
from raypath.embed.store import write_bag_table, write_manifest
from raypath.errors import RaypathError

TILES = pd.DataFrame({"tile_id": [0, 1], "x": [0, 224], "y": [0, 0], "level": [0, 0], "read_px": [224, 224],
                      "tile_px": [224, 224], "target_mpp": [0.5, 0.5]})


def _store(path, manifest: dict, slides=("s0", "s1")) -> str:
    d = str(path)
    for sid in slides:
        write_bag_table(d, sid, np.arange(2), np.zeros((2, 2), np.int64), np.ones((2, 4), np.float32))
    write_manifest(d, manifest)
    return d


def _entries(fps=("fp-s0", "fp-s1")) -> dict:
    return {f"s{i}": {"cache_key": f"k{i}", "slide_fingerprint": fp, "tiles_sha256": f"t{i}", "patch_size": 224}
            for i, fp in enumerate(fps)}


def test_model_keys_and_cache_keys_of_existing_stores_do_not_change():
    ident = derive_identity("tiny-vit")  # test models default to random:0
    old_key = "tiny-vit-" + hashlib.sha256(b"random:0|").hexdigest()[:8]
    assert ident.model_key == old_key == make_model_key("tiny-vit", "random:0", None)
    assert ident.weights_sha256 == "random:0" and ident.adapter_sha256 is None and ident.prompt_sha256 is None
    # the document raypath hashed per slide before the identity existed
    spec = ident.spec
    doc = {"slide_fingerprint": "fp", "tiles": hashlib.sha256(np.ascontiguousarray(np.stack(
        [TILES[c].to_numpy(np.int64) for c in ("tile_id", "x", "y", "level", "read_px", "tile_px")], 1)).tobytes()
    ).hexdigest(), "model_key": old_key, "arch": [spec.family, spec.arch, spec.arch_kwargs],
        "weights_sha256": "random:0", "adapter_sha256": None, "preprocessing": spec.preprocessing(), "dtype": "float16"}
    want = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
    assert slide_cache_key("fp", TILES, ident, "float16") == want


def test_cache_key_and_model_key_change_with_what_made_the_features():
    base = derive_identity("tiny-vit")
    key = slide_cache_key("fp", TILES, base, "float16")
    others = [base.replace(weights_sha256="random:1"), base.replace(adapter_sha256="a" * 64),
              base.replace(prompt_sha256="b" * 64), base.replace(variant={"k": 1, "strength": 0.5})]
    keys = {slide_cache_key("fp", TILES, o, "float16") for o in others}
    assert key not in keys and len(keys) == len(others)  # other weights never "skip" into the same folder
    assert len({o.model_key for o in others[:3]} | {base.model_key}) == 4
    assert slide_cache_key("fp2", TILES, base, "float16") != key
    assert slide_cache_key("fp", TILES.assign(x=[0, 225]), base, "float16") != key
    assert derive_identity("tiny-vit", tiles=TILES).tiling == {"target_mpp": 0.5, "tile_px": 224}


def test_identity_mismatch_is_refused_with_the_remedy(tmp_path):
    ident = derive_identity("tiny-vit").replace(tiling={"target_mpp": 0.5, "tile_px": 224})
    d = _store(tmp_path / "f", {"model": "tiny-vit", "model_key": ident.model_key, "identity": ident.to_dict(),
                                "slides": _entries()})
    got = check_store(d, derive_identity("tiny-vit"))
    assert got.model == "tiny-vit" and got.inputs_sha256 == inputs_digest(_entries())
    with pytest.raises(RaypathError) as e:
        check_store(d, derive_identity("tiny-vit", weights="random:3"))
    msg = str(e.value)
    assert "weights_sha256 is random:0 where random:3 is expected" in msg and "raypath embed" in msg
    with pytest.raises(RaypathError, match="adapter_sha256"):  # expected an adapter's features, got none
        check_store(d, derive_identity("tiny-vit").replace(adapter_sha256="a" * 64))
    with pytest.raises(RaypathError, match="tiling"):
        check_store(d, {"tiling": {"target_mpp": 0.25, "tile_px": 224}})
    with pytest.raises(RaypathError, match="unknown feature-identity fields"):
        check_store(d, {"weights": "x"})
    with pytest.raises(RaypathError, match="no manifest.json"):
        check_store(_store(tmp_path / "bare", {}), {"model": "tiny-vit"})
    assert check_store(str(tmp_path / "bare")) is None  # a hand-made store without expectations: fine


def test_store_written_before_the_identity_is_still_read(tmp_path):
    """A manifest of the earlier layout (no ``identity`` section) is read field by field."""
    old = {"version": 1, "model_key": "uni-1a2b3c4d", "model": "uni", "weights_sha256": "w" * 64,
           "adapter_sha256": None, "preprocessing": {"img_size": 224}, "slides": _entries()}
    ident = store_identity(_store(tmp_path / "old", old))
    assert ident.model == "uni" and ident.weights_sha256 == "w" * 64 and ident.tiling == {"target_mpp": None, "tile_px": 224}
    assert ident.decode is None  # not recorded then: never held against the store
    check_store(str(tmp_path / "old"), {"model": "uni", "weights_sha256": "w" * 64, "decode": "fast-reader:pil-bilinear"})
    with pytest.raises(RaypathError, match="adapter_sha256 is none where"):  # features without the adapter
        check_store(str(tmp_path / "old"), {"adapter_sha256": "a" * 64})
    assert identity_of_manifest({}) is None
    assert FeatureIdentity.from_dict(ident.to_dict()) == ident


def test_readers_refuse_features_of_other_slide_files(tmp_path):
    from raypath.robustness.api import load_sample

    d = _store(tmp_path / "f", {"model": "tiny-vit", "model_key": "tiny-vit-x", "slides": _entries()})
    slides = pd.DataFrame({"slide_id": ["s0", "s1"], "fingerprint": ["fp-s0", "fp-s1"], "cohort": ["a", "b"]})
    X, meta, info = load_sample(d, slides, tiles_per_slide=2, seed=0)
    assert X.shape == (4, 4) and info["identity"]["model"] == "tiny-vit"
    changed = slides.assign(fingerprint=["fp-s0", "fp-s1-rescanned"])
    with pytest.raises(RaypathError, match=r"other slide files .*s1.*re-run `raypath embed`"):
        load_sample(d, changed, tiles_per_slide=2, seed=0)
    check_store(d, slides=slides.assign(fingerprint=[None, ""]))  # unknown fingerprints are not held against it


def test_sweep_fold_refuses_features_without_its_adapter(tmp_path, monkeypatch):
    """The sweep's real embed stage checks the fold's store carries the fold's adapter."""
    from types import SimpleNamespace

    import raypath.embed.api as embed_api
    from raypath.sweep.objective import _embed_stage

    adapter = tmp_path / "adapters" / "fold-A"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    made_with: dict = {}

    def fake_embed(cfg):  # writes what an embed with made_with["adapter"] would have written
        ident = derive_identity(cfg.model, cfg.weights, made_with["adapter"])
        d = _store(cfg.feature_dir, {"model": ident.model, "model_key": ident.model_key, "identity": ident.to_dict()})
        return SimpleNamespace(feature_dir=d, slides=pd.DataFrame({"slide_id": ["s0"], "status": ["done"]}))

    monkeypatch.setattr(embed_api, "embed", fake_embed)
    settings, plan = {"workdir": str(tmp_path), "model": "tiny-vit"}, SimpleNamespace(embed=["s0"])
    made_with["adapter"] = None  # e.g. the adapter was dropped on the way
    with pytest.raises(RaypathError, match="adapter_sha256 is none where"):
        _embed_stage(settings, plan, str(adapter), str(tmp_path / "f1"))
    made_with["adapter"] = str(adapter)
    assert _embed_stage(settings, plan, str(adapter), str(tmp_path / "f2")) == str(tmp_path / "f2")
