"""`srdit train`: DeepSpeed ZeRO training in bounded segments that resume exactly.

    srdit train NAME --run-dir DIR --cache PATH [--until-step N] [--set key=value ...]
        [--max-segment-steps K] [--max-segment-minutes M] [--registry YAML]
        [--resources DIR] [--random-teacher]

Running the same command again continues the run: model, EMA, AdamW state, every RNG (per
rank) and the data position come back from `DIR/checkpoints/latest`. One invocation (a
*segment*) trains until the first of: `--until-step` (default `train.max_steps`), K steps, M
minutes, or SIGTERM / SIGUSR1. It then writes a checkpoint and exits 0, or 75 (EXIT_REQUEUE,
"requeue and resume") after a signal. A non-finite loss or gradient norm stops the run with
exit 3 and writes no checkpoint, so the last good checkpoint stays as it was; it marks the run
diverged (`DIR/diverged.json`), and no later invocation trains it until that file is deleted.
Rank 0 holds the run lock (`DIR/trainer.lock`, srdit/runlock.py) while it trains: a second
trainer on the same run exits 4 at once, naming the holder, and touches nothing.

The recipe (docs/recipe.md 2.14): AdamW (lr 1e-4 constant, betas 0.9/0.999, wd 0, eps 1e-8, no
warm-up), gradient clipping at 1.0, a global batch (256) = micro-batch x accumulation x world
size whatever the number of processes, EMA 0.9999 after every optimizer step (srdit/ema.py).
Precision: the parameters, gradients, gradient all-reduce and optimizer stay fp32; on a GPU the
forward runs under bf16 autocast (what the original's `accelerate --mixed-precision bf16` does),
on the CPU in fp32. ZeRO stage 1 or 2 (`train.zero_stage`) partitions the AdamW state (and, for
2, the gradients) across ranks, with the gradient reduction in 25M-element buckets overlapped
with the backward pass; the parameters stay whole on every rank. "auto" (the default) takes
stage 0, plain data parallel, on one process and below 500M parameters (B/1: its AdamW state is
1.1 GB, and DeepSpeed's stage 1/2 read the gradient norm back to the host every step), stage 1
above (XL/1).

Speed (a GPU step is bound by launch overheads, not arithmetic): the forward and the loss are
one `torch.compile`d graph (`StepLoss`, `train.compile: auto` = on CUDA), with every random
number drawn outside it so that compiling changes no random stream; batches are copied to the
GPU on a side stream from pinned memory one step ahead (srdit/data/prefetch.py); the loop never
waits for the device except at logging steps (`train.log_every`) and checkpoints: the loss
terms, the gradient norm and a "first non-finite step" flag accumulate on the device and are
read there (so divergence is found at the next such step, named by the step it happened at),
and the stop flags (signals, time limit) are agreed on over a CPU (gloo) group; DeepSpeed's
throughput timer, which synchronises twice per micro-batch, is off.

Randomness, and why resume is exact:
- t, eps and the class-token noise come from a generator seeded by (seed, step, rank, micro
  step), so they do not depend on anything carried between steps;
- the SPRINT path-drop coin comes from a generator seeded by (seed, step, micro step), the same
  on every rank without a broadcast (the original broadcasts it from rank 0);
- SPRINT's kept tokens and the label dropout are drawn inside the model from the global torch
  RNG, seeded with seed + rank at the start and saved per rank in every checkpoint, with the
  python and numpy RNGs.
On the CPU, a run cut into segments ends bitwise identical to an uninterrupted one (tested).
On GPUs the restored state is identical too, but some CUDA kernels (index_add in backward,
atomics) are not deterministic, so two runs differ at rounding level whatever the resume.
Resuming on a different number of processes restores the weights, EMA and AdamW state
(moments and step count) exactly, keeps the global batch and continues the same seeded data
order at the same sample; what changes is the split of each global batch into micro-batches
(so the float sums of the gradient reduction) and the per-rank random streams (noise, t,
SPRINT's kept tokens, label dropout), so from there the run is a different, equally valid one.

Signals: under Slurm, `sbatch --signal=USR1@120` (no `B:`) signals every task of the job steps,
i.e. the trainers started by `srun`. Under torchrun, torchrun forwards SIGTERM to its workers,
and SIGUSR1 only when `TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1` is
set; it also does not pass the workers' exit code 75 on (it exits 1), so `DIR/status.json`
records the outcome of every segment (`state`: finished, segment_done, preempted or diverged,
and `exit_code`), and `DIR/segments.jsonl` keeps the history.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srdit.checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FORMAT, LATEST, SNAPSHOT_DIR, STATE_FILE,
                              atomic_torch_save, atomic_write_json, atomic_write_text, capture_rng_state,
                              gather_optimizer_state, latest_checkpoint, load_snapshot, prune_checkpoints,
                              restore_optimizer_state, restore_rng_state, save_snapshot, seed_everything,
                              step_tag)
from srdit.config import ConfigError, ExperimentConfig, get_config, parse_overrides
from srdit.runlock import RunDiverged, RunLock, RunLocked, check_not_diverged, mark_diverged

__all__ = ["EXIT_OK", "EXIT_REQUEUE", "EXIT_DIVERGED", "EXIT_LOCKED", "TrainingDiverged", "train",
           "load_snapshot",
           "register", "run", "batch_geometry"]

EXIT_OK = 0
EXIT_REQUEUE = 75          # EX_TEMPFAIL: "try again"; the workflow and submitit requeue and resume
EXIT_DIVERGED = 3
EXIT_LOCKED = 4            # another trainer holds the run (srdit/runlock.py); nothing was touched

# Latent normalisation when data.latent_scale is None: the tokenizer's own constant.
DEFAULT_LATENT_SCALE = {"e2e-invae": 0.3099, "sd-vae": 0.18215, "pixel": 1.0}

# Config keys a later segment may change without starting a new run; anything else must match
# the run's config.json (a different lr or model in the same directory would be a silent mix).
RESUMABLE_KEYS = ("name", "description", "train.max_steps", "train.segment_steps", "train.segment_minutes",
                  "train.num_workers", "train.log_every", "train.ckpt_every", "train.keep_ckpts",
                  "train.micro_batch", "train.compile", "train.zero_stage", "sample", "eval")

class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops and keeps its last good checkpoint."""


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="ablation entry, e.g. b1_srdit or demo_srdit")
    parser.add_argument("--run-dir", required=True, help="run directory (created; rerun the same command to resume)")
    parser.add_argument("--cache", required=True, help="training cache: cache.h5 or an index JSON (srdit encode)")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop at this optimizer step (default: train.max_steps)")
    parser.add_argument("--registry", action="append", default=[], help="extra ablation registry YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.micro_batch=16")
    parser.add_argument("--resources", default=None, help="resources folder (teacher weights when "
                        "the cache has no teacher features)")
    parser.add_argument("--random-teacher", action="store_true",
                        help="random teacher weights (CPU demo / tests only: no downloads)")
    parser.add_argument("--max-segment-steps", type=int, default=None,
                        help="train at most K steps in this job (overrides train.segment_steps)")
    parser.add_argument("--max-segment-minutes", type=float, default=None,
                        help="train at most M minutes in this job (overrides train.segment_minutes)")
    parser.add_argument("--stage-dir", default="",
                        help="copy the cache to this node-local folder first and train from the verified "
                             "copy (environment variables expanded, e.g. '$TMPDIR'; srdit/staging.py)")
    from srdit.distributed import add_launch_arguments
    add_launch_arguments(parser)       # --nnodes, --nproc-per-node, ...: one process per GPU
    parser.set_defaults(func=run)


