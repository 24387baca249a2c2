"""Models to train from scratch: a small CNN family for 64-224 px images, and an MLP.

The CNNs are the "simplest model that beats chance" baselines of the
dogs-vs-cats posts: stages of (3x3 conv, BatchNorm, ReLU) x k followed by a 2x2
max-pool, then global average pooling and the `fc` head. The MLP is the
784-20-10 network of the flat-minima experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlearn.models.layers import batch_norm, conv, head, max_pool_2x2


class SimpleCNN(nn.Module):
    """Conv-BN-ReLU stages, each halving the resolution, + global pool + dense.

    Attributes:
      widths: channels of each stage; 4 stages take 64 px to 4 px, 5 take
        224 px to 7 px.
      convs_per_stage: conv-BN-ReLU layers before each max-pool.
      num_classes: outputs of the `fc` head.
      dropout: dropout rate before the head (rng stream "dropout"); 0 disables.
      dtype: computation dtype; parameters stay float32, logits are float32.
    """

    widths: Sequence[int] = (32, 64, 128, 256)
    convs_per_stage: int = 1
    num_classes: int = 10
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for NHWC images, or the pooled features."""
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.widths):
            for j in range(self.convs_per_stage):
                x = conv(width, 3, name=f"stage{i + 1}_conv{j + 1}", dtype=self.dtype)(x)
                x = batch_norm(train, name=f"stage{i + 1}_bn{j + 1}", dtype=self.dtype)(x)
                x = nn.relu(x)
            x = max_pool_2x2(x)
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return jnp.asarray(x, jnp.float32)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return jnp.asarray(head(self.num_classes, dtype=self.dtype)(x), jnp.float32)


# name -> (widths, convs_per_stage); parameter counts for 10 classes in the comments.
CNN_SIZES = {
    "cnn_small": ((32, 64, 128, 256), 1),  # 0.39M
    "cnn_medium": ((32, 64, 128, 256, 512), 2),  # 4.7M
    "cnn_large": ((64, 128, 256, 512, 512), 2),  # 9.4M
}


class MLP(nn.Module):
    """A fully connected ReLU network on flattened inputs.

    Attributes:
      features: widths of the hidden layers, e.g. (20,) for 784-20-10.
      num_classes: outputs of the `fc` head.
      dtype: computation dtype; parameters stay float32, logits are float32.
    """

    features: Sequence[int] = (20,)
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for inputs of any shape (N, ...), flattened."""
        x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.relu(
                nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=f"dense{i + 1}")(x)
            )
        if features_only:
            return jnp.asarray(x, jnp.float32)
        return jnp.asarray(head(self.num_classes, dtype=self.dtype)(x), jnp.float32)
