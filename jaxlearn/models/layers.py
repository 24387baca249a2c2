"""Building blocks shared by the models: convolutions, BatchNorm, pooling, residual ReLU.

Padding is PyTorch's explicit symmetric pair by default, not 'SAME': for a stride-2
convolution on an even input 'SAME' pads (0, 1) where PyTorch pads (1, 1), which
shifts every feature map by a pixel and breaks weight compatibility. Models
ported from TensorFlow (EfficientNet) were trained with 'SAME' and ask for it
(`conv(..., padding="same")`, `DepthwiseConv`).

BatchNorm, the 2x2 max-pool and the residual add + ReLU have hand-written
backward passes (`jax.custom_vjp`) because XLA:CPU runs their automatic ones
slowly; each computes the same forward values as the plain formulation and a
gradient equal to it up to float rounding (tests/test_models.py compares them).
Train step against PyTorch 2.13 eager channels_last on 2 cores of an AMD EPYC,
jaxlib 0.10.2 with Eigen convolutions (benchmarks/results/train_step.json, ratio of
speeds, median of 3 processes): cnn_small 0.68 -> 1.02 at 64 px (123 -> 56 ms per
step of 32) and 0.83 -> 1.51 at 128 px, ResNet-20 0.51 -> 0.60, ResNet-18 0.72 -> 0.88.
A convolution whose output has fewer pixels than its kernel (ResNet's last stages at
32-64 px) is computed as a dot of its input patches: XLA:CPU would run it as a naive
loop (benchmarks/bench_small_maps.py).
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def images_in(x, dtype: Any, model: nn.Module, min_size: int = 1) -> jax.Array:
    """An image model's input `x` in its computation `dtype`, once checked to be NHWC.

    Flax builds a layer's kernel from the first input it sees, so without this a rank-3
    batch (an MNIST (N, 28, 28) without its channel axis) or a channels-first
    (N, 3, H, W) PyTorch batch initialises and trains without a word, on the wrong
    axes. A batch whose axis 1 holds 1 or 3 values while the last holds more than 4 is
    read as channels-first: an NHWC image 1 or 3 px high is not a photo.

    Raises:
      ValueError: `x` is not (N, H, W, C), looks channels-first, or has a side
        shorter than `min_size` px (the model's downsampling would leave nothing).
    """
    name = type(model).__name__
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"{name} takes images (N, H, W, C), got shape {tuple(jnp.shape(x))} "
            "(a greyscale batch needs its channel axis: x[..., None])"
        )
    if x.shape[1] in (1, 3) and x.shape[-1] > 4:
        raise ValueError(
            f"{name} takes channels-last images (N, H, W, C); shape {tuple(x.shape)} looks "
            "channels-first (PyTorch's N, C, H, W): x.transpose(0, 2, 3, 1)"
        )
    if min(x.shape[1:3]) < min_size:
        raise ValueError(f"{name} needs images of at least {min_size} px, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    return jnp.asarray(x, dtype)


def check_frozen_bn(model: nn.Module) -> None:
    """A ValueError for names in `model.frozen_bn` that are none of its top-level modules.

    Call it at the end of the model's compact `__call__`, once every module exists. A
    stage's name ('layer1' for 'layer1_0') or torch's ('layer1.0') would otherwise
    leave those BatchNorm layers updating their statistics without a word.
    """
    modules = model.variables.get("params", {})
    unknown = sorted(set(model.frozen_bn) - set(modules))
    if unknown:
        raise ValueError(
            f"frozen_bn names no module of {type(model).__name__}: {unknown}; its top-level "
            f"modules are {sorted(modules)}"
        )


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    name: str,
    dtype=jnp.float32,
    use_bias: bool = False,
    kernel_init=KAIMING_FAN_OUT,
    padding: str = "torch",
) -> nn.Conv:
    """A square convolution with PyTorch's padding `kernel // 2` on every side, or TF's 'SAME'.

    Args:
      features: output channels.
      kernel: kernel size (odd).
      stride: stride in both spatial dimensions.
      name: the module name (the torchvision state-dict name with '.' -> '_').
      dtype: computation dtype (parameters stay float32).
      use_bias: whether to add a bias (ResNets don't: BatchNorm follows).
      kernel_init: kernel initializer.
      padding: 'torch' (`kernel // 2` on every side) or 'same' (TensorFlow's SAME:
        output size ceil(input / stride), the odd pixel of padding after the input;
        for weights trained in TensorFlow).

    Returns:
      An `nn.Conv` taking NHWC input.
    """
    if padding not in ("torch", "same"):
        raise ValueError(f"padding must be 'torch' or 'same', got {padding!r}")
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)) if padding == "torch" else "SAME",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
        conv_general_dilated=_conv_general_dilated,
    )


def _window_taps(x: jax.Array, window: tuple[int, int], strides, padding) -> list[jax.Array]:
    """What each tap of a kh x kw window reads: kh*kw strided views of the padded NHWC `x`.

    Tap (i, j), at index `i * kw + j`, is the (N, oh, ow, C) array of the input pixels
    that the window's row i, column j meets at every output position; a convolution
    is the sum over taps of tap times that tap's kernel slice.

    Args:
      x: (N, H, W, C) input.
      window: (kh, kw).
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)) zeros around the input.
    """
    (kh, kw), (sh, sw) = window, strides
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, height, width, c = x.shape
    oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
    strides4 = (1, sh, sw, 1)
    return [
        lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), strides4)
        for i in range(kh)
        for j in range(kw)
    ]


def _conv_general_dilated(
    lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation, dimension_numbers,
    feature_group_count, precision,
):  # fmt: skip
    """`lax.conv_general_dilated` for `conv`'s NHWC/HWIO layers; a dot on small maps.

    When a convolution's output has fewer pixels than its kernel (a 3x3 layer on a 2x2
    map: ResNet's last stages at 32-64 px), XLA's algebraic simplifier swaps the input
    and the kernel, and XLA:CPU runs the swapped convolution, and the input gradient of
    a stride-2 one, as a naive loop instead of an Eigen kernel. There the layer is
    computed as what it is, a dot of the (at most kh*kw - 1) input patches with the
    kernel; its gradients are dots too. Train step at batch 16 on 2 cores, jaxlib
    0.10.2 (benchmarks/results/small_maps.json): ResNet-10 108 -> 27 ms at 32 px and
    374 -> 70 ms at 64 px, ResNet-18 887 -> 125 ms at 64 px; inference 8-12x faster.
    Equal to the convolution up to float rounding (tests/test_models.py).
    """
    kh, kw = rhs.shape[:2]
    height, width = lhs.shape[1:3]
    sh, sw = window_strides
    if isinstance(padding, str):
        padding = lax.padtype_to_pads((height, width), (kh, kw), window_strides, padding)
    (top, bottom), (left, right) = padding
    oh, ow = (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1
    dilated = any(d != 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1))))
    if oh * ow >= kh * kw or feature_group_count != 1 or dilated:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
        )  # fmt: skip
    # (N, oh, ow, kh * kw * C_in), in the kernel's (row, column, channel) order
    patches = jnp.concatenate(_window_taps(lhs, (kh, kw), window_strides, padding), axis=-1)
    kernel = rhs.reshape(-1, rhs.shape[-1])
    return lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())), precision=precision)


def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 mean and (biased) variance over every axis but the last, as `nn.BatchNorm`.

    Flax's fast variance, `E[x^2] - E[x]^2` clipped at 0: no centred copy of `x`.
    """
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axes)
    return mean, jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))


