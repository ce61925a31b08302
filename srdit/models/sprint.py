"""SPRINT token routing: which tokens the sparse middle blocks see, and how their output is
padded back and fused with the dense encoder output.

Training: each sample keeps its own random subset of the T tokens (class token included and
droppable): the first `keep` entries of the argsort of uniform noise, left unsorted. The middle
blocks run on those tokens only (their RoPE positions and block-0 values gathered at the same
indices); their output is scattered back into a T-long sequence whose other positions hold the
learnable mask token; fusion = Linear([encoder output ; padded middle output]) with no residual.
"""
from __future__ import annotations

import torch
from torch import nn


def num_kept_tokens(num_tokens: int, drop_ratio: float) -> int:
    """keep = max(1, int(T * (1 - drop_ratio))); T counts the class token (257 -> 64 at 0.75)."""
    return max(1, int(num_tokens * (1.0 - drop_ratio)))


def draw_keep_indices(batch: int, num_tokens: int, drop_ratio: float, device: torch.device,
                      generator: torch.Generator | None = None) -> torch.Tensor | None:
    """(B, keep) int64 random kept indices, or None when nothing would be dropped."""
    keep = num_kept_tokens(num_tokens, drop_ratio)
    if drop_ratio <= 0.0 or keep >= num_tokens:
        return None
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return torch.argsort(noise, dim=1)[:, :keep]


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, keep, D) at ids_keep (in that order)."""
    return x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_values(v: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Block-0 values (B, heads, T, d) -> (B, heads, keep, d) at ids_keep."""
    index = ids_keep[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[-1])
    return v.gather(2, index)


def gather_rope(table: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Token-indexed RoPE table (T, d) -> (B, 1, keep, d) for the kept tokens."""
    return table[ids_keep].unsqueeze(1)


class SprintFusion(nn.Module):
    """The mask token and the fusion projection."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.fusion = nn.Linear(2 * hidden_size, hidden_size)

    def mask_sequence(self, batch: int, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        return self.mask_token.to(dtype).expand(batch, num_tokens, -1)

    def pad(self, x_sparse: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(B, keep, D) middle output -> (B, T, D) with the mask token at every dropped position."""
        B, _, D = x_sparse.shape
        base = self.mask_sequence(B, num_tokens, x_sparse.dtype)
        return base.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x_sparse)

    def drop_path(self, g_pad: torch.Tensor) -> torch.Tensor:
        """Replace the padded middle output by the mask token, as `g * 0 + mask` so that every
        middle-block parameter stays in the graph (DDP / ZeRO expect a gradient for each)."""
        return g_pad * 0.0 + self.mask_token.to(g_pad.dtype)

    def forward(self, x_encoder: torch.Tensor, g_pad: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([x_encoder, g_pad], dim=-1))
