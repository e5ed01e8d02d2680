"""Building foundation models from registry specs and loading their weights.

:func:`load_backbone` is the one function every stage uses to get a patch
encoder: it builds the network from its :class:`~raypath.fm.registry.ModelSpec`
(through the spec's :class:`~raypath.fm.families.Family`), loads weights from

1. a local file (``.safetensors`` preferred; ``.bin``/``.pth``/``.pt`` through
   ``torch.load(weights_only=True)``, never unpickling arbitrary objects),
2. a local folder in the Hugging Face layout (``model.safetensors``,
   ``pytorch_model.bin`` or sharded ``*.index.json``),
3. the Hugging Face cache (offline), or the hub (online, with ``HF_TOKEN``),

optionally merges a peft adapter folder (LoRA/DoRA, ``save_pretrained``
layout) or attaches trained prompt tokens, and wraps it in a
:class:`Backbone` that takes ``uint8`` tiles and returns read-out features.
Tests create random checkpoints with :func:`save_random_checkpoint` and load
them through the same path.

The read-out (:func:`read_out`) is defined once here: the class token, or
(Virchow2) the class token concatenated with the mean of the patch tokens
after the register tokens; prompt and extra prefix tokens are never read out.

The prompt hook (VPT-deep), :meth:`Backbone.prompted_tokens`: the backbone
runs block by block and prompt tokens are inserted before each block, in the
order ``CLS, registers, extra prefix tokens, prompts, patches``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from raypath.errors import RaypathError
from raypath.fm.families import IGNORED_PREFIXES, get_family, weights_mismatch
from raypath.fm.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

#: ``weights`` value meaning "random init" (tests, benchmarks); ``"random:SEED"`` picks a seed.
RANDOM = "random"

#: Prefixes that wrappers add in front of the backbone's own keys.
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "vit.", "dinov2.", "encoder_model.")

#: Tensor name of the prompt tokens in a prompt file (``save_prompts``).
PROMPTS_TENSOR = "prompts"


def read_out(spec: ModelSpec, tokens: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Features ``[B, embed_dim]`` from last-layer tokens ``[B, T, D]``.

    ``cls``: the class token.  ``cls+mean_patch``: the class token concatenated
    with the mean of the patch tokens, i.e. the tokens after the class token,
    the ``num_register_tokens`` registers and ``skip`` inserted (prompt/extra)
    tokens.
    """
    cls = tokens[:, 0]
    if spec.readout == "cls":
        return cls
    if spec.readout == "cls+mean_patch":
        return torch.cat([cls, tokens[:, spec.num_prefix_tokens + skip:].mean(dim=1)], dim=-1)
    raise RaypathError(f"model {spec.key!r}: unknown read-out {spec.readout!r} (use 'cls' or 'cls+mean_patch')")


class PromptTokens(torch.nn.Module):
    """Learnable VPT-deep prompt tokens: ``n_tokens`` per block, ``[n_layers, n_tokens, dim]``.

    Initialised uniformly in ``+-sqrt(6 / (3 * patch_size**2 + dim))`` (VPT,
    Jia et al. 2022).  Calling the module returns the per-layer list that
    :meth:`Backbone.prompted_tokens` takes.
    """

    def __init__(self, n_layers: int, n_tokens: int, dim: int, patch_size: int = 16):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        self.tokens = torch.nn.Parameter(torch.empty(n_layers, n_tokens, dim).uniform_(-bound, bound))

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def forward(self) -> list[torch.Tensor]:
        return list(self.tokens.unbind(0))