def run(args) -> int:
    from srdit.distributed import launch_workers
    code = launch_workers(args)        # started once: start one process per GPU of the job, or train here
    if code is not None:
        return code
    cfg = get_config(args.name, *args.registry, overrides=parse_overrides(args.set))
    cache = args.cache
    if args.stage_dir:
        from srdit.staging import stage_cache
        started = time.monotonic()
        cache = stage_cache(cache, args.stage_dir)
        if args.max_segment_minutes:       # the job's time limit covers the copy too
            args.max_segment_minutes = max(1.0, args.max_segment_minutes - (time.monotonic() - started) / 60)
    return train(cfg, args.run_dir, cache, until_step=args.until_step,
                 segment_steps=args.max_segment_steps, segment_minutes=args.max_segment_minutes,
                 resources=args.resources, random_teacher=args.random_teacher)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def batch_geometry(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation) with micro x accumulation x world = global_batch.

    The micro-batch is the largest divisor of global_batch / world_size that is <= the
    configured one, so that the global batch stays fixed when the number of processes changes.
    """
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch: {global_batch} is not divisible by the world size "
                          f"{world_size}; the global batch must stay fixed, so run on a number of "
                          f"processes that divides it")
    per_rank = global_batch // world_size
    micro = max(d for d in range(1, min(micro_batch, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (seed, step, rank, ...), well mixed."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def path_drop_coin(seed: int, step: int, micro: int, p: float) -> bool:
    """SPRINT's whole-batch path-drop coin, identical on every rank without communication
    (drawn on the host: no tensor, nothing to read back from a device)."""
    return bool(np.random.default_rng(_mix_seed(seed, 0x5EED, step, micro)).random() < p)


_NO_BAD_STEP = 2**62          # "no non-finite step seen" in the loop's device-side bookkeeping


def _host_flag_group(world_size: int):
    """The process group for the loop's host flags: False on one process, the default group when
    it is gloo (CPU), else a gloo group beside NCCL so that agreeing on a signal never touches
    the GPU. Collective: every rank calls it at the same point."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return False
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")


def _draw_noise(*args, **kwargs):
    from srdit.transport import draw_noise
    return draw_noise(*args, **kwargs)


