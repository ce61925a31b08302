"""Training-loader throughput: our HDF5 cache against the original per-file layout, same samples.

    python benchmarks/loader.py [--samples 3000] [--workers 2] [--batch 32] [--dir DIR]

Writes the same samples in each layout into a temporary folder:
- per-file (the reference's): one uncompressed PNG (256x256x3, compress_level 0) and one
  `.npy` latent (1, 32, 16, 16) float32 per image in `{idx // 1000:05d}/` folders, read by a
  plain per-file torch Dataset (PIL decode + np.load) and a shuffling DataLoader with worker
  processes;
- ours, what training reads: a latent cache with latents float32, labels and DINOv2-B teacher
  CLS (768) and patch tokens (256 x 768) float16, read by `srdit.data.make_train_loader`
  handing the features out as float32 (the default) or float16;
- ours without cached features: latents + the uint8 images from an image cache (the same
  bytes the per-file layout delivers).
All loaders use the same batch size and number of workers (processes for the per-file one,
threads for ours). The reference also runs DINOv2 on every image at every step, which cached
features remove; that GPU time is not counted here. Prints one JSON object with the rates
(samples/s) and the ratios to the per-file layout.
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

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from srdit.data.cache import FORMAT_VERSION, IMAGES, LATENTS, ShardWriter, join_shards, shard_path
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


def latent_identity(n: int, resolution: int, teacher: str, images_file: str = "", images_checksum: str = "") -> dict:
    return dict(kind=LATENTS, format=FORMAT_VERSION, tokenizer="e2e-invae", tokenizer_settings={},
                tokenizer_random=True, latent_shape=list(LATENT), resolution=resolution, teacher=teacher,
                teacher_random=True, teacher_dim=TEACHER_DIM if teacher != "none" else 0,
                teacher_tokens=TOKENS if teacher != "none" else 0, noise_seed=0, batch_size=64, precision="fp32",
                moments=False, images_file=images_file, images_checksum=images_checksum, images_rows=n,
                num_classes=1000, class_names=[], row_start=0, row_stop=n)


def write_layouts(folder: Path, n: int, resolution: int, seed: int) -> dict[str, Path]:
    """The same samples as: per-file PNG + .npy; an image cache; latent caches with and without features."""
    per_file = folder / "per_file"
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, 1000, n)
    image_attrs = dict(kind=IMAGES, format=FORMAT_VERSION, crop="adm", resolution=resolution, source_list_sha256="",
                       num_files=n, class_names=[], num_classes=1000, file_start=0, file_stop=n)
    writers = {
        "images": ShardWriter(shard_path(folder / "images", 0), {"images": ((resolution, resolution, 3), np.uint8),
                              "labels": ((), np.int64)}, image_attrs, capacity=n),
        "features": ShardWriter(shard_path(folder / "features", 0), {
            "latents": (LATENT, np.float32), "labels": ((), np.int64), "teacher_cls": ((TEACHER_DIM,), np.float16),
            "teacher_tokens": ((TOKENS, TEACHER_DIM), np.float16)},
            latent_identity(n, resolution, "dinov2_vitb14"), capacity=n),
    }
    latents = np.empty((n, *LATENT), np.float32)
    manifest = []
    for idx, image in enumerate(tqdm(sample_images(n, resolution, seed), total=n, desc="writing the layouts")):
        latents[idx] = rng.standard_normal(LATENT, dtype=np.float32)
        sub = per_file / f"{idx // 1000:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"img{idx:08d}.png", compress_level=0)
        np.save(sub / f"img-latents-{idx:08d}.npy", latents[idx][None])
        manifest.append([f"{idx // 1000:05d}/img{idx:08d}.png", int(labels[idx])])
        writers["images"].append(images=image[None], labels=labels[idx:idx + 1])
        writers["features"].append(
            latents=latents[idx:idx + 1], labels=labels[idx:idx + 1],
            teacher_cls=rng.standard_normal((1, TEACHER_DIM), dtype=np.float32).astype(np.float16),
            teacher_tokens=rng.standard_normal((1, TOKENS, TEACHER_DIM), dtype=np.float32).astype(np.float16))
    (per_file / "dataset.json").write_text(json.dumps({"labels": manifest}))
    for name, writer in writers.items():
        writer.finish()
        writer.close()
    images = join_shards(folder / "images" / "images.h5", [shard_path(folder / "images", 0)], IMAGES,
                         ["kind", "format", "crop", "resolution", "num_files", "num_classes"])
    features = join_shards(folder / "features" / "cache.h5", [shard_path(folder / "features", 0)], LATENTS, COMMON_KEYS)
    # latents alone, the images read from the image cache (what the trainer gets without cached features)
    with h5py.File(images, "r") as f:
        checksum = f.attrs["checksum"]
    identity = latent_identity(n, resolution, "none", "../images/images.h5", checksum)
    with ShardWriter(shard_path(folder / "no_features", 0), {"latents": (LATENT, np.float32),
                     "labels": ((), np.int64)}, identity, capacity=n) as writer:
        writer.append(latents=latents, labels=labels)
        writer.finish()
    no_features = join_shards(folder / "no_features" / "cache.h5", [shard_path(folder / "no_features", 0)], LATENTS,
                              COMMON_KEYS)
    return {"per_file": per_file, "features": features, "no_features": no_features}


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
        layouts = write_layouts(folder, args.samples, args.resolution, args.seed)
        count = args.samples // args.batch - args.warmup      # about one epoch, same number for all
        dataset = PerFileDataset(layouts["per_file"])
        per_file_loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                     num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
        results = {"per_file_png_npy": rate(per_file_loader, args.warmup, count, args.batch)}
        for name, cache, dtype in (("hdf5_features_float32", layouts["features"], torch.float32),
                                   ("hdf5_features_float16", layouts["features"], torch.float16),
                                   ("hdf5_images_no_features", layouts["no_features"], torch.float32)):
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
