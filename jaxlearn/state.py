"""TrainState: everything a training step reads and writes, as one pytree.

The state is a plain pytree (a `flax.struct.PyTreeNode`), so it passes through
`jax.jit`, `jax.vmap` and Orbax unchanged; the model's `apply` and the Optax
transformation ride along as static (non-pytree) fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


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
        init_key, rng = jax.random.split(key)
        params_key, dropout_key = jax.random.split(init_key)
        variables = model.init(
            {"params": params_key, "dropout": dropout_key}, jnp.asarray(example_input), train=False
        )
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
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
