"""The one device and precision resolver of raypath.

Every stage that runs a model (``adapt``, ``mil``, ``pretrain``, the patch
stage, ``embed``) asks :func:`resolve_device` for a device and
:func:`resolve_precision` for its numeric precision, so a given ``--amp``
value means the same thing everywhere:

=========  ==========================  ============================  ===========
``--amp``  CUDA GPU with bf16          CUDA GPU without bf16 (<sm80)  CPU
=========  ==========================  ============================  ===========
auto       bf16 autocast               fp16 autocast + GradScaler    fp32
bf16       bf16 autocast               error (names ``--amp fp16``)  fp32
fp16       fp16 autocast + GradScaler  fp16 autocast + GradScaler    fp32
off        fp32                        fp32                          fp32
=========  ==========================  ============================  ===========

On the CPU everything runs in fp32: CPU autocast is slower than fp32 on the
machines raypath targets and would change the results of the tests and the
demo, which must not depend on the machine.  Weights and optimiser state stay
fp32 in every mode (autocast casts per op); the GradScaler protects fp16
gradients from underflow, bf16 has fp32's range and needs none.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from raypath.errors import RaypathError

log = logging.getLogger(__name__)

#: Values of the ``--amp`` option of every verb that trains.
AmpMode = Literal["auto", "bf16", "fp16", "off"]
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
#: One help string for every verb's ``--amp`` flag.
AMP_HELP = (
    "mixed precision on GPU: auto = bf16 where the GPU supports it, else fp16 with gradient scaling; "
    "bf16; fp16 (+ GradScaler); off = fp32.  The CPU always runs fp32"
)


def resolve_device(wanted: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything
    else is taken as a torch device name (``"cpu"``, ``"cuda:1"``).

    Raises
    ------
    RaypathError
        A CUDA device was asked for on a machine without one.
    """
    if isinstance(wanted, torch.device):
        return wanted
    name = str(wanted or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RaypathError(f"device {wanted!r} is not a torch device: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RaypathError(f"device {wanted!r} was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return dev


def gpu_supports_bf16(device: torch.device) -> bool:
    """bf16 tensor-core support of a CUDA device (Ampere, sm_80, and newer)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what autocast does and whether gradients are scaled.

    Attributes
    ----------
    device
        The device the model runs on.
    name
        ``"bf16"``, ``"fp16"`` or ``"fp32"`` (what actually runs).
    dtype
        The autocast dtype, or ``None`` for plain fp32.
    """

    device: torch.device
    name: str
    dtype: torch.dtype | None

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 gradients need loss scaling; bf16 and fp32 do not."""
        return self.dtype is torch.float16

    def autocast(self):
        """A context manager running the forward pass at this precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """A fresh GradScaler for fp16, ``None`` otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.uses_grad_scaler else None


def resolve_precision(device: torch.device | str, amp: str = "auto", bf16_supported: bool | None = None) -> Precision:
    """The :class:`Precision` for ``amp`` on ``device`` (see the module's table).

    ``bf16_supported`` overrides the GPU capability query (tests).

    Raises
    ------
    RaypathError
        Unknown ``amp``, or ``bf16`` asked for on a GPU without bf16.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    mode = str(amp or "auto").strip().lower()
    if mode not in AMP_MODES:
        raise RaypathError(f"--amp {amp!r} is not one of {', '.join(AMP_MODES)}: pick one of them")
    if device.type != "cuda" or mode == "off":
        if mode in ("bf16", "fp16") and device.type != "cuda":
            log.info("--amp %s ignored on %s: the CPU trains in fp32", mode, device)
        return Precision(device, "fp32", None)
    has_bf16 = gpu_supports_bf16(device) if bf16_supported is None else bool(bf16_supported)
    if mode == "bf16" and not has_bf16:
        raise RaypathError(f"--amp bf16 was asked for but GPU {device} has no bf16 support: use --amp fp16 or auto")
    if mode == "fp16" or (mode == "auto" and not has_bf16):
        return Precision(device, "fp16", torch.float16)
    return Precision(device, "bf16", torch.bfloat16)


__all__ = ["AMP_HELP", "AMP_MODES", "AmpMode", "Precision", "gpu_supports_bf16", "resolve_device", "resolve_precision"]
