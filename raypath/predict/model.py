"""A saved final model: everything needed to apply a trained MIL head to new slides.

Layout of ``<workdir>/models/<name>/`` (local or ``s3://``)::

    head.safetensors   the head's weights
    model.json         head config (name, in_dim, out_dim, kwargs), task, loss,
                       class names, the feature-store identity it was trained on,
                       risk-group cut-offs from the training data, the patients
                       and slides it was trained on, the MIL config
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from raypath.errors import RaypathError
from raypath.io.jsonio import to_jsonable
from raypath.io.storage import atomic_write_bytes, exists, join, open_file

WEIGHTS_FILE = "head.safetensors"
META_FILE = "model.json"
FORMAT = 1


@dataclass
class FinalModel:
    """The metadata of a saved head (``model.json``) plus, once loaded, the module."""

    task: str
    loss: str
    head: str
    in_dim: int
    out_dim: int
    head_kwargs: dict = field(default_factory=dict)
    classes: list[str] | None = None
    identity: dict = field(default_factory=dict)  # raypath.embed.identity.FeatureIdentity.to_dict()
    feature_dir: str | None = None
    risk_quantiles: list[float] = field(default_factory=lambda: [0.5])
    cutoffs: list[float] = field(default_factory=list)
    trained_patients: list[str] = field(default_factory=list)
    trained_slides: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    format: int = FORMAT

    def build(self):
        """A fresh head module of this architecture (weights not loaded)."""
        from raypath.mil.models import build_model

        return build_model(self.head, self.in_dim, self.out_dim, **self.head_kwargs)

    def objective(self):
        """The objective whose ``score`` maps the head's output to a risk or class probabilities."""
        from raypath.mil.losses import make_objective

        n_bins = self.out_dim if self.loss == "nll" else self.config.get("n_bins", 4)
        n_classes = len(self.classes) if self.classes else 2
        return make_objective(self.loss, self.task, n_classes=n_classes, n_bins=n_bins)

    def risk_group(self, risk: np.ndarray) -> np.ndarray:
        """Group names from the training cut-offs: ``low``/``high`` for one cut-off,
        ``q1``..``qK`` for several (``q1`` = lowest risk)."""
        idx = np.searchsorted(np.asarray(self.cutoffs, dtype=float), np.asarray(risk, dtype=float), side="right")
        if len(self.cutoffs) == 1:
            return np.where(idx > 0, "high", "low")
        return np.array([f"q{i + 1}" for i in idx])


def save_final_model(model_dir: str, meta: FinalModel, state_dict: dict) -> str:
    """Write ``head.safetensors`` and ``model.json`` under ``model_dir``."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(join(model_dir, WEIGHTS_FILE), save(tensors))
    atomic_write_bytes(join(model_dir, META_FILE), json.dumps(to_jsonable(asdict(meta)), indent=2).encode())
    return model_dir


def load_final_model(model_dir: str):
    """``(FinalModel, torch module in eval mode)`` from a folder written by :func:`save_final_model`."""
    from safetensors.torch import load

    meta_uri, weights_uri = join(model_dir, META_FILE), join(model_dir, WEIGHTS_FILE)
    if not exists(meta_uri) or not exists(weights_uri):
        raise RaypathError(
            f"{model_dir!r} is not a saved raypath model (no {META_FILE} / {WEIGHTS_FILE}): train one with "
            "`raypath mil --final --workdir W --features F` (a patch classifier with `raypath patch --final`)"
        )
    damaged = f"{model_dir!r} holds a damaged or incomplete saved model"
    remedy = "save it again with `raypath mil --final`"
    try:
        with open_file(meta_uri, "rb") as f:
            doc: dict[str, Any] = json.load(f)
        known = set(FinalModel.__dataclass_fields__)
        meta = FinalModel(**{k: v for k, v in doc.items() if k in known})
    except (ValueError, TypeError, AttributeError) as e:
        raise RaypathError(f"{damaged} ({META_FILE}: {e}): {remedy}") from None
    if meta.format > FORMAT:
        raise RaypathError(f"{model_dir!r} was written by a newer raypath (format {meta.format}): upgrade raypath")
    module = meta.build()
    try:
        with open_file(weights_uri, "rb") as f:
            module.load_state_dict(load(f.read()))
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise several types for a bad file
        raise RaypathError(f"{damaged} ({WEIGHTS_FILE} does not fit {meta.head} {meta.in_dim}->{meta.out_dim}: "
                           f"{str(e).splitlines()[0][:160]}): {remedy}") from None
    module.eval()
    return meta, module
