"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, §4.2) with option-A shortcuts.

A 3x3 stem of 16 channels, three stages of n BasicBlocks with 16, 32, 64
channels (depth = 6n + 2), global average pooling and the `fc` head. Where a
stage halves the resolution the shortcut subsamples and zero-pads the channels
("option A"), so shortcuts have no parameters: ResNet-20 has 269,722
parameters for 10 classes, the paper's "0.27M" (272,474 is the figure with
option-B 1x1 projection shortcuts, 2,752 parameters more). This is the network of Radek
Osmulski's cosine-annealing experiments (and of akamaster/pytorch_resnet_cifar10).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlearn.models.layers import batch_norm, conv, images_in
from jaxlearn.models.resnet import BasicBlock, residual_stages_and_head


class CifarResNet(nn.Module):
    """A CIFAR ResNet of depth 6n + 2.

    Attributes:
      depth: 20, 32, 44, 56, 110 (any 6n + 2).
      num_classes: outputs of the `fc` head.
      zero_init_residual: start each block's last BatchNorm scale at 0.
      frozen_bn: top-level module names whose BatchNorm layers use their running
        averages even when `train=True` (see `jaxlearn.transfer.freeze_to`).
      dtype: computation dtype; parameters stay float32, logits are float32.
    """

    depth: int = 20
    num_classes: int = 10
    zero_init_residual: bool = False
    frozen_bn: tuple[str, ...] = ()
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {self.depth}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for NHWC images, or the pooled 64 features."""
        x = images_in(x, self.dtype, self)
        x = conv(16, 3, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(
            batch_norm(train and "bn1" not in self.frozen_bn, name="bn1", dtype=self.dtype)(x)
        )
        self.sow("intermediates", "stem", x)
        n = (self.depth - 2) // 6
        return residual_stages_and_head(
            self, x, train, features_only, (n, n, n), BasicBlock, width=16, shortcut="pad"
        )
