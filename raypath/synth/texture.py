"""Rendering tissue RGB for synthetic slides: Beer-Lambert H&E from phenotypes.

A slide is described by a :class:`TissueLayout` in physical units (micrometres):
where the tissue is, where the glands are, every nucleus (position, size,
shape, darkness) and optional pen strokes.  :func:`render_rows` turns any band
of rows of that layout into stain concentration maps (haematoxylin, eosin,
pen ink) at a given pixel size, and :func:`beer_lambert_rgb` turns
concentrations into RGB under a site's :class:`StainParams` (stain vectors,
concentration scales, white balance, gamma, blur).

Rendering a band only needs the layout, never the neighbouring bands, so a
slide of any size is streamed strip by strip with bounded memory and the
result does not depend on the strip height.  Everything is vectorised numpy;
the only Python loop is over glands overlapping a strip.

Two textures share this machinery:

``"synthetic"``
    nuclei stamped from a shape library (size, elongation, irregular outline,
    chromatin texture), glands with lumens lined by epithelial nuclei, fibrous
    stroma.  Biology (density, size, pleomorphism, gland fraction) is directly
    visible in the pixels.
``"real"``
    a mosaic of rotated/flipped/zoomed crops of a real H&E image
    (``raypath/data/he_target_1000.png``), colour-deconvolved into H and E so
    that site effects apply in the same way.  Biology acts only through the
    zoom (nuclear size) and haematoxylin gain; it is there to keep tiling and
    QC honest on real texture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

#: Ruifrok & Johnston optical-density vectors (rows: haematoxylin, eosin), unit norm.
HE_OD_REFERENCE = np.array(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float32
)
HE_OD_REFERENCE /= np.linalg.norm(HE_OD_REFERENCE, axis=1, keepdims=True)

#: Unit OD vector orthogonal to H and E: what colour deconvolution of a real
#: image leaves over (kept fixed, so re-rendering the real image is faithful).
REAL_RESIDUAL_OD = np.cross(HE_OD_REFERENCE[0], HE_OD_REFERENCE[1])
REAL_RESIDUAL_OD /= np.linalg.norm(REAL_RESIDUAL_OD)

#: Pixel size assumed for the real H&E image (it ships without one; its nuclei
#: and cells measure like a 40x scan).
REAL_SOURCE_MPP = 0.25


def _rng(*key: int) -> np.random.Generator:
    """An independent, reproducible stream for a tuple of integers."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# --------------------------------------------------------------------------- site appearance


@dataclass(frozen=True)
class StainParams:
    """How one site (scanner + staining lab) turns stain into RGB.

    Parameters
    ----------
    stain_od
        (2, 3) optical-density vectors of haematoxylin and eosin (unit rows).
    conc_scale
        (2,) multipliers of the H and E concentrations (staining strength).
    white_rgb
        (3,) illuminant / white balance in [0, 1]: the colour of empty glass.
    gamma
        exponent applied to the normalised intensity (scanner tone curve).
    blur_um
        Gaussian blur sigma in micrometres (scanner optics / focus).
    """

    stain_od: np.ndarray = field(default_factory=lambda: HE_OD_REFERENCE.copy())
    conc_scale: tuple[float, float] = (1.0, 1.0)
    white_rgb: tuple[float, float, float] = (0.96, 0.96, 0.96)
    gamma: float = 1.0
    blur_um: float = 0.0

    def to_dict(self) -> dict:
        return {
            "stain_od_h": [round(float(v), 5) for v in self.stain_od[0]],
            "stain_od_e": [round(float(v), 5) for v in self.stain_od[1]],
            "conc_scale_h": round(float(self.conc_scale[0]), 5),
            "conc_scale_e": round(float(self.conc_scale[1]), 5),
            "white_rgb": [round(float(v), 5) for v in self.white_rgb],
            "gamma": round(float(self.gamma), 5),
            "blur_um": round(float(self.blur_um), 5),
        }


