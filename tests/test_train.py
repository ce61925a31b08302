"""`srdit train`: exact resume, preemption, world-size changes, divergence, receipts.

The end-to-end tests run the real trainer (DeepSpeed ZeRO-1 on gloo, the demo_srdit model, the
real transport and data loader) in subprocesses, on a tiny latent cache written here with the
data module's own shard writer. One step = 8 images; on one process that is 2 micro-batches of
4 (gradient accumulation), on two processes 1 micro-batch of 4 each.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from srdit import checkpoint as ckpt
from srdit.config import ConfigError, get_config
from srdit.distributed import detect_launch, slurm_first_host
from srdit.ema import EMA
from srdit.train import (EXIT_DIVERGED, EXIT_REQUEUE, _check_or_write_config, batch_geometry,
                         config_differences, path_drop_coin)

REPO = Path(__file__).resolve().parents[1]
ENTRY = "demo_srdit"
N = 3                     # steps before the preemption; the runs go to 2N
TINY = {"train": {"global_batch": 8, "micro_batch": 4, "max_steps": 200, "ckpt_every": 1000,
                  "log_every": 1, "num_workers": 0, "keep_ckpts": 2, "zero_stage": 1}}
SET_ARGS = [f"train.{k}={v}" for k, v in TINY["train"].items()]

# Runs the trainer like `srdit train`, plus two test hooks: SIGTERM to itself after a given step
# (only on the listed ranks: the others must learn it through the trainer's all-reduce), and a
# NaN injected into the loss from a given step on.
LAUNCHER = r'''
import json, os, signal, sys
from srdit import train as T
from srdit.config import get_config
a = json.loads(sys.argv[1])
cfg = get_config(a["entry"], overrides=a["overrides"])
rank = int(os.environ.get("RANK", "0"))
poison = {"on": False}
if a.get("nan_at_step"):
    real = T._training_losses
    def losses(*args, **kwargs):
        terms = real(*args, **kwargs)
        if poison["on"]:
            terms.total = terms.total * float("nan")
        return terms
    T._training_losses = losses
def on_step(step):
    if step == a.get("signal_at") and rank in a.get("signal_ranks", [0]):
        os.kill(os.getpid(), signal.SIGTERM)
    if a.get("nan_at_step") and step == a["nan_at_step"] - 1:
        poison["on"] = True
sys.exit(T.train(cfg, a["run_dir"], a["cache"], until_step=a.get("until"), on_step=on_step))
'''


# --------------------------------------------------------------------------------------------
# A tiny latent cache in the data module's format
# --------------------------------------------------------------------------------------------

def write_caches(folder: Path, rows: int = 48, teacher_features: bool = True) -> Path:
    """cache.h5 for the demo_srdit model (32 x 4 x 4 latents, DINOv2-S: 384-d, 16 tokens) and,
    without teacher features, the 64 px image cache the trainer's teacher reads instead."""
    from srdit.data import prepare
    from srdit.data.cache import FORMAT_VERSION, IMAGES, LATENTS, STR, ShardWriter, join_shards
    from srdit.data.encode import join_latents

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    classes = ["c0", "c1", "c2", "c3"]
    labels = rng.integers(0, len(classes), rows).astype(np.int64)
    images_file, images_checksum = "none", "none"
    if not teacher_features:
        ident = dict(kind=IMAGES, format=FORMAT_VERSION, crop="adm", resolution=64, source_list_sha256="test",
                     num_files=rows, class_names=classes, num_classes=len(classes), file_start=0, file_stop=rows)
        shard = folder / "images-00000.h5"
        with ShardWriter(shard, {"images": ((64, 64, 3), np.uint8), "labels": ((), np.int64),
                                 "paths": ((), STR)}, ident, capacity=rows) as w:
            w.append(images=rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8), labels=labels,
                     paths=np.array([f"c/{i}.png" for i in range(rows)], dtype=object))
            w.finish()
        joined = join_shards(folder / "images.h5", [shard], IMAGES, prepare.COMMON_KEYS, extra_attrs={"skipped": 0})
        images_file = joined.name
        import h5py
        with h5py.File(joined, "r") as f:
            images_checksum = f.attrs["checksum"]
    ident = dict(kind=LATENTS, format=FORMAT_VERSION, tokenizer="e2e-invae", tokenizer_settings={},
                 tokenizer_random=True, latent_shape=[32, 4, 4], resolution=64,
                 teacher="dinov2_vits14" if teacher_features else "none", teacher_random=True,
                 teacher_dim=384 if teacher_features else 0, teacher_tokens=16 if teacher_features else 0,
                 noise_seed=0, batch_size=rows, precision="fp32", moments=False, images_file=images_file,
                 images_checksum=images_checksum, images_rows=rows, num_classes=len(classes),
                 class_names=classes, row_start=0, row_stop=rows)
    datasets = {"latents": ((32, 4, 4), np.float32), "labels": ((), np.int64)}
    arrays = {"latents": (3 * rng.standard_normal((rows, 32, 4, 4))).astype(np.float32), "labels": labels}
    if teacher_features:
        datasets.update(teacher_cls=((384,), np.float16), teacher_tokens=((16, 384), np.float16))
        arrays.update(teacher_cls=rng.standard_normal((rows, 384)).astype(np.float16),
                      teacher_tokens=rng.standard_normal((rows, 16, 384)).astype(np.float16))
    shard = folder / "latents-00000.h5"
    with ShardWriter(shard, datasets, ident, capacity=rows) as w:
        w.append(**arrays)
        w.finish()
    return join_latents([shard], folder / "cache.h5")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_caches(tmp_path_factory.mktemp("cache"))


