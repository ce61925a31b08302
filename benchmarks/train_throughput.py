"""Images per second of a full SR-DiT-B/1 training step through the real trainer.

    python benchmarks/train_throughput.py                    # CPU: micro-batch 2, 3 timed steps
    python benchmarks/train_throughput.py --device cuda      # GPU: bf16, micro 64 x 4 = 256
    python benchmarks/train_throughput.py --device cuda --compile --micro 128 --accum 2

What a step includes: reading the micro-batches from an HDF5 latent cache through
`srdit.data.make_train_loader` (latents, labels and the cached DINOv2-B teacher CLS + patch
tokens: no teacher forward), the forward and backward of the objective (flow matching + REG +
REPA + CFM), DeepSpeed's gradient reduction and clipping, the AdamW step (ZeRO-1) and the fp32
EMA update. It runs `srdit.train.train` itself (one process) on a synthetic cache of random
values with the shapes of ImageNet 256 (latents 32x16x16, teacher 768-d, 256 tokens).

The first `--warmup` steps (allocator, cuDNN/compile warm-up) are not timed; the timed steps are
bracketed by CUDA synchronisations. MFU counts model matmul FLOPs (srdit/flops.py: training =
3 x forward, SPRINT's sparse middle counted at its kept tokens) against the GPU's dense bf16 peak.
The original trains at ~10.5 it/s x 256 images on 8 H100s, ~336 img/s per GPU, with DINOv2 run
online; the JSON gives our rate next to it. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srdit import train as trainer                           # noqa: E402
from srdit.config import get_config                          # noqa: E402
from srdit.flops import mfu, peak_flops_per_device, train_flops_per_image   # noqa: E402

REFERENCE_IMG_PER_S_PER_GPU = 10.5 * 256 / 8               # docs/recipe.md 5.8 (8 x H100, DINOv2 online)


def write_cache(folder: Path, rows: int, latent_shape=(32, 16, 16), teacher_dim=768, tokens=256) -> Path:
    """A latent cache of random values in the data module's format (one shard + cache.h5)."""
    from srdit.data.cache import FORMAT_VERSION, LATENTS, ShardWriter
    from srdit.data.encode import join_latents

    classes = [f"n{i:08d}" for i in range(1000)]
    ident = dict(kind=LATENTS, format=FORMAT_VERSION, tokenizer="e2e-invae", tokenizer_settings={},
                 tokenizer_random=True, latent_shape=list(latent_shape), resolution=16 * latent_shape[1],
                 teacher="dinov2_vitb14", teacher_random=True, teacher_dim=teacher_dim, teacher_tokens=tokens,
                 noise_seed=0, batch_size=rows, precision="fp32", moments=False, images_file="none",
                 images_checksum="none", images_rows=rows, num_classes=len(classes), class_names=classes,
                 row_start=0, row_stop=rows)
    datasets = {"latents": (latent_shape, np.float32), "labels": ((), np.int64),
                "teacher_cls": ((teacher_dim,), np.float16), "teacher_tokens": ((tokens, teacher_dim), np.float16)}
    rng = np.random.default_rng(0)
    shard = folder / "latents-00000.h5"
    with ShardWriter(shard, datasets, ident, capacity=rows) as w:
        for start in range(0, rows, 256):
            n = min(256, rows - start)
            w.append(latents=(3 * rng.standard_normal((n, *latent_shape))).astype(np.float32),
                     labels=rng.integers(0, len(classes), n).astype(np.int64),
                     teacher_cls=rng.standard_normal((n, teacher_dim)).astype(np.float16),
                     teacher_tokens=rng.standard_normal((n, tokens, teacher_dim)).astype(np.float16))
        w.finish()
    return join_latents([shard], folder / "cache.h5")


def run(args) -> dict:
    cuda = args.device == "cuda"
    os.environ["SRDIT_DEVICE"] = args.device
    micro = args.micro or (64 if cuda else 2)
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    global_batch = micro * args.accum
    rows = args.rows or max(4 * global_batch, 64)
    overrides = {"train": {"global_batch": global_batch, "micro_batch": micro, "max_steps": warmup + steps,
                           "ckpt_every": 10**9, "log_every": warmup + steps, "num_workers": args.workers,
                           "compile": args.compile, "segment_steps": 0, "segment_minutes": 0.0}}
    cfg = get_config(args.entry, overrides=overrides)
    stamps: list[float] = []

    def on_step(step: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        cache = write_cache(Path(tmp) / "cache", rows)
        cache_s = time.perf_counter() - t0
        code = trainer.train(cfg, Path(tmp) / "run", cache, on_step=on_step, save_at_end=False)
        if code != 0:
            raise SystemExit(f"training exited {code}")
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = stamps[warmup:]
    if len(timed) < 2:
        raise SystemExit("need at least 2 timed steps (--steps)")
    seconds = (timed[-1] - stamps[warmup - 1]) if warmup > 0 else (timed[-1] - timed[0])
    n_steps = len(timed) if warmup > 0 else len(timed) - 1
    img_s = n_steps * global_batch / seconds
    flops = train_flops_per_image(cfg.model)
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    peak = peak_flops_per_device(name if cuda else None)
    last = [m for m in metrics if "loss" in m][-1]
    out = {
        "benchmark": "train_throughput", "entry": args.entry, "device": name,
        "precision": "bf16 autocast, fp32 master/grads/optimizer" if cuda else "fp32",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "micro_batch": micro, "accumulation": args.accum, "global_batch": global_batch, "world_size": 1,
        "zero_stage": cfg.train.zero_stage, "compile": args.compile, "loader_workers": args.workers,
        "warmup_steps": warmup, "timed_steps": n_steps, "seconds": round(seconds, 3),
        "step_s": round(seconds / n_steps, 4), "img_per_s": round(img_s, 2),
        "train_gflop_per_img": round(flops / 1e9, 2), "achieved_tflops": round(img_s * flops / 1e12, 3),
        "mfu": None if peak is None else round(mfu(img_s, flops, 1, peak), 4),
        "peak_mem_mb": round(last["peak_mem_mb"], 1), "data_wait_frac_last_window": round(last["data_wait_frac"], 4),
        "final_loss": round(last["loss"], 4), "cache_rows": rows, "cache_write_s": round(cache_s, 1),
    }
    if cuda:
        out["reference_img_per_s_per_gpu"] = REFERENCE_IMG_PER_S_PER_GPU
        out["speedup_vs_reference"] = round(img_s / REFERENCE_IMG_PER_S_PER_GPU, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--entry", default="b1_srdit", help="ablation entry (default: SR-DiT-B/1)")
    p.add_argument("--micro", type=int, default=None, help="micro-batch (default: 2 on CPU, 64 on GPU)")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per step (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 30 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: 0 on CPU, 6 on GPU)")
    p.add_argument("--rows", type=int, default=None, help="cache rows (default: 4 global batches)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--dir", default=None, help="where the temporary cache and run go (default: system temp)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.accum = args.accum or (4 if cuda else 1)
    args.workers = args.workers if args.workers is not None else (6 if cuda else 0)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
