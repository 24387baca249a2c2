"""Sharpness of a minimum: how much the training loss rises under random weight perturbations.

Radek's flat-minima post asked whether flatter minima generalise better: train many
models, measure for each the generalisation gap (test loss minus train loss) and the
sharpness (the rise of the training loss when the weights take small steps in random
directions), and see whether one predicts the other.

A random step of fixed *absolute* size means little: a ReLU layer whose weights are
multiplied by 10 (and the next layer's divided by 10) computes the same function but
looks 10x flatter to it. Filter normalisation (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets") rescales every filter of the random direction to the norm
of the matching filter of the weights, which makes the measure invariant to such
rescalings. Everything here is a pure function: jit it, or vmap it over many models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlearn.inference import forward, forward_spec, map_batches

PyTree = Any


class Sharpness(NamedTuple):
    """The loss increase under random perturbations.

    Attributes:
      mean: mean loss increase over the directions (the sharpness).
      per_direction: the loss increase for each direction, shape (num_directions,).
      base_loss: the loss at the unperturbed weights.
    """

    mean: jax.Array
    per_direction: jax.Array
    base_loss: jax.Array


class Gap(NamedTuple):
    """Train and test loss of one model and their difference (test minus train)."""

    train_loss: jax.Array
    test_loss: jax.Array
    gap: jax.Array


def _filter_norms(x: jax.Array) -> jax.Array:
    """Norm of every filter of a kernel: all axes but the last (the output channel).

    Flax kernels keep the output axis last (Dense (in, out), Conv (H, W, in, out)), so a
    filter (Conv) or a neuron's incoming weights (Dense, Li et al.'s FC case) is one
    slice along the last axis.
    """
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)), keepdims=True))


def random_direction(key: jax.Array, params: PyTree, *, filter_norm: bool = True) -> PyTree:
    """A Gaussian direction in weight space, scaled to the size of ``params``.

    Args:
      key: PRNG key.
      params: the weights (any pytree of float arrays).
      filter_norm: when True (Li et al. 2018), every filter of every kernel (leaf with
        two or more axes) is rescaled to the norm of the same filter of ``params``, and
        one-axis leaves (biases, BatchNorm scale and offset) get a zero direction, as in
        the paper: they are left unperturbed. When False, every leaf is perturbed and
        the whole direction is rescaled to the global norm of ``params`` -- the naive
        measure, fooled by rescaling a ReLU layer.

    Returns:
      A pytree shaped like ``params``.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    if filter_norm:
        # 1e-10 keeps an all-zero noise filter (probability 0, but cheap) from dividing by 0.
        scaled = [
            d * _filter_norms(x) / (_filter_norms(d) + 1e-10) if x.ndim >= 2 else jnp.zeros_like(x)
            for d, x in zip(noise, leaves, strict=True)
        ]
    else:
        ratio = optax.tree.norm(leaves) / optax.tree.norm(noise)
        scaled = [d * ratio for d in noise]
    return jax.tree.unflatten(treedef, scaled)


def sharpness(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    radius: float | jax.Array,
    num_directions: int = 8,
    filter_norm: bool = True,
    batch_size: int | None = None,
) -> Sharpness:
    """Mean rise of the loss when the weights move by ``radius`` along random directions.

    For K random directions d_k (see `random_direction`), returns
    ``loss(params + radius * d_k) - loss(params)``. With filter normalisation a radius
    of 0.05 moves every filter by 5% of its own norm. The directions are evaluated
    with `jax.vmap` (in chunks of ``batch_size`` via `jax.lax.map` when memory is short).

    Args:
      loss_fn: ``params -> scalar`` training loss, e.g. ``lambda p: dataset_loss(apply_fn,
        {"params": p, "batch_stats": bs}, images, labels)``.
      params: the trained weights.
      key: PRNG key for the directions.
      radius: relative size of the perturbation (>= 0).
      num_directions: number K of random directions.
      filter_norm: see `random_direction`.
      batch_size: directions evaluated at once; None evaluates all K together.

    Returns:
      A `Sharpness` (mean, per_direction, base_loss).

    Raises:
      ValueError: if ``num_directions`` < 1 or a concrete ``radius`` is negative or
        not finite (a traced one, under `jax.vmap` over radii, is not checked).
    """
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}")
    if not isinstance(radius, jax.core.Tracer) and not 0 <= float(radius) < math.inf:
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    base = loss_fn(params)

    def rise(k):
        direction = random_direction(k, params, filter_norm=filter_norm)
        moved = jax.tree.map(lambda p, d: p + radius * d, params, direction)
        return loss_fn(moved) - base

    keys = jax.random.split(key, num_directions)
    rises = jax.lax.map(rise, keys, batch_size=batch_size or num_directions)
    return Sharpness(mean=jnp.mean(rises), per_direction=rises, base_loss=base)


def dataset_loss(
    apply_fn: Callable[..., jax.Array],
    variables: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    batch_size: int | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Mean softmax cross-entropy of a model over a whole data set, in evaluation mode.

    Args:
      apply_fn: ``apply_fn(variables, images, train=False) -> logits``.
      variables: ``{'params': ..., 'batch_stats': ...}`` (batch_stats optional).
      images: NHWC (or (N, features)) inputs.
      labels: int labels, shape (N,).
      batch_size: examples per forward pass; None does all N at once. The chunks run
        one after another (`jaxlearn.inference.map_batches`: the last one zero-padded,
        its padding dropped), so every example counts once.
      preprocess: applied to each chunk before the model; default uint8 -> float in
        [0, 1], float images unchanged (`inference.default_preprocess`), as the train
        and eval steps do.

    Returns:
      The mean loss, a scalar.
    """
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Inside jit and vmap: the pure forward pass, by identity (no program cache in a trace).
    spec, consts = forward_spec(apply_fn, images, preprocess=preprocess, by_value=False)

    def per_example(chunk):
        x, y = chunk
        logits = forward(spec, variables, consts, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return jnp.mean(map_batches(per_example, (images, labels), batch_size))


def generalization_gap(
    apply_fn: Callable[..., jax.Array],
    variables: PyTree,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    *,
    batch_size: int | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> Gap:
    """Test loss minus train loss of one model (the gap of the flat-minima post).

    Args:
      apply_fn, variables, batch_size, preprocess: as in `dataset_loss`.
      train: (images, labels) the model was trained on.
      test: held-out (images, labels).

    Returns:
      A `Gap` (train_loss, test_loss, gap = test_loss - train_loss).
    """
    kw = dict(batch_size=batch_size, preprocess=preprocess)
    train_loss = dataset_loss(apply_fn, variables, *train, **kw)
    test_loss = dataset_loss(apply_fn, variables, *test, **kw)
    return Gap(train_loss=train_loss, test_loss=test_loss, gap=test_loss - train_loss)
