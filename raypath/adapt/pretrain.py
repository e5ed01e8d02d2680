"""``raypath pretrain``: a small ViT trained from scratch by DINO self-distillation.

The same DINO loop as ``raypath adapt`` (:mod:`raypath.adapt.dino_train`:
multi-crop views under stain/scanner augmentation, EMA teacher, centred and
sharpened targets), with every weight of a randomly initialised registry
architecture trainable instead of an adapter on a frozen foundation model.
It runs through the training context: in this process (``--num-workers 0``)
or on Ray Train DDP workers (``--num-workers N``), with full-state
checkpoints and resume.

Data flow::

    tiles.parquet + slides.parquet (status ok, --cohorts)
      -> --tiles-per-slide random tiles per slide, drawn once (training_tiles.parquet)
      -> DINO from scratch (raypath.adapt.dino_train)
      -> <workdir>/pretrain/<run>/model.safetensors: the teacher backbone's
         state_dict, loadable by raypath.fm.backbone.load_backbone exactly like
         downloaded FM weights:  raypath embed --model raypath-small --weights <that file>

``raypath-small`` (the default architecture) is a 6-block ViT of width 192 at
112 px, patch 16: 2.38 M parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from pydantic import Field

from raypath.adapt import dino, dino_train
from raypath.config import add_config_arguments, config_from_args
from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, exists, is_remote, join, open_file, read_parquet, strip_protocol, write_parquet_atomic
from raypath.train.context import LocalContext

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model_info.json"
KEEP_CHECKPOINTS = 2
#: Config fields that may differ between a run and its resumption.
_MAY_CHANGE = frozenset({"workdir", "out", "epochs", "num_workers", "use_gpu", "checkpoint_every_epochs", "device",
                         "amp", "stop_after_epochs", "weights_dtype"})


class PretrainConfig(dino_train.DinoSettings):
    """Parameters of ``raypath pretrain`` (the DINO settings of
    :class:`raypath.adapt.dino_train.DinoSettings`, sized for a small ViT)."""

    workdir: str = Field(..., description="project folder with slides.parquet and tiles.parquet (local or s3://)")
    model: str = Field("raypath-small", description="registry key of the architecture trained from random init")
    run: str = Field("small", description="run name: outputs in <workdir>/pretrain/<run>/; the same name resumes")
    out: str | None = Field(None, description="output folder (default <workdir>/pretrain/<run>)")
    cohorts: list[str] | None = Field(None, description="cohorts to train on (default: every usable slide)")
    tiles_per_slide: int = Field(50, ge=1, description="random tiles per slide, drawn once")
    n_local_crops: int = Field(6, ge=0, description="local crops per tile (plus 2 global)")
    batch_size: int = Field(64, ge=1, description="tiles per step per worker")
    weights_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the published model.safetensors (float16 halves the file; loading casts back)")


@dataclass
class PretrainResult:
    """What :func:`pretrain` produced."""

    run_dir: str
    weights: str  # model.safetensors: the teacher backbone
    metrics: pd.DataFrame
    start_epoch: int  # first epoch trained by this call (> 0 when resumed)
    epochs_completed: int
    n_tiles: int
    n_params: int


def _abs(uri: str) -> str:
    # Ray workers chdir into their trial folder: local paths must be absolute.
    return uri if is_remote(uri) else os.path.abspath(strip_protocol(uri))


def run_dir_of(cfg: PretrainConfig) -> str:
    return _abs(cfg.out) if cfg.out else join(_abs(cfg.workdir), "pretrain", cfg.run)


def build_student(cfg: PretrainConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The architecture with seeded random weights, all trainable, plus a DINO head."""
    from raypath.adapt.api import DINOModel
    from raypath.fm.backbone import load_backbone

    bb = load_backbone(cfg.model, weights=f"random:{cfg.seed}", device="cpu").allow_any_input_size()
    for p in bb.parameters():
        p.requires_grad_(True)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        dims = dino.head_dims_for(bb.spec.embed_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_out_dim)
        head = dino.DINOHead(bb.spec.embed_dim, dims)
    return DINOModel(bb, head).to(device)


