#!/bin/bash
# The offline teacher cache (launch/cache_teachers.py): D sharded with ZeRO-3 inference over
# N nodes x G GPUs (one rank per GPU, as in slurm/distill.sh) and R run once over the training
# and validation sequences; each rank writes its own shards into teachers.cache_dir.
#
#   sbatch slurm/cache.sh --config configs/distill_redial.json \
#       teachers.cache_dir=runs/cache/redial
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/cache.sh \
#       teachers.cache_dir=runs/cache/synthetic                # CPU-only nodes (gloo)
#
# Every argument goes to launch/cache_teachers.py unchanged: flags first (--deepspeed PATH,
# default ds_configs/zero3_inference.json: D's inference config; --config FILE: the
# distillation job's own config), then key=value overrides. Then distil with the same
# config and teachers.mode=offline (slurm/distill.sh, --dependency=afterok:<this job>); the
# students never load D. A pre-empted or killed job, run again (or requeued), keeps the
# shards it wrote and computes the rest. Submit from the repository root.
#
# ------------------------------------------------------------------ resources (see
# slurm/distill.sh for each line; the sbatch command line wins)
#SBATCH --job-name=conkd-cache
##SBATCH --partition=gpu
##SBATCH --account=my_account
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# --signal=B:USR1@120: the ranks stop after the round of shards they are writing (exit 75)
# and the job requeues itself (slurm/common.sh); a round is one shard per rank.
#
# ------------------------------------------------------------------ environment: as in
# slurm/distill.sh (CONKD_ROOT, CONKD_VENV/CONKD_PYTHON, CONKD_TASKS_PER_NODE, MASTER_ADDR,
# MASTER_PORT, OMP_NUM_THREADS, NCCL_*/GLOO_*, TORCH_EXTENSIONS_DIR, HF_HUB_OFFLINE=1,
# CONKD_MAX_REQUEUES; defaults in slurm/common.sh).
source "${CONKD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
conkd_setup

rc=0
conkd_step -- "$CONKD_PYTHON" -u launch/cache_teachers.py "$@" || rc=$?
conkd_finish "$rc"