# --------------------------------------------------------------------------------------------
# Running the trainer
# --------------------------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SRDIT_DEVICE="cpu")
    env.pop("WANDB_PROJECT", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    return env


# Set by the trainer for DeepSpeed's rendezvous (cleared around in-process runs), and
# SRDIT_DEVICE: the tests train on the CPU with gloo even where a GPU is visible.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "SRDIT_DEVICE")


def train_here(run_dir: Path, cache: Path, until: int, overrides=None, signal_at=None, nan_at_step=None,
               **bounds) -> int:
    """One single-process segment in this process (no interpreter start-up, the slow part on a
    busy machine), with the same hooks as LAUNCHER."""
    from srdit import train as T
    saved_env = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    os.environ["SRDIT_DEVICE"] = "cpu"
    real_losses = T._training_losses
    poison = {"on": False}

    def losses(*args, **kwargs):
        terms = real_losses(*args, **kwargs)
        if poison["on"]:
            terms.total = terms.total * float("nan")
        return terms

    def on_step(step):
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)      # a real signal, through the trainer's handler
        if nan_at_step and step == nan_at_step - 1:
            poison["on"] = True

    T._training_losses = losses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as OMP_NUM_THREADS=1 under torchrun; 2 threads on a busy
    try:                              # 2-core machine are ~15x slower for this tiny model
        cfg = get_config(ENTRY, overrides=overrides or TINY)
        return T.train(cfg, run_dir, cache, until_step=until, on_step=on_step, **bounds)
    finally:
        torch.set_num_threads(threads)
        T._training_losses = real_losses
        for k in LAUNCH_ENV:                 # the trainer exports them for DeepSpeed's rendezvous
            os.environ.pop(k, None)
        os.environ.update(saved_env)


