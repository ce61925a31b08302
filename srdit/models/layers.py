"""Small building blocks: embedders (patch, timestep, label, REG class token), the block norm,
the MLP variants, the REPA projector and the final layer."""
from __future__ import annotations

import torch
from torch import nn

from srdit.models.tables import timestep_sinusoid

NORM_EPS = 1e-6


def block_norm(kind: str, dim: int) -> nn.Module:
    """The norm in front of attention / MLP / final layer: no affine, eps 1e-6 (adaLN supplies scale and shift)."""
    if kind == "rms":
        return nn.RMSNorm(dim, eps=NORM_EPS, elementwise_affine=False)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
    raise ValueError(f"model.norm: unknown norm {kind!r}; allowed: 'layer', 'rms'")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with per-sample (B, D) scale and shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """(B, C, H, W) latent -> (B, HW/p^2, D) tokens, row-major, by a stride-p convolution."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Continuous t in [0, 1] -> 256-d [cos | sin] sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.fc1 = nn.Linear(frequency_dim, hidden_size)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_sinusoid(t, self.frequency_dim).to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(freq)))


class LabelEmbedder(nn.Module):
    """Class label -> vector. The table has num_classes + 1 rows: row num_classes is the null
    label that label dropout switches to (this is what classifier-free guidance needs)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


class ClassTokenEmbedder(nn.Module):
    """REG: the noisy teacher CLS vector (B, Z) -> Linear(Z -> D) -> affine norm -> token 0.

    The norm keeps its gain (and, for LayerNorm, its bias) in both norm variants, as the
    reference code does (RMSNorm in SR-DiT, LayerNorm in the REG baseline)."""

    def __init__(self, cls_token_dim: int, hidden_size: int, norm: str):
        super().__init__()
        self.proj = nn.Linear(cls_token_dim, hidden_size)
        if norm == "rms":
            self.norm = nn.RMSNorm(hidden_size, eps=NORM_EPS, elementwise_affine=True)
        else:
            self.norm = nn.LayerNorm(hidden_size, eps=NORM_EPS, elementwise_affine=True)

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(cls_token))


# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------

class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class Mlp(nn.Module):
    """fc1 -> activation (GELU-tanh or ReLU^2) -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh") if act == "gelu_tanh" else SquaredReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w12 (fused gate and value projections) -> silu(gate) * value -> w3.

    The hidden width is int(2/3 * int(D * mlp_ratio)), which keeps the parameter count of the
    GELU MLP (the reference uses xformers' SwiGLU with this width)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(gate) * value)


def mlp_hidden_width(hidden_size: int, mlp_ratio: float, act: str) -> int:
    width = int(hidden_size * mlp_ratio)
    return int(2 / 3 * width) if act == "swiglu" else width


def build_mlp(hidden_size: int, mlp_ratio: float, act: str) -> nn.Module:
    hidden = mlp_hidden_width(hidden_size, mlp_ratio, act)
    if act == "swiglu":
        return SwiGLU(hidden_size, hidden)
    if act in ("gelu_tanh", "relu2"):
        return Mlp(hidden_size, hidden, act)
    raise ValueError(f"model.mlp_act: unknown activation {act!r}; allowed: 'gelu_tanh', 'swiglu', 'relu2'")


class Projector(nn.Module):
    """REPA projector, applied per token: D -> P -> SiLU -> P -> SiLU -> z."""

    def __init__(self, hidden_size: int, projector_dim: int, z_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, projector_dim)
        self.fc2 = nn.Linear(projector_dim, projector_dim)
        self.fc3 = nn.Linear(projector_dim, z_dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


# --------------------------------------------------------------------------------------------
# Final layer
# --------------------------------------------------------------------------------------------

class FinalLayer(nn.Module):
    """norm -> adaLN (shift, scale) -> per-token latent output; token 0 -> class-token velocity."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str,
                 cls_token_dim: int | None):
        super().__init__()
        self.norm = block_norm(norm, hidden_size)
        self.adaln = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.cls_out = nn.Linear(hidden_size, cls_token_dim) if cls_token_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift, scale = self.adaln(nn.functional.silu(c)).chunk(2, dim=-1)
        x = modulate(self.norm(x), shift, scale)
        if self.cls_out is None:
            return self.out(x), None
        return self.out(x[:, 1:]), self.cls_out(x[:, 0])
