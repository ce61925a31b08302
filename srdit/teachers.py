"""DINOv2 teachers for REPA and REG (docs/recipe.md 2.4), built with timm from the official weights.

The reference loads DINOv2 through torch.hub, resamples its absolute position embedding once
to the latent grid (16 x 16 at 256 px, 32 x 32 at 512 px) with timm's `resample_abs_pos_embed`
(bicubic, antialiased), and feeds it the uint8 image / 255, ImageNet-normalised, bicubic-resized
to 14 x grid pixels (224 / 448). Its outputs are the last layer's normalised CLS token and patch
tokens. timm's `vit_*_patch14_dinov2` is the same network; the official `.pth` differs from
timm's state_dict only by the unused `mask_token` (and, in chunked checkpoints, a block-chunk
index in the block names), so the mapping below is small and checked strictly.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srdit.resources import resource_path

TIMM_ARCHS = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
}
PATCH = 14
LATENT_DOWNSAMPLE = 16        # the teacher's token grid equals the f16 latent grid
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherWeightsError(RuntimeError):
    """An official DINOv2 file does not fit the timm architecture."""


def official_to_timm(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Official DINOv2 `*_pretrain.pth` state_dict -> timm `vit_*_patch14_dinov2` at a grid x grid input."""
    from timm.layers import resample_abs_pos_embed

    if "register_tokens" in state:
        raise TeacherWeightsError("this DINOv2 checkpoint has register tokens (a *_reg model); the SR-DiT "
                                  "teacher is DINOv2 without registers")
    out = {}
    for key, value in state.items():
        if key == "mask_token":            # used only by DINOv2's masked-image training
            continue
        # chunked FSDP checkpoints name blocks 'blocks.<chunk>.<index>.'; the index is global
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        out[key] = value
    if "pos_embed" not in out:
        raise TeacherWeightsError("no 'pos_embed' in the checkpoint: not an official DINOv2 state_dict")
    # Resampled once, exactly as the reference does, so the forward pass needs no interpolation.
    out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"].float(), new_size=[grid, grid], num_prefix_tokens=1)
    return out


def build_dinov2(name: str, grid: int, resources_root: str | Path | None = None, random_init: bool = False,
                 random_seed: int = 0, **overrides) -> nn.Module:
    """The timm DINOv2 ViT for a grid x grid token input (14 * grid pixels), eval mode, frozen.

    `overrides` (depth, embed_dim, num_heads...) shrink the network for tests.
    """
    import timm

    if name not in TIMM_ARCHS:
        raise ValueError(f"unknown teacher {name!r}; allowed: {', '.join(TIMM_ARCHS)}")
    path = None if random_init else resource_path(name, resources_root)    # fail before building
    kwargs = dict(pretrained=False, img_size=PATCH * grid, num_classes=0, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_seed)        # identical random teachers in every process
        model = timm.create_model(TIMM_ARCHS[name], **kwargs)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(official_to_timm(state, grid), strict=True)
        except RuntimeError as e:
            raise TeacherWeightsError(f"{path}: does not fit timm {TIMM_ARCHS[name]}: {e}") from e
    model.eval().requires_grad_(False)
    return model


class Teacher(nn.Module):
    """`features(images uint8 BHWC) -> (cls (B, D), patch_tokens (B, grid*grid, D))`, float32."""

    def __init__(self, vit: nn.Module, name: str, resolution: int, random_weights: bool = False):
        super().__init__()
        self.vit = vit
        self.name = name
        self.resolution = resolution
        self.grid = resolution // LATENT_DOWNSAMPLE
        self.input_size = PATCH * self.grid
        self.dim = vit.embed_dim
        self.num_tokens = self.grid * self.grid
        self.random_weights = random_weights
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 BHWC -> normalised float BCHW at the teacher's input size (bicubic, no antialias)."""
        x = images.to(self.mean.device).permute(0, 3, 1, 2).float() / 255
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.vit.forward_features(self.preprocess(images))   # final LayerNorm applied
        prefix = getattr(self.vit, "num_prefix_tokens", 1)
        return tokens[:, 0].float(), tokens[:, prefix:].float()


def load_teacher(name: str, resolution: int, resources_root: str | Path | None = None,
                 random_init: bool = False, **overrides) -> Teacher:
    """DINOv2 teacher `name` (dinov2_vits14 / vitb14 / vitl14) for images of `resolution` pixels."""
    if resolution % LATENT_DOWNSAMPLE:
        raise ValueError(f"resolution {resolution} must be a multiple of {LATENT_DOWNSAMPLE}: the teacher's "
                         f"token grid is the latent grid (resolution / 16)")
    grid = resolution // LATENT_DOWNSAMPLE
    vit = build_dinov2(name, grid, resources_root, random_init=random_init, **overrides)
    return Teacher(vit, name, resolution, random_weights=random_init)
