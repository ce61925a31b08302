"""Issue 10.4: the GPU count never silently shrinks.

However the site asks Slurm for GPUs (`gpu: N`, `gres: gpu:N`, `gres: gpu:TYPE:N`,
`--gpus-per-node` in slurm_extra), `srdit train` starts one process per GPU the job actually has,
or stops with an error that names the mismatch; it decides from the job's environment at run time
(srdit/distributed.py: plan_launch), and the workflow only adds what it asked for, to be checked.
The environments below are the ones the real Slurm 22.05 of ci/start-slurm.sh gives a job for
each request form (recorded there); tests/test_slurm_multinode.py runs the same forms for real.
"""
from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from srdit.distributed import (LaunchError, LaunchPlan, check_worker_devices, detect_launch, expand_nodelist,
                               plan_launch, requested_shape, run_workers, site_nodes, slurm_gpus_on_node,
                               slurm_job_nodes, srun_command, worker_environment)

# What a batch job (and Snakemake's job step in it) sees for each way of asking for 2 GPUs, as
# recorded on the CI cluster: SLURM_GPUS_ON_NODE is set by all of them.
FORMS = {
    "--gpus=2 (gpu: 2)": {"SLURM_GPUS": "2"},
    "--gres=gpu:2": {},
    "--gres=gpu:ci:2": {},
    "--gpus-per-node=2": {"SLURM_GPUS_PER_NODE": "2"},
}


def job_env(extra=None, nodes="localhost", gpus=2, **more) -> dict:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodes, "SLURM_GPUS_ON_NODE": str(gpus),
           "SLURM_JOB_GPUS": ",".join(str(i) for i in range(gpus)), "CUDA_VISIBLE_DEVICES": ",".join(
               str(i) for i in range(gpus)), "SLURMD_NODENAME": expand_nodelist(nodes)[0],
           "SLURM_JOB_CPUS_PER_NODE": "16", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    env.update(extra or {})
    env.update(more)
    return env


@pytest.mark.parametrize("form", FORMS)
def test_every_request_form_gives_one_process_per_allocated_gpu(form):
    plan = plan_launch(job_env(FORMS[form]), cuda_count=2)
    assert (plan.method, plan.nnodes, plan.nproc_per_node, plan.world_size, plan.device) == ("local", 1, 2, 2, "cuda")
    assert "SLURM_GPUS_ON_NODE=2" in plan.evidence and "torch sees 2" in plan.evidence
    # the workflow's expectation (the same count) passes; one GPU is still one process, here
    assert plan_launch(job_env(FORMS[form]), cuda_count=2, nproc_per_node=2).world_size == 2
    one = plan_launch(job_env(FORMS[form], gpus=1), cuda_count=1, nproc_per_node=1)
    assert (one.method, one.world_size, one.device) == ("inline", 1, "cuda")


def test_older_slurm_without_gpus_on_node_falls_back_to_the_gpu_lists():
    env = job_env()
    del env["SLURM_GPUS_ON_NODE"]
    assert slurm_gpus_on_node(env) == (2, "SLURM_JOB_GPUS=0,1")
    env.pop("SLURM_JOB_GPUS")
    assert slurm_gpus_on_node(dict(env, SLURM_GPUS_PER_NODE="h100:4"))[0] == 4
    assert slurm_gpus_on_node(env)[0] == 0                       # a job without GPUs
    assert slurm_gpus_on_node({"CUDA_VISIBLE_DEVICES": "0"}) == (None, "")      # not in Slurm


@pytest.mark.parametrize("seen, message", [
    (1, "Slurm allocated 2 GPU(s) on this node (SLURM_GPUS_ON_NODE=2) but torch sees 1"),
    (4, "Slurm allocated 2 GPU(s) on this node (SLURM_GPUS_ON_NODE=2) but torch sees 4"),
    (0, "Slurm allocated 2 GPU(s) on this node (SLURM_GPUS_ON_NODE=2) but torch sees no CUDA device"),
])
def test_gpus_torch_does_not_see_stop_the_job(seen, message):
    with pytest.raises(LaunchError) as e:
        plan_launch(job_env(), cuda_count=seen)
    assert message in str(e.value) and "CUDA_VISIBLE_DEVICES=0,1" in str(e.value)
    if seen == 0:
        assert "SRDIT_DEVICE=cpu" in str(e.value)             # how to train on the CPU on purpose


