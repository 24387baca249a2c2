"""torchvision's ResNet-18/34/50/101/152 in Flax Linen, layer for layer.

He et al. 2016, "Deep Residual Learning for Image Recognition", in torchvision's
"v1.5" form: the Bottleneck's stride sits on the 3x3 convolution, not the first
1x1. Module names are torchvision's state-dict names with '.' replaced by '_'
(`layer1.0.downsample.1` -> `layer1_0/downsample_1`), so converting weights is
mechanical (see `jaxlearn.pretrained`). Stage outputs are sown into the
'intermediates' collection ('stem', 'layer1' .. 'layer4'), for inspection and
for the equivalence tests against PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlearn.models.layers import add_relu, batch_norm, check_frozen_bn, conv, head, images_in


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34, CIFAR ResNets).

    `shortcut` is "conv" (torchvision, option B: 1x1 strided conv + BatchNorm
    where the shape changes) or "pad" (option A of He et al., used by the CIFAR
    ResNets: subsample and zero-pad the channels, no parameters).
    """

    planes: int
    stride: int = 1
    zero_init_residual: bool = False
    shortcut: str = "conv"
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        """Apply the block to NHWC `x`; `train`: BatchNorm uses batch statistics."""
        out = conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        out = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(out))
        out = conv(self.planes, 3, name="conv2", dtype=self.dtype)(out)
        out = batch_norm(train, name="bn2", dtype=self.dtype, zero_init=self.zero_init_residual)(
            out
        )
        return add_relu(out, _shortcut(self, x, train))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, residual (ResNet-50/101/152)."""

    planes: int
    stride: int = 1
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        """Apply the block to NHWC `x`; `train`: BatchNorm uses batch statistics."""
        out = conv(self.planes, 1, name="conv1", dtype=self.dtype)(x)
        out = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(out))
        out = conv(self.planes, 3, self.stride, name="conv2", dtype=self.dtype)(out)
        out = nn.relu(batch_norm(train, name="bn2", dtype=self.dtype)(out))
        out = conv(self.planes * 4, 1, name="conv3", dtype=self.dtype)(out)
        out = batch_norm(train, name="bn3", dtype=self.dtype, zero_init=self.zero_init_residual)(
            out
        )
        return add_relu(out, _shortcut(self, x, train))


def _shortcut(block, x, train):
    """Identity, or where the shape changes a 1x1 strided conv + BatchNorm / zero padding."""
    out_channels = block.planes * block.expansion
    if block.stride == 1 and x.shape[-1] == out_channels:
        return x
    if getattr(block, "shortcut", "conv") == "pad":
        x = x[:, :: block.stride, :: block.stride, :]
        extra = out_channels - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    x = conv(out_channels, 1, block.stride, name="downsample_0", dtype=block.dtype)(x)
    return batch_norm(train, name="downsample_1", dtype=block.dtype)(x)


class ResNet(nn.Module):
    """An ImageNet ResNet with torchvision's architecture and parameter layout.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: `BasicBlock` or `Bottleneck`.
      num_classes: outputs of the `fc` head.
      zero_init_residual: start each block's last BatchNorm scale at 0
        (torchvision's option of the same name; Goyal et al. 2017).
      frozen_bn: names of top-level modules ('bn1', 'layer1_0', ...) whose
        BatchNorm layers use their running averages even when `train=True`;
        `jaxlearn.transfer.freeze_to(..., bn="eval")` sets it.
      dtype: computation dtype, e.g. `jnp.bfloat16`; parameters and BatchNorm
        statistics stay float32 and the logits are returned as float32.
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    num_classes: int = 1000
    zero_init_residual: bool = False
    frozen_bn: tuple[str, ...] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, features_only: bool = False):
        """Logits (N, num_classes) for NHWC images, or the pooled features.

        Args:
          x: images (N, H, W, 3), ImageNet-normalised floats.
          train: batch statistics and running-average updates (True) or
            inference with the running averages (False).
          features_only: return the penultimate features (N, 512 or 2048), the
            global average pool before `fc`.
        """
        x = images_in(x, self.dtype, self)
        x = conv(64, 7, 2, name="conv1", dtype=self.dtype)(x)
        x = batch_norm(train and "bn1" not in self.frozen_bn, name="bn1", dtype=self.dtype)(x)
        x = nn.relu(x)
        # torchvision: MaxPool2d(3, stride=2, padding=1); Flax pads max_pool with -inf.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        return residual_stages_and_head(
            self, x, train, features_only, self.stage_sizes, self.block, width=64
        )


def residual_stages_and_head(
    module, x, train, features_only, stage_sizes, block, *, width, **block_kwargs
):
    """Stages of residual blocks, global average pool, then the `fc` head (or the features).

    Shared by the ImageNet and CIFAR ResNets. Stage i has `width * 2**i`
    planes and starts with a stride-2 block (except the first); blocks are
    named `layer{i+1}_{j}` and each stage's output is sown as 'layer{i+1}'.

    Args:
      module: the calling ResNet (inside its compact `__call__`), which has
        `num_classes`, `zero_init_residual`, `frozen_bn` and `dtype`.
      x: the stem's output.
      train: training mode (blocks named in `module.frozen_bn` run in inference mode).
      features_only: return the pooled features instead of the logits.
      stage_sizes: blocks per stage.
      block: the block class.
      width: planes of the first stage.
      **block_kwargs: further block attributes (e.g. `shortcut="pad"`).

    Returns:
      float32 logits (N, num_classes) or features (N, D).
    """
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            name = f"layer{i + 1}_{j}"
            x = block(
                planes=width * 2**i,
                stride=2 if i > 0 and j == 0 else 1,
                zero_init_residual=module.zero_init_residual,
                dtype=module.dtype,
                name=name,
                **block_kwargs,
            )(x, train and name not in module.frozen_bn)
        module.sow("intermediates", f"layer{i + 1}", x)
    x = jnp.mean(x, axis=(1, 2))
    if not features_only:
        x = head(module.num_classes, dtype=module.dtype)(x)
    check_frozen_bn(module)
    return jnp.asarray(x, jnp.float32)


STAGE_SIZES = {
    # Not in torchvision: one BasicBlock per stage (5.4M parameters), the smallest member
    # of the family, for quick runs (its train step compiles in 2.1 s here, ResNet-18 in 2.8 s).
    "resnet10": ((1, 1, 1, 1), BasicBlock),
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
    "resnet152": ((3, 8, 36, 3), Bottleneck),
}


def make_resnet(depth: int, num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ResNet-`depth` (18, 34, 50, 101 or 152), or ResNet-10 (one block a stage).

    Args:
      depth: number of weighted layers.
      num_classes: outputs of the head.
      **kwargs: further `ResNet` attributes (dtype, zero_init_residual, frozen_bn).

    Returns:
      The `ResNet` module.
    """
    key = f"resnet{depth}"
    if key not in STAGE_SIZES:
        raise ValueError(f"depth must be one of 10, 18, 34, 50, 101, 152, got {depth!r}")
    stage_sizes, block = STAGE_SIZES[key]
    return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, **kwargs)
