"""Samplers: the paper's Euler-Maruyama SDE, a Heun ODE, classifier-free guidance, labels, tags.

Time runs from t = 1 (noise) to t = 0 (data) on the grid of `time_grid` (docs/recipe.md 3.1):
linspace(1, 0.04, N) in float64 with a final 0 appended, optionally time-shifted.

SDE (the paper's sampler). With the linear path the score is s = -((1 - t) v + x) / t, the
diffusion is w(t) = 2t and the drift d = v - w/2 s = v - t s. Steps k = 0..N-2:
    x_{k+1} = x_k + d dt + sqrt(2 t_k) sqrt(|dt|) xi,     dt = t_{k+1} - t_k < 0,
then one deterministic Euler step x + d dt from t_{N-1} to 0. N model evaluations.
ODE (an extra; the paper has none): Heun on the same grid, the second-order correction on every
step except the last one (to t = 0), 2N - 1 evaluations.

The REG class token is co-evolved with the image (same update, its own noise, the model's class
velocity) and dropped at the end. State is float64; the model runs in float32.

Guidance (recipe 3.2): only when cfg_scale > 1 and guidance_low <= t_cur <= guidance_high. The
unconditional branch uses the null label (`null_label_guidance`) and/or SPRINT path drop
(`path_drop_guidance`, the model's `uncond=True`). The drift is affine in v with the same
coefficients for both branches, so guiding the velocities equals guiding the drifts:
    v = v_u + w (v_c - v_u);  v_cls = v_cls_u + w_cls (v_cls_c - v_cls_u), or v_cls_c when w_cls <= 0.
The reference sampler guides only when cfg_scale > 1, so a scale below 1 samples unguided there;
here it is refused (`check_guidance_scale`, a ConfigError naming sample.cfg_scale) rather than
silently ignored.

Reproducibility: every random number of sample i is a function of (seed, i, draw k, element)
only (`CounterNoise`: a counter-based hash, computed for the whole batch in a few elementwise
kernels on the sampling device; draw k is the initial latent, the initial class token, then
step by step the latent and class-token noise), so a sample is the same whatever batch or shard
it falls in. With guidance, the conditional and unconditional branches run as one batch of 2B
rows when the model supports it (`uncond_rows`), each row as it would alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from srdit.config import ConfigError, SampleConfig
from srdit.transport import _unwrap, shift_factor, time_shift

GRID_LAST_STOCHASTIC_T = 0.04   # the last grid point before the final deterministic step to 0
SEED_STRIDE = 1_000_003          # sample seeds are seed * SEED_STRIDE + index (see sample_seed)
LABEL_STREAM = 0x1ABE1           # keeps the random-label draws apart from the noise draws

# (x, cls, t) -> (v, v_cls): float64 state in, float64 velocities out; cls / v_cls may be None.
VelocityFn = Callable[[Tensor, Tensor | None, float], tuple[Tensor, Tensor | None]]


# --------------------------------------------------------------------------------------------
# Grid, labels, seeds, tags
# --------------------------------------------------------------------------------------------

def time_grid(num_steps: int, shift: float | None) -> Tensor:
    """The sampling grid, float64, length num_steps + 1: linspace(1, 0.04, num_steps) then 0,
    mapped by the time shift with factor `shift` (None or 1: no shift). Endpoints stay 1 and 0."""
    if num_steps < 1:
        raise ValueError(f"time_grid: num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, GRID_LAST_STOCHASTIC_T, num_steps, dtype=torch.float64)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    if shift is not None:
        t = time_shift(t, float(shift))
    return t


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index`. torch's CPU generator keeps only the low 32 bits of
    a seed, so the mix is taken mod 2**32; within one seed, indices below 2**32 never collide."""
    if seed < 0 or index < 0:
        raise ValueError(f"sample_seed: seed and index must be >= 0, got seed={seed}, index={index}")
    return (int(seed) * SEED_STRIDE + int(index)) % 2**32