def test_gpus_slurm_did_not_allocate_are_not_taken():
    env = job_env(gpus=0)
    env["CUDA_VISIBLE_DEVICES"] = ""
    with pytest.raises(LaunchError, match="Slurm allocated no GPU to job 4242.*but torch sees 8"):
        plan_launch(env, cuda_count=8)
    cpu = plan_launch(dict(env, SRDIT_DEVICE="cpu"), cuda_count=8)
    assert (cpu.device, cpu.world_size, cpu.method) == ("cpu", 1, "inline")


def test_the_workflow_expectation_is_checked_against_the_allocation():
    with pytest.raises(LaunchError, match=r"asked for 8 GPU\(s\) per node \(--nproc-per-node\), but this job has 2"):
        plan_launch(job_env(), cuda_count=2, nproc_per_node=8)
    with pytest.raises(LaunchError, match=r"asked for 2 node\(s\) \(--nnodes\), but Slurm job 4242 has 1"):
        plan_launch(job_env(), cuda_count=2, nnodes=2)


def test_fake_gpus_with_srdit_device_cpu_still_give_one_process_per_gpu():
    """The CI cluster's GPUs are /dev/null: its jobs say SRDIT_DEVICE=cpu (a TaskProlog), and the
    trainer keeps the shape - one (CPU) process per allocated GPU."""
    plan = plan_launch(job_env(SRDIT_DEVICE="cpu"), cuda_count=0, nproc_per_node=2)
    assert (plan.device, plan.nproc_per_node, plan.method) == ("cpu", 2, "local")
    with pytest.raises(LaunchError, match="SRDIT_DEVICE='gpu'"):
        plan_launch(job_env(SRDIT_DEVICE="gpu"), cuda_count=2)


