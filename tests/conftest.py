"""Shared fixtures: one Ray runtime and one embedded S3 endpoint per test session."""

from __future__ import annotations

import os
from pathlib import Path

# Must be set before ray is imported anywhere (see ../shared/docs/RAY.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

DATA_DIR = Path(__file__).parent / "data"
CMU_SLIDE = DATA_DIR / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 endpoint for the whole session; the process env points at it
    so Ray workers started afterwards inherit it."""
    from raypath.io.s3server import start_embedded_s3

    server = start_embedded_s3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray runtime for the session (2 CPUs, small object store).

    Depends on ``s3_server`` so the S3 endpoint is in the environment the
    workers are started with.
    """
    import ray

    from raypath.io.ray_env import ensure_ray

    ensure_ray(num_cpus=2, object_store_mb=256)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return CMU_SLIDE
