"""The pixel tokenizer: space-to-depth, an exact and weightless stand-in for a learned autoencoder.

Used by the CPU demo, where no pretrained autoencoder can be downloaded and a randomly
initialised one turns every image into noise. An f x f block of pixels in [-1, 1] becomes the
3 f^2 channels of one latent position (`torch.nn.functional.pixel_unshuffle`); decoding puts
them back (`pixel_shuffle`). Nothing is learned and nothing is lost: the posterior has zero
spread, so the stored latent is the image itself, and decoding a latent gives back the image
it was made from, bit for bit.

f = 4 gives 48-channel latents: small enough that a tiny transformer, which sees each latent
position as one token, can carry its noisy input through its hidden width (a velocity
prediction must reproduce the noise; pixel patches much wider than the model fail, see
"Back to Basics: Let Denoising Generative Models Denoise", Li and He, 2025).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Tokenizer

PIXEL_DOWNSAMPLE = 4
PIXEL_LATENT_SCALE = 1.0      # pixels in [-1, 1] as they are (the demo photos: mean -0.2, std 0.5)


class PixelTokenizer(Tokenizer):
    name = "pixel"
    random_weights = False     # there are no weights: never a stand-in of random numbers

    def __init__(self, downsample: int = PIXEL_DOWNSAMPLE, latent_scale: float | None = None,
                 latent_bias: float = 0.0):
        super().__init__()
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
            raise ValueError(f"pixel tokenizer: downsample must be an integer >= 1, got {downsample!r}")
        self.downsample = downsample
        self.latent_channels = 3 * downsample ** 2
        self.latent_scale = float(PIXEL_LATENT_SCALE if latent_scale is None else latent_scale)
        self.latent_bias = float(latent_bias)
        self.settings = dict(downsample=downsample, latent_scale=self.latent_scale, latent_bias=self.latent_bias)
        # No parameters: this buffer carries the device and dtype that `.to()` gives the tokenizer.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks as channels, and logvar -inf: the posterior std is exp(-inf / 2) = 0, so
        `encode` returns the latent exactly, whatever noise it is given."""
        mean = F.pixel_unshuffle(x, self.downsample)
        return mean, torch.full_like(mean, float("-inf"))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.downsample)

    def decode_to_uint8(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Round to the nearest level (the learned tokenizers truncate, as the reference does), so
        that decoding an encoded image returns its exact pixels."""
        x = self.decode(self.unscale(z_scaled.to(self.device)).to(self.dtype))
        pixels = ((x + 1) * 127.5).round().clamp(0, 255)
        return pixels.permute(0, 2, 3, 1).to(torch.uint8)