def sample_labels(indices, num_classes: int, balanced: bool, seed: int) -> Tensor:
    """Class labels (N,) int64 for global sample indices. Balanced (recipe 2.13): i mod K, so
    N = m K consecutive indices give exactly m samples per class. Otherwise uniform labels, each
    drawn from its own (seed, i) stream, so a label does not depend on the batch or shard."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if num_classes < 1:
        raise ValueError(f"sample_labels: num_classes must be >= 1, got {num_classes}")
    if balanced:
        return idx % num_classes
    labels = [np.random.default_rng([LABEL_STREAM, int(seed), int(i)]).integers(num_classes)
              for i in idx.tolist()]
    return torch.tensor(labels, dtype=torch.int64)


def _num(x: float) -> str:
    return repr(float(x))        # shortest round-trip spelling: 1.0, 0.85, 2.5


def sampler_tag(sample_cfg: SampleConfig) -> str:
    """A filesystem-safe name that spells every knob that changes the samples, e.g.
    sde-nfe250-cfg1.0-clscfg1.0-gi0.0-1.0-pdg1-null1-shift1-bal1-ema1-seed0-n50000.
    (batch_size is left out: samples do not depend on it.)"""
    s = sample_cfg
    tag = (f"{s.mode}-nfe{s.num_steps}-cfg{_num(s.cfg_scale)}-clscfg{_num(s.cls_cfg_scale)}"
           f"-gi{_num(s.guidance_low)}-{_num(s.guidance_high)}-pdg{int(s.path_drop_guidance)}"
           f"-null{int(s.null_label_guidance)}-shift{int(s.time_shift)}-bal{int(s.balanced)}"
           f"-ema{int(s.use_ema)}-seed{s.seed}-n{s.num_samples}")
    bad = sorted({c for c in tag if not (c.isascii() and (c.isalnum() or c in "._-+"))})
    if bad:
        raise ValueError(f"sampler_tag: {tag!r} has characters {bad} that are unsafe in a path")
    return tag


NOISE_SCHEME = "counter-hash-v1"   # recorded with every shard: samples depend on it


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (bijective on [0, 2**32)), in int64 arithmetic that never overflows
    (multipliers < 2**31), so that every device computes the same bits."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


class CounterNoise:
    """Standard normal draws that are a pure function of (seed, sample index, draw number,
    element): `normal(shape)` returns (B, *shape), row b for sample `indices[b]`, and advances
    the draw number. Element e of draw k of sample i: two 32-bit uniforms from a hash of the
    counter (seed, i, k, e), then Box-Muller in float64. One batch's noise is a handful of
    elementwise kernels, whatever the batch size (a generator per sample costs a kernel per
    sample and draw)."""

    def __init__(self, indices: Sequence[int], seed: int, device):
        self.device = torch.device(device)
        idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.int64)
        if (idx < 0).any() or seed < 0:
            raise ValueError("CounterNoise: seed and indices must be >= 0")
        seed_key = _mix32(torch.tensor([int(seed) & 0xFFFFFFFF], dtype=torch.int64) ^ 0x9E3779B9)
        seed_key = _mix32(seed_key ^ ((int(seed) >> 32) & 0xFFFFFFFF))
        key = _mix32(seed_key ^ (idx & 0xFFFFFFFF))
        self.keys = _mix32(key ^ ((idx >> 32) & 0xFFFFFFFF)).to(self.device)      # (B,)
        self.draws = 0

    def normal(self, shape: Sequence[int], dtype=torch.float64) -> Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        key = _mix32(self.keys ^ self.draws)[:, None]                              # (B, 1)
        self.draws += 1
        counter = torch.arange(2 * n, dtype=torch.int64, device=self.device)[None]   # (1, 2n)
        bits = _mix32(_mix32(key ^ counter) + 0x6A09E667)                          # (B, 2n)
        u = (bits.double() + 0.5) * (1.0 / 2**32)                                  # (0, 1)
        u1, u2 = u[:, :n], u[:, n:]
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
        return z.reshape(len(self.keys), *[int(d) for d in shape]).to(dtype)


class PerSampleNoise:
    """One generator per sample, seeded by (seed, global index), living on `device`."""

    def __init__(self, indices: Sequence[int], seed: int, device):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, int(i)))
                           for i in indices]

    def normal(self, shape: Sequence[int], dtype=torch.float64) -> Tensor:
        """(B, *shape): row b drawn from sample b's generator only."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])


# --------------------------------------------------------------------------------------------
# Integrators (model-free: they see only a velocity function)
# --------------------------------------------------------------------------------------------

def _step_range(n: int, progress: bool, desc: str):
    return tqdm(range(n), desc=desc, leave=False, disable=not progress)


