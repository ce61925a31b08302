"""Loading and converting the original SR-DiT checkpoints: configs from the reference constructor
kwargs and from a checkpoint's args, the key mapping, and the safe loader."""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from srdit.config import ConfigError, get_config
from srdit.convert import (
    CheckpointError, convert_state_dict, load_converted_model, load_original_checkpoint, model_config_from_args,
    model_config_from_original, original_state_dict,
)
from srdit.models import build_model
from srdit.models.tables import rope_tables_2d

# The public fixture's config.json (fixtures/reference): the reference SiT(**config) kwargs.
FIXTURE_CONFIG = {
    "class_dropout_prob": 0.1, "cls_token_dim": 48, "decoder_hidden_size": 64, "depth": 6, "encoder_depth": 2,
    "fused_attn": True, "hidden_size": 64, "in_channels": 32, "input_size": 8, "mlp_ratio": 4.0,
    "num_classes": 10, "num_heads": 4, "patch_size": 1, "path_type": "edm", "projector_dim": 96,
    "qk_norm": True, "use_cfg": True, "z_dims": [48],
}
SMALL_CONFIG = dict(FIXTURE_CONFIG, depth=5, hidden_size=32, decoder_hidden_size=32, num_heads=2, input_size=6,
                    patch_size=2, in_channels=4, num_classes=3, z_dims=[8], projector_dim=12, mlp_ratio=2.0)


