"""The one training layer of raypath (adapt, mil, pretrain, patch use it).

- :mod:`raypath.train.precision`: the device/precision resolver behind every ``--amp``;
- :mod:`raypath.train.context`: :func:`current_context` and the local / Ray Train /
  Ray Tune contexts (device, precision, DDP, metrics, checkpoints, resume);
- :mod:`raypath.train.checkpoint`: checkpoint folders, adapter-only or full model state;
- :mod:`raypath.train.launch`: :func:`fit_on_ray_train`, the driver side of Ray Train.

See docs/ARCHITECTURE.md, section "Training context".
"""

from raypath.train.checkpoint import load_module_state, load_state, module_state, save_state
from raypath.train.context import (
    LocalContext,
    RayTrainContext,
    SimulatedKill,
    TrainContext,
    TuneContext,
    current_context,
)
from raypath.train.precision import AMP_HELP, AMP_MODES, Precision, resolve_device, resolve_precision

__all__ = [
    "AMP_HELP", "AMP_MODES", "LocalContext", "Precision", "RayTrainContext", "SimulatedKill", "TrainContext",
    "TuneContext", "current_context", "load_module_state", "load_state", "module_state", "resolve_device",
    "resolve_precision", "save_state",
]
