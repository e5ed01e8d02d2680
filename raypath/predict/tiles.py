"""``raypath predict`` with a patch classifier: per-tile probability maps over whole slides.

A patch model (``raypath patch --final``, :mod:`raypath.predict.patch_model`)
classifies every tile of every slide whose features share its identity (the
same FM, weights and preprocessing; tiles of the patch side at the patch
mpp).  :mod:`raypath.predict.api` finds or makes those features and the
slides to score; this module writes, under ``<workdir>/runs/<run>/``:

* ``tiles_predictions.parquet`` -- ``slide_id, tile, x, y, prob_<class>`` for every tile;
* ``predictions.parquet`` -- one row per slide: ``n_tiles``, ``tissue_mm2``
  (tiles x tile area), and per class ``mean_prob_<class>``,
  ``n_over_0.5_<class>`` (tiles whose probability exceeds 0.5) and
  ``density_<class>_per_mm2`` (those tiles per mm2 of tiled tissue), plus
  the slide's patient, cohort and outcome columns and ``trained_on``;
* ``heatmaps/<slide>_prob.png`` -- the positive class's probability on the
  thumbnail, colours over [0, 1]; ``heatmaps/<slide>_prob_grid.png`` -- the
  same map at tile resolution (one pixel per tile position);
  ``heatmaps/<slide>_prob_gallery.png`` -- the most and least probable tiles;
* ``metrics.json`` (counts, the headline, failed slides) and ``report.html``.
"""

from __future__ import annotations

import html
import json
import logging

import numpy as np
import pandas as pd

from raypath.io.jsonio import to_jsonable
from raypath.io.storage import atomic_write_bytes, join, write_parquet_atomic
from raypath.predict.patch_model import PatchModel

log = logging.getLogger(__name__)

THRESHOLD = 0.5


