"""`srdit demo-data --out DIR`: the small ImageFolder tree the CPU demo trains on.

Nothing is downloaded: the pictures are the photos bundled with scikit-image (`skimage.data`).
Each class is one photo; its images are random crops (45-100% of the short side, aspect 3:4 to
4:3), horizontal flips and brightness shifts of it, resized so the short side is 64-144 px and
saved as JPEG. A seeded generator makes the tree identical on every machine. One truncated JPEG
and one text file are added so that `srdit prepare` has files to skip and report.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# class folder -> skimage.data function; sorted names give labels 0..3
CLASSES = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
CORRUPT_FILE = "cat/truncated.JPEG"
NON_IMAGE_FILE = "coffee/notes.txt"


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    side = rng.uniform(0.45, 1.0) * min(w, h)
    aspect = rng.uniform(0.75, 4 / 3)
    cw, ch = min(w, int(side * aspect ** 0.5)), min(h, int(side / aspect ** 0.5))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = photo.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    short = int(rng.integers(64, 145))
    scale = short / min(image.size)
    image = image.resize((max(short, round(image.size[0] * scale)), max(short, round(image.size[1] * scale))),
                         resample=Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_demo_tree(out: str | Path, per_class: int = 96, seed: int = 0) -> Path:
    """Write the tree to `out` (built in `<out>.tmp`, then renamed); returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; delete it or choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for folder, photo_name in CLASSES.items():
        photo = _photo(photo_name)
        (tmp / folder).mkdir(parents=True)
        for i in range(per_class):
            _variant(photo, rng).save(tmp / folder / f"img_{i:04d}.JPEG", quality=90)
    # A JPEG cut short: it opens, but decoding fails ("image file is truncated").
    buffer = io.BytesIO()
    _variant(_photo(CLASSES["cat"]), rng).save(buffer, format="JPEG", quality=90)
    (tmp / CORRUPT_FILE).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (tmp / NON_IMAGE_FILE).write_text("Not an image: srdit prepare must skip this file and list it in its report.\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to create (one subfolder per class)")
    parser.add_argument("--per-class", type=int, default=96, help="images per class (default 96)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        out = write_demo_tree(args.out, args.per_class, args.seed)
    except FileExistsError as e:
        print(f"srdit demo-data: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {len(CLASSES)} classes x {args.per_class} images from skimage.data, plus {CORRUPT_FILE} "
          f"(truncated JPEG) and {NON_IMAGE_FILE} (not an image), which prepare skips and reports")
    return 0
