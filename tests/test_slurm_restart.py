"""Against the real Slurm (ci/start-slurm.sh): restarting the workflow safely.

- The login-node snakemake is killed with -9 while a training segment runs. After `--unlock`, a
  rerun that skips the README's first step (cancel what the dead snakemake left) submits the
  segment again: its job finds the run held by the orphaned trainer and refuses at once (no
  second trainer). Then the orphan is cancelled (it checkpoints) and the rerun finishes the run,
  bitwise equal to an uninterrupted run of the same trainer.
- A segment that stops before its boundary (here `train.segment_steps: 1`, as a time budget
  would) requeues its own Slurm job: same job id, no Snakemake retry (the test profile has
  `retries: 0`), one log per run of the job.
- A training job preempted and cancelled at once (PreemptMode=CANCEL, no grace time: the CI
  cluster's `urgent` partition) ends PREEMPTED, which the Slurm plugin would wait on forever; the
  workflow's requeuer (srdit/requeue.py) puts it back in the queue and the run finishes.

The data stages run once, locally (they are not what is tested). Skips without a cluster, fails
with SRDIT_REQUIRE_SLURM=1 (CI), like tests/test_slurm.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import SESSION_START, cluster, slurm_test_profile, venv_env  # noqa: F401  (cluster: a fixture)
from workflow_copy import copy_workflow

from srdit import layout, runlock
from srdit.checkpoint import read_snapshot

pytestmark = pytest.mark.slurm
CONFIG = "config/test_slurm.yaml"
SEGMENT_1 = "results/runs/{run}/snapshots/step0000002.safetensors"
SEGMENT_2 = "results/runs/{run}/snapshots/step0000004.safetensors"


def resolve_train(work: Path, row: str) -> layout.TrainJob:
    """The workflow's training job for `row` in `work` (paths relative to it, as the rules see them)."""
    here = os.getcwd()
    os.chdir(work)
    try:
        return layout.resolve_train(row, layout.load_workflow_config([CONFIG, "overlay.yaml"]))
    finally:
        os.chdir(here)


def snakemake(work: Path, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work, env=venv_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def prepared(cluster, tmp_path_factory) -> Path:  # noqa: F811
    """A workflow copy whose latent cache is built (locally), with an extra entry that stops
    after every step."""
    work = copy_workflow(tmp_path_factory.mktemp("prepared"))
    (work / "extra.yaml").write_text(yaml.safe_dump({
        "test_requeue": {"parent": "test_tiny", "train": {"segment_steps": 1}}}))
    (work / "overlay.yaml").write_text(yaml.safe_dump({"extra_registries": ["extra.yaml"]}))
    cache = resolve_train(work, "test_tiny").cache
    assert cache == resolve_train(work, "test_requeue").cache
    result = snakemake(work, cache, "--profile", "profiles/local", "--cores", "2", "--configfile", CONFIG,
                       "overlay.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    return work


def fresh_copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest, symlinks=True)         # copy2: the cache keeps its mtimes
    return dest


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_until_a_trainer_holds(work: Path, args: list[str], run_dir: Path, log: Path, env: dict,
                                **popen) -> tuple[subprocess.Popen, dict]:
    """Start snakemake with `args` in the background (output to `log`) and wait until a trainer
    holds `run_dir`: (the snakemake process, the run lock's record)."""
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=work, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, **popen)
    try:
        holder = wait_for(lambda: runlock.read_lock(run_dir) if (run_dir / runlock.LOCK_FILE).exists() else None,
                          600, "a trainer to take the run lock")
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()[-4000:]) from None
    return proc, holder


def squeue_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def attempt_logs(work: Path, run: str) -> list[Path]:
    return sorted((work / f"results/logs/train/{run}/attempts").glob("*.log"))


def history(run_dir: Path) -> list[dict]:
    path = run_dir / runlock.HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_trainers_never_overlapped(run_dir: Path) -> None:
    """Every take (or take-over) of the lock comes after the previous holder released it or was
    found gone: one trainer at a time."""
    holder = None
    for event in history(run_dir):
        if event["event"] == "take":
            assert holder is None, f"{event} while {holder} held the run"
            holder = event["nonce"]
        elif event["event"] == "release":
            assert holder == event["nonce"], event
            holder = None
        elif event["event"] == "take_over":
            assert holder == event["previous"]["nonce"], event
            holder = None


