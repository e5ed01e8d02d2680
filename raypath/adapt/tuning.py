"""Which slides an adapter is tuned on: named explicitly, recorded, checked downstream.

An adapter tuned on a slide has seen that slide's pixels, so features it
embeds are not "external" for that slide, nor for any slide of the same
patient or tissue (a technical twin).  Three rules follow:

1. ``raypath adapt`` names its tuning set: ``--tune-cohorts A B`` (or
   ``--tune-cohorts all``, said on purpose), or ``--tune-slides`` (a LODO
   fold's planned training slides, as ``adapt-experiment`` and the sweep pass
   them).  There is no silent "all".
2. Every adapter folder records what it saw in ``tuned_on.json``: the slide
   ids, their cohorts and patients, and how they were chosen.
3. ``raypath mil`` on features embedded with an adapter stops (exit 2) when a
   slide of a held-out patient is among them (:func:`leaked_slides`).

This module is light (no torch) so MIL and the sweep can import it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, exists, join, open_file, read_parquet

log = logging.getLogger(__name__)

TUNED_ON_FILE = "tuned_on.json"
#: ``--tune-cohorts all``: every cohort, on purpose.
ALL = "all"


def tuning_choice(cfg) -> tuple[list[str] | None, list[str] | None]:
    """``(cohorts, slide_ids)`` an :class:`~raypath.adapt.api.AdaptConfig` asks
    to tune on (``cohorts`` None = every cohort, said with ``--tune-cohorts all``).

    Raises
    ------
    RaypathError
        When neither ``tune_cohorts`` (or the older ``cohorts``) nor
        ``tune_slides`` is given: tuning on every cohort must be asked for.
    """
    slides = getattr(cfg, "tune_slides", None)
    cohorts = getattr(cfg, "tune_cohorts", None) or getattr(cfg, "cohorts", None)
    if slides:
        return (None if not cohorts or ALL in cohorts else list(cohorts)), [str(s) for s in slides]
    if not cohorts:
        raise RaypathError(
            "adapt needs the cohorts it tunes on: pass --tune-cohorts with their names (features the "
            "adapter embeds are then not external for those cohorts), or --tune-cohorts all on purpose; "
            "for leave-one-dataset-out results use `raypath adapt-experiment`, which tunes one adapter per fold"
        )
    return (None if ALL in cohorts else list(cohorts)), None


def select_tuning_tiles(cfg, sample_fn) -> pd.DataFrame:
    """The tiles an adapter trains on: ``sample_fn(workdir, tiles_per_slide,
    cohorts, seed)`` (the adapt stage's sampler) restricted to ``tune_slides``.

    The draw of a slide's tiles depends only on the seed and the slide id, so
    restricting after sampling equals sampling the chosen slides only.
    """
    cohorts, slides = tuning_choice(cfg)
    tiles = sample_fn(cfg.workdir, cfg.tiles_per_slide, cohorts, cfg.seed)
    if slides is not None:
        want = set(slides)
        tiles = tiles[tiles["slide_id"].astype(str).isin(want)].reset_index(drop=True)
        if tiles.empty:
            raise RaypathError(
                f"none of the {len(want)} --tune-slides has usable tiles in {cfg.workdir!r} "
                "(status ok in slides.parquet and tiles in tiles.parquet): check the slide ids"
            )
    return tiles


def tuned_on_record(cfg, tiles: pd.DataFrame, workdir: str) -> dict[str, Any]:
    """What an adapter saw: slide ids, their cohorts and patients, how chosen."""
    cohorts, slides = tuning_choice(cfg)
    ids = sorted(set(tiles["slide_id"].astype(str)))
    patients: list[str] = []
    uri = join(workdir, "slides.parquet")
    if exists(uri):
        meta = read_parquet(uri).to_pandas()
        if "patient_id" in meta.columns:
            m = meta[meta["slide_id"].astype(str).isin(ids)]
            patients = sorted(set(m["patient_id"].astype(str)))
    return {
        "selection": "slides" if slides is not None else ("all cohorts" if cohorts is None else "cohorts"),
        "tune_cohorts": cohorts if cohorts is not None else ALL,
        "cohorts": sorted(set(tiles["cohort"].astype(str))) if "cohort" in tiles.columns else [],
        "slide_ids": ids,
        "patient_ids": patients,
        "n_tiles": int(len(tiles)),
    }


def write_tuned_on(run_dir: str, record: dict) -> str:
    uri = join(run_dir, TUNED_ON_FILE)
    atomic_write_bytes(uri, json.dumps(record, indent=1).encode())
    return uri


def read_tuned_on(adapter_dir: str) -> dict | None:
    """The adapter's record (``tuned_on.json``; for adapters written before it
    existed, the slide ids of ``training_tiles.parquet``); None if unknown."""
    uri = join(adapter_dir, TUNED_ON_FILE)
    if exists(uri):
        with open_file(uri, "rb") as f:
            return json.load(f)
    tiles_uri = join(adapter_dir, "training_tiles.parquet")
    if exists(tiles_uri):
        t = read_parquet(tiles_uri).to_pandas()
        return {
            "selection": "unknown (training_tiles.parquet)",
            "cohorts": sorted(set(t["cohort"].astype(str))) if "cohort" in t.columns else [],
            "slide_ids": sorted(set(t["slide_id"].astype(str))),
            "patient_ids": [],
        }
    return None


def adapter_of(manifest: dict) -> str | None:
    """The adapter folder a feature store was embedded with (None: the plain FM)."""
    a = manifest.get("adapter") if isinstance(manifest, dict) else None
    return str(a) if a else None


def leaked_slides(record: dict, clinical: pd.DataFrame, held_out_patients: set[str]) -> list[str]:
    """Slides the adapter saw that belong to a held-out patient (the held-out
    slide itself or its technical twin in another cohort), sorted."""
    patient_of = dict(zip(clinical["slide_id"].astype(str), clinical["patient_id"].astype(str)))
    seen = {str(s) for s in record.get("slide_ids", [])}
    seen_patients = {patient_of[s] for s in seen if s in patient_of} | set(record.get("patient_ids") or [])
    leaked = seen_patients & set(held_out_patients)
    if not leaked:
        return []
    mine = sorted(s for s in seen if patient_of.get(s) in leaked)
    # a seen slide missing from the clinical table: name the held-out slides of its patient
    return mine or sorted(s for s, p in patient_of.items() if p in leaked)


def check_features_for_held_out(
    feature_dir: str,
    manifest: dict,
    clinical: pd.DataFrame,
    held_out: dict[str, list[str]],
) -> dict[str, Any]:
    """Stop when the adapter behind ``feature_dir`` saw a held-out patient.

    Parameters
    ----------
    held_out
        ``{split name: slide ids scored as external}`` (e.g. ``{"c0": [...]}``
        for LODO holding out cohort c0).

    Returns
    -------
    ``{"adapter": path or None, "status": "no adapter" | "checked" | "unverified: ..."}``
    for the run's metrics.

    Raises
    ------
    RaypathError
        Naming the held-out cohort, the leaked slides and the remedy.
    """
    adapter = adapter_of(manifest)
    if adapter is None:
        return {"adapter": None, "status": "no adapter"}
    record = read_tuned_on(adapter)
    if record is None:
        why = (f"adapter {adapter!r} has no {TUNED_ON_FILE}: the slides it was tuned on are unknown, "
               "so external scores may be transductive")
        log.warning("%s", why)
        return {"adapter": adapter, "status": f"unverified: {why}"}
    patient_of = dict(zip(clinical["slide_id"].astype(str), clinical["patient_id"].astype(str)))
    for name, ids in held_out.items():
        patients = {patient_of[s] for s in map(str, ids) if s in patient_of}
        leaked = leaked_slides(record, clinical, patients)
        if leaked:
            raise RaypathError(
                f"features {feature_dir!r} were embedded with adapter {adapter!r}, which was tuned on "
                f"{len(leaked)} slide(s) of patients held out in {name!r} (e.g. {leaked[:5]}): their external "
                "scores would not be external. Tune one adapter per fold (`raypath adapt-experiment`, or "
                f"`raypath adapt --tune-cohorts` without {name!r}), or hold out only cohorts it never saw (--cohorts)"
            )
    return {"adapter": adapter, "status": "checked", "tuned_on_cohorts": record.get("cohorts", []),
            "n_tuned_on_slides": len(record.get("slide_ids", []))}
