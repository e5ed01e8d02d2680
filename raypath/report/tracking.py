"""Experiment tracking in MLflow: every mil, adapt, patch and sweep run is also
an MLflow run (parameters, metrics per epoch or fold, the run's page and
config as artifacts), where teams already look.

Where
    ``MLFLOW_TRACKING_URI`` when set (any server or database); otherwise a
    store inside the workdir: ``sqlite:///<workdir>/mlruns.db`` with artifacts
    under ``<workdir>/mlruns/``.  A workdir on ``s3://`` has no default store
    (set ``MLFLOW_TRACKING_URI``).  ``RAYPATH_TRACKING=off`` turns it off.
    One experiment per workdir (``raypath <workdir name>``, or
    ``MLFLOW_EXPERIMENT_NAME``).
Who writes
    Only the driver, after the stage wrote its outputs (a sweep's trials are
    logged by Ray Tune's ``MLflowLoggerCallback``, which also runs in the
    driver), so parallel workers and trials never contend for a local store.
What never goes in
    Secrets: parameters come from the saved, redacted config and pass
    :func:`raypath.io.storage.redact` again; no environment is logged.
Never fatal
    A tracking failure is a warning; the stage's own outputs are already
    written.

Browse it (the UI needs the full ``mlflow`` package, e.g. in its own
environment)::

    mlflow ui --backend-store-uri sqlite:///$PWD/<workdir>/mlruns.db
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from typing import Any, Iterator

from raypath.io.storage import is_remote, join, redact, strip_protocol

log = logging.getLogger(__name__)

STORE_FILE = "mlruns.db"
ARTIFACT_DIR = "mlruns"
_OFF = ("0", "off", "false", "no")
_warned: set[str] = set()


def in_driver() -> bool:
    """False inside a Ray worker (a Tune trial, a Ray Train worker): only the driver writes the store."""
    import sys

    if "ray" not in sys.modules:
        return True
    try:
        from ray._private import worker

        return worker.global_worker.mode != worker.WORKER_MODE
    except Exception:  # noqa: BLE001
        return True


def tracking_uri(workdir: str | None) -> str | None:
    """The MLflow tracking URI for runs of ``workdir`` (None: tracking off)."""
    if os.environ.get("RAYPATH_TRACKING", "").strip().lower() in _OFF or not workdir or not in_driver():
        return None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_remote(workdir):
        return None
    return f"sqlite:///{os.path.abspath(strip_protocol(workdir))}/{STORE_FILE}"


def experiment_name(workdir: str) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"raypath {str(workdir).rstrip('/').rsplit('/', 1)[-1]}"


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def _mlflow():
    try:
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new store
        return mlflow
    except ImportError:
        _warn_once("import", "experiment tracking off: mlflow is not installed (pip install mlflow-skinny)")
        return None


def ensure_experiment(workdir: str) -> tuple[str, str] | None:
    """(tracking URI, experiment id) for ``workdir``, creating the experiment (artifacts in the workdir)."""
    uri = tracking_uri(workdir)
    mlflow = _mlflow() if uri else None
    if mlflow is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = experiment_name(workdir)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return uri, exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI") and not is_remote(workdir):
        location = os.path.join(os.path.abspath(strip_protocol(workdir)), ARTIFACT_DIR)
    # "custom_model_development": the MLflow 3 UI opens the experiment on its training runs, not GenAI traces
    return uri, client.create_experiment(name, artifact_location=location,
                                         tags={"mlflow.experimentKind": "custom_model_development"})


def metric_key(*parts: Any) -> str:
    """An MLflow-safe metric name from parts (cohort names may hold any character)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_\-. /]", "-", str(p)) for p in parts if p not in (None, ""))


def flat_params(doc: dict, prefix: str = "") -> dict[str, str]:
    """Dotted, redacted, size-capped parameters of a (saved) config."""
    out: dict[str, str] = {}
    for k, v in (redact(doc) or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:500]
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


@contextlib.contextmanager
def tracked_run(workdir: str, name: str, stage: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run of ``workdir``'s experiment, yielding ``(client, run_id)`` or None (tracking off).

    Errors inside are warnings: the stage's results are already on disk.
    """
    try:
        found = ensure_experiment(workdir)
    except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
        _warn_once(f"open:{workdir}", "experiment tracking off for %s: %s: %s", workdir, type(e).__name__, e)
        found = None
    if found is None:
        yield None
        return
    from mlflow.tracking import MlflowClient

    uri, exp_id = found
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(exp_id, run_name=name, tags={"raypath.stage": stage, "raypath.workdir": str(workdir),
                                                         **(tags or {})})
    status = "FINISHED"
    try:
        yield client, run.info.run_id
    except Exception as e:  # noqa: BLE001
        status = "FAILED"
        log.warning("experiment tracking of %s stopped: %s: %s", name, type(e).__name__, e)
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run.info.run_id, status)
    if status == "FINISHED":
        log.info("tracked %s in MLflow (%s, experiment %r)", name, uri, experiment_name(workdir))


# --------------------------------------------------------------------------- logging helpers


def log_batch(client, run_id: str, params: dict[str, str] | None = None,
              series: list[tuple[str, float, int]] | None = None) -> None:
    """Parameters and ``(key, value, step)`` metrics, in MLflow's batch limits; non-finite values skipped."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    plist = [Param(k, v) for k, v in (params or {}).items()]
    mlist = [Metric(k, float(v), now, int(s)) for k, v, s in (series or []) if _finite(v)]
    for i in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[i:i + 100])
    for i in range(0, len(mlist), 1000):
        client.log_batch(run_id, metrics=mlist[i:i + 1000])


