#!/usr/bin/env bash
# Start a throw-away two-node SLURM cluster on this machine, each node a host of its own, for
# tests/test_slurm_two_node.py. Needs root, network namespaces and a bridge; Debian/Ubuntu.
#
#   tests/cluster/start_slurm_two_node.sh   # configure, start, wait until both nodes are idle
#   tests/cluster/stop_slurm_two_node.sh    # stop it and remove the namespaces and links
#   SLURM_CONF=/etc/slurm-two-node/slurm.conf sbatch --nodes=2 ...   # use it
#
# Idempotent: if its controller answers and both nodes are usable, it does nothing.
# Layout (independent of the single-node cluster of start_slurm.sh, which may run beside it):
#   conkd-br0   a bridge in this namespace, $NET.1/24: the controller's address
#   conkd-n1    network namespace, eth0 = $NET.11, host name conkd-n1, its own slurmd
#   conkd-n2    network namespace, eth0 = $NET.12, host name conkd-n2, its own slurmd
#   slurmctld   in this namespace, port 6917, config /etc/slurm-two-node/slurm.conf
# Each slurmd runs in the node's network namespace (nsenter --net) with its own host name and
# mount namespace (unshare --uts --mount), where /etc/netns/NODE/hosts is bound over /etc/hosts
# (as ip-netns(8) does; `ip netns exec` itself would also remount /sys without the cgroup
# mounts slurmd needs); that file names both nodes and the controller. So the job's processes
# on a node see that node's name and address, and MASTER_ADDR (the first node's name) resolves
# to its address on both nodes. The file system, /dev/shm and munged's socket are shared, as
# on a cluster with a shared disk.
#
# Environment: CONKD_TWO_NODE_NET (the private /24 to use, default 10.213.77; it must be unused
# on this machine), SLURM_START_TIMEOUT (seconds to wait for each daemon, default 60).
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

NET=${CONKD_TWO_NODE_NET:-10.213.77}
NODES=(conkd-n1 conkd-n2)
BRIDGE=conkd-br0
DIR=/etc/slurm-two-node
CONF=$DIR/slurm.conf
MARK="# written by conkd_scale tests/cluster/start_slurm_two_node.sh"
CTLD_PID=/run/slurmctld-two-node.pid
export SLURM_CONF=$CONF

node_addr() { echo "$NET.$((11 + $1))"; } # node_addr INDEX
ctld_up() { [[ -f $CONF ]] && scontrol ping 2>/dev/null | grep -q "is UP"; }
states() { sinfo -h -o '%D %T' 2>/dev/null | paste -sd, -; }
nodes_ready() { # both nodes idle/mixed/allocated; resume a node that came up drained or down
    local node state ok=0
    for node in "${NODES[@]}"; do
        state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null | sed -n 1p)
        case $state in
            idle* | mix* | alloc*) ;;
            drain* | down* | inval* | fail*)
                scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                ok=1
                ;;
            *) ok=1 ;;
        esac
    done
    return "$ok"
}

# ---------------------------------------------------------------- already up? do nothing
if command -v scontrol >/dev/null && ctld_up && nodes_ready; then
    log "already up (nodes ${NODES[*]}: $(states))"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (it creates network namespaces and starts daemons)"
