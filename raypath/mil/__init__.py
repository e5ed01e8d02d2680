"""Attention-based multiple-instance learning (ABMIL) on slide features:
survival and classification heads, losses, protocols (internal CV,
leave-one-dataset-out, pairwise), metrics and the ``raypath mil`` verb.

Import the API from :mod:`raypath.mil.api` (``MilConfig``, ``run_mil``) and
the sweep objective from :mod:`raypath.mil.protocols` (``evaluate_lodo``).
"""

from __future__ import annotations

__all__ = ["MilConfig", "MilResult", "run_mil", "evaluate_lodo"]


def __getattr__(name: str):
    # lazy: importing raypath.mil must not import torch/sksurv
    if name in ("MilConfig", "MilResult", "run_mil"):
        from raypath.mil import api

        return getattr(api, name)
    if name == "evaluate_lodo":
        from raypath.mil.protocols import evaluate_lodo

        return evaluate_lodo
    raise AttributeError(name)
