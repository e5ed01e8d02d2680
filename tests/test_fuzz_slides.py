"""Fuzzed copies of the real CMU slide through ingest -> tile -> embed.

No mutant crashes a stage or hangs it; every slide that fails is recorded with
a cause from the documented list; every tile built from a stored JPEG tile
whose decode raises or warns (checked independently, stored tile by stored
tile) is recorded with its cause, or its slide failed for it.  ~30 mutants in
the normal suite, 300 in the long run (``-m slow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from fuzz_slides import write_mutants
from raypath.embed.api import EmbedConfig, embed
from raypath.errors import cause_of
from raypath.wsi.ingest import IngestConfig, ingest
from raypath.wsi.jpeg import decode_tile
from raypath.wsi.slide_io import REMEDIES
from raypath.wsi.tile_table import read_tile_table
from raypath.wsi.tiling import TileConfig, tile

#: causes a slide may fail with (ingest + tile + embed), each documented in docs/CONTRACTS.md
CAUSES = set(REMEDIES) | {"resolution"}


def damaged_stored_tiles(path: Path) -> set[int]:
    """Indices of level-0 stored tiles whose strict decode fails (the oracle, read straight from the file)."""
    from tifffile.tifffile import jpeg_decode_colorspace

    out = set()
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[0]
        cs = jpeg_decode_colorspace(p.photometric, p.planarconfig, p.extrasamples, p.is_jfif)
        data = path.read_bytes()
        for i, (o, n) in enumerate(zip(p.dataoffsets, p.databytecounts)):
            if n and o + n <= len(data) and decode_tile(data[o : o + n], p.jpegtables, cs[0], cs[1],
                                                        (p.tilelength, p.tilewidth))[1] is not None:
                out.add(i)
    return out


def covering(tiles: pd.DataFrame, stored: set[int], tile_w: int = 240, across: int = 10) -> set[int]:
    """Requested tiles (level 0) that touch one of the ``stored`` tiles."""
    hit = set()
    for r in tiles.itertuples(index=False):
        rows = range(r.y // tile_w, (r.y + r.read_px - 1) // tile_w + 1)
        cols = range(r.x // tile_w, (r.x + r.read_px - 1) // tile_w + 1)
        if any(rr * across + c in stored for rr in rows for c in cols):
            hit.add(int(r.tile_id))
    return hit


def run_fuzz(root: Path, cmu: Path, n: int, seed: int) -> None:
    muts = write_mutants(cmu, root / "slides", n, seed=seed)
    cohort = pd.DataFrame({"slide_id": [p.stem for p, _ in muts], "uri": [str(p) for p, _ in muts]})
    cohort["patient_id"], cohort["cohort"] = cohort["slide_id"], "fuzz"
    cohort.to_csv(root / "cohort.csv", index=False)
    work = str(root / "work")
    slides = ingest(IngestConfig(workdir=work, cohort=str(root / "cohort.csv"), use_ray=False))
    summary = tile(TileConfig(workdir=work, target_mpp=1.0, min_tissue_fraction=0.3, qc=False))
    # 20 %: with ~12 tiles a slide, one damaged tile is kept out (skip) and recorded, four fail the slide
    res = embed(EmbedConfig(workdir=work, model="tiny-vit", batch_size=32, progress_interval_s=30,
                            max_damaged_fraction=0.2))
    manifest = json.loads(next((root / "work" / "features").glob("*/manifest.json")).read_text())

    # every failure, at every stage, has a documented cause (and so its remedy)
    for where, errors in (("ingest", slides.loc[slides["status"] != "ok", "error"]),
                          ("tile", summary.loc[summary["status"] == "failed", "warning"]),
                          ("embed", res.slides.loc[res.slides["status"] == "failed", "error"])):
        for e in errors:
            assert cause_of(e) in CAUSES, (where, e)
            assert ";" in e or ":" in e.split(":", 1)[1], (where, e)  # a next step follows the cause

    # every tile made from a damaged stored tile is recorded, or its slide failed for it
    tiles = read_tile_table(work)
    failed = set(res.slides.loc[res.slides["status"] == "failed", "slide_id"])
    recorded = {sid: set(map(int, e.get("damaged_tiles", {}))) for sid, e in manifest["slides"].items()}
    for sid, d in manifest.get("failed_damaged_tiles", {}).items():
        recorded[sid] = set(map(int, d))
    checked = 0
    for p, _ in muts:
        sid = p.stem
        t = tiles[tiles["slide_id"] == sid]
        if len(t) == 0:
            continue
        want = covering(t, damaged_stored_tiles(p))
        if want and sid not in failed:
            assert want <= recorded.get(sid, set()), (sid, sorted(want - recorded.get(sid, set())))
            checked += len(want)
        if sid in failed:
            assert cause_of(res.slides.set_index("slide_id").loc[sid, "error"]) in CAUSES
    for sid, entry in manifest["slides"].items():  # recorded damage names its cause
        assert all(m.startswith("corrupt_tile_data:") for m in entry.get("damaged_tiles", {}).values()), sid
    # the mutants really exercise the paths: failures at ingest, damaged tiles found and recorded
    assert (slides["status"] != "ok").sum() >= n // 3
    assert checked + len(manifest.get("failed_damaged_tiles", {})) > 0
    return work, res, manifest


def test_fuzzed_slides_through_ingest_tile_embed(tmp_path, cmu_slide, ray_session):
    work, res, manifest = run_fuzz(tmp_path, cmu_slide, n=33, seed=0)

    # a corrupt manifest.json: the run falls back to each file's own cache key (and damage record)
    # and rewrites it, instead of a JSONDecodeError
    path = next(Path(work, "features").glob("*/manifest.json"))
    path.write_text(path.read_text()[:200])
    done = sorted(res.slides.loc[res.slides["status"] == "done", "slide_id"])
    again = embed(EmbedConfig(workdir=work, model="tiny-vit", batch_size=32, slide_ids=done, max_damaged_fraction=0.2))
    assert set(again.slides["status"]) == {"skipped"}, again.slides
    rewritten = json.loads(path.read_text())
    assert sorted(rewritten["slides"]) == done
    assert any(manifest["slides"][sid].get("damaged_tiles") for sid in done)  # skipped damaged tiles exist
    for sid in done:  # damage records survive the lost manifest
        assert rewritten["slides"][sid].get("damaged_tiles") == manifest["slides"][sid].get("damaged_tiles"), sid


@pytest.mark.slow
def test_fuzzed_slides_through_ingest_tile_embed_300(tmp_path, cmu_slide, ray_session):
    run_fuzz(tmp_path, cmu_slide, n=300, seed=1)
