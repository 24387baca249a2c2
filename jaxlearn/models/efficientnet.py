"""EfficientNet-Lite0..4 in Flax Linen, with the parameter layout of Google's checkpoints.

Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", in the Lite form of the TensorFlow release (`efficientnet/lite`): ReLU6
instead of swish, no squeeze-and-excitation, and the stem (32 channels), the first
and last stage's depth and the final 1x1 convolution (1280 channels) not scaled with
the variant. Each block is MobileNetV2's inverted residual: 1x1 expansion, depthwise
k x k, 1x1 projection, identity shortcut with drop-connect (stochastic depth) where
the shape allows. Convolutions pad as TensorFlow's 'SAME' (one pixel less before
than after for a stride-2 convolution on an even input) and BatchNorm uses TF's
epsilon 1e-3 and momentum 0.99, as the checkpoints were trained.

Module names: `stem_conv`, `stem_bn`, blocks `stage{K}_{J}` (K = 1..7, each with
`expand_conv` / `expand_bn` (absent when the expansion ratio is 1),
`depthwise_conv` / `depthwise_bn`, `project_conv` / `project_bn`), `top_conv`,
`top_bn`, and the classifier `fc`, so `jaxlearn.transfer` splits them into layer
groups by stage. `EfficientNetLite.torch_module` gives each module's name in the
efficientnet_pytorch state dict (`_blocks.N._depthwise_conv`, ...), which is how
`jaxlearn.pretrained` converts the published weights.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlearn.models.layers import (
    DepthwiseConv,
    batch_norm,
    check_frozen_bn,
    conv,
    head,
    images_in,
)

# name -> (width multiplier, depth multiplier, resolution, dropout before the head),
# as `efficientnet_lite_builder.efficientnet_lite_params` of the TF release.
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# EfficientNet-B0's stages: (repeats, kernel, stride, expansion ratio, output channels).
B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_FEATURES = 32
TOP_FEATURES = 1280
# TensorFlow's BatchNorm settings for EfficientNet (torch momentum 0.01 in the reference).
BN = {"momentum": 0.99, "epsilon": 1e-3}

# Flax module name inside a block -> the efficientnet_pytorch name.
_TORCH_BLOCK_MODULES = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "depthwise_conv": "_depthwise_conv",
    "depthwise_bn": "_bn1",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}
_TORCH_TOP_MODULES = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "top_conv": "_conv_head",
    "top_bn": "_bn1",
    "fc": "_fc",
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of `divisor` (never down by > 10%)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """The stages of a Lite variant: (repeats, kernel, stride, expansion, output channels).

    Output channels scale with `width`; repeats scale with `depth` (rounded up),
    except those of the first and last stage, which the Lite models keep.
    """
    last = len(B0_STAGES) - 1
    return tuple(
        (
            repeats if i in (0, last) else math.ceil(depth * repeats),
            kernel,
            stride,
            expand,
            round_filters(out, width),
        )
        for i, (repeats, kernel, stride, expand, out) in enumerate(B0_STAGES)
    )


def relu6(x):
    """min(max(x, 0), 6): the Lite models' activation (friendlier to 8-bit quantization)."""
    return jnp.clip(x, 0, 6)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (no activation).

    Attributes:
      features: output channels.
      kernel_size: depthwise kernel size.
      stride: depthwise stride.
      expand_ratio: expanded width / input width (1: no expansion convolution).
      drop_connect: probability of dropping the residual branch of a sample in
        training (rng stream "dropout"); only where the block has a shortcut.
      frozen_bn: inference mode even when training: BatchNorm layers use their running
        averages and drop-connect is off (torch's `eval()` of the block).
      depthwise: `layers.depthwise_conv`'s impl.
      dtype: computation dtype.
    """

    features: int
    kernel_size: int
    stride: int
    expand_ratio: int
    drop_connect: float = 0.0
    frozen_bn: bool = False
    depthwise: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """The block's output for NHWC `x`."""
        bn_train = train and not self.frozen_bn

        def norm(name):
            return batch_norm(bn_train, name=name, dtype=self.dtype, **BN)

        inputs = x
        if self.expand_ratio != 1:
            width = x.shape[-1] * self.expand_ratio
            x = conv(width, 1, name="expand_conv", dtype=self.dtype)(x)
            x = relu6(norm("expand_bn")(x))
        x = DepthwiseConv(
            self.kernel_size, self.stride, self.depthwise, self.dtype, name="depthwise_conv"
        )(x)
        x = relu6(norm("depthwise_bn")(x))
        x = conv(self.features, 1, name="project_conv", dtype=self.dtype)(x)
        x = norm("project_bn")(x)
        if self.stride == 1 and inputs.shape[-1] == self.features:
            # Drop-connect as the reference: a whole sample's branch, kept ones scaled by 1/keep.
            # Off in a frozen block, as in torch's eval(): `freeze_to(bn="eval")`'s reference.
            drop = nn.Dropout(self.drop_connect, broadcast_dims=(1, 2, 3))
            x = drop(x, deterministic=not bn_train)
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the TF release's architecture and the reference's layout.

    Attributes:
      width: channel multiplier of the stages (the stem and top stay 32 and 1280).
      depth: block-count multiplier of stages 2-6.
      num_classes: outputs of the `fc` head.
      dropout: dropout rate before `fc` (rng stream "dropout").
      drop_connect: the largest drop-connect rate, reached by the last block; block i
        of n uses `drop_connect * i / n` (TF's and the reference's schedule).
      resolution: the input size the variant was trained at (for preprocessing; the
        model accepts any size).
      frozen_bn: names of top-level modules ('stem_bn', 'stage1_0', ...) whose
        BatchNorm layers use their running averages (and blocks skip drop-connect)
        even when `train=True`;
        `jaxlearn.transfer.freeze_to(..., bn="eval")` sets it.
      depthwise: how depthwise convolutions are computed ('auto', 'lax', 'shifted';
        see `jaxlearn.models.layers.depthwise_conv`); the parameters are the same.
      dtype: computation dtype, e.g. `jnp.bfloat16`; parameters and BatchNorm
        statistics stay float32 and the logits are returned as float32.
    """

    width: float = 1.0
    depth: float = 1.0
    num_classes: int = 1000
    dropout: float = 0.2
    drop_connect: float = 0.2
    resolution: int = 224
    frozen_bn: tuple[str, ...] = ()
    depthwise: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for NHWC images, or the pooled features.

        Args:
          x: images (N, H, W, 3), normalised as the weights expect
            (`jaxlearn.pretrained.efficientnet_lite_normalize` for Google's).
          train: batch statistics, dropout and drop-connect (True) or inference (False).
          features_only: return the (N, 1280) pooled features before dropout and `fc`.
        """

        def norm(name):
            return batch_norm(
                train and name not in self.frozen_bn, name=name, dtype=self.dtype, **BN
            )

        x = images_in(x, self.dtype, self)
        x = conv(STEM_FEATURES, 3, 2, name="stem_conv", dtype=self.dtype, padding="same")(x)
        x = relu6(norm("stem_bn")(x))
        self.sow("intermediates", "stem", x)
        names = self.block_names()
        index = 0
        for k, (repeats, kernel, stride, expand, features) in enumerate(self.stages(), 1):
            for j in range(repeats):
                name = f"stage{k}_{j}"
                x = MBConv(
                    features,
                    kernel,
                    stride if j == 0 else 1,
                    expand,
                    drop_connect=self.drop_connect * index / len(names),
                    frozen_bn=name in self.frozen_bn,
                    depthwise=self.depthwise,
                    dtype=self.dtype,
                    name=name,
                )(x, train)
                index += 1
            self.sow("intermediates", f"stage{k}", x)
        x = conv(TOP_FEATURES, 1, name="top_conv", dtype=self.dtype)(x)
        x = relu6(norm("top_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        if not features_only:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = head(self.num_classes, dtype=self.dtype)(x)
        check_frozen_bn(self)
        return jnp.asarray(x, jnp.float32)

    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """(repeats, kernel, stride, expansion, output channels) of each stage."""
        return lite_stages(self.width, self.depth)

    def block_names(self) -> list[str]:
        """The blocks' module names in order, 'stage1_0', ...; block i is `_blocks.i` in torch."""
        return [f"stage{k}_{j}" for k, st in enumerate(self.stages(), 1) for j in range(st[0])]

    def torch_module(self, modules: tuple[str, ...]) -> str:
        """The efficientnet_pytorch name of a Flax module path, for weight conversion.

        ('stage2_1', 'depthwise_bn') -> '_blocks.2._bn1'; ('top_conv',) -> '_conv_head'.
        """
        if modules[0] in _TORCH_TOP_MODULES:
            return _TORCH_TOP_MODULES[modules[0]]
        index = self.block_names().index(modules[0])
        return f"_blocks.{index}.{_TORCH_BLOCK_MODULES[modules[1]]}"


def make_efficientnet_lite(name: str, num_classes: int = 1000, **kwargs) -> EfficientNetLite:
    """EfficientNet-Lite0..4 by name, with its multipliers, resolution and dropout.

    Args:
      name: 'efficientnet_lite0' ... 'efficientnet_lite4'.
      num_classes: outputs of the head.
      **kwargs: further `EfficientNetLite` attributes (dtype, dropout, frozen_bn, ...).

    Returns:
      The `EfficientNetLite` module.
    """
    if name not in LITE_VARIANTS:
        raise ValueError(f"name must be one of {sorted(LITE_VARIANTS)}, got {name!r}")
    width, depth, resolution, dropout = LITE_VARIANTS[name]
    kwargs = {"dropout": dropout, **kwargs}
    return EfficientNetLite(
        width=width, depth=depth, resolution=resolution, num_classes=num_classes, **kwargs
    )
