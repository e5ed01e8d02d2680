"""Evaluation protocols on in-memory inputs: validate the clinical table,
build the splits, train (in-process or on Ray Train), score.

:func:`run_protocol` is the reusable core: it takes bags (a feature store,
its path, or a ``slide_id -> array`` mapping) and a clinical DataFrame and
returns tables, without touching the workdir.  :func:`evaluate_lodo` is the
one-call objective for sweeps.  :mod:`raypath.mil.api` adds the workdir
I/O and plots on top.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.evaluation.consistency import consistency_headline, fold_consistency, view_predictions
from raypath.evaluation.consistency import metric_names as consistency_metric_names
from raypath.evaluation.metrics import classification_metrics, summarize, survival_metrics
from raypath.evaluation.splits import Split, make_splits
from raypath.mil.data import bag_keys
from raypath.mil.robust import prepare_variants
from raypath.mil.train import LocalContext, TrainParams, run_splits, run_splits_ray

log = logging.getLogger(__name__)


def _rows_msg(df: pd.DataFrame, mask, limit: int = 10) -> str:
    ids = df.loc[mask, "slide_id"].astype(str).tolist()
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def validate_clinical(clinical: pd.DataFrame, task: str) -> pd.DataFrame:
    """Check the clinical table for ``task`` and return a clean copy.

    Raises :class:`RaypathError` naming the problem and the slides for:
    missing columns, duplicate slide ids, missing patient/cohort, negative
    or missing times, events outside {0, 1}, no events at all (survival),
    missing labels or a single class (classification).  For classification
    a ``label_index`` column (0..K-1 over the sorted labels) is added.
    """
    if task not in ("survival", "classification"):
        raise RaypathError(f"unknown task {task!r}: use 'survival' or 'classification'")
    need = ["slide_id", "patient_id", "cohort"] + (["time", "event"] if task == "survival" else ["label"])
    missing = [c for c in need if c not in clinical.columns]
    if missing:
        raise RaypathError(
            f"clinical table lacks column(s) {missing} needed for task {task!r}: add them to the "
            "cohort table (see docs/mil.md)"
        )
    df = clinical.reset_index(drop=True).copy()
    if len(df) == 0:
        raise RaypathError("clinical table has no usable slides (status ok and with features)")
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        raise RaypathError(f"duplicate slide_id in clinical table: {_rows_msg(df, dup)}")
    for col in ("patient_id", "cohort"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise RaypathError(f"missing {col} for slide(s) {_rows_msg(df, bad)}: fill it in the cohort table")
    if task == "survival":
        t = pd.to_numeric(df["time"], errors="coerce")
        bad = t.isna() | ~np.isfinite(t.fillna(0))
        if bad.any():
            raise RaypathError(f"missing or non-numeric survival time for slide(s) {_rows_msg(df, bad)}")
        neg = t < 0
        if neg.any():
            raise RaypathError(f"negative survival time for slide(s) {_rows_msg(df, neg)}: times must be >= 0")
        e = pd.to_numeric(df["event"], errors="coerce")
        bad = ~e.isin([0, 1])
        if bad.any():
            raise RaypathError(
                f"event must be 0 (censored) or 1 (event); bad or missing for slide(s) {_rows_msg(df, bad)}"
            )
        df["time"] = t.astype(float)
        df["event"] = e.astype(int)
        if df["event"].sum() == 0:
            raise RaypathError("no events in the clinical table (all censored): survival cannot be trained")
    else:
        bad = df["label"].isna()
        if bad.any():
            raise RaypathError(f"missing label for slide(s) {_rows_msg(df, bad)}")
        classes = sorted(df["label"].unique().tolist(), key=str)
        if len(classes) < 2:
            raise RaypathError(
                f"label has a single class ({classes[0]!r}) in the clinical table: classification needs >= 2"
            )
        df["label_index"] = df["label"].map({c: i for i, c in enumerate(classes)}).astype(int)
    return df


def check_splits_evaluable(clinical: pd.DataFrame, splits: list[Split], task: str) -> None:
    """Raise if a training set or a test cohort cannot be trained/scored:
    no events (survival) or a single class (classification)."""
    col = "event" if task == "survival" else "label_index"
    cohort = clinical["cohort"].astype(str).to_numpy()
    y = clinical[col].to_numpy()

    def bad(rows) -> bool:
        return (y[rows].sum() == 0) if task == "survival" else (len(np.unique(y[rows])) < 2)

    what = "no events" if task == "survival" else "a single class"
    for sp in splits:
        if bad(sp.train):
            cohorts = sorted(set(cohort[sp.train]))
            raise RaypathError(
                f"{sp.key}: the training set (cohorts {cohorts}) has {what}; "
                "drop that cohort or use another protocol"
            )
        for c in sorted(set(cohort[sp.external])):
            rows = sp.external[cohort[sp.external] == c]
            if bad(rows):
                raise RaypathError(
                    f"test cohort {c!r} has {what} ({len(rows)} slides): its "
                    f"{'C-index' if task == 'survival' else 'AUROC'} is undefined; "
                    "drop the cohort (--cohorts) or fix its outcome columns"
                )


@dataclass
class ProtocolOutput:
    """Everything a protocol run produced, as tables."""

    predictions: pd.DataFrame
    curves: pd.DataFrame
    fold_metrics: pd.DataFrame
    summary: dict[str, Any]
    splits: list[Split] = field(default_factory=list)
    view_predictions: pd.DataFrame | None = None  # generated technical variants (views 1..K)


def _fold_metrics(
    clinical: pd.DataFrame, split: Split, preds: pd.DataFrame, task: str
) -> list[dict]:
    rows = []
    base = dict(protocol=split.protocol, name=split.name, repeat=split.repeat, fold=split.fold)
    tr = clinical.iloc[split.train]
    groups = []
    for set_name in ("internal", "external"):
        p = preds[preds["split"] == set_name]
        if len(p) == 0:
            continue
        if set_name == "internal":
            groups.append((set_name, "all", p))
        for c, pc in p.groupby("cohort", sort=True):
            groups.append((set_name, str(c), pc))
    if task == "survival" and groups and groups[0][0] == "internal":
        # pairs compared only within a cohort: a site offset in risk cannot move it
        groups.insert(1, ("internal", STRATIFIED, groups[0][2]))
    for set_name, cohort, p in groups:
        if task == "survival":
            # one unit per patient (mean risk of its slides): two slides never count twice
            m = survival_metrics(
                p["time"].to_numpy(), p["event"].to_numpy(), p["risk"].to_numpy(),
                tr["time"].to_numpy(), tr["event"].to_numpy(), patients=p["patient_id"].to_numpy(),
                strata=p["cohort"].to_numpy() if cohort == STRATIFIED else None,
            )
            m["n_events"] = int(p["event"].sum())
        else:
            prob_cols = sorted(c for c in p.columns if c.startswith("prob_"))
            m = classification_metrics(p["label_index"].to_numpy(), p[prob_cols].to_numpy())
        rows.append({**base, "set": set_name, "cohort": cohort, "n": int(len(p)), **m})
    return rows


#: The "cohort" of the cohort-stratified internal score in fold metrics and summaries.
STRATIFIED = "stratified"
#: How to read the two internal scores (written next to them in every summary).
INTERNAL_NOTE = (
    "internal (pooled): held-out patients of the training cohorts compared across cohorts, so a site "
    "offset in predicted risk can dominate it; internal_stratified: pairs compared only within a cohort "
    "(the like-for-like companion of the external score); C-index per patient (mean risk of its slides)"
)


def summarize_folds(fold_metrics: pd.DataFrame, task: str, protocol: str, seed: int = 0) -> dict:
    """Mean +- sd and bootstrap CI over repeats (and folds) per
    (name, set, cohort), and the headline numbers of the protocol."""
    metric_names = (["c_index", "uno_c", "td_auc", "n_comparable_pairs"] if task == "survival"
                    else ["auroc", "balanced_accuracy", "f1"])
    primary = metric_names[0]
    metric_names += [m for m in consistency_metric_names(task) + ("n_twins",) if m in fold_metrics]
    groups: dict[str, dict] = {}
    for (name, set_name, cohort), g in fold_metrics.groupby(["name", "set", "cohort"], sort=True):
        cell = {m: summarize(g[m].tolist(), seed=seed) for m in metric_names
                if m in g and not (cohort == STRATIFIED and m in ("uno_c", "td_auc"))}  # pooled-only metrics
        notes = g["c_index_note"].dropna().tolist() if "c_index_note" in g else []
        if notes and "c_index" in cell:  # say why a C-index is missing instead of dropping it silently
            cell["c_index"]["note"] = f"{len(notes)} of {len(g)} fold(s)/repeat(s): {notes[0]}"
        groups.setdefault(str(name), {}).setdefault(str(set_name), {})[str(cohort)] = cell
    out: dict[str, Any] = {"metric": primary, "groups": groups}
    if task == "survival":
        out["internal_note"] = INTERNAL_NOTE
    if protocol == "internal":
        s = groups.get("internal", {}).get("internal", {}).get("all", {}).get(primary)
        out["internal"] = s
        out["internal_stratified"] = groups.get("internal", {}).get("internal", {}).get(STRATIFIED, {}).get(primary)
        out["per_cohort"] = {
            c: v[primary]["mean"] for c, v in groups.get("internal", {}).get("internal", {}).items()
            if c not in ("all", STRATIFIED)
        }
    elif protocol == "lodo":
        ext = {n: g["external"][n][primary] for n, g in groups.items() if n in g.get("external", {})}
        internal = {n: g["internal"]["all"][primary] for n, g in groups.items() if "internal" in g}
        means = [v["mean"] for v in ext.values() if v["mean"] is not None]
        out["external"] = ext
        out["internal"] = internal
        out["internal_stratified"] = {
            n: g["internal"][STRATIFIED][primary] for n, g in groups.items() if STRATIFIED in g.get("internal", {})}
        out["per_cohort"] = {n: v["mean"] for n, v in ext.items()}
        out["mean"] = float(np.mean(means)) if means else None
        out["worst"] = float(np.min(means)) if means else None
        out["worst_cohort"] = min(ext, key=lambda n: ext[n]["mean"] if ext[n]["mean"] is not None else math.inf) if ext else None
    else:  # pairwise: matrix[train cohort][test cohort]
        matrix: dict[str, dict[str, float | None]] = {}
        for n, g in groups.items():
            row = {c: v[primary]["mean"] for c, v in g.get("external", {}).items()}
            if "internal" in g:
                row[n] = g["internal"]["all"][primary]["mean"]  # diagonal = internal
            matrix[n] = row
        out["matrix"] = matrix
    if any(m in fold_metrics for m in consistency_metric_names(task)):
        out["consistency"] = consistency_headline(groups, task, protocol)
    return out


def _split_predictions(df: pd.DataFrame, sp: Split, res: dict, task: str) -> pd.DataFrame:
    """One split's prediction rows (internal, external and twin slides)."""
    rows = np.asarray(res["rows"], dtype=np.int64)
    scores = np.asarray(res["scores"])
    cols = ["slide_id", "patient_id", "cohort"] + (["time", "event"] if task == "survival" else ["label", "label_index"])
    p = df.iloc[rows][cols].reset_index(drop=True)
    p.insert(3, "protocol", sp.protocol)
    p.insert(4, "name", sp.name)
    p.insert(5, "repeat", sp.repeat)
    p.insert(6, "fold", sp.fold)
    p.insert(7, "split", list(res["sets"]))
    if task == "survival":
        p["risk"] = scores.reshape(-1)
    else:
        for k in range(scores.shape[1]):
            p[f"prob_{k}"] = scores[:, k]
        p["pred_index"] = scores.argmax(axis=1)
        classes = df.drop_duplicates("label_index").set_index("label_index")["label"]
        p["pred_label"] = classes.reindex(p["pred_index"]).to_numpy()
    return p


