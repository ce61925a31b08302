"""`srdit status`: one table of every training run under the results runs folder.

    srdit status                                      # results/runs/ of the demo config
    srdit status --configfile config/imagenet256.yaml # the runs folder of that config's results_root
    srdit status --runs results/runs --json

Read-only, from the files the trainer writes, so it can run on the login node while the workflow
runs: `metrics.jsonl` (step, img/s), `checkpoints/latest`, `env.json` (the segment that started
last: its --until-step and Slurm job id), `status.json` (how the last segment ended), and the run
lock when one is held (srdit.runlock: job id, host, pid). Columns:

    run        the run directory's name (the registry entry that trains)
    state      running | preempted | diverged | finished | waiting (between segments) | new
    step       the last logged or checkpointed step
    target     the step the current segment trains to / the run's last step
    img/s      images per second of the last logged window
    ETA        to the run's last step at that speed (while running)
    checkpoint the newest checkpoint and its age
    job        the Slurm job id of the segment (lock holder, else env.json)

A segment whose job is gone without writing `status.json` (killed, cancelled, node failure) shows
as preempted: its next segment resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from srdit.checkpoint import CHECKPOINT_DIR, LATEST

# A run whose metrics.jsonl changed this recently counts as running when nothing else says so
# (a segment outside Slurm, no lock).
RECENT_S = 15 * 60


@dataclass
class RunStatus:
    run: str
    state: str
    step: int | None
    target: int | None          # --until-step of the segment that started last
    max_steps: int | None
    img_per_s: float | None
    eta_s: float | None
    checkpoint: str | None
    checkpoint_age_s: float | None
    job: str | None
    detail: str = ""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> tuple[int | None, dict | None]:
    """The last step mentioned in metrics.jsonl and the last logged (metric) record."""
    step, last = None, None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue                # a line cut by a killed job
        if isinstance(record.get("step"), int):
            step = record["step"] if step is None else max(step, record["step"])
        if "img_per_s" in record:
            last = record
    return step, last


def _latest_checkpoint(run_dir: Path) -> tuple[str | None, int | None, float | None]:
    root = run_dir / CHECKPOINT_DIR
    pointer = root / LATEST
    tag = None
    if pointer.exists():
        tag = pointer.read_text().strip() or None
    else:
        tags = sorted(p.name for p in root.glob("step*") if p.is_dir()) if root.exists() else []
        tag = tags[-1] if tags else None
    if tag is None:
        return None, None, None
    path = root / tag
    age = time.time() - path.stat().st_mtime if path.exists() else None
    step = int(tag[4:]) if tag[4:].isdigit() else None
    return tag, step, age


def _argv_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def _slurm_job(env: dict | None) -> str | None:
    slurm = (env or {}).get("slurm") or {}
    if slurm.get("SLURM_ARRAY_JOB_ID"):
        return f"{slurm['SLURM_ARRAY_JOB_ID']}_{slurm.get('SLURM_ARRAY_TASK_ID', '')}"
    return slurm.get("SLURM_JOB_ID")


def _lock(run_dir: Path) -> tuple[dict | None, str]:
    """The run lock's record (srdit.runlock: job id, host, pid, ...) and whether its holder is
    "alive", "ending", "gone" or "unknown"; (None, "") when the run is not locked."""
    try:
        from srdit import runlock
    except ImportError:                 # a checkout without run locks
        return None, ""
    try:
        record = runlock.read_lock(run_dir)
    except Exception as e:              # unreadable lock: say so, do not guess
        return {"error": str(e)}, "unknown"
    if record is None:
        return None, ""
    try:
        state, _ = runlock.holder_state(runlock.Holder.from_dict(record))
    except Exception:
        state = "unknown"
    return record, state


def _diverged(run_dir: Path) -> dict | None:
    try:
        from srdit.runlock import DIVERGED_FILE
    except ImportError:
        DIVERGED_FILE = "diverged.json"
    return _read_json(run_dir / DIVERGED_FILE)


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """Slurm state of each job id that squeue still knows; None where squeue is unavailable."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def run_status(run_dir: Path, queue: dict[str, str] | None = None) -> RunStatus:
    run_dir = Path(run_dir)
    env = _read_json(run_dir / "env.json")
    status = _read_json(run_dir / "status.json")
    logged_step, last = _metrics(run_dir / "metrics.jsonl")
    tag, ckpt_step, ckpt_age = _latest_checkpoint(run_dir)
    steps = [s for s in (logged_step, ckpt_step, (status or {}).get("step")) if isinstance(s, int)]
    step = max(steps) if steps else None
    argv = (env or {}).get("argv") or []
    until = _argv_value(argv, "--until-step")
    target = (env or {}).get("target_step")
    if target is None and until and until.isdigit():
        target = int(until)
    max_steps = (env or {}).get("max_steps") or (status or {}).get("max_steps")
    lock, holder = _lock(run_dir)
    live_lock = lock is not None and holder in ("alive", "ending", "unknown")
    job = str(lock.get("job_id") or "") if live_lock else None
    job = job or _slurm_job(env)
    diverged = _diverged(run_dir)
    img_s = float(last["img_per_s"]) if last and last.get("img_per_s") is not None else None
    steps_s = float(last["steps_per_s"]) if last and last.get("steps_per_s") else None

    env_time = (run_dir / "env.json").stat().st_mtime if env is not None else None
    status_time = (run_dir / "status.json").stat().st_mtime if status is not None else None
    segment_open = env_time is not None and (status_time is None or env_time > status_time)
    detail = ""
    if live_lock:
        state = "running"
        detail = (f"lock held by {lock.get('host', '?')} pid {lock.get('pid', '?')}"
                  + ("" if holder == "alive" else f" ({holder})"))
    elif diverged is not None:
        state = "diverged"
        detail = str(diverged.get("detail", ""))[:120]
    elif env is None and status is None and step is None:
        state = "new"
    elif segment_open:
        # a segment started and has not written how it ended: running, or killed
        slurm_job = _slurm_job(env)
        if slurm_job and queue is not None:
            slurm_state = queue.get(slurm_job) or queue.get(slurm_job.split("_")[0])
            state = "running" if slurm_state in ("RUNNING", "COMPLETING", "CONFIGURING") else "preempted"
            detail = f"Slurm: {slurm_state or 'gone'}"
        else:
            mtime = max((p.stat().st_mtime for p in (run_dir / "metrics.jsonl", run_dir / "env.json")
                         if p.exists()), default=0)
            state = "running" if time.time() - mtime < RECENT_S else "preempted"
            detail = "no status written" if state == "preempted" else ""
    else:
        ended = status.get("state")
        state = {"finished": "finished", "diverged": "diverged", "preempted": "preempted",
                 "segment_done": "waiting"}.get(ended, ended or "?")
        if state == "diverged":
            detail = str(status.get("detail", ""))[:120]
    if max_steps is None and target is not None and state == "finished":
        max_steps = target
    eta = None
    if state == "running" and steps_s and step is not None and (max_steps or target):
        eta = max(0.0, ((max_steps or target) - step) / steps_s)
    return RunStatus(run=run_dir.name, state=state, step=step, target=target, max_steps=max_steps,
                     img_per_s=img_s, eta_s=eta, checkpoint=tag, checkpoint_age_s=ckpt_age, job=job,
                     detail=detail)


