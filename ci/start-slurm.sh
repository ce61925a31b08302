#!/usr/bin/env bash
# ci/start-slurm.sh - a real one-node Slurm cluster on localhost for the tests and CI.
#
# Debian 12, as root, no systemd. Installs what is missing (apt), writes /etc/slurm, starts munged,
# (optionally) MariaDB + slurmdbd, slurmctld and slurmd, and waits until the node takes jobs.
# Running it again while the cluster is up only checks it. Stop with ci/stop-slurm.sh.
#
# Environment:
#   SLURM_CI_DBD=1          accounting (MariaDB + slurmdbd) so that `sacct` works; without it the
#                           Snakemake plugin needs `slurm-status-command: squeue`
#   SLURM_CI_CPUS=N         CPUs the node advertises (default: nproc; may exceed it)
#   SLURM_CI_GPUS=N         fake GPUs, 0..5 (default 2): --gpus=N / --gres=gpu:N jobs are accepted;
#                           a job sees CUDA_VISIBLE_DEVICES but torch finds no CUDA device
#   SLURM_CI_GPU_TYPE=name  GRES type of the fake GPUs (e.g. h100) so --gpus=h100:1 works
#
# What mattered (see the notes this follows): fake GPUs need File= with one character device
# each, or slurmd drops them and drains the node; DefMemPerCPU, or jobs without --mem run one at
# a time; MinJobAge >= 120 s for squeue-based status; slurmd -N localhost so that the node name
# does not depend on the hostname; never start a second slurmd/slurmctld (it kills the first).
set -euo pipefail

dbd=${SLURM_CI_DBD:-0}
cpus=${SLURM_CI_CPUS:-$(nproc)}
gpus=${SLURM_CI_GPUS:-2}
gpu_type=${SLURM_CI_GPU_TYPE:-}
say() { echo "[start-slurm] $*" >&2; }
# running PIDFILE NAME: the pid in PIDFILE is a live process called NAME
running() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }
# retry SECONDS CMD...: run CMD every 0.2 s until it succeeds, at most SECONDS
retry() {
  local tries=$(( $1 * 5 )); shift
  until "$@" >/dev/null 2>&1; do
    tries=$(( tries - 1 )); [ "$tries" -gt 0 ] || return 1; sleep 0.2
  done
}

if [ "$(id -u)" != 0 ]; then say "must run as root"; exit 1; fi
if [ "$gpus" -gt 5 ]; then say "SLURM_CI_GPUS=$gpus: at most 5 fake GPUs (one character device each)"; exit 1; fi

# ---- packages (never `apt-get install slurm`: that is an unrelated network monitor) ----------
wanted=(slurmctld slurmd slurm-client munge)
[ "$dbd" = 1 ] && wanted+=(slurmdbd mariadb-server)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- configuration (any Slurm command fails before slurm.conf exists) -----------------------
mkdir -p /etc/slurm
memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
node_gres=""; gres_types=""
rm -f /etc/slurm/gres.conf
if [ "$gpus" -gt 0 ]; then
  devices=(/dev/null /dev/zero /dev/full /dev/urandom /dev/random)
  files=$(IFS=,; echo "${devices[*]:0:$gpus}")
  echo "AutoDetect=off" > /etc/slurm/gres.conf
  echo "Name=gpu ${gpu_type:+Type=$gpu_type }Count=$gpus File=$files" >> /etc/slurm/gres.conf
  node_gres="Gres=gpu:${gpu_type:+$gpu_type:}$gpus"
  gres_types="GresTypes=gpu"
fi
if [ "$dbd" = 1 ]; then
  # gres/gpu in the TRES list: sacct's AllocTRES then shows the GPUs each job got
  accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
else
  accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat > /etc/slurm/slurm.conf <<EOF
# written by srdit's ci/start-slurm.sh: one node on localhost
ClusterName=srditci
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MinJobAge=300
KillWait=5
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
$accounting
$gres_types
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory $node_gres State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# ---- munge ----------------------------------------------------------------------------------
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0600 /etc/munge/munge.key
fi
running /run/munge/munged.pid munged || { say "starting munged"; runuser -u munge -- /usr/sbin/munged; }
retry 10 sh -c 'munge -n | unmunge' || { say "munge does not work"; exit 1; }

# ---- accounting -----------------------------------------------------------------------------
if [ "$dbd" = 1 ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  mkdir -p /var/log/slurm
  if ! running /run/mysqld/mysqld.pid mariadbd; then
    say "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >>/var/log/slurm/mariadb.log 2>&1 &
  fi
  retry 30 mariadb -e 'select 1' || { say "mariadb did not start, see /var/log/slurm/mariadb.log"; exit 1; }
  if ! running /run/slurmdbd.pid slurmdbd; then
    # a fresh accounting database each start, so sacct never mixes runs that reuse job ids
    mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'srditci';
      ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'srditci';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=srditci
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 0600 /etc/slurm/slurmdbd.conf
    say "starting slurmdbd"
    /usr/sbin/slurmdbd
  fi
  retry 30 sacctmgr -n list cluster || { say "slurmdbd did not start, see /var/log/slurm/slurmdbd.log"; exit 1; }
fi

# ---- controller and node --------------------------------------------------------------------
if ! running /run/slurmctld.pid slurmctld; then
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*     # an empty queue every start
  say "starting slurmctld"
  /usr/sbin/slurmctld
fi
retry 30 sh -c 'scontrol ping | grep -q UP' || { say "slurmctld is not up, see /var/log/slurm/slurmctld.log"; exit 1; }
running /run/slurmd.pid slurmd || { say "starting slurmd"; /usr/sbin/slurmd -N localhost; }
node_takes_jobs() {
  case "$(sinfo -h -n localhost -o %T)" in
    idle|mixed|allocated) return 0 ;;
    drain*) scontrol update nodename=localhost state=resume ;;   # left over from an earlier config
  esac
  return 1
}
retry 30 node_takes_jobs || { say "node not ready: $(sinfo -h -N -o '%T %E')"; exit 1; }
say "up: partition debug, cpus=$cpus, memory=${memory}M, gpus=$gpus${gpu_type:+ ($gpu_type)}, accounting=$dbd"
