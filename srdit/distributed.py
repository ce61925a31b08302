"""Launch and rendezvous: one process per GPU, on one node or several, from Slurm or by hand.

`srdit train` is its own launcher. Started once (a Snakemake job, a batch script, a shell), it
looks at what the job actually has - the Slurm allocation (SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE
and friends), CUDA_VISIBLE_DEVICES and torch.cuda.device_count() - and starts one training
process per GPU (`plan_launch`, `launch_workers`):

- one node, one GPU or the CPU: this process trains ("inline");
- one node, G GPUs: G worker processes on this node ("local"), with torchrun's environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, ...);
- N nodes in a Slurm job: `srun --nodes N --ntasks-per-node G --kill-on-bad-exit` starts the
  N x G workers directly ("srun"); the rendezvous is on the first node of the job;
- N "nodes" by hand (`--nnodes N --node-rank R --master-addr A --master-port P`, one launcher
  per node, e.g. two launchers on one machine over 127.0.0.1): each launcher starts its node's
  workers ("local").

It never silently uses fewer GPUs than the job has: GPUs allocated by Slurm (however the site
asked: `gpu: N`, `gres: gpu:N`, `gres: gpu:TYPE:N`, `--gpus-per-node`) that torch does not see,
GPUs torch sees that Slurm did not allocate, or a shape that differs from the one the workflow
asked for (`--nnodes`, `--nproc-per-node`) stop the job at once with an error naming the
mismatch (`LaunchError`). SRDIT_DEVICE=cpu trains on the CPU on purpose (one process per
allocated GPU, e.g. on a test cluster whose GPUs are fake); SRDIT_DEVICE=cuda insists on GPUs.

Failures: the workers of a launch live and die together. `srun --kill-on-bad-exit` ends the step
when one task fails or its node is lost; the local launcher gives the other workers
SRDIT_PEER_GRACE_S (default 30 s) to stop by themselves (gloo and NCCL errors in their next
collective), then kills them. Collectives time out after SRDIT_DIST_TIMEOUT_MIN (default 10)
minutes instead of torch's 30. The launcher's exit status is the segment's (0, 75 "requeue and
resume", 3 diverged) as rank 0 recorded it in the run's status.json for this launch, else the
failing worker's. SIGTERM, SIGUSR1 and SIGINT sent to the launcher are passed on to every worker
(srun passes them to every task), and the workers agree on the stop in their next step, so the
checkpoint is written once, by all ranks together.

Where the process group comes from, in a worker (`detect_launch`), in order:
1. torchrun or this launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set.
2. Slurm, one task per GPU started by `srun` (this launcher, submitit, or a batch script's own
   `srun --ntasks-per-node 8 python -m srdit train ...`): SLURM_PROCID / SLURM_LOCALID give the
   ranks; the rendezvous host is the first node of SLURM_JOB_NODELIST (127.0.0.1 for a one-node
   step) and the port is derived from the job id, unless MASTER_ADDR / MASTER_PORT are set.
3. Neither: a single process on a free local port.

The backend is NCCL when CUDA is available and gloo otherwise (the CPU tests and the demo).
DeepSpeed's `init_distributed` creates the group, with MPI discovery off: the environment
above is the only source of truth.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

# Environment variables the launcher sets for its workers (besides torchrun's RANK, WORLD_SIZE, ...).
LAUNCH_ID_ENV = "SRDIT_LAUNCH_ID"      # rank 0 records it in status.json: the outcome of this launch
LAUNCHER_ENV = "SRDIT_LAUNCHER"        # "local" or "srun": how the worker was started (env.json, the log)


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str            # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _split_top_level(text: str) -> list[str]:
    """'a[1-2],b,c[3,5]' -> ['a[1-2]', 'b', 'c[3,5]']: split at commas outside brackets."""
    parts, depth, begin = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[begin:i])
            begin = i + 1
    parts.append(text[begin:])
    return [p for p in (q.strip() for q in parts) if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """A Slurm node list, expanded: 'gpu[003-005,010],cpu1' -> gpu003 gpu004 gpu005 gpu010 cpu1.

    Handles the compressed forms Slurm writes (prefix[range,range]suffix, zero padding kept)
    without calling `scontrol show hostnames`, which compute nodes do not always have on PATH.
    """
    hosts = []
    for group in _split_top_level(nodelist.strip()):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", group)
        if not m:
            hosts.append(group)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    return hosts


def slurm_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError("SLURM_JOB_NODELIST is empty; cannot pick a rendezvous host")
    return hosts[0]


def _slurm_tasks_per_node(environ) -> int:
    """'4(x2)' or '4,2' -> 4 (the count on the first node), as Slurm spells it."""
    raw = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
    m = re.match(r"(\d+)", raw)
    return int(m.group(1)) if m else 1


def detect_launch(environ=None) -> LaunchInfo:
    """Where this process sits in the job, read from the launcher's environment variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchInfo(rank=int(env["RANK"]), world_size=world,
                          local_rank=int(env.get("LOCAL_RANK", 0)),
                          local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=int(env.get("MASTER_PORT", 29500)),
                          launcher=env.get(LAUNCHER_ENV) or "torchrun")
    # srun sets SLURM_STEP_NUM_TASKS for the job step it starts; the batch script itself is a
    # single task even when the allocation has many, so only trust a step with several tasks.
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "SLURM_PROCID" in env and step_tasks > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        step_nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        one_node = int(env.get("SLURM_STEP_NUM_NODES") or len(expand_nodelist(step_nodes)) or 1) == 1
        master = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else slurm_first_host(step_nodes))
        return LaunchInfo(rank=int(env["SLURM_PROCID"]), world_size=step_tasks,
                          local_rank=int(env.get("SLURM_LOCALID", 0)),
                          local_world_size=_slurm_tasks_per_node(env),
                          master_addr=master,
                          master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
                          launcher=env.get(LAUNCHER_ENV) or "slurm")
    return LaunchInfo(rank=0, world_size=1, local_rank=0, local_world_size=1,
                      master_addr="127.0.0.1", master_port=free_port(), launcher="single")


