"""Building blocks shared by the models: convolutions with explicit padding, BatchNorm.

Padding is always an explicit symmetric pair, never 'SAME': for a stride-2
convolution on an even input 'SAME' pads (0, 1) where PyTorch pads (1, 1), which
shifts every feature map by a pixel and breaks weight compatibility.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    name: str,
    dtype=jnp.float32,
    use_bias: bool = False,
    kernel_init=KAIMING_FAN_OUT,
) -> nn.Conv:
    """A square convolution with PyTorch's padding `kernel // 2` on every side.

    Args:
      features: output channels.
      kernel: kernel size (odd).
      stride: stride in both spatial dimensions.
      name: the module name (the torchvision state-dict name with '.' -> '_').
      dtype: computation dtype (parameters stay float32).
      use_bias: whether to add a bias (ResNets don't: BatchNorm follows).
      kernel_init: kernel initializer.

    Returns:
      An `nn.Conv` taking NHWC input.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


def batch_norm(train: bool, *, name: str, dtype=jnp.float32, zero_init: bool = False):
    """BatchNorm matching torch.nn.BatchNorm2d's defaults.

    Flax's momentum is the weight of the old running average, so torch's
    momentum=0.1 is Flax's 0.9 (a port with Flax momentum 0.1 tracks only the last
    batch). Statistics are reduced in float32 even for bf16 compute.

    Args:
      train: normalise with the batch statistics and update the running ones
        (`True`), or use the running averages (`False`).
      name: the module name.
      dtype: computation dtype (parameters and statistics stay float32).
      zero_init: start the scale at 0, so a residual branch starts as identity
        (Goyal et al. 2017, "Accurate, Large Minibatch SGD", §5.1).

    Returns:
      An `nn.BatchNorm`.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        name=name,
    )


def head(num_classes: int, *, dtype=jnp.float32) -> nn.Dense:
    """The classifier layer every model ends with, named `fc` as in torchvision.

    One definition so that `transfer.replace_head` initialises a new head the
    same way the models do (Flax's LeCun-normal kernel, zero bias).
    """
    return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="fc")
