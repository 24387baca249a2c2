"""Batch-level augmentations with soft targets: mixup and cutmix, `(key, batch) -> batch`.

Image augmentations (`jaxlearn.data.augment`) change pixels; these mix pairs of
examples, so they change the labels too. Each example is paired with another of
the batch (a random permutation) and blended with weight `lam` for its own image
and `1 - lam` for its partner's; the batch gains `"target"`, the (N, C) float32
probability rows `lam * own + (1 - lam) * partner` that the train step's loss
uses instead of the integer `"label"`. A batch that already carries a `"target"`
(an earlier mix, or soft labels from a teacher) mixes those rows, so mixes chain
with `jaxlearn.data.augment.compose`; label smoothing is applied by the step to
the mixed target (it is linear, so smoothing then mixing is the same).

Hard labels for accuracy: `"label"` becomes the label of the image with the larger
weight (`lam >= 0.5`: its own), so train accuracy counts the dominant class.

Padded rows (`"mask"` False, as in evaluation batches) are never mixed, and real
rows never take content from them: a pair with a padded member keeps `lam = 1`.
The mask is returned untouched.

Both are frozen dataclasses, so two `MixUp(0.4, 10)` compare equal and
`make_train_step(batch_augment=MixUp(0.4, 10))` returns the same (already
compiled) step each time. Inside the train step they run on the preprocessed
float images, after the image augmentations; mixup's blend commutes with any
per-channel affine normalization, cutmix's paste with any per-pixel map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

#: A batch augmentation: (PRNG key, batch dict) -> batch dict, possibly with a "target".
BatchAugment = Callable[[jax.Array, dict], dict]


@dataclasses.dataclass(frozen=True)
class _Mix:
    """Settings shared by the mixes, checked once: a hashable value, keyed by jit by value."""

    alpha: float
    num_classes: int

    def __post_init__(self):
        alpha, num_classes = self.alpha, self.num_classes
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


def _targets(batch: dict, num_classes: int) -> jax.Array:
    """The batch's soft targets, or its labels one-hot."""
    if "target" in batch:
        target = batch["target"]
        if target.shape != (batch["label"].shape[0], num_classes):
            raise ValueError(
                f"batch 'target' must have shape (N, {num_classes}), got {target.shape}"
            )
        return target.astype(jnp.float32)
    return jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)


def _pairs(key: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """A random partner per row, and which rows may mix: both row and partner are real."""
    n = batch["label"].shape[0]
    partner = jax.random.permutation(key, n)
    mask = batch.get("mask")
    mixable = jnp.ones((n,), bool) if mask is None else mask & mask[partner]
    return partner, mixable


def _mixed(batch: dict, images: jax.Array, partner, lam, num_classes: int) -> dict:
    """The batch with `images`, the mixed targets and the dominant image's label."""
    target = _targets(batch, num_classes)
    mixed = lam[:, None] * target + (1.0 - lam[:, None]) * target[partner]
    label = jnp.where(lam >= 0.5, batch["label"], batch["label"][partner])
    return {**batch, "image": images, "label": label, "target": mixed}


@dataclasses.dataclass(frozen=True)
class MixUp(_Mix):
    """Blend each image with a partner's: `lam * x_i + (1 - lam) * x_j` (Zhang et al. 2018).

    "mixup: Beyond Empirical Risk Minimization": `lam ~ Beta(alpha, alpha)`,
    alpha 0.2-0.4 on ImageNet and 1.0 on CIFAR-10 in the paper. `lam` is drawn
    per example and folded to `max(lam, 1 - lam)`, as fastai does: with a
    uniformly random partner the pair (i, j) at `lam` is as likely as (j, i) at
    `1 - lam`, so folding changes no mixed example's probability, and it makes
    each row's own image the dominant one (its label is kept for accuracy). As
    alpha -> 0, `lam` -> 1 and the batch comes back unchanged.

    Attributes:
      alpha: Beta concentration, > 0.
      num_classes: length of the target rows, >= 2.
    """

    def __call__(self, key: jax.Array, batch: dict) -> dict:
        """The mixed batch (float images, `"target"` rows, dominant `"label"`)."""
        images = batch["image"]
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"MixUp blends float images (after preprocess), got {images.dtype}")
        k_lam, k_pair = jax.random.split(key)
        lam = jax.random.beta(k_lam, self.alpha, self.alpha, (images.shape[0],))
        partner, mixable = _pairs(k_pair, batch)
        lam = jnp.where(mixable, jnp.maximum(lam, 1.0 - lam), 1.0)
        w = lam.astype(images.dtype)[:, None, None, None]
        blended = w * images + (1 - w) * images[partner]
        return _mixed(batch, blended, partner, lam, self.num_classes)


@dataclasses.dataclass(frozen=True)
class CutMix(_Mix):
    """Paste a random box of a partner image into each image (Yun et al. 2019).

    "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
    Features": `lam ~ Beta(alpha, alpha)` (alpha 1.0 in the paper) and a box of
    sides `sqrt(1 - lam)` times the image's, rounded to pixels; the target weight
    of the own image is the exact fraction of its pixels left after the paste.
    One box per example, placed uniformly among the positions inside the image.
    (The paper centres it uniformly and clips it at the border, which shrinks the
    pasted area below `1 - lam`, e.g. by about a third at alpha 1, and pastes up
    to half an image even as alpha -> 0.) Here the pasted fraction is `1 - lam` up
    to the rounding of the sides, and as alpha -> 0 the box is empty or the whole
    image: each row is an input example with its own label and one-hot target.
    `lam` is not folded (a box and its complement are not alike), so a box
    covering more than half makes the partner's label the hard one.

    Attributes:
      alpha: Beta concentration, > 0.
      num_classes: length of the target rows, >= 2.
    """

    def __call__(self, key: jax.Array, batch: dict) -> dict:
        """The batch with boxes pasted, `"target"` rows by area, dominant `"label"`."""
        images = batch["image"]
        n, height, width = images.shape[:3]
        k_lam, k_y, k_x, k_pair = jax.random.split(key, 4)
        lam = jax.random.beta(k_lam, self.alpha, self.alpha, (n,))
        side = jnp.sqrt(1.0 - lam)
        box_h = jnp.round(side * height).astype(jnp.int32)[:, None, None]
        box_w = jnp.round(side * width).astype(jnp.int32)[:, None, None]
        top = jax.random.randint(k_y, (n, 1, 1), 0, height - box_h + 1)
        left = jax.random.randint(k_x, (n, 1, 1), 0, width - box_w + 1)
        rows = jnp.arange(height)[None, :, None]
        cols = jnp.arange(width)[None, None, :]
        inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
        partner, mixable = _pairs(k_pair, batch)
        inside &= mixable[:, None, None]
        pasted = jnp.where(inside[..., None], images[partner], images)
        lam = 1.0 - inside.sum((1, 2)).astype(jnp.float32) / (height * width)
        return _mixed(batch, pasted, partner, lam, self.num_classes)
