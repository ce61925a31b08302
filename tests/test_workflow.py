"""The Snakemake workflow without running any stage: lint, the paper's dry run through the Slurm
profile (every ablation, with its GPU resources), config validation, named targets, and the
report builder on hand-written metrics files."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow

from srdit.config import get_config, load_registry
from srdit.config import inherited_meta

REPO = Path(__file__).resolve().parents[1]
PAPER_GROUPS = ("ladder", "cfm_variants", "progression", "guidance", "side", "xl1")




def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, text=True,
                          capture_output=True, timeout=timeout)


def parse_dry_run(text: str) -> list[dict]:
    """The jobs of a dry run's output: rule, wildcards, resources and shell command of each."""
    jobs, job = [], None
    for line in text.splitlines():
        if m := re.match(r"^(?:localrule|rule) (\S+):$", line):
            job = {"rule": m.group(1), "wildcards": {}, "resources": {}, "shell": ""}
            jobs.append(job)
        elif job is not None and (m := re.match(r"^\s+(wildcards|resources): (.*)$", line)):
            pairs = (p.split("=", 1) for p in m.group(2).split(", ") if "=" in p)
            job[m.group(1)] = {k.strip(): v.strip() for k, v in pairs}
        elif job is not None and line.startswith("Shell command: "):
            job["shell"] = line[len("Shell command: "):]
    return jobs


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("paper"))
    (work / "imagenet").mkdir()                     # stands in for the ImageNet train folder
    (work / "site.yaml").write_text(yaml.safe_dump({"data": {"source": "imagenet"}}))
    result = snakemake(work, "-n", "--profile", "profiles/slurm",
                       "--configfile", "config/imagenet256.yaml", "site.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    return parse_dry_run(result.stdout + result.stderr)


def paper_entries() -> list[str]:
    registry = load_registry()
    return [n for n in registry if inherited_meta(n, registry, "group") in PAPER_GROUPS]


def test_lint_is_clean(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "--lint")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Lints for" not in out and "good condition" in out


def test_paper_dry_run_lists_every_ablation(paper_dry_run):
    registry = load_registry()
    evaluated = {(j["wildcards"]["ablation"], int(j["wildcards"]["step"]))
                 for j in paper_dry_run if j["rule"] == "evaluate"}
    expected = set()
    for name in paper_entries():
        run = inherited_meta(name, registry, "train_from") or name
        steps = registry[name].get("eval_steps") or [get_config(run).train.max_steps]
        expected |= {(name, s) for s in steps}
    assert evaluated == expected
    assert len(expected) >= 35                    # every row of docs/recipe.md 5.1-5.3, 5.5-5.7


def test_paper_dry_run_trains_each_run_in_segments_with_a_whole_node(paper_dry_run):
    registry = load_registry()
    trains = [j for j in paper_dry_run if j["rule"] == "train_segment"]
    runs = {j["wildcards"]["run"] for j in trains}
    # evaluation-only rows (train_from) reuse a run; every other paper row trains its own
    expected_runs = {inherited_meta(n, registry, "train_from") or n for n in paper_entries()}
    assert runs == expected_runs
    assert "b1_srdit" not in runs and "b1_valres_cfg2.3" not in runs
    ladder = sorted(int(j["wildcards"]["step"]) for j in trains
                    if j["wildcards"]["run"] == "b1_sprint_rms_rope_qknorm_valres_cfm_ts")
    assert ladder == list(range(50_000, 400_001, 50_000))     # the 50K/100K/200K rows are boundaries
    xl_100k = sorted(int(j["wildcards"]["step"]) for j in trains if j["wildcards"]["run"] == "xl1_reg_invae")
    assert xl_100k == [50_000, 100_000]
    for job in trains:
        res = job["resources"]
        # GPUs per node (gres), one node (site train_nodes 1)
        assert res["gres"] == "gpu:8" and res["nodes"] == "1" and res["slurm_partition"] == "gpu", res
        assert int(res["cpus_per_task"]) >= 8 and int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0
        assert "tasks" not in res                  # one task: `srdit train` starts a process per GPU
        # snakemake's own interpreter (by its path), never a bare `torchrun`/`python`; the shape the
        # job asks for, which the trainer checks against the allocation (srdit/distributed.py)
        assert re.search(r"(^|\s)/\S*python[\d.]* -m srdit train \S+ .* --nproc-per-node 8( |$)", job["shell"]), \
            job["shell"]
        assert "--nnodes" not in job["shell"] and "torch.distributed.run" not in job["shell"]
        assert not re.search(r"(^|[\s;])(torchrun|python) ", job["shell"]), job["shell"]
        assert f"--until-step {int(job['wildcards']['step'])} " in job["shell"]
        assert "--max-segment-minutes" in job["shell"]


def test_paper_dry_run_gpu_resources_per_stage(paper_dry_run):
    by_rule: dict[str, list[dict]] = {}
    for job in paper_dry_run:
        by_rule.setdefault(job["rule"], []).append(job)
    for rule in ("encode_latents", "sample_shard", "evaluate"):
        assert by_rule[rule], rule
        for job in by_rule[rule]:
            assert job["resources"]["gpu"] == "1" and job["resources"]["slurm_partition"] == "gpu", (rule, job)
    for rule in ("prepare_images", "merge_samples"):
        for job in by_rule[rule]:
            assert "gpu" not in job["resources"] and job["resources"]["slurm_partition"] == "cpu", (rule, job)
    assert len(by_rule["prepare_images"]) == 64 and len(by_rule["encode_latents"]) == 32
    # 50K samples per row in 8 shards, and the pretrained files fetched by local rules
    assert len(by_rule["sample_shard"]) == 8 * len(by_rule["evaluate"])
    fetched = {j["rule"] for j in paper_dry_run if j["rule"].startswith("fetch_")}
    assert fetched >= {"fetch_e2e_invae", "fetch_dinov2_vitb14", "fetch_dinov2_vitl14", "fetch_inception_fid",
                       "fetch_adm_ref_256"}


def test_guidance_row_samples_with_its_own_settings(paper_dry_run):
    shells = [j["shell"] for j in paper_dry_run
              if j["rule"] == "sample_shard" and j["wildcards"]["ablation"] == "b1_valres_cfg1.5_cls2.0_gh0.75"]
    assert shells and all("runs/b1_sprint_rms_rope_qknorm_valres/snapshots/step0400000" in s for s in shells)
    for flag in ("--set sample.cfg_scale=1.5", "--set sample.cls_cfg_scale=2.0", "--set sample.guidance_high=0.75"):
        assert all(flag in s for s in shells), flag


def test_named_target_builds_only_that_ablation(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "-n", "demo_sprint")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = parse_dry_run(result.stdout + result.stderr)
    assert {j["wildcards"]["run"] for j in jobs if j["rule"] == "train_segment"} == {"demo_sprint"}
    assert {j["wildcards"]["ablation"] for j in jobs if j["rule"] == "evaluate"} == {"demo_sprint"}
    assert "report" not in {j["rule"] for j in jobs}


def test_config_schema_rejects_a_bad_key(tmp_path):
    work = copy_workflow(tmp_path)
    (work / "bad.yaml").write_text(yaml.safe_dump({"data": {"sorce": "/data/imagenet"}}))
    result = snakemake(work, "-n", "--configfile", "bad.yaml")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "sorce" in out and "Additional properties are not allowed" in out


def test_every_config_file_sets_every_key():
    # a --configfile is merged over the demo config: a key it left out would keep the demo's value
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    for name in ("config.yaml", "imagenet256.yaml", "imagenet512.yaml", "test_slurm.yaml"):
        data = yaml.safe_load((REPO / "config" / name).read_text())
        assert set(data) == set(schema["properties"]), name
        for key, sub in schema["properties"].items():
            if sub.get("type") == "object":
                assert set(data[key]) == set(sub["properties"]), (name, key)
    assert yaml.safe_load((REPO / "config/imagenet256.yaml").read_text())["random_weights"] is False


def test_evaluation_only_entry_must_not_change_the_model(tmp_path):
    work = copy_workflow(tmp_path)
    (work / "extra.yaml").write_text(yaml.safe_dump({
        "demo_wrong": {"parent": "demo_reg", "train_from": "demo_reg", "model": {"depth": 4}}}))
    (work / "use_extra.yaml").write_text(yaml.safe_dump({"extra_registries": ["extra.yaml"]}))
    result = snakemake(work, "-n", "--configfile", "use_extra.yaml")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "demo_wrong" in out and "changes the model section" in out


# ------------------------------------------------------------------------------ srdit report

def write_metrics(path: Path, fid: float, notes=()) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fid": fid, "sfid": fid / 2, "inception_score": None, "precision": 0.5,
                                "recall": 0.25, "kdd": 0.1, "kdd_std": 0.01, "notes": list(notes)}))
    return str(path)