def test_outside_slurm_every_visible_gpu_or_one_cpu_process():
    assert plan_launch({}, cuda_count=0).method == "inline"
    four = plan_launch({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, cuda_count=4)
    assert (four.method, four.world_size, four.master_addr) == ("local", 4, "127.0.0.1")
    assert plan_launch({}, cuda_count=4, nproc_per_node=2).world_size == 2          # asked for fewer
    with pytest.raises(LaunchError, match="only 4 GPU"):
        plan_launch({}, cuda_count=4, nproc_per_node=8)
    with pytest.raises(LaunchError, match="SRDIT_DEVICE=cuda but torch sees no CUDA device"):
        plan_launch({"SRDIT_DEVICE": "cuda"}, cuda_count=0)
    assert plan_launch({"SRDIT_DEVICE": "cpu"}, cuda_count=0, nproc_per_node=3).world_size == 3


def test_a_worker_never_plans_again():
    assert plan_launch({"RANK": "1", "WORLD_SIZE": "2"}, cuda_count=2) is None
    assert plan_launch(job_env(SLURM_PROCID="3", SLURM_STEP_NUM_TASKS="8"), cuda_count=2) is None


def test_multinode_slurm_job_runs_one_srun_step_with_a_task_per_gpu(monkeypatch):
    monkeypatch.setattr("srdit.distributed.rendezvous_address", lambda host, env=None: f"addr-of-{host}")
    env = job_env(nodes="gpu[011-012]", gpus=4, SLURMD_NODENAME="gpu011")
    plan = plan_launch(env, cuda_count=4, nnodes=2, nproc_per_node=4)
    assert (plan.method, plan.nnodes, plan.nproc_per_node, plan.world_size) == ("srun", 2, 4, 8)
    assert plan.master_addr == "addr-of-gpu011" and plan.master_port > 0      # the job's first node
    cmd = srun_command(plan, ["python", "-m", "srdit", "train", "x"], env)
    assert cmd[:8] == ["srun", "--overlap", "--mem=0", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4",
                       "--cpus-per-task=4", "--kill-on-bad-exit=1"]
    shared = worker_environment(plan, dict(env, SLURM_NTASKS="1", SLURM_STEP_ID="0", SRUN_CPUS_PER_TASK="1"), "id")
    # the nested srun must ask the controller for the allocation, not reuse the step's view of it
    assert shared["SLURM_JOB_ID"] == "4242" and "SLURM_NTASKS" not in shared and "SLURM_JOB_NODELIST" not in shared
    assert "SRUN_CPUS_PER_TASK" not in shared and shared["SRDIT_LAUNCH_ID"] == "id"
    assert (shared["MASTER_ADDR"], shared["MASTER_PORT"], shared["SRDIT_DEVICE"]) == (
        plan.master_addr, str(plan.master_port), "cuda")


def test_snakemake_job_step_sees_the_job_nodes_in_slurm_nodelist():
    # what `srun -n1 --nodes=2` (the plugin's job step) with a cleaned environment gives: SLURM_JOB_NODELIST
    # is the step's node, SLURM_NODELIST the job's
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost,n2"}
    assert slurm_job_nodes(env) == ["localhost", "n2"]


def test_manual_launchers_one_per_node():
    plan = plan_launch({}, cuda_count=0, nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=29555)
    assert (plan.method, plan.node_rank, plan.world_size, plan.master_port) == ("local", 1, 2, 29555)
    with pytest.raises(LaunchError, match="needs one launcher per node"):
        plan_launch({}, cuda_count=0, nnodes=2)
    with pytest.raises(LaunchError, match="same --master-port"):
        plan_launch({}, cuda_count=0, nnodes=2, node_rank=0, master_addr="127.0.0.1")
    with pytest.raises(LaunchError, match="--node-rank 2 is not one of the 2 nodes"):
        plan_launch({}, cuda_count=0, nnodes=2, node_rank=2, master_addr="h", master_port=1)


def test_requested_shape_reads_every_form():
    assert requested_shape({"gpu": 8}) == (1, 8, "gpu: 8 (per job, 1 node(s))")
    assert requested_shape({"gres": "gpu:8"})[:2] == (1, 8)
    assert requested_shape({"gres": "gpu:h100:4", "nodes": 2})[:2] == (2, 4)
    assert requested_shape({"gres": "gpu"})[:2] == (1, 1)
    assert requested_shape({"gres": "gpu:a100"})[:2] == (1, 1)
    assert requested_shape({"gres": "tmpdisk:100,gpu:ci:2"})[:2] == (1, 2)
    assert requested_shape({"slurm_extra": "--signal=B:USR1@300 --gpus-per-node=h100:4", "nodes": 2})[:2] == (2, 4)
    assert requested_shape({"slurm_extra": "--gpus-per-node 4"})[:2] == (1, 4)
    assert requested_shape({"gpu": 16, "nodes": 2})[:2] == (2, 8)              # per job, spread evenly
    assert requested_shape({"mem_mb": 1000}) == (1, None, "no GPU")
    with pytest.raises(ValueError, match="disagree: gpu: 8.*gres: gpu:4"):
        requested_shape({"gpu": 8, "gres": "gpu:4"})
    with pytest.raises(ValueError, match="2 nodes cannot hold an equal share"):
        requested_shape({"gpu": 3, "nodes": 2})


def test_profile_nodes_per_run():
    expr = "4 if wildcards.run.startswith('xl1') else 2"
    assert site_nodes(expr, "xl1_reg_invae") == 4 and site_nodes(expr, "b1_srdit") == 2
    assert site_nodes(1, "x") == 1 and site_nodes("3", "x") == 3 and site_nodes(None, "x") == 1


def test_nodelists():
    assert expand_nodelist("gpu[003-005,010],cpu1") == ["gpu003", "gpu004", "gpu005", "gpu010", "cpu1"]
    assert expand_nodelist("a-[1-2]x,b") == ["a-1x", "a-2x", "b"]
    assert expand_nodelist("localhost,n2") == ["localhost", "n2"]
    # one node: the rendezvous stays on this machine (a node name need not be a host name)
    one = detect_launch({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n2",
                         "SLURM_JOB_NODELIST": "localhost,n2", "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_NODES": "1"})
    assert one.master_addr == "127.0.0.1" and one.launcher == "slurm"
    labelled = detect_launch({"RANK": "0", "WORLD_SIZE": "2", "SRDIT_LAUNCHER": "srun"})
    assert labelled.launcher == "srun"


def test_a_worker_that_would_leave_gpus_idle_is_refused(monkeypatch):
    monkeypatch.setattr("srdit.distributed.cuda_device_count", lambda: 8)
    four = detect_launch({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match=r"4 training process\(es\) on this node but torch sees 8 GPUs"):
        check_worker_devices(four, torch.device("cuda", 0), {})
    eight = detect_launch({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"})
    check_worker_devices(eight, torch.device("cuda", 0), {})
    check_worker_devices(four, torch.device("cpu"), {})                       # the CPU: no GPU to waste
    monkeypatch.setattr("srdit.distributed.cuda_device_count", lambda: 1)     # bound to its own GPU
    check_worker_devices(four, torch.device("cuda", 0), job_env(gpus=4))


# --------------------------------------------------------------------------------------------
# The local launcher: workers live and die together, the exit status is the segment's
# --------------------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    rank, spec = int(os.environ["RANK"]), json.loads(sys.argv[1])
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    deadline = time.time() + spec.get("run_s", 60)
    while time.time() < deadline and not got:
        if rank == spec.get("die_rank") and time.time() > deadline - spec.get("run_s", 60) + 0.5:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
    if got and rank == 0 and spec.get("status"):
        with open(spec["status"], "w") as f:
            json.dump({"state": "preempted", "exit_code": 75, "launch_id": os.environ["SRDIT_LAUNCH_ID"]}, f)
    sys.exit(spec["codes"][rank] if got or "codes_now" not in spec else spec["codes_now"][rank])
""")


def _plan(n: int) -> LaunchPlan:
    return LaunchPlan(nnodes=1, nproc_per_node=n, node_rank=0, master_addr="127.0.0.1", master_port=1,
                      device="cpu", method="local", evidence="test")


def _argv(tmp_path: Path, **spec) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [sys.executable, str(script), json.dumps(spec)]


def test_a_killed_worker_takes_the_others_down_after_the_grace_time(tmp_path):
    started = time.monotonic()
    code = run_workers(_plan(3), _argv(tmp_path, die_rank=1, run_s=120, codes=[0, 0, 0]), {}, grace_s=2)
    assert code == 128 + signal.SIGKILL                   # the failing worker's status, not the killed ones'
    assert time.monotonic() - started < 30


def test_a_signal_to_the_launcher_reaches_every_worker_and_the_recorded_outcome_wins(tmp_path):
    import threading
    status = tmp_path / "status.json"
    argv = _argv(tmp_path, run_s=60, codes=[75, 1, 1], status=str(status))
    threading.Timer(2.0, lambda: signal.raise_signal(signal.SIGUSR1)).start()
    # every worker got the signal (each exits with its code only then); rank 0 recorded 75 for
    # this launch, which is the launcher's status although the others exited 1
    assert run_workers(_plan(3), argv, {}, run_dir=tmp_path, grace_s=20) == 75
    assert json.loads(status.read_text())["exit_code"] == 75


def test_the_common_exit_status_passes_through(tmp_path):
    assert run_workers(_plan(2), _argv(tmp_path, run_s=0, codes_now=[3, 3], codes=[0, 0]), {}) == 3
    assert run_workers(_plan(2), _argv(tmp_path, run_s=0, codes_now=[0, 2], codes=[0, 0]), {}) == 2
