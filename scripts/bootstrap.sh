#!/usr/bin/env bash
# Creates .venv and installs raypath with its test extras. Idempotent: a second
# run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.raypath-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || constraints.txt -nt $stamp ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
  touch "$stamp"
fi
# Headless Chromium: the tests open every report page in it (tests/test_demo.py; under CI=true a missing
# browser fails the test). Debian/Ubuntu's own package, installed only when no Chromium is on PATH.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo -n"; fi
    echo "bootstrap: installing chromium (apt-get) for the report browser test" >&2
    if ! { $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
           || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; }; }; then
      echo "bootstrap: could not install chromium (no root?): the browser test skips here and fails under CI" >&2
    fi
  else
    echo "bootstrap: no chromium and no apt-get: install Chromium by hand for the report browser test" >&2
  fi
fi
