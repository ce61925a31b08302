"""`srdit train-job`: one training job of the workflow, around its launcher command.

    srdit train-job --run-dir DIR --output SNAPSHOT --log LOG [--no-requeue] -- LAUNCHER ... train ...

The workflow's train_segment rule runs the trainer through this wrapper, which decides what a
stop means from the run's status.json and marker files (not from the launcher's exit status,
which torchrun, for one, turns into 1 for a worker's 3 or 75):

1. Before anything starts: a diverged run (`DIR/diverged.json`) exits 3 and a run held by a live
   trainer (`DIR/trainer.lock`) exits 4, each with the reason, at once. So Snakemake's retries
   of a diverged segment cost seconds, not a training job, and a second job on the same run (a
   snakemake restarted after a kill) never starts a second trainer.
2. Every attempt writes its own log, `LOGDIR/attempts/<log name>.<UTC time>.<job>.log`; LOG (the
   rule's `log:`, which Snakemake deletes before each attempt) is a symlink to the current one.
3. SIGTERM and SIGUSR1 (Slurm sends them to every process of the job step) do not stop this
   wrapper, which passes them on to the launcher and waits; torchrun, if it is the launcher,
   ignores SIGTERM too (TORCHELASTIC_SIGNALS_TO_HANDLE without it, so it does not kill its
   workers 30 s after a SIGTERM). The trainers finish their step, checkpoint and exit however
   long the checkpoint takes, until Slurm's SIGKILL.
4. After it: the output snapshot exists -> 0. The run diverged -> 3. The trainer stopped early
   with a checkpoint written by this attempt (a signal: time limit, preemption; or its time
   budget, with progress) -> inside a Slurm job that still runs, the job requeues itself
   (srdit/requeue.py): same job id, no Snakemake retry spent, and the next run resumes from the
   checkpoint; elsewhere (or with --no-requeue) exit 75 and Snakemake's `retries` resubmit it.
   Anything else -> the launcher's exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from srdit.requeue import requeue_this_job
from srdit.runlock import DIVERGED_FILE, RunDiverged, RunLocked, check_not_diverged, check_unlocked

EXIT_DIVERGED = 3          # as srdit.train (not imported: that pulls in torch)
EXIT_LOCKED = 4
EXIT_REQUEUE = 75
# After `scontrol requeue`, Slurm ends this run of the job within its KillWait; wait for it.
REQUEUE_WAIT_S = 600


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run directory the command trains")
    parser.add_argument("--output", required=True, help="the snapshot this job must leave")
    parser.add_argument("--log", required=True, help="the rule's log file: a symlink to this attempt's log")
    parser.add_argument("--no-requeue", action="store_true",
                        help="exit 75 after an early stop instead of requeueing the Slurm job")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the launcher command")
    parser.set_defaults(func=run)


def attempt_log_path(log: Path, environ=None, now: float | None = None) -> Path:
    env = os.environ if environ is None else environ
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    job = env.get("SLURM_JOB_ID")
    who = f"job{job}" + (f"r{env['SLURM_RESTART_COUNT']}" if env.get("SLURM_RESTART_COUNT") else "") \
        if job else f"{socket.gethostname()}-{os.getpid()}"
    return log.parent / "attempts" / f"{log.stem}.{stamp}.{who}{log.suffix or '.log'}"


def _create_new(path: Path):
    """Open a new file at `path`, or at path-2, path-3, ... when it exists (never append to
    another attempt's log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            return candidate, open(candidate, "x", buffering=1)
        except FileExistsError:
            continue
    raise FileExistsError(path)


def _point_log_at(log: Path, target: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    tmp = log.with_name(f".{log.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, log.parent))
    os.replace(tmp, log)


def _read_status(run_dir: Path, since: float) -> dict | None:
    """status.json if this attempt wrote it (the trainer writes it last, on every clean exit)."""
    path = run_dir / "status.json"
    try:
        if path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _launch(command: list[str], log_file) -> int:
    """Run the launcher with SIGTERM/SIGUSR1 ignored here and passed on to it (see above)."""
    env = dict(os.environ)
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")
    forwarded = (signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in forwarded}
    # Started while they are ignored, so that the launcher inherits "ignore" (the trainers and
    # srdit's own launcher set handlers of their own). Same process group as this wrapper: Slurm
    # (with any ProctrackType) signals and kills it with the job step.
    try:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    except BaseException:
        for s, h in previous.items():
            signal.signal(s, h)
        raise

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for s in forwarded:
        signal.signal(s, forward)
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(args) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("srdit train-job: no launcher command after --", file=sys.stderr)
        return 2
    run_dir, output, log = Path(args.run_dir), Path(args.output), Path(args.log)
    started = time.time()
    attempt, f = _create_new(attempt_log_path(log, now=started))
    _point_log_at(log, attempt)
    with f:
        def say(msg: str) -> None:
            line = f"srdit train-job: {msg}"
            print(line, file=f, flush=True)
            print(line, file=sys.stderr, flush=True)

        say(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {socket.gethostname()}, Slurm job "
            f"{os.environ.get('SLURM_JOB_ID', '-')}, log {attempt}")
        try:
            check_not_diverged(run_dir)
            check_unlocked(run_dir)
        except RunDiverged as e:
            say(str(e))
            return EXIT_DIVERGED
        except RunLocked as e:
            say(str(e))
            return EXIT_LOCKED
        say("$ " + " ".join(command))
        f.flush()
        code = _launch(command, f)
        say(f"launcher exited {code}")

        if output.exists():
            return 0
        if (run_dir / DIVERGED_FILE).exists():
            say(f"run diverged ({run_dir / DIVERGED_FILE}): not retried")
            return EXIT_DIVERGED
        if code == EXIT_LOCKED:
            return EXIT_LOCKED
        status = _read_status(run_dir, since=started)
        state = (status or {}).get("state")
        step, start = (status or {}).get("step"), (status or {}).get("start_step")
        progressed = start is None or (step is not None and step > start)
        if state == "preempted" or (state == "segment_done" and progressed):
            say(f"stopped at step {step} ({status.get('detail')}) before {output.name}, with a checkpoint")
            if not args.no_requeue:
                done, what = requeue_this_job()
                say(what)
                if done:
                    time.sleep(REQUEUE_WAIT_S)      # Slurm ends this run of the job meanwhile
                    return EXIT_REQUEUE
            say(f"exit {EXIT_REQUEUE}: Snakemake resubmits the job (`retries`) and it resumes from the checkpoint")
            return EXIT_REQUEUE
        if state == "segment_done":
            say(f"stopped at step {step} without progress ({status.get('detail')}): not requeued")
        else:
            say(f"the trainer ended without reaching {output.name} (state {state or 'not written'}); "
                f"see {attempt}")
        return code or 1
