"""``raypath patch``: the patch-classification benchmark (Python API).

:func:`run_patch` takes a :class:`PatchConfig` and

1. builds or reads the patch table (a table, point annotations + slides, an
   image folder, ``tiles.parquet`` + labels, or the synthetic mitosis study
   it generates with ``synth=True``), and splits it by patient within each
   domain (or checks the table's own ``split`` for leakage);
2. reads every patch once into the local patch cache (fast tile reader);
3. embeds them with the frozen FM for the probes (feature store, keyed by
   ``patch_id``: re-runs never re-embed);
4. runs every fit of the protocols (:mod:`raypath.patch.protocols`) with
   every method (:mod:`raypath.patch.methods`), here or as Ray tasks, each
   fit's result written as soon as it is done (a re-run skips them while the
   results key -- settings, patch table rows, split, file fingerprints, feature
   identity -- is unchanged; a killed fine-tuning fit resumes from its last
   epoch on the same key);
5. scores every fit on every test set (:mod:`raypath.patch.metrics`, bootstrap
   CIs) and on its validation patients (what a sweep selects on), and writes the tables, plots and report page
   (:mod:`raypath.patch.outputs`) under ``<workdir>/runs/<run>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from raypath.config import StageConfig
from raypath.errors import RaypathError
from raypath.io.storage import S3Options, atomic_write_bytes, exists, is_remote, join, open_file, strip_protocol

log = logging.getLogger(__name__)

#: ``--preset cpu-small``: the benchmark sized for a laptop CPU in minutes (flags still win).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": dict(
        synth=True, model="tiny-vit", patch_px=64, mpp=0.5, shift_px=8, seeds=[42, 43], max_epochs=10,
        patience=4, pseudo_epoch=320, lr=1e-3, n_boot=300, e2e_size="tiny", embed_batch=128,
        methods=["linear", "knn", "lora", "full", "e2e-resnet"],
        synth_options={"n_domains": 3, "slides_per_domain": 6, "slide_px": 1024, "cells_per_slide": 30},
    ),
}


class PatchConfig(StageConfig):
    """Parameters of ``raypath patch`` (defaults: Ammeling et al. 2025, METHODS.md §2)."""

    workdir: str = Field(description="project folder (local or s3://); outputs go to <workdir>/runs/<run>/")
    run: str = Field("patch", description="run name (a re-run with the same name resumes)")
    preset: Literal["none", "cpu-small"] = Field("none", description="cpu-small: the benchmark sized for a CPU in minutes (synthetic study, tiny-vit, 2 seeds, short training); flags win")
    patches: str | None = Field(None, description="patch table (patch_id, uri, label, domain, slide_id, patient_id [, x, y, mpp, split])")
    annotations: str | None = Field(None, description="point annotations: MIDOG-style .json or a table slide_id, x, y, label [, domain]")
    slides: str | None = Field(None, description="slide table (slide_id, uri, patient_id, cohort = domain) for --annotations")
    bbox_format: Literal["xyxy", "xywh"] = Field("xyxy", description="bbox layout in a JSON (MIDOG: xyxy, COCO: xywh)")
    image_folder: str | None = Field(None, description="folder of images: <label>/<image> (or <domain>/<label>/<image> with --domain-level)")
    domain_level: bool = Field(False, description="--image-folder has a domain level above the label folders")
    tiles_label: str | None = Field(None, description="build patches from <workdir>/tiles.parquet using this label column")
    synth: bool = Field(False, description="generate the synthetic mitosis study in <workdir>/mitosis_study (reused) and use it")
    synth_options: dict = Field(default_factory=dict, description="MitosisConfig fields for --synth (JSON)")
    positive_label: str = Field("mitotic_figure", description="the positive class of the binary AUROC and of the 50 %% batches")
    patch_px: int = Field(224, ge=16, description="patch side in px at --mpp (resized to the model's input)")
    mpp: float = Field(0.25, gt=0, description="um/px of patches read from slides")
    shift_px: int = Field(16, ge=0, description="largest random shift of a training patch (px)")
    model: str = Field("phikon", description="registry key of the foundation model (tiny-vit: random test model)")
    weights: str | None = Field(None, description="weights file/folder ('random' for test models; default: HF cache)")
    methods: list[str] = Field(["linear", "knn", "lora", "dora", "full", "e2e-resnet", "e2e-vit"], description="methods to compare")
    protocols: list[str] = Field(["scaling", "domain"], description="scaling (label fractions), domain (train on one, test on each), lodo")
    fractions: list[float] = Field([0.001, 0.01, 0.1, 1.0], description="fractions of the training patches (scaling)")
    domain_fractions: list[float] = Field([1.0], description="fractions for the domain / lodo protocols")
    seeds: list[int] = Field([42, 43, 44, 45, 46], description="seeds (subsets and training)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="patients held out for testing, per domain")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="of the rest, patients held out for early stopping")
    split_seed: int = Field(0, description="seed of the patient split")
    min_per_class: int = Field(2, ge=1, description="smallest number of training patches per class")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=2, description="batch size")
    max_epochs: int = Field(100, ge=1, description="most epochs (pseudo-epochs)")
    patience: int = Field(20, ge=1, description="early stopping: epochs without a better validation loss")
    pseudo_epoch: int = Field(1280, ge=2, description="sampled patches per epoch")
    positive_share: float = Field(0.5, gt=0, lt=1, description="share of positive patches per batch (two classes)")
    rank: int = Field(16, ge=1, description="LoRA/DoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA/DoRA alpha")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA/DoRA dropout")
    target_modules: list[str] | None = Field(None, description="adapter targets (default: the tuning layer's table)")
    prompt_tokens: int = Field(10, ge=1, description="PathoTune: N task visual prompt (TVP) tokens per block")
    prompt_depth: int | None = Field(None, ge=1, description="PathoTune: blocks that get TVP tokens, from the first (default: every block)")
    prompt_template: str = Field("An {stain} stained image of {tissue} tissue for {task} classification",
                                 description="PathoTune: the task textual prompt (TTP), with {name} fill-ins from --prompt-fill")
    prompt_fill: dict[str, str] = Field(default_factory=lambda: {"stain": "H&E", "tissue": "colorectal", "task": "tumour"},
                                        description="PathoTune: the template's fill-ins (JSON), e.g. '{\"stain\": \"H&E\", \"tissue\": \"breast\", \"task\": \"mitosis\"}'")
    text_tokens: int = Field(1, ge=1, description="PathoTune: tokens the text embedding is projected to (TTP)",
                             json_schema_extra={"group": "model"})
    text_encoder: str = Field("all-minilm-l6-v2", description="PathoTune: the frozen sentence encoder of the TTP (key or local folder)",
                              json_schema_extra={"group": "model"})
    instance_tokens: int = Field(2, ge=1, description="PathoTune: M instance visual prompt (IVP) tokens per image",
                                 json_schema_extra={"group": "model"})
    refine_hidden: int | None = Field(None, ge=1, description="PathoTune: width of the IVP refine module (default: ViT width / 4)",
                                      json_schema_extra={"group": "model"})
    prompt_optimizer: Literal["radam", "adamw", "adam", "sgd"] = Field("radam", description="PathoTune: optimiser (RAdam as in the paper)")
    prompt_lr_scale: float = Field(10.0, gt=0, description="PathoTune: learning rate = this x --lr (prompts take larger steps than weights)")
    e2e_size: Literal["auto", "tiny", "full"] = Field("auto", description="end-to-end baselines: full (ResNet-50, ViT-S/16) or tiny; auto = full on GPU")
    device: str = Field("auto", description="auto | cpu | cuda")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision on GPU")
    train_workers: int = Field(0, ge=0, description="0: fine-tune in the process running the fit; N: Ray Train with N workers per fit")
    executor: Literal["local", "ray"] = Field("local", description="run fits one after another here, or as parallel Ray tasks")
    fit_cpus: float = Field(1.0, gt=0, description="CPUs per fit (executor ray)")
    fit_gpus: float = Field(0.0, ge=0, description="GPUs per fit (executor ray)")
    n_boot: int = Field(1000, ge=0, description="bootstrap replicates of each CI")
    bootstrap_unit: Literal["slide", "patch"] = Field("slide", description="resample whole slides (honest) or patches")
    metric: str = Field("balanced_accuracy", description="metric of the headline, plots and tables")
    embed_batch: int = Field(64, ge=1, description="batch size of feature extraction")
    cache_dir: str | None = Field(None, description="local folder of the patch cache (default <workdir>/cache)")
    kill_at_step: int | None = Field(None, description="testing aid: stop a fine-tuning fit after this epoch as a crash would")
    stop_after_fits: int | None = Field(None, description="testing aid: stop after this many new fits")

    @field_validator("synth_options", "prompt_fill", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON object ({e}); e.g. '{{\"slides_per_domain\": 4}}'") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset", "none") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self):
        from raypath.patch.metrics import METRICS
        from raypath.patch.methods import METHODS
        from raypath.patch.protocols import PROTOCOLS

        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}: choose from {', '.join(PROTOCOLS)}")
        if any(not 0 < f <= 1 for f in self.fractions + self.domain_fractions):
            raise ValueError("fractions must be in (0, 1]")
        try:
            self.prompt_template.format(**self.prompt_fill)
        except (KeyError, IndexError) as e:
            raise ValueError(f"--prompt-template {self.prompt_template!r} names {e} that --prompt-fill "
                             f"{sorted(self.prompt_fill)} lacks: add it to --prompt-fill") from None
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}: choose from {', '.join(METRICS)}")
        sources = [self.patches, self.annotations, self.image_folder, self.tiles_label, self.synth or None]
        if sum(s is not None for s in sources) != 1:
            hint = " (--preset cpu-small sets --synth: add --no-synth to use your own data)" if self.synth else ""
            raise ValueError("give exactly one source of patches: --patches, --annotations, --image-folder, "
                             f"--tiles-label or --synth{hint}")
        return self

    def resolved_e2e_size(self) -> str:
        if self.e2e_size != "auto":
            return self.e2e_size
        import torch

        return "full" if self.device != "cpu" and torch.cuda.is_available() else "tiny"

    def run_dir(self) -> str:
        return join(self.workdir, "runs", self.run)

    def results_key(self, inputs: str = "") -> str:
        """Digest of what a fit's result depends on: the settings (testing aids and plumbing excluded)
        and ``inputs``, the digest of the data and the features' identity (:func:`inputs_digest`)."""
        skip = {"run", "preset", "executor", "fit_cpus", "fit_gpus", "train_workers", "cache_dir", "n_boot",
                "bootstrap_unit", "metric", "kill_at_step", "stop_after_fits", "embed_batch", "methods",
                "protocols", "fractions", "domain_fractions", "seeds"}
        doc = {k: v for k, v in self.to_dict().items() if k not in skip}
        doc["inputs"] = inputs
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- inputs


