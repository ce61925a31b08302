"""The SR-DiT transformer: a SiT backbone with the REG class token, REPA projectors, SPRINT
token routing, RMSNorm, 2D RoPE, QK-norm and value residual, each switchable by `ModelConfig`.

The forward reads as numbered stages, like the reference: embed -> dense encoder -> (SPRINT:
drop -> sparse middle -> pad -> path drop -> fuse) -> dense decoder -> final layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from srdit.config import ConfigError, ModelConfig
from srdit.models.attention import Block
from srdit.models.layers import (
    ClassTokenEmbedder, FinalLayer, LabelEmbedder, PatchEmbed, Projector, TimestepEmbedder, mlp_hidden_width,
)
from srdit.models.sprint import (
    SprintFusion, draw_keep_indices, gather_rope, gather_tokens, gather_values,
)
from srdit.models.tables import rope_tables_2d, sincos_pos_embed_2d


@dataclass
class ModelOutput:
    velocity: torch.Tensor                 # (B, C, H, W) predicted latent velocity (eps - x0)
    zs: list[torch.Tensor]                 # one (B, T, z) REPA projection per align depth
    cls_velocity: torch.Tensor | None      # (B, Z) predicted class-token velocity, None without REG


# --------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------

def check_model_config(cfg: ModelConfig) -> ModelConfig:
    """Refuse a ModelConfig the model cannot be built from; the error names the key."""
    def fail(msg: str):
        raise ConfigError(msg)

    for key in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels",
                "num_classes", "projector_dim"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f"model.{key}: must be an integer >= 1, got {value!r}")
    if cfg.class_token or cfg.align_depths:
        if not isinstance(cfg.cls_token_dim, int) or cfg.cls_token_dim < 1:
            fail(f"model.cls_token_dim: must be an integer >= 1 (the teacher width), got {cfg.cls_token_dim!r}")
    allowed = {"norm": ("layer", "rms"), "mlp_act": ("gelu_tanh", "swiglu", "relu2"),
               "value_residual": ("none", "scalar", "linear")}
    for key, values in allowed.items():
        if getattr(cfg, key) not in values:
            fail(f"model.{key}: bad value {getattr(cfg, key)!r}; allowed: {', '.join(map(repr, values))}")
    if not cfg.mlp_ratio > 0 or mlp_hidden_width(cfg.hidden_size, cfg.mlp_ratio, cfg.mlp_act) < 1:
        fail(f"model.mlp_ratio: {cfg.mlp_ratio} gives an empty MLP for hidden_size {cfg.hidden_size}")
    if cfg.hidden_size % cfg.num_heads:
        fail(f"model.num_heads: hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.hidden_size % 4:
        fail(f"model.hidden_size: the 2D sin-cos position table needs a multiple of 4, got {cfg.hidden_size}")
    if cfg.input_size % cfg.patch_size:
        fail(f"model.patch_size: input_size {cfg.input_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.rope and cfg.head_dim % 4:
        fail(f"model.rope: 2D RoPE rotates head_dim in adjacent pairs, half per image axis, so head_dim must "
             f"be divisible by 4; got {cfg.head_dim}; set model.rope: false or change num_heads")
    if cfg.rope and not cfg.rope_theta > 0:
        fail(f"model.rope_theta: must be > 0, got {cfg.rope_theta}")
    if cfg.value_residual != "none" and cfg.depth < 2:
        fail("model.value_residual: needs depth >= 2 (block 0 provides the values)")
    if not 0.0 <= cfg.label_dropout < 1.0:
        fail(f"model.label_dropout: must be in [0, 1), got {cfg.label_dropout}")
    sp = cfg.sprint
    if sp.enabled:
        if sp.encoder_depth < 1 or sp.decoder_depth < 0:
            fail(f"model.sprint.encoder_depth: need encoder_depth >= 1 and decoder_depth >= 0, got "
                 f"{sp.encoder_depth} and {sp.decoder_depth}")
        if sp.encoder_depth + sp.decoder_depth > cfg.depth:
            fail(f"model.sprint.encoder_depth: {sp.encoder_depth} dense + {sp.decoder_depth} dense blocks is "
                 f"deeper than model.depth {cfg.depth}; allowed: encoder_depth + decoder_depth <= depth")
        if not 0.0 <= sp.drop_ratio < 1.0:
            fail(f"model.sprint.drop_ratio: must be in [0, 1), got {sp.drop_ratio}")
        if not 0.0 <= sp.path_drop <= 1.0:
            fail(f"model.sprint.path_drop: must be in [0, 1], got {sp.path_drop}")
    for a in cfg.align_depths:
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= cfg.depth:
            fail(f"model.align_depths: {a!r} is outside 1..depth ({cfg.depth})")
        if sp.enabled and a > sp.encoder_depth:
            fail(f"model.align_depths: {a} lies inside the SPRINT sparse path; with sprint enabled allowed "
                 f"values are 1..{sp.encoder_depth} (model.sprint.encoder_depth)")
    return cfg


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class SRDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = check_model_config(cfg)
        D = cfg.hidden_size
        self.num_prefix = int(cfg.class_token)          # 1 when token 0 is the REG class token
        self.num_tokens = cfg.num_tokens                # T = prefix + (input_size / patch)^2

        self.patch_embed = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.time_embed = TimestepEmbedder(D)
        self.label_embed = LabelEmbedder(cfg.num_classes, D)
        self.cls_embed = ClassTokenEmbedder(cfg.cls_token_dim, D, cfg.norm) if cfg.class_token else None
        # frozen, but a Parameter as in the reference, so .parameters() counts it
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D), requires_grad=False)

        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.mlp_act, cfg.norm, cfg.qk_norm,
                  value_residual="none" if i == 0 else cfg.value_residual)
            for i in range(cfg.depth)])
        self.sprint = SprintFusion(D) if cfg.sprint.enabled else None
        self.projectors = nn.ModuleList([Projector(D, cfg.projector_dim, cfg.cls_token_dim)
                                         for _ in cfg.align_depths])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, cfg.norm,
                                      cfg.cls_token_dim if cfg.class_token else None)
        if cfg.rope:
            # token-indexed tables: row 0 (the class token) is the identity rotation
            self.register_buffer("rope_cos", torch.zeros(self.num_tokens, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.zeros(self.num_tokens, cfg.head_dim), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.initialize_weights()

    # ---------------------------------------------------------------- initialisation
    def reset_fixed_tables(self) -> None:
        """(Re)compute the sin-cos position table and the RoPE tables (deterministic)."""
        cfg = self.config
        with torch.no_grad():
            if not self.pos_embed.is_meta:
                table = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size, self.num_prefix)
                self.pos_embed.copy_(table.unsqueeze(0))
            if cfg.rope and not self.rope_cos.is_meta:
                cos, sin = rope_tables_2d(cfg.head_dim, cfg.grid_size, cfg.rope_theta)
                ones, zeros = torch.ones(self.num_prefix, cfg.head_dim), torch.zeros(self.num_prefix, cfg.head_dim)
                self.rope_cos.copy_(torch.cat([ones, cos]))
                self.rope_sin.copy_(torch.cat([zeros, sin]))

    def initialize_weights(self) -> None:
        """The reference initialisation: Xavier-uniform Linear weights with zero biases (the
        patch conv as a flattened Linear), N(0, 0.02) label table and timestep MLP weights,
        zeroed adaLN layers, output layers and mask token, value-residual lambda 0.5."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.label_embed.table.weight, std=0.02)
        nn.init.normal_(self.time_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.time_embed.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaln.weight)
            nn.init.zeros_(block.adaln.bias)
            if hasattr(block.attn, "v1_lambda"):
                nn.init.constant_(block.attn.v1_lambda, 0.5)
        final = self.final_layer
        for layer in (final.adaln, final.out, final.cls_out):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        if self.sprint is not None:
            nn.init.zeros_(self.sprint.mask_token)
        self.reset_fixed_tables()

    # ---------------------------------------------------------------- helpers
    @property
    def has_sprint(self) -> bool:
        return self.sprint is not None

    def draw_path_drop(self, generator: torch.Generator | None = None) -> bool:
        """One path-drop coin with probability sprint.path_drop (the trainer seeds the generator
        by (seed, step) so every rank draws the same)."""
        if self.sprint is None or self.config.sprint.path_drop <= 0:
            return False
        device = generator.device if generator is not None else None
        return bool(torch.rand((), generator=generator, device=device) < self.config.sprint.path_drop)

    def draw_training_randomness(self, batch: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(drop_labels, ids_keep): the draws a training-mode forward makes from the global torch
        RNG when they are not given, with the same calls in the same order. The trainer draws them
        outside the forward and passes them in, so that a compiled forward (which would draw its
        own numbers) sees the same random numbers as an eager one."""
        cfg = self.config
        drop_labels = ids_keep = None
        if self.training and cfg.label_dropout > 0:
            drop_labels = torch.rand(batch, device=device) < cfg.label_dropout
        if self.sprint is not None and self.training:
            ids_keep = draw_keep_indices(batch, self.num_tokens, cfg.sprint.drop_ratio, device)
        return drop_labels, ids_keep

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, HW, p*p*C) -> (B, C, H, W)."""
        cfg = self.config
        B, p, c, g = tokens.shape[0], cfg.patch_size, cfg.in_channels, cfg.grid_size
        x = tokens.reshape(B, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, g * p, g * p)

    def _check_inputs(self, x, t, y, cls_token, ids_keep, drop_sparse):
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        B = x.shape[0]
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"t and y: expected shape ({B},) each, got {tuple(t.shape)} and {tuple(y.shape)}")
        if cfg.class_token and cls_token is None:
            raise ValueError("cls_token: this model has the REG class token (model.class_token: true); pass the "
                             f"noisy teacher CLS vector, shape ({B}, {cfg.cls_token_dim})")
        if cfg.class_token and tuple(cls_token.shape) != (B, cfg.cls_token_dim):
            raise ValueError(f"cls_token: expected shape ({B}, {cfg.cls_token_dim}), got {tuple(cls_token.shape)}")
        if not cfg.class_token and cls_token is not None:
            raise ValueError("cls_token: this model has no class token (model.class_token: false); pass None")
        if drop_sparse and self.sprint is None:
            raise ValueError("uncond / path_drop: this model has no SPRINT sparse path to drop "
                             "(model.sprint.enabled: false); for guidance use the null label only "
                             "(sample.path_drop_guidance: false)")
        if ids_keep is not None:
            if self.sprint is None:
                raise ValueError("ids_keep: this model has no SPRINT sparse path (model.sprint.enabled: false)")
            if ids_keep.ndim != 2 or ids_keep.shape[0] != B or ids_keep.dtype != torch.int64:
                raise ValueError(f"ids_keep: expected int64 of shape ({B}, keep), got {ids_keep.dtype} "
                                 f"{tuple(ids_keep.shape)}")

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_token: torch.Tensor | None = None,
                *, uncond: bool = False, ids_keep: torch.Tensor | None = None, path_drop: bool | None = None,
                drop_labels: torch.Tensor | None = None, compute_zs: bool = True,
                capture: dict | None = None, uncond_rows: int = 0) -> ModelOutput:
        """See docs/interfaces.md. Extra keywords: `compute_zs=False` skips the REPA projectors
        (sampling); `capture`, a dict, receives named intermediates (patch_tokens, t_emb, y_emb,
        c, cls_in, block{i}, g_pad, h_in, final_tokens) for `srdit check-reference`.

        `ids_keep` is honoured in any mode; `uncond=True` and `path_drop=True` both replace the
        padded sparse output by the mask token (the reference honours `uncond` in eval mode only).
        `uncond_rows=n` (eval mode, sampling with guidance): the last n rows are unconditional
        (`uncond=True` for them alone), so that the conditional and the unconditional branch run
        as one batch; each row gets what a separate call would give it.
        """
        cfg = self.config
        drop_sparse = bool(uncond) or bool(path_drop)
        n_uncond = int(uncond_rows)
        if n_uncond:
            if self.training or drop_sparse or ids_keep is not None or not 0 < n_uncond <= x.shape[0]:
                raise ValueError(f"uncond_rows={n_uncond}: only in eval mode, without uncond/path_drop/ids_keep, "
                                 f"and at most the batch size {x.shape[0]}")
        self._check_inputs(x, t, y, cls_token, ids_keep, drop_sparse or n_uncond > 0)
        record = (lambda name, value: capture.__setitem__(name, value)) if capture is not None else (lambda *_: None)
        B, T = x.shape[0], self.num_tokens

        # 1) embeddings: tokens (+ class token 0) + absolute table; conditioning c = t_emb + y_emb
        h = self.patch_embed(x)
        record("patch_tokens", h)
        if self.cls_embed is not None:
            cls_in = self.cls_embed(cls_token)
            record("cls_in", cls_in)
            h = torch.cat([cls_in.unsqueeze(1), h], dim=1)
        h = h + self.pos_embed
        if drop_labels is None and self.training and cfg.label_dropout > 0:
            drop_labels = torch.rand(B, device=y.device) < cfg.label_dropout
        t_emb, y_emb = self.time_embed(t), self.label_embed(y, drop_labels)
        c = t_emb + y_emb
        record("t_emb", t_emb)
        record("y_emb", y_emb)
        record("c", c)
        rope_full = None if self.rope_cos is None else (self.rope_cos[None, None], self.rope_sin[None, None])

        features: dict[int, torch.Tensor] = {}      # output after `depth` blocks, for REPA
        v1 = None                                   # block 0's raw values (value residual)

        def run_blocks(start: int, stop: int, h, rope, values, cond=None):
            """Blocks start..stop-1; `values` are block 0's values at these tokens (None until
            block 0 has run: block 0 itself has no value residual); `cond`: c for these rows."""
            nonlocal v1
            cond = c if cond is None else cond
            for i in range(start, stop):
                h, v_raw = self.blocks[i](h, cond, rope, values if i > 0 else None)
                if i == 0 and cfg.value_residual != "none":
                    v1 = values = v_raw
                record(f"block{i}", h)
                if (i + 1) in cfg.align_depths:
                    features[i + 1] = h
            return h

        if self.sprint is None:
            h = run_blocks(0, cfg.depth, h, rope_full, None)
        else:
            n_enc, n_dec = cfg.sprint.encoder_depth, cfg.sprint.decoder_depth
            # 2) dense encoder on all T tokens
            x_enc = run_blocks(0, n_enc, h, rope_full, None)
            # 3) sparse middle on the kept tokens (all tokens in eval mode)
            if ids_keep is None and self.training:
                ids_keep = draw_keep_indices(B, T, cfg.sprint.drop_ratio, x.device)
            if drop_sparse and not (self.training and torch.is_grad_enabled()):
                # the middle output would be discarded: skip computing it (sampling)
                g_pad = self.sprint.mask_sequence(B, T, x_enc.dtype)
            elif n_uncond:
                # guidance batch: the middle blocks run on the conditional rows only
                n_cond = B - n_uncond
                parts = []
                if n_cond:
                    parts.append(run_blocks(n_enc, cfg.depth - n_dec, x_enc[:n_cond], rope_full,
                                            None if v1 is None else v1[:n_cond], c[:n_cond]))
                parts.append(self.sprint.mask_sequence(n_uncond, T, x_enc.dtype))
                g_pad = torch.cat(parts) if len(parts) > 1 else parts[0]
            else:
                x_mid, rope_mid, v1_mid = x_enc, rope_full, v1
                if ids_keep is not None:
                    x_mid = gather_tokens(x_enc, ids_keep)
                    if rope_full is not None:
                        rope_mid = (gather_rope(self.rope_cos, ids_keep), gather_rope(self.rope_sin, ids_keep))
                    if v1 is not None:
                        v1_mid = gather_values(v1, ids_keep)
                x_mid = run_blocks(n_enc, cfg.depth - n_dec, x_mid, rope_mid, v1_mid)
                # 4) pad back to T with the mask token
                g_pad = x_mid if ids_keep is None else self.sprint.pad(x_mid, ids_keep, T)
                # 5) path drop (training) / path-drop guidance (sampling)
                if drop_sparse:
                    g_pad = self.sprint.drop_path(g_pad)
            record("g_pad", g_pad)
            # 6) fusion of [encoder output ; padded middle output], no residual
            h = self.sprint(x_enc, g_pad)
            record("h_in", h)
            # 7) dense decoder
            h = run_blocks(cfg.depth - n_dec, cfg.depth, h, rope_full, v1)

        # 8) final layer: spatial tokens -> latent velocity, token 0 -> class-token velocity
        out_tokens, cls_velocity = self.final_layer(h, c)
        record("final_tokens", out_tokens)
        zs = []
        if compute_zs:
            zs = [proj(features[d]) for proj, d in zip(self.projectors, cfg.align_depths)]
        return ModelOutput(velocity=self.unpatchify(out_tokens), zs=zs, cls_velocity=cls_velocity)

    # samplers may batch the two guidance branches through `uncond_rows` (srdit.sample)
    supports_uncond_rows = True

    def forward_velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cls_token: torch.Tensor | None = None, uncond: bool = False, uncond_rows: int = 0):
        """(velocity, cls_velocity) for samplers: no REPA projectors. `uncond_rows`: see forward."""
        out = self.forward(x, t, y, cls_token, uncond=uncond, compute_zs=False, uncond_rows=uncond_rows)
        return out.velocity, out.cls_velocity


def build_model(cfg: ModelConfig) -> SRDiT:
    """The SR-DiT model for `cfg` (checked first; ConfigError names a bad key)."""
    return SRDiT(cfg)
