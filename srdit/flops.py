"""FLOP count of a training step, for the MFU estimate in metrics.jsonl and the benchmark.

How FLOPs are counted (the nanoGPT / PaLM convention):
- only matrix multiplications, 2 FLOPs per multiply-add; norms, activations, RoPE, softmax,
  the loss and the optimizer are left out (a few percent);
- per token and block: q, k, v and the output projection 2 * 4 D^2, the MLP 2 * 2 * D * H
  (H = mlp_ratio * D; SwiGLU's three matrices of width 2H/3 cost the same); attention scores
  and the weighted sum 2 * 2 * n * D for a sequence of n tokens;
- per image and block: the adaLN modulation Linear(D -> 6D) on the conditioning vector;
- SPRINT: the encoder and decoder blocks see all T tokens, the middle blocks only the kept
  max(1, int(T * (1 - drop_ratio))) tokens, plus the fusion Linear(2D -> D) on T tokens;
- the patch embedding, the final layer, the class-token input/output, the timestep MLP and the
  REPA projectors (D -> P -> P -> Z per token);
- training = 3 x forward (the backward pass costs twice the forward).
The frozen teacher, when it runs online (no cached features), is counted separately
(forward only) and is not part of the MFU.

MFU = (images/s x training FLOPs per image) / (number of GPUs x peak dense bf16 FLOP/s). The
peak comes from the GPU's name (table below) or SRDIT_PEAK_TFLOPS; on the CPU, or for an unknown
GPU, it is unknown and MFU is reported as null.
"""
from __future__ import annotations

import os

from srdit.config import ModelConfig

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,            # SXM
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "RTX 4090": 165.2,
}

# DINOv2 ViTs at 224 px (16 x 16 patches + CLS = 257 tokens), as (depth, width).
TEACHER_SHAPES = {"dinov2_vits14": (12, 384), "dinov2_vitb14": (12, 768), "dinov2_vitl14": (24, 1024)}


def _block_flops(tokens: int, d: int, h: int) -> float:
    linear = 2 * tokens * (4 * d * d + 2 * d * h)
    attention = 2 * 2 * tokens * tokens * d
    adaln = 2 * d * 6 * d
    return linear + attention + adaln


def forward_flops_per_image(m: ModelConfig) -> dict[str, float]:
    """Matmul FLOPs of one image's forward pass in training mode, by component."""
    d, grid = m.hidden_size, m.grid_size
    patches = grid * grid
    tokens = m.num_tokens
    h = int(m.mlp_ratio * d)
    out: dict[str, float] = {}
    out["embed"] = 2 * patches * m.in_channels * m.patch_size ** 2 * d + 2 * (256 * d + d * d)
    if m.class_token:
        out["embed"] += 2 * m.cls_token_dim * d
    sp = m.sprint
    if sp.enabled:
        keep = max(1, int(tokens * (1 - sp.drop_ratio)))
        dense = sp.encoder_depth + sp.decoder_depth
        out["blocks"] = dense * _block_flops(tokens, d, h) + (m.depth - dense) * _block_flops(keep, d, h)
        out["fusion"] = 2 * tokens * 2 * d * d
    else:
        out["blocks"] = m.depth * _block_flops(tokens, d, h)
    p, z = m.projector_dim, m.cls_token_dim
    out["projectors"] = len(m.align_depths) * 2 * tokens * (d * p + p * p + p * z)
    out["final"] = 2 * patches * d * m.patch_size ** 2 * m.in_channels + 2 * d * 2 * d
    if m.class_token:
        out["final"] += 2 * d * m.cls_token_dim
    out["total"] = sum(out.values())
    return out


def train_flops_per_image(m: ModelConfig) -> float:
    return 3.0 * forward_flops_per_image(m)["total"]


def teacher_flops_per_image(teacher: str) -> float:
    """Forward matmul FLOPs of the DINOv2 teacher at 224 px (when features are not cached)."""
    depth, d = TEACHER_SHAPES[teacher]
    tokens = 257
    return depth * (2 * tokens * (4 * d * d + 2 * d * 4 * d) + 4 * tokens * tokens * d) + 2 * 256 * 3 * 14 * 14 * d


def peak_flops_per_device(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, from SRDIT_PEAK_TFLOPS or the name table."""
    override = os.environ.get("SRDIT_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):   # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def mfu(images_per_s: float, flops_per_image: float, num_devices: int, peak_per_device: float | None) -> float | None:
    if not peak_per_device or images_per_s <= 0:
        return None
    return images_per_s * flops_per_image / (num_devices * peak_per_device)
