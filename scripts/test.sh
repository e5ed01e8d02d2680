#!/usr/bin/env bash
# Runs the whole test suite (what CI runs).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 MPLBACKEND=Agg
status=0
.venv/bin/python -m pytest "$@" || status=$?
# Ray processes started by tests must not outlive the run.
.venv/bin/ray stop --force >/dev/null 2>&1 || true
exit $status
