"""The MIL training loop, run in-process, on Ray Train workers or in a Tune trial.

One loop serves every objective (the loss is pluggable, see
:mod:`raypath.mil.losses`) and every protocol: :func:`run_splits` trains
one model per :class:`~raypath.evaluation.splits.Split`, evaluates it after every
epoch on the split's internal and external slides, and reports metrics and a
checkpoint to its training context (:mod:`raypath.train.context`) after each
epoch:

* :class:`~raypath.train.context.LocalContext` (``num_workers=0``): the
  calling process, without Ray; checkpoints in a folder (optional).  Tests,
  small jobs and Ray Tune trials use it.
* :class:`~raypath.train.context.RayTrainContext`: a Ray Train
  ``TorchTrainer`` worker (DDP, gloo on CPU, nccl on GPU), started by
  :func:`run_splits_ray`.

Device and precision come from the context (``TrainParams.device`` /
``TrainParams.amp``, resolved by :mod:`raypath.train.precision`).  All folds
run inside one Ray Train job, so worker start-up is paid once, and the
checkpoint holds the finished folds' predictions: a resumed run skips
finished folds and continues the current one at its last epoch.  Randomness
is seeded from (split seed, epoch), so a resumed run gives the same
predictions as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from raypath.evaluation.metrics import classification_metrics, harrell_c_index
from raypath.evaluation.splits import Split
from raypath.mil.data import BagList, bag_keys, collate_bags, epoch_order, load_bag_arrays, shard
from raypath.mil.losses import make_objective, make_time_bins, time_to_bin
from raypath.mil.models import build_model
from raypath.train.checkpoint import STATE_FILE, load_state, module_state, unwrap
from raypath.train.context import LocalContext, RayTrainContext, SimulatedKill, TrainContext

log = logging.getLogger(__name__)

__all__ = [
    "STATE_FILE", "LocalContext", "RayTrainContext", "SimulatedKill", "SplitData", "TrainParams",
    "evaluation_rows", "fit_split", "predict", "run_splits", "run_splits_ray",
]


@dataclass
class TrainParams:
    """Hyper-parameters of one training run (per split)."""

    task: str = "survival"
    loss: str = "cox"
    model: str = "abmil"
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_tiles_per_slide: int | None = 1000
    balanced_sampling: bool = True
    n_bins: int = 4
    nll_alpha: float = 0.4
    cox_reduction: str = "batch"
    eval_every: int = 1
    eval_batch_size: int = 64
    n_classes: int = 2
    model_kwargs: dict = field(default_factory=dict)
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off (raypath.train.precision)
    # technical variants and robustness losses (raypath.mil.robust, docs/mil.md)
    lambda_emb: float = 0.0
    lambda_score: float = 0.0
    tau: float = 0.1
    score_loss: str = "abs"
    variant_source: str = "pairs"
    n_variants: int = 0
    variant_batches: bool | None = None


# --------------------------------------------------------------------------- one split


@dataclass
class SplitData:
    """Arrays for all slides of the clinical table, aligned by row."""

    slide_ids: list[str]
    cohort: np.ndarray
    time: np.ndarray | None
    event: np.ndarray | None
    label: np.ndarray | None  # int class index

    @classmethod
    def from_clinical(cls, clinical: pd.DataFrame, task: str) -> "SplitData":
        surv = task == "survival"
        return cls(
            slide_ids=clinical["slide_id"].astype(str).tolist(),
            cohort=clinical["cohort"].astype(str).to_numpy(),
            time=clinical["time"].to_numpy(dtype=np.float64) if surv else None,
            event=clinical["event"].to_numpy(dtype=np.int64) if surv else None,
            label=None if surv else clinical["label_index"].to_numpy(dtype=np.int64),
        )


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    bags: list[np.ndarray],
    score: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    max_tiles: int | None,
    batch_size: int = 64,
    seed: int = 0,
    autocast: Callable[[], Any] | None = None,
) -> np.ndarray:
    """Scores of ``bags`` (risk [n] or class probabilities [n, K]).

    Tiles are capped with a fixed seed so repeated evaluations of a slide
    see the same tiles.  ``autocast`` (e.g. ``ctx.autocast``) sets the precision.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(bags), batch_size):
        rng = np.random.default_rng(seed + start)
        b = collate_bags(bags[start : start + batch_size], max_tiles=max_tiles, rng=rng)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out, _ = model(b["x"].to(device), b["mask"].to(device))
        outs.append(score(out.float()).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outs) if outs else np.zeros(0)


