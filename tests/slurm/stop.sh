#!/usr/bin/env bash
# Stop the one-node test cluster started by tests/slurm/start.sh: each daemon by the PID in its pidfile
# (SIGTERM, then SIGKILL after 20 s), in reverse start order. Safe to run when nothing is running.
set -uo pipefail

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

stop_by_pidfile /run/slurmd.pid
stop_by_pidfile /run/slurmctld.pid
stop_by_pidfile /run/slurmdbd.pid
stop_by_pidfile /run/mysqld/mysqld.pid
stop_by_pidfile /run/munge/munged.pid
exit 0
