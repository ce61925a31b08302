"""Multi-node training and GPU requests against the real Slurm of ci/start-slurm.sh.

That cluster (SLURM_CI_NODES=2, the default) runs two slurmd daemons on this host, nodes
`localhost` and `n2`, each with 2 fake GPUs, in partition `multi`; its TaskProlog sets
SRDIT_DEVICE=cpu in every job (the GPUs are /dev/null: torch finds no CUDA device), so training
runs on the CPU with gloo, one process per allocated GPU.

- every way of asking for GPUs (--gpus, --gres=gpu:N, --gres=gpu:TYPE:N, --gpus-per-node) gives
  the trainer one process per allocated GPU, decided inside the job; a job that wants CUDA and
  finds none stops with the mismatch;
- a 2-node training job of the workflow (profile: nodes 2, one GPU per node) trains, checkpoints
  and resumes on 2 nodes (one `srun` task per GPU, rank 1 on n2), and the run then resumes on 1 node;
- a 2-node job stops for SIGUSR1 with one checkpoint written by both ranks (exit 75), and when a
  rank is killed the whole job ends within a minute, FAILED (the workflow retries it).

Skips without a cluster (or without a partition of 2 nodes), fails with SRDIT_REQUIRE_SLURM=1.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import REQUIRED, _run, cluster, sacct_job, slurm_test_profile, venv_env  # noqa: F401
from test_train import ENTRY, SET_ARGS, write_caches
from workflow_copy import copy_workflow

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def multi(cluster) -> dict:  # noqa: F811
    """The cluster and a partition with at least two nodes."""
    for line in _run("sinfo", "-h", "-o", "%P %D").stdout.splitlines():
        name, count = line.split()
        if int(count) >= 2:
            return dict(cluster, multi=name.rstrip("*"))
    problem = "no Slurm partition has 2 nodes; start the cluster with SLURM_CI_NODES=2 (ci/start-slurm.sh)"
    if REQUIRED:
        pytest.fail(problem)
    pytest.skip(problem)


def gpu(cluster: dict, n: int) -> str:
    return f"gpu:{cluster['gpu_model'] + ':' if cluster['gpu_model'] else ''}{n}"


def sbatch(*args: str, script: str, cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args, "--wrap", script], cwd=cwd, capture_output=True,
                         text=True, timeout=60, env=env or venv_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait_job(job_id: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while _run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip():
        assert time.time() < deadline, f"job {job_id} still queued or running after {timeout:.0f} s"
        time.sleep(1)


def test_every_gpu_request_form_gives_one_process_per_allocated_gpu(multi, tmp_path):
    probe = (f"{sys.executable} -c \"import json; from srdit.distributed import plan_launch; p = plan_launch(); "
             f"print('PLAN', json.dumps(dict(world=p.world_size, nodes=p.nnodes, per_node=p.nproc_per_node, "
             f"device=p.device, method=p.method, evidence=p.evidence)))\"")
    forms = {"gpu": ["--gpus=2"], "gres": [f"--gres={gpu(multi, 2)}"], "gres_untyped": ["--gres=gpu:2"],
             "gpus_per_node": ["--gpus-per-node=2"]}
    env = dict(venv_env(), PYTHONPATH=str(REPO))
    jobs = {name: sbatch("-p", multi["partition"], "-t", "5", "--mem=2000", "-c", "1", "-o", str(tmp_path / f"{name}.out"),
                         *opts, script=probe, cwd=tmp_path, env=env) for name, opts in forms.items()}
    # a job that insists on CUDA (the TaskProlog only sets SRDIT_DEVICE when the job did not)
    jobs["cuda"] = sbatch("-p", multi["partition"], "-t", "5", "--mem=2000", "-c", "1", "--gpus=2", "-o",
                          str(tmp_path / "cuda.out"), script=probe, cwd=tmp_path, env=dict(env, SRDIT_DEVICE="cuda"))
    for job in jobs.values():
        wait_job(job, 300)
    for name in forms:
        out = (tmp_path / f"{name}.out").read_text()
        plans = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("PLAN ")]
        assert plans, out
        plan = plans[0]
        assert (plan["world"], plan["per_node"], plan["device"], plan["method"]) == (2, 2, "cpu", "local"), (name, plan)
        assert "SLURM_GPUS_ON_NODE=2" in plan["evidence"], (name, plan)
    assert "Slurm allocated 2 GPU(s) on this node (SLURM_GPUS_ON_NODE=2) but torch sees no CUDA device" in \
        (tmp_path / "cuda.out").read_text()


def test_two_node_training_jobs_of_the_workflow_then_one_node_resumes(multi, tmp_path):
    work = copy_workflow(tmp_path)
    profile = slurm_test_profile(multi, work)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    train = settings["set-resources"]["train_segment"]
    train.update(slurm_partition=multi["multi"], nodes=2, gres=gpu(multi, 1))     # 2 nodes x 1 GPU
    (profile / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    target = "results/runs/test_tiny/snapshots/step0000004.safetensors"
    result = subprocess.run(["timeout", "-k", "10", "900", sys.executable, "-m", "snakemake", "--profile", str(profile),
                             "--configfile", "config/test_slurm.yaml", "--", target],
                            cwd=work, env=venv_env(), capture_output=True, text=True)
    logs = sorted((work / ".snakemake/slurm_logs").rglob("*.log"))
    run = work / "results/runs/test_tiny"
    attempts = sorted((work / "results/logs/train/test_tiny").rglob("attempts/*.log"))
    text = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in attempts)
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{text}"
    assert (run / "snapshots/step0000002.safetensors").exists() and (work / target).exists()

    # both segments ran as 2-node jobs: one srun task per GPU, rank 1 on the second node
    train_jobs = {log.stem.split("_")[0] for log in logs if "rule_train_segment" in str(log)}
    assert len(train_jobs) == 2, logs
    for job_id in train_jobs:
        row = sacct_job(job_id)[0]
        assert row["state"] == "COMPLETED" and "node=2" in row["tres"] and "gres/gpu=2" in row["tres"], row
    assert text.count("srun starts 1 task(s) on each of 2 nodes") == 2, text
    assert re.search(r"rank 1 on (?!localhost)\S+ uses cpu", text), text
    status = json.loads((run / "status.json").read_text())
    assert (status["world_size"], status["step"]) == (2, 4)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resume = [e for e in events if e.get("event") == "resume"]
    assert [(e["checkpoint"], e["saved_world_size"], e["world_size"]) for e in resume] == [("step0000002", 2, 2)]

    # the same run continues on one node, one GPU: one process takes over the 2-process state
    command = next(line.split("$ ", 1)[1] for line in attempts[-1].read_text().splitlines()
                   if line.startswith("srdit train-job: $ "))
    words = shlex.split(command.split(" -m srdit train ", 1)[1])
    args = []
    for word in words:                                  # the same command without its 2-node shape
        if args and args[-1] in ("--nnodes", "--nproc-per-node"):
            args.pop()
        else:
            args.append(word)
    args[args.index("--until-step") + 1] = "5"
    one = sbatch("-p", multi["partition"], "-t", "10", "--mem=3000", "-c", "1", f"--gres={gpu(multi, 1)}", "-o",
                 str(tmp_path / "one.out"), script=f"{sys.executable} -m srdit train {shlex.join(args)} "
                 f"--set train.max_steps=5 --nproc-per-node 1", cwd=work)
    wait_job(one)
    out = (tmp_path / "one.out").read_text()
    assert sacct_job(one)[0]["state"] == "COMPLETED", out[-3000:]
    assert "resuming a 2-process checkpoint on 1 processes" in out, out[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["world_size"], status["step"]) == ("finished", 1, 5)


def _worker_pid(launch_env: str, rank: int) -> int | None:
    """The pid of the training task of this job with SLURM_PROCID=rank (both nodes are this host)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = dict(e.split("=", 1) for e in environ.read_bytes().decode(errors="replace").split("\0") if "=" in e)
            cmdline = (environ.parent / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if entries.get("SRDIT_RUN_TAG") == launch_env and entries.get("SLURM_PROCID") == str(rank) \
                and entries.get("SRDIT_LAUNCHER") == "srun" and "srdit\0train" in cmdline:
            return int(environ.parent.name)
    return None


def test_two_node_job_signal_then_killed_rank(multi, tmp_path):
    cache = write_caches(tmp_path / "cache")
    run = tmp_path / "run"
    sets = " ".join(f"--set {s}" for s in SET_ARGS)
    tag = f"multinode-{os.getpid()}-{time.time_ns()}"
    env = dict(venv_env(), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SRDIT_RUN_TAG=tag)

    def submit(name: str, extra: str = "") -> str:
        script = (f"{sys.executable} -m srdit train {ENTRY} --run-dir {run} --cache {cache} --until-step 200 {sets} "
                  f"{extra} --nnodes 2 --nproc-per-node 1")
        return sbatch("-p", multi["multi"], "-N", "2", f"--gres={gpu(multi, 1)}", "-c", "1", "--mem=3000", "-t", "15",
                      "-o", str(tmp_path / f"{name}.out"), script=script, cwd=tmp_path, env=env)

    def progress(job: str, steps: int) -> list[int]:
        deadline = time.time() + 400
        while time.time() < deadline:
            path = run / "metrics.jsonl"
            done = [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x] if path.exists() else []
            if len(done) >= steps:
                return done
            assert _run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip(), \
                (tmp_path / f"{job}.out").read_text()[-3000:] if (tmp_path / f"{job}.out").exists() else job
            time.sleep(0.2)
        raise AssertionError(f"job {job} made no progress")

    # 1. SIGUSR1 to the job's steps (every task of every node, as `sbatch --signal=USR1@T` does)
    first = submit("first")
    progress(first, 3)
    subprocess.run(["scancel", "--signal=USR1", first], check=True, timeout=30)
    wait_job(first, 300)
    out = (tmp_path / "first.out").read_text()
    row = sacct_job(first)[0]
    assert row["state"] == "FAILED" and row["exit"] == "75:0", (row, out[-3000:])
    status = json.loads((run / "status.json").read_text())
    k = status["step"]
    assert (status["state"], status["world_size"]) == ("preempted", 2), status
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len([e for e in events if e.get("event") == "checkpoint" and e["step"] == k]) == 1
    assert out.count("got SIGUSR1") >= 2, out[-3000:]                      # both ranks, both nodes

    # 2. resumed on 2 nodes; rank 1's process is killed: srun --kill-on-bad-exit ends the step and
    #    the job fails well within a minute (not at its 15-minute limit)
    second = submit("second", "--set train.ckpt_every=2")
    progress(second, len([e for e in events if "loss" in e]) + 3)
    pid = _worker_pid(tag, 1)
    assert pid, "no rank-1 training task found"
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_job(second, 120)
    took = time.time() - killed
    row = sacct_job(second)[0]
    out = (tmp_path / "second.out").read_text()
    assert took < 60 and row["state"] == "FAILED" and row["exit"] not in ("0:0", "75:0", "3:0"), (took, row, out[-3000:])
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resumed[-1]["checkpoint"] == f"step{k:07d}"
