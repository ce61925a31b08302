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

from srdit.launch import (EXIT_REQUEUE, JobResources, StageCommand, launch, profile_resources, resolve_train_args,
                          sbatch_options, stage_command)
from workflow_copy import copy_workflow

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
    # torchrun of this very interpreter: no bare `torchrun` that PATH may not have
    assert cmd[:8] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                       "--nproc-per-node", "8"]
    assert cmd[8:] == ["-m", "srdit", "train", "b1_srdit", "--run-dir", "r"]
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


def test_sbatch_memory_is_exact_mib_and_gpus_are_asked_as_the_profile_does():
    # the plugin passes mem_mb as `--mem <N>` (Slurm MB = MiB); 480 GB would be 491,520 MiB
    train = profile_resources("train", PROFILE)
    site = yaml.safe_load(PROFILE.read_text())["site"]
    opts = sbatch_options(train)
    assert opts["mem"] == f"{site['node_mem_mb']}M" and opts["mem"] == "480000M"
    # per node (train_gres: multi-node jobs too), gpu_model "" = any GPU
    assert opts["gres"] == site["train_gres"] == f"gpu:{site['node_gpus']}" and "gpus" not in opts
    assert opts["time"] == str(site["train_minutes"]) and opts["cpus-per-task"] == str(site["node_cpus"])
    typed = sbatch_options(JobResources(gpus=8, gpu_model="h100", mem_mb=1500))
    assert typed["gpus"] == "h100:8" and typed["mem"] == "1500M"               # the plugin's --gpus=MODEL:N
    gres = sbatch_options(JobResources(gres="gpu:a100:4"))
    assert gres["gres"] == "gpu:a100:4" and "gpus" not in gres
    assert "gpus" not in sbatch_options(profile_resources("prepare", PROFILE))


def test_a_gres_profile_gives_the_trainer_every_gpu(tmp_path):
    profile = yaml.safe_load(PROFILE.read_text())
    profile["set-resources"]["train_segment"].pop("gpu", None)
    profile["set-resources"]["train_segment"]["gres"] = "gpu:h100:4"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(profile))
    res = profile_resources("train", path)
    assert res.gpus == 4 and sbatch_options(res)["gres"] == "gpu:h100:4"
    assert stage_command("train", [], res.gpus)[7] == "4"


def _workflow_train_commands(work: Path, *args: str) -> list[list[str]]:
    """The `srdit train` arguments of every training job the workflow's dry run plans."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "profiles/local", "-n", "-p", *args],
                            cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line.split(" -m srdit train ", 1)[1].split(" > ")[0].split()
            for line in (result.stdout + result.stderr).splitlines() if " -m srdit train " in line]


def test_launch_train_trains_the_run_the_workflow_trains(tmp_path):
    # demo_srdit trains itself; an evaluation-only entry of it (train_from) must resolve to it
    work = copy_workflow(tmp_path)
    registry = work / "extra.yaml"
    registry.write_text("demo_srdit_ode:\n  parent: demo_srdit\n  train_from: demo_srdit\n"
                        "  description: the demo run sampled with the ODE sampler\n  sample: {mode: ode}\n")
    overlay = work / "overlay.yaml"
    overlay.write_text("extra_registries: [extra.yaml]\n")
    planned = _workflow_train_commands(work, "--configfile=overlay.yaml", "demo_srdit_ode")
    assert planned, "the dry run lists no training job"
    last = max(planned, key=lambda words: int(words[words.index("--until-step") + 1]))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for row in ("demo_srdit", "demo_srdit_ode"):
            args, what = resolve_train_args([row], configfiles=["overlay.yaml"])
            assert args == last, (row, args, last)
            assert "training demo_srdit in results/runs/demo_srdit" in what
        # an earlier stop is the workflow's command of that segment
        first = min(planned, key=lambda words: int(words[words.index("--until-step") + 1]))
        step = first[first.index("--until-step") + 1]
        assert resolve_train_args(["demo_srdit_ode", "--until-step", step], configfiles=["overlay.yaml"])[0] == first
        with pytest.raises(ValueError, match="trains in results/runs/demo_srdit.*Leave --run-dir out"):
            resolve_train_args(["demo_srdit_ode", "--run-dir", "results/runs/demo_srdit_ode"],
                               configfiles=["overlay.yaml"])
        assert resolve_train_args(["demo_srdit", "--run-dir", "results/runs/demo_srdit/"],
                                  configfiles=["overlay.yaml"])[0] == last
    finally:
        os.chdir(cwd)


def test_launch_train_dry_run_names_the_run_and_the_sbatch_options(tmp_path):
    work = copy_workflow(tmp_path)
    result = srdit("launch", "train", "--dry-run", "--configfile", "config/imagenet256.yaml", "--", "b1_srdit",
                   cwd=work)
    assert result.returncode == 0, result.stderr
    run = "b1_sprint_rms_rope_qknorm_valres_cfm_ts"          # the run b1_srdit samples (train_from)
    assert f"row b1_srdit samples run {run}" in result.stdout
    assert "--mem=480000M" in result.stdout and "--gres=gpu:8" in result.stdout
    command = next(line for line in result.stdout.splitlines() if line.startswith("srdit launch: command "))
    assert f"-m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 8 -m srdit train {run} " \
           f"--run-dir results/runs/{run} --cache results/cache/imagenet/latents256-" in command
    assert "--until-step 400000" in command
    refused = srdit("launch", "train", "--dry-run", "--configfile", "config/imagenet256.yaml", "--", "b1_srdit",
                    "--run-dir", "results/runs/b1_srdit", cwd=work)
    assert refused.returncode == 2 and "Leave --run-dir out" in refused.stderr
