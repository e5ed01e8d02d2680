"""``raypath synth``: a synthetic multi-cohort study with known truth.

The study is the controlled benchmark of the whole project: every slide's
biology (phenotype, risk, survival) and every site's technical effects are
known, so "does the adapter remove site information while keeping biology?"
has an answer.

Design (all deterministic given ``seed``):

* ``n_cohorts`` cohorts, one per site.  A site has its own stain vectors,
  stain concentration scales, blur, white balance, gamma, JPEG quality and
  objective (20x at 0.5 um/px or 40x at 0.25 um/px) -- see :func:`make_sites`.
* Patients have a binary grade (``label``, ``true_phenotype``) whose
  prevalence may differ by cohort (``confounding``), continuous phenotypes
  drawn around the grade (nuclear density, nuclear size, pleomorphism, gland
  fraction), a linear risk score of these phenotypes, and a Weibull survival
  time with independent exponential censoring -- see :func:`plan_study`.
* Some patients have two slides (two tissue blocks, same biology).
* ``pair_fraction`` of the tissues are also "re-scanned" at another site: the
  same tissue layout rendered with the other site's effects, sharing
  ``pair_id`` with the original (``true_variant_of`` names the original).
* Slides are rendered by :mod:`raypath.synth.texture` and written by
  :mod:`raypath.synth.slide_writer` as Aperio-like SVS files.

Outputs under ``cfg.out`` (local folder or ``s3://``): ``slides/<slide_id>.svs``,
``cohort.csv`` (URIs relative to the table's folder), ``sites.json`` and
``synth_config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import re
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.errors import RaypathError
from raypath.synth.slide_writer import SlideGeometry, make_label, write_svs
from raypath.io.storage import atomic_write_bytes, filesystem_for, is_remote, join
from raypath.synth.texture import HE_OD_REFERENCE, StainParams, make_layout, render_rgb_rows

log = logging.getLogger(__name__)

#: Population constants of the phenotypes (mean, sd) used to standardise the
#: risk score: they do not depend on the sample, so risk is comparable across runs.
PHENO_POP = {
    "density_per_10k_um2": (85.0, 28.0),
    "nuclear_radius_um": (3.85, 0.75),
    "pleomorphism": (0.19, 0.10),
    "gland_fraction": (0.30, 0.22),
}
#: Phenotype means by grade (low, high) and within-grade sd.
PHENO_BY_GRADE = {
    "density_per_10k_um2": ((60.0, 110.0), 14.0),
    "nuclear_radius_um": ((3.2, 4.5), 0.35),
    "pleomorphism": ((0.10, 0.28), 0.04),
    "gland_fraction": ((0.50, 0.10), 0.10),
}
#: Log-hazard weights of the standardised phenotypes.
RISK_WEIGHTS = {
    "density_per_10k_um2": 0.6,
    "nuclear_radius_um": 0.4,
    "pleomorphism": 0.3,
    "gland_fraction": -0.4,
}
WEIBULL_SCALE_MONTHS = 48.0
WEIBULL_SHAPE = 1.3
BASE_PREVALENCE = 0.4


class SynthConfig(StageConfig):
    """Parameters of a synthetic multi-cohort study (``raypath synth``)."""

    help_section: ClassVar[str] = "generated study"  # --help puts the study's knobs in one section

    out: str = Field(description="output folder (local path or s3://bucket/prefix)")
    n_cohorts: int = Field(3, ge=1, le=26, description="number of cohorts (one site each)")
    slides_per_cohort: int = Field(6, ge=1, description="original slides per cohort")
    patients_share_slides: float = Field(
        0.2, ge=0, le=1, description="fraction of patients that have two slides"
    )
    slide_px: int = Field(2048, ge=256, description="level-0 width in pixels")
    slide_height_px: int | None = Field(None, ge=256, description="level-0 height (default: slide_px)")
    tile_px_stored: int = Field(256, ge=64, le=2048, description="side of the stored JPEG tiles (multiple of 16)")
    objective: list[int] = Field(
        [20], description="objective per cohort, cycled (20 = 0.5 um/px, 40 = 0.25 um/px)"
    )
    jpeg_quality: list[int] = Field([90, 75, 60], description="JPEG quality per cohort, cycled")
    seed: int = Field(0, description="random seed; same seed -> same files")
    confounding: float = Field(
        0.0, ge=0, le=1, description="0: same grade prevalence in every cohort; 1: strongly cohort-dependent"
    )
    pair_fraction: float = Field(
        0.0, ge=0, le=1, description="fraction of tissues re-rendered under another cohort's site (pair_id)"
    )
    texture: Literal["synthetic", "real", "mixed"] = Field(
        "synthetic", description="tissue texture (mixed: every other tissue real, the rest synthetic)")
    id_prefix: str = Field(
        "",
        description="prefix of every cohort, slide, patient and pair id (keeps ids of studies made with "
        "other seeds apart, e.g. a later external cohort: --id-prefix ext-)")
    tissue_fraction: float = Field(0.45, gt=0, lt=1, description="mean fraction of the slide covered by tissue")
    n_blank_slides: int = Field(0, ge=0, description="extra slides with no tissue (glass only), in cohort 0")
    pen_fraction: float = Field(0.0, ge=0, le=1, description="fraction of tissues with a pen mark")
    censoring: float = Field(0.3, ge=0, lt=1, description="target fraction of censored patients")
    site_strength: float = Field(1.0, ge=0, le=3, description="scale of site effects (0 = identical sites)")
    workers: int = Field(1, ge=1, description="processes rendering slides in parallel")
    reuse: bool = Field(
        False, description="skip rendering when --out already holds a complete study made with the same options"
    )

    @field_validator("objective")
    @classmethod
    def _check_objective(cls, v: list[int]) -> list[int]:
        if not v or any(o not in (20, 40) for o in v):
            raise ValueError(f"objective must be a non-empty list of 20 or 40, got {v}")
        return v

    @field_validator("jpeg_quality")
    @classmethod
    def _check_quality(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= q <= 100 for q in v):
            raise ValueError(f"jpeg_quality values must be in 1..100, got {v}")
        return v

    @field_validator("id_prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]*", v):
            raise ValueError(f"use letters, digits, '_', '.' and '-' only (it starts every slide id and file name), "
                             f"e.g. 'ext-'; got {v!r}")
        return v

    @field_validator("tile_px_stored")
    @classmethod
    def _check_tile(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"tile_px_stored must be a multiple of 16 (JPEG blocks), got {v}")
        return v


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


# Stream tags keep the random streams of different concerns independent, so
# that e.g. adding cohorts does not change the existing cohorts' sites.
_SITE, _PATIENT, _TISSUE, _PAIR, _SURV, _STUDY = 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------- sites


def cohort_name(c: int, prefix: str = "") -> str:
    return f"{prefix}c{c}"


def make_sites(cfg: SynthConfig) -> list[dict[str, Any]]:
    """Technical effects of each site (cohort), deterministic by ``cfg.seed``.

    Each knob (stain scales, gamma, blur, stain-vector tilt) takes evenly
    spread values across the sites in a seed-dependent order, so sites always
    differ visibly (when ``site_strength > 0``) rather than by luck of a draw.

    Returns
    -------
    One dict per cohort: ``cohort``, ``scanner``, ``objective``, ``mpp``,
    ``jpeg_quality`` and ``stain`` (a :class:`StainParams`).
    """
    n = cfg.n_cohorts
    s = cfg.site_strength
    rng = _rng(cfg.seed, _SITE)
    spread = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)

    def knob() -> np.ndarray:
        return rng.permutation(spread) + rng.uniform(-0.15, 0.15, n)

    h_scale, e_scale, gamma, blur, tilt_h, tilt_e = (knob() for _ in range(6))
    sites = []
    for c in range(n):
        dir_h = rng.normal(size=3)
        dir_e = rng.normal(size=3)
        od = HE_OD_REFERENCE.copy()
        od[0] = od[0] + s * 0.10 * (1 + tilt_h[c]) / 2 * dir_h / np.linalg.norm(dir_h)
        od[1] = od[1] + s * 0.12 * (1 + tilt_e[c]) / 2 * dir_e / np.linalg.norm(dir_e)
        od = np.abs(od) / np.linalg.norm(od, axis=1, keepdims=True)
        white = 0.965 - s * rng.uniform(0.0, 0.05, 3)
        stain = StainParams(
            stain_od=od.astype(np.float32),
            conc_scale=(float(1 + s * 0.22 * h_scale[c]), float(1 + s * 0.25 * e_scale[c])),
            white_rgb=tuple(float(v) for v in np.clip(white, 0.5, 1.0)),
            gamma=float(np.clip(1 + s * 0.12 * gamma[c], 0.5, 2.0)),
            blur_um=float(max(0.0, s * 0.35 * (1 + blur[c]))),
        )
        objective = cfg.objective[c % len(cfg.objective)]
        sites.append(
            {
                "cohort": cohort_name(c, cfg.id_prefix),
                "scanner": f"synthscope-{chr(ord('A') + c)}",
                "objective": objective,
                "mpp": 10.0 / objective,
                "jpeg_quality": cfg.jpeg_quality[c % len(cfg.jpeg_quality)],
                "stain": stain,
            }
        )
    return sites


def sites_json(sites: list[dict[str, Any]]) -> str:
    doc = [{**{k: v for k, v in s.items() if k != "stain"}, **s["stain"].to_dict()} for s in sites]
    return json.dumps(doc, indent=2)


# --------------------------------------------------------------------------- biology


def cohort_prevalence(cfg: SynthConfig, c: int) -> float:
    """Fraction of high-grade patients in cohort ``c`` (differs by cohort when confounded)."""
    if cfg.n_cohorts == 1:
        return BASE_PREVALENCE
    pos = 2.0 * c / (cfg.n_cohorts - 1) - 1.0  # -1 .. 1
    return float(np.clip(BASE_PREVALENCE + 0.45 * cfg.confounding * pos, 0.05, 0.95))


def risk_score(pheno: dict[str, np.ndarray]) -> np.ndarray:
    """Log-hazard from phenotypes standardised by population constants."""
    return sum(w * (np.asarray(pheno[k]) - PHENO_POP[k][0]) / PHENO_POP[k][1] for k, w in RISK_WEIGHTS.items())


def sample_survival(
    risk: np.ndarray, censoring: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weibull proportional-hazards event times with independent censoring.

    Parameters
    ----------
    risk
        Log-hazard ratio per patient.
    censoring
        Target fraction of censored patients; the exponential censoring rate
        is solved on the sample so the realised fraction is close to it.
    rng
        Random stream.

    Returns
    -------
    (time_months, event, event_time_months): observed time (> 0), event
    indicator in {0, 1}, and the uncensored event time.
    """
    u = rng.random(len(risk))
    t_event = WEIBULL_SCALE_MONTHS * (-np.log(u) / np.exp(risk)) ** (1.0 / WEIBULL_SHAPE)
    t_event = np.maximum(t_event, 0.1)
    if censoring <= 0:
        return t_event, np.ones(len(risk), np.int64), t_event
    # P(C < T) = 1 - exp(-lam T) averaged over the sample = censoring
    lo, hi = 1e-8, 1e3
    for _ in range(100):
        lam = math.sqrt(lo * hi)
        frac = float(np.mean(1.0 - np.exp(-lam * t_event)))
        lo, hi = (lam, hi) if frac < censoring else (lo, lam)
    t_cens = rng.exponential(1.0 / lam, len(risk))
    t_cens = np.maximum(t_cens, 0.05)
    event = (t_event <= t_cens).astype(np.int64)
    return np.where(event == 1, t_event, t_cens), event, t_event


