"""Seeded, stratified carving of a data set: a validation set, or a small subset to work on.

Radek's rules: carve a validation set out of the training data and look at
the test split once; and work on a subset small enough that an experiment
takes ~10 seconds, switching to all of the data being one argument. Both are
the same operation: pick n examples per class in proportion to the class
sizes, at random but reproducibly, and keep the rest.
"""

from __future__ import annotations

import numpy as np

from jaxlearn.data.arrays import ImageArrays


def carve_indices(
    labels: np.ndarray, n: int | float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified random sample of `n` examples, and of the rest.

    Each class gets floor(n * its share) examples, and the examples left over
    go to the classes with the largest remainders (Hamilton's method), so that
    class proportions match the whole to within one example per class.

    Args:
      labels: (N,) integer labels.
      n: how many to pick: an int in [1, N], or a fraction in (0, 1] of N
        (rounded to the nearest int, at least 1).
      seed: the sample is a pure function of (labels, n, seed).

    Returns:
      (picked, rest): sorted, disjoint int64 index arrays covering range(N).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-d array, got shape {labels.shape}")
    total = labels.size
    count = _count(n, total)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / total
    per_class = np.floor(quota).astype(np.int64)
    leftover = count - per_class.sum()
    # Stable sort: ties in the remainder go to the lower class index.
    per_class[np.argsort(-(quota - per_class), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, per_class, strict=True)
    ]
    picked = np.sort(np.concatenate(picked))
    rest = np.setdiff1d(np.arange(total), picked)
    return picked, rest


def carve(data: ImageArrays, n_train: int | float, *, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """Split `data` into a stratified random training set of `n_train` and a validation set.

    E.g. `train, valid = carve(cats_and_dogs, 650, seed=0)` gives 650 training
    images (325 per class for two equal classes) and the other 1,349 as validation.

    Args:
      data: the labelled training data to carve.
      n_train: training examples: an int count or a fraction in (0, 1].
      seed: the same seed gives the same split.

    Returns:
      (train, valid), disjoint, together all of `data`, each in the original order.
    """
    picked, rest = carve_indices(data.labels, n_train, seed=seed)
    return data.take(picked), data.take(rest)


def subset(data: ImageArrays, n: int | float, *, seed: int) -> ImageArrays:
    """A stratified random subset of `n` examples (int) or of a fraction `n` of `data`.

    The 10-second rule: develop on a subset that trains in seconds; switching
    to the full data is `n=1.0`.
    """
    return data.take(carve_indices(data.labels, n, seed=seed)[0])


def _count(n: int | float, total: int) -> int:
    """`n` as a count in [1, total]; ValueError naming `n` otherwise."""
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)):
        raise ValueError(f"n must be an int count or a float fraction, got {n!r}")
    if isinstance(n, (float, np.floating)):
        if not 0.0 < n <= 1.0:
            raise ValueError(f"n as a fraction must lie in (0, 1], got {n}")
        return max(1, round(n * total))
    if not 1 <= n <= total:
        raise ValueError(f"n must lie in [1, {total}] (the number of examples), got {n}")
    return int(n)