def _noise_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_mix_seed(seed, step, rank, micro))


# ZeRO-1 pays only when the AdamW moments (8 bytes per parameter) are large next to the GPU's
# memory; below this the partitioning saves little and costs a host sync per step (see
# resolve_zero_stage). B/1 (140M parameters) has 1.1 GB of moments, XL/1 (675M) 5.4 GB.
ZERO_AUTO_MIN_PARAMS = 500_000_000


def resolve_zero_stage(setting, num_params: int, world_size: int) -> int:
    """The ZeRO stage the engine runs: `train.zero_stage`, or for "auto" 0 on one process or
    below ZERO_AUTO_MIN_PARAMS parameters (plain data parallel: DeepSpeed's stage 1/2 read the
    gradient norm back to the host every step) and 1 above."""
    if setting != "auto":
        return int(setting)
    return 0 if world_size == 1 or num_params < ZERO_AUTO_MIN_PARAMS else 1


def deepspeed_config(global_batch: int, micro_batch: int, accumulation: int, zero_stage: int, grad_clip: float,
                     cuda: bool) -> dict:
    """The DeepSpeed engine config: no timers or prints that synchronise the device, gradient
    reduction in 25M-element buckets overlapped with the backward pass (ZeRO 1/2)."""
    bucket = 25_000_000
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        # ZeRO 1/2 clip inside the optimizer; for stage 0 the trainer clips (see _train_step)
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,
        # fp32 parameters, gradients and optimizer; bf16 is autocast in the forward only
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": cuda,
                              "reduce_scatter": True, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # the throughput timer synchronises the device twice per micro-batch when enabled
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


class StepLoss(torch.nn.Module):
    """The differentiable part of one micro-step, model forward and loss, as one module so that
    `torch.compile` sees (and fuses) both. Every random number is an input (t, eps, eps_c, label
    dropout, SPRINT's kept tokens, the path-drop coin), drawn by the trainer in eager mode, so a
    compiled and an eager step see the same numbers and the RNG streams do not depend on
    `train.compile`. Returns (total loss, the five loss terms stacked, detached)."""

    def __init__(self, model: torch.nn.Module, objective, latent_scale: float, latent_bias: float,
                 autocast_dtype: torch.dtype | None, device_type: str):
        super().__init__()
        from srdit.transport import training_losses
        self.model, self.objective = model, objective
        self.latent_scale, self.latent_bias = float(latent_scale), float(latent_bias)
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        # the trainer's hook (tests replace it) when set, else the objective itself
        self.losses_fn = _training_losses if _training_losses is not _TRAINING_LOSSES_HOOK else training_losses

    def forward(self, latent, y, t_cls, t_tokens, t, eps, eps_c, drop_labels, ids_keep, path_drop: bool | None):
        x0 = latent.float() * self.latent_scale + self.latent_bias
        t_cls = t_cls.float() if t_cls is not None else None
        t_tokens = t_tokens.float() if t_tokens is not None else None
        kwargs = dict(t=t, noise=(eps, eps_c), ids_keep=ids_keep, drop_labels=drop_labels, path_drop=path_drop)
        if self.autocast_dtype is None:
            terms = self.losses_fn(self.model, x0, y.long(), t_cls, t_tokens, self.objective, **kwargs)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                terms = self.losses_fn(self.model, x0, y.long(), t_cls, t_tokens, self.objective, **kwargs)
        values = torch.stack([terms.total.detach().float(), terms.v.detach().float(), terms.cls.detach().float(),
                              terms.proj.detach().float(), terms.cfm.detach().float()])
        return terms.total, values


def _flat_items(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _flat_items(v, key)
        else:
            yield key, v


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two config dicts, minus those a segment may change."""
    a, b = dict(_flat_items(old)), dict(_flat_items(new))
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    return [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]


def _check_or_write_config(run_dir: Path, cfg: ExperimentConfig, write: bool = True) -> None:
    """Refuse a config that differs from the run's config.json (beyond RESUMABLE_KEYS); then
    (re)write it when `write` (rank 0 only)."""
    path = run_dir / "config.json"
    new = cfg.to_dict()
    if path.exists():
        old = json.loads(path.read_text())
        diffs = config_differences(old, new)
        if diffs:
            details = "; ".join(f"{k}: {dict(_flat_items(old)).get(k)!r} -> {dict(_flat_items(new)).get(k)!r}"
                                for k in diffs[:8])
            raise ConfigError(f"{run_dir} holds a run with another config ({details}); resume it with "
                              f"the same entry and overrides, or use a new --run-dir")
    if write:
        atomic_write_json(path, new)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


class StopSignals:
    """Remembers SIGTERM / SIGUSR1; the loop finishes the current step, checkpoints and exits 75."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            print(f"srdit train: got {signal.Signals(signum).name}; finishing this step, then "
                  f"checkpointing and exiting {EXIT_REQUEUE}", file=sys.stderr, flush=True)
        self.received = signum


