"""`srdit sample`: one shard of samples from a consolidated snapshot.

    srdit sample --snapshot RUN/snapshots/step0400000.safetensors --out DIR --shard 3 --num-shards 8 \
        [--set sample.num_steps=50 ...] [--random-weights] [--resources DIR] [--device cuda]

A shard is a fixed range of global sample indices, [I N / S, (I + 1) N / S) with N =
sample.num_samples and S = --num-shards. Sample i's label comes from i (balanced: i mod K) and
its noise from a generator seeded by (seed, i), so a shard holds the same samples whichever job,
machine or batch size makes it; cuDNN autotuning is off so that a rerun on the same kind of
device is bit-identical. Output:

    DIR/shards/shard{I:05d}.npz    images (n, H, W, 3) uint8, indices (n,), labels (n,)
    DIR/shards/shard{I:05d}.json   every sampler setting, the snapshot and its checksum, the shard range

Both are written under temporary names and renamed; the JSON comes last and marks the shard
complete. A rerun finds a complete shard with the same settings and skips it; a shard made with
other settings is an error (use another DIR: the workflow puts `sampler_tag` in the path).
`srdit merge DIR` then writes samples.npz, grid.png and sampler.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from srdit.config import ConfigError, ExperimentConfig, SampleConfig, deep_merge, from_dict, parse_overrides, validate
from srdit.resources import MissingResourceError, sha256_file

SHARD_FORMAT = "srdit-sample-shard-v1"
# Settings that may differ between the shards of one DIR without changing any sample.
NON_IDENTITY_KEYS = ("batch_size", "snapshot")   # the checksum identifies the snapshot


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot", required=True, help="snapshot .safetensors written by `srdit train`")
    parser.add_argument("--out", required=True, help="sample directory (shards go to OUT/shards/)")
    parser.add_argument("--shard", type=int, default=0, help="shard index I in 0..num_shards-1")
    parser.add_argument("--num-shards", type=int, default=1, help="number of shards S the samples are split into")
    parser.add_argument("--set", action="append", default=[], metavar="sample.KEY=VALUE",
                        help="override a sampler setting, e.g. --set sample.num_steps=50 (only sample.* keys)")
    parser.add_argument("--tokenizer-random-weights", "--random-weights", dest="random_weights", action="store_true",
                        help="randomly initialised tokenizer (tests, the CPU demo): images mean nothing")
    parser.add_argument("--tokenizer-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="tokenizer constructor overrides, e.g. ch=32 (random weights only)")
    parser.add_argument("--resources", default=None, help="resources folder (tokenizer weights)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (faster on a GPU; samples then differ from eager ones at "
                             "rounding level, so use it for all shards of a directory or none)")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# Config and shard geometry
# --------------------------------------------------------------------------------------------

def snapshot_config(path: str | Path) -> tuple[ExperimentConfig, int]:
    """(config, step) from a snapshot's metadata, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"snapshot {path} does not exist; `srdit train` writes them to "
                                f"RUN/snapshots/step{{N:07d}}.safetensors")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no `config` in its metadata; expected a snapshot written by `srdit train`")
    cfg = validate(from_dict(ExperimentConfig, json.loads(meta["config"])))
    return cfg, int(meta.get("step", -1))


def apply_sample_overrides(cfg: ExperimentConfig, items: list[str]) -> ExperimentConfig:
    """`sample.k=v` overrides on a snapshot's config; other sections are the model's and stay fixed."""
    overrides = parse_overrides(items)
    other = sorted(set(overrides) - {"sample"})
    if other:
        raise ConfigError(f"--set {other[0]}...: sampling may only change sample.* keys (the rest describes the "
                          f"trained model); allowed: {', '.join('sample.' + k for k in asdict(cfg.sample))}")
    if not overrides:
        return cfg
    sample = from_dict(SampleConfig, deep_merge(asdict(cfg.sample), overrides["sample"]), "sample")
    data = cfg.to_dict()
    data["sample"] = asdict(sample)
    return validate(from_dict(ExperimentConfig, data))


