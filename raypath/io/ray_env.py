"""Starting or joining Ray, and deriving resource requests from the cluster.

All stages call :func:`ensure_ray` instead of ``ray.init`` directly so that
local runs, ``ray job submit`` runs (``RAY_ADDRESS`` set by the job) and
tests behave the same.  GPU requests are always derived from
``ray.cluster_resources()``: asking for a GPU on a CPU-only cluster makes
Ray Data wait forever for an actor that can never be placed.

Two rules about the cluster's life and secrets:

- **No secret goes through Ray.**  A job's ``runtime_env`` is written to
  Ray's logs on disk (``runtime_env_agent.log``) and shown by the dashboard
  and the GCS, so only non-secret settings (endpoint, region, raypath's S3
  timeouts) are forwarded there.  A local cluster's workers inherit the
  driver's environment, credentials included; on a real cluster the nodes
  get credentials from the platform (IAM role, IRSA, a Kubernetes secret in
  the pod spec: ``cluster/README.md``).
- **A local cluster started by raypath does not outlive its driver.**  A
  small watcher process (``python -m raypath.io.ray_env --watch PID``)
  records the cluster's processes and, when the driver dies (even by
  SIGKILL), ends those still running: Ray's dashboard and runtime-env agents
  would otherwise stay.  A cluster raypath attached to (``RAY_ADDRESS``) is
  never stopped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

#: Non-secret environment forwarded to Ray workers through the job's runtime_env.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "RAYPATH_S3_RETRY_TOTAL_S",
    "RAYPATH_S3_CONNECT_TIMEOUT_S",
    "RAYPATH_S3_READ_TIMEOUT_S",
    "RAYPATH_PLUGINS",  # plugin specs (module paths, never secrets): raypath.plugins
)


def _quiet_defaults() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # A local single-user cluster started by raypath needs no token; clusters
    # set RAY_AUTH_MODE/RAY_AUTH_TOKEN themselves (see cluster/README.md).
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from raypath.io.quiet import quiet_ray_data

    quiet_ray_data()  # raypath prints its own progress: no "Progress bars disabled" warning


def forwarded_env() -> dict[str, str]:
    """The environment passed to workers in the job's runtime_env: never a secret."""
    from raypath.io.storage import _is_secret_key

    return {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k) and not _is_secret_key(k)}


def task_options() -> dict[str, Any]:
    """Ray options that give a stage's tasks and actors this driver's current non-secret
    settings (S3 endpoint, region, raypath's S3 timeouts and retry budget), also on a
    cluster that was started before they were set: ``ray.remote(**task_options())``,
    ``ds.map(..., **task_options())``.  Ray merges these env_vars over the job's."""
    env_vars = forwarded_env()
    return {"runtime_env": {"env_vars": env_vars}} if env_vars else {}


def ensure_ray(num_cpus: int | None = None, object_store_mb: int | None = None, **kw: Any):
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local one.

    Idempotent: if Ray is already initialised, nothing happens.  A local
    cluster started here is watched so that it ends with this process
    (see the module docstring); an attached cluster is left alone.
    """
    _quiet_defaults()
    import ray

    if ray.is_initialized():
        return ray
    env_vars = forwarded_env()
    attach = bool(os.environ.get("RAY_ADDRESS") or kw.get("address"))
    init_kw: dict[str, Any] = dict(
        ignore_reinit_error=True,
        log_to_driver=True,
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )
    if not attach:
        init_kw.update(include_dashboard=False)
        if num_cpus is not None:
            init_kw["num_cpus"] = num_cpus
        if object_store_mb is not None:
            init_kw["object_store_memory"] = object_store_mb * 1024 * 1024
    init_kw.update(kw)
    ray.init(**{k: v for k, v in init_kw.items() if v is not None})
    if not attach:
        start_watcher()
    return ray


# --------------------------------------------------------------------------- the cluster ends with its driver


def start_watcher(driver_pid: int | None = None) -> subprocess.Popen | None:
    """Start the process that ends this driver's local cluster when the driver dies."""
    pid = driver_pid or os.getpid()
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "raypath.io.ray_env", "--watch", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the driver's terminal must not kill the watcher first
            close_fds=True,
        )
    except OSError as e:  # never fail a run for this
        log.warning("could not start the Ray cluster watcher (%s); a killed driver may leave Ray processes", e)
        return None


def _is_ray_process(p) -> bool:
    """Ray's own processes: raylet, GCS, ``ray::*`` workers and agents, Ray's Python daemons."""
    name = p.name()
    if name in ("raylet", "gcs_server") or name.startswith("ray::"):
        return True
    return any(f"{os.sep}ray{os.sep}" in a for a in p.cmdline()[:3])


def _descendants(proc) -> dict[int, float]:
    """Ray processes below ``proc`` (the driver's other children, a user's servers, are left alone)."""
    import psutil

    out = {}
    me = os.getpid()
    try:
        for c in proc.children(recursive=True):
            if c.pid == me:
                continue
            try:
                if _is_ray_process(c):
                    out[c.pid] = c.create_time()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def _end(procs: dict[int, float], grace_s: float = 3.0) -> None:
    import psutil

    alive = []
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:  # the same process, not a reused pid
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass


def watch(driver_pid: int, poll_s: float = 1.0) -> None:
    """Record the driver's descendants (Ray's processes) while it lives; end them when it dies.

    Returns when the driver has died (after the clean-up) or when the
    cluster was shut down normally and nothing is left to watch.
    """
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    known: dict[int, float] = {}
    seen_any = False
    while True:
        if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
            _end(known)
            return
        now = _descendants(driver)
        # keep pids that left the tree but still run (agents re-parented when the raylet died)
        for pid, created in list(known.items()):
            if pid not in now and not psutil.pid_exists(pid):
                del known[pid]
        known.update(now)
        seen_any = seen_any or bool(known)
        if seen_any and not known:
            return  # ray.shutdown() ended everything; a new ensure_ray starts a new watcher
        time.sleep(poll_s)


def cluster_gpus() -> float:
    """Total GPUs the connected cluster has (0 on CPU-only clusters)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_capacity() -> dict[str, Any]:
    """What the connected cluster can ever offer: ``{"total": {...}, "largest_node": {...},
    "autoscaling": bool}`` (CPU and GPU counts).

    On an autoscaling cluster the totals are its configured maximum (node
    groups x max replicas, capped by the cluster's ``max_resources``), not
    what happens to be up now; the largest node is the largest node type.
    """
    import ray

    total = {k: float(ray.cluster_resources().get(k, 0.0)) for k in ("CPU", "GPU")}
    largest = {"CPU": 0.0, "GPU": 0.0}
    for n in ray.nodes():
        if n.get("Alive"):
            res = n.get("Resources", {})
            for k in largest:
                largest[k] = max(largest[k], float(res.get(k, 0.0)))
    autoscaling = False
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
        maxima = state.state.get_max_resources_from_cluster_config() if config is not None else None
        if config is not None and maxima:
            autoscaling = True
            for k in total:
                total[k] = max(total[k], float(maxima.get(k, 0) or 0))
            for g in config.node_group_configs:
                if g.max_count != 0:
                    for k in largest:
                        largest[k] = max(largest[k], float(g.resources.get(k, 0)))
    except Exception as e:  # private API: fall back to what is up now
        log.debug("no autoscaler config (%s)", e)
    return {"total": total, "largest_node": largest, "autoscaling": autoscaling}


def check_actor_resources(n_actors: int, cpus: float, gpus: float, reserve_cpus: float = 1.0,
                          flags: tuple[str, str, str] = ("--num-actors", "--num-cpus-per-actor",
                                                         "--num-gpus-per-actor")) -> None:
    """Fail fast (:class:`RaypathError`) when ``n_actors`` actors of ``cpus``/``gpus``
    each (plus ``reserve_cpus`` for the tasks feeding them) can never be placed:
    Ray would otherwise wait forever for resources that will not come."""
    from raypath.errors import RaypathError

    cap = cluster_capacity()
    what = "configured maximum of the autoscaling cluster" if cap["autoscaling"] else "Ray cluster"
    f_n, f_cpu, f_gpu = flags
    for res, per, flag in (("CPU", cpus, f_cpu), ("GPU", gpus, f_gpu)):
        biggest = cap["largest_node"][res]
        if per > 0 and per > biggest:
            raise RaypathError(
                f"{flag} {per:g} but the largest node of the {what} has {biggest:g} {res}s and an actor must fit "
                f"on one node: use {flag} {max(biggest, 0):g} or less, or connect to a cluster with bigger nodes (RAY_ADDRESS)"
            )
    need_cpu = n_actors * cpus + reserve_cpus
    if need_cpu > cap["total"]["CPU"] + 1e-9:
        fit = int(max(cap["total"]["CPU"] - reserve_cpus, 0) // cpus) if cpus > 0 else 0
        raise RaypathError(
            f"{f_n} {n_actors} x {f_cpu} {cpus:g} needs {need_cpu:g} CPUs ({reserve_cpus:g} kept for reading tiles) "
            f"but the {what} has {cap['total']['CPU']:g}: use {f_n} {max(fit, 1)}"
            + ("" if fit >= 1 else f" with a smaller {f_cpu}") + ", or connect to a larger cluster (RAY_ADDRESS)"
        )
    if gpus > 0 and n_actors * gpus > cap["total"]["GPU"] + 1e-9:
        fit = int(cap["total"]["GPU"] // gpus)
        raise RaypathError(
            f"{f_n} {n_actors} x {f_gpu} {gpus:g} needs {n_actors * gpus:g} GPUs but the {what} has "
            f"{cap['total']['GPU']:g}: use {f_n} {max(fit, 1)}, or connect to a cluster with more GPUs (RAY_ADDRESS)"
        )


if __name__ == "__main__":  # pragma: no cover - the watcher process
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(sys.argv) == 3 and sys.argv[1] == "--watch":
        watch(int(sys.argv[2]))