def _per_sample(t: torch.Tensor, batch: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """``[N, D]`` or ``[B, N, D]`` -> ``[B, N, D]`` in the hidden states' dtype/device."""
    if t.ndim == 2:
        t = t.unsqueeze(0).expand(batch, -1, -1)
    if t.ndim != 3 or t.shape[0] != batch or t.shape[-1] != like.shape[-1]:
        raise RaypathError(
            f"{what} must be shaped [N, {like.shape[-1]}] or [{batch}, N, {like.shape[-1]}], got {tuple(t.shape)}"
        )
    return t.to(device=like.device, dtype=like.dtype)


class Backbone(torch.nn.Module):
    """A patch encoder with its preprocessing and read-out.

    Attributes
    ----------
    spec
        The registry spec it was built from.
    model
        The inner timm / Hugging Face module (what ``peft.get_peft_model`` wraps).
    family
        The spec's :class:`~raypath.fm.families.Family` (how it is run).
    prompts
        :class:`PromptTokens` used by every forward pass, or ``None``.
    weights_sha256, adapter_sha256, prompt_sha256
        sha256 of the loaded weights / adapter / prompt file (``"random:<seed>"``
        for random init; ``None`` without adapter or prompts).
    tuning
        The :mod:`raypath.fm.tuning` method applied (``"frozen"`` when none).
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, weights_sha256: str | None = None,
                 adapter_sha256: str | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.family = get_family(spec.family)
        self.prompts: PromptTokens | None = None
        # tokens computed from the input and inserted once (PathoTune's TTP + IVP, raypath.fm.pathotune):
        # a module called as prompt_prefix(backbone, x) -> [B, M, D]
        self.prompt_prefix: torch.nn.Module | None = None
        self.weights_sha256 = weights_sha256
        self.adapter_sha256 = adapter_sha256
        self.prompt_sha256: str | None = None
        self.tuning = "frozen"
        self.channels_last = False
        self.any_size = False
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add
        self.register_buffer("_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("_shift", -mean / std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self._scale.device

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 (any device) -> normalised float ``[B, 3, S, S]`` on the model's device.

        Tiles whose side differs from ``spec.img_size`` are resized with
        bilinear interpolation (antialiased when shrinking).
        """
        if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
            raise RaypathError(
                f"preprocess expects uint8 tiles shaped [B, H, W, 3], got {tuple(images_uint8.shape)}"
            )
        x = images_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        s = self.spec.img_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = x * self._scale.float() + self._shift.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def allow_any_input_size(self) -> "Backbone":
        """Accept inputs of another side than ``spec.img_size`` (a multiple of the
        patch size; position embeddings interpolated), e.g. DINO's local crops."""
        self.family.allow_any_size(self.model)
        self.any_size = True
        return self

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last-layer (normalised) tokens ``[B, T, D]``: the network's own forward pass."""
        return self.family.tokens(self.model, x, self.any_size)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks, in order (what prompt tokens are prepended to)."""
        return list(self.family.blocks(self.model))

    def prompted_tokens(self, x: torch.Tensor, prompts: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
                        prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The prompt hook (VPT-deep): last-layer tokens with prompts inserted per block.

        Parameters
        ----------
        x
            Normalised images ``[B, 3, S, S]`` (:meth:`preprocess`).
        prompts
            Per-block prompt tokens, ``prompts[i]`` ``[N, D]`` (shared) or
            ``[B, N, D]`` (per image) entering block ``i``; at most one per
            block, the same ``N`` everywhere.  Block 0 must get some when any
            are given; a later block given ``None`` (or beyond the list) keeps
            the previous block's outputs at the prompt positions.  A tensor
            ``[L, N, D]`` is read as ``L`` blocks' prompts.
        prefix
            Extra tokens ``[M, D]`` or ``[B, M, D]`` inserted once before block
            0 and carried through every block (e.g. a projected text token).

        Returns
        -------
        ``(tokens [B, T, D], n_inserted)`` where tokens are ordered
        ``CLS, registers, prefix (M), prompts (N), patches`` and
        ``n_inserted = M + N`` is what :func:`read_out` skips.  With no
        prompts and no prefix the result equals :meth:`tokens` bit for bit.
        """
        fam, blocks = self.family, self.blocks
        plist = list(prompts.unbind(0) if isinstance(prompts, torch.Tensor) else (prompts or []))
        if len(plist) > len(blocks):
            raise RaypathError(f"{len(plist)} prompt layers given for a backbone with {len(blocks)} blocks")
        if plist and plist[0] is None:
            raise RaypathError("prompts[0] is None: the first block must get the prompt tokens (or give none)")
        h = fam.stem(self.model, x, self.any_size)
        batch, start = h.shape[0], self.spec.num_prefix_tokens
        n = int(plist[0].shape[-2]) if plist else 0
        if any(p is not None and p.shape[-2] != n for p in plist):
            raise RaypathError(f"every block's prompts must have the same number of tokens ({n})")
        inserted = [_per_sample(prefix, batch, h, "prefix tokens")] if prefix is not None else []
        start += inserted[0].shape[1] if inserted else 0
        if n:
            inserted.append(_per_sample(plist[0], batch, h, "prompts[0]"))
        if inserted:
            h = torch.cat([h[:, : self.spec.num_prefix_tokens], *inserted, h[:, self.spec.num_prefix_tokens:]], dim=1)
        for i, blk in enumerate(blocks):
            if 0 < i < len(plist) and plist[i] is not None and n:
                h = torch.cat([h[:, :start], _per_sample(plist[i], batch, h, f"prompts[{i}]"), h[:, start + n:]], dim=1)
            h = fam.run_block(blk, h)
        return fam.head_norm(self.model, h), start - self.spec.num_prefix_tokens + n

    def add_prompts(self, n_tokens: int, n_layers: int | None = None) -> PromptTokens:
        """Attach fresh trainable :class:`PromptTokens` (every block by default)."""
        width = self.family.width(self.model)
        self.prompts = PromptTokens(n_layers or len(self.blocks), n_tokens, width, self.spec.patch_size).to(self.device)
        return self.prompts

    def features(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images -> read-out features ``[B, embed_dim]`` (with this backbone's prompts, if any)."""
        if prefix is None and self.prompt_prefix is not None:
            prefix = self.prompt_prefix(self, x)
        if self.prompts is None and prefix is None:
            return read_out(self.spec, self.tokens(x))
        t, skip = self.prompted_tokens(x, self.prompts() if self.prompts is not None else None, prefix)
        return read_out(self.spec, t, skip)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images -> read-out features ``[B, embed_dim]``."""
        return self.features(x, prefix)

    @torch.inference_mode()
    def embed(self, images_uint8: torch.Tensor, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 tiles -> float32 features (inference mode, optional autocast on GPU)."""
        x = self.preprocess(images_uint8)
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            return self(x).float()


# --------------------------------------------------------------------------- building


def build_model(spec: ModelSpec, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """The bare network of ``spec`` with seeded random weights (eval mode), built on ``device``.

    Random weights are reproducible per device type (CPU and CUDA generators differ).
    """
    family = get_family(spec.family)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = family.build(spec)
    return model.eval()


# --------------------------------------------------------------------------- weights


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _weight_files_in(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = folder / index
        if p.exists():
            names = sorted(set(json.loads(p.read_text())["weight_map"].values()))
            return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt"):
        if (folder / name).exists():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return found


def unwrap_checkpoint(obj):
    """The state_dict inside a training checkpoint (``state_dict``/``model``/``teacher``/``module`` keys)."""
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects beyond tensors are refused on purpose
        raise RaypathError(
            f"cannot load weights {str(path)!r} safely ({type(e).__name__}: {e}); "
            "convert the checkpoint to .safetensors or save a plain state_dict"
        ) from e
    obj = unwrap_checkpoint(obj)
    if not isinstance(obj, dict):
        raise RaypathError(f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    return obj


def _hub_hint(spec: ModelSpec) -> str:
    if not spec.hf_repo:
        return "pass --weights /path/model.safetensors"
    gate = " after accepting the licence on its model page and setting HF_TOKEN" if spec.gated else ""
    return (
        f"download it with `huggingface-cli download {spec.hf_repo}`{gate}, "
        "or pass --weights /path/model.safetensors (or a folder in the Hugging Face layout)"
    )


def _from_hub(spec: ModelSpec) -> list[Path]:
    """Weight files of ``spec.hf_repo`` from the HF cache, else the hub (unless offline)."""
    if not spec.hf_repo:
        raise RaypathError(f"model {spec.key!r} has no hub repository: pass --weights /path/model.safetensors")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise RaypathError(f"huggingface_hub is missing; {_hub_hint(spec)}") from e
    from raypath.io.quiet import offline_unless_hub_reachable

    offline = offline_unless_hub_reachable()  # no network: fail now, not after a minute of retries
    last: Exception | None = None
    for local_only in (True, False) if not offline else (True,):
        for fname in spec.weight_files:
            try:
                return [Path(hf_hub_download(spec.hf_repo, fname, local_files_only=local_only))]
            except GatedRepoError as e:
                raise RaypathError(
                    f"model {spec.key!r} ({spec.hf_repo}) is gated and your token has no access: "
                    f"{_hub_hint(spec)}"
                ) from e
            except RepositoryNotFoundError as e:
                raise RaypathError(
                    f"model {spec.key!r}: repository {spec.hf_repo} not found or not visible with your "
                    f"token (HF_TOKEN {'set' if os.environ.get('HF_TOKEN') else 'not set'}); {_hub_hint(spec)}"
                ) from e
            except (HfHubHTTPError, OSError, ValueError) as e:  # not cached / no network / not in repo
                last = e
                continue
    where = "the Hugging Face cache (offline mode)" if offline else "the Hugging Face cache or the hub"
    raise RaypathError(
        f"weights of model {spec.key!r} not found in {where} "
        f"({type(last).__name__ if last else 'no file'}): {_hub_hint(spec)}"
    )


def bundled_weights(spec: ModelSpec) -> Path:
    """The weights file shipped in the package for ``spec``, its sha256 checked."""
    path = Path(__file__).resolve().parents[1] / "data" / str(spec.bundled)
    if not path.is_file():
        raise RaypathError(f"the weights of {spec.key!r} ({path}) are missing from this installation: "
                           "reinstall raypath, or pass --weights /path/model.safetensors")
    sha = sha256_file(path)
    if spec.bundled_sha256 and sha != spec.bundled_sha256:
        raise RaypathError(f"the weights of {spec.key!r} ({path}) have sha256 {sha[:12]}..., not the recorded "
                           f"{spec.bundled_sha256[:12]}...: the file is damaged; reinstall raypath")
    return path


def resolve_weights(spec: ModelSpec, weights: str | None) -> list[Path]:
    """The local weight files for ``weights`` (file, folder, or ``None`` = the
    package's bundled file, else the HF cache/hub)."""
    if weights is None:
        return [bundled_weights(spec)] if spec.bundled else _from_hub(spec)
    p = Path(weights).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = _weight_files_in(p)
        if not files:
            raise RaypathError(
                f"weights folder {str(p)!r} has no model.safetensors / pytorch_model.bin: "
                "pass the checkpoint file itself or a Hugging Face model folder"
            )
        return files
    raise RaypathError(
        f"weights {weights!r} for model {spec.key!r} do not exist: {_hub_hint(spec)}"
    )


def _normalise_keys(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        key = k
        while key not in own and key.startswith(_STRIP_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = v
    return out


def _weights_sha256(files: list[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def load_weights_into(model: torch.nn.Module, files: list[Path], spec: ModelSpec) -> str:
    """Load ``files`` into a timm ``model`` strictly (heads/poolers excepted); returns the sha256."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_state_dict(f))
    own = set(model.state_dict())
    state = _normalise_keys(state, own)
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(k for k in own - set(state) if not k.startswith(IGNORED_PREFIXES))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise weights_mismatch(spec, files, missing, unexpected)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise RaypathError(f"weights do not fit model {spec.key!r}: {e}") from e
    return _weights_sha256(files)


def adapter_sha256(adapter_dir: str | os.PathLike) -> str:
    """sha256 over the adapter folder's config and weight files."""
    d = Path(adapter_dir)
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json")):
            h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _merge_adapter(model: torch.nn.Module, adapter: str, spec: ModelSpec) -> torch.nn.Module:
    d = Path(adapter).expanduser()
    if not (d / "adapter_config.json").exists():
        raise RaypathError(
            f"adapter {adapter!r} is not a peft adapter folder (no adapter_config.json): pass the folder "
            "written by `raypath adapt` (adapters/<run>/) or by PeftModel.save_pretrained"
        )
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(d))
    except Exception as e:
        raise RaypathError(
            f"adapter {adapter!r} does not fit model {spec.key!r}: {type(e).__name__}: {e}. "
            "Use the adapter trained on this model"
        ) from e
    return peft_model.merge_and_unload().eval()


def _parse_random(weights: str | None) -> int | None:
    if weights is None:
        return None
    if weights == RANDOM:
        return 0
    if weights.startswith(RANDOM + ":"):
        return int(weights.split(":", 1)[1])
    return None


def weights_sha256_of(spec: ModelSpec, weights: str | None) -> str:
    """The identity of ``weights`` for ``spec`` without building the model:
    ``"random:<seed>"`` for random init, else the sha256 of the weight files."""
    seed = _parse_random(weights)
    if weights is None and spec.test_only:
        seed = 0
    if seed is not None:
        return f"{RANDOM}:{seed}"
    return _weights_sha256(resolve_weights(spec, weights))


def resolve_model(name_or_spec: str | ModelSpec) -> ModelSpec:
    """The spec of a registry key, after loading the plugins that may register it."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    from raypath.plugins import load_plugins

    load_plugins()
    return get_spec(name_or_spec)


def load_backbone(
    name_or_spec: str | ModelSpec,
    weights: str | None = None,
    adapter: str | None = None,
    device: str = "cpu",
    prompts: str | None = None,
) -> Backbone:
    """Build a registered model, load its weights (and adapter or prompts), move it to ``device``.

    Parameters
    ----------
    name_or_spec
        Registry key (``"uni"``, ``"virchow2"``, ``"tiny-vit"``, a plugin's key) or a :class:`ModelSpec`.
    weights
        Local checkpoint file or Hugging Face-layout folder; ``None`` = the HF
        cache (offline) or hub (online, ``HF_TOKEN``); ``"random"`` /
        ``"random:SEED"`` = seeded random init (the default for tiny test specs).
    adapter
        A peft adapter folder, merged into the weights (``merge_and_unload``).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    prompts
        A prompt file written by :func:`save_prompts` (VPT-deep tokens used by every forward pass).

    Raises
    ------
    RaypathError
        Weights missing, gated, or not matching the architecture; bad adapter or prompt file.

    Example
    -------
    >>> bb = load_backbone("tiny-vit")                        # doctest: +SKIP
    >>> bb.embed(torch.zeros(2, 224, 224, 3, dtype=torch.uint8)).shape
    torch.Size([2, 64])
    """
    spec = resolve_model(name_or_spec)
    family = get_family(spec.family)
    seed = _parse_random(weights)
    if weights is None and spec.test_only:
        seed = 0
    if seed is not None:
        # large random models initialise ~10x faster on the GPU itself
        model = build_model(spec, seed=seed, device=device if str(device).startswith("cuda") else "cpu")
        sha = f"{RANDOM}:{seed}"
    else:
        files = resolve_weights(spec, weights)
        model = family.load(spec, files)
        if model is None:  # a plain state_dict into the family's network
            model = build_model(spec)
            sha = load_weights_into(model, files, spec)
        else:
            sha = _weights_sha256(files)
    ad_sha = None
    if adapter:
        model = _merge_adapter(model, adapter, spec)
        ad_sha = adapter_sha256(adapter)
    bb = Backbone(spec, model, weights_sha256=sha, adapter_sha256=ad_sha)
    if prompts:
        load_prompts(bb, prompts)
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb.to(device).eval()


def save_prompts(backbone: Backbone, path: str) -> str:
    """Write ``backbone.prompts`` as ``.safetensors`` (tensor ``prompts`` ``[L, N, D]``); returns its sha256."""
    from safetensors.torch import save_file

    if backbone.prompts is None:
        raise RaypathError("the backbone has no prompt tokens to save: apply the 'prompt' tuning method first")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({PROMPTS_TENSOR: backbone.prompts.tokens.detach().cpu().contiguous()}, str(out),
              metadata={"raypath_model": backbone.spec.key, "weights_sha256": str(backbone.weights_sha256)})
    return sha256_file(out)


def prompt_file_kind(path: str) -> str:
    """``"vpt"`` (a :func:`save_prompts` file) or the ``raypath_kind`` a prompt file's metadata names
    (``"pathotune"``: TVP + TTP + IVP, :mod:`raypath.fm.pathotune`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("raypath_kind", "vpt")


def load_prompts(backbone: Backbone, path: str) -> Backbone:
    """Attach the prompt tokens of a :func:`save_prompts` file to ``backbone``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if prompt_file_kind(path) != "vpt":
            raise RaypathError(f"prompt file {path!r} is a {prompt_file_kind(path)} file: load it with "
                               "raypath.fm.pathotune.load_prompt_file (raypath embed --prompts does)")
        t = load_file(str(path))[PROMPTS_TENSOR]
    except (OSError, KeyError, SafetensorError) as e:
        raise RaypathError(
            f"prompt file {path!r} cannot be read ({type(e).__name__}: {e}): pass a file written by "
            "raypath.fm.backbone.save_prompts"
        ) from e
    width, n_blocks = backbone.family.width(backbone.model), len(backbone.blocks)
    if t.ndim != 3 or t.shape[-1] != width or t.shape[0] > n_blocks:
        raise RaypathError(
            f"prompt file {path!r} holds tokens shaped {tuple(t.shape)}, which do not fit model "
            f"{backbone.spec.key!r} ({n_blocks} blocks of width {width}): use the prompts trained on this model"
        )
    backbone.prompts = PromptTokens(t.shape[0], t.shape[1], width, backbone.spec.patch_size)
    with torch.no_grad():
        backbone.prompts.tokens.copy_(t)
    backbone.prompts.to(backbone.device)
    backbone.prompt_sha256 = sha256_file(path)
    backbone.tuning = "prompt"
    return backbone


def save_random_checkpoint(spec_or_name: str | ModelSpec, path: str, seed: int = 0) -> str:
    """Write a seeded random-init checkpoint of a spec as ``.safetensors`` (tests, benchmarks).

    Returns the path written; :func:`load_backbone` (``weights=path``) loads it.
    """
    from safetensors.torch import save_file

    spec = resolve_model(spec_or_name)
    model = build_model(spec, seed=seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"raypath_model": spec.key, "seed": str(seed)})
    return str(out)
