#!/bin/bash
# The two teachers of a dataset: R (launch/train_rec_teacher.py, one process) then D
# (launch/train_dialog_teacher.py, DeepSpeed, one rank per GPU on every node).
#
#   sbatch slurm/teachers.sh dataset=redial data_dir=../shared/data/redial \
#       --rec --config configs/rec_teacher_redial.json \
#       --dialog --deepspeed ds_configs/zero3.json --config configs/dialog_teacher_redial.json
#   sbatch slurm/teachers.sh                              # synthetic corpus, default configs
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/teachers.sh ...  # CPU
#
# Arguments: key=value overrides for both teachers (before any section; dataset= and
# data_dir= belong here), then `--rec ARGS` for R only and `--dialog ARGS` for D only, each
# section with its flags first, then its key=value overrides. The outputs go where
# launch/distill.py looks for a dataset's teachers by default, so that no teachers.* setting
# is needed there:
#     $CONKD_TEACHERS_DIR/rec      R   (default CONKD_TEACHERS_DIR=runs/teachers/<dataset>)
#     $CONKD_TEACHERS_DIR/dialog   D   (its Hugging Face export in dialog/hf)
# A teacher already trained there is skipped (delete its directory to retrain); D resumes
# from its newest checkpoint after a pre-emption. With dataset=synthetic and no data_dir the
# corpus is generated into runs/data/synthetic first.
#
# ------------------------------------------------------------------ resources (see
# slurm/distill.sh for each line; the sbatch command line wins)
#SBATCH --job-name=conkd-teachers
##SBATCH --partition=gpu
##SBATCH --account=my_account
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#
# ------------------------------------------------------------------ environment: as in
# slurm/distill.sh (CONKD_ROOT, CONKD_VENV, CONKD_TASKS_PER_NODE, MASTER_PORT, NCCL_*, ...),
# plus CONKD_TEACHERS_DIR (above). R trains on one node with all the CPUs of that node's
# ranks (--cpus-per-task x tasks per node).
source "${CONKD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
conkd_setup

common=() rec=() dialog=()
section=common
for a in "$@"; do
    case $a in
        --rec) section=rec ;;
        --dialog) section=dialog ;;
        *) eval "$section+=(\"\$a\")" ;;
    esac
done
dataset=synthetic data_dir=
for a in "${common[@]}"; do
    case $a in
        dataset=*) dataset=${a#dataset=} ;;
        data_dir=*) data_dir=${a#data_dir=} ;;
    esac
done
if [[ $dataset == synthetic && -z $data_dir ]]; then
    data_dir=runs/data/synthetic
    common+=("data_dir=$data_dir")
    if [[ ! -d $data_dir ]]; then
        "$CONKD_PYTHON" -m conkd_scale.data synth --out "$data_dir" --seed 0
    fi
fi
out=${CONKD_TEACHERS_DIR:-runs/teachers/$dataset}
echo "teachers of $dataset ($data_dir) -> $out/rec, $out/dialog"

# trained rec|dialog DIR: the check launch/distill.py makes (conkd_scale/distill/teachers.py)
trained() {
    "$CONKD_PYTHON" -c 'import sys; from conkd_scale.distill import teachers as t
sys.exit(0 if getattr(t, sys.argv[1] + "_trained")(sys.argv[2]) else 1)' "$1" "$2"
}

rc=0
if trained rec "$out/rec"; then
    echo "R: already trained in $out/rec (skipped)"
else
    cpus=$((CPUS_PER_TASK * TASKS_PER_NODE))
    conkd_step --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -- \
        env OMP_NUM_THREADS="$cpus" MKL_NUM_THREADS="$cpus" \
        "$CONKD_PYTHON" -u launch/train_rec_teacher.py "${rec[@]}" "${common[@]}" \
        "output_dir=$out/rec" || rc=$?
    ((rc == 0)) || conkd_finish "$rc"
fi

if trained dialog "$out/dialog"; then
    echo "D: already trained in $out/dialog (skipped)"
else
    conkd_step -- "$CONKD_PYTHON" -u launch/train_dialog_teacher.py "${dialog[@]}" \
        "${common[@]}" "output_dir=$out/dialog" || rc=$?
fi
conkd_finish "$rc"
