"""Retention (srdit/retention.py, config `retention`) and the storage settings of the workflow
(config results_root, cache_root, stage_dir), on a fake run and on a real tiny run of the test
DAG (config/test_slurm.yaml: test_tiny, two 2-step training jobs, 16 samples)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow

from srdit.retention import prune_run, snapshots_to_prune


def fake_run(root: Path, steps: list[int], states: list[int]) -> Path:
    (root / "snapshots").mkdir(parents=True)
    for s in steps:
        path = root / "snapshots" / f"step{s:07d}.safetensors"
        path.write_bytes(b"x")
        path.chmod(0o444)                                 # protected() outputs are read-only
    for s in states:
        (root / "checkpoints" / f"step{s:07d}").mkdir(parents=True)
        (root / "checkpoints" / f"step{s:07d}" / "state.pt").write_bytes(b"x")
    (root / "checkpoints" / "latest").write_text(f"step{states[-1]:07d}")
    return root


def test_prune_keeps_evaluated_steps_and_the_newest(tmp_path):
    run = fake_run(tmp_path / "run", [10, 20, 30, 40, 50], [40, 50])
    deleted = prune_run(run, keep_steps={20})
    left = sorted(p.name for p in (run / "snapshots").iterdir())
    assert left == ["step0000020.safetensors", "step0000050.safetensors"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step0000050"]
    assert len(deleted) == 4
    assert snapshots_to_prune([10, 20], {10, 20}) == [] and snapshots_to_prune([], {1}) == []


def test_prune_dry_run_deletes_nothing(tmp_path):
    run = fake_run(tmp_path / "run", [10, 20], [20])
    result = subprocess.run([sys.executable, "-m", "srdit", "prune", "--run-dir", str(run), "--keep-steps", "",
                             "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "would delete" in result.stdout and "step0000010.safetensors" in result.stdout
    assert len(list((run / "snapshots").iterdir())) == 2


def snakemake(work: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_roots_put_runs_and_caches_where_the_config_says(tmp_path):
    work = copy_workflow(tmp_path)
    (work / "roots.yaml").write_text(yaml.safe_dump({"results_root": "project/out", "cache_root": "scratch"}))
    result = snakemake(work, "-n", "--configfile", "config/test_slurm.yaml", "roots.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    outputs = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("output:")]
    assert outputs and all(o.startswith(("project/out/", "scratch/")) for o in outputs), outputs
    assert any(o.startswith("scratch/cache/demo/latents") for o in outputs)
    assert any(o.startswith("scratch/samples/test_tiny/") for o in outputs)
    assert any(o.startswith("project/out/runs/test_tiny/snapshots/") for o in outputs)
    assert any(o.startswith("project/out/metrics/test_tiny/") for o in outputs)
    assert "results/" not in out.replace("project/out", "")


def test_tiny_run_stages_prunes_and_removes_samples(tmp_path):
    """The test DAG's row with every storage setting on: caches and samples under a scratch root,
    the training cache staged to a "node-local" folder named by an environment variable,
    snapshots pruned to the evaluated step, samples.npz removed after evaluation. Afterwards
    Snakemake has nothing left to do (the deleted files never trigger a rerun) and `srdit plan`
    counts no job."""
    (tmp_path / "wf").mkdir()
    work = copy_workflow(tmp_path / "wf")
    (work / "storage.yaml").write_text(yaml.safe_dump({
        "cache_root": "scratch", "stage_dir": "$SRDIT_TEST_NODE/stage",
        "retention": {"snapshots": "evaluated", "samples": "remove"}}))
    node = tmp_path / "node"
    os.environ["SRDIT_TEST_NODE"] = str(node)
    try:
        result = snakemake(work, "--cores", "2", "--configfile", "config/test_slurm.yaml", "storage.yaml",
                           "--", "test_tiny")
    finally:
        del os.environ["SRDIT_TEST_NODE"]
    assert result.returncode == 0, result.stderr[-4000:]
    run = work / "results/runs/test_tiny"
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step0000004.safetensors"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step0000004"]
    assert "srdit prune: deleted" in (work / "results/logs/train/test_tiny/step0000004.log").read_text()
    staged = list(node.glob("stage/srdit-stage/*/cache.h5"))
    assert len(staged) == 1 and (staged[0].parent / ".srdit-staged.json").exists()
    for log in ("step0000002", "step0000004"):
        text = (work / f"results/logs/train/test_tiny/{log}.log").read_text()
        assert "srdit stage:" in text, text[-2000:]
    samples = list((work / "scratch/samples/test_tiny").glob("step*/*"))
    assert len(samples) == 1
    assert (samples[0] / "grid.png").exists() and not (samples[0] / "samples.npz").exists()
    assert list((work / "results/metrics/test_tiny").glob("step0000004/*/metrics.json"))
    assert (work / "scratch/cache/demo").is_dir() and not (work / "results/cache").exists()
    again = snakemake(work, "-n", "--rerun-triggers", "mtime", "--configfile", "config/test_slurm.yaml",
                      "storage.yaml", "--", "test_tiny")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    from srdit.plan import build_plan
    plan = build_plan(["config/test_slurm.yaml", "storage.yaml"], ["test_tiny"], profile=None, workdir=work)
    assert plan["total_jobs"] == 0 and plan["gpu_hours_total"] == 0
    assert plan["present_per_root"]["scratch"] > 0 and plan["present_per_root"]["results"] > 0
