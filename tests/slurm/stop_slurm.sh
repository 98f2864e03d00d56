#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/start_slurm.sh, by the PIDs recorded in $BASE/run.
# Never kills by process name. Idempotent: a second call (or a call with nothing running) is a no-op.
# Leaves state/logs/DB on disk so the next start is fast (rm -rf $BASE to wipe).
set -uo pipefail
BASE=${SLURM_CI_BASE:-/tmp/metastem-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf

# cancel leftover jobs first (only while slurmctld is reachable)
if [ -s "$BASE/run/slurmctld.pid" ] && scontrol ping 2>/dev/null | grep -q UP; then
    ids=$(squeue -h -o %i 2>/dev/null || true)
    [ -n "$ids" ] && scancel $ids && sleep 2
fi

running() {  # true while PID exists and is not a zombie awaiting reaping by init
    [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

stop_one() {  # stop_one PIDFILE-NAME EXPECTED-COMM
    local f=$BASE/run/$1.pid p
    [ -s "$f" ] || { echo "$1: no pid file"; return 0; }
    p=$(cat "$f")
    if [ ! -d "/proc/$p" ] || [ "$(cat /proc/$p/comm 2>/dev/null)" != "$2" ]; then
        echo "$1: pid $p not running"; rm -f "$f"; return 0
    fi
    local t0=$(date +%s%N)
    kill "$p"
    for _ in $(seq 1 200); do running "$p" || break; sleep 0.1; done
    if running "$p"; then
        echo "$1: pid $p ignored SIGTERM for 20 s, sending SIGKILL"
        kill -KILL "$p"
    fi
    rm -f "$f"
    echo "$1: stopped pid $p ($(( ($(date +%s%N) - t0) / 1000000 )) ms)"
}

stop_one slurmd    slurmd
stop_one slurmctld slurmctld
stop_one slurmdbd  slurmdbd
stop_one mysqld    "$(basename "$(command -v mariadbd || command -v mysqld || echo mariadbd)")"
stop_one munged    munged
rm -f "$BASE/env.sh"   # tests treat a missing env file as "no cluster"
exit 0
