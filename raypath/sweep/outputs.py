"""What a sweep leaves in ``<workdir>/sweeps/<name>/``.

``trials.parquet`` / ``trials.csv`` (one row per trial), ``sweep.json``
(objectives, best trial, Pareto front, commands), ``best_config.yaml`` plus
``best/*.yaml`` (stage configs that reproduce the best trial through
``raypath adapt / embed / mil``), and PNG plots: ``objective_per_trial.png``,
``param_importances.png`` (+ ``.json``), ``pareto_front.png``.

The table/Pareto/best functions are plain pandas/numpy (tested without Ray).
"""

from __future__ import annotations

from dataclasses import dataclass

import json
import logging
import math
import re
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raypath.io.storage import atomic_write_bytes, join, write_parquet_atomic
from raypath.io.jsonio import to_jsonable
from raypath.sweep.nested import FoldPlan
from raypath.sweep.space import ALPHA_RATIO, SweepSpace, decode_params, stage_settings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- table


@dataclass
class SweepResult:
    sweep_dir: str
    trials: pd.DataFrame
    best: dict | None
    n_folds: int



def _trial_index(path: str | None, trial_id: str) -> float:
    m = re.search(rf"_{re.escape(trial_id)}_(\d+)", path or "")
    return float(m.group(1)) if m else math.nan


def error_summary(error: BaseException) -> str:
    """The exception line(s) of a failed trial's error, without the traceback."""
    lines = [ln.rstrip() for ln in str(error).strip().splitlines()
             if ln.strip() and "For further information visit" not in ln]
    start = 0
    for i, ln in enumerate(lines):
        if re.match(r"^[\w.]*(Error|Exception|Kill)\b", ln.strip()):
            start = i
    text = " | ".join(ln.strip() for ln in lines[start:]) or type(error).__name__
    return text[:500]


