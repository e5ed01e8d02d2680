"""Model families: how one kind of network is built, loaded, run and opened up.

A :class:`~raypath.fm.registry.ModelSpec` names its family (``spec.family``).
Everything that differs between a timm ViT and a Hugging Face ViT lives in
one :class:`Family` object here, found with :func:`get_family`; no other
module branches on the family.  A private model whose network is neither
registers its own family (:func:`register_family`, usually from a plugin:
see :mod:`raypath.plugins`).

What a family provides
----------------------
``build(spec)``
    The bare network with random weights (the caller seeds and picks the device).
``load(spec, files)``
    The network with the weights in ``files``, or ``None`` to let
    :func:`raypath.fm.backbone.load_backbone` build it and load the files as a
    strict ``state_dict`` (enough for any plain ``nn.Module``).
``tokens(model, x, any_size)``
    Last-layer, normalised tokens ``[B, T, D]`` in the family's own order
    (class token first, then register tokens, then patch tokens).
``allow_any_size(model)``
    Let the network take inputs of another side (DINO's local crops).
``stem`` / ``blocks`` / ``run_block`` / ``head_norm`` / ``width``
    The same forward pass in pieces, for the prompt hook
    (:meth:`raypath.fm.backbone.Backbone.prompted_tokens`): the tokens that
    enter the first block, the blocks, one block's call, the final norm.
    ``stem`` + every ``run_block`` + ``head_norm`` computes exactly what
    ``tokens`` computes.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Sequence

from raypath.errors import RaypathError

#: Checkpoint keys that are fine to miss/ignore: heads and poolers we never use.
IGNORED_PREFIXES = ("head.", "pooler.", "fc_norm.", "classifier.", "head_drop.")


def weights_mismatch(spec, files: list[Path], missing: list[str], unexpected: list[str]) -> RaypathError:
    """The error for a checkpoint that does not fit ``spec``'s network."""
    return RaypathError(
        f"weights {', '.join(str(f) for f in files)} do not match model {spec.key!r} "
        f"({spec.family}:{spec.arch}): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
        "Check that the checkpoint is this model's, or pick the matching --model"
    )