def shard_range(shard: int, num_shards: int, num_samples: int) -> tuple[int, int]:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} --num-shards {num_shards}: need 0 <= shard < num_shards")
    return shard * num_samples // num_shards, (shard + 1) * num_samples // num_shards


def shard_paths(out: str | Path, shard: int) -> tuple[Path, Path]:
    base = Path(out) / "shards" / f"shard{shard:05d}"
    return base.with_suffix(".npz"), base.with_suffix(".json")


def sampler_settings(cfg: ExperimentConfig, snapshot: Path, step: int, num_shards: int, random_weights: bool,
                     tokenizer_overrides: dict, snapshot_sha256: str) -> dict:
    """Everything that decides the samples (and so must agree between the shards of one DIR)."""
    from srdit.sample import NOISE_SCHEME, sampler_tag

    return {"tag": sampler_tag(cfg.sample), **asdict(cfg.sample), "noise": NOISE_SCHEME, "num_shards": num_shards,
            "experiment": cfg.name, "snapshot": str(snapshot.resolve()), "snapshot_sha256": snapshot_sha256,
            "step": step, "tokenizer": cfg.data.tokenizer, "tokenizer_random_weights": random_weights,
            "tokenizer_overrides": tokenizer_overrides, "latent_scale": cfg.data.latent_scale,
            "latent_bias": cfg.data.latent_bias, "resolution": cfg.data.resolution,
            "num_classes": cfg.model.num_classes, "shift_base": cfg.objective.shift_base}


def identity(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in NON_IDENTITY_KEYS}


def settings_differences(a: dict, b: dict) -> list[str]:
    a, b = identity(a), identity(b)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_shard_record(json_path: Path) -> dict | None:
    if not json_path.exists():
        return None
    record = json.loads(json_path.read_text())
    return record if record.get("format") == SHARD_FORMAT and record.get("complete") else None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def deterministic_backends(device) -> None:
    """Same kernels on every run: no cuDNN autotuning. TF32 as the reference sampler (on for CUDA)."""
    import torch

    if str(device).startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def load_tokenizer_for(cfg: ExperimentConfig, resources, random_weights: bool, overrides: dict):
    from srdit.tokenizers import load_tokenizer

    settings = dict(overrides)
    if cfg.data.latent_scale is not None:
        settings["latent_scale"] = cfg.data.latent_scale
    if cfg.data.latent_bias:
        settings["latent_bias"] = cfg.data.latent_bias
    tokenizer = load_tokenizer(cfg.data.tokenizer, resources, random_init=random_weights, **settings)
    expected = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    if tuple(tokenizer.latent_shape(cfg.data.resolution)) != expected:
        raise ValueError(f"tokenizer {cfg.data.tokenizer} makes latents {tokenizer.latent_shape(cfg.data.resolution)} "
                         f"at {cfg.data.resolution} px, but the model expects {expected}")
    return tokenizer


DECODE_BATCH = 64          # latents decoded at a time (tokenizer decoders are memory-hungry)