def trials_table(grid, space: SweepSpace, n_folds: int, sweep_dir: str | None = None) -> pd.DataFrame:
    """One row per trial of a Tune ``ResultGrid``: status, metrics, params."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        path = getattr(r, "path", None) or ""
        tid = str(m.get("trial_id") or re.sub(r"^.*?_([0-9a-f]{5,})_\d+.*$", r"\1", path.rsplit("/", 1)[-1]))
        folds = int(m.get("folds_done") or 0)
        if r.error is not None:
            status = "error"
        elif folds == n_folds and n_folds > 0:
            status = "complete"
        else:
            status = "stopped"  # ASHA stopped it after `folds_done` folds
        err = error_summary(r.error) if r.error is not None else None
        row: dict[str, Any] = {
            "trial_id": tid,
            "trial_index": _trial_index(path, tid),
            "status": status,
            "error": err,
            "folds_done": folds,
        }
        for k in ("mean_external", "worst_external", "worst_cohort", "mean_internal", "site_probe_bacc",
                  "kmeans_purity", "time_s"):
            row[k] = m.get(k)
        for k, v in m.items():
            if k.startswith(("external_", "internal_", "adapted_on_")):
                row[k] = v
        params = decode_params(space, dict(r.config or {}))
        for k, v in params.items():
            row[f"param:{k}"] = "+".join(map(str, v)) if isinstance(v, list) else v
        if ALPHA_RATIO in params and "adapt.rank" in params:
            row["param:adapt.alpha"] = float(params[ALPHA_RATIO]) * float(params["adapt.rank"])
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["recovered"] = False
    if sweep_dir is not None:
        df = _recover_orphans(df, grid, space, n_folds, sweep_dir)
    if len(df):
        df = df.sort_values(["trial_index", "trial_id"], na_position="last").reset_index(drop=True)
    return df


def _recover_orphans(df: pd.DataFrame, grid, space: SweepSpace, n_folds: int, sweep_dir: str) -> pd.DataFrame:
    """Add trials that finished every fold but that Tune never registered (the
    driver was killed between the trial's end and its next state save), from
    their fold records, with ``recovered=True``."""
    from raypath.io.storage import filesystem_for, is_remote, open_file, strip_protocol
    from raypath.sweep.objective import aggregate, config_key

    known = {config_key(dict(r.config or {})) for r in grid}
    base = join(sweep_dir, "trials")
    fs = filesystem_for(base)
    target = base if is_remote(base) else strip_protocol(base)
    if not fs.exists(target):
        return df
    extra = []
    for p in fs.ls(target, detail=False):
        key = p.rstrip("/").rsplit("/", 1)[-1]
        uri = join(base, key, "folds.json")
        if key in known or not fs.exists(uri if is_remote(uri) else strip_protocol(uri)):
            continue
        with open_file(uri, "rb") as f:
            doc = json.load(f)
        if len(doc.get("folds", [])) != n_folds:
            continue
        m = aggregate(doc["folds"], n_folds)
        row = {"trial_id": doc["trial_id"], "trial_index": math.nan, "status": "complete", "error": None,
               "folds_done": n_folds, "recovered": True}
        row.update({k: v for k, v in m.items() if k not in ("folds_done", "complete")})
        for k, v in decode_params(space, doc["config"]).items():
            row[f"param:{k}"] = "+".join(map(str, v)) if isinstance(v, list) else v
        extra.append(row)
    if extra:
        log.info("recovered %d finished trial(s) the driver had not registered", len(extra))
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    return df


def pareto_mask(values: np.ndarray, modes: list[str]) -> np.ndarray:
    """Non-dominated rows of ``values`` [n, k] (``modes``: "max"/"min" per column)."""
    v = np.asarray(values, dtype=float).copy()
    for j, mode in enumerate(modes):
        if mode == "min":
            v[:, j] = -v[:, j]
    n = len(v)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(v >= v[i], axis=1) & np.any(v > v[i], axis=1)
        if dominated.any():
            keep[i] = False
    return keep


def mark_front(df: pd.DataFrame, space: SweepSpace) -> pd.DataFrame:
    """Add ``eligible`` (finished every fold, finite objectives), ``pareto`` and ``rank``."""
    df = df.copy()
    metrics, modes = space.metric_names, space.modes
    if df.empty:
        return df.assign(eligible=[], pareto=[], rank=[])
    vals = df[metrics].apply(pd.to_numeric, errors="coerce")
    df["eligible"] = (df["status"] == "complete") & np.isfinite(vals.to_numpy(dtype=float)).all(axis=1)
    df["pareto"] = False
    el = df.index[df["eligible"]]
    if len(el):
        df.loc[el, "pareto"] = pareto_mask(vals.loc[el].to_numpy(dtype=float), modes)
    first, mode = metrics[0], modes[0]
    order = vals.loc[el, first].sort_values(ascending=(mode == "min"))
    df["rank"] = np.nan
    df.loc[order.index, "rank"] = np.arange(1, len(order) + 1)
    return df


def pick_best(df: pd.DataFrame, space: SweepSpace) -> pd.Series | None:
    """The best eligible trial: best first objective (among the Pareto front
    when there are several objectives -- the same trial, by construction)."""
    if df.empty or not df["eligible"].any():
        return None
    cand = df[df["eligible"] & (df["pareto"] | (len(space.objectives) == 1))]
    return cand.sort_values("rank").iloc[0]


# --------------------------------------------------------------------------- best config


def best_configs(
    best: pd.Series, cfg, space: SweepSpace, plans: list[FoldPlan], sweep_dir: str
) -> tuple[dict[str, dict], list[str]]:
    """Stage configs (file name -> config dict) and the commands that re-run the best trial."""
    from raypath.sweep.objective import mil_config

    params = {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:") and k != "param:adapt.alpha"}
    for k, spec in space.space.items():  # list choices were joined for the table
        if spec.type == "categorical" and isinstance(params.get(k), str) and any(
            isinstance(c, (list, tuple)) for c in spec.choices or []
        ):
            params[k] = params[k].split("+")
    params = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
    settings = stage_settings(space, params, cfg.workdir)
    files: dict[str, dict] = {}
    cmds: list[str] = []
    tag = f"sweep-{cfg.name}-best"
    best_dir = join(sweep_dir, "best")
    per_fold = space.kind == "adapter" or space.inner_selection == "best_internal_epoch"
    if not per_fold:
        m = mil_config(settings["mil"], settings["mil"].get("features", space.features), None)
        m = m.model_copy(update={"cohorts": [p.held_out for p in plans], "run": tag})
        files["mil.yaml"] = m.to_dict()
        cmds.append(f"raypath mil --config {join(best_dir, 'mil.yaml')}")
        return files, cmds
    from raypath.adapt.api import AdaptConfig
    from raypath.embed.api import EmbedConfig
    from raypath.sweep.objective import adapt_config_for_fold

    for p in plans:
        c = p.held_out
        feature_dir = settings["mil"].get("features", space.features)
        if space.kind == "adapter":
            run = f"{tag}-{c}"
            a = adapt_config_for_fold(settings["adapt"], p, run)  # the fold's planned slides, as in the trial
            files[f"adapt-{c}.yaml"] = a.to_dict()
            feature_dir = join(cfg.workdir, "features", run)
            e = EmbedConfig(**{
                **settings["embed"], "model": a.model, "weights": a.weights,
                "adapter": join(cfg.workdir, "adapters", run), "slide_ids": p.embed, "feature_dir": feature_dir,
            })
            files[f"embed-{c}.yaml"] = e.to_dict()
            cmds.append(f"raypath adapt --config {join(best_dir, f'adapt-{c}.yaml')}")
            cmds.append(f"raypath embed --config {join(best_dir, f'embed-{c}.yaml')}")
        m = mil_config(settings["mil"], feature_dir, c).model_copy(update={"run": f"{tag}-{c}"})
        epochs = best.get(f"epoch_{c}")
        if space.inner_selection == "best_internal_epoch" and epochs is not None and finite_list(epochs):
            # the model at the selected epoch is the model after training that many epochs
            m = m.model_copy(update={"epochs": int(max(epochs)) + 1})
        files[f"mil-{c}.yaml"] = m.to_dict()
        cmds.append(f"raypath mil --config {join(best_dir, f'mil-{c}.yaml')}")
    if space.kind == "adapter":
        # the adapter to deploy: same settings, every cohort
        a = AdaptConfig(**{**settings["adapt"], "tune_cohorts": ["all"], "run": f"{tag}-all"})
        files["adapt-all.yaml"] = a.to_dict()
    return files, cmds


def finite_list(v) -> bool:
    vals = v if isinstance(v, (list, tuple, np.ndarray)) else [v]
    return all(x is not None and np.isfinite(float(x)) for x in vals)


# --------------------------------------------------------------------------- plots


def plot_objectives(df: pd.DataFrame, space: SweepSpace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = space.metric_names
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.6 * len(metrics)), squeeze=False)
    # numbered as in trials.csv (trial_index), as on the sweep's report page
    idx = pd.to_numeric(df["trial_index"], errors="coerce") if "trial_index" in df else pd.Series(np.nan, index=df.index)
    x = idx.to_numpy(float) if idx.notna().all() else np.arange(1, len(df) + 1, dtype=float)
    for ax, metric, mode in zip(axes[:, 0], metrics, space.modes):
        y = pd.to_numeric(df.get(metric), errors="coerce") if metric in df else pd.Series(np.nan, index=df.index)
        colours = df["status"].map({"complete": "tab:blue", "stopped": "tab:orange", "error": "tab:red"})
        ax.scatter(x, y.fillna(np.nan), c=list(colours), s=30, zorder=3)
        err = df["status"] == "error"
        if err.any():
            lo = np.nanmin(y) if np.isfinite(y).any() else 0.0
            ax.scatter(x[err.to_numpy()], np.full(int(err.sum()), lo), marker="x", c="tab:red", label="failed")
        done = y.where(df["status"] == "complete")
        best = done.cummax() if mode == "max" else done.cummin()
        ax.step(x, best.ffill(), where="post", c="k", lw=1, label=f"best so far ({mode})")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7, loc="best")
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("trial # as in trials.csv (blue complete, orange stopped by ASHA, red failed)")
    fig.suptitle("objective per trial")
    fig.tight_layout()
    _save_fig(fig, path)


def param_importances(df: pd.DataFrame, space: SweepSpace) -> dict[str, float]:
    """Optuna's fANOVA importances of the params for the first objective (complete trials)."""
    import optuna

    from raypath.sweep.space import optuna_space

    metric = space.metric_names[0]
    dists = optuna_space(space)
    ok = df[df["eligible"]] if "eligible" in df else df.iloc[0:0]
    if len(ok) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if space.modes[0] == "max" else "minimize")
    for _, r in ok.iterrows():
        params = {}
        for k, d in dists.items():
            v = r.get(f"param:{k}")
            if isinstance(v, np.generic):
                v = v.item()
            params[k] = v
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[metric])))
        except (ValueError, TypeError) as e:  # an enqueued point outside the space
            log.debug("importance: trial %s skipped (%s)", r["trial_id"], e)
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ImportError) as e:  # too few trials / no variation
        log.info("parameter importances unavailable: %s", e)
        return {}


