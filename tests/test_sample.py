"""Samplers: the time grid against the reference fixtures, the SDE update, convergence on
analytic data, guidance, labels, tags, and independence from batch size and shard."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from srdit.config import SampleConfig
from srdit.sample import (PerSampleNoise, euler_maruyama, generate_latents, guided_velocity_fn,
                          heun_ode, sample_labels, sample_seed, sampler_tag,
                          time_grid)
from srdit.transport import shift_factor

from golden import fixture_dirs

REPO = Path(__file__).resolve().parents[1]


def _fixture_grid_files() -> list[Path]:
    """Every time_grid.safetensors of the reference fixture folders: those named in
    $SRDIT_REFERENCE_FIXTURES (os.pathsep-separated folders), else tests/fixtures/reference."""
    return [d / "time_grid.safetensors" for d in fixture_dirs("reference", "SRDIT_REFERENCE_FIXTURES")]


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _fixture_grid_files() or [None], ids=lambda p: p and p.parent.name)
def test_time_grid_matches_reference_fixture(path):
    if path is None:
        pytest.skip("no reference fixtures found (set SRDIT_REFERENCE_FIXTURES)")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        grids = json.loads(f.metadata()["grids"])
        assert grids, f"{path}: no grids in the metadata"
        for key, meta in grids.items():
            ref = f.get_tensor(key)
            shift = None
            if meta["time_shift"]:
                shift = shift_factor(meta["latent_shape"], meta["shift_base"])
                assert shift == pytest.approx(meta["shift"], abs=1e-15), key
            ours = time_grid(meta["num_steps"], shift)
            assert ours.dtype == torch.float64 and ours.shape == ref.shape == (meta["length"],), key
            err = (ours - ref).abs().max().item()
            assert err <= 1e-15, f"{key}: max abs error {err}"


def test_time_grid_shape_and_endpoints():
    g = time_grid(250, None)
    assert len(g) == 251 and g[0] == 1.0 and g[-2].item() == pytest.approx(0.04) and g[-1] == 0.0
    assert torch.all(g.diff() < 0)
    gs = time_grid(250, math.sqrt(2))
    assert gs[0] == 1.0 and gs[-1] == 0.0
    assert gs[-2].item() == pytest.approx(0.0556, abs=1e-4)            # recipe 3.1
    assert time_grid(250, math.sqrt(8))[-2].item() == pytest.approx(0.1054, abs=1e-4)
    assert torch.equal(time_grid(50, 1.0), time_grid(50, None))


# --------------------------------------------------------------------------------------------
# labels, seeds, tags
# --------------------------------------------------------------------------------------------

def test_balanced_labels_exactly_n_over_k():
    k = 10
    labels = sample_labels(torch.arange(50 * k), k, balanced=True, seed=0)
    assert Counter(labels.tolist()) == {c: 50 for c in range(k)}
    # shards of the global index range together stay balanced
    shards = [sample_labels(torch.arange(s, 500, 7), k, True, 0) for s in range(7)]
    assert Counter(torch.cat(shards).tolist()) == {c: 50 for c in range(k)}
    assert sample_labels([3, 17], 10, True, 5).tolist() == [3, 7]


def test_random_labels_per_index():
    full = sample_labels(torch.arange(2000), 10, balanced=False, seed=0)
    assert full.dtype == torch.int64 and full.min() >= 0 and full.max() < 10
    counts = Counter(full.tolist())
    assert len(counts) == 10 and min(counts.values()) > 120          # roughly uniform
    assert torch.equal(sample_labels(torch.arange(500, 600), 10, False, 0), full[500:600])
    assert not torch.equal(sample_labels(torch.arange(2000), 10, False, 1), full)


def test_sample_seed_distinct_and_32bit():
    seeds = {sample_seed(0, i) for i in range(50_000)} | {sample_seed(1, i) for i in range(50_000)}
    assert len(seeds) == 100_000 and max(seeds) < 2**32


def test_sampler_tag_spells_every_knob():
    s = SampleConfig(num_steps=250, num_samples=50_000)
    assert sampler_tag(s) == "sde-nfe250-cfg1.0-clscfg1.0-gi0.0-1.0-pdg1-null1-shift1-bal1-ema1-seed0-n50000"
    changes = dict(mode="ode", num_steps=50, cfg_scale=1.5, cls_cfg_scale=2.5, guidance_low=0.1,
                   guidance_high=0.85, path_drop_guidance=False, null_label_guidance=False,
                   time_shift=False, balanced=False, seed=3, num_samples=1000, use_ema=False)
    assert set(changes) == {f.name for f in dataclasses.fields(SampleConfig)} - {"batch_size"}
    tags = {sampler_tag(dataclasses.replace(s, **{k: v})) for k, v in changes.items()}
    assert len(tags) == len(changes) and sampler_tag(s) not in tags
    assert sampler_tag(dataclasses.replace(s, batch_size=7)) == sampler_tag(s)
    for tag in tags:
        assert all(c.isalnum() or c in "._-" for c in tag), tag


# --------------------------------------------------------------------------------------------
# integrators
# --------------------------------------------------------------------------------------------

def gaussian_velocity(mu: float, sigma: float):
    """The exact velocity E[eps - x0 | x_t] for data x0 ~ N(mu, sigma^2) per coordinate."""
    def v(x, t):
        var = (1 - t) ** 2 * sigma ** 2 + t ** 2
        return (t - (1 - t) * sigma ** 2) / var * (x - (1 - t) * mu) - mu
    return v


def test_sde_update_is_the_recipe_formula():
    """Two stochastic steps and the deterministic last one, recomputed by hand."""
    grid = time_grid(3, None)                                     # 1, 0.52, 0.04, 0
    x_start = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    c_start = torch.tensor([[2.0]], dtype=torch.float64)

    def fn(x, c, t):                                             # a state-dependent velocity
        return torch.sin(x) + t, 0.5 * c - t

    out_x, out_c = euler_maruyama(fn, x_start, c_start, grid, PerSampleNoise([4], seed=9, device="cpu"))
    g = torch.Generator().manual_seed(sample_seed(9, 4))
    x, c = x_start[0].clone(), c_start[0].clone()
    ts = grid.tolist()
    for k in range(3):
        t, dt = ts[k], ts[k + 1] - ts[k]
        vx, vc = torch.sin(x) + t, 0.5 * c - t
        dx = vx + ((1 - t) * vx + x)          # d = v - t s with s = -((1 - t) v + x) / t
        dc = vc + ((1 - t) * vc + c)
        x, c = x + dx * dt, c + dc * dt
        if k < 2:                             # noise sqrt(2 t) sqrt(|dt|) xi, image first
            x = x + math.sqrt(2 * t) * math.sqrt(abs(dt)) * torch.randn(2, generator=g, dtype=torch.float64)
            c = c + math.sqrt(2 * t) * math.sqrt(abs(dt)) * torch.randn(1, generator=g, dtype=torch.float64)
    assert torch.allclose(out_x[0], x, atol=1e-12) and torch.allclose(out_c[0], c, atol=1e-12)


@pytest.mark.parametrize("shift", [None, math.sqrt(2)])
def test_sde_converges_to_gaussian_data(shift):
    mu, sigma, mu_c, sigma_c = 0.7, 0.5, -1.0, 0.25
    v_img, v_cls = gaussian_velocity(mu, sigma), gaussian_velocity(mu_c, sigma_c)
    n = 512
    noise = PerSampleNoise(range(n), seed=0, device="cpu")
    x, c = noise.normal((16,)), noise.normal((8,))
    grid = time_grid(100, shift)
    xs, cs = euler_maruyama(lambda x, c, t: (v_img(x, t), v_cls(c, t)), x, c, grid, noise)
    t_last = grid[-2].item()
    for out, m, sd in ((xs, mu, sigma), (cs, mu_c, sigma_c)):
        assert out.mean().item() == pytest.approx(m, abs=0.03)
        assert out.std().item() == pytest.approx(final_step_std(sd, t_last), rel=0.04)


def final_step_std(sigma: float, t: float) -> float:
    """Std of the output when the state at t has the exact marginal N((1-t) mu, (1-t)^2 sigma^2 + t^2)
    and the deterministic last step x - t d (d = (2 - t) v + x) maps it to t = 0: the paper's
    sampler ends slightly off sigma (about 0.98 sigma for sigma = 0.5, 0.92 sigma for 0.25)."""
    var = (1 - t) ** 2 * sigma ** 2 + t ** 2
    slope = (t - (1 - t) * sigma ** 2) / var          # dv/dx of the exact velocity
    return math.sqrt(var) * abs((1 - t) - t * (2 - t) * slope)


def test_heun_ode_maps_noise_to_gaussian_data():
    mu, sigma = 0.7, 0.5
    v = gaussian_velocity(mu, sigma)
    x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, _ = heun_ode(lambda x, c, t: (v(x, t), None), x, None, time_grid(50, None))
    # the exact flow is affine: x0 = mu + sigma * eps; Heun gets within discretisation error
    assert torch.allclose(out, mu + sigma * x, atol=0.02)
    out_coarse, _ = heun_ode(lambda x, c, t: (v(x, t), None), x, None, time_grid(5, None))
    assert (out_coarse - (mu + sigma * x)).abs().max() > (out - (mu + sigma * x)).abs().max()


# --------------------------------------------------------------------------------------------
# the model wrapper: guidance and generate_latents
# --------------------------------------------------------------------------------------------

class RecordingModel(torch.nn.Module):
    """forward_velocity returns c_cond for real labels without path drop and c_uncond for the
    unconditional branch; it records (t, labels, uncond) per call."""

    num_classes = 10

    def __init__(self, v_cond=1.0, v_uncond=-1.0, cls_cond=3.0, cls_uncond=1.0):
        super().__init__()
        self.v_cond, self.v_uncond, self.cls_cond, self.cls_uncond = v_cond, v_uncond, cls_cond, cls_uncond
        self.calls = []

    def forward_velocity(self, x, t, y, cls_token, uncond=False):
        assert x.dtype == torch.float32 and t.dtype == torch.float32
        self.calls.append((t[0].item(), y.tolist(), uncond))
        is_uncond = uncond or bool((y == self.num_classes).any())
        v = torch.full_like(x, self.v_uncond if is_uncond else self.v_cond)
        c = torch.full_like(cls_token, self.cls_uncond if is_uncond else self.cls_cond)
        return v, c


def test_guidance_combination_and_class_scale():
    model = RecordingModel()
    x, c, y = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1, 2])
    for cls_scale, expected_cls in [(2.5, 1.0 + 2.5 * 2.0), (0.0, 3.0), (-1.0, 3.0)]:
        cfg = SampleConfig(cfg_scale=4.0, cls_cfg_scale=cls_scale)
        v, vc = guided_velocity_fn(model, y, cfg, null_label=10)(x, c, 0.5)
        assert torch.allclose(v, torch.full_like(v, -1.0 + 4.0 * 2.0))
        assert torch.allclose(vc, torch.full_like(vc, expected_cls))
    # the unconditional branch: null label and/or path drop, as configured
    for pdg, null, (labels, uncond) in [(True, True, ([10, 10], True)), (False, True, ([10, 10], False)),
                                        (True, False, ([1, 2], True))]:
        model.calls.clear()
        cfg = SampleConfig(cfg_scale=2.0, path_drop_guidance=pdg, null_label_guidance=null)
        guided_velocity_fn(model, y, cfg, null_label=10)(x, c, 0.5)
        assert model.calls == [(0.5, [1, 2], False), (0.5, labels, uncond)]


def test_guidance_scale_below_one_is_refused_and_never_guides():
    """The reference guides only when cfg_scale > 1 (a scale <= 1 samples unguided there): a
    scale below 1 is refused with the key named, not honoured as a different sampler."""
    from srdit.config import ConfigError
    from srdit.sample import guidance_active

    model = RecordingModel().eval()
    y = torch.tensor([1, 2])
    for scale in (0.0, 0.5, 0.999):
        cfg = SampleConfig(cfg_scale=scale, num_steps=3, batch_size=2, num_samples=2)
        with pytest.raises(ConfigError, match=r"sample\.cfg_scale: .* below 1"):
            generate_latents(model, torch.arange(2), y, cfg, (1, 2, 2), 3, "cpu")
        with pytest.raises(ConfigError, match=r"sample\.cfg_scale"):
            guided_velocity_fn(model, y, cfg, null_label=10)
        assert not guidance_active(cfg, 0.5)               # the reference's condition: never guides
    assert not model.calls
    assert not guidance_active(SampleConfig(cfg_scale=1.0), 0.5) and guidance_active(SampleConfig(cfg_scale=1.01), 0.5)


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_guidance_interval_respected(mode):
    steps = 20
    grid = time_grid(steps, math.sqrt(2)).tolist()
    cfg = SampleConfig(mode=mode, num_steps=steps, cfg_scale=2.0, guidance_low=0.3, guidance_high=0.7,
                       time_shift=True, batch_size=4, num_samples=4)
    model = RecordingModel().eval()
    generate_latents(model, torch.arange(4), torch.tensor([0, 1, 2, 3]), cfg, (1, 2, 2), 3, "cpu",
                     shift_base=2)                                   # s = sqrt(4 / 2) = sqrt(2)
    cond = [t for t, y, u in model.calls if y == [0, 1, 2, 3] and not u]
    uncond = [t for t, y, u in model.calls if y == [10] * 4]
    assert len(cond) + len(uncond) == len(model.calls)
    expected_cond = grid[:-1] if mode == "sde" else [t for k in range(steps - 1) for t in grid[k:k + 2]] + [grid[-2]]
    assert cond == pytest.approx(expected_cond, abs=1e-7)
    assert uncond and all(0.3 - 1e-7 <= t <= 0.7 + 1e-7 for t in uncond)
    assert uncond == pytest.approx([t for t in expected_cond if 0.3 <= t <= 0.7], abs=1e-7)
    # cfg 1.0: one forward pass per grid point, never an unconditional branch
    model.calls.clear()
    generate_latents(model, torch.arange(4), torch.tensor([0, 1, 2, 3]), dataclasses.replace(cfg, cfg_scale=1.0),
                     (1, 2, 2), 3, "cpu", shift_base=2)
    assert len(model.calls) == len(expected_cond) and not any(u or 10 in y for _, y, u in model.calls)


class AnalyticModel(torch.nn.Module):
    """Exact velocity of Gaussian data whose mean is the label (and -label for the class token)."""

    num_classes = 4

    def __init__(self, sigma=0.5):
        super().__init__()
        self.sigma = sigma

    def forward_velocity(self, x, t, y, cls_token, uncond=False):
        tt, mu = t.view(-1, 1, 1, 1), y.float().view(-1, 1, 1, 1)
        var = (1 - tt) ** 2 * self.sigma ** 2 + tt ** 2
        v = (tt - (1 - tt) * self.sigma ** 2) / var * (x - (1 - tt) * mu) - mu
        tc, mc = t.view(-1, 1), -y.float().view(-1, 1)
        varc = (1 - tc) ** 2 * self.sigma ** 2 + tc ** 2
        vc = (tc - (1 - tc) * self.sigma ** 2) / varc * (cls_token - (1 - tc) * mc) - mc
        return v, vc


def test_generate_latents_reaches_the_label_means():
    n = 64
    labels = sample_labels(torch.arange(n), 4, True, 0)
    cfg = SampleConfig(num_steps=50, batch_size=32, num_samples=n, time_shift=True)
    out = generate_latents(AnalyticModel().eval(), torch.arange(n), labels, cfg, (4, 4, 4), 5, "cpu")
    assert out.dtype == torch.float32 and out.shape == (n, 4, 4, 4)
    means = out.mean(dim=(1, 2, 3))
    assert torch.allclose(means, labels.float(), atol=0.25)
    assert out.std(dim=(1, 2, 3)).mean().item() == pytest.approx(0.5, rel=0.1)


def test_batch_size_and_shard_invariance_with_stand_in():
    class Nonlinear(torch.nn.Module):
        num_classes = 4

        def forward_velocity(self, x, t, y, cls_token, uncond=False):
            return torch.tanh(x * t.view(-1, 1, 1, 1)) + y.view(-1, 1, 1, 1), torch.cos(cls_token)

    idx = torch.arange(10, 20)
    labels = sample_labels(idx, 4, True, 0)
    cfg = SampleConfig(num_steps=8, seed=3)
    model = Nonlinear().eval()
    ref = generate_latents(model, idx, labels, dataclasses.replace(cfg, batch_size=3), (2, 2, 2), 3, "cpu")
    other = generate_latents(model, idx, labels, dataclasses.replace(cfg, batch_size=5), (2, 2, 2), 3, "cpu")
    part = generate_latents(model, idx[4:7], labels[4:7], cfg, (2, 2, 2), 3, "cpu")
    assert torch.equal(ref, other) and torch.equal(ref[4:7], part)
    assert not torch.equal(ref[0], ref[1])
    reseeded = generate_latents(model, idx, labels, dataclasses.replace(cfg, seed=4), (2, 2, 2), 3, "cpu")
    assert not torch.equal(ref, reseeded)


def test_generate_latents_refuses_bad_setups():
    model = RecordingModel()
    cfg = SampleConfig(num_steps=4)
    with pytest.raises(ValueError, match="training mode"):
        generate_latents(model.train(), torch.arange(2), torch.zeros(2), cfg, (1, 2, 2), 3, "cpu")
    model.eval()
    with pytest.raises(ValueError, match="unconditional branch"):
        generate_latents(model, torch.arange(2), torch.zeros(2), dataclasses.replace(
            cfg, cfg_scale=2.0, path_drop_guidance=False, null_label_guidance=False), (1, 2, 2), 3, "cpu")
    with pytest.raises(ValueError, match="one label per index"):
        generate_latents(model, torch.arange(2), torch.zeros(3), cfg, (1, 2, 2), 3, "cpu")


# --------------------------------------------------------------------------------------------
# with the real tiny model
# --------------------------------------------------------------------------------------------

def _real_tiny_model():
    models = pytest.importorskip("srdit.models", reason="srdit.models is not written yet")
    if not hasattr(models, "build_model"):
        pytest.skip("srdit.models.build_model is not written yet")
    from srdit.config import get_config
    cfg = get_config("demo_srdit")
    torch.manual_seed(0)
    return cfg, models.build_model(cfg.model).eval()


@pytest.mark.parametrize("guided", [False, True])
def test_real_tiny_model_invariant_to_batch_and_shard(guided):
    cfg, model = _real_tiny_model()
    m = cfg.model
    shape = (m.in_channels, m.input_size, m.input_size)
    s = dataclasses.replace(cfg.sample, num_steps=6, cfg_scale=2.0 if guided else 1.0, guidance_high=0.9)
    idx = torch.arange(100, 110)
    labels = sample_labels(idx, m.num_classes, s.balanced, s.seed)
    run = lambda i, bs: generate_latents(model, idx[i], labels[i], dataclasses.replace(s, batch_size=bs),  # noqa: E731
                                         shape, m.cls_token_dim, "cpu", shift_base=cfg.objective.shift_base)
    full3 = run(slice(None), 3)
    full5 = run(slice(None), 5)
    shard = run(slice(5, 9), 2)                  # another shard holding samples 105..108
    assert full3.shape == (10, *shape) and torch.isfinite(full3).all()
    assert torch.equal(full3, full5) and torch.equal(full3[5:9], shard)
    assert not torch.equal(full3[0], full3[1])
