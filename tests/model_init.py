"""Variables for the model tests, drawn with NumPy instead of `model.init`.

`model.init` compiles a random-number kernel for every parameter shape, which
takes tens of seconds on the shared CPU cores; these tests only need plausible
values of the right shapes.
"""

import jax
import numpy as np


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
