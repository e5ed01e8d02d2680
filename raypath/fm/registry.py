"""The foundation-model registry: one table of named specs, held as data.

A :class:`ModelSpec` says everything the embed and adapt stages need to know
about a patch encoder without importing it: how to build the network
(``family`` + ``arch`` + ``arch_kwargs``), what it eats (``img_size``,
``patch_size``, ``mean``/``std``), how features are read out of its tokens
(``readout``) and how wide they are (``embed_dim``).  Which layers an
adapter targets is the tuning layer's table (:mod:`raypath.fm.tuning`, per
method and family).  Weights are resolved by
:func:`raypath.fm.backbone.load_backbone` (local file/folder, Hugging Face cache,
or hub); how a family is built and run is :mod:`raypath.fm.families`.

Adding a model is adding a row to ``_SPECS`` below; nothing else changes.  A
private model is registered at run time with :func:`register_spec`, usually
from a plugin (:mod:`raypath.plugins`, ``--plugin module:attr``).

Families
--------
``timm``
    ``timm.create_model(arch, pretrained=False, **arch_kwargs)``.  String
    values ``"SwiGLUPacked"`` (``mlp_layer``) and ``"silu"`` (``act_layer``)
    are resolved to the timm/torch classes at build time so the table stays
    plain data.
``hf_vit``
    A Hugging Face vision transformer: ``arch`` is the ``model_type``
    (``"vit"``, ``"dinov2"``, ``"dinov2_with_registers"``) and
    ``arch_kwargs`` the config fields, built with
    ``AutoConfig.for_model(arch, **arch_kwargs)`` + ``AutoModel.from_config``.

Read-outs
---------
``cls``
    The class token of the last (normalised) layer.
``cls+mean_patch``
    Class token concatenated with the mean of the patch tokens, skipping the
    ``num_register_tokens`` register tokens (Virchow2: 1280 + 1280 = 2560).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypath.errors import RaypathError
from raypath.fm.tuning import target_modules

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: H-optimus-0/1 normalisation (from the model cards).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: Hibou normalisation (from the model card).
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)


@dataclass(frozen=True)
class ModelSpec:
    """A patch encoder, as data.

    Attributes
    ----------
    key
        Registry name (``"phikon"``, ``"virchow2"``, ``"tiny-vit"``, ...).
    family
        ``"timm"``, ``"hf_vit"``, or a family registered by a plugin
        (:func:`raypath.fm.families.register_family`).
    arch
        timm model name, or Hugging Face ``model_type``.
    arch_kwargs
        Keyword arguments of the timm factory, or Hugging Face config fields.
    img_size, patch_size
        Input side in px and ViT patch side in px.
    mean, std
        Per-channel normalisation applied to ``uint8 / 255``.
    readout
        ``"cls"`` or ``"cls+mean_patch"``.
    num_register_tokens
        Register tokens after the class token (skipped by the mean read-out).
    embed_dim
        Size of the feature vector after read-out.
    hf_repo
        Hugging Face repository holding the weights, or ``None``.
    gated
        The repository requires accepting a licence and a token.
    weight_files
        File names tried in ``hf_repo`` for single-file (timm) checkpoints.
    test_only
        Tiny specs for tests/benchmarks: random init allowed without weights.
    bundled, bundled_sha256
        A weights file shipped inside the package (``raypath/data/<bundled>``)
        and its sha256: used when no ``--weights`` is given, through the same
        loading code as downloaded FM weights, and refused if the file's
        sha256 differs (``raypath-small-ref``, the project's reference model).
    tuning_targets
        Per-method adapter targets that override :data:`raypath.fm.tuning.TARGETS`
        for this model (``{"dora": ("to_qkv",)}``; private models).
    """

    key: str
    family: str
    arch: str
    arch_kwargs: dict
    img_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    readout: str
    num_register_tokens: int
    embed_dim: int
    hf_repo: str | None
    gated: bool
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    test_only: bool = False
    bundled: str | None = None
    bundled_sha256: str | None = None
    notes: str = field(default="", compare=False)
    tuning_targets: dict = field(default_factory=dict, compare=False)

    @property
    def adapter_targets(self) -> tuple[str, ...]:
        """The default (DoRA) adapter targets: the row of the tuning table for this model."""
        return target_modules("dora", self)

    @property
    def num_prefix_tokens(self) -> int:
        """Class token + register tokens in front of the patch tokens."""
        return 1 + self.num_register_tokens

    def preprocessing(self) -> dict:
        """What the model's input pipeline does, for cache keys and manifests."""
        return {
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": "bilinear-antialias",
            "scale": "uint8/255",
            "readout": self.readout,
            "num_register_tokens": self.num_register_tokens,
        }


def _timm(key, arch, kw, *, dim, patch, mean=IMAGENET_MEAN, std=IMAGENET_STD, readout="cls",
          regs=0, repo=None, gated=True, out_dim=None, files=("model.safetensors", "pytorch_model.bin"),
          test_only=False, notes="", bundled=None, bundled_sha256=None):
    return ModelSpec(
        key=key, family="timm", arch=arch, arch_kwargs=dict(kw), img_size=kw.get("img_size", 224),
        patch_size=patch, mean=tuple(mean), std=tuple(std), readout=readout, num_register_tokens=regs,
        embed_dim=out_dim or dim, hf_repo=repo, gated=gated,
        weight_files=tuple(files), test_only=test_only, notes=notes, bundled=bundled, bundled_sha256=bundled_sha256,
    )


def _hf(key, arch, kw, *, dim, patch, img=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, regs=0,
        repo=None, gated=False, test_only=False, notes=""):
    return ModelSpec(
        key=key, family="hf_vit", arch=arch, arch_kwargs=dict(kw), img_size=img, patch_size=patch,
        mean=tuple(mean), std=tuple(std), readout="cls", num_register_tokens=regs, embed_dim=dim,
        hf_repo=repo, gated=gated, test_only=test_only, notes=notes,
    )


#: ``raypath-small``: a 6-block ViT of width 192 at 112 px, patch 16 (2.38 M parameters).
_SMALL_KW = dict(img_size=112, patch_size=16, embed_dim=192, depth=6, num_heads=3, mlp_ratio=3.0,
                 num_classes=0, dynamic_img_size=True)
#: The reference checkpoint shipped in ``raypath/data`` and its sha256 (``benchmarks/reference_model.sh``).
REFERENCE_WEIGHTS = "raypath_small_ref.safetensors"
REFERENCE_SHA256 = "0f538fc0beeccd97f6409667f18cc32e84511e6a22077cd4fed3e0ae278a4284"

_SPECS: tuple[ModelSpec, ...] = (
    _hf("phikon", "vit",
        dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
             num_attention_heads=12, intermediate_size=3072, qkv_bias=True, layer_norm_eps=1e-12),
        dim=768, patch=16, repo="owkin/phikon", gated=False, notes="iBOT ViT-B/16 (Owkin)"),
    _hf("phikon-v2", "dinov2",
        dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
             num_attention_heads=16, mlp_ratio=4, layerscale_value=1e-5, layer_norm_eps=1e-6),
        dim=1024, patch=16, repo="owkin/phikon-v2", gated=False, notes="DINOv2 ViT-L/16 (Owkin)"),
    _timm("uni", "vit_large_patch16_224",
          dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
          dim=1024, patch=16, repo="MahmoodLab/UNI", files=("pytorch_model.bin", "model.safetensors"),
          notes="DINOv2 ViT-L/16 (Mahmood lab)"),
    _timm("uni2-h", "vit_giant_patch14_224",
          dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
               mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked",
               act_layer="silu", reg_tokens=8, dynamic_img_size=True),
          dim=1536, patch=14, regs=8, repo="MahmoodLab/UNI2-h",
          files=("pytorch_model.bin", "model.safetensors"), notes="ViT-H/14, 8 registers"),
    _timm("virchow2", "vit_huge_patch14_224",
          dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, reg_tokens=4,
               global_pool="", dynamic_img_size=True, mlp_layer="SwiGLUPacked", act_layer="silu"),
          dim=1280, out_dim=2560, patch=14, regs=4, readout="cls+mean_patch", repo="paige-ai/Virchow2",
          notes="ViT-H/14, 4 registers; CLS || mean(patch tokens) = 2560"),
    _timm("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
          dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
          dim=1536, patch=14, regs=4, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
          repo="bioptimus/H-optimus-0", notes="ViT-g/14, 4 registers"),
    _timm("h-optimus-1", "vit_giant_patch14_reg4_dinov2",
          dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
          dim=1536, patch=14, regs=4, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
          repo="bioptimus/H-optimus-1", notes="ViT-g/14, 4 registers"),
    _timm("prov-gigapath", "vit_giant_patch14_dinov2",
          dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
               init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
          dim=1536, patch=16, repo="prov-gigapath/prov-gigapath",
          files=("pytorch_model.bin", "model.safetensors"), notes="tile encoder, ViT-g/16"),
    _hf("hibou-l", "dinov2_with_registers",
        dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
             num_attention_heads=16, mlp_ratio=4, layerscale_value=1e-5, num_register_tokens=4,
             layer_norm_eps=1e-6),
        dim=1024, patch=14, regs=4, mean=HIBOU_MEAN, std=HIBOU_STD, repo="histai/hibou-L", gated=True,
        notes="DINOv2 ViT-L/14 with 4 registers; weights in the transformers Dinov2WithRegisters layout"),
    # ---- trained in this project by `raypath pretrain` (DINO from scratch, docs/adaptation.md): --weights FILE
    _timm("raypath-small", "vit_small_patch16_224", _SMALL_KW, dim=192, patch=16, repo=None, gated=False,
          notes="ViT 6 blocks x 192 at 112 px (2.4 M parameters), pretrained with `raypath pretrain`"),
    _timm("raypath-small-ref", "vit_small_patch16_224", _SMALL_KW, dim=192, patch=16, repo=None, gated=False,
          bundled=REFERENCE_WEIGHTS, bundled_sha256=REFERENCE_SHA256,
          notes="the project's reference model: raypath-small pretrained from scratch by `raypath pretrain` "
                "(benchmarks/reference_model.sh, seed 1000), weights shipped in the package (docs/VALIDATION.md)"),
    # ---- tiny test specs: same code paths, random init allowed, >= 100 tiles/s on one CPU core
    _timm("tiny-vit", "vit_small_patch16_224",
          dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
               num_classes=0),
          dim=64, patch=8, repo=None, gated=False, test_only=True, notes="test model"),
    _timm("tiny-vit-reg", "vit_small_patch16_224",
          dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
               num_classes=0, reg_tokens=2, global_pool="", mlp_layer="SwiGLUPacked", act_layer="silu"),
          dim=64, out_dim=128, patch=8, regs=2, readout="cls+mean_patch", repo=None, gated=False,
          test_only=True, notes="test model with Virchow2-style registers and read-out"),
    _hf("tiny-hf-vit", "vit",
        dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=128, qkv_bias=True),
        dim=64, patch=8, img=32, repo=None, gated=False, test_only=True, notes="test model"),
)

