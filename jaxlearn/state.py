"""TrainState: everything a training step reads and writes, as one pytree.

The state is a plain pytree (a `flax.struct.PyTreeNode`), so it passes through
`jax.jit`, `jax.vmap` and Orbax unchanged; the model's `apply` and the Optax
transformation ride along as static (non-pytree) fields. `jax.jit` compares
static fields by identity, so jaxlearn's compiled steps do not pass the state in
as it is: they key its model and optimizer by value (`jaxlearn.programs`), and a
new optimizer object of the same kind reuses the compiled program.

An exponential moving average of the weights (`with_ema`) rides in the state too,
so the train step updates it, checkpoints save it, and it is replicated and
donated like the parameters; without one (the default) the state holds None
there, which is no array at all: no memory, no work, the same checkpoints.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxlearn import programs
from jaxlearn.parallel import to_device


class Ema(NamedTuple):
    """An exponential moving average of a model's variables, as optax's `ema` keeps it.

    The average starts from zeros and is read debiased (`optax.ema(decay,
    debias=True)`): after t updates it is the average of the t variables seen,
    weighted by `(1 - decay) * decay**(t - i)` and normalized by `1 - decay**t`,
    so the random initial weights never enter it (a plain EMA started from them
    would still hold 0.999**600 = 55% of them after 600 steps at decay 0.999).

    Attributes:
      decay: float32 scalar in (0, 1); data, so every decay shares one compiled step.
      count: int32 scalar, the number of updates averaged.
      variables: the biased running average of `{'params', 'batch_stats'}`.
    """

    decay: jax.Array
    count: jax.Array
    variables: dict


class TrainState(struct.PyTreeNode):
    """Step counter, parameters, BatchNorm statistics, optimizer state and PRNG key.

    Attributes:
      step: int32 scalar, the number of optimizer updates taken so far.
      params: the model's `params` collection.
      batch_stats: the model's `batch_stats` collection ({} without BatchNorm).
      opt_state: the Optax state for `params`.
      rng: PRNG key; the train step derives each step's dropout and augmentation
        keys as `fold_in(rng, step)`, so randomness is a function of the step.
      apply_fn: the model's `apply` (static).
      tx: the Optax transformation (static).
      ema: an `Ema` of params and batch_stats that each train step updates, or
        None (the default: no EMA, nothing stored or computed); see `with_ema`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    ema: Ema | None = None

    @classmethod
    def create(
        cls,
        model: nn.Module,
        tx: optax.GradientTransformation,
        key: jax.Array,
        example_input: jax.Array,
    ) -> TrainState:
        """Initialize a model and its optimizer into a fresh state at step 0.

        Args:
          model: a Flax Linen module called as `model.apply(variables, x, train=bool)`.
          tx: the Optax transformation that updates `params`.
          key: PRNG key; split into the init key and the state's training key.
          example_input: a batch (or one example with a batch axis) of model
            inputs; only its shape and dtype matter.

        Returns:
          A `TrainState` with `step == 0`.
        """
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a flax.linen.Module, got {type(model).__name__}")
        if not hasattr(tx, "init") or not hasattr(tx, "update"):
            raise ValueError(f"tx must be an optax.GradientTransformation, got {tx!r}")
        if not hasattr(key, "dtype"):  # an int seed: say what to pass
            raise ValueError(f"key must be a PRNG key such as jax.random.key(0), got {key!r}")
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)  # raw uint32 keys save and replicate as plain arrays
        init = programs.model_key(model.init)  # by value: equal models share the compilation
        rng, variables = _init_model(init, key, to_device(example_input))
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=init_optimizer(tx, params),
            rng=rng,
            apply_fn=model.apply,
            tx=tx,
        )

    @property
    def variables(self) -> dict:
        """`{'params': ..., 'batch_stats': ...}` for `apply_fn` (no batch_stats when empty)."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def init_variables(model: nn.Module, key: jax.Array | dict, example_input: Any) -> dict:
    """`model.init(key, example_input, train=False)`, compiled once per model and input shape.

    The model is keyed by value (`jaxlearn.programs`), so equal modules built apart
    (a script's and a test's, each seed's) share one compilation; run eagerly
    instead, a network's init compiles each of its operations on its own (~35 s for
    a ResNet-20 on a loaded 2-core CPU, against one compilation).

    Args:
      model: the Flax module.
      key: a PRNG key, or a dict of keys per rng stream (`{"params": ..., "dropout": ...}`).
      example_input: a batch of model inputs; only its shape and dtype matter.

    Returns:
      The variables (`{"params": ..., "batch_stats": ...}` for models with BatchNorm).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    return _init_variables(programs.model_key(model.init), key, to_device(example_input))


