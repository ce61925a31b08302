"""CPU proxies of GPU throughput, for two versions of the code side by side in one run.

    python benchmarks/step_proxies.py --before REF [--steps 12] [--rounds 3] [--out FILE.json]

REF is a git revision of this repository (e.g. the commit before a change); its `srdit/` is
exported to a temporary folder with `git archive` and run in subprocesses next to the working
tree's, alternating (before, after, before, after, ...). For each version, on the CPU demo
model (`demo_srdit`, the real trainer on a tiny latent cache, 1 process, each version's
defaults):

- training: per optimizer step (2 micro-batches of 4), the number of torch operators the
  step dispatches (`torch.profiler`, aten ops; on a GPU each is one or more kernel launches,
  and each costs launch time when the step is overhead-bound), the number of host reads of
  tensor values (`.item()`, `.tolist()`, `bool()`, ...: on a GPU each waits for the device),
  outside logging steps, and the median step time;
- sampling: per model evaluation of the guided SDE sampler (cfg 1.5, batch 16), the operators
  dispatched (the batched guidance forward and the bulk noise) and the time.

The numbers are proxies: they count what a GPU would have to launch and wait for, not what it
would take. Prints one table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, sys, time, statistics
import torch
torch.set_num_threads(1)
from srdit.config import get_config
from srdit import train as T
a = json.loads(sys.argv[1])
SYNC = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
phase = {"step": 0, "counting": False}
counts, stamps = {}, {}
saved = {n: getattr(torch.Tensor, n) for n in SYNC}
import traceback
def make(name, real):
    def stub(t, *args, **kw):
        if phase["counting"]:
            f = traceback.extract_stack(limit=3)[0].filename
            if "/srdit/data/" not in f:            # the loader's host tensors
                counts[phase["step"]] = counts.get(phase["step"], 0) + 1
        return real(t, *args, **kw)
    return stub
for n in SYNC:
    setattr(torch.Tensor, n, make(n, saved[n]))
from torch.profiler import profile, ProfilerActivity, schedule
ops = {}
prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=a["warm"], warmup=1, active=a["prof"], repeat=1))
def on_step(step):
    stamps[step] = time.perf_counter()
    phase["step"] = step
    phase["counting"] = True
    prof.step()
os.environ["SRDIT_DEVICE"] = "cpu"
cfg = get_config("demo_srdit", overrides={"train": {"global_batch": 8, "micro_batch": 4, "max_steps": 1000,
      "num_workers": 0, "log_every": 1000, "ckpt_every": 1000}})
prof.start()
code = T.train(cfg, a["run_dir"], a["cache"], until_step=a["steps"], on_step=on_step, save_at_end=False)
prof.stop()
for n in SYNC:
    setattr(torch.Tensor, n, saved[n])
aten = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
times = [stamps[k + 1] - stamps[k] for k in range(a["warm"] + 1, a["steps"])]
quiet = [counts.get(k, 0) for k in range(1, a["steps"] - 1)]
# sampling: guided SDE, ops and time per model evaluation
import dataclasses
from srdit.models import build_model
from srdit.sample import generate_latents, sample_labels
m = cfg.model
torch.manual_seed(0)
model = build_model(m).eval()
nfe, batch = 6, 16
s = dataclasses.replace(cfg.sample, num_steps=nfe, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
                        batch_size=batch, num_samples=batch)
idx = torch.arange(batch)
labels = sample_labels(idx, m.num_classes, s.balanced, s.seed)
run = lambda: generate_latents(model, idx, labels, s, (m.in_channels, m.input_size, m.input_size),
                               m.cls_token_dim, "cpu", shift_base=cfg.objective.shift_base)
run()
t0 = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU]) as sp:
    run()
sample_s = time.perf_counter() - t0
t0 = time.perf_counter(); run(); sample_s = min(sample_s, time.perf_counter() - t0)
sample_ops = sum(e.count for e in sp.key_averages() if e.key.startswith("aten::"))
print("RESULT " + json.dumps({"exit": code, "train_ops_per_step": aten / a["prof"],
      "syncs_per_plain_step": max(quiet), "syncs_total_plain_steps": sum(quiet),
      "train_s_per_step": statistics.median(times), "sample_ops_per_nfe": sample_ops / nfe,
      "sample_s_per_nfe": sample_s / nfe}))
'''


def export(ref: str, dest: Path) -> Path:
    out = dest / "src"
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "srdit", "config"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def run_child(src: Path, cache: Path, run_dir: Path, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", SRDIT_DEVICE="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    spec = dict(cache=str(cache), run_dir=str(run_dir), steps=steps, warm=3, prof=4)
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                       cwd=str(src), timeout=1200)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"{src}: the measurement failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare with the working tree")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    from test_train import write_caches

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = write_caches(tmp / "cache")
        versions = {"before": export(args.before, tmp / "before"), "after": REPO}
        results = {k: [] for k in versions}
        for r in range(args.rounds):
            for name, src in versions.items():
                results[name].append(run_child(src, cache, tmp / f"run-{name}-{r}", args.steps))
    keys = list(results["after"][0])
    summary = {name: {k: statistics.median(x[k] for x in rows) for k in keys} for name, rows in results.items()}
    print(f"| proxy (median of {args.rounds} rounds) | before ({args.before}) | after | after / before |")
    print("|---|---|---|---|")
    for k in keys:
        if k == "exit":
            continue
        b, a = summary["before"][k], summary["after"][k]
        print(f"| {k} | {b:.4g} | {a:.4g} | {a / b:.3f} |" if b else f"| {k} | {b:.4g} | {a:.4g} | - |")
    data = {"before": args.before, "rounds": results, "median": summary}
    if args.out:
        args.out.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
