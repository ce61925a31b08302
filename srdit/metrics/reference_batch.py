"""`srdit reference-batch`: an ADM-format reference batch from our own images.

    srdit reference-batch --source IMAGES --out REF.npz [--num 10000] [--resolution 256]

`--source` is a folder of images (searched recursively, ADM center crop to `--resolution`), an
HDF5 image cache from `srdit prepare` (`images` (N, R, R, 3) uint8) or an `.npz` with `arr_0`.
The output holds `arr_0` (N, R, R, 3) uint8 and the FID/sFID statistics `mu`, `sigma`, `mu_s`,
`sigma_s` (float64) of its Inception features, the layout of ADM's
`VIRTUAL_imagenet256_labeled.npz`, plus two keys of our own that ADM's files lack:
`inception_pool`, the pool_3 features themselves (float32), and `inception_sha256`, the checksum
of the Inception weights that computed them, so that `srdit evaluate` reuses the features (for
precision/recall) instead of recomputing them at every evaluation. A JSON sidecar (`REF.json`)
records the source, the selection and the Inception weights. With `--num` below the source size, a seeded random subset (kept in
source order) is used, as ADM's batches are random training images.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from srdit.resources import MissingResourceError, sha256_file
from srdit.data.crop import adm_center_crop

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
POOL_KEY, POOL_SHA_KEY = "inception_pool", "inception_sha256"    # cached features and their network


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="image folder, HDF5 image cache (.h5) or .npz with arr_0")
    parser.add_argument("--out", required=True, help="reference batch .npz to write")
    parser.add_argument("--num", type=int, default=None, help="images to keep (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset when --num < source size")
    parser.add_argument("--resolution", type=int, default=256, help="side of the ADM center crop (image folders)")
    parser.add_argument("--inception", default=None, help="Inception TorchScript file, or `fid-helper` (offline copy)")
    parser.add_argument("--resources", default=None, help="resources folder")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default=None)
    parser.set_defaults(func=run)


class ImageSource:
    """Uniform random access to the three kinds of source: `len`, `read(indices) -> uint8 NHWC`."""

    def __init__(self, path: str | Path, resolution: int):
        self.path, self.resolution = Path(path), resolution
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise ValueError(f"{self.path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
            self.count = len(self.files)
        elif self.path.suffix in (".h5", ".hdf5"):
            import h5py

            self.kind = "hdf5"
            with h5py.File(self.path, "r") as f:
                if "images" not in f:
                    raise ValueError(f"{self.path}: no `images` dataset; expected an image cache from `srdit prepare`")
                self.count = len(f["images"])
        elif self.path.suffix == ".npz":
            from srdit.metrics.evaluate import check_images

            self.kind = "npz"
            self.count = check_images(self.path)[0]
            self._array = None
        else:
            raise ValueError(f"{self.path}: unknown source; expected an image folder, an HDF5 image cache (.h5) "
                             f"or an .npz with arr_0")

    def read(self, indices: np.ndarray) -> np.ndarray:
        if self.kind == "folder":
            from PIL import Image

            return np.stack([adm_center_crop(Image.open(self.files[i]), self.resolution) for i in indices])
        if self.kind == "hdf5":
            import h5py

            with h5py.File(self.path, "r") as f:
                return f["images"][np.sort(indices)]     # indices arrive sorted
        if self._array is None:
            from srdit.metrics.npz_io import load_npz_array
            self._array = load_npz_array(self.path, "arr_0")
        return self._array[indices]


def select_indices(count: int, num: int | None, seed: int) -> np.ndarray:
    if num is None or num >= count:
        if num is not None and num > count:
            raise ValueError(f"--num {num}: the source has only {count} images")
        return np.arange(count)
    return np.sort(np.random.RandomState(seed).choice(count, num, replace=False))


def cached_pool_features(reference: str | Path, inception_sha256: str) -> np.ndarray | None:
    """The reference's stored pool_3 features if the same Inception weights computed them, else None."""
    from srdit.metrics.npz_io import npz_keys

    if not {POOL_KEY, POOL_SHA_KEY} <= set(npz_keys(reference)):
        return None
    with np.load(reference) as ref:
        if str(ref[POOL_SHA_KEY].reshape(-1)[0]) != inception_sha256:
            return None
        return ref[POOL_KEY].astype(np.float32)


def build_reference_batch(source: str | Path, out: str | Path, *, num: int | None = None, seed: int = 0,
                          resolution: int = 256, inception: str | None = None, resources=None,
                          batch_size: int = 100, device: str | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from srdit.metrics.evaluate import default_device, write_json
    from srdit.metrics.fid import feature_statistics
    from srdit.metrics.inception import load_inception
    from srdit.metrics.npz_io import NpzWriter

    src = ImageSource(source, resolution)
    indices = select_indices(src.count, num, seed)
    if len(indices) < 2:
        raise ValueError(f"a reference batch needs at least 2 images; got {len(indices)}")
    net = load_inception(inception, resources, default_device(device))
    first = src.read(indices[:1])
    shape = (len(indices), *first.shape[1:])
    pools, spatials = [], []

    def chunks() -> Iterator[np.ndarray]:
        # Each chunk is written to arr_0 and, on the way, run through Inception.
        with tqdm(total=len(indices), desc="reference batch", unit="img") as bar:
            for start in range(0, len(indices), batch_size):
                images = src.read(indices[start:start + batch_size])
                if images.shape[1:] != shape[1:] or images.dtype != np.uint8:
                    raise ValueError(f"{source}: images of shape {images.shape[1:]} {images.dtype}; expected "
                                     f"{shape[1:]} uint8 like the first one")
                with torch.no_grad():
                    feats = net(torch.from_numpy(np.ascontiguousarray(images)))
                pools.append(feats.pool.cpu().numpy())
                spatials.append(feats.spatial.cpu().numpy())
                bar.update(len(images))
                yield images

    out = Path(out)
    with NpzWriter(out) as writer:
        writer.add_streamed("arr_0", shape, np.uint8, chunks())
        mu, sigma = feature_statistics(np.concatenate(pools))
        mu_s, sigma_s = feature_statistics(np.concatenate(spatials))
        for name, arr in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s),
                          (POOL_KEY, np.concatenate(pools)), (POOL_SHA_KEY, np.array([net.describe()["sha256"]]))):
            writer.add(name, arr)
    info = {"reference": str(out), "sha256": sha256_file(out), "source": str(Path(source).resolve()),
            "source_kind": src.kind, "source_count": src.count, "num": len(indices), "seed": seed,
            "image_shape": list(shape[1:]), "center_crop": f"ADM, {resolution} px" if src.kind == "folder" else None,
            "inception": net.describe()}
    write_json(out.with_suffix(".json"), info)
    return info


def run(args) -> int:
    try:
        info = build_reference_batch(args.source, args.out, num=args.num, seed=args.seed, resolution=args.resolution,
                                     inception=args.inception, resources=args.resources,
                                     batch_size=args.batch_size, device=args.device)
    except (MissingResourceError, ValueError) as e:
        print(f"srdit reference-batch: {e}", file=sys.stderr)
        return 1
    print(f"reference batch: {info['num']} images {tuple(info['image_shape'])} -> {info['reference']} "
          f"(sha256 {info['sha256'][:16]}...); Inception weights: {info['inception']['provenance']}")
    return 0
