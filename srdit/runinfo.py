"""Receipts of a run: what code, which libraries and what hardware produced its numbers.

`collect_run_info` gathers the git commit (and whether the tree had local changes), package
versions, Python, the host, CPU and memory, the CUDA devices and the full `nvidia-smi` output
when it exists. The trainer writes it to `RUN/env.json` at the start of every segment and
appends a one-line summary per segment to `RUN/segments.jsonl`, so a number in a table can be
traced to the exact code and machine that produced it.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("srdit", "torch", "deepspeed", "numpy", "h5py", "safetensors", "timm", "diffusers",
            "triton", "tensorboard", "wandb", "tqdm", "pyyaml", "snakemake", "submitit")


def _run(cmd: list[str], cwd: str | Path | None = None, timeout: float = 20.0) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """Commit of the srdit source tree (read-only git queries) and whether it had local changes."""
    repo = Path(path) if path else Path(__file__).resolve().parent.parent
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if commit is None:
        return {"commit": None, "note": f"{repo} is not a git checkout (installed package?)"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo) or ""
    return {"commit": commit, "dirty": bool(status), "changed_files": status.splitlines()[:50]}


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import cpuinfo  # py-cpuinfo, optional
        info["cpu"] = cpuinfo.get_cpu_info().get("brand_raw")
    except Exception:
        info["cpu"] = platform.processor() or None
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                         "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                        for i in range(torch.cuda.device_count())]
    else:
        info["gpus"] = []
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = _run(["nvidia-smi"])
        info["nvidia_smi_query"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                         "power.limit,clocks.max.sm", "--format=csv"])
    return info


def slurm_info() -> dict[str, str]:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
            "SLURM_NNODES", "SLURM_NTASKS", "SLURM_JOB_PARTITION", "SLURM_RESTART_COUNT")
    return {k: os.environ[k] for k in keys if k in os.environ}


def collect_run_info(argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "git": git_info(),
        "packages": package_versions(),
        "hardware": hardware_info(),
        "slurm": slurm_info(),
        **extra,
    }
