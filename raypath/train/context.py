"""The one training context: where a training loop runs, hidden behind one object.

A trainer never branches on "am I under Ray": it asks its context for the
device, the precision, the DDP-wrapped model, the data shard, and hands it
metrics and checkpoints.  Three contexts share that surface:

* :class:`LocalContext`: this process, no Ray; checkpoints are folders
  ``<checkpoint_dir>/epoch_NNNN`` (local or ``s3://``), the newest ``keep``
  kept.  Tests, ``--num-workers 0`` and small jobs.
* :class:`RayTrainContext`: a Ray Train (V2) ``TorchTrainer`` worker;
  DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, nccl on GPU),
  ``ray.train.report`` by every rank (a barrier; rank 0 attaches the
  checkpoint), ``ray.train.get_checkpoint`` to resume.
* :class:`TuneContext`: a Ray Tune function trial; ``ray.tune.report`` /
  ``ray.tune.get_checkpoint`` (a trial restarted by ``FailureConfig`` or
  ``Tuner.restore`` resumes from its last checkpoint).

:func:`current_context` picks the right one from the environment.

Usage (the whole contract; see docs/ARCHITECTURE.md "Training context")::

    ctx = current_context(device="auto", amp="auto", checkpoint_dir=run_dir + "/checkpoints")
    model = ctx.prepare(build_model())             # to ctx.device, DDP when world_size > 1
    opt = torch.optim.AdamW(model.parameters())
    state = ctx.restore()                          # dict saved below, or None
    start = 0 if state is None else state["epoch"] + 1
    for epoch in range(start, epochs):
        for x, y in batches(ctx.rank, ctx.world_size):
            with ctx.autocast():                   # bf16 / fp16 / fp32 as resolved
                loss = loss_fn(model(x.to(ctx.device)), y.to(ctx.device))
            opt.zero_grad(); ctx.backward(loss); ctx.step(opt)
        ctx.report({"loss": float(loss)}, checkpoint={"model": module_state(model),
                   "optimizer": opt.state_dict(), "epoch": epoch, **ctx.amp_state()}, step=epoch + 1)
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any, Callable, TypeVar

import torch

from raypath.train import checkpoint as ck
from raypath.train.precision import Precision, resolve_device, resolve_precision

log = logging.getLogger(__name__)

T = TypeVar("T")
#: What ``report(checkpoint=...)`` takes: a state dict (saved as state.pt) or a
#: function that writes any files into the local folder it is given.
CheckpointArg = dict | Callable[[str], None] | None


class SimulatedKill(InterruptedError):
    """Raised by a context's ``kill_at_step`` hook right after the checkpoint
    of that step is saved: tests use it to stop a run as a crash would."""


def _write(folder: str, checkpoint: CheckpointArg, step: int) -> None:
    if isinstance(checkpoint, dict):
        ck.save_state(folder, checkpoint)
    else:
        os.makedirs(folder, exist_ok=True)
        checkpoint(folder)
    ck.mark_complete(folder, step)


class TrainContext:
    """Surface shared by every context (use a subclass or :func:`current_context`).

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``...  (Ray Train workers use the device Ray assigns.)
    amp
        ``auto | bf16 | fp16 | off`` (see :mod:`raypath.train.precision`).
    kill_at_step
        Testing aid: raise :class:`SimulatedKill` right after the report of this step.
    """

    kind = "base"
    rank = 0
    world_size = 1

    def __init__(self, device: str = "auto", amp: str = "auto", kill_at_step: int | None = None):
        self._wanted_device = device
        self.amp = amp
        self.kill_at_step = kill_at_step
        self.reports: list[dict] = []
        self.last_step = 0  # the step of the last report (restored from a checkpoint)
        self.restored_from: str | None = None
        self._precision: Precision | None = None
        self._scaler = None

    # ---- device, precision, model
    def configure(self, device: str | None = None, amp: str | None = None) -> "TrainContext":
        """Set the wanted device / precision (a trainer whose parameters carry
        them calls this before the first use of :attr:`device`)."""
        if self._precision is not None:
            if (device in (None, self._wanted_device)) and (amp in (None, self.amp)):
                return self  # nothing changes (e.g. a context reused for a second run)
            raise RuntimeError("configure() with another device/precision after the context's device was resolved")
        if device is not None:
            self._wanted_device = device
        if amp is not None:
            self.amp = amp
        return self

    def _resolve_device(self) -> torch.device:
        return resolve_device(self._wanted_device)

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def precision(self) -> Precision:
        if self._precision is None:
            self._precision = resolve_precision(self._resolve_device(), self.amp)
            self._scaler = self._precision.grad_scaler()
        return self._precision

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Context manager for the forward pass (and loss) at the resolved precision."""
        return self.precision.autocast()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on :attr:`device`, wrapped in DDP when ``world_size > 1``."""
        return model.to(self.device)

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        return ck.unwrap(model)

    # ---- optimisation
    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the GradScaler under fp16."""
        _ = self.precision
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, before_step: Callable[[], T] | None = None) -> T | None:
        """Unscale (fp16), run ``before_step`` (gradient clipping, freezing),
        step the optimiser, update the scale; returns ``before_step()``'s value."""
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)
        out = before_step() if before_step is not None else None
        if self._scaler is not None:
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()
        return out

    def amp_state(self) -> dict:
        """``{"grad_scaler": ...}`` under fp16 (put it in the checkpoint), else ``{}``."""
        _ = self.precision
        return {"grad_scaler": self._scaler.state_dict()} if self._scaler is not None else {}

    def load_amp_state(self, state: dict) -> None:
        _ = self.precision
        if self._scaler is not None and state.get("grad_scaler"):
            self._scaler.load_state_dict(state["grad_scaler"])

    def all_reduce_mean(self, x: float) -> float:
        """Mean of a number over the ranks (``x`` itself with one rank)."""
        import torch.distributed as tdist

        if self.world_size > 1 and tdist.is_available() and tdist.is_initialized():
            t = torch.tensor([x], dtype=torch.float64)
            tdist.all_reduce(t)
            return float(t.item()) / tdist.get_world_size()
        return x

    def dataset_shard(self, name: str = "train"):
        """This worker's shard of a Ray Dataset given to the trainer (``None`` outside Ray Train)."""
        return None

    # ---- checkpoints and metrics
    def restore(self, read: Callable[[str], T] = ck.load_state) -> T | None:
        """``read(folder)`` of the latest checkpoint, or ``None`` (fresh run).
        Sets :attr:`last_step` to the checkpoint's step."""
        with self._latest() as folder:
            if folder is None:
                return None
            self.last_step = ck.step_of(folder) or 0
            return read(folder)

    def report(self, metrics: dict, checkpoint: CheckpointArg = None, step: int | None = None) -> None:
        """Record ``metrics`` (every rank calls it) and save ``checkpoint``.

        ``checkpoint`` is a state dict (saved as ``state.pt``) or a function
        writing files into a local folder; only rank 0's is kept.  ``step``
        (default: last step + 1) names the checkpoint and drives ``kill_at_step``.
        """
        self.last_step = int(step) if step is not None else self.last_step + 1
        self.reports.append(dict(metrics))
        self._report(dict(metrics), checkpoint if self.is_main else None)
        if self.kill_at_step is not None and self.last_step == self.kill_at_step:
            raise SimulatedKill(f"simulated kill after step {self.last_step} (kill_at_step)")

    def _latest(self):  # context manager yielding a local folder or None
        raise NotImplementedError

    def _report(self, metrics: dict, checkpoint: CheckpointArg) -> None:
        raise NotImplementedError


