"""TrainState: everything a training step reads and writes, as one pytree.

The state is a plain pytree (a `flax.struct.PyTreeNode`), so it passes through
`jax.jit`, `jax.vmap` and Orbax unchanged; the model's `apply` and the Optax
transformation ride along as static (non-pytree) fields. `jax.jit` compares
static fields by identity, so jaxlearn's compiled steps do not pass the state in
as it is: they key its model and optimizer by value (`jaxlearn.programs`), and a
new optimizer object of the same kind reuses the compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlearn import programs


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
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

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
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)  # raw uint32 keys save and replicate as plain arrays
        init = programs.model_key(model.init)  # by value: equal models share the compilation
        rng, variables = _init_model(init, key, jnp.asarray(example_input))
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


@partial(jax.jit, static_argnums=0)
def _init_model(init: programs.Keyed, key: jax.Array, example_input: jax.Array):
    """The state's key and the model's variables, compiled once per model and input shape.

    Run eagerly, `model.init` compiles each of its operations on its own: ~35 s for
    a ResNet-20 on a loaded 2-core CPU, against one compilation here.
    """
    init_key, rng = jax.random.split(key)
    params_key, dropout_key = jax.random.split(init_key)
    rngs = {"params": params_key, "dropout": dropout_key}
    return rng, init.value(rngs, example_input, train=False)


@partial(jax.jit, static_argnums=0)
def _init_program(key: programs.Keyed, consts: tuple, params: Any):
    return programs.bind(key, consts)(params)


def init_optimizer(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)`, compiled once per optimizer program (`jaxlearn.programs`)."""
    key, consts = programs.function_program(tx.init, params)
    return _init_program(key, consts, params)
