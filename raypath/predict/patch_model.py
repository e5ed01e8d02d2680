"""A saved patch classifier: a probe on frozen-FM features, applied tile by tile.

Written by ``raypath patch --final`` (:mod:`raypath.patch.final`), read by
``raypath predict`` (:mod:`raypath.predict.tiles`).  Layout of
``<workdir>/models/<name>/`` (local or ``s3://``)::

    head.safetensors   the probe: linear -> ``weight`` [K or 1, D], ``bias``;
                       knn -> ``train_features`` [N, D] (centred, L2-normalised),
                       ``train_labels`` [N], ``mean`` [D]
    model.json         kind "patch", method, class names, the positive class,
                       the feature identity the probe was trained on (model,
                       weights sha256, prompts, preprocessing, tiling = the
                       patch side and mpp), the patients and slides it was
                       trained on, the patch config

:meth:`PatchModel.predict_proba` computes exactly what the benchmark's probe
(:mod:`raypath.patch.methods`) computes on the same features: logistic
regression's sigmoid (two classes) or softmax, or the k-neighbour vote.
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
#: Probe methods a patch model can hold (fine-tuned methods change the FM itself: not tile features).
PROBES = ("linear", "knn")
_TENSORS = {"linear": ("weight", "bias"), "knn": ("train_features", "train_labels", "mean")}


def model_kind(model_dir: str) -> str:
    """``"patch"`` or ``"mil"`` (a model.json without ``kind`` was written by ``raypath mil --final``)."""
    uri = join(model_dir, META_FILE)
    if not exists(uri):
        return "mil"  # load_final_model says what is missing
    try:
        with open_file(uri, "rb") as f:
            doc = json.load(f)
    except ValueError:
        return "mil"
    return str(doc.get("kind") or "mil") if isinstance(doc, dict) else "mil"


@dataclass
class PatchModel:
    """The metadata (``model.json``) of a saved patch probe plus, once loaded, its tensors."""

    method: str
    classes: list[str]
    in_dim: int
    positive: str | None = None
    k: int | None = None  # knn: neighbours
    identity: dict = field(default_factory=dict)  # raypath.embed.identity.FeatureIdentity.to_dict()
    feature_dir: str | None = None
    trained_patients: list[str] = field(default_factory=list)
    trained_slides: list[str] = field(default_factory=list)
    n_patches: int = 0
    config: dict = field(default_factory=dict)
    kind: str = "patch"
    format: int = FORMAT
    tensors: dict = field(default_factory=dict, repr=False)  # not in model.json

    @property
    def positive_class(self) -> str:
        """The class whose probability the maps show (the config's positive class, else the last class)."""
        return self.positive if self.positive in self.classes else self.classes[-1]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``[n, K]`` class probabilities of features ``x`` [n, D] (columns in :attr:`classes` order)."""
        if self.method == "knn":  # float32 as the benchmark's probe computes it
            return self._knn(np.asarray(x, dtype=np.float32).reshape(-1, self.in_dim))
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.in_dim)
        if self.method == "linear":
            z = x @ self.tensors["weight"].T + self.tensors["bias"]
            if z.shape[1] == 1:  # two classes: one logit for the second class, as scikit-learn
                p = 1.0 / (1.0 + np.exp(-z[:, 0]))
                return np.stack([1.0 - p, p], axis=1)
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        raise RaypathError(f"patch model method {self.method!r} is not one of {PROBES}")

    def _knn(self, x: np.ndarray) -> np.ndarray:
        from sklearn.neighbors import KNeighborsClassifier

        if "_knn" not in self.tensors:  # the benchmark's classifier, rebuilt from the stored training features
            labels = self.tensors["train_labels"].astype(np.int64)
            clf = KNeighborsClassifier(n_neighbors=int(self.k or 1)).fit(self.tensors["train_features"], labels)
            self.tensors["_knn"] = clf
        clf = self.tensors["_knn"]
        a = x - self.tensors["mean"]
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        out = np.zeros((len(x), len(self.classes)))
        out[:, clf.classes_] = clf.predict_proba(a)
        return out

    def meta_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tensors"}


def save_patch_model(model_dir: str, model: PatchModel) -> str:
    """Write ``head.safetensors`` and ``model.json`` under ``model_dir``."""
    import torch
    from safetensors.torch import save

    missing = [n for n in _TENSORS[model.method] if n not in model.tensors]
    if missing:
        raise ValueError(f"patch model ({model.method}) lacks tensors {missing}")
    tensors = {n: torch.from_numpy(np.ascontiguousarray(model.tensors[n])) for n in _TENSORS[model.method]}
    atomic_write_bytes(join(model_dir, WEIGHTS_FILE), save(tensors))
    atomic_write_bytes(join(model_dir, META_FILE), json.dumps(to_jsonable(model.meta_dict()), indent=2).encode())
    return model_dir


def load_patch_model(model_dir: str) -> PatchModel:
    """The :class:`PatchModel` saved at ``model_dir`` with its tensors (numpy)."""
    from safetensors.torch import load

    damaged = f"{model_dir!r} holds a damaged or incomplete saved patch model"
    remedy = "save it again with `raypath patch --final`"
    try:
        with open_file(join(model_dir, META_FILE), "rb") as f:
            doc: dict[str, Any] = json.load(f)
        known = set(PatchModel.__dataclass_fields__) - {"tensors"}
        model = PatchModel(**{k: v for k, v in doc.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise RaypathError(f"{damaged} ({META_FILE}: {e}): {remedy}") from None
    if model.format > FORMAT:
        raise RaypathError(f"{model_dir!r} was written by a newer raypath (format {model.format}): upgrade raypath")
    if model.method not in PROBES or not model.classes:
        raise RaypathError(f"{damaged} (method {model.method!r}, classes {model.classes}): {remedy}")
    try:
        with open_file(join(model_dir, WEIGHTS_FILE), "rb") as f:
            tensors = {k: v.numpy() for k, v in load(f.read()).items()}
        if any(n not in tensors for n in _TENSORS[model.method]):
            raise ValueError(f"expected tensors {list(_TENSORS[model.method])}, found {sorted(tensors)}")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise RaypathError(f"{damaged} ({WEIGHTS_FILE}: {str(e).splitlines()[0][:160]}): {remedy}") from None
    model.tensors = tensors
    return model
