"""Training-step throughput of SR-DiT-B/1: forward + backward + grad clip + AdamW, in training
mode (SPRINT drops 75% of the 257 tokens in the middle blocks), on random data.

CPU: float32. GPU (when CUDA is available): bf16 autocast, TF32 allowed, fused AdamW. The loss
is the real objective (`srdit.transport.training_losses`: flow matching + REG + REPA + CFM).

`--original PATH` times ours against the original SR-DiT code side by side instead: PATH is a
checkout of SwayStar123/SpeedrunDiT (c24c2ff). Its `models/sit.py` (`SiT-B/1`, built with the
arguments its train.py passes) and `loss.py` (`SILoss`) are imported from PATH at run time, both
models start from the same weights (the original's, converted by `srdit.convert`), see the same
batch, use the same AdamW (as the original train.py builds it), thread count and precision (CPU:
float32; CUDA: bf16 autocast), and their timed steps are
interleaved (the order alternates every round: AB BA AB ...) so that load from other processes
hits both alike. Prints one JSON object. Examples (see benchmarks/README.md):

    python benchmarks/train_step.py                     # CPU (~1-2 min) and, if present, the GPU
    python benchmarks/train_step.py --device cuda --gpu-batch 8 --gpu-batch 32 --compile
    python benchmarks/train_step.py --original /tmp/speedrundit --device cpu --threads 1 --rounds 10
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# the original train.py's constructor arguments (train.py defaults: --fused-attn on, --cfg-prob
# 0.1, dinov2-vit-b teacher) plus qk_norm on as in the SR-DiT recipe; projector_dim and
# class_dropout_prob are the SiT defaults, written out. encoder_depth is fixed by SiT_B_1 (4).
ORIGINAL_MODEL = "SiT-B/1"
ORIGINAL_KWARGS = dict(input_size=16, in_channels=32, num_classes=1000, use_cfg=True, z_dims=[768],
                       projector_dim=2048, qk_norm=True, fused_attn=True, class_dropout_prob=0.1)


def make_batch(cfg, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (batch,), generator=g)
    teacher_cls = torch.randn(batch, m.cls_token_dim, generator=g)
    teacher_tokens = torch.randn(batch, m.grid_size ** 2, m.cls_token_dim, generator=g)
    return [v.to(device) for v in (x0, y, teacher_cls, teacher_tokens)]


def make_adamw(params, train_cfg, fused: bool | None) -> torch.optim.AdamW:
    """fused None: torch's default choice, which is what the original train.py gets."""
    return torch.optim.AdamW(params, lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=train_cfg.eps,
                             weight_decay=train_cfg.weight_decay, fused=fused)


# --------------------------------------------------------------------------------------------
# One training step of each implementation
# --------------------------------------------------------------------------------------------

