"""Starting a training function on Ray Train workers (the driver side).

:func:`fit_on_ray_train` is the one place raypath builds a ``TorchTrainer``:
DDP over ``num_workers`` workers (gloo on CPU, nccl on GPU), checkpoints in
``<storage_path>/<name>/`` (re-running with the same two values resumes from
the latest one, which the train function reads with its
:class:`~raypath.train.context.RayTrainContext`), and the worker's own
errors re-raised as themselves: a ``RaypathError`` stays a one-sentence user
error, a :class:`~raypath.train.context.SimulatedKill` stays a kill.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from raypath.errors import RaypathError
from raypath.train.context import SimulatedKill


def _absolute(storage_path: str) -> str:
    # Ray workers chdir into their trial folder: local paths must be absolute.
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(storage_path)


def _reraise_worker_error(e: Exception) -> None:
    cause: BaseException = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, RaypathError):
        raise cause from e
    if isinstance(cause, SimulatedKill) or "SimulatedKill" in repr(e):
        raise SimulatedKill(str(cause)) from e


def resolve_use_gpu(use_gpu: bool | None, num_workers: int) -> bool:
    """``None`` -> GPUs when the cluster has one per worker; ``True`` on a
    cluster without GPUs is a user error (Ray would wait forever)."""
    from raypath.io.ray_env import cluster_gpus

    gpus = cluster_gpus()
    if use_gpu is None:
        return gpus >= num_workers > 0
    if use_gpu and gpus < 1:
        raise RaypathError("--use-gpu was given but the Ray cluster has no GPUs: drop the flag or add GPU workers")
    return bool(use_gpu)


def _with_plugins(train_fn: Callable[[dict], Any], specs: list[str]) -> Callable[[dict], Any]:
    """``train_fn`` that first loads the driver's plugins (a private model, MIL head
    or loss: raypath.plugins) in the worker, which may predate the driver's RAYPATH_PLUGINS."""
    if not specs:
        return train_fn

    def run(config: dict) -> Any:
        from raypath.plugins import load_plugins

        load_plugins(specs)
        return train_fn(config)

    return run


def fit_on_ray_train(
    train_fn: Callable[[dict], Any],
    config: dict,
    *,
    num_workers: int,
    storage_path: str,
    name: str = "train",
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    datasets: dict | None = None,
    keep: int = 2,
    max_failures: int = 0,
):
    """Run ``train_fn(config)`` on ``num_workers`` Ray Train workers; returns
    the ``ray.train.Result`` (``.checkpoint`` = the latest, ``.return_value``
    = rank 0's return value).

    ``use_gpu=None`` uses GPUs when the cluster has one per worker.
    ``max_failures``: worker-group restarts Ray Train may make after a worker
    dies; each restart resumes from the latest checkpoint within this call.

    Raises
    ------
    RaypathError
        ``use_gpu=True`` on a cluster without GPUs, or the worker's own RaypathError.
    SimulatedKill
        The worker was stopped by a context's ``kill_at_step``.
    """
    from raypath.io.ray_env import ensure_ray

    ensure_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raypath.plugins import plugin_specs

    use_gpu = resolve_use_gpu(use_gpu, num_workers)
    trainer = TorchTrainer(
        _with_plugins(train_fn, plugin_specs()),
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=_absolute(storage_path),
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
    )
    try:
        return trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        _reraise_worker_error(e)
        raise


__all__ = ["fit_on_ray_train", "resolve_use_gpu"]
