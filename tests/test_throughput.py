"""GPU throughput work, checked on the CPU: no device synchronisation outside logging steps, a
compiled step that equals the eager one without graph breaks, the residual dtype under
autocast, the batch prefetcher, the sampler's batched guidance and bulk noise, and the quick
mode of benchmarks/gpu_check.sh.

No GPU here: a "device synchronisation" is counted by replacing every call that would wait
for a GPU (Tensor.item/.tolist/.cpu/.numpy/__bool__/__float__/__int__, torch.cuda.synchronize)
with a counting stub, on a CPU run of the real trainer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srdit.config import get_config
from srdit.models import build_model
from srdit.train import StepLoss, deepspeed_config, resolve_zero_stage
from srdit.transport import draw_noise

REPO = Path(__file__).resolve().parents[1]
ENTRY = "demo_srdit"


# --------------------------------------------------------------------------------------------
# Device synchronisations per optimizer step
# --------------------------------------------------------------------------------------------

HOST_ONLY = "srdit/data/"          # the data pipeline works on host tensors only
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class SyncCounter:
    """Counts calls that would block on a GPU, grouped by the optimizer step they follow."""

    def __init__(self):
        self.phase = 0             # the last finished step (0: set-up and the first step)
        self.counts: dict[int, int] = {}
        self.where: dict[int, list[str]] = {}
        self._saved = {}

    def _count(self, name):
        import traceback
        frame = traceback.extract_stack(limit=4)[0]
        if HOST_ONLY in Path(frame.filename).as_posix():
            return              # the loader reads the cache into host tensors: never a device read
        self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        self.where.setdefault(self.phase, []).append(f"{name} at {Path(frame.filename).name}:{frame.lineno}")

    def __enter__(self):
        for name in SYNC_METHODS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def stub(tensor, *args, _real=real, _name=name, **kwargs):
                self._count(_name)
                return _real(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, stub)
        self._saved["synchronize"] = torch.cuda.synchronize

        def sync(*args, **kwargs):
            self._count("cuda.synchronize")
        torch.cuda.synchronize = sync
        return self

    def __exit__(self, *exc):
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, self._saved[name])
        torch.cuda.synchronize = self._saved["synchronize"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from test_train import write_caches
    return write_caches(tmp_path_factory.mktemp("cache"))


def _train_counting(run_dir, cache, steps, train_overrides):
    from test_train import LAUNCH_ENV
    from srdit import train as T

    saved_env = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    os.environ["SRDIT_DEVICE"] = "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    overrides = {"train": {"global_batch": 8, "micro_batch": 4, "max_steps": 200, "num_workers": 0,
                           "keep_ckpts": 2, **train_overrides}}
    counter = SyncCounter()

    def on_step(step):
        counter.phase = step
    try:
        with counter:
            code = T.train(get_config(ENTRY, overrides=overrides), run_dir, cache, until_step=steps,
                           on_step=on_step)
    finally:
        torch.set_num_threads(threads)
        for k in LAUNCH_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved_env)
    assert code == 0
    return counter


def test_no_device_sync_outside_logging_and_checkpoint_steps(cache, tmp_path):
    """Between the end of step k and the end of step k + 1 the trainer may read the device only
    when k is a logging or checkpoint step (the divergence check and the log line happen there).
    Runs the default engine for one process (ZeRO 'auto' = stage 0) with 2 micro-batches."""
    log_every, ckpt_every, steps = 4, 6, 9
    counter = _train_counting(tmp_path / "run", cache, steps, {"log_every": log_every, "ckpt_every": ckpt_every})
    special = {k for k in range(1, steps + 1) if k % log_every == 0 or k % ckpt_every == 0 or k == steps}
    quiet = [k for k in range(1, steps) if k not in special]
    assert quiet, "the run must have plain steps to check"
    offending = {k: counter.where[k] for k in quiet if counter.counts.get(k, 0)}
    assert not offending, f"device reads outside logging/checkpoint steps: {offending}"
    # the stub sees the reads that are allowed: the counter works
    assert all(counter.counts.get(k, 0) > 0 for k in special if k < steps), counter.counts


def test_a_zero_1_run_resumes_under_zero_stage_auto(cache, tmp_path):
    """Runs started with the old default (train.zero_stage 1) resume under "auto" (stage 0 on one
    process): the checkpoint's AdamW state is whole, so any stage restores it."""
    run = tmp_path / "run"
    _train_counting(run, cache, 2, {"zero_stage": 1})
    _train_counting(run, cache, 3, {"zero_stage": "auto"})
    from srdit import checkpoint as ckpt
    state = torch.load(run / ckpt.CHECKPOINT_DIR / ckpt.step_tag(3) / ckpt.STATE_FILE, weights_only=True)
    assert (state["zero_stage"], state["optimizer"]["step"]) == (0, 3)
    assert torch.load(run / ckpt.CHECKPOINT_DIR / ckpt.step_tag(2) / ckpt.STATE_FILE,
                      weights_only=True)["zero_stage"] == 1


