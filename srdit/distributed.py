"""Launch and rendezvous: one process per GPU (or a few CPU processes), from torchrun or Slurm.

Where the process group comes from, in order:
1. torchrun (or DeepSpeed's launcher): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set.
2. Slurm, one task per GPU started by `srun` (e.g. `srun --ntasks-per-node 8 srdit train ...`):
   SLURM_PROCID / SLURM_LOCALID give the ranks; the rendezvous host is the first node of
   SLURM_JOB_NODELIST and the port is derived from the job id, so every task computes the same
   address without talking to the others.
3. Neither: a single process on a free local port.

The backend is NCCL when CUDA is available and gloo otherwise (the CPU tests and the demo).
DeepSpeed's `init_distributed` creates the group, with MPI discovery off: the environment
above is the only source of truth.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,010],cpu1' -> 'gpu003'.

    Handles the compressed forms Slurm writes (prefix[range,range]...) without calling
    `scontrol`, which compute nodes do not always have on PATH.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty; cannot pick a rendezvous host")
    # the first comma that is not inside brackets ends the first group
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    lo = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{lo}{suffix}"


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
                          master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    # srun sets SLURM_STEP_NUM_TASKS for the job step it starts; the batch script itself is a
    # single task even when the allocation has many, so only trust a step with several tasks.
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "SLURM_PROCID" in env and step_tasks > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchInfo(rank=int(env["SLURM_PROCID"]), world_size=step_tasks,
                          local_rank=int(env.get("SLURM_LOCALID", 0)),
                          local_world_size=_slurm_tasks_per_node(env),
                          master_addr=env.get("MASTER_ADDR") or slurm_first_host(env.get("SLURM_JOB_NODELIST", "")),
                          master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
                          launcher="slurm")
    return LaunchInfo(rank=0, world_size=1, local_rank=0, local_world_size=1,
                      master_addr="127.0.0.1", master_port=_free_port(), launcher="single")


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
    # DeepSpeed and torch's env:// rendezvous read these; Slurm launches do not set them.
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_RANK=str(info.local_rank), LOCAL_WORLD_SIZE=str(info.local_world_size),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=info.rank, world_size=info.world_size)
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
