#!/usr/bin/env bash
# One command for anyone with a GPU: does the pipeline work, and give the same results, on CUDA?
#
#   bash scripts/gpu_check.sh
#
# Installs as scripts/demo.sh does (scripts/setup.sh), copies the working tree (tracked files and
# untracked ones git does not ignore) into a scratch git repository, so that this workspace stays
# untouched, and runs there, in order, stopping at the first failure:
#   1. tests     python -m pytest -m gpu         the tests that need CUDA
#   2. repro     dvc repro --force               the whole demo pipeline on CUDA
#   3. loaders   scripts/gpu_loaders.py          the real profile's text/audio/visual loaders on tiny
#                                                random RoBERTa / wav2vec2 / face weights, on CUDA
#   4. compare   pipeline.regression reproduce   the CUDA demo metrics against the committed (CPU)
#                --tolerance 0.05                ones, each figure within the tolerance
#   5. bench     benchmarks/extract.py           per-stage utt/s and the ratio to the bare model loop
# then prints a summary table (also in $GPU_CHECK_OUT/summary.txt).
#
# Environment:
#   GPU_CHECK_OUT=/tmp/gpu_check   where the logs go (one per step, environment.txt, summary.txt,
#                                  the benchmark's JSON): bring this folder back from a remote run
#   GPU_CHECK_ALLOW_CPU=1          without CUDA, run every step on the CPU instead of stopping
#   GPU_CHECK_QUICK=1              trim steps 1 (no test marked slow) and 5 (a few utterances)
#   GPU_CHECK_TOLERANCE=0.05       step 4's tolerance (largest accepted difference of each figure)
#   GPU_CHECK_KEEP=1               keep the scratch copy (it is kept anyway when a step fails)
# Exit status: 0 all passed; 1 a step failed; 2 no CUDA (and GPU_CHECK_ALLOW_CPU unset).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
OUT=${GPU_CHECK_OUT:-/tmp/gpu_check}
QUICK=${GPU_CHECK_QUICK:-0}
TOLERANCE=${GPU_CHECK_TOLERANCE:-0.05}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/[0-9]-*.log "$OUT"/summary.txt "$OUT"/environment.txt "$OUT"/5-bench.json
check_start=$(date +%s)

source scripts/setup.sh
export HF_HUB_OFFLINE=1 DGLBACKEND=pytorch PYTHONUNBUFFERED=1

python - >"$OUT/environment.txt" 2>&1 <<'EOF' || true
import platform, torch
print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("CUDA available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
EOF
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi >>"$OUT/environment.txt" 2>&1 || true; fi
cat "$OUT/environment.txt"

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  DEVICE=cpu
  echo "gpu_check: CUDA is not available; GPU_CHECK_ALLOW_CPU=1: every step runs on the CPU (a rehearsal," \
       "not a GPU check)"
else
  echo "gpu_check: CUDA is not available to torch here (see $OUT/environment.txt): nothing to check." >&2
  echo "  Run this on a machine with an NVIDIA GPU and its driver, or set GPU_CHECK_ALLOW_CPU=1 to rehearse" \
       "every step on the CPU." >&2
  exit 2
fi

# --- the scratch copy --------------------------------------------------------------------------------
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_repo.XXXXXX")
echo "gpu_check: copying the working tree into $SCRATCH"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | xargs -0 cp -a --parents -t "$SCRATCH"
(
  cd "$SCRATCH"
  git init -q
  git add -A
  git -c user.name=gpu_check -c user.email=gpu_check@localhost -c commit.gpgsign=false \
    commit -q -m "gpu_check snapshot of $REPO"
)

# --- the steps ---------------------------------------------------------------------------------------
STEPS=(tests repro loaders compare bench)
declare -A RESULT=() TOOK=() NOTE=()

step_tests() {
  local select="gpu"
  [ "$QUICK" = 1 ] && select="gpu and not slow"
  set +e
  python -m pytest -m "$select" -q -p no:cacheprovider -rs
  local rc=$?
  set -e
  if [ $rc -eq 5 ]; then echo "no test is marked gpu"; return 1; fi
  return $rc
}

step_repro() {
  local output
  output=$(mktemp)
  dvc repro --force 2>&1 | tee "$output"
  dvc metrics show
  # the stages that can use CUDA must have run on the device of this check
  for m in text audio visual; do
    grep -Eq "$m: [0-9]+ utterances.*device $DEVICE" "$output" \
      || { echo "gpu_check: extract_$m did not report 'device $DEVICE'"; return 1; }
  done
  grep -q "train: .* dialogues on $DEVICE" "$output" || { echo "gpu_check: train did not run on $DEVICE"; return 1; }
  rm -f "$output"
}

step_loaders() {
  local args=(--utterances 6)
  [ "$DEVICE" = cpu ] && args+=(--allow-cpu)
  python scripts/gpu_loaders.py "${args[@]}"
}

step_compare() {
  echo "committed metrics (made on the CPU) against this run's on $DEVICE, tolerance $TOLERANCE:"
  python -m pipeline.regression reproduce --tolerance "$TOLERANCE"
}

step_bench() {
  local args=(--rounds 1 --json "$OUT/5-bench.json")
  if [ "$QUICK" = 1 ]; then args+=(--utterances 16 --visual-utterances 4 --warmup 2)
  else args+=(--utterances 200 --visual-utterances 40); fi
  python benchmarks/extract.py "${args[@]}" --device "$DEVICE"
}

summary() {
  local total=$(( $(date +%s) - check_start ))
  {
    echo
    local gpu
    gpu=$(sed -n 's/^cuda:0 //p' "$OUT/environment.txt" | head -1)
    echo "gpu_check summary: device $DEVICE${gpu:+ ($gpu)}"
    printf '%-3s %-8s %-8s %8s  %s\n' "#" step result seconds "log / note"
    local i=0
    for s in "${STEPS[@]}"; do
      i=$((i + 1))
      printf '%-3s %-8s %-8s %8s  %s\n' "$i" "$s" "${RESULT[$s]:-not run}" "${TOOK[$s]:--}" \
        "$OUT/$i-$s.log${NOTE[$s]:+ (${NOTE[$s]})}"
    done
    echo "total ${total} s; logs in $OUT"
  } | tee "$OUT/summary.txt"
}

i=0
for s in "${STEPS[@]}"; do
  i=$((i + 1))
  log="$OUT/$i-$s.log"
  echo
  echo "=== step $i: $s (log: $log)"
  start=$(date +%s)
  set +e
  (set -e; cd "$SCRATCH"; "step_$s") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  TOOK[$s]=$(( $(date +%s) - start ))
  if [ "$rc" -ne 0 ]; then
    RESULT[$s]=FAIL
    NOTE[$s]="exit status $rc"
    summary
    echo "gpu_check: step $i ($s) FAILED; the scratch copy is kept in $SCRATCH" >&2
    exit 1
  fi
  RESULT[$s]=PASS
done
summary
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "scratch copy kept: $SCRATCH"; else rm -rf "$SCRATCH"; fi
