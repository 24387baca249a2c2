"""MNIST from its four original idx files (gzip or not), as tfds and torchvision download them.

The idx format (LeCun's page): a big-endian header, magic number 0x00000803
for a 3-d uint8 array of images (then N, rows, columns) or 0x00000801 for a
1-d uint8 array of labels (then N), followed by the raw bytes.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from jaxlearn.data.arrays import ImageArrays

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x803, 0x801


def load_mnist(root: str | os.PathLike, split: str = "train") -> ImageArrays:
    """Read ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] as (N, 28, 28, 1) uint8.

    Args:
      root: folder holding the idx files (e.g. ../shared/data/mnist).
      split: 'train' (60,000 images) or 'test' (10,000, the t10k files).

    Returns:
      `ImageArrays` with class names '0' ... '9'.

    Raises:
      FileNotFoundError: `root` or one of the two files of `split` is missing.
      ValueError: unknown `split`; a file with a wrong magic number, a size
        that does not match its header, or image and label counts that differ.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST root folder not found: {root}")
    images = _read_idx(_find(root, f"{_PREFIX[split]}-images-idx3-ubyte"), _IMAGES_MAGIC)
    labels = _read_idx(_find(root, f"{_PREFIX[split]}-labels-idx1-ubyte"), _LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split} in {root}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"MNIST {split} labels in {root} exceed 9 (max {labels.max()})")
    return ImageArrays(images[..., None], labels, tuple(str(d) for d in range(10)))


def _find(root: Path, name: str) -> Path:
    """ROOT/NAME.gz or ROOT/NAME, whichever exists."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file not found: {root / name}[.gz]")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in the idx file at `path`, checked against its `magic` and header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else "(file too short)"
        raise ValueError(f"{path} is not an idx file with magic {magic:#010x}: found {found}")
    shape = tuple(int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but the file "
            f"holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)
