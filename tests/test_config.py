"""Typed config: presets resolve, bad input is refused with the key named."""
import json
import subprocess
import sys

import pytest

from srdit.config import (
    ConfigError, ExperimentConfig, TEACHER_DIMS, build_config, from_dict, get_config, list_presets,
    load_registry, parse_overrides, resolve_entry,
)

LADDER = [
    "b1_reg_invae", "b1_sprint", "b1_sprint_rms", "b1_sprint_rms_rope", "b1_sprint_rms_rope_qknorm",
    "b1_sprint_rms_rope_qknorm_valres", "b1_sprint_rms_rope_qknorm_valres_cfm",
    "b1_sprint_rms_rope_qknorm_valres_cfm_ts", "b1_srdit",
]


def test_every_preset_resolves_and_validates():
    names = list_presets()
    for name in LADDER + ["b1_srdit_512", "b1_sprint_rms_rope_qknorm_valres_tcfm"]:
        assert name in names
    for name in names:
        cfg = get_config(name)
        assert cfg.name == name
        assert TEACHER_DIMS[cfg.data.teacher] == cfg.model.cls_token_dim


def test_ladder_toggles_one_thing_at_a_time():
    cfgs = [get_config(n) for n in LADDER]
    base = cfgs[0]
    assert (base.model.norm, base.model.rope, base.model.qk_norm, base.model.value_residual) == ("layer", False, False, "none")
    assert not base.model.sprint.enabled and base.model.align_depths == [4]
    assert base.objective.cfm_coeff == 0 and not base.objective.time_shift
    assert cfgs[1].model.sprint.enabled and cfgs[1].model.align_depths == [2]
    assert cfgs[2].model.norm == "rms"
    assert cfgs[3].model.rope
    assert cfgs[4].model.qk_norm
    assert cfgs[5].model.value_residual == "scalar"
    assert cfgs[6].objective.cfm_coeff == 0.05 and cfgs[6].objective.cfm_weighting == "uniform"
    assert cfgs[7].objective.time_shift and cfgs[7].sample.time_shift
    final = cfgs[8]
    assert final.sample.balanced and not cfgs[7].sample.balanced
    # the final recipe (docs/recipe.md section 1)
    m, o, t = final.model, final.objective, final.train
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.input_size, m.in_channels) == (12, 768, 12, 1, 16, 32)
    assert (o.cls_coeff, o.proj_coeff, o.cfm_coeff, o.shift_base) == (0.03, 0.5, 0.05, 4096)
    assert (t.lr, t.global_batch, t.ema_decay, t.grad_clip, t.max_steps) == (1e-4, 256, 0.9999, 1.0, 400_000)
    assert m.sprint.drop_ratio == 0.75 and m.sprint.path_drop == 0.05 and m.label_dropout == 0.1