def launch(tmp: Path, run_dir: Path, cache: Path, until: int, procs: int = 2, overrides=None, **hooks):
    """A segment on `procs` processes under torchrun."""
    script = tmp / "launcher.py"
    if not script.exists():
        script.write_text(LAUNCHER)
    spec = dict(entry=ENTRY, overrides=overrides or TINY, run_dir=str(run_dir), cache=str(cache), until=until, **hooks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(script), json.dumps(spec)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def state_at(run_dir: Path, step: int, name: str = ckpt.STATE_FILE) -> dict:
    return torch.load(run_dir / ckpt.CHECKPOINT_DIR / ckpt.step_tag(step) / name, weights_only=True)


def assert_same(a, b, where=""):
    """Recursive bitwise equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_resumed_run_is_identical(reference: Path, resumed: Path, step: int, ranks: int) -> None:
    a, b = state_at(reference, step), state_at(resumed, step)
    for key in ("model", "ema", "optimizer", "step", "world_size"):
        assert_same(a[key], b[key], key)
    for r in range(ranks):      # RNG states and data positions, per rank
        assert_same(state_at(reference, step, f"rank{r:05d}.pt"), state_at(resumed, step, f"rank{r:05d}.pt"))
    snap = lambda d: ckpt.read_snapshot(d / ckpt.SNAPSHOT_DIR / f"{ckpt.step_tag(step)}.safetensors")  # noqa: E731
    (_, ma, ea), (_, mb, eb) = snap(reference), snap(resumed)
    assert_same(ma, mb, "snapshot.model")
    assert_same(ea, eb, "snapshot.ema")
    # the run really moved: the weights left the EMA behind, and AdamW counted every step
    assert a["optimizer"]["step"] == step
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"] if a["model"][k].is_floating_point())


@pytest.fixture(scope="module")
def single_runs(cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    assert train_here(tmp / "A", cache, until=2 * N) == 0
    assert train_here(tmp / "B", cache, until=2 * N, signal_at=N) == EXIT_REQUEUE
    assert status(tmp / "B")["state"] == "preempted" and status(tmp / "B")["step"] == N
    assert train_here(tmp / "B", cache, until=2 * N) == 0
    return tmp


@pytest.fixture(scope="module")
def two_process_runs(cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    ref = launch(tmp, tmp / "A", cache, until=2 * N)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # only rank 1 gets the signal: rank 0 must stop at the same step through the all-reduce
    first = launch(tmp, tmp / "B", cache, until=2 * N, signal_at=N, signal_ranks=[1])
    assert first.returncode != 0          # torchrun reports a failure when a worker exits 75 ...
    st = status(tmp / "B")                # ... which is why status.json records the outcome
    assert (st["state"], st["exit_code"], st["step"], st["world_size"]) == ("preempted", EXIT_REQUEUE, N, 2)
    shutil.copytree(tmp / "B", tmp / "B_at_N")
    second = launch(tmp, tmp / "B", cache, until=2 * N)
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------

def test_resume_after_sigterm_is_bitwise_exact_single_process(single_runs):
    tmp = single_runs
    assert_resumed_run_is_identical(tmp / "A", tmp / "B", 2 * N, ranks=1)
    segments = [json.loads(line) for line in (tmp / "B" / "segments.jsonl").read_text().splitlines()]
    assert [(s["state"], s["step"]) for s in segments] == [("preempted", N), ("segment_done", 2 * N)]
    # the pointer names the newest checkpoint; both segments' checkpoints are kept (keep_ckpts 2)
    assert (tmp / "B" / "checkpoints" / "latest").read_text().strip() == ckpt.step_tag(2 * N)
    assert [s for s, _ in ckpt.list_checkpoints(tmp / "B" / "checkpoints")] == [N, 2 * N]


def test_resume_after_sigterm_is_bitwise_exact_two_processes(two_process_runs):
    tmp = two_process_runs
    assert_resumed_run_is_identical(tmp / "A", tmp / "B", 2 * N, ranks=2)
    a = state_at(tmp / "A", 2 * N)
    assert (a["world_size"], a["micro_batch"], a["accumulation"], a["zero_stage"]) == (2, 4, 1, 1)


@pytest.mark.parametrize("stage", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_is_bitwise_exact_with_other_zero_stages(stage, cache, tmp_path):
    """Stage 0 keeps a plain torch optimizer (its own save/restore path and the trainer's own
    clipping); stage 2 also partitions the gradients (two processes)."""
    overrides = {"train": dict(TINY["train"], zero_stage=stage)}
    if stage == 0:
        assert train_here(tmp_path / "A", cache, until=2 * N, overrides=overrides) == 0
        assert train_here(tmp_path / "B", cache, until=2 * N, overrides=overrides, signal_at=N) == EXIT_REQUEUE
        assert train_here(tmp_path / "B", cache, until=2 * N, overrides=overrides) == 0
    else:
        assert launch(tmp_path, tmp_path / "A", cache, until=2 * N, overrides=overrides).returncode == 0
        launch(tmp_path, tmp_path / "B", cache, until=2 * N, overrides=overrides, signal_at=N)
        assert status(tmp_path / "B")["state"] == "preempted"
        assert launch(tmp_path, tmp_path / "B", cache, until=2 * N, overrides=overrides).returncode == 0
    assert_resumed_run_is_identical(tmp_path / "A", tmp_path / "B", 2 * N, ranks=1 if stage == 0 else 2)
    assert state_at(tmp_path / "A", 2 * N)["zero_stage"] == stage


def test_two_process_checkpoint_resumes_on_one_process(two_process_runs, cache, tmp_path, capfd):
    """Weights, EMA and AdamW state (moments and step count) carry over exactly: one more step on
    one process is exactly the AdamW + EMA update of the two-process state."""
    run = tmp_path / "run"
    shutil.copytree(two_process_runs / "B_at_N", run)
    overrides = {"train": dict(TINY["train"], ckpt_every=1)}
    assert train_here(run, cache, until=N + 1, overrides=overrides) == 0
    assert "resuming a 2-process checkpoint on 1 processes" in capfd.readouterr().err
    before, after = state_at(run, N), state_at(run, N + 1)
    assert (before["world_size"], after["world_size"], after["accumulation"]) == (2, 1, 2)
    assert after["optimizer"]["step"] == N + 1
    loader = state_at(run, N + 1, "rank00000.pt")["loader"]
    assert loader["position"] == (N + 1) * 2          # (N + 1) steps x 2 micro-batch rounds, 8 samples each
    cfg = get_config(ENTRY)
    b1, b2 = cfg.train.betas
    lr, eps, decay, k = cfg.train.lr, cfg.train.eps, cfg.train.ema_decay, N + 1
    for name, m1 in after["optimizer"]["exp_avg"].items():
        m0, v0 = before["optimizer"]["exp_avg"][name], before["optimizer"]["exp_avg_sq"][name]
        v1 = after["optimizer"]["exp_avg_sq"][name]
        grad = (m1 - b1 * m0) / (1 - b1)             # the clipped gradient of step N + 1
        # the second moment continued from the saved one (zeros would miss by ~v0)
        torch.testing.assert_close(v1, b2 * v0 + (1 - b2) * grad * grad, rtol=1e-4, atol=1e-12)
        # the parameter update used the bias correction of step N + 1 (the step count was restored)
        update = lr * (m1 / (1 - b1 ** k)) / ((v1 / (1 - b2 ** k)).sqrt() + eps)
        torch.testing.assert_close(after["model"][name], before["model"][name] - update, rtol=0, atol=1e-7)
    for name, e1 in after["ema"].items():
        if e1.is_floating_point():
            torch.testing.assert_close(e1, torch.lerp(before["ema"][name], after["model"][name], 1 - decay),
                                       rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Preemption through the CLI, teacher run online, snapshots
# --------------------------------------------------------------------------------------------

def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_cli_sigterm_mid_run_checkpoints_and_rerun_continues(tmp_path):
    """A real `srdit train` process gets SIGTERM from outside while training; the cache has no
    teacher features, so a (random) DINOv2-S teacher runs on the cached images."""
    cache = write_caches(tmp_path / "cache", teacher_features=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "srdit", "train", ENTRY, "--run-dir", str(run), "--cache", str(cache),
           "--random-teacher", "--until-step", "200", *[a for s in SET_ARGS for a in ("--set", s)]]
    log = tmp_path / "train.log"
    with open(log, "w") as out:         # a file, not a pipe: nobody reads a pipe while we poll
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while len(_metric_steps(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, log.read_text()[-3000:]
    assert "got SIGTERM; finishing this step" in log.read_text()
    st = status(run)
    k = st["step"]
    assert st["state"] == "preempted" and 2 <= k < 200
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.step_tag(k)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # the snapshot of the preemption step loads for sampling, EMA or raw weights
    snap = run / "snapshots" / f"{ckpt.step_tag(k)}.safetensors"
    meta, model_state, ema_state = ckpt.read_snapshot(snap)
    assert meta["step"] == str(k) and json.loads(meta["config"])["name"] == ENTRY
    cfg, model = ckpt.load_snapshot(snap, use_ema=True)
    assert cfg.model.depth == 6 and not model.training
    assert all(torch.equal(v, ema_state[n]) for n, v in model.state_dict().items())
    _, raw = ckpt.load_snapshot(snap, use_ema=False)
    assert all(torch.equal(v, model_state[n]) for n, v in raw.state_dict().items())
    # rerunning the same command continues from step k
    from srdit.cli import main as cli_main
    argv = [a if a != "200" else str(k + 2) for a in cmd[3:]]          # same command, --until-step k+2
    saved_env = {key: os.environ.pop(key) for key in LAUNCH_ENV if key in os.environ}
    os.environ["SRDIT_DEVICE"] = "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
        for key in LAUNCH_ENV:
            os.environ.pop(key, None)
        os.environ.update(saved_env)
    assert status(run)["step"] == k + 2
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resume = [e for e in events if e.get("event") == "resume"]
    assert resume and resume[-1]["step"] == k and resume[-1]["checkpoint"] == ckpt.step_tag(k)
    last = [e for e in events if "loss" in e][-1]
    assert last["step"] == k + 2 and np.isfinite(last["loss_proj"]) and last["loss_proj"] != 0.0
    for key in ("loss", "loss_v", "loss_cls", "loss_proj", "loss_cfm", "grad_norm", "lr", "steps_per_s",
                "img_per_s", "mfu", "peak_mem_mb"):
        assert key in last
    # receipts
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__
    assert "commit" in env["git"] and env["hardware"]["cpu_count"] >= 1 and env["start_step"] == k
    assert json.loads((run / "config.json").read_text())["name"] == ENTRY
    assert list((run / "tb").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(single_runs, cache, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(single_runs / "A", run)
    overrides = {"train": dict(TINY["train"], ckpt_every=1)}
    assert train_here(run, cache, until=2 * N + 5, overrides=overrides, nan_at_step=2 * N + 2) == EXIT_DIVERGED
    assert f"non-finite loss or gradient at step {2 * N + 2}" in capfd.readouterr().err
    assert status(run)["state"] == "diverged"
    good = 2 * N + 1                                  # saved (ckpt_every 1) before the NaN step
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.step_tag(good)
    assert not (run / "checkpoints" / ckpt.step_tag(good + 1)).exists()
    assert not (run / "snapshots" / f"{ckpt.step_tag(good + 1)}.safetensors").exists()
    state = state_at(run, good)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_segment_bounds_in_steps_and_minutes(single_runs, cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single_runs / "A", run)
    assert train_here(run, cache, until=2 * N + 10, segment_steps=2) == 0
    assert (status(run)["state"], status(run)["step"], status(run)["detail"]) == ("segment_done", 2 * N + 2,
                                                                                  "segment_steps")
    assert train_here(run, cache, until=2 * N + 10, segment_minutes=1e-6) == 0     # one step, then out of time
    assert (status(run)["step"], status(run)["detail"]) == (2 * N + 3, "segment_minutes")
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.step_tag(2 * N + 3)


def test_rerun_at_the_target_step_rewrites_a_missing_snapshot(single_runs, cache, tmp_path):
    # Snakemake deletes the outputs of a job that failed after writing them; the rerun resumes at
    # the target step and must put the snapshot back, identical.
    run = tmp_path / "run"
    shutil.copytree(single_runs / "A", run)
    snapshot = run / "snapshots" / f"{ckpt.step_tag(2 * N)}.safetensors"
    meta, model, ema = ckpt.read_snapshot(snapshot)
    snapshot.unlink()
    assert train_here(run, cache, until=2 * N) == 0
    meta2, model2, ema2 = ckpt.read_snapshot(snapshot)
    assert meta2 == meta, {k: (meta[k], meta2.get(k)) for k in meta if meta[k] != meta2.get(k)}
    assert_same(model2, model, "model")
    assert_same(ema2, ema, "ema")


def test_resume_with_another_config_is_refused(single_runs, cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single_runs / "A", run)
    overrides = {"train": dict(TINY["train"], lr=3e-4)}
    with pytest.raises(ConfigError, match="another config.*train.lr"):
        train_here(run, cache, until=2 * N + 1, overrides=overrides)
    assert status(run)["step"] == 2 * N           # nothing ran


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------

def test_batch_geometry_keeps_the_global_batch():
    assert batch_geometry(256, 32, 8) == (32, 1)
    assert batch_geometry(256, 32, 1) == (32, 8)
    assert batch_geometry(256, 32, 16) == (16, 1)        # micro-batch shrinks, global batch stays
    assert batch_geometry(24, 16, 2) == (12, 1)
    assert batch_geometry(24, 5, 2) == (4, 3)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        batch_geometry(256, 32, 3)


def test_path_drop_coin_is_shared_and_has_the_right_rate():
    assert path_drop_coin(0, 17, 0, 0.5) == path_drop_coin(0, 17, 0, 0.5)
    coins = [path_drop_coin(0, s, 0, 0.05) for s in range(4000)]
    assert 0.035 < np.mean(coins) < 0.065
    assert coins != [path_drop_coin(1, s, 0, 0.05) for s in range(4000)]
    assert not any(path_drop_coin(0, s, 0, 0.0) for s in range(100))


def test_config_differences_ignore_segment_keys(tmp_path):
    a = get_config(ENTRY).to_dict()
    b = get_config(ENTRY, overrides={"train": {"max_steps": 5, "segment_minutes": 3.0, "log_every": 1},
                                     "sample": {"num_steps": 7}}).to_dict()
    assert config_differences(a, b) == []
    c = get_config(ENTRY, overrides={"train": {"lr": 2e-4}, "model": {"qk_norm": False}}).to_dict()
    assert config_differences(a, c) == ["model.qk_norm", "train.lr"]
    _check_or_write_config(tmp_path, get_config(ENTRY))
    _check_or_write_config(tmp_path, get_config(ENTRY, overrides={"train": {"max_steps": 7}}))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 7
    with pytest.raises(ConfigError, match="train.lr"):
        _check_or_write_config(tmp_path, get_config(ENTRY, overrides={"train": {"lr": 2e-4}}))


def test_launch_environment_from_torchrun_slurm_or_nothing():
    assert slurm_first_host("gpu[003-005,010],cpu1") == "gpu003"
    assert slurm_first_host("node7,node8") == "node7"
    assert slurm_first_host("a-[1-2]x") == "a-1x"
    t = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.launcher) == (3, 8, 1, "h", 1234, "torchrun")
    s = detect_launch({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
                       "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"})
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.master_addr, s.master_port, s.launcher) == \
        (5, 16, 1, 8, "gpu12", 24242, "slurm")
    # a batch script (one task) in a multi-task allocation is a single process
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}).launcher == "single"
    assert detect_launch({}).world_size == 1


def test_ema_update_and_state():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(0))
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
        model.count += 1
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start["weight"] + 0.1 * model.weight, rtol=0, atol=1e-6)
    assert ema.shadow["count"].item() == 1 and torch.equal(ema.shadow["bias"], start["bias"])
    other = EMA(torch.nn.Linear(3, 2), decay=0.9)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"weight": torch.zeros(2, 3)})


def test_checkpoint_pointer_and_pruning(tmp_path):
    for step in (10, 20, 30):
        d = tmp_path / ckpt.step_tag(step)
        d.mkdir()
        ckpt.atomic_torch_save({"step": step}, d / ckpt.STATE_FILE)
    (tmp_path / ".tmp-step0000040").mkdir()          # a killed save: never picked
    assert ckpt.latest_checkpoint(tmp_path).name == "step0000030"   # no pointer: newest complete
    ckpt.atomic_write_text(tmp_path / ckpt.LATEST, "step0000020\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step0000020"
    removed = ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in removed] == ["step0000010"]              # latest (20) is protected
    assert not list(tmp_path.glob(".*.tmp-*"))
    ckpt.atomic_write_text(tmp_path / ckpt.LATEST, "step0000099\n")
    with pytest.raises(FileNotFoundError, match="step0000099"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_state_round_trip(tmp_path):
    import random
    ckpt.seed_everything(5)
    state = ckpt.capture_rng_state(torch.device("cpu"))
    ckpt.atomic_torch_save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.seed_everything(99)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_flops_estimate():
    from srdit.flops import forward_flops_per_image, mfu, peak_flops_per_device, train_flops_per_image
    b1 = get_config("b1_srdit").model
    fwd = forward_flops_per_image(b1)
    # by hand: 4 dense blocks on 257 tokens + 8 sparse blocks on 64, 14.16 MFLOP per token and block
    per_token_block = 2 * (4 * 768 ** 2 + 2 * 768 * 3072)
    assert fwd["blocks"] > per_token_block * (4 * 257 + 8 * 64)
    assert 20e9 < fwd["total"] < 35e9
    assert train_flops_per_image(b1) == 3 * fwd["total"]
    dense = get_config("b1_reg_invae").model
    assert forward_flops_per_image(dense)["blocks"] > 2 * fwd["blocks"]       # SPRINT saves compute
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device(None) is None and mfu(100.0, 1e9, 1, None) is None
    assert mfu(100.0, 1e12, 2, 1e15) == pytest.approx(0.05)
