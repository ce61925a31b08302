"""Tokenizers and teachers: E2E-INVAE against the golden fixtures of the original code, the
official checkpoint layout and loader rules, SD-VAE through diffusers, the DINOv2 teacher.

The E2E-INVAE fixtures (tests/fixtures/invae, recorded from the original code; or the folder
$SRDIT_INVAE_FIXTURES names) are read for every size: the small model's settings from
config.json, shapes from the tensors, the official layout and parameter counts from keys.json,
and every case*.safetensors file found.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from srdit.resources import MissingResourceError
from srdit.teachers import TeacherWeightsError, load_teacher
from srdit.tokenizers import TokenizerWeightsError, images_to_input, load_tokenizer, output_to_uint8
from srdit.tokenizers.invae import INVAE_F16D32, build_invae, invae_from_config, load_invae_weights

from golden import fixture_dir

FIXTURES = fixture_dir("invae", "SRDIT_INVAE_FIXTURES")
CASES = sorted(FIXTURES.glob("case*.safetensors"))
assert CASES, f"{FIXTURES} holds no case*.safetensors"

# float32 tolerances (tests/fixtures/invae/README.md, "Precision and tolerances"). The reference
# itself, run in float32, differs from these float64-computed fixtures by <= 8.3e-6 on the
# encoder outputs and the sample, <= 2.3e-5 on dec.out, <= 4.8e-6 relative on the
# intermediates; the thresholds leave about 10x room for a different float32 summation order,
# yet the smallest structural mistake measured there (GroupNorm eps 1e-5 instead of 1e-6)
# moves the encoder outputs by 2.5e-4 relative to values of magnitude ~2, i.e. ~5e-4
# absolute, and every other mistake by >= 0.2.
TOL_ENCODE = 1e-4        # enc.*, latent.scaled, dec.z (absolute)
TOL_DECODE = 2e-4        # dec.out (absolute)
TOL_DEBUG = 5e-5         # dbg.*, relative to the tensor's max |value|
TOL_PIXELS = 0.03        # out.pixels_float, in pixel units
TOL_FLOAT64 = 1e-6       # every float tensor when we run in float64 (pixels: 1e-4)


def _config() -> dict:
    return json.loads((FIXTURES / "config.json").read_text())


def _small_model(dtype=torch.float32):
    from safetensors.torch import load_file

    model = invae_from_config(_config())
    model.load_state_dict(load_file(FIXTURES / "model.safetensors"), strict=True)
    return model.freeze().to(dtype)


def _debug_modules(model) -> dict[str, torch.nn.Module]:
    """The module whose output each `dbg.*` fixture tensor records, found from the model's structure."""
    def level_output(level, resample):
        if hasattr(level, resample):
            return getattr(level, resample)
        return level.attn[-1] if len(level.attn) else level.block[-1]

    enc, dec = model.encoder, model.decoder
    modules = {"dbg.enc.conv_in": enc.conv_in, "dbg.enc.mid": enc.mid.block_2, "dbg.enc.out": enc.conv_out,
               "dbg.dec.post_quant": model.post_quant_conv, "dbg.dec.conv_in": dec.conv_in,
               "dbg.dec.mid": dec.mid.block_2}
    for i, level in enumerate(enc.down):
        modules[f"dbg.enc.down{i}"] = level_output(level, "downsample")
    for i, level in enumerate(dec.up):
        modules[f"dbg.dec.up{i}"] = level_output(level, "upsample")
    return modules


def _run_case(model, case: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything the fixture records, computed by our model (noise injected from the fixture)."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out))
             for key, m in _debug_modules(model).items()]
    hooks.append(model.quant_conv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("enc.moments", out)))
    with torch.no_grad():
        mean, std = model.posterior(case["in.image"])
        _, logvar = model.encode_moments(images_to_input(case["in.image"]).to(model.dtype))
        sample = model.encode(case["in.image"], noise=case["enc.noise"])
        scaled = model.scale(sample)
        z = model.unscale(scaled)
        dec_out = model.decode(z.to(model.dtype))
        pixels = ((dec_out + 1) / 2 * 255).clamp(0, 255)
        image = model.decode_to_uint8(scaled)
        decoder_alone = model.decode(case["dec.z"].to(model.dtype))
    for h in hooks:
        h.remove()
    return {**captured, "in.x": images_to_input(case["in.image"]), "enc.mean": mean, "enc.std": std,
            "enc.logvar": logvar, "enc.sample": sample, "latent.scaled": scaled, "dec.z": z,
            "dec.out": dec_out, "out.pixels_float": pixels, "out.image": image, "decoder_alone": decoder_alone}


