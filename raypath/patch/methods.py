"""The methods of the patch benchmark: a registry of method name -> trainer.

A method is an object with a ``name``, a one-line ``description``, what it
consumes (``inputs``: ``"features"`` = cached frozen-FM features, or
``"images"`` = patch pixels) and ``run(job) -> FitResult``: train on
``job.fit.train`` (early-stop on ``job.fit.val``) and return class
probabilities for every evaluation set in ``job.fit.evals``.

Built in:

==============  ========  ===============================================================
name            inputs    what
==============  ========  ===============================================================
``linear``      features  logistic regression (L-BFGS, 1,000 iterations, C = dim x classes / 100, UNI's probe)
``knn``         features  k-nearest neighbours (k = 20, centred + L2-normalised features: UNI's kNN probe)
``lora``        images    LoRA r 16, alpha 16, dropout .1 on the tuning layer's targets + a linear head
``dora``        images    DoRA, same settings
``full``        images    every FM weight + head
``e2e-resnet``  images    a ResNet trained from scratch (ResNet-50 in ``full`` size)
``e2e-vit``     images    a ViT trained from scratch (ViT-S/16 in ``full`` size)
==============  ========  ===============================================================

Add one with :func:`register_method` (e.g. PathoTune's prompt tuning):
the benchmark, the CLI's ``--methods`` and the sweep's ``method`` choices
pick it up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from raypath.errors import RaypathError
from raypath.patch.protocols import Fit


@dataclass
class FitJob:
    """What a method gets for one fit."""

    fit: Fit
    y: np.ndarray  # class index of every patch
    classes: list[str]
    positive: int | None
    cfg: Any  # the PatchConfig
    features: np.ndarray | None = None  # frozen-FM features of every patch (feature methods)
    images_folder: str | None = None  # the patch cache (image methods)
    checkpoint_dir: str | None = None
    storage: str | None = None  # Ray Train run storage


@dataclass
class FitResult:
    probs: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)


class Method(Protocol):
    name: str
    description: str
    inputs: str

    def run(self, job: FitJob) -> FitResult: ...


METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace`` to override a built-in)."""
    if method.name in METHODS and not replace:
        raise ValueError(f"patch method {method.name!r} is already registered")
    if method.inputs not in ("features", "images"):
        raise ValueError(f"patch method {method.name!r}: inputs must be 'features' or 'images'")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise RaypathError(f"unknown patch method {name!r}: choose from {', '.join(METHODS)}") from None


def _full_probs(p: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(p), k))
    out[:, seen] = p
    return out


def _check_classes(job: FitJob) -> None:
    present = np.unique(job.y[job.fit.train])
    if len(present) < 2:
        raise RaypathError(f"fit {job.fit.key}: its training patches hold one class only; "
                           "raise the fraction or check the domain's labels")


@dataclass
class LinearProbe:
    name: str = "linear"
    description: str = "logistic regression on frozen features (L-BFGS, 1000 iters, C = dim x classes / 100)"
    inputs: str = "features"

    def run(self, job: FitJob) -> FitResult:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        _check_classes(job)
        x = job.features
        k = len(job.classes)
        c = x.shape[1] * k / 100.0
        clf = LogisticRegression(C=c, max_iter=1000, solver="lbfgs", random_state=job.fit.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x[job.fit.train], job.y[job.fit.train])
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        probs = {n: _full_probs(clf.predict_proba(x[r]), clf.classes_, k) for n, r in job.fit.evals.items()}
        return FitResult(probs, {"C": c, "converged": converged, "iterations": int(np.max(clf.n_iter_))})


@dataclass
class KnnProbe:
    name: str = "knn"
    description: str = "k-nearest-neighbour vote (k = 20) on centred, L2-normalised frozen features"
    inputs: str = "features"
    k: int = 20

    def run(self, job: FitJob) -> FitResult:
        from sklearn.neighbors import KNeighborsClassifier

        _check_classes(job)
        x = job.features
        mean = x[job.fit.train].mean(axis=0)

        def norm(a: np.ndarray) -> np.ndarray:
            a = a - mean
            return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

        k = min(self.k, len(job.fit.train))
        clf = KNeighborsClassifier(n_neighbors=k).fit(norm(x[job.fit.train]), job.y[job.fit.train])
        n_cls = len(job.classes)
        probs = {n: _full_probs(clf.predict_proba(norm(x[r])), clf.classes_, n_cls) for n, r in job.fit.evals.items()}
        return FitResult(probs, {"k": k})


