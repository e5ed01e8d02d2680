"""``raypath predict``: apply a saved final model to a workdir's slides.

From features (``--features``, or the store of ``--workdir`` whose identity
matches the model's) or from raw slides in one command (``--cohort``:
ingest -> tile -> embed with the model's FM, adapter and tiling, the weights
checked against the recorded sha256 -> predict).  A store whose identity
differs from the model's is refused with the command that makes matching
features.  Slides are scored in parallel Ray tasks (``--num-tasks``), each
reading its own slides from the store.

Writes ``<workdir>/runs/<run>/``: ``predictions.parquet`` (risk or class
probabilities, the risk group from the training cut-offs, whether the
patient was in the training set), ``attention.parquet``, ``metrics.json``
(with bootstrap CIs when the cohort has outcomes), ``km.png``,
``heatmaps/<slide>.png`` (attention on the thumbnail), ``heatmaps/<slide>_grid.png``
(one pixel per tile), ``heatmaps/<slide>_gallery.png`` and ``report.html``.

A patch classifier (``raypath patch --final``) is applied to every tile
instead (:mod:`raypath.predict.tiles`): ``tiles_predictions.parquet``, a
per-slide summary in ``predictions.parquet`` and probability maps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import Field

from raypath.config import StageConfig
from raypath.errors import RaypathError
from raypath.io.jsonio import to_jsonable
from raypath.io.storage import exists, join, read_parquet
from raypath.predict.model import FinalModel, load_final_model

log = logging.getLogger(__name__)


class PredictConfig(StageConfig):
    """Configuration of ``raypath predict``."""

    model: str = Field(description="saved model folder (<workdir>/models/<name>/, written by `raypath mil --final` "
                       "or `raypath patch --final`)")
    workdir: str = Field(description="project folder (local or s3://) with the new slides (slides.parquet, features/)")
    features: str | None = Field(None, description="feature folder or model key (default: the store matching the model)")
    cohort: str | None = Field(
        None, description="cohort table of raw slides: ingest, tile and embed them with the model's FM first")
    weights: str | None = Field(None, description="FM weights for --cohort (checked against the model's recorded sha256)")
    adapter: str | None = Field(None, description="peft adapter folder for --cohort when the model was trained on adapted features")
    run: str | None = Field(None, description="run name under <workdir>/runs/ (default predict-<model name>)")
    heatmaps: int = Field(8, ge=0, description="slides that get attention heatmaps (highest risk / probability first; "
                          "patch models: probability maps, highest mean probability first)")
    gallery_tiles: int = Field(6, ge=0, description="top and bottom tiles per heatmap gallery")
    num_tasks: int = Field(0, ge=0, description="Ray tasks that score slides in parallel (0 = in this process)")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples over patients for the metrics' 95 percent CIs")


@dataclass
class PredictResult:
    run_dir: str
    predictions: pd.DataFrame
    metrics: dict
    failed: pd.DataFrame
    tiles: pd.DataFrame | None = None  # patch models: the probabilities of every tile


# --------------------------------------------------------------------------- features


def expected_identity(meta: FinalModel) -> dict:
    """The fields of the model's feature identity new features must share."""
    from raypath.embed.identity import MODEL_FIELDS

    return {k: meta.identity[k] for k in (*MODEL_FIELDS, "tiling", "decode") if k in meta.identity}


def embed_command(meta: FinalModel, workdir: str) -> str:
    """The commands that make features matching ``meta`` in ``workdir``."""
    ident, tiling = meta.identity, meta.identity.get("tiling") or {}
    cmd = f"raypath tile --workdir {workdir}"
    if isinstance(tiling.get("target_mpp"), (int, float)):
        cmd += f" --target-mpp {tiling['target_mpp']}"
    if isinstance(tiling.get("tile_px"), int):
        cmd += f" --tile-px {tiling['tile_px']}"
    cmd += f" && raypath embed --workdir {workdir} --model {ident.get('model')}"
    sha = ident.get("weights_sha256") or ""
    if sha.startswith("random"):
        cmd += f" --weights {sha}"
    elif sha:
        cmd += f" --weights <weights file with sha256 {sha[:12]}...>"
    if ident.get("adapter_sha256"):
        cmd += f" --adapter <adapter folder with sha256 {ident['adapter_sha256'][:12]}...>"
    mode = decode_mode(meta)
    if mode != "full":
        cmd += f" --decode {mode}"
    return cmd


