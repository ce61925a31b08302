"""Image tokenizers: E2E-INVAE (the paper's, f16 x 32 channels), SD-VAE (f8 x 4), and the
weightless pixel tokenizer of the CPU demo (space-to-depth, f4 x 48, an exact inverse).

`load_tokenizer(name)` returns a frozen `Tokenizer` in eval mode. Pretrained files are found
with `srdit.resources.resource_path`; `random_init=True` builds the same architecture with
seeded random weights (tests, the CPU demo), and `overrides` change constructor settings
(tiny widths for tests) or the latent scale.
"""
from __future__ import annotations

from pathlib import Path

from srdit.resources import resource_path

from .base import Tokenizer, TokenizerWeightsError, images_to_input, output_to_uint8
from .invae import E2EInvae, build_invae, load_invae_weights
from .pixel import PixelTokenizer
from .sdvae import SDVAE, build_sdvae

TOKENIZERS = ("e2e-invae", "sd-vae", "pixel")

__all__ = ["Tokenizer", "TokenizerWeightsError", "E2EInvae", "SDVAE", "PixelTokenizer", "TOKENIZERS",
           "load_tokenizer", "images_to_input", "output_to_uint8"]


def load_tokenizer(name: str, resources_root: str | Path | None = None, random_init: bool = False,
                   **overrides) -> Tokenizer:
    """The named tokenizer, frozen, on the CPU, float32.

    E2E-INVAE loads `e2e-invae-400k.pt` strictly; SD-VAE loads the diffusers folder `sd-vae-ft-ema`.
    A missing file raises `MissingResourceError` naming the fetch command. The pixel tokenizer has
    no weights: `random_init` changes nothing and it never reports random weights.
    """
    if name == "e2e-invae":
        if random_init:
            model = build_invae(**overrides)
        else:
            path = resource_path("e2e-invae", resources_root)
            model = load_invae_weights(build_invae(**overrides), path)
    elif name == "sd-vae":
        folder = None if random_init else resource_path("sd-vae", resources_root)
        model = build_sdvae(folder, **overrides)
    elif name == "pixel":
        return PixelTokenizer(**overrides).freeze()
    else:
        raise ValueError(f"unknown tokenizer {name!r}; allowed: {', '.join(TOKENIZERS)}")
    model.random_weights = bool(random_init)
    return model.freeze()
