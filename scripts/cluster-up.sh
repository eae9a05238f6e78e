#!/usr/bin/env bash
# Starts a single-node Slurm cluster on this machine (munged, slurmctld, slurmd, two fake
# GPUs as gres) for the Slurm end-to-end tests, installing `slurm-wlm` and `munge` from the
# distribution's packages when they are missing. Idempotent: a running, idle cluster is left
# as it is. Needs root and apt-get. Prints one line; exits non-zero when it cannot.
# The configuration is the one REFERENCE.md ("Slurm on one machine") measured to work in
# containers without systemd or a usable cgroup tree.
set -uo pipefail

say() { echo "cluster-up: $*"; }
fail() { say "$*"; exit 1; }

t0=$(date +%s.%N)
[ "$(id -u)" = 0 ] || fail "needs root to install and start Slurm (not root: skipped)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/cluster-up-apt.log 2>&1; then
        apt-get update -q >>/tmp/cluster-up-apt.log 2>&1 \
            && apt-get install -y -q --no-install-recommends slurm-wlm munge >>/tmp/cluster-up-apt.log 2>&1 \
            || fail "installing slurm-wlm and munge failed (see /tmp/cluster-up-apt.log)"
    fi
fi

host=$(hostname -s)
running() { pgrep -x "$1" >/dev/null 2>&1; }

# munge: a key and the daemon, running as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key 2>/dev/null
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null
if ! running munged; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munge does not authenticate (munge -n | unmunge)"

# Fake GPUs: character devices slurmd can hand out as gres.
for i in 0 1; do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done

# The node as slurmd sees it (memory less a margin so slurmd never finds it smaller). At least
# 4 CPU slots (config_overrides lets slurmd accept more than the machine has), so that the
# two fake GPUs, not the CPUs, are what limits 1-GPU jobs in the tests.
cpus=$(nproc)
[ "$cpus" -ge 4 ] || cpus=4
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
conf=$(cat <<CONF
# Written by scripts/cluster-up.sh: a single-node cluster for the Slurm e2e tests.
ClusterName=slider
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
gres="Name=gpu File=/dev/fakegpu[0-1]"
changed=0
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" >/etc/slurm/slurm.conf.new && mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
    changed=1
fi
if [ "$(cat /etc/slurm/gres.conf 2>/dev/null)" != "$gres" ]; then
    printf '%s\n' "$gres" >/etc/slurm/gres.conf.new && mv /etc/slurm/gres.conf.new /etc/slurm/gres.conf
    changed=1
fi

if [ "$changed" = 1 ] && running slurmctld; then
    scontrol reconfigure >/dev/null 2>&1
fi
running slurmctld || slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
running slurmd || slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"

state=""
for _ in $(seq 150); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n1)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*|fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mixed|allocated) ;;
    *) fail "node $host is '${state:-not listed}' after 30 s (see /var/log/slurm/slurmd.log)" ;;
esac
t1=$(date +%s.%N)
say "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s: Slurm $(sinfo -V | cut -d' ' -f2) node $host ($cpus CPUs, 2 fake GPUs) is $state"