def decode_mode(meta: FinalModel) -> str:
    """The ``raypath embed --decode`` mode the model's features were made with."""
    from raypath.embed.identity import decode_id

    recorded = meta.identity.get("decode")
    return next((m for m in ("full", "scaled", "gpu") if decode_id(m) == recorded), "full")


def match_features(cfg: PredictConfig, meta: FinalModel) -> str:
    """The feature folder to score: ``cfg.features`` checked against the
    model's identity, or the workdir's one store that matches it."""
    from raypath.embed.identity import check_identity, mismatches, store_identity
    from raypath.embed.store import resolve_feature_dir
    from raypath.io.storage import filesystem_for, is_remote, strip_protocol

    want = expected_identity(meta)
    remedy = f"make matching features with `{embed_command(meta, cfg.workdir)}` (or predict --cohort from raw slides)"
    if cfg.features:
        folder = resolve_feature_dir(cfg.workdir, cfg.features)
        have = store_identity(folder)
        if have is None:
            raise RaypathError(f"feature folder {folder!r} has no manifest.json (no identity to check): {remedy}")
        check_identity(have, want, folder, remedy)
        return folder
    root = join(cfg.workdir, "features")
    fs = filesystem_for(root)
    base = root if is_remote(root) else strip_protocol(root)
    folders = [p for p in (fs.ls(base, detail=False) if fs.exists(base) else []) if fs.isdir(p)]
    for p in sorted(folders):
        folder = f"s3://{p}" if is_remote(root) and not str(p).startswith("s3://") else str(p)
        have = store_identity(folder)
        if have is not None and not mismatches(have, want):
            return folder
    raise RaypathError(f"no feature store under {root!r} matches the model's features ({meta.identity.get('model')}, "
                       f"tiling {meta.identity.get('tiling')}): {remedy}")


def _has_bundled_weights(model: str) -> bool:
    from raypath.fm.registry import get_spec

    try:
        return bool(get_spec(model).bundled)
    except RaypathError:
        return False


def prepare_raw(cfg: PredictConfig, meta: FinalModel) -> str:
    """``--cohort``: ingest, tile and embed the raw slides the way the model's features were made."""
    from raypath.embed.api import EmbedConfig, embed
    from raypath.embed.identity import check_identity, derive_identity, store_identity
    from raypath.wsi.ingest import IngestConfig, ingest
    from raypath.wsi.tiling import TileConfig, tile

    ident, tiling = meta.identity, meta.identity.get("tiling") or {}
    model = ident.get("model")
    if not model:
        raise RaypathError(f"model {cfg.model!r} records no feature identity: predict needs --features instead of --cohort")
    weights = cfg.weights or (ident.get("weights_sha256") if str(ident.get("weights_sha256", "")).startswith("random") else None)
    if weights is None and not _has_bundled_weights(model):  # a shipped model (raypath-small-ref) needs none
        raise RaypathError(f"predict --cohort needs --weights: the FM weights the model was trained on "
                           f"(sha256 {str(ident.get('weights_sha256'))[:12]}...)")
    check_identity(derive_identity(model, weights, cfg.adapter),
                   {k: ident[k] for k in ("model", "weights_sha256", "adapter_sha256") if k in ident}, "--weights/--adapter",
                   "pass the FM weights (--weights) and adapter (--adapter) the model was trained with")
    ingest(IngestConfig(workdir=cfg.workdir, cohort=cfg.cohort))
    tkw = {k: tiling[k] for k in ("target_mpp", "tile_px") if isinstance(tiling.get(k), (int, float))}
    tile(TileConfig(workdir=cfg.workdir, **tkw))
    res = embed(EmbedConfig(workdir=cfg.workdir, model=model, weights=weights, adapter=cfg.adapter,
                            decode=decode_mode(meta)))
    folder = str(res.feature_dir)
    have = store_identity(folder)
    if have is not None:  # what was just embedded must be what the model was trained on
        check_identity(have, expected_identity(meta), folder, f"make matching features with `{embed_command(meta, cfg.workdir)}`")
    return folder