@dataclass
class FineTune:
    """A method trained on patch pixels by :func:`raypath.patch.finetune.train_fit`."""

    name: str
    description: str
    tuning: str | None  # tuning-layer method on the run's FM; None = end-to-end baseline
    inputs: str = "images"

    def spec(self, job: FitJob):
        from raypath.patch.finetune import TrainSpec

        cfg, fit = job.cfg, job.fit
        return TrainSpec(
            method=self.name, tuning=self.tuning, model=cfg.model, weights=cfg.weights,
            cache_folder=job.images_folder, y=job.y, train=fit.train, val=fit.val, evals=fit.evals,
            n_classes=len(job.classes), positive=job.positive, seed=fit.seed,
            patch_px=cfg.patch_px, shift_px=cfg.shift_px, e2e_size=cfg.resolved_e2e_size(),
            rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.target_modules, lr=cfg.lr,
            batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, patience=cfg.patience,
            pseudo_epoch=cfg.pseudo_epoch, positive_share=cfg.positive_share, device=cfg.device, amp=cfg.amp,
            checkpoint_dir=job.checkpoint_dir, kill_at_step=cfg.kill_at_step,
        )

    def run(self, job: FitJob) -> FitResult:
        from raypath.patch.finetune import run_finetune

        _check_classes(job)
        out = run_finetune(self.spec(job), job.cfg.train_workers, job.storage, name=job.fit.key)
        probs = out.pop("probs")
        return FitResult(probs, out)


@dataclass
class PromptTune(FineTune):
    """PathoTune (:mod:`raypath.fm.pathotune`) on the run's FM: one ablation (tvp, tvp+ttp, tvp+ttp+ivp)
    with the PatchConfig's prompt flags (``--prompt-tokens``, ``--prompt-depth``, ``--prompt-template``,
    ``--prompt-fill``, ``--text-tokens``, ``--instance-tokens`` ...), ``--prompt-optimizer`` (RAdam) at
    ``--prompt-lr-scale`` (10) x ``--lr`` (prompts need larger steps than weights, as in VPT); the trained
    prompts are written to ``<run>/prompts/<fit>.safetensors``."""

    ablation: str = "tvp+ttp+ivp"

    def spec(self, job: FitJob):
        import os

        from raypath.fm.pathotune import PathoTuneConfig

        s = super().spec(job)
        cfg = PathoTuneConfig.ablation(self.ablation, **pathotune_options(job.cfg)).check()
        s.extra = {"pathotune": {**cfg.__dict__}, "optimizer": job.cfg.prompt_optimizer}
        if job.checkpoint_dir and "://" not in job.checkpoint_dir:  # <run>/checkpoints/<fit>__<results key>
            run_dir = os.path.dirname(os.path.dirname(job.checkpoint_dir.rstrip("/")))
            s.extra["prompts_out"] = os.path.join(run_dir, "prompts", f"{job.fit.key}.safetensors")
        s.lr = job.cfg.lr * job.cfg.prompt_lr_scale
        return s


def pathotune_options(cfg) -> dict:
    """:class:`~raypath.fm.pathotune.PathoTuneConfig` fields from a PatchConfig's prompt flags
    (the ablation of the method decides TVP/TTP/IVP on or off)."""
    return dict(n_tokens=cfg.prompt_tokens, depth=cfg.prompt_depth, template=cfg.prompt_template,
                fill=dict(cfg.prompt_fill), text_tokens=cfg.text_tokens, text_encoder=cfg.text_encoder,
                instance_tokens=cfg.instance_tokens, refine_hidden=cfg.refine_hidden, optimizer=cfg.prompt_optimizer)


for _m in (
    LinearProbe(),
    KnnProbe(),
    FineTune("lora", "LoRA (r 16, alpha 16, dropout .1) on the FM + linear head", "lora"),
    FineTune("dora", "DoRA (r 16, alpha 16, dropout .1) on the FM + linear head", "dora"),
    FineTune("full", "full fine-tuning of the FM + linear head", "full"),
    FineTune("e2e-resnet", "ResNet trained end to end from scratch", None),
    FineTune("e2e-vit", "ViT trained end to end from scratch", None),
    PromptTune("pathotune-tvp", "PathoTune TVP only: N (--prompt-tokens, 10) deep visual prompts per block + head (RAdam)", "pathotune",
               ablation="tvp"),
    PromptTune("pathotune-tvp-ttp", "PathoTune TVP + TTP (projected frozen MiniLM text token) + head", "pathotune",
               ablation="tvp+ttp"),
    PromptTune("pathotune", "PathoTune TVP + TTP + IVP (M = --instance-tokens instance prompts from a visual refine module) + head",
               "pathotune", ablation="tvp+ttp+ivp"),
):
    register_method(_m)
