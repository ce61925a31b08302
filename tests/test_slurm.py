"""Against a real Slurm cluster (ci/start-slurm.sh starts one on localhost): the workflow through
the Slurm profile, each job checked in sacct, and one stage submitted through `srdit launch`.

Without a cluster these tests skip and say why; with SRDIT_REQUIRE_SLURM=1 (CI) they fail instead.
They need accounting (sacct), i.e. a cluster started with SLURM_CI_DBD=1.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SRDIT_REQUIRE_SLURM") == "1"
pytestmark = pytest.mark.slurm
# Rules the test DAG submits as Slurm jobs (the joins, demo_images and report are local rules).
SUBMITTED = ("prepare_images", "encode_latents", "reference_batch", "train_segment", "sample_shard",
             "merge_samples", "evaluate")
GPU_RULES = ("encode_latents", "train_segment", "sample_shard", "evaluate")




def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a usable cluster is up."""
    if shutil.which("sbatch") is None:
        return "no Slurm here (sbatch not on PATH); start one with `SLURM_CI_DBD=1 bash ci/start-slurm.sh`"
    try:
        states = _run("sinfo", "-h", "-o", "%T").stdout.split()
        if not any(s in ("idle", "mixed", "allocated") for s in states):
            return f"Slurm has no node that takes jobs (sinfo states: {states or 'none'})"
        acct = _run("sacct", "-n", "-X", "-o", "JobID", "-S", "now-1minutes")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm does not answer: {e}"
    if acct.returncode != 0:
        return f"sacct does not work ({acct.stderr.strip()}); start the cluster with SLURM_CI_DBD=1"
    return None


