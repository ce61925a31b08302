"""`srdit plan`: its job list is Snakemake's own (counts equal to `snakemake -n` for the same
config and targets), evaluation-only rows cost only sampling and evaluation, finished outputs
are not counted, retention and the teacher mode change the disk and GPU figures as they should,
and every GPU figure says whether it was measured or estimated."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow

from srdit.plan import (IMAGENET_TRAIN_IMAGES, build_plan, format_plan, measured_throughput,
                        parse_dry_run)

B1_RUN = "b1_sprint_rms_rope_qknorm_valres_cfm_ts"          # the run b1_srdit samples


def snakemake_job_stats(work: Path, *args: str) -> dict[str, int]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], cwd=work, env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, stats = parse_dry_run(result.stdout + result.stderr)
    return stats


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """A workflow copy with a stand-in ImageNet folder, as a login node would have it."""
    work = copy_workflow(tmp_path_factory.mktemp("paper"))
    (work / "imagenet").mkdir()
    (work / "site.yaml").write_text(yaml.safe_dump({"data": {"source": "imagenet"}}))
    return work


@pytest.fixture(scope="module")
def b1_plan(paper):
    return build_plan(["config/imagenet256.yaml", "site.yaml"], ["b1_srdit"], workdir=paper)


def test_job_counts_match_snakemake_dry_run(paper, b1_plan):
    stats = snakemake_job_stats(paper, "--profile", "profiles/slurm", "--configfile", "config/imagenet256.yaml",
                                "site.yaml", "--", "b1_srdit")
    assert b1_plan["jobs"] == stats and b1_plan["total_jobs"] == sum(stats.values())
    assert stats["train_segment"] == 8 and stats["sample_shard"] == 8


@pytest.mark.slow
def test_whole_paper_plan_matches_snakemake(paper):
    plan = build_plan(["config/imagenet256.yaml", "site.yaml"], [], workdir=paper)
    stats = snakemake_job_stats(paper, "--profile", "profiles/slurm", "--configfile", "config/imagenet256.yaml",
                                "site.yaml")
    assert plan["jobs"] == stats
    assert plan["jobs"]["train_segment"] == 148 and plan["total_jobs"] == 643
    text = format_plan(plan)
    assert "TOTAL: 643 jobs" in text and "GPU-hours" in text and "TB" in text
    # 23 training runs, each in its own row, plus the evaluation-only rows
    trained = {name for name, row in plan["rows"].items() if row["gpu_hours"].get("training", 0) > 0}
    assert len(trained) == 23
    assert plan["gpu_hours"]["training"] > 1000 and plan["disk"]["teacher features"] > 4e11


def test_evaluation_only_row_costs_only_sampling_and_evaluation(b1_plan):
    row = b1_plan["rows"]["b1_srdit"]
    assert "train_segment" not in row["jobs"] and row["gpu_hours"].get("training", 0) == 0
    assert row["gpu_hours"]["sampling"] > 0 and row["gpu_hours"]["evaluation"] > 0
    assert row["jobs"]["sample_shard"] == 8 and "evaluation-only" in row["note"]
    run = b1_plan["rows"][B1_RUN]
    assert run["jobs"] == {"train_segment": 8} and run["gpu_hours"]["training"] > 0
    text = format_plan(b1_plan)
    assert "b1_srdit" in text and "estimated:" in text


def test_finished_outputs_are_not_counted(paper, tmp_path):
    """With every segment snapshot of b1_srdit's run present, the plan (like snakemake -n)
    trains nothing and prepares no data: only sampling and evaluation remain."""
    work = copy_workflow(tmp_path)
    (work / "imagenet").mkdir()
    (work / "site.yaml").write_text((paper / "site.yaml").read_text())
    data = work / "results/cache/imagenet"
    files = [data / "images256" / f"shard{i:05d}.h5" for i in range(64)] + [data / "images256/images.h5"]
    latents = data / "latents256-e2e-invae-dinov2_vitb14"
    files += [latents / f"shard{i:05d}.h5" for i in range(32)] + [latents / "cache.h5"]
    from srdit.resources import RESOURCES
    files = [work / "resources" / r.filename for k, r in RESOURCES.items() if k != "sd-vae"] + files
    files += [work / "results/runs" / B1_RUN / "snapshots" / f"step{step:07d}.safetensors"
              for step in range(50_000, 400_001, 50_000)]
    for age, path in enumerate(reversed(files)):        # each newer than what it was made from
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"0" * 1000)
        os.utime(path, (1e9 - age, 1e9 - age))
    plan = build_plan(["config/imagenet256.yaml", "site.yaml"], ["b1_srdit"], workdir=work)
    stats = snakemake_job_stats(work, "--profile", "profiles/slurm", "--configfile", "config/imagenet256.yaml",
                                "site.yaml", "--", "b1_srdit")
    assert plan["jobs"] == stats
    assert set(plan["jobs"]) == {"sample_shard", "merge_samples", "evaluate", "b1_srdit"}
    assert plan["gpu_hours"].get("training", 0) == 0 and plan["gpu_hours"]["sampling"] > 0
    assert plan["disk"]["images"] == 0 and plan["disk"]["snapshots"] == 0
    assert plan["present_per_root"]["results"] == 1000 * len([f for f in files if "results" in f.parts])


def test_retention_and_teacher_mode_change_the_figures(paper, b1_plan):
    (paper / "keepall.yaml").write_text(yaml.safe_dump({"retention": {"snapshots": "all", "samples": "remove"}}))
    all_kept = build_plan(["config/imagenet256.yaml", "site.yaml", "keepall.yaml"], ["b1_srdit"], workdir=paper,
                          dry=b1_plan["dry"])        # the same jobs: only the costing differs
    snapshot = 2 * 4 * 140_235_051                          # model + EMA, fp32
    # the run writes one every 10K steps (40); b1_srdit's family evaluates 50K/100K/200K/400K
    assert all_kept["rows"][B1_RUN]["disk"]["snapshots"] == 40 * snapshot
    assert b1_plan["rows"][B1_RUN]["disk"]["snapshots"] == 4 * snapshot
    assert all_kept["disk"]["samples"] == 0 and b1_plan["disk"]["samples"] == 50_000 * 256 * 256 * 3
    assert all_kept["rows"][B1_RUN]["disk"]["checkpoints"] == 2 * b1_plan["rows"][B1_RUN]["disk"]["checkpoints"]
    # data: uint8 images, fp32 latents, fp16 DINOv2-B CLS + 256 patch tokens
    n = IMAGENET_TRAIN_IMAGES
    assert b1_plan["disk"]["images"] == pytest.approx(n * (256 * 256 * 3 + 56))
    assert b1_plan["disk"]["latents"] == pytest.approx(n * (32 * 16 * 16 * 4 + 8))
    assert b1_plan["disk"]["teacher features"] == pytest.approx(n * 257 * 768 * 2)
    teacher = {t["run"]: t for t in b1_plan["teacher"]}[B1_RUN]
    assert teacher["mode"] == "cached" and teacher["steps"] == 400_000
    assert teacher["cache_bytes"] == pytest.approx(b1_plan["disk"]["teacher features"])
    assert "cached dinov2_vitb14 features at 256 px: 505.7 GB" in format_plan(b1_plan)
    assert teacher["gpu_hours_online"] > teacher["gpu_hours_cached"]
    assert teacher["gpu_hours_cached"] == pytest.approx(b1_plan["gpu_hours"]["training"])


def test_measured_throughput_from_benchmarks_wins(paper, b1_plan, tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# x\n\n## GPU throughput for `srdit plan`\n\n| GPU | stage | model | images/s per GPU |\n"
                     "|---|---|---|---|\n| H100 | train | 768x12 | 400 |\n\n## other\n| H100 | train | 768x12 | 1 |\n")
    assert measured_throughput(bench) == {("h100", "train", "768x12"): 400.0}
    plan = build_plan(["config/imagenet256.yaml", "site.yaml"], ["b1_srdit"], workdir=paper, benchmarks=bench,
                      dry=b1_plan["dry"])
    assert plan["basis"]["training"] == ["measured: BENCHMARKS.md, H100"]
    assert plan["gpu_hours"]["training"] == pytest.approx(400_000 * 256 / 400 / 3600)
    assert all(b.startswith("estimated:") for b in plan["basis"]["sampling"])


def test_cli_prints_the_row_and_writes_json(paper, tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "srdit", "plan", "--configfile", "config/imagenet256.yaml",
                             "--configfile", "site.yaml", "b1_srdit", "--gpu-model", "A100", "--nodes", "2",
                             "--json", str(out)], cwd=paper, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "b1_srdit" in result.stdout and "A100" in result.stdout and "2 node(s) x 8 GPUs" in result.stdout
    plan = json.loads(out.read_text())
    assert plan["site"]["gpu"] == "A100" and plan["total_jobs"] == 122
    bad = subprocess.run([sys.executable, "-m", "srdit", "plan", "--configfile", "config/imagenet256.yaml",
                          "--configfile", "site.yaml", "--gpu-model", "Z9000"], cwd=paper, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "gpu-model" in bad.stderr and "H100" in bad.stderr


def test_teacher_cost_grows_with_the_resolution():
    from srdit.flops import teacher_flops_per_image as flops_224
    from srdit.plan import teacher_flops_per_image

    assert teacher_flops_per_image("dinov2_vitb14", 256) == pytest.approx(flops_224("dinov2_vitb14"))
    # 448 px at 512: 1025 tokens instead of 257, attention quadratic in them
    assert 4.0 < teacher_flops_per_image("dinov2_vitb14", 512) / teacher_flops_per_image("dinov2_vitb14", 256) < 5.0