# --------------------------------------------------------------------------- scoring


def score_slides(meta: FinalModel, state: dict, feature_dir: str, slide_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores and attention of ``slide_ids`` (every tile of each slide)."""
    import torch

    from raypath.embed.store import FeatureStore

    module = meta.build()
    module.load_state_dict(state)
    module.eval()
    score = meta.objective().score
    store = FeatureStore(feature_dir)
    rows, att = [], []
    with torch.no_grad():
        for sid in slide_ids:
            bag = store.load_bag(sid)
            x = torch.from_numpy(bag.features)[None]
            out, a = module(x, torch.ones(x.shape[:2], dtype=torch.bool))
            s = score(out.float()).numpy().reshape(-1)
            rows.append({"slide_id": sid, **_score_columns(meta, s)})
            att.append(pd.DataFrame({"slide_id": sid, "tile_id": bag.tile_ids.astype(np.int64),
                                     "x": bag.coords[:, 0], "y": bag.coords[:, 1],
                                     "attention": a.float().numpy().reshape(-1)}))
    return pd.DataFrame(rows), (pd.concat(att, ignore_index=True) if att else pd.DataFrame())


def _score_columns(meta: FinalModel, s: np.ndarray) -> dict:
    if meta.task == "survival":
        return {"risk": float(s[0])}
    classes = meta.classes or [str(i) for i in range(len(s))]
    out = {f"prob_{c}": float(p) for c, p in zip(classes, s)}
    out["predicted"] = classes[int(np.argmax(s))]
    return out


def score_all(meta: FinalModel, state: dict, feature_dir: str, slide_ids: list[str], num_tasks: int):
    """:func:`score_slides` in this process, or over ``num_tasks`` Ray tasks (one chunk of slides each)."""
    if num_tasks <= 0 or len(slide_ids) < 2:
        return score_slides(meta, state, feature_dir, slide_ids)
    import ray

    from raypath.io.ray_env import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(score_slides)
    chunks = [c.tolist() for c in np.array_split(np.asarray(slide_ids, dtype=object), min(num_tasks, len(slide_ids)))]
    state_ref = ray.put({k: v.cpu() for k, v in state.items()})
    parts = ray.get([task.remote(meta, state_ref, feature_dir, c) for c in chunks if c])
    return (pd.concat([p[0] for p in parts], ignore_index=True), pd.concat([p[1] for p in parts], ignore_index=True))


# --------------------------------------------------------------------------- the stage


def _slides(workdir: str, slide_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slides with features, slides that failed ingest/tile/embed with their reason)."""
    uri = join(workdir, "slides.parquet")
    if not exists(uri):
        raise RaypathError(f"{uri!r} not found: run `raypath ingest --workdir {workdir}` (or predict --cohort TABLE)")
    slides = read_parquet(uri).to_pandas()
    slides["slide_id"] = slides["slide_id"].astype(str)
    has = slides["slide_id"].isin(set(slide_ids))
    ok = slides["status"].astype(str).eq("ok") if "status" in slides else pd.Series(True, index=slides.index)
    failed = slides[~(has & ok)].copy()
    failed["reason"] = np.where(~ok[~(has & ok)], slides.get("error", pd.Series("", index=slides.index))[~(has & ok)]
                                .astype(str), "no features (no tissue tiles or not embedded)")
    return slides[has & ok].reset_index(drop=True), failed[["slide_id", "reason"]].reset_index(drop=True)


def predict(cfg: PredictConfig) -> PredictResult:
    """Apply the model at ``cfg.model`` to the slides of ``cfg.workdir`` (see the module docstring)."""
    from raypath.embed.identity import check_store
    from raypath.embed.store import FeatureStore
    from raypath.predict.outputs import write_outputs

    from raypath.predict.patch_model import load_patch_model, model_kind

    patch = model_kind(cfg.model) == "patch"
    meta, module = (load_patch_model(cfg.model), None) if patch else load_final_model(cfg.model)
    feature_dir = prepare_raw(cfg, meta) if cfg.cohort else match_features(cfg, meta)
    slides, failed = _slides(cfg.workdir, FeatureStore(feature_dir).slide_ids())
    check_store(feature_dir, slides=slides)  # features made from other slide files than slides.parquet lists
    for row in failed.itertuples():
        log.warning("slide %s not scored: %s", row.slide_id, row.reason)
    if len(slides) == 0:
        raise RaypathError(f"no slide of {cfg.workdir!r} has features in {feature_dir!r}: run ingest, tile and embed")
    if patch:  # a patch classifier: every tile gets class probabilities (raypath.predict.tiles)
        from raypath.predict.tiles import predict_tiles

        run_dir, pred, tiles, metrics = predict_tiles(cfg, meta, feature_dir, slides, failed)
        return PredictResult(run_dir, pred, metrics, failed, tiles)
    pred, att = score_all(meta, module.state_dict(), feature_dir, slides["slide_id"].tolist(), cfg.num_tasks)
    keep = [c for c in ("slide_id", "patient_id", "cohort", "time", "event", "label") if c in slides.columns]
    pred = slides[keep].merge(pred, on="slide_id", how="right")
    pred["patient_id"] = pred.get("patient_id", pred["slide_id"]).astype(str)
    pred["trained_on"] = pred["patient_id"].isin(set(meta.trained_patients))
    if meta.task == "survival":
        pred["risk_group"] = meta.risk_group(pred["risk"].to_numpy())
    name = cfg.run or f"predict-{cfg.model.rstrip('/').split('/')[-1]}"
    run_dir = join(cfg.workdir, "runs", name)
    metrics = write_outputs(cfg, meta, run_dir, pred, att, failed, slides)
    n_seen = int(pred["trained_on"].sum())
    if n_seen:
        log.warning("%d of %d slide(s) belong to patient ids the model was trained on (column trained_on; left out of "
                    "the metrics)%s", n_seen, len(pred), "; if this cohort is new, its patient ids collide with the "
                    "training cohort's: give it its own ids" if n_seen > len(pred) / 2 else "")
    return PredictResult(run_dir, pred, metrics, failed)


def add_cli(subparsers) -> None:
    from raypath.config import add_config_arguments, config_from_args

    p = subparsers.add_parser(
        "predict", help="apply a saved final model to new slides (predictions, metrics, attention heatmaps)",
        description="Apply a saved final model (raypath mil --final) to the slides of --workdir: from their features "
        "(--features, or the store whose identity matches the model's) or from raw slides in one command (--cohort: "
        "ingest, tile and embed with the model's FM, adapter and tiling, the weights checked against the recorded "
        "sha256). Writes <workdir>/runs/<run>/: predictions.parquet, attention.parquet, metrics.json (bootstrap CIs "
        "over patients when the cohort has outcomes), km.png, heatmaps/ and report.html. A patch model (raypath patch "
        "--final) classifies every tile instead: tiles_predictions.parquet, a per-slide summary (mean probability, "
        "tiles over 0.5 per mm2) and per-slide probability maps. Exit 3 when some slides could not be scored "
        "(listed in the output).",
    )
    add_config_arguments(p, PredictConfig)

    def run(args) -> int:
        res = predict(config_from_args(PredictConfig, args))
        print(json.dumps(to_jsonable({"run_dir": res.run_dir, "slides": len(res.predictions),
                                      "failed": len(res.failed), "metrics": res.metrics.get("headline", {})}), indent=2))
        return 3 if len(res.failed) else 0

    p.set_defaults(func=run)


__all__ = ["PredictConfig", "PredictResult", "predict", "score_slides", "match_features", "expected_identity"]