@dataclass
class Segment:
    """Bounds of this job."""
    target_step: int           # --until-step or train.max_steps
    max_steps: int             # 0 = no bound
    max_minutes: float         # 0 = no bound


# --------------------------------------------------------------------------------------------
# Components (imported lazily: the models, data and teacher modules are heavy)
# --------------------------------------------------------------------------------------------

def _build_model(cfg: ExperimentConfig):
    from srdit.models import build_model
    return build_model(cfg.model)


def _make_loader(cache, micro_batch, rank, world_size, seed, num_workers, cfg: ExperimentConfig, device):
    from srdit.data.dataset import make_train_loader
    expect = dict(tokenizer=cfg.data.tokenizer, resolution=cfg.data.resolution, teacher=cfg.data.teacher)
    # float16 features (as cached) halve the host-to-GPU traffic; the trainer casts on the device
    feature_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return make_train_loader(cache, micro_batch, rank, world_size, seed, num_workers, expect=expect,
                             feature_dtype=feature_dtype)


def _load_teacher(cfg: ExperimentConfig, resources, random_init: bool):
    from srdit.teachers import load_teacher
    return load_teacher(cfg.data.teacher, cfg.data.resolution, resources_root=resources, random_init=random_init)


def _training_losses(*args, **kwargs):
    from srdit.transport import training_losses
    return training_losses(*args, **kwargs)


