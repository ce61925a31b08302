"""The ADM center crop (docs/recipe.md section 6), used for ImageNet at 256 and 512 px.

Halve the image with a BOX filter while its short side is at least twice the target, resize
bicubically so the short side equals the target (each side rounded), then cut the central
square. This is the crop of the reference's `center-crop-dhariwal` transform, which the FID
reference batches were made with.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """PIL image (any mode) -> uint8 array (size, size, 3)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])


def load_and_crop(path: str, size: int) -> np.ndarray:
    """Decode an image file fully (so truncated files fail here) and crop it."""
    with Image.open(path) as image:
        image.load()
        return adm_center_crop(image, size)