def _train_splits(bags_source, bag_ids: list[str], df: pd.DataFrame, splits: list[Split], params: TrainParams,
                  num_workers: int, checkpoint_dir: str | None, ray_storage_path: str | None, ray_name: str,
                  use_gpu: bool | None) -> dict[str, dict]:
    """Train every split in this process or on Ray Train workers; ``{split.key: result}``."""
    from raypath.embed.store import FeatureStore
    from raypath.mil.data import load_bag_arrays

    if num_workers and num_workers > 0:
        source = bags_source.path if isinstance(bags_source, FeatureStore) else bags_source
        if not isinstance(source, str):
            source = load_bag_arrays(source, bag_ids)
        if ray_storage_path is None:
            import tempfile

            ray_storage_path = tempfile.mkdtemp(prefix="raypath-mil-")
        return run_splits_ray(source, df, splits, params, num_workers, ray_storage_path, ray_name, use_gpu=use_gpu)
    bags = load_bag_arrays(bags_source, bag_ids)
    return run_splits(LocalContext(checkpoint_dir), bags, df, splits, params)


def run_protocol(
    bags_source,
    clinical: pd.DataFrame,
    params: TrainParams,
    protocol: str,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    internal_fraction: float = 0.2,
    cohorts: list[str] | None = None,
    num_workers: int = 0,
    checkpoint_dir: str | None = None,
    ray_storage_path: str | None = None,
    ray_name: str = "train",
    use_gpu: bool | None = None,
) -> ProtocolOutput:
    """Validate, split, train and score one protocol.

    Parameters
    ----------
    bags_source
        A :class:`~raypath.embed.store.FeatureStore`, a feature folder path, or a
        mapping ``slide_id -> [N, D] array``; must cover every slide of
        ``clinical``.
    clinical
        One row per slide (slide_id, patient_id, cohort, time/event or label).
    params
        Training hyper-parameters (``params.task`` selects the task).
    num_workers
        0 = train in this process without Ray; >= 1 = Ray Train workers (DDP).
    checkpoint_dir
        In-process checkpoints (resume) -- ``num_workers=0`` only.
    ray_storage_path, ray_name
        Ray Train run location (resume by re-running with the same values).
    """
    task = params.task
    df = validate_clinical(clinical, task)
    if task == "classification":
        params.n_classes = int(df["label_index"].max()) + 1
    target = "event" if task == "survival" else "label_index"
    if protocol == "internal":
        n_pos = df[target].value_counts().min() if task == "classification" else int(df["event"].sum())
        if n_pos < folds:
            what = "events" if task == "survival" else "slides in the rarest class"
            raise RaypathError(f"only {n_pos} {what} for {folds} folds: lower --folds or add slides")
    splits = make_splits(df, protocol, target, folds, repeats, seed, internal_fraction, cohorts)
    check_splits_evaluable(df, splits, task)
    # technical variants (pairs / generated views): robustness losses + consistency metrics
    bags_source, tissues = prepare_variants(bags_source, df, params)
    bag_ids = bag_keys(df["slide_id"].astype(str).tolist(), params.n_variants if tissues is not None else 0)
    results = _train_splits(bags_source, bag_ids, df, splits, params, num_workers, checkpoint_dir,
                            ray_storage_path, ray_name, use_gpu)

    pred_frames, curve_rows, fold_rows, view_frames = [], [], [], []
    for sp in splits:
        res = results[sp.key]
        rows = np.asarray(res["rows"], dtype=np.int64)
        p = _split_predictions(df, sp, res, task)
        pred_frames.append(p)
        curve_rows.extend(res["curves"])
        rows_m = _fold_metrics(df, sp, p, task)
        if tissues is not None:  # consistency between technical variants of a tissue
            fold_consistency(rows_m, p, tissues.tissue_of_row[rows], task, res)
            if "view_scores" in res:
                view_frames.append(view_predictions(p, res["view_scores"], task))
        fold_rows.extend(rows_m)
    predictions = pd.concat(pred_frames, ignore_index=True)
    curves = pd.DataFrame(curve_rows)
    fold_metrics = pd.DataFrame(fold_rows)
    summary = summarize_folds(fold_metrics, task, protocol, seed)
    views = pd.concat(view_frames, ignore_index=True) if view_frames else None
    return ProtocolOutput(predictions, curves, fold_metrics, summary, splits, views)