def base_model(model: Any) -> Any:
    """The network inside a peft wrapper (adapters are injected in place, so
    running the base network's blocks runs the adapters too)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class Family:
    """One kind of network.  Subclass it for a private model (see the module docstring)."""

    name = "custom"

    def build(self, spec) -> Any:
        raise NotImplementedError

    def load(self, spec, files: list[Path]) -> Any | None:
        return None

    def tokens(self, model: Any, x: Any, any_size: bool = False) -> Any:
        raise NotImplementedError

    def allow_any_size(self, model: Any) -> None:
        return None

    # ---- the pieces of the forward pass (prompt hook)
    def _no_hook(self) -> RaypathError:
        return RaypathError(
            f"model family {self.name!r} does not expose its blocks, so prompt tuning cannot use it: "
            "implement stem/blocks/head_norm in its raypath.fm.families.Family, or use another --method"
        )

    def stem(self, model: Any, x: Any, any_size: bool = False) -> Any:
        raise self._no_hook()

    def blocks(self, model: Any) -> Sequence[Any]:
        raise self._no_hook()

    def run_block(self, block: Any, x: Any) -> Any:
        return block(x)

    def head_norm(self, model: Any, x: Any) -> Any:
        raise self._no_hook()

    def width(self, model: Any) -> int:
        """Token width ``D`` (the size of one prompt token)."""
        raise self._no_hook()


class TimmFamily(Family):
    """``timm.create_model(arch, **arch_kwargs)``: the VisionTransformer layout
    (patch_embed, _pos_embed, norm_pre, blocks, norm)."""

    name = "timm"

    @staticmethod
    def kwargs(spec) -> dict:
        import timm.layers

        kw = dict(spec.arch_kwargs)
        if isinstance(kw.get("mlp_layer"), str):
            kw["mlp_layer"] = getattr(timm.layers, kw["mlp_layer"])
        return kw

    def build(self, spec) -> Any:
        import timm

        return timm.create_model(spec.arch, pretrained=False, **self.kwargs(spec))

    def tokens(self, model, x, any_size=False):
        return model.forward_features(x)

    def allow_any_size(self, model) -> None:
        """Position embeddings interpolated per call, as timm does with
        ``dynamic_img_size=True`` (any side that is a multiple of the patch size)."""
        m = base_model(model)
        pe = getattr(m, "patch_embed", None)
        if pe is None or not hasattr(m, "dynamic_img_size") or m.dynamic_img_size:
            return
        from timm.layers import Format

        m.dynamic_img_size = True
        pe.strict_img_size = False
        pe.flatten = False
        pe.output_fmt = Format.NHWC

    def stem(self, model, x, any_size=False):
        m = base_model(model)
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def blocks(self, model):
        return list(base_model(model).blocks)

    def head_norm(self, model, x):
        return base_model(model).norm(x)

    def width(self, model):
        return int(base_model(model).embed_dim)


class HFViTFamily(Family):
    """A Hugging Face vision transformer (``vit``, ``dinov2``,
    ``dinov2_with_registers``) built from the spec's config fields."""

    name = "hf_vit"

    @staticmethod
    def _config(spec):
        from transformers import AutoConfig

        return AutoConfig.for_model(spec.arch, **spec.arch_kwargs)

    @staticmethod
    def _extra(spec) -> dict:
        return {"add_pooling_layer": False} if spec.arch == "vit" else {}

    def build(self, spec):
        from transformers import AutoModel

        cfg = self._config(spec)
        try:
            return AutoModel.from_config(cfg, attn_implementation="sdpa", **self._extra(spec))
        except (ValueError, TypeError):
            return AutoModel.from_config(cfg, **self._extra(spec))

    def load(self, spec, files):
        """Through ``from_pretrained`` so that transformers' own key conversions apply
        (v5 renamed ViT modules; checkpoints keep the old names).  The
        architecture always comes from the spec, not from a config shipped next to the weights."""
        import tempfile

        from transformers import AutoModel

        cfg = self._config(spec)
        with tempfile.TemporaryDirectory(prefix="raypath-hf-") as d:
            cfg.save_pretrained(d)
            if len(files) == 1:
                name = "model.safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
                os.symlink(files[0].resolve(), os.path.join(d, name))
            else:
                for f in list(files) + sorted(files[0].parent.glob("*.index.json")):
                    os.symlink(f.resolve(), os.path.join(d, f.name))
            try:
                model, info = AutoModel.from_pretrained(d, config=cfg, output_loading_info=True, **self._extra(spec))
            except (RuntimeError, ValueError, OSError) as e:
                raise RaypathError(f"weights do not fit model {spec.key!r}: {type(e).__name__}: {e}") from e
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(IGNORED_PREFIXES))
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(IGNORED_PREFIXES))
        if missing or unexpected or info.get("mismatched_keys"):
            raise weights_mismatch(spec, files, missing, unexpected + [str(m) for m in info.get("mismatched_keys", ())])
        return model.eval()

    @staticmethod
    def _interp(model, any_size: bool) -> dict:
        # ViT interpolates position embeddings only when asked; DINOv2 always does
        if not any_size:
            return {}
        emb = base_model(model).embeddings
        return {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(emb.forward).parameters else {}

    def tokens(self, model, x, any_size=False):
        return model(pixel_values=x, **self._interp(model, any_size)).last_hidden_state

    def stem(self, model, x, any_size=False):
        m = base_model(model)
        w = m.embeddings.patch_embeddings.projection.weight
        if x.dtype != w.dtype:  # as the model's own forward does
            x = x.to(w.dtype)
        return m.embeddings(x, **self._interp(model, any_size))

    def blocks(self, model):
        m = base_model(model)
        return list(m.layers if hasattr(m, "layers") else m.encoder.layer)

    def run_block(self, block, x):
        out = block(x, None)  # no attention mask: every token attends to every token
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple

    def head_norm(self, model, x):
        return base_model(model).layernorm(x)

    def width(self, model):
        return int(base_model(model).config.hidden_size)


_FAMILIES: dict[str, Family] = {"timm": TimmFamily(), "hf_vit": HFViTFamily()}


def register_family(family: Family, replace: bool = False) -> Family:
    """Make ``family`` available as ``ModelSpec.family == family.name``."""
    if not isinstance(family, Family):
        raise RaypathError(f"{family!r} is not a raypath.fm.families.Family: subclass it to register a model family")
    if family.name in _FAMILIES and not replace and _FAMILIES[family.name] is not family:
        raise RaypathError(f"model family {family.name!r} is already registered: pick another name")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family registered by :func:`register_family` (tests)."""
    if name in ("timm", "hf_vit"):
        raise RaypathError(f"the built-in family {name!r} cannot be removed")
    _FAMILIES.pop(name, None)


def get_family(name: str) -> Family:
    """The family called ``name``; the error lists the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise RaypathError(
            f"unknown model family {name!r} (known: {', '.join(sorted(_FAMILIES))}): register it from a "
            "plugin (raypath.plugins.register_family) or use 'timm' / 'hf_vit'"
        ) from None


def list_families() -> list[str]:
    return sorted(_FAMILIES)
