#!/usr/bin/env bash
# Start a real multi-node SLURM cluster on this one machine for the launch tests (run as root; idempotent).
#
#   bash tests/slurm/start.sh            # 2 compute nodes (node1, node2)
#   SLURM_TEST_NODES=3 bash tests/slurm/start.sh
#
# Each compute node is its own host: a network namespace `slurm-nodeK` holding one end of a veth pair whose other
# end is on the bridge `slurmbr0`, its own address (10.77.0.1K, in a subnet only this script uses; the bridge,
# i.e. the controller, is 10.77.0.1), its own host name (a UTS namespace) and its own `slurmd`. slurmctld, slurmdbd,
# MariaDB and munged run in the machine's own namespaces. The file system is shared, as on a cluster: munge's
# socket, /etc/slurm and /etc/hosts (which gets a `nodeK` line per node, between markers) are seen by every node.
#
# Installs Debian's munge, slurmctld, slurmd, slurm-client, slurmdbd and mariadb-server when missing, writes
# slurm.conf/slurmdbd.conf, starts the daemons by hand (there is no systemd here) and declares the cluster ready
# only after an `srun` over all nodes has run on every node. Re-running it with everything up is a ~2 s no-op; a
# changed config restarts the SLURM daemons (cred_expire needs a restart, not `scontrol reconfigure`).
# Stop everything (daemons, namespaces, bridge, /etc/hosts lines) with tests/slurm/stop.sh.
# Logs: /var/log/slurm/slurmctld.log, slurmdbd.log, slurmd-nodeK.log; /var/log/mysql-test.log.
set -euo pipefail

CLUSTER=localcluster
HOST=$(hostname -s)
NODES=${SLURM_TEST_NODES:-2}
SUBNET=10.77.0        # a /24 used only between the namespaces this script creates
CONTROLLER_ADDR=$SUBNET.1
BRIDGE=slurmbr0
HOSTS_BEGIN="# BEGIN tests/slurm nodes"
HOSTS_END="# END tests/slurm nodes"
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2)
DB_PASS=slurm-test-only  # local-only account on a MariaDB bound to 127.0.0.1

