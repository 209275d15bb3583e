#!/usr/bin/env bash
# Stop the daemons up.sh started (by their pid files), nothing else.
set -uo pipefail
STATE=${OPTUNE_SLURM_DIR:-/tmp/optune-slurm}
stop() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null; }
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
if [ -f "$STATE/munged.started" ]; then stop /run/munge/munged.pid; rm -f "$STATE/munged.started"; fi
sleep 1
echo "[slurm-down] stopped" >&2
