"""Robustness training of MIL heads over technical variants (METHODS.md §3).

:class:`VariantRun` is what the training loop of :mod:`raypath.mil.train`
hands one split to when the cohort has technical variants (real pairs or
generated views, see :class:`raypath.mil.data.Tissues`):

* :meth:`VariantRun.train_epoch` replaces the slide loop of an epoch when a
  robustness loss is on: pair-aware batches (:func:`raypath.mil.data.unit_batches`:
  both views of a tissue in one batch, on one worker), two views per tissue
  per step, the loss of :func:`raypath.mil.losses.robust_loss`.
* :meth:`VariantRun.evaluate` scores what the consistency metrics need
  after the last epoch: the generated views of the evaluation slides, and
  the training slides (their median risk is the risk-group threshold).

The slide embedding ``z`` is read with a forward pre-hook on the head's
``head`` module (the input of the prediction layers), so the forward pass
still goes through the (DDP-wrapped) model and gradients are synchronised.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from raypath.errors import RaypathError
from raypath.mil.data import Tissues, collate_bags, draw_views, unit_batches, variant_key
from raypath.mil.losses import Objective, RobustWeights, robust_loss


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def capture_embedding(model: torch.nn.Module):
    """Collect the slide embedding ``z`` (the input of ``model.head``) of the
    next forward pass in the yielded dict under ``"z"``."""
    head = getattr(_inner(model), "head", None)
    if not isinstance(head, torch.nn.Module):
        raise RaypathError(
            f"MIL head {type(_inner(model)).__name__} has no `head` module that takes the slide embedding: "
            "the InfoNCE loss needs it; use --model abmil or clam, or set --lambda-emb 0"
        )
    store: dict[str, torch.Tensor] = {}

    def hook(_module, args):
        store["z"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class VariantRun:
    """Technical variants of one split: robust training and view scoring.

    Parameters
    ----------
    tissues
        The cohort's tissues (rows aligned with the clinical table).
    train_rows
        The split's training rows (pairs are never split, see
        :func:`raypath.evaluation.splits.check_pairs_together`).
    bags
        Bag key -> [N, D] features (originals and generated views).
    targets_all
        Per-row targets (time, event, bin or label).
    strata
        Per-row sampling strata (event or label) or None.
    params
        The run's :class:`~raypath.mil.train.TrainParams`.
    """

    def __init__(self, tissues: Tissues, train_rows: np.ndarray, bags: dict, targets_all: dict,
                 objective: Objective, params, strata: np.ndarray | None):
        self.tissues = tissues
        self.train_rows = np.asarray(train_rows, dtype=np.int64)
        self.units = tissues.restricted(self.train_rows)
        self.bags = bags
        self.targets_all = targets_all
        self.objective = objective
        self.params = params
        first = np.array([u[0][0] for u in self.units], dtype=np.int64)
        self.unit_strata = None if strata is None else np.asarray(strata)[first]
        self.weights = RobustWeights(params.lambda_emb, params.lambda_score, params.tau, params.score_loss)
        batches = params.variant_batches
        self.trains = self.weights.active if batches is None else bool(batches)
        self._evaluated: dict | None = None

    def _batch(self, unit_ids: list[int], rng: np.random.Generator):
        a_views, b_views, paired = [], [], []
        for pos, u in enumerate(unit_ids):
            va, vb = draw_views(self.units[u], rng)
            a_views.append(va)
            if vb is not None:
                b_views.append(vb)
                paired.append(pos)
        rows_a = np.array([r for r, _ in a_views], dtype=np.int64)
        keys = [k for _, k in a_views] + [k for _, k in b_views]
        batch = collate_bags(
            [self.bags[k] for k in keys],
            {k: v[rows_a] for k, v in self.targets_all.items()},
            max_tiles=self.params.max_tiles_per_slide,
            rng=rng,
        )
        groups = torch.from_numpy(self.tissues.patient_code[rows_a])
        return batch, torch.tensor(paired, dtype=torch.long), groups, len(a_views)

    def train_epoch(self, model, opt, rng: np.random.Generator, ctx) -> list[float]:
        """One epoch of pair-aware batches; returns the loss of each step.

        ``ctx`` is the :class:`raypath.train.context.TrainContext` (device,
        precision, backward and optimiser step)."""
        device = ctx.device
        losses: list[float] = []
        drop_singletons = self.params.task == "survival"
        for unit_ids in unit_batches(self.units, self.unit_strata, self.params.batch_size, rng,
                                     ctx.rank, ctx.world_size, self.params.balanced_sampling):
            if drop_singletons and len(unit_ids) < 2:
                continue  # a one-tissue Cox batch has no pairs
            batch, paired, groups, n_a = self._batch(unit_ids, rng)
            with capture_embedding(model) as cap, ctx.autocast():
                out, _ = model(batch["x"].to(device), batch["mask"].to(device))
            out, z = out.float(), cap["z"].float()
            targets = {k: v.to(device) for k, v in batch.items() if k not in ("x", "mask")}
            paired = paired.to(device)
            loss, _parts = robust_loss(
                self.objective, out[:n_a], out[n_a:], z[:n_a], z[n_a:], paired, targets, self.weights, groups
            )
            opt.zero_grad(set_to_none=True)
            ctx.backward(loss)
            ctx.step(opt)
            losses.append(float(loss.detach()))
        return losses

    def evaluate(self, predict: Callable[[list[np.ndarray]], np.ndarray], eval_rows: np.ndarray,
                 slide_ids: list[str]) -> dict:
        """Scores the consistency metrics need (checkpointable: tensors and floats).

        ``train_median`` / ``train_sd`` / ``train_risks``: the median, sd and
        sorted values of the training slides' risk (survival: the risk-group
        threshold and the scales of the relative and quantile differences).  ``view_scores`` [K, n_eval, ...]:
        the generated views 1..K of the evaluation rows.
        """
        if self._evaluated is not None:  # the last epoch's result is asked for twice
            return self._evaluated
        out: dict = {}
        if self.params.task == "survival":
            train_scores = predict([self.bags[slide_ids[i]] for i in self.train_rows]).reshape(-1)
            out["train_median"] = float(np.median(train_scores))
            out["train_sd"] = float(np.std(train_scores, ddof=1)) if len(train_scores) > 1 else float("nan")
            out["train_risks"] = torch.from_numpy(np.sort(train_scores).astype(np.float32))
        if self.tissues.source == "generated":
            k_max = max(len(v) for v in self.tissues.views) - 1
            views = [predict([self.bags[variant_key(slide_ids[i], k)] for i in eval_rows])
                     for k in range(1, k_max + 1)]
            out["view_scores"] = torch.from_numpy(np.stack(views).astype(np.float32))
        self._evaluated = out
        return out


def prepare_variants(bags_source, clinical, params) -> tuple[object, Tissues | None]:
    """Resolve the technical variants of a run before its splits are made.

    Returns ``(bags_source, tissues)``: for generated views the source
    becomes one mapping with every view loaded (and ``params.n_variants``
    is set); ``tissues`` is None when the cohort has no variants.  Raises
    with the remedy when a robustness loss is on but there is nothing to
    make consistent, or when a pair's slides disagree on the outcome.
    """
    from raypath.mil.data import build_tissues, check_pair_outcomes, load_generated_views

    weights = RobustWeights(params.lambda_emb, params.lambda_score, params.tau, params.score_loss)
    source = params.variant_source
    if source == "generated":
        bags_source, params.n_variants = load_generated_views(bags_source, clinical["slide_id"].astype(str).tolist())
    tissues = build_tissues(clinical, source, params.n_variants)
    if tissues is not None and tissues.n_multi == 0:
        tissues = None
    if tissues is None and (weights.active or params.variant_batches):
        what = {"none": "--variant-source none", "pairs": "no pair_id in the clinical table is shared by "
                "two slides with features", "generated": "no generated views"}.get(source, source)
        raise RaypathError(
            f"lambda_emb={params.lambda_emb}, lambda_score={params.lambda_score} need technical variants of "
            f"one tissue, but {what}: give re-scans/re-stains of a tissue the same pair_id in the cohort table, "
            "or write generated views with `raypath embed --variants 2` and pass --variant-source generated, "
            "or set --lambda-emb 0 --lambda-score 0"
        )
    if tissues is not None:
        check_pair_outcomes(clinical, tissues, params.task)
    return bags_source, tissues
