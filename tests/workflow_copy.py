"""A scratch copy of the workflow for tests, so runs never see the checkout's results/, and an
environment that catches a rule calling `python` by its bare name."""
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent          # the venv the tests run in
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles", "envs")


def copy_workflow(dest: Path) -> Path:
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def decoy_env(tmp: Path) -> dict:
    """PATH without the venv, led by a `python`/`python3`/`torchrun` that only fail: a job that
    called one by its bare name would fail."""
    decoys = tmp / "decoys"
    decoys.mkdir()
    for name in ("python", "python3", "torchrun"):
        (decoys / name).write_text("#!/bin/sh\necho \"decoy $0 called\" >&2\nexit 97\n")
        (decoys / name).chmod(0o755)
    path = [str(decoys)] + [p for p in os.environ.get("PATH", "").split(os.pathsep)
                            if p and Path(p).resolve() != BIN.resolve()]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(path)
    return env
