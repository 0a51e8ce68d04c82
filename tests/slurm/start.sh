#!/usr/bin/env bash
# Start a real one-node SLURM cluster on localhost for the launch tests (run as root; idempotent).
#
# Installs Debian's munge, slurmctld, slurmd, slurm-client, slurmdbd and mariadb-server when missing, writes
# slurm.conf/slurmdbd.conf for this machine, starts the daemons by hand (there is no systemd here) and declares the
# cluster ready only after an `srun` smoke test passes. Re-running it with everything up is a ~1 s no-op; a changed
# config restarts the SLURM daemons (cred_expire needs a restart, not `scontrol reconfigure`).
# Stop everything with tests/slurm/stop.sh. Logs: /var/log/slurm/*.log, /var/log/mysql-test.log.
set -euo pipefail

CLUSTER=localcluster
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DB_PASS=slurm-test-only  # local-only account on a MariaDB bound to 127.0.0.1

log() { echo "[slurm-start] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"

# A process is alive if /proc/PID/stat exists and is not a zombie (PID 1 here reaps slowly, so `kill -0` lies).
alive() {
    local pid=$1 state
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}
pid_of() { [[ -s $1 ]] && tr -dc '0-9' <"$1" || true; }
alive_by_pidfile() { alive "$(pid_of "$1")"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for ((i = 0; i < seconds * 4; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    die "timed out after ${seconds}s waiting for $what"
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_hostname_resolves() {
    getent hosts "$HOST" >/dev/null || echo "127.0.1.1 $HOST" >>/etc/hosts
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    alive_by_pidfile /run/munge/munged.pid && return 0
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    wait_for 10 "munge" sh -c 'munge -n | unmunge'
}

start_mariadb() {
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if ! alive_by_pidfile /run/mysqld/mysqld.pid; then
        log "starting mariadbd"
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        setsid -f mariadbd --user=mysql --bind-address=127.0.0.1 --datadir=/var/lib/mysql \
            --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
            --log-error=/var/log/mysql-test.log </dev/null >/dev/null 2>&1
        wait_for 60 "mariadb" mariadb -e 'SELECT 1'
    fi
    mariadb <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

# Write FILE from stdin only when the content differs; return 0 (true) when it changed.
write_if_changed() {
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
    mv -f "$tmp" "$file"
}

node_line() {
    # Hardware as slurmd sees it, with RealMemory lowered ~5% so the node is never drained for "low memory".
    local line mem
    line=$(slurmd -C | head -1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/; s/NodeName=[^ ]*/NodeName=$HOST/" <<<"$line"
}

write_configs() {
    local changed=1
    install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
    write_if_changed "$CONF_DIR/slurmdbd.conf" 0600 <<EOF && changed=0
# Written by tests/slurm/start.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    # proctrack/linuxproc + task/none: no cgroups on this machine kind. CR_Core (not CR_Core_Memory), so jobs
    # without --mem still run side by side. cred_expire=10: a requeued job restarts in seconds, not ~150 s.
    write_if_changed "$CONF_DIR/slurm.conf" 0644 <<EOF && changed=0
# Written by tests/slurm/start.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
SchedulerType=sched/backfill
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$(node_line) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    return $changed
}

stop_daemon() {  # stop_daemon PIDFILE
    local pid
    pid=$(pid_of "$1")
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do alive "$pid" || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
}

start_slurm_daemons() {
    if ! alive_by_pidfile /run/slurmdbd.pid; then
        log "starting slurmdbd"
        slurmdbd
        wait_for 30 "slurmdbd" sacctmgr -n show cluster
    fi
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true  # already there on a warm start
    if ! alive_by_pidfile /run/slurmctld.pid; then
        log "starting slurmctld"
        slurmctld
        wait_for 30 "slurmctld" scontrol ping
    fi
    if ! alive_by_pidfile /run/slurmd.pid; then
        log "starting slurmd"
        slurmd
    fi
}

# `sinfo` can show a stale idle node before slurmd has registered: only a real job step proves readiness.
smoke_test() {
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true  # clear a DOWN/DRAIN left behind
    for ((i = 0; i < 30; i++)); do
        if timeout 30 srun -N1 -n1 -t 1 --quiet true >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    sinfo -N -l >&2 || true
    die "srun smoke test failed; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

main() {
    install_packages
    ensure_hostname_resolves
    start_munge
    start_mariadb
    if write_configs; then
        log "config changed: restarting SLURM daemons"
        stop_daemon /run/slurmd.pid
        stop_daemon /run/slurmctld.pid
        stop_daemon /run/slurmdbd.pid
    fi
    start_slurm_daemons
    smoke_test
    log "ready: $(sinfo -h -o '%P %a %D %t %C')"
}

main "$@"