log() { echo "[slurm-start] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"
[[ $NODES =~ ^[1-9]$ ]] || die "SLURM_TEST_NODES must be 1-9, got '$NODES'"

node_name() { echo "node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
netns_of() { echo "slurm-node$1"; }

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
    # Node names resolve to their namespace addresses everywhere (MASTER_ADDR is a node name: see launch/).
    local block tmp
    block=$(for ((k = 1; k <= NODES; k++)); do echo "$(node_addr $k) $(node_name $k)"; done)
    tmp=$(mktemp)
    sed "\\|^$HOSTS_BEGIN\$|,\\|^$HOSTS_END\$|d" /etc/hosts >"$tmp"
    printf '%s\n%s\n%s\n' "$HOSTS_BEGIN" "$block" "$HOSTS_END" >>"$tmp"
    cmp -s "$tmp" /etc/hosts || cat "$tmp" >/etc/hosts  # rewrite in place: /etc/hosts may be a bind mount
    rm -f "$tmp"
}

# The bridge (the controller's side, $CONTROLLER_ADDR) and one namespace per node with a veth into the bridge.
ensure_network() {
    local k ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        if ip -4 route show | grep -q "^$SUBNET\."; then die "$SUBNET.0/24 is already routed here; not touching it"; fi
        ip link add "$BRIDGE" type bridge
        ip addr add "$CONTROLLER_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for ((k = 1; k <= NODES; k++)); do
        ns=$(netns_of $k)
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip link show "vnode$k" >/dev/null 2>&1; then
            ip link add "vnode$k" type veth peer name eth0 netns "$ns"
            ip netns exec "$ns" ip addr add "$(node_addr $k)/24" dev eth0
        fi
        ip link set "vnode$k" master "$BRIDGE" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip link set eth0 up
    done
    for ns in $(ip netns list | awk '$1 ~ /^slurm-node[0-9]+$/ {print $1}'); do  # nodes of a bigger earlier run
        ((${ns#slurm-node} > NODES)) && ip netns del "$ns"
    done
    return 0
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

node_lines() {
    # Hardware as slurmd sees it (every node shares this machine's cores and memory), with RealMemory lowered ~5%
    # so a node is never drained for "low memory". NodeAddr: slurmctld and the other nodes reach it there.
    local line mem k
    line=$(slurmd -C | head -1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    line=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/; s/^NodeName=[^ ]* //" <<<"$line")
    for ((k = 1; k <= NODES; k++)); do
        echo "NodeName=$(node_name $k) NodeAddr=$(node_addr $k) NodeHostname=$(node_name $k) $line State=UNKNOWN"
    done
}

write_configs() {
    local changed=1
    install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/lib/slurm/slurmctld
    for ((k = 1; k <= NODES; k++)); do install -d -m 0755 "/var/lib/slurm/slurmd-$(node_name $k)"; done
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
    # SlurmctldHost gives the bridge address: inside a node's namespace $HOST resolves to that node's loopback.
    # %n: every slurmd has its own pid file, spool and log. LLN (least loaded node): single-node jobs such as
    # array tasks spread over the nodes instead of filling node1 first.
    write_if_changed "$CONF_DIR/slurm.conf" 0644 <<EOF && changed=0
# Written by tests/slurm/start.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST($CONTROLLER_ADDR)
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
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP LLN=YES
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
    local k name
    for ((k = 1; k <= NODES; k++)); do
        name=$(node_name $k)
        alive_by_pidfile "/run/slurmd-$name.pid" && continue
        log "starting slurmd $name in netns $(netns_of $k)"
        # `ip netns exec` gives the node a fresh /sys without the cgroup mounts slurmd needs even with
        # proctrack/linuxproc ("No filesystem mounted on /sys/fs/cgroup"): mount the same hierarchies again.
        # A UTS namespace gives the node its own host name; slurmd daemonizes inside all three namespaces.
        ip netns exec "$(netns_of $k)" sh -c "$(cgroup_mounts) && exec unshare --uts sh -c 'hostname $name && exec slurmd -N $name'"
    done
}

cgroup_mounts() {  # shell commands repeating this machine's mounts under /sys/fs/cgroup, in mount order
    awk '$2 ~ "^/sys/fs/cgroup" {printf "mkdir -p %s && mount -t %s -o %s %s %s && ", $2, $3, $4, $1, $2}' \
        /proc/self/mounts
    echo true
}

stop_slurmds() {
    local pidfile
    stop_daemon /run/slurmd.pid  # the one-node layout of earlier versions
    for pidfile in /run/slurmd-*.pid; do [[ -e $pidfile ]] && stop_daemon "$pidfile"; done
    return 0
}

# `sinfo` can show a stale idle node before slurmd has registered: only a real job step on every node proves
# readiness. The step prints each node's host name, which must be the node's own (the UTS namespace works).
smoke_test() {
    local k names expected
    expected=$(for ((k = 1; k <= NODES; k++)); do node_name $k; done)
    for ((k = 1; k <= NODES; k++)); do  # clear a DOWN/DRAIN left behind
        scontrol update NodeName="$(node_name $k)" State=RESUME >/dev/null 2>&1 || true
    done
    for ((i = 0; i < 30; i++)); do
        names=$(timeout 30 srun -N"$NODES" --ntasks-per-node=1 -t 1 --quiet hostname 2>/dev/null | sort) || true
        [[ $names == "$expected" ]] && return 0
        sleep 1
    done
    sinfo -N -l >&2 || true
    die "srun over $NODES nodes failed (got host names: ${names:-none}); see $LOG_DIR/slurmctld.log and" \
        "$LOG_DIR/slurmd-node*.log"
}

main() {
    install_packages
    ensure_hostname_resolves
    start_munge
    start_mariadb
    ensure_network
    if write_configs; then
        log "config changed: restarting SLURM daemons"
        stop_slurmds
        stop_daemon /run/slurmctld.pid
        stop_daemon /run/slurmdbd.pid
    fi
    start_slurm_daemons
    smoke_test
    log "ready: $(sinfo -h -N -o '%N %t' | sort -u | paste -sd, -)"
}

main "$@"
