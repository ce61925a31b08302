"""KDD: kernel distance on DINOv2 ViT-L/14 features, as dgm-eval's `kd` metric (docs/recipe.md 4.3).

Features: the normalised CLS token (1024-d) of DINOv2 ViT-L/14 (timm `vit_large_patch14_dinov2`
built for 224 px, official weights `dinov2_vitl14_pretrain.pth`). Preprocessing as dgm-eval:
PIL bicubic resize to 224 x 224 (torchvision's Resize on PIL images), /255, ImageNet mean/std.
The official position table is for a 37 x 37 grid; it is resampled to 16 x 16 exactly as the
DINOv2 hub model does at run time (bicubic, scale factor (16 + 0.1) / 37, no antialias), so the
features match `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`.

Distance: polynomial kernel k(x, y) = (x.y / d + 1)^3 and the unbiased MMD^2 estimator, over
100 subsets of m = min(1000, n_real, n_gen) real and generated features drawn without
replacement, real first then generated in each subset as dgm-eval draws them, from one numpy
RandomState(13579) (dgm-eval uses the global NumPy stream, whose position we have not verified,
so single subsets need not coincide with its; the mean over 100 subsets is what is compared).
Reported: the mean over subsets and their standard deviation (dgm-eval prints the latter as
"kd_variance"). Computed in float64 (dgm-eval: in the features' float32).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from srdit.resources import resource_path, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KDD_ARCH = "vit_large_patch14_dinov2"
KDD_RESOURCE = "dinov2_vitl14"
INPUT_SIZE = 224


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(x.y / d + 1)^degree in float64, d the feature width."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size sets x and y (m, d) with the polynomial kernel."""
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError(f"unbiased MMD^2 needs two sets of the same size >= 2; got {len(x)} and {len(y)}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_diagonal = (k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))
    return float(off_diagonal / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_distance(real: np.ndarray, generated: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 13579) -> dict:
    """Mean and std of the unbiased MMD^2 over `num_subsets` random subsets (dgm-eval's KD)."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"kernel distance needs (N, D) features of one width; got {real.shape} and {generated.shape}")
    m = min(subset_size, len(real), len(generated))
    rng = np.random.RandomState(seed)
    values = np.zeros(num_subsets)
    for i in range(num_subsets):
        r = real[rng.choice(len(real), m, replace=False)]
        g = generated[rng.choice(len(generated), m, replace=False)]
        values[i] = mmd2_unbiased(r, g)
    return {"mean": float(values.mean()), "std": float(values.std()), "subset_size": m,
            "num_subsets": num_subsets, "seed": seed, "values": values.tolist()}


# --------------------------------------------------------------------------------------------
# The feature extractor
# --------------------------------------------------------------------------------------------

def resample_dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D) as DINOv2's `interpolate_pos_encoding` does."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = int(math.isqrt(patch_pos.shape[1]))
    if m * m != patch_pos.shape[1]:
        raise ValueError(f"DINOv2 position table of {patch_pos.shape[1]} patches is not a square grid")
    if m == grid:
        return pos_embed
    scale = (grid + 0.1) / m        # DINOv2's interpolate_offset = 0.1
    out = F.interpolate(patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                        mode="bicubic", antialias=False)
    if out.shape[-2:] != (grid, grid):
        raise ValueError(f"resampled DINOv2 position grid is {tuple(out.shape[-2:])}, expected {grid} x {grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, out], dim=1)


def build_dinov2(arch: str = KDD_ARCH, weights: str | Path | None = None, random_init: bool = False,
                 seed: int = 0) -> nn.Module:
    """timm DINOv2 for 224 px input returning the normalised CLS token; official weights or random init."""
    import timm

    if weights is None and not random_init:
        raise ValueError("build_dinov2: give the official weights file or random_init=True")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)             # a random-init model is the same in every run
        model = timm.create_model(arch, pretrained=False, img_size=INPUT_SIZE, num_classes=0)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if k != "mask_token"}     # used only by DINOv2's iBOT training
        grid = INPUT_SIZE // model.patch_embed.patch_size[0]
        state["pos_embed"] = resample_dinov2_pos_embed(state["pos_embed"], grid)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: does not match timm {arch}; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}"
                             f" (expected the official dinov2_vitl14_pretrain.pth state dict)")
    return model.eval().requires_grad_(False)


def preprocess_dinov2(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, 224, 224), with PIL's bicubic resize as dgm-eval."""
    from PIL import Image

    out = np.empty((len(images), INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    for i, img in enumerate(images):
        if img.shape[:2] == (INPUT_SIZE, INPUT_SIZE):
            out[i] = img
        else:
            out[i] = np.asarray(Image.fromarray(img).resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC))
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2Features(nn.Module):
    def __init__(self, model: nn.Module, weights: Path | None, arch: str = KDD_ARCH):
        super().__init__()
        self.model, self.weights, self.arch = model, weights, arch

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = preprocess_dinov2(np.asarray(images)).to(device)
        from srdit.metrics.inception import no_tf32
        with no_tf32():
            return self.model(x).float()

    def describe(self) -> dict:
        return {"name": f"DINOv2 ViT-L/14 CLS (timm {self.arch}, 224 px, PIL bicubic, ImageNet normalisation)",
                "weights": str(self.weights) if self.weights else "RANDOM INIT (no pretrained weights: KDD "
                "values are not comparable with the paper)",
                "sha256": sha256_file(self.weights) if self.weights else None,
                "kernel": "(x.y/d + 1)^3, unbiased MMD^2"}


def load_kdd_features(resources_root: str | Path | None = None, random_init: bool = False,
                      device: str | torch.device = "cpu", arch: str = KDD_ARCH) -> DinoV2Features:
    weights = None if random_init else resource_path(KDD_RESOURCE, resources_root)
    return DinoV2Features(build_dinov2(arch, weights, random_init), weights, arch).to(device)


def compute_dinov2_features(net: DinoV2Features, batches, total: int | None = None, desc: str = "dinov2") -> np.ndarray:
    from tqdm import tqdm

    feats = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            feats.append(net(batch).cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(feats)