def test_deepspeed_config_has_no_synchronising_timers_and_overlaps_reduction():
    ds = deepspeed_config(256, 32, 2, 1, 1.0, cuda=True)
    assert ds["timers"]["throughput"]["enabled"] is False
    assert ds["wall_clock_breakdown"] is False
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is True and z["reduce_bucket_size"] == 25_000_000 == z["allgather_bucket_size"]
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 2
    # the engine accepts it (the throughput timer is really off)
    from deepspeed.runtime.config import DeepSpeedConfig
    parsed = DeepSpeedConfig(dict(deepspeed_config(8, 4, 2, 0, 1.0, cuda=False), train_batch_size=8))
    assert parsed.timers_config.enabled is False


def test_zero_stage_auto():
    assert resolve_zero_stage("auto", 140_000_000, 8) == 0          # B/1: plain data parallel
    assert resolve_zero_stage("auto", 675_000_000, 8) == 1          # XL/1: partition AdamW state
    assert resolve_zero_stage("auto", 675_000_000, 1) == 0          # one process: nothing to partition
    assert resolve_zero_stage(2, 140_000_000, 8) == 2               # an explicit stage is kept


# --------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------

def _step_inputs(cfg, model, batch=4, seed=0):
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (batch,), generator=g)
    t_cls = torch.randn(batch, m.cls_token_dim, generator=g)
    t_tokens = torch.randn(batch, m.grid_size ** 2, m.cls_token_dim, generator=g)
    t, eps, eps_c = draw_noise(batch, cfg.objective, latent.shape[1:], m.cls_token_dim, g)
    torch.manual_seed(seed)
    drop_labels, ids_keep = model.draw_training_randomness(batch, "cpu")
    return latent, y, t_cls, t_tokens, t, eps, eps_c, drop_labels, ids_keep


def _tiny():
    cfg = get_config(ENTRY)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    # the zero-initialised output layers would make most gradients exactly zero: perturb them
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return cfg, model


@pytest.mark.parametrize("path_drop", [False, True])
def test_step_is_one_graph_without_breaks(one_thread, path_drop):
    cfg, model = _tiny()
    step = StepLoss(model, cfg.objective, 0.5, 0.0, torch.bfloat16, "cpu")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*_step_inputs(cfg, model), path_drop)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_matches_eager(backend, autocast, rtol, atol):
    cfg, model = _tiny()
    args = _step_inputs(cfg, model)
    eager = StepLoss(model, cfg.objective, 0.5, 0.0, autocast, "cpu")
    total_e, values_e = eager(*args, False)
    total_e.backward()
    grads_e = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(StepLoss(model, cfg.objective, 0.5, 0.0, autocast, "cpu"), backend=backend)
    total_c, values_c = compiled(*args, False)
    total_c.backward()
    grads_c = _grads(model)
    torch.testing.assert_close(values_c, values_e, rtol=rtol, atol=atol)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 20
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=rtol, atol=atol, msg=name)


