"""Training-loader throughput: our HDF5 cache against the original per-file layout, same samples.

    python benchmarks/loader.py [--samples 3000] [--workers 2] [--batch 32] [--dir DIR]

Writes both layouts for the same samples into a temporary folder:
- per-file (the reference's): one uncompressed PNG (256x256x3, compress_level 0) and one
  `.npy` latent (1, 32, 16, 16) float32 per image in `{idx // 1000:05d}/` folders, read by a
  plain per-file torch Dataset (PIL decode + np.load) and a shuffling DataLoader;
- ours: one latent cache (latents float32, labels, DINOv2-B teacher CLS (768) and patch tokens
  (256 x 768) float16), read by `srdit.data.make_train_loader`.
Both loaders use the same batch size and workers. The reference also runs DINOv2 on every
image at every step, which our cached features remove; that GPU time is not counted here.
Prints one JSON object with the rates (samples/s) and ratios.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from srdit.data.cache import FORMAT_VERSION, LATENTS, ShardWriter, join_shards, shard_path
from srdit.data.dataset import make_train_loader
from srdit.data.encode import COMMON_KEYS

LATENT = (32, 16, 16)
TEACHER_DIM, TOKENS = 768, 256


def sample_images(n: int, resolution: int, seed: int):
    """Crops of the photos bundled with scikit-image: realistic content, deterministic."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(resolution // 2, min(photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, d - side + 1)) for d in photo.shape[:2])
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((resolution, resolution), Image.BICUBIC)
        yield np.asarray(crop)


def write_layouts(folder: Path, n: int, resolution: int, seed: int) -> tuple[Path, Path]:
    per_file, cache = folder / "per_file", folder / "cache"
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, 1000, n)
    identity = dict(kind=LATENTS, format=FORMAT_VERSION, tokenizer="e2e-invae", tokenizer_settings={},
                    tokenizer_random=True, latent_shape=list(LATENT), resolution=resolution, teacher="dinov2_vitb14",
                    teacher_random=True, teacher_dim=TEACHER_DIM, teacher_tokens=TOKENS, noise_seed=0, batch_size=64,
                    precision="fp32", moments=False, images_file="", images_checksum="", images_rows=n,
                    num_classes=1000, class_names=[], row_start=0, row_stop=n)
    datasets = {"latents": (LATENT, np.float32), "labels": ((), np.int64), "teacher_cls": ((TEACHER_DIM,), np.float16),
                "teacher_tokens": ((TOKENS, TEACHER_DIM), np.float16)}
    manifest = []
    with ShardWriter(shard_path(cache, 0), datasets, identity, capacity=n) as writer:
        for idx, image in enumerate(tqdm(sample_images(n, resolution, seed), total=n, desc="writing both layouts")):
            latent = rng.standard_normal(LATENT, dtype=np.float32)
            sub = per_file / f"{idx // 1000:05d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(sub / f"img{idx:08d}.png", compress_level=0)
            np.save(sub / f"img-latents-{idx:08d}.npy", latent[None])
            manifest.append([f"{idx // 1000:05d}/img{idx:08d}.png", int(labels[idx])])
            writer.append(latents=latent[None], labels=labels[idx:idx + 1],
                          teacher_cls=rng.standard_normal((1, TEACHER_DIM), dtype=np.float32).astype(np.float16),
                          teacher_tokens=rng.standard_normal((1, TOKENS, TEACHER_DIM), dtype=np.float32).astype(np.float16))
        writer.finish()
    (per_file / "dataset.json").write_text(json.dumps({"labels": manifest}))
    join_shards(cache / "cache.h5", [shard_path(cache, 0)], LATENTS, COMMON_KEYS)
    return per_file, cache / "cache.h5"


class PerFileDataset(Dataset):
    """The reference's layout and access pattern: one PNG and one .npy opened per sample."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items = json.loads((folder / "dataset.json").read_text())["labels"]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        image = np.asarray(Image.open(self.folder / path)).transpose(2, 0, 1)        # CHW uint8
        latent = np.load(self.folder / per_file_latent_path(path))
        return torch.from_numpy(image.copy()), torch.from_numpy(latent), torch.tensor(label)


def per_file_latent_path(path: str) -> str:
    folder, name = path.split("/")
    return f"{folder}/img-latents-{name[3:-4]}.npy"


def rate(batches, warmup: int, count: int, batch: int) -> float:
    iterator = iter(batches)
    for _ in itertools.islice(iterator, warmup):
        pass
    start = time.perf_counter()
    n = sum(1 for _ in itertools.islice(iterator, count))
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="batches read before timing")
    parser.add_argument("--dir", help="where to write the layouts (default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="srdit-loader-bench-"))
    try:
        per_file, cache = write_layouts(folder, args.samples, args.resolution, args.seed)
        count = args.samples // args.batch - args.warmup      # about one epoch, same number for both
        dataset = PerFileDataset(per_file)
        per_file_loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                     num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
        results = {"per_file_png_npy": rate(per_file_loader, args.warmup, count, args.batch)}
        for name, dtype in (("hdf5_features_float32", torch.float32), ("hdf5_features_float16", torch.float16)):
            loader = make_train_loader(cache, args.batch, seed=args.seed, num_workers=args.workers,
                                       feature_dtype=dtype, pin_memory=False)
            results[name] = rate(loader, args.warmup, count, args.batch)
        base = results["per_file_png_npy"]
        report = dict(samples_per_s={k: round(v, 1) for k, v in results.items()},
                      ratio_vs_per_file={k: round(v / base, 2) for k, v in results.items() if k != "per_file_png_npy"},
                      samples=args.samples, resolution=args.resolution, batch=args.batch, workers=args.workers,
                      timed_batches=count, machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                      torch=torch.__version__)
        print(json.dumps(report, indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
