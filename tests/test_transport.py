"""The training objective: time draws and shift, and every loss term against hand-computed values."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from srdit.config import ObjectiveConfig
from srdit.transport import (LossTerms, repa_loss, sample_t, shift_factor, time_shift,
                             training_losses)


@dataclass
class FakeOutput:
    velocity: torch.Tensor
    zs: list
    cls_velocity: torch.Tensor | None


class StandIn(torch.nn.Module):
    """Same call signature as SRDiT; returns outputs fixed by the test and records its inputs.

    velocity = a * x_t + b (b a fixed tensor), cls_velocity = c * cls_t, zs = fixed tensors.
    """

    def __init__(self, zs, a=0.5, b=None, c=2.0, class_token=True):
        super().__init__()
        self.class_token = class_token
        self.a, self.b, self.c, self.zs = a, b, c, zs
        self.calls = []

    def forward(self, x, t, y, cls_token=None, *, uncond=False, ids_keep=None, path_drop=None,
                drop_labels=None):
        self.calls.append(dict(x=x.clone(), t=t.clone(), y=y, cls_token=cls_token, ids_keep=ids_keep,
                               path_drop=path_drop, drop_labels=drop_labels))
        v = self.a * x + (self.b if self.b is not None else 0.0)
        cls_v = self.c * cls_token if cls_token is not None else None
        return FakeOutput(v, list(self.zs), cls_v)


B, C, H, W, Z, N = 3, 2, 2, 2, 4, 4     # N patch tokens; the teacher is Z wide (REG token = CLS)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, H, W, generator=g)
    y = torch.tensor([0, 1, 2])
    teacher_cls = torch.randn(B, Z, generator=g)
    teacher_tokens = torch.randn(B, N, Z, generator=g)
    zs = [torch.randn(B, N + 1, Z, generator=g), torch.randn(B, N + 1, Z, generator=g)]
    b = torch.randn(B, C, H, W, generator=g)
    return x0, y, teacher_cls, teacher_tokens, zs, b


def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


# --------------------------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------------------------

def test_shift_factor_values():
    assert shift_factor((32, 16, 16), 4096) == pytest.approx(math.sqrt(2), abs=1e-15)
    assert shift_factor((32, 32, 32), 4096) == pytest.approx(math.sqrt(8), abs=1e-15)
    assert shift_factor((4, 4, 4), 64) == 1.0
    with pytest.raises(ValueError, match="C, H, W"):
        shift_factor((32, 16), 4096)


def test_time_shift_values():
    # recipe 2.1: a median t of 0.5 becomes 0.586 at 256 px and 0.739 at 512 px
    assert time_shift(0.5, math.sqrt(2)) == pytest.approx(0.5858, abs=1e-4)
    assert time_shift(0.5, math.sqrt(8)) == pytest.approx(0.7388, abs=1e-4)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = time_shift(t, math.sqrt(2))
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] > t[1:-1])               # mass moves toward noise (t = 1)
    assert torch.all(shifted.diff() > 0)
    assert torch.equal(time_shift(t, 1.0), t)
    # exact formula, and the clamp for values just outside [0, 1]
    assert shifted[30].item() == pytest.approx(math.sqrt(2) * 0.3 / (1 + (math.sqrt(2) - 1) * 0.3), abs=1e-15)
    assert time_shift(torch.tensor([1.0 + 1e-6, -1e-6]), 2.0).tolist() == [1.0, 0.0]


def test_sample_t_uniform_and_shift():
    cfg = ObjectiveConfig(t_dist="uniform", time_shift=False)
    t = sample_t(20000, cfg, (32, 16, 16), torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert torch.equal(t, torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    assert 0 <= t.min() and t.max() <= 1
    cfg_shift = ObjectiveConfig(t_dist="uniform", time_shift=True, shift_base=4096)
    ts = sample_t(20000, cfg_shift, (32, 16, 16), torch.Generator().manual_seed(1))
    assert torch.allclose(ts, time_shift(t, math.sqrt(2)))
    assert ts.median().item() == pytest.approx(0.586, abs=0.01)


def test_sample_t_logit_normal():
    cfg = ObjectiveConfig(t_dist="logit_normal", time_shift=False)
    t = sample_t(20000, cfg, (32, 16, 16), torch.Generator().manual_seed(2))
    n = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(t, torch.sigmoid(n))
    logit = torch.logit(t.double())
    assert abs(logit.mean().item()) < 0.03 and logit.std().item() == pytest.approx(1.0, abs=0.03)
    assert t.median().item() == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------

def test_draw_order_and_model_inputs():
    """x_t and c_t are built from t, eps, eps_c drawn in that order from the generator."""
    x0, y, tc, tt, zs, b = _inputs()
    model = StandIn(zs, b=b)
    cfg = ObjectiveConfig(time_shift=True, shift_base=4)   # s = sqrt(8/4) = sqrt(2)
    ids = torch.tensor([[0, 1]] * B)
    drop = torch.tensor([True, False, False])
    training_losses(model, x0, y, tc, tt, cfg, generator=torch.Generator().manual_seed(7),
                    path_drop=True, ids_keep=ids, drop_labels=drop)
    call = model.calls[0]
    g = torch.Generator().manual_seed(7)
    t = time_shift(torch.rand(B, generator=g), math.sqrt(2))
    eps = torch.randn(B, C, H, W, generator=g)
    eps_c = torch.randn(B, Z, generator=g)
    assert torch.allclose(call["t"], t)
    for i in range(B):
        ti = t[i].item()
        assert torch.allclose(call["x"][i], (1 - ti) * x0[i] + ti * eps[i], atol=1e-6)
        assert torch.allclose(call["cls_token"][i], (1 - ti) * tc[i] + ti * eps_c[i], atol=1e-6)
    assert call["path_drop"] is True and call["ids_keep"] is ids and call["drop_labels"] is drop


def test_each_term_against_hand_computation():
    x0, y, tc, tt, zs, b = _inputs()
    model = StandIn(zs, a=0.5, b=b, c=2.0)
    cfg = ObjectiveConfig(time_shift=False, cls_coeff=0.03, proj_coeff=0.5, cfm_coeff=0.05)
    g = torch.Generator().manual_seed(3)
    terms = training_losses(model, x0, y, tc, tt, cfg, generator=g)
    assert isinstance(terms, LossTerms)

    g = torch.Generator().manual_seed(3)
    t = torch.rand(B, generator=g)
    eps = torch.randn(B, C, H, W, generator=g)
    eps_c = torch.randn(B, Z, generator=g)
    # element-wise python loops (a different code path from the vectorised implementation)
    v_sum, cls_sum, cfm_sum = 0.0, 0.0, 0.0
    v_target = [[0.0] * (C * H * W) for _ in range(B)]
    v_pred = [[0.0] * (C * H * W) for _ in range(B)]
    for i in range(B):
        ti = t[i].item()
        for j, (a0, e, bb) in enumerate(zip(x0[i].flatten().tolist(), eps[i].flatten().tolist(),
                                            b[i].flatten().tolist())):
            xt = (1 - ti) * a0 + ti * e
            v_pred[i][j] = 0.5 * xt + bb
            v_target[i][j] = e - a0
    for i in range(B):
        v_sum += sum((p - q) ** 2 for p, q in zip(v_pred[i], v_target[i])) / (C * H * W)
        prev = (i - 1) % B                       # roll by 1: sample i is pushed from sample i - 1
        cfm_sum += sum((p - q) ** 2 for p, q in zip(v_pred[i], v_target[prev]))
        ti = t[i].item()
        per = 0.0
        for c0, e in zip(tc[i].tolist(), eps_c[i].tolist()):
            ct = (1 - ti) * c0 + ti * e
            per += (2.0 * ct - (e - c0)) ** 2
        cls_sum += per / Z
    v_exp, cls_exp = v_sum / B, cls_sum / B
    cfm_exp = -cfm_sum / (B * C * H * W)
    proj_exp = 0.0
    for z in zs:
        for i in range(B):
            target_rows = [tc[i].tolist()] + [tt[i, n].tolist() for n in range(N)]
            proj_exp -= sum(_cos(z[i, n].tolist(), target_rows[n]) for n in range(N + 1)) / (N + 1) / B
    proj_exp /= len(zs)

    assert terms.v.item() == pytest.approx(v_exp, rel=1e-5)
    assert terms.cls.item() == pytest.approx(cls_exp, rel=1e-5)
    assert terms.proj.item() == pytest.approx(proj_exp, rel=1e-5, abs=1e-6)
    assert terms.cfm.item() == pytest.approx(cfm_exp, rel=1e-5)
    total = v_exp + 0.03 * cls_exp + 0.5 * proj_exp + 0.05 * cfm_exp
    assert terms.total.item() == pytest.approx(total, rel=1e-5)
    assert torch.equal(terms.t, t)
    assert set(terms.scalars()) == {"total", "v", "cls", "proj", "cfm"}


class TargetModel(torch.nn.Module):
    """Knows x0, so it can recover the target eps - x0 = (x_t - x0) / t from its inputs."""

    def __init__(self, x0, roll):
        super().__init__()
        self.x0, self.roll, self.class_token = x0, roll, False

    def forward(self, x, t, y, cls_token=None, **kw):
        target = (x - self.x0) / t.view(-1, 1, 1, 1)
        return FakeOutput(torch.roll(target, self.roll, dims=0) if self.roll else target, [], None)


def test_cfm_negative_is_the_rolled_target():
    x0, y, *_ = _inputs()
    cfg = ObjectiveConfig(time_shift=False, cls_coeff=0.0, proj_coeff=0.0, cfm_coeff=0.05)
    t = torch.tensor([0.3, 0.6, 0.9])
    # predicting the previous sample's target exactly: CFM distance 0, flow loss > 0
    rolled = training_losses(TargetModel(x0, 1), x0, y, None, None, cfg,
                             generator=torch.Generator().manual_seed(11), t=t)
    assert abs(rolled.cfm.item()) < 1e-9 and rolled.v.item() > 0.1
    # predicting the next sample's target instead (wrong direction) is not zero
    wrong = training_losses(TargetModel(x0, -1), x0, y, None, None, cfg,
                            generator=torch.Generator().manual_seed(11), t=t)
    assert wrong.cfm.item() < -0.1
    # the exact target: flow loss 0, CFM = minus the mean squared gap to the rolled target
    exact = training_losses(TargetModel(x0, 0), x0, y, None, None, cfg,
                            generator=torch.Generator().manual_seed(11), t=t)
    assert exact.v.item() < 1e-9
    assert exact.cfm.item() == pytest.approx(-rolled.v.item(), rel=1e-5)
    assert exact.total.item() == pytest.approx(0.05 * exact.cfm.item(), rel=1e-5)
    assert exact.cls.item() == 0 and exact.proj.item() == 0


def test_linear_cfm_weighting_multiplies_by_t():
    x0, y, tc, tt, zs, b = _inputs()
    t = torch.tensor([0.2, 0.5, 0.8])
    uni = training_losses(StandIn(zs, b=b), x0, y, tc, tt, ObjectiveConfig(cfm_weighting="uniform"),
                          generator=torch.Generator().manual_seed(11), t=t)
    lin = training_losses(StandIn(zs, b=b), x0, y, tc, tt, ObjectiveConfig(cfm_weighting="linear"),
                          generator=torch.Generator().manual_seed(11), t=t)
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(B, C, H, W, generator=g)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    sq_per_sample = ((0.5 * xt + b - torch.roll(eps - x0, 1, 0)) ** 2).mean(dim=(1, 2, 3))
    assert uni.cfm.item() == pytest.approx(-sq_per_sample.mean().item(), rel=1e-5)
    assert lin.cfm.item() == pytest.approx(-(sq_per_sample * t).mean().item(), rel=1e-5)
    assert lin.v.item() == pytest.approx(uni.v.item(), rel=1e-6)   # only CFM is weighted
    # a constant t is a plain factor
    same = torch.full((B,), 0.4)
    uni4 = training_losses(StandIn(zs, b=b), x0, y, tc, tt, ObjectiveConfig(cfm_weighting="uniform"), t=same,
                           generator=torch.Generator().manual_seed(12))
    lin4 = training_losses(StandIn(zs, b=b), x0, y, tc, tt, ObjectiveConfig(cfm_weighting="linear"), t=same,
                           generator=torch.Generator().manual_seed(12))
    assert lin4.cfm.item() == pytest.approx(0.4 * uni4.cfm.item(), rel=1e-6)


def test_repa_target_with_and_without_class_token():
    x0, y, tc, tt, _, b = _inputs()
    target_cls = torch.cat([tc[:, None], tt], dim=1)
    # projector outputs equal to the target (any positive scale): cosine 1 everywhere -> -1
    terms = training_losses(StandIn([3.0 * target_cls, target_cls]), x0, y, tc, tt, ObjectiveConfig())
    assert terms.proj.item() == pytest.approx(-1.0, abs=1e-6)
    # opposite vectors: +1; averaged with the aligned projector: 0
    terms = training_losses(StandIn([-target_cls, target_cls]), x0, y, tc, tt, ObjectiveConfig())
    assert terms.proj.item() == pytest.approx(0.0, abs=1e-6)
    # a model without class token aligns the patch tokens alone and gets no cls input
    no_cls = StandIn([tt.clone()], class_token=False)
    cfg = ObjectiveConfig(cls_coeff=0.0)
    terms = training_losses(no_cls, x0, y, tc, tt, cfg)
    assert terms.proj.item() == pytest.approx(-1.0, abs=1e-6)
    assert no_cls.calls[0]["cls_token"] is None and terms.cls.item() == 0
    # a wrong token count is an error that says what to check
    with pytest.raises(ValueError, match="projector 0"):
        training_losses(StandIn([tt.clone()]), x0, y, tc, tt, ObjectiveConfig())
    assert repa_loss([], tt).item() == 0


def test_coefficients_and_switched_off_terms():
    x0, y, tc, tt, zs, b = _inputs()
    base = dict(generator=None, t=torch.tensor([0.25, 0.5, 0.75]))
    torch.manual_seed(0)
    ref = training_losses(StandIn(zs, b=b), x0, y, tc, tt, ObjectiveConfig(), **base)
    for coeffs in [dict(cls_coeff=0.0), dict(proj_coeff=0.0), dict(cfm_coeff=0.0),
                   dict(cls_coeff=1.0, proj_coeff=2.0, cfm_coeff=0.5)]:
        torch.manual_seed(0)
        cfg = dataclasses.replace(ObjectiveConfig(), **coeffs)
        out = training_losses(StandIn(zs, b=b), x0, y, tc, tt, cfg, **base)
        assert out.v.item() == pytest.approx(ref.v.item(), rel=1e-6)
        expected = out.v + cfg.cls_coeff * out.cls + cfg.proj_coeff * out.proj + cfg.cfm_coeff * out.cfm
        assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_reproducible_with_generator_and_gradients_flow():
    x0, y, tc, tt, zs, b = _inputs()

    class Linear(StandIn):
        def __init__(self):
            super().__init__(zs, b=b)
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t, y, cls_token=None, **kw):
            out = super().forward(x, t, y, cls_token, **kw)
            return FakeOutput(self.w * out.velocity, [self.w * z for z in out.zs], self.w * out.cls_velocity)

    model = Linear()
    a = training_losses(model, x0, y, tc, tt, ObjectiveConfig(), generator=torch.Generator().manual_seed(5))
    a2 = training_losses(model, x0, y, tc, tt, ObjectiveConfig(), generator=torch.Generator().manual_seed(5))
    c = training_losses(model, x0, y, tc, tt, ObjectiveConfig(), generator=torch.Generator().manual_seed(6))
    assert a.scalars() == a2.scalars() and a.v.item() != c.v.item()
    a.total.backward()
    assert model.w.grad is not None and model.w.grad.abs().item() > 0


def test_clear_errors():
    x0, y, tc, tt, zs, b = _inputs()
    with pytest.raises(ValueError, match="teacher_cls is None"):
        training_losses(StandIn(zs), x0, y, None, tt, ObjectiveConfig())
    with pytest.raises(ValueError, match="teacher_tokens"):
        training_losses(StandIn(zs), x0, y, tc, None, ObjectiveConfig())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        training_losses(StandIn(zs), x0[0], y, tc, tt, ObjectiveConfig())


# --------------------------------------------------------------------------------------------
# with the real tiny model
# --------------------------------------------------------------------------------------------

def _real_tiny_model(overrides=None):
    models = pytest.importorskip("srdit.models", reason="srdit.models is not written yet")
    if not hasattr(models, "build_model"):
        pytest.skip("srdit.models.build_model is not written yet")
    from srdit.config import get_config
    cfg = get_config("demo_srdit", overrides=overrides)
    torch.manual_seed(0)
    return cfg, models.build_model(cfg.model)


@pytest.mark.parametrize("class_token", [True, False])
def test_losses_with_the_real_tiny_model(class_token):
    overrides = None if class_token else {"model": {"class_token": False}, "objective": {"cls_coeff": 0.0}}
    cfg, model = _real_tiny_model(overrides)
    model.train()
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    batch = 4
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (batch,), generator=g)
    n_patches = (m.input_size // m.patch_size) ** 2
    teacher_cls = torch.randn(batch, m.cls_token_dim, generator=g)
    teacher_tokens = torch.randn(batch, n_patches, m.cls_token_dim, generator=g)
    terms = training_losses(model, x0, y, teacher_cls, teacher_tokens, cfg.objective,
                            generator=torch.Generator().manual_seed(1), path_drop=False,
                            drop_labels=torch.zeros(batch, dtype=torch.bool))
    values = terms.scalars()
    assert all(math.isfinite(v) for v in values.values())
    assert values["v"] > 0 and -1 <= values["proj"] <= 1 and values["cfm"] < 0
    assert (values["cls"] > 0) == class_token
    o = cfg.objective
    expected = values["v"] + o.cls_coeff * values["cls"] + o.proj_coeff * values["proj"] + o.cfm_coeff * values["cfm"]
    assert values["total"] == pytest.approx(expected, rel=1e-5)
    terms.total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