def our_step_fn(cfg, dev: torch.device, batch: int, autocast_bf16: bool, compile_model: bool,
                fused_adamw: bool | None, state_dict: dict | None = None):
    """A closure running one training step of our model; returns the (detached) total loss."""
    from srdit.models import build_model
    from srdit.transport import training_losses

    torch.manual_seed(0)
    model = build_model(cfg.model)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    model = model.to(dev).train()
    step_model = torch.compile(model) if compile_model else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(params, cfg.train, fused=fused_adamw)
    x0, y, teacher_cls, teacher_tokens = make_batch(cfg, batch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            losses = training_losses(step_model, x0, y, teacher_cls, teacher_tokens, cfg.objective,
                                     generator=gen, path_drop=model.draw_path_drop())
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses.total.detach()

    return step


def import_original(path: Path):
    """(models.sit module, loss module) of the original checkout at `path`.

    Its modules are top-level `models` and `loss`: imported with `path` first on sys.path, then
    the path is taken off again (the modules stay in sys.modules under those names)."""
    if not (path / "models" / "sit.py").is_file() or not (path / "loss.py").is_file():
        raise SystemExit(f"--original {path}: expected a checkout of SwayStar123/SpeedrunDiT with models/sit.py "
                         f"and loss.py; get one with `git archive c24c2ff | tar -x -C DIR` from a clone")
    for name in ("models", "loss"):
        if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")).startswith(str(path)):
            raise SystemExit(f"--original: a module named {name!r} is already imported from elsewhere "
                             f"({sys.modules[name]}); run the benchmark as a script in a clean interpreter")
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("models.sit"), importlib.import_module("loss")
    except ImportError as err:
        raise SystemExit(f"--original: importing the original code failed ({err}); it needs timm and einops "
                         f"(pip install timm einops)") from err
    finally:
        sys.path.remove(str(path))


def original_step_fn(path: Path, cfg, dev: torch.device, batch: int, autocast_bf16: bool):
    """(closure running one training step of the original code, the original model).

    The step is train.py's inner loop without accelerate: SILoss forward (under bf16 autocast
    when asked: train.py's `--mixed-precision bf16`; off is `--mixed-precision no`), the weighted
    sum of its terms, backward, clip_grad_norm_ over model.parameters(), AdamW step (built as
    train.py builds it: torch's default implementation), zero_grad. The REPA target is
    [teacher CLS ; teacher tokens], as train.py builds it for DINOv2."""
    sit, loss = import_original(path)
    torch.manual_seed(0)
    model = sit.SiT_models[ORIGINAL_MODEL](**ORIGINAL_KWARGS).to(dev).train()
    o = cfg.objective
    loss_fn = loss.SILoss(prediction="v", path_type=o.path, weighting="uniform", cfm_weighting=o.cfm_weighting,
                          apply_time_shift=o.time_shift, shift_base=o.shift_base)
    opt = make_adamw(model.parameters(), cfg.train, fused=None)
    x0, y, teacher_cls, teacher_tokens = make_batch(cfg, batch, dev)
    zs = [torch.cat([teacher_cls.unsqueeze(1), teacher_tokens], dim=1)]

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss_v, loss_proj, _, _, loss_cls, loss_cfm, _ = loss_fn(model, x0, dict(y=y), zs=zs,
                                                                     cls_token=teacher_cls)
        total = (loss_v.mean() + loss_proj.mean() * o.proj_coeff + loss_cls.mean() * o.cls_coeff
                 + loss_cfm.mean() * o.cfm_coeff)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.detach()

    return step, model


def check_same_configuration(cfg, original_model) -> dict:
    """Refuse to compare unless our preset is the model the original builds, parameter for parameter;
    returns our converted copy of the original's initial weights."""
    from srdit.convert import convert_state_dict, model_config_from_args

    theirs = model_config_from_args(dict(model=ORIGINAL_MODEL, resolution=16 * ORIGINAL_KWARGS["input_size"],
                                         num_classes=ORIGINAL_KWARGS["num_classes"],
                                         qk_norm=ORIGINAL_KWARGS["qk_norm"], enc_type="dinov2-vit-b"))
    if theirs != cfg.model:
        raise SystemExit(f"--original: preset model config differs from the original {ORIGINAL_MODEL} "
                         f"({ORIGINAL_KWARGS}); use --preset b1_srdit.\nours:   {cfg.model}\ntheirs: {theirs}")
    o = cfg.objective
    if o.t_dist != "uniform" or o.path != "linear":
        raise SystemExit(f"--original: the comparison uses the original's uniform t on the linear path; "
                         f"the preset has t_dist={o.t_dist!r}, path={o.path!r}")
    return {k: v.cpu() for k, v in convert_state_dict(original_model.state_dict(), cfg.model).items()}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def bench(cfg, device: str, batch: int, steps: int, warmup: int, autocast_bf16: bool, compile_model: bool) -> dict:
    dev = torch.device(device)
    step = our_step_fn(cfg, dev, batch, autocast_bf16, compile_model, fused_adamw=dev.type == "cuda")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
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


def timed(step, sync) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one step. On a shared machine the CPU
    time is the steadier of the two: it does not count the time other processes hold the cores
    (with more than one thread it does count OpenMP spin-waiting)."""
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    loss = step()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, float(loss)


def side_by_side(cfg, original: Path, device: str, batch: int, rounds: int, warmup: int) -> dict:
    """Ours and the original, interleaved: `warmup` untimed steps each, then `rounds` rounds of
    one timed step each, the order alternating (AB BA AB ...). CPU: float32; CUDA: bf16 autocast
    (TF32 allowed, as train.py --allow-tf32). Both use AdamW as the original train.py builds it."""
    from tqdm import tqdm

    dev = torch.device(device)
    bf16 = dev.type == "cuda"
    original_step, original_model = original_step_fn(original, cfg, dev, batch, bf16)
    state = check_same_configuration(cfg, original_model)
    our_step = our_step_fn(cfg, dev, batch, bf16, False, fused_adamw=None, state_dict=state)
    del state

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    steps = {"ours": our_step, "original": original_step}
    for _ in tqdm(range(warmup), desc="warmup (both)", leave=False):
        for name in steps:
            steps[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    for r in tqdm(range(rounds), desc="interleaved rounds", leave=False):
        order = ["ours", "original"] if r % 2 == 0 else ["original", "ours"]
        for name in order:
            seconds, cpu_seconds, loss = timed(steps[name], sync)
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
            losses[name].append(loss)

    def summary(name):
        t, c = times[name], cpu_times[name]
        return dict(median_s_per_step=round(statistics.median(t), 4), min_s_per_step=round(min(t), 4),
                    max_s_per_step=round(max(t), 4), median_steps_per_s=round(1 / statistics.median(t), 4),
                    median_cpu_s_per_step=round(statistics.median(c), 4),
                    step_times_s=[round(x, 4) for x in t], step_cpu_s=[round(x, 4) for x in c],
                    final_loss=round(losses[name][-1], 4))

    def ratio(series):
        return round(statistics.median(series["ours"]) / statistics.median(series["original"]), 4)

    # ours / original within each round: the two steps of a round ran back to back
    paired = [a / b for a, b in zip(times["ours"], times["original"])]
    result = dict(mode="side_by_side", device=device, precision="bf16-autocast" if bf16 else "fp32", batch=batch,
                  threads=torch.get_num_threads(), warmup_steps_each=warmup, timed_steps_each=rounds,
                  order="alternating AB BA per round",
                  original=dict(path=str(original), model=ORIGINAL_MODEL, kwargs=ORIGINAL_KWARGS,
                                parameters=sum(p.numel() for p in original_model.parameters())),
                  ours_s=summary("ours"), original_s=summary("original"),
                  ratio_ours_over_original=ratio(times), cpu_ratio_ours_over_original=ratio(cpu_times),
                  # the fastest step of each: the least disturbed by other processes
                  min_ratio_ours_over_original=round(min(times["ours"]) / min(times["original"]), 4),
                  median_paired_ratio=round(statistics.median(paired), 4),
                  paired_ratio_quartiles=[round(q, 4) for q in statistics.quantiles(paired, n=4)]
                  if len(paired) > 1 else None)
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="b1_srdit", help="ablation entry to build (default: SR-DiT-B/1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when CUDA is available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; with --original: 1, the steadiest "
                        "on a shared machine)")
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--cpu-steps", type=int, default=2)
    p.add_argument("--cpu-warmup", type=int, default=1)
    p.add_argument("--gpu-batch", type=int, action="append", help="GPU batch sizes (repeatable; default 8)")
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--gpu-warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile on the GPU")
    p.add_argument("--original", type=Path, default=None,
                   help="checkout of SwayStar123/SpeedrunDiT: time ours against it side by side on the CPU")
    p.add_argument("--rounds", type=int, default=10,
                   help="--original on the CPU: timed steps of each, interleaved (GPU: --gpu-steps)")
    p.add_argument("--warmup", type=int, default=1,
                   help="--original on the CPU: untimed steps of each first (GPU: --gpu-warmup)")
    args = p.parse_args(argv)

    from srdit.config import get_config
    cfg = get_config(args.preset)
    if args.threads is None and args.original is not None:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):
        from srdit.models import build_model
        num_params = sum(p.numel() for p in build_model(cfg.model).parameters())
    m = cfg.model
    kept = max(1, int(m.num_tokens * (1 - m.sprint.drop_ratio))) if m.sprint.enabled else m.num_tokens
    report = dict(benchmark="train_step", preset=args.preset, parameters=num_params, tokens=m.num_tokens,
                  kept_tokens=kept, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                  command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  results=[])
    use_cpu = args.device in ("auto", "cpu")
    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.original is not None:
        if args.rounds < 1 or args.warmup < 0 or args.gpu_steps < 1 or args.gpu_warmup < 0:
            p.error("--rounds and --gpu-steps must be >= 1, --warmup and --gpu-warmup >= 0")
        if args.compile:
            p.error("--compile: the side-by-side comparison runs both models eagerly; drop --compile")
        original = args.original.resolve()
        if use_cpu:
            report["results"].append(side_by_side(cfg, original, "cpu", args.cpu_batch, args.rounds, args.warmup))
        if use_gpu:
            for batch in args.gpu_batch or [8]:
                report["results"].append(side_by_side(cfg, original, "cuda", batch, args.gpu_steps,
                                                      args.gpu_warmup))
        print(json.dumps(report, indent=2))
        return 0
    if use_cpu:
        report["results"].append(bench(cfg, "cpu", args.cpu_batch, args.cpu_steps, args.cpu_warmup, False, False))
    if use_gpu:
        for batch in args.gpu_batch or [8]:
            for compile_model in ([False, True] if args.compile else [False]):
                report["results"].append(bench(cfg, "cuda", batch, args.gpu_steps, args.gpu_warmup, True,
                                               compile_model))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
