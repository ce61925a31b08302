"""`srdit launch` without Slurm: resources from the profile, commands, submitit's local executor,
and the checkpoint-and-requeue path a preempted job takes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from srdit.launch import EXIT_REQUEUE, StageCommand, launch, profile_resources, stage_command

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles/slurm/config.yaml"


def test_stage_resources_come_from_the_slurm_profile():
    site = yaml.safe_load(PROFILE.read_text())["site"]
    train = profile_resources("train", PROFILE)
    assert train.gpus == site["node_gpus"] > 1 and train.cpus == site["node_cpus"]
    assert train.partition == site["gpu_partition"] and train.minutes == site["train_minutes"]
    sample = profile_resources("sample", PROFILE)
    assert sample.gpus == 1 and sample.partition == site["gpu_partition"]
    prepare = profile_resources("prepare", PROFILE)
    assert prepare.gpus == 0 and prepare.partition == site["cpu_partition"] and prepare.cpus >= 8
    assert profile_resources("train", None).gpus == 0          # no profile: plain defaults


def test_training_on_several_gpus_runs_one_torchrun_per_node():
    cmd = stage_command("train", ["b1_srdit", "--run-dir", "r"], gpus=8)
    assert cmd[:6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "8"]
    assert cmd[6:] == ["-m", "srdit", "train", "b1_srdit", "--run-dir", "r"]
    assert stage_command("sample", ["--out", "x"], gpus=1) == [sys.executable, "-m", "srdit", "sample", "--out", "x"]
    assert stage_command("train", [], gpus=1)[0] == sys.executable


@pytest.mark.parametrize("stage, args, shards, message", [
    ("train", [], 2, "--shards is for the sharded stages"),
    ("nonsense", [], None, "unknown stage 'nonsense'"),
    ("launch", [], None, "unknown stage 'launch'"),
    ("encode", ["--shard", "0"], 2, "not --shard/--num-shards"),
])
def test_launch_refuses_bad_requests(stage, args, shards, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        launch(stage, args, shards=shards, cluster="local", folder=str(tmp_path / "%j"), profile=None)


def srdit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srdit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_local_cluster_runs_a_stage_and_an_array(tmp_path):
    demo = srdit("launch", "demo-data", "--cluster", "local", "--profile", "", "--wait",
                 "--folder", str(tmp_path / "sub/%j"), "--", "--out", "demo", "--per-class", "6", cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert len(list((tmp_path / "demo").rglob("*.JPEG"))) >= 20
    prep = srdit("launch", "prepare", "--cluster", "local", "--profile", "", "--shards", "2", "--wait",
                 "--folder", str(tmp_path / "sub/%j"), "--", "--src", "demo", "--out", "images",
                 "--resolution", "32", "--workers", "1", cwd=tmp_path)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert prep.stdout.count("submitted prepare job") == 2
    assert sorted(p.name for p in (tmp_path / "images").glob("shard*.h5")) == ["shard00000.h5", "shard00001.h5"]


def test_a_failing_stage_fails_the_job(tmp_path):
    result = srdit("launch", "prepare", "--cluster", "local", "--profile", "", "--wait",
                   "--folder", str(tmp_path / "sub/%j"), "--", "--src", "missing", "--out", "x.h5",
                   "--resolution", "32", cwd=tmp_path)
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "exit status" in result.stderr


CHILD = textwrap.dedent("""
    import signal, sys, time, pathlib
    here = pathlib.Path(sys.argv[1])
    def stop(signum, frame):
        (here / "checkpointed").write_text("yes")   # what the trainer does: checkpoint, exit 75
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    (here / "started").write_text("yes")
    while True:
        time.sleep(0.05)
""")


def test_checkpoint_stops_the_stage_and_requeues_a_fresh_copy(tmp_path):
    import submitit

    (tmp_path / "child.py").write_text(CHILD)
    job = StageCommand([sys.executable, str(tmp_path / "child.py"), str(tmp_path)], grace_s=20)
    outcome = {}

    def body():
        try:
            outcome["result"] = job()
        except RuntimeError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=body)
    thread.start()
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline, "the stage did not start"
        time.sleep(0.05)
    # Slurm's warning signal reaches every process of the step; the stage must survive it
    os.killpg(job._proc.pid, signal.SIGUSR2)
    time.sleep(0.3)
    assert job._proc.poll() is None
    resubmission = job.checkpoint()
    thread.join(30)
    assert (tmp_path / "checkpointed").read_text() == "yes"
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    assert isinstance(resubmission.function, StageCommand) and resubmission.function is not job
    assert resubmission.function.command == job.command
    assert f"exit {EXIT_REQUEUE}" in outcome["error"] and "submit the same command again" in outcome["error"]
