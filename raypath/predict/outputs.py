"""What ``raypath predict`` writes: tables, metrics with bootstrap CIs over
patients, the KM plot by risk group, attention heatmaps and the report page."""

from __future__ import annotations

import html
import json
import logging

import numpy as np
import pandas as pd

from raypath.io.jsonio import to_jsonable
from raypath.io.storage import atomic_write_bytes, join, write_parquet_atomic
from raypath.predict.model import FinalModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metrics


def _bootstrap(frame: pd.DataFrame, stat, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile CI of ``stat(frame)`` over patients resampled with replacement."""
    patients = frame["patient_id"].astype(str).unique()
    groups = {p: g for p, g in frame.groupby(frame["patient_id"].astype(str))}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        pick = rng.choice(patients, size=len(patients), replace=True)
        sample = pd.concat([groups[p].assign(patient_id=f"{p}#{i}") for i, p in enumerate(pick)], ignore_index=True)
        v = stat(sample)
        if v is not None and np.isfinite(v):
            vals.append(v)
    if len(vals) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def survival_metrics(pred: pd.DataFrame, n_boot: int) -> dict:
    """Per-patient Harrell's C (mean risk of a patient's slides) with its CI and pairs."""
    from raypath.evaluation.metrics import concordance, per_patient

    def c_of(frame: pd.DataFrame) -> float:
        pp = per_patient(frame)
        return concordance(pp["time"], pp["event"], pp["risk"])["c_index"]

    pp = per_patient(pred)
    out = concordance(pp["time"], pp["event"], pp["risk"])
    lo, hi = _bootstrap(pred, c_of, n_boot) if n_boot and np.isfinite(out["c_index"]) else (float("nan"),) * 2
    out.update(ci_low=lo, ci_high=hi, n_patients=int(len(pp)), n_events=int(pp["event"].sum()))
    return out


def classification_metrics(pred: pd.DataFrame, meta: FinalModel, n_boot: int) -> dict:
    """AUROC, balanced accuracy, ... (scikit-learn) with a bootstrap CI of the AUROC."""
    from raypath.evaluation.metrics import classification_metrics as cm

    classes = meta.classes or []
    known = pred["label"].astype(str).isin(classes)
    p = pred[known]
    if len(p) == 0:
        return {"note": f"no slide has a label among the model's classes {classes}"}
    prob_cols = [f"prob_{c}" for c in classes]

    def auroc(frame: pd.DataFrame) -> float:
        y = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
        return cm(y, frame[prob_cols].to_numpy()).get("auroc", float("nan"))

    y = p["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    out = dict(cm(y, p[prob_cols].to_numpy()))
    lo, hi = _bootstrap(p, auroc, n_boot) if n_boot else (float("nan"),) * 2
    out.update(auroc_ci_low=lo, auroc_ci_high=hi, n_slides=int(len(p)))
    return out


def compute_metrics(pred: pd.DataFrame, meta: FinalModel, n_boot: int) -> dict:
    """Metrics when the cohort has outcomes (``None`` entries otherwise), on
    the patients the model was not trained on."""
    new = pred[~pred["trained_on"]]
    doc: dict = {"n_slides": int(len(pred)), "n_trained_on": int(pred["trained_on"].sum()), "evaluated_on": "new patients"}
    if meta.task == "survival" and {"time", "event"} <= set(new.columns) and new["time"].notna().any():
        doc["survival"] = survival_metrics(new.dropna(subset=["time", "event"]), n_boot)
        doc["risk_groups"] = new["risk_group"].value_counts().to_dict()
    elif meta.task == "classification" and "label" in new.columns and new["label"].notna().any():
        doc["classification"] = classification_metrics(new.dropna(subset=["label"]), meta, n_boot)
    else:
        doc["note"] = "the cohort has no outcomes: predictions only"
    return doc


# --------------------------------------------------------------------------- heatmaps


def _extent(att: pd.DataFrame) -> float:
    """Tile side in level-0 px: the grid step of the tile coordinates."""
    steps = [np.diff(np.unique(att[c].to_numpy())) for c in ("x", "y")]
    steps = [s[s > 0] for s in steps]
    best = [float(s.min()) for s in steps if len(s)]
    return min(best) if best else 224.0


def slide_thumbnail(uri: str, side: int = 1024) -> tuple[np.ndarray, float]:
    """``(thumbnail uint8 RGB, thumbnail px per level-0 px)`` of the slide at ``uri``."""
    from raypath.wsi.slide_io import opened_slide

    with opened_slide(uri) as s:
        w, _ = s.dimensions
        thumb = np.asarray(s.get_thumbnail((side, side)).convert("RGB"))
    return thumb, thumb.shape[1] / float(w)


def slide_heatmaps(cfg, run_dir: str, slide: pd.Series, att: pd.DataFrame, title: str) -> list[str]:
    """Overlay on the thumbnail, the tile-resolution grid and the top/bottom gallery of one slide."""
    from raypath.predict.heatmap import attention_grid, grid_png, overlay_png

    sid, extent = str(slide["slide_id"]), _extent(att)
    coords, values = att[["x", "y"]].to_numpy(), att["attention"].to_numpy()
    files = []
    thumb, scale = slide_thumbnail(str(slide["uri"]))
    atomic_write_bytes(join(run_dir, "heatmaps", f"{sid}.png"), overlay_png(thumb, scale, coords, extent, values, title))
    grid, _ = attention_grid(coords, extent, values)
    atomic_write_bytes(join(run_dir, "heatmaps", f"{sid}_grid.png"), grid_png(grid))
    files += [f"heatmaps/{sid}.png", f"heatmaps/{sid}_grid.png"]
    if cfg.gallery_tiles:
        files.append(_gallery(cfg, run_dir, slide, att, title))
    return files


def _gallery(cfg, run_dir: str, slide: pd.Series, att: pd.DataFrame, title: str, column: str = "attention",
             name: str = "gallery", label: str = "attention") -> str:
    """``heatmaps/<slide>_<name>.png``: the tiles with the highest and lowest ``column``."""
    from raypath.predict.heatmap import gallery_png
    from raypath.wsi.tile_images import read_tile_dict
    from raypath.wsi.tile_table import read_slide_tiles

    sid = str(slide["slide_id"])
    order = att.sort_values(column, ascending=False)["tile_id"].astype(int).tolist()
    k = min(cfg.gallery_tiles, len(order) // 2 or 1)
    top, bottom = order[:k], order[::-1][:k]
    tiles = read_slide_tiles(cfg.workdir, sid)
    tiles = tiles[tiles["tile_id"].astype(int).isin(set(top + bottom))]
    imgs = read_tile_dict(str(slide["uri"]), tiles)
    png = gallery_png([imgs[t] for t in top if t in imgs], [imgs[t] for t in bottom if t in imgs], title, label)
    atomic_write_bytes(join(run_dir, "heatmaps", f"{sid}_{name}.png"), png)
    return f"heatmaps/{sid}_{name}.png"


def write_heatmaps(cfg, run_dir: str, pred: pd.DataFrame, att: pd.DataFrame, slides: pd.DataFrame,
                   meta: FinalModel) -> dict[str, list[str]]:
    """Heatmaps of the ``cfg.heatmaps`` highest-scoring slides; a slide that cannot be drawn is logged."""
    key = "risk" if meta.task == "survival" else next(c for c in pred.columns if c.startswith("prob_"))
    chosen = pred.sort_values(key, ascending=False)["slide_id"].head(cfg.heatmaps).tolist()
    out: dict[str, list[str]] = {}
    by_id = slides.set_index("slide_id")
    for sid in chosen:
        row = by_id.loc[sid].copy()
        row["slide_id"] = sid
        title = f"{sid}: {key} {float(pred.loc[pred.slide_id == sid, key].iloc[0]):.3f}"
        try:
            out[sid] = slide_heatmaps(cfg, run_dir, row, att[att["slide_id"] == sid], title)
        except Exception as e:  # noqa: BLE001 - one slide's drawing never stops the run
            log.warning("heatmap of %s not drawn: %s", sid, e)
    return out


# --------------------------------------------------------------------------- files + page


def write_outputs(cfg, meta: FinalModel, run_dir: str, pred: pd.DataFrame, att: pd.DataFrame,
                  failed: pd.DataFrame, slides: pd.DataFrame) -> dict:
    """Every file of the run; returns the metrics document."""
    import pyarrow as pa

    write_parquet_atomic(pa.Table.from_pandas(pred, preserve_index=False), join(run_dir, "predictions.parquet"))
    if len(att):
        write_parquet_atomic(pa.Table.from_pandas(att, preserve_index=False), join(run_dir, "attention.parquet"))
    metrics = compute_metrics(pred, meta, cfg.n_boot)
    metrics.update(stage="predict", model=cfg.model, failed=failed.to_dict("records"),
                   headline=_headline(metrics))
    km = None
    if "survival" in metrics:
        km = _km_png(pred[~pred["trained_on"]])
        atomic_write_bytes(join(run_dir, "km.png"), km)
    maps = write_heatmaps(cfg, run_dir, pred, att, slides, meta) if cfg.heatmaps and len(att) else {}
    metrics["heatmaps"] = maps
    atomic_write_bytes(join(run_dir, "metrics.json"), json.dumps(to_jsonable(metrics), indent=2).encode())
    cfg.save(run_dir)
    atomic_write_bytes(join(run_dir, "report.html"), render_page(cfg, meta, pred, metrics, km is not None).encode())
    return metrics


def _headline(metrics: dict) -> dict:
    if "survival" in metrics:
        s = metrics["survival"]
        return {"c_index": s["c_index"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                "n_comparable_pairs": s["n_comparable_pairs"], "n_patients": s["n_patients"]}
    if "classification" in metrics:
        c = metrics["classification"]
        return {k: c.get(k) for k in ("auroc", "auroc_ci_low", "auroc_ci_high", "balanced_accuracy", "n_slides")}
    return {"n_slides": metrics["n_slides"]}


def _km_png(pred: pd.DataFrame) -> bytes:
    """KM curves by the model's risk groups (training cut-offs) on the new patients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypath.mil.plots import km_curve

    fig, ax = plt.subplots(figsize=(6, 4))
    for grp in sorted(pred["risk_group"].astype(str).unique()):
        g = pred[pred["risk_group"].astype(str) == grp]
        x, y = km_curve(g["time"], g["event"])
        ax.step(np.concatenate([[0], x]), np.concatenate([[1], y]), where="post", label=f"{grp} risk (n={len(g)})")
        cens = g.loc[~g["event"].astype(bool), "time"].to_numpy(float)
        idx = np.searchsorted(np.asarray(x), cens, side="right") - 1
        ax.plot(cens, np.where(idx >= 0, np.asarray(y)[np.clip(idx, 0, None)], 1.0), "+", color="k", ms=6)
    ax.set_xlabel("time (unit of the cohort table)")
    ax.set_ylabel("survival")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("new patients by predicted risk group (+ = censored)", fontsize=9)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def page_head(cfg, heading: str, headline: dict) -> list[str]:
    """The top of a predict page: title, heading, and the headline table that opens the answer section
    (the caller closes it with ``</section>``)."""
    from raypath.report.html import num

    e = html.escape
    return [f"<html><head><meta charset='utf-8'><title>predict: {e(cfg.model)}</title></head><body>",
            f"<h1>{e(heading)}</h1>",
            "<section id='answer'><table border=1 cellpadding=4><tr>" + "".join(f"<th>{e(str(k))}</th>" for k in headline)
            + "</tr><tr>" + "".join(f"<td>{e(num(v))}</td>" for v in headline.values()) + "</tr></table>"]