_TRAINING_LOSSES_HOOK = _training_losses     # replaced by tests to poison the loss


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def train(cfg: ExperimentConfig, run_dir: str | Path, cache: str | Path, *, until_step: int | None = None,
          segment_steps: int | None = None, segment_minutes: float | None = None,
          resources: str | Path | None = None, random_teacher: bool = False, on_step=None,
          save_at_end: bool = True, argv: list[str] | None = None) -> int:
    """Train one segment of run `run_dir`; returns the exit status (0, 75 or 3).

    on_step(step): optional callback after every optimizer step (tests, benchmarks).
    save_at_end: False skips the segment's final checkpoint (benchmarks; periodic and
    preemption checkpoints are still written).
    """
    from srdit.distributed import (LaunchError, barrier, check_worker_devices, describe_worker, detect_launch,
                                   init_process_group, pick_device, shutdown)

    launch = detect_launch()
    device = pick_device(launch)
    try:
        check_worker_devices(launch, device)       # one process per GPU, or an error naming the mismatch
    except LaunchError as e:
        print(f"srdit train: {e}", file=sys.stderr, flush=True)
        return 2
    backend = init_process_group(launch, device)
    if launch.local_rank == 0:                     # one line per node: world size and the GPUs seen
        print(f"srdit train: {describe_worker(launch, device, backend)}", file=sys.stderr, flush=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        with _run_gate(Path(run_dir), launch, argv):
            trainer = _Trainer(cfg, Path(run_dir), Path(cache), launch, device, resources, random_teacher,
                               on_step, argv)
            trainer.save_at_end = save_at_end
            code = trainer.run(until_step, segment_steps, segment_minutes)
            # no rank exits before rank 0 has recorded the outcome (srun ends a step at the first
            # task that exits non-zero, e.g. 75)
            barrier()
            return code
    except (RunLocked, RunDiverged) as e:
        if launch.rank == 0:
            print(f"srdit train: {e}", file=sys.stderr, flush=True)
        return EXIT_LOCKED if isinstance(e, RunLocked) else EXIT_DIVERGED
    finally:
        shutdown()


@contextlib.contextmanager
def _run_gate(run_dir: Path, launch, argv):
    """Rank 0 checks the diverged marker and holds the run lock while the trainer lives (see
    srdit/runlock.py); every rank learns the outcome, so that all of them refuse together,
    before anything in the run directory is touched."""
    lock, refusal = None, None
    if launch.rank == 0:
        try:
            check_not_diverged(run_dir)
            lock = RunLock(run_dir, argv).acquire()
        except (RunLocked, RunDiverged) as e:
            refusal = e
    if launch.world_size > 1:
        box = [None if refusal is None else (isinstance(refusal, RunLocked), str(refusal))]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None and refusal is None:
            refusal = (RunLocked if box[0][0] else RunDiverged)(box[0][1])
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


class _Trainer:
    def __init__(self, cfg, run_dir, cache, launch, device, resources, random_teacher, on_step, argv):
        self.cfg, self.run_dir, self.cache = cfg, run_dir, cache
        self.launch, self.device = launch, device
        self.rank, self.world = launch.rank, launch.world_size
        self.is_main = launch.rank == 0
        self.resources, self.random_teacher = resources, random_teacher
        self.on_step, self.argv = on_step, argv
        self.ckpt_root = run_dir / CHECKPOINT_DIR
        self.snap_root = run_dir / SNAPSHOT_DIR
        t = cfg.train
        precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.precision = precision
        # train.compile "auto": compile the step on CUDA; the CPU runs eager (tests, the demo)
        self.compile = device.type == "cuda" if t.compile == "auto" else bool(t.compile)
        self.micro, self.accum = batch_geometry(t.global_batch, t.micro_batch, self.world)
        scale = cfg.data.latent_scale
        self.latent_scale = DEFAULT_LATENT_SCALE[cfg.data.tokenizer] if scale is None else scale
        self.latent_bias = cfg.data.latent_bias
        self.teacher = None
        self.save_at_end = True
        if device.type == "cuda":         # the recipe's --allow-tf32 (fp32 matmuls outside autocast)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- set-up
    def run(self, until_step, segment_steps, segment_minutes) -> int:
        from srdit import distributed as dist_utils
        from srdit.ema import EMA
        from srdit.flops import train_flops_per_image
        from srdit.runinfo import collect_run_info
        from srdit.trainlog import MetricsLogger

        cfg, t = self.cfg, self.cfg.train
        target = t.max_steps if until_step is None else until_step
        if target > t.max_steps:
            raise ConfigError(f"--until-step {target} is beyond train.max_steps {t.max_steps}; "
                              f"raise it with --set train.max_steps={target}")
        seg = Segment(target, t.segment_steps if segment_steps is None else segment_steps,
                      t.segment_minutes if segment_minutes is None else segment_minutes)

        # every rank checks (an error on rank 0 alone would leave the others waiting), then rank 0 writes
        _check_or_write_config(self.run_dir, cfg, write=False)
        dist_utils.barrier()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(exist_ok=True)
            self.snap_root.mkdir(exist_ok=True)
            _check_or_write_config(self.run_dir, cfg)
        dist_utils.barrier()

        # Model and EMA. Every rank builds the same initial weights from the same seed.
        seed_everything(t.seed)
        model = _build_model(cfg).to(self.device)
        self.ema = EMA(model, t.ema_decay)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        resume_dir = latest_checkpoint(self.ckpt_root)
        state, rank_state = None, None
        self.step = 0
        if resume_dir is not None:
            state, rank_state = self._read_checkpoint(resume_dir)
            model.load_state_dict(state["model"], strict=True)      # before DeepSpeed copies it
            self.ema.load_state_dict(state["ema"])
            self.step = int(state["step"])
            snapshot = self.snap_root / f"{step_tag(self.step)}.safetensors"
            if self.is_main and not snapshot.exists():
                # The snapshot of the resumed step went missing (e.g. the workflow deleted the output of
                # a job that failed after writing it): write it again, or a rerun ending at this step
                # would leave its output absent.
                save_snapshot(snapshot, {k: v.cpu() for k, v in state["model"].items()},
                              {k: v.cpu() for k, v in state["ema"].items()}, cfg.to_json(), self.step)
        self.zero_stage = resolve_zero_stage(t.zero_stage, sum(p.numel() for _, p in self.named_params), self.world)
        self.engine = self._build_engine(model)
        if state is not None:
            restore_optimizer_state(self.engine, self.named_params, state["optimizer"])
        self.step_loss = StepLoss(model, cfg.objective, self.latent_scale, self.latent_bias, self.autocast_dtype,
                                  self.device.type)
        if self.compile:
            # the whole micro-step (forward and loss) as one graph; randomness is drawn outside
            self.step_loss = torch.compile(self.step_loss)
        self._host_group = _host_flag_group(self.world)

        from srdit.data.prefetch import DevicePrefetcher
        self.loader = DevicePrefetcher(_make_loader(self.cache, self.micro, self.rank, self.world, t.seed,
                                                    t.num_workers, cfg, self.device), self.device)
        if state is not None:
            self._restore_loader(state, rank_state)
        self._batches = iter(self.loader)

        # RNG last: nothing random may happen between here and the first step.
        if rank_state is not None:
            restore_rng_state(rank_state["rng"], self.device)
        elif state is not None:
            seed_everything(_mix_seed(t.seed, self.step, self.rank, 0xE1A5))
        else:
            seed_everything(t.seed + self.rank)

        self.last_saved = self.step if state is not None else -1
        self.start_step = self.step
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, start_step=self.step,
                                    config=cfg.to_dict(), run_name=cfg.name)
        self.flops_per_image = train_flops_per_image(cfg.model)
        if self.is_main:
            info = collect_run_info(self.argv, world_size=self.world, launcher=self.launch.launcher,
                                    device=str(self.device), precision=self.precision,
                                    micro_batch=self.micro, accumulation=self.accum,
                                    zero_stage=self.zero_stage, compile=self.compile, start_step=self.step,
                                    target_step=seg.target_step, max_steps=t.max_steps,
                                    resumed_from=str(resume_dir) if resume_dir else None)
            atomic_write_json(self.run_dir / "env.json", info)
            if resume_dir is not None:
                self.logger.event(self.step, "resume", checkpoint=resume_dir.name,
                                  saved_world_size=state["world_size"], world_size=self.world)
        signals = StopSignals()
        signals.install()
        try:
            try:
                reason = self._loop(seg, signals)
            except TrainingDiverged as e:
                print(f"srdit train: {e}", file=sys.stderr, flush=True)
                self._finish("diverged", EXIT_DIVERGED, str(e))
                return EXIT_DIVERGED
            if self.step > max(self.last_saved, 0) and (self.save_at_end or reason == "preempted"):
                self._save_checkpoint(reason)
        finally:
            signals.uninstall()
            self.logger.close()
        code = EXIT_REQUEUE if reason == "preempted" else EXIT_OK
        if reason == "preempted":
            state_name = "preempted"
        else:
            state_name = "finished" if self.step >= t.max_steps else "segment_done"
        self._finish(state_name, code, reason)
        return code

    def _build_engine(self, model):
        import deepspeed

        t = self.cfg.train
        optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=t.lr, betas=tuple(t.betas),
                                      weight_decay=t.weight_decay, eps=t.eps,
                                      # fused (CPU and CUDA): one kernel, and no per-parameter
                                      # read of the step counter (`foreach`/single-tensor call .item())
                                      fused=True)
        ds_config = deepspeed_config(t.global_batch, self.micro, self.accum, self.zero_stage, t.grad_clip,
                                     self.device.type == "cuda")
        # DeepSpeed 0.19's start-up broadcast of the weights from rank 0 views every parameter
        # as bytes, which fails for 0-dim tensors (the value-residual lambdas). Do the same
        # broadcast here, shape-safe, and switch DeepSpeed's off while it sets up.
        from unittest import mock
        from deepspeed.runtime.engine import DeepSpeedEngine
        from srdit.distributed import broadcast_parameters

        broadcast_parameters(model)
        with mock.patch.object(DeepSpeedEngine, "_broadcast_model", lambda engine: None):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return engine

    def _read_checkpoint(self, path: Path):
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path / STATE_FILE}: unknown format {state.get('format')!r} "
                             f"(expected {CHECKPOINT_FORMAT!r})")
        diffs = config_differences(json.loads(state["config"]), self.cfg.to_dict())
        if diffs:
            raise ConfigError(f"checkpoint {path} was written with another config (differs in {diffs[:8]}); "
                              f"resume with the same entry and overrides, or use a new --run-dir")
        saved_world = int(state["world_size"])
        if saved_world == self.world:      # this rank's RNG states and data position
            return state, torch.load(path / f"rank{self.rank:05d}.pt", map_location="cpu", weights_only=True)
        if self.is_main:
            print(f"srdit train: resuming a {saved_world}-process checkpoint on {self.world} "
                  f"processes: weights, EMA and AdamW state are restored exactly, the data continue "
                  f"at sample {int(state['step']) * self.cfg.train.global_batch} of the same order; "
                  f"the per-rank random streams start afresh", file=sys.stderr, flush=True)
        return state, None

    def _restore_loader(self, state, rank_state) -> None:
        """Same world size and micro-batch: the saved position, exactly. Otherwise the position
        is recomputed: the loader counts micro-batch rounds (one micro-batch per rank each) and
        every step consumes `accumulation` of them, so step s starts at round s x accumulation,
        i.e. after s x global_batch samples of the same seeded order."""
        if rank_state is not None and state["micro_batch"] == self.micro:
            self.loader.load_state_dict(rank_state["loader"])
            return
        remapped = dict(self.loader.state_dict(), position=self.step * self.accum)
        self.loader.load_state_dict(remapped)

    # ---------------------------------------------------------------- the loop
    def _next_batch(self):
        # The loader must not draw from the training RNG streams: torch's DataLoader takes its
        # base seed from the global generator whenever it (re)creates an iterator, which a
        # resumed job does at a different step than an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            try:
                return next(self._batches)
            except StopIteration:          # a finite loader ended an epoch: start the next one
                self._batches = iter(self.loader)
                return next(self._batches)

    def _teacher_features(self, batch):
        if batch.get("teacher_cls") is not None:
            return (batch["teacher_cls"].to(self.device, non_blocking=True).float(),
                    batch["teacher_tokens"].to(self.device, non_blocking=True).float())
        if "image" not in batch:
            raise KeyError(f"training batch has neither teacher features nor images (keys: {sorted(batch)}); "
                           f"rebuild the cache with `srdit encode`")
        if self.teacher is None:
            # its own RNG scope: a randomly initialised teacher must not shift the training streams
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.cfg.train.seed)
                self.teacher = _load_teacher(self.cfg, self.resources, self.random_teacher)
            self.teacher = self.teacher.to(self.device).eval().requires_grad_(False)
        images = batch["image"].to(self.device, non_blocking=True)
        if images.shape[1] == 3 and images.shape[-1] != 3:     # BCHW from the loader -> BHWC
            images = images.permute(0, 2, 3, 1)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.device.type == "cuda"):
            cls, tokens = self.teacher.features(images)
        return cls.float(), tokens.float()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_step(self):
        """One optimizer step over `accum` micro-batches; returns (loss terms summed, grad norm,
        data s). The losses and the norm stay on the device: nothing here waits for the GPU."""
        cfg, step = self.cfg, self.step
        sprint = cfg.model.sprint
        needs_teacher = cfg.model.class_token or cfg.objective.proj_coeff > 0
        cls_dim = cfg.model.cls_token_dim if cfg.model.class_token else None
        latent_shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        bare = self.engine.module
        sums, data_s, clip_norm = None, 0.0, None
        for micro in range(self.accum):
            t0 = time.perf_counter()
            batch = self._next_batch()
            data_s += time.perf_counter() - t0
            latent = batch["latent"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            t_cls, t_tokens = self._teacher_features(batch) if needs_teacher else (None, None)
            coin = (path_drop_coin(cfg.train.seed, step, micro, sprint.path_drop)
                    if sprint.enabled and sprint.path_drop > 0 else None)
            # every random number of the micro-step, drawn here in eager mode (see StepLoss)
            gen = _noise_generator(cfg.train.seed, step, self.rank, micro, self.device)
            t, eps, eps_c = _draw_noise(latent.shape[0], cfg.objective, latent_shape, cls_dim, gen, self.device)
            drop_labels, ids_keep = bare.draw_training_randomness(latent.shape[0], self.device)
            total, values = self.step_loss(latent, y, t_cls, t_tokens, t, eps, eps_c, drop_labels, ids_keep, coin)
            self.engine.backward(total)
            if micro == self.accum - 1 and self.zero_stage == 0:
                # Stage 0: the gradients are all-reduced by now. DeepSpeed 0.19's own fp32 clipping
                # multiplies each gradient by a (1,) tensor, which fails for 0-dim parameters.
                clip_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named_params],
                                                           self.cfg.train.grad_clip, foreach=True)
            self.engine.step()
            sums = values if sums is None else sums + values
        grad_norm = clip_norm if self.zero_stage == 0 else self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm,
                                    dtype=torch.float32, device=self.device).reshape(())
        return sums / self.accum, grad_norm, data_s

    def _agree(self, flags: list[bool]) -> list[bool]:
        """Host flags (signal received, out of time) OR-ed over the ranks, on the CPU: no device
        synchronisation (a gloo group next to NCCL)."""
        if self._host_group is False:
            return flags
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._host_group)
        return [bool(v) for v in t.numpy()]

    def _check_finite(self, window) -> None:
        """Raise TrainingDiverged when any rank saw a non-finite loss or gradient norm since the
        last check. One device read, at log and checkpoint steps only: each step only folds its
        flag into `first_bad` (the first bad step, on the device)."""
        first_bad = window["first_bad"]
        if self.world > 1:
            first_bad = first_bad.clone()
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        bad_step = int(first_bad.item())
        if bad_step >= _NO_BAD_STEP:
            return
        values = window["bad_values"].tolist()
        good = latest_checkpoint(self.ckpt_root)
        kept = (f"the last good checkpoint {good} is untouched" if good is not None
                else "no checkpoint had been written yet")
        seen = (f" (loss terms total/v/cls/proj/cfm {values[1:6]}, grad norm {values[6]})"
                if values[0] == bad_step else "")
        raise TrainingDiverged(
            f"non-finite loss or gradient at step {bad_step}{seen}; stopped without saving at step {self.step}, "
            f"{kept}. Lower train.lr or check the cache for bad latents, then rerun to resume")

    def _new_window(self) -> dict:
        return dict(steps=0, loss=torch.zeros(5, device=self.device), grad=torch.zeros((), device=self.device),
                    data_s=0.0, t0=time.perf_counter(),
                    first_bad=torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=self.device),
                    bad_values=torch.full((7,), -1.0, dtype=torch.float64, device=self.device))

    def _loop(self, seg: Segment, signals: StopSignals) -> str:
        from tqdm import tqdm
        from srdit.flops import mfu, peak_flops_per_device

        cfg, t = self.cfg, self.cfg.train
        self.engine.train()
        start_step, t_start = self.step, time.monotonic()
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        peak = peak_flops_per_device(device_name)
        window = self._new_window()
        bar = tqdm(total=seg.target_step, initial=self.step, disable=not self.is_main, unit="step",
                   desc=f"train {cfg.name}", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        try:
            while True:
                if self.step >= seg.target_step:
                    return "done"
                if seg.max_steps and self.step - start_step >= seg.max_steps:
                    return "segment_steps"
                losses, grad_norm, data_s = self._train_step()
                self.ema.update(self.engine.module)
                self.step += 1
                if self.on_step is not None:
                    self.on_step(self.step)
                # device-side bookkeeping only: the first non-finite step and its values
                finite = torch.isfinite(losses).all() & torch.isfinite(grad_norm)
                first = (~finite) & (window["first_bad"] >= _NO_BAD_STEP)
                window["first_bad"] = torch.where(first, torch.full_like(window["first_bad"], self.step),
                                                  window["first_bad"])
                record = torch.cat([losses.double(), grad_norm.double().reshape(1),
                                    torch.full((1,), float(self.step), dtype=torch.float64, device=self.device)])
                window["bad_values"] = torch.where(first, record[[6, 0, 1, 2, 3, 4, 5]], window["bad_values"])
                window["steps"] += 1
                window["loss"] += losses
                window["grad"] += grad_norm
                window["data_s"] += data_s
                bar.update(1)
                out_of_time = seg.max_minutes > 0 and (time.monotonic() - t_start) / 60 >= seg.max_minutes
                preempt, out_of_time = self._agree([signals.received is not None, out_of_time])
                last = (self.step >= seg.target_step or preempt or out_of_time
                        or (seg.max_steps and self.step - start_step >= seg.max_steps))
                checkpoint = self.step % t.ckpt_every == 0
                if self.step % t.log_every == 0 or last or checkpoint:
                    # the only device reads of the loop; every checkpoint (the final one too) follows one
                    self._check_finite(window)
                    if window["steps"]:
                        self._log_window(window, peak, bar, mfu)
                if checkpoint:
                    self._save_checkpoint("periodic")
                if preempt:
                    return "preempted"
                if out_of_time:
                    return "segment_minutes"
        finally:
            bar.close()

    def _log_window(self, window, peak, bar, mfu_fn) -> None:
        from srdit import distributed as dist_utils

        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        n = window["steps"]
        loss = dist_utils.all_reduce_mean(window["loss"] / n).tolist()
        img_s = n * self.cfg.train.global_batch / elapsed
        values = {"loss": loss[0], "loss_v": loss[1], "loss_cls": loss[2], "loss_proj": loss[3],
                  "loss_cfm": loss[4], "grad_norm": window["grad"].item() / n, "lr": self.cfg.train.lr,
                  "steps_per_s": n / elapsed, "img_per_s": img_s,
                  "img_per_s_per_device": img_s / self.world,
                  "mfu": mfu_fn(img_s, self.flops_per_image, self.world, peak),
                  "data_wait_frac": window["data_s"] / elapsed,
                  "peak_mem_mb": _peak_memory_mb(self.device)}
        self.logger.log(self.step, values)
        bar.set_postfix(loss=f"{loss[0]:.4f}", img_s=f"{img_s:.0f}", refresh=False)
        window.update({k: v for k, v in self._new_window().items() if k not in ("first_bad", "bad_values")})

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, reason: str) -> None:
        """Collective: every rank writes its RNG + data position, rank 0 the model, EMA,
        optimizer and snapshot; then the directory is renamed into place and `latest` updated."""
        from srdit import distributed as dist_utils

        tag = step_tag(self.step)
        final, tmp = self.ckpt_root / tag, self.ckpt_root / f".tmp-{tag}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        optimizer_state = gather_optimizer_state(self.engine, self.named_params)   # collective
        atomic_torch_save({"rng": capture_rng_state(self.device), "loader": self.loader.state_dict(),
                           "rank": self.rank, "world_size": self.world}, tmp / f"rank{self.rank:05d}.pt")
        if self.is_main:
            model_state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
            ema_state = {k: v.cpu() for k, v in self.ema.state_dict().items()}
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": self.step, "model": model_state,
                               "ema": ema_state, "optimizer": optimizer_state, "world_size": self.world,
                               "zero_stage": self.zero_stage, "micro_batch": self.micro,
                               "accumulation": self.accum, "config": self.cfg.to_json(), "reason": reason},
                              tmp / STATE_FILE)
            save_snapshot(self.snap_root / f"{tag}.safetensors", model_state, ema_state,
                          self.cfg.to_json(), self.step)
        dist_utils.barrier()
        if self.is_main:
            if final.exists():           # a rerun reached the same step again: replace the old one
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.ckpt_root / LATEST, tag + "\n")
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_ckpts)
            self.logger.event(self.step, "checkpoint", tag=tag, reason=reason)
        dist_utils.barrier()
        self.last_saved = self.step

    def _finish(self, state: str, code: int, detail: str) -> None:
        if not self.is_main:
            return
        status = {"state": state, "exit_code": code, "detail": detail, "step": self.step,
                  "max_steps": self.cfg.train.max_steps, "world_size": self.world,
                  "start_step": self.start_step,
                  "job_id": os.environ.get("SLURM_JOB_ID"),
                  "launch_id": os.environ.get("SRDIT_LAUNCH_ID"),     # srdit/distributed.py's launcher
                  "latest": (self.ckpt_root / LATEST).read_text().strip() if (self.ckpt_root / LATEST).exists() else None,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(self.run_dir / "status.json", status)
        with open(self.run_dir / "segments.jsonl", "a") as f:
            f.write(json.dumps(status) + "\n")
        if state == "diverged":          # no automatic retry trains this run again (srdit/runlock.py)
            mark_diverged(self.run_dir, self.step, detail)
