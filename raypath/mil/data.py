"""Bags of tile features for MIL: loading, tile caps, padding and sampling.

Plain numpy/torch, no Ray: the training loop (in-process or in a Ray Train
worker) builds batches with these functions.

* :func:`load_bag_arrays` gives the bags of some slides: from a
  :class:`raypath.embed.store.FeatureStore` as a :class:`StoreBags` mapping
  that reads each bag when first used and keeps a bounded LRU cache (a
  worker reads only its shard's bags), or from an in-memory mapping.
* :func:`sample_tiles` caps a bag at ``max_tiles`` random tiles.
* :func:`collate_bags` pads a list of bags to the longest one and returns
  the mask (True = real tile).
* :func:`epoch_order` draws the slide order of one epoch, optionally
  balanced between events and censored slides (or between classes), and
  :func:`shard` gives each DDP rank the same number of slides.
* :func:`make_synthetic_bags` builds a cohort with a planted risk signal
  (or pure noise) for tests, demos and benchmarks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import MutableMapping, Sequence
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from raypath.errors import RaypathError


#: Bytes of bags a process keeps in memory when reading from a feature store (LRU); beyond it a
#: bag is read again when needed.  ``RAYPATH_BAG_CACHE_MB`` overrides it.
BAG_CACHE_BYTES = 512 * 1024 * 1024


def _checked_bag(sid: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 2 or len(arr) == 0:
        raise RaypathError(
            f"slide {sid!r} has an empty or malformed bag (shape {arr.shape}): "
            "re-embed it or drop it from the cohort"
        )
    return arr


class StoreBags(MutableMapping):
    """``slide_id -> [N, D]`` bags read from a feature store when first used, kept in a bounded
    LRU cache: a training worker reads only the bags it touches (its shard of each epoch, the
    rows it evaluates), and its memory stays bounded whatever the cohort size.

    Entries assigned with ``bags[key] = array`` are held in memory (not evicted).
    """

    def __init__(self, store, slide_ids, dtype=np.float16, max_bytes: int | None = None):
        import os

        self.store, self.dtype = store, dtype
        self.ids = [str(s) for s in slide_ids]
        self._known = set(self.ids)
        env_mb = os.environ.get("RAYPATH_BAG_CACHE_MB")
        self.max_bytes = int(max_bytes if max_bytes is not None else
                             (int(env_mb) << 20 if env_mb else BAG_CACHE_BYTES))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pinned: dict[str, np.ndarray] = {}
        self._bytes = 0
        self.reads = 0  # store reads so far (a re-read after eviction counts again)

    def __getitem__(self, sid: str) -> np.ndarray:
        if sid in self._pinned:
            return self._pinned[sid]
        if sid not in self._known:
            raise KeyError(sid)
        arr = self._cache.get(sid)
        if arr is not None:
            self._cache.move_to_end(sid)
            return arr
        arr = _checked_bag(sid, self.store.load_bag(sid).features.astype(self.dtype, copy=False))
        self.reads += 1
        self._cache[sid] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        return arr

    def __setitem__(self, key: str, arr: np.ndarray) -> None:
        self._pinned[key] = arr
        if key not in self._known:
            self._known.add(key)
            self.ids.append(key)

    def __delitem__(self, key: str) -> None:
        self._pinned.pop(key, None)
        if key in self._cache:
            self._bytes -= self._cache.pop(key).nbytes
        self._known.discard(key)
        self.ids.remove(key)

    def __contains__(self, key) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cached_bytes(self) -> int:
        return self._bytes


class BagList(Sequence):
    """The bags of ``keys`` as a sequence that reads each bag when indexed (no list of all bags)."""

    def __init__(self, bags: Mapping, keys: list[str]):
        self.bags, self.keys = bags, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.bags[k] for k in self.keys[i]]
        return self.bags[self.keys[i]]


def load_bag_arrays(source, slide_ids, dtype=np.float16, max_bytes: int | None = None) -> Mapping[str, np.ndarray]:
    """Features [N, D] of each slide in ``slide_ids``.

    Parameters
    ----------
    source
        A :class:`~raypath.embed.store.FeatureStore`, a feature folder path, or
        a mapping ``slide_id -> array | Bag``.
    dtype
        Kept in memory as float16 by default (half the memory; batches are
        float32).
    max_bytes
        Store sources: the cache bound of the returned :class:`StoreBags` (bags are
        read when first used; missing slides are reported here, empty bags on use).
    """
    from raypath.embed.store import Bag, FeatureStore

    if isinstance(source, str):
        source = FeatureStore(source)
    if getattr(source, "lazy", False):  # generated views (ViewBags): already read on use
        return source
    if not isinstance(source, Mapping):
        ids = [str(s) for s in slide_ids]
        missing = sorted(set(ids) - set(source.slide_ids()))
        if missing:
            raise RaypathError(
                f"no features for slide(s) {missing[:5]} in {source.path!r}: embed them "
                "(`raypath embed`) or drop them from the cohort"
            )
        return StoreBags(source, ids, dtype, max_bytes)
    out: dict[str, np.ndarray] = {}
    for sid in slide_ids:
        if sid not in source:
            raise RaypathError(f"no features for slide {sid!r} in the given bags")
        v = source[sid]
        arr = v.features if isinstance(v, Bag) else np.asarray(v)
        out[sid] = _checked_bag(sid, np.asarray(arr, dtype=dtype))
    return out


def sample_tiles(n_tiles: int, max_tiles: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``max_tiles`` tiles drawn without replacement (sorted)."""
    if max_tiles is None or max_tiles <= 0 or n_tiles <= max_tiles:
        return np.arange(n_tiles)
    return np.sort(rng.choice(n_tiles, size=max_tiles, replace=False))


