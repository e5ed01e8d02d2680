"""Networks and augmentation of the fine-tuning methods.

:class:`PatchNet` = an encoder + a linear head, taking float images in
``[0, 1]`` (``[B, 3, P, P]``), resizing them to the encoder's input side and
normalising them with its mean/std.  The encoder is

* a registered foundation model prepared by the tuning layer
  (:func:`raypath.fm.tuning.apply_method`: ``lora`` / ``dora`` adapters on the
  table's target modules, ``full``, ``prompt``...), or
* an end-to-end baseline trained from scratch: a timm ResNet or ViT
  (``resnet50`` / ``vit_small_patch16_224`` at 224 px in ``full`` size; a
  narrow ResNet-10 and a 2-block ViT at 32 px in ``tiny`` size, for CPUs).

:func:`augment` is the paper's light augmentation, per sample, on the device:
a random shift (crop of the context square), flips, rotation up to 180
degrees (p .5, reflection padding, so no black corners), colour jitter 0.1
(brightness, contrast, saturation, hue; p .5) and Gaussian blur (p .1).
All randomness comes from one ``torch.Generator`` (saved in checkpoints).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: End-to-end baselines: method -> size -> (timm arch, kwargs, input side).  ``resnet-tiny`` is
#: timm's ResNet class with one BasicBlock per stage and widths 16-128 (~0.3 M parameters).
E2E_ARCHS = {
    "e2e-resnet": {"full": ("resnet50", {}, 224), "tiny": ("resnet-tiny", {}, 32)},
    "e2e-vit": {"full": ("vit_small_patch16_224", {}, 224),
                "tiny": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                                        mlp_ratio=2.0), 32)},
}


class PatchNet(nn.Module):
    """encoder + linear head on ``[0, 1]`` images; ``forward`` returns logits ``[B, n_out]``."""

    def __init__(self, encoder: nn.Module, dim: int, n_out: int, img_size: int, mean, std):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, n_out)
        self.img_size = int(img_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        if x01.shape[-2:] != (s, s):
            x01 = F.interpolate(x01, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return self.head(self.encoder((x01 - self.mean) / self.std))


def build_fm_net(model: str, weights: str | None, tuning: str, n_out: int, seed: int, rank: int = 16,
                 alpha: float = 16.0, dropout: float = 0.1, targets: list[str] | None = None) -> PatchNet:
    """A registered FM prepared for ``tuning`` (``lora``, ``dora``, ``full``, ``prompt``...) + a head."""
    from raypath.fm.backbone import load_backbone
    from raypath.fm.tuning import apply_method

    bb = load_backbone(model, weights=weights)
    torch.manual_seed(seed)
    bb = apply_method(bb, tuning, rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    net = PatchNet(bb, bb.spec.embed_dim, n_out, bb.spec.img_size, bb.spec.mean, bb.spec.std)
    return net


def build_e2e_net(method: str, size: str, n_out: int, seed: int) -> PatchNet:
    """An end-to-end baseline from scratch (every weight trains)."""
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    arch, kw, side = E2E_ARCHS[method][size]
    torch.manual_seed(seed)
    if arch == "resnet-tiny":
        enc = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0, channels=(16, 32, 64, 128), stem_width=16)
    else:
        enc = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
    return PatchNet(enc, enc.num_features, n_out, side, IMAGENET_MEAN, IMAGENET_STD)


# --------------------------------------------------------------------------- augmentation


def _u(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _geometry(x: torch.Tensor, patch_px: int, shift_px: int, gen: torch.Generator) -> torch.Tensor:
    """Random shift + flips + rotation (p .5, up to 180 deg) as one affine resampling of the context."""
    b, c = x.shape[0], x.shape[-1]
    ang = torch.where(torch.rand(b, generator=gen) < 0.5, _u(gen, b, -math.pi, math.pi), torch.zeros(b))
    fx = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    shift = torch.randint(-shift_px, shift_px + 1, (b, 2), generator=gen).float() * 2.0 / c
    s = patch_px / c
    cos, sin = torch.cos(ang) * s, torch.sin(ang) * s
    theta = torch.stack([torch.stack([cos * fx, -sin * fy, shift[:, 0]], 1),
                         torch.stack([sin * fx, cos * fy, shift[:, 1]], 1)], 1).to(x.device)
    grid = F.affine_grid(theta, [b, 3, patch_px, patch_px], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour(x: torch.Tensor, gen: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation, hue +- strength) on half of the samples."""
    b = x.shape[0]
    on = (torch.rand(b, generator=gen) < 0.5).float()
    bri, con, sat = (1 + on * _u(gen, b, -strength, strength) for _ in range(3))
    hue = on * _u(gen, b, -strength, strength) * 2 * math.pi
    dev = x.device
    v = lambda t: t.to(dev).view(b, 1, 1, 1)  # noqa: E731
    x = x * v(bri)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = (x - grey.mean(dim=(2, 3), keepdim=True)) * v(con) + grey.mean(dim=(2, 3), keepdim=True)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = grey + (x - grey) * v(sat)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    q = torch.einsum("ij,bjhw->bihw", yiq, x)
    c, s = torch.cos(hue).to(dev), torch.sin(hue).to(dev)
    i2 = q[:, 1] * c.view(b, 1, 1) - q[:, 2] * s.view(b, 1, 1)
    q2 = q[:, 1] * s.view(b, 1, 1) + q[:, 2] * c.view(b, 1, 1)
    x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(yiq), torch.stack([q[:, 0], i2, q2], 1))
    return x.clamp(0, 1)


def _blur(x: torch.Tensor, gen: torch.Generator, p: float = 0.1) -> torch.Tensor:
    """Gaussian blur (5 x 5, sigma 0.1-2) on a fraction ``p`` of the samples."""
    on = torch.rand(x.shape[0], generator=gen) < p
    sig = _u(gen, x.shape[0], 0.1, 2.0)
    if not on.any():
        return x
    out = x.clone()
    r = torch.arange(-2, 3, dtype=torch.float32)
    for i in torch.nonzero(on).flatten().tolist():
        k = torch.exp(-0.5 * (r / sig[i]) ** 2)
        k = (k / k.sum()).to(x.device)
        img = F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect")
        img = F.conv2d(img, k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
        out[i : i + 1] = F.conv2d(img, k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    return out


def to_unit(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in ``[0, 1]`` on ``device``."""
    return images_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def augment(context_uint8: torch.Tensor, patch_px: int, shift_px: int, gen: torch.Generator,
            device: torch.device) -> torch.Tensor:
    """Training view of a batch of context squares (see the module doc)."""
    x = _geometry(to_unit(context_uint8, device), patch_px, shift_px, gen)
    return _blur(_colour(x, gen), gen)


def centre(context_uint8: torch.Tensor, patch_px: int, device: torch.device) -> torch.Tensor:
    """Evaluation view: the centre ``patch_px`` crop, no augmentation."""
    c = context_uint8.shape[1]
    s = (c - patch_px) // 2
    return to_unit(context_uint8[:, s : s + patch_px, s : s + patch_px], device)