def test_compiled_step_equals_eager_aot(one_thread):
    """AOTAutograd traces forward + loss + backward into graphs (what inductor then compiles):
    fp32, loss terms and every gradient within 1e-5 relative / 1e-6 absolute of eager."""
    _compiled_matches_eager("aot_eager", None, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_equals_eager_inductor(one_thread):
    """Inductor (C++ codegen on the CPU, minutes on 2 cores): fused kernels reorder float sums,
    so fp32 within 1e-4 relative / 1e-5 absolute."""
    _compiled_matches_eager("inductor", None, rtol=1e-4, atol=1e-5)


def test_random_streams_do_not_depend_on_compile(one_thread):
    """The trainer draws every random number outside StepLoss: the same global RNG state after
    an eager and a compiled micro-step (a compiled forward that drew its own numbers would
    consume nothing from it or other numbers)."""
    cfg, model = _tiny()
    torch.manual_seed(123)
    args = _step_inputs(cfg, model, seed=1)
    states = []
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        step = StepLoss(model, cfg.objective, 0.5, 0.0, None, "cpu")
        step = step if backend is None else torch.compile(step, backend=backend)
        torch.manual_seed(7)
        step(*args, False)[0].backward()
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


# --------------------------------------------------------------------------------------------
# Residual dtype under autocast
# --------------------------------------------------------------------------------------------

def test_residual_stream_dtype_under_bf16_autocast(one_thread):
    """The residual stream's dtype under bf16 autocast follows the original model's: float32 in
    the dense encoder and the sparse middle blocks (the patch and class-token embeddings come out
    in bf16, and adding the float32 position table promotes the sum, as the original's
    `x + self.pos_embed` does; bf16 branch outputs are then added to a float32 residual), bf16
    in the decoder blocks (the SPRINT fusion Linear returns bf16, as the original's
    `fusion_proj`). Matmuls run in bf16 throughout."""
    cfg, model = _tiny()
    sp = cfg.model.sprint
    assert sp.enabled and cfg.model.class_token
    args = _step_inputs(cfg, model)
    latent, y, t_cls, _, t, eps, eps_c, drop_labels, ids_keep = args
    capture = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(latent, t, y, t_cls, ids_keep=ids_keep, drop_labels=drop_labels, capture=capture)
        qkv = model.blocks[0].attn.qkv(torch.randn(2, 3, cfg.model.hidden_size))
    assert capture["patch_tokens"].dtype == torch.bfloat16     # (cls_in: bf16 on the CPU, fp32 on CUDA)
    assert qkv.dtype == torch.bfloat16
    depth, first_decoder = cfg.model.depth, cfg.model.depth - sp.decoder_depth
    dtypes = [capture[f"block{i}"].dtype for i in range(depth)]
    assert dtypes == [torch.float32] * first_decoder + [torch.bfloat16] * sp.decoder_depth, dtypes
    assert capture["h_in"].dtype == torch.bfloat16
    assert out.velocity.dtype == torch.bfloat16            # the final Linear; the loss casts to fp32


# --------------------------------------------------------------------------------------------
# The batch prefetcher
# --------------------------------------------------------------------------------------------

class _Loader:
    """A stand-in with the training loader's interface: numbered batches and a position."""

    def __init__(self):
        self.position = 0

    def __iter__(self):
        while True:
            k = self.position
            self.position += 1
            yield {"latent": torch.full((2, 3), float(k)), "label": torch.tensor([k, k])}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_prefetcher_is_a_pass_through_on_the_cpu():
    from srdit.data.prefetch import DevicePrefetcher
    loader = _Loader()
    pre = DevicePrefetcher(loader, "cpu")
    it = iter(pre)
    first = [next(it)["label"][0].item() for _ in range(3)]
    assert first == [0, 1, 2] and pre.state_dict() == {"position": 3} == loader.state_dict()


def test_prefetcher_queue_keeps_order_placement_and_resume_position():
    """The read-ahead queue (what runs on CUDA, here with plain copies): batches in the loader's
    order, on the target device, and a state that counts only what was handed out, although the
    loader has been read one batch further."""
    from srdit.data.prefetch import DevicePrefetcher
    loader = _Loader()
    pre = DevicePrefetcher(loader, "cpu", depth=1, force=True)
    it = iter(pre)
    got = [next(it) for _ in range(4)]
    assert [int(b["label"][0]) for b in got] == [0, 1, 2, 3]
    assert all(b["latent"].device.type == "cpu" for b in got)
    assert loader.state_dict() == {"position": 5}           # one batch read ahead
    assert pre.state_dict() == {"position": 4}               # but 4 were used
    # resume from the saved state: the next batch is the 5th, not the 6th
    saved = pre.state_dict()
    again = DevicePrefetcher(_Loader(), "cpu", force=True)
    again.load_state_dict(saved)
    assert int(next(iter(again))["label"][0]) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prefetcher_copies_to_the_gpu_on_a_side_stream():
    from srdit.data.prefetch import DevicePrefetcher
    pre = DevicePrefetcher(_Loader(), "cuda")
    batches = [next(iter(pre)) for _ in range(3)]
    assert [int(b["label"][0]) for b in batches] == [0, 1, 2]
    assert all(b["latent"].is_cuda for b in batches)


# --------------------------------------------------------------------------------------------
# Sampling: one forward for both guidance branches, noise in bulk
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path_drop_guidance", [True, False])
def test_batched_guidance_equals_two_forwards_bitwise(one_thread, path_drop_guidance):
    """The sampler's 2B-row forward (conditional rows, then unconditional rows) gives every row
    exactly what the two separate forwards give it, so guided samples are unchanged bit for bit."""
    import dataclasses
    from srdit.sample import guided_velocity_fn

    cfg, model = _tiny()
    model.eval()
    m = cfg.model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, m.in_channels, m.input_size, m.input_size, generator=g, dtype=torch.float64)
    cls = torch.randn(3, m.cls_token_dim, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    s = dataclasses.replace(cfg.sample, cfg_scale=4.0, cls_cfg_scale=2.0, path_drop_guidance=path_drop_guidance)
    with torch.no_grad():
        v_b, c_b = guided_velocity_fn(model, y, s, null_label=m.num_classes)(x, cls, 0.5)
        model.supports_uncond_rows = False                     # the two-forward path
        try:
            v_s, c_s = guided_velocity_fn(model, y, s, null_label=m.num_classes)(x, cls, 0.5)
        finally:
            del model.supports_uncond_rows
    assert torch.equal(v_b, v_s) and torch.equal(c_b, c_s)


def test_uncond_rows_match_the_uncond_flag(one_thread):
    cfg, model = _tiny()
    model.eval()
    m = cfg.model
    x = torch.randn(4, m.in_channels, m.input_size, m.input_size)
    t, y, cls = torch.full((4,), 0.3), torch.tensor([0, 1, 2, 3]), torch.randn(4, m.cls_token_dim)
    with torch.no_grad():
        both = model.forward_velocity(x, t, y, cls, uncond_rows=2)
        cond = model.forward_velocity(x[:2], t[:2], y[:2], cls[:2])
        unc = model.forward_velocity(x[2:], t[2:], y[2:], cls[2:], uncond=True)
    # the rows of one call never mix; a GEMM over 4 rows may round differently from one over 2
    # (the same holds for any change of batch size), hence a float32-rounding tolerance
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    close(both[0][:2], cond[0]), close(both[0][2:], unc[0])
    close(both[1][:2], cond[1]), close(both[1][2:], unc[1])
    assert not torch.allclose(cond[0], model.forward_velocity(x[:2], t[:2], y[:2], cls[:2], uncond=True)[0])
    model.train()
    with pytest.raises(ValueError, match="uncond_rows"):
        model.forward_velocity(x, t, y, cls, uncond_rows=2)


def test_counter_noise_is_a_function_of_seed_index_and_draw():
    from srdit.sample import CounterNoise

    a = CounterNoise(range(0, 8), seed=5, device="cpu")
    b = CounterNoise([6, 3, 100], seed=5, device="cpu")
    draws_a = [a.normal((4, 3, 3)) for _ in range(3)]
    draws_b = [b.normal((4, 3, 3)) for _ in range(3)]
    for da, db in zip(draws_a, draws_b):
        assert torch.equal(da[6], db[0]) and torch.equal(da[3], db[1])       # any batch, any position
    assert not torch.equal(draws_a[0][3], draws_a[1][3])                       # draws differ
    assert not torch.equal(draws_a[0][3], draws_a[0][4])                       # samples differ
    assert not torch.equal(CounterNoise([3], seed=6, device="cpu").normal((4, 3, 3))[0], draws_a[0][3])
    # standard normal: moments of 2M draws, and no correlation between neighbours
    z = CounterNoise(range(256), seed=0, device="cpu").normal((8192,)).flatten()
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005
    assert abs((z ** 4).mean() - 3) < 0.05
    assert abs((z[1:] * z[:-1]).mean()) < 0.005
    assert 4.5 < z.abs().max() < 7


def test_counter_noise_cost_does_not_grow_with_the_batch():
    """A per-sample generator launches one kernel per sample and draw; the bulk noise a fixed
    handful whatever the batch (counted as profiler ops on the CPU)."""
    from torch.profiler import ProfilerActivity, profile
    from srdit.sample import CounterNoise, PerSampleNoise

    def ops(noise):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            noise.normal((32, 4, 4))
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    bulk = [ops(CounterNoise(range(n), seed=0, device="cpu")) for n in (4, 64)]
    per_sample = [ops(PerSampleNoise(range(n), seed=0, device="cpu")) for n in (4, 64)]
    assert bulk[0] == bulk[1] < 120
    assert per_sample[1] > 10 * per_sample[0] / 2 and per_sample[1] > bulk[1]


# --------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh, quick mode
# --------------------------------------------------------------------------------------------

def test_gpu_check_quick_mode_runs_end_to_end_on_the_cpu(tmp_path):
    """The GPU check's every stage (training eager and compiled, sampling with and without
    guidance, encoding, Inception and DINOv2 features) at tiny sizes on the CPU; one table, one
    JSON file, and nothing else written."""
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    before = set(os.listdir(tmp_path))
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--quick", "--device", "cpu",
                        "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    kinds = [(r["kind"], r["variant"].split(" (")[0].split(",")[0]) for r in result["rows"]]
    assert kinds.count(("train", "ours eager")) == 1 and kinds.count(("train", "ours compiled")) == 1
    assert sum(k == "sample" for k, _ in kinds) == 2 and ("encode", "E2E-INVAE + dinov2_vits14") in kinds
    assert sum(k == "features" for k, _ in kinds) == 2
    assert all(r.get("img_per_s", 0) > 0 for r in result["rows"]), result["rows"]
    assert "| kind" in p.stdout and "img_per_s" in p.stdout
    assert set(os.listdir(tmp_path)) - before == {"check.json"}
