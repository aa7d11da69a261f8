# shellcheck shell=bash
# Shared by slurm/{distill,teachers,sweep}.sh (sourced from "$CONKD_ROOT/slurm/common.sh";
# a batch script runs from a copy in slurmd's spool, so it cannot find this file next to it).
# Not a job script itself. The variables a cluster user may change are documented at the top
# of each job script; the defaults live here:
#
#   CONKD_ROOT            project checkout                    [$SLURM_SUBMIT_DIR]
#   CONKD_VENV            virtual environment                 [$CONKD_ROOT/.venv]
#   CONKD_PYTHON          interpreter                         [$CONKD_VENV/bin/python]
#   CONKD_TASKS_PER_NODE  ranks per node                      [GPUs of the node; without GPUs
#                                                              the job's --ntasks-per-node]
#   MASTER_ADDR           rendezvous host                     [first node of the allocation]
#   MASTER_PORT           rendezvous port                     [20000 + job id % 40000]
#   OMP_NUM_THREADS       threads per rank                    [--cpus-per-task]
#   CONKD_MAX_REQUEUES    stop requeueing after this many     [20]
#   NCCL_* / GLOO_*       see "Communication" below
#
# Launching (one process per GPU): `srun --mpi=none --kill-on-bad-exit=1`. Every rank gets
# its rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and rendezvouses over TCP at
# MASTER_ADDR:MASTER_PORT (conkd_scale/distributed.py, launcher "slurm"). --mpi=none keeps a
# site's MpiDefault=pmix/pmi2 from switching the ranks to MPI discovery (mpi4py), which needs
# an MPI built for that plugin (Debian's Open MPI aborts under pmi2) and is not needed here;
# --kill-on-bad-exit=1 ends the whole step as soon as one rank dies, instead of leaving the
# others blocked in a collective. srun then exits with the code of the ranks it terminated
# (143), so every rank also records its own exit code (CONKD_EXIT_DIR, a folder under
# slurm/logs/ removed after the step) and the step returns the code of the first to fail
# (2 for a bad config, not 143).
#
# Pre-emption: the job scripts ask for `--signal=B:USR1@<s>`, i.e. SIGUSR1 to the batch shell
# only, <s> seconds before the time limit (Slurm checks about once a minute: leave margin).
# The shell traps it and forwards it to the srun step, which forwards it to every rank; each
# rank's trainer saves a checkpoint at the next step boundary and exits with 75
# (conkd_scale/training/preemption.py). The shell then runs `scontrol requeue $SLURM_JOB_ID`
# (the job needs --requeue); the new run resumes from that checkpoint (train.resume=auto).
# Routing through the batch shell (B:) rather than to the steps directly: the shell must know
# that it was pre-empted, to requeue even when a rank dies of the signal before its trainer
# has installed the handler (during start-up), and to not start the next stage of a
# multi-stage job. A signal sent to the steps only (`scancel --signal=USR1 JOBID`) works too:
# the ranks exit with 75 and the shell requeues on that exit code.

# ----------------------------------------------------------------------------- environment
conkd_setup() {
    set -euo pipefail
    CONKD_ROOT=${CONKD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$CONKD_ROOT"
    if [[ ! -f launch/distill.py ]]; then
        echo "error: $CONKD_ROOT is not the conkd_scale checkout: submit from its root" \
            "or set CONKD_ROOT" >&2
        exit 2
    fi
    CONKD_VENV=${CONKD_VENV:-$CONKD_ROOT/.venv}
    CONKD_PYTHON=${CONKD_PYTHON:-$CONKD_VENV/bin/python}
    if [[ ! -x $CONKD_PYTHON ]]; then
        echo "error: no interpreter at $CONKD_PYTHON (set CONKD_VENV or CONKD_PYTHON)" >&2
        exit 2
    fi
    PATH="$(dirname "$CONKD_PYTHON"):$PATH"
    export PATH
    export PYTHONPATH="$CONKD_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1

    # Ranks per node: one per GPU; without GPUs (CPU nodes, gloo) the job's --ntasks-per-node.
    NNODES=${SLURM_JOB_NUM_NODES:-1}
    if [[ -n ${CONKD_TASKS_PER_NODE:-} ]]; then
        TASKS_PER_NODE=$CONKD_TASKS_PER_NODE
    elif ((${SLURM_GPUS_ON_NODE:-0} > 0)); then
        TASKS_PER_NODE=$SLURM_GPUS_ON_NODE
    else
        local tpn=${SLURM_TASKS_PER_NODE:-1}
        TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${tpn%%(*}}
    fi
    NTASKS=$((NNODES * TASKS_PER_NODE))
    CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

    # Rendezvous: rank 0 runs on the first node of the allocation.
    local first_node
    first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | sed -n 1p)
    MASTER_ADDR=${MASTER_ADDR:-$first_node}
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 40000))}
    export MASTER_ADDR MASTER_PORT

    # Threads: one rank per --cpus-per-task cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
    export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}

    # Communication. NCCL on GPUs: warnings only; a rank that fails or times out aborts the
    # collective (and with it the job) instead of hanging. Site-specific, set them here or
    # before sbatch when needed: NCCL_SOCKET_IFNAME=ib0 / GLOO_SOCKET_IFNAME=eth0 (interface
    # between nodes), NCCL_IB_HCA=mlx5, NCCL_IB_DISABLE=1 (no InfiniBand).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

    CONKD_MAX_REQUEUES=${CONKD_MAX_REQUEUES:-20}
    CONKD_SIGNALLED=0
    CONKD_STEP_PID=
    trap _conkd_forward USR1

    echo "[$(date +%FT%T)] job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) run" \
        "$((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "$NNODES node(s) x $TASKS_PER_NODE rank(s), $CPUS_PER_TASK CPU(s)/rank," \
        "GPUs/node ${SLURM_GPUS_ON_NODE:-0}, master $MASTER_ADDR:$MASTER_PORT," \
        "python $CONKD_PYTHON"
}

