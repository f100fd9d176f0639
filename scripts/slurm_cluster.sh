#!/usr/bin/env bash
# A real one-host Slurm for the launch tests: munge, slurmctld and two slurmd daemons posing as nodes
# n1 and n2 (facts and pitfalls: ../shared/notes/slurm-one-machine.md). Needs root and apt-get.
#   scripts/slurm_cluster.sh start    install if needed, configure, start, wait until both nodes are idle
#   scripts/slurm_cluster.sh stop     stop the daemons (state stays under $STATE for inspection)
#   scripts/slurm_cluster.sh status   exit 0 if the cluster answers with two nodes
set -euo pipefail
STATE=${TESSERA_SLURM_STATE:-/tmp/tessera-slurm}
CONF=/etc/slurm/slurm.conf

why_not() {
    [ "$(id -u)" = 0 ] || { echo "not root (Slurm's daemons and packages need root)"; return; }
    command -v slurmctld >/dev/null || command -v apt-get >/dev/null || { echo "no slurmctld and no apt-get to install it"; return; }
    echo ""
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
}

configure() {
    local host cpus mem
    host=$(hostname)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # each virtual node gets half
    mkdir -p "$STATE"/{spool,state,log} /etc/slurm
    cat > "$CONF" <<CONF
# Written by tessera scripts/slurm_cluster.sh: a test cluster of two virtual nodes on $host.
ClusterName=tessera
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6821 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=6822 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    grep -qE '^127\.0\.0\.1.*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
}

start() {
    local reason
    reason=$(why_not)
    [ -z "$reason" ] || { echo "slurm_cluster: cannot start: $reason" >&2; exit 1; }
    status >/dev/null 2>&1 && { echo "slurm_cluster: already running"; return; }
    install
    configure
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    setsid /usr/sbin/slurmctld -D -i >"$STATE/log/slurmctld.out" 2>&1 < /dev/null &
    for node in n1 n2; do
        setsid /usr/sbin/slurmd -D -N "$node" >"$STATE/log/slurmd-$node.out" 2>&1 < /dev/null &
    done
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]; then
            echo "slurm_cluster: nodes n1, n2 idle (state under $STATE)"
            return
        fi
        sleep 0.5
    done
    echo "slurm_cluster: the nodes did not come up; see $STATE/log" >&2
    exit 1
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    for _ in $(seq 1 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.25; done
    echo "slurm_cluster: stopped"
}

status() {
    [ "$(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    why-not) why_not ;;
    *) echo "usage: $0 start|stop|status|why-not" >&2; exit 2 ;;
esac