def test_a_snakemake_killed_mid_segment_restarts_without_a_second_trainer(prepared, cluster, tmp_path):  # noqa: F811
    work = fresh_copy(prepared, tmp_path / "work")
    profile = slurm_test_profile(cluster, work)
    run_dir = work / "results/runs/test_tiny"
    target = SEGMENT_2.format(run="test_tiny")
    cmd = [target, "--profile", str(profile), "--configfile", CONFIG, "overlay.yaml"]

    # 1. snakemake trains segment 1 through Slurm; once its trainer holds the run, the trainer is
    #    frozen (so that it is surely mid-segment whatever the machine's speed) and snakemake dies
    first, orphan = start_until_a_trainer_holds(work, cmd, run_dir, tmp_path / "first.log", venv_env(),
                                                start_new_session=True)
    os.kill(orphan["pid"], signal.SIGSTOP)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    job = orphan["job_id"]
    assert job and squeue_state(job) == "RUNNING"          # the orphan lives on in Slurm

    try:
        # 2. rerun without cancelling it: the new job of the segment refuses at once
        assert snakemake(work, *cmd, "--unlock").returncode == 0
        rerun = snakemake(work, *cmd)
        assert rerun.returncode != 0
        refused = [p.read_text() for p in attempt_logs(work, "test_tiny") if "being trained by" in p.read_text()]
        assert len(refused) == 1 and f"Slurm job {job}" in refused[0] and f"scancel {job}" in refused[0]
        assert "$ " not in refused[0]                    # no launcher was started
        assert [e["event"] for e in history(run_dir)] == ["take"]
        assert squeue_state(job) == "RUNNING" and runlock.read_lock(run_dir)["nonce"] == orphan["nonce"]
    finally:
        # 3. the README's procedure: cancel what the dead snakemake left (the trainer checkpoints) ...
        subprocess.run(["scancel", job], check=True)
        os.kill(orphan["pid"], signal.SIGCONT)
    wait_for(lambda: squeue_state(job) == "", 120, f"job {job} to end")
    # ... and rerun (unlocked above; the refused rerun ended cleanly): the run finishes
    final = snakemake(work, *cmd)
    assert final.returncode == 0, final.stderr[-4000:]
    assert (work / target).exists()
    assert_trainers_never_overlapped(run_dir)
    assert runlock.read_lock(run_dir) is None

    # 4. the same result as an uninterrupted run: one trainer from step 0 to 4, same command
    solo = resolve_train(work, "test_tiny")
    solo.run_dir = str(tmp_path / "solo")
    # with the jobs' thread count (the test profile's 1): CPU kernels sum in another order on 2
    threads = json.loads((run_dir / "env.json").read_text())["hardware"]["torch_threads"]
    ref = subprocess.run([sys.executable, "-m", "srdit", "train", *solo.args(4)], cwd=work,
                         env=dict(venv_env(), OMP_NUM_THREADS=str(threads)), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert json.loads((tmp_path / "solo/env.json").read_text())["hardware"]["torch_threads"] == threads
    (meta_a, model_a, ema_a) = read_snapshot(work / target)
    (meta_b, model_b, ema_b) = read_snapshot(tmp_path / "solo/snapshots/step0000004.safetensors")
    assert meta_a["step"] == meta_b["step"] == "4"
    for a, b in ((model_a, model_b), (ema_a, ema_b)):
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a), "differs from the solo run"


