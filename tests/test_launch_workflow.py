"""`srdit launch train ROW` trains the run the workflow trains: after a launch (submitit's local
executor, no Slurm needed) the workflow plans no training job for that row, only its sampling and
evaluation. Slow (a real data pipeline and training run on the CPU): run with --runslow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_copy import copy_workflow

from srdit import layout

BIN = Path(sys.executable).parent
CONFIG = "config/test_slurm.yaml"          # test_tiny: 4 steps in two segments of 2


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run([str(BIN / "snakemake"), "--profile", "profiles/local", f"--configfile={CONFIG}", *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_the_workflow_reuses_a_launched_run(tmp_path):
    work = copy_workflow(tmp_path)
    config = layout.load_workflow_config([CONFIG], root=work)
    job = layout.resolve_train("test_tiny", config)
    data = _snakemake(work, "--cores", "2", job.cache)                 # the latent cache the run reads
    assert data.returncode == 0, data.stdout[-2000:] + data.stderr[-3000:]
    planned = _snakemake(work, "-n", "test_tiny")
    assert planned.stdout.count("rule train_segment:") == 2, planned.stdout[-3000:]

    env = dict(os.environ, OMP_NUM_THREADS="1", SRDIT_DEVICE="cpu")
    launched = subprocess.run([sys.executable, "-m", "srdit", "launch", "train", "--cluster", "local", "--profile", "",
                               f"--configfile={CONFIG}", "--folder", str(tmp_path / "submitit/%j"), "--wait",
                               "--", "test_tiny"], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    snapshots = sorted(p.name for p in (work / job.run_dir / "snapshots").glob("*.safetensors"))
    assert snapshots == ["step0000002.safetensors", "step0000004.safetensors"]

    after = _snakemake(work, "-n", "test_tiny")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "rule train_segment:" not in after.stdout, after.stdout[-3000:]
    assert "rule sample_shard:" in after.stdout and "rule evaluate:" in after.stdout