def score_tiles(model: PatchModel, feature_dir: str, slide_ids: list[str]) -> pd.DataFrame:
    """Class probabilities of every tile of ``slide_ids``: slide_id, tile, x, y, prob_<class>."""
    from raypath.embed.store import FeatureStore

    store = FeatureStore(feature_dir)
    parts = []
    for sid in slide_ids:
        bag = store.load_bag(sid)
        p = model.predict_proba(bag.features)
        cols = {f"prob_{c}": p[:, i] for i, c in enumerate(model.classes)}
        parts.append(pd.DataFrame({"slide_id": sid, "tile": bag.tile_ids.astype(np.int64),
                                   "x": bag.coords[:, 0], "y": bag.coords[:, 1], **cols}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def score_tiles_all(model: PatchModel, feature_dir: str, slide_ids: list[str], num_tasks: int) -> pd.DataFrame:
    """:func:`score_tiles` here, or over ``num_tasks`` Ray tasks (one chunk of slides each)."""
    if num_tasks <= 0 or len(slide_ids) < 2:
        return score_tiles(model, feature_dir, slide_ids)
    import ray

    from raypath.io.ray_env import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(score_tiles)
    chunks = [c.tolist() for c in np.array_split(np.asarray(slide_ids, dtype=object), min(num_tasks, len(slide_ids)))]
    ref = ray.put(model)
    return pd.concat(ray.get([task.remote(ref, feature_dir, c) for c in chunks if c]), ignore_index=True)


def tile_area_mm2(model: PatchModel) -> float:
    """Area of one tile in mm2 from the model's tiling (NaN when the tiling is not recorded)."""
    tiling = model.identity.get("tiling") or {}
    px, mpp = tiling.get("tile_px"), tiling.get("target_mpp")
    if not isinstance(px, (int, float)) or not isinstance(mpp, (int, float)):
        return float("nan")
    return (float(px) * float(mpp) / 1000.0) ** 2


def slide_summary(tiles: pd.DataFrame, model: PatchModel) -> pd.DataFrame:
    """One row per slide: tiles, tissue area, and per class the mean probability,
    the tiles over 0.5 and their density per mm2."""
    g = tiles.groupby("slide_id", sort=False)
    out = g.size().rename("n_tiles").to_frame()
    out["tissue_mm2"] = out["n_tiles"] * tile_area_mm2(model)
    for c in model.classes:
        col = f"prob_{c}"
        out[f"mean_prob_{c}"] = g[col].mean()
        out[f"n_over_0.5_{c}"] = g[col].apply(lambda s: int((s > THRESHOLD).sum()))
        out[f"density_{c}_per_mm2"] = out[f"n_over_0.5_{c}"] / out["tissue_mm2"]
    return out.reset_index()


def slide_predictions(tiles: pd.DataFrame, slides: pd.DataFrame, model: PatchModel) -> pd.DataFrame:
    """:func:`slide_summary` with the slides' patient/cohort/outcome columns and ``trained_on``."""
    keep = [c for c in ("slide_id", "patient_id", "cohort", "time", "event", "label") if c in slides.columns]
    pred = slides[keep].merge(slide_summary(tiles, model), on="slide_id", how="right")
    pred["patient_id"] = pred.get("patient_id", pred["slide_id"]).astype(str)
    pred["trained_on"] = (pred["patient_id"].isin(set(model.trained_patients))
                          | pred["slide_id"].astype(str).isin(set(model.trained_slides)))
    return pred


# --------------------------------------------------------------------------- maps


def prob_heatmaps(cfg, run_dir: str, slide: pd.Series, tiles: pd.DataFrame, model: PatchModel) -> list[str]:
    """Probability of the positive class on the thumbnail, at tile resolution and as a gallery."""
    from raypath.predict.heatmap import attention_grid, grid_png, overlay_png
    from raypath.predict.outputs import _extent, _gallery, slide_thumbnail

    sid, pos = str(slide["slide_id"]), model.positive_class
    col, label = f"prob_{pos}", f"P({pos})"
    extent = _extent(tiles)
    coords, values = tiles[["x", "y"]].to_numpy(), tiles[col].to_numpy()
    title = f"{sid}: {label} per tile, mean {float(np.mean(values)):.3f}"
    thumb, scale = slide_thumbnail(str(slide["uri"]))
    atomic_write_bytes(join(run_dir, "heatmaps", f"{sid}_prob.png"),
                       overlay_png(thumb, scale, coords, extent, values, title, vmax=1.0, label=label))
    grid, _ = attention_grid(coords, extent, values)
    atomic_write_bytes(join(run_dir, "heatmaps", f"{sid}_prob_grid.png"), grid_png(grid, vmax=1.0))
    files = [f"heatmaps/{sid}_prob.png", f"heatmaps/{sid}_prob_grid.png"]
    if cfg.gallery_tiles:
        frame = tiles.rename(columns={"tile": "tile_id"})
        files.append(_gallery(cfg, run_dir, slide, frame, title, column=col, name="prob_gallery", label=label))
    return files


def write_prob_maps(cfg, run_dir: str, pred: pd.DataFrame, tiles: pd.DataFrame, slides: pd.DataFrame,
                    model: PatchModel) -> dict[str, list[str]]:
    """Maps of the ``cfg.heatmaps`` slides with the highest mean positive probability."""
    key = f"mean_prob_{model.positive_class}"
    chosen = pred.sort_values(key, ascending=False)["slide_id"].head(cfg.heatmaps).tolist()
    by_id = slides.set_index("slide_id")
    out: dict[str, list[str]] = {}
    for sid in chosen:
        row = by_id.loc[sid].copy()
        row["slide_id"] = sid
        try:
            out[sid] = prob_heatmaps(cfg, run_dir, row, tiles[tiles["slide_id"] == sid], model)
        except Exception as e:  # noqa: BLE001 - one slide's drawing never stops the run
            log.warning("probability map of %s not drawn: %s", sid, e)
    return out


# --------------------------------------------------------------------------- files + page


def tile_metrics(cfg, model: PatchModel, pred: pd.DataFrame, tiles: pd.DataFrame, failed: pd.DataFrame) -> dict:
    pos = model.positive_class
    headline = {"n_slides": int(len(pred)), "n_tiles": int(len(tiles)),
                f"mean_prob_{pos}": float(pred[f"mean_prob_{pos}"].mean()) if len(pred) else float("nan"),
                f"median_density_{pos}_per_mm2": float(pred[f"density_{pos}_per_mm2"].median()) if len(pred)
                else float("nan")}
    return {"stage": "predict", "model_kind": "patch", "model": cfg.model, "method": model.method,
            "classes": model.classes, "positive": pos, "threshold": THRESHOLD, "n_slides": int(len(pred)),
            "n_tiles": int(len(tiles)), "n_trained_on": int(pred["trained_on"].sum()),
            "tile_area_mm2": tile_area_mm2(model), "failed": failed.to_dict("records"), "headline": headline,
            "note": "per-tile probabilities of a patch classifier: slide summaries, no outcome metrics"}


def write_tile_outputs(cfg, model: PatchModel, run_dir: str, pred: pd.DataFrame, tiles: pd.DataFrame,
                       failed: pd.DataFrame, slides: pd.DataFrame) -> dict:
    """Every file of a patch-model run; returns the metrics document."""
    import pyarrow as pa

    write_parquet_atomic(pa.Table.from_pandas(tiles, preserve_index=False), join(run_dir, "tiles_predictions.parquet"))
    write_parquet_atomic(pa.Table.from_pandas(pred, preserve_index=False), join(run_dir, "predictions.parquet"))
    metrics = tile_metrics(cfg, model, pred, tiles, failed)
    metrics["heatmaps"] = write_prob_maps(cfg, run_dir, pred, tiles, slides, model) if cfg.heatmaps and len(tiles) else {}
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps(to_jsonable(metrics), indent=2).encode())
    cfg.save(run_dir)
    atomic_write_bytes(join(run_dir, "report.html"), render_tile_page(cfg, model, pred, metrics).encode())
    return metrics


def render_tile_page(cfg, model: PatchModel, pred: pd.DataFrame, metrics: dict) -> str:
    """The run's page: the headline, what the maps show, each map, the per-slide table."""
    from raypath.predict.outputs import page_head
    from raypath.report.html import num

    e, pos = html.escape, model.positive_class
    name = cfg.model.rstrip("/").split("/")[-1]
    lines = page_head(cfg, f"Per-tile probabilities of {name} ({model.method} probe)", metrics["headline"])
    lines += [f"<p>{metrics['n_slides']} slides, {metrics['n_tiles']} tiles classified ({e(', '.join(model.classes))}); "
             f"{metrics['n_trained_on']} slide(s) belong to patients or slides the model was trained on "
             f"(<code>trained_on</code>); {len(metrics['failed'])} slide(s) could not be scored.</p></section>",
             f"<p>Probability maps: each tile's footprint coloured by its probability of <b>{e(pos)}</b> on one "
             "colour scale over [0, 1] (inferno), on the slide thumbnail (<code>_prob.png</code>) and at tile "
             "resolution, one pixel per tile (<code>_prob_grid.png</code>); the gallery shows the most and least "
             f"probable tiles. Density = tiles over {THRESHOLD} per mm&sup2; of tiled tissue "
             f"({num(metrics['tile_area_mm2'])} mm&sup2; per tile). Every tile's probabilities are in "
             "<code>tiles_predictions.parquet</code>.</p>"]
    for sid, files in metrics.get("heatmaps", {}).items():
        lines.append(f"<h3>{e(sid)}</h3>" + "".join(f"<a href='{e(f)}'><img src='{e(f)}' height=260></a> " for f in files))
    if metrics["failed"]:
        lines.append("<h2>Not scored</h2><ul>" + "".join(f"<li>{e(r['slide_id'])}: {e(str(r['reason']))}</li>"
                                                        for r in metrics["failed"]) + "</ul>")
    lines.append("<h2>Per slide</h2>" + pred.head(500).to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    lines.append("</body></html>")
    return "\n".join(lines)


def predict_tiles(cfg, model: PatchModel, feature_dir: str, slides: pd.DataFrame, failed: pd.DataFrame):
    """Score every tile, summarise per slide and write the run; returns ``(run_dir, per-slide, tiles, metrics)``."""
    tiles = score_tiles_all(model, feature_dir, slides["slide_id"].tolist(), cfg.num_tasks)
    pred = slide_predictions(tiles, slides, model)
    run_dir = join(cfg.workdir, "runs", cfg.run or f"predict-{cfg.model.rstrip('/').split('/')[-1]}")
    metrics = write_tile_outputs(cfg, model, run_dir, pred, tiles, failed, slides)
    return run_dir, pred, tiles, metrics
