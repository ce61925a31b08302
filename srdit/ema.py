"""Exponential moving average of the model weights, kept in fp32 outside DeepSpeed.

ema <- decay * ema + (1 - decay) * theta after every optimizer step, no warm-up, starting as a
copy of the initial weights (docs/recipe.md 2.14). With ZeRO stage 1 or 2 the module's parameters
are whole and identical on every rank after the step (only the optimizer state and gradients
are partitioned), so each rank can update its own EMA without communication; rank 0's copy is
the one written to disk. The EMA covers the whole `state_dict` (parameters and buffers), so the
EMA weights load into a fresh model with `load_state_dict`, strictly.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).clone()
            for name, t in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the model's current weights (call after each optimizer step)."""
        floats_ema, floats_src = [], []
        for name, t in _named_tensors(model):
            ema = self.shadow.get(name)
            if ema is None:                          # a non-persistent buffer: not in state_dict
                continue
            if ema.is_floating_point():
                floats_ema.append(ema)
                floats_src.append(t.detach().to(ema.dtype))
            else:                                    # integer buffers (counters) are copied
                ema.copy_(t)
        if floats_ema:
            # lerp: ema + (1 - decay) * (theta - ema), one fused kernel over all tensors
            torch._foreach_lerp_(floats_ema, floats_src, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; was it written for another model config?")
        for name, t in state.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name}: checkpoint shape {tuple(t.shape)} != model "
                                 f"shape {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(t)

    def to(self, device) -> "EMA":
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self


def _named_tensors(model: nn.Module):
    """The model's state_dict tensors by name, without building a state_dict every step."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        seen.add(name)
        yield name, p
    for name, b in model.named_buffers(remove_duplicate=True):
        if name not in seen:
            yield name, b