def plot_importances(imp: dict[str, float], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * max(3, len(imp)) + 1))
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel(f"importance for {metric} (optuna fANOVA)")
    else:
        ax.text(0.5, 0.5, "not enough complete trials", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("parameter importances")
    fig.tight_layout()
    _save_fig(fig, path)


def plot_pareto(df: pd.DataFrame, space: SweepSpace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = space.metric_names
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    el = df[df["eligible"]] if "eligible" in df else df.iloc[0:0]
    if len(metrics) >= 2 and len(el):
        a, b = metrics[:2]
        ax.scatter(el[a], el[b], c="tab:gray", label="complete trials")
        front = el[el["pareto"]].sort_values(a)
        ax.plot(front[a], front[b], "o-", c="tab:red", label="Pareto front")
        for _, r in front.iterrows():
            ax.annotate(str(r["trial_id"])[:8], (r[a], r[b]), fontsize=6)
        ax.set_xlabel(f"{a} ({space.modes[0]})")
        ax.set_ylabel(f"{b} ({space.modes[1]})")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "single objective: no Pareto front" if len(metrics) < 2 else "no complete trial",
                ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Pareto front")
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, uri: str) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(uri, buf.getvalue())


# --------------------------------------------------------------------------- all outputs


def write_outputs(grid, cfg, space: SweepSpace, plans: list[FoldPlan], sweep_dir: str, clinical: pd.DataFrame):
    import pyarrow as pa


    n_folds = len(plans)
    df = mark_front(trials_table(grid, space, n_folds, sweep_dir), space)
    _add_fold_epochs(df, grid, sweep_dir)
    table = df.copy()
    for c in table.columns:  # parquet wants one type per column
        if table[c].map(lambda v: isinstance(v, (list, dict))).any():
            table[c] = table[c].map(lambda v: json.dumps(to_jsonable(v)))
    write_parquet_atomic(pa.Table.from_pandas(table, preserve_index=False), join(sweep_dir, "trials.parquet"))
    atomic_write_bytes(join(sweep_dir, "trials.csv"), table.to_csv(index=False).encode())

    best = pick_best(df, space)
    best_doc = None
    if best is not None:
        files, cmds = best_configs(best, cfg, space, plans, sweep_dir)
        for name, doc in files.items():
            atomic_write_bytes(join(sweep_dir, "best", name),
                               yaml.safe_dump({"stage": name.split("-")[0].split(".")[0], "config": doc},
                                              sort_keys=False).encode())
        best_doc = {
            "sweep": cfg.name,
            "trial_id": best["trial_id"],
            "objectives": {m: to_jsonable(best[m]) for m in space.metric_names},
            "metrics": {k: to_jsonable(best[k]) for k in best.index
                        if k.startswith(("external_", "internal_")) or k in ("mean_external", "worst_external",
                                                                            "worst_cohort", "mean_internal",
                                                                            "site_probe_bacc", "kmeans_purity")},
            "params": {k[len("param:"):]: to_jsonable(v) for k, v in best.items() if k.startswith("param:")},
            "inner_selection": space.inner_selection,
            "commands": cmds,
            "configs": files,
        }
        atomic_write_bytes(join(sweep_dir, "best_config.yaml"),
                           yaml.safe_dump(to_jsonable(best_doc), sort_keys=False).encode())

    plot_objectives(df, space, join(sweep_dir, "objective_per_trial.png"))
    imp = param_importances(df, space)
    plot_importances(imp, space.metric_names[0], join(sweep_dir, "param_importances.png"))
    atomic_write_bytes(join(sweep_dir, "param_importances.json"), json.dumps(imp, indent=2).encode())
    plot_pareto(df, space, join(sweep_dir, "pareto_front.png"))

    summary = {
        "name": cfg.name,
        "kind": space.kind,
        "objectives": [o.model_dump() for o in space.objectives],
        "held_out_cohorts": [p.held_out for p in plans],
        "n_trials": int(len(df)),
        "n_complete": int((df["status"] == "complete").sum()) if len(df) else 0,
        "n_stopped": int((df["status"] == "stopped").sum()) if len(df) else 0,
        "n_failed": int((df["status"] == "error").sum()) if len(df) else 0,
        "pareto_trials": df.loc[df["pareto"], "trial_id"].tolist() if len(df) else [],
        "best": best_doc,
        "nested_lodo": {p.held_out: p.cohorts_seen(clinical) for p in plans},
    }
    atomic_write_bytes(join(sweep_dir, "sweep.json"), json.dumps(to_jsonable(summary), indent=2).encode())
    return SweepResult(sweep_dir, df, best_doc, n_folds)


def _add_fold_epochs(df: pd.DataFrame, grid, sweep_dir: str) -> None:
    """Selected epochs per fold from each trial's fold record (inner selection)."""
    from raypath.sweep.objective import read_trial_record

    configs = {}
    for r in grid:
        m = dict(r.metrics or {})
        if m.get("trial_id"):
            configs[str(m["trial_id"])] = dict(r.config or {})
    for i, tid in df["trial_id"].items():
        if tid not in configs:
            continue
        for fold in read_trial_record(sweep_dir, configs[tid]):
            if fold.get("epoch") is not None:
                col = f"epoch_{fold['held_out']}"
                if col not in df:
                    df[col] = None
                df.at[i, col] = fold["epoch"]
