"""The CPU demo's parts: the pixel tokenizer (exact, weightless) and the demo registry entries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from srdit.config import ConfigError, get_config
from srdit.tokenizers import TOKENIZERS, load_tokenizer


def every_level_image() -> torch.Tensor:
    """(2, 32, 32, 3) uint8: every value 0..255 in every channel, then random pixels."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    first = torch.stack([levels, levels.flip(0), levels.T], dim=-1).repeat(2, 2, 1)
    rng = np.random.default_rng(0)
    second = torch.from_numpy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return torch.stack([first, second])


def test_pixel_tokenizer_round_trip_is_exact():
    tok = load_tokenizer("pixel")
    images = every_level_image()
    latents = tok.encode(images, noise=torch.randn(2, 48, 8, 8))       # the noise must not matter
    assert tok.latent_shape(32) == (48, 8, 8) and latents.shape == (2, 48, 8, 8)
    assert torch.equal(tok.decode_to_uint8(tok.scale(latents)), images)
    # a latent position holds its 4 x 4 block: channel (c * 16 + dy * 4 + dx) of position (i, j)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(latents[0, 1 * 16 + 2 * 4 + 3, 5, 6], x[0, 1, 5 * 4 + 2, 6 * 4 + 3])
    mean, std = tok.posterior(images)
    assert torch.equal(mean, latents) and not std.any()


def test_pixel_tokenizer_has_no_weights_to_randomise():
    assert "pixel" in TOKENIZERS
    tok = load_tokenizer("pixel", random_init=True)
    assert tok.random_weights is False and not list(tok.parameters()) and not tok.state_dict()
    assert tok.to(torch.float64).dtype == torch.float64
    scaled = load_tokenizer("pixel", latent_scale=2.0, latent_bias=0.5)
    z = scaled.encode(every_level_image())
    assert torch.equal(scaled.decode_to_uint8(scaled.scale(z)), every_level_image())
    assert scaled.settings == {"downsample": 4, "latent_scale": 2.0, "latent_bias": 0.5}
    with pytest.raises(ValueError, match="downsample"):
        load_tokenizer("pixel", downsample=0)
    with pytest.raises(ValueError, match="multiple"):
        tok.latent_shape(30)


def test_config_checks_the_latent_side_per_tokenizer():
    pixel = {"data": {"tokenizer": "pixel", "resolution": 32}, "model": {"in_channels": 48, "align_depths": []},
             "objective": {"proj_coeff": 0.0}}
    with pytest.raises(ConfigError, match=r"model.input_size: 4 .*pixel tokenizer, f4.*allowed: 8"):
        get_config("demo_reg", overrides=pixel)
    pixel["model"]["input_size"] = 8
    assert get_config("demo_reg", overrides=pixel).data.tokenizer == "pixel"
    # REPA pairs model tokens with teacher tokens: an 8x8 grid cannot align with the teacher's 2x2
    pixel["model"]["align_depths"] = [2]
    with pytest.raises(ConfigError, match=r"model.align_depths: REPA .* 8x8 tokens .* 2x2"):
        get_config("demo_reg", overrides=pixel)


def test_evaluate_reuses_the_reference_features_it_stored(tmp_path):
    """`srdit reference-batch` stores the reference's Inception pool features; `srdit evaluate`
    reuses them (the demo evaluates many checkpoints against one reference) and gets the same
    metrics as from features it computes itself."""
    from srdit.metrics.evaluate import evaluate
    from srdit.metrics.npz_io import NpzWriter
    from srdit.metrics.reference_batch import POOL_KEY, POOL_SHA_KEY, build_reference_batch

    rng = np.random.default_rng(0)
    source = tmp_path / "source.npz"
    with NpzWriter(source) as w:
        w.add("arr_0", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    samples = tmp_path / "samples.npz"
    with NpzWriter(samples) as w:
        w.add("arr_0", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    ref = tmp_path / "ref.npz"
    build_reference_batch(source, ref, inception="fid-helper")
    stored = evaluate(samples, ref, inception="fid-helper", kdd=False)
    with np.load(ref) as data:
        assert data[POOL_KEY].shape == (6, 2048)
        assert data[POOL_SHA_KEY].tolist() == [stored["feature_extractors"]["inception"]["sha256"]]
        plain = {k: data[k] for k in data.files if k not in (POOL_KEY, POOL_SHA_KEY)}   # an ADM-style batch
    with NpzWriter(tmp_path / "adm.npz") as w:
        for key, value in plain.items():
            w.add(key, value)
    computed = evaluate(samples, tmp_path / "adm.npz", inception="fid-helper", kdd=False)
    assert stored["reference"]["inception_features"].startswith("stored")
    assert computed["reference"]["inception_features"].startswith("computed")
    for key in ("fid", "sfid", "precision", "recall"):
        assert stored[key] == pytest.approx(computed[key], rel=1e-6, abs=1e-9), key
