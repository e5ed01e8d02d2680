"""PathoTune (Lu et al. 2024, arXiv 2403.16497): multi-modal prompt tuning of a frozen ViT.

No code of the paper is public; this follows its description (METHODS.md §4)
and docs/pathotune.md lists every choice.  Three kinds of tokens enter a
frozen backbone through the prompt hook (:meth:`Backbone.prompted_tokens`),
in the order ``CLS, registers, TTP, IVP, TVP, patches``:

TVP (task visual prompts)
    ``n_tokens`` (10) learnable tokens per block, VPT-deep, in the first
    ``depth`` blocks (all by default; later blocks keep what the previous
    block made of them).
TTP (task textual prompt)
    ``template`` filled with ``fill`` ("An H&E stained image of colorectal
    tissue for tumour classification"), encoded ONCE by a frozen sentence
    encoder (:mod:`raypath.fm.text_encoder`, all-MiniLM-L6-v2), stored as a
    buffer, and projected by a trainable linear layer to ``text_tokens`` (1)
    tokens of the ViT width.
IVP (instance visual prompts)
    a Visual Refine Module over the frozen patch embeddings (the stem's
    output, positions added) makes ``instance_tokens`` (2) tokens per image:
    LayerNorm -> Linear(D, h) -> GELU per patch, then ``M`` learned
    attention poolings over the patches and Linear(h, D) (h = D/4).

Only the TVP tokens, the projection, the refine module (and the task head of
the trainer) learn; every backbone weight keeps ``requires_grad=False`` and
is bit-identical after training.  The paper trains with RAdam
(:func:`make_optimizer`).

A trained set is one ``.safetensors`` file (:func:`save_pathotune`): the TVP
tokens (``prompts``), the prefix module's tensors (``prefix.*``: text
embedding, projection, refine module) and metadata (``raypath_kind``:
``pathotune``, the config as JSON, the filled text, the encoder's sha256,
the model key and weights sha256).  Its sha256 is the feature identity's
``prompt_sha256``; :func:`load_prompt_file` attaches either kind of prompt
file (plain VPT or PathoTune) to a backbone (``raypath embed --prompts``).

Example::

    from raypath.fm.backbone import load_backbone
    from raypath.fm.pathotune import PathoTuneConfig, apply_pathotune, trainable_report

    bb = apply_pathotune(load_backbone("phikon", weights=w), PathoTuneConfig.ablation("tvp+ttp+ivp"))
    feats = bb(bb.preprocess(tiles_uint8))      # prompted read-out [B, 768]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from raypath.errors import RaypathError
from raypath.fm.backbone import PROMPTS_TENSOR, Backbone, PromptTokens, load_prompts, prompt_file_kind, sha256_file

KIND = "pathotune"
#: Ablations of the paper's Table 3, as switches.
ABLATIONS: dict[str, dict[str, bool]] = {
    "tvp": dict(tvp=True, ttp=False, ivp=False),
    "tvp+ttp": dict(tvp=True, ttp=True, ivp=False),
    "tvp+ttp+ivp": dict(tvp=True, ttp=True, ivp=True),
}


@dataclass
class PathoTuneConfig:
    """PathoTune's knobs (plain data: travels to Ray workers and into the prompt file)."""

    tvp: bool = True
    n_tokens: int = 10
    depth: int | None = None  # blocks that get TVP tokens (None: every block)
    ttp: bool = True
    text_tokens: int = 1
    template: str = "An {stain} stained image of {tissue} tissue for {task} classification"
    fill: dict = field(default_factory=lambda: {"stain": "H&E", "tissue": "colorectal", "task": "tumour"})
    text_encoder: str = "all-minilm-l6-v2"
    ivp: bool = True
    instance_tokens: int = 2
    refine_hidden: int | None = None  # refine-module width (None: D // 4)
    optimizer: str = "radam"

    @classmethod
    def ablation(cls, name: str, **kw: Any) -> "PathoTuneConfig":
        if name not in ABLATIONS:
            raise RaypathError(f"unknown PathoTune ablation {name!r}: choose one of {', '.join(ABLATIONS)}")
        return cls(**{**ABLATIONS[name], **kw})

    @property
    def name(self) -> str:
        return "+".join(k for k in ("tvp", "ttp", "ivp") if getattr(self, k)) or "none"

    def text(self) -> str:
        """The filled template."""
        try:
            return self.template.format(**self.fill)
        except (KeyError, IndexError) as e:
            raise RaypathError(f"PathoTune template {self.template!r} names {e} that the fill-ins "
                               f"{sorted(self.fill)} lack: add it to fill") from None

    def check(self) -> "PathoTuneConfig":
        if not (self.tvp or self.ttp or self.ivp):
            raise RaypathError("PathoTune config turns off TVP, TTP and IVP: enable at least one")
        for k in ("n_tokens", "text_tokens", "instance_tokens"):
            if int(getattr(self, k)) < 1:
                raise RaypathError(f"PathoTune {k} = {getattr(self, k)}: give at least 1")
        return self


