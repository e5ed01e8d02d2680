"""Building foundation models from registry specs and loading their weights.

:func:`load_backbone` is the one function every stage uses to get a patch
encoder: it builds the network from its :class:`~raypath.fm.registry.ModelSpec`,
loads weights from

1. a local file (``.safetensors`` preferred; ``.bin``/``.pth``/``.pt`` through
   ``torch.load(weights_only=True)``, never unpickling arbitrary objects),
2. a local folder in the Hugging Face layout (``model.safetensors``,
   ``pytorch_model.bin`` or sharded ``*.index.json``),
3. the Hugging Face cache (offline), or the hub (online, with ``HF_TOKEN``),

optionally merges a peft adapter folder (LoRA/DoRA, ``save_pretrained``
layout), and wraps it in a :class:`Backbone` that takes ``uint8`` tiles and
returns read-out features.  Tests create random checkpoints with
:func:`save_random_checkpoint` and load them through the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from raypath.errors import RaypathError
from raypath.fm.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

#: ``weights`` value meaning "random init" (tests, benchmarks); ``"random:SEED"`` picks a seed.
RANDOM = "random"

#: Checkpoint keys that are fine to miss/ignore: heads and poolers we never use.
_IGNORED_PREFIXES = ("head.", "pooler.", "fc_norm.", "classifier.", "head_drop.")
#: Prefixes that wrappers add in front of the backbone's own keys.
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "vit.", "dinov2.", "encoder_model.")


class Backbone(torch.nn.Module):
    """A patch encoder with its preprocessing and read-out.

    Attributes
    ----------
    spec
        The registry spec it was built from.
    model
        The inner timm / Hugging Face module (what ``peft.get_peft_model`` wraps).
    weights_sha256, adapter_sha256
        sha256 of the loaded weights / adapter (``"random:<seed>"`` for random
        init; ``None`` without adapter).
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, weights_sha256: str | None = None,
                 adapter_sha256: str | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_sha256 = weights_sha256
        self.adapter_sha256 = adapter_sha256
        self.channels_last = False
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

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last-layer (normalised) tokens ``[B, T, D]``."""
        if self.spec.family == "timm":
            return self.model.forward_features(x)
        out = self.model(pixel_values=x)
        return out.last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, S, S]`` -> read-out features ``[B, embed_dim]``."""
        t = self.tokens(x)
        cls = t[:, 0]
        if self.spec.readout == "cls":
            return cls
        if self.spec.readout == "cls+mean_patch":
            return torch.cat([cls, t[:, self.spec.num_prefix_tokens:].mean(dim=1)], dim=-1)
        raise RaypathError(f"model {self.spec.key!r}: unknown read-out {self.spec.readout!r}")

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


def _timm_kwargs(spec: ModelSpec) -> dict:
    import timm.layers

    kw = dict(spec.arch_kwargs)
    if isinstance(kw.get("mlp_layer"), str):
        kw["mlp_layer"] = getattr(timm.layers, kw["mlp_layer"])
    return kw


