"""Checkpoint folders: what a training context saves and restores.

A checkpoint is a *folder* (local, or under ``s3://`` for in-process runs;
a ``ray.train.Checkpoint`` under Ray Train and Tune) holding whatever the
trainer writes into it plus a ``COMPLETE`` marker written last, whose text is
the step the checkpoint was taken after.  A folder without the marker (a
crash during the upload) is never resumed from.

Two kinds of model state go into it, chosen by the trainer:

* **adapter-only** (``module_state(model, trainable_only=True)``): the
  parameters that train (a LoRA/DoRA adapter, a head, prompts); the frozen
  foundation-model weights are never copied;
* **full** (``trainable_only=False``): the whole ``state_dict``.

The simplest trainers save one dict with :func:`save_state` (``state.pt``,
loaded back with ``weights_only=True``: tensors, numbers, strings, lists and
dicts only, never arbitrary pickles).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from raypath.io.storage import atomic_write_bytes, filesystem_for, is_remote, join, strip_protocol

STATE_FILE = "state.pt"
COMPLETE = "COMPLETE"


def save_state(folder: str, state: dict) -> None:
    """``state`` (tensors, numbers, strings, lists, dicts) as ``folder/state.pt``."""
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, STATE_FILE))


def load_state(folder: str) -> dict:
    """The dict saved by :func:`save_state` (CPU tensors)."""
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def module_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of a model's tensors: the trainable parameters
    (adapter-only checkpoints) or the whole ``state_dict`` (full)."""
    model = unwrap(model)
    if trainable_only:
        items = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    else:
        items = model.state_dict().items()
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in items}  # copies, never views of live weights


def load_module_state(model: torch.nn.Module, state: dict[str, torch.Tensor], trainable_only: bool = False) -> None:
    """Load what :func:`module_state` returned (strict: every key must match)."""
    model = unwrap(model)
    if not trainable_only:
        model.load_state_dict(state)
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def mark_complete(folder: str, step: int) -> None:
    Path(folder, COMPLETE).write_text(str(int(step)))


def step_of(folder: str) -> int | None:
    """The step recorded in a checkpoint folder's marker, or ``None``."""
    p = Path(folder, COMPLETE)
    if not p.exists():
        return None
    text = p.read_text().strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


# --------------------------------------------------------------------------- folders under a root


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local checkpoint folder to ``dest`` (local: copy then rename;
    remote: one PUT per file, the marker last)."""
    if not is_remote(dest):
        dest_path = strip_protocol(dest)
        tmp = f"{dest_path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local_dir, tmp)
        if os.path.exists(dest_path):
            shutil.rmtree(dest_path)
        os.replace(tmp, dest_path)
        return
    for root, _, files in os.walk(local_dir):
        for f in sorted(files, key=lambda n: n == COMPLETE):
            p = os.path.join(root, f)
            rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
            atomic_write_bytes(join(dest, rel), Path(p).read_bytes())


def download_dir(src: str, local_dir: str) -> None:
    """Copy the folder ``src`` (local or remote) into ``local_dir``."""
    fs = filesystem_for(src)
    base = src if is_remote(src) else strip_protocol(src)
    for p in fs.find(base):
        rel = p[len(strip_protocol(base)) :].lstrip("/") if is_remote(src) else os.path.relpath(p, base)
        dst = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with fs.open(p, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo)


def _names(root: str, prefix: str) -> tuple[object, str, list[str]]:
    fs = filesystem_for(root)
    base = root if is_remote(root) else strip_protocol(root)
    if not fs.exists(base):
        return fs, base, []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    # ".tmp-<pid>": a copy in progress (or left by a crash), never a checkpoint
    return fs, base, [n for n in names if n.startswith(prefix) and ".tmp-" not in n]


def latest_checkpoint(root: str, prefix: str = "") -> str | None:
    """The newest complete checkpoint folder ``root/<prefix>...`` (names sort by step)."""
    fs, base, names = _names(root, prefix)
    for name in reversed(names):
        if fs.exists(f"{base}/{name}/{COMPLETE}"):
            return join(root, name)
    return None


def prune_checkpoints(root: str, keep: int, prefix: str = "") -> None:
    """Delete all but the newest ``keep`` checkpoint folders under ``root``."""
    fs, base, names = _names(root, prefix)
    for name in names[:-keep] if keep > 0 else []:
        fs.rm(f"{base}/{name}", recursive=True)


__all__ = [
    "COMPLETE", "STATE_FILE", "download_dir", "latest_checkpoint", "load_module_state", "load_state",
    "mark_complete", "module_state", "prune_checkpoints", "save_state", "step_of", "unwrap", "upload_dir",
]
