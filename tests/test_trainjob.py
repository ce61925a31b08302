"""`srdit train-job` (srdit/trainjob.py), the wrapper of the workflow's training jobs, and the
preempted-job requeuer (srdit/requeue.py), with stand-in launchers and Slurm tools.

What the wrapper decides: a diverged or live-locked run is refused before the launcher starts;
every attempt keeps its log; an early stop with a checkpoint requeues the Slurm job (or exits 75
outside Slurm); SIGTERM reaches the trainers and does not stop the wrapper or torchrun.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srdit import requeue, trainjob

REPO = Path(__file__).resolve().parents[1]

# A stand-in trainer: writes what the real one writes at the end of a segment.
FAKE_TRAINER = r'''
import json, os, sys, time
run, out, state, start, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
os.makedirs(run, exist_ok=True)
print("fake trainer", os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE"), flush=True)
if state == "finished":
    open(out, "w").write("snapshot")
if state != "crash":
    json.dump({"state": state, "step": step, "start_step": start, "detail": "test"}, open(f"{run}/status.json", "w"))
if state == "diverged":
    json.dump({"step": step, "detail": "nan"}, open(f"{run}/diverged.json", "w"))
sys.exit({"preempted": 75, "diverged": 3, "crash": 1}.get(state, 0))
'''


def job(tmp: Path, state: str, start: int = 0, step: int = 2, **flags) -> tuple[int, Path, Path]:
    """One train-job in this process around the stand-in trainer: (exit code, run dir, log)."""
    script = tmp / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    run, log = tmp / "runs/r", tmp / "logs/train/r/step0000002.log"
    out = run / "snapshots/step0000002.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(run_dir=str(run), output=str(out), log=str(log), no_requeue=flags.get("no_requeue", False),
                              command=["--", sys.executable, str(script), str(run), str(out), state, str(start),
                                       str(step)])
    return trainjob.run(args), run, log


def fake_tools(tmp: Path, monkeypatch, **bodies: str) -> Path:
    """Stand-in Slurm tools (bash bodies) first on PATH; each call is appended to calls.txt."""
    bin_dir = tmp / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> {tmp}/calls.txt\n{body}\n')
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return tmp / "calls.txt"


def calls(tmp: Path) -> list[str]:
    path = tmp / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(autouse=True)
def no_slurm_job(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(trainjob, "REQUEUE_WAIT_S", 0)


def test_a_finished_segment_exits_0_and_every_attempt_keeps_its_log(tmp_path):
    code, run, log = job(tmp_path, "preempted", start=0, step=1)
    assert code == trainjob.EXIT_REQUEUE                  # outside Slurm: Snakemake's retry resumes it
    first = log.resolve()
    code, run, log = job(tmp_path, "finished", start=1, step=2)
    assert code == 0
    second = log.resolve()
    assert log.is_symlink() and set((log.parent / "attempts").iterdir()) == {first, second} and first != second
    assert "stopped at step 1" in first.read_text() and "launcher exited 0" in second.read_text()
    # torchrun, if that is the launcher, leaves SIGTERM to its workers
    assert "fake trainer SIGINT,SIGHUP,SIGQUIT" in second.read_text()


def test_a_diverged_run_is_refused_before_the_launcher_starts(tmp_path):
    code, run, log = job(tmp_path, "diverged")
    assert code == trainjob.EXIT_DIVERGED and (run / "diverged.json").exists()
    (run / "status.json").unlink()
    code, _, log = job(tmp_path, "finished")              # the retry: refused, nothing runs
    assert code == trainjob.EXIT_DIVERGED
    assert not (run / "status.json").exists() and not (run / "snapshots/step0000002.safetensors").exists()
    text = log.read_text()
    assert "is not trained again" in text and "fake trainer" not in text


def test_a_run_held_by_a_live_trainer_is_refused_before_the_launcher_starts(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from srdit.runlock import RunLock; "
                               f"RunLock({str(tmp_path / 'runs/r')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(120)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, run, log = job(tmp_path, "finished")
        assert code == trainjob.EXIT_LOCKED
        assert f"pid {holder.pid}" in log.read_text() and "fake trainer" not in log.read_text()
    finally:
        holder.kill()
        holder.wait()
    code, run, log = job(tmp_path, "finished")            # its holder died: the lock is stale
    assert code == 0


def test_an_early_stop_without_progress_is_not_requeued(tmp_path):
    code, _, log = job(tmp_path, "segment_done", start=2, step=2)
    assert code == 1 and "without progress" in log.read_text()
    code, _, log = job(tmp_path, "crash")
    assert code == 1 and "state not written" in log.read_text()


@pytest.mark.parametrize("slurm_state,requeued", [("RUNNING", True), ("CANCELLED", False)])
def test_an_early_stop_in_a_running_slurm_job_requeues_it(tmp_path, monkeypatch, slurm_state, requeued):
    fake_tools(tmp_path, monkeypatch, squeue=f"echo {slurm_state}", scontrol="exit 0", sacct="exit 1")
    monkeypatch.setenv("SLURM_JOB_ID", "5150")
    code, _, log = job(tmp_path, "segment_done", start=0, step=1)
    assert code == trainjob.EXIT_REQUEUE
    assert ("scontrol requeue 5150" in calls(tmp_path)) == requeued
    text = log.read_text()
    assert ("requeued Slurm job 5150" in text) == requeued
    if not requeued:                                      # scancel'ed: it stays ended
        assert "not RUNNING" in text
    assert log.resolve().name.endswith(".job5150.log")


def test_no_requeue_flag_and_a_refused_requeue_fall_back_to_exit_75(tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, squeue="echo RUNNING", scontrol="echo 'Requeue of job disabled' >&2; exit 1")
    monkeypatch.setenv("SLURM_JOB_ID", "5151")
    code, _, log = job(tmp_path, "preempted", start=0, step=1, no_requeue=True)
    assert code == trainjob.EXIT_REQUEUE and not any("scontrol" in c for c in calls(tmp_path))
    code, _, log = job(tmp_path, "preempted", start=1, step=1)   # a signal counts even without progress
    assert code == trainjob.EXIT_REQUEUE and "Requeue of job disabled" in log.read_text()


# The trainer gets SIGTERM (as from Slurm or a forward), checkpoints slowly, exits 75.
SIGNALLED_TRAINER = r'''
import json, os, signal, sys, time
run = sys.argv[1]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
open(f"{run}/ready", "w").close()
while not got:
    time.sleep(0.05)
time.sleep(2)                     # a checkpoint that takes a while
json.dump({"state": "preempted", "step": 3, "start_step": 0, "detail": "preempted"}, open(f"{run}/status.json", "w"))
sys.exit(75)
'''


def start_wrapper_around_slow_trainer(tmp: Path) -> tuple[subprocess.Popen, Path]:
    run = tmp / "run"
    run.mkdir()
    (tmp / "trainer.py").write_text(SIGNALLED_TRAINER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SLURM_JOB_ID", None)
    wrapper = subprocess.Popen([sys.executable, "-m", "srdit", "train-job", "--run-dir", str(run), "--output",
                                str(run / "snap.safetensors"), "--log", str(tmp / "log/step.log"), "--",
                                sys.executable, str(tmp / "trainer.py"), str(run)],
                               cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (run / "ready").exists():
        assert time.time() < deadline and wrapper.poll() is None
        time.sleep(0.05)
    return wrapper, run


@pytest.mark.parametrize("to", ["every process", "the wrapper alone"])
def test_sigterm_reaches_the_trainer_and_the_wrapper_waits_for_it(tmp_path, to):
    wrapper, run = start_wrapper_around_slow_trainer(tmp_path)
    if to == "every process":
        os.killpg(wrapper.pid, signal.SIGTERM)            # as Slurm does: every process of the job step
    else:
        wrapper.send_signal(signal.SIGTERM)               # passed on to the launcher
    _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == trainjob.EXIT_REQUEUE, err
    assert "stopped at step 3" in err and "launcher exited 75" in err


# --------------------------------------------------------------------------------------------
# The preempted-job requeuer
# --------------------------------------------------------------------------------------------

def test_preempted_jobs_of_this_workflow_are_requeued(tmp_path, monkeypatch):
    here = tmp_path / "workflow"
    here.mkdir()
    listing = f"101|{here}\\n102_3|{here}/\\n103|/somewhere/else"
    fake_tools(tmp_path, monkeypatch, squeue=f'printf "{listing}\\n"',
               scontrol='[ "$2" = 102_3 ] && { echo "Requeue of job disabled" >&2; exit 1; }; exit 0')
    logged = []
    r = requeue.PreemptedJobRequeuer(here, log=logged.append)
    assert r.poll_once() == ["101"]
    r.poll_once()
    assert [c for c in calls(tmp_path) if c.startswith("scontrol")] == ["scontrol requeue 101", "scontrol requeue 102_3"] * 2
    assert any("squeue -h -u" in c and "-t PREEMPTED" in c for c in calls(tmp_path))
    assert sum("cannot be requeued" in m for m in logged) == 1          # warned once, not every poll
    assert any("102_3" in m and "Requeue of job disabled" in m for m in logged)


@pytest.mark.parametrize("value,expected", [(None, 60.0), ("1", 1.0), ("0.5", 0.5), ("0", None), ("-3", None),
                                            ("soon", None), ("nan", None), ("inf", None)])
def test_the_requeuer_poll_interval_is_validated(value, expected):
    env = {} if value is None else {"SRDIT_PREEMPT_POLL_S": value}
    if expected is None:
        with pytest.raises(ValueError, match="SRDIT_PREEMPT_POLL_S"):
            requeue.poll_interval(env)
    else:
        assert requeue.poll_interval(env) == expected
