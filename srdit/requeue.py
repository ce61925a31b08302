"""Slurm requeue: how a training job continues after a time limit or a preemption.

Two cases, both keep the job id that Snakemake's Slurm plugin waits on, so they cost no
Snakemake retry:

- **From inside the job** (`requeue_this_job`): a training segment that stopped early (its time
  budget, or SIGTERM from `--signal`, a preemption's grace period) has written a checkpoint; the
  job then puts itself back in the queue (`scontrol requeue $SLURM_JOB_ID`) and, when it runs
  again, resumes from that checkpoint. Only a job that is still RUNNING does this: a job that
  was cancelled (scancel) or has hit its time limit stays ended.

- **From the workflow** (`PreemptedJobRequeuer`): where the cluster cancels preempted jobs
  (PreemptMode=CANCEL) and one was killed before it could requeue itself (a grace time shorter
  than the checkpoint), Slurm leaves it in state PREEMPTED. snakemake-executor-plugin-slurm
  (2.x, `check_active_jobs`) treats PREEMPTED as "Slurm will resume it" and waits, forever on
  such a cluster. The requeuer, a thread of the login-node snakemake (train.smk's `onstart`),
  requeues this workflow's PREEMPTED jobs (those whose working directory is the workflow's),
  so the plugin sees them pending again and the training resumes from its last checkpoint.
  (CANCELLED, FAILED, TIMEOUT and NODE_FAIL without requeue are reported as failures by the
  plugin: Snakemake's `retries` resubmit them, and the segment resumes from its checkpoint.)
"""
from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import threading
from pathlib import Path

from srdit.runlock import slurm_job_state


def _run(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def requeue_this_job(environ=None) -> tuple[bool, str]:
    """Put the Slurm job this process runs in back into the queue: (done, what happened)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False, "not a Slurm job"
    if shutil.which("scontrol") is None:
        return False, "scontrol is not on PATH"
    state = slurm_job_state(job)
    if state != "RUNNING":
        return False, f"Slurm job {job} is {state or 'unknown to squeue/sacct'}, not RUNNING (cancelled or ended)"
    out = _run(["scontrol", "requeue", job])
    if out is None or out.returncode != 0:
        why = (out.stderr or out.stdout).strip() if out is not None else "scontrol did not answer"
        return False, f"scontrol requeue {job} failed: {why}"
    return True, f"requeued Slurm job {job}"


class PreemptedJobRequeuer(threading.Thread):
    """Every `interval` s, requeue the user's PREEMPTED Slurm jobs whose working directory is
    `workdir` (the workflow's). A daemon thread: it ends with the snakemake process."""

    def __init__(self, workdir: str | Path, interval: float = 60.0, log=print):
        super().__init__(name="srdit-preempted-requeuer", daemon=True)
        self.workdir = os.path.realpath(workdir)
        self.interval, self.log = interval, log
        self.requeued: list[str] = []
        self._warned: set[str] = set()
        self._stop = threading.Event()

    def preempted_jobs(self) -> list[str]:
        try:
            user = getpass.getuser()
        except Exception:
            user = str(os.getuid())
        out = _run(["squeue", "-h", "-u", user, "-t", "PREEMPTED", "-o", "%i|%Z"])
        if out is None or out.returncode != 0:
            return []
        jobs = []
        for line in out.stdout.splitlines():
            job, _, workdir = line.strip().partition("|")
            if job and workdir and os.path.realpath(workdir) == self.workdir:
                jobs.append(job)
        return jobs

    def poll_once(self) -> list[str]:
        done = []
        for job in self.preempted_jobs():
            out = _run(["scontrol", "requeue", job])
            if out is not None and out.returncode == 0:
                done.append(job)
                self.log(f"srdit: Slurm job {job} was preempted and cancelled; requeued it (it resumes "
                         f"from its last checkpoint)")
            elif job not in self._warned:
                self._warned.add(job)
                why = (out.stderr or out.stdout).strip() if out is not None else "scontrol did not answer"
                self.log(f"srdit: Slurm job {job} was preempted and cannot be requeued ({why}); snakemake "
                         f"waits on it forever: stop snakemake, `snakemake --unlock`, and run it again")
        self.requeued += done
        return done

    def run(self) -> None:
        if shutil.which("squeue") is None or shutil.which("scontrol") is None:
            return
        while not self._stop.wait(self.interval):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()


def poll_interval(environ=None) -> float:
    """Seconds between the requeuer's looks at squeue: SRDIT_PREEMPT_POLL_S (tests use 1), else 60."""
    value = (os.environ if environ is None else environ).get("SRDIT_PREEMPT_POLL_S", "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"SRDIT_PREEMPT_POLL_S={value!r}: expected a number of seconds above 0 (default 60)")
    return seconds


def start_for_workflow(workflow) -> PreemptedJobRequeuer | None:
    """Start the requeuer in a login-node snakemake that submits to Slurm (train.smk's `onstart`;
    Snakemake runs no hooks in dry runs nor inside the jobs)."""
    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or plugin.name != "slurm":
        return None
    from snakemake.logging import logger

    requeuer = PreemptedJobRequeuer(Path.cwd(), interval=poll_interval(), log=logger.warning)
    requeuer.start()
    return requeuer
