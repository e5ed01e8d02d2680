"""Small slides and tile tables for the reader/embed/feature-store tests.

Slides are written here with tifffile (pyramidal, 256 px JPEG tiles, Aperio
description) so these tests do not depend on other stages' writers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

APERIO_DESC = "Aperio Image Library v12.0.0\r\n{w}x{h} (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"


def texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful texture with fine detail (so JPEG tiles differ)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    from PIL import Image

    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)).astype(np.int16)
    img = img + rng.integers(-20, 21, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_slide(path: Path, width: int = 1100, height: int = 900, seed: int = 0,
                downsamples=(4,), compression="jpeg", tiled: bool = True) -> Path:
    """An Aperio-like pyramidal TIFF (level 0, thumbnail, lower levels)."""
    import tifffile

    img = texture(width, height, seed)
    kw = dict(photometric="rgb", compression=compression, metadata=None)
    tile = dict(tile=(256, 256)) if tiled else dict(rowsperstrip=64)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, description=APERIO_DESC.format(w=width, h=height), **tile, **kw)
        tw.write(np.ascontiguousarray(img[::16, ::16]), description="Aperio Image Library v12.0.0\r\nthumbnail", **kw)
        for ds in downsamples:
            tw.write(np.ascontiguousarray(img[::ds, ::ds]), subfiletype=0, **tile, **kw)
    return Path(path)


def grid_tiles(slide_id: str, width: int, height: int, read_px: int = 224, tile_px: int = 224,
               level: int = 0, downsample: float = 1.0, start=(0, 0), stride_px: int | None = None,
               target_mpp: float = 0.5) -> pd.DataFrame:
    """A tiles.parquet-shaped table: a row-major grid of level-0 positions."""
    step = int(round((stride_px or read_px) * downsample))
    rows = []
    for y in range(start[1], height, step):
        for x in range(start[0], width, step):
            rows.append((slide_id, len(rows), x, y, level, read_px, tile_px, target_mpp, 1.0))
    return pd.DataFrame(rows, columns=["slide_id", "tile_id", "x", "y", "level", "read_px", "tile_px",
                                       "target_mpp", "tissue_fraction"]).astype(
        {"tile_id": "int64", "x": "int64", "y": "int64", "level": "int32", "read_px": "int32",
         "tile_px": "int32", "tissue_fraction": "float32"})


def reference_tile(slide, x: int, y: int, level: int, read_px: int, tile_px: int) -> np.ndarray:
    """tiffslide ``read_region`` + the raypath resize convention."""
    from PIL import Image

    arr = np.asarray(slide.read_region((x, y), level, (read_px, read_px), as_array=True))[:, :, :3]
    if read_px != tile_px:
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((tile_px, tile_px), Image.BILINEAR))
    return arr