class _NoCheckpoint:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class LocalContext(TrainContext):
    """Train in this process.  Checkpoints (optional) go to ``checkpoint_dir``
    (local or ``s3://``) as ``epoch_NNNN`` folders, the newest ``keep`` kept.

    ``stop_after_reports`` is the former name of ``kill_at_step``.
    """

    kind = "local"

    def __init__(self, checkpoint_dir: str | None = None, kill_at_step: int | None = None, *, device: str = "auto",
                 amp: str = "auto", keep: int = 2, name_format: str = "epoch_{step:04d}",
                 stop_after_reports: int | None = None):
        super().__init__(device, amp, kill_at_step if kill_at_step is not None else stop_after_reports)
        self.checkpoint_dir = checkpoint_dir
        self.keep = keep
        self.name_format = name_format
        self._prefix = name_format.split("{", 1)[0]

    def latest_checkpoint(self) -> str | None:
        if not self.checkpoint_dir:
            return None
        return ck.latest_checkpoint(self.checkpoint_dir, self._prefix)

    def _latest(self):
        last = self.latest_checkpoint()
        if last is None:
            return _NoCheckpoint()
        self.restored_from = last
        return _Fetched(last)

    def _report(self, metrics: dict, checkpoint: CheckpointArg) -> None:
        if checkpoint is None or not self.checkpoint_dir:
            return
        from raypath.io.storage import join

        with tempfile.TemporaryDirectory(prefix="raypath-ckpt-") as d:
            _write(d, checkpoint, self.last_step)
            ck.upload_dir(d, join(self.checkpoint_dir, self.name_format.format(step=self.last_step)))
        ck.prune_checkpoints(self.checkpoint_dir, self.keep, self._prefix)


