#!/bin/bash
# ConKD distillation (launch/distill.py, DeepSpeed ZeRO-3) on N nodes x G GPUs: one rank per GPU.
#
#   sbatch slurm/distill.sh --deepspeed ds_configs/zero3.json --config configs/distill_redial.json \
#       output_dir=runs/distill_redial
#   sbatch --nodes=4 slurm/distill.sh --config configs/distill_redial.json output_dir=runs/d4
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/distill.sh \
#       output_dir=runs/distill_cpu                     # CPU-only nodes: 2 gloo ranks per node
#
# Every argument goes to launch/distill.py unchanged: flags first (--deepspeed PATH, default
# ds_configs/zero3.json; --config FILE), then key=value overrides. Submit from the repository
# root (the log directory slurm/logs/ is relative to it). A pre-empted run (SIGUSR1, e.g. the
# time limit below) saves a checkpoint, requeues itself and resumes: use a fixed output_dir.
# Teachers: train them first with slurm/teachers.sh (a missing teacher is trained in this job
# when teachers.auto_train=true, the default).
#
# ------------------------------------------------------------------ resources (change here,
# or on the sbatch command line, which wins). Keep --ntasks-per-node equal to
# --gpus-per-node: one rank per GPU. `##SBATCH` lines are disabled; remove one `#` to use them.
#SBATCH --job-name=conkd-distill
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
# --output: one log per job (stdout and stderr; a requeued run appends to it). Its directory
#   must exist when the job starts (else the job fails with no output): slurm/logs/ is kept in
#   the repository. --signal=B:USR1@300: SIGUSR1 to the batch shell 300 s before the time
#   limit (Slurm checks about once a minute; allow for one step plus a checkpoint save); the
#   shell forwards it to the ranks (slurm/common.sh). --requeue: the job may be requeued.
#   With PreemptMode=REQUEUE, ask the admins for PreemptParameters=send_user_signal, so that
#   a pre-empted job gets SIGUSR1 too, not only a job reaching its time limit.
#
# ------------------------------------------------------------------ environment (export
# before sbatch; sbatch passes the submitting shell's environment to the job):
#   CONKD_ROOT=$PWD            project checkout (default: the directory sbatch ran in)
#   CONKD_VENV=.venv           virtual environment (or CONKD_PYTHON=/path/to/python)
#   CONKD_TASKS_PER_NODE=      ranks per node (default: GPUs per node; without GPUs, the
#                              job's --ntasks-per-node)
#   MASTER_ADDR= MASTER_PORT=  rendezvous (default: first node; 20000 + job id % 40000)
#   OMP_NUM_THREADS=           threads per rank (default: --cpus-per-task)
#   NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=eth0 NCCL_IB_HCA=... NCCL_DEBUG=INFO
#                              site-specific communication settings (default: NCCL's own)
#   TORCH_EXTENSIONS_DIR=      DeepSpeed's compiled ops (default ~/.cache/torch_extensions)
#   HF_HUB_OFFLINE=1           compute nodes without internet (models are local dirs)
#   CONKD_MAX_REQUEUES=20      stop requeueing after this many restarts
# Site modules, if your cluster uses them:
#   module load cuda/12.4
#
# Launcher: srun, one task per GPU; ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
# (conkd_scale/distributed.py maps them). Not the DeepSpeed launcher with a hostfile: srun is
# Slurm's own process starter, so every rank is tracked, signalled (pre-emption), accounted
# and killed by Slurm; --kill-on-bad-exit ends the job when one rank dies; no ssh/pdsh between
# nodes, no hostfile, and on one node no --force_multi/--no_ssh_check workarounds.
source "${CONKD_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
conkd_setup

rc=0
conkd_step -- "$CONKD_PYTHON" -u launch/distill.py "$@" || rc=$?
conkd_finish "$rc"
