"""The SR-DiT transformer: exact parameter counts, the reference initialisation, SPRINT routing,
every ablation switch (forward + backward), and refusal of bad configs and inputs."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from srdit.config import ConfigError, ModelConfig, SprintConfig, get_config
from srdit.models import ModelOutput, build_model
from srdit.models.tables import apply_rope, rope_tables_2d, rotate_adjacent_pairs, sincos_pos_embed_2d


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    """6 blocks (2 dense / 2 sparse / 2 dense), width 32, 4 heads of 8, 4x4 latent, 17 tokens."""
    base = dict(depth=6, hidden_size=32, num_heads=4, patch_size=1, input_size=4, in_channels=3, num_classes=5,
                cls_token_dim=12, projector_dim=16, align_depths=[2],
                sprint=SprintConfig(enabled=True, encoder_depth=2, decoder_depth=2, drop_ratio=0.75, path_drop=0.05))
    base.update(overrides)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter except pos_embed: the reference zero-initialises adaLN, the output
    layers and the mask token, so without this most paths would be invisible to the tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if p.ndim >= 2:
                bound = (6.0 / (p.shape[0] + p[0].numel())) ** 0.5 * (2.0 if "adaln" in name else 1.0)
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif name.endswith("v1_lambda"):
                p.copy_(torch.rand((), generator=g) * 0.6 + 0.2)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.25 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if getattr(model, "sprint", None) is not None:
            model.sprint.mask_token.copy_(0.5 * torch.randn(model.sprint.mask_token.shape, generator=g))
    return model


def inputs(cfg: ModelConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    cls = torch.randn(batch, cfg.cls_token_dim, generator=g) if cfg.class_token else None
    return x, t, y, cls


def count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------

def test_parameter_counts_of_the_paper_models():
    assert count(get_config("b1_srdit").model) == 140_235_051
    assert count(get_config("b1_srdit_512").model) == 140_824_875


def test_parameter_breakdown_of_srdit_b1():
    with torch.device("meta"):
        model = build_model(get_config("b1_srdit").model)
    by_prefix = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert by_prefix("projectors.") == 7_344_896
    assert by_prefix("blocks.") == 127_541_771
    assert by_prefix("final_layer.") == 1_796_384
    assert by_prefix("pos_embed") == 197_376
    assert by_prefix("sprint.") == 768 + 1_180_416
    assert by_prefix("time_embed.") == 787_968 and by_prefix("label_embed.") == 768_768
    assert by_prefix("cls_embed.") == 590_592 + 768 and by_prefix("patch_embed.") == 25_344
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 140_037_675
    # 12 blocks, 11 value-residual lambdas (none in block 0)
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("v1_lambda")) == 11
    assert not hasattr(model.blocks[0].attn, "v1_lambda")


def test_info_command_prints_the_count():
    out = subprocess.run([sys.executable, "-m", "srdit", "info", "b1_srdit"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "parameters: 140,235,051" in out.stdout


# --------------------------------------------------------------------------------------------
# Initialisation and fixed tables
# --------------------------------------------------------------------------------------------

def test_reference_initialisation():
    torch.manual_seed(0)
    cfg = tiny(value_residual="scalar", depth=6)
    model = build_model(cfg)
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict() and "rope_cos" not in model.state_dict()
    assert not any(n.startswith("rope") for n, _ in model.named_parameters())
    for block in model.blocks:
        assert block.adaln.weight.abs().max() == 0 and block.adaln.bias.abs().max() == 0
    fl = model.final_layer
    for layer in (fl.adaln, fl.out, fl.cls_out):
        assert layer.weight.abs().max() == 0 and layer.bias.abs().max() == 0
    assert model.sprint.mask_token.abs().max() == 0
    assert all(b.attn.v1_lambda.item() == 0.5 for b in model.blocks[1:])
    qkv = model.blocks[0].attn.qkv
    bound = (6 / (qkv.weight.shape[0] + qkv.weight.shape[1])) ** 0.5
    assert qkv.weight.abs().max() <= bound and qkv.weight.std() > bound / 3 and qkv.bias.abs().max() == 0
    # zero-initialised outputs: velocity and class-token velocity are exactly zero at init
    out = model.eval()(*inputs(cfg))
    assert out.velocity.abs().max() == 0 and out.cls_velocity.abs().max() == 0


def test_sincos_table_layout():
    table = sincos_pos_embed_2d(8, 3, leading_zero_rows=1)
    assert table.shape == (10, 8) and table[0].abs().max() == 0
    # token 1 + 3 i + j: the first half encodes the column j, the second the row i, each as
    # [sin | cos] over the frequencies 10000^(-k/2), k = 0, 1, i.e. 1 and 0.01

    def half(position):
        angles = torch.tensor([position * 1.0, position * 0.01])
        return torch.cat([angles.sin(), angles.cos()])

    i, j = 2, 1
    assert torch.allclose(table[1 + 3 * i + j], torch.cat([half(j), half(i)]))


def test_rope_tables_and_rotation():
    cos, sin = rope_tables_2d(head_dim=8, grid_size=3)
    assert cos.shape == (9, 8)
    # the first half turns with the row index, the second with the column; pairs share a frequency
    i, j = 2, 1
    expected = torch.tensor([i, i, i / 100, i / 100, j, j, j / 100, j / 100], dtype=torch.float32)
    assert torch.allclose(cos[3 * i + j], expected.cos()) and torch.allclose(sin[3 * i + j], expected.sin())
    assert torch.equal(rotate_adjacent_pairs(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-2.0, 1.0, -4.0, 3.0]))
    # a rotation: norms of each pair kept, position (0, 0) is the identity
    x = torch.randn(1, 1, 9, 8)
    r = apply_rope(x, cos, sin)
    assert torch.allclose(r.unflatten(-1, (4, 2)).norm(dim=-1), x.unflatten(-1, (4, 2)).norm(dim=-1), atol=1e-6)
    assert torch.equal(r[..., 0, :], x[..., 0, :])


def test_class_token_is_not_rotated():
    model = build_model(tiny())
    assert torch.equal(model.rope_cos[0], torch.ones(8)) and torch.equal(model.rope_sin[0], torch.zeros(8))
    cos, _ = rope_tables_2d(8, 4)
    assert torch.equal(model.rope_cos[1:], cos)


# --------------------------------------------------------------------------------------------
# Forward behaviour
# --------------------------------------------------------------------------------------------

def test_eval_is_deterministic_and_shapes():
    cfg = tiny()
    model = randomize(build_model(cfg)).eval()
    x, t, y, cls = inputs(cfg)
    a, b = model(x, t, y, cls), model(x, t, y, cls)
    assert isinstance(a, ModelOutput)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.cls_velocity, b.cls_velocity)
    assert a.velocity.shape == x.shape and a.cls_velocity.shape == cls.shape
    assert len(a.zs) == 1 and a.zs[0].shape == (3, 17, cfg.cls_token_dim)
    v, v_cls = model.forward_velocity(x, t, y, cls)
    assert torch.equal(v, a.velocity) and torch.equal(v_cls, a.cls_velocity)


def test_inputs_are_not_modified():
    cfg = tiny()
    model = randomize(build_model(cfg)).train()
    x, t, y, cls = inputs(cfg)
    copies = [v.clone() for v in (x, t, y, cls)]
    model(x, t, y, cls).velocity.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip((x, t, y, cls), copies))


def test_uncond_changes_output_and_equals_path_drop():
    cfg = tiny()
    model = randomize(build_model(cfg)).eval()
    x, t, y, cls = inputs(cfg)
    cond, uncond = model(x, t, y, cls), model(x, t, y, cls, uncond=True)
    assert (cond.velocity - uncond.velocity).abs().max() > 1e-3
    assert (cond.cls_velocity - uncond.cls_velocity).abs().max() > 1e-3
    # the encoder (hence REPA features) is untouched by the sparse-path drop
    assert torch.equal(cond.zs[0], uncond.zs[0])
    # training-mode path drop (computed as g * 0 + mask) gives the same function
    no_drop = torch.zeros(3, dtype=torch.bool)
    train = model.train()(x, t, y, cls, path_drop=True, drop_labels=no_drop)
    assert torch.allclose(train.velocity, uncond.velocity, atol=1e-5)
    # ... and does not depend on which tokens the (discarded) sparse path kept
    ids = torch.stack([torch.randperm(17)[:4] for _ in range(3)])
    train2 = model(x, t, y, cls, path_drop=True, drop_labels=no_drop, ids_keep=ids)
    assert torch.allclose(train2.velocity, uncond.velocity, atol=1e-5)


def test_sprint_train_mode_routes_only_the_kept_tokens():
    cfg = tiny()
    model = randomize(build_model(cfg))
    x, t, y, cls = inputs(cfg)
    no_drop = torch.zeros(3, dtype=torch.bool)
    dense = model.eval()(x, t, y, cls)
    # keeping every token, in a shuffled order, is the dense function (up to rounding)
    perm = torch.stack([torch.randperm(17) for _ in range(3)])
    shuffled = model.train()(x, t, y, cls, ids_keep=perm, path_drop=False, drop_labels=no_drop)
    assert torch.allclose(shuffled.velocity, dense.velocity, atol=1e-5)
    assert torch.allclose(shuffled.cls_velocity, dense.cls_velocity, atol=1e-5)
    # a real subset: the middle blocks see only those tokens; dropped positions hold the mask token
    ids = torch.tensor([[0, 5, 9, 16], [3, 2, 1, 4], [16, 0, 8, 7]])
    capture = {}
    sparse = model(x, t, y, cls, ids_keep=ids, path_drop=False, drop_labels=no_drop, capture=capture)
    assert capture["block2"].shape == (3, 4, 32) and capture["block3"].shape == (3, 4, 32)
    assert capture["block1"].shape == capture["block4"].shape == (3, 17, 32)
    g_pad, mask = capture["g_pad"], model.sprint.mask_token[0, 0]
    for b in range(3):
        kept = set(ids[b].tolist())
        for pos in range(17):
            if pos in kept:
                assert torch.equal(g_pad[b, pos], capture["block3"][b, ids[b].tolist().index(pos)])
            else:
                assert torch.equal(g_pad[b, pos], mask)
    assert (sparse.velocity - dense.velocity).abs().max() > 1e-3
    # the encoder (REPA features) is dense in both
    assert torch.allclose(sparse.zs[0], dense.zs[0], atol=1e-6)
    # a sample's output depends on its own kept set only: change sample 1's set, 0 and 2 stay
    ids2 = ids.clone()
    ids2[1] = torch.tensor([10, 11, 12, 13])
    other = model(x, t, y, cls, ids_keep=ids2, path_drop=False, drop_labels=no_drop)
    assert torch.equal(other.velocity[[0, 2]], sparse.velocity[[0, 2]])
    assert (other.velocity[1] - sparse.velocity[1]).abs().max() > 1e-3


def test_random_token_drop_keeps_a_quarter_including_the_class_token():
    cfg = tiny()
    model = randomize(build_model(cfg)).train()
    capture = {}
    torch.manual_seed(0)
    model(*inputs(cfg), path_drop=False, capture=capture)
    assert capture["block2"].shape[1] == max(1, int(17 * 0.25)) == 4
    # each draw is fresh: two training forwards differ
    a = model(*inputs(cfg), drop_labels=torch.zeros(3, dtype=torch.bool)).velocity
    b = model(*inputs(cfg), drop_labels=torch.zeros(3, dtype=torch.bool)).velocity
    assert not torch.equal(a, b)


def test_label_dropout():
    cfg = tiny(label_dropout=0.5)
    model = randomize(build_model(cfg))
    x, t, y, cls = inputs(cfg)
    null = torch.full_like(y, cfg.num_classes)
    forced = model.eval()(x, t, y, cls, drop_labels=torch.ones(3, dtype=torch.bool))
    assert torch.equal(forced.velocity, model(x, t, null, cls).velocity)
    # eval never drops labels at random; training does (probability 0.5 over 3 x 20 samples)
    assert torch.equal(model(x, t, y, cls).velocity, model(x, t, y, cls).velocity)
    model.train()
    torch.manual_seed(0)
    ids = torch.arange(17).expand(3, -1).contiguous()
    outs = [model(x, t, y, cls, ids_keep=ids, path_drop=False).velocity for _ in range(20)]
    assert len({tuple(o.flatten()[:4].tolist()) for o in outs}) > 1


def test_draw_path_drop():
    always = build_model(tiny(sprint=SprintConfig(path_drop=1.0)))
    never = build_model(tiny(sprint=SprintConfig(path_drop=0.0)))
    assert always.draw_path_drop() and not never.draw_path_drop()
    half = build_model(tiny(sprint=SprintConfig(path_drop=0.5)))
    draws = [half.draw_path_drop(torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == [half.draw_path_drop(torch.Generator().manual_seed(s)) for s in range(40)]
    assert 5 < sum(draws) < 35
    assert not build_model(tiny(sprint=SprintConfig(enabled=False))).draw_path_drop()


def test_bf16_autocast_runs():
    cfg = tiny()
    model = randomize(build_model(cfg)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs(cfg))
    loss = out.velocity.float().square().mean() + out.cls_velocity.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[3].attn.qkv.weight.grad is not None


# --------------------------------------------------------------------------------------------
# Every ablation switch: builds, runs forward + backward, every parameter gets a gradient
# --------------------------------------------------------------------------------------------

SWITCHES = {
    "srdit": {},
    "layernorm": dict(norm="layer"),
    "no_rope": dict(rope=False),
    "no_qk_norm": dict(qk_norm=False),
    "no_value_residual": dict(value_residual="none"),
    "linear_value_residual": dict(value_residual="linear"),
    "swiglu": dict(mlp_act="swiglu"),
    "relu2": dict(mlp_act="relu2"),
    "no_class_token": dict(class_token=False),
    "no_sprint": dict(sprint=SprintConfig(enabled=False), align_depths=[4]),
    "sprint_no_middle": dict(sprint=SprintConfig(encoder_depth=3, decoder_depth=3), align_depths=[1, 3]),
    "two_align_depths": dict(align_depths=[1, 2]),
    "no_repa": dict(align_depths=[]),
    "patch2_drop_half": dict(input_size=8, patch_size=2, sprint=SprintConfig(drop_ratio=0.5)),
    "reg_baseline": dict(norm="layer", rope=False, qk_norm=False, value_residual="none",
                         sprint=SprintConfig(enabled=False), align_depths=[4]),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_switch_builds_runs_and_trains(name):
    cfg = tiny(**SWITCHES[name])
    model = randomize(build_model(cfg)).train()
    x, t, y, cls = inputs(cfg)
    out = model(x, t, y, cls, path_drop=False)
    assert out.velocity.shape == x.shape
    assert len(out.zs) == len(cfg.align_depths)
    T = cfg.num_tokens
    assert all(z.shape == (3, T, cfg.cls_token_dim) for z in out.zs)
    assert (out.cls_velocity is None) == (not cfg.class_token)
    loss = out.velocity.square().mean() + sum(z.square().mean() for z in out.zs)
    if out.cls_velocity is not None:
        loss = loss + out.cls_velocity.square().mean()
    loss.backward()
    # DDP / ZeRO without find_unused_parameters need a gradient for every trainable parameter
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        a, b = model(x, t, y, cls), model(x, t, y, cls)
    assert torch.equal(a.velocity, b.velocity)


def test_switches_change_the_parameters_they_should():
    names = lambda **kw: {n for n, _ in build_model(tiny(**kw)).named_parameters()}  # noqa: E731
    assert "blocks.1.mlp.w12.weight" in names(mlp_act="swiglu")
    assert "blocks.1.attn.v_fusion.weight" in names(value_residual="linear")
    assert not any("v1_lambda" in n for n in names(value_residual="none"))
    assert "cls_embed.norm.bias" in names(norm="layer") and "cls_embed.norm.bias" not in names()
    assert not any(n.startswith(("cls_embed", "final_layer.cls_out")) for n in names(class_token=False))
    assert not any(n.startswith("sprint") for n in names(sprint=SprintConfig(enabled=False), align_depths=[2]))
    assert not any("q_norm" in n for n in names(qk_norm=False))
    assert build_model(tiny(class_token=False)).pos_embed.shape == (1, 16, 32)
    assert build_model(tiny(rope=False)).rope_cos is None
    swiglu = build_model(tiny(mlp_act="swiglu", hidden_size=48, num_heads=4, cls_token_dim=12))
    assert swiglu.blocks[0].mlp.w3.in_features == int(2 / 3 * 48 * 4) == 128


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (dict(num_heads=5), "num_heads"),
    (dict(hidden_size=24, num_heads=4), "rope"),                       # head_dim 6 not divisible by 4
    (dict(input_size=5, patch_size=2), "patch_size"),
    (dict(sprint=SprintConfig(encoder_depth=4, decoder_depth=3)), "sprint.encoder_depth"),
    (dict(sprint=SprintConfig(drop_ratio=1.0)), "sprint.drop_ratio"),
    (dict(align_depths=[3]), "align_depths"),                          # inside the sparse path
    (dict(align_depths=[7], sprint=SprintConfig(enabled=False)), "align_depths"),
    (dict(depth=1, sprint=SprintConfig(enabled=False), align_depths=[1]), "value_residual"),
    (dict(mlp_act="geglu"), "mlp_act"),
    (dict(norm="batch"), "norm"),
    (dict(value_residual="gated"), "value_residual"),
    (dict(label_dropout=1.0), "label_dropout"),
    (dict(depth=0), "depth"),
])
def test_bad_configs_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        build_model(tiny(**overrides))


def test_bad_inputs_are_refused():
    cfg = tiny()
    model = build_model(cfg).eval()
    x, t, y, cls = inputs(cfg)
    with pytest.raises(ValueError, match="cls_token"):
        model(x, t, y)
    with pytest.raises(ValueError, match="x: expected shape"):
        model(x[:, :2], t, y, cls)
    with pytest.raises(ValueError, match="ids_keep"):
        model(x, t, y, cls, ids_keep=torch.zeros(3, 4, dtype=torch.int32))
    no_cls = build_model(tiny(class_token=False))
    with pytest.raises(ValueError, match="no class token"):
        no_cls(x, t, y, cls)
    dense = build_model(tiny(sprint=SprintConfig(enabled=False)))
    with pytest.raises(ValueError, match="path_drop_guidance"):
        dense(x, t, y, cls, uncond=True)


def test_config_fields_all_reach_the_model():
    """A guard for future ModelConfig fields: each one must change the built model or its output."""
    known = {"depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes",
             "mlp_ratio", "mlp_act", "norm", "rope", "rope_theta", "qk_norm", "value_residual", "class_token",
             "cls_token_dim", "sprint", "align_depths", "projector_dim", "label_dropout"}
    assert {f.name for f in dataclasses.fields(ModelConfig)} == known
