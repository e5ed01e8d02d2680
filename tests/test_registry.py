"""FM registry and model loading: specs as data, weights through the user's code path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raypath.errors import RaypathError
from raypath.fm.backbone import load_backbone, save_random_checkpoint
from raypath.fm.registry import get_spec, list_specs

REQUIRED = {"phikon", "phikon-v2", "uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1",
            "prov-gigapath", "hibou-l", "tiny-vit", "tiny-hf-vit"}


def _tiles(n=4, px=48, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8))


def test_registry_has_the_models_users_ask_for():
    keys = {s.key for s in list_specs()}
    assert REQUIRED <= keys
    for s in list_specs():
        assert s.family in ("timm", "hf_vit")
        assert s.readout in ("cls", "cls+mean_patch")
        assert len(s.mean) == 3 and len(s.std) == 3
        assert s.adapter_targets
        # weights: the hub, `raypath pretrain` (raypath-small), or the package itself (raypath-small-ref)
        assert s.test_only or s.hf_repo or s.key == "raypath-small" or s.bundled
    v2 = get_spec("virchow2")
    assert v2.embed_dim == 2560 and v2.num_register_tokens == 4 and v2.readout == "cls+mean_patch"
    assert {"query", "key", "value"} <= set(get_spec("phikon").adapter_targets)
    assert get_spec("uni").adapter_targets == ("qkv",)


def test_unknown_model_lists_known_keys():
    with pytest.raises(RaypathError) as e:
        get_spec("virchow")
    msg = str(e.value)
    assert "virchow2" in msg and "phikon" in msg and "Did you mean" in msg
    assert get_spec("H_Optimus_0").key == "h-optimus-0"


@pytest.mark.parametrize("key", ["tiny-vit", "tiny-hf-vit", "tiny-vit-reg"])
def test_random_checkpoint_roundtrip_through_load_path(tmp_path, key):
    path = save_random_checkpoint(key, str(tmp_path / "m.safetensors"), seed=7)
    bb = load_backbone(key, weights=path)
    ref = load_backbone(key, weights="random:7")
    other = load_backbone(key, weights="random:8")
    x = _tiles()
    f = bb.embed(x)
    assert f.shape == (4, get_spec(key).embed_dim) and f.dtype == torch.float32
    assert torch.equal(f, ref.embed(x))
    assert not torch.allclose(f, other.embed(x))
    assert len(bb.weights_sha256) == 64 and bb.adapter_sha256 is None


def test_bin_with_prefixed_keys_and_hf_folder(tmp_path):
    ref = load_backbone("tiny-vit", weights="random:1")
    sd = {"module." + k: v for k, v in ref.model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "ckpt.pth")
    bb = load_backbone("tiny-vit", weights=str(tmp_path / "ckpt.pth"))
    x = _tiles()
    assert torch.equal(bb.embed(x), ref.embed(x))

    hf = load_backbone("tiny-hf-vit", weights="random:2")
    hf.model.save_pretrained(tmp_path / "hf")  # the Hugging Face folder layout
    bb2 = load_backbone("tiny-hf-vit", weights=str(tmp_path / "hf"))
    assert torch.equal(bb2.embed(x), hf.embed(x))


def test_wrong_checkpoint_names_the_problem(tmp_path):
    path = save_random_checkpoint("tiny-hf-vit", str(tmp_path / "hf.safetensors"))
    with pytest.raises(RaypathError, match="do not match model 'tiny-vit'"):
        load_backbone("tiny-vit", weights=path)
    with pytest.raises(RaypathError, match="do not exist"):
        load_backbone("tiny-vit", weights=str(tmp_path / "nope.safetensors"))
    (tmp_path / "evil.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RaypathError, match="safetensors"):
        load_backbone("tiny-vit", weights=str(tmp_path / "evil.pth"))


def test_missing_gated_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RaypathError) as e:
        load_backbone("h-optimus-0")
    msg = str(e.value)
    assert "huggingface-cli download bioptimus/H-optimus-0" in msg
    assert "--weights" in msg and "licence" in msg


def test_preprocess_normalises_on_device_and_resizes():
    bb = load_backbone("tiny-vit")
    spec = bb.spec
    x = torch.full((2, 64, 64, 3), 255, dtype=torch.uint8)
    y = bb.preprocess(x)
    assert y.shape == (2, 3, spec.img_size, spec.img_size) and y.dtype == torch.float32
    expect = (1.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(y[0, :, 5, 5], expect, atol=1e-5)
    with pytest.raises(RaypathError):
        bb.preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_virchow_style_readout_concatenates_cls_and_mean_patch():
    bb = load_backbone("tiny-vit-reg")
    x = bb.preprocess(_tiles())
    with torch.inference_mode():
        tok = bb.model.forward_features(x)
        f = bb(x)
    regs = bb.spec.num_register_tokens
    expect = torch.cat([tok[:, 0], tok[:, 1 + regs:].mean(1)], dim=-1)
    assert torch.allclose(f, expect)
    assert f.shape[1] == 2 * tok.shape[-1] == bb.spec.embed_dim


def test_adapter_is_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    bb = load_backbone("tiny-vit", weights="random:0")
    spec = bb.spec
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.adapter_targets), use_dora=True)
    pm = get_peft_model(load_backbone("tiny-vit", weights="random:0").model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"]

    merged = load_backbone("tiny-vit", weights="random:0", adapter=str(tmp_path / "adapter"))
    x = _tiles()
    with torch.inference_mode():
        expect = pm(merged.preprocess(x))  # timm pools the CLS token (global_pool='token')
    out = merged.embed(x)
    assert torch.allclose(out, expect, atol=1e-4)
    assert not torch.allclose(out, bb.embed(x), atol=1e-3)
    assert merged.adapter_sha256 and len(merged.adapter_sha256) == 64
    with pytest.raises(RaypathError, match="adapter_config.json"):
        load_backbone("tiny-vit", adapter=str(tmp_path))
