"""Pseudo-labelling: a teacher labels an unlabelled pool, its confident guesses join training.

The second idea that stretches small data beyond augmentation (Lee 2013, "Pseudo-Label";
fastai's and Kaggle's staple): train a teacher on the labelled images, let it predict the
unlabelled ones (ideally with its EMA weights and TTA, `jaxlearn.ensemble.predict_tta`),
keep the predictions it is sure of, and train a student on the labelled images plus those.

The pool enters as images only: `select_confident` and `with_pseudo_labels` take the
teacher's probabilities, never labels, and refuse an `ImageArrays` (which carries labels)
in place of the pool's images, so the pool's true labels cannot leak into training.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxlearn.data.arrays import ImageArrays

__all__ = ["PseudoLabels", "select_confident", "with_pseudo_labels"]


class PseudoLabels(NamedTuple):
    """The pool images a teacher is confident about.

    Attributes:
      index: (K,) positions in the pool, ascending.
      label: (K,) the teacher's class for each (int32).
      confidence: (K,) the teacher's probability of that class.
    """

    index: np.ndarray
    label: np.ndarray
    confidence: np.ndarray


def select_confident(probs: np.ndarray, threshold: float, *, balance: bool = True) -> PseudoLabels:
    """The rows of `probs` whose top class has probability >= `threshold`.

    With `balance`, each class keeps only as many as the class with the fewest confident
    rows, its most confident ones: a teacher that leans to one class would otherwise
    hand the student a skewed training set and confirm its own bias.

    Args:
      probs: (N, C) class probabilities of the pool (rows sum to 1).
      threshold: the least top-class probability kept, in [1 / C, 1].
      balance: equal counts per class.

    Returns:
      `PseudoLabels` (possibly empty).

    Raises:
      ValueError: probs not (N, C) probability rows, or threshold out of range.
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {probs.shape}")
    if probs.size and (probs.min() < 0 or not np.allclose(probs.sum(1), 1.0, atol=1e-4)):
        raise ValueError("probs must be probability rows (>= 0, summing to 1): pass softmax output")
    num_classes = probs.shape[1]
    if not 1.0 / num_classes <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [1/{num_classes}, 1], got {threshold}")
    label, confidence = probs.argmax(1), probs.max(1)
    keep = np.flatnonzero(confidence >= threshold)
    if balance and keep.size:
        per_class = [keep[label[keep] == c] for c in range(num_classes)]
        n = min(len(rows) for rows in per_class)
        # The n most confident of each class (stable sort: ties keep pool order).
        keep = np.sort(np.concatenate(
            [rows[np.argsort(-confidence[rows], kind="stable")[:n]] for rows in per_class]
        ))  # fmt: skip
    return PseudoLabels(keep, label[keep].astype(np.int32), confidence[keep].astype(np.float32))


def with_pseudo_labels(
    labelled: ImageArrays, pool_images: np.ndarray, chosen: PseudoLabels
) -> ImageArrays:
    """The labelled images followed by the chosen pool images under their pseudo-labels.

    Args:
      labelled: the labelled training set.
      pool_images: (N, H, W, C) uint8 images of the unlabelled pool, without labels.
      chosen: `select_confident` of the teacher's probabilities on `pool_images`.

    Returns:
      An `ImageArrays` of len(labelled) + len(chosen.index) images, same class names.

    Raises:
      ValueError: the pool given with labels (an `ImageArrays`), or images whose shape
        differs from the labelled ones, or indices outside the pool.
    """
    if isinstance(pool_images, ImageArrays):
        raise ValueError(
            "pass the unlabelled pool as images only (pool.images), not an ImageArrays: "
            "its labels must never reach training"
        )
    pool_images = np.asarray(pool_images)
    if pool_images.shape[1:] != labelled.images.shape[1:] or pool_images.dtype != np.uint8:
        raise ValueError(
            f"pool images must be uint8 of shape (N, *{labelled.images.shape[1:]}) like the "
            f"labelled ones, got {pool_images.dtype} {pool_images.shape}"
        )
    index = np.asarray(chosen.index)
    if index.size and (index.min() < 0 or index.max() >= len(pool_images)):
        raise ValueError(f"pseudo-label indices must lie in [0, {len(pool_images)})")
    return ImageArrays(
        np.concatenate([labelled.images, pool_images[index]]),
        np.concatenate([labelled.labels, np.asarray(chosen.label, np.int32)]),
        labelled.class_names,
    )
