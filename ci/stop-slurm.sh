#!/usr/bin/env bash
# ci/stop-slurm.sh - cancel every job and stop the daemons ci/start-slurm.sh started, each by the
# pid in its own pid file (never by name), in the order slurmd (one per node: /run/slurmd-NAME.pid,
# or /run/slurmd.pid from an older start script), slurmctld, slurmdbd, mariadbd, munged. Safe to
# run when nothing is running.
set -u
say() { echo "[stop-slurm] $*" >&2; }
stop() { # stop PIDFILE NAME
  local file=$1 name=$2 pid tries=100
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
    rm -f "$file"       # stale: slurmctld/slurmdbd cannot delete their own pid file in /run
    return 0
  fi
  say "stopping $name ($pid)"
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null && [ "$tries" -gt 0 ]; do sleep 0.1; tries=$((tries - 1)); done
  if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored SIGTERM; killing it"; kill -9 "$pid"; fi
  rm -f "$file"         # a stale slurmctld pid file makes `apt-get remove slurmctld` fail
}
if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG,PD -o %i)" ] && break; sleep 0.2; done
  fi
fi
for pidfile in /run/slurmd.pid /run/slurmd-*.pid; do
  [ -e "$pidfile" ] && stop "$pidfile" slurmd
done
stop /run/slurmctld.pid slurmctld
stop /run/slurmdbd.pid slurmdbd
stop /run/mysqld/mysqld.pid mariadbd
stop /run/munge/munged.pid munged
exit 0