def beer_lambert_rgb(
    conc: np.ndarray,
    stain: StainParams,
    pen_od: np.ndarray | None = None,
) -> np.ndarray:
    """RGB uint8 image from stain concentrations (Beer-Lambert law).

    Parameters
    ----------
    conc
        (C, h, w) float32 concentrations (optical density along each unit
        vector, natural-log units): haematoxylin, eosin, then optionally pen
        ink and, for real texture, the residual of the colour deconvolution.
    stain
        The site's appearance (applies to H and E only).
    pen_od
        (3,) optical density of the pen ink (channel 2); ignored if ``None``.

    Returns
    -------
    (h, w, 3) uint8 RGB.
    """
    n, h, w = conc.shape
    vec = np.zeros((n, 3), np.float32)
    vec[:2] = np.asarray(stain.stain_od, np.float32) * np.asarray(stain.conc_scale, np.float32)[:, None]
    if n > 2 and pen_od is not None:
        vec[2] = pen_od
    if n > 3:
        vec[3] = REAL_RESIDUAL_OD
    live = [i for i in range(n) if vec[i].any()]
    # (exp(-od))**gamma == exp(-gamma * od): the tone curve costs nothing here
    od = (vec[live] * np.float32(stain.gamma)).T @ conc[live].reshape(len(live), -1)  # (3, h*w)
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= (255.0 * np.asarray(stain.white_rgb, np.float32))[:, None]
    od += 0.5
    np.minimum(od, 255.0, out=od)  # a negative residual may brighten past white
    return od.astype(np.uint8).reshape(3, h, w).transpose(1, 2, 0)


# --------------------------------------------------------------------------- smooth noise


_NOISE_CHUNK_PX = 512


