"""Training and sampling learn a distribution whose answer is known.

The golden fixtures check single forward passes; this checks that the objective
(`srdit.transport.training_losses`), its time convention and the samplers (`srdit.sample`)
fit together, i.e. that a model trained with the one and sampled with the others produces the
data distribution.

Data: K = 3 classes of 2 x 2 x 2 latents; class k is N(mu_k, sigma_k^2 I) with known mu_k and
sigma_k = 0.4, 0.6, 0.9; the coordinates of mu_k are O(0.3), so the classes overlap (unguided,
about 12% of the samples are more likely under another class). The check (`mismatches`), for
every class k, on 400 samples per class:
- each coordinate's sample mean is within MEAN_TOL = 0.3 sigma_k of mu_k (the sampling error of
  a mean is 0.05 sigma_k; trained models land within about 0.15 sigma_k);
- the sample standard deviation, averaged over the coordinates, is within STD_TOL = 15% of
  sigma_k (trained models: within about 10%; the SDE's last, deterministic step alone costs up to 6%
  for the narrowest class with the time shift, see the exact-velocity test).
It runs on the SDE sampler (the paper's) and the Heun ODE sampler, for a plain SiT and for a
tiny SR-DiT (REG class token, SPRINT, RMSNorm, RoPE, QK-norm, value residual, time shift,
contrastive flow matching). Guidance above 1 must make a sample's own class more probable under
the true distribution. And the same check must fail for a model trained with the velocity's
sign flipped or with the time convention swapped (t = 0 noise, t = 1 data), each patched into
`srdit.transport`. A third test drives both samplers with the exact velocity of the known
distribution (no training), where much tighter tolerances hold: there, a diffusion coefficient
that the SDE's drift and noise disagree on (noise sqrt(t) instead of sqrt(2t), or a drift for
w(t) = t) gives every class 0.72-0.76x or 1.25-1.30x its spread (measured on a patched copy of
`euler_maruyama`), against a tolerance of 8%.

About 100 s on one core of the (shared) development VM: four tiny models of 600 steps each.
"""
from __future__ import annotations

import math

import pytest
import torch

from srdit import transport
from srdit.config import ModelConfig, ObjectiveConfig, SampleConfig, SprintConfig
from srdit.models import build_model
from srdit.sample import euler_maruyama, generate_latents, heun_ode, time_grid
from srdit.transport import training_losses

K = 3
SHAPE = (2, 2, 2)                       # (C, H, W): 8 coordinates, 4 tokens
DIM = math.prod(SHAPE)
STDS = torch.tensor([0.4, 0.6, 0.9])
MEANS = 0.3 * torch.randn((K, *SHAPE), generator=torch.Generator().manual_seed(1))
CLS_DIM = 4                             # the "teacher" CLS token of the REG variant: a class code + noise
CLS_CODES = torch.randn((K, CLS_DIM), generator=torch.Generator().manual_seed(2))
SAMPLES_PER_CLASS = 400
MEAN_TOL, STD_TOL = 0.3, 0.15         # in units of sigma_k; relative
STEPS, BATCH, LR = 600, 256, 3e-3       # training: AdamW, linear warm-up over 50 steps then linear decay

VARIANTS = {
    "sit": dict(model=dict(depth=2, norm="layer", rope=False, qk_norm=False, value_residual="none", class_token=False,
                           sprint=SprintConfig(enabled=False)),
                objective=dict(time_shift=False, cls_coeff=0.0, cfm_coeff=0.0)),
    # shift_base 2 gives the time-shift factor s = sqrt(8 / 2) = 2 for these 8-number latents
    "srdit": dict(model=dict(depth=3, norm="rms", rope=True, qk_norm=True, value_residual="scalar", class_token=True,
                             sprint=SprintConfig(enabled=True, encoder_depth=1, decoder_depth=1, drop_ratio=0.4)),
                  objective=dict(time_shift=True, shift_base=2, cls_coeff=0.03, cfm_coeff=0.05)),
}


def draw_batch(y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, teacher CLS) for labels y, from the known distributions."""
    x0 = MEANS[y] + STDS[y].view(-1, 1, 1, 1) * torch.randn((len(y), *SHAPE), generator=g)
    cls = CLS_CODES[y] + 0.1 * torch.randn((len(y), CLS_DIM), generator=g)
    return x0, cls


def train(variant: str) -> tuple[torch.nn.Module, ObjectiveConfig]:
    """A tiny model trained on the known distribution with the project's model and objective."""
    spec = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_heads=4, patch_size=1, input_size=SHAPE[1],
                                    in_channels=SHAPE[0], num_classes=K, cls_token_dim=CLS_DIM, align_depths=[],
                                    projector_dim=8, label_dropout=0.2, **spec["model"]))
    objective = ObjectiveConfig(t_dist="uniform", proj_coeff=0.0, **spec["objective"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / STEPS))
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(STEPS):
        y = torch.randint(0, K, (BATCH,), generator=g)
        x0, cls = draw_batch(y, g)
        terms = training_losses(model, x0, y, cls if model.config.class_token else None, None, objective,
                                generator=g)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return model.eval(), objective