def test_512_preset():
    cfg = get_config("b1_srdit_512")
    assert cfg.data.resolution == 512 and cfg.model.input_size == 32


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"model\.depht: unknown key; allowed keys: .*depth"):
        get_config("b1_srdit", overrides={"model": {"depht": 3}})


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.norm: bad value 'batch'; allowed: 'layer', 'rms'"):
        get_config("b1_srdit", overrides={"model": {"norm": "batch"}})
    with pytest.raises(ConfigError, match=r"model\.value_residual: bad value 'vector'"):
        get_config("b1_srdit", overrides={"model": {"value_residual": "vector"}})
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        get_config("b1_srdit", overrides={"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"model\.rope: expected true or false"):
        get_config("b1_srdit", overrides={"model": {"rope": "yes"}})


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"model\.sprint\.encoder_depth: .*deeper than model\.depth"):
        get_config("b1_srdit", overrides={"model": {"depth": 3}})
    with pytest.raises(ConfigError, match=r"model\.rope: .*head_dim must be divisible by 4"):
        get_config("b1_srdit", overrides={"model": {"hidden_size": 754, "num_heads": 13}})
    # the same width without RoPE is fine
    get_config("b1_srdit", overrides={"model": {"hidden_size": 754, "num_heads": 13, "rope": False}})
    with pytest.raises(ConfigError, match=r"model\.align_depths: 4 lies inside the SPRINT sparse path"):
        get_config("b1_srdit", overrides={"model": {"align_depths": [4]}})
    with pytest.raises(ConfigError, match=r"model\.num_heads: hidden_size 768 is not divisible"):
        get_config("b1_srdit", overrides={"model": {"num_heads": 10}})
    with pytest.raises(ConfigError, match=r"model\.cls_token_dim: 768 does not match data\.teacher dinov2_vitl14"):
        get_config("b1_srdit", overrides={"data": {"teacher": "dinov2_vitl14"}})
    with pytest.raises(ConfigError, match=r"train\.micro_batch"):
        get_config("b1_srdit", overrides={"train": {"micro_batch": 30}})
    with pytest.raises(ConfigError, match=r"model\.input_size: 16 does not match data\.resolution 512"):
        get_config("b1_srdit", overrides={"data": {"resolution": 512}})


def test_unknown_preset_and_size():
    with pytest.raises(ConfigError, match=r"ablation 'b1_nope': unknown; allowed: .*b1_srdit"):
        get_config("b1_nope")
    with pytest.raises(ConfigError, match=r"model\.size: unknown size 'Q/1'; allowed: .*B/1"):
        build_config({"model": {"size": "Q/1"}})


def test_model_sizes_expand():
    cfg = build_config({"model": {"size": "XL/1", "sprint": {"enabled": False}, "align_depths": [8]}})
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads) == (28, 1152, 16)


def test_extra_registry_and_parent_chain(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("my_run:\n  parent: b1_srdit\n  description: deeper\n  model: {depth: 14}\n")
    cfg = get_config("my_run", extra)
    assert cfg.model.depth == 14 and cfg.sample.balanced and cfg.model.value_residual == "scalar"
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop_a: {parent: loop_b}\nloop_b: {parent: loop_a}\n")
    with pytest.raises(ConfigError, match="parent cycle"):
        resolve_entry("loop_a", load_registry(bad))
    bad.write_text("x: {parent: b1_srdit, modle: {depth: 3}}\n")
    with pytest.raises(ConfigError, match=r"ablations\.x\.modle: unknown key"):
        load_registry(bad)


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["model.depth=4", "train.lr=2e-4", "model.rope=false"]) == {
        "model": {"depth": 4, "rope": False}, "train": {"lr": "2e-4"}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["model.depth"])


def test_json_roundtrip():
    cfg = get_config("b1_srdit")
    again = from_dict(ExperimentConfig, json.loads(cfg.to_json()))
    assert again == cfg


