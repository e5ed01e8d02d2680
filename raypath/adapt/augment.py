"""Augmentation for DINO adaptation: one pipeline with a strength knob.

The pipeline follows METHODS.md §1 (Bøe et al. 2025) and adds pathology
axes.  Per view, in order::

    RandomResizedCrop -> h/v flips -> HED stain jitter -> ColorJitter (prob p)
    -> RandomGrayscale -> white balance -> gamma -> GaussianBlur (k=9, prob p)
    -> JPEG round trip (prob p) -> /255 then the model's mean/std

Everything except the JPEG round trip runs batched on torch tensors on the
device the images are on (per-image random parameters, no Python loop over
images).  JPEG needs the codec and runs on the CPU.

Scaling: views are built in [0, 1] (uint8 / 255) and only then normalised
with the model's mean/std, the way inference sees tiles.  The original
code normalised 0..255 values, so training and inference saw inputs 255x
apart; :func:`normalise` is the single place that does it here.

Levels ``weak``/``strong``/``heavy``/``max`` are the table of METHODS.md;
``strength`` in [0, 1] interpolates them linearly (0 = weak, 1/3 = strong,
2/3 = heavy, 1 = max) so a sweep can treat augmentation as one number.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raypath.errors import RaypathError

log = logging.getLogger(__name__)

Range = tuple[float, float]


@dataclass(frozen=True)
class AugmentParams:
    """Magnitudes of every augmentation axis (all numbers, so they interpolate).

    Colour jitter factors follow torchvision: brightness/contrast/saturation
    factor ~ U(1-x, 1+x), hue shift ~ U(-h, h) turns of the colour wheel.
    HED jitter (Tellez et al.): each stain channel ``s -> s*a + b`` with
    ``a ~ U(1-hed_scale, 1+hed_scale)``, ``b ~ U(-hed_bias, hed_bias)`` in
    scikit-image's ``rgb2hed`` units.  White balance: per-channel gain
    ``U(1-wb, 1+wb)``.  Gamma: ``x ** g`` with ``log g ~ U(-gamma, gamma)``.
    Blur sigma in output pixels.  JPEG quality in [1, 100].
    """

    global_scale: Range = (0.32, 1.0)
    local_scale: Range = (0.05, 0.32)
    aspect: Range = (0.9, 1.1)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.3
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Range = (0.1, 2.0)
    hed_p: float = 0.5
    hed_scale: float = 0.05
    hed_bias: float = 0.01
    wb_p: float = 0.3
    wb: float = 0.05
    gamma_p: float = 0.3
    gamma: float = 0.15
    jpeg_p: float = 0.2
    jpeg_quality: Range = (60.0, 95.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: The four levels of METHODS.md.  Crop scales, jitter b/c/s/h, jitter p,
#: gray p, blur p are the paper's; "weak" uses the original code's mild
#: always-on settings; the pathology axes (HED, white balance, gamma, JPEG)
#: are ours and grow with the level.
LEVELS: dict[str, AugmentParams] = {
    "weak": AugmentParams(
        global_scale=(0.9, 1.0), local_scale=(0.7, 0.9), aspect=(1.0, 1.0),
        brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, jitter_p=1.0,
        gray_p=0.0, blur_p=1.0, blur_sigma=(1e-4, 0.4),
        hed_p=0.2, hed_scale=0.02, hed_bias=0.005, wb_p=0.0, wb=0.02,
        gamma_p=0.0, gamma=0.05, jpeg_p=0.0, jpeg_quality=(90.0, 100.0),
    ),
    "strong": AugmentParams(),
    "heavy": AugmentParams(
        brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5, jitter_p=0.9,
        gray_p=0.3, blur_p=0.6, hed_p=0.7, hed_scale=0.1, hed_bias=0.02,
        wb_p=0.5, wb=0.1, gamma_p=0.5, gamma=0.3, jpeg_p=0.4, jpeg_quality=(40.0, 90.0),
    ),
    "max": AugmentParams(
        brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5, jitter_p=0.9,
        gray_p=0.3, blur_p=0.8, hed_p=0.8, hed_scale=0.2, hed_bias=0.04,
        wb_p=0.6, wb=0.15, gamma_p=0.6, gamma=0.4, jpeg_p=0.5, jpeg_quality=(20.0, 80.0),
    ),
}
LEVEL_NAMES = tuple(LEVELS)
_ANCHORS = [(i / (len(LEVEL_NAMES) - 1), LEVELS[n]) for i, n in enumerate(LEVEL_NAMES)]


def _lerp(a, b, t: float):
    if isinstance(a, tuple):
        return tuple(_lerp(x, y, t) for x, y in zip(a, b))
    return a + (b - a) * t


def params_for(level: str | None = None, strength: float | None = None) -> AugmentParams:
    """Augmentation magnitudes for a named ``level`` or a continuous ``strength``.

    Parameters
    ----------
    level
        One of ``weak``, ``strong``, ``heavy`` (the paper's default), ``max``.
    strength
        A number in [0, 1]; 0 = weak, 1/3 = strong, 2/3 = heavy, 1 = max,
        linear in between.  Wins over ``level`` when both are given.
    """
    if strength is not None:
        s = float(strength)
        if not (0.0 <= s <= 1.0) or math.isnan(s):
            raise RaypathError(f"augmentation strength {strength!r} is outside [0, 1]; pass a number between 0 (weak) and 1 (max)")
        for (t0, p0), (t1, p1) in zip(_ANCHORS[:-1], _ANCHORS[1:]):
            if s <= t1:
                t = (s - t0) / (t1 - t0)
                return AugmentParams(**{f.name: _lerp(getattr(p0, f.name), getattr(p1, f.name), t) for f in dataclasses.fields(AugmentParams)})
    name = level or "heavy"
    if name not in LEVELS:
        raise RaypathError(f"unknown augmentation level {name!r}; choose one of {', '.join(LEVEL_NAMES)} or give a strength in [0, 1]")
    return LEVELS[name]


def crop_sizes(img_size: int, patch_size: int) -> tuple[int, int]:
    """Global and local crop sides for a model: ``img_size`` and 98/224 of it,
    rounded to a multiple of the patch size (224/14 -> 224 and 98)."""
    local = img_size * 98 / 224
    local_px = max(patch_size, int(round(local / patch_size)) * patch_size)
    return int(img_size), int(local_px)


# --------------------------------------------------------------------------- tensor helpers


def to_unit_float(images) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (numpy or torch) -> float ``[B, 3, H, W]`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise RaypathError(f"expected RGB images shaped [B, H, W, 3], got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise RaypathError(f"expected uint8 images (0..255), got {x.dtype}; pass tiles as read, before any scaling")
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``(x - mean) / std`` (the model's statistics)."""
    m = torch.as_tensor(mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - m) / s


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * s + m


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def random_resized_crop(x: torch.Tensor, out_px: int, scale: Range, aspect: Range, gen: torch.Generator) -> torch.Tensor:
    """Batched RandomResizedCrop: per image a box of area ``U(scale)`` x the
    image and aspect ``exp U(log aspect)``, resized to ``out_px`` with
    area-averaging bilinear sampling (``roi_align``), which anti-aliases
    when shrinking."""
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    area = _uniform(gen, b, *scale) * h * w
    ratio = torch.exp(_uniform(gen, b, math.log(aspect[0]), math.log(aspect[1])))
    cw = torch.sqrt(area * ratio).clamp(1.0, w)
    ch = torch.sqrt(area / ratio).clamp(1.0, h)
    x0 = torch.rand(b, generator=gen) * (w - cw)
    y0 = torch.rand(b, generator=gen) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    return roi_align(x, boxes.to(x.device, x.dtype), (out_px, out_px), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def flips(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    h = _coin(gen, b, p).to(x.device).view(-1, 1, 1, 1)
    v = _coin(gen, b, p).to(x.device).view(-1, 1, 1, 1)
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


# scikit-image's stain matrix (Ruifrok & Johnston): rows are the RGB optical
# densities of haematoxylin, eosin and DAB.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LOG_EPS = math.log(1e-6)


def rgb_to_hed(x: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB in [0, 1] -> stain concentrations, as
    ``skimage.color.rgb2hed``.  ``clip=False`` keeps the small negative
    concentrations skimage drops, so that :func:`hed_to_rgb` inverts exactly."""
    od = torch.log(x.clamp_min(1e-6)) / _LOG_EPS
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(x.device, x.dtype))
    return hed.clamp_min(0.0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`, as ``skimage.color.hed2rgb`` (clipped to [0, 1])."""
    log_rgb = torch.einsum("bchw,cd->bdhw", hed * _LOG_EPS, _RGB_FROM_HED.to(hed.device, hed.dtype))
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def hed_jitter(x: torch.Tensor, p: float, scale: float, bias: float, gen: torch.Generator) -> torch.Tensor:
    """Stain augmentation: scale and shift each of H, E, D per image in HED space."""
    b = x.shape[0]
    on = _coin(gen, b, p)
    if not bool(on.any()):
        return x
    a = torch.where(on[:, None], _uniform(gen, 3 * b, 1 - scale, 1 + scale).view(b, 3), torch.ones(b, 3))
    c = torch.where(on[:, None], _uniform(gen, 3 * b, -bias, bias).view(b, 3), torch.zeros(b, 3))
    # unclipped so that a = 1, b = 0 is exactly the identity
    hed = rgb_to_hed(x, clip=False)
    hed = hed * a.to(x).view(b, 3, 1, 1) + c.to(x).view(b, 3, 1, 1)
    out = hed_to_rgb(hed)
    return torch.where(_bcast(on, x).bool(), out, x)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    # channel values for the 6 sectors of the hue wheel
    r = torch.stack([v, q, p, p, t, v], 1)
    g = torch.stack([t, v, v, q, p, p], 1)
    b = torch.stack([p, p, t, v, v, q], 1)
    idx = i.unsqueeze(1)
    return torch.cat([r.gather(1, idx), g.gather(1, idx), b.gather(1, idx)], 1)


def color_jitter(x: torch.Tensor, prm: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Batched ColorJitter (brightness, contrast, saturation, hue in that
    order), applied to each image with probability ``jitter_p``."""
    b = x.shape[0]
    on = _coin(gen, b, prm.jitter_p)
    if not bool(on.any()):
        return x
    ones = torch.ones(b)

    def factor(mag: float) -> torch.Tensor:
        return torch.where(on, _uniform(gen, b, max(0.0, 1 - mag), 1 + mag), ones)

    bf, cf, sf = factor(prm.brightness), factor(prm.contrast), factor(prm.saturation)
    hf = torch.where(on, _uniform(gen, b, -prm.hue, prm.hue), torch.zeros(b))
    y = (x * _bcast(bf, x)).clamp(0, 1)
    m = _gray(y).mean((1, 2, 3), keepdim=True)
    y = (_bcast(cf, y) * y + (1 - _bcast(cf, y)) * m).clamp(0, 1)
    y = (_bcast(sf, y) * y + (1 - _bcast(sf, y)) * _gray(y)).clamp(0, 1)
    if prm.hue > 0:
        hsv = _rgb_to_hsv(y)
        hsv = torch.cat([((hsv[:, :1] + _bcast(hf, y)) % 1.0), hsv[:, 1:]], 1)
        y = _hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(_bcast(on, x).bool(), y, x)


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    on = _coin(gen, x.shape[0], p)
    if not bool(on.any()):
        return x
    return torch.where(_bcast(on, x).bool(), _gray(x).expand_as(x), x)


def white_balance(x: torch.Tensor, p: float, mag: float, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    on = _coin(gen, b, p)
    if not bool(on.any()):
        return x
    gain = torch.where(on[:, None], _uniform(gen, 3 * b, 1 - mag, 1 + mag).view(b, 3), torch.ones(b, 3))
    return (x * gain.to(x).view(b, 3, 1, 1)).clamp(0, 1)


def random_gamma(x: torch.Tensor, p: float, mag: float, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    on = _coin(gen, b, p)
    if not bool(on.any()):
        return x
    g = torch.where(on, torch.exp(_uniform(gen, b, -mag, mag)), torch.ones(b))
    return x.clamp_min(0).pow(_bcast(g, x))


def gaussian_blur(x: torch.Tensor, p: float, sigma: Range, gen: torch.Generator, kernel_px: int = 9) -> torch.Tensor:
    """Per-image Gaussian blur (k=9, sigma ~ U(sigma)) with probability ``p``,
    as one grouped separable convolution over the batch."""
    b, c, h, w = x.shape
    on = _coin(gen, b, p)
    if not bool(on.any()):
        return x
    sig = _uniform(gen, b, *sigma).clamp_min(1e-4)
    half = kernel_px // 2
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x)  # [B, k]
    k = k.repeat_interleave(c, 0)  # [B*C, k]
    pad_mode = "reflect" if min(h, w) > half else "replicate"
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode=pad_mode), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode=pad_mode), k.view(b * c, 1, -1, 1), groups=b * c)
    y = y.view(b, c, h, w)
    return torch.where(_bcast(on, x).bool(), y, x)


def jpeg_roundtrip(x: torch.Tensor, p: float, quality: Range, gen: torch.Generator) -> torch.Tensor:
    """Scanner/storage compression: encode and decode with a random quality.

    On CUDA tensors the GPU codec (nvJPEG) is used, one call per distinct
    quality; elsewhere, or if the GPU codec is unavailable, the CPU codec.
    """
    from torchvision.io import decode_jpeg, encode_jpeg

    b = x.shape[0]
    on = _coin(gen, b, p)
    q = torch.randint(int(quality[0]), int(quality[1]) + 1, (b,), generator=gen)
    if not bool(on.any()):
        return x
    idx = torch.nonzero(on).flatten().tolist()
    sel = (x[idx].clamp(0, 1) * 255).round().to(torch.uint8)
    out = x.clone()
    if x.is_cuda:
        try:
            for qual in sorted({int(q[i]) for i in idx}):
                js = [j for j, i in enumerate(idx) if int(q[i]) == qual]
                enc = encode_jpeg([sel[j].contiguous() for j in js], quality=qual)
                # encoded bytes are small: the GPU decoder wants them on the host
                dec = decode_jpeg([e.cpu() for e in enc], device=x.device)
                for j, d in zip(js, dec):
                    out[idx[j]] = d.to(x.dtype) / 255.0
            return out
        except (RuntimeError, TypeError, ValueError):  # no nvJPEG in this build: CPU codec below
            out = x.clone()
    sel = sel.cpu()
    for j, i in enumerate(idx):
        dec = decode_jpeg(encode_jpeg(sel[j], quality=int(q[i])))
        out[i] = dec.to(x.device, x.dtype) / 255.0
    return out


def augment(x01: torch.Tensor, prm: AugmentParams, out_px: int, scale: Range, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of each image: ``[B, 3, H, W]`` in [0, 1] ->
    ``[B, 3, out_px, out_px]`` in [0, 1] (not yet normalised)."""
    y = random_resized_crop(x01, out_px, scale, prm.aspect, gen)
    y = flips(y, prm.flip_p, gen)
    y = hed_jitter(y, prm.hed_p, prm.hed_scale, prm.hed_bias, gen)
    y = color_jitter(y, prm, gen)
    y = random_grayscale(y, prm.gray_p, gen)
    y = white_balance(y, prm.wb_p, prm.wb, gen)
    y = random_gamma(y, prm.gamma_p, prm.gamma, gen)
    y = gaussian_blur(y, prm.blur_p, prm.blur_sigma, gen)
    y = jpeg_roundtrip(y, prm.jpeg_p, prm.jpeg_quality, gen)
    return y.clamp(0, 1)


class MultiCrop:
    """DINO multi-crop: ``n_global`` views at ``global_px`` and ``n_local`` at
    ``local_px`` of every image, normalised with the model's mean/std.

    Parameters
    ----------
    params
        Magnitudes (:func:`params_for`).
    global_px, local_px
        Crop sides; :func:`crop_sizes` derives them from the model.
    mean, std
        The model's normalisation, applied to [0, 1] values.
    """

    def __init__(self, params: AugmentParams, global_px: int, local_px: int, mean: Sequence[float], std: Sequence[float], n_global: int = 2, n_local: int = 8):
        self.params = params
        self.global_px, self.local_px = int(global_px), int(local_px)
        self.mean, self.std = tuple(mean), tuple(std)
        self.n_global, self.n_local = int(n_global), int(n_local)

    def __call__(self, images, gen: torch.Generator, device: str | torch.device | None = None) -> list[torch.Tensor]:
        """uint8 ``[B, H, W, 3]`` -> list of ``n_global + n_local`` float tensors ``[B, 3, px, px]``."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        if device is not None:
            x = x.to(device, non_blocking=True)
        x01 = to_unit_float(x)
        views = [augment(x01, self.params, self.global_px, self.params.global_scale, gen) for _ in range(self.n_global)]
        views += [augment(x01, self.params, self.local_px, self.params.local_scale, gen) for _ in range(self.n_local)]
        return [normalise(v, self.mean, self.std) for v in views]


# --------------------------------------------------------------------------- preview


def _load_preview_tiles(image: str | None, slide: str | None, workdir: str | None, n_tiles: int, tile_px: int, seed: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    if workdir:
        from raypath.io.storage import join, read_parquet

        tiles = read_parquet(join(workdir, "tiles.parquet")).to_pandas()
        slides = read_parquet(join(workdir, "slides.parquet")).to_pandas()
        tiles = tiles.sample(n=min(n_tiles, len(tiles)), random_state=seed)
        from raypath.wsi.tile_images import load_tile_images

        return load_tile_images(tiles.merge(slides[["slide_id", "uri"]], on="slide_id"))
    if slide:
        import tiffslide

        with tiffslide.TiffSlide(slide) as s:
            w, h = s.dimensions
            side = min(tile_px * 2, w, h)
            out = []
            for _ in range(n_tiles):
                x, y = int(rng.integers(0, max(1, w - side))), int(rng.integers(0, max(1, h - side)))
                reg = s.read_region((x, y), 0, (side, side)).convert("RGB").resize((tile_px, tile_px), Image.BILINEAR)
                out.append(np.asarray(reg))
        return np.stack(out)
    if image is None:
        from pathlib import Path

        image = str(Path(__file__).resolve().parents[1] / "data" / "he_target_1000.png")
    im = np.asarray(Image.open(image).convert("RGB"))
    h, w = im.shape[:2]
    side = min(h, w, tile_px * 2)
    out = []
    for _ in range(n_tiles):
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(np.asarray(Image.fromarray(im[y : y + side, x : x + side]).resize((tile_px, tile_px), Image.BILINEAR)))
    return np.stack(out)


def preview_grid(tiles: np.ndarray, strengths: Sequence[float | str], n_views: int = 6, view_px: int = 160, seed: int = 0) -> np.ndarray:
    """A uint8 image: one block of rows per strength/level, one row per
    tile; the first column is the tile, then ``n_views`` global views."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    x01 = to_unit_float(torch.as_tensor(tiles))
    base = F.interpolate(x01, size=(view_px, view_px), mode="bilinear", antialias=True, align_corners=False)
    sep = np.full((4, (n_views + 1) * view_px + n_views * 2, 3), 255, np.uint8)
    for s in strengths:
        prm = params_for(level=s) if isinstance(s, str) else params_for(strength=float(s))
        views = [augment(x01, prm, view_px, prm.global_scale, gen) for _ in range(n_views)]
        for i in range(x01.shape[0]):
            cells = [base[i]] + [v[i] for v in views]
            row = []
            for j, c in enumerate(cells):
                row.append((c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                if j < len(cells) - 1:
                    row.append(np.full((view_px, 2, 3), 255, np.uint8))
            rows.append(np.concatenate(row, 1))
        rows.append(sep)
    return np.concatenate(rows[:-1], 0)


def label_grid(grid: np.ndarray, strengths: Sequence[float | str], n_tiles: int, n_views: int, view_px: int):
    """The :func:`preview_grid` image with its rows (level or strength, tile) and columns
    (original tile, augmented view k) labelled; a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    left, top = 150, 24
    out = Image.new("RGB", (grid.shape[1] + left, grid.shape[0] + top), "white")
    out.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(out)
    for j in range(n_views + 1):
        draw.text((left + j * (view_px + 2) + 4, 5), "original tile" if j == 0 else f"augmented view {j}",
                  fill="black", font=font)
    for b, s in enumerate(strengths):
        name = f"level {s}" if isinstance(s, str) else f"strength {float(s):.2f}"
        for i in range(n_tiles):
            y = top + b * (n_tiles * view_px + 4) + i * view_px + view_px // 2 - 14
            draw.text((6, y), name, fill="black", font=font)
            draw.text((6, y + 16), f"tile {i + 1}", fill="dimgray", font=font)
    return out


def augment_preview(out_png: str, strengths: Sequence[float | str] = ("weak", "strong", "heavy", "max"), image: str | None = None, slide: str | None = None, workdir: str | None = None, n_tiles: int = 2, n_views: int = 6, view_px: int = 160, seed: int = 0) -> str:
    """Write a PNG grid of augmented views of real tiles so a person can see
    what a level or strength does.  Tiles come from ``workdir``'s
    tiles.parquet, a ``slide`` file, an ``image`` file, or (default) the
    packaged H&E reference image.  Returns the PNG path."""
    from PIL import Image

    from raypath.io.storage import atomic_write_bytes

    tiles = _load_preview_tiles(image, slide, workdir, n_tiles, max(view_px, 224), seed)
    grid = preview_grid(tiles, strengths, n_views=n_views, view_px=view_px, seed=seed)
    import io

    buf = io.BytesIO()
    label_grid(grid, strengths, tiles.shape[0], n_views, view_px).save(buf, format="PNG")
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


def _parse_strength(s: str) -> float | str:
    if s in LEVELS:
        return s
    try:
        return float(s)
    except ValueError:
        raise RaypathError(f"--strengths value {s!r} is neither a level ({', '.join(LEVEL_NAMES)}) nor a number in [0, 1]") from None


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "augment-preview",
        help="write a PNG grid of augmented views of real tiles (see what a strength means)",
        description="Rows: tiles x levels/strengths; columns: the tile, then augmented global views.",
    )
    p.add_argument("--out", required=True, metavar="PATH", help="output PNG path (local or s3://) [required]")
    p.add_argument("--strengths", nargs="+", default=["weak", "strong", "heavy", "max"], metavar="LEVEL",
                   help="levels (weak strong heavy max) and/or numbers in [0,1] [default: weak strong heavy max]")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="PATH", help="an RGB image to cut tiles from [default: packaged H&E reference]")
    src.add_argument("--slide", metavar="PATH", help="a whole-slide image file to cut tiles from [default: none]")
    src.add_argument("--workdir", metavar="PATH", help="a project folder with tiles.parquet and slides.parquet "
                     "[default: none]")
    p.add_argument("--n-tiles", type=int, default=2, metavar="N", help="tiles, one row each per level [default: 2]")
    p.add_argument("--n-views", type=int, default=6, metavar="N", help="augmented views per tile [default: 6]")
    p.add_argument("--view-px", type=int, default=160, metavar="PX", help="side of each view [default: 160 px]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the tiles and views [default: 0]")

    def run(args: argparse.Namespace) -> int:
        out = augment_preview(
            args.out, [_parse_strength(s) for s in args.strengths], image=args.image, slide=args.slide,
            workdir=args.workdir, n_tiles=args.n_tiles, n_views=args.n_views, view_px=args.view_px, seed=args.seed,
        )
        print(out)
        return 0

    p.set_defaults(func=run)
