"""What a feature store *is*: one identity, derived and checked in one place.

Every writer (``embed``, generated variants) derives a :class:`FeatureIdentity`
with :func:`derive_identity` and writes it into ``manifest.json``; every
reader (``mil``, ``robustness``, the sweep, ``patch``, ``predict``) gets it
back with :func:`store_identity` and compares it with what it expects with
:func:`check_store`, which stops with a :class:`~raypath.errors.RaypathError`
naming the difference and the remedy.

The identity holds

* ``model`` -- the registry key;
* ``weights_sha256`` -- sha256 of the weight files (``random:<seed>`` for random init);
* ``adapter_sha256`` / ``prompt_sha256`` -- the peft adapter folder / prompt file, or ``None``;
* ``preprocessing`` -- the model's input pipeline (side, mean/std, read-out);
* ``tiling`` -- ``{"target_mpp", "tile_px"}`` of the tiles embedded;
* ``decode`` -- how tiles were decoded and resized (:data:`DEFAULT_DECODE`);
* ``variant`` -- the generated technical variant, or ``None`` for the slides as scanned;
* ``inputs_sha256`` -- the digest of the inputs: every slide's fingerprint and tile geometry.

``model_key`` (the folder name ``features/<model_key>``) is derived from the
weights, adapter and prompts: ``<registry key>-<8 hex>`` (generated variants
live inside their model's folder, ``variants/v<k>/``).  Without prompts it
is the key raypath has always written, and the per-slide cache keys are
unchanged too, so existing feature folders stay readable and up to date.  A manifest written before
the identity existed is read back field by field (:func:`identity_of_manifest`).

Example::

    from raypath.embed.identity import check_store, derive_identity

    want = derive_identity("uni", weights="/models/uni/pytorch_model.bin")
    check_store("work/features/uni-1a2b3c4d", want)   # RaypathError if other weights made them
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from raypath.errors import RaypathError

#: The decode path of :mod:`raypath.wsi.reader`: each stored JPEG tile decoded once,
#: ``read_px`` resized to ``tile_px`` with PIL bilinear, then bilinear+antialias to the model's side on the device.
DEFAULT_DECODE = "fast-reader:pil-bilinear"
#: ``raypath embed --decode scaled``: when a read is downsampled, stored JPEG tiles are decoded at
#: 1/2, 1/4 or 1/8 inside libjpeg-turbo (DCT scaling), then resized with PIL bilinear if still needed.
SCALED_DECODE = "fast-reader:dct-scaled+pil-bilinear"
#: ``raypath embed --decode gpu``: compressed tiles decoded by the model actor (torchvision decode_jpeg:
#: nvJPEG on CUDA), read square resized on the device (bilinear, antialiased).
GPU_DECODE = "actor-decode_jpeg:torch-bilinear-antialias"


def decode_id(mode: str) -> str:
    """The identity's ``decode`` value of a reader decode mode (``"full"`` / ``"scaled"``)."""
    return {"full": DEFAULT_DECODE, "scaled": SCALED_DECODE, "gpu": GPU_DECODE}[mode]
#: Tile geometry columns hashed per slide (int64 each).
TILE_COLUMNS = ("tile_id", "x", "y", "level", "read_px", "tile_px")
#: Fields that say which model made the features (not which slides or tiles).
MODEL_FIELDS = ("model", "weights_sha256", "adapter_sha256", "prompt_sha256", "preprocessing", "variant")
#: Fields where ``None`` is a value (no adapter, no prompts, the slides as scanned), not "unknown".
NONE_MEANS_NONE = ("adapter_sha256", "prompt_sha256", "variant")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass(frozen=True)
class FeatureIdentity:
    """The identity of a feature store (see the module docstring); ``None`` = not known."""

    model: str
    weights_sha256: str | None = None
    adapter_sha256: str | None = None
    prompt_sha256: str | None = None
    preprocessing: dict | None = None
    tiling: dict | None = None
    decode: str | None = None
    variant: Any = None
    inputs_sha256: str | None = None

    @property
    def model_key(self) -> str:
        return make_model_key(self.model, self.weights_sha256 or "", self.adapter_sha256, self.prompt_sha256)

    @property
    def spec(self):
        """The registry spec of ``model`` (plugins loaded first)."""
        from raypath.fm.backbone import resolve_model

        return resolve_model(self.model)

    @property
    def digest(self) -> str:
        """sha256 over every field: equal digests = the same features of the same inputs."""
        return _sha(self.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureIdentity":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_inputs(self, entries: Mapping[str, Mapping]) -> "FeatureIdentity":
        return replace(self, inputs_sha256=inputs_digest(entries))

    def replace(self, **kw: Any) -> "FeatureIdentity":
        return replace(self, **kw)


def make_model_key(key: str, weights_sha256: str, adapter_sha256: str | None, prompt_sha256: str | None = None) -> str:
    """``<registry key>-<first 8 hex of sha256(weights|adapter[|prompt])>``.

    Prompts enter the hash only when set, so the keys of stores written before
    they existed do not change.
    """
    doc = f"{weights_sha256}|{adapter_sha256 or ''}"
    if prompt_sha256:
        doc += f"|prompt:{prompt_sha256}"
    return f"{key}-{hashlib.sha256(doc.encode()).hexdigest()[:8]}"


def store_name(model_key: str, adapter: str | None = None) -> str:
    """The feature-store folder name people can tell apart: ``<model>[+<adapter run>]-<hash>``.

    ``model_key`` (``<model>-<hash>``) stays the identity; an adapter's run name
    (the last part of its folder) only makes the folder readable.
    """
    if not adapter:
        return model_key
    model, digest = model_key.rsplit("-", 1)
    run = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in str(adapter).rstrip("/").rsplit("/", 1)[-1])
    return f"{model}+{run}-{digest}" if run else model_key


