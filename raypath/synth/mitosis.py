"""``raypath synth --kind mitosis``: a synthetic mitotic-figure benchmark.

A study of several *tumour domains* (tumour type + lab + scanner), each with
slides of tissue in which individual cells are annotated as **mitotic
figures** (prophase, metaphase, anaphase, telophase) or **imposters**
(apoptotic bodies, pyknotic nuclei, lymphocytes, hyperchromatic nuclei), the
patch-classification task of Ammeling et al. 2025 (METHODS.md §2) on data
whose truth is known.

What makes it a benchmark rather than a toy
-------------------------------------------
* Mitotic figures are drawn as clouds of short chromosome rods (spiky, hairy
  outlines; plates, pairs of plates, two daughter clumps); imposters as smooth
  dense blobs.  A ``hard_fraction`` of cells are the cases that fool
  pathologists: atypical/early mitoses with few, short rods, and imposters
  with clumped chromatin or fragments lined up like a telophase.  The classes
  overlap, so no classifier reaches 100 %.
* Domains differ the way tumour types and scanners do: background morphology
  (nuclear density, size, glands), the mix of imposters (lymphoma is rich in
  lymphocytes and tingible-body apoptosis), figure size and chromatin
  darkness, stain (per-domain H&E vectors, concentration, white balance,
  gamma, blur: :func:`domain_stains`), pixel size (0.227 -
  0.263 um/px, like Hamamatsu, Aperio and Leica 40x scanners) and JPEG
  quality.  A classifier that keys on darkness or colour of one domain
  transfers worse to the others.
* Annotations are written like a real dataset: ``annotations.json`` in the
  MIDOG layout (COCO-like, ``bbox`` = ``[x1, y1, x2, y2]`` 50 px boxes,
  category 1 = mitotic figure, 2 = imposter, ``tumor_type`` per
  image) and ``annotations.csv`` (``slide_id, x, y, label, domain``).

Outputs under ``out`` (local or ``s3://``): ``slides/<slide_id>.svs``,
``cohort.csv`` (slide table: ``slide_id, uri, patient_id, cohort`` = domain,
``scanner``, ``mpp``), ``annotations.json``, ``annotations.csv``,
``cells.csv`` (truth: subtype, hard case, domain), ``domains.json`` and
``synth_config.yaml``.  Deterministic by ``seed``: same options, same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from raypath.config import StageConfig
from raypath.errors import RaypathError
from raypath.io.storage import atomic_write_bytes, is_remote, join
from raypath.synth.texture import (HE_OD_REFERENCE, StainParams, beer_lambert_rgb, blur_margin_px, blur_rows,
                                   make_layout, render_rows)

log = logging.getLogger(__name__)

MITOSIS = "mitotic_figure"
IMPOSTER = "imposter"
PHASES = ("prophase", "metaphase", "anaphase", "telophase")
IMPOSTER_TYPES = ("apoptotic", "pyknotic", "lymphocyte", "hyperchromatic")

#: Tumour domains, cycled when more are asked for.  Background morphology,
#: figure size and chromatin darkness, and the mixes of imposters and phases.
DOMAINS: tuple[dict[str, Any], ...] = (
    dict(name="human_breast_carcinoma", density=95.0, nuc_r=4.3, pleo=0.24, gland=0.35,
         fig_scale=1.0, dark=1.0, imposters=(0.30, 0.20, 0.15, 0.35), phases=(0.25, 0.40, 0.15, 0.20)),
    dict(name="canine_lymphoma", density=150.0, nuc_r=3.3, pleo=0.12, gland=0.0,
         fig_scale=0.82, dark=1.22, imposters=(0.35, 0.15, 0.40, 0.10), phases=(0.20, 0.45, 0.20, 0.15)),
    dict(name="canine_soft_tissue_sarcoma", density=55.0, nuc_r=4.1, pleo=0.32, gland=0.0,
         fig_scale=1.2, dark=0.82, imposters=(0.15, 0.30, 0.10, 0.45), phases=(0.35, 0.30, 0.15, 0.20)),
    dict(name="human_melanoma", density=85.0, nuc_r=4.6, pleo=0.28, gland=0.0,
         fig_scale=1.1, dark=0.92, imposters=(0.25, 0.25, 0.15, 0.35), phases=(0.30, 0.35, 0.15, 0.20)),
    dict(name="canine_mast_cell_tumour", density=110.0, nuc_r=3.8, pleo=0.16, gland=0.0,
         fig_scale=0.95, dark=1.1, imposters=(0.20, 0.30, 0.25, 0.25), phases=(0.25, 0.40, 0.15, 0.20)),
)
#: 40x scanners (name, um/px at level 0), cycled over domains.
SCANNERS = (("hamamatsu-xr", 0.2273), ("aperio-cs2", 0.2456), ("leica-gt450", 0.2634), ("hamamatsu-s360", 0.2304))
#: Half side of a figure's drawing window, in micrometres.
_WINDOW_UM = 14.0
#: Bumped whenever the drawing changes: a study written by another version is never reused.
GENERATOR_VERSION = 2
#: Cells stay this far from the slide's edge (a 256 px context at 0.25 um/px is 64 um wide).
_EDGE_UM = 34.0
#: Side of the annotation boxes in annotations.json (MIDOG uses 50 px boxes).
BOX_PX = 50


class MitosisConfig(StageConfig):
    """Parameters of the synthetic mitotic-figure benchmark (``raypath synth --kind mitosis``)."""

    help_section: ClassVar[str] = "generated study"  # --help puts the study's knobs in one section

    out: str = Field(description="output folder (local path or s3://bucket/prefix)")
    n_domains: int = Field(3, ge=1, le=26, description="tumour domains (tumour type + lab + scanner)")
    slides_per_domain: int = Field(8, ge=1, description="slides per domain")
    patients_share_slides: float = Field(0.25, ge=0, le=1, description="fraction of patients with two slides")
    slide_px: int = Field(1280, ge=256, description="level-0 side in pixels (~0.25 um/px)")
    cells_per_slide: int = Field(40, ge=2, description="annotated cells per slide")
    mitosis_fraction: float = Field(0.4, gt=0, lt=1, description="fraction of annotated cells that are mitotic figures")
    hard_fraction: float = Field(0.3, ge=0, le=1, description="fraction of cells drawn as hard cases (atypical mitoses, mitosis-like imposters)")
    min_spacing_um: float = Field(22.0, gt=0, description="minimum distance between annotated cells")
    texture: Literal["synthetic", "real"] = Field("synthetic", description="background tissue texture")
    site_strength: float = Field(1.0, ge=0, le=3, description="scale of per-domain stain/scanner effects (0 = identical)")
    morphology_strength: float = Field(1.0, ge=0, le=2, description="scale of per-domain figure size/darkness differences (0 = identical)")
    jpeg_quality: list[int] = Field([90, 80, 70], description="JPEG quality per domain, cycled")
    tile_px_stored: int = Field(256, ge=64, le=2048, description="side of the stored JPEG tiles (multiple of 16)")
    seed: int = Field(0, description="random seed; same seed -> same files")
    workers: int = Field(1, ge=1, description="processes rendering slides in parallel")
    reuse: bool = Field(False, description="skip rendering when --out already holds this study (same options)")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 7919, *map(int, key)]))


_DOMAIN, _PLAN, _CELL, _TISSUE = 1, 2, 3, 4


# --------------------------------------------------------------------------- domains


def domain_stains(n: int, seed: int, strength: float) -> list[StainParams]:
    """Each domain's lab and scanner appearance: H&E vectors tilted from the reference, staining
    strength, white balance, tone curve and blur.  Each knob takes evenly spread values over the
    domains in a seed-dependent order, so domains always differ (when ``strength > 0``)."""
    rng = _rng(seed, _DOMAIN)
    spread = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    h_scale, e_scale, gamma, blur, tilt = (rng.permutation(spread) + rng.uniform(-0.15, 0.15, n) for _ in range(5))
    out = []
    for d in range(n):
        od = HE_OD_REFERENCE.copy()
        for k, amount in ((0, 0.10), (1, 0.12)):
            v = rng.normal(size=3)
            od[k] = od[k] + strength * amount * (1 + tilt[d]) / 2 * v / np.linalg.norm(v)
        od = np.abs(od) / np.linalg.norm(od, axis=1, keepdims=True)
        out.append(StainParams(
            stain_od=od.astype(np.float32),
            conc_scale=(float(1 + strength * 0.22 * h_scale[d]), float(1 + strength * 0.25 * e_scale[d])),
            white_rgb=tuple(float(v) for v in np.clip(0.965 - strength * rng.uniform(0.0, 0.05, 3), 0.5, 1.0)),
            gamma=float(np.clip(1 + strength * 0.12 * gamma[d], 0.5, 2.0)),
            blur_um=float(max(0.0, strength * 0.3 * (1 + blur[d]))),
        ))
    return out


def make_domains(cfg: MitosisConfig) -> list[dict[str, Any]]:
    """Each domain's tumour type, scanner, pixel size, JPEG quality, stain and morphology."""
    stains = domain_stains(cfg.n_domains, cfg.seed, cfg.site_strength)
    m = cfg.morphology_strength
    out = []
    for d in range(cfg.n_domains):
        base = DOMAINS[d % len(DOMAINS)]
        name = base["name"] if d < len(DOMAINS) else f"{base['name']}_{d // len(DOMAINS)}"
        scanner, mpp = SCANNERS[d % len(SCANNERS)]
        out.append({
            "domain": name,
            "scanner": scanner,
            "mpp": mpp,
            "jpeg_quality": cfg.jpeg_quality[d % len(cfg.jpeg_quality)],
            "stain": stains[d],
            "density": base["density"], "nuc_r": base["nuc_r"], "pleo": base["pleo"], "gland": base["gland"],
            "fig_scale": 1.0 + m * (base["fig_scale"] - 1.0),
            "dark": 1.0 + m * (base["dark"] - 1.0),
            "imposters": tuple(base["imposters"]),
            "phases": tuple(base["phases"]),
        })
    return out


