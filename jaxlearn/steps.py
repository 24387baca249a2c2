"""Pure train and eval steps: `(state, batch) -> (state, metrics)` and `(state, batch) -> metrics`.

Everything here is a function of its inputs: the step's dropout and
augmentation keys are `fold_in(state.rng, state.step)`, so the same state and
batch always give the same result, and a resumed run replays the same keys.
The functions come back jitted over the data mesh (batch split over devices,
state replicated); `jit=False` returns the plain function, e.g. to `jax.vmap`
it over many seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlearn.parallel import batch_sharding, data_mesh, replicated_sharding
from jaxlearn.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

_COMPUTE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_preprocess(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images -> float32 unchanged."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against integer labels, with optional label smoothing.

    Label smoothing (Szegedy et al. 2016, "Rethinking the Inception
    Architecture") mixes the one-hot target with the uniform distribution:
    `(1 - a) * onehot + a / num_classes`.

    Args:
      logits: (N, C) float logits.
      labels: (N,) integer labels in [0, C).
      label_smoothing: a in [0, 1).

    Returns:
      (N,) float32 losses.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def l2_penalty(params: Any) -> jax.Array:
    """Half the sum of squares of every parameter: `0.5 * ||w||^2`."""
    return 0.5 * sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in jax.tree.leaves(params))


def _check_common(preprocess, compute_dtype, label_smoothing=0.0):
    if preprocess is not None and not callable(preprocess):
        raise ValueError(f"preprocess must be callable, got {preprocess!r}")
    if compute_dtype is not None and jnp.dtype(compute_dtype) not in map(
        jnp.dtype, _COMPUTE_DTYPES
    ):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _cast_floats(tree: Any, dtype) -> Any:
    """Cast the floating leaves of `tree` to `dtype` (None: unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _weights_and_checks(batch: Batch, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Row weights (the mask, or ones) and the number of unmasked out-of-range labels."""
    labels = batch["label"]
    mask = batch.get("mask")
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    bad = ((labels < 0) | (labels >= num_classes)) & (weights > 0)
    return weights, jnp.sum(bad, dtype=jnp.int32)


def _learning_rate(learning_rate, step: jax.Array, opt_state: Any) -> jax.Array:
    """The LR used by the update at `step`.

    A schedule is read at `step` (the count optax's scale_by_schedule used for
    this update); a float is itself; with None, the `learning_rate` that
    `optax.inject_hyperparams` stored in the new optimizer state, else NaN (unknown).
    """
    if callable(learning_rate):
        return jnp.asarray(learning_rate(step), jnp.float32)
    if learning_rate is not None:
        return jnp.asarray(learning_rate, jnp.float32)
    hyper = [
        s.hyperparams["learning_rate"]
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
        if hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
    ]
    return jnp.asarray(hyper[0] if hyper else jnp.nan, jnp.float32)


def make_train_step(
    *,
    learning_rate: float | optax.Schedule | None = None,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build the training step: forward, cross-entropy, backward, one optimizer update.

    Weight decay is classic L2 regularization added to the loss,
    `weight_decay * 0.5 * ||w||^2` over every parameter, as in the ResNet paper
    (He et al. 2016, wd 1e-4) and `torch.optim.SGD(weight_decay=...)`, which is
    what Radek's runs used. For decoupled decay (AdamW, Loshchilov & Hutter
    2019) leave this at 0 and put `optax.add_decayed_weights` in the optimizer.
    The reported `loss` is the cross-entropy alone, comparable with eval loss.

    Mixed precision (`compute_dtype=jnp.bfloat16`): the forward and backward
    passes run on bf16 copies of the parameters and images; logits, loss,
    BatchNorm statistics, gradients, parameters and optimizer state stay float32.

    Args:
      learning_rate: the float or `optax.Schedule` the optimizer was built with,
        read back at the step taken for the `lr` metric; None reads
        `optax.inject_hyperparams` state if present, else reports NaN.
      label_smoothing: in [0, 1); 0 disables it.
      weight_decay: L2 coefficient (>= 0) added to the loss.
      augment: `(key, images) -> images` applied to the raw batch images before
        `preprocess`, with a key derived from `fold_in(state.rng, state.step)`.
      preprocess: `images -> float images` for the model; default uint8 -> [0, 1].
      compute_dtype: None/float32, bfloat16 or float16.
      mesh: data mesh (default `data_mesh()`): batch split over 'data', state replicated.
      jit: False returns the pure, unjitted function.

    Returns:
      `train_step(state, batch) -> (state, metrics)`, metrics being float32
      scalars `loss`, `accuracy`, `lr` and int32 `bad_labels` (labels outside
      [0, num_classes), which `fit` turns into an error). The jitted step donates
      the incoming state's buffers: do not use `state` after passing it in.
    """
    _check_common(preprocess, compute_dtype, label_smoothing)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if augment is not None and not callable(augment):
        raise ValueError(f"augment must be callable, got {augment!r}")
    if learning_rate is not None and not callable(learning_rate):
        learning_rate = float(learning_rate)
    preprocess = preprocess or default_preprocess

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        images = batch["image"]
        if augment is not None:
            images = augment(aug_key, images)
        x = _cast_floats(preprocess(images), compute_dtype)
        labels = batch["label"]

        def loss_fn(params):
            variables = {"params": _cast_floats(params, compute_dtype)}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            logits, updates = state.apply_fn(
                variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
            )
            logits = logits.astype(jnp.float32)
            weights, bad = _weights_and_checks(batch, logits.shape[-1])
            per_example = cross_entropy(logits, labels, label_smoothing)
            loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            total = loss + weight_decay * l2_penalty(params) if weight_decay else loss
            correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
            accuracy = correct / jnp.maximum(jnp.sum(weights), 1.0)
            aux = (loss, accuracy, bad, updates.get("batch_stats", {}))
            return total, aux

        grads, (loss, accuracy, bad, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Statistics computed from bf16 activations come back in float32 already; keep the dtype.
        batch_stats = jax.tree.map(
            lambda new, old: new.astype(old.dtype), batch_stats, state.batch_stats
        )
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "lr": _learning_rate(learning_rate, state.step, opt_state),
            "bad_labels": bad,
        }
        return new_state, metrics

    if not jit:
        return train_step
    mesh = mesh or data_mesh()
    replicated = replicated_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def make_eval_step(
    *,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    compute_dtype: Any = None,
    with_logits: bool = False,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], Metrics]:
    """Build the evaluation step: inference-mode forward pass, summed metrics.

    Metrics are sums over the unmasked rows, so batches padded with
    `mask=False` rows count every real example exactly once; divide the totals
    (`loss_sum / count`, `correct / count`) after the last batch.

    Args:
      preprocess: `images -> float images`, the same as for training.
      compute_dtype: None/float32, bfloat16 or float16 for the forward pass.
      with_logits: also return the (N, C) float32 `logits`.
      mesh: data mesh (default `data_mesh()`).
      jit: False returns the pure, unjitted function.

    Returns:
      `eval_step(state, batch) -> metrics` with float32 `loss_sum`, `correct`,
      `count`, int32 `bad_labels` (and `logits` if asked for).
    """
    _check_common(preprocess, compute_dtype)
    preprocess = preprocess or default_preprocess

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        x = _cast_floats(preprocess(batch["image"]), compute_dtype)
        variables = _cast_floats(state.variables, compute_dtype)
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        logits = state.apply_fn(variables, x, train=False).astype(jnp.float32)
        labels = batch["label"]
        weights, bad = _weights_and_checks(batch, logits.shape[-1])
        metrics = {
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
            "count": jnp.sum(weights),
            "bad_labels": bad,
        }
        if with_logits:
            metrics["logits"] = logits
        return metrics

    if not jit:
        return eval_step
    mesh = mesh or data_mesh()
    return jax.jit(eval_step, in_shardings=(replicated_sharding(mesh), batch_sharding(mesh)))