# --------------------------------------------------------------------------------------------
# E2E-INVAE against the fixtures
# --------------------------------------------------------------------------------------------

def test_small_model_matches_fixture_weights_exactly():
    from safetensors.torch import load_file

    stored = load_file(FIXTURES / "model.safetensors")
    ours = invae_from_config(_config()).state_dict()
    assert sorted(ours) == sorted(stored)          # safetensors stores keys sorted; order is checked on keys.json
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in stored.items()}


@pytest.mark.parametrize("case_file", CASES, ids=lambda p: p.stem)
def test_invae_reproduces_fixture_case_float32(case_file):
    from safetensors.torch import load_file

    case = load_file(case_file)
    ours = _run_case(_small_model(), case)
    assert torch.equal(ours["in.x"], case["in.x"]), "input scaling must be x / 127.5 - 1 in float32"
    def check(key, ref, tol):
        # plus float32 resolution at the tensor's scale, for fixture sets with larger values
        tol = tol + 1e-6 * ref.abs().max().item()
        assert ours[key].shape == ref.shape, key
        err = (ours[key] - ref).abs().max().item()
        assert err <= tol, f"{key}: max abs error {err:.3g} > {tol:.3g}"

    for key in ("enc.moments", "enc.mean", "enc.logvar", "enc.std", "enc.sample", "latent.scaled", "dec.z"):
        check(key, case[key], TOL_ENCODE)
    check("dec.out", case["dec.out"], TOL_DECODE)
    check("decoder_alone", case["dec.out"], TOL_DECODE)
    debug_keys = [k for k in case if k.startswith("dbg.")]
    assert set(debug_keys) <= set(ours), f"no module found for {set(debug_keys) - set(ours)}"
    for key in debug_keys:
        assert ours[key].shape == case[key].shape, key
        rel = ((ours[key] - case[key]).abs().max() / case[key].abs().max()).item()
        assert rel <= TOL_DEBUG, f"{key}: max error {rel:.3g} of the tensor's max > {TOL_DEBUG}"
    err = (ours["out.pixels_float"] - case["out.pixels_float"]).abs().max().item()
    assert err <= TOL_PIXELS
    # uint8: exact wherever the stored float is clearly away from an integer; elsewhere a float32
    # rounding may cross the integer, so one step is allowed there.
    stored_pixels = case["out.pixels_float"].permute(0, 2, 3, 1)
    near_integer = (stored_pixels - stored_pixels.round()).abs() < TOL_PIXELS
    diff = (ours["out.image"].int() - case["out.image"].int()).abs()
    assert ours["out.image"].dtype == torch.uint8 and ours["out.image"].shape == case["out.image"].shape
    assert diff[~near_integer].max().item() == 0
    assert diff.max().item() <= 1


@pytest.mark.parametrize("case_file", CASES, ids=lambda p: p.stem)
def test_invae_reproduces_fixture_case_float64_and_uint8_bitwise(case_file):
    """In float64 (as the fixtures were computed) the uint8 decode must match bit for bit:
    this is what pins truncation (rounding would change ~41% of the values)."""
    from safetensors.torch import load_file

    case = load_file(case_file)
    ours = _run_case(_small_model(torch.float64), case)
    for key, ref in case.items():
        if key in ("in.image", "out.image", "enc.noise"):
            continue
        # the fixtures are float64 results rounded to float32: allow that rounding (half an ulp) on top
        tol = (1e-4 if key == "out.pixels_float" else TOL_FLOAT64) + ref.double().abs() * 2.0 ** -24
        excess = ((ours[key].double() - ref.double()).abs() - tol).max().item()
        assert excess <= 0, f"{key}: error exceeds the tolerance by {excess:.3g}"
    assert torch.equal(ours["out.image"], case["out.image"])


