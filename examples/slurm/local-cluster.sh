#!/usr/bin/env bash
# A 2-node SLURM cluster on this one machine, for trying the loop under SLURM and for the tests:
#
#   bash examples/slurm/local-cluster.sh start DIR    # munged, slurmctld, slurmd n1 and n2; all state under DIR
#   export SLURM_CONF=DIR/slurm.conf                   # point sbatch, srun, sinfo at it
#   bash examples/slurm/local-cluster.sh stop DIR      # cancel its jobs, stop its daemons by their pid files
#
# Debian's slurm-wlm is built with multiple-slurmd support: two slurmd on one host, each its own NodeName and
# port, both reached at 127.0.0.1. Its own munged (own key and socket), so it never touches a system one.
# Needs root (SlurmUser=root) and examples/slurm/install.sh's packages. CPUS: CPUs per node (default 1).
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$dir" ] && { [ "$cmd" = start ] || [ "$cmd" = stop ]; } || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
export SLURM_CONF=$dir/slurm.conf

running() {  # running PID: alive and not a zombie (an exited daemon waits for init to reap it)
    local state; state=$(ps -o stat= -p "$1" 2> /dev/null) && [[ $state != Z* ]]
}

stop_pid_file() {  # stop_pid_file FILE: TERM the daemon it names, wait up to 20 s, then KILL
    [ -f "$1" ] || return 0
    local pid; pid=$(cat "$1")
    if [ -n "$pid" ] && kill "$pid" 2> /dev/null; then
        for _ in $(seq 100); do running "$pid" || break; sleep 0.2; done
        kill -9 "$pid" 2> /dev/null || true
    fi
    rm -f "$1"
}

if [ "$cmd" = stop ]; then
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2> /dev/null; then
        scancel --full --quiet --partition=debug 2> /dev/null || true   # a job left by a failed test, its steps
        for _ in $(seq 60); do [ -z "$(squeue -h 2> /dev/null)" ] && break; sleep 0.5; done
    fi
    for f in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do stop_pid_file "$f"; done
    exit 0
fi

ports=($("${PYTHON:-python3}" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))'))
host=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool"
[ -f "$dir/munge.key" ] || { mungekey -c -k "$dir/munge.key"; chmod 600 "$dir/munge.key"; }
cat > "$SLURM_CONF" <<CONF
ClusterName=sppo-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[1]} CPUs=${CPUS:-1} State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[2]} CPUs=${CPUS:-1} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
slurmctld -i
slurmd -N n1
slurmd -N n2
# Ready when both nodes have registered (idle).
for _ in $(seq 120); do
    [ "$(sinfo -h -N -o '%N %t' 2> /dev/null | grep -c ' idle$')" = 2 ] && { echo "local-cluster: n1, n2 idle; export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.5
done
echo "local-cluster: the nodes did not come up in 60 s; see $dir/*.log" >&2
sinfo -N >&2 || true
exit 1
