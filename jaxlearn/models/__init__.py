"""Image classifiers as Flax Linen modules, and a registry to build them by name.

Every model is called as `model.apply(variables, x, train=bool)` on NHWC input,
returns float32 logits, takes `num_classes` and a computation `dtype` (float32
parameters), keeps BatchNorm statistics in 'batch_stats', names its classifier
`fc`, and returns the penultimate features with `features_only=True`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn

from jaxlearn.models.cifar_resnet import CifarResNet
from jaxlearn.models.efficientnet import LITE_VARIANTS, EfficientNetLite, make_efficientnet_lite
from jaxlearn.models.resnet import STAGE_SIZES, BasicBlock, Bottleneck, ResNet, make_resnet
from jaxlearn.models.small import CNN_SIZES, MLP, ResNet9, SimpleCNN

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(make_resnet, int(name[6:])) for name in STAGE_SIZES},
    **{f"resnet{d}": partial(CifarResNet, d) for d in (20, 32, 44, 56, 110)},
    # By keyword, so `get_model("cnn_small", 2, widths=(...))` overrides the preset's widths.
    **{
        name: partial(SimpleCNN, widths=widths, convs_per_stage=convs)
        for name, (widths, convs) in CNN_SIZES.items()
    },
    "mlp": MLP,
    "resnet9": ResNet9,
    **{name: partial(make_efficientnet_lite, name) for name in LITE_VARIANTS},
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model by name.

    Args:
      name: 'resnet18' / 34 / 50 / 101 / 152 (torchvision ImageNet ResNets), 'resnet10'
        (one block per stage),
        'resnet20' / 32 / 44 / 56 / 110 (CIFAR ResNets, option A),
        'cnn_small' / 'cnn_medium' / 'cnn_large', 'resnet9' (DAWNBench's), 'mlp', or
        'efficientnet_lite0' ... 4
        (Google's EfficientNet-Lite; see `jaxlearn.models.efficientnet`).
      num_classes: outputs of the head.
      **kwargs: further attributes of the model (dtype, dropout, features, ...).

    Returns:
      The Flax module.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = [
    "MLP",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "EfficientNetLite",
    "ResNet",
    "ResNet9",
    "SimpleCNN",
    "get_model",
    "make_efficientnet_lite",
    "make_resnet",
]
