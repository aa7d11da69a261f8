# shellcheck shell=bash
# Shared by the test-cluster scripts in tests/cluster/ (sourced, not run):
#   log / die              messages prefixed with the calling script's name
#   wait_for DESC CMD...   poll CMD once a second for $TIMEOUT seconds, else die naming DESC
#   ensure_packages        munge, SLURM (controller, node daemon, client) and Open MPI
#   ensure_munge           one munged for every cluster on this machine (its socket is a file,
#                          so it serves every network namespace as well)
#   stop_pidfile NAME FILE SIGTERM, then SIGKILL after 15 s, to the pid in FILE
#   stop_munge_if_unused   stop munged unless a test-cluster controller still runs
#   slurm_conf_common      the slurm.conf lines both test clusters share
#   cancel_jobs            cancel every job of the cluster $SLURM_CONF names (if its controller
#                          answers) and wait up to 30 s for them to end
# Facts behind them: ../shared/docs/LOCAL_CLUSTER.md.

TIMEOUT=${SLURM_START_TIMEOUT:-60}
_SCRIPT=$(basename "$0" .sh)
# the controllers' pid files of both test clusters (start_slurm.sh, start_slurm_two_node.sh)
CTLD_PIDFILES=(/run/slurmctld.pid /run/slurmctld-two-node.pid)

log() { echo "$_SCRIPT: $*"; }
die() {
    echo "$_SCRIPT: error: $*" >&2
    exit 1
}

wait_for() { # wait_for DESCRIPTION COMMAND...
    local what=$1
    shift
    for _ in $(seq "$TIMEOUT"); do
        if "$@"; then return 0; fi
        sleep 1
    done
    die "timed out after ${TIMEOUT}s waiting for $what"
}

pid_alive() { # pid_alive FILE: the pid in FILE runs
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

ensure_packages() {
    local -a need=()
    local pair
    for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client \
        mpirun:openmpi-bin mpicc:libopenmpi-dev ip:iproute2 unshare:util-linux; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair##*:}")
    done
    if ((${#need[@]})); then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # all in one transaction: Open MPI (PMIx) is in place before slurmd is ever started
        apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client \
            openmpi-bin libopenmpi-dev iproute2 util-linux >/dev/null
    fi
}

ensure_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged # as root it refuses ("Logfile is insecure")
    wait_for "munged" bash -c 'munge -n | unmunge >/dev/null 2>&1'
    log "munged up"
}

stop_pidfile() { # stop_pidfile NAME FILE
    local name=$1 file=$2 pid
    [[ -f $file ]] || {
        log "$name: no pid file ($file)"
        return 0
    }
    pid=$(cat "$file")
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
        log "$name: not running"
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || {
            log "$name ($pid) stopped"
            rm -f "$file"
            return 0
        }
        sleep 0.5
    done
    log "$name ($pid) did not stop after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    rm -f "$file"
}

stop_munge_if_unused() {
    local f
    for f in "${CTLD_PIDFILES[@]}"; do
        if pid_alive "$f"; then
            log "munged: still used by the controller of $f, left running"
            return 0
        fi
    done
    stop_pidfile munged /run/munge/munged.pid
}

slurm_conf_common() { # the slurm.conf settings of every test cluster
    cat <<'EOF'
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
# a killed or cancelled job's processes get SIGKILL this many seconds after SIGTERM
KillWait=10
# test speed: a requeued job may start again after cred_expire s (default 120), and the
# scheduler looks at pending jobs every few seconds (default 60; backfill 30)
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=5
EOF
}

cancel_jobs() {
    local jobs
    if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; then
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null
            for _ in $(seq 30); do
                [[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && break
                sleep 1
            done
        fi
    fi
}
