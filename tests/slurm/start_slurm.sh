#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on localhost for metastem's tests (tests/test_slurm.py).
# Debian 12 / Ubuntu 22.04+ (apt), run as root. Used by .ci/run; on a laptop:
#
#   sudo tests/slurm/start_slurm.sh && source /tmp/metastem-slurm/env.sh && make test PYTEST_ARGS="-m slurm"
#   sudo tests/slurm/stop_slurm.sh
#
# Idempotent: components whose recorded PID is alive are left alone, so a second call costs ~1 s.
#
#   SLURM_CI_BASE        state/log/pid/config dir   (default /tmp/metastem-slurm)
#   SLURM_CI_ACCOUNTING  1 = slurmdbd + MariaDB, sacct works (default; the tests read sacct)
#                        0 = accounting_storage/none, sacct does NOT work;
#                            snakemake must then use --slurm-status-command squeue
#   SLURM_CI_NO_INSTALL  1 = never call apt-get (fail if a package is missing)
#
# Writes outside $SLURM_CI_BASE: apt packages (if missing) and the symlink
# /etc/slurm/slurm.conf -> $SLURM_CI_BASE/etc/slurm.conf. The symlink is
# needed because snakemake-executor-plugin-slurm-jobstep strips every SLURM_*
# variable (SLURM_CONF included) before it calls `srun` inside the job.
set -euo pipefail

BASE=${SLURM_CI_BASE:-/tmp/metastem-slurm}
ACCT=${SLURM_CI_ACCOUNTING:-1}
NODE=$(hostname -s)
CLUSTER=localci
DB_PORT=13306
MUNGE_SOCK=$BASE/munge/munge.socket.2
T0=$(date +%s%N)

log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start_slurm %d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }

# alive NAME COMM: true if $BASE/run/NAME.pid holds a live process named COMM
alive() {
    local f=$BASE/run/$1.pid p
    [ -s "$f" ] || return 1
    p=$(cat "$f")
    [ -d "/proc/$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ]
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local t=$1 what=$2; shift 2
    local end=$(( $(date +%s) + t ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$end" ]; then
            echo "start_slurm: timed out waiting for $what" >&2
            tail -n 20 "$BASE"/log/*.log >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

die() { echo "start_slurm: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (daemons run as root; packages are installed with apt-get)"

# ---- 1. packages ----------------------------------------------------------
pkgs=(slurmctld slurmd slurm-client munge)
[ "$ACCT" = 1 ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${SLURM_CI_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${missing[*]} (SLURM_CI_NO_INSTALL=1)"
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install SLURM + munge by hand"
    echo "[start_slurm] installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
log "packages ok"

# MariaDB >= 10.5 ships mariadbd / mariadb-install-db; older releases mysqld / mysql_install_db
DB_SERVER=$(command -v mariadbd || command -v mysqld || true)
DB_INSTALL=$(command -v mariadb-install-db || command -v mysql_install_db || true)
DB_ADMIN=$(command -v mariadb-admin || command -v mysqladmin || true)
DB_CLIENT=$(command -v mariadb || command -v mysql || true)
DB_COMM=$(basename "${DB_SERVER:-mariadbd}")

# a controller not started from $BASE already on the port would make every later step confusing
if ! alive slurmctld slurmctld && (exec 3<>/dev/tcp/127.0.0.1/6817) 2>/dev/null; then
    die "port 6817 is in use by a slurmctld not started from $BASE; stop it first, or set SLURM_CI_BASE to its base"
fi

# ---- 2. directories and config -------------------------------------------
mkdir -p "$BASE"/{etc,run,log,munge,state/ctld,state/d}
chmod 755 "$BASE/munge"       # munged: socket dir must be o+x
if [ ! -s "$BASE/munge/munge.key" ]; then
    if [ -s /etc/munge/munge.key ]; then
        cp /etc/munge/munge.key "$BASE/munge/munge.key"
    else
        dd if=/dev/urandom of="$BASE/munge/munge.key" bs=128 count=1 status=none
    fi
fi
chmod 400 "$BASE/munge/munge.key"

# node hardware as slurmd sees it; advertise ~85% of the memory
hw=$(slurmd -C | head -n1)
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(( mem * 85 / 100 ))
hw=$(sed -e "s/RealMemory=[0-9]*/RealMemory=$mem/" -e "s/^NodeName=[^ ]*/NodeName=$NODE/" <<<"$hw")

if [ "$ACCT" = 1 ]; then
    acct_conf="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# munge socket for the slurmdbd connection (munged is not on its default socket)
AccountingStoragePass=$MUNGE_SOCK
# keep the job comment (the plugin writes rule_<name>_wildcards_<...> there) visible to sacct
AccountingStoreFlags=job_comment"
else
    acct_conf="AccountingStorageType=accounting_storage/none"
fi

cat > "$BASE/etc/slurm.conf.new" <<EOF
# single-node SLURM for CI -- generated by start_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
# keep finished jobs visible to squeue for 10 min (plugin's squeue mode needs
# MinJobAge >= 3 * init_seconds_before_status_checks)
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
$acct_conf
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
$hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$BASE/etc/slurm.conf.new" "$BASE/etc/slurm.conf"; then
    mv "$BASE/etc/slurm.conf.new" "$BASE/etc/slurm.conf"; conf_changed=1
else
    rm -f "$BASE/etc/slurm.conf.new"
fi
mkdir -p /etc/slurm
ln -sfn "$BASE/etc/slurm.conf" /etc/slurm/slurm.conf
export SLURM_CONF=$BASE/etc/slurm.conf
log "config written (changed=$conf_changed)"

# ---- 3. munged ------------------------------------------------------------
if ! alive munged munged; then
    munged --socket="$MUNGE_SOCK" --key-file="$BASE/munge/munge.key" \
           --pid-file="$BASE/run/munged.pid" --log-file="$BASE/log/munged.log" \
           --seed-file="$BASE/munge/munged.seed" --num-threads=10
    wait_for 20 munged bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'"
fi
log "munged up (pid $(cat "$BASE/run/munged.pid"))"

# ---- 4. accounting: MariaDB + slurmdbd -----------------------------------
if [ "$ACCT" = 1 ]; then
    cat > "$BASE/etc/my.cnf" <<EOF
[mysqld]
datadir=$BASE/mysql
socket=$BASE/run/mysqld.sock
pid-file=$BASE/run/mysqld.pid
log-error=$BASE/log/mysqld.log
bind-address=127.0.0.1
port=$DB_PORT
user=root
skip-name-resolve
innodb_buffer_pool_size=128M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
EOF
    if [ ! -d "$BASE/mysql/mysql" ]; then
        "$DB_INSTALL" --no-defaults --datadir="$BASE/mysql" --user=root \
            --auth-root-authentication-method=normal --skip-test-db > "$BASE/log/mysql-install.log" 2>&1
    fi
    if ! alive mysqld "$DB_COMM"; then
        nohup "$DB_SERVER" --defaults-file="$BASE/etc/my.cnf" >/dev/null 2>&1 &
        wait_for 60 mariadb "$DB_ADMIN" --no-defaults --socket="$BASE/run/mysqld.sock" ping
        wait_for 10 mysqld.pid test -s "$BASE/run/mysqld.pid"
    fi
    "$DB_CLIENT" --no-defaults --socket="$BASE/run/mysqld.sock" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    log "mariadb up (pid $(cat "$BASE/run/mysqld.pid"))"

    cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$BASE/etc/slurmdbd.conf"
    if ! alive slurmdbd slurmdbd; then
        slurmdbd          # finds slurmdbd.conf next to $SLURM_CONF
        wait_for 60 slurmdbd sacctmgr -n list cluster
    fi
    log "slurmdbd up (pid $(cat "$BASE/run/slurmdbd.pid"))"
fi

# ---- 5. slurmctld + slurmd -----------------------------------------------
if ! alive slurmctld slurmctld; then
    slurmctld
    wait_for 30 slurmctld bash -c "scontrol ping | grep -q UP"
elif [ "$conf_changed" = 1 ]; then
    scontrol reconfigure
fi
log "slurmctld up (pid $(cat "$BASE/run/slurmctld.pid"))"

if ! alive slurmd slurmd; then
    slurmd -N "$NODE"
fi
# a node left DOWN/DRAIN by an unclean stop is put back into service
state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
case "$state" in down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME || true ;; esac
wait_for 60 "node $NODE idle" bash -c "sinfo -h -n '$NODE' -o %T | grep -Eq '^(idle|mixed|allocated)'"
log "slurmd up (pid $(cat "$BASE/run/slurmd.pid")), node $(sinfo -h -n "$NODE" -o %T)"

if [ "$ACCT" = 1 ]; then
    wait_for 30 "cluster registration in slurmdbd" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
fi
# what a shell or a test needs to talk to this cluster
cat > "$BASE/env.sh" <<EOF
export SLURM_CONF=$BASE/etc/slurm.conf
export METASTEM_SLURM=1
export METASTEM_SLURM_BASE=$BASE
EOF
log "cluster ready ($(sinfo -h -o '%P: %D node, %c cpus, %m MB' | head -n1)); source $BASE/env.sh"
