#!/usr/bin/env bash
# The two CI checks (README "Regression check and CI"), after `bash scripts/demo.sh`:
#   1. the regression subset's pipeline (real MELD conversations, regression/dvc.yaml);
#   2. reproducibility: the fresh metrics equal the committed ones (exactly on the CPU);
#   3. the regression gate: HEAD's committed subset figures against the base revision's
#      ($GATE_BASE when set, as the GitHub workflow sets it for a pull request: its base branch;
#      extra arguments go to the gate, e.g. --base origin/main).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export HF_HUB_OFFLINE=1
start=$(date +%s)
dvc repro regression/dvc.yaml
echo "dvc repro regression/dvc.yaml finished in $(( $(date +%s) - start )) s"
python -m pipeline.regression reproduce
python -m pipeline.regression gate ${GATE_BASE:+--base "$GATE_BASE"} "$@"