class _Fetched:
    """A checkpoint folder as a local folder for the duration of a ``with``."""

    def __init__(self, uri: str):
        self.uri = uri
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        from raypath.io.storage import is_remote, strip_protocol

        if not is_remote(self.uri):
            return strip_protocol(self.uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="raypath-ckpt-")
        ck.download_dir(self.uri, self._tmp.name)
        return self._tmp.name

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()
        return False


class _RayCheckpointed(TrainContext):
    """Shared by the Ray Train and Tune contexts: checkpoints are ``ray.train.Checkpoint``s."""

    def _ray_report(self, metrics: dict, checkpoint=None) -> None:
        raise NotImplementedError

    def _ray_checkpoint(self):
        raise NotImplementedError

    def _latest(self):
        ckpt = self._ray_checkpoint()
        if ckpt is None:
            return _NoCheckpoint()
        self.restored_from = f"{self.kind} checkpoint {ckpt.path}"
        return ckpt.as_directory()

    def _report(self, metrics: dict, checkpoint: CheckpointArg) -> None:
        from ray.train import Checkpoint

        if checkpoint is None:
            self._ray_report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="raypath-ckpt-") as d:
            _write(d, checkpoint, self.last_step)
            self._ray_report(metrics, Checkpoint.from_directory(d))


class RayTrainContext(_RayCheckpointed):
    """Inside a Ray Train (V2) ``TorchTrainer`` worker (call it in the train function)."""

    kind = "Ray Train"

    def __init__(self, amp: str = "auto", kill_at_step: int | None = None):
        import ray.train

        super().__init__("auto", amp, kill_at_step)
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    def _resolve_device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        model = model.to(self.device)
        if self.world_size > 1:
            model = ray.train.torch.prepare_model(model, move_to_device=False)
        return model

    def dataset_shard(self, name: str = "train"):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def _ray_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def _ray_report(self, metrics: dict, checkpoint=None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)


class TuneContext(_RayCheckpointed):
    """Inside a Ray Tune function trial that trains in its own process."""

    kind = "Ray Tune"

    def _ray_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def _ray_report(self, metrics: dict, checkpoint=None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=checkpoint)


def where_am_i() -> str:
    """``"ray_train"`` in a Ray Train worker, ``"tune"`` in a Tune trial, else ``"local"``."""
    if "ray" not in sys.modules:
        return "local"
    try:
        from ray.train.v2._internal.util import _in_ray_train_worker
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:  # pragma: no cover - other Ray versions
        return "local"
    if _in_ray_train_worker():
        return "ray_train"
    if _in_tune_session():
        return "tune"
    return "local"


def current_context(device: str = "auto", amp: str = "auto", checkpoint_dir: str | None = None,
                    kill_at_step: int | None = None, **local_kw: Any) -> TrainContext:
    """The context for where this code runs (:func:`where_am_i`).

    ``checkpoint_dir`` and ``local_kw`` apply to :class:`LocalContext` only
    (Ray keeps checkpoints in its run's storage); ``device`` is ignored on a
    Ray Train worker, which uses the device Ray assigned.
    """
    where = where_am_i()
    if where == "ray_train":
        return RayTrainContext(amp=amp, kill_at_step=kill_at_step)
    if where == "tune":
        return TuneContext(device, amp, kill_at_step)
    return LocalContext(checkpoint_dir, kill_at_step, device=device, amp=amp, **local_kw)


__all__ = ["LocalContext", "RayTrainContext", "SimulatedKill", "TrainContext", "TuneContext", "current_context", "where_am_i"]
