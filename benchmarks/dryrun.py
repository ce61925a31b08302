"""How long Snakemake takes to plan the paper's full ImageNet-256 reproduction.

    python benchmarks/dryrun.py [--repeats 3]

Runs `snakemake -n --profile profiles/slurm --configfile config/imagenet256.yaml` (every ablation,
600+ jobs) in a scratch copy of the workflow, with an empty folder standing in for ImageNet, and
reports the wall time of each repeat (process start, registry resolution, DAG, job listing), the
job count, and, for comparison, `snakemake --version` (the interpreter and Snakemake import alone).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
        (work / "imagenet").mkdir()
        (work / "site.yaml").write_text("data: {source: imagenet}\n")
        cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm",
               "--configfile", "config/imagenet256.yaml", "site.yaml"]
        baseline, _ = timed([sys.executable, "-m", "snakemake", "--version"], work)
        times = []
        for i in range(args.repeats):
            seconds, result = timed(cmd, work)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                return 1
            times.append(seconds)
            print(f"dry run {i + 1}: {seconds:.2f} s", flush=True)
        total = re.search(r"^total\s+(\d+)$", result.stdout + result.stderr, re.M)
        evaluations = len(re.findall(r"^rule evaluate:$", result.stdout, re.M))
    print(f"jobs planned: {total.group(1) if total else '?'} ({evaluations} evaluated checkpoints)")
    print(f"dry run wall time: median {statistics.median(times):.2f} s, min {min(times):.2f} s over {len(times)}")
    print(f"`snakemake --version` alone: {baseline:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
