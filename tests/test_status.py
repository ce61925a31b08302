"""`srdit status` on real tiny runs (the trainer on the CPU, test_train's cache and entry): every
state the table shows, read only from the files the trainer writes."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY, train_here, write_caches

from srdit import runlock
from srdit.status import collect, format_table, run_status

REPO = Path(__file__).resolve().parents[1]
SHORT = copy.deepcopy(TINY)
SHORT["train"].update(max_steps=4, ckpt_every=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    cache = write_caches(tmp_path_factory.mktemp("cache"))
    runs = tmp_path_factory.mktemp("runs")
    assert train_here(runs / "a_finished", cache, until=2, overrides=SHORT) == 0
    assert run_status(runs / "a_finished").state == "waiting"        # between two segments
    assert train_here(runs / "a_finished", cache, until=4, overrides=SHORT) == 0
    train_here(runs / "b_preempted", cache, until=4, overrides=SHORT, signal_at=1)
    train_here(runs / "c_diverged", cache, until=4, overrides=SHORT, nan_at_step=2)
    (runs / "d_new").mkdir()
    return runs


def test_each_state_from_the_trainers_files(runs):
    rows = {r.run: r for r in collect(runs, use_squeue=False)}
    assert list(rows) == ["a_finished", "b_preempted", "c_diverged", "d_new"]
    done = rows["a_finished"]
    assert (done.state, done.step, done.target, done.max_steps) == ("finished", 4, 4, 4)
    assert done.checkpoint == "step0000004" and done.img_per_s > 0 and done.eta_s is None
    stopped = rows["b_preempted"]
    assert stopped.state == "preempted" and stopped.step == 1 and stopped.checkpoint == "step0000001"
    diverged = rows["c_diverged"]
    assert diverged.state == "diverged" and "non-finite" in diverged.detail
    assert rows["d_new"].state == "new" and rows["d_new"].step is None


def test_a_killed_segment_is_running_while_slurm_runs_it_and_preempted_after(runs, tmp_path):
    # a segment that started (env.json written) and never wrote how it ended, in Slurm job 4242
    run = tmp_path / "killed"
    subprocess.run(["cp", "-r", str(runs / "a_finished"), str(run)], check=True)
    env = json.loads((run / "env.json").read_text())
    env["slurm"] = {"SLURM_JOB_ID": "4242"}
    env["target_step"] = 4
    time.sleep(0.05)
    (run / "env.json").write_text(json.dumps(env))
    os.utime(run / "status.json", (time.time() - 60, time.time() - 60))
    running = run_status(run, queue={"4242": "RUNNING"})
    assert running.state == "running" and running.job == "4242"
    gone = run_status(run, queue={})
    assert gone.state == "preempted" and gone.job == "4242" and "gone" in gone.detail
    requeued = run_status(run, queue={"4242": "PENDING"})
    assert requeued.state == "preempted" and "PENDING" in requeued.detail


def test_a_held_run_lock_means_running(runs, tmp_path):
    run = tmp_path / "locked"
    subprocess.run(["cp", "-r", str(runs / "b_preempted"), str(run)], check=True)
    with runlock.RunLock(run):
        row = run_status(run, queue={})
        assert row.state == "running" and str(os.getpid()) in row.detail
    assert run_status(run, queue={}).state == "preempted"           # released: the files decide again


def test_the_cli_prints_one_table(runs):
    result = subprocess.run([sys.executable, "-m", "srdit", "status", "--runs", str(runs), "--no-squeue"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "state", "step", "target", "img/s", "ETA", "checkpoint", "job"]
    assert [line.split()[:2] for line in lines[1:]] == [["a_finished", "finished"], ["b_preempted", "preempted"],
                                                         ["c_diverged", "diverged"], ["d_new", "new"]]
    as_json = subprocess.run([sys.executable, "-m", "srdit", "status", "--runs", str(runs), "--json", "--no-squeue"],
                             capture_output=True, text=True, timeout=120)
    assert [json.loads(line)["state"] for line in as_json.stdout.splitlines()] == \
        ["finished", "preempted", "diverged", "new"]
    assert format_table([]).startswith("run")
