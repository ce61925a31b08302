"""Load the original SR-DiT checkpoints (SwayStar123/SpeedrunDiT) and convert them to ours.

- `load_original_checkpoint(path)`: a training checkpoint `.pt` (a dict with `model`, `ema`,
  `opt`, `args` (an argparse.Namespace) and `steps`), a bare state_dict `.pt`, or a
  `.safetensors` state_dict. `.pt` files are unpickled with `torch.load(weights_only=True)`
  allowing only `argparse.Namespace` besides tensors and containers: a file that needs any
  other class is refused, because unpickling runs code.
- `model_config_from_original(config_json)`: our ModelConfig from the reference constructor
  kwargs (the fixtures' config.json). `model_config_from_args(args)`: from a checkpoint's
  `args` (train.py or generate.py options).
- `convert_state_dict(original_sd, model_cfg)`: original key names -> ours, with every key and
  shape checked against our model.

The reference SiT always has SPRINT 2 / depth-4 / 2 (drop 0.75, path drop 0.05), RMSNorm,
RoPE, the scalar value residual, the REG class token and REPA after the 2 encoder blocks;
those are fixed here, the sizes are read from the input.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from srdit.config import ConfigError, ModelConfig, SprintConfig, model_size
from srdit.models.tables import rope_tables_2d

# Width of each DINOv2 encoder named in the reference's `--enc-type` (dinov2-vit-b -> 768).
DINOV2_WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
RESOLUTION_TO_LATENT = 16          # E2E-INVAE downsamples by 16
LATENT_CHANNELS = 32


class CheckpointError(ValueError):
    """A checkpoint could not be loaded or converted; the message says what and why."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_original_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as a dict, on the CPU, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it needs a Python object other than tensors, containers and "
            f"argparse.Namespace, and unpickling such objects can run arbitrary code. Only the original "
            f"SR-DiT checkpoints (keys model/ema/opt/args/steps) or bare state_dicts are accepted. "
            f"Details: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state_dict or a training checkpoint), "
                              f"got {type(obj).__name__}")
    return obj


def original_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: `ema` (default, what the reference samples
    with) or `model` of a training checkpoint, or the checkpoint itself when it is a state_dict."""
    key = "ema" if use_ema else "model"
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
        sd = dict(checkpoint[key])
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        sd = dict(checkpoint)
    else:
        raise CheckpointError(f"checkpoint has no {key!r} entry and is not a bare state_dict; "
                              f"its keys: {', '.join(map(str, list(checkpoint)[:10]))}")
    # DDP / torch.compile wrappers prefix every key
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def _reference_model_config(*, depth, hidden_size, num_heads, patch_size, input_size, in_channels,
                            num_classes, mlp_ratio, z_dims, projector_dim, qk_norm, label_dropout) -> ModelConfig:
    z_dims = [int(z) for z in z_dims]
    if not z_dims or len(set(z_dims)) != 1:
        raise ConfigError(f"z_dims: expected one or more equal teacher widths, got {z_dims}; our model "
                          f"projects every REPA head to the class-token width")
    if depth < 4:
        raise ConfigError(f"depth: the reference SPRINT split needs depth >= 4 (2 dense + 2 dense), got {depth}")
    return ModelConfig(
        depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, mlp_ratio=float(mlp_ratio),
        mlp_act="gelu_tanh", norm="rms", rope=True, rope_theta=10000.0, qk_norm=bool(qk_norm),
        value_residual="scalar", class_token=True, cls_token_dim=z_dims[0],
        sprint=SprintConfig(enabled=True, encoder_depth=2, decoder_depth=2, drop_ratio=0.75, path_drop=0.05),
        align_depths=[2] * len(z_dims), projector_dim=projector_dim, label_dropout=float(label_dropout))


def model_config_from_original(config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from the reference `SiT(**config)` keyword arguments (config.json)."""
    required = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                "z_dims")
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"reference config: missing {', '.join(missing)}; expected the keyword arguments "
                          f"of the reference SiT constructor")
    hidden = int(config["hidden_size"])
    if int(config.get("decoder_hidden_size", hidden)) != hidden:
        raise ConfigError(f"decoder_hidden_size: {config['decoder_hidden_size']} differs from hidden_size "
                          f"{hidden}; the reference model fails at run time with that configuration")
    return _reference_model_config(
        depth=int(config["depth"]), hidden_size=hidden, num_heads=int(config["num_heads"]),
        patch_size=int(config["patch_size"]), input_size=int(config["input_size"]),
        in_channels=int(config["in_channels"]), num_classes=int(config["num_classes"]),
        mlp_ratio=config.get("mlp_ratio", 4.0), z_dims=config["z_dims"],
        projector_dim=int(config.get("projector_dim", 2048)), qk_norm=config.get("qk_norm", False),
        label_dropout=config.get("class_dropout_prob", 0.1))


