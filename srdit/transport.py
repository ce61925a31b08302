"""The training objective: linear interpolant, time sampling and shift, and the four loss terms.

Conventions (docs/recipe.md 2.1): x_t = (1 - t) x0 + t eps, so t = 1 is pure noise and t = 0 is data;
the model predicts the velocity v* = eps - x0. The loss is

    total = L_v + cls_coeff * L_cls + proj_coeff * L_proj + cfm_coeff * L_cfm

- L_v    flow matching: squared error, mean over (C, H, W), then over the batch (no weighting);
- L_cls  REG class-token flow (2.4): the teacher CLS token c0 follows the same path with the same t
         and its own noise eps_c; target eps_c - c0; squared error, mean over dims, then batch;
- L_proj REPA (2.5): minus the cosine between each projector output and the teacher tokens
         (CLS row first when the model has a class token), mean over tokens, then batch, then
         averaged over the projectors; it lies in [-1, 1];
- L_cfm  contrastive flow matching (2.11): minus the squared distance to the previous sample's
         target, torch.roll(v*, 1, dims=0); `linear` weighting multiplies each sample's squared
         error by its t before the mean (TCFM).

Every random draw goes through an optional `torch.Generator`, in a fixed order (t, eps, eps_c),
so that a training step is reproducible from (seed, step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from srdit.config import ObjectiveConfig


# --------------------------------------------------------------------------------------------
# Time: distribution and shift
# --------------------------------------------------------------------------------------------

def shift_factor(latent_shape: Sequence[int], base: float = 4096) -> float:
    """s = sqrt(C*H*W / base): sqrt(2) for 32x16x16 latents, sqrt(8) for 32x32x32."""
    if len(latent_shape) != 3:
        raise ValueError(f"shift_factor: latent_shape must be (C, H, W), got {tuple(latent_shape)}")
    if base <= 0:
        raise ValueError(f"shift_factor: base must be > 0, got {base}")
    return math.sqrt(math.prod(int(d) for d in latent_shape) / base)


def time_shift(t, s: float):
    """t' = s t / (1 + (s - 1) t), clamped to [0, 1]. s > 1 moves mass towards noise (t = 1).

    Works on floats and tensors (any dtype); 0 and 1 are fixed points.
    """
    shifted = s * t / (1 + (s - 1) * t)
    if isinstance(shifted, Tensor):
        return shifted.clamp(0.0, 1.0)
    return min(max(shifted, 0.0), 1.0)


def _draw(kind: str, shape: tuple[int, ...], generator: torch.Generator | None,
          device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A draw made on the generator's device (so the numbers depend only on the generator's
    seed and state, not on where training runs), then moved to `device`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    fn = torch.rand if kind == "uniform" else torch.randn
    out = fn(shape, generator=generator, device=gen_device, dtype=dtype)
    return out.to(device) if device is not None else out


def sample_t(batch: int, objective_cfg: ObjectiveConfig, latent_shape: Sequence[int],
             generator: torch.Generator | None = None, device=None) -> Tensor:
    """Training times t (batch,) float32 in [0, 1]: uniform or logit-normal(0, 1), then the
    time shift when `objective_cfg.time_shift` is on."""
    if objective_cfg.t_dist == "uniform":
        t = _draw("uniform", (batch,), generator, device)
    elif objective_cfg.t_dist == "logit_normal":
        t = torch.sigmoid(_draw("normal", (batch,), generator, device))
    else:
        raise ValueError(f"objective.t_dist: unknown {objective_cfg.t_dist!r}; allowed: uniform, logit_normal")
    if objective_cfg.time_shift:
        t = time_shift(t, shift_factor(latent_shape, objective_cfg.shift_base))
    return t


# --------------------------------------------------------------------------------------------
# The path: where x_t lies and the velocity the model learns (the samplers assume both)
# --------------------------------------------------------------------------------------------

def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps: data at t = 0, noise at t = 1 (t broadcasts against x0)."""
    return (1 - t) * x0 + t * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The training target v* = dx_t/dt = eps - x0."""
    return eps - x0


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------

@dataclass
class LossTerms:
    """Scalar loss tensors (total carries the gradient) and the times used, for logging."""
    total: Tensor
    v: Tensor
    cls: Tensor
    proj: Tensor
    cfm: Tensor
    t: Tensor          # (B,) the (shifted) times the model saw, detached

    def scalars(self) -> dict[str, float]:
        """Plain floats of the scalar terms (one device sync), e.g. for metrics.jsonl."""
        names = [f.name for f in fields(self) if f.name != "t"]
        values = torch.stack([getattr(self, n).detach().float() for n in names]).cpu().tolist()
        return dict(zip(names, values))


def _unwrap(model):
    """The bare module under DDP / DeepSpeed / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def model_has_class_token(model) -> bool | None:
    """Whether the model takes a REG class token, read from its config; None when unknown."""
    bare = _unwrap(model)
    flag = getattr(bare, "class_token", None)
    if isinstance(flag, bool):
        return flag
    for name in ("cfg", "config", "model_cfg"):
        flag = getattr(getattr(bare, name, None), "class_token", None)
        if isinstance(flag, bool):
            return flag
    return None


def repa_loss(zs: Sequence[Tensor], target: Tensor) -> Tensor:
    """Minus the mean cosine similarity between each projector output (B, T, D) and the teacher
    target (B, T, D): mean over tokens, then batch, then projectors."""
    if not zs:
        return target.new_zeros((), dtype=torch.float32)
    target = F.normalize(target.float(), dim=-1)
    per_projector = []
    for j, z in enumerate(zs):
        if z.shape != target.shape:
            raise ValueError(f"REPA: projector {j} output has shape {tuple(z.shape)} but the teacher "
                             f"target has {tuple(target.shape)}; the token count and width must match "
                             f"(check data.teacher against model.cls_token_dim and the latent grid)")
        cos = (F.normalize(z.float(), dim=-1) * target).sum(dim=-1)      # (B, T)
        per_projector.append(-cos.mean(dim=1).mean(dim=0))
    return torch.stack(per_projector).mean()