def params_from_config(cfg) -> TrainParams:
    """The training hyper-parameters a :class:`~raypath.mil.api.MilConfig` decides."""
    return TrainParams(
        task=cfg.task,
        loss=cfg.resolved_loss(),
        model=cfg.model,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        max_tiles_per_slide=cfg.max_tiles_per_slide,
        balanced_sampling=cfg.balanced_sampling,
        n_bins=cfg.n_bins,
        nll_alpha=cfg.nll_alpha,
        eval_every=cfg.eval_every,
        amp=getattr(cfg, "amp", "auto"),
        **{k: getattr(cfg, k) for k in ROBUST_FIELDS if hasattr(cfg, k)},
    )


#: MilConfig fields of the robustness losses / technical variants, passed to TrainParams as they are
ROBUST_FIELDS = ("lambda_emb", "lambda_score", "tau", "score_loss", "variant_source", "variant_batches")


def protocol_kwargs(cfg, **overrides: Any) -> dict[str, Any]:
    """The :func:`~raypath.mil.protocols.run_protocol` keyword arguments a
    config decides (splits, repeats, workers); ``overrides`` win."""
    kw: dict[str, Any] = dict(
        folds=cfg.folds,
        repeats=cfg.repeats,
        seed=cfg.seed,
        internal_fraction=cfg.internal_fraction,
        cohorts=cfg.cohorts,
        num_workers=cfg.num_workers,
    )
    kw.update(overrides)
    return kw


