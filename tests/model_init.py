"""Cheap model set-up for the tests: variables drawn with NumPy, applies compiled whole.

`model.init` compiles a random-number kernel for every parameter shape, which
takes tens of seconds on the shared CPU cores; these tests only need plausible
values of the right shapes. And a model applied eagerly compiles each of its
operations as a program of its own (~30 ms each here): a ResNet-50 forward ~200
of them, where one jitted program compiles in about a second.
"""

from functools import partial

import jax
import numpy as np


def jit_apply(model, **kwargs):
    """`model.apply(variables, x, **kwargs)` as one jitted function of (variables, x)."""
    return jax.jit(partial(model.apply, **kwargs))


def numpy_variables(model, x, seed=0):
    """He-normal kernels, unit BatchNorm scales and variances, zero biases and means."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2 / np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) * std).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(s.shape, np.float32)
        return np.zeros(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)
