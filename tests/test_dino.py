"""DINO loss on a hand-computed case, centring, head, schedules, wd groups, EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from raypath.adapt import dino as D


def _softmax(v):
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def test_dino_loss_matches_hand_computation():
    # 2 global views + 1 local view, batch 1, K = 2 prototypes
    t = [[1.0, 0.0], [0.0, 0.5]]
    s = [[0.2, 0.1], [0.0, 0.3], [0.4, -0.4]]
    c = [0.1, -0.2]
    loss = D.DINOLoss(out_dim=2, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.tensor([c]))
    got = loss([torch.tensor([v]) for v in s], [torch.tensor([v]) for v in t])

    pt = [_softmax([(a - ci) / 0.04 for a, ci in zip(v, c)]) for v in t]
    ls = [[math.log(p) for p in _softmax([a / 0.1 for a in v])] for v in s]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # teacher view i, student view j != i
    want = sum(-sum(p * q for p, q in zip(pt[i], ls[j])) for i, j in pairs) / len(pairs)
    assert float(got) == pytest.approx(want, rel=1e-5)

    # centre EMA: 0.9 c + 0.1 mean over the teacher outputs
    want_c = [0.9 * ci + 0.1 * (t[0][k] + t[1][k]) / 2 for k, ci in enumerate(c)]
    np.testing.assert_allclose(loss.center.numpy()[0], want_c, rtol=1e-6)


def test_dino_loss_gradient_flows_to_student_only():
    loss = D.DINOLoss(out_dim=8)
    s = [torch.randn(4, 8, requires_grad=True) for _ in range(4)]
    t = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    loss(s, t).backward()
    assert all(x.grad is not None for x in s)
    assert all(x.grad is None for x in t)


def test_teacher_entropy_bounds():
    loss = D.DINOLoss(out_dim=16)
    uniform = D.teacher_entropy(loss, [torch.zeros(3, 16)])
    assert uniform == pytest.approx(math.log(16), rel=1e-5)
    peaked = D.teacher_entropy(loss, [torch.eye(16)[:3] * 10])
    assert peaked < 0.01


def test_head_shapes_and_fixed_norm_last_layer():
    dims = D.head_dims_for(32)
    assert dims.out_dim < 65536 and dims.hidden_dim < 2048
    assert D.head_dims_for(768) == D.HeadDims(2048, 256, 65536)
    assert D.head_dims_for(32, out_dim=100).out_dim == 100
    head = D.DINOHead(32, D.HeadDims(64, 16, 100))
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 100)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    # rows are unit vectors and inputs are L2-normalised: outputs are cosines
    assert float(out.detach().abs().max()) <= 1 + 1e-5
    assert len(D.last_layer_params(head)) == 1


def test_cosine_schedule_values():
    s = D.cosine_schedule(0.5, 1e-6, total_steps=100, warmup_steps=10, warmup_start=0.0)
    assert len(s) == 100
    assert s[0] == 0.0
    assert s[10] == pytest.approx(0.5)
    assert s[5] == pytest.approx(0.25)
    assert s[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(s[10:]) <= 1e-12)
    m = D.cosine_schedule(0.996, 1.0, total_steps=50)
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0)
    wd = D.cosine_schedule(0.04, 0.4, total_steps=7)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    assert len(D.cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=10)) == 3


def test_weight_decay_skips_dora_magnitudes():
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 8)

        def forward(self, x):
            return self.qkv(x)

    m = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["qkv"], use_dora=True))
    groups = D.param_groups(m)
    names = {id(p): n for n, p in m.named_parameters()}
    reg = [names[id(p)] for p in groups[0]["params"]]
    no_reg = [names[id(p)] for p in groups[1]["params"]]
    assert any("lora_magnitude_vector" in n for n in no_reg)
    assert not any("lora_magnitude_vector" in n for n in reg)
    assert any("lora_A" in n for n in reg) and any("lora_B" in n for n in reg)
    opt = torch.optim.AdamW(groups)
    D.set_schedules(opt, lr=0.1, weight_decay=0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


def test_clip_and_ema():
    p = nn.Parameter(torch.zeros(10))
    p.grad = torch.full((10,), 10.0)
    q = nn.Parameter(torch.zeros(3))
    q.grad = torch.full((3,), 0.1)
    largest = D.clip_gradients([p, q], 3.0)
    assert largest == pytest.approx(float(torch.full((10,), 10.0).norm()))
    assert float(p.grad.norm()) == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(q.grad, torch.full((3,), 0.1))
    t, s = torch.ones(4), torch.zeros(4)
    D.ema_update([t], [s], 0.9)
    torch.testing.assert_close(t, torch.full((4,), 0.9))
    assert D.lr_for_batch(5e-4, 512) == pytest.approx(1e-3)
