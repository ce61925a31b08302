"""Fixed tables: the 2D sin-cos absolute position embedding, the 2D axial RoPE tables and the
timestep sinusoid.

Each is computed the way the reference computes it, in the same precision, because the golden
outputs of `srdit check-reference` see the last bits: the sin-cos table in float64 numpy (then
float32), the RoPE tables in float32 torch arithmetic, the timestep sinusoid in float32 whatever
the model's dtype.
"""
from __future__ import annotations

import math

import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# 2D sin-cos absolute position embedding (MAE style)
# --------------------------------------------------------------------------------------------

def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(p * w_k) | cos(p * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, leading_zero_rows: int = 0) -> torch.Tensor:
    """The frozen absolute table, (leading_zero_rows + grid_size**2, dim) float32.

    Tokens are row-major (row i, column j). As in MAE, the first half of the channels encodes
    the column index j and the second half the row index i; a class token gets an all-zero row.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32), indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    if leading_zero_rows:
        table = np.concatenate([np.zeros((leading_zero_rows, dim)), table], axis=0)
    return torch.from_numpy(table).float()


# --------------------------------------------------------------------------------------------
# 2D axial RoPE (EVA-02 style)
# --------------------------------------------------------------------------------------------

def rope_tables_2d(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (grid_size**2, head_dim) float32, one row per row-major patch.

    The first half of the head dims rotates with the row index, the second half with the column
    index. Within each half, frequency k = theta^(-2k / (head_dim/2)) is repeated for the two
    members of an adjacent pair (dims 2k, 2k+1). Computed in float32 like the reference (EVA-02's
    `VisionRotaryEmbeddingFast` with dim = head_dim / 2 and pt_seq_len = grid side), always on
    the CPU so every device starts from the same bits.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4 (pairs, half per axis), got {head_dim}")
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, device="cpu")[: axis_dim // 2].float() / axis_dim
    inv_freq = 1.0 / (theta ** exponents)
    # arange / n * n, kept as the reference writes it: it is not always the exact integer in float32
    positions = torch.arange(grid_size, dtype=torch.float32, device="cpu") / grid_size * grid_size
    angles = torch.outer(positions, inv_freq).repeat_interleave(2, dim=-1)     # (S, axis_dim)
    row_part = angles[:, None, :].expand(grid_size, grid_size, axis_dim)
    col_part = angles[None, :, :].expand(grid_size, grid_size, axis_dim)
    full = torch.cat([row_part, col_part], dim=-1).reshape(grid_size * grid_size, head_dim)
    return full.cos(), full.sin()


def rotate_adjacent_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the 90-degree turn of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs.unbind(-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, heads, N, d) by per-token tables broadcastable to it.

    The tables are cast to x's dtype at use, as the reference does (so under bf16 autocast the
    cos/sin values are bf16 too).
    """
    return x * cos.to(x.dtype) + rotate_adjacent_pairs(x) * sin.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Timestep sinusoid
# --------------------------------------------------------------------------------------------

def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) continuous t -> (B, dim) float32 [cos | sin] embedding (no x1000 scaling of t).

    Always float32, as in the reference, whatever dtype the model runs in.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
