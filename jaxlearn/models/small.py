"""Models to train from scratch: a small CNN family for 64-224 px images, ResNet-9, an MLP.

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

from jaxlearn.models.layers import batch_norm, conv, head, images_in, max_pool_2x2


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

    @property
    def min_size(self) -> int:
        """The smallest image side it takes, in px: each stage halves it (below, a map is empty)."""
        return 2 ** len(self.widths)

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for NHWC images, or the pooled features."""
        x = images_in(x, self.dtype, self, self.min_size)
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


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 (Myrtle.ai / David Page, 2018): few layers, wide, residual.

    prep conv -> [conv, pool, residual(conv, conv)] -> [conv, pool] -> [conv, pool,
    residual(conv, conv)] -> global max pool -> `fc`; every conv is 3x3 + BatchNorm +
    ReLU. Built for small images trained from scratch in few epochs (it trained CIFAR-10 to
    94% in 79 s on a V100). `stem_pool` adds a 2x2 max-pool after the prep conv, so a
    64 px image costs what a 32 px one does without it.

    Attributes:
      widths: channels of prep, layer1, layer2, layer3 (Page's: 64, 128, 256, 512).
      num_classes: outputs of the `fc` head.
      stem_pool: max-pool after the prep conv (for inputs of 64 px and up).
      dropout: dropout rate before the head (rng stream "dropout"); 0 disables.
      dtype: computation dtype; parameters stay float32, logits are float32.
    """

    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 10
    stem_pool: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @property
    def min_size(self) -> int:
        """The smallest image side it takes, in px: 3 pools (4 with `stem_pool`) halve it."""
        return 2 ** (3 + self.stem_pool)

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for NHWC images, or the pooled features."""
        if len(self.widths) != 4:
            raise ValueError(f"widths: 4 channel counts (prep, layer1-3), got {self.widths}")

        def conv_bn(x, width, name):
            x = conv(width, 3, name=f"{name}_conv", dtype=self.dtype)(x)
            return nn.relu(batch_norm(train, name=f"{name}_bn", dtype=self.dtype)(x))

        x = conv_bn(images_in(x, self.dtype, self, self.min_size), self.widths[0], "prep")
        if self.stem_pool:
            x = max_pool_2x2(x)
        for i, width in enumerate(self.widths[1:], start=1):
            x = max_pool_2x2(conv_bn(x, width, f"layer{i}"))
            if i != 2:  # residual blocks after layer1 and layer3, as in Page's net
                x = x + conv_bn(conv_bn(x, width, f"layer{i}_res1"), width, f"layer{i}_res2")
        x = jnp.max(x, axis=(1, 2))
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