def euler_maruyama(velocity_fn: VelocityFn, x: Tensor, cls: Tensor | None, grid: Tensor,
                   noise: PerSampleNoise, progress: bool = False) -> tuple[Tensor, Tensor | None]:
    """The paper's SDE sampler (see the module docstring) from grid[0] to grid[-1] = 0.
    x (B,C,H,W), cls (B,Z) or None: float64 starting states. Returns the final (x, cls)."""
    if len(grid) < 3:
        raise ValueError(f"euler_maruyama: the grid needs >= 3 points (num_steps >= 2), got {len(grid)}")
    times = grid.tolist()

    def drift(state: Tensor, v: Tensor, t: float) -> Tensor:
        score = -((1 - t) * v + state) / t
        return v - t * score                    # v - w(t)/2 * score with w(t) = 2t

    for k in _step_range(len(times) - 2, progress, "sde"):
        t_cur, t_next = times[k], times[k + 1]
        dt = t_next - t_cur
        v, v_cls = velocity_fn(x, cls, t_cur)
        scale = (2 * t_cur) ** 0.5 * abs(dt) ** 0.5
        x = x + drift(x, v, t_cur) * dt + scale * noise.normal(x.shape[1:])
        if cls is not None:
            cls = cls + drift(cls, v_cls, t_cur) * dt + scale * noise.normal(cls.shape[1:])
    t_cur, t_next = times[-2], times[-1]       # last step: deterministic Euler to t = 0
    v, v_cls = velocity_fn(x, cls, t_cur)
    x = x + drift(x, v, t_cur) * (t_next - t_cur)
    if cls is not None:
        cls = cls + drift(cls, v_cls, t_cur) * (t_next - t_cur)
    return x, cls


def heun_ode(velocity_fn: VelocityFn, x: Tensor, cls: Tensor | None, grid: Tensor,
             progress: bool = False) -> tuple[Tensor, Tensor | None]:
    """Probability-flow ODE dx/dt = v with Heun's method on `grid`; the last step is plain Euler."""
    times = grid.tolist()
    last = len(times) - 2
    for k in _step_range(len(times) - 1, progress, "ode"):
        t_cur, t_next = times[k], times[k + 1]
        dt = t_next - t_cur
        v, v_cls = velocity_fn(x, cls, t_cur)
        x_euler = x + v * dt
        cls_euler = cls + v_cls * dt if cls is not None else None
        if k == last:
            x, cls = x_euler, cls_euler
            continue
        v2, v_cls2 = velocity_fn(x_euler, cls_euler, t_next)
        x = x + 0.5 * (v + v2) * dt
        if cls is not None:
            cls = cls + 0.5 * (v_cls + v_cls2) * dt
    return x, cls


# --------------------------------------------------------------------------------------------
# The model as a (guided) velocity function
# --------------------------------------------------------------------------------------------

def check_guidance_scale(sample_cfg: SampleConfig) -> None:
    """Refuse cfg_scale < 1: the reference guides only above 1 and would sample those unguided."""
    if sample_cfg.cfg_scale < 1.0:
        raise ConfigError(f"sample.cfg_scale: {sample_cfg.cfg_scale} is below 1; the reference sampler guides only "
                          f"when cfg_scale > 1 (a scale <= 1 samples unguided there). Use 1.0 for no guidance, "
                          f"or a scale above 1")


def guidance_active(sample_cfg: SampleConfig, t: float) -> bool:
    s = sample_cfg
    return s.cfg_scale > 1.0 and s.guidance_low <= t <= s.guidance_high


def model_num_classes(model) -> int:
    """K, the number of real classes (label K is the null label), read from the model's config."""
    bare = _unwrap(model)
    for obj in (bare, getattr(bare, "cfg", None), getattr(bare, "config", None)):
        k = getattr(obj, "num_classes", None)
        if isinstance(k, int):
            return k
    raise ValueError("sampling: cannot read num_classes from the model (expected model.num_classes or "
                     "model.cfg.num_classes); it is needed for the null label of guidance")