def collect(runs_folder: Path, use_squeue: bool = True) -> list[RunStatus]:
    runs = sorted(p for p in Path(runs_folder).iterdir() if p.is_dir()) if Path(runs_folder).exists() else []
    jobs = []
    for run in runs:
        job = _slurm_job(_read_json(run / "env.json"))
        if job:
            jobs.append(job.split("_")[0])
    queue = squeue_states(sorted(set(jobs))) if use_squeue else None
    return [run_status(run, queue) for run in runs]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_table(rows: list[RunStatus]) -> str:
    header = ["run", "state", "step", "target", "img/s", "ETA", "checkpoint", "job"]
    lines = [header]
    for r in rows:
        target = "/".join(str(v) for v in (r.target, r.max_steps) if v is not None) or "-"
        if r.target is not None and r.max_steps == r.target:
            target = str(r.target)
        ckpt = f"{r.checkpoint} ({_duration(r.checkpoint_age_s)} ago)" if r.checkpoint else "-"
        lines.append([r.run, r.state, "-" if r.step is None else str(r.step), target,
                      "-" if r.img_per_s is None else f"{r.img_per_s:.1f}", _duration(r.eta_s), ckpt, r.job or "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", action="append", default=None, metavar="FILE",
                        help="workflow config over config/config.yaml whose results_root holds the runs "
                             "(repeat for several files)")
    parser.add_argument("--runs", default=None, help="the runs folder (default: <results_root>/runs)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    parser.add_argument("--no-squeue", action="store_true", help="do not ask squeue whether jobs still run")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.runs:
        folder = Path(args.runs)
    else:
        from srdit import layout
        folder = Path(layout.runs_folder(layout.load_workflow_config(args.configfile or ())))
    rows = collect(folder, use_squeue=not args.no_squeue)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return 0
    if not rows:
        print(f"no runs under {folder}", file=sys.stderr)
        return 0
    print(format_table(rows))
    return 0
