"""The model-tuning layer (raypath.fm.tuning) and the prompt hook of the backbone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raypath.errors import RaypathError
from raypath.fm.backbone import Backbone, build_model, load_backbone, read_out
from raypath.fm.registry import get_spec
from raypath.fm.tuning import METHODS, TARGETS, apply_method, target_modules, trainable_parameters


def _x(bb: Backbone, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return bb.preprocess(torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g))


# --------------------------------------------------------------------------- the tables


def test_targets_follow_the_papers():
    # DoRA (Bøe et al.): Phikon adapts the patch-embedding conv too, Phikon-v2 and Virchow2 do not
    assert target_modules("dora", get_spec("phikon")) == ("query", "key", "value", "projection")
    assert target_modules("dora", get_spec("phikon-v2")) == ("query", "key", "value")
    assert target_modules("dora", get_spec("virchow2")) == ("qkv",)
    assert target_modules("dora", get_spec("hibou-l")) == ("query", "key", "value")  # family fallback
    # LoRA for patch classification (Ammeling et al.)
    assert target_modules("lora", get_spec("uni")) == ("qkv", "proj", "fc1", "fc2")
    assert target_modules("lora", get_spec("phikon")) == ("query", "key", "value", "dense")
    assert get_spec("phikon").adapter_targets == TARGETS[("dora", "hf_vit:vit")]
    assert set(METHODS) == {"frozen", "linear", "lora", "dora", "full", "prompt"}
    with pytest.raises(RaypathError, match="no adapter"):
        target_modules("full", get_spec("uni"))
    with pytest.raises(RaypathError, match="choose one of"):
        target_modules("lokr", get_spec("uni"))
    own = dataclasses.replace(get_spec("tiny-vit"), key="mine", tuning_targets={"dora": ("fc1",)})
    assert target_modules("dora", own) == ("fc1",)


@pytest.mark.parametrize("key", ["tiny-vit", "tiny-hf-vit"])
def test_each_method_trains_exactly_its_parameters(key):
    names = {}
    for method in METHODS:
        bb = apply_method(load_backbone(key), method, prompt_tokens=2)
        names[method] = set(trainable_parameters(bb))
        assert bb.tuning == method
    every = {n for n, _ in load_backbone(key).named_parameters()}
    assert names["frozen"] == names["linear"] == set()
    assert names["full"] == every
    assert names["prompt"] == {"prompts.tokens"}
    assert names["lora"] and all("lora_A" in n or "lora_B" in n for n in names["lora"])
    assert {n for n in names["dora"] if "lora_magnitude_vector" in n}  # DoRA's magnitudes learn too
    assert all("lora_" in n for n in names["dora"])


def test_lora_step_changes_only_adapter_weights():
    torch.manual_seed(0)
    bb = apply_method(load_backbone("tiny-vit"), "lora", rank=4)
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    opt = torch.optim.SGD(list(trainable_parameters(bb).values()), lr=1.0)
    for _ in range(2):  # lora_B starts at 0: the second step moves lora_A too
        opt.zero_grad()
        bb(_x(bb)).pow(2).sum().backward()
        opt.step()
    changed = {n for n, p in bb.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == set(trainable_parameters(bb))
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def _peft_layer(model, suffix):
    from peft.tuners.lora import LoraLayer

    hits = [m for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, LoraLayer)]
    return hits[0] if hits else None


def test_dora_on_phikon_adapts_the_patch_projection():
    """The real Phikon / Phikon-v2 layouts (one block: same module names, small)."""
    from peft.tuners.lora import Conv2d as LoraConv2d

    for key, projection in (("phikon", True), ("phikon-v2", False)):
        spec = get_spec(key)
        spec = dataclasses.replace(spec, arch_kwargs={**spec.arch_kwargs, "num_hidden_layers": 1})
        bb = apply_method(Backbone(spec, build_model(spec)), "dora")
        conv = _peft_layer(bb.model, "patch_embeddings.projection")
        if projection:
            assert isinstance(conv, LoraConv2d) and conv.use_dora["default"]
            assert "default" in conv.lora_magnitude_vector
        else:
            assert conv is None
        # query/key/value under transformers' own names (q_proj... in transformers >= 5)
        for q in ("q_proj", "k_proj", "v_proj"):
            layer = _peft_layer(bb.model, q) or _peft_layer(bb.model, q.replace("q_proj", "query"))
            assert layer is not None and layer.use_dora["default"]
        assert _peft_layer(bb.model, "fc1") is None  # DoRA leaves the MLP alone


def test_adapter_targets_that_match_nothing_are_refused():
    with pytest.raises(RaypathError, match="match no layer"):
        apply_method(load_backbone("tiny-vit"), "lora", targets=["to_qkv"])


# --------------------------------------------------------------------------- the prompt hook


@pytest.mark.parametrize("key", ["tiny-vit", "tiny-vit-reg", "tiny-hf-vit"])
def test_zero_prompt_tokens_are_bit_identical_to_frozen(key):
    frozen = load_backbone(key)
    prompted = apply_method(load_backbone(key), "prompt", prompt_tokens=0)
    x = _x(frozen)
    with torch.no_grad():
        assert torch.equal(prompted(x), frozen(x))
        t, skip = frozen.prompted_tokens(x)
        assert skip == 0 and torch.equal(t, frozen.tokens(x))


def _block_inputs(bb: Backbone) -> tuple[list[torch.Tensor], list]:
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw=None: seen.append(a[0].detach().clone()))
             for b in bb.blocks]
    return seen, hooks


@pytest.mark.parametrize("key", ["tiny-vit-reg", "tiny-hf-vit"])
def test_token_order_cls_registers_prefix_prompts_patches(key):
    bb = load_backbone(key)
    x = _x(bb, n=2)
    regs, n_blocks, width = bb.spec.num_register_tokens, len(bb.blocks), bb.family.width(bb.model)
    prompts = [torch.full((3, width), float(i + 1)) for i in range(n_blocks)]  # block i gets value i+1
    prefix = torch.full((2, 1, width), -7.0)  # one per-image extra token (e.g. a text token)
    with torch.no_grad():
        stem = bb.family.stem(bb.model, x)
        seen, hooks = _block_inputs(bb)
        tokens, skip = bb.prompted_tokens(x, prompts, prefix)
        for h in hooks:
            h.remove()
    p0 = 1 + regs
    first = seen[0]
    assert torch.equal(first[:, :p0], stem[:, :p0])  # CLS, then the registers
    assert torch.equal(first[:, p0], prefix[:, 0])  # the extra prefix token
    assert torch.equal(first[:, p0 + 1:p0 + 4], prompts[0].expand(2, -1, -1))  # this block's prompts
    assert torch.equal(first[:, p0 + 4:], stem[:, p0:])  # the patches, in order
    for i, inp in enumerate(seen[1:], start=1):  # VPT-deep: each block gets its own prompts
        assert torch.equal(inp[:, p0 + 1:p0 + 4], prompts[i].expand(2, -1, -1))
        assert not torch.equal(inp[:, p0], prefix[:, 0])  # the prefix token is carried, not re-inserted
    assert skip == 4 and tokens.shape[1] == stem.shape[1] + 4


def test_virchow_readout_skips_prompt_tokens():
    bb = apply_method(load_backbone("tiny-vit-reg"), "prompt", prompt_tokens=3)
    x = _x(bb)
    with torch.no_grad():
        feats = bb(x)
        tokens, skip = bb.prompted_tokens(x, bb.prompts())
    p0 = 1 + bb.spec.num_register_tokens
    assert skip == 3
    assert torch.equal(feats, torch.cat([tokens[:, 0], tokens[:, p0 + 3:].mean(1)], -1))
    assert torch.equal(feats, read_out(bb.spec, tokens, skip))
    assert not torch.allclose(feats[:, 64:], tokens[:, p0:].mean(1))  # prompts would change the mean


def test_prompts_learn_and_round_trip_through_load_backbone(tmp_path):
    from raypath.fm.backbone import save_prompts

    torch.manual_seed(0)
    bb = apply_method(load_backbone("tiny-hf-vit"), "prompt", prompt_tokens=4)
    x = _x(bb)
    bb(x).pow(2).sum().backward()
    grads = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert grads == {"prompts.tokens"}
    sha = save_prompts(bb, str(tmp_path / "prompts.safetensors"))
    again = load_backbone("tiny-hf-vit", prompts=str(tmp_path / "prompts.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x), bb(x))
        assert not torch.allclose(again(x), load_backbone("tiny-hf-vit")(x))
    assert again.prompt_sha256 == sha and len(sha) == 64
    from safetensors.torch import save_file

    save_file({"prompts": torch.zeros(2, 4, 32)}, str(tmp_path / "narrow.safetensors"))  # width 32, not 64
    with pytest.raises(RaypathError, match="do not fit model"):
        load_backbone("tiny-vit-reg", prompts=str(tmp_path / "narrow.safetensors"))
    with pytest.raises(RaypathError, match="cannot be read"):
        load_backbone("tiny-vit-reg", prompts=str(tmp_path / "missing.safetensors"))
    bb_hf = load_backbone("tiny-hf-vit")
    with pytest.raises(RaypathError, match="same number of tokens"):
        bb_hf.prompted_tokens(x, [torch.zeros(2, 64), torch.zeros(3, 64)])