def guided_velocity_fn(model, y: Tensor, sample_cfg: SampleConfig, null_label: int | None) -> VelocityFn:
    """Wrap `model.forward_velocity` as a float64 velocity function with CFG on `sample_cfg`."""
    s = sample_cfg
    check_guidance_scale(s)
    guided = s.cfg_scale > 1.0
    if guided and s.null_label_guidance and null_label is None:
        raise ValueError("guided_velocity_fn: null-label guidance needs null_label (the model's num_classes)")
    y_uncond = torch.full_like(y, null_label) if guided and s.null_label_guidance else y

    # one forward for both branches when the model can run unconditional rows in a batch
    batched = bool(getattr(_unwrap(model), "supports_uncond_rows", False))
    y_both = torch.cat([y, y_uncond]) if guided and batched else None

    def run(x: Tensor, cls: Tensor | None, t: float, labels: Tensor, uncond: bool, **kwargs):
        t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device).float()
        v, v_cls = model.forward_velocity(x.float(), t_in, labels,
                                          cls.float() if cls is not None else None, uncond=uncond, **kwargs)
        return v.double(), (v_cls.double() if v_cls is not None and cls is not None else None)

    def velocity(x: Tensor, cls: Tensor | None, t: float):
        if not guidance_active(s, t):
            return run(x, cls, t, y, False)
        if batched:
            extra = {"uncond_rows": x.shape[0]} if s.path_drop_guidance else {}
            v, v_cls = run(torch.cat([x, x]), torch.cat([cls, cls]) if cls is not None else None, t, y_both,
                           False, **extra)
            v_c, v_u = v.chunk(2)
            v_cls_c, v_cls_u = v_cls.chunk(2) if v_cls is not None else (None, None)
        else:
            v_c, v_cls_c = run(x, cls, t, y, False)
            v_u, v_cls_u = run(x, cls, t, y_uncond, s.path_drop_guidance)
        v = v_u + s.cfg_scale * (v_c - v_u)
        if v_cls_c is not None and s.cls_cfg_scale > 0:
            v_cls_c = v_cls_u + s.cls_cfg_scale * (v_cls_c - v_cls_u)
        return v, v_cls_c

    return velocity


def generate_latents(model, indices, labels, sample_cfg: SampleConfig, latent_shape: Sequence[int],
                     cls_dim: int | None, device, progress: bool = False, *,
                     shift_base: float = 4096, out_device="cpu") -> Tensor:
    """Sample latents (N, C, H, W) float32 on `out_device` (the CPU by default; the sampling
    device keeps them there for the decoder) in the scaled latent space the model was trained
    on, for global sample `indices` with `labels`. `cls_dim`: width of the REG class token (None
    or 0: the model has none). The model must be in eval mode. The time shift uses
    s = sqrt(C*H*W / shift_base) (pass objective.shift_base)."""
    s = sample_cfg
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if idx.shape != labels.shape:
        raise ValueError(f"generate_latents: {len(idx)} indices but {len(labels)} labels; give one label per index")
    if _unwrap(model).training:
        raise ValueError("generate_latents: the model is in training mode (random SPRINT token drop and "
                         "label dropout); call model.eval() first")
    if s.mode not in ("sde", "ode"):
        raise ValueError(f"sample.mode: unknown {s.mode!r}; allowed: sde, ode")
    check_guidance_scale(s)
    guided = s.cfg_scale > 1.0
    if guided and not (s.null_label_guidance or s.path_drop_guidance):
        raise ValueError("sample.cfg_scale > 1 needs an unconditional branch: set sample.null_label_guidance "
                         "and/or sample.path_drop_guidance to true (or cfg_scale to 1.0)")
    null_label = model_num_classes(model) if guided and s.null_label_guidance else None
    latent_shape = tuple(int(d) for d in latent_shape)
    shift = shift_factor(latent_shape, shift_base) if s.time_shift else None
    grid = time_grid(s.num_steps, shift)
    device = torch.device(device)

    out = []
    with torch.no_grad(), tqdm(total=len(idx), desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, len(idx), s.batch_size):
            chunk = idx[start:start + s.batch_size]
            noise = CounterNoise(chunk, s.seed, device)
            # initial states drawn in float32 (as the reference draws its latents), kept in float64
            x = noise.normal(latent_shape, torch.float32).double()
            cls = noise.normal((cls_dim,), torch.float32).double() if cls_dim else None
            y = labels[start:start + s.batch_size].to(device)
            velocity = guided_velocity_fn(model, y, s, null_label)
            if s.mode == "sde":
                x, _ = euler_maruyama(velocity, x, cls, grid, noise, progress=progress)
            else:
                x, _ = heun_ode(velocity, x, cls, grid, progress=progress)
            out.append(x.float().to(out_device))
            bar.update(len(chunk))
    if not out:
        return torch.empty((0, *latent_shape), dtype=torch.float32, device=out_device)
    return torch.cat(out)