class ValueNoise:
    """Smooth random field on a coarse lattice, evaluated anywhere.

    The lattice (spacing in micrometres, possibly anisotropic) covers the
    slide; values in between are cubic B-spline interpolated, which is smooth
    and free of the square artefacts of (smoothstep-)bilinear value noise.
    The same point always gets the same value, whatever band it is evaluated in.
    """

    def __init__(self, rng: np.random.Generator, height_um: float, width_um: float,
                 spacing_um: float | tuple[float, float]):
        sy, sx = spacing_um if isinstance(spacing_um, tuple) else (spacing_um, spacing_um)
        self.sy, self.sx = float(sy), float(sx)
        ny = int(np.ceil(height_um / self.sy)) + 5
        nx = int(np.ceil(width_um / self.sx)) + 5
        # B-spline smoothing shrinks the spread; rescale to roughly [0, 1]
        self.grid = (0.5 + (rng.random((ny, nx), dtype=np.float32) - 0.5) * 2.2).astype(np.float32)

    @staticmethod
    def _weights(coord: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Lattice index of the first of 4 neighbours and their (4, k) B-spline weights."""
        c = np.clip(coord + 1.0, 1.0, n - 3.0)
        i = np.floor(c).astype(np.int64)
        t = (c - i).astype(np.float32)
        t2, t3 = t * t, t * t * t
        w = np.stack(
            [(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3]
        ) / np.float32(6.0)
        return i - 1, w

    def band(self, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
        """Values on the grid ``y_um`` x ``x_um`` (1-D coordinate arrays)."""
        ny, nx = self.grid.shape
        iy, wy = self._weights(y_um / self.sy, ny)
        ix, wx = self._weights(x_um / self.sx, nx)
        rows = self.grid[iy] * wy[0][:, None]
        for k in range(1, 4):
            rows += self.grid[iy + k] * wy[k][:, None]
        # columns: B-spline weights as a sparse (lattice x pixel) matrix, applied
        # per chunk of pixels so each product only touches the few lattice
        # columns under that chunk (BLAS beats four fancy-index gathers)
        out = np.empty((len(y_um), len(x_um)), np.float32)
        for c0 in range(0, len(x_um), _NOISE_CHUNK_PX):
            c1 = min(c0 + _NOISE_CHUNK_PX, len(x_um))
            ixc = ix[c0:c1]
            lo, hi = int(ixc.min()), int(ixc.max()) + 4
            m = np.zeros((hi - lo, c1 - c0), np.float32)
            cols = np.arange(c1 - c0)
            for k in range(4):
                m[ixc + k - lo, cols] += wx[k, c0:c1]
            out[:, c0:c1] = rows[:, lo:hi] @ m
        return out

    def at(self, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
        """Values at scattered points."""
        ny, nx = self.grid.shape
        iy, wy = self._weights(np.asarray(y_um) / self.sy, ny)
        ix, wx = self._weights(np.asarray(x_um) / self.sx, nx)
        out = np.zeros(np.shape(y_um), np.float32)
        for a in range(4):
            for b in range(4):
                out += self.grid[iy + a, ix + b] * (wy[a] * wx[b])
        return out


class BlobField:
    """Sum of isotropic Gaussian blobs: the coarse shape of tissue fragments.

    Evaluated on a band as ``Ey @ diag(a) @ Ex`` (separable), so it costs one
    small matrix product per band.
    """

    def __init__(self, rng: np.random.Generator, height_um: float, width_um: float, n_blobs: int):
        scale = min(height_um, width_um)
        self.cy = rng.uniform(0.15, 0.85, n_blobs) * height_um
        self.cx = rng.uniform(0.15, 0.85, n_blobs) * width_um
        self.s = rng.uniform(0.06, 0.16, n_blobs) * scale
        self.a = rng.uniform(0.6, 1.0, n_blobs)

    def band(self, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
        ey = (np.exp(-0.5 * ((y_um[:, None] - self.cy) / self.s) ** 2) * self.a).astype(np.float32)
        ex = np.exp(-0.5 * ((x_um[:, None] - self.cx) / self.s) ** 2).astype(np.float32)
        return ey @ ex.T

    def at(self, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
        d2 = ((y_um[:, None] - self.cy) / self.s) ** 2 + ((x_um[:, None] - self.cx) / self.s) ** 2
        return (np.exp(-0.5 * d2) @ self.a).astype(np.float32)


# --------------------------------------------------------------------------- nucleus stamps

#: Radius bins of the stamp library, in pixels (geometric, 8 % apart).
_STAMP_RADII_PX = 1.2 * 1.08 ** np.arange(48)
_STAMP_VARIANTS = 8


@functools.lru_cache(maxsize=1)
def _stamp_library() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All nucleus stamps packed as flat (dy, dx, value) lists.

    Returns ``(start, count, dy, dx, val)``: stamp ``k`` (radius bin
    ``k // _STAMP_VARIANTS``) owns entries ``start[k]:start[k]+count[k]``.
    Each variant has its own elongation, angle, wobbly outline and chromatin
    texture, so no two neighbouring nuclei look identical.
    """
    rng = _rng(20240611, 1)
    dys, dxs, vals, counts = [], [], [], []
    for r in _STAMP_RADII_PX:
        for _ in range(_STAMP_VARIANTS):
            aspect = rng.uniform(1.0, 1.6)
            angle = rng.uniform(0, np.pi)
            harm = rng.normal(0, 0.06, 3)
            phase = rng.uniform(0, 2 * np.pi, 3)
            ext = int(np.ceil(r * aspect * 1.25)) + 1
            yy, xx = np.mgrid[-ext : ext + 1, -ext : ext + 1].astype(np.float32)
            c, s = np.cos(angle), np.sin(angle)
            u = (xx * c + yy * s) / (r * np.sqrt(aspect))
            v = (-xx * s + yy * c) * np.sqrt(aspect) / r
            rho = np.sqrt(u * u + v * v)
            theta = np.arctan2(v, u)
            edge = 1.0 + sum(harm[i] * np.cos((i + 2) * theta + phase[i]) for i in range(3))
            # soft edge about one pixel wide, whatever the radius
            inside = np.clip((edge - rho) * r + 0.5, 0.0, 1.0)
            chromatin = 0.78 + 0.22 * rng.random(inside.shape, dtype=np.float32)
            rim = 1.0 + 0.25 * np.clip(rho / edge - 0.6, 0, 1)  # darker nuclear membrane
            val = inside * chromatin * rim
            nz = val > 0.02
            dys.append(yy[nz].astype(np.int32))
            dxs.append(xx[nz].astype(np.int32))
            vals.append(val[nz].astype(np.float32))
            counts.append(int(nz.sum()))
    count = np.asarray(counts, np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return start, count, np.concatenate(dys), np.concatenate(dxs), np.concatenate(vals)


def stamp_key(radius_px: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """Library index of the stamp nearest to ``radius_px`` with ``variant``."""
    b = np.rint(np.log(np.maximum(radius_px, 1e-3) / 1.2) / np.log(1.08)).astype(np.int64)
    b = np.clip(b, 0, len(_STAMP_RADII_PX) - 1)
    return b * _STAMP_VARIANTS + (variant % _STAMP_VARIANTS)


def splat_stamps(
    h: int,
    w: int,
    y_px: np.ndarray,
    x_px: np.ndarray,
    keys: np.ndarray,
    amp: np.ndarray,
) -> np.ndarray:
    """Sum stamps centred at integer ``(y_px, x_px)`` (band coordinates) into an (h, w) map."""
    out_len = h * w
    if len(keys) == 0:
        return np.zeros((h, w), np.float32)
    start, count, DY, DX, VAL = _stamp_library()
    n_el = count[keys]
    total = int(n_el.sum())
    rep = np.repeat(np.arange(len(keys)), n_el)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n_el) - n_el, n_el)
    src = start[keys][rep] + within
    yy = y_px[rep] + DY[src]
    xx = x_px[rep] + DX[src]
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    acc = np.bincount(
        (yy[ok] * w + xx[ok]).astype(np.int64),
        weights=(VAL[src[ok]] * amp[rep[ok]]),
        minlength=out_len,
    )
    return acc.astype(np.float32).reshape(h, w)


# --------------------------------------------------------------------------- layout


@dataclass
class TissueLayout:
    """Everything needed to render one piece of tissue, in micrometres.

    Built once per tissue by :func:`make_layout`; rendered at any pixel size
    (so a technical variant scanned at 40x shows the same cells as the 20x
    original) and any band of rows.
    """

    height_um: float
    width_um: float
    texture: str  # "synthetic" | "real" | "blank"
    tissue_noise: list  # [BlobField, ValueNoise]
    tissue_threshold: float
    cellular_noise: ValueNoise
    fibre_noise: ValueNoise
    cyto_noise: ValueNoise
    # nuclei
    nuc_y_um: np.ndarray
    nuc_x_um: np.ndarray
    nuc_r_um: np.ndarray
    nuc_variant: np.ndarray
    nuc_amp: np.ndarray
    # glands: centre, lumen radius
    gland_y_um: np.ndarray
    gland_x_um: np.ndarray
    gland_r_um: np.ndarray
    # pen strokes: points along the stroke, radius of the nib, ink OD
    pen_y_um: np.ndarray
    pen_x_um: np.ndarray
    pen_r_um: float
    pen_od: np.ndarray
    # real-texture mosaic
    cell_um: float = 120.0
    mosaic: np.ndarray | None = None  # (ny, nx, 4): src_y, src_x, rot k, flip
    zoom: float = 1.0
    h_gain: float = 1.0

    # ------------------------------------------------------------------ fields
    def tissue_field(self, y_um: np.ndarray, x_um: np.ndarray, band: bool = True) -> np.ndarray:
        """Unthresholded tissue field: Gaussian blobs with noisy borders."""
        blobs, noise = self.tissue_noise
        if band:
            return blobs.band(y_um, x_um) + 0.35 * noise.band(y_um, x_um)
        return blobs.at(y_um, x_um) + 0.35 * noise.at(y_um, x_um)

    def tissue_mask(self, y_um: np.ndarray, x_um: np.ndarray, band: bool = True) -> np.ndarray:
        """Tissue mask in [0, 1], with a narrow soft edge (anti-aliasing, not a halo)."""
        if self.texture == "blank":
            shape = (len(y_um), len(x_um)) if band else np.shape(y_um)
            return np.zeros(shape, np.float32)
        f = self.tissue_field(y_um, x_um, band)
        return np.clip((f - self.tissue_threshold) / 0.006, 0.0, 1.0).astype(np.float32)

    def cellular(self, y_um: np.ndarray, x_um: np.ndarray, band: bool = True) -> np.ndarray:
        """Soft mask of cellular (epithelial/tumour) regions versus stroma."""
        f = self.cellular_noise.band(y_um, x_um) if band else self.cellular_noise.at(y_um, x_um)
        return np.clip((f - 0.4) / 0.06, 0.0, 1.0).astype(np.float32)


def make_layout(
    rng: np.random.Generator,
    height_um: float,
    width_um: float,
    *,
    texture: str,
    tissue_fraction: float,
    density_per_10k_um2: float,
    nuclear_radius_um: float,
    pleomorphism: float,
    gland_fraction: float,
    pen: bool,
) -> TissueLayout:
    """Sample a tissue layout from phenotypes.

    Parameters
    ----------
    rng
        Random stream of this tissue (same stream -> same tissue).
    height_um, width_um
        Physical size of the slide.
    texture
        ``"synthetic"``, ``"real"`` or ``"blank"`` (glass only).
    tissue_fraction
        Target fraction of the slide area covered by tissue.
    density_per_10k_um2
        Nuclei per 100 x 100 um of cellular tissue.
    nuclear_radius_um
        Mean nuclear radius.
    pleomorphism
        Coefficient of variation of nuclear radius (also spreads darkness).
    gland_fraction
        Fraction of cellular tissue organised as glands (differentiation).
    pen
        Draw a pen stroke across part of the slide.
    """
    lay = _empty_layout(rng, height_um, width_um, texture, tissue_fraction)
    if pen:
        _add_pen(lay, rng)
    if texture == "blank":
        return lay
    if texture == "real":
        _add_real_mosaic(lay, rng, nuclear_radius_um, density_per_10k_um2)
        return lay
    _add_glands(lay, rng, tissue_fraction, gland_fraction)
    _add_nuclei(lay, rng, density_per_10k_um2, nuclear_radius_um, pleomorphism)
    return lay


def _empty_layout(rng: np.random.Generator, height_um: float, width_um: float, texture: str,
                  tissue_fraction: float) -> TissueLayout:
    """The tissue/cellular/fibre noise fields, thresholded to the requested tissue fraction."""
    scale = min(height_um, width_um)
    tissue_noise = [
        BlobField(rng, height_um, width_um, int(rng.integers(4, 9))),
        ValueNoise(rng, height_um, width_um, scale / 12.0),
    ]
    cellular_noise = ValueNoise(rng, height_um, width_um, 120.0)
    fibre_noise = ValueNoise(rng, height_um, width_um, (2.5, 18.0))
    cyto_noise = ValueNoise(rng, height_um, width_um, 6.0)
    empty = np.zeros(0, np.float32)
    lay = TissueLayout(
        height_um=height_um, width_um=width_um, texture=texture,
        tissue_noise=tissue_noise, tissue_threshold=0.0,
        cellular_noise=cellular_noise, fibre_noise=fibre_noise, cyto_noise=cyto_noise,
        nuc_y_um=empty, nuc_x_um=empty, nuc_r_um=empty,
        nuc_variant=np.zeros(0, np.int64), nuc_amp=empty,
        gland_y_um=empty, gland_x_um=empty, gland_r_um=empty,
        pen_y_um=empty, pen_x_um=empty, pen_r_um=0.0, pen_od=np.zeros(3, np.float32),
    )
    # threshold that gives the requested tissue fraction, from a coarse sample
    gy = (np.arange(160) + 0.5) * height_um / 160
    gx = (np.arange(160) + 0.5) * width_um / 160
    field_lo = lay.tissue_field(gy, gx)
    lay.tissue_threshold = float(np.quantile(field_lo, 1.0 - np.clip(tissue_fraction, 0.01, 0.95)))
    return lay


def _add_real_mosaic(lay: TissueLayout, rng: np.random.Generator, nuclear_radius_um: float,
                     density_per_10k_um2: float) -> None:
    """Real-texture mode: a mosaic of crops of the real H&E source, scaled by the phenotype."""
    ny = int(np.ceil(lay.height_um / lay.cell_um)) + 1
    nx = int(np.ceil(lay.width_um / lay.cell_um)) + 1
    lay.zoom = float(np.clip(nuclear_radius_um / 3.8, 0.6, 1.8))
    lay.h_gain = float(np.clip(density_per_10k_um2 / 80.0, 0.7, 1.5))
    src = _real_concentrations()
    extent = lay.cell_um / (REAL_SOURCE_MPP * lay.zoom)
    hi = src.shape[1] - extent - 2
    mosaic = np.empty((ny, nx, 4), np.float32)
    mosaic[..., 0] = rng.uniform(0, hi, (ny, nx))
    mosaic[..., 1] = rng.uniform(0, hi, (ny, nx))
    mosaic[..., 2] = rng.integers(0, 4, (ny, nx))
    mosaic[..., 3] = rng.integers(0, 2, (ny, nx))
    lay.mosaic = mosaic


def _add_glands(lay: TissueLayout, rng: np.random.Generator, tissue_fraction: float, gland_fraction: float) -> None:
    """Gland lumen centres in cellular tissue, their count set by the gland fraction."""
    area = lay.height_um * lay.width_um
    cell_area = area * tissue_fraction * 0.5
    gr_mean = 22.0
    n_glands = int(rng.poisson(max(gland_fraction, 0.0) * cell_area / (np.pi * (gr_mean + 14) ** 2)))
    if n_glands:
        cand = 4 * n_glands + 8
        cy = rng.uniform(0, lay.height_um, cand)
        cx = rng.uniform(0, lay.width_um, cand)
        ok = (lay.tissue_mask(cy, cx, band=False) > 0.99) & (lay.cellular(cy, cx, band=False) > 0.5)
        cy, cx = cy[ok][:n_glands], cx[ok][:n_glands]
        lay.gland_y_um = cy.astype(np.float32)
        lay.gland_x_um = cx.astype(np.float32)
        lay.gland_r_um = rng.uniform(0.6, 1.4, len(cy)).astype(np.float32) * gr_mean


def _add_nuclei(lay: TissueLayout, rng: np.random.Generator, density_per_10k_um2: float,
                nuclear_radius_um: float, pleomorphism: float) -> None:
    """Nuclei: a thinned Poisson process over the slide, plus epithelium lining the glands."""
    height_um, width_um = lay.height_um, lay.width_um
    area = height_um * width_um
    dens_max = density_per_10k_um2 / 1e4
    n_cand = int(rng.poisson(dens_max * area))
    ny_ = rng.uniform(0, height_um, n_cand).astype(np.float32)
    nx_ = rng.uniform(0, width_um, n_cand).astype(np.float32)
    tis = lay.tissue_mask(ny_, nx_, band=False)
    cel = lay.cellular(ny_, nx_, band=False)
    p_keep = tis * (0.12 + 0.88 * cel)
    if len(lay.gland_y_um):
        from scipy.spatial import cKDTree

        tree = cKDTree(np.stack([lay.gland_y_um, lay.gland_x_um], 1))
        d, j = tree.query(np.stack([ny_, nx_], 1))
        p_keep = np.where(d < lay.gland_r_um[j] + 14.0, 0.0, p_keep)
    keep = rng.random(n_cand) < p_keep
    ny_, nx_, cel = ny_[keep], nx_[keep], cel[keep]
    n = len(ny_)
    radius = nuclear_radius_um * np.exp(rng.normal(0, pleomorphism, n))
    # stromal nuclei are small and elongated; tumour nuclei follow the phenotype
    radius = np.where(cel > 0.5, radius, 0.65 * nuclear_radius_um * rng.uniform(0.8, 1.1, n))
    amp = np.clip(rng.normal(1.0, 0.5 * pleomorphism + 0.05, n), 0.55, 1.6)
    ey, ex, er = _gland_epithelium(lay, rng, nuclear_radius_um, pleomorphism)
    if len(ey):
        ny_ = np.concatenate([ny_, ey])
        nx_ = np.concatenate([nx_, ex])
        radius = np.concatenate([radius, er])
        amp = np.concatenate([amp, np.clip(rng.normal(0.95, 0.08, len(ey)), 0.6, 1.3)])
    lay.nuc_y_um = ny_.astype(np.float32)
    lay.nuc_x_um = nx_.astype(np.float32)
    lay.nuc_r_um = radius.astype(np.float32)
    lay.nuc_variant = rng.integers(0, _STAMP_VARIANTS, len(ny_))
    lay.nuc_amp = amp.astype(np.float32)


def _gland_epithelium(lay: TissueLayout, rng: np.random.Generator, nuclear_radius_um: float,
                      pleomorphism: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epithelial nuclei on a ring around each gland lumen (y, x, radius in um)."""
    ey, ex, er = [], [], []
    for gy_, gx_, gr_ in zip(lay.gland_y_um, lay.gland_x_um, lay.gland_r_um):
        ring = gr_ + 6.0
        k = max(int(2 * np.pi * ring / 8.0), 6)
        th = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
        rr = ring + rng.normal(0, 0.8, k)
        ey.append(gy_ + rr * np.sin(th))
        ex.append(gx_ + rr * np.cos(th))
        er.append(0.85 * nuclear_radius_um * np.exp(rng.normal(0, 0.5 * pleomorphism, k)))
    if not ey:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return tuple(np.concatenate(a).astype(np.float32) for a in (ey, ex, er))


def _add_pen(lay: TissueLayout, rng: np.random.Generator) -> None:
    """A marker stroke: a smooth curve crossing part of the slide."""
    h, w = lay.height_um, lay.width_um
    p0 = np.array([rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.95) * w])
    p1 = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.05, 0.95) * w])
    p2 = np.array([rng.uniform(0.6, 0.95) * h, rng.uniform(0.05, 0.95) * w])
    lay.pen_r_um = float(np.clip(0.012 * min(h, w), 8.0, 60.0))
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
    t = np.linspace(0, 1, max(int(length / (lay.pen_r_um * 0.4)), 8))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    lay.pen_y_um = pts[:, 0].astype(np.float32)
    lay.pen_x_um = pts[:, 1].astype(np.float32)
    inks = np.array(
        [[1.6, 0.35, 1.3], [1.4, 0.9, 0.25], [1.2, 1.2, 1.2]], np.float32
    )  # green, blue, black marker (OD per RGB channel)
    lay.pen_od = inks[rng.integers(0, len(inks))]


# --------------------------------------------------------------------------- real texture source


@functools.lru_cache(maxsize=1)
def _real_concentrations() -> np.ndarray:
    """(3, H, W) float32 H, E and residual concentrations of the shipped real H&E image."""
    from PIL import Image

    with resources.files("raypath.data").joinpath("he_target_1000.png").open("rb") as f:
        rgb = np.asarray(Image.open(f).convert("RGB"), np.float32)
    od = -np.log(np.clip(rgb, 1.0, 255.0) / 255.0)
    m = np.stack([HE_OD_REFERENCE[0], HE_OD_REFERENCE[1], REAL_RESIDUAL_OD])
    conc = (od.reshape(-1, 3) @ np.linalg.inv(m)).T.reshape(3, *rgb.shape[:2])
    conc[:2] = np.clip(conc[:2], 0.0, 3.0)
    return np.ascontiguousarray(conc, np.float32)


# --------------------------------------------------------------------------- rendering


def render_rows(lay: TissueLayout, mpp: float, y0: int, y1: int, width_px: int) -> np.ndarray:
    """Stain concentrations of level-0 rows ``[y0, y1)`` at pixel size ``mpp``.

    Parameters
    ----------
    lay
        The tissue.
    mpp
        Micrometres per pixel of the rendering.
    y0, y1
        Row range in pixels (may extend outside the slide; rows outside are glass).
    width_px
        Number of columns.

    Returns
    -------
    (C, y1 - y0, width_px) float32: haematoxylin, eosin, pen ink, and for real
    texture the deconvolution residual (C = 4).
    """
    h = y1 - y0
    y_um = (np.arange(y0, y1, dtype=np.float32) + 0.5) * mpp
    x_um = (np.arange(width_px, dtype=np.float32) + 0.5) * mpp
    conc = np.zeros((4 if lay.texture == "real" else 3, h, width_px), np.float32)
    tissue = lay.tissue_mask(y_um, x_um)
    if lay.texture == "synthetic":
        _render_synthetic(lay, mpp, y0, y_um, x_um, tissue, conc)
    elif lay.texture == "real":
        _render_real(lay, y_um, x_um, tissue, conc)
    if len(lay.pen_y_um):
        _render_pen(lay, mpp, y0, h, width_px, conc)
    return conc


def _render_synthetic(lay, mpp, y0, y_um, x_um, tissue, conc) -> None:
    h, w = tissue.shape
    cel = lay.cellular(y_um, x_um)
    fib = lay.fibre_noise.band(y_um, x_um)
    cyt = lay.cyto_noise.band(y_um, x_um)
    # eosin: fibrous stroma is pinker than cytoplasm
    eo = (0.28 + 0.12 * cyt) * cel + (0.42 + 0.35 * fib) * (1.0 - cel)
    hem = np.float32(0.05) + 0.04 * cyt
    # glands: pale lumen with a rim of denser cytoplasm
    band_lo, band_hi = y_um[0], y_um[-1]
    sel = np.nonzero(
        (lay.gland_y_um + lay.gland_r_um + 16 >= band_lo) & (lay.gland_y_um - lay.gland_r_um - 16 <= band_hi)
    )[0]
    for g in sel:
        gy, gx, gr = lay.gland_y_um[g], lay.gland_x_um[g], lay.gland_r_um[g]
        ext = gr + 16.0
        r0 = max(int((gy - ext) / mpp) - y0, 0)
        r1 = min(int((gy + ext) / mpp) + 1 - y0, h)
        c0 = max(int((gx - ext) / mpp), 0)
        c1 = min(int((gx + ext) / mpp) + 1, w)
        if r0 >= r1 or c0 >= c1:
            continue
        d = np.sqrt((y_um[r0:r1, None] - gy) ** 2 + (x_um[None, c0:c1] - gx) ** 2)
        lumen = np.clip((gr - d) / 1.5, 0.0, 1.0)
        rim = np.clip(1.0 - np.abs(d - gr - 6.0) / 8.0, 0.0, 1.0)
        eo[r0:r1, c0:c1] = eo[r0:r1, c0:c1] * (1.0 - lumen) * (1.0 - 0.4 * rim) + 0.5 * rim + 0.04 * lumen
        hem[r0:r1, c0:c1] *= 1.0 - lumen
    # nuclei overlapping the band (margin = largest stamp)
    r_px = lay.nuc_r_um / mpp
    margin = float(r_px.max() * 2.2 + 2) if len(r_px) else 0.0
    ypx = lay.nuc_y_um / mpp
    sel = np.nonzero((ypx >= y0 - margin) & (ypx < y0 + h + margin))[0]
    nuc = splat_stamps(
        h, w,
        np.floor(ypx[sel]).astype(np.int64) - y0,
        np.floor(lay.nuc_x_um[sel] / mpp).astype(np.int64),
        stamp_key(r_px[sel], lay.nuc_variant[sel]),
        lay.nuc_amp[sel],
    )
    np.minimum(nuc, 1.6, out=nuc)
    conc[0] = (hem + 1.25 * nuc) * tissue
    conc[1] = eo * (1.0 - 0.5 * np.minimum(nuc, 1.0)) * tissue


def _render_real(lay, y_um, x_um, tissue, conc) -> None:
    src = _real_concentrations()
    cell = lay.cell_um
    iy = np.minimum((y_um // cell).astype(np.int64), lay.mosaic.shape[0] - 1)
    ix = np.minimum((x_um // cell).astype(np.int64), lay.mosaic.shape[1] - 1)
    ly = (y_um - iy * cell)[:, None] / cell  # in [0, 1)
    lx = (x_um - ix * cell)[None, :] / cell
    par = lay.mosaic[iy[:, None], ix[None, :]]  # (h, w, 4)
    k = par[..., 2].astype(np.int64)
    flip = par[..., 3] > 0.5
    u = np.where(flip, 1.0 - lx, lx) + np.zeros_like(ly)
    v = ly + np.zeros_like(lx)
    # rotate the unit cell by k quarter turns
    uu = np.select([k == 0, k == 1, k == 2], [u, v, 1.0 - u], 1.0 - v)
    vv = np.select([k == 0, k == 1, k == 2], [v, 1.0 - u, 1.0 - v], u)
    ext = cell / (REAL_SOURCE_MPP * lay.zoom)
    sy = par[..., 0] + vv * ext
    sx = par[..., 1] + uu * ext
    i0 = sy.astype(np.int64)
    j0 = sx.astype(np.int64)
    fy = (sy - i0).astype(np.float32)
    fx = (sx - j0).astype(np.float32)
    # source channels H, E, residual -> output channels H, E, (pen), residual
    for c_src, c, gain in ((0, 0, lay.h_gain), (1, 1, 1.0), (2, 3, 1.0)):
        s = src[c_src]
        val = (
            (s[i0, j0] * (1 - fx) + s[i0, j0 + 1] * fx) * (1 - fy)
            + (s[i0 + 1, j0] * (1 - fx) + s[i0 + 1, j0 + 1] * fx) * fy
        )
        conc[c] = val * gain * tissue


def _render_pen(lay, mpp, y0, h, w, conc) -> None:
    r_px = lay.pen_r_um / mpp
    yy = lay.pen_y_um / mpp - y0
    sel = np.nonzero((yy > -r_px - 1) & (yy < h + r_px + 1))[0]
    if not len(sel):
        return
    r = int(np.ceil(r_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (dy**2 + dx**2) <= r_px**2
    dy, dx = dy[disk].ravel(), dx[disk].ravel()
    py = (np.floor(yy[sel]).astype(np.int64)[:, None] + dy[None, :]).ravel()
    px = (np.floor(lay.pen_x_um[sel] / mpp).astype(np.int64)[:, None] + dx[None, :]).ravel()
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    ink = np.zeros(h * w, np.float32)
    ink[py[ok] * w + px[ok]] = 1.0
    conc[2] = ink.reshape(h, w) * 0.9


def _gauss_kernel(sigma_px: float) -> np.ndarray:
    r = int(np.ceil(3.0 * sigma_px))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2).astype(np.float32)
    return k / k.sum()


def _convolve_axis(a: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """Same-size 1-D convolution of a symmetric kernel along ``axis`` with edge
    replication (shifted adds: faster than scipy.ndimage for the short kernels
    of scanner blur; symmetric taps are added before multiplying)."""
    r = len(k) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]

    def shifted(i: int) -> np.ndarray:
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(i, i + n)
        return p[tuple(sl)]

    out = a * k[r]
    tmp = np.empty_like(a)
    for j in range(1, r + 1):
        np.add(shifted(r - j), shifted(r + j), out=tmp)
        tmp *= k[r + j]
        out += tmp
    return out


def blur_rows(conc: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (sigma in pixels) of each concentration channel (scanner optics)."""
    if sigma_px <= 0.05:
        return conc
    k = _gauss_kernel(sigma_px)
    live = [c for c in range(conc.shape[0]) if conc[c].any()]
    if live:
        sub = conc[live]
        conc[live] = _convolve_axis(_convolve_axis(sub, k, 1), k, 2)
    return conc


def blur_margin_px(sigma_px: float) -> int:
    """Rows to render above and below a band so that blurring it is exact."""
    return 0 if sigma_px <= 0.05 else int(np.ceil(3.0 * sigma_px))


def render_rgb_rows(
    lay: TissueLayout, stain: StainParams, mpp: float, y0: int, y1: int, width_px: int
) -> np.ndarray:
    """RGB uint8 of rows ``[y0, y1)`` of ``lay`` scanned by a site (``stain``) at ``mpp``."""
    sigma_px = stain.blur_um / mpp
    m = blur_margin_px(sigma_px)
    conc = render_rows(lay, mpp, y0 - m, y1 + m, width_px)
    conc = blur_rows(conc, sigma_px)
    if m:
        conc = conc[:, m:-m]
    return beer_lambert_rgb(conc, stain, lay.pen_od if len(lay.pen_y_um) else None)
