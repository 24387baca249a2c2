"""`ImageArrays`: a labelled image data set held in host memory as NumPy arrays.

Every source (tfds, image folders, MNIST idx files) returns one, so that what
comes after (carving a validation set, the device-resident loader, the mean
and std for normalization) never depends on where the images came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ImageArrays:
    """Images, labels and class names of one split, in memory.

    Attributes:
      images: (N, H, W, C) uint8, NHWC as the models take them.
      labels: (N,) int32 class indices into `class_names`.
      class_names: the name of each class index; the same order in every split
        of a data set, so that a label means the same class everywhere.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be a (N, H, W, C) uint8 array, got shape {images.shape} "
                f"and dtype {images.dtype}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        names = tuple(str(n) for n in self.class_names)
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(
                f"labels must lie in [0, {len(names)}) for class_names of length "
                f"{len(names)}, got range [{labels.min()}, {labels.max()}]"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))
        object.__setattr__(self, "class_names", names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of `class_names`)."""
        return len(self.class_names)

    def take(self, indices: np.ndarray) -> ImageArrays:
        """The examples at `indices` (in that order; or where a boolean mask is True)."""
        indices = as_indices(indices, len(self))
        return ImageArrays(self.images[indices], self.labels[indices], self.class_names)


def as_indices(indices: Any, n: int) -> np.ndarray:
    """`indices` into `n` examples as int64 positions, as NumPy indexing reads them.

    Integers are kept (negative ones count from the end); a boolean mask of length
    `n` becomes the positions where it is True. (A plain `np.asarray(mask, np.int64)`
    would turn the mask into 0s and 1s: rows 0 and 1, over and over.)

    Raises:
      ValueError: a mask of another length, or indices neither integer nor boolean.
    """
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n,):
            raise ValueError(f"a boolean mask must have shape ({n},), got {indices.shape}")
        return np.flatnonzero(indices)
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers or a boolean mask, got dtype {indices.dtype}")
    return indices.astype(np.int64)