[[ $NET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
    die "CONKD_TWO_NODE_NET=$NET: give the first three octets of a private /24, e.g. 10.213.77"

# ---------------------------------------------------------------- 1. packages
ensure_packages

# ---------------------------------------------------------------- 2. network: two hosts
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    if ip -4 addr show | grep -q "inet $NET\." || [[ -n $(ip -4 route show "$NET.0/24") ]]; then
        die "$NET.0/24 is already used on this machine; choose another with CONKD_TWO_NODE_NET"
    fi
    ip link add "$BRIDGE" type bridge ||
        die "cannot create bridge $BRIDGE (needs root and the kernel's bridge support)"
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
fi
ctl_host=$(hostname -s)
for i in "${!NODES[@]}"; do
    node=${NODES[$i]}
    addr=$(node_addr "$i")
    if ! ip netns list | grep -qw "$node"; then
        ip netns add "$node" || die "cannot create network namespace $node (ip netns add)"
    fi
    if ! ip link show "veth-$node" >/dev/null 2>&1; then
        ip link add "veth-$node" type veth peer name eth0 netns "$node"
        ip link set "veth-$node" master "$BRIDGE" up
        ip -n "$node" addr add "$addr/24" dev eth0
        ip -n "$node" link set eth0 up
        ip -n "$node" link set lo up
    fi
    install -d -m 0755 "/etc/netns/$node"
    {
        echo "127.0.0.1 localhost"
        echo "$NET.1 $ctl_host"
        for j in "${!NODES[@]}"; do echo "$(node_addr "$j") ${NODES[$j]}"; done
    } >"/etc/netns/$node/hosts"
done
log "network: $BRIDGE $NET.1/24; $(for i in "${!NODES[@]}"; do
    printf '%s=%s ' "${NODES[$i]}" "$(node_addr "$i")"
done)"

# ---------------------------------------------------------------- 3. slurm.conf
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
fi
cpus=$(nproc)
mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[[ -n $mem ]] || die "could not read RealMemory from 'slurmd -C'"
install -d -m 0755 "$DIR" /var/spool/slurmctld-two-node /var/log/slurm
cat >"$CONF" <<EOF
$MARK ($(date -u +%FT%TZ))
ClusterName=ci2
SlurmctldHost=$ctl_host($NET.1)
SlurmctldPort=6917
SlurmdPort=6818
$(slurm_conf_common)
StateSaveLocation=/var/spool/slurmctld-two-node
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld-two-node.log
# one slurmd per node on this machine: %n is the node's name
SlurmdSpoolDir=/var/spool/slurmd-two-node/%n
SlurmdPidFile=/run/slurmd-two-node-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-two-node-%n.log
NodeName=DEFAULT CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
NodeName=${NODES[0]} NodeAddr=$(node_addr 0)
NodeName=${NODES[1]} NodeAddr=$(node_addr 1)
PartitionName=two Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
log "wrote $CONF (nodes ${NODES[*]}, $cpus CPUs and ${mem} MB each)"

# ---------------------------------------------------------------- 4. daemons
ensure_munge

if ! ctld_up; then
    if pid_alive "$CTLD_PID"; then
        stop_pidfile slurmctld "$CTLD_PID" # running but not answering: start afresh
    fi
    slurmctld -c -f "$CONF"
    wait_for "slurmctld (SLURM_CONF=$CONF scontrol ping)" ctld_up
    log "slurmctld up ($NET.1:6917)"
fi

for node in "${NODES[@]}"; do
    if pid_alive "/run/slurmd-two-node-$node.pid"; then
        continue
    fi
    install -d -m 0755 "/var/spool/slurmd-two-node/$node"
    # the node's network stack, its own host name and /etc/hosts; slurmd forks into the
    # background and keeps all three
    # shellcheck disable=SC2016  # $1 and $2 expand in the inner shell
    nsenter --net="/run/netns/$node" -- unshare --uts --mount -- sh -c \
        'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec slurmd -f "$2"' \
        slurmd "$node" "$CONF" ||
        die "slurmd on $node did not start (see /var/log/slurm/slurmd-two-node-$node.log)"
done
wait_for "nodes ${NODES[*]} to be idle (see /var/log/slurm/slurmd-two-node-*.log)" nodes_ready

# ---------------------------------------------------------------- 5. check: one task per host
# shellcheck disable=SC2016  # expands on each node
got=$(timeout 60 srun --nodes=2 --ntasks-per-node=1 --mpi=none bash -c \
    'echo "$(hostname) $(hostname -I | tr -d " ")"' | sort | paste -sd' ' -) ||
    die "a 2-node srun failed (see /var/log/slurm/slurmd-two-node-*.log)"
want="${NODES[0]} $(node_addr 0) ${NODES[1]} $(node_addr 1)"
[[ $got == "$want" ]] || die "srun on both nodes answered '$got', expected '$want'"
log "up: ${NODES[*]} ($(states)), partition two; SLURM_CONF=$CONF"
