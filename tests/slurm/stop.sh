#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start.sh: each daemon by the PID in its pidfile (SIGTERM, then
# SIGKILL after 20 s), in reverse start order; then remove the node namespaces, the bridge and the node lines in
# /etc/hosts. Safe to run when nothing is running.
set -uo pipefail

BRIDGE=slurmbr0
HOSTS_BEGIN="# BEGIN tests/slurm nodes"
HOSTS_END="# END tests/slurm nodes"

alive() {  # see start.sh: check /proc state, PID 1 here reaps zombies slowly
    local pid=$1 state
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

stop_by_pidfile() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    if alive "$pid"; then
        echo "[slurm-stop] stopping $(basename "$pidfile" .pid) (pid $pid)" >&2
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 80; i++)); do alive "$pid" || break; sleep 0.25; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

for pidfile in /run/slurmd-*.pid /run/slurmd.pid; do stop_by_pidfile "$pidfile"; done
stop_by_pidfile /run/slurmctld.pid
stop_by_pidfile /run/slurmdbd.pid
stop_by_pidfile /run/mysqld/mysqld.pid
stop_by_pidfile /run/munge/munged.pid

# Only the namespaces and links start.sh creates (slurm-nodeK, vnodeK, slurmbr0). A process still inside a
# namespace (a job task) keeps it alive until it ends; deleting the name is still safe.
for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^slurm-node[0-9]+$/ {print $1}'); do
    echo "[slurm-stop] removing netns $ns" >&2
    ip netns del "$ns"
done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
if grep -q "^$HOSTS_BEGIN\$" /etc/hosts 2>/dev/null; then
    tmp=$(mktemp)
    sed "\\|^$HOSTS_BEGIN\$|,\\|^$HOSTS_END\$|d" /etc/hosts >"$tmp" && cat "$tmp" >/etc/hosts
    rm -f "$tmp"
fi
exit 0
