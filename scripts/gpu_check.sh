#!/usr/bin/env bash
# GPU check of the ConKD loss: the GPU tests and the GPU benchmarks on one GPU,
# in at most 8 minutes.
#
#   bash scripts/gpu_check.sh              # outputs under $OUT if set, else runs/gpu_check/
#   bash scripts/gpu_check.sh --dry-run    # print the plan (python found, commands, budgets)
#   bash scripts/gpu_check.sh --install    # if no CUDA torch is found, pip-install one first
#
# Assumptions (a fresh machine with this repository copied in; no internet, except perhaps
# the package registry):
# - A Python with a CUDA build of PyTorch and Triton is there: $PYTHON if set, else the
#   repo's .venv/bin/python, else python3, the first whose torch sees a GPU. (The lent
#   H100/H200 image's python3 has torch 2.11+cu130, triton 3.6, numpy and pytest.)
# - Nothing else is installed and nothing is pip-installed: the loss code, its tests and the
#   benchmarks need only torch, triton, numpy and pytest, and run from this source tree
#   (PYTHONPATH). `pip install -e .` would pull DeepSpeed, mpi4py (a compiler and MPI) and
#   more, which these checks do not use; the tests that need DeepSpeed or transformers skip
#   themselves without them, and the slow (multi-process) tests are left out.
# - With --install and no usable Python: a venv (.venv-gpu) gets `pip install
#   torch==$TORCH_VERSION numpy pytest` (default 2.13.0, the Makefile's pin; the registry's
#   Linux wheel is a CUDA build). That download (GBs) is not counted in the budget below.
#
# Budget (GPU_CHECK_BUDGET_S, default 470 s), each step capped and given no more than what
# is left, in this order: the GPU tests (pytest -m gpu) <= 90 s, bench/bench_loss_gpu.py
# <= 240 s (its own --budget-s stops timing 50 s before), bench/bench_loss.py's GPU rows
# (N = 8192, |U| = 57,181, bf16) <= 90 s, then the other loss tests with their kernels
# compiled on the GPU in what is left (<= 120 s; a timeout there is reported, not failed).
#
# Outputs ($OUT, else runs/gpu_check/): gpu_check.md (summary: device, each step's status and
# time, the benchmark tables and the loss's GPU targets), gpu_check.log (everything),
# tests.log, bench_loss_gpu.json, bench_loss_gpu.md, bench_loss_rows.md.
# Exit status: 0 when every test and correctness check passed (a target not met is reported,
# not an error), 1 otherwise, 2 when no CUDA device is usable.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/runs/gpu_check}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
NAME=gpu_check
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/gpu_check.md"
ALLOW_INSTALL=1
# shellcheck source=scripts/gpu_lib.sh
source "$ROOT/scripts/gpu_lib.sh"
gpu_parse_args "$@"
mkdir -p "$OUT_DIR"
: >"$LOG"
STATUS=0

CUDA_CHECK='import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 1)'

summary() {
  {
    echo "# GPU check of the ConKD loss (scripts/gpu_check.sh)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- command: \`bash scripts/gpu_check.sh $*\`"
    echo "- device: ${DEVICE_DESC:-none}"
    echo "- python: ${PY:-none} (${PY_DESC:-})"
    echo "- budget: ${BUDGET_S} s; took $((SECONDS - START_S)) s; exit status ${STATUS}"
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${GPU_STEPS[@]}"
    for f in tests.log bench_loss_gpu.md bench_loss_rows.md; do
      [[ -s "$OUT_DIR/$f" ]] || continue
      echo
      case "$f" in
        tests.log)
          echo "## Tests (last lines of each pytest run)"
          echo
          echo '```'
          grep -E '(passed|failed|error|skipped|no tests ran)( |,|$)' "$OUT_DIR/$f" | tail -n 6
          grep -E '^(FAILED|ERROR) ' "$OUT_DIR/$f" | head -n 20
          echo '```'
          ;;
        bench_loss_gpu.md) cat "$OUT_DIR/$f" ;;
        bench_loss_rows.md)
          echo "## bench/bench_loss.py, GPU rows"
          cat "$OUT_DIR/$f"
          ;;
      esac
    done
  } >"$SUMMARY"
  say "summary: $SUMMARY"
  cat "$SUMMARY"
}

