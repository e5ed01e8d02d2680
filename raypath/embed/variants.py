"""Generated technical variants: K stain/scanner views of every slide's features.

``raypath embed --variants K --variant-strength s`` embeds each slide K more
times, each time under one seeded stain/scanner draw per (slide, variant)
that is applied to *every* tile of the slide -- the way a re-stain or a
re-scan changes a whole slide, not each tile independently.  The views are
what the MIL robustness losses use when no real re-scans exist
(``raypath mil --variant-source generated``; docs/mil.md).

Layout: ``features/<model_key>/variants/v<k>/`` is a complete feature store
(one parquet per slide + ``manifest.json``) for view k; the original
features stay in ``features/<model_key>/``.  The variant id, strength, seed
and the drawn magnitudes' table (:class:`~raypath.adapt.augment.AugmentParams`)
are part of each view's cache key and manifest, so another strength or seed
re-embeds the views and never reuses stale ones.

The draw uses the stain/scanner axes of :mod:`raypath.adapt.augment` at
``params_for(strength=s)``: HED stain jitter, brightness/contrast/
saturation/hue, white balance, gamma, Gaussian blur and a JPEG round trip,
each on with its probability.  Geometry (crops, flips) and grayscale are
left out: they are not technical variants of a scan, and tiles must keep
their coordinates.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantSpec:
    """View ``k`` (1..K) of the generated variants at ``strength`` with ``seed``."""

    k: int
    strength: float
    seed: int = 0

    def identity(self) -> dict:
        """What makes this view's features: part of every slide's cache key."""
        from raypath.adapt.augment import params_for

        return {"variant": int(self.k), "strength": float(self.strength), "seed": int(self.seed),
                "augment": params_for(strength=self.strength).to_dict(), "axes": list(AXES)}


AXES = ("hed", "color", "white_balance", "gamma", "blur", "jpeg")


def _slide_generator(spec: VariantSpec, slide_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{spec.seed}|{slide_id}|{spec.k}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def draw(spec: VariantSpec, slide_id: str) -> dict[str, torch.Tensor | float | int | None]:
    """The one stain/scanner draw of (slide, view): every magnitude, None = axis off."""
    from raypath.adapt.augment import params_for

    prm = params_for(strength=spec.strength)
    g = _slide_generator(spec, slide_id)

    def u(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    def on(p: float) -> bool:
        return bool(torch.rand(1, generator=g) < p)

    d: dict = {}
    d["hed"] = (u(1 - prm.hed_scale, 1 + prm.hed_scale, 3), u(-prm.hed_bias, prm.hed_bias, 3)) if on(prm.hed_p) else None
    d["color"] = (
        (float(u(max(0.0, 1 - prm.brightness), 1 + prm.brightness)), float(u(max(0.0, 1 - prm.contrast), 1 + prm.contrast)),
         float(u(max(0.0, 1 - prm.saturation), 1 + prm.saturation)), float(u(-prm.hue, prm.hue)))
        if on(prm.jitter_p) else None
    )
    d["white_balance"] = u(1 - prm.wb, 1 + prm.wb, 3) if on(prm.wb_p) else None
    d["gamma"] = float(torch.exp(u(-prm.gamma, prm.gamma))) if on(prm.gamma_p) else None
    d["blur"] = float(u(*prm.blur_sigma)) if on(prm.blur_p) else None
    q = int(torch.randint(int(prm.jpeg_quality[0]), int(prm.jpeg_quality[1]) + 1, (1,), generator=g))
    d["jpeg"] = q if on(prm.jpeg_p) else None
    return d


def _color(x: torch.Tensor, b: float, c: float, s: float, h: float) -> torch.Tensor:
    from raypath.adapt.augment import _gray, _hsv_to_rgb, _rgb_to_hsv

    y = (x * b).clamp(0, 1)
    m = _gray(y).mean((1, 2, 3), keepdim=True)  # per tile: independent of batch-mates
    y = (c * y + (1 - c) * m).clamp(0, 1)
    y = (s * y + (1 - s) * _gray(y)).clamp(0, 1)
    if h != 0.0:
        hsv = _rgb_to_hsv(y)
        y = _hsv_to_rgb(torch.cat([(hsv[:, :1] + h) % 1.0, hsv[:, 1:]], 1)).clamp(0, 1)
    return y


def _blur(x: torch.Tensor, sigma: float, kernel_px: int = 9) -> torch.Tensor:
    half = kernel_px // 2
    t = torch.arange(-half, half + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * max(sigma, 1e-4) ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    mode = "reflect" if min(x.shape[-2:]) > half else "replicate"
    y = F.conv2d(F.pad(x, (half, half, 0, 0), mode=mode), k, groups=3)
    return F.conv2d(F.pad(y, (0, 0, half, half), mode=mode), k.transpose(-1, -2), groups=3)


def apply_draw(images: np.ndarray, d: dict) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` tiles of one slide -> the same tiles under draw ``d``."""
    from torchvision.io import decode_jpeg, encode_jpeg

    from raypath.adapt.augment import hed_to_rgb, rgb_to_hed

    if len(images) == 0:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if d["hed"] is not None:
        a, c = (v.to(x.dtype).view(1, 3, 1, 1) for v in d["hed"])
        x = hed_to_rgb(rgb_to_hed(x, clip=False) * a + c)
    if d["color"] is not None:
        x = _color(x, *d["color"])
    if d["white_balance"] is not None:
        x = (x * d["white_balance"].to(x.dtype).view(1, 3, 1, 1)).clamp(0, 1)
    if d["gamma"] is not None:
        x = x.clamp_min(0).pow(d["gamma"])
    if d["blur"] is not None:
        x = _blur(x, d["blur"])
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if d["jpeg"] is not None:
        out = torch.stack([decode_jpeg(encode_jpeg(t.contiguous(), quality=d["jpeg"])) for t in out])
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def apply_variant(images: np.ndarray, slide_ids, spec: VariantSpec) -> np.ndarray:
    """Apply each slide's draw to its rows of a batch (rows of several slides
    may share a batch; an object array holds tiles of different sizes)."""
    sids = np.asarray(slide_ids, dtype=object)
    if images.dtype == object:
        out = np.empty(len(images), dtype=object)
        for i, sid in enumerate(sids):
            out[i] = apply_draw(np.asarray(images[i])[None], draw(spec, str(sid)))[0]
        return out
    out = np.empty_like(images)
    for sid in dict.fromkeys(sids.tolist()):
        m = sids == sid
        out[m] = apply_draw(images[m], draw(spec, str(sid)))
    return out