@partial(jax.jit, static_argnums=0)
def _init_variables(init: programs.Keyed, rngs: Any, example_input: jax.Array) -> dict:
    return init.value(rngs, example_input, train=False)


@partial(jax.jit, static_argnums=0)
def _init_model(init: programs.Keyed, key: jax.Array, example_input: jax.Array):
    """The state's key and the model's variables (`init_variables` with keys split off)."""
    init_key, rng = jax.random.split(key)
    params_key, dropout_key = jax.random.split(init_key)
    rngs = {"params": params_key, "dropout": dropout_key}
    return rng, _init_variables(init, rngs, example_input)


@partial(jax.jit, static_argnums=0)
def _init_program(key: programs.Keyed, consts: tuple, params: Any):
    return programs.bind(key, consts)(params)


def init_optimizer(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)`, compiled once per optimizer program (`jaxlearn.programs`)."""
    key, consts = programs.function_program(tx.init, params)
    return _init_program(key, consts, params)


def with_ema(state: TrainState, decay: float) -> TrainState:
    """The state with a fresh EMA of its params and BatchNorm statistics attached.

    Every later train step folds its new variables into the average (after the
    optimizer's update, as optax's `ema` does). Typical decays: 0.999 for runs
    of tens of thousands of steps, 0.99 for a few thousand (the average spans
    about `1 / (1 - decay)` steps). The arrays take the sharding of the state's
    own (replicated like the parameters), and a stacked state (`init_many`) gets
    one EMA per model.

    Args:
      state: the train state (not modified).
      decay: in (0, 1).

    Returns:
      `state` with `ema` set; its count starts at 0.
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be a number in (0, 1), got {decay!r}")
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    # Filled on the host, each device given its own part of the array's sharding
    # (no cross-process check, as `device_put` of host data makes): `jnp.full_like`
    # compiled a program per distinct shape.
    def like(x, value, dtype=None):
        fill = np.full(x.shape, value, dtype or x.dtype)
        return jax.make_array_from_callback(x.shape, x.sharding, lambda index: fill[index])

    ema = Ema(
        decay=like(state.step, decay, np.float32),
        count=like(state.step, 0),
        variables=jax.tree.map(lambda x: like(x, 0), variables),
    )
    return state.replace(ema=ema)


def update_ema(ema: Ema, variables: dict) -> Ema:
    """`ema` with `variables` folded in: one step of `optax.ema(decay, debias=True)`."""
    _, new = optax.ema(ema.decay).update(variables, optax.EmaState(ema.count, ema.variables))
    return Ema(ema.decay, new.count, new.ema)


def ema_variables(state: TrainState) -> dict:
    """The EMA's debiased `{'params', 'batch_stats'}`: a snapshot, usable wherever variables are.

    Evaluation, prediction, TTA and snapshot ensembles take it as they take
    `state.variables` (e.g. `ensemble.predict(apply_fn, [ema_variables(state)], x)`).
    Before the first update since `with_ema` it is the state's own variables.
    A pure function of the state (usable under jit); for stacked states, vmap it.
    """
    if state.ema is None:
        raise ValueError("the state carries no EMA: attach one with with_ema(state, decay)")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return _debiased(state.ema, variables)


@jax.jit
def _debiased(ema: Ema, live: dict) -> dict:
    """optax's bias correction of the average; the live variables before any update."""
    average = optax.tree.bias_correction(ema.variables, ema.decay, ema.count)
    return jax.tree.map(lambda a, x: jnp.where(ema.count > 0, a, x), average, live)


def with_ema_weights(state: TrainState) -> TrainState:
    """The state with its params and batch_stats replaced by the EMA's (and no EMA).

    For what takes a state -- `loop.evaluate`, `Learner` methods, `fit`'s
    callbacks -- to see the averaged model. Its other arrays are the state's own:
    evaluate it, but keep training the original.
    """
    variables = ema_variables(state)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"], ema=None)
