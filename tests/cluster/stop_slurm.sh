#!/usr/bin/env bash
# Stop the throw-away SLURM cluster of tests/cluster/start_slurm.sh (by its pid files).
#
#   tests/cluster/stop_slurm.sh
#
# Cancels the jobs still in the queue (so that no job keeps running once slurmd is gone),
# then stops slurmd, slurmctld and munged through the pid files the daemons wrote. Only a
# cluster whose slurm.conf that script wrote is touched; it does nothing when none runs.
set -uo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by conkd_scale tests/cluster/start_slurm.sh"

log() { echo "stop_slurm: $*"; }

if [[ ! -f $CONF ]] || ! grep -qF "$MARK" "$CONF"; then
    log "no test cluster configured here ($CONF not written by start_slurm.sh): nothing to do"
    exit 0
fi

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

stop_pidfile() {  # stop_pidfile NAME FILE
    local name=$1 file=$2 pid
    [[ -f $file ]] || { log "$name: no pid file ($file)"; return 0; }
    pid=$(cat "$file")
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
        log "$name: not running"
        rm -f "$file"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || { log "$name ($pid) stopped"; rm -f "$file"; return 0; }
        sleep 0.5
    done
    log "$name ($pid) did not stop after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    rm -f "$file"
}

stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
exit 0