def build_model(spec: ModelSpec, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """The bare network of ``spec`` with seeded random weights (eval mode), built on ``device``.

    Random weights are reproducible per device type (CPU and CUDA generators differ).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        if spec.family == "timm":
            import timm

            model = timm.create_model(spec.arch, pretrained=False, **_timm_kwargs(spec))
        elif spec.family == "hf_vit":
            from transformers import AutoConfig, AutoModel

            cfg = AutoConfig.for_model(spec.arch, **spec.arch_kwargs)
            extra = {"add_pooling_layer": False} if spec.arch == "vit" else {}
            try:
                model = AutoModel.from_config(cfg, attn_implementation="sdpa", **extra)
            except (ValueError, TypeError):
                model = AutoModel.from_config(cfg, **extra)
        else:
            raise RaypathError(f"model {spec.key!r}: unknown family {spec.family!r} (use 'timm' or 'hf_vit')")
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
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
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
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
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


def resolve_weights(spec: ModelSpec, weights: str | None) -> list[Path]:
    """The local weight files for ``weights`` (file, folder, or ``None`` = HF cache/hub)."""
    if weights is None:
        return _from_hub(spec)
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


def _mismatch(spec: ModelSpec, files: list[Path], missing: list[str], unexpected: list[str]) -> RaypathError:
    return RaypathError(
        f"weights {', '.join(str(f) for f in files)} do not match model {spec.key!r} "
        f"({spec.family}:{spec.arch}): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
        "Check that the checkpoint is this model's, or pick the matching --model"
    )


def _load_hf(spec: ModelSpec, files: list[Path]) -> torch.nn.Module:
    """Hugging Face models load through ``from_pretrained`` so that transformers'
    own key conversions apply (v5 renamed ViT modules; checkpoints keep the old names).
    The architecture always comes from the spec, not from a config shipped next to the weights."""
    import tempfile

    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(spec.arch, **spec.arch_kwargs)
    extra = {"add_pooling_layer": False} if spec.arch == "vit" else {}
    with tempfile.TemporaryDirectory(prefix="raypath-hf-") as d:
        cfg.save_pretrained(d)
        if len(files) == 1:
            name = "model.safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
            os.symlink(files[0].resolve(), os.path.join(d, name))
        else:
            folder = files[0].parent
            for f in list(files) + sorted(folder.glob("*.index.json")):
                os.symlink(f.resolve(), os.path.join(d, f.name))
        try:
            model, info = AutoModel.from_pretrained(d, config=cfg, output_loading_info=True, **extra)
        except (RuntimeError, ValueError, OSError) as e:
            raise RaypathError(f"weights do not fit model {spec.key!r}: {type(e).__name__}: {e}") from e
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_IGNORED_PREFIXES))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(_IGNORED_PREFIXES))
    if missing or unexpected or info.get("mismatched_keys"):
        raise _mismatch(spec, files, missing, unexpected + [str(m) for m in info.get("mismatched_keys", ())])
    return model.eval()


def load_weights_into(model: torch.nn.Module, files: list[Path], spec: ModelSpec) -> str:
    """Load ``files`` into a timm ``model`` strictly (heads/poolers excepted); returns the sha256."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_state_dict(f))
    own = set(model.state_dict())
    state = _normalise_keys(state, own)
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    missing = sorted(k for k in own - set(state) if not k.startswith(_IGNORED_PREFIXES))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise _mismatch(spec, files, missing, unexpected)
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


def load_backbone(
    name_or_spec: str | ModelSpec,
    weights: str | None = None,
    adapter: str | None = None,
    device: str = "cpu",
) -> Backbone:
    """Build a registered model, load its weights (and adapter), move it to ``device``.

    Parameters
    ----------
    name_or_spec
        Registry key (``"uni"``, ``"virchow2"``, ``"tiny-vit"``) or a :class:`ModelSpec`.
    weights
        Local checkpoint file or Hugging Face-layout folder; ``None`` = the HF
        cache (offline) or hub (online, ``HF_TOKEN``); ``"random"`` /
        ``"random:SEED"`` = seeded random init (the default for tiny test specs).
    adapter
        A peft adapter folder, merged into the weights (``merge_and_unload``).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Raises
    ------
    RaypathError
        Weights missing, gated, or not matching the architecture; bad adapter.
    """
    spec = get_spec(name_or_spec) if not isinstance(name_or_spec, ModelSpec) else name_or_spec
    seed = _parse_random(weights)
    if weights is None and spec.test_only:
        seed = 0
    if seed is not None:
        # large random models initialise ~10x faster on the GPU itself
        model = build_model(spec, seed=seed, device=device if str(device).startswith("cuda") else "cpu")
        sha = f"{RANDOM}:{seed}"
    else:
        files = resolve_weights(spec, weights)
        if spec.family == "hf_vit":
            model = _load_hf(spec, files)
            sha = _weights_sha256(files)
        else:
            model = build_model(spec)
            sha = load_weights_into(model, files, spec)
    ad_sha = None
    if adapter:
        model = _merge_adapter(model, adapter, spec)
        ad_sha = adapter_sha256(adapter)
    bb = Backbone(spec, model, weights_sha256=sha, adapter_sha256=ad_sha)
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb.to(device).eval()


def save_random_checkpoint(spec_or_name: str | ModelSpec, path: str, seed: int = 0) -> str:
    """Write a seeded random-init checkpoint of a spec as ``.safetensors`` (tests, benchmarks).

    Returns the path written; :func:`load_backbone` (``weights=path``) loads it.
    """
    from safetensors.torch import save_file

    spec = get_spec(spec_or_name) if not isinstance(spec_or_name, ModelSpec) else spec_or_name
    model = build_model(spec, seed=seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"raypath_model": spec.key, "seed": str(seed)})
    return str(out)
