"""The model-tuning layer: a tuning method is data, applied to any registered backbone.

Two tables hold everything a trainer needs to know about *how* a foundation
model is tuned; the trainers (``adapt``, patch classification, prompt
tuning) never branch on the model or its family:

``METHODS``
    ``frozen`` (features as they are), ``linear`` (a head on frozen
    features), ``lora`` / ``dora`` (peft adapters), ``full`` (every weight),
    ``prompt`` (VPT-deep prompt tokens, the backbone frozen).
``TARGETS``
    The adapter's ``target_modules`` per (method, backbone family), from the
    papers: DoRA on Phikon (Hugging Face ViT) ``query, key, value,
    projection`` -- ``projection`` is the patch-embedding conv, adapted too
    (Bøe et al. 2025); on Phikon-v2 ``query, key, value``; on Virchow2 and the
    other timm ViTs ``qkv``.  LoRA for patch classification (Ammeling et al.
    2025): ``qkv, proj, fc1, fc2`` on timm (peft matches name suffixes, so
    ``proj`` also takes the patch-embedding conv ``patch_embed.proj``, as in
    the paper's code), ``query, key, value, dense`` on Hugging Face models.

A family key is ``"<family>:<arch>"`` (``hf_vit:vit`` = Phikon's layout,
``hf_vit:dinov2`` = Phikon-v2's) with ``"<family>"`` as the fallback; a
spec may override a row with ``ModelSpec.tuning_targets`` (private models).

transformers >= 5 renamed the attention and MLP layers (``query`` ->
``q_proj``, ``dense`` -> ``o_proj`` / ``fc1`` / ``fc2``): the table keeps the
papers' names and :func:`peft_targets` adds the renamed ones that exist in
the network at hand, so the same row works with either version.

Example::

    from raypath.fm.backbone import load_backbone
    from raypath.fm.tuning import apply_method, trainable_parameters

    bb = apply_method(load_backbone("phikon", weights="/models/phikon"), "dora", rank=16)
    params = trainable_parameters(bb)      # the DoRA adapters only

This module imports neither torch nor peft at import time (the registry
reads its table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raypath.errors import RaypathError


@dataclass(frozen=True)
class TuningMethod:
    """How a backbone is tuned, as data.

    Attributes
    ----------
    name
        ``frozen``, ``linear``, ``lora``, ``dora``, ``full`` or ``prompt``.
    trains
        Which backbone parameters learn: ``"nothing"``, ``"adapter"``,
        ``"all"`` or ``"prompts"``.
    head
        A task head is trained on top of the features.
    use_dora
        peft ``LoraConfig(use_dora=...)`` (weight-decomposed LoRA).
    rank, alpha, dropout
        Adapter defaults (``r``, ``lora_alpha``, ``lora_dropout``).
    prompt_tokens
        Prompt tokens per layer (``prompt``).
    """

    name: str
    trains: str
    head: bool
    description: str
    use_dora: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    prompt_tokens: int = 0


METHODS: dict[str, TuningMethod] = {
    m.name: m
    for m in (
        TuningMethod("frozen", "nothing", False, "features of the pretrained backbone, nothing trained"),
        TuningMethod("linear", "nothing", True, "a linear head on frozen features (linear probe)"),
        TuningMethod("lora", "adapter", True, "LoRA adapters on the TARGETS modules + head"),
        TuningMethod("dora", "adapter", True, "DoRA adapters on the TARGETS modules + head", use_dora=True),
        TuningMethod("full", "all", True, "every backbone weight + head (full fine-tuning)"),
        TuningMethod("prompt", "prompts", True, "VPT-deep prompt tokens at every block + head, backbone frozen",
                     prompt_tokens=10),
    )
}

#: (method, family key) -> adapter target modules (module-name suffixes, the papers' names).
TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("dora", "hf_vit:vit"): ("query", "key", "value", "projection"),  # Phikon (Bøe et al.)
    ("dora", "hf_vit:dinov2"): ("query", "key", "value"),  # Phikon-v2 (Bøe et al.)
    ("dora", "hf_vit"): ("query", "key", "value"),  # other HF ViTs (Hibou)
    ("dora", "timm"): ("qkv",),  # Virchow2 (Bøe et al.), UNI, H-optimus, ...
    ("lora", "timm"): ("qkv", "proj", "fc1", "fc2"),  # patch classification (Ammeling et al.)
    ("lora", "hf_vit"): ("query", "key", "value", "dense"),  # patch classification, HF models
}

#: transformers >= 5 names of the layers the table names in the transformers 4 layout.
HF_RENAMES: dict[str, tuple[str, ...]] = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "dense": ("o_proj", "fc1", "fc2"),
}


def get_method(name: str | TuningMethod) -> TuningMethod:
    """The method called ``name``; the error lists the known ones."""
    if isinstance(name, TuningMethod):
        return name
    try:
        return METHODS[str(name).lower()]
    except KeyError:
        raise RaypathError(f"unknown tuning method {name!r}: choose one of {', '.join(METHODS)}") from None


def family_keys(spec) -> tuple[str, str]:
    """The table keys of a spec, most specific first."""
    return f"{spec.family}:{spec.arch}", spec.family


def target_modules(method: str | TuningMethod, spec) -> tuple[str, ...]:
    """The adapter targets of ``method`` on ``spec`` (the TARGETS row, or the spec's own).

    Raises
    ------
    RaypathError
        ``method`` has no adapter, or no row fits the spec's family.
    """
    m = get_method(method)
    own = getattr(spec, "tuning_targets", None) or {}
    if m.name in own:
        return tuple(own[m.name])
    if m.trains != "adapter":
        raise RaypathError(f"tuning method {m.name!r} has no adapter, so no target modules: use 'lora' or 'dora'")
    for key in family_keys(spec):
        if (m.name, key) in TARGETS:
            return TARGETS[(m.name, key)]
    raise RaypathError(
        f"no {m.name} target modules for model {spec.key!r} (family {spec.family!r}): pass --target-modules, "
        "or give the spec tuning_targets={'" + m.name + "': (...)} when registering it"
    )


def peft_targets(names: tuple[str, ...] | list[str], model: Any) -> list[str]:
    """``names`` plus their transformers-5 renames present in ``model``.

    Raises
    ------
    RaypathError
        None of the names is a module of ``model``.
    """
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    out = list(names)
    for n in names:
        if n not in present:
            out += [a for a in HF_RENAMES.get(n, ()) if a in present and a not in out]
    if not any(n in present for n in out):
        raise RaypathError(
            f"adapter target modules {list(names)} match no layer of the model: pass --target-modules with "
            "names of its linear/conv layers"
        )
    return out


def peft_config(method: str | TuningMethod, spec, model: Any, rank: int | None = None, alpha: float | None = None,
                dropout: float | None = None, targets: list[str] | tuple[str, ...] | None = None) -> Any:
    """The ``peft.LoraConfig`` of ``method`` on ``spec``'s network ``model``."""
    from peft import LoraConfig

    m = get_method(method)
    names = tuple(targets) if targets else target_modules(m, spec)
    return LoraConfig(
        r=rank or m.rank,
        lora_alpha=alpha if alpha is not None else m.alpha,
        lora_dropout=dropout if dropout is not None else m.dropout,
        target_modules=peft_targets(names, model),
        bias="none",
        use_dora=m.use_dora,
    )


def apply_method(backbone: Any, method: str | TuningMethod, *, rank: int | None = None, alpha: float | None = None,
                 dropout: float | None = None, targets: list[str] | tuple[str, ...] | None = None,
                 prompt_tokens: int | None = None) -> Any:
    """Prepare ``backbone`` (a :class:`raypath.fm.backbone.Backbone`) for ``method``, in place.

    Afterwards exactly the parameters the method trains have
    ``requires_grad``: none (``frozen``, ``linear``), the adapters (``lora``,
    ``dora``: ``backbone.model`` becomes a ``peft.PeftModel``), all
    (``full``), or the prompt tokens (``prompt``: ``backbone.prompts``).
    The random initialisation uses torch's global generator: seed it first.

    Returns
    -------
    The same backbone, with ``backbone.tuning`` = the method's name.
    """
    m = get_method(method)
    for p in backbone.parameters():
        p.requires_grad_(False)
    if m.trains == "adapter":
        from peft import get_peft_model

        cfg = peft_config(m, backbone.spec, backbone.model, rank, alpha, dropout, targets)
        try:
            backbone.model = get_peft_model(backbone.model, cfg)
        except ValueError as e:
            raise RaypathError(
                f"adapter target modules {sorted(cfg.target_modules)} do not fit model {backbone.spec.key!r}: {e}; "
                "pass --target-modules with names of its linear layers"
            ) from e
    elif m.trains == "all":
        for p in backbone.parameters():
            p.requires_grad_(True)
    elif m.trains == "prompts":
        n = m.prompt_tokens if prompt_tokens is None else int(prompt_tokens)
        backbone.add_prompts(n)
    backbone.tuning = m.name
    return backbone


def trainable_parameters(module: Any) -> dict[str, Any]:
    """``{name: parameter}`` of the parameters that learn."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
