# Shared by scripts/gpu_check.sh and scripts/gpu_scale.sh (sourced, not run). The caller sets
# ROOT, OUT_DIR, LOG, BUDGET_S and NAME first; this file sets START_S, GPU_STEPS (the
# summary's rows) and, from the command line, DRY_RUN and INSTALL.
#   gpu_parse_args "$@"        # --dry-run, --install (when ALLOW_INSTALL=1), --help
#   say MESSAGE...             # a timestamped line to stderr and $LOG
#   find_python CHECK [CAND...]  # the first Python ($PYTHON, .venv, CAND..., python3) that
#                                # runs CHECK (python code exiting 0)
#   run_step NAME CAP_S LOGFILE CMD...  # CMD under the smaller of CAP_S and the budget left;
#                                # its output to LOGFILE and $LOG; a row in GPU_STEPS; a step
#                                # skipped for want of budget returns SKIP_STATUS (default 0)

START_S=$SECONDS
GPU_STEPS=()
DRY_RUN=0
INSTALL=0
SKIP_STATUS="${SKIP_STATUS:-0}"

gpu_parse_args() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --install)
        if [[ "${ALLOW_INSTALL:-0}" != 1 ]]; then
          echo "unknown argument: $arg (see --help)" >&2
          exit 64
        fi
        INSTALL=1
        ;;
      -h | --help)
        sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
      *)
        echo "unknown argument: $arg (see --help)" >&2
        exit 64
        ;;
    esac
  done
}

say() { echo "[$NAME $((SECONDS - START_S)) s] $*" | tee -a "$LOG" >&2; }

find_python() {
  local check="$1" cand
  shift
  for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" "$@" python3; do
    if [[ -n "$cand" ]] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$check" >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

run_step() {
  local name="$1" cap="$2" logfile="$3"
  shift 3
  local left=$((BUDGET_S - (SECONDS - START_S)))
  local t=$((cap < left ? cap : left))
  if ((DRY_RUN)); then
    say "would run [$name] (timeout ${cap} s or the budget left): $*"
    GPU_STEPS+=("| $name | not run (dry run) | |")
    return 0
  fi
  if ((t < 20)); then
    say "skip [$name]: only ${left} s of the ${BUDGET_S} s budget left"
    GPU_STEPS+=("| $name | skipped: budget | |")
    return "$SKIP_STATUS"
  fi
  say "run [$name] (timeout $t s): $*"
  local t0=$SECONDS rc what
  timeout --signal=INT --kill-after=20 "$t" "$@" 2>&1 | tee -a "$logfile" >>"$LOG"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) what="ok" ;;
    124 | 130 | 137) what="**timed out** (rc $rc)" ;;
    *) what="**failed** (rc $rc)" ;;
  esac
  say "[$name] $what in $((SECONDS - t0)) s"
  GPU_STEPS+=("| $name | $what | $((SECONDS - t0)) s |")
  return "$rc"
}
