#!/usr/bin/env bash
# ci/start-slurm.sh - a real Slurm cluster on localhost for the tests and CI.
#
# Debian 12, as root, no systemd. Installs what is missing (apt), writes /etc/slurm, starts munged,
# (optionally) MariaDB + slurmdbd, slurmctld and one slurmd per node, and waits until the nodes
# take jobs. Running it again while the cluster is up only checks it (and refuses when the settings
# changed: run ci/stop-slurm.sh first). Stop with ci/stop-slurm.sh.
#
# The layout (SLURM_CI_NODES=2, the default):
#   partition debug (default): node `localhost`        - every ordinary job runs here, as before
#   partition multi:           nodes `localhost`, `n2` - multi-node jobs (`sbatch -p multi -N 2`)
# Each node is its own slurmd on this host (`slurmd -N NAME`, own port, pid file, spool and log:
# /run/slurmd-NAME.pid, /var/lib/slurm/slurmd-NAME, /var/log/slurm/slurmd-NAME.log), with the same
# CPUs, memory and fake GPUs. Both share one kernel and file system, so a multi-node job's
# rendezvous goes over 127.0.0.1 (`n2` is not a host name: its NodeAddr is 127.0.0.1).
#
# Environment:
#   SLURM_CI_DBD=1          accounting (MariaDB + slurmdbd) so that `sacct` works; without it the
#                           Snakemake plugin needs `slurm-status-command: squeue`
#   SLURM_CI_CPUS=N         CPUs each node advertises (default: nproc; may exceed it)
#   SLURM_CI_GPUS=N         fake GPUs per node, 0..5 (default 2): --gpus=N / --gres=gpu:N jobs are
#                           accepted; a job sees CUDA_VISIBLE_DEVICES but torch finds no CUDA device
#   SLURM_CI_GPU_TYPE=name  GRES type of the fake GPUs (e.g. h100) so --gpus=h100:1 works
#   SLURM_CI_NODES=N        nodes, 1..4 (default 2); 1 gives the one-node cluster without `multi`
#
# What mattered (see the notes this follows): fake GPUs need File= with one character device
# each, or slurmd drops them and drains the node; DefMemPerCPU, or jobs without --mem run one at
# a time; MinJobAge >= 120 s for squeue-based status; slurmd -N NAME so that the node name
# does not depend on the hostname; never start a second slurmd/slurmctld for the same node (it
# kills the first).
set -euo pipefail

dbd=${SLURM_CI_DBD:-0}
cpus=${SLURM_CI_CPUS:-$(nproc)}
gpus=${SLURM_CI_GPUS:-2}
gpu_type=${SLURM_CI_GPU_TYPE:-}
nodes=${SLURM_CI_NODES:-2}
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
case "$nodes" in 1|2|3|4) ;; *) say "SLURM_CI_NODES=$nodes: 1 to 4 nodes"; exit 1 ;; esac
# node i is `localhost` (i = 1) or `n<i>`, its slurmd listening on port 6818 + 10 (i - 1)
node_names=(localhost); for i in $(seq 2 "$nodes"); do node_names+=("n$i"); done

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
node_gres=""; gres_types=""; gres_conf=""; taskprolog=""
if [ "$gpus" -gt 0 ]; then
  devices=(/dev/null /dev/zero /dev/full /dev/urandom /dev/random)
  files=$(IFS=,; echo "${devices[*]:0:$gpus}")
  # no NodeName=: the line holds for every slurmd reading this file, i.e. every node
  gres_conf="AutoDetect=off
Name=gpu ${gpu_type:+Type=$gpu_type }Count=$gpus File=$files"
  node_gres="Gres=gpu:${gpu_type:+$gpu_type:}$gpus"
  gres_types="GresTypes=gpu
TaskProlog=/etc/slurm/srdit-taskprolog.sh"
fi
# The fake GPUs are no CUDA devices: a job that gets some sees CUDA_VISIBLE_DEVICES, but torch finds
# none, and `srdit train` stops on that mismatch (it would waste a real GPU job). This cluster says
# so to every task, as a site with CPU-only nodes would: SRDIT_DEVICE=cpu (train on the CPU, one
# process per allocated GPU), unless the job set SRDIT_DEVICE itself (e.g. `auto` to see the error).
if [ "$gpus" -gt 0 ]; then
  taskprolog='#!/bin/sh