def collate_bags(
    bags: list[np.ndarray],
    targets: dict[str, np.ndarray] | None = None,
    max_tiles: int | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Pad bags to the longest one (after capping) into one batch.

    Returns a dict with ``x`` [B, N, D] float32, ``mask`` [B, N] bool and one
    tensor per entry of ``targets`` (``time``, ``event``, ``label``, ``bin``).
    """
    rng = rng or np.random.default_rng(0)
    chosen = [b[sample_tiles(len(b), max_tiles, rng)] for b in bags]
    n_max = max(len(b) for b in chosen)
    dim = chosen[0].shape[1]
    x = np.zeros((len(chosen), n_max, dim), dtype=np.float32)
    mask = np.zeros((len(chosen), n_max), dtype=bool)
    for i, b in enumerate(chosen):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    batch = {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask)}
    for k, v in (targets or {}).items():
        batch[k] = torch.as_tensor(np.asarray(v))
    return batch


def epoch_order(
    strata: np.ndarray | None,
    n: int,
    rng: np.random.Generator,
    balanced: bool = True,
) -> np.ndarray:
    """Slide positions for one epoch (length ``n``).

    With ``balanced`` and ``strata`` (event indicator or class label), slides
    are drawn with replacement with weights ``1 / count(stratum)`` so each
    stratum is equally likely -- the events-vs-censored balancing of the DoRA
    recipe, which also keeps Cox batches from being all censored.  Otherwise
    a plain permutation.
    """
    if not balanced or strata is None:
        return rng.permutation(n)
    strata = np.asarray(strata)
    values, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    if len(values) < 2:
        return rng.permutation(n)
    w = 1.0 / counts[inverse]
    return rng.choice(n, size=n, replace=True, p=w / w.sum())


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of an epoch; every rank gets the same length so DDP
    ranks run the same number of steps (a few slides are dropped)."""
    if world_size <= 1:
        return order
    per = len(order) // world_size
    if per == 0:
        raise RaypathError(
            f"{len(order)} training slides cannot be split over {world_size} workers: "
            "use fewer workers"
        )
    return order[rank * per : (rank + 1) * per]


def make_synthetic_bags(
    n_slides: int = 200,
    n_cohorts: int = 3,
    dim: int = 16,
    tiles: tuple[int, int] = (20, 60),
    signal: float = 1.0,
    signal_tile_fraction: float = 0.3,
    site_shift: float = 0.5,
    censor_fraction: float = 0.3,
    log_hazard_per_risk: float = 2.0,
    slides_per_patient: int = 1,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """A synthetic MIL cohort with a planted risk signal.

    Each slide has a latent risk ``r ~ N(0, 1)``; a fraction of its tiles
    carry ``signal * r`` along a fixed direction (the rest is noise), and
    each cohort adds a constant site shift to every tile.  Times are
    exponential with hazard ``exp(log_hazard_per_risk * r)`` (``signal=0`` gives pure noise
    features, but times still follow ``r``), censored at random.  The
    label is ``r > 0``.

    Returns ``(bags, clinical)`` where ``clinical`` has slide_id,
    patient_id, cohort, time, event, label, status, risk_true.
    """
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    site = rng.normal(size=(n_cohorts, dim)) * site_shift
    rows, bags = [], {}
    for i in range(n_slides):
        sid = f"s{i:04d}"
        p = i // max(1, slides_per_patient)
        cohort = p % n_cohorts
        patient = f"p{p:04d}"
        # slides of one patient share its latent risk and outcome
        if i % max(1, slides_per_patient) == 0:
            r = rng.normal()
            t_patient = rng.exponential(1.0 / np.exp(log_hazard_per_risk * r)) * 100.0
            censored = rng.random() < censor_fraction
            u = rng.random()
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        x = rng.normal(size=(n, dim)) + site[cohort]
        k = max(1, int(round(signal_tile_fraction * n)))
        x[:k] += signal * r * direction * 3.0
        bags[sid] = rng.permutation(x).astype(np.float32)
        t = t_patient * u if censored else t_patient
        event = 0 if censored else 1
        rows.append(
            dict(
                slide_id=sid,
                patient_id=patient,
                cohort=f"site{cohort}",
                time=float(t),
                event=int(event),
                label=int(r > 0),
                status="ok",
                risk_true=float(r),
            )
        )
    return bags, pd.DataFrame(rows)


# --------------------------------------------------------------------------- technical variants
#
# Both variant sources go through one structure: a tissue is a list of views,
# each view a (clinical row, bag key) pair.  Real pairs: the slides sharing a
# ``pair_id`` (one view per slide).  Generated views: one slide, its original
# features and K augmented feature views written by ``raypath embed
# --variants K`` (bag keys ``<slide_id>@v<k>``).

VARIANT_SOURCES = ("none", "pairs", "generated")
VARIANT_SEP = "@v"


def variant_key(slide_id: str, k: int) -> str:
    """Bag key of view ``k`` of a slide (0 = the original features)."""
    return str(slide_id) if k == 0 else f"{slide_id}{VARIANT_SEP}{k}"


class Tissues:
    """Technical variants grouped by tissue.

    Attributes
    ----------
    source
        ``"pairs"`` or ``"generated"``.
    views
        Per tissue, its views as ``(row, bag_key)``; singletons have one view.
    tissue_of_row
        Tissue index of each clinical row.
    patient_code
        Integer code of each row's patient (tissues of one patient are never
        each other's InfoNCE negatives).
    """

    def __init__(self, source: str, views: list[list[tuple[int, str]]], n_rows: int,
                 patient_code: np.ndarray | None = None):
        self.source = source
        self.views = views
        self.patient_code = (np.arange(n_rows, dtype=np.int64) if patient_code is None
                             else np.asarray(patient_code, dtype=np.int64))
        self.tissue_of_row = np.full(n_rows, -1, dtype=np.int64)
        for t, vs in enumerate(views):
            for row, _ in vs:
                self.tissue_of_row[row] = t

    @property
    def n_multi(self) -> int:
        """Tissues with at least two views (what the robustness losses use)."""
        return sum(len(v) >= 2 for v in self.views)

    def units(self, rows: np.ndarray) -> list[int]:
        """Tissues with a view among ``rows`` (sorted, each once)."""
        t = self.tissue_of_row[np.asarray(rows, dtype=np.int64)]
        return sorted(set(t[t >= 0].tolist()))

    def restricted(self, rows: np.ndarray) -> list[list[tuple[int, str]]]:
        """Each tissue's views whose row is in ``rows``, for tissues with one."""
        keep = set(np.asarray(rows, dtype=np.int64).tolist())
        out = [[v for v in self.views[t] if v[0] in keep] for t in self.units(rows)]
        return [v for v in out if v]


def build_tissues(clinical: pd.DataFrame, source: str, n_variants: int = 0) -> Tissues | None:
    """The tissues of ``clinical`` (rows aligned with the table) for ``source``.

    ``"pairs"``: slides sharing a non-empty ``pair_id`` form one tissue, the
    others are singletons.  ``"generated"``: every slide is a tissue with
    ``n_variants + 1`` views.  ``"none"`` returns None.
    """
    if source not in VARIANT_SOURCES:
        raise RaypathError(f"unknown variant source {source!r}: choose one of {', '.join(VARIANT_SOURCES)}")
    if source == "none":
        return None
    sids = clinical["slide_id"].astype(str).tolist()
    codes = pd.factorize(clinical["patient_id"].astype(str))[0] if "patient_id" in clinical else None
    if source == "generated":
        if n_variants < 1:
            raise RaypathError(
                "variant source 'generated' found no generated feature views: run "
                "`raypath embed --variants 2` on these slides first"
            )
        views = [[(i, variant_key(s, k)) for k in range(n_variants + 1)] for i, s in enumerate(sids)]
        return Tissues(source, views, len(sids), codes)
    pair = clinical["pair_id"] if "pair_id" in clinical.columns else pd.Series([None] * len(sids))
    pair = pair.astype(object).where(pair.notna(), None).tolist()
    by_pair: dict[str, list[int]] = {}
    views = []
    for i, p in enumerate(pair):
        if p is None or str(p).strip() == "":
            views.append([(i, sids[i])])
        else:
            by_pair.setdefault(str(p), []).append(i)
    for rows in by_pair.values():
        views.append([(i, sids[i]) for i in rows])
    views.sort(key=lambda v: v[0][0])
    return Tissues(source, views, len(sids), codes)


def check_pair_outcomes(clinical: pd.DataFrame, tissues: Tissues, task: str) -> None:
    """Raise if the slides of one tissue disagree on the outcome (they are the
    same tissue: a re-scan cannot change a patient's survival or label)."""
    cols = ["time", "event"] if task == "survival" else ["label"]
    for vs in tissues.views:
        rows = sorted({r for r, _ in vs})
        if len(rows) < 2:
            continue
        sub = clinical.iloc[rows][cols].astype(str)
        if len(sub.drop_duplicates()) > 1:
            ids = clinical.iloc[rows]["slide_id"].astype(str).tolist()
            raise RaypathError(
                f"slides {ids} share a pair_id but have different {'/'.join(cols)}: technical variants "
                "of one tissue must carry the same outcome; fix the cohort table"
            )


def draw_views(views: list[tuple[int, str]], rng: np.random.Generator) -> tuple[tuple[int, str], tuple[int, str] | None]:
    """Two distinct views of a tissue drawn at random (the second is None for
    a tissue with one view)."""
    if len(views) < 2:
        return views[0], None
    i, j = rng.choice(len(views), size=2, replace=False)
    return views[int(i)], views[int(j)]


def unit_batches(
    units: list[list[tuple[int, str]]],
    strata: np.ndarray | None,
    batch_size: int,
    rng: np.random.Generator,
    rank: int = 0,
    world_size: int = 1,
    balanced: bool = True,
) -> list[list[int]]:
    """One epoch of pair-aware batches: lists of unit (tissue) positions.

    The epoch order is drawn over tissues (balanced on ``strata`` per tissue
    like :func:`epoch_order`) and sharded over ranks by tissue, so every
    view of a tissue lands in the same batch on the same worker.
    """
    order = epoch_order(strata, len(units), rng, balanced)
    order = shard(order, rank, world_size)
    return [order[b : b + batch_size].tolist() for b in range(0, len(order), batch_size)]


def variant_dirs(feature_dir: str) -> list[str]:
    """The generated-view stores ``<feature_dir>/variants/v1, v2, ...`` in order."""
    from raypath.io.storage import filesystem_for, is_remote, join, strip_protocol

    base = join(feature_dir, "variants")
    fs = filesystem_for(base)
    target = base if is_remote(base) else strip_protocol(base)
    if not fs.exists(target):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(target, detail=False)]
    ks = {int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit()}
    k = 0
    while k + 1 in ks:  # v1..vK without gaps
        k += 1
    return [join(base, f"v{j}") for j in range(1, k + 1)]


class ViewBags(Mapping):
    """Bags of the original features and the generated views, keyed ``<slide_id>`` and
    ``<slide_id>@v<k>``; each view is a lazy :class:`StoreBags` (read when used, bounded cache)."""

    lazy = True

    def __init__(self, views: list[Mapping], slide_ids: list[str]):
        self.views, self.slide_ids = views, list(slide_ids)

    def __getitem__(self, key: str) -> np.ndarray:
        sid, sep, k = str(key).rpartition(VARIANT_SEP)
        if sep and k.isdigit() and 0 < int(k) < len(self.views):
            return self.views[int(k)][sid]
        return self.views[0][key]

    def __contains__(self, key) -> bool:
        sid, sep, k = str(key).rpartition(VARIANT_SEP)
        if sep and k.isdigit() and 0 < int(k) < len(self.views):
            return sid in self.views[int(k)]
        return key in self.views[0]

    def __iter__(self) -> Iterator[str]:
        return iter(bag_keys(self.slide_ids, len(self.views) - 1))

    def __len__(self) -> int:
        return len(self.slide_ids) * len(self.views)


def load_generated_views(source, slide_ids, dtype=np.float16) -> tuple[Mapping[str, np.ndarray], int]:
    """Original and generated feature views of ``slide_ids`` as one mapping
    (keys ``<slide_id>`` and ``<slide_id>@v<k>``) and the number of views K.

    ``source`` is a feature store / folder (views under ``variants/v<k>/``,
    written by ``raypath embed --variants K``; read lazily) or a mapping that
    already holds the ``@v<k>`` keys.
    """
    from raypath.embed.store import FeatureStore

    slide_ids = [str(s) for s in slide_ids]
    if isinstance(source, Mapping):
        k = 0
        while slide_ids and all(variant_key(s, k + 1) in source for s in slide_ids):
            k += 1
        keys = [variant_key(s, j) for s in slide_ids for j in range(k + 1)]
        return load_bag_arrays(source, keys, dtype), k
    path = source.path if isinstance(source, FeatureStore) else str(source)
    dirs = variant_dirs(path)
    views = [load_bag_arrays(source, slide_ids, dtype)]
    for k, d in enumerate(dirs, start=1):
        store = FeatureStore(d)
        missing = sorted(set(slide_ids) - set(store.slide_ids()))
        if missing:
            raise RaypathError(
                f"generated view v{k} in {d!r} lacks slide(s) {missing[:5]}: re-run "
                f"`raypath embed --variants {len(dirs)}` on the same workdir"
            )
        views.append(load_bag_arrays(store, slide_ids, dtype))
    return ViewBags(views, slide_ids), len(dirs)


def bag_keys(slide_ids: list[str], n_variants: int = 0) -> list[str]:
    """The bag keys of ``slide_ids`` with ``n_variants`` generated views each."""
    return [variant_key(s, k) for s in slide_ids for k in range(n_variants + 1)]


def add_synthetic_twins(
    bags: dict[str, np.ndarray],
    clinical: pd.DataFrame,
    fraction: float = 0.5,
    site_shift: float = 0.5,
    noise: float = 0.3,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Technical twins for a :func:`make_synthetic_bags` cohort (tests, demos).

    A ``fraction`` of the slides is "re-scanned" at another cohort's site:
    the same tiles, with a random per-site offset of scale ``site_shift`` in
    place of the original's and tile noise of sd ``noise``.  Twins share
    ``pair_id``, patient and outcome with the original.
    """
    rng = np.random.default_rng([seed, 15])
    cohorts = sorted(clinical["cohort"].astype(str).unique())
    dim = next(iter(bags.values())).shape[1]
    offset = {c: rng.normal(size=dim) * site_shift for c in cohorts}
    bags = dict(bags)
    df = clinical.copy()
    df["pair_id"] = None
    picks = rng.permutation(len(df))[: int(round(fraction * len(df)))]
    rows = []
    for n, i in enumerate(sorted(picks.tolist())):
        orig = df.iloc[i]
        others = [c for c in cohorts if c != str(orig["cohort"])] or cohorts
        dest = others[int(rng.integers(len(others)))]
        pid = f"pair{n:04d}"
        df.loc[df.index[i], "pair_id"] = pid
        x = bags[orig["slide_id"]].astype(np.float32)
        twin = x - offset[str(orig["cohort"])] + offset[dest] + rng.normal(size=x.shape) * noise
        sid = f"{orig['slide_id']}t"
        bags[sid] = twin.astype(np.float32)
        rows.append({**orig.to_dict(), "slide_id": sid, "cohort": dest, "pair_id": pid})
    return bags, pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