def test_a_segment_that_stops_early_requeues_its_own_job(prepared, cluster, tmp_path):  # noqa: F811
    work = fresh_copy(prepared, tmp_path / "work")
    profile = slurm_test_profile(cluster, work)
    target = SEGMENT_1.format(run="test_requeue")
    log = open(tmp_path / "snakemake.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", target, "--profile", str(profile), "--configfile",
                             CONFIG, "overlay.yaml"], cwd=work, env=venv_env(), stdout=log, stderr=subprocess.STDOUT)
    run_dir = work / "results/runs/test_requeue"
    # Slurm holds a requeued batch job ~2 minutes (BeginTime) before it may start again; the test
    # does not wait for that: it moves the begin time of the requeued job to now.
    released = set()
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        lines = subprocess.run(["squeue", "-h", "-o", "%i %r %Z"], capture_output=True, text=True).stdout
        for line in lines.splitlines():
            job, reason, workdir = (line.split() + ["", "", ""])[:3]
            if reason == "BeginTime" and Path(workdir).resolve() == work.resolve() and job not in released:
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])
                released.add(job)
        time.sleep(1)
    if proc.poll() is None:
        proc.kill()
    out = (tmp_path / "snakemake.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert (work / target).exists()
    assert "Trying to restart job" not in out                  # no Snakemake retry was spent
    # one Snakemake job, two runs of the same Slurm job: one log each, the first requeued itself
    logs = attempt_logs(work, "test_requeue")
    jobs = {re.match(r"job(\d+)", p.name.split(".")[-2]).group(1) for p in logs}   # job<id>[r<restart>]
    assert len(logs) == 2 and len(jobs) == 1, [p.name for p in logs]
    assert released == jobs
    first, second = sorted(logs, key=lambda p: p.stat().st_mtime)
    assert "requeued Slurm job" in first.read_text() and "launcher exited 0" in second.read_text()
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [e["checkpoint"] for e in events if e.get("event") == "resume"] == ["step0000001"]
    assert_trainers_never_overlapped(run_dir)


def urgent_partition() -> str | None:
    """The CI cluster's partition whose jobs preempt (and cancel) the others' (ci/start-slurm.sh)."""
    out = subprocess.run(["scontrol", "show", "partition", "urgent"], capture_output=True, text=True)
    preempt = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    if out.returncode != 0 or not re.search(r"PreemptMode\s*=\s*CANCEL", preempt):
        return None
    return "urgent"


def test_a_preempted_and_cancelled_training_job_is_requeued_by_the_workflow(prepared, cluster, tmp_path):  # noqa: F811
    urgent = urgent_partition()
    if urgent is None:
        message = "this cluster has no `urgent` partition with PreemptMode=CANCEL (start it with ci/start-slurm.sh)"
        if os.environ.get("SRDIT_REQUIRE_SLURM"):
            pytest.fail(message)
        pytest.skip(message)
    work = fresh_copy(prepared, tmp_path / "work")
    profile = slurm_test_profile(cluster, work)
    run_dir = work / "results/runs/test_tiny"
    target = SEGMENT_1.format(run="test_tiny")
    proc, holder = start_until_a_trainer_holds(
        work, [target, "--profile", str(profile), "--configfile", CONFIG, "overlay.yaml"], run_dir,
        tmp_path / "snakemake.log", dict(venv_env(), SRDIT_PREEMPT_POLL_S="1"))
    job = holder["job_id"]
    # the trainer is frozen so that the preemption surely finds it mid-segment; Slurm's SIGCONT,
    # SIGTERM, SIGKILL end it as they would a running one
    os.kill(holder["pid"], signal.SIGSTOP)
    urgent_job = subprocess.run(["sbatch", "--parsable", "-p", urgent, "--exclusive", "-o", "/dev/null",
                                 "-J", "srdit-test-urgent", "--wrap", "sleep 5"],
                                capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    released = set()
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        # as in the test above: the requeued job waits out BeginTime (~2 minutes) unless moved
        lines = subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout
        if lines.strip() == "BeginTime" and job not in released:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])
            released.add(job)
        time.sleep(1)
    if proc.poll() is None:
        proc.kill()
        subprocess.run(["scancel", job])
    out = (tmp_path / "snakemake.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert (work / target).exists()
    assert f"Slurm job {job} was preempted and cancelled; requeued it" in out, out[-4000:]
    assert "Trying to restart job" not in out                  # no Snakemake retry was spent
    states = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-S", SESSION_START, "-o", "State"],
                            capture_output=True, text=True).stdout.split()
    # the requeuer found it PREEMPTED (its message above: it looks for that state only); once
    # requeued, accounting shows that run as REQUEUED, then the run that finished
    assert states == ["REQUEUED", "COMPLETED"], states
    assert subprocess.run(["sacct", "-X", "-n", "-P", "-j", urgent_job, "-S", SESSION_START, "-o", "State"],
                          capture_output=True, text=True).stdout.split() == ["COMPLETED"]
    assert_trainers_never_overlapped(run_dir)
    assert runlock.read_lock(run_dir) is None