def domains_json(domains: list[dict[str, Any]]) -> str:
    """``domains.json``: the generator's version and every domain's parameters (the reuse check compares it)."""
    doc = [{**{k: v for k, v in d.items() if k != "stain"}, **d["stain"].to_dict()} for d in domains]
    return json.dumps({"generator_version": GENERATOR_VERSION, "domains": doc}, indent=2)


# --------------------------------------------------------------------------- plan


def _slide_rows(cfg: MitosisConfig, domains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for d, dom in enumerate(domains):
        n = cfg.slides_per_domain
        n_pat = math.ceil(n / (1.0 + cfg.patients_share_slides))
        slots = [(p, 0) for p in range(n_pat)] + [(p, 1) for p in range(n - n_pat)]
        for i, (p, _block) in enumerate(slots):
            sid = f"d{d}_s{i:03d}"
            rows.append({
                "slide_id": sid, "uri": f"slides/{sid}.svs", "patient_id": f"d{d}_p{p:03d}",
                "cohort": dom["domain"], "scanner": dom["scanner"], "mpp": dom["mpp"],
                "_d": d, "_i": i,
            })
    return rows


def _place_cells(cfg: MitosisConfig, lay, rng: np.random.Generator) -> np.ndarray:
    """Cell centres (um) in tissue, at least ``min_spacing_um`` apart, away from the edges."""
    side = lay.width_um
    s = cfg.min_spacing_um
    margin = _EDGE_UM
    g = np.arange(margin, side - margin, s)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    jit = s * 0.2
    pts = np.stack([yy.ravel(), xx.ravel()], 1) + rng.uniform(-jit, jit, (yy.size, 2))
    if lay.texture != "blank":
        ok = lay.tissue_mask(pts[:, 0].astype(np.float32), pts[:, 1].astype(np.float32), band=False) > 0.99
        pts = pts[ok]
    if len(pts) < cfg.cells_per_slide:
        raise RaypathError(
            f"a {cfg.slide_px} px slide holds only {len(pts)} cells {cfg.min_spacing_um:g} um apart, "
            f"fewer than --cells-per-slide {cfg.cells_per_slide}: raise --slide-px or lower --cells-per-slide"
        )
    return pts[np.sort(rng.permutation(len(pts))[: cfg.cells_per_slide])]


def plan_cells(cfg: MitosisConfig, row: dict[str, Any], dom: dict[str, Any], lay) -> pd.DataFrame:
    """The annotated cells of one slide: centre (level-0 px), label, subtype, hard case, figure seed."""
    rng = _rng(cfg.seed, _PLAN, row["_d"], row["_i"])
    pts = _place_cells(cfg, lay, rng)
    n = len(pts)
    n_mit = int(round(cfg.mitosis_fraction * n))
    is_mit = rng.permutation(np.r_[np.ones(n_mit, bool), np.zeros(n - n_mit, bool)])
    phase = rng.choice(len(PHASES), n, p=np.asarray(dom["phases"]) / sum(dom["phases"]))
    imp = rng.choice(len(IMPOSTER_TYPES), n, p=np.asarray(dom["imposters"]) / sum(dom["imposters"]))
    hard = rng.random(n) < cfg.hard_fraction
    mpp = dom["mpp"]
    return pd.DataFrame({
        "slide_id": row["slide_id"],
        "cell_id": [f"{row['slide_id']}_c{k:03d}" for k in range(n)],
        "x": np.round(pts[:, 1] / mpp).astype(np.int64),
        "y": np.round(pts[:, 0] / mpp).astype(np.int64),
        "label": np.where(is_mit, MITOSIS, IMPOSTER),
        "subtype": [PHASES[p] if m else IMPOSTER_TYPES[q] for m, p, q in zip(is_mit, phase, imp)],
        "hard": hard,
        "domain": dom["domain"],
        "patient_id": row["patient_id"],
        "_seed": rng.integers(0, 2**31 - 1, n),
    })


def _layout(cfg: MitosisConfig, row: dict[str, Any], dom: dict[str, Any]):
    side_um = cfg.slide_px * dom["mpp"]
    return make_layout(
        _rng(cfg.seed, _TISSUE, row["_d"], row["_i"]), side_um, side_um, texture=cfg.texture,
        tissue_fraction=0.9, density_per_10k_um2=dom["density"], nuclear_radius_um=dom["nuc_r"],
        pleomorphism=dom["pleo"], gland_fraction=dom["gland"], pen=False,
    )


# --------------------------------------------------------------------------- figures


def _soft(d: np.ndarray, edge_um: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance (inside < 0)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / edge_um, -30, 30)))