def draw_noise(batch: int, objective_cfg: ObjectiveConfig, latent_shape: Sequence[int], cls_dim: int | None,
               generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(t, eps, eps_c): the draws `training_losses` would make from `generator`, in its order
    (eps_c only when `cls_dim`, the width of the REG class token, is given)."""
    t = sample_t(batch, objective_cfg, latent_shape, generator, device)
    eps = _draw("normal", (batch, *latent_shape), generator, device)
    eps_c = _draw("normal", (batch, int(cls_dim)), generator, device) if cls_dim else None
    return t, eps, eps_c


def training_losses(model, x0: Tensor, y: Tensor, teacher_cls: Tensor | None,
                    teacher_tokens: Tensor | None, objective_cfg: ObjectiveConfig, *,
                    generator: torch.Generator | None = None, path_drop: bool | None = None,
                    ids_keep: Tensor | None = None, drop_labels: Tensor | None = None,
                    t: Tensor | None = None, noise: tuple[Tensor, Tensor | None] | None = None) -> LossTerms:
    """One forward pass and every loss term.

    x0 (B,C,H,W) scaled latents; y (B,) labels; teacher_cls (B,Z) the raw teacher CLS token (the
    REG c0, required when the model has a class token); teacher_tokens (B,N,D) the teacher patch
    tokens (required when proj_coeff > 0). `path_drop`, `ids_keep`, `drop_labels` pass through to
    the model (SPRINT and label dropout happen inside it). `t` (B,) overrides the time draw and
    `noise` = (eps, eps_c) the noise draws (see `draw_noise`: a compiled step gets every random
    number as an input). Draw order from `generator`: t (unless given), eps (B,C,H,W), eps_c (B,Z).
    """
    o = objective_cfg
    if o.path != "linear":
        raise ValueError(f"objective.path: only 'linear' is implemented, got {o.path!r}")
    if x0.ndim != 4:
        raise ValueError(f"training_losses: x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    batch, device = x0.shape[0], x0.device
    x0 = x0.float()

    uses_cls = model_has_class_token(model)
    if uses_cls is None:                      # a model that does not say: trust the inputs
        uses_cls = teacher_cls is not None
    if uses_cls and teacher_cls is None:
        raise ValueError("training_losses: the model has a REG class token but teacher_cls is None; "
                         "cache teacher features (data.cache_teacher) or set model.class_token: false")

    if t is None:
        t = sample_t(batch, o, x0.shape[1:], generator, device)
    t = t.to(device=device, dtype=torch.float32)
    t_img = t.view(batch, 1, 1, 1)
    eps = _draw("normal", tuple(x0.shape), generator, device) if noise is None else noise[0].to(device)
    x_t = interpolate(x0, eps, t_img)
    v_target = velocity_target(x0, eps)

    cls_t = cls_target = None
    if uses_cls:
        c0 = teacher_cls.to(device=device, dtype=torch.float32)
        eps_c = _draw("normal", tuple(c0.shape), generator, device) if noise is None else noise[1].to(device)
        t_cls = t.view(batch, 1)
        cls_t = interpolate(c0, eps_c, t_cls)
        cls_target = velocity_target(c0, eps_c)

    out = model(x_t, t, y, cls_t, ids_keep=ids_keep, path_drop=path_drop, drop_labels=drop_labels)
    v_pred = out.velocity.float()
    if v_pred.shape != v_target.shape:
        raise ValueError(f"training_losses: model velocity has shape {tuple(v_pred.shape)}, "
                         f"expected {tuple(v_target.shape)} (the latent shape)")

    zero = x0.new_zeros(())
    loss_v = ((v_pred - v_target) ** 2).mean(dim=(1, 2, 3)).mean()

    loss_cls = zero
    if uses_cls:
        if out.cls_velocity is None:
            raise ValueError("training_losses: the model took a class token but returned no cls_velocity")
        loss_cls = ((out.cls_velocity.float() - cls_target) ** 2).mean(dim=1).mean()

    loss_proj = zero
    if o.proj_coeff > 0 or (teacher_tokens is not None and out.zs):
        if teacher_tokens is None:
            raise ValueError("training_losses: objective.proj_coeff > 0 needs teacher_tokens (B, N, D); "
                             "cache teacher features (data.cache_teacher) or set objective.proj_coeff: 0")
        target = teacher_tokens.to(device=device, dtype=torch.float32)
        if uses_cls:      # the class token is row 0 of the student sequence: align it with the CLS
            target = torch.cat([teacher_cls.to(device=device, dtype=torch.float32)[:, None], target], dim=1)
        loss_proj = repa_loss(list(out.zs), target)

    # CFM: push away from the previous sample's target (the class is not checked, as in the paper)
    v_negative = torch.roll(v_target, shifts=1, dims=0)
    sq = (v_pred - v_negative) ** 2
    if o.cfm_weighting == "linear":
        sq = sq * t_img
    loss_cfm = -sq.mean()

    total = loss_v
    for coeff, term in ((o.cls_coeff, loss_cls), (o.proj_coeff, loss_proj), (o.cfm_coeff, loss_cfm)):
        if coeff != 0:    # a switched-off term stays out of the graph
            total = total + coeff * term
    return LossTerms(total=total, v=loss_v, cls=loss_cls, proj=loss_proj, cfm=loss_cfm, t=t.detach())
