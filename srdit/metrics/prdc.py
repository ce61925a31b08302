"""Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes them.

Each set's manifold is the union of balls around its points whose radius is the distance to the
k-th nearest neighbour within the set (k = 3; the point itself is neighbour 0). Precision is the
fraction of samples inside the reference manifold, recall the fraction of reference points
inside the sample manifold. All distances are squared Euclidean on pool_3 features.

ADM computes each distance block in float16 and falls back to float32 only when a block
overflows; the float16 rounding decides some borderline comparisons, so by default we quantise
the same way (inputs rounded to float16, distances rounded to float16). `adm_fp16=False`
gives plain float32.
"""
from __future__ import annotations

import numpy as np
import torch


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, adm_fp16: bool = True) -> torch.Tensor:
    """(len(u), len(v)) squared distances, float32, quantised like ADM's float16 block."""
    def block(a, b):
        d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
        return d.clamp_min(0.0)

    u32, v32 = u.float(), v.float()
    if adm_fp16:
        d16 = block(u32.half().float(), v32.half().float()).half()
        if torch.isfinite(d16).all():
            return d16.float()
    return block(u32, v32)


def manifold_radii(features: np.ndarray, k: int = 3, row_batch: int = 1000, device: str | torch.device = "cpu",
                   adm_fp16: bool = True) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in the set (self excluded)."""
    feats = torch.as_tensor(np.asarray(features, np.float32), device=device)
    if len(feats) <= k:
        raise ValueError(f"manifold radii with k = {k} need more than {k} points; got {len(feats)}")
    radii = []
    for start in range(0, len(feats), row_batch):
        d = pairwise_sq_distances(feats[start:start + row_batch], feats, adm_fp16)
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)    # k + 1: the point itself is the nearest
    return torch.cat(radii).cpu().numpy()


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, row_batch: int = 1000,
                     device: str | torch.device = "cpu", adm_fp16: bool = True) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` features (N, D)."""
    ref = torch.as_tensor(np.asarray(reference, np.float32), device=device)
    gen = torch.as_tensor(np.asarray(samples, np.float32), device=device)
    ref_radii = torch.as_tensor(manifold_radii(reference, k, row_batch, device, adm_fp16), device=device)
    gen_radii = torch.as_tensor(manifold_radii(samples, k, row_batch, device, adm_fp16), device=device)
    gen_inside = torch.zeros(len(gen), dtype=torch.bool, device=device)   # sample within some reference ball
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)   # reference within some sample ball
    for start in range(0, len(ref), row_batch):
        d = pairwise_sq_distances(ref[start:start + row_batch], gen, adm_fp16)   # (r, n_gen)
        ref_inside[start:start + row_batch] = (d <= gen_radii[None, :]).any(dim=1)
        gen_inside |= (d <= ref_radii[start:start + row_batch, None]).any(dim=0)
    return float(gen_inside.double().mean()), float(ref_inside.double().mean())
