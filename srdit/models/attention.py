"""Self-attention with the SR-DiT additions, and the adaLN-Zero transformer block.

Order inside attention (as in the reference): qkv -> keep the raw v (block 0's is the
value-residual source) -> QK-RMSNorm -> value residual -> RoPE on q and k -> SDPA -> proj.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srdit.models.layers import block_norm, build_mlp, modulate
from srdit.models.tables import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, value_residual: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # eps=None: the machine epsilon of the dtype the norm runs in, like the reference
        self.q_norm = nn.RMSNorm(self.head_dim, eps=None) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=None) if qk_norm else None
        self.value_residual = value_residual
        if value_residual == "scalar":
            # v <- lambda v_block0 + (1 - lambda) v, one unconstrained scalar per block
            self.v1_lambda = nn.Parameter(torch.tensor(0.5))
        elif value_residual == "linear":
            # v <- Linear([v_block0 ; v]) per head (weights shared across heads)
            self.v_fusion = nn.Linear(2 * self.head_dim, self.head_dim)
        elif value_residual != "none":
            raise ValueError(f"model.value_residual: unknown mode {value_residual!r}; "
                             f"allowed: 'none', 'scalar', 'linear'")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                v1: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D); rope = (cos, sin) broadcastable to (B, heads, N, d) or None; v1 block 0's
        raw values (B, heads, N, d) at the same tokens, or None. Returns (output, raw v)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v_raw = v
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if v1 is not None and self.value_residual == "scalar":
            v = self.v1_lambda * v1 + (1.0 - self.v1_lambda) * v
        elif v1 is not None and self.value_residual == "linear":
            v = self.v_fusion(torch.cat([v1, v], dim=-1))
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D)), v_raw


class Block(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(norm(x))); x += g2 * MLP(mod(norm(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_act: str, norm: str,
                 qk_norm: bool, value_residual: str):
        super().__init__()
        self.norm1 = block_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm, value_residual)
        self.norm2 = block_norm(norm, dim)
        self.mlp = build_mlp(dim, mlp_ratio, mlp_act)
        # shift/scale/gate for attention, then shift/scale/gate for the MLP
        self.adaln = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                v1: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(F.silu(c)).chunk(6, dim=-1)
        attn_out, v_raw = self.attn(modulate(self.norm1(x), shift1, scale1), rope, v1)
        x = x + gate1.unsqueeze(1) * attn_out
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, v_raw