def pick_device(info: LaunchInfo) -> torch.device:
    """cuda:<local rank> when GPUs are visible (modulo the count, for one-GPU-per-task
    allocations where each task sees only its own GPU), else the CPU. SRDIT_DEVICE=cpu forces
    the CPU (and gloo) on a GPU machine, e.g. for the tests."""
    wanted = os.environ.get("SRDIT_DEVICE", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"SRDIT_DEVICE={wanted!r}; allowed: auto, cpu, cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SRDIT_DEVICE=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    if wanted != "cpu" and torch.cuda.is_available():
        index = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_process_group(info: LaunchInfo, device: torch.device) -> str:
    """Create the process group through DeepSpeed; returns the backend name."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cpu":
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op when the
        # group is created (half a minute, and a C++ compiler). Only its inference all-reduce
        # uses it; training reduces through gloo. DeepSpeed keeps the table of compatible ops
        # as an editable dict: mark the op unavailable so that it is not built.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed and torch's env:// rendezvous read these; Slurm launches do not set them. A node
    # name that is no host name (several slurmd on one machine) becomes Slurm's NodeAddr for it.
    master = rendezvous_address(info.master_addr) if info.world_size > 1 else info.master_addr
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_RANK=str(info.local_rank), LOCAL_WORLD_SIZE=str(info.local_world_size),
                      MASTER_ADDR=master, MASTER_PORT=str(info.master_port))
    # A rank that died leaves the others in a collective: fail it after this long, not torch's
    # 30 minutes (the launcher stops the job sooner still; see the module docstring).
    minutes = float(os.environ.get("SRDIT_DIST_TIMEOUT_MIN", "10"))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=info.rank, world_size=info.world_size,
                               timeout=datetime.timedelta(minutes=minutes))
    return backend


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (e.g. 'stop now' flags every rank must agree on)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (returns a new tensor)."""
    t = t.detach().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t /= torch.distributed.get_world_size()
    return t


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter from rank `src` to the other ranks, in place (0-dim ones included)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    with torch.no_grad():
        for p in module.parameters():
            torch.distributed.broadcast(p.data.view(-1), src=src)   # view(-1): same storage, >= 1-dim


def shutdown() -> None:
    """Destroy the process group through DeepSpeed, which also drops the groups it cached, so
    that a later `init_process_group` in the same process (notebooks, tests) starts clean."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm
        deepspeed.comm.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The launcher: what the job has, and one process per GPU
# --------------------------------------------------------------------------------------------

class LaunchError(RuntimeError):
    """The job's GPUs or nodes do not match what training would use; nothing was started."""


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int
    nproc_per_node: int
    node_rank: int | None      # None: srun places the tasks (ranks from SLURM_PROCID)
    master_addr: str
    master_port: int
    device: str                # "cuda" or "cpu"
    method: str                # "inline" (this process trains), "local" (workers here), "srun"
    evidence: str              # what the decision was made from, for the log

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def describe(self) -> str:
        how = {"inline": "this process trains",
               "local": f"{self.nproc_per_node} worker process(es) on this node"
                        + (f" (node {self.node_rank} of {self.nnodes})" if self.nnodes > 1 else ""),
               "srun": f"srun starts {self.nproc_per_node} task(s) on each of {self.nnodes} nodes"}[self.method]
        return (f"world size {self.world_size} = {self.nnodes} node(s) x {self.nproc_per_node} process(es) on "
                f"{self.device}; {how}; rendezvous {self.master_addr}:{self.master_port}; from {self.evidence}")


def slurm_job_nodes(environ) -> list[str]:
    """The nodes of the Slurm job this process runs in (not of its step). Inside a step that srun
    started with a cleaned environment (Snakemake's job step does that), SLURM_JOB_NODELIST names
    the step's node only and SLURM_NODELIST keeps the job's: the longer list is the job's."""
    lists = [expand_nodelist(environ.get(name) or "") for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST")]
    hosts = max(lists, key=len)
    if hosts:
        return hosts
    count = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    return [environ.get("SLURMD_NODENAME", "localhost")] * count


def slurm_gpus_on_node(environ) -> tuple[int | None, str]:
    """(GPUs Slurm allocated to this job on this node, the variable that says so); (None, "") outside
    Slurm. Every way of asking (--gpus, --gres=gpu:[TYPE:]N, --gpus-per-node) sets
    SLURM_GPUS_ON_NODE; the lists and the per-node request are fallbacks for older Slurm."""
    if "SLURM_JOB_ID" not in environ:
        return None, ""
    value = environ.get("SLURM_GPUS_ON_NODE")
    if value not in (None, ""):
        return int(value), f"SLURM_GPUS_ON_NODE={value}"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = environ.get(name)
        if value:
            return len([g for g in value.split(",") if g.strip()]), f"{name}={value}"
    value = environ.get("SLURM_GPUS_PER_NODE")
    if value:
        m = re.search(r"(\d+)\s*$", value)
        if m:
            return int(m.group(1)), f"SLURM_GPUS_PER_NODE={value}"
    return 0, "no GPU allocated (no SLURM_GPUS_ON_NODE)"


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _visible(environ) -> str:
    return f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_address(host: str, environ=None) -> str:
    """`host` when it resolves, else the NodeAddr Slurm knows for a node of that name (node names
    are not always host names, e.g. several slurmd on one machine); else a LaunchError."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=30)
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if out.returncode == 0 and m:
            return m.group(1)
    raise LaunchError(f"the rendezvous host {host!r} (the job's first node) does not resolve and Slurm knows "
                      f"no NodeAddr for it; set MASTER_ADDR to an address every node can reach")


def plan_launch(environ=None, *, cuda_count: int | None = None, nnodes: int | None = None,
                nproc_per_node: int | None = None, node_rank: int | None = None, master_addr: str | None = None,
                master_port: int | None = None) -> LaunchPlan | None:
    """How to start training from this (single, launcher) process; None in a worker (torchrun,
    this launcher or srun already gave it a rank). `nnodes` / `nproc_per_node` are what the
    caller expects (the workflow passes what its rule asked Slurm for): under Slurm they must
    match the allocation; outside it they set the shape (`node_rank` and `master_addr` then
    make this one of several launchers, one per node). Raises LaunchError on any mismatch."""
    env = os.environ if environ is None else environ
    if detect_launch(env).launcher != "single":
        return None
    wanted = env.get("SRDIT_DEVICE", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"SRDIT_DEVICE={wanted!r}; allowed: auto, cpu, cuda")
    cuda = cuda_device_count() if cuda_count is None else cuda_count
    manual = node_rank is not None or master_addr is not None
    in_slurm = "SLURM_JOB_ID" in env and not manual
    evidence = [f"torch sees {cuda} CUDA device(s) ({_visible(env)})", f"SRDIT_DEVICE={wanted}"]
    if in_slurm:
        nodes = slurm_job_nodes(env)
        gpn, how = slurm_gpus_on_node(env)
        evidence[:0] = [f"Slurm job {env['SLURM_JOB_ID']} on {len(nodes)} node(s) ({','.join(nodes)}), {how}"]
        if nnodes is not None and nnodes != len(nodes):
            raise LaunchError(f"the workflow asked for {nnodes} node(s) (--nnodes), but Slurm job "
                              f"{env['SLURM_JOB_ID']} has {len(nodes)} ({','.join(nodes)}); check the `nodes` "
                              f"resource of train_segment in the profile")
        n = len(nodes)
    else:
        gpn, n = None, nnodes or 1
        if n > 1 and (node_rank is None or master_addr is None):
            raise LaunchError(f"--nnodes {n} outside a Slurm job needs one launcher per node, each with "
                              f"--node-rank and the same --master-addr/--master-port")
        if node_rank is not None and not 0 <= node_rank < n:
            raise LaunchError(f"--node-rank {node_rank} is not one of the {n} nodes (0..{n - 1})")

    if wanted == "cpu" or (wanted == "auto" and cuda == 0 and not gpn):
        device = "cpu"
        per_node = gpn or nproc_per_node or 1      # one process per allocated (fake) GPU, else as asked
    else:
        if cuda == 0:
            allocated = f"Slurm allocated {gpn} GPU(s) on this node ({how}) but" if gpn else "SRDIT_DEVICE=cuda but"
            raise LaunchError(f"{allocated} torch sees no CUDA device ({_visible(env)}, torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}); fix the driver/torch "
                              f"install or set SRDIT_DEVICE=cpu to train on the CPU on purpose")
        if in_slurm and not gpn:
            raise LaunchError(f"Slurm allocated no GPU to job {env['SLURM_JOB_ID']} ({how}), but torch sees {cuda} "
                              f"({_visible(env)}): they are not this job's. Ask for GPUs in the profile (gpu, gres or "
                              f"--gpus-per-node) or set SRDIT_DEVICE=cpu")
        if in_slurm and cuda != gpn:
            raise LaunchError(f"Slurm allocated {gpn} GPU(s) on this node ({how}) but torch sees {cuda} "
                              f"({_visible(env)}): training would not use every allocated GPU")
        per_node = gpn if in_slurm else (nproc_per_node or cuda)
        if per_node > cuda:
            raise LaunchError(f"{per_node} process(es) per node asked for (--nproc-per-node) but torch sees only "
                              f"{cuda} GPU(s) ({_visible(env)})")
        device = "cuda"
    if nproc_per_node is not None and nproc_per_node != per_node:
        raise LaunchError(f"the workflow asked for {nproc_per_node} GPU(s) per node (--nproc-per-node), but "
                          f"this job has {per_node} ({'; '.join(evidence)}); one process per allocated GPU, "
                          f"so check the GPU request of train_segment in the profile")

    if n == 1 and per_node == 1:
        method, rank0, addr, port = "inline", 0, "127.0.0.1", 0
    elif in_slurm and n > 1:
        method, rank0 = "srun", None
        here = env.get("SLURMD_NODENAME")
        addr = rendezvous_address(nodes[0], env)
        port = master_port or (free_port() if here == nodes[0] else 20000 + int(env["SLURM_JOB_ID"]) % 20000)
    else:
        method = "local"
        rank0 = node_rank if n > 1 else 0
        addr = master_addr or "127.0.0.1"
        if n > 1 and not master_port:
            raise LaunchError("several launchers (--nnodes > 1 outside Slurm) need the same --master-port")
        port = master_port or free_port()
    return LaunchPlan(nnodes=n, nproc_per_node=per_node, node_rank=rank0, master_addr=addr, master_port=port,
                      device=device, method=method, evidence="; ".join(evidence))


def add_launch_arguments(parser) -> None:
    """The launcher options of `srdit train`, and the hook that keeps the command line for the
    workers (they run the same command; the environment makes them workers)."""
    group = parser.add_argument_group("launch (one process per GPU; see srdit/distributed.py)")
    group.add_argument("--nnodes", type=int, default=None,
                       help="nodes of the job: under Slurm checked against the allocation, else one launcher "
                            "per node with --node-rank/--master-addr/--master-port")
    group.add_argument("--nproc-per-node", type=int, default=None,
                       help="processes (GPUs) per node: under Slurm checked against the allocated GPUs; "
                            "default: every GPU the job has, or 1 on the CPU")
    group.add_argument("--node-rank", type=int, default=None, help="this launcher's node, 0..nnodes-1 (by hand)")
    group.add_argument("--master-addr", default=None, help="rendezvous host, node 0's address (by hand)")
    group.add_argument("--master-port", type=int, default=None, help="rendezvous port (by hand)")
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse(args, namespace)
        ns.launch_argv = list(sys.argv[1:] if args is None else args)
        return ns, extras

    parser.parse_known_args = parse_known_args


def launch_workers(args, command: str = "train", environ=None) -> int | None:
    """The launcher step of `srdit train`: None when this process should train itself (a worker,
    or one process is all the job has); else start the workers, wait, and return the exit status.
    Prints the plan (and LaunchError's message, exit 2) for the job log."""
    env = dict(os.environ if environ is None else environ)
    try:
        plan = plan_launch(env, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                           master_addr=args.master_addr, master_port=args.master_port)
    except LaunchError as e:
        print(f"srdit {command}: {e}", file=sys.stderr, flush=True)
        return 2
    if plan is None:
        return None
    print(f"srdit {command}: {plan.describe()}", file=sys.stderr, flush=True)
    if plan.method == "inline":
        os.environ["SRDIT_DEVICE"] = plan.device
        return None
    argv = [sys.executable, "-m", "srdit", command, *getattr(args, "launch_argv", [])]
    run_dir = getattr(args, "run_dir", None)
    return run_workers(plan, argv, env, run_dir=Path(run_dir) if run_dir else None)


def worker_environment(plan: LaunchPlan, env: dict, launch_id: str) -> dict:
    """The environment every worker shares: no step-level Slurm settings (a nested srun would
    take them as its own defaults; the job identity stays), the rendezvous and the decided device."""
    out = {k: v for k, v in env.items()
           if not (k.startswith(("SRUN_", "SBATCH_")) or (k.startswith("SLURM_") and k not in _SLURM_IDENTITY))}
    if plan.method != "srun":
        out = dict(env)                    # local workers keep the whole Slurm picture (receipts, checks)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        out.pop(key, None)
    out.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port), SRDIT_DEVICE=plan.device,
               **{LAUNCH_ID_ENV: launch_id, LAUNCHER_ENV: plan.method})
    return out


# What a nested srun may inherit: the job's identity only, so that it asks the controller for the
# allocation (inside Snakemake's job step SLURM_JOB_NODELIST names that step's node only, and srun
# would take it for the whole allocation: "Only allocated 1 nodes asked for 2").
_SLURM_IDENTITY = {"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CLUSTER_NAME",
                   "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST", "SLURM_CONF"}
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def srun_command(plan: LaunchPlan, argv: list[str], env: dict) -> list[str]:
    """One srun step with a task per GPU on every node of the job. --overlap and --mem=0: the
    step may share the node with the step this launcher runs in (Snakemake's job step holds the
    first node's CPUs and memory). --kill-on-bad-exit: one failed task ends them all."""
    per_node_cpus = re.match(r"(\d+)", env.get("SLURM_JOB_CPUS_PER_NODE") or env.get(
        "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0") or env.get("SLURM_CPUS_ON_NODE") or "")
    cpus = max(1, int(per_node_cpus.group(1)) // plan.nproc_per_node) if per_node_cpus else 1
    return ["srun", "--overlap", "--mem=0", f"--nodes={plan.nnodes}", f"--ntasks={plan.world_size}",
            f"--ntasks-per-node={plan.nproc_per_node}", f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1",
            "--export=ALL", *argv]


def _code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run_workers(plan: LaunchPlan, argv: list[str], env: dict, run_dir: Path | None = None,
                grace_s: float | None = None) -> int:
    """Start the plan's workers (local processes, or one srun step), pass signals on, wait.

    Workers that outlive the first one to exit by `grace_s` (SRDIT_PEER_GRACE_S, 30) are killed.
    The exit status: what rank 0 recorded for this launch in `run_dir`/status.json, else the
    common or the first failing worker's status."""
    grace_s = float(env.get("SRDIT_PEER_GRACE_S", "30")) if grace_s is None else grace_s
    launch_id = uuid.uuid4().hex
    shared = worker_environment(plan, env, launch_id)
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                try:
                    # srun ends its tasks on a second SIGINT only: ask it with SIGTERM
                    proc.send_signal(signal.SIGTERM if plan.method == "srun" and signum == signal.SIGINT else signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    killed, order = set(), []
    try:
        try:
            if plan.method == "srun":
                cmd = srun_command(plan, argv, env)
                print("srdit: " + " ".join(cmd), file=sys.stderr, flush=True)
                procs.append(subprocess.Popen(cmd, env=shared))
            else:
                for local in range(plan.nproc_per_node):
                    rank = plan.node_rank * plan.nproc_per_node + local
                    procs.append(subprocess.Popen(argv, env=dict(
                        shared, RANK=str(rank), WORLD_SIZE=str(plan.world_size), LOCAL_RANK=str(local),
                        LOCAL_WORLD_SIZE=str(plan.nproc_per_node), GROUP_RANK=str(plan.node_rank))))
        except BaseException:
            for proc in procs:                     # no half-started job left behind
                proc.kill()
            raise
        first_exit = None
        while True:
            for i, proc in enumerate(procs):
                if proc.poll() is not None and i not in order:
                    order.append(i)
                    first_exit = first_exit or time.monotonic()
            if len(order) == len(procs):
                break
            if first_exit is not None and time.monotonic() - first_exit > grace_s:
                for i, proc in enumerate(procs):
                    if proc.poll() is None:
                        print(f"srdit: worker {i} still runs {grace_s:.0f} s after worker {order[0]} exited "
                              f"({_code(procs[order[0]].returncode)}); killing it", file=sys.stderr, flush=True)
                        proc.kill()
                        killed.add(i)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [_code(procs[i].returncode) for i in order if i not in killed]
    code = codes[0] if len(set(codes)) == 1 else next((c for c in codes if c != 0), 1)
    recorded = _recorded_outcome(run_dir, launch_id)
    if recorded is not None and recorded != code:
        print(f"srdit: workers exited {sorted(set(codes))}; rank 0 recorded exit {recorded} for this launch "
              f"in {run_dir}/status.json: exiting {recorded}", file=sys.stderr, flush=True)
        code = recorded
    return code


def _recorded_outcome(run_dir: Path | None, launch_id: str) -> int | None:
    if run_dir is None:
        return None
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    if status.get("launch_id") != launch_id:
        return None
    return int(status["exit_code"])


# --------------------------------------------------------------------------------------------
# In the worker: the devices it found, logged; a shape that would leave GPUs idle, refused
# --------------------------------------------------------------------------------------------

def check_worker_devices(info: LaunchInfo, device: torch.device, environ=None) -> None:
    """Refuse a GPU worker whose node has more (or fewer) visible GPUs than processes: e.g.
    `torchrun --nproc-per-node 4` or `srun --ntasks-per-node 4` on a node with 8 allocated GPUs.
    (A worker that sees exactly one GPU was bound to it by its launcher: fine.)"""
    env = os.environ if environ is None else environ
    if device.type != "cuda" or info.world_size == 1 and info.launcher == "single":
        return
    seen = cuda_device_count()
    if seen not in (1, info.local_world_size):
        raise LaunchError(f"{info.local_world_size} training process(es) on this node but torch sees {seen} GPUs "
                          f"({_visible(env)}): one process per GPU, or GPUs would sit idle (or be shared); "
                          f"start `srdit train` once and let it start the processes")
    gpn, how = slurm_gpus_on_node(env)
    if gpn and seen != 1 and gpn != info.local_world_size:
        raise LaunchError(f"{info.local_world_size} training process(es) on this node but Slurm allocated {gpn} "
                          f"GPUs here ({how}): one process per allocated GPU")


def describe_worker(info: LaunchInfo, device: torch.device, backend: str, environ=None) -> str:
    """One log line: world size, where this process sits, the GPUs it sees and what Slurm gave."""
    env = os.environ if environ is None else environ
    nodes = max(1, info.world_size // max(1, info.local_world_size))
    gpn, how = slurm_gpus_on_node(env)
    slurm = f"; Slurm job {env['SLURM_JOB_ID']}: {how}" if gpn is not None else ""
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    return (f"world size {info.world_size} ({nodes} node(s) x {info.local_world_size} process(es), launcher "
            f"{info.launcher}, backend {backend}); rank {info.rank} on {host} uses {device}; GPUs seen on this "
            f"node: {cuda_device_count()} ({_visible(env)}){slurm}")


# --------------------------------------------------------------------------------------------
# What a job asks Slurm for (the workflow's rule resources, `srdit launch`'s profile values)
# --------------------------------------------------------------------------------------------

_GRES_GPU = re.compile(r"^gpu(?::([A-Za-z0-9_.]+?))??(?::(\d+))?$")
_GPUS_PER_NODE = re.compile(r"--gpus-per-node[=\s]+(?:[A-Za-z0-9_.]+:)?(\d+)\b")


def requested_shape(resources) -> tuple[int, int | None, str]:
    """(nodes, GPUs per node, how they were asked for) from Snakemake-style job resources, for
    every way a site asks for GPUs: `gpu: N` (--gpus, per job: N / nodes per node), `gres:
    gpu:N` or `gpu:TYPE:N` (per node), `--gpus-per-node=[TYPE:]N` in `slurm_extra`. GPUs per node
    is None when the resources ask for none. ValueError when the forms disagree or `gpu`
    cannot be spread evenly over the nodes."""
    get = resources.get if hasattr(resources, "get") else (lambda k, d=None: getattr(resources, k, d))
    nodes = int(get("nodes", None) or 1)
    if nodes < 1:
        raise ValueError(f"nodes: {nodes}; at least 1")
    found: dict[str, int] = {}
    gpu = int(get("gpu", None) or 0)
    if gpu:
        if gpu % nodes:
            raise ValueError(f"gpu: {gpu} is GPUs per job (sbatch --gpus); {nodes} nodes cannot hold an equal "
                             f"share each: ask per node instead (gres: gpu:N, or --gpus-per-node=N in slurm_extra)")
        found[f"gpu: {gpu} (per job, {nodes} node(s))"] = gpu // nodes
    gres = str(get("gres", None) or "")
    for item in filter(None, (g.strip() for g in gres.split(","))):
        m = _GRES_GPU.match(item)
        if item.split(":")[0] == "gpu" and m:
            found[f"gres: {item}"] = int(m.group(2) or 1)
    extra = str(get("slurm_extra", None) or "")
    m = _GPUS_PER_NODE.search(extra)
    if m:
        found[f"slurm_extra: {m.group(0).strip()}"] = int(m.group(1))
    if len(set(found.values())) > 1:
        raise ValueError("the GPU requests disagree: " + ", ".join(f"{k} -> {v} per node" for k, v in found.items()))
    per_node = next(iter(found.values()), None) or None
    return nodes, per_node, ", ".join(found) or "no GPU"


def site_nodes(value, run: str) -> int:
    """A profile's `nodes` for one run: a number, or the Python expression of `wildcards.run` that
    Snakemake evaluates for the rule (per-row overrides, e.g. "2 if wildcards.run.startswith('xl1') else 1")."""
    if value in (None, ""):
        return 1
    if isinstance(value, str):
        from types import SimpleNamespace
        value = eval(value, {"__builtins__": {}}, {"wildcards": SimpleNamespace(run=run)})   # the user's profile
    return int(value)