class VisualRefine(nn.Module):
    """The Visual Refine Module: frozen patch embeddings ``[B, P, D]`` -> ``M`` instance prompts ``[B, M, D]``."""

    def __init__(self, dim: int, n_out: int = 2, hidden: int | None = None):
        super().__init__()
        h = int(hidden or max(8, dim // 4))
        self.norm = nn.LayerNorm(dim)
        self.inp = nn.Linear(dim, h)
        self.pool = nn.Linear(h, n_out)  # one attention map over the patches per output token
        self.out = nn.Linear(h, dim)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.out.weight, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.inp(self.norm(patches)))  # [B, P, h]
        attn = self.pool(h).softmax(dim=1)  # [B, P, M]
        return self.out(attn.transpose(1, 2) @ h)  # [B, M, D]


class PathoTunePrefix(nn.Module):
    """TTP + IVP: the tokens PathoTune inserts once, computed per image (``backbone.prompt_prefix``)."""

    def __init__(self, cfg: PathoTuneConfig, width: int, text_embedding: torch.Tensor | None):
        super().__init__()
        self.width, self.text_tokens = int(width), int(cfg.text_tokens)
        self.proj = self.refine = None
        if cfg.ttp:
            if text_embedding is None:
                raise RaypathError("PathoTune TTP needs the text embedding: encode the template first")
            self.register_buffer("text_embedding", text_embedding.detach().float().reshape(-1).clone())
            self.proj = nn.Linear(self.text_embedding.numel(), self.text_tokens * self.width)
        if cfg.ivp:
            self.refine = VisualRefine(self.width, cfg.instance_tokens, cfg.refine_hidden)

    def forward(self, backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.proj is not None:
            e = self.text_embedding.to(x.device, self.proj.weight.dtype)
            t = self.proj(e).view(1, self.text_tokens, self.width)
            parts.append(t.expand(x.shape[0], -1, -1))
        if self.refine is not None:
            with torch.no_grad():  # the frozen stem: its output is an input of the refine module
                h = backbone.family.stem(backbone.model, x, backbone.any_size)
            parts.append(self.refine(h[:, backbone.spec.num_prefix_tokens:].to(self.refine.inp.weight.dtype)))
        return torch.cat(parts, dim=1)


def text_embedding_of(cfg: PathoTuneConfig) -> tuple[torch.Tensor, str]:
    """``(embedding [E], encoder weights sha256)`` of the config's filled template (frozen encoder, once)."""
    from raypath.fm.text_encoder import encode_text, verify_encoder

    _, sha = verify_encoder(cfg.text_encoder)
    return encode_text(cfg.text(), cfg.text_encoder), sha


def apply_pathotune(backbone: Backbone, cfg: PathoTuneConfig | None = None,
                    text_embedding: torch.Tensor | None = None) -> Backbone:
    """Freeze ``backbone`` and attach PathoTune's trainable tokens, in place.

    Afterwards only ``backbone.prompts`` (TVP) and ``backbone.prompt_prefix``'s
    projection and refine module have ``requires_grad``.  Random init uses
    torch's global generator: seed it first.  ``text_embedding`` skips the
    encoder (a loaded file's); otherwise the template is encoded here.
    """
    cfg = (cfg or PathoTuneConfig()).check()
    for p in backbone.parameters():
        p.requires_grad_(False)
    width, n_blocks = backbone.family.width(backbone.model), len(backbone.blocks)
    depth = n_blocks if cfg.depth is None else int(cfg.depth)
    if not 1 <= depth <= n_blocks:
        raise RaypathError(f"PathoTune depth {depth} does not fit model {backbone.spec.key!r} with {n_blocks} "
                           f"blocks: give 1..{n_blocks}")
    backbone.prompts = (PromptTokens(depth, cfg.n_tokens, width, backbone.spec.patch_size).to(backbone.device)
                        if cfg.tvp else None)
    backbone.encoder_sha256 = None
    if cfg.ttp and text_embedding is None:
        text_embedding, backbone.encoder_sha256 = text_embedding_of(cfg)
    backbone.prompt_prefix = (PathoTunePrefix(cfg, width, text_embedding).to(backbone.device)
                              if (cfg.ttp or cfg.ivp) else None)
    backbone.pathotune = cfg
    backbone.tuning = KIND
    return backbone


def pathotune_parameters(backbone: Backbone) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of what PathoTune trains on ``backbone`` (the head is the trainer's)."""
    out: dict[str, nn.Parameter] = {}
    if backbone.prompts is not None:
        out["prompts.tokens"] = backbone.prompts.tokens
    if backbone.prompt_prefix is not None:
        out.update({f"prompt_prefix.{n}": p for n, p in backbone.prompt_prefix.named_parameters()})
    return out


def make_optimizer(params, name: str = "radam", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """RAdam (the paper's), AdamW, Adam or SGD (momentum .9) over ``params``."""
    table = {"radam": torch.optim.RAdam, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    name = str(name).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name not in table:
        raise RaypathError(f"unknown optimiser {name!r}: choose radam, adamw, adam or sgd")
    return table[name](params, lr=lr, weight_decay=weight_decay)


# --------------------------------------------------------------------------- files


def save_pathotune(backbone: Backbone, path: str) -> str:
    """Write the trained PathoTune tokens and their config as ``.safetensors``; returns the file's sha256."""
    from pathlib import Path

    from safetensors.torch import save_file

    cfg = getattr(backbone, "pathotune", None)
    if cfg is None:
        raise RaypathError("the backbone has no PathoTune prompts to save: apply_pathotune first")
    tensors = {}
    if backbone.prompts is not None:
        tensors[PROMPTS_TENSOR] = backbone.prompts.tokens.detach().cpu().contiguous()
    if backbone.prompt_prefix is not None:
        tensors.update({f"prefix.{k}": v.detach().cpu().contiguous()
                        for k, v in backbone.prompt_prefix.state_dict().items()})
    meta = {"raypath_kind": KIND, "config": json.dumps(asdict(cfg)), "text": cfg.text() if cfg.ttp else "",
            "text_encoder_sha256": str(getattr(backbone, "encoder_sha256", None) or ""),
            "raypath_model": backbone.spec.key, "weights_sha256": str(backbone.weights_sha256)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    return sha256_file(out)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise RaypathError(f"prompt file {path!r} cannot be read ({type(e).__name__}: {e}): pass a file written "
                           "by raypath.fm.pathotune.save_pathotune") from e


def load_pathotune(backbone: Backbone, path: str) -> Backbone:
    """Attach the PathoTune tokens of a :func:`save_pathotune` file to ``backbone`` (frozen, for inference)."""
    tensors, meta = _read(path)
    try:
        cfg = PathoTuneConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RaypathError(f"prompt file {path!r} has no valid PathoTune config ({e}): re-save it with "
                           "save_pathotune") from e
    tok = tensors.get(PROMPTS_TENSOR)
    width = backbone.family.width(backbone.model)
    other = meta.get("raypath_model", backbone.spec.key) != backbone.spec.key
    if other or (tok is not None and tok.shape[-1] != width):
        raise RaypathError(f"prompt file {path!r} was trained on model {meta.get('raypath_model')!r}, not "
                           f"{backbone.spec.key!r} (width {width}): use the prompts trained on this model")
    if tok is not None:
        cfg = replace(cfg, n_tokens=int(tok.shape[1]), depth=int(tok.shape[0]))
    apply_pathotune(backbone, cfg, text_embedding=tensors.get("prefix.text_embedding"))
    with torch.no_grad():
        if tok is not None:
            backbone.prompts.tokens.copy_(tok)
        if backbone.prompt_prefix is not None:
            state = {k[len("prefix."):]: v for k, v in tensors.items() if k.startswith("prefix.")}
            backbone.prompt_prefix.load_state_dict(state)
    backbone.encoder_sha256 = meta.get("text_encoder_sha256") or None
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.prompt_sha256 = sha256_file(path)
    return backbone.to(backbone.device)


def load_prompt_file(backbone: Backbone, path: str) -> Backbone:
    """Attach a prompt file of either kind: PathoTune (:func:`save_pathotune`) or plain VPT (``save_prompts``)."""
    try:
        kind = prompt_file_kind(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise RaypathError(f"prompt file {path!r} cannot be read ({type(e).__name__}: {e}): pass a file written "
                           "by prompt tuning (save_pathotune or save_prompts)") from e
    return load_pathotune(backbone, path) if kind == KIND else load_prompts(backbone, path)


# --------------------------------------------------------------------------- parameter counts


def count_params(params) -> int:
    return int(sum(p.numel() for p in params))


def trainable_report(backbone: Backbone, n_classes: int = 2) -> dict:
    """Trainable parameters of PathoTune (+ a linear head of ``n_classes`` outputs; 1 for two classes)
    vs full fine-tuning (every backbone weight + the same head)."""
    n_out = 1 if n_classes == 2 else n_classes
    head = (backbone.spec.embed_dim + 1) * n_out
    parts = {"tvp": backbone.prompts.tokens.numel() if backbone.prompts is not None else 0, "ttp": 0, "ivp": 0}
    pre = backbone.prompt_prefix
    if pre is not None:
        parts["ttp"] = count_params(pre.proj.parameters()) if pre.proj is not None else 0
        parts["ivp"] = count_params(pre.refine.parameters()) if pre.refine is not None else 0
    full = count_params(backbone.model.parameters()) + head
    ours = sum(parts.values()) + head
    return {"model": backbone.spec.key, "config": getattr(backbone, "pathotune", PathoTuneConfig()).name,
            **parts, "head": head, "trainable": ours, "full_ft": full, "fraction": ours / full}


def shape_spec(name: str):
    """A registry-style spec of a standard ViT shape (``vit-s16``, ``vit-b16``), random init, no download."""
    from raypath.fm.registry import get_spec

    dims = {"vit-s16": (384, 6), "vit-b16": (768, 12)}
    if name not in dims:
        raise RaypathError(f"unknown ViT shape {name!r}: choose {', '.join(dims)}")
    d, heads = dims[name]
    base = get_spec("tiny-vit")
    kw = dict(img_size=224, patch_size=16, embed_dim=d, depth=12, num_heads=heads, mlp_ratio=4.0, num_classes=0)
    return replace(base, key=name, arch_kwargs=kw, img_size=224, patch_size=16, embed_dim=d, test_only=True,
                   notes=f"{name} shape (random init)")


def shapes_report(cfg: PathoTuneConfig | None = None, n_classes: int = 2, text_dim: int = 384) -> list[dict]:
    """:func:`trainable_report` for ViT-S/16 and ViT-B/16 shapes (random init; a random text embedding of
    ``text_dim`` stands in for the encoder: the count does not depend on its values)."""
    from raypath.fm.backbone import Backbone as _B
    from raypath.fm.backbone import build_model

    cfg = cfg or PathoTuneConfig()
    out = []
    for name in ("vit-s16", "vit-b16"):
        spec = shape_spec(name)
        bb = _B(spec, build_model(spec), weights_sha256="random:0")
        apply_pathotune(bb, cfg, text_embedding=torch.zeros(text_dim) if cfg.ttp else None)
        out.append(trainable_report(bb, n_classes))
    return out


def fraction_text(r: dict) -> str:
    """``"trainable / full = x.xx %"`` of a :func:`trainable_report` row."""
    return f"{r['trainable']:,} / {r['full_ft']:,} = {100 * r['fraction']:.2f} %"
