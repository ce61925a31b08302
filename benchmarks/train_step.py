"""Training-step throughput of SR-DiT-B/1: forward + backward + grad clip + AdamW, in training
mode (SPRINT drops 75% of the 257 tokens in the middle blocks), on random data.

CPU: float32. GPU (when CUDA is available): bf16 autocast, TF32 allowed, fused AdamW. The loss
is the real objective (`srdit.transport.training_losses`: flow matching + REG + REPA + CFM).
Prints one JSON object. Example:

    python benchmarks/train_step.py                     # CPU (~1-2 min) and, if present, the GPU
    python benchmarks/train_step.py --device cuda --gpu-batch 8 --gpu-batch 32 --compile
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def make_batch(cfg, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (batch,), generator=g)
    teacher_cls = torch.randn(batch, m.cls_token_dim, generator=g)
    teacher_tokens = torch.randn(batch, m.grid_size ** 2, m.cls_token_dim, generator=g)
    return [v.to(device) for v in (x0, y, teacher_cls, teacher_tokens)]


def bench(cfg, device: str, batch: int, steps: int, warmup: int, autocast_bf16: bool, compile_model: bool) -> dict:
    from srdit.models import build_model
    from srdit.transport import training_losses

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev).train()
    step_model = torch.compile(model) if compile_model else model
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                            fused=dev.type == "cuda")
    x0, y, teacher_cls, teacher_tokens = make_batch(cfg, batch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step(i: int) -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            losses = training_losses(step_model, x0, y, teacher_cls, teacher_tokens, cfg.objective,
                                     generator=gen, path_drop=model.draw_path_drop())
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses.total.detach()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    sync()
    elapsed = time.perf_counter() - t0
    result = dict(device=device, precision="bf16-autocast" if autocast_bf16 else "fp32", batch=batch,
                  compile=compile_model, warmup_steps=warmup, timed_steps=steps, warmup_s=round(warmup_s, 3),
                  s_per_step=round(elapsed / steps, 4), steps_per_s=round(steps / elapsed, 4),
                  samples_per_s=round(batch * steps / elapsed, 2), final_loss=round(float(loss), 4))
    if dev.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
        result["gpu"] = torch.cuda.get_device_name(dev)
    else:
        result["threads"] = torch.get_num_threads()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="b1_srdit", help="ablation entry to build (default: SR-DiT-B/1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when CUDA is available")
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--cpu-steps", type=int, default=2)
    p.add_argument("--cpu-warmup", type=int, default=1)
    p.add_argument("--gpu-batch", type=int, action="append", help="GPU batch sizes (repeatable; default 8)")
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--gpu-warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile on the GPU")
    args = p.parse_args(argv)

    from srdit.config import get_config
    cfg = get_config(args.preset)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):
        from srdit.models import build_model
        num_params = sum(p.numel() for p in build_model(cfg.model).parameters())
    m = cfg.model
    kept = max(1, int(m.num_tokens * (1 - m.sprint.drop_ratio))) if m.sprint.enabled else m.num_tokens
    report = dict(benchmark="train_step", preset=args.preset, parameters=num_params, tokens=m.num_tokens,
                  kept_tokens=kept,
                  torch=torch.__version__, cpu=platform.processor() or platform.machine(), results=[])
    if args.device in ("auto", "cpu"):
        report["results"].append(bench(cfg, "cpu", args.cpu_batch, args.cpu_steps, args.cpu_warmup, False, False))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        for batch in args.gpu_batch or [8]:
            for compile_model in ([False, True] if args.compile else [False]):
                report["results"].append(bench(cfg, "cuda", batch, args.gpu_steps, args.gpu_warmup, True,
                                               compile_model))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
