"""The run lock and the diverged marker (srdit/runlock.py), and the trainer's use of them.

The end-to-end test runs two real trainers on one run directory (the second refuses, naming the
first; the first ends bitwise identical to a solo run). The others exercise the lock itself:
stale holders (dead pid, reused pid, rebooted host, an earlier run of a requeued job, a Slurm
job that ended), the race of several processes taking over one stale lock, and Slurm states read
from stand-in `squeue`/`sacct` scripts.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from srdit import runlock
from srdit.runlock import Holder, RunLock, RunLocked, holder_state

REPO = Path(__file__).resolve().parents[1]


def write_lock(run_dir: Path, **fields) -> Holder:
    """A lock file as another trainer would have left it."""
    holder = Holder.me()
    for k, v in fields.items():
        setattr(holder, k, v)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps(asdict(holder)))
    return holder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_slurm(tmp: Path, monkeypatch, squeue: str | None = None, sacct: str | None = None) -> None:
    """Stand-in squeue/sacct (bash bodies) first on PATH; None leaves the tool out entirely."""
    bin_dir = tmp / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("squeue", squeue), ("sacct", sacct)):
        path = bin_dir / name
        if body is None:
            path.unlink(missing_ok=True)
            continue
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    # which() decides whether a tool exists: a missing stand-in is a missing tool, even where the real one is
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(runlock.shutil, "which", lambda name: str(bin_dir / name) if (bin_dir / name).exists()
                        else None)


# --------------------------------------------------------------------------------------------
# Taking, refusing, releasing
# --------------------------------------------------------------------------------------------

def test_a_live_holder_is_named_and_kept(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as lock:
        assert runlock.read_lock(run)["pid"] == os.getpid()
        with pytest.raises(RunLocked) as err:
            RunLock(run).acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "being trained by" in msg and lock.me.host in msg
        assert err.value.holder["nonce"] == lock.me.nonce
    assert runlock.read_lock(run) is None
    events = [json.loads(line)["event"] for line in (run / runlock.HISTORY_FILE).read_text().splitlines()]
    assert events == ["take", "release"]


def test_release_never_removes_another_holders_lock(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    other = write_lock(run, pid=12345, nonce="someone-else")      # e.g. taken over meanwhile
    lock.release()
    assert runlock.read_lock(run)["nonce"] == other.nonce


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "rebooted"])
def test_a_holder_gone_from_this_host_is_taken_over(tmp_path, case):
    run = tmp_path / "run"
    if case == "dead pid":
        old = write_lock(run, pid=dead_pid(), job_id=None)
    elif case == "reused pid":          # the pid runs, but it is another process than the holder
        old = write_lock(run, pid=os.getppid(), pid_start=1, job_id=None)
    else:
        old = write_lock(run, pid=os.getpid(), boot_id="an-earlier-boot", job_id=None)
    assert holder_state(Holder.from_dict(runlock.read_lock(run)))[0] == "gone"
    with RunLock(run) as lock:
        assert runlock.read_lock(run)["nonce"] == lock.me.nonce
    history = [json.loads(line) for line in (run / runlock.HISTORY_FILE).read_text().splitlines()]
    takeover = next(e for e in history if e["event"] == "take_over")
    assert takeover["previous"]["nonce"] == old.nonce and takeover["reason"]


def test_an_earlier_run_of_a_requeued_job_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    holder = Holder.from_dict(dict(asdict(Holder.me()), restart_count=1))
    assert holder_state(holder) == ("gone", "an earlier run of this requeued job (4242, run 1)")
    holder = Holder.from_dict(dict(asdict(Holder.me()), host="node-before-requeue", restart_count=None))
    assert holder_state(holder)[0] == "gone"


@pytest.mark.parametrize("squeue,sacct,expected", [
    ("echo RUNNING", None, "alive"),
    ("echo SUSPENDED", None, "alive"),
    ("echo COMPLETING", None, "ending"),
    ("echo PENDING", None, "gone"),                       # requeued: no trainer runs now
    ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", None, "gone"),
    ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", "echo 'CANCELLED by 0'", "gone"),
    ("exit 0", "echo RUNNING", "alive"),                 # squeue forgot it, sacct knows better
    ("echo 'Unable to contact slurm controller' >&2; exit 1", None, "unknown"),
    (None, None, "unknown"),
])
def test_a_holder_on_another_host_is_judged_by_its_slurm_job(tmp_path, monkeypatch, squeue, sacct, expected):
    fake_slurm(tmp_path, monkeypatch, squeue=squeue, sacct=sacct)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = Holder.from_dict(dict(asdict(Holder.me()), host="gpu-node-17", job_id="777"))
    state, why = holder_state(holder)
    assert state == expected, why
    if expected != "unknown":
        assert "777" in why


def test_refusals_say_what_to_do(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, squeue="echo RUNNING")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    write_lock(run, host="gpu-node-17", job_id="777")
    with pytest.raises(RunLocked, match=r"Slurm job 777 .* on gpu-node-17.*scancel 777"):
        RunLock(run).acquire()
    with pytest.raises(RunLocked, match=r"Slurm job 777"):
        runlock.check_unlocked(run)
    fake_slurm(tmp_path, monkeypatch, squeue=None, sacct=None)
    write_lock(run, host="laptop", job_id=None)
    with pytest.raises(RunLocked, match=r"cannot be checked .* delete .*trainer.lock"):
        RunLock(run).acquire()
    fake_slurm(tmp_path, monkeypatch, squeue="echo COMPLETED")
    write_lock(run, host="gpu-node-17", job_id="777")
    runlock.check_unlocked(run)                           # stale: passes, taken over by the trainer
    with RunLock(run):
        pass


def _racer(run_dir: str, start, results, release) -> None:
    start.wait()
    try:
        lock = RunLock(run_dir).acquire()
    except RunLocked as e:
        results.put(("refused", os.getpid(), e.holder["pid"] if e.holder else None))
        return
    results.put(("won", os.getpid(), None))
    release.wait(60)
    lock.release()


def test_of_several_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    for round_ in range(4):
        run = tmp_path / f"run{round_}"
        write_lock(run, pid=dead_pid(), job_id=None)
        n = 6
        start, release, results = ctx.Barrier(n), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(str(run), start, results, release)) for _ in range(n)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in range(n)]
        release.set()
        for p in procs:
            p.join(60)
        winners = [pid for kind, pid, _ in outcomes if kind == "won"]
        assert len(winners) == 1, outcomes
        assert all(holder == winners[0] for kind, _, holder in outcomes if kind == "refused"), outcomes
        assert runlock.read_lock(run) is None and not (run / runlock.TAKEOVER_FILE).exists()


def test_a_takeover_lock_left_by_a_dead_taker_is_cleared(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_lock(run, pid=dead_pid(), job_id=None)
    left = run / runlock.TAKEOVER_FILE
    left.write_text("{}")
    old = time.time() - 2 * runlock.TAKEOVER_STALE_S
    os.utime(left, (old, old))
    with RunLock(run):
        pass
    assert not left.exists()


# --------------------------------------------------------------------------------------------
# The trainer: two trainers on one run, and the diverged marker
# --------------------------------------------------------------------------------------------

def _trainer_cmd(run_dir: Path, cache: Path, until: int) -> list[str]:
    from test_train import ENTRY, SET_ARGS
    sets = [a for s in SET_ARGS for a in ("--set", s)]
    return [sys.executable, "-m", "srdit", "train", ENTRY, "--run-dir", str(run_dir), "--cache", str(cache),
            "--until-step", str(until), *sets]


def _wait_for_lock(run_dir: Path, pid: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = runlock.read_lock(run_dir) if (run_dir / runlock.LOCK_FILE).exists() else None
        if info and info["pid"] == pid:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the first trainer ended (exit {proc.returncode}) before it held the lock: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("the first trainer never took the lock")


def test_a_second_trainer_on_a_run_refuses_and_the_first_ends_as_a_solo_run(tmp_path):
    from test_train import N, _env, assert_resumed_run_is_identical, train_here, write_caches
    from srdit.train import EXIT_LOCKED

    cache = write_caches(tmp_path / "cache")
    run, solo = tmp_path / "run", tmp_path / "solo"
    first = subprocess.Popen(_trainer_cmd(run, cache, 2 * N), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(run, first.pid, first)
        # freeze the first trainer while it holds the run, so the second surely meets it alive
        os.kill(first.pid, signal.SIGSTOP)
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        started = time.time()
        second = subprocess.run(_trainer_cmd(run, cache, 2 * N), cwd=REPO, env=_env(), capture_output=True,
                                text=True, timeout=600)
        refused_after = time.time() - started
        after = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == EXIT_LOCKED, second.stderr[-3000:]
    assert "being trained by a trainer outside Slurm" in second.stderr and f"pid {first.pid}" in second.stderr
    assert refused_after < 120                     # at once: interpreter start-up, no model built
    assert after == before                         # the refused trainer touched nothing
    # the first trainer, undisturbed, ends exactly where a solo run ends
    assert train_here(solo, cache, until=2 * N) == 0
    assert_resumed_run_is_identical(solo, run, 2 * N, ranks=1)
    assert runlock.read_lock(run) is None
    pids = {json.loads(line)["pid"] for line in (run / runlock.HISTORY_FILE).read_text().splitlines()}
    assert pids == {first.pid}                     # only the first ever held it


def test_a_diverged_run_is_not_trained_again_until_its_marker_is_removed(tmp_path, capfd):
    from test_train import N, TINY, status, train_here, write_caches
    from srdit.train import EXIT_DIVERGED

    cache = write_caches(tmp_path / "cache")
    run = tmp_path / "run"
    overrides = {"train": dict(TINY["train"], ckpt_every=1)}
    assert train_here(run, cache, until=N + 3, overrides=overrides, nan_at_step=N) == EXIT_DIVERGED
    marker = json.loads((run / runlock.DIVERGED_FILE).read_text())
    assert marker["step"] >= N and "non-finite" in marker["detail"]
    capfd.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert train_here(run, cache, until=N + 3, overrides=overrides) == EXIT_DIVERGED
    assert "is not trained again" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    (run / runlock.DIVERGED_FILE).unlink()
    assert train_here(run, cache, until=N + 3, overrides=overrides) == 0      # resumes from step N - 1
    assert status(run)["state"] == "segment_done" and status(run)["step"] == N + 3
    assert status(run)["start_step"] == N - 1


def test_all_ranks_refuse_together(tmp_path):
    """Only rank 0 looks at the lock; the other ranks learn its answer and stop with it (each by
    itself, no launcher tearing them down), instead of waiting forever at the first collective."""
    import socket

    from test_train import ENTRY, N, SET_ARGS, _env, write_caches
    from srdit.train import EXIT_LOCKED

    cache = write_caches(tmp_path / "cache")
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from srdit.runlock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [a for x in SET_ARGS for a in ("--set", x)]
    cmd = [sys.executable, "-m", "srdit", "train", ENTRY, "--run-dir", str(run), "--cache", str(cache),
           "--until-step", str(N), *sets]
    try:
        assert holder.stdout.readline().strip() == "held"
        ranks = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                           LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                 for r in range(2)]
        outputs = [p.communicate(timeout=300) for p in ranks]
    finally:
        holder.kill()
        holder.wait()
    assert [p.returncode for p in ranks] == [EXIT_LOCKED, EXIT_LOCKED], [err[-2000:] for _, err in outputs]
    assert f"pid {holder.pid}" in outputs[0][1] and "being trained by" not in outputs[1][1]   # rank 0 says it
    assert not (run / "config.json").exists()
