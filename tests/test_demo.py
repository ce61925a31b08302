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


def test_report_names_the_demo_stand_ins(tmp_path):
    """The demo's report says which parts stand in for pretrained networks: a random teacher and the
    pixel tokenizer; not a random tokenizer, which the pixel demo does not have."""
    import json
    import subprocess
    import sys

    items = []
    for i, (name, step, fid) in enumerate([("demo_pixel_srdit", 300, 390.0), ("demo_pixel_srdit", 1200, 300.0)]):
        metrics = tmp_path / f"m{i}.json"
        metrics.write_text(json.dumps({"fid": fid, "sfid": 1.0, "precision": 0.1, "recall": 0.1}))
        items += ["--item", name, str(step), str(metrics), ""]
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "srdit", "report", "--out", str(out), "--title", "demo",
                             "--random-weights", *items], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    markdown = (out / "ablations.md").read_text()
    assert "the DINOv2 teacher (the REG class token and REPA targets carry no meaning) is randomly initialised" \
        in markdown and "pixel tokenizer" in markdown
    assert "the tokenizer (its latents" not in markdown and "runs and learns" in markdown


def test_report_lays_out_training_images_like_the_sample_grids(tmp_path):
    """grids/training_images.png puts an image of class i mod K at position i, as the balanced
    sampler labels sample i, each class cycling through its own images; the Markdown shows it."""
    import json
    import subprocess
    import sys

    import h5py
    from PIL import Image

    from srdit.generate_merge import GRID_COLUMNS

    # a class-ordered cache of 3 classes (2, 3 and 1 images); each image is one flat colour that
    # encodes its row, so the grid can be read back
    labels = np.array([0, 0, 1, 1, 1, 2])
    colours = np.array([[10 + 40 * i, 200 - 30 * i, 7 * i] for i in range(len(labels))], np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (len(labels), 16, 16, 3)).copy()
    cache = tmp_path / "images.h5"
    with h5py.File(cache, "w") as f:
        f["images"], f["labels"] = images, labels
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"fid": 1.0}))
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "srdit", "report", "--out", str(out), "--title", "demo",
                             "--training-images", str(cache), "--item", "demo_pixel_srdit", "1000",
                             str(metrics), str(tmp_path / "no_grid_here.png")], capture_output=True, text=True)
    assert result.returncode != 0                     # a named grid that does not exist is an error
    result = subprocess.run([sys.executable, "-m", "srdit", "report", "--out", str(out), "--title", "demo",
                             "--training-images", str(cache), "--item", "demo_pixel_srdit", "1000",
                             str(metrics), ""], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out / "grids" / "training_images.png").convert("RGB"))
    strip, side = 12, 16
    assert grid.shape == (8 * (side + strip), GRID_COLUMNS * side, 3)
    expected_rows = {0: [0, 1], 1: [2, 3, 4], 2: [5]}
    seen = {0: 0, 1: 0, 2: 0}
    for i in range(64):
        y, x = (i // GRID_COLUMNS) * (side + strip) + strip, (i % GRID_COLUMNS) * side
        c = i % 3
        row = expected_rows[c][seen[c] % len(expected_rows[c])]
        seen[c] += 1
        assert (grid[y + 8, x + 8] == colours[row]).all(), (i, grid[y + 8, x + 8], colours[row])
    # no report without grids mentions it; with sample grids it is listed before them
    assert "training_images.png" not in (out / "ablations.md").read_text()


def test_report_lists_the_training_images_beside_the_sample_grids(tmp_path):
    import json
    import subprocess
    import sys

    import h5py
    from PIL import Image

    cache = tmp_path / "images.h5"
    with h5py.File(cache, "w") as f:
        f["images"], f["labels"] = np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1])
    metrics, sample_grid = tmp_path / "m.json", tmp_path / "grid.png"
    metrics.write_text(json.dumps({"fid": 1.0}))
    Image.new("RGB", (8, 8)).save(sample_grid)
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "srdit", "report", "--out", str(out), "--title", "demo",
                             "--training-images", str(cache), "--item", "demo_pixel_srdit", "1000",
                             str(metrics), str(sample_grid)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    markdown = (out / "ablations.md").read_text()
    assert markdown.index("grids/training_images.png") < markdown.index("grids/demo_pixel_srdit_step0001000.png")


def test_demo_dag_trains_pixel_models_and_evaluates_a_curve(tmp_path):
    """`make demo`'s DAG (config/config.yaml, with the Makefile's thread settings): pixel-tokenizer
    rows; the full recipe's run is a chain of three jobs, each evaluated (the FID-vs-step curve);
    the sampler gets no --random-weights (the pixel tokenizer has none to randomise)."""
    import re

    from workflow_copy import REPO, copy_workflow
    from test_workflow import parse_dry_run, snakemake

    threads = re.search(r"^DEMO_THREADS := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    result = snakemake(copy_workflow(tmp_path), "-n", "--profile", "profiles/local", "--cores", "2",
                       "--set-threads", *threads)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = parse_dry_run(result.stdout + result.stderr)
    trains = sorted((j["wildcards"]["run"], int(j["wildcards"]["step"])) for j in jobs if j["rule"] == "train_segment")
    assert trains == [("demo_pixel_reg", 1000), ("demo_pixel_sprint", 1000), ("demo_pixel_srdit", 250),
                      ("demo_pixel_srdit", 500), ("demo_pixel_srdit", 1000)]
    evaluated = sorted((j["wildcards"]["ablation"], int(j["wildcards"]["step"])) for j in jobs if j["rule"] == "evaluate")
    assert [s for a, s in evaluated if a == "demo_pixel_srdit"] == [250, 500, 1000]
    encode = [j["shell"] for j in jobs if j["rule"] == "encode_latents"]
    assert encode and all("--tokenizer pixel" in s for s in encode)
    samples = [j["shell"] for j in jobs if j["rule"] == "sample_shard"]
    assert samples and not any("--random-weights" in s for s in samples)
    report = [j["shell"] for j in jobs if j["rule"] == "report"]
    assert len(report) == 1 and re.search(r"--training-images \S*/images32/images\.h5", report[0]), report
