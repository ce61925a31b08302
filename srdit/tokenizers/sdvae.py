"""SD-VAE (ft-EMA): the f8, 4-channel KL autoencoder of Stable Diffusion, through diffusers.

Used by the pre-INVAE ablations. The pretrained folder (`config.json` +
`diffusion_pytorch_model.safetensors`) is fetched by `srdit fetch sd-vae`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Tokenizer, TokenizerWeightsError

# stabilityai/sd-vae-ft-ema's config.json (the diffusers AutoencoderKL defaults plus these).
SD_VAE_CONFIG: dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=256, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD_VAE_LATENT_SCALE = 0.18215


class SDVAE(Tokenizer):
    name = "sd-vae"

    def __init__(self, vae, latent_scale: float | None = None, latent_bias: float = 0.0):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_scale = float(cfg.scaling_factor if latent_scale is None else latent_scale)
        self.latent_bias = float(latent_bias)
        self.settings = dict(block_out_channels=list(cfg.block_out_channels), latent_channels=self.latent_channels,
                             layers_per_block=int(cfg.layers_per_block), norm_num_groups=int(cfg.norm_num_groups),
                             latent_scale=self.latent_scale, latent_bias=self.latent_bias)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist          # diffusers clamps logvar to [-30, 20]
        return dist.mean, dist.logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def build_sdvae(folder: str | Path | None = None, random_seed: int = 0, latent_scale: float | None = None,
                latent_bias: float = 0.0, **config_overrides) -> SDVAE:
    """From a diffusers folder, or (folder None) randomly initialised with `config_overrides`."""
    from diffusers import AutoencoderKL

    if folder is not None:
        if config_overrides:
            raise ValueError(f"sd-vae: architecture overrides {sorted(config_overrides)} only apply to a "
                             f"randomly initialised model")
        try:
            vae = AutoencoderKL.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise TokenizerWeightsError(f"{folder}: not a diffusers AutoencoderKL folder (config.json + "
                                        f"diffusion_pytorch_model.safetensors): {e}") from e
    else:
        unknown = sorted(set(config_overrides) - set(SD_VAE_CONFIG))
        if unknown:
            raise ValueError(f"sd-vae: unknown setting(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(SD_VAE_CONFIG)}, latent_scale, latent_bias")
        cfg = {**SD_VAE_CONFIG, **config_overrides}
        n = len(cfg["block_out_channels"])
        cfg["down_block_types"] = ("DownEncoderBlock2D",) * n
        cfg["up_block_types"] = ("UpDecoderBlock2D",) * n
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            vae = AutoencoderKL(**cfg, scaling_factor=SD_VAE_LATENT_SCALE)
    return SDVAE(vae, latent_scale=latent_scale, latent_bias=latent_bias)
