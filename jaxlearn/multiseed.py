"""Many independent training runs in one program: vmap the init and the train step over seeds.

Radek trained 100 MLPs for the flat-minima post and 20 runs per arm for the cosine
race. Run one after another, small models leave the hardware idle and pay the Python
and dispatch overhead N times. Here the N models are one pytree with a leading model
axis: `init_many` vmaps `TrainState.create` over N init keys, and `train_many` vmaps
the pure (unjitted) train step over the models inside a `lax.scan` over the steps of
an epoch, so an epoch of all N runs is one compiled program.

Each model keeps its own data order: model i sees the examples in the order
`jaxlearn.data.loader.epoch_order(seeds[i], epoch, n)` (the permutation a single run
with `ArrayLoader(..., seed=seeds[i])` sees), gathered on the device from one shared
copy of the data: one copy however many models (100 MNIST models used to take 100
copies, 4.3 GB). So model i ends exactly where `fit` with that loader and
init key would end: bit for bit on CPU (a GPU may round batched matrix products
differently from single ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn import programs
from jaxlearn.data.loader import check_examples, epoch_order
from jaxlearn.parallel import to_device
from jaxlearn.state import TrainState

Step = Callable[[TrainState, dict], tuple[TrainState, dict]]


def init_many(
    model: nn.Module, tx: optax.GradientTransformation, keys: jax.Array, example_input: jax.Array
) -> TrainState:
    """N fresh train states stacked along a leading axis, one per init key.

    Args:
      model, tx, example_input: as in `TrainState.create`.
      keys: N PRNG keys, e.g. ``jax.random.split(jax.random.key(0), 100)``.

    Returns:
      A `TrainState` whose every array leaf has a leading axis of size N; slice model i
      with ``jax.tree.map(lambda x: x[i], states)``.
    """
    if jnp.ndim(keys) < 1 or len(keys) < 1:
        raise ValueError(f"keys must hold at least one key on axis 0, got shape {jnp.shape(keys)}")
    example_input = to_device(example_input)
    # `create` compiles the model's and the optimizer's init by value, here batched over keys.
    return jax.vmap(lambda key: TrainState.create(model, tx, key, example_input))(keys)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _run_epoch(train_step: Step, static, fields, consts, images, labels, order):
    """Every model trains on its own order (N, steps, batch) of the shared examples.

    `static` and `consts` are the models' shared program (`jaxlearn.programs`): new
    optimizer objects of the same kind reuse this compilation.
    """

    def run(model_fields, model_order):
        def body(st, idx):
            return train_step(st, {"image": images[idx], "label": labels[idx]})

        state = programs.merge(static, model_fields, consts)
        state, metrics = jax.lax.scan(body, state, model_order)
        return programs.arrays(state), metrics

    return jax.vmap(run)(fields, order)


def _static_of_stacked(states: TrainState) -> tuple:
    """`programs.static_of` and `consts_of` for stacked states: one model's program."""
    one = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (states.params, states.opt_state)
    )
    tx_key, consts = programs.optimizer_program(states.tx, one[1], one[0])
    return (programs.model_key(states.apply_fn), tx_key), consts


def train_many(
    states: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    train_step: Step,
    batch_size: int,
    seeds: Sequence[int],
    epochs: int,
    start_epoch: int | None = None,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Train N stacked models for ``epochs`` epochs, each on its own data order.

    The states' buffers are donated to the first epoch, so a call that does not
    finish (Ctrl-C, an error) leaves nothing to continue from: to keep progress,
    call it a few epochs at a time (and checkpoint in between). A call on states
    that have trained carries on with the next epoch's data orders.

    Args:
      states: stacked states from `init_many` (consumed: their buffers are donated).
      images, labels: the whole training set (N_examples, ...), (N_examples,); copied
        to the device once and shared by all models.
      train_step: the PURE step, ``make_train_step(jit=False, ...)``; it is vmapped
        over the models and compiled here.
      batch_size: examples per step; each epoch drops the last partial batch, as
        `ArrayLoader` does.
      seeds: data-order seed of each model (length N).
      epochs: number of epochs to run.
      start_epoch: index of the first epoch (the orders depend on it). Default: the
        states' step over the steps per epoch, so that a continued run does not
        replay epoch 0's orders; a state that trained elsewhere, mid-epoch here,
        must say where to start.

    Returns:
      ``(states, metrics)``: the trained states and a dict of the step's metrics as
      NumPy arrays of shape (N, epochs * steps_per_epoch).

    Raises:
      ValueError: a jitted ``train_step``, ``seeds`` not matching the models, labels
        outside the model's classes, or no ``start_epoch`` for models that stand
        between epochs.
    """
    if hasattr(train_step, "lower"):
        raise ValueError("train_step must be the pure step: make_train_step(jit=False)")
    if jnp.ndim(states.step) != 1:
        raise ValueError("states must be stacked along a leading model axis (use init_many)")
    n_models = int(states.step.shape[0])
    if len(seeds) != n_models:
        raise ValueError(f"seeds must give one seed per model ({n_models}), got {len(seeds)}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    images, labels = check_examples(images, labels)  # as ArrayLoader checks them
    if not 1 <= batch_size <= len(images):
        raise ValueError(f"need 1 <= batch_size <= {len(images)}, got batch_size {batch_size}")
    steps = len(images) // batch_size  # the last partial batch is dropped, as ArrayLoader does
    if start_epoch is None:
        done = np.unique(jax.device_get(states.step))
        if len(done) != 1 or done[0] % steps:
            raise ValueError(
                f"the models stand at steps {done.tolist()}, not one epoch boundary of "
                f"{steps} steps: pass start_epoch (the epoch whose data orders come next)"
            )
        start_epoch = int(done[0]) // steps
    x, y = to_device(images), to_device(labels, np.int32)  # one copy for all the models
    history: list[dict] = []
    for epoch in range(start_epoch, start_epoch + epochs):
        orders = [epoch_order(int(s), epoch, len(images)) for s in seeds]
        order = np.stack([o[: steps * batch_size] for o in orders])
        order = to_device(order.reshape(n_models, steps, batch_size), np.int32)
        static, consts = _static_of_stacked(states)
        fields, metrics = _run_epoch(train_step, static, programs.arrays(states), consts, x, y,
                                     order)  # fmt: skip
        states = programs.with_arrays(fields, states)
        metrics = jax.device_get(metrics)
        if np.any(metrics.get("bad_labels", 0)):
            raise ValueError(f"labels outside the model's classes in epoch {epoch}")
        history.append(metrics)
    keys = history[0].keys() if history else ()
    return states, {k: np.concatenate([h[k] for h in history], axis=1) for k in keys}