_BY_KEY = {s.key: s for s in _SPECS}
_BUILTIN = frozenset(_BY_KEY)


def list_specs() -> list[ModelSpec]:
    """All registered specs: the table's, then those registered at run time."""
    return list(_BY_KEY.values())


def _norm_key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def register_spec(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Register a private model at run time (what a plugin does).

    Raises
    ------
    RaypathError
        The key is taken (by the table or another registration) and ``replace`` is false.
    """
    if not isinstance(spec, ModelSpec):
        raise RaypathError(f"{spec!r} is not a raypath.fm.registry.ModelSpec: build one to register a model")
    key = _norm_key(spec.key)
    if key != spec.key:
        raise RaypathError(f"model key {spec.key!r} must be lower case with '-' (use {key!r})")
    if key in _BUILTIN:
        raise RaypathError(f"model key {key!r} is a built-in model: register yours under another name")
    if key in _BY_KEY and not replace and _BY_KEY[key] != spec:
        raise RaypathError(f"model key {key!r} is already registered: pick another name")
    _BY_KEY[key] = spec
    return spec


def unregister_spec(key: str) -> None:
    """Remove a model registered with :func:`register_spec` (tests)."""
    k = _norm_key(key)
    if k in _BUILTIN:
        raise RaypathError(f"the built-in model {k!r} cannot be removed")
    _BY_KEY.pop(k, None)


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name`` (case-insensitive; ``_`` == ``-``).

    Raises
    ------
    RaypathError
        Unknown name; the message lists the known keys.
    """
    if isinstance(name, ModelSpec):
        return name
    key = _norm_key(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    import difflib

    close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RaypathError(
        f"unknown model {name!r}.{hint} Known models: {', '.join(_BY_KEY)} "
        "(see docs/embedding.md; a private model is registered by a plugin: --plugin module:attr, "
        "docs/ARCHITECTURE.md 'Extension points')"
    )