def _primary_metric(data: SplitData, rows: np.ndarray, scores: np.ndarray, task: str) -> float:
    if len(rows) == 0:
        return float("nan")
    if task == "survival":
        return harrell_c_index(data.time[rows], data.event[rows], scores)
    return classification_metrics(data.label[rows], scores)["auroc"]


def evaluation_rows(split: Split, data: SplitData) -> list[tuple[str, str, np.ndarray]]:
    """(set, cohort, rows) groups evaluated each epoch: every cohort of the
    internal and external sets, plus the pooled internal set."""
    groups = []
    for set_name, rows in (("internal", split.internal), ("external", split.external)):
        if len(rows) == 0:
            continue
        if set_name == "internal":
            groups.append((set_name, "all", rows))
        for c in sorted(set(data.cohort[rows])):
            groups.append((set_name, c, rows[data.cohort[rows] == c]))
    return groups


@dataclass
class _SplitRun:
    """What one split's epochs share: the model, optimiser, objective, targets and evaluation sets."""

    ctx: TrainContext
    split: Split
    data: SplitData
    params: TrainParams
    objective: Any
    targets: dict[str, np.ndarray]
    strata: np.ndarray
    train_rows: np.ndarray
    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    curves: list[dict] = field(default_factory=list)
    variants: Any = None  # raypath.mil.robust.VariantRun when the cohort has technical variants

    @property
    def base(self) -> dict:
        s = self.split
        return dict(protocol=s.protocol, name=s.name, repeat=s.repeat, fold=s.fold)

    @property
    def eval_rows(self) -> np.ndarray:
        twins = getattr(self.split, "twins", np.zeros(0, dtype=np.int64))  # scored for consistency only
        return np.concatenate([self.split.internal, self.split.external, twins]).astype(np.int64)


def _objective_and_targets(data: SplitData, train_rows: np.ndarray, params: TrainParams):
    """The objective and per-slide targets of a split (survival time bins come from its training rows)."""
    targets: dict[str, np.ndarray] = {}
    if params.task == "survival":
        targets["time"] = data.time.astype(np.float32)
        targets["event"] = data.event.astype(np.float32)
        edges = make_time_bins(data.time[train_rows], data.event[train_rows], params.n_bins)
        targets["bin"] = time_to_bin(data.time, edges)
        n_out_bins, strata = len(edges) - 1, data.event
    else:
        targets["label"] = data.label
        n_out_bins, strata = params.n_bins, data.label
    objective = make_objective(
        params.loss, params.task, n_classes=params.n_classes, n_bins=n_out_bins,
        nll_alpha=params.nll_alpha, cox_reduction=params.cox_reduction,
    )
    return objective, targets, strata


def _build(run: _SplitRun, in_dim: int, resume: dict | None) -> int:
    """Seeded model + AdamW on the context's device, restored from ``resume``; returns the first epoch."""
    p = run.params
    torch.manual_seed(run.split.seed)
    model = build_model(p.model, in_dim, run.objective.out_dim, **p.model_kwargs)
    run.model = run.ctx.prepare(model)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    if resume is None:
        return 0
    unwrap(run.model).load_state_dict(resume["model"])
    run.opt.load_state_dict(resume["optimizer"])
    run.ctx.load_amp_state(resume)
    run.curves = list(resume["curves"])
    log.info("%s: resuming at epoch %d", run.split.key, int(resume["epoch"]) + 1)
    return int(resume["epoch"]) + 1