say "outputs in $OUT_DIR; budget $BUDGET_S s"
PY="$(find_python "$CUDA_CHECK" "$ROOT/.venv-gpu/bin/python")"
if [[ -z "$PY" && "$INSTALL" == 1 && "$DRY_RUN" == 0 ]]; then
  say "no Python with CUDA torch: installing torch==$TORCH_VERSION into .venv-gpu (not timed)"
  python3 -m venv "$ROOT/.venv-gpu" &&
    "$ROOT/.venv-gpu/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy pytest \
      2>&1 | tee -a "$LOG" >&2
  START_S=$SECONDS # the budget covers the checks, not the download
  PY="$(find_python "$CUDA_CHECK" "$ROOT/.venv-gpu/bin/python")"
fi
if [[ -z "$PY" ]]; then
  say "no CUDA: no Python here has a torch that sees a GPU (tried \$PYTHON, .venv, .venv-gpu," \
    "python3). Nothing to check on this machine; see the assumptions at the top of $0."
  if ((DRY_RUN)); then
    PY="$(find_python 'import torch, pytest')" || PY=python3
    say "dry run: checking the CPU-safe parts and showing the plan with $PY"
  else
    STATUS=2
    GPU_STEPS+=("| find a CUDA Python | **no CUDA device** | |")
    summary "$@"
    exit "$STATUS"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # compiled kernels on the GPU
PY_DESC="$("$PY" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")' 2>&1 | tail -n 1)"
if ((DRY_RUN)); then
  # what runs without a GPU: the scripts parse their arguments, pytest selects the tests
  for b in bench/bench_loss_gpu.py bench/bench_loss.py; do
    if "$PY" "$b" --help >/dev/null 2>>"$LOG"; then say "ok: $b --help"; else say "FAILED: $b --help"; fi
  done
  for sel in "gpu" "not gpu and not slow"; do
    n="$("$PY" -m pytest -q --collect-only -p no:cacheprovider -m "$sel" tests/test_loss_*.py \
      2>>"$LOG" | grep -c '::')"
    say "pytest -m '$sel' selects $n loss tests"
  done
else
  DEVICE_DESC="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    "$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
  say "device: $DEVICE_DESC; $PY_DESC"
  nvidia-smi >>"$LOG" 2>&1 || true
fi

TESTS_LOG="$OUT_DIR/tests.log"
: >"$TESTS_LOG"
LOSS_TESTS=(tests/test_loss_*.py)
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

run_step "GPU tests (pytest -m gpu)" 90 "$TESTS_LOG" \
  "${PYTEST[@]}" -m gpu "${LOSS_TESTS[@]}" || STATUS=1

run_step "bench/bench_loss_gpu.py" 240 /dev/null \
  "$PY" bench/bench_loss_gpu.py "$OUT_DIR/bench_loss_gpu.json" --md "$OUT_DIR/bench_loss_gpu.md" \
  --budget-s 190 || STATUS=1

: >"$OUT_DIR/bench_loss_rows.md"
run_step "bench/bench_loss.py --device cuda" 90 /dev/null \
  "$PY" bench/bench_loss.py --device cuda --dtype bf16 --ns 8192 --vs 57181 --repeats 3 \
  --out "$OUT_DIR/bench_loss_rows.md" --note "scripts/gpu_check.sh" || STATUS=1

# the rest of the loss tests (CPU-tested already) with their kernels compiled on the GPU, in
# the time left: a timeout here is reported, a failure fails the check
run_step "loss tests, compiled on the GPU (not gpu, not slow)" 120 "$TESTS_LOG" \
  "${PYTEST[@]}" -m "not gpu and not slow" "${LOSS_TESTS[@]}"
rc=$?
if ((rc != 0 && rc != 124 && rc != 130 && rc != 137)); then STATUS=1; fi

summary "$@"
exit "$STATUS"