def generate_images(model, tokenizer, cfg: ExperimentConfig, indices: np.ndarray, device, progress: bool = True):
    """(uint8 images (n, H, W, 3), labels (n,)) for global sample `indices`, batch by batch. The
    latents stay on the sampling device for the decoder; only uint8 images come back."""
    import torch
    from tqdm import tqdm

    from srdit.sample import generate_latents, sample_labels

    s, m = cfg.sample, cfg.model
    labels = sample_labels(indices, m.num_classes, s.balanced, s.seed).numpy()
    latent_shape = (m.in_channels, m.input_size, m.input_size)
    cls_dim = m.cls_token_dim if m.class_token else None
    images = []
    with torch.no_grad(), tqdm(total=len(indices), desc="samples", unit="img", disable=not progress) as bar:
        for start in range(0, len(indices), s.batch_size):
            idx, lab = indices[start:start + s.batch_size], labels[start:start + s.batch_size]
            latents = generate_latents(model, torch.from_numpy(idx), torch.from_numpy(lab), s, latent_shape, cls_dim,
                                       device, shift_base=cfg.objective.shift_base, out_device=device)
            for k in range(0, len(latents), DECODE_BATCH):
                images.append(tokenizer.decode_to_uint8(latents[k:k + DECODE_BATCH]).cpu().numpy())
            bar.update(len(idx))
    if not images:
        return np.zeros((0, cfg.data.resolution, cfg.data.resolution, 3), np.uint8), labels
    return np.concatenate(images), labels


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def sample_shard(snapshot: str | Path, out: str | Path, shard: int, num_shards: int, *, overrides: list[str] = (),
                 random_weights: bool = False, tokenizer_overrides: dict | None = None, resources=None,
                 device: str | None = None, progress: bool = True, compile: bool = False) -> dict:
    """Make shard `shard` of `num_shards` in `out` (or find it done). Returns its record."""
    import torch

    from srdit.checkpoint import load_snapshot
    from srdit.metrics.npz_io import NpzWriter

    snapshot = Path(snapshot)
    tokenizer_overrides = dict(tokenizer_overrides or {})
    cfg, step = snapshot_config(snapshot)
    cfg = apply_sample_overrides(cfg, list(overrides))
    start, stop = shard_range(shard, num_shards, cfg.sample.num_samples)
    npz_path, json_path = shard_paths(out, shard)
    settings = sampler_settings(cfg, snapshot, step, num_shards, random_weights, tokenizer_overrides,
                                sha256_file(snapshot))
    done = read_shard_record(json_path)
    if done is not None and npz_path.exists():
        diffs = settings_differences(done["settings"], settings)
        if diffs:
            raise ValueError(f"{json_path}: this shard was made with other settings ({'; '.join(diffs[:4])}); "
                             f"sample into another --out directory")
        print(f"shard {shard}/{num_shards} (samples {start}..{stop - 1}) already complete in {npz_path}; skipped")
        return done

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    deterministic_backends(device)
    t0 = time.time()
    _, model = load_snapshot(snapshot, use_ema=cfg.sample.use_ema, device=device)
    if compile:
        model.forward = torch.compile(model.forward)
    tokenizer = load_tokenizer_for(cfg, resources, random_weights, tokenizer_overrides).to(device)
    indices = np.arange(start, stop, dtype=np.int64)
    images, labels = generate_images(model, tokenizer, cfg, indices, device, progress)

    npz_path.parent.mkdir(parents=True, exist_ok=True)
    with NpzWriter(npz_path) as writer:
        writer.add("images", images)
        writer.add("indices", indices)
        writer.add("labels", labels.astype(np.int64))
    record = {"format": SHARD_FORMAT, "complete": True, "shard": shard, "start": start, "stop": stop,
              "rows": int(len(images)), "image_shape": list(images.shape[1:]), "sha256": sha256_file(npz_path),
              "settings": settings, "device": str(device), "seconds": round(time.time() - t0, 1), "compiled": compile,
              "backend": {"torch": torch.__version__, "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                          "cudnn_deterministic": bool(torch.backends.cudnn.deterministic)},
              "tokenizer_weights": "RANDOM INIT" if random_weights else cfg.data.tokenizer}
    write_json_atomic(json_path, record)    # written last: its presence marks the shard complete
    print(f"shard {shard}/{num_shards}: samples {start}..{stop - 1} -> {npz_path} ({record['seconds']} s)")
    return record


def run(args) -> int:
    try:
        sample_shard(args.snapshot, args.out, args.shard, args.num_shards, overrides=args.set,
                     random_weights=args.random_weights, tokenizer_overrides=parse_overrides(args.tokenizer_set),
                     resources=args.resources, device=args.device, compile=args.compile)
    except (FileNotFoundError, MissingResourceError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"srdit sample: {e}", file=sys.stderr)
        return 1
    return 0
