#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster (+ Open MPI) on this machine for the launcher
# tests (tests/test_slurm.py, tests/test_mpi.py). Needs root; Debian/Ubuntu (apt).
#
#   tests/cluster/start_slurm.sh      # install if missing, configure, start, wait until idle
#   tests/cluster/stop_slurm.sh       # stop what this script started (by pid files)
#
# Idempotent: if a controller already answers and this node is usable, it does nothing.
# What it does otherwise (facts from ../shared/docs/LOCAL_CLUSTER.md):
#   1. apt-get install munge slurmctld slurmd slurm-client openmpi-bin libopenmpi-dev
#      (Open MPI before slurmd starts, or slurmd cannot load its PMIx plugin);
#   2. writes /etc/slurm/slurm.conf for this host (hostname -s, nproc, RealMemory from
#      `slurmd -C`), one partition `debug`; never overwrites a slurm.conf it did not write;
#   3. starts munged (as user munge), `slurmctld -c` (clean state), then slurmd, and waits
#      until the node is idle (resuming it if it comes up drained/down).
# No systemd is needed: every daemon forks and writes a pid file (stop_slurm.sh uses them).
#
# Environment: SLURM_START_TIMEOUT (seconds to wait for each daemon, default 60).
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

CONF=/etc/slurm/slurm.conf
MARK="# written by conkd_scale tests/cluster/start_slurm.sh"
NODE=$(hostname -s)

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | sed -n 1p; }
ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }

# ---------------------------------------------------------------- already up? do nothing
if command -v scontrol >/dev/null && ctld_up; then
    case "$(node_state)" in
        idle* | mix* | alloc* | comp*)
            log "already up (node $NODE: $(node_state))"
            exit 0
            ;;
    esac
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------- 1. packages
ensure_packages

# ---------------------------------------------------------------- 2. slurm.conf
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
fi
cpus=$(nproc)
mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[[ -n $mem ]] || die "could not read RealMemory from 'slurmd -C'"
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$CONF" <<EOF
$MARK ($(date -u +%FT%TZ))
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
$(slurm_conf_common)
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
log "wrote $CONF (node $NODE, $cpus CPUs, ${mem} MB)"

# ---------------------------------------------------------------- 3. daemons
ensure_munge

if ! ctld_up; then
    slurmctld -c
    wait_for "slurmctld (scontrol ping)" ctld_up
    log "slurmctld up"
fi

if ! { [[ -f /run/slurmd.pid ]] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; }; then
    slurmd
fi

node_ready() {
    case "$(node_state)" in
        idle* | mix* | alloc*) return 0 ;;
        drain* | down* | inval* | fail*)
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            return 1
            ;;
        *) return 1 ;;
    esac
}
wait_for "node $NODE to be idle (sinfo; see /var/log/slurm/slurmd.log)" node_ready
log "up: node $NODE $(node_state), partition debug"
