"""Tiny slides and broken files for the ingest/tiling tests (written with tifffile).

The slides are Aperio-like (pyramidal, 256 px JPEG tiles, ``Aperio Image
Library`` description with ``AppMag``/``MPP``) so tiffslide reads them as SVS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GLASS_RGB = (240, 238, 242)
TISSUE_RGB = (205, 120, 170)  # eosin-pink
NUCLEI_RGB = (110, 70, 160)  # haematoxylin-purple


def render(width: int, height: int, blobs=None, seed: int = 0) -> np.ndarray:
    """Glass with elliptical pink tissue blobs (cx, cy, rx, ry as fractions) and purple dots."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[:] = GLASS_RGB
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for cx, cy, rx, ry in blobs or []:
        inside = ((xx - cx * width) / (rx * width)) ** 2 + ((yy - cy * height) / (ry * height)) ** 2 <= 1
        img[inside] = TISSUE_RGB
        dots = inside & (rng.random(inside.shape) < 0.02)
        img[dots] = NUCLEI_RGB
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_svs(
    path: Path,
    img: np.ndarray,
    mpp: float | None = 0.5,
    app_mag: int | None = 20,
    downsamples=(4,),
    compression: str = "jpeg",
) -> Path:
    """Write ``img`` as an Aperio-like pyramidal tiled TIFF."""
    import tifffile

    desc = "Aperio Image Library v12.0.0\r\n"
    desc += f"{img.shape[1]}x{img.shape[0]} (256x256) JPEG/RGB Q=90"
    if app_mag is not None:
        desc += f"|AppMag = {app_mag}"
    if mpp is not None:
        desc += f"|MPP = {mpp}"
    kw = dict(photometric="rgb", compression=compression, metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), description=desc, **kw)
        thumb = img[::8, ::8]
        tw.write(thumb, description="Aperio Image Library v12.0.0\r\nthumbnail", **kw)
        for ds in downsamples:
            tw.write(np.ascontiguousarray(img[::ds, ::ds]), tile=(256, 256), **kw)
    return Path(path)


def tissue_slide(path: Path, width: int = 1536, height: int = 1024, seed: int = 0, **kw) -> Path:
    blobs = [(0.3, 0.5, 0.2, 0.35), (0.72, 0.45, 0.18, 0.3)]
    return write_svs(path, render(width, height, blobs, seed), **kw)


def blank_slide(path: Path, width: int = 1024, height: int = 768, **kw) -> Path:
    return write_svs(path, render(width, height, [], seed=1), **kw)


def broken_files(folder: Path, good: Path) -> dict[str, Path]:
    """Broken inputs next to a good slide; the key names the expected failure kind."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    out = {}
    p = folder / "truncated.svs"
    p.write_bytes(data[: len(data) // 2])
    out["truncated"] = p
    p = folder / "text.svs"
    p.write_text("this is not a slide\n" * 20)
    out["text"] = p
    p = folder / "empty.svs"
    p.write_bytes(b"")
    out["empty"] = p
    p = folder / "image.svs"
    from PIL import Image

    Image.fromarray(render(64, 64, [(0.5, 0.5, 0.3, 0.3)])).save(p, format="PNG")
    out["png"] = p
    p = folder / "nompp.svs"
    tissue_slide(p, width=768, height=512, mpp=None)
    out["nompp"] = p
    return out