def sample(model, objective: ObjectiveConfig, mode: str, cfg_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples (N, C, H, W) float64, labels): SAMPLES_PER_CLASS per class, balanced labels."""
    n = K * SAMPLES_PER_CLASS
    sprint = model.config.sprint.enabled
    cfg = SampleConfig(mode=mode, num_steps=100 if mode == "sde" else 30, cfg_scale=cfg_scale,
                       time_shift=objective.time_shift, path_drop_guidance=sprint, null_label_guidance=True,
                       num_samples=n, batch_size=n)
    indices = torch.arange(n)
    labels = indices % K
    x = generate_latents(model, indices, labels, cfg, SHAPE, CLS_DIM if model.config.class_token else None,
                         "cpu", shift_base=objective.shift_base)
    return x.double(), labels


def mismatches(x: torch.Tensor, labels: torch.Tensor, mean_tol: float = MEAN_TOL,
               std_tol: float = STD_TOL) -> list[str]:
    """What differs from the known distribution beyond the tolerances (empty: a match)."""
    out = []
    for k in range(K):
        xs = x[labels == k].reshape(-1, DIM)
        mean_err = (xs.mean(0) - MEANS[k].reshape(-1).double()).abs().max().item() / STDS[k].item()
        std_ratio = xs.std(0).mean().item() / STDS[k].item()
        if not mean_err <= mean_tol:
            out.append(f"class {k}: a coordinate's mean is off by {mean_err:.2f} sigma_k (tolerance {mean_tol})")
        if not abs(std_ratio - 1) <= std_tol:
            out.append(f"class {k}: spread {std_ratio:.2f} x sigma_k (tolerance {std_tol:.0%})")
    return out


def class_log_posterior(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label | x) under the true distribution (equal class priors), per sample."""
    flat = x.reshape(len(x), -1)
    logp = torch.stack([-(flat - MEANS[k].reshape(-1).double()).pow(2).sum(1) / (2 * STDS[k].item() ** 2)
                        - DIM * math.log(STDS[k].item()) for k in range(K)], dim=1)
    return logp[torch.arange(len(x)), labels] - torch.logsumexp(logp, dim=1)


class Trained:
    """Each variant trained once, and each (variant, sampler, guidance) sampled once, per module."""

    def __init__(self):
        self.models, self.samples = {}, {}

    def model(self, variant):
        if variant not in self.models:
            self.models[variant] = train(variant)
        return self.models[variant]

    def sample(self, variant, mode, cfg_scale=1.0):
        key = (variant, mode, cfg_scale)
        if key not in self.samples:
            self.samples[key] = sample(*self.model(variant), mode, cfg_scale)
        return self.samples[key]


@pytest.fixture(scope="module")
def trained():
    before = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny models run fastest on one thread
    yield Trained()
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The samplers alone, on the exact velocity
# --------------------------------------------------------------------------------------------

def exact_velocity(labels: torch.Tensor):
    """v*(x, t) = E[eps - x0 | x_t = x] = (x - E[x0 | x_t = x]) / t for x0 ~ N(mu_y, sigma_y^2 I)."""
    mu = MEANS[labels].double()
    var = (STDS[labels].double() ** 2).view(-1, 1, 1, 1)

    def velocity(x, cls, t):
        x0_mean = mu + (1 - t) * var / ((1 - t) ** 2 * var + t ** 2) * (x - (1 - t) * mu)
        return (x - x0_mean) / t, None

    return velocity


@pytest.mark.parametrize("shift", [None, 2.0], ids=["no-shift", "shift2"])
@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_samplers_reproduce_the_distribution_from_the_exact_velocity(mode, shift):
    n = 3000 * K
    labels = torch.arange(n) % K
    g = torch.Generator().manual_seed(4)

    class Noise:                            # the samplers' noise interface: (n, *shape) normal draws
        def normal(self, shape, dtype=torch.float64):
            return torch.randn((n, *shape), generator=g, dtype=dtype)

    x = torch.randn((n, *SHAPE), generator=g, dtype=torch.float64)
    if mode == "sde":
        x, _ = euler_maruyama(exact_velocity(labels), x, None, time_grid(100, shift), Noise())
    else:
        x, _ = heun_ode(exact_velocity(labels), x, None, time_grid(30, shift))
    # The SDE's last step is deterministic Euler from the last grid point (0.04, or 0.077 with the
    # shift), which lands on the posterior mean there: up to 6% less spread for the narrowest class.
    assert mismatches(x, labels, mean_tol=0.1, std_tol=0.08) == []


# --------------------------------------------------------------------------------------------
# Trained models
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trained_model_samples_match_each_class(trained, variant):
    for mode in ("sde", "ode"):
        assert mismatches(*trained.sample(variant, mode)) == [], f"{variant}, {mode} sampler"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_guidance_above_one_moves_samples_toward_their_class(trained, variant):
    plain, labels = trained.sample(variant, "sde")
    guided, _ = trained.sample(variant, "sde", cfg_scale=3.0)
    before, after = class_log_posterior(plain, labels), class_log_posterior(guided, labels)
    # mean log p(own class | x): from about -0.3 to about -0.02 (a sure classification is 0)
    assert after.mean() > before.mean() + 0.05, (before.mean().item(), after.mean().item())
    assert (after > math.log(0.5)).float().mean() > (before > math.log(0.5)).float().mean()


BROKEN = {
    "velocity sign flipped": dict(velocity_target=lambda x0, eps: x0 - eps),
    # t = 0 noise, t = 1 data, and the velocity of that path: consistent in itself, but not
    # what the samplers (which run from t = 1, noise, down to t = 0) assume
    "time convention swapped": dict(interpolate=lambda x0, eps, t: t * x0 + (1 - t) * eps,
                                    velocity_target=lambda x0, eps: x0 - eps),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_check_fails_when_a_convention_is_broken(monkeypatch, one_thread, broken):
    for name, fn in BROKEN[broken].items():
        monkeypatch.setattr(transport, name, fn)
    model, objective = train("sit")
    x, labels = sample(model, objective, "sde")
    problems = mismatches(x, labels)
    assert len(problems) >= K, problems      # every class is wrong, not one by bad luck
