"""Tile pixels for the stages that need images rather than features
(adaptation, augmentation previews, robustness galleries): all of them read
through the one fast reader (:func:`raypath.wsi.reader.read_tiles`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raypath.io.storage import S3Options
from raypath.wsi.reader import read_tiles


def read_tile_dict(slide_uri: str, tiles: pd.DataFrame, s3: S3Options | None = None) -> dict[int, np.ndarray]:
    """``{tile_id: uint8 [px, px, 3]}`` for the given tiles of one slide."""
    out: dict[int, np.ndarray] = {}
    for ids, imgs in read_tiles(slide_uri, tiles, s3=s3):
        for t, img in zip(np.asarray(ids).tolist(), imgs):
            out[int(t)] = np.asarray(img)
    return out


def load_tile_images(tiles: pd.DataFrame, s3: S3Options | None = None) -> np.ndarray:
    """All ``tiles`` (rows with slide_id, uri and the tile columns) as one
    uint8 array ``[n, px, px, 3]`` in row order."""
    by_key: dict[tuple[str, int], np.ndarray] = {}
    for (sid, uri), grp in tiles.groupby(["slide_id", "uri"], sort=False):
        for t, img in read_tile_dict(uri, grp, s3).items():
            by_key[(sid, t)] = img
    return np.stack([by_key[(s, int(t))] for s, t in zip(tiles["slide_id"], tiles["tile_id"])])
