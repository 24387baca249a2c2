"""Decode one image file (or array) to a fixed-size RGB uint8 array, whatever its mode.

Used by the image-folder source (one call per file, in a thread pool) and by
the tfds source (to bring images of every size to one size). Failures are
returned as a short reason string, never raised, so that one broken file in
60,000 cannot crash a worker: the caller counts the reasons and warns once.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Resize policies: 'crop' scales the shortest side to `size` then cuts the
#: centre square (keeps the aspect ratio; fast.ai's default); 'squash' scales
#: both sides to `size` (keeps all of the picture, distorts its shape).
RESIZE_POLICIES = ("crop", "squash")

# Reasons a file is skipped, counted in the one warning a source emits.
EMPTY, NOT_IMAGE, CORRUPT, BOMB = "empty file", "not an image", "corrupt", "decompression bomb"

_WHITE = (255, 255, 255, 255)


def check_resize(size: int, resize: str) -> int:
    """`size` as a Python int; ValueError unless it is a positive integer and `resize` a policy.

    NumPy integers are taken (a size schedule built with NumPy yields them); bools are not.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int (the side of the square), got {size!r}")
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    return int(size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency (RGBA, LA, palette with a transparent colour) is composited on
    white, as a browser shows it on a white page: dropping alpha instead would
    reveal whatever colour the invisible pixels happen to store. 16-bit and
    32-bit integer greyscale ('I;16', 'I') is scaled from [0, 65535] to
    [0, 255] (PIL's own conversion clips it, turning most photos white).
    CMYK, greyscale, YCbCr and the rest go through PIL's `convert('RGB')`.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, size: int, resize: str) -> Image.Image:
    """Resize to `size` x `size` with the policy `resize` ('crop' or 'squash').

    'crop' resamples only the centred square of side min(W, H), which equals
    scaling the shortest side to `size` and then cutting the centre, in one
    antialiased bicubic pass.
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    box = None
    if resize == "crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def decode_file(path: str, size: int, resize: str) -> np.ndarray | str:
    """Read the image at `path` as a (size, size, 3) uint8 array, or return why it failed.

    The EXIF orientation is applied (a phone photo taken upright comes out
    upright). JPEGs are decoded at a reduced DCT scale that still covers
    `size` (`Image.draft`), which makes large photos several times faster to
    read. Decompression bombs are the files PIL refuses (more than
    `PIL.Image.MAX_IMAGE_PIXELS` pixels, 89 M by default; the caller turns
    PIL's warning into an error while decoding).

    Returns:
      The array, or one of the reasons 'empty file', 'not an image',
      'corrupt', 'decompression bomb', 'unreadable (<error type>)'.
    """
    try:
        if os.path.getsize(path) == 0:
            return EMPTY
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(image)
            return np.asarray(resize_image(to_rgb(image), size, resize), dtype=np.uint8)
    except UnidentifiedImageError:
        return NOT_IMAGE
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return BOMB
    except (OSError, SyntaxError, ValueError, EOFError):
        # Truncated or damaged data: PIL raises OSError ('image file is
        # truncated'), SyntaxError (bad PNG chunk) or ValueError while loading.
        return CORRUPT
    except Exception as error:  # a plugin's own error must not kill the pool
        return f"unreadable ({type(error).__name__})"


def resize_array(image: np.ndarray, size: int, resize: str) -> np.ndarray:
    """Resize one (H, W, C) uint8 array (C = 1 or 3) to (size, size, C) with policy `resize`."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(resize_image(pil, size, resize), dtype=np.uint8)
    return out[..., None] if channels == 1 else out
