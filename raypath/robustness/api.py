"""``run_robustness`` and ``compare``: the robustness stage over a feature store.

Reads ``features/<model_key>/`` (a sample of tiles per slide), joins the
cohort columns from ``<workdir>/slides.parquet``, computes every metric of
:mod:`raypath.robustness.metrics`, draws the plots of
:mod:`raypath.robustness.plots` and writes ``<workdir>/runs/<run>/``::

    config.yaml          resolved RobustnessConfig
    robustness.json      every number + the inputs that produced it
    *.png                t-SNE/UMAP maps, purity per cluster, RI curve, CRoMa histogram, gallery

``compare`` runs the same analysis on two feature stores over the same slides
and tiles (e.g. before/after adaptation) and writes ``comparison.json`` with
both results and the deltas, plus ``a/`` and ``b/`` sub-folders.

The analysis is NumPy/scikit-learn on one process: the sampling controls
(tiles per slide, per-metric sample caps, chunked exact kNN) bound memory and
time whatever the cohort size, so it needs no Ray.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from raypath import __version__
from raypath.wsi.tile_images import read_tile_dict
from raypath.evaluation.meanings import better
from raypath.io.jsonio import to_jsonable
from raypath.config import StageConfig
from raypath.errors import RaypathError
from raypath.embed.identity import check_store, features_digest
from raypath.embed.store import FeatureStore
from raypath.io.storage import (
    S3Options,
    atomic_write_bytes,
    exists,
    join,
    read_parquet,
)
from raypath.robustness import metrics as M

log = logging.getLogger(__name__)

RESULT_FILE = "robustness.json"
COMPARISON_FILE = "comparison.json"

#: Headline numbers: (key, path in the result).
_HEADLINE_PATHS = [
    ("site_probe_balanced_accuracy", ("site_probe", "balanced_accuracy")),
    ("site_probe_chance", ("site_probe", "chance")),
    ("kmeans_purity", ("kmeans_purity", "purity")),
    ("kmeans_chance_purity", ("kmeans_purity", "chance_purity")),
    ("robustness_index", ("robustness_index", "ri")),
    ("robustness_index_chance", ("robustness_index", "chance")),
    ("robustness_index_k", ("robustness_index", "k")),
    ("croma_median", ("croma", "median")),
    ("croma_worst10_mean", ("croma", "worst_tail_mean")),
    ("croma_frac_le_0", ("croma", "frac_le_0")),
    ("clustering_score", ("clustering_score", "score")),
    ("cohort_silhouette", ("cohort_clusters", "silhouette")),
    ("cohort_calinski_harabasz", ("cohort_clusters", "calinski_harabasz")),
    ("cohort_davies_bouldin", ("cohort_clusters", "davies_bouldin")),
    ("cohort_between_within_ratio", ("cohort_clusters", "between_within_ratio")),
]
#: ... with the direction that is more robust (from the one table of metric meanings).
HEADLINE = [(key, path, better(key)) for key, path in _HEADLINE_PATHS]


class RobustnessConfig(StageConfig):
    """How to measure the site information in a feature store."""

    workdir: str = Field(description="project folder (local path or s3:// URI)")
    features: str | None = Field(
        None,
        description="feature folder, or a model key under <workdir>/features; "
        "default: the only model there",
    )
    run: str | None = Field(None, description="run name under <workdir>/runs [default: robustness-<model_key>]")
    biology_column: str = Field("label", description="slides.parquet column holding the biology (e.g. label, true_phenotype)")
    centre_column: str = Field("cohort", description="slides.parquet column holding the centre/site")
    patient_column: str = Field("patient_id", description="column grouping the site-probe CV folds")
    tiles_per_slide: int = Field(100, description="random tiles read per slide (fewer on large cohorts: "
                                 "at most the largest per-metric cap in total)")
    tsne_tiles_per_slide: int = Field(10, description="tiles per slide in the t-SNE/UMAP maps")
    tsne_max_points: int = Field(5000, description="cap on points in the 2-D maps")
    tsne_iterations: int = Field(1000, description="t-SNE optimisation steps (>= 250)")
    kmeans_k: int = Field(200, description="KMeans clusters for purity (capped to n_tiles/20 on small data)")
    kmeans_repeats: int = Field(20, description="KMeans repeats (different seeds) for purity")
    kmeans_max_samples: int = Field(50000, description="cap on tiles clustered for purity (slide-balanced)")
    knn_k: int | None = Field(None, description="RI neighbourhood size; default: chosen by kNN balanced accuracy")
    knn_k_candidates: list[int] = Field(list(M.DEFAULT_K_CANDIDATES), description="RI k candidates")
    croma_m: int = Field(5, description="CRoMa: SO/OS neighbours averaged per tile")
    knn_max_samples: int = Field(20000, description="cap on tiles in RI/CRoMa neighbour searches (slide-balanced)")
    probe_max_samples: int = Field(20000, description="cap on tiles in the site probe")
    probe_folds: int = Field(5, description="site probe CV folds (grouped by patient)")
    cluster_score_k: int | None = Field(None, description="clustering score k; default: best silhouette in 2..10")
    cluster_max_samples: int = Field(5000, description="cap on tiles for the clustering score")
    memory_mb: int = Field(256, description="memory budget of one chunk of the kNN / pairwise distance matrices")
    plots: bool = Field(True, description="draw plots (t-SNE, purity, RI curve, CRoMa histogram)")
    umap: bool = Field(True, description="also draw a UMAP map when umap-learn is installed")
    gallery: bool = Field(True, description="gallery of tiles near/medium/far from cluster centres (reads slides)")
    gallery_clusters: int = Field(4, description="clusters shown in the gallery")
    gallery_tiles: int = Field(4, description="tiles per band (near/medium/far) in the gallery")
    seed: int = Field(0, description="seed of every random choice")
    bootstrap_resamples: int = Field(1000, ge=0, description="--compare-to: paired bootstrap resamples over "
                                     "patients for the CI of each difference (0 = no CI, no winner named)")
    bootstrap_ci: float = Field(0.95, gt=0, lt=1, description="--compare-to: confidence level of the difference's CI")


# --------------------------------------------------------------------------- inputs


def resolve_feature_dir(workdir: str, features: str | None) -> str:
    """A feature folder from a path/URI, a model key, or the only store under
    ``<workdir>/features`` (see :func:`raypath.embed.store.resolve_feature_dir`)."""
    from raypath.embed.store import resolve_feature_dir as _resolve

    return _resolve(workdir, features)


def load_slides(workdir: str, s3: S3Options | None = None) -> pd.DataFrame:
    """``<workdir>/slides.parquet`` without failed slides."""
    uri = join(workdir, "slides.parquet")
    if not exists(uri, s3):
        raise RaypathError(f"{uri!r} not found: run `raypath ingest` first (it writes the cohort metadata)")
    df = read_parquet(uri, s3).to_pandas()
    if "status" in df.columns:
        df = df[df["status"].fillna("ok") == "ok"]
    return df.reset_index(drop=True)


def load_sample(
    feature_dir: str,
    slides: pd.DataFrame,
    tiles_per_slide: int,
    seed: int,
    slide_ids: list[str] | None = None,
    s3: S3Options | None = None,
    max_total: int | None = None,
    min_per_slide: int = 1,
) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Random tiles per slide from a store, with the cohort columns of each tile's slide.

    ``max_total`` bounds memory on large cohorts: no metric uses more tiles than
    its cap, so each slide contributes at most
    ``max(min_per_slide, ceil(max_total / n_slides))`` tiles (and never more
    than ``tiles_per_slide``).
    """
    store = FeatureStore(feature_dir, s3)
    have = set(store.slide_ids())
    known = set(slides["slide_id"].astype(str))
    ids = sorted(have & known) if slide_ids is None else [s for s in slide_ids if s in have]
    if not ids:
        raise RaypathError(
            f"no slide of {feature_dir!r} is listed (status ok) in slides.parquet: embed the "
            "cohort's slides or point --workdir at the project that holds them"
        )
    if max_total is not None:
        tiles_per_slide = int(min(tiles_per_slide, max(min_per_slide, -(-int(max_total) // len(ids)))))
    X, meta = store.sample_tiles(tiles_per_slide, ids, seed)
    meta = meta.merge(slides.assign(slide_id=slides["slide_id"].astype(str)), on="slide_id", how="left",
                      suffixes=("", "_slide"))
    manifest = store.manifest()
    # the one feature identity: refuse features made from other slide files than the cohort lists
    ident = check_store(feature_dir, slides=slides, s3=s3)
    info = {
        "feature_dir": feature_dir,
        "identity": ident.to_dict() if ident is not None else None,
        # what produced the features: model, weights/adapter sha256, preprocessing
        # (not passed through redact(): it masks any key containing "token", e.g.
        # num_register_tokens; the manifest holds no secrets, it is already stored as is)
        "manifest": {k: v for k, v in manifest.items() if k not in ("slides", "failed", "schema")},
        # one digest over the per-slide cache keys of the slides analysed (raypath.embed.identity)
        "slides_cache_digest": features_digest(store, ids) if manifest.get("slides") else None,
        "n_slides_in_store": len(have),
        "n_slides_without_metadata": len(have - known),
        "n_slides": len(ids),
        "tiles_per_slide_loaded": int(tiles_per_slide),
        "n_tiles": int(len(X)),
        "dim": int(X.shape[1]),
    }
    return X, meta, info


# --------------------------------------------------------------------------- analysis


def _column(meta: pd.DataFrame, col: str) -> pd.Series | None:
    if col not in meta.columns:
        return None
    s = meta[col]
    if s.isna().all():
        return None
    return s.astype("string")


def tissue_units(meta: pd.DataFrame, patient_column: str = "patient_id") -> np.ndarray:
    """The independent unit of each tile: its patient, merged with every patient
    a ``pair_id`` links to it (technical variants of one tissue); the slide when
    the patient is missing.  RI/CRoMa exclude neighbours of the same unit (a
    tile's own twin is not "same biology, other centre"), the site probe's CV
    groups by it, and comparisons resample it."""
    from raypath.evaluation.splits import linked_groups

    slides = meta["slide_id"].astype(str)
    patients = meta[patient_column] if patient_column in meta.columns else pd.Series(pd.NA, index=meta.index)
    frame = pd.DataFrame({"patient_id": patients.astype("string").fillna(slides).to_numpy()})
    if "pair_id" in meta.columns:
        frame["pair_id"] = meta["pair_id"].to_numpy()
    return np.asarray(linked_groups(frame)).astype(str)


def analyse(X: np.ndarray, meta: pd.DataFrame, cfg: RobustnessConfig) -> tuple[dict, dict]:
    """Every metric on one tile sample.  Returns ``(results, arrays)``: the
    arrays feed the plots and the comparison's bootstrap
    (:func:`raypath.robustness.bootstrap.contributions`).

    Metrics that need a column the cohort lacks (biology for RI/CRoMa/
    clustering score) are reported as ``{"skipped": reason}`` rather than failing.
    """
    res: dict[str, Any] = {}
    timings: dict[str, float] = {}
    centre = _column(meta, cfg.centre_column)
    if centre is None:
        raise RaypathError(
            f"column {cfg.centre_column!r} missing or empty in slides.parquet: pass --centre-column "
            "with the column that names each slide's site/cohort"
        )
    slides = meta["slide_id"].astype(str).to_numpy()
    units = tissue_units(meta, cfg.patient_column)
    arrays: dict[str, Any] = {"units": units}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        return out

    keep = ~centre.isna().to_numpy()
    c_all = centre.to_numpy()
    _site_metrics(X, c_all, keep, slides, units, cfg, res, arrays, timed)
    _biology_metrics(X, meta, c_all, keep, slides, units, cfg, res, arrays, timed)
    res["timings_s"] = timings
    res["headline"] = headline(res)
    return res, arrays


def _site_metrics(X, c_all, keep, slides, units, cfg, res, arrays, timed) -> None:
    """Site probe, cohorts as clusters, KMeans purity (need the centre only)."""
    idx = np.flatnonzero(keep)[M.cap_per_group(slides[keep], cfg.probe_max_samples, cfg.seed)]
    probe = timed("site_probe", lambda: M.site_probe(
        X[idx], c_all[idx], units[idx], n_splits=cfg.probe_folds, seed=cfg.seed))
    if "oof_pred" in probe:
        arrays["probe"] = {"rows": idx, "pred": probe.pop("oof_pred"), "y": probe.pop("y")}
    probe["params"] = {"n_samples": int(len(idx)), "folds": cfg.probe_folds,
                       "grouped_by": f"{cfg.patient_column} (+ pair_id links)"}
    res["site_probe"] = probe

    rows = np.flatnonzero(keep)
    cc = timed("cohort_clusters", lambda: M.cohort_cluster_metrics(X[keep], c_all[keep], seed=cfg.seed))
    if "silhouette_rows" in cc:
        arrays["silhouette"] = {"rows": rows[cc.pop("silhouette_rows")], "values": cc.pop("silhouette_per_sample")}
        arrays["ch"] = {"rows": rows, "centre": c_all[keep]}
    res["cohort_clusters"] = cc

    idx = rows[M.cap_per_group(slides[keep], cfg.kmeans_max_samples, cfg.seed)]
    kp = timed("kmeans_purity", lambda: M.kmeans_purity(
        X[idx], c_all[idx], k=cfg.kmeans_k, repeats=cfg.kmeans_repeats, seed=cfg.seed))
    if "assign" in kp:
        arrays["kmeans"] = {"rows": idx, "assign": kp.pop("assign"), "centres": kp.pop("centres"),
                            "assign_all": kp.pop("assign_all"), "centre": M.codes(c_all[idx])[0], "k": kp["k"]}
    kp["params"] = {"max_samples": cfg.kmeans_max_samples, "n_slides": int(len(set(slides[idx])))}
    res["kmeans_purity"] = kp


def _biology_metrics(X, meta, c_all, keep, slides, units, cfg, res, arrays, timed) -> None:
    """RI, CRoMa and the clustering score (need a biology column); neighbours
    of the same patient / pair_id are excluded, not only those of the same slide."""
    biology = _column(meta, cfg.biology_column)
    names = ("robustness_index", "croma", "clustering_score")
    if biology is None:
        reason = (f"biology column {cfg.biology_column!r} missing or empty: pass --biology-column "
                  "(e.g. label or true_phenotype)")
        res.update({name: {"skipped": reason} for name in names})
        return
    keep_b = keep & ~biology.isna().to_numpy()
    b_all = biology.to_numpy()
    n_b, n_c = len(set(b_all[keep_b])), len(set(c_all[keep_b]))
    if n_b < 2 or n_c < 2:
        reason = f"needs >= 2 biology classes and >= 2 centres, found {n_b} and {n_c}"
        res.update({name: {"skipped": reason} for name in names})
        return
    mem = int(cfg.memory_mb) * 2**20
    idx = np.flatnonzero(keep_b)[M.cap_per_group(slides[keep_b], cfg.knn_max_samples, cfg.seed)]
    args = (X[idx], b_all[idx], c_all[idx], units[idx])
    ri = timed("robustness_index", lambda: M.robustness_index(
        *args, k=cfg.knn_k, k_candidates=cfg.knn_k_candidates, memory_bytes=mem))
    arrays["ri"] = {"rows": idx, "so": ri.pop("so_per_sample"), "os": ri.pop("os_per_sample")}
    ri["grouped_by"] = f"{cfg.patient_column} (+ pair_id links)"
    res["robustness_index"] = ri
    per_tile = timed("croma", lambda: M.croma_per_sample(*args, m=cfg.croma_m, memory_bytes=mem))
    res["croma"] = {**M.croma_summary(per_tile), "m": cfg.croma_m}
    arrays["croma"], arrays["croma_rows"] = per_tile, idx
    idx_c = np.flatnonzero(keep_b)[M.cap_per_group(slides[keep_b], cfg.cluster_max_samples, cfg.seed)]
    cs = timed("clustering_score", lambda: M.clustering_score(
        X[idx_c], b_all[idx_c], c_all[idx_c], k=cfg.cluster_score_k, seed=cfg.seed))
    arrays["clustering"] = {"rows": idx_c, "assign": cs.pop("assign"), "biology": M.codes(b_all[idx_c])[0],
                            "centre": M.codes(c_all[idx_c])[0]}
    cs["n_samples"] = int(len(idx_c))
    res["clustering_score"] = cs


def _get(d: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def headline(res: dict) -> dict:
    """The one-line numbers of a result (None where a metric was skipped)."""
    return {key: _get(res, path) for key, path, _ in HEADLINE}


def write_json(uri: str, doc: dict, s3: S3Options | None = None) -> None:
    atomic_write_bytes(uri, json.dumps(to_jsonable(doc), indent=2).encode(), s3)


# --------------------------------------------------------------------------- plots


def draw_plots(
    X: np.ndarray,
    meta: pd.DataFrame,
    res: dict,
    arrays: dict,
    cfg: RobustnessConfig,
    out_dir: str,
    label: str = "",
    s3: S3Options | None = None,
) -> dict[str, str]:
    """Write the PNGs of one analysis into ``out_dir``; returns {name: reason} of skipped plots."""
    from raypath.robustness import plots as P

    skipped: dict[str, str] = {}
    title = f" - {label}" if label else ""

    def put(name: str, png: bytes) -> None:
        atomic_write_bytes(join(out_dir, name), png, s3)

    slides = meta["slide_id"].astype(str).to_numpy()
    colourings_cols = [c for c in (cfg.centre_column, cfg.biology_column) if _column(meta, c) is not None]
    # 2-D maps on tsne_tiles_per_slide tiles per slide
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(slides))
    rank = pd.Series(slides[order]).groupby(slides[order]).cumcount().to_numpy()
    sel = np.sort(order[rank < cfg.tsne_tiles_per_slide])
    if len(sel) > cfg.tsne_max_points:
        sel = np.sort(sel[M.cap_per_group(slides[sel], cfg.tsne_max_points, cfg.seed)])
    # a `<column>_name` column (e.g. label_name) gives the legend names instead of codes such as 0/1
    colourings = {c: meta[f"{c}_name" if f"{c}_name" in meta.columns else c].astype("string").fillna("NA")
                  .to_numpy()[sel] for c in colourings_cols}
    methods = ["tsne"] + (["umap"] if cfg.umap and P.umap_available() else [])
    for method in methods:
        try:
            xy = P.embed_2d(X[sel], method=method, seed=cfg.seed, iterations=cfg.tsne_iterations)
            put(f"{method}.png", P.scatter_by(
                xy, colourings, f"{'t-SNE' if method == 'tsne' else 'UMAP'} of {len(sel)} tiles"
                f" ({cfg.tsne_tiles_per_slide}/slide){title}"))
        except Exception as e:  # a plot never fails the run
            log.warning("%s map failed: %s", method, e)
            skipped[f"{method}.png"] = str(e)
    if "clusters" in res.get("kmeans_purity", {}):
        kp = res["kmeans_purity"]
        put("purity_per_cluster.png", P.purity_per_cluster(
            kp["clusters"], kp.get("chance_purity"),
            f"KMeans cohort purity, k={kp['k']} (repeat 1){title}"))
    ri = res.get("robustness_index", {})
    if "curve" in ri:
        put("ri_curve.png", P.ri_curve(ri["curve"], ri["k"], f"Robustness index{title}", ri.get("chance")))
    if "croma" in arrays:
        put("croma_hist.png", P.croma_histogram(arrays["croma"], f"CRoMa (m={cfg.croma_m}){title}"))
    if cfg.gallery and "kmeans" in arrays:
        reason = _draw_gallery(X, meta, res, arrays["kmeans"], cfg, out_dir, title, s3)
        if reason:
            skipped["gallery.png"] = reason
    return skipped


def _draw_gallery(X, meta, res, km, cfg, out_dir, title, s3) -> str | None:
    from raypath.robustness import plots as P

    tiles_uri = join(cfg.workdir, "tiles.parquet")
    if not exists(tiles_uri, s3):
        return f"{tiles_uri} not found (needed to read tiles back)"
    if "uri" not in meta.columns:
        return "slides.parquet has no uri column"
    rows = km["rows"]
    selection = P.select_gallery_tiles(
        X[rows], km["assign"], km["centres"], res["kmeans_purity"]["clusters"]["purity"],
        cfg.gallery_clusters, cfg.gallery_tiles)
    if not selection:
        return "no cluster large enough"
    wanted = sorted({int(rows[i]) for s in selection for band in s["bands"].values() for i in band})
    want = pd.DataFrame({
        "slide_id": meta["slide_id"].astype(str).to_numpy()[wanted],
        "tile_id": meta["tile_id"].to_numpy()[wanted],
        "uri": meta["uri"].astype(str).to_numpy()[wanted],
        "centre": meta[cfg.centre_column].astype(str).to_numpy()[wanted],
        "row": wanted,
    })
    read_cols = ["slide_id", "tile_id", "x", "y", "level", "read_px", "tile_px"]
    from raypath.wsi.tile_table import read_tile_table

    tiles = read_tile_table(cfg.workdir, s3, slide_ids=set(want["slide_id"]), columns=read_cols)  # shown slides only
    want = want.merge(tiles[read_cols].astype({"slide_id": str}), on=["slide_id", "tile_id"], how="left")
    images: dict[int, np.ndarray] = {}
    errors = []
    for (sid, uri), grp in want.groupby(["slide_id", "uri"]):
        if grp["level"].isna().any():
            errors.append(f"{sid}: tiles not in tiles.parquet")
            continue
        try:
            by_tile = read_tile_dict(
                uri, grp[read_cols[1:]].astype({"level": int, "read_px": int, "tile_px": int}), s3)
        except Exception as e:  # unreadable slide: the gallery shows n/a
            errors.append(f"{sid}: {e}")
            continue
        for t, row in zip(grp["tile_id"].tolist(), grp["row"].tolist()):
            if int(t) in by_tile:
                images[int(row)] = by_tile[int(t)]
    if not images:
        return "no tile could be read back: " + "; ".join(errors[:3])
    # map selection from sample-row indices (within km rows) to meta rows
    sel_meta = [{**s, "bands": {b: [int(rows[i]) for i in v] for b, v in s["bands"].items()}} for s in selection]
    labels = dict(zip(want["row"].astype(int).tolist(), want["centre"].tolist()))
    atomic_write_bytes(join(out_dir, "gallery.png"), P.gallery(
        sel_meta, images, labels, f"Tiles near / medium / far from KMeans centres{title}"), s3)
    res["kmeans_purity"]["gallery"] = [
        {**s, "bands": {b: [{"slide_id": str(meta.iloc[i]["slide_id"]), "tile_id": int(meta.iloc[i]["tile_id"])}
                            for i in v] for b, v in s["bands"].items()}} for s in sel_meta]
    if errors:
        res["kmeans_purity"]["gallery_errors"] = errors
    return None


# --------------------------------------------------------------------------- entry points


def _run_dir(cfg: RobustnessConfig, feature_dir: str) -> tuple[str, str]:
    key = feature_dir.rstrip("/").rsplit("/", 1)[-1]
    run = cfg.run or f"robustness-{key}"
    return run, join(cfg.workdir, "runs", run)


def _one(cfg: RobustnessConfig, feature_dir: str, slides: pd.DataFrame, out_dir: str, label: str,
         slide_ids: list[str] | None, s3: S3Options | None, sink: dict | None = None) -> dict:
    t0 = time.perf_counter()
    # the largest sample any metric draws: more tiles would only cost memory
    max_total = max(cfg.kmeans_max_samples, cfg.knn_max_samples, cfg.probe_max_samples,
                    cfg.cluster_max_samples, cfg.tsne_max_points)
    X, meta, info = load_sample(feature_dir, slides, cfg.tiles_per_slide, cfg.seed, slide_ids, s3,
                                max_total=max_total, min_per_slide=cfg.tsne_tiles_per_slide)
    info["n_tiles_per_centre"] = {str(k): int(v) for k, v in meta[cfg.centre_column].astype("string")
                                  .fillna("NA").value_counts().sort_index().items()} \
        if cfg.centre_column in meta.columns else {}
    import sklearn

    # scikit-learn's chunked pairwise code (silhouette) uses the same budget as our kNN
    with sklearn.config_context(working_memory=cfg.memory_mb):
        res, arrays = analyse(X, meta, cfg)
    doc = {
        "stage": "robustness",
        "raypath_version": __version__,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "inputs": {**info, "slides_parquet": join(cfg.workdir, "slides.parquet"),
                   "biology_column": cfg.biology_column, "centre_column": cfg.centre_column},
        "config": cfg.to_dict(),
        "metrics": {k: v for k, v in res.items() if k not in ("headline", "timings_s")},
        "headline": res["headline"],
        "timings_s": res["timings_s"],
    }
    if cfg.plots:
        doc["plots_skipped"] = draw_plots(X, meta, doc["metrics"], arrays, cfg, out_dir, label, s3)
    if sink is not None:  # per-tile contributions for a comparison's bootstrap (nothing refitted later)
        from raypath.robustness.bootstrap import contributions

        sink["contributions"] = contributions(X, arrays)
    doc["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    write_json(join(out_dir, RESULT_FILE), doc, s3)
    return to_jsonable(doc)


def run_robustness(cfg: RobustnessConfig, s3: S3Options | None = None) -> dict:
    """Measure the site information in one feature store; write ``runs/<run>/``.

    Parameters
    ----------
    cfg
        The analysis settings (see :class:`RobustnessConfig`).
    s3
        S3 settings when ``workdir`` is remote (default: from the environment).

    Returns
    -------
    dict
        The content of ``robustness.json`` (``headline``, ``metrics``, ``inputs``,
        ``config``) plus ``run_dir``.
    """
    feature_dir = resolve_feature_dir(cfg.workdir, cfg.features)
    run, out_dir = _run_dir(cfg, feature_dir)
    cfg = cfg.model_copy(update={"run": run})
    slides = load_slides(cfg.workdir, s3)  # fail on bad inputs before writing anything
    cfg.save(out_dir)
    doc = _one(cfg, feature_dir, slides, out_dir, "", None, s3)
    log.info("robustness: %s", json.dumps(doc["headline"]))
    return {**doc, "run_dir": out_dir}


def compare(
    feature_dir_a: str,
    feature_dir_b: str | list[str],
    cfg: RobustnessConfig,
    label_a: str = "A",
    label_b: str = "B",
    s3: S3Options | None = None,
) -> dict:
    """The same analysis on two feature stores over the same slides and tiles.

    Slides present in every store are analysed, with the same random tiles
    (same seed, same slides) when the stores hold the same tiles.  Writes
    ``runs/<run>/comparison.json`` with ``a``, ``b`` (full results, also in
    ``a/`` and ``b/`` with their plots) and ``delta``: for each headline
    number B - A, its 95 % CI from a paired bootstrap over patients
    (:mod:`raypath.robustness.bootstrap`) and ``more_robust``: ``"a"`` /
    ``"b"`` only when the CI excludes 0, ``"tie"`` when it contains 0.

    ``feature_dir_b`` may be a list (e.g. one store per LODO fold, each
    embedded with that fold's adapter): B is then the mean over them of each
    metric, and the bootstrap resamples the mean difference.
    """
    fa = resolve_feature_dir(cfg.workdir, feature_dir_a)
    many = isinstance(feature_dir_b, (list, tuple))
    fbs = [resolve_feature_dir(cfg.workdir, f) for f in (feature_dir_b if many else [feature_dir_b])]
    ka, kb = (f.rstrip("/").rsplit("/", 1)[-1] for f in (fa, fbs[0]))
    run = cfg.run or f"compare-{ka}-vs-{kb}"
    out_dir = join(cfg.workdir, "runs", run)
    cfg = cfg.model_copy(update={"run": run})
    slides = load_slides(cfg.workdir, s3)
    common = set(FeatureStore(fa, s3).slide_ids()) & set(slides["slide_id"].astype(str))
    for fb in fbs:
        common &= set(FeatureStore(fb, s3).slide_ids())
    common = sorted(common)
    if not common:
        raise RaypathError(f"{fa!r} and {fbs} share no slide listed in slides.parquet: embed the same slides")
    cfg.save(out_dir)
    sink_a: dict = {}
    a = _one(cfg, fa, slides, join(out_dir, "a"), label_a or ka, common, s3, sink_a)
    bs, sinks = [], []
    for i, fb in enumerate(fbs):
        sinks.append({})
        sub = "b" if not many else f"b/{i}"
        bs.append(_one(cfg, fb, slides, join(out_dir, sub), label_b or kb, common, s3, sinks[-1]))
    delta = compare_deltas(a, bs, sink_a, sinks, cfg)
    doc = {
        "stage": "robustness-compare",
        "raypath_version": __version__,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "labels": {"a": a["label"], "b": bs[0]["label"]},
        "feature_dirs": {"a": fa, "b": fbs if many else fbs[0]},
        "n_common_slides": len(common),
        "delta": delta,
        "uncertainty": (f"95 % CI of B - A: paired bootstrap over patients ({cfg.bootstrap_resamples} resamples, "
                        "per-tile contributions, nothing refitted); 'tie' when the CI contains 0").replace(
                            "95 %", f"{cfg.bootstrap_ci:.0%}"),
        "a": a,
        "b": bs[0] if not many else {"headline": {k: d["b"] for k, d in delta.items()}, "label": bs[0]["label"],
                                     "per_store": bs, "note": f"mean over {len(bs)} feature stores"},
    }
    write_json(join(out_dir, COMPARISON_FILE), doc, s3)
    return {**to_jsonable(doc), "run_dir": out_dir}


def compare_deltas(a: dict, bs: list[dict], sink_a: dict, sinks: list[dict], cfg: RobustnessConfig) -> dict:
    """Per headline number: A, B (mean over ``bs``), B - A, its CI and the verdict."""
    from raypath.robustness import bootstrap as BT

    boot = {}
    if cfg.bootstrap_resamples > 0:
        boot = BT.paired_bootstrap(sink_a.get("contributions", {}), [s.get("contributions", {}) for s in sinks],
                                   n_boot=cfg.bootstrap_resamples, ci=cfg.bootstrap_ci, seed=cfg.seed)
    delta = {}
    for key, _path, direction in HEADLINE:
        va = a["headline"].get(key)
        vals = [b["headline"].get(key) for b in bs]
        vb = float(np.mean(vals)) if all(isinstance(v, (int, float)) for v in vals) else None
        d = (vb - va) if isinstance(va, (int, float)) and vb is not None else None
        ci = boot.get(key, {})
        entry = {"a": va, "b": vb, "delta": d, "ci_low": ci.get("ci_low"), "ci_high": ci.get("ci_high"),
                 "n_boot": ci.get("n_boot"), "more_robust_if": direction,
                 "more_robust": BT.verdict(d, ci.get("ci_low"), ci.get("ci_high"), direction) if ci else None}
        if direction and d is not None and not ci:
            entry["note"] = BT.NOT_RESAMPLED.get(key, "no bootstrap CI (bootstrap_resamples = 0): no winner named")
        delta[key] = entry
    return delta
