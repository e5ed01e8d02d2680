"""Public extension points (raypath.plugins): a private model, a MIL head and a loss
registered from a user module, reaching the CLI and the Ray workers."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embed_helpers import grid_tiles, write_slide
from raypath import plugins
from raypath.errors import RaypathError

PRIVATE_FM = '''
"""A private foundation model with its own network (not timm, not Hugging Face)."""
import os

import torch

from raypath.fm.families import Family
from raypath.fm.registry import ModelSpec
from raypath.plugins import register_model


class ToyNet(torch.nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, patch, patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.mix = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.norm(t + self.mix(t.mean(1, keepdim=True)))


class ToyFamily(Family):
    name = "raypath-test-toy"

    def build(self, spec):
        return ToyNet(spec.embed_dim, spec.patch_size)

    def tokens(self, model, x, any_size=False):
        return model(x)


SPEC = ModelSpec(key="private-fm", family="raypath-test-toy", arch="toy", arch_kwargs={}, img_size=32,
                 patch_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), readout="cls",
                 num_register_tokens=0, embed_dim=16, hf_repo=None, gated=False)


def register():
    with open(os.path.join(os.path.dirname(__file__), "loaded_in.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")  # which processes loaded the plugin
    register_model(SPEC, family=ToyFamily())
'''

MIL_PLUGIN = '''
import torch

from raypath.mil.losses import Objective
from raypath.plugins import register_loss, register_mil_head


class MeanHead(torch.nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, out_dim)

    def forward(self, x, mask=None):
        w = torch.ones(x.shape[:2]) if mask is None else mask.float()
        a = w / w.sum(1, keepdim=True)
        return self.fc(torch.einsum("bn,bnd->bd", a, x)), a


def register():
    register_mil_head("mean-head", lambda in_dim, out_dim, **kw: MeanHead(in_dim, out_dim))
    register_loss("squared-time", lambda task, **kw: Objective(
        "squared-time", task, 1, lambda out, b: ((out.reshape(-1) - b["time"]) ** 2).mean(),
        lambda out: out.reshape(-1)))
'''


@pytest.fixture
def clean_plugins(monkeypatch):
    """Plugins loaded by a test are forgotten afterwards (and RAYPATH_PLUGINS restored)."""
    from raypath.fm.families import unregister_family
    from raypath.fm.registry import unregister_spec

    monkeypatch.setenv(plugins.ENV_VAR, "")
    plugins.forget_plugins()
    yield
    for key in ("private-fm", "env-fm"):
        unregister_spec(key)
    unregister_family("raypath-test-toy")
    plugins.forget_plugins()


def _workdir(root: Path) -> Path:
    (root / "slides").mkdir(parents=True)
    rows, tiles = [], []
    for i in range(2):
        p = write_slide(root / "slides" / f"p{i}.svs", 448, 448, seed=10 + i)
        rows.append((f"p{i}", str(p), f"fp-p{i}"))
        tiles.append(grid_tiles(f"p{i}", 448, 448))
    pd.DataFrame(rows, columns=["slide_id", "uri", "fingerprint"]).assign(status="ok", error=None).to_parquet(
        root / "slides.parquet")
    pd.concat(tiles, ignore_index=True).to_parquet(root / "tiles.parquet")
    return root


def test_private_model_from_a_plugin_embeds_through_the_cli_on_ray(tmp_path, ray_session, monkeypatch, clean_plugins):
    from raypath.cli import main
    from raypath.embed.api import TileEmbedder
    from raypath.embed.identity import DEFAULT_DECODE, inputs_digest
    from raypath.embed.store import FeatureStore
    from raypath.fm.backbone import save_random_checkpoint, sha256_file
    from raypath.wsi.reader import read_tiles

    plug = tmp_path / "user_code"
    plug.mkdir()
    (plug / "raypath_test_private_fm.py").write_text(PRIVATE_FM)
    monkeypatch.syspath_prepend(str(plug))  # importable here; the session's Ray workers never saw this path
    wd = _workdir(tmp_path / "wd")
    spec = "raypath_test_private_fm:register"
    plugins.load_plugins([spec])  # to write the private checkpoint the CLI then loads
    ckpt = save_random_checkpoint("private-fm", str(tmp_path / "private.safetensors"), seed=3)

    rc = main(["--plugin", spec, "embed", "--workdir", str(wd), "--model", "private-fm", "--weights", ckpt,
               "--batch-size", "8"])
    assert rc == 0
    assert any(s.startswith(spec + "@") and s.endswith("raypath_test_private_fm.py") for s in plugins.plugin_specs())
    assert spec in os.environ[plugins.ENV_VAR]  # Ray workers this command would start inherit it
    pids = {int(p) for p in (plug / "loaded_in.txt").read_text().split()}
    assert pids - {os.getpid()}, "no Ray worker loaded the plugin"

    (fdir,) = [p for p in (wd / "features").iterdir() if p.is_dir()]
    assert fdir.name.startswith("private-fm-")
    ident = json.loads((fdir / "manifest.json").read_text())["identity"]
    assert ident["model"] == "private-fm" and ident["weights_sha256"] == sha256_file(ckpt)
    assert ident["tiling"]["tile_px"] == 224 and ident["decode"] == DEFAULT_DECODE
    manifest = json.loads((fdir / "manifest.json").read_text())
    assert ident["inputs_sha256"] == inputs_digest(manifest["slides"])
    emb = TileEmbedder("private-fm", ckpt, None, 8, device="cpu", num_threads=1)
    tiles = pd.read_parquet(wd / "tiles.parquet")
    for sid in ("p0", "p1"):
        ids, imgs = zip(*read_tiles(str(wd / "slides" / f"{sid}.svs"), tiles[tiles.slide_id == sid], batch_tiles=8))
        want = emb.embed(np.concatenate(imgs))
        bag = FeatureStore(str(fdir)).load_bag(sid)
        assert np.array_equal(bag.tile_ids, np.concatenate(ids)) and bag.features.shape == (4, 16)
        assert np.array_equal(bag.features, want.astype(np.float32))


def test_entry_point_plugin_registers_a_mil_head_and_a_loss(tmp_path, monkeypatch, clean_plugins):
    import torch

    from raypath.mil.api import MilConfig
    from raypath.mil.losses import make_objective
    from raypath.mil.models import build_model

    site = tmp_path / "site"
    dist = site / "raypath_test_mil_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "raypath_test_mil_plugin.py").write_text(MIL_PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: raypath-test-mil-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[raypath.plugins]\nmil = raypath_test_mil_plugin:register\n")
    monkeypatch.syspath_prepend(str(site))  # as if pip-installed

    assert "mean-head" in plugins.mil_head_names() and "squared-time" in plugins.loss_names()
    head = build_model("mean-head", 8, 1)
    out, att = head(torch.ones(2, 5, 8), torch.ones(2, 5))
    assert out.shape == (2, 1) and torch.allclose(att.sum(1), torch.ones(2))
    obj = make_objective("squared-time", "survival")
    assert obj.name == "squared-time" and obj.out_dim == 1
    cfg = MilConfig(model="mean-head", loss="squared-time")
    assert (cfg.model, cfg.resolved_loss()) == ("mean-head", "squared-time")
    with pytest.raises(Exception, match="unknown MIL head 'nope'.*mean-head.*plugin"):
        MilConfig(model="nope")
    with pytest.raises(RaypathError, match="unknown MIL model"):
        build_model("nope", 8, 1)


def test_env_var_plugin_file_and_a_bad_spec(tmp_path, monkeypatch, capsys, clean_plugins):
    import torch

    from raypath.cli import main
    from raypath.fm.backbone import load_backbone

    f = tmp_path / "env_plugin.py"
    f.write_text(textwrap.dedent('''
        import dataclasses
        from raypath.fm.registry import get_spec
        SPEC = dataclasses.replace(get_spec("tiny-vit"), key="env-fm")
    '''))
    monkeypatch.setenv(plugins.ENV_VAR, f"{f}:SPEC")  # a ModelSpec attribute is registered as is
    bb = load_backbone("env-fm")  # the lookup loads RAYPATH_PLUGINS first (what a worker does)
    assert bb.spec.key == "env-fm" and bb.embed(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 64)

    rc = main(["--plugin", "no_such_module:register", "embed", "--workdir", str(tmp_path), "--model", "tiny-vit"])
    err = capsys.readouterr().err
    assert rc == 2 and "plugin 'no_such_module:register' cannot be loaded" in err and "install the package" in err
    with pytest.raises(RaypathError, match="built-in model"):
        plugins.register_model(load_backbone("tiny-vit").spec)