def _redacted_copy(data: bytes, name: str) -> bytes:
    """Config and result files pass :func:`redact` again; every text file loses secret env values."""
    import yaml

    from raypath.report.html import scrub

    try:
        text = data.decode()
    except UnicodeDecodeError:
        return data
    try:
        if name.endswith((".yaml", ".yml")):
            text = yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
        elif name.endswith(".json"):
            text = json.dumps(redact(json.loads(text)), indent=1)
    except (ValueError, yaml.YAMLError):
        pass
    return scrub(text).encode()


def log_files(client, run_id: str, folder: str, names: list[str], artifact_path: str | None = None) -> None:
    """The files of ``folder`` (local or s3://) that exist, as artifacts (text files redacted)."""
    import tempfile

    from raypath.io.storage import exists, open_file

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            uri = join(folder, name)
            if not exists(uri):
                continue
            with open_file(uri, "rb") as src:
                data = src.read()
            if not name.endswith(".png"):
                data = _redacted_copy(data, name)
            local = os.path.join(tmp, name.replace("/", "_"))
            with open(local, "wb") as dst:
                dst.write(data)
            client.log_artifact(run_id, local, artifact_path)


def _run_page(run_dir: str) -> None:
    """The run's own report page, so it exists as soon as the run does (and is logged)."""
    try:
        from raypath.report.pages import write_run_report

        write_run_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the page is a convenience here
        log.info("no report page for %s yet: %s", run_dir, e)


def _saved_config(run_dir: str, fallback: dict) -> dict:
    import yaml

    from raypath.io.storage import exists, open_file

    uri = join(run_dir, "config.yaml")
    if exists(uri):
        with open_file(uri, "rb") as f:
            doc = yaml.safe_load(f) or {}
        if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
            return doc["config"]
    return fallback


# --------------------------------------------------------------------------- stages


def mil_series(curves, summary: dict) -> list[tuple[str, float, int]]:
    """Per-epoch scores (mean over repeats/folds) and the run's headline numbers."""
    out: list[tuple[str, float, int]] = []
    if curves is not None and len(curves):
        keys = ["name", "set", "cohort", "metric", "epoch"]
        g = curves.groupby(keys, sort=True)["value"].mean().reset_index()
        for r in g.itertuples(index=False):
            key = (metric_key("train_loss", r.name) if r.set == "train" else
                   metric_key(r.metric, r.set, r.name if r.set == "internal" or r.name == r.cohort else
                              f"{r.name}-{r.cohort}"))
            out.append((key, r.value, int(r.epoch)))
    metric = summary.get("metric", "score")
    for k in ("mean", "worst"):
        out.append((metric_key(metric, k, "external"), summary.get(k), 0))
    internal = summary.get("internal") or {}
    if isinstance(internal.get("mean"), (int, float)):
        out.append((metric_key(metric, "cv", "mean"), internal["mean"], 0))
    return out


def track_mil(cfg, result) -> None:
    """Log a finished ``raypath mil`` run (driver side)."""
    run_dir = str(result.run_dir)
    with tracked_run(cfg.workdir, f"mil {cfg.run_name()}", "mil",
                     {"raypath.run_dir": run_dir, "raypath.protocol": cfg.protocol}) as t:
        if t is None:
            return
        client, run_id = t
        log_batch(client, run_id, flat_params(_saved_config(run_dir, cfg.to_dict())),
                  mil_series(result.curves, result.summary))
        _run_page(run_dir)
        log_files(client, run_id, run_dir, ["report.html", "config.yaml", "metrics.json", "curves.png", "km.png"])


