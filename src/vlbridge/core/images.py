"""Turn what users call an image (PIL image, numpy array, path) into an RGB PIL image, or say clearly why not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes that convert to RGB without guessing a value range. 16-bit and float modes ('I', 'I;16', 'F')
# would need a scale that we cannot know, so they are refused rather than silently clipped.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "LAB", "HSV"}


class ImageError(ValueError):
    """An input that is not a usable image; the message names the input and the problem."""


def load_image(image, name: str | None = None) -> Image.Image:
    name = name or (str(image) if isinstance(image, (str, Path)) else type(image).__name__)
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise ImageError(f"image {name}: file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {name}: cannot decode ({e})") from None
    elif isinstance(image, np.ndarray):
        image = _from_array(image, name)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"image {name}: expected a PIL image, numpy array or path, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image {name}: zero size ({image.width}x{image.height})")
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageError(
            f"image {name}: mode {image.mode!r} cannot be converted to RGB without guessing its "
            f"value range; convert it yourself (modes accepted: {sorted(CONVERTIBLE_MODES)})"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    """(H, W), (H, W, 1|3|4) uint8, or float in [0, 1]."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"image {name}: array of shape {a.shape} is not (H, W), (H, W, 3) or (H, W, 4)")
    if 0 in a.shape:
        raise ImageError(f"image {name}: zero size array {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"image {name}: array holds NaN or inf")
        if a.min() < 0 or a.max() > 1:
            raise ImageError(f"image {name}: float array must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        a = (a * 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"image {name}: array dtype {a.dtype} is not uint8 or float")
    return Image.fromarray(a)
