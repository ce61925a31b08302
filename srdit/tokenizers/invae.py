"""E2E-INVAE: the f16, 32-channel KL autoencoder SR-DiT trains on (docs/recipe.md 2.2).

Written from its architecture, an LDM-style AutoencoderKL: a convolutional encoder with
ResNet blocks, GroupNorm(32, eps 1e-6) and swish, four stride-2 downsamples, single-head
attention at the lowest level and in the middle block; a mirrored decoder with one more ResNet
block per level and nearest-neighbour upsampling. Module and parameter names follow the
official checkpoint `e2e-invae-400k.pt` exactly, so that file loads strictly as a flat
state_dict (see tests/fixtures/invae/README.md and keys.json).
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokenizer, TokenizerWeightsError

# The official model: `VAE_F16D32()` of the reference, every other setting at its default.
INVAE_F16D32: dict = dict(
    embed_dim=32, ch_mult=(1, 1, 2, 2, 4), use_variational=True,
    ch=128, num_res_blocks=2, attn_resolutions=(16,), resolution=256, in_channels=3, out_ch=3,
    dropout=0.0, resamp_with_conv=True, double_z=True, give_pre_end=False,
    group_norm_groups=32, group_norm_eps=1e-6,
)
INVAE_LATENT_SCALE = 0.3099   # hard-coded in SR-DiT for all 32 channels; origin undocumented


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 shortcut where the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, width C, scale 1/sqrt(C), residual."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens in row-major order, C)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)       # softmax over keys, scale 1/sqrt(C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the size: zero-pad one row at the bottom and one column at the right, 3x3 stride-2 conv
    (so a side s becomes floor(s / 2)); average pooling when built without a conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, stride=2)


class Upsample(nn.Module):
    """Double the size: nearest-neighbour x2, then a 3x3 conv (when built with one)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Level(nn.Module):
    """One resolution level: `block` (ResNet blocks), `attn` (one after each block, or none),
    and a `downsample` / `upsample` unless it is the last level walked."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, eps, dropout)
        self.attn_1 = AttnBlock(channels, groups, eps)
        self.block_2 = ResnetBlock(channels, channels, groups, eps, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


# --------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels,
                 z_channels, double_z, dropout, resamp_with_conv, groups, eps):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        # Attention placement is fixed at construction from the nominal resolution, whatever the input size.
        size = resolution
        width = ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(width, ch * mult, groups, eps, dropout))
                width = ch * mult
                if size in attn_resolutions:
                    level.attn.append(AttnBlock(width, groups, eps))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(width, resamp_with_conv)
                size //= 2
            self.down.append(level)
        self.mid = Middle(width, groups, eps, dropout)
        self.norm_out = nn.GroupNorm(groups, width, eps=eps)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, out_ch,
                 z_channels, give_pre_end, dropout, resamp_with_conv, groups, eps):
        super().__init__()
        self.give_pre_end = give_pre_end
        width = ch * ch_mult[-1]
        size = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = Middle(width, groups, eps, dropout)
        # Built from the lowest level up; `up[i]` is level i (up[0] is full resolution).
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(width, ch * ch_mult[i], groups, eps, dropout))
                width = ch * ch_mult[i]
                if size in attn_resolutions:
                    level.attn.append(AttnBlock(width, groups, eps))
            if i != 0:
                level.upsample = Upsample(width, resamp_with_conv)
                size *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(groups, width, eps=eps)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

class E2EInvae(Tokenizer):
    """E2E-INVAE. Top-level modules `encoder`, `decoder`, `quant_conv`, `post_quant_conv` as in the checkpoint."""

    name = "e2e-invae"

    def __init__(self, *, embed_dim=32, ch_mult=(1, 1, 2, 2, 4), use_variational=True, ch=128,
                 num_res_blocks=2, attn_resolutions=(16,), resolution=256, in_channels=3, out_ch=3,
                 dropout=0.0, resamp_with_conv=True, double_z=True, give_pre_end=False,
                 group_norm_groups=32, group_norm_eps=1e-6,
                 latent_scale=INVAE_LATENT_SCALE, latent_bias=0.0):
        super().__init__()
        if not use_variational or not double_z:
            raise ValueError("E2E-INVAE is a variational autoencoder: use_variational and double_z must be "
                             f"true (got use_variational={use_variational}, double_z={double_z})")
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.settings = dict(embed_dim=embed_dim, ch_mult=list(ch_mult), use_variational=use_variational, ch=ch,
                             num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                             resolution=resolution, in_channels=in_channels, out_ch=out_ch, dropout=dropout,
                             resamp_with_conv=resamp_with_conv, double_z=double_z, give_pre_end=give_pre_end,
                             group_norm_groups=group_norm_groups, group_norm_eps=group_norm_eps,
                             latent_scale=latent_scale, latent_bias=latent_bias)
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      resolution=resolution, z_channels=embed_dim, dropout=dropout,
                      resamp_with_conv=resamp_with_conv, groups=group_norm_groups, eps=group_norm_eps)
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **common)
        self.decoder = Decoder(out_ch=out_ch, give_pre_end=give_pre_end, **common)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.latent_channels = embed_dim
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.latent_scale = float(latent_scale)
        self.latent_bias = float(latent_bias)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)        # [mean ; logvar] along channels
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


SETTING_KEYS = tuple(E2EInvae.__init__.__kwdefaults__)


def build_invae(random_seed: int | None = 0, **settings) -> E2EInvae:
    """The official-size E2E-INVAE, with `settings` overriding any constructor argument.

    Construction is seeded (`random_seed`) so that random-weight tokenizers built in different
    processes (sharded encode jobs, the CPU demo) are identical; None leaves the global RNG alone.
    """
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"E2E-INVAE: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(SETTING_KEYS)}")
    merged = {**INVAE_F16D32, **settings}
    if random_seed is None:
        return E2EInvae(**merged)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_seed)
        return E2EInvae(**merged)


def invae_from_config(config: Mapping, **overrides) -> E2EInvae:
    """Build from a settings dict such as the fixtures' config.json; unknown keys are refused."""
    return build_invae(**{**config, **overrides})


def read_invae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an E2E-INVAE weights file: a flat {key: tensor} state_dict, as the official `.pt` is.

    Read with `weights_only=True`, so a file holding pickled Python objects is refused rather
    than executed.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TokenizerWeightsError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain "
            f"containers, and it is read with weights_only=True for safety. The official "
            f"e2e-invae-400k.pt is a flat state_dict; re-save yours as torch.save(model.state_dict()).\n{e}") from e
    if not isinstance(obj, Mapping):
        raise TokenizerWeightsError(f"{path}: expected a flat state_dict (a mapping from key to tensor), "
                                    f"got {type(obj).__name__}")
    nested = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if nested:
        raise TokenizerWeightsError(
            f"{path}: expected a flat state_dict of tensors, but key(s) {', '.join(map(repr, nested[:5]))} hold "
            f"{type(obj[nested[0]]).__name__}. A training checkpoint wraps the weights (e.g. ckpt['vae']); "
            f"extract that state_dict and save it alone, as the official file is.")
    return dict(obj)


def load_invae_weights(model: E2EInvae, path: str | Path) -> E2EInvae:
    """Load a weights file strictly: same key names (no prefix added or stripped), same shapes."""
    state = read_invae_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TokenizerWeightsError(
            f"{path}: does not match the E2E-INVAE architecture (keys must match exactly, no 'module.' or "
            f"'_orig_mod.' prefix, no wrapper key; conv weights (out, in, kH, kW)):\n{e}") from e
    return model
