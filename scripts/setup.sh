#!/usr/bin/env bash
# Create .venv and install the project with its test extras, once per pyproject.toml version.
# Sourced by scripts/demo.sh and scripts/test.sh; leaves the venv activated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project into .venv (first run: a few minutes, about 6 GB)"
  start=$(date +%s)
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "setup: installed in $(( $(date +%s) - start )) s"
fi
export DGLBACKEND=pytorch
