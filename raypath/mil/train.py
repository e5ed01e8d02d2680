"""The MIL training loop, run in-process or on Ray Train workers.

One loop serves every objective (the loss is pluggable, see
:mod:`raypath.mil.losses`) and every protocol: :func:`run_splits` trains
one model per :class:`~raypath.evaluation.splits.Split`, evaluates it after every
epoch on the split's internal and external slides, and hands a checkpoint
to a *context* after each epoch:

* :class:`LocalContext` (``num_workers=0``): the loop runs in the calling
  process, without Ray; checkpoints go to a local folder (optional).  This
  is what tests, small jobs and Ray Tune trials use.
* :class:`RayTrainContext`: inside a Ray Train ``TorchTrainer`` worker.
  ``ray.train.report`` is called by every rank each epoch (rank 0 attaches
  the checkpoint), ``ray.train.get_checkpoint`` resumes.  DDP uses gloo on
  CPU and nccl on GPU (Ray Train picks the backend from the device).

All folds run inside one Ray Train job, so worker start-up is paid once,
and the checkpoint holds the finished folds' predictions: a resumed run
skips finished folds and continues the current one at its last epoch.
Randomness is seeded from (split seed, epoch), so a resumed run gives the
same predictions as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from raypath.mil.data import collate_bags, epoch_order, load_bag_arrays, shard
from raypath.mil.losses import make_objective, make_time_bins, time_to_bin
from raypath.evaluation.metrics import classification_metrics, harrell_c_index
from raypath.mil.models import build_model
from raypath.evaluation.splits import Split

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


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


class LocalContext:
    """Run in this process; optional checkpoints in ``checkpoint_dir``."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: str | None = None, stop_after_reports: int | None = None):
        self.checkpoint_dir = checkpoint_dir
        self.reports: list[dict] = []
        # test hook: simulate a crash after this many reports
        self._stop_after = stop_after_reports

    def device(self, wanted: str) -> torch.device:
        if wanted == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(wanted)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model.to(device)

    def load_state(self) -> dict | None:
        if not self.checkpoint_dir:
            return None
        path = os.path.join(self.checkpoint_dir, STATE_FILE)
        if not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def report(self, metrics: dict, state: dict) -> None:
        self.reports.append(metrics)
        if self.checkpoint_dir:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            path = os.path.join(self.checkpoint_dir, STATE_FILE)
            tmp = path + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, path)
        if self._stop_after is not None and len(self.reports) >= self._stop_after:
            raise InterruptedError(f"stopped after {len(self.reports)} reports (test hook)")


