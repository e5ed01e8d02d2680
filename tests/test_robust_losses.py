"""Robustness losses between technical variants (issue 15): InfoNCE, score
loss, pair-aware batches and splits, consistency metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raypath.errors import RaypathError
from raypath.evaluation.consistency import (
    classification_consistency,
    cohen_kappa,
    select_pairs,
    survival_consistency,
    view_pairs,
)
from raypath.evaluation.splits import LeakageError, check_pairs_together, linked_groups, make_splits
from raypath.mil.data import (
    add_synthetic_twins,
    build_tissues,
    make_synthetic_bags,
    unit_batches,
    variant_key,
)
from raypath.mil.losses import (
    RobustWeights,
    info_nce,
    make_objective,
    robust_loss,
    score_consistency_loss,
)
from raypath.mil.models import build_model
from raypath.mil.robust import VariantRun, capture_embedding


def _info_nce_reference(za, zb, tau, groups=None, extra=None, extra_groups=None):
    """Plain-Python InfoNCE: loops over anchors, logsumexp by hand."""
    za = np.asarray(za, dtype=float)
    zb = np.asarray(zb, dtype=float)
    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    ex = np.zeros((0, za.shape[1])) if extra is None else np.asarray(extra, dtype=float)
    if len(ex):
        ex = ex / np.linalg.norm(ex, axis=1, keepdims=True)
    p = len(za)
    g = list(range(p)) if groups is None else list(groups)
    ge = [None] * len(ex) if extra_groups is None else list(extra_groups)

    def direction(anchor, partner):
        total = 0.0
        for i in range(p):
            terms = []
            for j in range(p):
                if j == i or groups is None or g[j] != g[i]:
                    terms.append(float(anchor[i] @ partner[j]) / tau)
            for k in range(len(ex)):
                if groups is None or ge[k] != g[i]:
                    terms.append(float(anchor[i] @ ex[k]) / tau)
            pos = float(anchor[i] @ partner[i]) / tau
            total += -(pos - math.log(sum(math.exp(t) for t in terms)))
        return total / p

    return 0.5 * (direction(za, zb) + direction(zb, za))


def test_info_nce_equals_independent_computation():
    za = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 0.5]]
    zb = [[0.9, 0.1, 0.0], [0.1, 1.0, 0.2], [0.0, 0.4, 0.6]]
    for tau in (0.1, 0.5, 1.0):
        got = float(info_nce(torch.tensor(za), torch.tensor(zb), tau))
        assert got == pytest.approx(_info_nce_reference(za, zb, tau), rel=1e-5)
    # a hand value: two orthogonal tissues, views identical, tau = 1
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(info_nce(two, two, 1.0)) == pytest.approx(-math.log(math.e / (math.e + 1.0)), rel=1e-6)
    # extra negatives and a masked same-patient candidate
    rng = np.random.default_rng(3)
    za, zb, ex = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    groups, eg = [0, 1, 1, 2], [2, 3, 0]
    got = float(info_nce(torch.tensor(za), torch.tensor(zb), 0.2, torch.tensor(groups), torch.tensor(ex), torch.tensor(eg)))
    assert got == pytest.approx(_info_nce_reference(za, zb, 0.2, groups, ex, eg), rel=1e-5)
    assert got != pytest.approx(_info_nce_reference(za, zb, 0.2, None, ex, None), rel=1e-3)


def test_info_nce_is_low_for_matching_views_and_rejects_bad_tau():
    z = torch.eye(4) * 3
    assert float(info_nce(z, z, 0.05)) < 1e-6
    assert float(info_nce(z, z.roll(1, 0), 0.05)) > 10
    with pytest.raises(ValueError):
        info_nce(z, z, 0.0)
    assert float(info_nce(z[:0], z[:0], 0.1)) == 0.0


def test_score_loss_abs_and_squared():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert float(score_consistency_loss(a, b, "abs")) == pytest.approx((1 + 3 + 0) / 3)
    assert float(score_consistency_loss(a, b, "squared")) == pytest.approx((1 + 9 + 0) / 3)
    with pytest.raises(RaypathError, match="score loss"):
        score_consistency_loss(a, b, "huber")


def test_task_loss_counts_each_tissue_once():
    """A tissue without a second view counts its first view twice, so with
    identical views the task part equals the plain objective."""
    obj = make_objective("cox", "survival")
    out = torch.tensor([[0.3], [-0.2], [1.1], [0.0]])
    t = {"time": torch.tensor([1.0, 2.0, 3.0, 4.0]), "event": torch.tensor([1.0, 1.0, 0.0, 1.0])}
    z = torch.randn(4, 8)
    w = RobustWeights(0.0, 0.0)
    loss, _ = robust_loss(obj, out, out[[1, 3]], z, z[[1, 3]], torch.tensor([1, 3]), t, w)
    assert float(loss) == pytest.approx(float(obj.loss(out, t)), rel=1e-6)
    loss0, _ = robust_loss(obj, out, out[:0], z, z[:0], torch.zeros(0, dtype=torch.long), t, w)
    assert float(loss0) == pytest.approx(float(obj.loss(out, t)), rel=1e-6)
    # a different second view moves the task loss to the mean of the two views' losses
    out_b = out.clone()
    out_b[1] = 2.0
    loss2, _ = robust_loss(obj, out, out_b[[1]], z, z[[1]], torch.tensor([1]), t, w)
    assert float(loss2) == pytest.approx(0.5 * float(obj.loss(out, t) + obj.loss(out_b, t)), rel=1e-6)


@pytest.mark.parametrize("model_name", ["abmil", "clam"])
@pytest.mark.parametrize("loss_name,task", [("cox", "survival"), ("nll", "survival"), ("ce", "classification")])
def test_gradients_reach_both_variants(model_name, loss_name, task):
    torch.manual_seed(0)
    obj = make_objective(loss_name, task, n_bins=3)
    model = build_model(model_name, 6, obj.out_dim)
    u = 4  # tissues; the first two have a second view
    x = torch.randn(u + 2, 5, 6, requires_grad=True)
    mask = torch.ones(u + 2, 5, dtype=torch.bool)
    with capture_embedding(model) as cap:
        out, _ = model(x, mask)
    z = cap["z"]
    targets = {"time": torch.tensor([1.0, 2.0, 3.0, 4.0]), "event": torch.tensor([1.0, 0.0, 1.0, 1.0]),
               "bin": torch.tensor([0, 1, 2, 2]), "label": torch.tensor([0, 1, 0, 1])}
    for w in (RobustWeights(1.0, 0.0, 0.1), RobustWeights(0.0, 1.0, 0.1, "squared")):
        x.grad = None
        loss, parts = robust_loss(obj, out[:u], out[u:], z[:u], z[u:], torch.tensor([0, 1]), targets, w)
        # only the robustness term: the task part alone also reaches both views
        extra = loss - 0.5 * (obj.loss(out[:u], targets) + obj.loss(out[:u].index_put((torch.tensor([0, 1]),), out[u:]), targets))
        extra.backward(retain_graph=True)
        g = x.grad.abs().sum(dim=(1, 2))
        assert float(g[0]) > 0 and float(g[1]) > 0, "view a of the paired tissues"
        assert float(g[u]) > 0 and float(g[u + 1]) > 0, "view b of the paired tissues"
        assert set(parts) >= {"task"}


def _paired_cohort(n=30, fraction=0.5, seed=0):
    bags, clin = make_synthetic_bags(n_slides=n, n_cohorts=3, dim=6, tiles=(4, 8), seed=seed)
    return add_synthetic_twins(bags, clin, fraction, seed=seed)


def test_pair_aware_batches_keep_views_together_and_on_one_worker():
    bags, clin = _paired_cohort()
    tissues = build_tissues(clin, "pairs")
    assert tissues.n_multi == 15
    rows = np.arange(len(clin))
    units = tissues.restricted(rows)
    rng = np.random.default_rng(0)
    for rank in (0, 1):
        for batch in unit_batches(units, None, 8, rng, rank=rank, world_size=2, balanced=False):
            for u in batch:
                assert len(units[u]) in (1, 2)
    # the batch a step trains on holds both views of every paired tissue
    from raypath.mil.train import TrainParams

    params = TrainParams(lambda_emb=1.0, batch_size=8, max_tiles_per_slide=None)
    targets = {"time": clin["time"].to_numpy(np.float32), "event": clin["event"].to_numpy(np.float32)}
    vr = VariantRun(tissues, rows, bags, targets, make_objective("cox", "survival"), params, clin["event"].to_numpy())
    seen_pairs = 0
    sid_of = clin["slide_id"].tolist()
    pair_of = dict(zip(sid_of, clin["pair_id"]))
    for unit_ids in unit_batches(vr.units, None, 8, np.random.default_rng(1), balanced=False):
        batch, paired, _, n_a = vr._batch(unit_ids, np.random.default_rng(2))
        assert batch["x"].shape[0] == n_a + len(paired)
        for pos in paired.tolist():
            views = vr.units[unit_ids[pos]]
            assert len(views) == 2 and len({pair_of[k] for _, k in views}) == 1
            seen_pairs += 1
    assert seen_pairs == 15


def test_pairs_never_split_across_train_and_test():
    bags, clin = _paired_cohort(n=36)
    # a pair that links two different patients must still stay together
    clin.loc[clin["slide_id"] == clin.loc[clin["pair_id"].notna(), "slide_id"].iloc[-1], "patient_id"] = "other"
    groups = linked_groups(clin)
    for pid, g in clin.groupby("pair_id"):
        assert len(set(groups[g.index])) == 1
    pairs = clin["pair_id"].fillna("").astype(str).to_numpy()
    for protocol in ("internal", "lodo", "pairwise"):
        for sp in make_splits(clin, protocol, "event", folds=3, repeats=2, internal_fraction=0.25):
            sides = [sp.train, sp.internal, sp.external, sp.twins]
            for a in range(len(sides)):
                for b in range(a + 1, len(sides)):
                    shared = set(pairs[sides[a]]) & set(pairs[sides[b]]) - {""}
                    if {a, b} != {2, 3}:  # external <-> twins is the point of twins
                        assert not shared, (protocol, sp.key, a, b, shared)
            if protocol == "lodo":
                test_pairs = set(pairs[sp.external]) - {""}
                assert set(pairs[sp.twins]) <= test_pairs
                assert len(sp.twins) == sum(1 for i in range(len(clin)) if pairs[i] in test_pairs
                                            and clin["cohort"].iloc[i] != sp.name)
    with pytest.raises(LeakageError, match="pair_id"):
        check_pairs_together(pairs, np.array([0, 1]), np.flatnonzero(pairs == pairs[np.flatnonzero(pairs)[0]]))


def test_lambda_without_pairs_stops_with_remedy():
    from raypath.mil.protocols import run_protocol
    from raypath.mil.train import TrainParams

    bags, clin = make_synthetic_bags(n_slides=24, n_cohorts=2, dim=4, tiles=(3, 5))
    with pytest.raises(RaypathError) as e:
        run_protocol(bags, clin, TrainParams(epochs=1, lambda_emb=0.5), "lodo")
    msg = str(e.value)
    assert "pair_id" in msg and "--variants" in msg and "--lambda-emb 0" in msg
    with pytest.raises(RaypathError, match="--variants"):
        run_protocol(bags, clin, TrainParams(epochs=1, variant_source="generated"), "lodo")


def test_cohen_kappa_matches_sklearn_and_consistency_metrics():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
        b[:20] = a[:20]
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))
    m = survival_consistency([0.1, 0.9, -1.0, 2.0], [0.3, -0.1, -2.0, 2.5], threshold=0.0, scale=2.0)
    assert m["n_pairs"] == 4 and m["abs_risk_diff"] == pytest.approx((0.2 + 1.0 + 1.0 + 0.5) / 4)
    assert m["rel_risk_diff"] == pytest.approx(m["abs_risk_diff"] / 2.0)
    assert math.isnan(m["quantile_diff"])  # no training risks given
    q = survival_consistency([0.0, 2.5], [1.5, 2.6], threshold=1.0, reference=[0.0, 1.0, 2.0, 3.0])
    # quantiles among (0, 1, 2, 3), mid-rank: 0 -> 1/8, 1.5 -> 2/4, 2.5 -> 3/4, 2.6 -> 3/4
    assert q["quantile_diff"] == pytest.approx(((0.5 - 0.125) + 0.0) / 2)
    assert m["flip_rate"] == pytest.approx(0.25)
    c = classification_consistency([[0.8, 0.2], [0.4, 0.6]], [[0.6, 0.4], [0.7, 0.3]])
    assert c["prob_diff"] == pytest.approx((0.2 + 0.3) / 2) and c["disagreement"] == 0.5


def test_pair_groups_of_a_fold():
    views = pd.DataFrame({
        "tissue": ["p1", "p1", "p2", "p2", "p3", "p3", "p3"],
        "set": ["external", "twin", "internal", "internal", "external", "external", "twin"],
        "cohort": ["A", "B", "B", "C", "A", "A", "C"],
        "risk": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    })
    pairs = view_pairs(views)
    assert len(pairs) == 1 + 1 + 3
    assert len(select_pairs(pairs, "external", "A")) == 4
    assert len(select_pairs(pairs, "internal", "all")) == 1
    assert len(select_pairs(pairs, "internal", "C")) == 1
    assert len(select_pairs(pairs, "external", "B")) == 0


def test_run_protocol_scores_twins_and_generated_views():
    from raypath.mil.protocols import run_protocol
    from raypath.mil.train import TrainParams

    bags, clin = _paired_cohort(n=30)
    p = TrainParams(epochs=2, batch_size=8, max_tiles_per_slide=8, lambda_emb=0.5, lambda_score=0.5)
    out = run_protocol(bags, clin, p, "lodo", internal_fraction=0.0)
    ext = out.fold_metrics[out.fold_metrics["set"] == "external"]
    assert (ext["n_pairs"] > 0).all() and (ext["n_twins"] > 0).all()
    twins = out.predictions[out.predictions["split"] == "twin"]
    assert len(twins) == int(ext["n_twins"].sum())
    assert set(out.summary["consistency"]["per_cohort"]) == set(clin["cohort"])
    # generated views through the same code: a mapping with <slide>@v<k> keys
    b2, c2 = make_synthetic_bags(n_slides=24, n_cohorts=2, dim=4, tiles=(3, 5))
    rng = np.random.default_rng(0)
    for sid in list(b2):
        for k in (1, 2):
            b2[variant_key(sid, k)] = b2[sid] + rng.normal(size=4) * 0.3
    p2 = TrainParams(task="classification", loss="ce", epochs=2, batch_size=8, lambda_score=1.0,
                     variant_source="generated")
    out2 = run_protocol(b2, c2.drop(columns=["time", "event"]), p2, "lodo", internal_fraction=0.0)
    assert out2.view_predictions is not None and set(out2.view_predictions["view"]) == {1, 2}
    ext2 = out2.fold_metrics[out2.fold_metrics["set"] == "external"]
    assert (ext2["n_pairs"] == 3 * ext2["n"]).all()  # 3 view pairs per slide
    assert {"disagreement", "kappa", "prob_diff"} <= set(out2.fold_metrics.columns)


# --------------------------------------------------------------------------- generated views (embed --variants)


def test_one_stain_scanner_draw_per_slide_and_view():
    from raypath.embed.variants import VariantSpec, apply_variant, draw

    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = np.stack([tile, tile, tile, tile])
    sids = np.array(["a", "a", "b", "b"], dtype=object)
    spec = VariantSpec(1, 0.6, seed=0)
    out = apply_variant(batch, sids, spec)
    assert out.dtype == np.uint8 and out.shape == batch.shape
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[2], out[3])  # one draw for all tiles of a slide
    assert not np.array_equal(out[0], out[2])  # another slide, another draw
    assert not np.array_equal(out[0], tile)
    assert np.array_equal(out, apply_variant(batch, sids, spec))  # seeded
    assert not np.array_equal(out[0], apply_variant(batch, sids, VariantSpec(2, 0.6))[0])  # another view
    # a tile's view does not depend on its batch-mates
    alone = apply_variant(batch[2:3], sids[2:3], spec)
    assert np.array_equal(alone[0], out[2])
    assert draw(spec, "a").keys() >= {"hed", "color", "white_balance", "gamma", "blur", "jpeg"}


def test_embed_writes_generated_views_with_their_identity(tmp_path, ray_session):
    from embed_helpers import grid_tiles, write_slide
    from raypath.embed.api import EmbedConfig, TileEmbedder, embed
    from raypath.embed.store import FeatureStore
    from raypath.embed.variants import VariantSpec, apply_draw, draw
    from raypath.mil.data import load_generated_views
    from raypath.wsi.reader import read_tiles

    (tmp_path / "slides").mkdir()
    slides, tiles = [], []
    for i in range(2):
        p = write_slide(tmp_path / "slides" / f"s{i}.svs", 500, 460, seed=i)
        slides.append((f"s{i}", str(p), f"fp-s{i}"))
        tiles.append(grid_tiles(f"s{i}", 500, 460))
    pd.DataFrame(slides, columns=["slide_id", "uri", "fingerprint"]).assign(status="ok", error=None).to_parquet(
        tmp_path / "slides.parquet")
    tdf = pd.concat(tiles, ignore_index=True)
    tdf.to_parquet(tmp_path / "tiles.parquet")
    cfg = EmbedConfig(workdir=str(tmp_path), model="tiny-vit", variants=1, variant_strength=0.5, batch_size=8)
    res = embed(cfg)
    assert set(res.slides["status"]) == {"done"} and len(res.slides) == 4
    fdir = Path(res.feature_dir)
    orig, v1 = (FeatureStore(str(d)) for d in (fdir, fdir / "variants" / "v1"))
    assert orig.slide_ids() == v1.slide_ids() == ["s0", "s1"]
    m1 = json.loads((fdir / "variants" / "v1" / "manifest.json").read_text())
    assert m1["variant"]["variant"] == 1 and m1["variant"]["strength"] == 0.5
    assert m1["slides"]["s0"]["cache_key"] != json.loads((fdir / "manifest.json").read_text())["slides"]["s0"]["cache_key"]
    a, b = orig.load_bag("s0"), v1.load_bag("s0")
    assert np.array_equal(a.tile_ids, b.tile_ids) and np.array_equal(a.coords, b.coords)
    assert not np.allclose(a.features, b.features)
    # view 1 = the original tiles under the slide's one draw, through the same embedder
    emb = TileEmbedder("tiny-vit", None, None, 8, device="cpu", num_threads=1)
    d = draw(VariantSpec(1, 0.5, 0), "s0")
    t0 = tdf[tdf.slide_id == "s0"]
    want = {}
    for tid, imgs in read_tiles(slides[0][1], t0, batch_tiles=8):
        want.update(zip(tid.tolist(), emb.embed(apply_draw(imgs, d)).astype(np.float32)))
    ref = np.stack([want[t] for t in b.tile_ids.tolist()])
    assert np.allclose(b.features, ref, atol=2e-2)
    # re-run: up to date; another strength: only the views are re-embedded
    again = embed(cfg)
    assert set(again.slides["status"]) == {"skipped"}
    other = embed(cfg.model_copy(update={"variant_strength": 0.2, "slide_ids": ["s0"]}))
    assert dict(zip(other.slides.slide_id, other.slides.status)) == {"s0": "skipped", "s0@v1": "done"}
    bags, k = load_generated_views(str(fdir), ["s0", "s1"])
    assert k == 1 and set(bags) == {"s0", "s1", "s0@v1", "s1@v1"}
    assert np.array_equal(bags["s1@v1"], v1.load_bag("s1").features.astype(np.float16))


def test_sweep_objectives_include_inconsistency():
    from types import SimpleNamespace

    from raypath.sweep.objective import aggregate, fold_consistency_score
    from raypath.sweep.space import OBJECTIVE_METRICS

    assert OBJECTIVE_METRICS["mean_inconsistency"] == "min" and OBJECTIVE_METRICS["mean_flip_rate"] == "min"
    out = SimpleNamespace(summary={"consistency": {"per_cohort": {"A": {"quantile_diff": 0.4, "flip_rate": 0.2,
                                                                       "n_pairs": 7.0}}}})
    assert fold_consistency_score(out, "A") == {"mean_inconsistency": 0.4, "mean_flip_rate": 0.2, "n_pairs": 7.0}
    assert fold_consistency_score(SimpleNamespace(summary={}), "A") == {}
    folds = [{"held_out": "A", "external": 0.7, "internal": 0.8, "time_s": 1.0, "mean_inconsistency": 0.4,
              "mean_flip_rate": 0.2},
             {"held_out": "B", "external": 0.6, "internal": 0.7, "time_s": 1.0, "mean_inconsistency": 0.2,
              "mean_flip_rate": 0.1}]
    agg = aggregate(folds, 2)
    assert agg["mean_inconsistency"] == pytest.approx(0.3) and agg["mean_flip_rate"] == pytest.approx(0.15)
