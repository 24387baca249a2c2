"""`ClassificationInterpretation`: what a classifier gets wrong, as fast.ai shows it.

The predictions are computed once (`Learner.get_preds`, on the validation set by
default); the figures are `jaxlearn.plots`'s (`plot_top_losses`,
`plot_confusion_matrix`), and `most_confused` lists the class pairs the confusion
matrix shows, largest first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxlearn import plots
from jaxlearn.data.stream import SourceImages


class ClassificationInterpretation:
    """Images, labels and predicted probabilities of one data set, and views of the mistakes.

    Attributes:
      images: (N, H, W, C) images as the loaders hold them, or `SourceImages` (a
        streamed set's, read from disk when shown).
      labels: (N,) true classes.
      probs: (N, C) predicted probabilities.
      classes: the C class names.
    """

    def __init__(
        self,
        images: np.ndarray | SourceImages,
        labels: np.ndarray,
        probs: np.ndarray,
        classes: Sequence[str],
    ):
        """Args: images, labels, probs, classes: see the class attributes."""
        self.images = images if isinstance(images, SourceImages) else np.asarray(images)
        self.labels = np.asarray(labels)
        self.probs, self.classes = np.asarray(probs), tuple(classes)
        n = len(self.labels)
        if self.probs.shape != (n, len(self.classes)) or len(self.images) != n:
            raise ValueError(
                f"images, labels and probs must describe the same {n} examples of "
                f"{len(self.classes)} classes, got {self.images.shape}, {self.labels.shape}, "
                f"{self.probs.shape}"
            )
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"labels must be (N,) class indices, got {self.labels.dtype} "
                             f"{self.labels.shape}")  # fmt: skip
        if n and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}), got {self.labels.min()} to "
                f"{self.labels.max()}"
            )
        self.labels = self.labels.astype(np.int64)  # uint8 * C would wrap (NumPy 2)

    @classmethod
    def from_learner(cls, learn, dl_or_images=None, with_tta: bool = False):
        """The predictions of `learn` (a `jaxlearn.learner.Learner`) on labelled data.

        Args:
          learn: the learner.
          dl_or_images: None (the validation set), an `ImageArrays`, an `ArrayLoader`
            or an evaluation `StreamLoader` (its images then stay on disk).
          with_tta: predict with test-time augmentation (`Learner.tta`).
        """
        probs, labels, images = learn._predictions(
            dl_or_images, learn.state.apply_fn, learn._members(False), with_tta=with_tta
        )
        if labels is None:
            raise ValueError("interpretation needs labelled data: an ImageArrays or a loader")
        return cls(images, labels, probs, learn.classes)

    @property
    def predictions(self) -> np.ndarray:
        """(N,) most probable class of each example."""
        return np.argmax(self.probs, -1)

    def confusion_matrix(self) -> np.ndarray:
        """(C, C) counts of (actual, predicted) pairs."""
        c = len(self.classes)
        return np.bincount(self.labels * c + self.predictions, minlength=c * c).reshape(c, c)

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        """(actual, predicted, count) of every mistaken pair seen at least `min_val` times,
        most frequent first (fastai's `most_confused`)."""
        counts = self.confusion_matrix()
        np.fill_diagonal(counts, 0)
        pairs = [
            (self.classes[a], self.classes[p], int(counts[a, p]))
            for a, p in zip(*np.nonzero(counts >= max(min_val, 1)), strict=True)
        ]
        return sorted(pairs, key=lambda pair: -pair[2])

    def top_losses(self, k: int = 9) -> tuple[np.ndarray, np.ndarray]:
        """(indices, losses) of the `k` examples with the highest loss (`plots.top_losses`)."""
        return plots.top_losses(self.labels, self.probs, k)

    def plot_top_losses(self, k: int = 9, path: str | os.PathLike | None = None):
        """The `k` most confidently wrong images (`plots.plot_top_losses`)."""
        worst, _ = self.top_losses(k)  # only these images are read (from disk, if streamed)
        return plots.plot_top_losses(
            self.images[worst], self.labels[worst], self.probs[worst], self.classes, k=k,
            path=path,
        )  # fmt: skip

    def plot_confusion_matrix(self, path: str | os.PathLike | None = None):
        """The confusion matrix with its counts (`plots.plot_confusion_matrix`)."""
        return plots.plot_confusion_matrix(self.labels, self.predictions, self.classes, path=path)