class RayTrainContext:
    """Inside a Ray Train worker (Train V2)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def device(self, wanted: str) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def load_state(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)

    def report(self, metrics: dict, state: dict) -> None:
        import ray.train

        if self.rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    bags: list[np.ndarray],
    score: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    max_tiles: int | None,
    batch_size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Scores of ``bags`` (risk [n] or class probabilities [n, K]).

    Tiles are capped with a fixed seed so repeated evaluations of a slide
    see the same tiles.
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(bags), batch_size):
        rng = np.random.default_rng(seed + start)
        b = collate_bags(bags[start : start + batch_size], max_tiles=max_tiles, rng=rng)
        out, _ = model(b["x"].to(device), b["mask"].to(device))
        outs.append(score(out).float().cpu().numpy())
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


def fit_split(
    ctx,
    bags: dict[str, np.ndarray],
    data: SplitData,
    split: Split,
    params: TrainParams,
    resume: dict | None = None,
    on_epoch: Callable[[int, dict, dict], None] | None = None,
) -> dict:
    """Train one model on ``split.train`` and evaluate it every epoch.

    Returns a plain dict (checkpointable): ``curves`` (list of rows),
    ``rows`` / ``sets`` / ``scores`` of the final predictions.
    """
    task = params.task
    train_rows = np.asarray(split.train)
    targets_all: dict[str, np.ndarray] = {}
    if task == "survival":
        targets_all["time"] = data.time.astype(np.float32)
        targets_all["event"] = data.event.astype(np.float32)
        edges = make_time_bins(data.time[train_rows], data.event[train_rows], params.n_bins)
        targets_all["bin"] = time_to_bin(data.time, edges)
        n_out_bins = len(edges) - 1
        strata = data.event
    else:
        targets_all["label"] = data.label
        n_out_bins = params.n_bins
        strata = data.label
    objective = make_objective(
        params.loss,
        task,
        n_classes=params.n_classes,
        n_bins=n_out_bins,
        nll_alpha=params.nll_alpha,
        cox_reduction=params.cox_reduction,
    )
    in_dim = next(iter(bags.values())).shape[1]
    device = ctx.device(params.device)
    torch.manual_seed(split.seed)
    model = build_model(params.model, in_dim, objective.out_dim, **params.model_kwargs)
    model = ctx.wrap(model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    curves: list[dict] = []
    start_epoch = 0
    if resume is not None:
        _unwrap(model).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        curves = list(resume["curves"])
        start_epoch = int(resume["epoch"]) + 1
        log.info("%s: resuming at epoch %d", split.key, start_epoch)

    eval_groups = evaluation_rows(split, data)
    eval_rows = np.concatenate([split.internal, split.external]).astype(np.int64)
    eval_bags = [bags[data.slide_ids[i]] for i in eval_rows]
    eval_sets = ["internal"] * len(split.internal) + ["external"] * len(split.external)
    base = dict(protocol=split.protocol, name=split.name, repeat=split.repeat, fold=split.fold)
    scores = None
    drop_singletons = task == "survival"
    for epoch in range(start_epoch, params.epochs):
        torch.manual_seed(split.seed * 100_003 + epoch)
        rng = np.random.default_rng([split.seed, epoch, 7])
        order = epoch_order(strata[train_rows], len(train_rows), rng, params.balanced_sampling)
        order = shard(order, ctx.rank, ctx.world_size)
        model.train()
        losses = []
        for b in range(0, len(order), params.batch_size):
            idx = train_rows[order[b : b + params.batch_size]]
            if drop_singletons and len(idx) < 2:
                continue  # a one-slide Cox batch has no pairs
            batch = collate_bags(
                [bags[data.slide_ids[i]] for i in idx],
                {k: v[idx] for k, v in targets_all.items()},
                max_tiles=params.max_tiles_per_slide,
                rng=rng,
            )
            out, _ = model(batch["x"].to(device), batch["mask"].to(device))
            loss = objective.loss(out, {k: v.to(device) for k, v in batch.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        train_loss = float(np.mean(losses)) if losses else float("nan")
        curves.append({**base, "epoch": epoch, "set": "train", "cohort": "all", "metric": "loss", "value": train_loss})
        metrics = {"split": split.key, "epoch": epoch, "train_loss": train_loss}
        last = epoch == params.epochs - 1
        if last or (params.eval_every > 0 and (epoch + 1) % params.eval_every == 0):
            scores = predict(
                model, eval_bags, objective.score, device, params.max_tiles_per_slide,
                params.eval_batch_size, seed=split.seed,
            )
            pos = {int(r): k for k, r in enumerate(eval_rows)}
            metric_name = "c_index" if task == "survival" else "auroc"
            for set_name, cohort, rows in eval_groups:
                k = np.array([pos[int(r)] for r in rows])
                v = _primary_metric(data, rows, scores[k], task)
                curves.append({**base, "epoch": epoch, "set": set_name, "cohort": cohort, "metric": metric_name, "value": v})
                metrics[f"{set_name}_{metric_name}_{cohort}"] = v
        state = {
            "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "curves": curves,
        }
        result = None
        if last:
            result = {
                "curves": curves,
                "rows": eval_rows.tolist(),
                "sets": eval_sets,
                "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32)),
            }
        if on_epoch is not None:
            on_epoch(epoch, metrics, {"current": state, "result": result})
    if scores is None:  # zero epochs requested
        scores = predict(model, eval_bags, objective.score, device, params.max_tiles_per_slide, params.eval_batch_size, seed=split.seed)
    return {
        "curves": curves,
        "rows": eval_rows.tolist(),
        "sets": eval_sets,
        "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32)),
    }


# --------------------------------------------------------------------------- all splits


def run_splits(
    ctx,
    bags: dict[str, np.ndarray],
    clinical: pd.DataFrame,
    splits: list[Split],
    params: TrainParams,
) -> dict[str, dict]:
    """Train and evaluate every split, resuming from ``ctx``'s checkpoint.

    Returns ``{split.key: result}`` with the results of :func:`fit_split`.
    """
    data = SplitData.from_clinical(clinical, params.task)
    state = ctx.load_state() or {}
    done: dict[str, dict] = dict(state.get("done", {}))
    current = state.get("current")
    if done or current:
        log.info("resuming: %d split(s) done", len(done))
    for split in splits:
        if split.key in done:
            continue
        resume = current if current is not None and current.get("key") == split.key else None

        def on_epoch(epoch: int, metrics: dict, st: dict, _split=split) -> None:
            cur = dict(st["current"], key=_split.key)
            if st["result"] is not None:
                done[_split.key] = st["result"]
                cur = None
            ctx.report(metrics, {"done": dict(done), "current": cur})

        result = fit_split(ctx, bags, data, split, params, resume=resume, on_epoch=on_epoch)
        done[split.key] = result
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
    bags = load_bag_arrays(source, clinical["slide_id"].astype(str).tolist())
    params = TrainParams(**config["params"])
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
    from raypath.io.ray_env import cluster_gpus, ensure_ray

    ray = ensure_ray()
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu is None:
        use_gpu = cluster_gpus() >= num_workers
    config: dict[str, Any] = {
        "clinical": clinical,
        "splits": splits,
        "params": asdict(params),
    }
    if isinstance(bags_or_path, str):
        config["features_path"] = bags_or_path
    else:
        config["bags_ref"] = ray.put(dict(bags_or_path))
    if not storage_path.startswith(("s3://", "gs://")) and "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)  # workers chdir elsewhere
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=storage_path,
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        from raypath.errors import RaypathError

        raise RaypathError(f"Ray Train run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    return {s.key: state["done"][s.key] for s in splits}