def render_page(cfg, meta: FinalModel, pred: pd.DataFrame, metrics: dict, has_km: bool) -> str:
    """A self-contained-enough page (images linked next to it) that leads with the answer."""
    e = html.escape
    name = cfg.model.rstrip("/").split("/")[-1]
    lines = page_head(cfg, f"Predictions of {name}", metrics.get("headline", {}))
    lines += [f"<p>{metrics['n_slides']} slides scored; {metrics['n_trained_on']} belong to patients the model was "
             f"trained on (flagged, left out of the metrics); {len(metrics['failed'])} slide(s) could not be scored.</p>"
             "</section>"]
    if has_km:
        lines.append("<h2>Survival by predicted risk group (training cut-offs)</h2><img src='km.png' width=700>")
    for sid, files in metrics.get("heatmaps", {}).items():
        lines.append(f"<h3>{e(sid)}</h3>" + "".join(f"<a href='{e(f)}'><img src='{e(f)}' height=260></a> " for f in files))
    if metrics["failed"]:
        lines.append("<h2>Not scored</h2><ul>" + "".join(f"<li>{e(r['slide_id'])}: {e(str(r['reason']))}</li>"
                                                        for r in metrics["failed"]) + "</ul>")
    cols = [c for c in pred.columns if c not in ("time", "event")]
    lines.append("<h2>Predictions</h2>" + pred[cols].head(500).to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    lines.append("</body></html>")
    return "\n".join(lines)
