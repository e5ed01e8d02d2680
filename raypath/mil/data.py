"""Bags of tile features for MIL: loading, tile caps, padding and sampling.

Plain numpy/torch, no Ray: the training loop (in-process or in a Ray Train
worker) builds batches with these functions.

* :func:`load_bag_arrays` reads the bags of some slides from a
  :class:`raypath.embed.store.FeatureStore` (or takes an in-memory mapping).
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

from typing import Mapping

import numpy as np
import pandas as pd
import torch

from raypath.errors import RaypathError


def load_bag_arrays(source, slide_ids, dtype=np.float16) -> dict[str, np.ndarray]:
    """Features [N, D] of each slide in ``slide_ids``.

    Parameters
    ----------
    source
        A :class:`~raypath.embed.store.FeatureStore`, a feature folder path, or
        a mapping ``slide_id -> array | Bag``.
    dtype
        Kept in memory as float16 by default (half the memory; batches are
        float32).
    """
    from raypath.embed.store import Bag, FeatureStore

    out: dict[str, np.ndarray] = {}
    if isinstance(source, str):
        source = FeatureStore(source)
    if isinstance(source, Mapping):
        for sid in slide_ids:
            if sid not in source:
                raise RaypathError(f"no features for slide {sid!r} in the given bags")
            v = source[sid]
            arr = v.features if isinstance(v, Bag) else np.asarray(v)
            out[sid] = np.asarray(arr, dtype=dtype)
    else:
        for sid in slide_ids:
            out[sid] = source.load_bag(sid).features.astype(dtype, copy=False)
    for sid, arr in out.items():
        if arr.ndim != 2 or len(arr) == 0:
            raise RaypathError(
                f"slide {sid!r} has an empty or malformed bag (shape {arr.shape}): "
                "re-embed it or drop it from the cohort"
            )
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