def _normalize(x, mean, var, scale, bias, epsilon):
    """`(x - mean) * (rsqrt(var + eps) * scale) + bias`, the same operations as `nn.BatchNorm`."""
    return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


def batch_norm_train(x, scale, bias, epsilon):
    """Training-mode BatchNorm over the last axis: (normalized x, batch mean, batch variance).

    The values are `nn.BatchNorm`'s. The backward pass is the closed form
    `dx = scale * rstd * (g - mean(g) - xhat * mean(g * xhat))`: two reductions
    over the gradient and the saved input, then one elementwise pass, where
    differentiating the forward's operations gave XLA:CPU more passes and a
    full-size `x - mean` kept from the forward. BatchNorm + ReLU forward and
    backward at 32x64x64x32 take 5.1-7.6 ms this way and 7.2-10.5 ms by
    autodiff (PyTorch 20-24 ms). The batch statistics come back under
    `stop_gradient`: they only feed the running averages.

    Args:
      x: (..., C) activations, any float dtype.
      scale: (C,) scale.
      bias: (C,) bias.
      epsilon: added to the variance.

    Returns:
      float32 normalized `x` (cast it to the compute dtype), and the (C,) float32
      batch mean and variance.
    """
    y, mean, var = _batch_norm_train(x, scale, bias, epsilon)
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, epsilon):
    mean, var = _batch_stats(x)
    return _normalize(x.astype(jnp.float32), mean, var, scale, bias, epsilon), mean, var