def test_uint8_conversion_truncates_and_clamps():
    # decoder outputs whose pixel values are 254.9, 0.6, -12.75, 300.2 and 127.5
    pixels = torch.tensor([254.9, 0.6, -12.75, 300.2, 127.5], dtype=torch.float64)
    x = (pixels / 255 * 2 - 1).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = output_to_uint8(x)
    assert out.shape == (1, 1, 5, 3)
    assert out[0, 0, :, 0].tolist() == [254, 0, 0, 255, 127]


def test_full_size_model_has_the_official_keys_and_parameter_count():
    keys = json.loads((FIXTURES / "keys.json").read_text())
    # What load_tokenizer builds for e2e-invae-400k.pt, on the meta device: names and shapes, no memory.
    with torch.device("meta"):
        model = build_invae(random_seed=None)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in INVAE_F16D32.items()}
    assert {k: settings[k] for k in keys["constructor"]} == keys["constructor"]
    state = model.state_dict()
    assert [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()] == \
        [(e["key"], e["shape"], e["dtype"]) for e in keys["keys"]]
    counts = keys["counts"]
    assert sum(p.numel() for p in model.parameters()) == counts["total_parameters"]
    assert len(state) == counts["state_dict_entries"] and not list(model.buffers())
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    assert parts == {name: counts[name] for name in parts}
    assert model.latent_channels == keys["latent"]["channels"]
    assert model.downsample == keys["latent"]["downsampling_factor"]
    assert model.latent_scale == keys["latent"]["scaling_factor"] and model.latent_bias == keys["latent"]["bias"]


# --------------------------------------------------------------------------------------------
# The official .pt loader rules
# --------------------------------------------------------------------------------------------

class NotATensor:
    """A custom class: pickling it into a weights file must make the file unloadable."""
    def __init__(self):
        self.value = 1


def test_invae_pt_loading_is_strict_and_safe(tmp_path):
    from safetensors.torch import load_file

    config = _config()
    state = load_file(FIXTURES / "model.safetensors")
    path = tmp_path / "e2e-invae-400k.pt"

    torch.save(state, path)   # the official layout: the file IS the flat state_dict
    tokenizer = load_tokenizer("e2e-invae", resources_root=tmp_path, **config)
    assert all(torch.equal(tokenizer.state_dict()[k], v) for k, v in state.items())
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())

    torch.save({k: v.half() for k, v in state.items()}, path)   # half-precision files load, upcast
    assert load_tokenizer("e2e-invae", resources_root=tmp_path, **config).dtype == torch.float32

    first = next(iter(state))
    bad_files = {
        "wrapper key": {"vae": state},
        "module. prefix": {f"module.{k}": v for k, v in state.items()},
        "_orig_mod. prefix": {f"_orig_mod.{k}": v for k, v in state.items()},
        "missing key": {k: v for k, v in state.items() if k != "decoder.conv_out.bias"},
        "extra key": {**state, "encoder.extra.weight": torch.zeros(1)},
        "wrong shape": {**state, first: torch.zeros(1, *state[first].shape[1:])},
        "pickled object": {**state, "note": NotATensor()},
    }
    for case, content in bad_files.items():
        torch.save(content, path)
        with pytest.raises(TokenizerWeightsError) as info:
            load_invae_weights(invae_from_config(config), path)
        message = str(info.value)
        assert str(path) in message, case
        if case == "pickled object":
            assert "weights_only" in message
        if case == "wrapper key":
            assert "'vae'" in message


def test_missing_weights_name_the_fetch_command(tmp_path):
    with pytest.raises(MissingResourceError, match=r"e2e-invae-400k\.pt.*\n.*srdit fetch e2e-invae"):
        load_tokenizer("e2e-invae", resources_root=tmp_path)
    with pytest.raises(MissingResourceError, match="srdit fetch dinov2_vitb14"):
        load_teacher("dinov2_vitb14", 256, resources_root=tmp_path)


