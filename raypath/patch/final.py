"""``raypath patch --final``: one patch classifier fitted on every labelled patch, saved for ``raypath predict``.

The benchmark scores methods inside protocols and keeps no classifier; once
a method and its settings are chosen (from a run or a sweep's best config),
:func:`fit_final_patch` fits that method once on *all* patches of the
config's source (every domain, every split) and saves it to
``<workdir>/models/<name>/`` (:mod:`raypath.predict.patch_model`): the probe,
its class names and positive class, the feature identity of the patches it
was trained on (model, weights sha256, prompts, preprocessing, and as its
tiling the patch side ``patch_px`` at ``mpp``), the patients and slides it
saw, and the config.  ``raypath predict --model <folder>`` then classifies
every tile of a workdir whose features share that identity (tiles of
``patch_px`` at ``mpp``, the same FM and weights).

Probes only (``linear``, ``knn``): they act on frozen-FM features, so a
slide's tile features can be classified as they are.  The fine-tuned methods
change the FM itself and are not saved as final models.
"""

from __future__ import annotations

import logging

import numpy as np

from raypath.errors import RaypathError
from raypath.io.storage import join
from raypath.predict.patch_model import PROBES, PatchModel, save_patch_model

log = logging.getLogger(__name__)


def _method(cfg) -> str:
    if len(cfg.methods) != 1 or cfg.methods[0] not in PROBES:
        raise RaypathError(
            f"patch --final fits one probe on frozen features, but --methods is {cfg.methods}: pass "
            "--methods linear (or --methods knn); fine-tuned methods are not saved as final models")
    return cfg.methods[0]


def _check_labels(ctx: dict, min_per_class: int) -> None:
    counts = np.bincount(ctx["y"], minlength=len(ctx["classes"]))
    if len(ctx["classes"]) < 2 or counts.min() < min_per_class:
        have = ", ".join(f"{c}: {n}" for c, n in zip(ctx["classes"], counts))
        raise RaypathError(f"patch --final needs two or more classes with at least {min_per_class} patches each "
                           f"(the patch table has {have or 'none'}): add labelled patches or lower --min-per-class")


def fit_probe(method: str, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> dict:
    """The probe's tensors, fitted on every row with the benchmark's settings
    (:class:`raypath.patch.methods.LinearProbe` / ``KnnProbe``)."""
    if method == "linear":
        from sklearn.linear_model import LogisticRegression

        c = x.shape[1] * n_classes / 100.0
        clf = LogisticRegression(C=c, max_iter=1000, solver="lbfgs", random_state=seed).fit(x, y)
        return {"weight": clf.coef_.astype(np.float64), "bias": clf.intercept_.astype(np.float64)}
    from raypath.patch.methods import KnnProbe

    mean = x.mean(axis=0)
    a = x - mean
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    k = min(KnnProbe().k, len(x))
    return {"train_features": a.astype(np.float32), "train_labels": y.astype(np.int64),
            "mean": mean.astype(np.float32), "k": k}


def _identity(cfg) -> tuple[dict, str]:
    """(feature identity of the patch features, their store folder)."""
    from raypath.embed.identity import store_identity
    from raypath.patch.features import feature_dir, feature_identity

    ident = feature_identity(cfg.model, cfg.weights, cfg.patch_px, cfg.mpp)
    folder = feature_dir(cfg.workdir, ident)
    stored = store_identity(folder)
    return (stored or ident).to_dict(), folder


def _prepare(cfg, s3) -> dict:
    """What :func:`raypath.patch.api.prepare` builds, without the patient split (a final fit uses every patch)."""
    from raypath.patch.api import load_patch_table
    from raypath.patch.images import Geometry, build_patch_cache, default_cache_dir, source_fingerprints

    table = load_patch_table(cfg, s3)
    classes = sorted(table["label"].astype(str).unique())
    fps = source_fingerprints(table, s3)
    images = build_patch_cache(table, Geometry(cfg.patch_px, cfg.mpp, cfg.shift_px),
                               cfg.cache_dir or default_cache_dir(cfg.workdir), s3, fingerprints=fps)
    y = np.array([classes.index(v) for v in table["label"].astype(str)], dtype=np.int64)
    return {"table": table, "classes": classes, "images": images, "y": y, "fingerprints": fps}


def fit_final_patch(cfg, name: str | None = None, s3=None) -> str:
    """Fit ``cfg``'s one probe method on every patch and save it to
    ``<workdir>/models/<name>/`` (default ``<run>-final``); returns that folder."""
    from raypath.patch.api import _features

    method = _method(cfg)
    ctx = _prepare(cfg, s3)
    _check_labels(ctx, cfg.min_per_class)
    x = _features(cfg, ctx, s3)
    seed = int(cfg.seeds[0]) if cfg.seeds else 0
    tensors = fit_probe(method, x, ctx["y"], len(ctx["classes"]), seed)
    identity, folder = _identity(cfg)
    table = ctx["table"]
    model = PatchModel(
        method=method, classes=[str(c) for c in ctx["classes"]], in_dim=int(x.shape[1]),
        positive=cfg.positive_label if cfg.positive_label in ctx["classes"] else None,
        k=tensors.pop("k", None), identity=identity, feature_dir=folder,
        trained_patients=sorted(table["patient_id"].astype(str).unique().tolist()),
        trained_slides=sorted(table["slide_id"].astype(str).unique().tolist()),
        n_patches=int(len(table)), config={**cfg.to_dict(), "seed": seed}, tensors=tensors)
    model_dir = join(cfg.workdir, "models", name or f"{cfg.run}-final")
    save_patch_model(model_dir, model)
    log.info("final patch model (%s, %d patches, %d patients) saved to %s", method, len(table),
             len(model.trained_patients), model_dir)
    return model_dir
