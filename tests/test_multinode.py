"""Issue 13: training across nodes, on the CPU, with two "nodes" that are two launchers on this
machine rendezvousing over 127.0.0.1 (gloo), as `srdit train --nnodes 2 --node-rank R
--master-addr A --master-port P` runs on each node of a cluster without Slurm (under Slurm the
same trainer is started by one `srun` step instead: tests/test_slurm_multinode.py).

- a 2-node run (2 x 1 process) trains exactly as one node with 2 processes does (bitwise), and
  its checkpoint resumes on one node with the weights, EMA and AdamW state carried over exactly;
- SIGUSR1 sent to one node reaches every rank: both stop at the same step, the checkpoint is
  written once, both exit 75 (requeue and resume);
- a killed rank stops the whole job within a minute, with a status the workflow retries, and the
  run resumes from its last checkpoint on one node;
- the dry run of a 2-node site asks Slurm for 2 nodes per training job and starts the trainer
  with the shape it checks (`--nnodes 2 --nproc-per-node G`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train import ENTRY, SET_ARGS, _env, assert_same, state_at, write_caches
from test_workflow import parse_dry_run, snakemake
from workflow_copy import copy_workflow

from srdit import checkpoint as ckpt
from srdit.config import get_config
from srdit.train import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]
N = 3


def env() -> dict:
    out = _env()
    for key in [k for k in out if k.startswith("SLURM_")]:      # these tests are no Slurm job
        out.pop(key)
    out["SRDIT_PEER_GRACE_S"] = "20"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(run: Path, cache: Path, until: int, *extra: str) -> list[str]:
    sets = [a for s in SET_ARGS for a in ("--set", s)]
    return [sys.executable, "-m", "srdit", "train", ENTRY, "--run-dir", str(run), "--cache", str(cache),
            "--until-step", str(until), *sets, *extra]


def start_nodes(tmp: Path, run: Path, cache: Path, until: int, *extra: str, tag: str = "") -> list[subprocess.Popen]:
    """Two launchers, one per "node", each starting its node's worker."""
    port = free_port()
    procs = []
    for node in (0, 1):
        log = open(tmp / f"node{node}{tag}.log", "w")
        procs.append(subprocess.Popen(
            train_cmd(run, cache, until, *extra, "--nnodes", "2", "--node-rank", str(node),
                      "--master-addr", "127.0.0.1", "--master-port", str(port)),
            cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def logs(tmp: Path, tag: str = "") -> str:
    return "\n".join(f"--- node {n}\n" + (tmp / f"node{n}{tag}.log").read_text()[-3000:] for n in (0, 1))


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loss_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [e["step"] for e in events(run) if "loss" in e] if path.exists() else []


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_caches(tmp_path_factory.mktemp("cache"))


def test_two_nodes_train_as_one_node_does_and_resume_exactly_on_one_node(cache, tmp_path):
    nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    procs = start_nodes(tmp_path, nodes, cache, N)
    # the reference: one launcher starting two processes on this "node"
    ref = subprocess.run(train_cmd(one_node, cache, N, "--nproc-per-node", "2"), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=600)
    assert wait_all(procs) == [0, 0], logs(tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = logs(tmp_path)
    assert "world size 2 = 2 node(s) x 1 process(es) on cpu; 1 worker process(es) on this node (node 1 of 2)" in out
    assert "world size 2 (2 node(s) x 1 process(es), launcher local, backend gloo); rank 1" in out
    assert "world size 2 = 1 node(s) x 2 process(es) on cpu" in ref.stderr
    assert status(nodes)["world_size"] == 2 and status(nodes)["step"] == N

    # bitwise the same run: model, EMA, AdamW state, and each rank's RNG states and data position
    a, b = state_at(nodes, N), state_at(one_node, N)
    for key in ("model", "ema", "optimizer", "step", "world_size", "micro_batch", "accumulation"):
        assert_same(a[key], b[key], key)
    for r in (0, 1):
        assert_same(state_at(nodes, N, f"rank{r:05d}.pt"), state_at(one_node, N, f"rank{r:05d}.pt"), f"rank{r}")

    # the 2-node checkpoint resumes on one node, one process: the weights, EMA and AdamW moments
    # and step count carry over exactly, so one more step is exactly the AdamW + EMA update of them
    single = subprocess.run(train_cmd(nodes, cache, N + 1), cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "resuming a 2-process checkpoint on 1 processes" in single.stderr
    resume = [e for e in events(nodes) if e.get("event") == "resume"][-1]
    assert (resume["checkpoint"], resume["saved_world_size"], resume["world_size"]) == (ckpt.step_tag(N), 2, 1)
    before, after = state_at(nodes, N), state_at(nodes, N + 1)
    assert (after["world_size"], after["accumulation"], after["optimizer"]["step"]) == (1, 2, N + 1)
    assert state_at(nodes, N + 1, "rank00000.pt")["loader"]["position"] == (N + 1) * 2   # same data order
    cfg = get_config(ENTRY)
    b1, b2 = cfg.train.betas
    for name, m1 in after["optimizer"]["exp_avg"].items():
        m0, v0 = before["optimizer"]["exp_avg"][name], before["optimizer"]["exp_avg_sq"][name]
        v1 = after["optimizer"]["exp_avg_sq"][name]
        grad = (m1 - b1 * m0) / (1 - b1)
        torch.testing.assert_close(v1, b2 * v0 + (1 - b2) * grad * grad, rtol=1e-4, atol=1e-12)
        k = N + 1
        update = cfg.train.lr * (m1 / (1 - b1 ** k)) / ((v1 / (1 - b2 ** k)).sqrt() + cfg.train.eps)
        torch.testing.assert_close(after["model"][name], before["model"][name] - update, rtol=0, atol=1e-7)
    for name, e1 in after["ema"].items():
        if e1.is_floating_point():
            torch.testing.assert_close(e1, torch.lerp(before["ema"][name], after["model"][name],
                                                      1 - cfg.train.ema_decay), rtol=0, atol=1e-7)


def test_a_signal_reaches_every_rank_then_a_killed_rank_stops_the_job_and_one_node_resumes(cache, tmp_path):
    run = tmp_path / "run"
    every = ("--set", "train.ckpt_every=2")          # from the second launch on (a key a segment may change)

    # 1. SIGUSR1 to node 1's launcher only: it passes it to its worker, the ranks agree in their
    #    next step, write one checkpoint together and both nodes exit 75
    procs = start_nodes(tmp_path, run, cache, 200, tag="-a")             # no periodic checkpoint
    deadline = time.monotonic() + 300
    while len(loss_steps(run)) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), logs(tmp_path, "-a")
    procs[1].send_signal(signal.SIGUSR1)
    assert wait_all(procs, 300) == [EXIT_REQUEUE, EXIT_REQUEUE], logs(tmp_path, "-a")
    st = status(run)
    k = st["step"]
    assert (st["state"], st["exit_code"], st["world_size"]) == ("preempted", EXIT_REQUEUE, 2) and 3 <= k < 200
    saved = [e for e in events(run) if e.get("event") == "checkpoint" and e["step"] == k]
    assert len(saved) == 1 and saved[0]["reason"] == "preempted"                  # written once
    assert sorted(p.name for p in (run / "checkpoints" / ckpt.step_tag(k)).iterdir() if p.name.startswith("rank")) \
        == ["rank00000.pt", "rank00001.pt"]
    assert [s["state"] for s in map(json.loads, (run / "segments.jsonl").read_text().splitlines())] == ["preempted"]
    assert "got SIGUSR1" in (tmp_path / "node1-a.log").read_text()

    # 2. both nodes resume; then node 1's rank is killed (SIGKILL: no handler, no checkpoint):
    #    node 0's rank fails in its next collective and the whole job is down within a minute,
    #    with a failure status (retried by the workflow), not 0 / 75 / 3
    procs = start_nodes(tmp_path, run, cache, 200, *every, tag="-b")
    deadline = time.monotonic() + 300
    while max(loss_steps(run)) < k + 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), logs(tmp_path, "-b")
    workers = children(procs[1].pid)
    assert len(workers) == 1, workers
    killed_at = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    codes = wait_all(procs, 120)
    took = time.monotonic() - killed_at
    assert took < 60, f"the job took {took:.0f} s to stop after a rank was killed\n{logs(tmp_path, '-b')}"
    assert codes[1] == 128 + signal.SIGKILL and codes[0] not in (0, EXIT_REQUEUE, 3), (codes, logs(tmp_path, "-b"))
    resumed = [e for e in events(run) if e.get("event") == "resume"]
    assert resumed[-1]["checkpoint"] == ckpt.step_tag(k)
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    last_good = int(latest.name[len("step"):])
    assert last_good >= k                              # the preemption checkpoint or a periodic one after it

    # 3. one node takes over from the last checkpoint and finishes the segment
    single = subprocess.run(train_cmd(run, cache, last_good + 2, *every), cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    resume = [e for e in events(run) if e.get("event") == "resume"][-1]
    assert (resume["checkpoint"], resume["saved_world_size"], resume["world_size"]) == (latest.name, 2, 1)
    assert (status(run)["state"], status(run)["step"], status(run)["world_size"]) == ("segment_done", last_good + 2, 1)


def test_dry_run_of_a_two_node_site(tmp_path):
    """The site sets train_nodes 2 (and XL/1 on 4 nodes, per row): every training job asks Slurm
    for its nodes (sbatch --nodes) and GPUs per node, and starts `srdit train` with that shape."""
    work = copy_workflow(tmp_path)
    (work / "imagenet").mkdir()
    (work / "site.yaml").write_text(yaml.safe_dump({"data": {"source": "imagenet"}}))
    profile = work / "profiles/slurm/config.yaml"
    data = yaml.safe_load(profile.read_text())
    site = data["site"]
    text = profile.read_text()
    text = text.replace(f'train_gres: &train_gres "{site["train_gres"]}"', 'train_gres: &train_gres "gpu:a100:4"')
    text = text.replace(f"train_nodes: &train_nodes {site['train_nodes']}",
                        "train_nodes: &train_nodes \"4 if wildcards.run.startswith('xl1') else 2\"")
    profile.write_text(text)
    assert yaml.safe_load(text)["set-resources"]["train_segment"]["nodes"].startswith("4 if")
    result = snakemake(work, "-n", "--profile", "profiles/slurm", "--configfile", "config/imagenet256.yaml",
                       "site.yaml", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trains = [j for j in parse_dry_run(result.stdout + result.stderr) if j["rule"] == "train_segment"]
    assert {j["wildcards"]["run"] for j in trains} >= {"xl1_reg_invae", "b1_sprint_rms_rope_qknorm_valres_cfm_ts"}
    for job in trains:
        nodes = "4" if job["wildcards"]["run"].startswith("xl1") else "2"
        assert job["resources"]["nodes"] == nodes and job["resources"]["gres"] == "gpu:a100:4", job["resources"]
        assert f" -m srdit train {job['wildcards']['run']} " in job["shell"]
        assert job["shell"].rstrip().endswith(f"--nnodes {nodes} --nproc-per-node 4") or \
            f"--nnodes {nodes} --nproc-per-node 4" in job["shell"], job["shell"]
        assert "torch.distributed.run" not in job["shell"] and "--standalone" not in job["shell"]
