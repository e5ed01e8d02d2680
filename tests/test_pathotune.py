"""PathoTune (raypath.fm.pathotune): prompts change the output, only prompts/refine/projection/head learn,
the frozen backbone stays bit-identical, the text encoder loads offline behind its checksum, files round-trip."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from raypath.errors import RaypathError
from raypath.fm.backbone import load_backbone, load_prompts
from raypath.fm.pathotune import (
    PathoTuneConfig,
    apply_pathotune,
    load_prompt_file,
    pathotune_parameters,
    save_pathotune,
    shapes_report,
    trainable_report,
)
from raypath.fm.text_encoder import MINILM_SHA256, encode_texts, verify_encoder

MODELS = ["tiny-vit", "tiny-vit-reg", "tiny-hf-vit"]


@pytest.fixture(scope="module")
def text_emb() -> torch.Tensor:
    return encode_texts([PathoTuneConfig().text()])[0]


def _tuned(model: str, text_emb: torch.Tensor, **kw):
    bb = load_backbone(model)
    torch.manual_seed(0)
    return apply_pathotune(bb, PathoTuneConfig(**kw), text_embedding=text_emb)


@pytest.mark.parametrize("model", MODELS)
def test_prompts_change_output_and_only_prompts_get_gradients(model, text_emb):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    frozen = load_backbone(model)(x)
    bb = _tuned(model, text_emb)
    out = bb(x)
    assert out.shape == frozen.shape and (out - frozen).abs().max() > 1e-3
    head = torch.nn.Linear(out.shape[1], 3)
    torch.nn.functional.cross_entropy(head(bb(x)), torch.tensor([0, 1, 2, 0])).backward()
    trained = {n for n, p in bb.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {n for n, p in bb.named_parameters() if p.requires_grad}
    assert all(n.startswith(("prompts.", "prompt_prefix.proj.", "prompt_prefix.refine.")) for n in trained)
    assert {"prompts.tokens", "prompt_prefix.proj.weight", "prompt_prefix.refine.inp.weight"} <= trained
    assert head.weight.grad is not None
    assert all(p.grad is None for n, p in bb.model.named_parameters())
    # IVP is per image: two different images get different instance prompts
    ivp = bb.prompt_prefix(bb, x)[:, 1:]
    assert ivp.shape == (4, 2, bb.family.width(bb.model)) and (ivp[0] - ivp[1]).abs().max() > 0


def test_training_step_leaves_backbone_bit_identical(text_emb):
    from raypath.patch.finetune import TrainSpec, _optimizer, build_net

    y = np.array([0, 1, 0, 1])
    spec = TrainSpec(method="pathotune", tuning="pathotune", model="tiny-vit", weights=None, cache_folder="",
                     y=y, train=np.arange(4), val=np.arange(0), evals={}, n_classes=2, positive=1, seed=0,
                     patch_px=32, shift_px=0, lr=1e-2,
                     extra={"pathotune": {"text_encoder": "all-minilm-l6-v2"}, "optimizer": "radam"})
    net = build_net(spec)
    before = {k: v.clone() for k, v in net.encoder.model.state_dict().items()}
    tvp0 = net.encoder.prompts.tokens.detach().clone()
    opt = _optimizer(spec, [p for p in net.parameters() if p.requires_grad])
    assert isinstance(opt, torch.optim.RAdam)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], torch.tensor(y).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.encoder.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(tvp0, net.encoder.prompts.tokens)
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names == {f"encoder.{n}" for n in pathotune_parameters(net.encoder)} | {"head.weight", "head.bias"}


def test_save_load_round_trip_and_identity(tmp_path, text_emb):
    from raypath.embed.identity import derive_identity

    bb = _tuned("tiny-vit-reg", text_emb, depth=1, n_tokens=3)
    with torch.no_grad():
        bb.prompt_prefix.refine.out.bias.add_(0.5)  # "trained" values, not the init
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "pt.safetensors")
    sha = save_pathotune(bb, path)
    fresh = load_prompt_file(load_backbone("tiny-vit-reg"), path)
    assert torch.equal(fresh(x), bb(x))
    assert fresh.pathotune.depth == 1 and fresh.pathotune.n_tokens == 3 and fresh.prompt_sha256 == sha
    assert not any(p.requires_grad for p in fresh.parameters())
    assert derive_identity("tiny-vit-reg", "random", None, path).prompt_sha256 == sha
    with pytest.raises(RaypathError, match="pathotune"):
        load_prompts(load_backbone("tiny-vit-reg"), path)  # the plain VPT loader must not drop TTP/IVP
    with pytest.raises(RaypathError, match="trained on model"):
        load_prompt_file(load_backbone("tiny-vit"), path)


def test_ablations_and_parameter_counts(text_emb):
    tvp = _tuned("tiny-vit", text_emb, ttp=False, ivp=False)
    assert tvp.prompt_prefix is None and tvp.prompts.tokens.shape == (2, 10, 64)
    rep = {r["model"]: r for r in shapes_report()}
    b = rep["vit-b16"]
    assert b["tvp"] == 12 * 10 * 768 and b["ttp"] == 384 * 768 + 768
    assert 85_000_000 < b["full_ft"] < 87_000_000 and b["fraction"] < 0.06
    assert 21_000_000 < rep["vit-s16"]["full_ft"] < 23_000_000
    r = trainable_report(_tuned("tiny-vit", text_emb))
    assert r["trainable"] == sum(p.numel() for p in pathotune_parameters(_tuned("tiny-vit", text_emb)).values()) + 65


def test_config_errors():
    with pytest.raises(RaypathError, match="fill"):
        PathoTuneConfig(template="{organ} tissue").text()
    with pytest.raises(RaypathError, match="depth"):
        apply_pathotune(load_backbone("tiny-vit"), PathoTuneConfig(ttp=False, depth=5))
    with pytest.raises(RaypathError, match="ablation"):
        PathoTuneConfig.ablation("ttp-only")


def test_text_encoder_offline_and_checksum(tmp_path):
    code = ("from raypath.fm.text_encoder import encode_texts; import torch;"
            "e = encode_texts(['an H&E image of colon tumour', 'an H&E image of colon cancer', 'a red bicycle']);"
            "s = e @ e.T; assert e.shape == (3, 384) and s[0, 1] > s[0, 2] + 0.2, s; print('ok')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    assert verify_encoder()[1] == MINILM_SHA256
    with pytest.raises(RaypathError, match="sha256"):
        verify_encoder(sha256="0" * 64)
    folder = tmp_path / "enc"  # another encoder named by folder, its weights not the pinned ones
    src = verify_encoder()[0]
    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (folder / f.name).symlink_to(f)
    (folder / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(RaypathError, match="not the pinned"):
        verify_encoder(str(folder), sha256=MINILM_SHA256)


def test_tuned_embedder_uses_the_prompt_file(tmp_path, text_emb):
    """`raypath embed --prompts FILE`: the actor's TileEmbedder applies the file; the identity names it."""
    from raypath.embed.api import TileEmbedder, model_identity

    path = str(tmp_path / "pt.safetensors")
    sha = save_pathotune(_tuned("tiny-vit", text_emb), path)
    tiles = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    plain = TileEmbedder("tiny-vit", None, None, 4, device="cpu", amp="off", dtype="float32").embed(tiles)
    tuned = TileEmbedder("tiny-vit", None, None, 4, device="cpu", amp="off", dtype="float32", prompts=path)
    ref = load_prompt_file(load_backbone("tiny-vit"), path).embed(torch.from_numpy(tiles)).numpy()
    assert np.allclose(tuned.embed(tiles), ref, atol=1e-5) and not np.allclose(plain, ref, atol=1e-3)
    ident = model_identity("tiny-vit", None, None, prompts=path)
    assert ident.prompt_sha256 == sha and ident.model_key != model_identity("tiny-vit", None, None).model_key