def plan_study(cfg: SynthConfig) -> pd.DataFrame:
    """The cohort table with truth and render parameters; no pixels yet.

    Columns: the cohort-table columns (``slide_id``, ``uri``, ``patient_id``,
    ``cohort``, ``time``, ``event``, ``label``, ``scanner``, ``pair_id``),
    truth columns prefixed ``true_``, and private render columns prefixed
    ``_`` (dropped from ``cohort.csv``).
    """
    if cfg.pair_fraction > 0 and cfg.n_cohorts < 2:
        raise RaypathError(
            f"pair_fraction={cfg.pair_fraction} needs at least 2 cohorts to re-render tissue "
            f"under another site, but n_cohorts={cfg.n_cohorts}: raise --n-cohorts or set --pair-fraction 0"
        )
    sites = make_sites(cfg)
    rows, patients = _slots(cfg)
    pheno_of = _phenotypes(cfg, patients)
    table = _slide_rows(cfg, rows, pheno_of, sites)
    if cfg.pair_fraction > 0:
        _add_technical_variants(cfg, table, sites)
    df = pd.DataFrame(table)
    return df


def _slots(cfg: SynthConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Slide slots and patients per cohort (grades drawn to the cohort's prevalence)."""
    rows: list[dict[str, Any]] = []
    patients: list[dict[str, Any]] = []
    for c in range(cfg.n_cohorts):
        n = cfg.slides_per_cohort
        n_pat = math.ceil(n / (1.0 + cfg.patients_share_slides))
        n_two = n - n_pat
        prng = _rng(cfg.seed, _PATIENT, c)
        n_high = int(round(cohort_prevalence(cfg, c) * n_pat))
        grades = prng.permutation(np.r_[np.ones(n_high, int), np.zeros(n_pat - n_high, int)])
        slots = [(p, 0) for p in range(n_pat)] + [(p, 1) for p in range(n_two)]
        for p in range(n_pat):
            patients.append({"cohort": c, "p": p, "grade": int(grades[p]), "rng": prng})
        for i, (p, block) in enumerate(slots):
            rows.append({"c": c, "p": p, "block": block, "i": i, "blank": False})
        for b in range(cfg.n_blank_slides if c == 0 else 0):
            patients.append({"cohort": c, "p": n_pat + b, "grade": 0, "rng": prng})
            rows.append({"c": c, "p": n_pat + b, "block": 0, "i": n + b, "blank": True})

    return rows, patients


def _phenotypes(cfg: SynthConfig, patients: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    """Per patient: phenotype from the grade, risk and survival."""
    # phenotypes per patient
    pheno_of: dict[tuple[int, int], dict[str, float]] = {}
    for pat in patients:
        r = pat["rng"]
        ph = {}
        for k, ((m_lo, m_hi), sd) in PHENO_BY_GRADE.items():
            ph[k] = float(r.normal(m_hi if pat["grade"] else m_lo, sd))
        ph["density_per_10k_um2"] = float(np.clip(ph["density_per_10k_um2"], 20, 160))
        ph["nuclear_radius_um"] = float(np.clip(ph["nuclear_radius_um"], 2.2, 6.5))
        ph["pleomorphism"] = float(np.clip(ph["pleomorphism"], 0.03, 0.45))
        ph["gland_fraction"] = float(np.clip(ph["gland_fraction"], 0.0, 0.8))
        ph["grade"] = pat["grade"]
        pheno_of[(pat["cohort"], pat["p"])] = ph

    keys = list(pheno_of)
    risk = risk_score({k: np.array([pheno_of[q][k] for q in keys]) for k in RISK_WEIGHTS})
    t_obs, event, t_event = sample_survival(risk, cfg.censoring, _rng(cfg.seed, _SURV))
    for j, q in enumerate(keys):
        pheno_of[q].update(risk=float(risk[j]), time=float(t_obs[j]), event=int(event[j]), t_event=float(t_event[j]))

    return pheno_of


def _texture_of(texture: str, n_tissue: int) -> str:
    """The texture of the ``n_tissue``-th tissue (1-based): mixed alternates real and synthetic."""
    if texture != "mixed":
        return texture
    return "real" if n_tissue % 2 else "synthetic"


def _slide_rows(cfg: SynthConfig, rows: list[dict[str, Any]], pheno_of: dict, sites: list[dict]) -> list[dict[str, Any]]:
    """One cohort-table row per slide (truth and private render columns included)."""
    height_px = cfg.slide_height_px or cfg.slide_px
    # pen marks on an exact number of tissues (not blanks)
    srng = _rng(cfg.seed, _STUDY)
    tissue_rows = [r for r in rows if not r["blank"]]
    n_pen = int(round(cfg.pen_fraction * len(tissue_rows)))
    pen_idx = set(srng.permutation(len(tissue_rows))[:n_pen].tolist())

    table = []
    n_tissue = 0
    for k, r in enumerate(rows):
        has_pen = (not r["blank"]) and n_tissue in pen_idx
        n_tissue += 0 if r["blank"] else 1
        c = r["c"]
        site = sites[c]
        ph = pheno_of[(c, r["p"])]
        slide_id = f"{cfg.id_prefix}c{c}_{'b' if r['blank'] else 's'}{r['i']:03d}"
        trng = _rng(cfg.seed, _TISSUE, c, r["i"])
        tf = 0.0 if r["blank"] else float(np.clip(cfg.tissue_fraction + trng.uniform(-0.1, 0.1), 0.05, 0.9))
        table.append(
            {
                "slide_id": slide_id,
                "uri": f"slides/{slide_id}.svs",
                "patient_id": f"{cfg.id_prefix}c{c}_p{r['p']:03d}",
                "cohort": site["cohort"],
                "time": round(ph["time"], 3),
                "event": ph["event"],
                "label": ph["grade"],
                "scanner": site["scanner"],
                "pair_id": None,
                "label_name": "high_grade" if ph["grade"] else "low_grade",  # shown in plot legends and reports
                "true_risk": round(ph["risk"], 5),
                "true_phenotype": "high_grade" if ph["grade"] else "low_grade",
                "true_density_per_10k_um2": round(ph["density_per_10k_um2"], 3),
                "true_nuclear_radius_um": round(ph["nuclear_radius_um"], 4),
                "true_pleomorphism": round(ph["pleomorphism"], 4),
                "true_gland_fraction": round(ph["gland_fraction"], 4),
                "true_event_time": round(ph["t_event"], 3),
                "true_tissue_fraction": round(tf, 4),
                "true_blank": r["blank"],
                "true_pen": has_pen,
                "true_variant_of": None,
                "true_objective": site["objective"],
                "true_mpp": site["mpp"],
                "true_texture": "blank" if r["blank"] else _texture_of(cfg.texture, n_tissue),
                "_tissue_key": (c, r["i"]),
                "_site": c,
                "_width_um": cfg.slide_px * site["mpp"],
                "_height_um": height_px * site["mpp"],
                "_slide_index": k,
            }
        )

    return table


def _add_technical_variants(cfg: SynthConfig, table: list[dict[str, Any]], sites: list[dict]) -> None:
    """Technical variants: the same tissue re-rendered under another site's effects."""
    prng = _rng(cfg.seed, _PAIR)
    n_var = {c: 0 for c in range(cfg.n_cohorts)}
    pair_no = 0
    originals = list(table)
    for c in range(cfg.n_cohorts):
        mine = [t for t in originals if t["_site"] == c and not t["true_blank"]]
        k = int(round(cfg.pair_fraction * len(mine)))
        for idx in sorted(prng.permutation(len(mine))[:k].tolist()):
            orig = mine[idx]
            dest = int((c + 1 + prng.integers(cfg.n_cohorts - 1)) % cfg.n_cohorts)
            site = sites[dest]
            pid = f"{cfg.id_prefix}pair{pair_no:03d}"
            pair_no += 1
            orig["pair_id"] = pid
            vid = f"{cfg.id_prefix}c{dest}_v{n_var[dest]:03d}"
            n_var[dest] += 1
            var = dict(orig)
            var.update(
                slide_id=vid,
                uri=f"slides/{vid}.svs",
                cohort=site["cohort"],
                scanner=site["scanner"],
                pair_id=pid,
                true_variant_of=orig["slide_id"],
                true_objective=site["objective"],
                true_mpp=site["mpp"],
                _site=dest,
                _slide_index=len(table),
            )
            table.append(var)


# --------------------------------------------------------------------------- rendering


def _single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover - optional speed-up
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _render_one(args: tuple) -> dict[str, Any]:
    """Render and write one slide (top level so a process pool can pickle it)."""
    path, row, site, seed, tile_px = args
    t0 = time.perf_counter()
    c, i = row["_tissue_key"]
    lay = make_layout(
        _rng(seed, _TISSUE, c, i, 1),
        row["_height_um"],
        row["_width_um"],
        texture=row["true_texture"],
        tissue_fraction=max(row["true_tissue_fraction"], 0.05),
        density_per_10k_um2=row["true_density_per_10k_um2"],
        nuclear_radius_um=row["true_nuclear_radius_um"],
        pleomorphism=row["true_pleomorphism"],
        gland_fraction=row["true_gland_fraction"],
        pen=bool(row["true_pen"]),
    )
    mpp = site["mpp"]
    w = int(round(row["_width_um"] / mpp))
    h = int(round(row["_height_um"] / mpp))
    geom = SlideGeometry(
        width_px=w, height_px=h, mpp=mpp, objective=site["objective"],
        tile_px=tile_px, jpeg_quality=site["jpeg_quality"],
    )
    w_pad = -(-w // tile_px) * tile_px

    def strips():
        for y in range(0, h, tile_px):
            yield render_rgb_rows(lay, site["stain"], mpp, y, y + tile_px, w_pad)

    # the renderer's matrix products are small: threaded BLAS only spins
    with _single_threaded_blas():
        info = write_svs(
            path, geom, strips(), label=make_label(row["_slide_index"], seed),
            description_extra=f"Filename = {row['slide_id']}",
        )
    return {"slide_id": row["slide_id"], "bytes": info["bytes"], "render_s": time.perf_counter() - t0}


#: Options that do not change the files written.
_NOT_IN_OUTPUT = ("workers", "reuse")


def _reusable_study(cfg: SynthConfig) -> pd.DataFrame | None:
    """The cohort table of ``cfg.out`` if ``cfg.reuse`` and it was written by
    the same raypath version with the same options and every slide exists."""
    if not cfg.reuse:
        return None
    import yaml

    from raypath import __version__
    from raypath.io.storage import exists, open_file

    cfg_uri, table_uri = join(cfg.out, "synth_config.yaml"), join(cfg.out, "cohort.csv")
    try:
        if not (exists(cfg_uri) and exists(table_uri)):
            return None
        with open_file(cfg_uri, "rb") as f:
            doc = yaml.safe_load(f) or {}
        old = {k: v for k, v in (doc.get("config") or {}).items() if k not in _NOT_IN_OUTPUT}
        new = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_OUTPUT}
        if doc.get("raypath_version") != __version__ or old != new:
            return None
        with open_file(table_uri, "rb") as f:
            table = pd.read_csv(f)
        if not all(exists(join(cfg.out, u)) for u in table["uri"]):
            return None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return table


def _check_bucket(uri: str) -> None:
    """Fail before rendering when the output bucket cannot be reached."""
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    try:
        ok = filesystem_for(uri).exists(bucket)
    except Exception as e:  # endpoint down, bad credentials, ...
        raise RaypathError(
            f"cannot reach the output bucket of --out {uri!r} ({type(e).__name__}: {e}); check "
            "AWS_ENDPOINT_URL / credentials, or write to a local folder"
        ) from None
    if not ok:
        raise RaypathError(
            f"output bucket {bucket!r} of --out {uri!r} does not exist: create it first "
            "(or publish a local folder with `raypath s3 serve`) or choose another --out"
        )


def synthesize(cfg: SynthConfig) -> pd.DataFrame:
    """Generate the study: slides, ``cohort.csv``, ``sites.json``, ``synth_config.yaml``.

    Parameters
    ----------
    cfg
        Study parameters; ``cfg.out`` is a local folder or an ``s3://`` prefix
        (slides are written to a local temporary folder, then uploaded).

    Returns
    -------
    The cohort table as written to ``cohort.csv`` (``uri`` relative to ``cfg.out``).
    """
    t0 = time.perf_counter()
    existing = _reusable_study(cfg)
    if existing is not None:
        log.info("synth: reusing the complete study in %s (same options)", cfg.out)
        return existing
    plan = plan_study(cfg)
    sites = make_sites(cfg)
    remote = is_remote(cfg.out)
    if remote:
        _check_bucket(cfg.out)
    local_root = tempfile.mkdtemp(prefix="raypath-synth-") if remote else cfg.out
    try:
        os.makedirs(os.path.join(local_root, "slides"), exist_ok=True)
        jobs = [
            (os.path.join(local_root, row["uri"]), row, sites[row["_site"]], cfg.seed, cfg.tile_px_stored)
            for row in plan.to_dict("records")
        ]
        from raypath.io.progress import Progress

        with Progress("synth", len(jobs), "slides") as progress:
            if cfg.workers > 1 and len(jobs) > 1:
                import multiprocessing as mp

                with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
                    results = list(progress.track(pool.map(_render_one, jobs)))
            else:
                results = list(progress.track(_render_one(j) for j in jobs))
        for r in results:
            log.debug("wrote %s (%d bytes, %.2f s)", r["slide_id"], r["bytes"], r["render_s"])
        table = plan[[c for c in plan.columns if not c.startswith("_")]].copy()
        csv_bytes = table.to_csv(index=False).encode()
        if remote:
            fs = filesystem_for(cfg.out)
            for res in results:
                rel = f"slides/{res['slide_id']}.svs"
                fs.put_file(os.path.join(local_root, rel), join(cfg.out, rel))
        atomic_write_bytes(join(cfg.out, "sites.json"), sites_json(sites).encode())
        atomic_write_bytes(join(cfg.out, "cohort.csv"), csv_bytes)
        cfg.save(cfg.out, "synth_config.yaml")
    finally:
        if remote:
            shutil.rmtree(local_root, ignore_errors=True)
    log.info(
        "synth: %d slides, %d cohorts, %.1f s (%.2f s/slide)",
        len(table), cfg.n_cohorts, time.perf_counter() - t0,
        sum(r["render_s"] for r in results) / max(len(results), 1),
    )
    return table


# --------------------------------------------------------------------------- CLI


def summary(table: pd.DataFrame) -> str:
    """A few lines describing a generated study."""
    pats = table.drop_duplicates("patient_id")
    lines = [
        f"slides written: {len(table)} in {table['cohort'].nunique()} cohorts "
        f"({int(table['pair_id'].notna().sum())} in technical pairs, {int(table['true_blank'].sum())} blank, "
        f"{int(table['true_pen'].sum())} with pen marks)",
        f"patients: {len(pats)}, events: {int(pats['event'].sum())} "
        f"({100 * pats['event'].mean():.0f} %), high grade: {int(pats['label'].sum())}",
    ]
    for cohort, g in table.groupby("cohort"):
        lines.append(
            f"  {cohort}: {len(g)} slides, {g['true_objective'].iloc[0]}x, "
            f"{100 * g['label'].mean():.0f} % high grade, {int(g['event'].sum())} with an event"
        )
    return "\n".join(lines)


def _run_cli(args: argparse.Namespace) -> int:
    if getattr(args, "kind", "cohort") == "mitosis":  # the mitotic-figure benchmark (raypath.synth.mitosis)
        from raypath.synth.mitosis import run_cli

        return run_cli(args)
    cfg = config_from_args(SynthConfig, args)
    table = synthesize(cfg)
    print(f"synth: wrote {cfg.out}")
    print(summary(table))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``raypath synth``."""
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic multi-cohort study (slides + cohort.csv)",
        description=(
            "Generate pyramidal Aperio-like slides with known biology (grade, risk, survival) and "
            "per-cohort site effects (stain, blur, JPEG, white balance), plus cohort.csv, sites.json "
            "and synth_config.yaml in --out (local folder or s3://bucket/prefix)."
        ),
    )
    add_config_arguments(p, SynthConfig)
    from raypath.synth.mitosis import add_mitosis_arguments

    p.add_argument("--kind", choices=["cohort", "mitosis"], default="cohort",
                   help="cohort: the multi-cohort study above; mitosis: the mitotic-figure benchmark "
                        "(cells annotated as mitotic figures or imposters, docs/patch.md) [default: cohort]")
    add_mitosis_arguments(p)
    p.set_defaults(func=_run_cli)