def command_of(cfg: PretrainConfig) -> str:
    """The ``raypath pretrain`` command line that reproduces ``cfg`` (non-default fields)."""
    parts = ["raypath", "pretrain"]
    fields = PretrainConfig.model_fields
    for name in sorted(fields, key=lambda n: not fields[n].is_required()):  # --workdir first
        field, v = fields[name], getattr(cfg, name)
        if not field.is_required() and v == field.default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + name.replace("_", "-"))
        elif isinstance(v, list):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    return " ".join(parts)


def _publish(run_dir: str, cfg: PretrainConfig, teacher: torch.nn.Module, metrics: list[dict], extra: dict) -> None:
    """Write the teacher backbone as safetensors (the FM weight layout), its info and the metrics."""
    import hashlib

    import pyarrow as pa
    from safetensors.torch import save

    dtype = torch.float16 if cfg.weights_dtype == "float16" else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in teacher.backbone.model.state_dict().items()}
    blob = save(state, metadata={"raypath_model": cfg.model, "objective": "dino-v1 from scratch (teacher)",
                                 "epochs": str(len(metrics)), "seed": str(cfg.seed)})
    atomic_write_bytes(join(run_dir, WEIGHTS_FILE), blob)
    info = {
        "model": cfg.model,
        "weights_file": WEIGHTS_FILE,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size_bytes": len(blob),
        "n_params": int(sum(v.numel() for v in state.values())),
        "epochs": len(metrics),
        "n_tiles": extra.get("n_tiles"),
        "world_size": extra.get("world_size"),
        "command": command_of(cfg),
        "use": f"raypath embed --model {cfg.model} --weights {join(run_dir, WEIGHTS_FILE)}",
    }
    atomic_write_bytes(join(run_dir, INFO_FILE), json.dumps(info, indent=1).encode())
    write_parquet_atomic(pa.Table.from_pylist(metrics), join(run_dir, "metrics.parquet"))
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps({"epochs": metrics, **extra}, indent=1).encode())


def pretrain_recipe(cfg: PretrainConfig, run_dir: str) -> dino_train.DinoRecipe:
    """The from-scratch pieces of the DINO loop (full-state checkpoints)."""
    from raypath.fm.registry import get_spec

    now = cfg.model_dump()
    return dino_train.DinoRecipe(
        cfg=cfg,
        spec=get_spec(cfg.model),
        build_student=lambda device: build_student(cfg, device),
        check_resumable=lambda saved, where: dino_train.check_resumable(saved, now, cfg.run, where, _MAY_CHANGE),
        publish=lambda teacher, metrics, extra: _publish(run_dir, cfg, teacher, metrics, extra),
        name="pretrain",
    )


def _recipe_from_dict(cfg: dict, run_dir: str) -> dino_train.DinoRecipe:
    return pretrain_recipe(PretrainConfig.model_validate(cfg), run_dir)


def _read(uri: str) -> dict:
    """A JSON (``.json``) or YAML file as a dict."""
    import yaml

    with open_file(uri, "rb") as f:
        return json.load(f) if uri.endswith(".json") else (yaml.safe_load(f) or {})


def _finished(cfg: PretrainConfig, run_dir: str) -> PretrainResult | None:
    """The result of an earlier call that already trained ``cfg.epochs`` epochs, else None."""
    if exists(join(run_dir, "config.yaml")):
        saved = _read(join(run_dir, "config.yaml")).get("config", {})
        dino_train.check_resumable(saved, cfg.model_dump(), cfg.run, join(run_dir, "config.yaml"), _MAY_CHANGE)
    if not (exists(join(run_dir, "metrics.json")) and exists(join(run_dir, WEIGHTS_FILE))):
        return None
    doc = _read(join(run_dir, "metrics.json"))
    if not doc.get("epochs") or doc["epochs"][-1]["epoch"] + 1 < cfg.epochs:
        return None
    info = _read(join(run_dir, INFO_FILE)) if exists(join(run_dir, INFO_FILE)) else {}
    log.info("pretrain %s already finished (%d epochs): %s", cfg.run, cfg.epochs, run_dir)
    return PretrainResult(run_dir, join(run_dir, WEIGHTS_FILE), pd.DataFrame(doc["epochs"]), cfg.epochs, cfg.epochs,
                          doc.get("n_tiles", 0), info.get("n_params", 0))


