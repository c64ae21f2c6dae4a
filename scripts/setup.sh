#!/usr/bin/env bash
# Create .venv and install the locked environment (requirements.lock: exact versions with hashes), then
# the project itself without dependencies; once per version of requirements.lock and pyproject.toml.
# Sourced by scripts/demo.sh and scripts/test.sh; leaves the venv activated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing requirements.lock and the project into .venv (first run: a few minutes, about 6 GB)"
  start=$(date +%s)
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet --require-hashes -r requirements.lock
  # The build backend (setuptools) is in the lock too (torch requires it): nothing unhashed is fetched.
  python -m pip install --quiet --no-deps --no-build-isolation -e .
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "setup: installed in $(( $(date +%s) - start )) s"
fi
export DGLBACKEND=pytorch