def test_random_tokenizer_is_seeded_and_reports_random_weights():
    a = load_tokenizer("e2e-invae", random_init=True, ch=32)
    b = load_tokenizer("e2e-invae", random_init=True, ch=32)
    assert a.random_weights and a.latent_scale == pytest.approx(0.3099)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    images = torch.randint(0, 256, (2, 48, 80, 3), dtype=torch.uint8)
    with torch.no_grad():
        z = a.encode(images, noise=torch.zeros(2, 32, 3, 5))
        mean, _ = a.posterior(images)
        assert torch.equal(z, mean)                  # zero noise: the sample is the mean
        assert a.decode_to_uint8(a.scale(z)).shape == (2, 48, 80, 3)
    with pytest.raises(ValueError, match="unknown setting"):
        load_tokenizer("e2e-invae", random_init=True, channels=32)


# --------------------------------------------------------------------------------------------
# SD-VAE (diffusers)
# --------------------------------------------------------------------------------------------

def test_sdvae_random_and_from_folder(tmp_path):
    tiny = dict(block_out_channels=(32, 32), norm_num_groups=8, layers_per_block=1)
    vae = load_tokenizer("sd-vae", random_init=True, **tiny)
    assert (vae.downsample, vae.latent_channels, vae.latent_scale) == (2, 4, 0.18215)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        z = vae.encode(images)
        assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
        assert vae.decode_to_uint8(vae.scale(z)).shape == (2, 32, 32, 3)
    vae.vae.save_pretrained(tmp_path / "sd-vae-ft-ema")      # the layout `srdit fetch sd-vae` writes
    loaded = load_tokenizer("sd-vae", resources_root=tmp_path, latent_scale=0.5)
    assert not loaded.random_weights and loaded.latent_scale == 0.5
    assert all(torch.equal(x, y) for x, y in zip(vae.state_dict().values(), loaded.state_dict().values()))


# --------------------------------------------------------------------------------------------
# DINOv2 teacher
# --------------------------------------------------------------------------------------------

def _official_dinov2_file(folder: Path, chunked: bool = False) -> dict[str, torch.Tensor]:
    """A small file in the official DINOv2 layout: 37x37 + 1 position rows (518 px), a mask_token."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(3)
        vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0, depth=2)
    state = {**vit.state_dict(), "mask_token": torch.zeros(1, 384)}
    if chunked:   # FSDP-chunked names: blocks.<chunk>.<global index>.
        state = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in state.items()}
    torch.save(state, folder / "dinov2_vits14_pretrain.pth")
    return state


def test_teacher_loads_official_layout_and_resamples_pos_embed(tmp_path):
    from timm.layers import resample_abs_pos_embed

    state = _official_dinov2_file(tmp_path)
    teacher = load_teacher("dinov2_vits14", 64, resources_root=tmp_path, depth=2)
    assert (teacher.grid, teacher.input_size, teacher.dim, teacher.num_tokens) == (4, 56, 384, 16)
    expected_pos = resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(teacher.vit.pos_embed, expected_pos)
    assert torch.equal(teacher.vit.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])

    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate((x - mean) / std, size=(56, 56), mode="bicubic", align_corners=False)
    assert torch.allclose(teacher.preprocess(images), x, atol=1e-6)
    cls, tokens = teacher.features(images)
    assert cls.shape == (2, 384) and tokens.shape == (2, 16, 384) and cls.dtype == torch.float32
    with torch.no_grad():
        normed = teacher.vit.norm(teacher.vit.blocks(teacher.vit._pos_embed(teacher.vit.patch_embed(x))))
    assert torch.allclose(cls, normed[:, 0], atol=1e-5) and torch.allclose(tokens, normed[:, 1:], atol=1e-5)

    _official_dinov2_file(tmp_path, chunked=True)
    chunked = load_teacher("dinov2_vits14", 64, resources_root=tmp_path, depth=2)
    assert torch.equal(chunked.features(images)[1], tokens)

    torch.save({**state, "register_tokens": torch.zeros(1, 4, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(TeacherWeightsError, match="register tokens"):
        load_teacher("dinov2_vits14", 64, resources_root=tmp_path, depth=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_teacher("dinov2_vits14", 100, random_init=True, depth=1)
