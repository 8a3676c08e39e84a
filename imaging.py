"""Image decoding (RGB, EXIF orientation, fast reduced-size JPEG decoding) and mean/std statistics.

python -c "import glob, imaging; print(imaging.compute_mean_std(glob.glob('data/demo/train/images/*/*.jpg'), None))"
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

import utils


def load_image(path: str | os.PathLike, min_size: Sequence[int] | None = None) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied.

    With `min_size` (H, W), a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at least
    that large (PIL draft mode): several times faster, and the resize that follows gives the same picture.
    """
    try:
        return _decode(path, min_size)
    except _DECODE_ERRORS as e:
        raise utils.UnreadableImageError(path, str(e) or type(e).__name__) from None


def decode_fixed(path: str | os.PathLike, size: Sequence[int]) -> np.ndarray:
    """`load_image` at exactly `size` (H, W), as an HxWx3 uint8 array: what the caches store and what the
    datasets read when there is no cache, so both give the transforms the same pixels."""
    image = load_image(path, size)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode(path: str | os.PathLike, min_size: Sequence[int] | None) -> Image.Image:
    with Image.open(path) as image:
        if min_size is not None and image.format == "JPEG":
            h, w = int(min_size[0]), int(min_size[1])
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                h, w = w, h
            image.draft(image.mode if image.mode == "CMYK" else "RGB", (w, h))
        image = to_8bit(ImageOps.exif_transpose(image))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent areas become white, not whatever colour the hidden pixels happen to hold.
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return image.convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """Wide-range grayscale (16-bit `I;16*`, 32-bit `I`, float `F`) as 8-bit `L`, scaled, not clipped: PIL's
    convert("RGB") clips them, so a 16-bit PNG would decode almost white. The range is read from the mode and
    the values: 16-bit data is scaled by 1/257, floats up to 1.0 by 255, and 8-bit values stay as they are."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    top = float(pixels.max()) if pixels.size else 0.0
    if image.mode.startswith("I;16") or 255 < top <= 65535:
        pixels = pixels / 257.0
    elif image.mode == "F" and top <= 1.0:
        pixels = pixels * 255.0
    elif top > 65535:
        pixels = pixels * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def compute_mean_std(
    paths: Sequence[str | os.PathLike], min_size: Sequence[int] | None, max_images: int = 256, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) over all pixels of a random sample of images.

    The std is that of the pooled pixels, sqrt(E[x^2] - E[x]^2), not an average of per-image stds.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(max_images, len(paths)), replace=False)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in chosen:
        pixels = np.asarray(load_image(paths[i], min_size), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
