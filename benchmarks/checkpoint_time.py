"""How long the trainer's checkpoint takes to write: what stands between a SIGTERM (a Slurm
`--signal` lead time, a preemption's grace time, the time limit's KillWait) and a saved run.

For each registry entry, the script builds the model (fp32, on the CPU), an EMA copy and AdamW
moments of the same shapes, and writes one checkpoint the way `_Trainer._save_checkpoint` does,
with the same functions in the same order: the per-rank file (RNG, data position), `state.pt`
(model, EMA, AdamW moments, config; `atomic_torch_save`: temp file, fsync, rename), the
consolidated snapshot (`save_snapshot`: model + EMA safetensors), then the rename of the
checkpoint folder and the `latest` pointer. Each phase is timed, `--repeats` times.

Not included, and small next to the writes on a GPU node: the step the trainer finishes before
it saves (B/1 ~0.1 s, XL/1 ~0.4 s on 8 H100), the device-to-host copies (~2.7 GB for XL/1 at
>10 GB/s) and, with ZeRO 1/2, the gather of the optimizer partitions to rank 0.

    python benchmarks/checkpoint_time.py                               # b1_srdit and xl1_reg_invae
    python benchmarks/checkpoint_time.py --models b1_srdit --dir /scratch/$USER/ckpt --repeats 3

Write to the file system the runs live on (`--dir`, default: a temporary folder under
results/). XL/1 needs ~12 GB of free memory (model, EMA and AdamW moments: 10.8 GB; the
snapshot's copy of model + EMA once the moments are freed). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from srdit import checkpoint as ckpt
from srdit.config import get_config
from srdit.models import build_model


def time_checkpoint(name: str, folder: Path) -> dict:
    cfg = get_config(name)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    model_state = {k: v.detach() for k, v in model.state_dict().items()}
    ema_state = {k: v.detach().clone() for k, v in model_state.items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = {"step": 1000, "exp_avg": {n: torch.zeros_like(p) for n, p in named},
                 "exp_avg_sq": {n: torch.zeros_like(p) for n, p in named}}
    root = folder / name
    tag = ckpt.step_tag(1000)
    final, tmp = root / "checkpoints" / tag, root / "checkpoints" / f".tmp-{tag}"
    shutil.rmtree(root, ignore_errors=True)
    tmp.mkdir(parents=True)
    (root / "snapshots").mkdir()
    os.sync()                          # earlier writes' dirty pages must not count against this one
    phases = {}
    t0 = time.perf_counter()
    ckpt.atomic_torch_save({"rng": ckpt.capture_rng_state(torch.device("cpu")), "loader": {"position": 0},
                            "rank": 0, "world_size": 1}, tmp / "rank00000.pt")
    phases["rank_file_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    ckpt.atomic_torch_save({"format": ckpt.CHECKPOINT_FORMAT, "step": 1000, "model": model_state, "ema": ema_state,
                            "optimizer": optimizer, "world_size": 8, "zero_stage": 1, "micro_batch": 32,
                            "accumulation": 1, "config": cfg.to_json(), "reason": "preempted"},
                           tmp / ckpt.STATE_FILE)
    phases["state_s"] = time.perf_counter() - t1
    del optimizer                      # the snapshot's in-memory copies need the room (XL/1)
    t2 = time.perf_counter()
    ckpt.save_snapshot(root / "snapshots" / f"{tag}.safetensors", model_state, ema_state, cfg.to_json(), 1000)
    phases["snapshot_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    os.replace(tmp, final)
    ckpt.atomic_write_text(root / "checkpoints" / ckpt.LATEST, tag + "\n")
    phases["rename_s"] = time.perf_counter() - t3
    total = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return {"params": params, "bytes": size, "total_s": round(total, 3),
            "gb_per_s": round(size / total / 1e9, 3), **{k: round(v, 3) for k, v in phases.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["b1_srdit", "xl1_reg_invae"], help="registry entries")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder under results/)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = Path(args.dir) if args.dir else Path("results")
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="checkpoint-bench-", dir=base))
    try:
        out = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "dir": str(folder), "models": {}}
        for name in args.models:
            runs = [time_checkpoint(name, folder) for _ in range(args.repeats)]
            out["models"][name] = {"runs": runs, "max_total_s": max(r["total_s"] for r in runs),
                                   "median_total_s": sorted(r["total_s"] for r in runs)[len(runs) // 2]}
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
