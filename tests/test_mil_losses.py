"""Cox / NLL / CE losses and the MIL heads' masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypath.mil.data import collate_bags, epoch_order, sample_tiles, shard
from raypath.mil.losses import (
    cox_ph_loss,
    make_objective,
    make_time_bins,
    nll_survival_loss,
    time_to_bin,
)
from raypath.mil.models import build_model


def test_cox_loss_hand_computed():
    a, b, c = 0.5, -0.2, 1.0
    eta = torch.tensor([a, b, c])
    # times 1 < 2 < 3, the middle one censored
    loss = cox_ph_loss(eta, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1]))
    lse_all = math.log(math.exp(a) + math.exp(b) + math.exp(c))
    expected = -((a - lse_all) + (c - c)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    ev = cox_ph_loss(eta, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1]), reduction="events")
    assert float(ev) == pytest.approx(expected * 3 / 2, rel=1e-6)


def test_cox_loss_breslow_ties():
    a, b, c = 0.3, 0.9, -0.4
    eta = torch.tensor([a, b, c])
    # two events tied at t=1: Breslow gives both the full risk set {all}
    loss = cox_ph_loss(eta, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1, 1, 0]))
    lse = math.log(math.exp(a) + math.exp(b) + math.exp(c))
    assert float(loss) == pytest.approx(-((a - lse) + (b - lse)) / 3, rel=1e-6)


def test_cox_loss_all_censored_is_zero_and_differentiable():
    eta = torch.tensor([0.2, 5.0, -3.0, 80.0], requires_grad=True)
    loss = cox_ph_loss(eta, torch.tensor([1.0, 2.0, 2.0, 4.0]), torch.zeros(4))
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(eta.grad).all() and float(eta.grad.abs().sum()) == 0.0


def test_cox_loss_prefers_correct_order():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    e = torch.ones(4)
    assert cox_ph_loss(-t, t, e) < cox_ph_loss(t, t, e)


def test_nll_bins_and_loss():
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 20, 30.0])
    event = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    edges = make_time_bins(time, event, 4)
    assert edges[0] == 0 and np.isinf(edges[-1]) and len(edges) == 5
    bins = time_to_bin(time, edges)
    assert bins.min() == 0 and bins.max() == 3 and (np.diff(bins) >= 0).all()
    logits = torch.zeros(10, 4, requires_grad=True)
    loss = nll_survival_loss(logits, torch.from_numpy(bins), torch.from_numpy(event))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # all censored: finite
    l2 = nll_survival_loss(torch.randn(5, 4) * 30, torch.zeros(5, dtype=torch.long), torch.zeros(5))
    assert torch.isfinite(l2)


def test_objective_risk_direction_for_nll():
    obj = make_objective("nll", "survival", n_bins=4)
    high_hazard = torch.full((1, 4), 3.0)
    low_hazard = torch.full((1, 4), -3.0)
    assert obj.score(high_hazard) > obj.score(low_hazard)


@pytest.mark.parametrize("name", ["abmil", "clam"])
def test_padding_does_not_change_outputs(name):
    torch.manual_seed(0)
    model = build_model(name, in_dim=8, out_dim=1).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32)]
    batch = collate_bags(bags, max_tiles=None)
    assert batch["x"].shape == (2, 12, 8) and batch["mask"].sum().item() == 17
    out, attn = model(batch["x"], batch["mask"])
    alone, _ = model(torch.from_numpy(bags[0])[None], torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(out[0], alone[0], atol=1e-5)
    assert float(attn[0, 5:].detach().abs().sum()) == 0.0
    assert torch.allclose(attn.sum(1), torch.ones(2))


def test_abmil_architecture_matches_spec():
    m = build_model("abmil", in_dim=32, out_dim=1)
    assert m.proj.out_features == 128
    assert m.attention.V.in_features == m.attention.V.out_features == 128
    widths = [l.out_features for l in m.head if isinstance(l, torch.nn.Linear)]
    assert widths == [128, 64, 1]


def test_tile_cap_sampler_and_shards():
    rng = np.random.default_rng(0)
    idx = sample_tiles(100, 10, rng)
    assert len(idx) == 10 and len(set(idx)) == 10
    assert len(sample_tiles(5, 10, rng)) == 5
    strata = np.array([1] * 90 + [0] * 10)
    order = epoch_order(strata, 100, np.random.default_rng(1), balanced=True)
    share_censored = float(np.mean(strata[order] == 0))
    assert 0.35 < share_censored < 0.65  # ~balanced instead of 10 %
    parts = [shard(order, r, 3) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
