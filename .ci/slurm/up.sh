#!/usr/bin/env bash
# Install (Debian's packages) and start a single-node Slurm cluster: munge, slurmctld, slurmd.
# Idempotent: a daemon whose pid file names a live process is left alone; a second run with the
# cluster up only waits for the node to be idle. Everything the daemons write lives under
# $OPTUNE_SLURM_DIR (default /tmp/optune-slurm, owned by the slurm user); down.sh stops exactly the
# daemons started here, by their pid files. Needs root (CI runs as root on a fresh Debian 12).
set -euo pipefail
STATE=${OPTUNE_SLURM_DIR:-/tmp/optune-slurm}
log() { echo "[slurm-up] $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$(id -u)" != 0 ]; then log "not root: cannot install or start Slurm"; exit 1; fi
start=$(date +%s)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
   || ! command -v munged >/dev/null; then
  # nothing may auto-start from the packages' init scripts (no systemd here)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  log "installed slurmctld slurmd slurm-client munge in $(( $(date +%s) - start )) s"
fi

host=$(hostname -s)
getent hosts "$host" >/dev/null || { log "hostname $host does not resolve (slurmd needs it)"; exit 1; }
mkdir -p "$STATE"/{spool/ctld,spool/d,state,log}
chown -R slurm:slurm "$STATE"
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi

# node resources from slurmd itself; RealMemory a little below what it reports
read -r cpus sockets cores threads mem < <(slurmd -C | awk '/^NodeName/ {
  for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
mem=$(( mem * 9 / 10 ))

mkdir -p /etc/slurm
conf=$(mktemp)
cat > "$conf" <<CONF
# written by .ci/slurm/up.sh: a single-node cluster for CI
ClusterName=optune-ci
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=300
NodeName=$host CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then install -m 0644 "$conf" /etc/slurm/slurm.conf; fi
rm -f "$conf"

if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged
  echo started > "$STATE/munged.started"      # down.sh stops munged only when it was started here
fi
alive "$STATE/slurmctld.pid" || slurmctld -i
alive "$STATE/slurmd.pid" || slurmd -N "$host"

for _ in $(seq 1 60); do
  if timeout 10 sinfo -h -o %t 2>/dev/null | grep -qxE 'idle|mix|alloc|comp'; then
    log "cluster up in $(( $(date +%s) - start )) s: $(sinfo -h -o '%P nodes=%D cpus=%c %t')"; exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
log "the node did not become idle"; sinfo >&2 || true; tail -20 "$STATE"/log/*.log >&2 || true; exit 1