def _rods_mask(yy, xx, cy, cx, ang, length, width) -> np.ndarray:
    """Union (max) of capsules: centres ``(cy, cx)``, direction ``ang``, ``length`` x ``width`` (um)."""
    if len(cy) == 0:
        return np.zeros_like(yy)
    dy, dx = np.sin(ang) * length / 2, np.cos(ang) * length / 2
    py, px = yy[..., None] - (cy - dy), xx[..., None] - (cx - dx)
    vy, vx = 2 * dy, 2 * dx
    t = np.clip((py * vy + px * vx) / np.maximum(vy * vy + vx * vx, 1e-9), 0, 1)
    dist = np.hypot(py - t * vy, px - t * vx)
    return _soft(dist - width / 2, 0.18).max(axis=-1)


def _blob_mask(yy, xx, cy, cx, r, wobble, rng) -> np.ndarray:
    """Union of discs with slightly irregular outlines (``wobble`` = relative amplitude)."""
    out = np.zeros_like(yy)
    for y0, x0, r0 in zip(cy, cx, r):
        th = np.arctan2(yy - y0, xx - x0)
        h = rng.normal(0, wobble, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        edge = r0 * (1 + sum(h[i] * np.cos((i + 2) * th + ph[i]) for i in range(3)))
        out = np.maximum(out, _soft(np.hypot(yy - y0, xx - x0) - edge, 0.22))
    return out


def _plate_rods(rng, centre_off: float, length: float, n: int, ang: float, spread: float):
    """Rods of a metaphase-like plate ``length`` long, perpendicular to axis ``ang`` at offset ``centre_off``."""
    t = rng.uniform(-length / 2, length / 2, n)
    off = centre_off + rng.normal(0, spread, n)
    ay, ax = np.sin(ang), np.cos(ang)  # axis of division
    cy = off * ay + t * ax
    cx = off * ax - t * ay
    rod_ang = ang + rng.normal(0, 0.5, n)  # chromosome arms stick out of the plate
    return cy, cx, rod_ang


def _cluster_rods(rng, cy0: float, cx0: float, radius: float, n: int):
    r = radius * np.sqrt(rng.random(n))
    th = rng.uniform(0, 2 * np.pi, n)
    return cy0 + r * np.sin(th), cx0 + r * np.cos(th), rng.uniform(0, np.pi, n)


def _mitosis_chromatin(kind: str, yy, xx, rng, s: float, hard: bool) -> tuple[np.ndarray, float, float]:
    """(chromatin mask, cell radius um, darkness factor) of a mitotic figure."""
    ang = rng.uniform(0, np.pi)
    few = 0.45 if hard else 1.0  # atypical / early figures: fewer, shorter rods
    rl, rw = (1.2 if hard else 2.0) * s, 0.75 * s
    if kind == "prophase":
        cy, cx, ra = _cluster_rods(rng, 0.0, 0.0, 3.6 * s, int(40 * few))
        m = _rods_mask(yy, xx, cy, cx, ra, 1.5 * s, 0.6 * s)
        m = np.maximum(m, 0.3 * _blob_mask(yy, xx, [0.0], [0.0], [4.2 * s], 0.04, rng))
        return m, 7.0 * s, 0.85
    if kind == "metaphase":
        cy, cx, ra = _plate_rods(rng, 0.0, 8.5 * s, int(34 * few), ang, 0.45 * s)
        return _rods_mask(yy, xx, cy, cx, ra, rl, rw), 7.5 * s, 1.15
    if kind == "anaphase":
        sep = rng.uniform(2.2, 3.6) * s
        parts = [_plate_rods(rng, o, 7.0 * s, int(22 * few), ang, 0.35 * s) for o in (-sep, sep)]
        cy, cx, ra = (np.concatenate(a) for a in zip(*parts))
        return _rods_mask(yy, xx, cy, cx, ra, rl, rw), 8.0 * s, 1.1
    sep = rng.uniform(4.5, 6.0) * s  # telophase: two daughter clumps
    parts = [_cluster_rods(rng, o * np.sin(ang), o * np.cos(ang), 1.9 * s, int(18 * few)) for o in (-sep, sep)]
    cy, cx, ra = (np.concatenate(a) for a in zip(*parts))
    return _rods_mask(yy, xx, cy, cx, ra, 1.2 * s, rw), 9.0 * s, 1.15


def _imposter_chromatin(kind: str, yy, xx, rng, s: float, hard: bool) -> tuple[np.ndarray, float, float, float]:
    """(chromatin mask, cell radius um, darkness factor, cytoplasm eosin) of an imposter."""
    if kind == "apoptotic":
        k = int(rng.integers(1, 5))
        if hard:  # fragments lined up like a telophase
            ang, sep = rng.uniform(0, np.pi), rng.uniform(4.0, 5.5) * s
            o = np.array([-sep, sep])
            cy, cx, r = o * np.sin(ang), o * np.cos(ang), rng.uniform(1.4, 2.0, 2) * s
        else:
            cy, cx = rng.normal(0, 1.2 * s, k), rng.normal(0, 1.2 * s, k)
            r = rng.uniform(0.9, 2.1, k) * s
        return _blob_mask(yy, xx, cy, cx, r, 0.03, rng), 5.0 * s, 1.3, 0.8
    if kind == "pyknotic":
        return _blob_mask(yy, xx, [0.0], [0.0], [rng.uniform(2.0, 2.8) * s], 0.03, rng), 4.5 * s, 1.35, 0.5
    if kind == "lymphocyte":
        r = rng.uniform(2.6, 3.3) * s
        m = _blob_mask(yy, xx, [0.0], [0.0], [r], 0.05, rng)
        for _ in range(int(rng.integers(0, 3))):  # lymphocytes come in groups
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(6.5, 9.0) * s
            m = np.maximum(m, 0.9 * _blob_mask(yy, xx, [d * np.sin(a)], [d * np.cos(a)], [r], 0.05, rng))
        return m, 3.8 * s, 1.0, 0.35
    # hyperchromatic nucleus: normal size, dark, smooth outline; hard: clumped chromatin
    r = rng.uniform(4.0, 5.3) * s
    m = 0.85 * _blob_mask(yy, xx, [0.0], [0.0], [r], 0.06, rng)
    if hard:
        cy, cx, ra = _cluster_rods(rng, 0.0, 0.0, 0.8 * r, 22)
        m = np.maximum(m, _rods_mask(yy, xx, cy, cx, ra, 1.3 * s, 0.6 * s))
    return m, 7.0 * s, 0.9, 0.3


def render_figure(cell: dict[str, Any], dom: dict[str, Any], mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cell's stamp at ``mpp``: (haematoxylin to add, eosin to add, multiplier clearing the
    background), each ``(2w+1, 2w+1)`` centred on the cell's pixel."""
    rng = np.random.default_rng(int(cell["_seed"]))
    w = int(math.ceil(_WINDOW_UM / mpp))
    g = np.arange(-w, w + 1, dtype=np.float32) * mpp
    yy, xx = np.meshgrid(g, g, indexing="ij")
    s = dom["fig_scale"] * float(np.exp(rng.normal(0, 0.12)))
    dark = dom["dark"] * float(np.clip(rng.normal(1.0, 0.12), 0.6, 1.4))
    if cell["label"] == MITOSIS:
        chrom, cell_r, fac = _mitosis_chromatin(cell["subtype"], yy, xx, rng, s, bool(cell["hard"]))
        cyto_e = rng.uniform(0.12, 0.4)  # rounded cell, pale cytoplasm
    else:
        chrom, cell_r, fac, cyto_e = _imposter_chromatin(cell["subtype"], yy, xx, rng, s, bool(cell["hard"]))
        cyto_e *= rng.uniform(0.6, 1.2)
    halo = rng.uniform(0.15, 0.7)  # a clear zone around the cell, in both classes
    grain = 0.8 + 0.2 * rng.random(chrom.shape, dtype=np.float32)
    h = (2.0 * dark * fac) * chrom * grain
    cellm = _soft(np.hypot(yy, xx) - cell_r, 0.5)
    ring = _soft(np.hypot(yy, xx) - cell_r * 1.3, 0.5)
    clear = 1.0 - halo * ring
    e = cyto_e * cellm * (1.0 - 0.6 * np.minimum(chrom, 1.0))
    return h.astype(np.float32), e.astype(np.float32), clear.astype(np.float32)


# --------------------------------------------------------------------------- rendering


def _strip(lay, stain: StainParams, mpp: float, y0: int, y1: int, width: int, stamps: list) -> np.ndarray:
    """RGB rows ``[y0, y1)``: background tissue, cells stamped in, scanner blur, Beer-Lambert."""
    sigma = stain.blur_um / mpp
    m = blur_margin_px(sigma)
    a0, a1 = y0 - m, y1 + m
    conc = render_rows(lay, mpp, a0, a1, width)
    for cy, cx, h, e, clear in stamps:
        w = h.shape[0] // 2
        r0, r1 = max(cy - w, a0), min(cy + w + 1, a1)
        c0, c1 = max(cx - w, 0), min(cx + w + 1, width)
        if r0 >= r1 or c0 >= c1:
            continue
        sl = (slice(r0 - a0, r1 - a0), slice(c0, c1))
        st = (slice(r0 - cy + w, r1 - cy + w), slice(c0 - cx + w, c1 - cx + w))
        conc[0][sl] = conc[0][sl] * clear[st] + h[st]
        conc[1][sl] = conc[1][sl] * clear[st] + e[st]
    conc = blur_rows(conc, sigma)
    if m:
        conc = conc[:, m:-m]
    return beer_lambert_rgb(conc, stain)


def _render_slide(args: tuple) -> dict[str, Any]:
    """Render and write one slide (top level so a process pool can pickle it)."""
    from raypath.synth.slide_writer import SlideGeometry, make_label, write_svs

    path, cfg_dict, row, dom = args
    cfg = MitosisConfig.model_validate(cfg_dict)
    t0 = time.perf_counter()
    lay = _layout(cfg, row, dom)
    cells = plan_cells(cfg, row, dom, lay)
    mpp = dom["mpp"]
    stamps = [(int(c["y"]), int(c["x"]), *render_figure(c, dom, mpp)) for c in cells.to_dict("records")]
    tile = cfg.tile_px_stored
    geom = SlideGeometry(width_px=cfg.slide_px, height_px=cfg.slide_px, mpp=mpp, objective=40,
                         tile_px=tile, jpeg_quality=dom["jpeg_quality"])
    w_pad = -(-cfg.slide_px // tile) * tile

    def strips():
        for y in range(0, cfg.slide_px, tile):
            yield _strip(lay, dom["stain"], mpp, y, y + tile, w_pad, stamps)

    info = write_svs(path, geom, strips(), label=make_label(row["_d"] * 1000 + row["_i"], cfg.seed),
                     description_extra=f"Filename = {row['slide_id']}")
    return {"slide_id": row["slide_id"], "bytes": info["bytes"], "render_s": time.perf_counter() - t0,
            "cells": cells.drop(columns="_seed")}


# --------------------------------------------------------------------------- annotations


def midog_json(slides: pd.DataFrame, cells: pd.DataFrame) -> str:
    """Annotations in the MIDOG layout: images (file_name, tumor_type, scanner), categories
    1 = mitotic figure / 2 = imposter (MIDOG: hard negative), boxes ``[x1, y1, x2, y2]`` of ``BOX_PX`` px."""
    images = []
    ids = {}
    for k, r in enumerate(slides.to_dict("records"), start=1):
        ids[r["slide_id"]] = k
        images.append({"id": k, "file_name": r["uri"], "width": int(r["width"]), "height": int(r["height"]),
                       "tumor_type": r["cohort"], "scanner": r["scanner"], "patient_id": r["patient_id"]})
    anns = []
    half = BOX_PX // 2
    for k, c in enumerate(cells.to_dict("records"), start=1):
        cat = 1 if c["label"] == MITOSIS else 2
        anns.append({"id": k, "image_id": ids[c["slide_id"]], "category_id": cat, "labels": cat,
                     "bbox": [int(c["x"]) - half, int(c["y"]) - half, int(c["x"]) + half, int(c["y"]) + half]})
    cats = [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "imposter"}]
    return json.dumps({"images": images, "categories": cats, "annotations": anns}, indent=1)


# --------------------------------------------------------------------------- API


def _reusable(cfg: MitosisConfig) -> pd.DataFrame | None:
    if not cfg.reuse:
        return None
    import yaml

    from raypath import __version__
    from raypath.io.storage import exists, open_file

    keep = lambda d: {k: v for k, v in d.items() if k not in ("workers", "reuse")}  # noqa: E731
    try:
        if not exists(join(cfg.out, "synth_config.yaml")) or not exists(join(cfg.out, "cells.csv")):
            return None
        with open_file(join(cfg.out, "synth_config.yaml"), "rb") as f:
            doc = yaml.safe_load(f) or {}
        if doc.get("raypath_version") != __version__ or keep(doc.get("config") or {}) != keep(cfg.to_dict()):
            return None
        with open_file(join(cfg.out, "domains.json"), "rb") as f:
            if f.read().decode() != domains_json(make_domains(cfg)):  # another generator version or domain table
                return None
        with open_file(join(cfg.out, "cohort.csv"), "rb") as f:
            slides = pd.read_csv(f, dtype=str)
        if not all(exists(join(cfg.out, u)) for u in slides["uri"]):
            return None
        with open_file(join(cfg.out, "cells.csv"), "rb") as f:
            return pd.read_csv(f, dtype={"slide_id": str, "cell_id": str, "patient_id": str})
    except (OSError, ValueError, yaml.YAMLError):
        return None


def synthesize_mitosis(cfg: MitosisConfig) -> pd.DataFrame:
    """Generate the benchmark; return the truth table of every annotated cell (``cells.csv``)."""
    t0 = time.perf_counter()
    existing = _reusable(cfg)
    if existing is not None:
        log.info("synth: reusing the complete mitosis study in %s", cfg.out)
        return existing
    domains = make_domains(cfg)
    rows = _slide_rows(cfg, domains)
    remote = is_remote(cfg.out)
    local_root = tempfile.mkdtemp(prefix="raypath-mitosis-") if remote else cfg.out
    try:
        os.makedirs(os.path.join(local_root, "slides"), exist_ok=True)
        jobs = [(os.path.join(local_root, r["uri"]), cfg.to_dict(), r, domains[r["_d"]]) for r in rows]
        if cfg.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
                results = list(pool.map(_render_slide, jobs))
        else:
            results = [_render_slide(j) for j in jobs]
        cells = pd.concat([r["cells"] for r in results], ignore_index=True)
        slides = pd.DataFrame(rows).drop(columns=["_d", "_i"])
        _write_outputs(cfg, local_root, remote, slides, cells, domains, [r["slide_id"] for r in results])
    finally:
        if remote:
            shutil.rmtree(local_root, ignore_errors=True)
    log.info("synth: mitosis study, %d slides, %d cells, %d domains, %.1f s",
             len(rows), len(cells), cfg.n_domains, time.perf_counter() - t0)
    return cells


def _write_outputs(cfg, local_root, remote, slides, cells, domains, slide_ids) -> None:
    if remote:
        from raypath.io.storage import filesystem_for

        fs = filesystem_for(cfg.out)
        for sid in slide_ids:
            fs.put_file(os.path.join(local_root, "slides", f"{sid}.svs"), join(cfg.out, f"slides/{sid}.svs"))
    sized = slides.assign(width=cfg.slide_px, height=cfg.slide_px)
    ann = cells[["slide_id", "x", "y", "label", "domain"]]
    atomic_write_bytes(join(cfg.out, "annotations.json"), midog_json(sized, cells).encode())
    atomic_write_bytes(join(cfg.out, "annotations.csv"), ann.to_csv(index=False).encode())
    atomic_write_bytes(join(cfg.out, "cells.csv"), cells.to_csv(index=False).encode())
    atomic_write_bytes(join(cfg.out, "domains.json"), domains_json(domains).encode())
    atomic_write_bytes(join(cfg.out, "cohort.csv"), slides.to_csv(index=False).encode())
    cfg.save(cfg.out, "synth_config.yaml")


def summary(cells: pd.DataFrame) -> str:
    lines = [f"cells annotated: {len(cells)} in {cells['slide_id'].nunique()} slides, "
             f"{cells['domain'].nunique()} domains; {int((cells['label'] == MITOSIS).sum())} mitotic figures, "
             f"{int(cells['hard'].astype(bool).sum())} hard cases"]
    for dom, g in cells.groupby("domain", sort=False):
        lines.append(f"  {dom}: {g['slide_id'].nunique()} slides, {len(g)} cells, "
                     f"{100 * (g['label'] == MITOSIS).mean():.0f} % mitotic figures")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI glue (raypath synth --kind mitosis)

#: ``raypath synth`` flags that mean the same here (cohort -> domain names).
_SHARED = {"out": "out", "seed": "seed", "slide_px": "slide_px", "texture": "texture", "workers": "workers",
           "reuse": "reuse", "tile_px_stored": "tile_px_stored", "jpeg_quality": "jpeg_quality",
           "site_strength": "site_strength", "n_cohorts": "n_domains", "slides_per_cohort": "slides_per_domain",
           "patients_share_slides": "patients_share_slides"}


def add_mitosis_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mitosis-only options to ``raypath synth`` (used with ``--kind mitosis``)."""
    g = parser.add_argument_group("--kind mitosis (n-cohorts = tumour domains, slides-per-cohort = slides per domain)")
    shared = set(_SHARED.values())
    for name, field in MitosisConfig.model_fields.items():
        if name in shared:
            continue
        tp = field.annotation
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       type=tp if tp in (int, float) else str,
                       help=f"{field.description} [default: {field.default}]")


def run_cli(args: argparse.Namespace) -> int:
    """``raypath synth --kind mitosis``: build the config from the shared and mitosis-only flags."""
    import yaml

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        doc = yaml.safe_load(open(args.config).read()) or {}
        data.update(doc.get("config", doc) if isinstance(doc, dict) else {})
        data.pop("kind", None)
    for flag, name in _SHARED.items():
        if getattr(args, flag, None) is not None:
            data[name] = getattr(args, flag)
    for name in MitosisConfig.model_fields:
        if name not in _SHARED.values() and getattr(args, name, None) is not None:
            data[name] = getattr(args, name)
    from raypath.config import validate_config

    cfg = validate_config(MitosisConfig, data)
    cells = synthesize_mitosis(cfg)
    print(f"synth: wrote {cfg.out}")
    print(summary(cells))
    return 0