def _training_tiles(cfg: PretrainConfig, run_dir: str) -> pd.DataFrame:
    """The tiles drawn once for this run (re-read on resume)."""
    import pyarrow as pa

    from raypath.adapt.api import sample_training_tiles

    sel_uri = join(run_dir, "training_tiles.parquet")
    if exists(sel_uri):
        return read_parquet(sel_uri).to_pandas()
    tiles = sample_training_tiles(_abs(cfg.workdir), cfg.tiles_per_slide, cfg.cohorts, cfg.seed)
    write_parquet_atomic(pa.Table.from_pandas(tiles, preserve_index=False), sel_uri)
    return tiles


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) ``cfg.model`` from random init by DINO on the workdir's tiles.

    Returns a :class:`PretrainResult`; ``result.weights`` loads with
    ``load_backbone(cfg.model, weights=result.weights)``.  A re-run with the
    same ``run`` resumes from the last checkpoint; a finished run is not retrained.

    Example
    -------
    >>> res = pretrain(PretrainConfig(workdir="wd", epochs=50, num_workers=2))  # doctest: +SKIP
    >>> load_backbone("raypath-small", weights=res.weights).embed(tiles_uint8)  # doctest: +SKIP
    """
    from raypath.fm.registry import get_spec

    get_spec(cfg.model)  # an unknown model fails before anything is written
    run_dir = run_dir_of(cfg)
    done = _finished(cfg, run_dir)
    if done is not None:
        return done
    cfg.save(run_dir)
    tiles = _training_tiles(cfg, run_dir)
    if len(tiles) < cfg.num_workers:
        raise RaypathError(f"{len(tiles)} training tiles for {cfg.num_workers} workers: raise --tiles-per-slide or lower --num-workers")
    log.info("pretrain %s: %s from random init on %d tiles from %d slides", cfg.run, cfg.model, len(tiles), tiles["slide_id"].nunique())
    if cfg.num_workers == 0:
        from raypath.wsi.tile_images import load_tile_images

        ctx = LocalContext(join(run_dir, "checkpoints"), device=cfg.device, amp=cfg.amp, keep=KEEP_CHECKPOINTS)
        out = dino_train.train_loop(pretrain_recipe(cfg, run_dir), ctx, images=load_tile_images(tiles))
    else:
        out = _fit_ray(cfg, tiles, run_dir)
    metrics = pd.DataFrame(out["metrics"])
    n_params = int(_read(join(run_dir, INFO_FILE))["n_params"])
    return PretrainResult(run_dir, join(run_dir, WEIGHTS_FILE), metrics, out["start_epoch"], len(metrics), out["n_tiles"], n_params)


def _fit_ray(cfg: PretrainConfig, tiles: pd.DataFrame, run_dir: str) -> dict:
    from raypath.adapt.api import tiles_dataset
    from raypath.io.ray_env import ensure_ray
    from raypath.train.launch import resolve_use_gpu

    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu, cfg.num_workers)  # before reading tiles: fail fast
    return dino_train.fit_on_ray(_recipe_from_dict, cfg, tiles_dataset(tiles), run_dir, use_gpu, keep=KEEP_CHECKPOINTS)


# --------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a small ViT from scratch by DINO self-distillation on a workdir's tiles (Ray Train)",
        description=(
            "Writes <workdir>/pretrain/<run>/model.safetensors (the teacher backbone, loadable as FM weights), "
            "model_info.json (sha256, parameters, the command), config.yaml and metrics. Re-running with the "
            "same --run resumes from the last checkpoint. Embed with "
            "`raypath embed --model raypath-small --weights <workdir>/pretrain/<run>/model.safetensors`."
        ),
    )
    add_config_arguments(p, PretrainConfig)

    def run(args: argparse.Namespace) -> int:
        res = pretrain(config_from_args(PretrainConfig, args))
        print(f"weights: {res.weights}  ({res.n_params / 1e6:.2f} M parameters)")
        if len(res.metrics):
            last = res.metrics.iloc[-1]
            print(f"epochs: {res.epochs_completed}  loss: {last['loss']:.4f}  teacher entropy: {last['teacher_entropy']:.3f}")
        return 0

    p.set_defaults(func=run)