_conkd_forward() {
    CONKD_SIGNALLED=$((CONKD_SIGNALLED + 1))
    echo "[$(date +%FT%T)] batch shell: SIGUSR1 (pre-emption) -> forwarding to the ranks"
    if [[ -n $CONKD_STEP_PID ]]; then
        kill -USR1 "$CONKD_STEP_PID" 2>/dev/null || true
    fi
}

# ----------------------------------------------------------------------------- one step
# conkd_step [SRUN OPTIONS] -- COMMAND [ARGS]: run COMMAND as one srun step and return its
# exit code. Without options: one rank per GPU (or per task slot) on every node; with
# options (e.g. --nodes=1 --ntasks=1 --cpus-per-task=16), exactly those. srun runs in the
# background so that the shell can handle SIGUSR1 while it waits (bash runs traps only
# between commands).
conkd_step() {
    local -a opts=()
    while (($#)) && [[ $1 != -- ]]; do
        opts+=("$1")
        shift
    done
    shift || true
    if ((CONKD_SIGNALLED)); then
        echo "pre-empted before this step: not starting $*"
        return 75
    fi
    if ((${#opts[@]} == 0)); then
        opts=(--nodes="$NNODES" --ntasks="$NTASKS" --ntasks-per-node="$TASKS_PER_NODE"
            --cpus-per-task="$CPUS_PER_TASK")
    fi
    if ((${SLURM_GPUS_ON_NODE:-0} > 0)); then
        # every rank sees all GPUs of its node and uses LOCAL_RANK (distributed.py)
        opts+=(--gpu-bind=none)
    fi
    # each rank records its exit code here (conkd_scale/launching.py): once one rank has
    # failed, srun terminates the others and reports their 143, not the first rank's code
    CONKD_STEPS=$((${CONKD_STEPS:-0} + 1))
    local exit_dir="$CONKD_ROOT/slurm/logs/.exit-${SLURM_JOB_ID:-$$}-$CONKD_STEPS"
    rm -rf "$exit_dir"
    if mkdir -p "$exit_dir" 2>/dev/null; then
        export CONKD_EXIT_DIR=$exit_dir
    else
        unset CONKD_EXIT_DIR
        exit_dir=
    fi
    echo "[$(date +%FT%T)] srun ${opts[*]} $*"
    srun --mpi=none --kill-on-bad-exit=1 "${opts[@]}" "$@" &
    CONKD_STEP_PID=$!
    local rc signalled_before
    while :; do
        signalled_before=$CONKD_SIGNALLED
        rc=0
        wait "$CONKD_STEP_PID" || rc=$?
        # a trapped signal interrupts `wait` (rc > 128); the step itself goes on: wait again
        if ((rc > 128 && CONKD_SIGNALLED != signalled_before)); then
            continue
        fi
        break
    done
    CONKD_STEP_PID=
    echo "[$(date +%FT%T)] step exited with $rc"
    if ((rc > 128 && rc != 138)) && [[ -n $exit_dir ]]; then
        local first
        first=$(_conkd_first_failure "$exit_dir")
        if [[ -n $first ]]; then
            rc=${first%% *}
            echo "[$(date +%FT%T)] the first rank to fail, ${first#* }, exited with $rc" \
                "(srun then terminated the others): the step's exit code is $rc"
        fi
    fi
    [[ -z $exit_dir ]] || rm -rf "$exit_dir"
    return "$rc"
}

# _conkd_first_failure DIR: "CODE rank R" of the earliest non-zero exit code the ranks
# recorded in DIR (files rank<R>: "CODE UNIXTIME"); nothing if none failed on its own.
_conkd_first_failure() {
    local f code t best_t= best=
    for f in "$1"/rank*; do
        [[ -f $f ]] || continue
        read -r code t <"$f" || continue
        [[ $code =~ ^[0-9]+$ && $code != 0 ]] || continue
        if [[ -z $best_t ]] || awk -v a="$t" -v b="$best_t" 'BEGIN { exit !(a < b) }'; then
            best_t=$t
            best="$code rank ${f##*/rank}"
        fi
    done
    [[ -z $best ]] || echo "$best"
}

# ----------------------------------------------------------------------------- the end
# conkd_finish RC: exit 0 after success; requeue after a pre-emption: RC 75 (the ranks saved
# a checkpoint), 138 (= 128 + SIGUSR1: ranks killed by the signal before their trainer had
# installed its handler) or any failure after the shell itself got SIGUSR1; otherwise fail.
conkd_finish() {
    local rc=$1
    if ((rc == 0)); then
        echo "[$(date +%FT%T)] done"
        exit 0
    fi
    if ((rc == 75 || rc == 138 || CONKD_SIGNALLED)); then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if ((restarts >= CONKD_MAX_REQUEUES)); then
            echo "error: pre-empted, but already requeued $restarts times" \
                "(CONKD_MAX_REQUEUES=$CONKD_MAX_REQUEUES): giving up" >&2
            exit "$rc"
        fi
        echo "[$(date +%FT%T)] pre-empted (exit $rc): requeueing job $SLURM_JOB_ID;" \
            "the next run resumes from the newest checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit to resume" >&2
        exit "$rc"
    fi
    echo "error: step failed with exit code $rc" >&2
    exit "$rc"
}
