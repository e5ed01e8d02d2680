"""The reference model shipped with raypath (``raypath-small-ref``): it loads
through the same code as downloaded FM weights, its file is checked against
the recorded sha256, and it is not a random network."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from raypath.errors import RaypathError
from raypath.fm import backbone as B
from raypath.fm.registry import REFERENCE_SHA256, REFERENCE_WEIGHTS, get_spec

SHIPPED = Path(B.__file__).resolve().parents[1] / "data" / REFERENCE_WEIGHTS


def test_shipped_file_matches_the_recorded_sha256_and_size_limit():
    assert SHIPPED.is_file()
    assert B.sha256_file(SHIPPED) == REFERENCE_SHA256
    assert SHIPPED.stat().st_size <= 5 * 2**20  # ships inside the package
    info = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert info["sha256"] == REFERENCE_SHA256 and info["command"].startswith("raypath pretrain ")
    assert info["n_params"] <= 2_500_000


def test_loads_like_downloaded_weights_and_is_not_random():
    ref = B.load_backbone("raypath-small-ref", device="cpu")
    assert ref.weights_sha256 == REFERENCE_SHA256
    # the same file given as --weights to the architecture gives the same network and identity
    same = B.load_backbone("raypath-small", weights=str(SHIPPED), device="cpu")
    assert same.weights_sha256 == REFERENCE_SHA256
    rnd = B.load_backbone("raypath-small", weights="random:0", device="cpu")
    x = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8)
    with torch.no_grad():
        a, b, r = ref.embed(x), same.embed(x), rnd.embed(x)
    assert a.shape == (4, 192)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, r, atol=1e-3)


def test_damaged_or_missing_bundled_file_is_refused(tmp_path, monkeypatch):
    spec = get_spec("raypath-small-ref")
    wrong = dataclasses.replace(spec, bundled_sha256="0" * 64)
    with pytest.raises(RaypathError, match="damaged; reinstall"):
        B.resolve_weights(wrong, None)
    missing = dataclasses.replace(spec, bundled="no_such_file.safetensors")
    with pytest.raises(RaypathError, match="missing from this installation"):
        B.resolve_weights(missing, None)
    # an explicit --weights still wins over the bundled file
    copy = tmp_path / "w.safetensors"
    shutil.copy(SHIPPED, copy)
    assert B.resolve_weights(spec, str(copy)) == [copy]
