#!/usr/bin/env bash
# Stop the throw-away SLURM cluster of tests/cluster/start_slurm.sh (by its pid files).
#
#   tests/cluster/stop_slurm.sh
#
# Cancels the jobs still in the queue (so that no job keeps running once slurmd is gone),
# then stops slurmd, slurmctld and munged (unless the two-node cluster still uses it) through
# the pid files the daemons wrote. Only a cluster whose slurm.conf that script wrote is
# touched; it does nothing when none runs.
set -uo pipefail

# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

CONF=/etc/slurm/slurm.conf
MARK="# written by conkd_scale tests/cluster/start_slurm.sh"

if [[ ! -f $CONF ]] || ! grep -qF "$MARK" "$CONF"; then
    log "no test cluster configured here ($CONF not written by start_slurm.sh): nothing to do"
    exit 0
fi

cancel_jobs

stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_munge_if_unused
exit 0