def _train_epoch(run: _SplitRun, bags: dict[str, np.ndarray], epoch: int) -> float:
    """One pass over this rank's share of the training slides; returns the mean loss."""
    ctx, p, split = run.ctx, run.params, run.split
    torch.manual_seed(split.seed * 100_003 + epoch)
    rng = np.random.default_rng([split.seed, epoch, 7])
    if run.variants is not None and run.variants.trains:  # pair-aware batches + robustness losses
        run.model.train()
        losses = run.variants.train_epoch(run.model, run.opt, rng, ctx)
        return float(np.mean(losses)) if losses else float("nan")
    order = epoch_order(run.strata[run.train_rows], len(run.train_rows), rng, p.balanced_sampling)
    order = shard(order, ctx.rank, ctx.world_size)
    run.model.train()
    losses = []
    for b in range(0, len(order), p.batch_size):
        idx = run.train_rows[order[b : b + p.batch_size]]
        if p.task == "survival" and len(idx) < 2:
            continue  # a one-slide Cox batch has no pairs
        batch = collate_bags(
            [bags[run.data.slide_ids[i]] for i in idx],
            {k: v[idx] for k, v in run.targets.items()},
            max_tiles=p.max_tiles_per_slide,
            rng=rng,
        )
        with ctx.autocast():
            out, _ = run.model(batch["x"].to(ctx.device), batch["mask"].to(ctx.device))
        loss = run.objective.loss(out.float(), {k: v.to(ctx.device) for k, v in batch.items()})
        run.opt.zero_grad(set_to_none=True)
        ctx.backward(loss)
        ctx.step(run.opt)
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def _evaluate(run: _SplitRun, eval_bags: list[np.ndarray], epoch: int, metrics: dict) -> np.ndarray:
    """Scores of the internal + external slides; appends a curve row and a metric per group."""
    p, data = run.params, run.data
    scores = predict(run.model, eval_bags, run.objective.score, run.ctx.device, p.max_tiles_per_slide,
                     p.eval_batch_size, seed=run.split.seed, autocast=run.ctx.autocast)
    pos = {int(r): k for k, r in enumerate(run.eval_rows)}
    metric_name = "c_index" if p.task == "survival" else "auroc"
    for set_name, cohort, rows in evaluation_rows(run.split, data):
        k = np.array([pos[int(r)] for r in rows])
        v = _primary_metric(data, rows, scores[k], p.task)
        run.curves.append({**run.base, "epoch": epoch, "set": set_name, "cohort": cohort, "metric": metric_name, "value": v})
        metrics[f"{set_name}_{metric_name}_{cohort}"] = v
    return scores


def _result(run: _SplitRun, scores: np.ndarray) -> dict:
    sets = ["internal"] * len(run.split.internal) + ["external"] * len(run.split.external)
    sets += ["twin"] * len(getattr(run.split, "twins", ()))
    out = {
        "curves": run.curves,
        "rows": run.eval_rows.tolist(),
        "sets": sets,
        "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32)),
    }
    if run.variants is not None:  # generated views and the training-risk threshold (consistency metrics)
        p = run.params
        out.update(run.variants.evaluate(
            lambda bags: predict(run.model, bags, run.objective.score, run.ctx.device, p.max_tiles_per_slide,
                                 p.eval_batch_size, seed=run.split.seed, autocast=run.ctx.autocast),
            run.eval_rows, run.data.slide_ids))
    return out


def fit_split(
    ctx: TrainContext,
    bags: dict[str, np.ndarray],
    data: SplitData,
    split: Split,
    params: TrainParams,
    resume: dict | None = None,
    on_epoch: Callable[[int, dict, dict], None] | None = None,
    tissues=None,
) -> dict:
    """Train one model on ``split.train`` and evaluate it every ``eval_every`` epochs.

    ``tissues`` (:class:`raypath.mil.data.Tissues`): technical variants, for
    the robustness losses and the consistency scores (:mod:`raypath.mil.robust`).

    ``on_epoch(epoch, metrics, {"current": state, "result": result})`` is
    called after every epoch (``result`` only after the last).  Returns a
    plain dict (checkpointable): ``curves`` (list of rows), ``rows`` /
    ``sets`` / ``scores`` of the final predictions.
    """
    train_rows = np.asarray(split.train)
    objective, targets, strata = _objective_and_targets(data, train_rows, params)
    run = _SplitRun(ctx, split, data, params, objective, targets, strata, train_rows)
    if tissues is not None:
        from raypath.mil.robust import VariantRun

        run.variants = VariantRun(tissues, train_rows, bags, targets, objective, params, strata)
    start_epoch = _build(run, next(iter(bags.values())).shape[1], resume)
    eval_bags = BagList(bags, [data.slide_ids[i] for i in run.eval_rows])  # read per batch, not all held
    scores = None
    for epoch in range(start_epoch, params.epochs):
        train_loss = _train_epoch(run, bags, epoch)
        run.curves.append({**run.base, "epoch": epoch, "set": "train", "cohort": "all", "metric": "loss", "value": train_loss})
        metrics = {"split": split.key, "epoch": epoch, "train_loss": train_loss}
        last = epoch == params.epochs - 1
        if last or (params.eval_every > 0 and (epoch + 1) % params.eval_every == 0):
            scores = _evaluate(run, eval_bags, epoch, metrics)
        state = {"model": module_state(run.model), "optimizer": run.opt.state_dict(), "epoch": epoch,
                 "curves": run.curves, **ctx.amp_state()}
        if on_epoch is not None:
            on_epoch(epoch, metrics, {"current": state, "result": _result(run, scores) if last else None})
    if scores is None:  # zero epochs requested
        scores = predict(run.model, eval_bags, objective.score, ctx.device, params.max_tiles_per_slide,
                         params.eval_batch_size, seed=split.seed, autocast=ctx.autocast)
    return _result(run, scores)


