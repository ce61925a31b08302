"""Against the real Slurm (ci/start-slurm.sh): the profile works with a `jobs` limit smaller than
the number of ready shards, jobs run the venv's python with the venv off PATH, and `srdit launch`
asks Slurm for the profile's memory and GPUs exactly.

The profile has no job arrays: with the executor plugin's array mode, a rule whose ready jobs
outnumber what `jobs` lets out at once waits forever (snakemake-executor-plugin-slurm issue 473).
Skips without a cluster, fails with SRDIT_REQUIRE_SLURM=1 (CI), like tests/test_slurm.py.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import cluster, sacct_job, slurm_test_profile  # noqa: F401  (cluster: a fixture)
from workflow_copy import copy_workflow, decoy_env

from srdit import layout

pytestmark = pytest.mark.slurm
BIN = Path(sys.executable).parent
JOBS = 2
PREPARE_SHARDS = 4              # all ready at once, twice what `jobs` lets out


def config_resolution(config: dict) -> int:
    from srdit.config import build_config, load_registry, resolve_entry
    registry = load_registry(*(config.get("extra_registries") or []))
    return build_config(resolve_entry("test_tiny", registry), name="test_tiny").data.resolution


def test_more_ready_shards_than_jobs_complete(cluster, tmp_path):  # noqa: F811
    (tmp_path / "work").mkdir()
    work = copy_workflow(tmp_path / "work")
    profile = slurm_test_profile(cluster, work)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    assert not any(key.startswith("slurm-array") for key in settings), "the shipped profile uses job arrays"
    settings.update({"jobs": JOBS, "seconds-between-status-checks": 3})
    (profile / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (work / "shards.yaml").write_text(f"data: {{prepare_shards: {PREPARE_SHARDS}}}\n")
    config = layout.load_workflow_config(["config/test_slurm.yaml", "shards.yaml"], root=work)
    resolution = config_resolution(config)
    target = f"{layout.cache_root(config)}/cache/{config['data']['name']}/images{resolution}/images.h5"
    started = time.time()
    result = subprocess.run(
        ["timeout", "-k", "10", "900", str(BIN / "snakemake"), target, "--profile", str(profile),
         "--configfile", "config/test_slurm.yaml", "shards.yaml"],
        cwd=work, env=decoy_env(tmp_path), capture_output=True, text=True)
    logs = sorted((work / ".snakemake/slurm_logs").rglob("*.log"))
    if result.returncode != 0:
        tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs[-4:])
        pytest.fail(f"snakemake exited {result.returncode} after {time.time() - started:.0f} s\n"
                    f"{result.stderr[-4000:]}\n{tails}")
    assert (work / target).exists()
    jobs = {}
    for log in logs:
        rule = next(p.name[len("rule_"):] for p in log.parents if p.name.startswith("rule_"))
        jobs.setdefault(rule, set()).add(log.stem.split("_")[0])
    # one Slurm job per shard, none an array member, all completed
    assert len(jobs["prepare_images"]) == PREPARE_SHARDS, jobs
    for job_id in jobs["prepare_images"]:
        rows = sacct_job(job_id)
        assert len(rows) == 1 and "_" not in rows[0]["id"], rows
        assert rows[0]["state"] == "COMPLETED", rows
    # the jobs ran the venv's interpreter by its path, not a `python` found on PATH
    assert re.search(rf"{re.escape(str(BIN))}/python[\d.]* -m srdit prepare", result.stdout + result.stderr)


def test_launch_asks_slurm_for_exact_memory_and_the_profiles_gpus(cluster, tmp_path):  # noqa: F811
    model = ["--gpu-model", cluster["gpu_model"]] if cluster["gpu_model"] else []
    result = subprocess.run(
        [sys.executable, "-m", "srdit", "launch", "demo-data", "--cluster", "slurm", "--profile", "",
         "--partition", cluster["partition"], "--minutes", "5", "--cpus", "1", "--mem-mb", "1500", "--gpus", "1",
         *model, "--folder", str(tmp_path / "submitit/%j"), "--wait", "--",
         "--out", str(tmp_path / "demo"), "--per-class", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted \S+ job (\S+)", result.stdout).group(1)
    row = sacct_job(job_id)[0]
    # 1500 MB stays 1500 MiB (the old rounding asked for --mem=1GB, i.e. 1024 MiB)
    assert "mem=1500M" in row["tres"], row
    assert "gres/gpu=1" in row["tres"], row