def _batch_norm_fwd(x, scale, bias, epsilon):
    mean, var = _batch_stats(x)
    y = _normalize(x.astype(jnp.float32), mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, mean, var, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    # The statistics' cotangents are zero: `batch_norm_train` stops their gradient.
    x, mean, var, scale = residuals
    g = cotangents[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xf = x.astype(jnp.float32)
    rstd = lax.rsqrt(var + epsilon)
    sum_g = jnp.sum(g, axes)
    dscale = (jnp.sum(g * xf, axes) - mean * sum_g) * rstd  # sum(g * xhat)
    dx = (scale * rstd) * (g - sum_g / n - (xf - mean) * (dscale * rstd / n))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), sum_g.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis with the hand-written backward of `batch_norm_train`.

    Same variables ('params': scale, bias; 'batch_stats': mean, var), the same
    forward values and the same running-average update as `nn.BatchNorm` with
    `use_fast_variance=True` (Flax's default), so checkpoints and converted
    torchvision weights load unchanged.

    Attributes:
      use_running_average: normalize with the running averages (inference).
      momentum: weight of the old running average (Flax's convention).
      epsilon: added to the variance.
      dtype: output dtype; statistics and the normalization are float32.
      param_dtype: dtype of scale and bias.
      scale_init: initializer of the scale.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        """Normalized `x` in `dtype`; in training mode also updates the running averages."""
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        if self.use_running_average:
            y = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var
        return jnp.asarray(y, self.dtype)


def batch_norm(
    train: bool,
    *,
    name: str,
    dtype=jnp.float32,
    zero_init: bool = False,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
):
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
      momentum: weight of the old running average (Flax's convention: the default 0.9
        is torch's 0.1; TensorFlow's EfficientNets use 0.99, torch's 0.01).
      epsilon: added to the variance (torch's 1e-5; TensorFlow's EfficientNets 1e-3).

    Returns:
      A `BatchNorm` (`nn.BatchNorm`'s variables and values, a faster backward).
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        name=name,
    )


# TensorFlow's depthwise initializer (EfficientNet's `conv_kernel_initializer`): normal with
# std sqrt(2 / fan_out), fan_out = k*k of its (k, k, C, 1) kernel, which is the fan-in k*k*1
# of the (k, k, 1, C) kernel here.
DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
DEPTHWISE_IMPLS = ("auto", "lax", "shifted")


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = "auto"):
    """Depthwise convolution of NHWC `x` with a (k, k, 1, C) kernel, TensorFlow 'SAME' padding.

    The same operation as `lax.conv_general_dilated(..., feature_group_count=C)` with
    padding 'SAME' (`nn.Conv(C, (k, k), feature_group_count=C)`'s kernel layout). On
    XLA:CPU that grouped convolution is slow (jax-ml/jax#23713), so 'shifted' writes it
    as the sum of k*k shifted slices of the padded input times one kernel tap each,
    which XLA fuses into one elementwise loop. Forward + backward, batch 32, the 16
    depthwise layers of EfficientNet-Lite0 at 224 px, 2 cores of an AMD EPYC
    (benchmarks/bench_efficientnet.py --depthwise; PyTorch 2.13 channels_last in
    brackets): with Eigen convolutions 7.1 s -> 1.40 s (0.87 s), e.g. 112x112x96 k3 s2
    1370 -> 143 ms (173), 14x14x672 k5 521 -> 130 ms (71); with YNNPACK's (jaxlib's
    default) 8.4 s -> 1.41 s (0.88 s). Most of what remains is the kernel gradient's
    k*k tap copies, which XLA:CPU's default concurrency-optimised scheduler keeps alive
    at once in fresh memory on every call (page faults: 100k per call at 112x112x32);
    with `--xla_cpu_enable_concurrency_optimized_scheduler=false` the 16 layers take
    0.64 s, PyTorch's 0.61 s.

    Args:
      x: (N, H, W, C) input.
      kernel: (k, k, 1, C) kernel, k odd.
      stride: stride in both spatial dimensions.
      impl: 'lax' (the grouped convolution), 'shifted' (the sum of shifted products,
        float32 accumulation), or 'auto': 'shifted' on the CPU backend, 'lax' on
        accelerators, decided when the function is traced.

    Returns:
      (N, ceil(H / stride), ceil(W / stride), C) in `x`'s dtype.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "shifted" if jax.default_backend() == "cpu" else "lax"
    h, w, c = x.shape[1:]
    k = kernel.shape[0]
    if impl == "lax":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        )  # fmt: skip
    pads = lax.padtype_to_pads((h, w), (k, k), (stride, stride), "SAME")
    taps = _window_taps(x, (k, k), (stride, stride), pads)
    out = jnp.zeros(taps[0].shape, jnp.float32)
    for index, tap in enumerate(taps):
        i, j = divmod(index, k)
        out = out + tap.astype(jnp.float32) * kernel[i, j, 0].astype(jnp.float32)
    return out.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """A depthwise k x k convolution with 'SAME' padding and no bias (`depthwise_conv`).

    Its one parameter, 'kernel' (k, k, 1, C), is laid out as `nn.Conv` with
    `feature_group_count=C` lays it out, so weights move between the two unchanged.

    Attributes:
      kernel_size: k (odd).
      stride: stride in both spatial dimensions.
      impl: 'auto', 'lax' or 'shifted' (see `depthwise_conv`).
      dtype: computation dtype (the kernel stays float32).
    """

    kernel_size: int
    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """The depthwise convolution of NHWC `x`, in `dtype`."""
        k = self.kernel_size
        kernel = self.param("kernel", DEPTHWISE_INIT, (k, k, 1, x.shape[-1]), jnp.float32)
        x = jnp.asarray(x, self.dtype)
        return depthwise_conv(x, jnp.asarray(kernel, self.dtype), self.stride, self.impl)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 on NHWC input, as `nn.max_pool(x, (2, 2), strides=(2, 2))`.

    The forward is a reshape to 2x2 blocks and a max, the backward an elementwise
    mask, `dx = g where x == max of its block`. XLA:CPU's own max-pool backward
    (`select-and-scatter`) is slow, and differentiating the reshape + max keeps a
    float mask and a tie count from the forward: forward + backward at
    32x64x64x32 take 44 ms with `nn.max_pool`, 7-15 ms by autodiff of the
    reshape + max and 3.8-4.4 ms this way (PyTorch 11 ms). Where a block has
    tied maxima each of them gets the whole gradient (PyTorch and select-and-
    scatter give it to one); ties are rare with float inputs, and the common
    one, a block of zeros after a ReLU, has its gradient zeroed by the ReLU.
    An odd last row or column is dropped, as with 'VALID' padding.

    Args:
      x: (N, H, W, C) array.

    Returns:
      (N, H // 2, W // 2, C) block maxima.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _max_pool_2x2_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(residuals, g):
    x, y = residuals
    n, h, w, c = x.shape
    blocks = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    wide = (n, h // 2, 1, w // 2, 1, c)
    dx = jnp.where(blocks == y.reshape(wide), g.reshape(wide), jnp.zeros((), g.dtype))
    dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


@jax.custom_vjp
def add_relu(x: jax.Array, shortcut: jax.Array) -> jax.Array:
    """`relu(x + shortcut)`, the end of a residual block, computed so XLA:CPU keeps it.

    Written as `max(x, -shortcut) + shortcut`, the same value: XLA:CPU's fusion
    treats `relu(a + b)` as cheap to recompute, so each block output was recomputed,
    with every earlier block's, inside every later weight-gradient transpose that
    reads it (work quadratic in depth); ending in a two-operand add, the output is
    computed once and read back. ResNet-20 (batch 128, 32x32): train step 306 ->
    257 ms, transpose time 242 -> 125 ms per step. The backward masks the gradient
    with the saved output (`y > 0`), exactly `relu(x + shortcut)`'s gradient. The
    values differ only for `shortcut = -inf` (NaN instead of 0).

    Args:
      x: the residual branch.
      shortcut: the shortcut, same shape and dtype.

    Returns:
      `relu(x + shortcut)`.
    """
    return jnp.maximum(x, -shortcut) + shortcut


def _add_relu_fwd(x, shortcut):
    y = add_relu(x, shortcut)
    return y, y


def _add_relu_bwd(y, g):
    g = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
    return g, g


add_relu.defvjp(_add_relu_fwd, _add_relu_bwd)


def head(num_classes: int, *, dtype=jnp.float32) -> nn.Dense:
    """The classifier layer every model ends with, named `fc` as in torchvision.

    One definition so that `transfer.replace_head` initialises a new head the
    same way the models do (Flax's LeCun-normal kernel, zero bias). A model built
    with `num_classes` < 1 fails here, when it is first traced, with a ValueError
    (Flax would otherwise divide by the zero fan-out of an empty kernel).
    """
    integral = isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
    if not integral or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="fc")