@pytest.fixture(scope="module")
def cluster() -> dict:
    problem = cluster_problem()
    if problem:
        if REQUIRED:
            pytest.fail(f"SRDIT_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    partition = next(p.rstrip("*") for p in _run("sinfo", "-h", "-o", "%P").stdout.split() if p.endswith("*"))
    gres = _run("sinfo", "-h", "-o", "%G").stdout.strip()            # e.g. gpu:ci:2, gpu:2 or (null)
    match = re.match(r"gpu:(?:([A-Za-z0-9_.]+):)?(\d+)", gres)
    if not match:
        pytest.fail(f"the Slurm node has no GPUs (GRES {gres!r}); start it with SLURM_CI_GPUS=2")
    return {"partition": partition, "gpu_model": match.group(1) or "", "gpus": int(match.group(2))}


def slurm_test_profile(cluster: dict, dest: Path) -> Path:
    """profiles/slurm with its site values replaced by this cluster's (what a user edits), small
    jobs, and quick status polls; every other setting (GPU rules, arrays, retries...) as shipped."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile.pop("site")
    small = {"slurm_partition": cluster["partition"], "runtime": 10, "mem_mb": 1500, "cpus_per_task": 1}
    profile["default-resources"] = dict(small)
    for rule, res in profile["set-resources"].items():
        res.update(small)
        res.pop("slurm_account", None)
        if res.get("gpu"):
            res["gpu"] = 1                                   # one fake GPU per job
            if cluster["gpu_model"]:
                res["gpu_model"] = cluster["gpu_model"]      # typed request: --gpus=<model>:1
            else:
                res.pop("gpu_model", None)
        if res.get("gres"):                                  # training: GPUs per node, typed as the site's
            res["gres"] = f"gpu:{cluster['gpu_model'] + ':' if cluster['gpu_model'] else ''}1"
        if "nodes" in res:
            res["nodes"] = 1                                 # the default partition has one node
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile.update({"jobs": 4, "latency-wait": 5, "retries": 0, "keep-going": False,
                    "slurm-init-seconds-before-status-checks": 2, "slurm-keep-successful-logs": True})
    folder = dest / "profiles" / "slurm-test"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def venv_env() -> dict:
    # the jobs run `python -m srdit` with the submitting environment (--export=ALL)
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


# The CI cluster's controller starts with a clean state (ci/start-slurm.sh) while slurmdbd keeps
# its records, so job ids repeat across cluster starts: `sacct -j N` alone can answer with an
# earlier job N (e.g. an old interactive "allocation") before this one reaches the database.
# Only jobs of this test session count.
SESSION_START = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))


def sacct_job(job_id: str, wait_s: float = 30) -> list[dict]:
    """sacct's record of a job of this session (one row per array task), once it shows a final
    state: slurmdbd records a finished job a second or two after squeue and submitit see it end."""
    deadline = time.time() + wait_s
    while True:
        out = _run("sacct", "-j", job_id, "-S", SESSION_START, "-X", "-n", "-P",
                   "-o", "JobID,JobName,State,ExitCode,AllocTRES").stdout
        rows = [dict(zip(("id", "name", "state", "exit", "tres"), line.split("|")))
                for line in out.splitlines() if line.strip()]
        if rows and all(r["state"] not in ("PENDING", "RUNNING", "COMPLETING") for r in rows):
            return rows
        if time.time() > deadline:
            raise AssertionError(f"sacct has no final record of job {job_id} after {wait_s:.0f} s: {rows}")
        time.sleep(1)


def test_workflow_runs_through_slurm(cluster, tmp_path):
    work = copy_workflow(tmp_path)
    profile = slurm_test_profile(cluster, work)
    started = time.time()
    result = subprocess.run(
        ["timeout", "-k", "10", "900", sys.executable, "-m", "snakemake", "--profile", str(profile),
         "--configfile", "config/test_slurm.yaml"],
        cwd=work, env=venv_env(), capture_output=True, text=True)
    logs = sorted((work / ".snakemake/slurm_logs").rglob("*.log"))
    if result.returncode != 0:
        tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs[-4:])
        pytest.fail(f"snakemake exited {result.returncode} after {time.time() - started:.0f} s\n"
                    f"{result.stderr[-4000:]}\n{tails}")

    # the DAG's outputs: two chained training jobs, the second resuming the first
    run = work / "results/runs/test_tiny"
    assert (run / "snapshots/step0000002.safetensors").exists() and (run / "snapshots/step0000004.safetensors").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any(e.get("event") == "resume" and e.get("checkpoint") == "step0000002" for e in events)
    metrics = json.loads(next((work / "results/metrics/test_tiny").rglob("metrics.json")).read_text())
    assert math.isfinite(metrics["fid"]) and metrics["num_samples"] == 16
    table = (work / "results/report/ablations.csv").read_text()
    assert "test_tiny" in table and ",random," in table
    html = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "config/test_slurm.yaml",
                           "--report", "results/report/report.html"], cwd=work, env=venv_env(),
                          capture_output=True, text=True, timeout=300)
    assert html.returncode == 0, html.stderr[-3000:]
    assert "test_tiny" in (work / "results/report/report.html").read_text(errors="replace")

    # every job of a submitted rule went through Slurm and completed there, GPU rules with a GPU
    seen = {}
    for log in logs:
        rule = next(p.name[len("rule_"):] for p in log.parents if p.name.startswith("rule_"))
        job_id = log.stem.split("_")[0]
        seen.setdefault(rule, set()).add(job_id)
    assert set(seen) >= set(SUBMITTED), f"rules with Slurm logs: {sorted(seen)}"
    assert len(seen["train_segment"]) == 2
    for rule in SUBMITTED:
        for job_id in seen[rule]:
            for row in sacct_job(job_id):
                assert row["state"] == "COMPLETED" and row["exit"] == "0:0", (rule, row)
                if rule in GPU_RULES:
                    assert "gres/gpu=1" in row["tres"], (rule, row)
                else:
                    assert "gres/gpu" not in row["tres"], (rule, row)


def test_srdit_launch_submits_a_stage_and_an_array(cluster, tmp_path):
    common = ["--cluster", "slurm", "--profile", "", "--partition", cluster["partition"], "--minutes", "5",
              "--cpus", "1", "--mem-mb", "1000", "--folder", str(tmp_path / "submitit/%j"), "--wait"]
    demo = subprocess.run([sys.executable, "-m", "srdit", "launch", "demo-data", *common,
                           "--", "--out", str(tmp_path / "demo"), "--per-class", "6"],
                          env=venv_env(), capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    prep = subprocess.run([sys.executable, "-m", "srdit", "launch", "prepare", *common, "--shards", "2",
                           "--", "--src", str(tmp_path / "demo"), "--out", str(tmp_path / "images"),
                           "--resolution", "32", "--workers", "1"],
                          env=venv_env(), capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert sorted(p.name for p in (tmp_path / "images").glob("shard*.h5")) == ["shard00000.h5", "shard00001.h5"]
    ids = re.findall(r"submitted \S+ job (\S+)", demo.stdout + prep.stdout)
    assert len(ids) == 3 and sum("_" in i for i in ids) == 2          # one job, one array of two tasks
    for job_id in ids:
        rows = sacct_job(job_id)
        assert rows[0]["name"] in ("srdit-demo-data", "srdit-prepare")
        assert all(r["state"] == "COMPLETED" for r in rows), rows