def default_store_dir(workdir: str, model_key: str, adapter: str | None = None, s3=None) -> str:
    """``<workdir>/features/<store name>``; a store written under the bare model key
    by an older raypath (``features/<model>-<hash>``) keeps being used."""
    from raypath.io.storage import exists, join

    old = join(workdir, "features", model_key)
    name = store_name(model_key, adapter)
    if name != model_key and exists(join(old, "manifest.json"), s3):
        return old
    return join(workdir, "features", name)


def tiles_hash(tiles: pd.DataFrame) -> str:
    """sha256 of a slide's tile geometry (tile_id, x, y, level, read_px, tile_px), order-independent."""
    t = tiles.sort_values("tile_id")
    arr = np.stack([t[c].to_numpy(np.int64) for c in TILE_COLUMNS], axis=1)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _one_or_list(values: Iterable) -> Any:
    u = sorted(set(values))
    return u[0] if len(u) == 1 else (u or None)


def tiling_of(tiles: pd.DataFrame) -> dict:
    """``{"target_mpp", "tile_px"}`` of a tile table (a list when slides differ, ``None`` when unknown)."""
    mpp = tiles["target_mpp"].round(6).astype(float) if "target_mpp" in tiles.columns else []
    px = tiles["tile_px"].astype(int) if "tile_px" in tiles.columns else []
    return {"target_mpp": _one_or_list(mpp), "tile_px": _one_or_list(int(p) for p in px)}


def inputs_digest(entries: Mapping[str, Mapping]) -> str:
    """The digest of a store's inputs: every slide's fingerprint and tile geometry hash."""
    rows = sorted((str(s), str(e.get("slide_fingerprint", "")), str(e.get("tiles_sha256", ""))) for s, e in entries.items())
    return _sha(rows)


def derive_identity(model: str, weights: str | None = None, adapter: str | None = None, prompts: str | None = None,
                    *, tiles: pd.DataFrame | None = None, decode: str | None = DEFAULT_DECODE, variant: Any = None,
                    entries: Mapping[str, Mapping] | None = None) -> FeatureIdentity:
    """The identity features of ``model`` would have (driver side: hashes files, builds nothing).

    Parameters
    ----------
    model, weights, adapter, prompts
        As given to ``raypath embed`` (``weights=None``: the HF cache/hub; ``"random[:SEED]"``).
    tiles
        The tiles to embed (their tiling goes into the identity), or ``None``.
    decode, variant
        Decode path and generated-variant id (``None`` = the slides as scanned).
    entries
        ``{slide_id: {"slide_fingerprint", "tiles_sha256"}}`` of the inputs, or ``None``.

    Raises
    ------
    RaypathError
        Unknown model, missing weights, or an adapter/prompt path that is not one.
    """
    from raypath.fm.backbone import adapter_sha256, resolve_model, sha256_file, weights_sha256_of

    spec = resolve_model(model)
    a = p = None
    if adapter:
        if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            raise RaypathError(
                f"adapter {adapter!r} is not a peft adapter folder (no adapter_config.json): pass the folder "
                "written by `raypath adapt` (adapters/<run>/)"
            )
        a = adapter_sha256(adapter)
    if prompts:
        if not os.path.isfile(prompts):
            raise RaypathError(f"prompt file {prompts!r} does not exist: pass the file written by prompt tuning")
        p = sha256_file(prompts)
    ident = FeatureIdentity(spec.key, weights_sha256_of(spec, weights), a, p, spec.preprocessing(),
                            tiling_of(tiles) if tiles is not None else None, decode, variant)
    return ident.with_inputs(entries) if entries is not None else ident