def test_info_cli_reports_errors_cleanly():
    out = subprocess.run([sys.executable, "-m", "srdit", "info", "b1_srdit", "--set", "model.norm=batch"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "model.norm: bad value 'batch'; allowed: 'layer', 'rms'" in out.stderr


def test_yaml_exponent_strings_become_numbers():
    # YAML 1.1 reads `lr: 2e-4` as a string; the typed config turns it into the number
    cfg = get_config("b1_srdit", overrides=parse_overrides(["train.lr=2e-4"]))
    assert cfg.train.lr == 2e-4


def test_guidance_needs_an_unconditional_branch():
    with pytest.raises(ConfigError, match=r"sample\.path_drop_guidance: true needs model\.sprint\.enabled"):
        get_config("b1_reg_invae", overrides={"sample": {"cfg_scale": 1.5}})
    get_config("b1_reg_invae", overrides={"sample": {"cfg_scale": 1.5, "path_drop_guidance": False}})
    with pytest.raises(ConfigError, match=r"sample\.null_label_guidance"):
        get_config("b1_srdit", overrides={"sample": {"cfg_scale": 1.5, "path_drop_guidance": False,
                                                     "null_label_guidance": False}})


def test_guidance_scale_below_one_is_refused_at_config_time():
    # The reference guides only above 1; a scale below 1 would silently sample unguided there.
    with pytest.raises(ConfigError, match=r"sample\.cfg_scale: 0\.5 is below 1"):
        get_config("b1_srdit", overrides={"sample": {"cfg_scale": 0.5}})
    assert get_config("b1_srdit", overrides={"sample": {"cfg_scale": 1.0}}).sample.cfg_scale == 1.0


def test_evaluation_only_rows_share_runs_but_changed_children_train_their_own(tmp_path):
    from srdit.config import inherited_meta

    extra = tmp_path / "mine.yaml"
    extra.write_text("b1_srdit_swiglu:\n  parent: b1_srdit\n  model: {mlp_act: swiglu}\n"
                     "b1_srdit_nfe50:\n  parent: b1_srdit\n  sample: {num_steps: 50}\n")
    registry = load_registry(extra)
    trained = "b1_sprint_rms_rope_qknorm_valres_cfm_ts"
    assert inherited_meta("b1_srdit", registry, "train_from") == trained
    assert inherited_meta("b1_srdit_ckpt100k", registry, "train_from") == trained
    assert inherited_meta("b1_valres_cfg2.3_gh0.75", registry, "train_from") == "b1_sprint_rms_rope_qknorm_valres"
    assert inherited_meta("b1_srdit_nfe50", registry, "train_from") == trained
    assert inherited_meta("b1_srdit_swiglu", registry, "train_from") is None


def test_packaged_registry_is_the_config_registry_and_fits_the_schema():
    """srdit/presets/ablations.yaml (what the package loads) is config/ablations.yaml (a symlink in
    the repository): the same bytes. Every entry passes the workflow's registry schema."""
    import jsonschema
    import yaml
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    packaged, config = repo / "srdit/presets/ablations.yaml", repo / "config/ablations.yaml"
    assert packaged.read_bytes() == config.read_bytes()
    schema = yaml.safe_load((repo / "workflow/schemas/ablations.schema.yaml").read_text())
    for name, entry in load_registry().items():
        jsonschema.validate(entry, schema)


def test_guidance_rows_follow_the_original():
    """recipe 5.5: the first guided rows ran before class-token guidance (cls_cfg_scale 1.0, the
    original eval.sh's value: the class token keeps its conditional velocity); every guidance
    row carries the logged KDD standard deviation; no registry row guides with a scale below 1."""
    from srdit.config import inherited_meta

    registry = load_registry()
    guided = {n: get_config(n) for n in registry if inherited_meta(n, registry, "group") == "guidance"}
    assert len(guided) == 9
    for name in ("b1_valres_cfg1.5_autoguidance", "b1_valres_cfg1.5_normal", "b1_valres_cfg1.5_pathdrop"):
        s = guided[name].sample
        assert (s.cfg_scale, s.cls_cfg_scale) == (1.5, 1.0), name
    branches = {n: (guided[n].sample.path_drop_guidance, guided[n].sample.null_label_guidance) for n in guided}
    assert branches["b1_valres_cfg1.5_autoguidance"] == (True, False)
    assert branches["b1_valres_cfg1.5_normal"] == (False, True)
    assert branches["b1_valres_cfg1.5_pathdrop"] == (True, True)
    assert guided["b1_valres_cfg1.5_cls1.5"].sample.cls_cfg_scale == 1.5
    for name in guided:
        assert 0 < registry[name]["paper"]["kdd_std"] < registry[name]["paper"]["kdd"], name
    assert all(get_config(n).sample.cfg_scale >= 1 for n in list_presets())


def test_progressive_xl_rows_use_uniform_t():
    """REG branch lightning-progressive: the logit-normal run's switch (8f248d6) was undone in
    492fbb5, before the SwiGLU / RMSNorm / RoPE runs; only xl1_logitnormal uses logit-normal t."""
    for name in ("xl1_swiglu", "xl1_swiglu_rms", "xl1_swiglu_rms_rope"):
        assert get_config(name).objective.t_dist == "uniform", name
    assert get_config("xl1_logitnormal").objective.t_dist == "logit_normal"