def original_state_dict_for(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict under the reference's key names and shapes (fixture README table)."""
    D, C, p, depth = config["hidden_size"], config["in_channels"], config["patch_size"], config["depth"]
    d, Z, P, K = D // config["num_heads"], config["z_dims"][0], config["projector_dim"], config["num_classes"]
    M, HW = int(D * config["mlp_ratio"]), (config["input_size"] // p) ** 2
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (K + int(config["class_dropout_prob"] > 0), D),
        "pos_embed": (1, HW + 1, D), "cls_projectors2.weight": (D, Z), "cls_projectors2.bias": (D,),
        "wg_norm.weight": (D,), "mask_token": (1, 1, D), "fusion_proj.weight": (D, 2 * D), "fusion_proj.bias": (D,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
        "final_layer.linear_cls.weight": (Z, D), "final_layer.linear_cls.bias": (Z,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (M, D), b + "mlp.fc1.bias": (M,),
            b + "mlp.fc2.weight": (D, M), b + "mlp.fc2.bias": (D,),
        })
        if config["qk_norm"]:
            shapes.update({b + "attn.q_norm.weight": (d,), b + "attn.k_norm.weight": (d,)})
        if i > 0:
            shapes[b + "attn.v1_lambda"] = ()
    for j, z in enumerate(config["z_dims"]):
        shapes.update({f"projectors.{j}.0.weight": (P, D), f"projectors.{j}.0.bias": (P,),
                       f"projectors.{j}.2.weight": (P, P), f"projectors.{j}.2.bias": (P,),
                       f"projectors.{j}.4.weight": (z, P), f"projectors.{j}.4.bias": (z,)})
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = rope_tables_2d(d, config["input_size"] // p)
    return sd


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def test_config_from_fixture_kwargs():
    cfg = model_config_from_original(FIXTURE_CONFIG)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.input_size, cfg.in_channels) == (6, 64, 4, 8, 32)
    assert cfg.cls_token_dim == 48 and cfg.projector_dim == 96 and cfg.num_classes == 10 and cfg.qk_norm
    assert cfg.sprint.enabled and (cfg.sprint.encoder_depth, cfg.sprint.decoder_depth) == (2, 2)
    assert (cfg.norm, cfg.rope, cfg.value_residual) == ("rms", True, "scalar")
    assert cfg.class_token and cfg.align_depths == [2]
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(cfg).parameters()) == 521_157


def test_config_from_checkpoint_args_is_the_paper_model():
    train_args = argparse.Namespace(model="SiT-B/1", resolution=256, qk_norm=True, enc_type="dinov2-vit-b",
                                    num_classes=1000, cfg_prob=0.1, exp_name="x")
    assert model_config_from_args(train_args) == get_config("b1_srdit").model
    generate_args = dict(model="SiT-B/1", resolution=512, qk_norm=True, projector_embed_dims="768", num_classes=1000)
    assert model_config_from_args(generate_args) == get_config("b1_srdit_512").model
    xl = model_config_from_args(dict(model="SiT-XL/2", resolution=256, enc_type="dinov2-vit-l"))
    assert (xl.depth, xl.hidden_size, xl.patch_size, xl.cls_token_dim, xl.qk_norm) == (28, 1152, 2, 1024, False)


@pytest.mark.parametrize("bad, key", [
    (dict(model="DiT-B/2", resolution=256), "args.model"),
    (dict(model="SiT-B/1", resolution=256, enc_type="clip-vit-b"), "args.enc_type"),
    (dict(model="SiT-B/1", resolution=250), "args.resolution"),
])
def test_bad_args_are_refused(bad, key):
    with pytest.raises(ConfigError, match=key):
        model_config_from_args(bad)


def test_bad_reference_kwargs_are_refused():
    with pytest.raises(ConfigError, match="decoder_hidden_size"):
        model_config_from_original(dict(FIXTURE_CONFIG, decoder_hidden_size=768))
    with pytest.raises(ConfigError, match="z_dims"):
        model_config_from_original(dict(FIXTURE_CONFIG, z_dims=[48, 32]))
    with pytest.raises(ConfigError, match="depth"):
        model_config_from_original(dict(FIXTURE_CONFIG, depth=3))
    with pytest.raises(ConfigError, match="missing"):
        model_config_from_original({"depth": 6})


# --------------------------------------------------------------------------------------------
# State dict conversion
# --------------------------------------------------------------------------------------------

def test_every_original_key_maps_to_ours():
    cfg = model_config_from_original(SMALL_CONFIG)
    original = original_state_dict_for(SMALL_CONFIG)
    ours = convert_state_dict(original, cfg)
    model = build_model(cfg)
    model.load_state_dict(ours, strict=True)
    sd = model.state_dict()
    # a sample of the mapping, value for value
    pairs = {
        "x_embedder.proj.weight": "patch_embed.proj.weight",
        "t_embedder.mlp.2.bias": "time_embed.fc2.bias",
        "y_embedder.embedding_table.weight": "label_embed.table.weight",
        "cls_projectors2.weight": "cls_embed.proj.weight",
        "wg_norm.weight": "cls_embed.norm.weight",
        "mask_token": "sprint.mask_token",
        "fusion_proj.weight": "sprint.fusion.weight",
        "blocks.3.adaLN_modulation.1.weight": "blocks.3.adaln.weight",
        "blocks.2.attn.qkv.bias": "blocks.2.attn.qkv.bias",
        "blocks.4.attn.q_norm.weight": "blocks.4.attn.q_norm.weight",
        "blocks.1.attn.v1_lambda": "blocks.1.attn.v1_lambda",
        "blocks.0.mlp.fc2.weight": "blocks.0.mlp.fc2.weight",
        "projectors.0.4.weight": "projectors.0.fc3.weight",
        "projectors.0.2.bias": "projectors.0.fc2.bias",
        "final_layer.adaLN_modulation.1.bias": "final_layer.adaln.bias",
        "final_layer.linear.weight": "final_layer.out.weight",
        "final_layer.linear_cls.bias": "final_layer.cls_out.bias",
        "pos_embed": "pos_embed",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(sd[mine], original[theirs]), (theirs, mine)
    assert len(ours) == len(original) - 2          # the two RoPE tables are recomputed, not loaded
    x = torch.randn(2, 4, 6, 6)
    out = model.eval()(x, torch.rand(2), torch.tensor([0, 3]), torch.randn(2, 8))
    assert out.velocity.shape == x.shape and torch.isfinite(out.velocity).all()


def test_label_table_without_null_row_is_padded():
    config = dict(SMALL_CONFIG, class_dropout_prob=0.0)
    cfg = model_config_from_original(config)
    original = original_state_dict_for(config)
    assert original["y_embedder.embedding_table.weight"].shape[0] == 3
    table = convert_state_dict(original, cfg)["label_embed.table.weight"]
    assert table.shape[0] == 4 and table[3].abs().max() == 0
    assert torch.equal(table[:3], original["y_embedder.embedding_table.weight"])


def test_conversion_errors_name_the_key():
    cfg = model_config_from_original(SMALL_CONFIG)
    original = original_state_dict_for(SMALL_CONFIG)
    missing = {k: v for k, v in original.items() if k != "fusion_proj.bias"}
    with pytest.raises(CheckpointError, match="sprint.fusion.bias"):
        convert_state_dict(missing, cfg)
    with pytest.raises(CheckpointError, match="blocks.0.attn.mystery"):
        convert_state_dict(dict(original, **{"blocks.0.attn.mystery": torch.zeros(1)}), cfg)
    with pytest.raises(CheckpointError, match="mask_token.*shape"):
        convert_state_dict(dict(original, mask_token=torch.zeros(1, 1, 7)), cfg)
    with pytest.raises(CheckpointError, match="feat_rope.freqs_cos"):
        convert_state_dict(dict(original, **{"feat_rope.freqs_cos": original["feat_rope.freqs_cos"] + 0.01}), cfg)
    # a checkpoint of a deeper model than the config says
    deeper = model_config_from_original(dict(SMALL_CONFIG, depth=4))
    with pytest.raises(CheckpointError, match="blocks.4"):
        convert_state_dict(original, deeper)


# --------------------------------------------------------------------------------------------
# Loading checkpoint files
# --------------------------------------------------------------------------------------------

def _training_checkpoint(config: dict) -> dict:
    model_sd, ema_sd = original_state_dict_for(config, seed=0), original_state_dict_for(config, seed=1)
    args = argparse.Namespace(model="SiT-B/1", resolution=256, qk_norm=True, enc_type="dinov2-vit-b",
                              num_classes=1000, learning_rate=1e-4, mixed_precision="bf16", fused_attn=True)
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    return {"model": model_sd, "ema": ema_sd, "opt": opt, "args": args, "steps": 400000}


def test_training_checkpoint_with_namespace_loads(tmp_path):
    path = tmp_path / "0400000.pt"
    torch.save(_training_checkpoint(SMALL_CONFIG), path)
    ckpt = load_original_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].model == "SiT-B/1"
    assert ckpt["steps"] == 400000 and set(ckpt) == {"model", "ema", "opt", "args", "steps"}
    assert model_config_from_args(ckpt["args"]) == get_config("b1_srdit").model
    ema, raw = original_state_dict(ckpt), original_state_dict(ckpt, use_ema=False)
    assert torch.equal(ema["mask_token"], ckpt["ema"]["mask_token"])
    assert torch.equal(raw["mask_token"], ckpt["model"]["mask_token"])
    # the whole path, with the config given explicitly (the args describe a B/1, too big for a test)
    cfg, model = load_converted_model(path, model_config_from_original(SMALL_CONFIG))
    assert not model.training
    assert torch.equal(model.sprint.mask_token, ckpt["ema"]["mask_token"])


class Payload:
    """A pickled object whose unpickling would run code (here: write a file)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_checkpoint_with_custom_object_is_refused(tmp_path):
    witness = tmp_path / "code_ran"
    ckpt = _training_checkpoint(SMALL_CONFIG)
    ckpt["extra"] = Payload(witness)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:         # torch.save would pickle Payload the same way
        torch.save(ckpt, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_original_checkpoint(path)
    assert not witness.exists()


def test_bare_state_dict_and_safetensors(tmp_path):
    original = original_state_dict_for(SMALL_CONFIG)
    pt, st = tmp_path / "sd.pt", tmp_path / "sd.safetensors"
    torch.save({"module." + k: v for k, v in original.items()}, pt)      # a DDP-wrapped save
    save_file({k: v.contiguous() for k, v in original.items()}, str(st))
    for path in (pt, st):
        sd = original_state_dict(load_original_checkpoint(path))
        assert set(sd) == set(original) and torch.equal(sd["mask_token"], original["mask_token"])
    with pytest.raises(CheckpointError, match="'ema'"):
        original_state_dict({"model": original, "note": "no ema"})
    with pytest.raises(FileNotFoundError):
        load_original_checkpoint(tmp_path / "absent.pt")