def test_report_tables_put_ours_beside_the_paper(tmp_path):
    from PIL import Image

    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8)).save(grid)
    items = [
        ("b1_srdit_ckpt50k", 50000, write_metrics(tmp_path / "m50.json", 30.0), str(grid)),
        ("b1_srdit", 400000, write_metrics(tmp_path / "m400.json", 4.25), str(grid)),
        ("demo_reg", 200, write_metrics(tmp_path / "demo.json", 300.0), ""),
    ]
    out = tmp_path / "report"
    args = ["--out", str(out), "--title", "t"]
    for item in items:
        args += ["--item", *map(str, item)]
    result = subprocess.run([sys.executable, "-m", "srdit", "report", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {r["ablation"]: r for r in csv.DictReader((out / "ablations.csv").open())}
    assert float(rows["b1_srdit"]["fid"]) == 4.25 and float(rows["b1_srdit"]["paper_fid"]) == 3.4907
    assert float(rows["b1_srdit_ckpt50k"]["paper_fid"]) == 21.5532
    assert rows["b1_srdit"]["weights"] == "pretrained" and rows["demo_reg"]["paper_fid"] == ""
    markdown = (out / "ablations.md").read_text()
    assert "| b1_srdit | 400000 | 250 | 4.250 (3.491) |" in markdown
    assert "randomly initialised" not in markdown
    assert (out / "fid_vs_step.png").stat().st_size > 1000
    assert (out / "grids" / "b1_srdit_step0400000.png").exists()


def test_report_says_when_weights_were_random(tmp_path):
    metrics = write_metrics(tmp_path / "m.json", 250.0, notes=["KDD computed with a RANDOMLY INITIALISED DINOv2-L"])
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "srdit", "report", "--out", str(out),
                             "--item", "demo_srdit", "100", metrics, ""], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "randomly initialised" in (out / "ablations.md").read_text()
    assert next(csv.DictReader((out / "ablations.csv").open()))["weights"] == "random"


@pytest.mark.slow
def test_test_dag_runs_end_to_end_on_this_machine(tmp_path):
    """The whole DAG (config/test_slurm.yaml: one tiny entry) with the local profile, then
    Snakemake's HTML report: what tests/test_slurm.py does through Slurm, for machines without it."""
    work = copy_workflow(tmp_path)
    result = snakemake(work, "--profile", "profiles/local", "--configfile", "config/test_slurm.yaml", timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader((work / "results/report/ablations.csv").open()))
    assert [r["ablation"] for r in rows] == ["test_tiny"] and rows[0]["weights"] == "random"
    assert float(rows[0]["fid"]) > 0
    html = snakemake(work, "--configfile", "config/test_slurm.yaml", "--report", "results/report/report.html")
    assert html.returncode == 0, html.stderr[-3000:]
    assert "test_tiny" in (work / "results/report/report.html").read_text(errors="replace")


def test_a_segment_that_stops_early_is_retried_and_resumes(tmp_path):
    """What a preempted or timed-out training job does: the trainer checkpoints and exits before the
    segment's boundary; the rule then fails with 75 and Snakemake's retry resumes the run. Here
    train.segment_steps: 1 makes every attempt stop after one step, so each 2-step segment needs
    exactly two attempts."""
    work = copy_workflow(tmp_path)
    (work / "extra.yaml").write_text(yaml.safe_dump({
        "test_stops": {"parent": "test_tiny", "train": {"segment_steps": 1}}}))
    (work / "overlay.yaml").write_text(yaml.safe_dump({"extra_registries": ["extra.yaml"],
                                                       "ablations": ["test_stops"]}))
    result = snakemake(work, "results/runs/test_stops/snapshots/step0000004.safetensors", "--cores", "2",
                       "--retries", "1", "--configfile", "config/test_slurm.yaml", "overlay.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    run = work / "results/runs/test_stops"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resumed = [e["checkpoint"] for e in events if e.get("event") == "resume"]
    assert resumed == ["step0000001", "step0000002", "step0000003"]
    out = result.stdout + result.stderr
    assert out.count("Trying to restart job") == 2                  # one retry per segment
    assert "exit code: 75" in out or "exit status 75" in out, out[-3000:]
    for step in (2, 4):
        assert (run / f"snapshots/step{step:07d}.safetensors").exists()