def _synth_study(cfg: PatchConfig) -> str:
    from raypath.synth.mitosis import MitosisConfig, synthesize_mitosis

    out = join(cfg.workdir, "mitosis_study")
    opts = {"reuse": True, **cfg.synth_options, "out": out}
    try:
        mcfg = MitosisConfig.model_validate(opts)
    except Exception as e:
        raise RaypathError(f"--synth-options {cfg.synth_options}: {e}") from None
    synthesize_mitosis(mcfg)
    return join(out, "annotations.json")


def source_name(cfg: PatchConfig) -> str:
    """The flag and value the patches come from, for error messages (``--image-folder imgs``)."""
    for flag, value in (("--patches", cfg.patches), ("--annotations", cfg.annotations),
                        ("--image-folder", cfg.image_folder), ("--tiles-label", cfg.tiles_label)):
        if value:
            return f"{flag} {value}"
    return f"--synth ({join(cfg.workdir, 'mitosis_study')})"


def load_patch_table(cfg: PatchConfig, s3: S3Options | None = None) -> pd.DataFrame:
    """The validated patch table of ``cfg``'s source."""
    from raypath.patch import builders
    from raypath.patch.table import read_patch_table

    if cfg.patches:
        return read_patch_table(cfg.patches, s3)
    if cfg.synth:
        return builders.from_point_annotations(_synth_study(cfg), s3=s3)
    if cfg.annotations:
        return builders.from_point_annotations(cfg.annotations, cfg.slides, bbox_format=cfg.bbox_format, s3=s3)
    if cfg.image_folder:
        return builders.from_image_folder(cfg.image_folder, domain_level=cfg.domain_level)
    return builders.from_tiles(cfg.workdir, label_column=cfg.tiles_label, s3=s3)