def track_adapt(cfg, run_dir: str, metrics) -> None:
    """Log a finished ``raypath adapt`` run: per-epoch loss, teacher entropy and the rest."""
    with tracked_run(cfg.workdir, f"adapt {cfg.run}", "adapt", {"raypath.run_dir": str(run_dir)}) as t:
        if t is None:
            return
        client, run_id = t
        rows = metrics.to_dict("records") if hasattr(metrics, "to_dict") else list(metrics or [])
        series = [(metric_key(k), v, int(r.get("epoch", i))) for i, r in enumerate(rows) for k, v in r.items()
                  if k != "epoch" and _finite(v)]
        log_batch(client, run_id, flat_params(_saved_config(run_dir, cfg.to_dict())), series)
        _run_page(run_dir)
        log_files(client, run_id, run_dir, ["report.html", "config.yaml", "adapter_info.json", "metrics.json",
                                            "adapter_config.json"])


def track_sweep(cfg, sweep_dir: str, result) -> None:
    """Log a sweep's summary run: the best trial's parameters and objectives, the trials table.

    Each trial is its own MLflow run, logged while the sweep runs (:func:`tune_callbacks`).
    """
    with tracked_run(cfg.workdir, f"sweep {cfg.name}", "sweep", {"raypath.sweep": cfg.name,
                                                                  "raypath.run_dir": str(sweep_dir)}) as t:
        if t is None:
            return
        client, run_id = t
        best = result.best or {}
        params = flat_params(_saved_config(sweep_dir, cfg.to_dict()))
        params.update({f"best.{k}": str(v)[:500] for k, v in (best.get("params") or {}).items()})
        table = result.trials
        series = [(metric_key("best", k), v, 0) for k, v in (best.get("objectives") or {}).items()]
        if table is not None and len(table):
            series += [("n_trials", len(table), 0), ("n_complete", int((table["status"] == "complete").sum()), 0)]
        log_batch(client, run_id, params, series)
        _run_page(sweep_dir)
        log_files(client, run_id, sweep_dir, ["report.html", "config.yaml", "space.yaml", "sweep.json", "trials.csv",
                                              "best_config.yaml", "pareto_front.png", "objective_per_trial.png"])


def patch_series(doc: dict, metric: str) -> list[tuple[str, float, int]]:
    """In-domain score per method against the label fraction (step = percent of labels)."""
    out = []
    for r in doc.get("scaling") or []:
        if r.get("in_domain", True) and _finite(r.get("fraction")):
            out.append((metric_key(r.get("method"), metric), r.get(f"{metric}_mean"), round(100 * float(r["fraction"]))))
    for method, v in ((doc.get("headline") or {}).get("at_full_data") or {}).items():
        out.append((metric_key(method, metric, "full_data"), (v or {}).get("mean"), 0))
    return out


def track_patch(cfg, run_dir: str, doc: dict) -> None:
    """Log a finished ``raypath patch`` benchmark: its score curves and page."""
    with tracked_run(cfg.workdir, f"patch {str(run_dir).rstrip('/').rsplit('/', 1)[-1]}", "patch",
                     {"raypath.run_dir": str(run_dir)}) as t:
        if t is None:
            return
        client, run_id = t
        metric = (doc.get("headline") or {}).get("metric") or getattr(cfg, "metric", "score")
        log_batch(client, run_id, flat_params(_saved_config(run_dir, cfg.to_dict())), patch_series(doc, metric))
        log_files(client, run_id, run_dir, ["report.html", "config.yaml", "summary.json", "summary.csv",
                                            "results.md", "scaling.png", "domain_matrix.png"])


_LOGGER_CLASS: list = []


def _buffered_logger_class():
    """Tune's ``MLflowLoggerCallback`` that writes a trial's per-fold metrics once, when the
    trial ends, instead of one store transaction per reported result (Tune's control
    loop waits for callbacks)."""
    if _LOGGER_CLASS:
        return _LOGGER_CLASS[0]
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class BufferedMLflowLogger(MLflowLoggerCallback):
        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            self._pending: dict = {}

        def log_trial_result(self, iteration: int, trial, result: dict):
            self._pending.setdefault(trial, []).append((iteration, dict(result)))

        def log_trial_end(self, trial, failed: bool = False):
            for iteration, result in self._pending.pop(trial, []):
                super().log_trial_result(iteration, trial, result)
            super().log_trial_end(trial, failed)

    _LOGGER_CLASS.append(BufferedMLflowLogger)  # built once, on first use (it needs Ray)
    return BufferedMLflowLogger


def tune_callbacks(workdir: str, sweep_name: str) -> list:
    """Ray Tune's MLflow integration (driver side): one MLflow run per trial, metrics per fold."""
    try:
        found = ensure_experiment(workdir)
        if found is None:
            return []
        uri, _ = found
        return [_buffered_logger_class()(tracking_uri=uri, experiment_name=experiment_name(workdir),
                                         tags={"raypath.stage": "sweep-trial", "raypath.sweep": sweep_name},
                                         save_artifact=False)]
    except Exception as e:  # noqa: BLE001
        _warn_once(f"tune:{workdir}", "no MLflow logging of sweep trials: %s: %s", type(e).__name__, e)
        return []
