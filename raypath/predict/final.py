"""Final models: one MIL head fitted on every eligible slide with a chosen config.

``raypath mil --final`` (or :func:`fit_final`) trains the head with the same
loop, objective and seeds as the protocols (``raypath.mil.train.fit_split``
on one split whose training set is every slide), then saves it with what
``raypath predict`` needs (:mod:`raypath.predict.model`): the feature-store
identity, risk-group cut-offs from the training data, the training patients
and the class names.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import join
from raypath.predict.model import FinalModel, save_final_model

log = logging.getLogger(__name__)


def _training_data(cfg):
    """Feature folder, store and the validated clinical table of a MIL config."""
    from raypath.embed.identity import check_store
    from raypath.embed.store import FeatureStore
    from raypath.mil.api import load_clinical, resolve_feature_dir
    from raypath.mil.protocols import validate_clinical

    if not cfg.workdir or not cfg.features:
        raise RaypathError("mil --final needs --workdir (the project folder) and --features (a feature folder)")
    feature_dir = resolve_feature_dir(cfg)
    store = FeatureStore(feature_dir)
    clinical = load_clinical(cfg, store.slide_ids())
    check_store(feature_dir, slides=clinical)
    return feature_dir, store, validate_clinical(clinical, cfg.task)


def _fit(cfg, store, clinical: pd.DataFrame):
    """Train one head on all rows; returns ``(module state, training scores, objective, in_dim)``."""
    from raypath.evaluation.splits import Split
    from raypath.mil.data import load_bag_arrays
    from raypath.mil.protocols import params_from_config
    from raypath.mil.train import LocalContext, SplitData, fit_split

    params = params_from_config(cfg)
    if cfg.task == "classification":
        params.n_classes = int(clinical["label_index"].max()) + 1
    rows = np.arange(len(clinical), dtype=np.int64)
    split = Split("final", 0, 0, "all", train=rows, internal=rows, seed=cfg.seed)
    bags = load_bag_arrays(store, clinical["slide_id"].astype(str).tolist())
    data = SplitData.from_clinical(clinical, cfg.task)
    ctx = LocalContext()
    ctx.configure(device=params.device, amp=params.amp)
    last: dict = {}

    def keep(epoch: int, metrics: dict, st: dict) -> None:
        last["model"] = st["current"]["model"]

    result = fit_split(ctx, bags, data, split, params, on_epoch=keep)
    if "model" not in last:
        raise RaypathError("mil --final needs --epochs >= 1")
    in_dim = int(next(iter(bags.values())).shape[1])
    return last["model"], np.asarray(result["scores"]), params, in_dim


def _cutoffs(clinical: pd.DataFrame, scores: np.ndarray, task: str, quantiles: list[float]) -> list[float]:
    """Risk cut-offs: quantiles of the training patients' mean risk (survival only)."""
    if task != "survival":
        return []
    per_patient = pd.Series(scores.reshape(-1)).groupby(clinical["patient_id"].astype(str).to_numpy()).mean()
    return [float(np.quantile(per_patient.to_numpy(), q)) for q in quantiles]


def fit_final(cfg, name: str | None = None, risk_quantiles: list[float] | None = None) -> str:
    """Fit one head on every eligible slide of ``cfg`` and save it to
    ``<workdir>/models/<name>/``; returns that folder.

    ``risk_quantiles``: where the risk groups are cut, as quantiles of the
    training patients' risk (default the median: low / high).
    """
    from raypath.embed.identity import store_identity

    quantiles = sorted(risk_quantiles or [0.5])
    if any(not 0 < q < 1 for q in quantiles):
        raise RaypathError(f"--risk-quantiles {quantiles} must lie strictly between 0 and 1 (e.g. 0.5)")
    feature_dir, store, clinical = _training_data(cfg)
    state, _scores, params, in_dim = _fit(cfg, store, clinical)
    ident = store_identity(feature_dir)
    classes = sorted(clinical["label"].unique().tolist(), key=str) if cfg.task == "classification" else None
    meta = FinalModel(
        task=cfg.task, loss=params.loss, head=params.model, in_dim=in_dim,
        out_dim=_out_dim(params, clinical, cfg.task),
        head_kwargs=dict(params.model_kwargs), classes=[str(c) for c in classes] if classes else None,
        identity=ident.to_dict() if ident is not None else {}, feature_dir=feature_dir,
        risk_quantiles=quantiles, cutoffs=[],
        trained_patients=sorted(clinical["patient_id"].astype(str).unique().tolist()),
        trained_slides=clinical["slide_id"].astype(str).tolist(),
        config=cfg.to_dict() if hasattr(cfg, "to_dict") else cfg.model_dump(),
    )
    if cfg.task == "survival":  # cut-offs on the scale predict uses: every tile, fp32 (not the training subsample)
        from raypath.predict.api import score_slides

        pred, _ = score_slides(meta, state, feature_dir, meta.trained_slides)
        meta.cutoffs = _cutoffs(clinical, pred["risk"].to_numpy(), cfg.task, quantiles)
    model_dir = join(cfg.workdir, "models", name or f"{cfg.run_name()}-final")
    save_final_model(model_dir, meta, state)
    log.info("final model (%d slides, %d patients) saved to %s", len(clinical), len(meta.trained_patients), model_dir)
    return model_dir


def _out_dim(params, clinical: pd.DataFrame, task: str) -> int:
    """The head's output size, as the objective of the training run decided it."""
    from raypath.mil.losses import make_objective

    n_classes = int(clinical["label_index"].max()) + 1 if task == "classification" else 2
    if task == "survival" and params.loss == "nll":
        from raypath.mil.losses import make_time_bins

        edges = make_time_bins(clinical["time"].to_numpy(float), clinical["event"].to_numpy(int), params.n_bins)
        return len(edges) - 1
    return make_objective(params.loss, task, n_classes=n_classes, n_bins=params.n_bins).out_dim