#: Patch table columns a fit learns from (pixels, label, grouping, place).
INPUT_COLUMNS = ("patch_id", "uri", "label", "domain", "slide_id", "patient_id", "x", "y", "mpp", "slide_mpp")


def inputs_digest(cfg: PatchConfig, ctx: dict) -> str:
    """sha256 of the data behind every fit: the patch table's rows (ids, sources, labels, domains,
    slides, patients, coordinates, in order), the train/val/test split, the source files'
    fingerprints and the feature identity (model, weights sha256, preprocessing)."""
    table = ctx["table"]
    cols = [c for c in INPUT_COLUMNS if c in table.columns]
    h = hashlib.sha256()
    h.update(table[cols].astype(str).to_csv(index=False).encode())
    h.update("\n".join(map(str, ctx["split"])).encode())
    h.update(json.dumps(sorted(ctx["fingerprints"].items())).encode())
    h.update(json.dumps(_model_identity(cfg), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _model_identity(cfg: PatchConfig) -> dict:
    """The feature identity of the run's FM; a run of end-to-end baselines only (which never load
    the FM) may lack its weights and is then keyed by the model's name and weights flag."""
    from raypath.patch.features import feature_identity
    from raypath.patch.methods import get_method

    try:
        return feature_identity(cfg.model, cfg.weights, cfg.patch_px, cfg.mpp).to_dict()
    except RaypathError:
        if any(getattr(get_method(m), "tuning", "fm") is not None for m in cfg.methods):
            raise
        return {"model": cfg.model, "weights": cfg.weights}


# --------------------------------------------------------------------------- one fit


def _fit_paths(run_dir: str, key: str) -> tuple[str, str]:
    return join(run_dir, "fits", f"{key}.json"), join(run_dir, "predictions", f"{key}.parquet")


def _checkpoint_dir(run_dir: str, key: str, results_key: str) -> str:
    """A fit's checkpoints, named by its results key too: a killed fit resumes only on the same inputs."""
    return join(run_dir, "checkpoints", f"{key}__{results_key}")


def _drop_stale_checkpoints(run_dir: str, key: str, results_key: str) -> None:
    """Checkpoints of ``key`` left by a killed run on other inputs or settings can never resume."""
    from raypath.io.storage import filesystem_for

    base = join(run_dir, "checkpoints")
    scheme = base.split("://", 1)[0] + "://" if is_remote(base) else ""
    for p in filesystem_for(base).glob(f"{strip_protocol(base).rstrip('/')}/{key}__*"):
        if not p.rstrip("/").endswith(f"__{results_key}"):
            _drop_checkpoints(scheme + p)


def execute_fit(job, run_dir: str, results_key: str) -> dict:
    """Run one fit, write its predictions and record; returns the record (no metrics yet)."""
    from raypath.patch.methods import get_method

    fit = job.fit
    t0 = time.perf_counter()
    res = get_method(fit.method).run(job)
    rows = []
    for name, r in fit.evals.items():
        p = res.probs[name]
        rows.append(pd.DataFrame({"eval": name, "row": r, **{f"p_{c}": p[:, i] for i, c in enumerate(job.classes)}}))
    pred = pd.concat(rows, ignore_index=True)
    rec_path, pred_path = _fit_paths(run_dir, fit.key)
    buf = pred.to_parquet(index=False)
    atomic_write_bytes(pred_path, buf)
    info = {k: v for k, v in res.info.items() if k != "history"}
    record = {"key": fit.key, "protocol": fit.protocol, "train_on": fit.train_on, "method": fit.method,
              "fraction": fit.fraction, "seed": fit.seed, "n_train": int(len(fit.train)), "n_val": int(len(fit.val)),
              "results_key": results_key, "fit_s": time.perf_counter() - t0, "info": info,
              "history": res.info.get("history", [])}
    from raypath.io.jsonio import to_jsonable

    atomic_write_bytes(rec_path, json.dumps(to_jsonable(record), indent=1).encode())
    _drop_checkpoints(_checkpoint_dir(run_dir, fit.key, results_key))
    return record


def _drop_checkpoints(ck: str) -> None:
    """A finished fit's checkpoints are not needed any more (its result is written)."""
    if not is_remote(ck):
        shutil.rmtree(strip_protocol(ck), ignore_errors=True)
        return
    from raypath.io.storage import filesystem_for

    fs = filesystem_for(ck)
    if fs.exists(ck):
        fs.rm(ck, recursive=True)


def _done(run_dir: str, key: str, results_key: str) -> dict | None:
    rec_path, pred_path = _fit_paths(run_dir, key)
    if not (exists(rec_path) and exists(pred_path)):
        return None
    with open_file(rec_path, "rb") as f:
        rec = json.loads(f.read().decode())
    return rec if rec.get("results_key") == results_key else None


# --------------------------------------------------------------------------- the benchmark


def prepare(cfg: PatchConfig, s3: S3Options | None = None) -> dict:
    """Table, split, patch cache, classes and (lazily) features: everything fits share."""
    from raypath.patch.images import Geometry, build_patch_cache, default_cache_dir, source_fingerprints
    from raypath.patch.protocols import assign_splits, check_training_counts

    table = load_patch_table(cfg, s3)
    source = source_name(cfg)
    split = assign_splits(table, cfg.test_fraction, cfg.val_fraction, cfg.split_seed, source=source)
    check_training_counts(table, split, cfg.min_per_class, source, cfg.split_seed)
    classes = sorted(table["label"].astype(str).unique())
    geom = Geometry(cfg.patch_px, cfg.mpp, cfg.shift_px)
    fps = source_fingerprints(table, s3)
    images = build_patch_cache(table, geom, cfg.cache_dir or default_cache_dir(cfg.workdir), s3, fingerprints=fps)
    y = np.array([classes.index(v) for v in table["label"].astype(str)], dtype=np.int64)
    positive = classes.index(cfg.positive_label) if cfg.positive_label in classes else None
    return {"table": table, "split": split, "classes": classes, "images": images, "y": y, "positive": positive,
            "fingerprints": fps}


def _features(cfg: PatchConfig, ctx: dict, s3: S3Options | None) -> np.ndarray:
    from raypath.patch.features import patch_features

    if "features" not in ctx:
        ctx["features"] = patch_features(ctx["table"], ctx["images"], cfg.workdir, cfg.model, cfg.weights,
                                         ctx["fingerprints"], device=cfg.device, batch_size=cfg.embed_batch, s3=s3)
    return ctx["features"]


def run_patch(cfg: PatchConfig, s3: S3Options | None = None) -> dict:
    """Run the benchmark (see the module doc); returns the headline summary."""
    from raypath.patch.methods import FitJob, get_method
    from raypath.patch.outputs import write_outputs
    from raypath.patch.protocols import plan_fits

    t0 = time.perf_counter()
    run_dir = cfg.run_dir()
    cfg.save(run_dir)
    ctx = prepare(cfg, s3)
    table, split = ctx["table"], ctx["split"]
    atomic_write_bytes(join(run_dir, "patches.parquet"), table.assign(split=split).to_parquet(index=False))
    fits = plan_fits(table, split, cfg.methods, cfg.protocols, cfg.fractions, cfg.seeds, cfg.domain_fractions,
                     cfg.min_per_class)
    rkey = cfg.results_key(inputs_digest(cfg, ctx))
    records, todo = [], []
    for fit in fits:
        rec = _done(run_dir, fit.key, rkey)
        (records.append(rec) if rec is not None else todo.append(fit))
    for fit in todo:
        _drop_stale_checkpoints(run_dir, fit.key, rkey)
    log.info("patch: %d fits planned, %d already done, %d to run", len(fits), len(records), len(todo))
    if cfg.stop_after_fits is not None:
        todo = todo[: cfg.stop_after_fits]
    needs_features = any(get_method(f.method).inputs == "features" for f in todo)
    feats = _features(cfg, ctx, s3) if needs_features else None
    jobs = [FitJob(fit=f, y=ctx["y"], classes=ctx["classes"], positive=ctx["positive"], cfg=cfg,
                   features=feats if get_method(f.method).inputs == "features" else None,
                   images_folder=ctx["images"].folder, checkpoint_dir=_checkpoint_dir(run_dir, f.key, rkey),
                   storage=join(run_dir, "ray_train", rkey)) for f in todo]
    records += _run_jobs(jobs, cfg, run_dir, rkey)
    if cfg.stop_after_fits is not None and len(records) < len(fits):
        return {"stopped": True, "fits_done": len(records), "fits_planned": len(fits)}
    doc = write_outputs(cfg, run_dir, ctx, fits, records, time.perf_counter() - t0, s3)
    from raypath.report.tracking import track_patch

    track_patch(cfg, run_dir, doc)  # MLflow run, from the driver (RAYPATH_TRACKING=off to skip)
    return doc


def _run_jobs(jobs: list, cfg: PatchConfig, run_dir: str, rkey: str) -> list[dict]:
    from raypath.io.progress import Progress

    if cfg.executor == "local" or not jobs:
        out = []
        with Progress("patch", len(jobs), "fits") as progress:
            for i, job in enumerate(jobs):
                log.info("patch: fit %d/%d %s", i + 1, len(jobs), job.fit.key)
                out.append(execute_fit(job, run_dir, rkey))
                progress.update(note=job.fit.key)
        return out
    import ray

    from raypath.io.ray_env import ensure_ray

    ensure_ray()
    feats = next((j.features for j in jobs if j.features is not None), None)
    fref = ray.put(feats) if feats is not None else None
    task = ray.remote(num_cpus=cfg.fit_cpus, num_gpus=cfg.fit_gpus, max_retries=1)(_ray_fit)
    refs = []
    for job in jobs:
        uses = job.features is not None
        job.features = None
        refs.append(task.remote(job, fref if uses else None, run_dir, rkey))
    results: list = [None] * len(refs)
    pending = {r: i for i, r in enumerate(refs)}
    with Progress("patch", len(refs), "fits") as progress:  # one line as fits finish, in any order
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for r in done:
                results[pending.pop(r)] = ray.get(r)
                progress.update()
    return results


def _ray_fit(job, features, run_dir: str, rkey: str) -> dict:
    if features is not None:
        job.features = features
    job.cfg = job.cfg.model_copy(update={"executor": "local"})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return execute_fit(job, run_dir, rkey)
