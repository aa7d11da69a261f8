#!/usr/bin/env bash
# GPU scale check of the distillation job: a short ConKD run on one GPU in bf16 with a
# ~1 B-parameter student and a larger D (random weights), in at most 8 minutes; records
# tokens/s, model FLOPs utilisation, peak memory, and the planner's prediction of the same run.
#
#   bash scripts/gpu_scale.sh              # outputs under $OUT if set, else runs/gpu_scale/
#   bash scripts/gpu_scale.sh --dry-run    # no GPU needed: the plan, the commands, the budget
#
# Assumptions: a Python whose torch sees a GPU and that has the job's packages (deepspeed,
# transformers, accelerate, sentencepiece, torch_geometric): $PYTHON if set, else the repo's
# .venv/bin/python, else python3. Nothing is downloaded: the corpus is the built-in synthetic
# one, the student and D are random-weight GPT-2s saved first (bench/bench_scale.py's
# helpers), R is trained on the synthetic corpus in seconds.
#
# Sizes (environment): STUDENT_ARCH (default gpt2:layers=20,hidden=2048,heads=16, ~1.0 B),
# TEACHER_ARCH (gpt2:layers=32,hidden=2560,heads=20, ~2.5 B), SEQ_LEN 512, MICRO_BATCH 8,
# STEPS 30, GPU_PEAK_TFLOPS 989 (H100/H200 dense bf16; the MFU's denominator).
# Budget (GPU_SCALE_BUDGET_S, default 470 s): preparing the models <= 150 s, the run the rest.
# Outputs: gpu_scale.md (summary), gpu_scale.json, plan.json, plan.txt, run/ (the job's
# output dir: metrics.jsonl, run_info.json), gpu_scale.log.
# Exit status: 0 done, 1 a step failed or timed out, 2 no usable CUDA Python.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/runs/gpu_scale}"
BUDGET_S="${GPU_SCALE_BUDGET_S:-470}"
STUDENT_ARCH="${STUDENT_ARCH:-gpt2:layers=20,hidden=2048,heads=16}"
TEACHER_ARCH="${TEACHER_ARCH:-gpt2:layers=32,hidden=2560,heads=20}"
SEQ_LEN="${SEQ_LEN:-512}"
MICRO_BATCH="${MICRO_BATCH:-8}"
STEPS="${STEPS:-30}"
GPU_PEAK_TFLOPS="${GPU_PEAK_TFLOPS:-989}"
NAME=gpu_scale
LOG="$OUT_DIR/gpu_scale.log"
SKIP_STATUS=1 # a step skipped for want of budget fails the check
# shellcheck source=scripts/gpu_lib.sh
source "$ROOT/scripts/gpu_lib.sh"
gpu_parse_args "$@"
mkdir -p "$OUT_DIR"
: >"$LOG"
STATUS=0
PKGS='import deepspeed, transformers, accelerate, sentencepiece, torch_geometric'
CUDA_CHECK="import sys, torch; torch.cuda.is_available() or sys.exit(1); $PKGS"

PY="$(find_python "$CUDA_CHECK")"
if [[ -z "$PY" ]]; then
  if ((DRY_RUN)); then
    PY="$(find_python 'import torch, transformers, accelerate')" || PY=python3
    say "dry run without a CUDA Python: planning and showing the commands with $PY"
  else
    say "no CUDA: no Python here (\$PYTHON, .venv, python3) has a torch that sees a GPU and" \
      "the job's packages ($PKGS)"
    exit 2
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
GPU_MEM_GIB="$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 141)' 2>/dev/null | tail -n 1)"
DEVICE_DESC="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)")' 2>/dev/null | tail -n 1)"
say "device: $DEVICE_DESC (${GPU_MEM_GIB} GiB); python $PY; budget $BUDGET_S s"

WORK="$OUT_DIR/models"
DATA="$OUT_DIR/data"
PREP=("$PY" bench/bench_scale.py --prepare-only --dataset synthetic --data-dir "$DATA"
  --work "$WORK" --student-arch "$STUDENT_ARCH" --teacher "$TEACHER_ARCH")
run_step "prepare corpus, tokenizer, random student and D" 150 /dev/null "${PREP[@]}" || STATUS=1

# the planner's prediction of this very run (the same sizes, one GPU, bf16, ZeRO-3)
PLAN=("$PY" -m conkd_scale.plan --student "$STUDENT_ARCH" --teacher "$TEACHER_ARCH"
  --device gpu --gpus-per-node 1 --gpu-mem-gib "$GPU_MEM_GIB" --seq-len "$SEQ_LEN"
  --micro-batch "$MICRO_BATCH" --tflops "$(awk "BEGIN{print $GPU_PEAK_TFLOPS * 0.4}")"
  --json "$OUT_DIR/plan.json")
if [[ -s "$WORK/tokenizer/tokenizer_config.json" ]]; then
  PLAN+=(--vocab "$("$PY" -c "from transformers import AutoTokenizer as A; print(len(A.from_pretrained('$WORK/tokenizer')))" 2>/dev/null | tail -n 1)")
else
  PLAN+=(--vocab 1000)  # the synthetic corpus's order of size (dry run without models)
fi
"${PLAN[@]}" >"$OUT_DIR/plan.txt" 2>>"$LOG"
rc=$?
if ((rc > 1)); then STATUS=1; fi
say "planner (rc $rc): $(grep -E '^  total' "$OUT_DIR/plan.txt")"
cat "$OUT_DIR/plan.txt" >&2

RUN=("$PY" -m deepspeed.launcher.runner --num_gpus 1 launch/distill.py
  --deepspeed ds_configs/zero3.json dataset=synthetic "data_dir=$DATA"
  "student.pretrained=$WORK/student" "teachers.dialog_dir=$WORK/teacher"
  "teachers.rec_dir=$WORK/rec" teachers.rec_overrides=epochs=2 "max_length=$SEQ_LEN"
  "train.micro_batch=$MICRO_BATCH" "train.max_steps=$STEPS" train.warmup_steps=2
  train.log_every=5 train.eval_every=0 train.eval_max_batches=1 train.save_every=0
  train.progress=false loss.gate.eta=0.5 export=false "output_dir=$OUT_DIR/run")
run_step "distil $STEPS steps" 600 /dev/null "${RUN[@]}" || STATUS=1

REPORT=("$PY" bench/bench_scale.py --gpu-report "$OUT_DIR" --peak-tflops "$GPU_PEAK_TFLOPS")
if ((DRY_RUN)); then
  say "would run: ${REPORT[*]}"
else
  "${REPORT[@]}" >>"$LOG" 2>&1 || STATUS=1
  cat "$OUT_DIR/gpu_scale.md" 2>/dev/null
fi
say "done (exit $STATUS)"
exit "$STATUS"