# --------------------------------------------------------------------------- all splits


def variant_tissues(clinical: pd.DataFrame, params: TrainParams):
    """The technical variants of ``clinical`` for ``params.variant_source``
    (None when there are none: no pair shared by two slides, or source none)."""
    from raypath.mil.data import build_tissues

    tissues = build_tissues(clinical, params.variant_source, params.n_variants)
    return tissues if tissues is not None and tissues.n_multi > 0 else None


def run_splits(
    ctx: TrainContext,
    bags: dict[str, np.ndarray],
    clinical: pd.DataFrame,
    splits: list[Split],
    params: TrainParams,
) -> dict[str, dict]:
    """Train and evaluate every split, resuming from ``ctx``'s checkpoint.

    The context runs on ``params.device`` at ``params.amp`` precision.

    Returns ``{split.key: result}`` with the results of :func:`fit_split`.
    """
    data = SplitData.from_clinical(clinical, params.task)
    tissues = variant_tissues(clinical, params)
    ctx.configure(device=params.device, amp=params.amp)
    state = ctx.restore() or {}
    done: dict[str, dict] = dict(state.get("done", {}))
    current = state.get("current")
    if done or current:
        log.info("resuming: %d split(s) done", len(done))
    from raypath.io.progress import Progress

    progress = Progress(f"mil {splits[0].protocol}" if splits else "mil", len(splits) * params.epochs, "epochs",
                        mode=None if ctx.is_main else "off")
    progress.skip(sum(params.epochs for s in splits if s.key in done)
                  + (int(current.get("epoch", -1)) + 1 if current else 0))
    for split in splits:
        if split.key in done:
            continue
        resume = current if current is not None and current.get("key") == split.key else None

        def on_epoch(epoch: int, metrics: dict, st: dict, _split=split) -> None:
            cur = dict(st["current"], key=_split.key)
            if st["result"] is not None:
                done[_split.key] = st["result"]
                cur = None
            ctx.report(metrics, checkpoint={"done": dict(done), "current": cur})
            progress.update(note=f"{_split.name}, repeat {_split.repeat + 1}, fold {_split.fold + 1}")

        result = fit_split(ctx, bags, data, split, params, resume=resume, on_epoch=on_epoch, tissues=tissues)
        done[split.key] = result
    progress.close()
    return {s.key: done[s.key] for s in splits}


def _ray_train_loop(config: dict) -> None:
    """Ray Train worker entry point (every rank runs it)."""
    import ray

    logging.basicConfig(level=logging.INFO)
    clinical = config["clinical"]
    if config.get("bags_ref") is not None:
        source = ray.get(config["bags_ref"])
    else:
        source = config["features_path"]
    params = TrainParams(**config["params"])
    # generated technical variants travel as <slide>@v<k> bags
    n_views = params.n_variants if params.variant_source == "generated" else 0
    bags = load_bag_arrays(source, bag_keys(clinical["slide_id"].astype(str).tolist(), n_views))
    run_splits(RayTrainContext(), bags, clinical, config["splits"], params)


def run_splits_ray(
    bags_or_path,
    clinical: pd.DataFrame,
    splits: list[Split],
    params: TrainParams,
    num_workers: int,
    storage_path: str,
    name: str = "train",
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
) -> dict[str, dict]:
    """Run :func:`run_splits` on ``num_workers`` Ray Train workers (DDP).

    Re-running with the same ``storage_path`` and ``name`` resumes from the
    latest checkpoint.  Results come back through the final checkpoint.
    """
    from raypath.errors import RaypathError
    from raypath.io.ray_env import ensure_ray
    from raypath.train.launch import fit_on_ray_train

    ray = ensure_ray()
    config: dict[str, Any] = {"clinical": clinical, "splits": splits, "params": asdict(params)}
    if isinstance(bags_or_path, str):
        config["features_path"] = bags_or_path
    else:
        config["bags_ref"] = ray.put(dict(bags_or_path))
    result = fit_on_ray_train(
        _ray_train_loop, config, num_workers=num_workers, storage_path=storage_path, name=name,
        use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
    )
    if result.checkpoint is None:
        raise RaypathError(f"Ray Train run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    return {s.key: state["done"][s.key] for s in splits}