def model_config_from_args(args: argparse.Namespace | Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from the `args` of an original checkpoint (train.py) or generate.py options.

    Reads `model` ('SiT-B/1'), `resolution`, `num_classes`, `qk_norm`, and the teacher width from
    `projector_embed_dims` ('768' or '768,1024', generate.py) or `enc_type` ('dinov2-vit-b', train.py).
    Missing options take train.py's defaults.
    """
    a = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    name = a.get("model")
    match = re.fullmatch(r"SiT-(S|B|L|XL)/(\d)", str(name))
    if not match:
        raise ConfigError(f"args.model: expected a reference model name like 'SiT-B/1', got {name!r}")
    size = model_size(f"{match.group(1)}/{match.group(2)}")
    resolution = int(a.get("resolution", 256))
    if resolution % RESOLUTION_TO_LATENT:
        raise ConfigError(f"args.resolution: must be a multiple of {RESOLUTION_TO_LATENT}, got {resolution}")
    if a.get("projector_embed_dims"):
        z_dims = [int(z) for z in str(a["projector_embed_dims"]).split(",")]
    else:
        z_dims = []
        for enc in str(a.get("enc_type", "dinov2-vit-b")).split(","):
            m = re.fullmatch(r"dinov2-vit-([sblg])", enc.strip())
            if not m:
                raise ConfigError(f"args.enc_type: unknown encoder {enc!r}; expected dinov2-vit-s/b/l/g")
            z_dims.append(DINOV2_WIDTHS[m.group(1)])
    return _reference_model_config(
        depth=size["depth"], hidden_size=size["hidden_size"], num_heads=size["num_heads"],
        patch_size=size["patch_size"], input_size=resolution // RESOLUTION_TO_LATENT,
        in_channels=LATENT_CHANNELS, num_classes=int(a.get("num_classes", 1000)), mlp_ratio=4.0,
        z_dims=z_dims, projector_dim=2048, qk_norm=bool(a.get("qk_norm", False)),
        label_dropout=0.1)    # hard-coded in the reference model whatever --cfg-prob says


# --------------------------------------------------------------------------------------------
# State dict conversion
# --------------------------------------------------------------------------------------------

# (original pattern, our replacement); applied in order, first match wins
KEY_RULES: list[tuple[str, str]] = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"time_embed.fc1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_embed.fc2.\1"),
    (r"y_embedder\.embedding_table\.weight", r"label_embed.table.weight"),
    (r"pos_embed", r"pos_embed"),
    (r"cls_projectors2\.(weight|bias)", r"cls_embed.proj.\1"),
    (r"wg_norm\.(weight|bias)", r"cls_embed.norm.\1"),
    (r"mask_token", r"sprint.mask_token"),
    (r"fusion_proj\.(weight|bias)", r"sprint.fusion.\1"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.adaln.\2"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj|v_fusion)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(q_norm|k_norm)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"blocks\.(\d+)\.attn\.v1_lambda", r"blocks.\1.attn.v1_lambda"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2|w12|w3)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"projectors\.(\d+)\.0\.(weight|bias)", r"projectors.\1.fc1.\2"),
    (r"projectors\.(\d+)\.2\.(weight|bias)", r"projectors.\1.fc2.\2"),
    (r"projectors\.(\d+)\.4\.(weight|bias)", r"projectors.\1.fc3.\2"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final_layer.adaln.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"final_layer.out.\1"),
    (r"final_layer\.linear_cls\.(weight|bias)", r"final_layer.cls_out.\1"),
]
# Buffers of the reference that we recompute instead of loading (checked, then dropped).
ROPE_KEYS = {"feat_rope.freqs_cos": "rope_cos", "feat_rope.freqs_sin": "rope_sin"}
ROPE_TOLERANCE = 1e-6


def convert_key(key: str) -> str:
    for pattern, replacement in KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise CheckpointError(f"original state_dict key {key!r} is not known to the converter; "
                          f"is this an SR-DiT (SwayStar123/SpeedrunDiT) checkpoint?")


def convert_state_dict(original_sd: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Original key names -> ours. Every key of our model must be produced with its exact shape;
    the RoPE tables are checked against ours and dropped (we recompute them)."""
    from srdit.models import build_model

    with torch.device("meta"):              # shapes only: no memory, no init cost
        ours = build_model(model_cfg).state_dict()
    rope: dict[str, torch.Tensor] = {}
    if model_cfg.rope:
        cos, sin = rope_tables_2d(model_cfg.head_dim, model_cfg.grid_size, model_cfg.rope_theta)
        rope = {"rope_cos": cos, "rope_sin": sin}
    out: dict[str, torch.Tensor] = {}
    for key, value in original_sd.items():
        if key in ROPE_KEYS:
            if not rope:
                raise CheckpointError(f"{key}: the checkpoint has RoPE but model.rope is false")
            ours_table = rope[ROPE_KEYS[key]]
            if value.shape != ours_table.shape or (value.float() - ours_table).abs().max() > ROPE_TOLERANCE:
                raise CheckpointError(f"{key}: does not match our RoPE table (shape {tuple(value.shape)} vs "
                                      f"{tuple(ours_table.shape)}); head_dim or grid size differ from the config")
            continue
        new_key = convert_key(key)
        if new_key == "label_embed.table.weight" and value.shape[0] == model_cfg.num_classes:
            # trained without label dropout: no null row; ours always has one (unused by such a model)
            value = torch.cat([value, value.new_zeros(1, value.shape[1])])
        if new_key not in ours:
            raise CheckpointError(f"{key} -> {new_key}: our model (from the given config) has no such "
                                  f"parameter; the checkpoint and the config disagree")
        if tuple(value.shape) != tuple(ours[new_key].shape):
            raise CheckpointError(f"{key} -> {new_key}: shape {tuple(value.shape)} but our model expects "
                                  f"{tuple(ours[new_key].shape)}; the checkpoint and the config disagree")
        out[new_key] = value
    missing = sorted(set(ours) - set(out))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} of our parameters, e.g. "
                              f"{', '.join(missing[:5])}; the checkpoint and the config disagree")
    return out


def load_converted_model(path: str | Path, model_cfg: ModelConfig | None = None, use_ema: bool = True):
    """(model_cfg, model) from an original training checkpoint; the config comes from its `args`
    unless given. The model is in eval mode, float32, on the CPU."""
    from srdit.models import build_model

    checkpoint = load_original_checkpoint(path)
    if model_cfg is None:
        if "args" not in checkpoint:
            raise CheckpointError(f"{path}: no `args` in the checkpoint; pass the model config explicitly")
        model_cfg = model_config_from_args(checkpoint["args"])
    model = build_model(model_cfg)
    model.load_state_dict(convert_state_dict(original_state_dict(checkpoint, use_ema), model_cfg), strict=True)
    return model_cfg, model.eval()
