#!/usr/bin/env bash
# Install (Debian's packages) and start a single-node Slurm cluster: munge, slurmctld, slurmd.
# Idempotent. Everything the daemons write lives under $OPTUNE_SLURM_DIR (default /tmp/optune-slurm);
# down.sh stops exactly the daemons started here, by their pid files. Needs root (CI runs as root).
set -euo pipefail
STATE=${OPTUNE_SLURM_DIR:-/tmp/optune-slurm}
log() { echo "[slurm-up] $*" >&2; }

if [ "$(id -u)" != 0 ]; then log "not root: cannot install or start Slurm"; exit 1; fi
if sinfo -h -o %t 2>/dev/null | grep -q idle; then log "a cluster is already up"; exit 0; fi

start=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  # nothing may auto-start from the packages' init scripts (no systemd here)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

host=$(hostname -s)
mkdir -p "$STATE"/{spool/ctld,spool/d,state,log}
chown -R slurm:slurm "$STATE"
install -d -o munge -g munge -m 0755 /run/munge
[ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                 chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }

# node resources from slurmd itself; RealMemory a little below what it reports
read -r cpus sockets cores threads mem < <(slurmd -C | awk '/^NodeName/ {
  for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
mem=$(( mem * 9 / 10 ))

mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
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

pgrep -x munged >/dev/null || { runuser -u munge -- munged --pid-file=/run/munge/munged.pid || munged -f;
                                echo started > "$STATE/munged.started"; }
slurmctld -i
slurmd -N "$host"

for _ in $(seq 1 60); do
  if sinfo -h -o %t 2>/dev/null | grep -q idle; then
    log "cluster up in $(( $(date +%s) - start )) s: $(sinfo -h -o '%P %D %c %t')"; exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
log "the node did not become idle"; sinfo >&2 || true; tail -20 "$STATE"/log/*.log >&2 || true; exit 1