def slide_cache_key(fingerprint: str, tiles: pd.DataFrame | str, ident: FeatureIdentity, dtype: str) -> str:
    """The cache key of one slide's features (stored in its file and the manifest);
    ``tiles`` is the slide's rows or their :func:`tiles_hash`.

    The same document raypath has always hashed, plus prompts/variant only when set.
    """
    spec = ident.spec
    doc = {
        "slide_fingerprint": fingerprint,
        "tiles": tiles if isinstance(tiles, str) else tiles_hash(tiles),
        "model_key": ident.model_key,
        "arch": [spec.family, spec.arch, spec.arch_kwargs],
        "weights_sha256": ident.weights_sha256,
        "adapter_sha256": ident.adapter_sha256,
        "preprocessing": spec.preprocessing(),
        "dtype": dtype,
    }
    if ident.prompt_sha256:
        doc["prompt_sha256"] = ident.prompt_sha256
    if ident.variant is not None:
        doc["variant"] = ident.variant
    if ident.decode not in (None, DEFAULT_DECODE):  # other pixels, other features (full decode: keys unchanged)
        doc["decode"] = ident.decode
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def workdir_target_mpp(workdir: str, s3=None) -> float | None:
    """The ``target_mpp`` the workdir was tiled at (``tiling_config.yaml``), or ``None``."""
    import yaml

    from raypath.io.storage import exists, join, open_file

    uri = join(workdir, "tiling_config.yaml")
    try:
        if not exists(uri, s3):
            return None
        with open_file(uri, "rb", s3) as f:
            v = ((yaml.safe_load(f) or {}).get("config") or {}).get("target_mpp")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return None
    return float(v) if v is not None else None


def identity_doc(ident: FeatureIdentity, entries: Mapping[str, Mapping], target_mpp: float | None) -> dict:
    """The ``identity`` section a writer puts into ``manifest.json``: ``ident``
    with the tiling and the inputs digest of the slides in ``entries``."""
    px = [e.get("patch_size") for e in entries.values() if e.get("patch_size") is not None]
    tiling = {"target_mpp": target_mpp, "tile_px": _one_or_list(int(p) for p in px)}
    return ident.replace(tiling=tiling).with_inputs(entries).to_dict()


# --------------------------------------------------------------------------- read side


def identity_of_manifest(manifest: Mapping) -> FeatureIdentity | None:
    """The identity recorded in a manifest; for manifests written before it
    existed, rebuilt from their fields (``None`` where unknown)."""
    if not manifest or not manifest.get("model"):
        return None
    entries = manifest.get("slides") if isinstance(manifest.get("slides"), dict) else {}
    if isinstance(manifest.get("identity"), dict):
        ident = FeatureIdentity.from_dict(manifest["identity"])
    else:
        px = [e.get("patch_size") for e in entries.values() if e.get("patch_size") is not None]
        ident = FeatureIdentity(
            manifest["model"], manifest.get("weights_sha256"), manifest.get("adapter_sha256"),
            manifest.get("prompt_sha256"), manifest.get("preprocessing"),
            {"target_mpp": None, "tile_px": _one_or_list(px)} if px else None, None, manifest.get("variant"),
        )
    return ident.with_inputs(entries) if entries else ident


def store_identity(feature_dir: str, s3=None) -> FeatureIdentity | None:
    """The identity of the store at ``feature_dir`` (``None``: no manifest, e.g. a hand-made store)."""
    from raypath.embed.store import read_manifest

    return identity_of_manifest(read_manifest(feature_dir, s3))


def features_digest(store, slide_ids: Iterable[str]) -> str:
    """Identity of the features of ``slide_ids`` in ``store`` (a FeatureStore): each
    slide's cache key from the manifest, else its file's size and modification time
    (or ETag), with the store's model key.  What a run's fingerprint hashes."""
    from raypath.embed.store import slide_file
    from raypath.io.storage import is_remote, strip_protocol

    manifest = store.manifest()
    entries = manifest.get("slides", {}) or {}
    ids = []
    for sid in slide_ids:
        key = (entries.get(sid) or {}).get("cache_key")
        if key is None:
            uri = slide_file(store.path, sid)
            info = store._fs.info(uri if is_remote(uri) else strip_protocol(uri))
            key = f"{info.get('size')}:{info.get('mtime') or info.get('ETag') or info.get('LastModified')}"
        ids.append([sid, key])
    doc = {"model_key": manifest.get("model_key"), "slides": ids}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()  # as MIL runs always hashed