# written by ci/start-slurm.sh: the GPUs of this cluster are fake; srdit trains on the CPU
[ -n "${SRDIT_DEVICE+x}" ] || echo "export SRDIT_DEVICE=cpu"'
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
# `localhost` goes last: while the node table holds just one node called localhost, Slurm's node
# lookup returns it for ANY name, and the next NodeName line would fail with "Duplicated
# NodeHostName n2".
node_lines=""
for i in $(seq $((nodes - 1)) -1 0); do
  node_lines+="NodeName=${node_names[$i]} NodeAddr=127.0.0.1 Port=$((6818 + 10 * i)) CPUs=$cpus RealMemory=$memory $node_gres State=UNKNOWN
"
done
# `urgent` (a higher priority tier on localhost) preempts jobs of the other partitions, which are
# then cancelled at once (PreemptMode=CANCEL, no grace time): the case where a training job is
# killed before it can requeue itself (tests/test_slurm_restart.py). No other test submits there,
# and partitions of one tier never preempt each other.
partitions="PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=urgent Nodes=localhost PriorityTier=10 MaxTime=INFINITE State=UP"
if [ "$nodes" -gt 1 ]; then
  partitions+="
PartitionName=multi Nodes=$(IFS=,; echo "${node_names[*]}") MaxTime=INFINITE State=UP"
fi
slurm_conf="# written by srdit's ci/start-slurm.sh: $nodes node(s) on localhost
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
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldPort=6817
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MinJobAge=300
KillWait=5
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
$accounting
$gres_types
${node_lines}$partitions"

if running /run/slurmctld.pid slurmctld || running /run/slurmd.pid slurmd; then
  # a running cluster keeps its configuration: only check that it is the one asked for
  if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$slurm_conf" ] \
     || [ "$(cat /etc/slurm/gres.conf 2>/dev/null)" != "$gres_conf" ]; then
    say "a cluster with other settings is running (/etc/slurm/slurm.conf differs, or it was started by an"
    say "older ci/start-slurm.sh); run ci/stop-slurm.sh first, then this script again"
    exit 1
  fi
else
  printf '%s\n' "$slurm_conf" > /etc/slurm/slurm.conf
  rm -f /etc/slurm/srdit-taskprolog.sh
  if [ -n "$taskprolog" ]; then
    printf '%s\n' "$taskprolog" > /etc/slurm/srdit-taskprolog.sh
    chmod 0755 /etc/slurm/srdit-taskprolog.sh
  fi
  if [ -n "$gres_conf" ]; then printf '%s\n' "$gres_conf" > /etc/slurm/gres.conf; else rm -f /etc/slurm/gres.conf; fi
fi

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

# ---- controller and nodes -------------------------------------------------------------------
if ! running /run/slurmctld.pid slurmctld; then
  # an empty queue every start
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd /var/lib/slurm/slurmd-*
  say "starting slurmctld"
  /usr/sbin/slurmctld
fi
retry 30 sh -c 'scontrol ping | grep -q UP' || { say "slurmctld is not up, see /var/log/slurm/slurmctld.log"; exit 1; }
for name in "${node_names[@]}"; do
  if ! running "/run/slurmd-$name.pid" slurmd; then
    install -d -o root -g root -m 0755 "/var/lib/slurm/slurmd-$name"
    say "starting slurmd for node $name"
    /usr/sbin/slurmd -N "$name"
  fi
done
node_takes_jobs() {   # node_takes_jobs NAME
  case "$(sinfo -h -N -n "$1" -o %T | head -n 1)" in
    idle|mixed|allocated) return 0 ;;
    drain*) scontrol update nodename="$1" state=resume ;;   # left over from an earlier config
  esac
  return 1
}
for name in "${node_names[@]}"; do
  retry 30 node_takes_jobs "$name" || { say "node $name not ready: $(sinfo -h -N -o '%N %T %E')"; exit 1; }
done
say "up: partition debug (localhost)${partitions:+$([ "$nodes" -gt 1 ] && echo ", multi (${node_names[*]})")}, cpus=$cpus, memory=${memory}M per node, gpus=$gpus${gpu_type:+ ($gpu_type)} per node, accounting=$dbd"
