#!/bin/bash
# Scaling study: one distillation per student size, as a job array (array index -> preset).
#
#   sbatch slurm/sweep.sh --config configs/distill_redial.json dataset=redial \
#       data_dir=../shared/data/redial
#   CONKD_SWEEP_PRESETS="tiny mini small" sbatch --array=0-2 slurm/sweep.sh ...
#   sbatch --array=3 slurm/sweep.sh ...              # rerun one size (here: medium)
#
# Array task i distils student.preset=${CONKD_SWEEP_PRESETS[i]} (sizes: conkd_scale/models/
# presets.py) into $CONKD_SWEEP_DIR/student_<preset>, with the same teachers and settings;
# the --array range must index CONKD_SWEEP_PRESETS (default: 6 presets, --array=0-5). Every
# argument goes to launch/distill.py as in slurm/distill.sh (flags first, then key=value);
# the sweep appends student.preset=, output_dir= and teachers.auto_train=false (train the
# teachers first with slurm/teachers.sh: concurrent array tasks must not each train them).
# Each array task is its own job (own log, pre-emption and requeue, resume from its dir).
#
# Manifest mode (what launch/scaling_study.py --launcher slurm submits): with
# CONKD_SWEEP_MANIFEST=FILE (JSON lines, one job each: its launch/cache_teachers.py,
# launch/distill.py and launch/evaluate.py arguments), array task i runs line i: the teacher
# cache (only the first line of each teacher pair has it), then the distillation on every rank
# of the allocation (each skipped when the line has none), then the evaluation as one process.
# Arguments given to sweep.sh itself are ignored in this mode. The study submits the runs that
# train a missing teacher or build a missing cache first and the rest with --dependency=afterok:<that job>
# --kill-on-invalid-dep=yes, so that the rest is cancelled, not left pending, if it fails.
#
# ------------------------------------------------------------------ resources per array task
# (see slurm/distill.sh for each line; the sbatch command line wins). %A: array job id, %a:
# array index. Add e.g. --array=0-5%2 to run at most two sizes at a time.
#SBATCH --job-name=conkd-sweep
##SBATCH --partition=gpu
##SBATCH --account=my_account
#SBATCH --array=0-5
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#
# ------------------------------------------------------------------ environment: as in
# slurm/distill.sh (CONKD_ROOT, CONKD_VENV, CONKD_TASKS_PER_NODE, MASTER_PORT, NCCL_*, ...),
# plus:
#   CONKD_SWEEP_PRESETS="tiny mini small medium base large"   student presets, array order
#   CONKD_SWEEP_DIR=runs/sweep                                 one output dir per preset
source "${CONKD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
conkd_setup

index=${SLURM_ARRAY_TASK_ID:-0}
if [[ -n ${CONKD_SWEEP_MANIFEST:-} ]]; then
    manifest_part() {
        "$CONKD_PYTHON" -m conkd_scale.scaling.manifest "$CONKD_SWEEP_MANIFEST" "$index" "$1"
    }
    cargs_text=$(manifest_part cache) || exit 2
    dargs_text=$(manifest_part distill) || exit 2
    eargs_text=$(manifest_part evaluate) || exit 2
    cargs=() dargs=() eargs=()
    [[ -n $cargs_text ]] && mapfile -t cargs <<<"$cargs_text"
    [[ -n $dargs_text ]] && mapfile -t dargs <<<"$dargs_text"
    [[ -n $eargs_text ]] && mapfile -t eargs <<<"$eargs_text"
    echo "sweep task $index of $CONKD_SWEEP_MANIFEST: ${#cargs[@]} cache args," \
        "${#dargs[@]} distill args, ${#eargs[@]} evaluate args"
    rc=0
    if ((${#cargs[@]})); then # the teacher cache this and later tasks read
        conkd_step -- "$CONKD_PYTHON" -u launch/cache_teachers.py "${cargs[@]}" || rc=$?
    fi
    if ((rc == 0 && ${#dargs[@]})); then
        conkd_step -- "$CONKD_PYTHON" -u launch/distill.py "${dargs[@]}" || rc=$?
    fi
    if ((rc == 0 && ${#eargs[@]})); then
        conkd_step --nodes=1 --ntasks=1 --cpus-per-task="$CPUS_PER_TASK" -- \
            "$CONKD_PYTHON" -u launch/evaluate.py "${eargs[@]}" || rc=$?
    fi
    conkd_finish "$rc" # exits
fi

read -r -a presets <<<"${CONKD_SWEEP_PRESETS:-tiny mini small medium base large}"
if ((index < 0 || index >= ${#presets[@]})); then
    echo "error: array index $index outside CONKD_SWEEP_PRESETS (${presets[*]}," \
        "indices 0-$((${#presets[@]} - 1))): fix --array" >&2
    exit 2
fi
preset=${presets[$index]}
out=${CONKD_SWEEP_DIR:-runs/sweep}/student_$preset
echo "sweep task $index: student.preset=$preset -> $out"

rc=0
conkd_step -- "$CONKD_PYTHON" -u launch/distill.py "$@" "student.preset=$preset" \
    "output_dir=$out" "teachers.auto_train=false" || rc=$?
conkd_finish "$rc"