def _short(v: Any) -> str:
    if v is None:
        return "none"
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:20] + "..."


def mismatches(actual: FeatureIdentity, expected: FeatureIdentity | Mapping) -> list[tuple[str, Any, Any]]:
    """``(field, actual, expected)`` for each expected field the store records differently.

    A :class:`FeatureIdentity` expects its set fields and, always, its adapter,
    prompts and variant (``None`` there means "none"); a mapping expects the
    fields it names.  An expected ``None`` elsewhere is not checked, nor is a
    field the store does not record (stores written before it existed).
    """
    if isinstance(expected, FeatureIdentity):
        want = {k: v for k, v in expected.to_dict().items() if v is not None or k in NONE_MEANS_NONE}
    else:
        want = dict(expected)
    have = actual.to_dict()
    unknown = set(want) - set(have)
    if unknown:
        raise RaypathError(f"unknown feature-identity fields {sorted(unknown)}: use {[f.name for f in fields(FeatureIdentity)]}")
    out = []
    for k, v in want.items():
        if k not in NONE_MEANS_NONE and (v is None or have[k] is None):
            continue
        if have[k] != v:
            out.append((k, have[k], v))
    return out


def check_identity(actual: FeatureIdentity, expected: FeatureIdentity | Mapping, where: str,
                   remedy: str | None = None) -> None:
    """Raise a :class:`RaypathError` naming every differing field and the remedy."""
    diff = mismatches(actual, expected)
    if not diff:
        return
    what = "; ".join(f"{k} is {_short(a)} where {_short(e)} is expected" for k, a, e in diff)
    fix = remedy or (
        f"re-embed with the expected settings (`raypath embed --model {actual.model} ...` writes a new "
        "features/<model_key> folder) or pass --features naming the store that matches"
    )
    raise RaypathError(f"feature store {where!r} does not match: {what}; {fix}")


def check_slides(feature_dir: str, manifest: Mapping, slides: pd.DataFrame) -> None:
    """Refuse features computed from other slide files than ``slides`` lists (fingerprints differ)."""
    entries = manifest.get("slides") if isinstance(manifest.get("slides"), dict) else {}
    if not entries or "fingerprint" not in slides.columns:
        return
    now = {str(s): str(f) for s, f in zip(slides["slide_id"], slides["fingerprint"]) if f is not None and f == f and f != ""}
    stale = sorted(s for s, e in entries.items() if s in now and e.get("slide_fingerprint") not in (None, "", now[s]))
    if stale:
        raise RaypathError(
            f"features of {len(stale)} slide(s) in {feature_dir!r} were computed from other slide files than the "
            f"cohort now lists (e.g. {stale[:3]}): re-run `raypath embed` on this workdir (it re-embeds exactly "
            "those), or point --workdir at the project the features came from"
        )


def check_store(feature_dir: str, expected: FeatureIdentity | Mapping | None = None, *,
                slides: pd.DataFrame | None = None, s3=None, remedy: str | None = None) -> FeatureIdentity | None:
    """Check the store at ``feature_dir`` against an expected identity and the current slides.

    Parameters
    ----------
    expected
        The identity the reader needs, or a mapping of some of its fields
        (``{"model": "uni", "adapter_sha256": ...}``): see :func:`mismatches`.
    slides
        Rows with ``slide_id`` and ``fingerprint`` (``slides.parquet``): a
        slide whose features were made from another file is refused.

    Returns
    -------
    The store's identity (``None`` for a store without manifest).
    """
    from raypath.embed.store import read_manifest

    manifest = read_manifest(feature_dir, s3)
    ident = identity_of_manifest(manifest)
    if ident is None:
        if expected is not None:
            raise RaypathError(
                f"feature store {feature_dir!r} has no manifest.json, so what made its features cannot be "
                "checked: re-embed with `raypath embed`, or pass the folder written by it"
            )
        return None
    if expected is not None:
        check_identity(ident, expected, feature_dir, remedy)
    if slides is not None:
        check_slides(feature_dir, manifest, slides)
    return ident
