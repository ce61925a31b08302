"""What every image tokenizer offers: pixel conversions, posterior sampling, latent scaling.

A tokenizer is a frozen KL autoencoder. The pipeline stores one *raw* posterior sample per
image (mean + std * noise, unscaled); the diffusion model sees `latent * latent_scale +
latent_bias`; sampling decodes `(z - latent_bias) / latent_scale` and converts to uint8 by
truncation, as the reference evaluation does (docs/recipe.md 2.2).
"""
from __future__ import annotations

import torch
from torch import nn


class TokenizerWeightsError(RuntimeError):
    """A weights file could not be loaded into the tokenizer; the message says what to do."""


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 BHWC -> float32 BCHW in [-1, 1], computed in float32 exactly as the reference (x / 127.5 - 1)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {tuple(images.shape)} {images.dtype}")
    return images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


def output_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output BCHW (nominal range [-1, 1]) -> uint8 BHWC.

    Same order of operations as the reference FID sampler: (x + 1) / 2, x 255, clamp, then a
    cast that truncates (no +0.5 rounding); FID images depend on it (41% of values change otherwise).
    """
    pixels = ((x + 1) / 2 * 255).clamp(0, 255)
    return pixels.permute(0, 2, 3, 1).to(torch.uint8)


class Tokenizer(nn.Module):
    """Base class. Subclasses set the attributes below and implement `encode_moments` and `decode`.

    The attributes are plain Python values, not buffers, so that the state_dict holds exactly
    the weights of the official checkpoint.
    """

    name: str = "tokenizer"
    latent_channels: int
    downsample: int
    latent_scale: float
    latent_bias: float = 0.0
    random_weights: bool = False      # True when built with random_init: outputs mean nothing
    settings: dict                    # constructor settings, recorded in caches

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1], BCHW float -> (mean, logvar), each (B, C, H/f, W/f); logvar clamped to [-30, 20]."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latent -> decoder output BCHW, nominal range [-1, 1]."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 BHWC -> (mean, std) of the posterior, float32 (float64 for a float64 model).

        Under bf16 autocast the encoder runs in bf16, but the moments are upcast before the
        std and the sample are formed, so the stored latent keeps float32 arithmetic.
        """
        x = images_to_input(images.to(self.device)).to(self.dtype)
        mean, logvar = self.encode_moments(x)
        if mean.dtype != torch.float64:
            mean, logvar = mean.float(), logvar.float()
        return mean, torch.exp(0.5 * logvar)

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 BHWC -> one raw posterior sample, mean + std * noise (unscaled, float32).

        `noise` (B, C, h, w) makes the draw reproducible; None draws it from the global RNG.
        """
        mean, std = self.posterior(images)
        if noise is None:
            noise = torch.randn(mean.shape, dtype=torch.float32, device=mean.device)
        if noise.shape != mean.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the posterior {tuple(mean.shape)}")
        # The reference draws the noise in float32; a float64 model (tests) uses it exactly.
        return mean + std * noise.to(device=mean.device, dtype=mean.dtype)

    def scale(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> what the diffusion model sees."""
        return latent * self.latent_scale + self.latent_bias

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_bias) / self.latent_scale

    def decode_to_uint8(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latent (what the diffusion model produces) -> uint8 BHWC images."""
        z = self.unscale(z_scaled.to(self.device)).to(self.dtype)
        return output_to_uint8(self.decode(z))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of the tokenizer's "
                             f"downsampling factor {self.downsample}")
        side = resolution // self.downsample
        return (self.latent_channels, side, side)

    def freeze(self) -> "Tokenizer":
        self.eval()
        self.requires_grad_(False)
        return self
