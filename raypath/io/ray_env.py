"""Starting or joining Ray, and deriving resource requests from the cluster.

All stages call :func:`ensure_ray` instead of ``ray.init`` directly so that
local runs, ``ray job submit`` runs (``RAY_ADDRESS`` set by the job) and
tests behave the same.  GPU requests are always derived from
``ray.cluster_resources()``: asking for a GPU on a CPU-only cluster makes
Ray Data wait forever for an actor that can never be placed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

#: Environment forwarded to Ray workers so S3 settings reach them.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
)


def _quiet_defaults() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # A local single-user cluster started by raypath needs no token; clusters
    # set RAY_AUTH_MODE/RAY_AUTH_TOKEN themselves (see cluster/README.md).
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def ensure_ray(num_cpus: int | None = None, object_store_mb: int | None = None, **kw: Any):
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local one.

    Idempotent: if Ray is already initialised, nothing happens.
    The environment needed to reach S3 is passed to workers through the
    job's runtime_env (values stay in memory; they are never logged).
    """
    _quiet_defaults()
    import ray

    if ray.is_initialized():
        return ray
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    init_kw: dict[str, Any] = dict(
        ignore_reinit_error=True,
        log_to_driver=True,
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )
    if not os.environ.get("RAY_ADDRESS"):
        init_kw.update(include_dashboard=False)
        if num_cpus is not None:
            init_kw["num_cpus"] = num_cpus
        if object_store_mb is not None:
            init_kw["object_store_memory"] = object_store_mb * 1024 * 1024
    init_kw.update(kw)
    ray.init(**{k: v for k, v in init_kw.items() if v is not None})
    return ray


def cluster_gpus() -> float:
    """Total GPUs the connected cluster has (0 on CPU-only clusters)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
