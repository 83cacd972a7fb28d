"""Turn what users call an image (PIL image, numpy array, path, encoded bytes) into an RGB PIL image, or say
clearly why not.

A file or encoded bytes is decoded as a camera or browser would show it, within a budget:
- EXIF orientation is applied, so a phone photo stored sideways comes out upright;
- an image of more than MAX_PIXELS pixels (width x height, default 64 megapixels: 192 MB as RGB) is
  refused with an ImageError naming it and its size, read from the header before any pixel is decoded.
  PIL's own DecompressionBombWarning / DecompressionBombError never escape; PIL refuses outright
  anything over twice Image.MAX_IMAGE_PIXELS (179 megapixels by default), so to accept images larger
  than that, raise both limits;
- an animated image (GIF, WebP, APNG of more than one frame) gives its first frame, with one warning
  per file (a training set of photos that holds a few animations is still usable; the warning says
  which files to look at).
PIL images and arrays are taken as given: their pixels are what the caller already sees.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Modes that convert to RGB without guessing a value range. 16-bit and float modes ('I', 'I;16', 'F')
# would need a scale that we cannot know, so they are refused rather than silently clipped.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "LAB", "HSV"}

# Files and bytes of more pixels are refused (load_image's max_pixels overrides it per call; 0 = no limit
# of ours). A module setting, so one assignment covers readers, processors and DataLoader workers alike.
MAX_PIXELS = 64_000_000

_animated_warned: set[str] = set()  # names of animated files already warned about, in this process
# warnings.catch_warnings swaps process-wide state and restores it on exit: two threads inside it at once
# can restore each other's filters. Opening (the header, where PIL's bomb check warns) takes turns.
_open_lock = threading.Lock()


class ImageError(ValueError):
    """An input that is not a usable image; the message names the input and the problem."""


def load_image(image, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """PIL image, numpy array, path or encoded bytes -> RGB PIL image; ImageError says why not.
    Files and bytes: EXIF orientation applied, refused over `max_pixels` (default MAX_PIXELS), first
    frame of an animation (logged once per file); see the module docstring."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        name = name or f"<{len(image)} bytes>"
        image = _decode(io.BytesIO(bytes(image)), name, max_pixels)
    elif isinstance(image, (str, Path)):
        name = name or str(image)
        image = _decode(image, name, max_pixels)
    elif isinstance(image, np.ndarray):
        image = _from_array(image, name or "ndarray")
    elif not isinstance(image, Image.Image):
        name = name or type(image).__name__
        raise ImageError(f"image {name}: expected a PIL image, numpy array or path, got {type(image).__name__}")
    name = name or type(image).__name__
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image {name}: zero size ({image.width}x{image.height})")
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageError(
            f"image {name}: mode {image.mode!r} cannot be converted to RGB without guessing its "
            f"value range; convert it yourself (modes accepted: {sorted(CONVERTIBLE_MODES)})"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(source, name: str, max_pixels: int | None) -> Image.Image:
    """Open, check the size against the limit, decode (frame 0) and turn upright."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with _open_lock, warnings.catch_warnings():
            # Our limit decides (below); PIL's warning for images over Image.MAX_IMAGE_PIXELS would only
            # repeat it, or, where a caller turned warnings into errors, end a whole run.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)  # reads the header only
        with opened as im:
            w, h = im.size
            if limit and w * h > limit:
                raise ImageError(
                    f"image {name}: too large ({w}x{h} = {w * h:,} pixels; the limit is {limit:,}: "
                    f"vlbridge.core.images.MAX_PIXELS)"
                )
            frames = getattr(im, "n_frames", 1)
            im.load()  # frame 0
            image = ImageOps.exif_transpose(im)  # a copy, upright, that outlives the file
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image {name}: file not found") from None
    except Image.DecompressionBombError as e:  # over twice PIL's limit: refused before we see the size
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,} pixels" if m else str(e)
        raise ImageError(
            f"image {name}: too large ({size}; PIL refuses over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}: "
            f"PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except Exception as e:  # whatever PIL raises for bytes that are not an image it can decode
        raise ImageError(f"image {name}: cannot decode ({type(e).__name__}: {e})") from None
    if frames > 1 and name not in _animated_warned:
        _animated_warned.add(name)
        log.warning("image %s: animated (%d frames): using the first frame", name, frames)
    return image


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
