#!/usr/bin/env bash
# Stop the two-node test cluster of tests/cluster/start_slurm_two_node.sh and remove what it
# made on this machine.
#
#   tests/cluster/stop_slurm_two_node.sh
#
# Cancels the jobs still in its queue, stops both slurmd and the controller by their pid
# files, kills any process still inside the nodes' network namespaces (a job's orphans,
# reported by pid and command), deletes the namespaces (and with them the veth links), the
# bridge and /etc/netns/NODE; stops munged unless the single-node cluster still uses it.
# The configuration in /etc/slurm-two-node is kept. Does nothing when none was started.
set -uo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

NODES=(conkd-n1 conkd-n2)
BRIDGE=conkd-br0
CONF=/etc/slurm-two-node/slurm.conf
MARK="# written by conkd_scale tests/cluster/start_slurm_two_node.sh"
export SLURM_CONF=$CONF

if [[ ! -f $CONF ]] || ! grep -qF "$MARK" "$CONF"; then
    log "no two-node test cluster configured here ($CONF not written by" \
        "start_slurm_two_node.sh): nothing to do"
    exit 0
fi

cancel_jobs

for node in "${NODES[@]}"; do
    stop_pidfile "slurmd ($node)" "/run/slurmd-two-node-$node.pid"
done
stop_pidfile slurmctld /run/slurmctld-two-node.pid

for node in "${NODES[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "$node"; then
        for pid in $(ip netns pids "$node" 2>/dev/null); do
            log "killing pid $pid left in $node: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
            kill -KILL "$pid" 2>/dev/null
        done
        ip netns del "$node" && log "removed namespace $node"
    fi
    ip link del "veth-$node" 2>/dev/null
    rm -rf "/etc/netns/$node"
done
rmdir /etc/netns 2>/dev/null
if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE" && log "removed bridge $BRIDGE"
fi
stop_munge_if_unused
exit 0