def evaluate_lodo(store_or_bags, clinical: pd.DataFrame, cfg) -> dict:
    """Leave-one-dataset-out score of features, for sweeps.

    Parameters
    ----------
    store_or_bags
        A :class:`~raypath.embed.store.FeatureStore`, a feature folder path or a
        mapping ``slide_id -> [N, D] array``.
    clinical
        One row per slide (rows whose ``status`` is not ``"ok"`` are dropped).
    cfg
        A :class:`~raypath.mil.api.MilConfig` (its protocol is forced to lodo;
        ``num_workers=0`` is what a Tune trial should use).

    Returns
    -------
    ``{"metric", "per_cohort": {cohort: mean external score}, "mean",
    "worst", "worst_cohort", "internal": {cohort: summary}, "summary"}``.
    """
    df = clinical
    if "status" in df.columns:
        df = df[df["status"].astype(str) == "ok"]
    out = run_protocol(store_or_bags, df, params_from_config(cfg), "lodo", **protocol_kwargs(cfg))
    s = out.summary
    return {
        "metric": s["metric"],
        "per_cohort": s["per_cohort"],
        "mean": s["mean"],
        "worst": s["worst"],
        "worst_cohort": s["worst_cohort"],
        "internal": {n: v["mean"] for n, v in s["internal"].items()},
        "summary": s,
    }
