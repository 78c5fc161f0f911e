#!/usr/bin/env bash
# Install and start a single-node SLURM (slurm-wlm + munge) for the batch-mode tests.
#
# Idempotent: re-running it on a machine where SLURM already answers does nothing
# but wait for the node to be usable.  Needs root (CI runs as root).  The recipe is
# the one in ../shared/FACTS.md ("SLURM for dask-jobqueue").
#
# Usage: .ci/setup-slurm.sh            (exit 0 once `sinfo` shows the node usable)
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-slurm: must run as root (it installs packages and starts daemons)" >&2
    exit 77
fi

host="$(hostname -s)"
conf=/etc/slurm/slurm.conf

_node_ready() {
    # The node is usable when sinfo reports it idle, mixed or allocated.
    local state
    state="$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle* | mix* | alloc*) return 0 ;;
        *) return 1 ;;
    esac
}

if command -v sinfo >/dev/null 2>&1 && [ -f "$conf" ] && _node_ready; then
    exit 0
fi

# 1. Packages.
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. Munge key (1024 random bytes, munge:munge, 0400) and the munge daemon.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

# 3. slurm.conf for this host (rewritten only when it changes).
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
tmp="$(mktemp)"
cat >"$tmp" <<CONF
# Single-node SLURM written by apdask .ci/setup-slurm.sh (see ../shared/FACTS.md).
ClusterName=apdask
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
if ! cmp -s "$tmp" "$conf"; then
    install -m 0644 "$tmp" "$conf"
    changed=1
fi
rm -f "$tmp"
[ -f /etc/slurm/cgroup.conf ] || : >/etc/slurm/cgroup.conf

# 4. Daemons: start what is not running; reconfigure a running controller.
if scontrol ping 2>/dev/null | grep -q "is UP"; then
    [ "$changed" -eq 0 ] || scontrol reconfigure
else
    slurmctld
fi
if ! [ -f /run/slurmd.pid ] || ! kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; then
    slurmd
fi

# 5. Wait for the node.
for _ in $(seq 120); do
    if _node_ready; then
        exit 0
    fi
    state="$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n1 || true)"
    case "$state" in
        down* | drain* | fail*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
echo "setup-slurm: node $host not usable after 60 s; see /var/log/slurm/slurmctld.log" >&2
sinfo -N -l >&2 || true
exit 1
