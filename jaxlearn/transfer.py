"""Transfer learning: layer groups, freezing, discriminative learning rates, fine_tune.

fastai's recipe (Howard & Ruder 2018, "Universal Language Model Fine-tuning",
and the fast.ai course): split the network into layer groups, train only the new
head first, then unfreeze everything with learning rates that grow
geometrically from the first group to the head, since early layers hold
generic features that need less change. For a ResNet the groups are fastai's:
stem..layer2, layer3..layer4, head.

Freezing is an optimizer matter here: `optax.partition` gives frozen
parameters `optax.set_to_zero()`, which keeps no state, so a frozen body costs
no optimizer memory (Adam on a 1000-parameter body + 10-parameter head: 21
state elements frozen vs 2021 unfrozen).

BatchNorm in frozen groups, `bn=`:
  'train' -- its scale and bias keep training (at their group's rate) and its
             running statistics keep updating. fastai's default
             (`Learner(train_bn=True)`): the new data's statistics differ from
             ImageNet's and BN parameters are cheap to adapt.
  'stats' -- scale and bias frozen; running statistics still update from the
             training batches (train-mode normalisation).
  'eval'  -- fully frozen: normalise with the stored running averages and never
             update them (the Keras fine-tuning advice); needs a model with a
             `frozen_bn` attribute (the ResNets, EfficientNet-Lite), which `freeze_to`
             sets.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxlearn.inference import apply_batched
from jaxlearn.loop import Callback, fit, stop_requested, watch_stops
from jaxlearn.models.layers import head
from jaxlearn.parallel import mesh_of
from jaxlearn.schedules import one_cycle
from jaxlearn.state import TrainState, init_optimizer
from jaxlearn.steps import (
    default_preprocess,
    injected_learning_rate,
    make_eval_step,
    make_train_step,
)

# A group starts at each of these top-level modules (fastai's resnet split).
RESNET_SPLIT = ("layer3", "fc")
# The CIFAR ResNets have three stages: stem..layer1, layer2..layer3, head.
CIFAR_RESNET_SPLIT = ("layer2", "fc")
# EfficientNet-Lite as fastai's ResNet split, by resolution: stem..stage3 (down to 28 px at
# 224) | stage4..top_conv (14 and 7 px, as ResNet's layer3..layer4) | head.
EFFICIENTNET_SPLIT = ("stage4", "fc")
BN_MODES = ("train", "stats", "eval")


def default_split(model: nn.Module) -> tuple[str, ...]:
    """The layer-group boundaries this library uses for `model`'s family.

    ResNets `RESNET_SPLIT`, CIFAR ResNets `CIFAR_RESNET_SPLIT`, EfficientNet-Lite
    `EFFICIENTNET_SPLIT`; any other model splits into body and head, `("fc",)`.
    """
    from jaxlearn.models import CifarResNet, EfficientNetLite, ResNet

    for family, split in (
        (ResNet, RESNET_SPLIT),
        (CifarResNet, CIFAR_RESNET_SPLIT),
        (EfficientNetLite, EFFICIENTNET_SPLIT),
    ):
        if isinstance(model, family):
            return split
    return ("fc",)


Optimizer = Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]


def _rank(name: str) -> float:
    """Position of a top-level module in the network.

    The stem 0, 'layerK_*' / 'stageK_*' K, then 'top_*' (layers after the last
    stage, e.g. EfficientNet's 1x1 convolution to 1280 channels), the head 'fc' last.
    """
    if name == "fc":
        return float("inf")
    if name.startswith("top_"):
        return float(2**31)  # after any stage number
    match = re.match(r"(?:layer|stage)(\d+)", name)
    return int(match.group(1)) if match else 0


def layer_groups(params: Mapping, split_at: Sequence[str] = RESNET_SPLIT) -> dict[str, int]:
    """The layer group of each top-level module of `params`.

    Modules are ordered stem (conv1, bn1) < layer1 < layer2 < ... < top_* < fc
    (`stageK` ranks as `layerK`); a new group starts at each name of `split_at`.

    Args:
      params: the model's 'params' collection.
      split_at: first module of each group after the first, in order, e.g.
        ("layer3", "fc") for torchvision ResNets (3 groups), `EFFICIENTNET_SPLIT`,
        ("fc",) for body/head.

    Returns:
      {top-level module name: group index}.
    """
    ranks = [_rank(s) for s in split_at]
    if not split_at or any(a >= b for a, b in itertools.pairwise(ranks)) or ranks[0] <= 0:
        raise ValueError(
            f"split_at must name increasing stages after the stem, e.g. ('layer3', 'fc'), "
            f"got {tuple(split_at)}"
        )
    return {name: sum(_rank(name) >= r for r in ranks) for name in params}


def _check_groups_filled(groups: Mapping[str, int], split_at: Sequence[str], use: str) -> None:
    """ValueError unless every layer group holds a module: `use` would act on the wrong ones.

    Groups are found by module name (`_rank`), so a model whose head is not named
    'fc' puts every module in group 0: freezing "all but the head" would freeze
    everything, and the head's learning rate would go to nothing.
    """
    counts = collections.Counter(groups.values())
    empty = [g for g in range(len(split_at) + 1) if not counts[g]]
    if empty:
        raise ValueError(
            f"layer group(s) {empty} of split_at={tuple(split_at)} hold none of the model's "
            f"top-level modules {sorted(groups)}, so {use} would act on the wrong layers: "
            "groups are found by name (the head 'fc', the stages 'layerK' or 'stageK', "
            "'top_*' between them), so name the model's modules so"
        )


def _check_optimizer(optimizer: Optimizer) -> None:
    """ValueError unless `optimizer` takes its rate as `learning_rate`.

    `optax.inject_hyperparams`, which makes the rate a schedule the step can report,
    passes it by that name (as optax's own factories call it).
    """
    if not callable(optimizer):
        raise ValueError(f"optimizer must be a factory `learning_rate -> tx`, got {optimizer!r}")
    try:
        inspect.signature(optimizer).bind(learning_rate=1.0)
    except TypeError:
        raise ValueError(
            f"the optimizer factory {optimizer!r} must take its rate as `learning_rate` "
            "(optax.inject_hyperparams passes it by that name), e.g. `lambda learning_rate: "
            "optax.sgd(learning_rate, momentum=0.9)` or functools.partial(optax.sgd, "
            "momentum=0.9)"
        ) from None
    except ValueError:  # no signature to read (a builtin): the call will tell
        pass


def discriminative_factors(lo: float, hi: float, num_groups: int) -> tuple[float, ...]:
    """Per-group multipliers of the head's learning rate, spread geometrically from lo/hi to 1.

    fastai's `slice(lo, hi)`: group g trains at `lo * (hi / lo) ** (g / (n - 1))`,
    so the first group gets `lo` and the head `hi`; each group's schedule is the
    head's schedule times its factor.

    Args:
      lo: learning rate of the first group (> 0).
      hi: learning rate of the last group (>= lo).
      num_groups: number of groups (>= 1).

    Returns:
      `num_groups` factors, the last one 1.0.
    """
    if not 0 < lo <= hi:
        raise ValueError(f"lo and hi must satisfy 0 < lo <= hi, got lo={lo}, hi={hi}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if num_groups == 1:
        return (1.0,)
    return tuple(float((lo / hi) ** (1 - g / (num_groups - 1))) for g in range(num_groups))


def _scaled(learning_rate: optax.ScalarOrSchedule, factor: float) -> optax.ScalarOrSchedule:
    if callable(learning_rate):
        return lambda step: learning_rate(step) * factor
    return learning_rate * factor


def param_labels(
    params: Mapping, n: int, *, split_at: Sequence[str] = RESNET_SPLIT, bn: str = "train"
) -> dict:
    """Label every parameter 'frozen' or 'group<g>', for `optax.partition`.

    Args:
      params: the model's 'params' collection.
      n: freeze the first `n` groups (negative counts from the end, as in
        fastai: -1 freezes all but the head; 0 freezes nothing).
      split_at: group boundaries (see `layer_groups`).
      bn: what happens to BatchNorm layers in frozen groups (module docstring);
        with 'train' their scale and bias keep their group's label.

    Returns:
      A pytree like `params` of string labels.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    groups = layer_groups(params, split_at)
    num_groups = len(split_at) + 1
    if not -num_groups <= n <= num_groups:
        raise ValueError(f"n must be in [{-num_groups}, {num_groups}], got {n}")
    n = n % num_groups if n < 0 else n
    if n:
        _check_groups_filled(groups, split_at, f"freezing the first {n} group(s)")
    flat = traverse_util.flatten_dict(dict(params))
    norms = {path[:-1] for path in flat if path[-1] == "scale"}  # BatchNorm (or other norm) layers

    def label(path):
        g = groups[path[0]]
        trainable = g >= n or (bn == "train" and path[:-1] in norms)
        return f"group{g}" if trainable else "frozen"

    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def freeze_to(
    model: nn.Module,
    params: Mapping,
    n: int,
    optimizer: Optimizer,
    learning_rate: optax.ScalarOrSchedule,
    *,
    lr_factors: Sequence[float] | None = None,
    split_at: Sequence[str] | None = None,
    bn: str = "train",
    stats_frozen_to: int | None = None,
) -> tuple[nn.Module, optax.GradientTransformation]:
    """Freeze the first `n` layer groups: the model and optimizer to train the rest with.

    Frozen parameters get `optax.set_to_zero()` (no update, no optimizer state);
    group g gets `optimizer(learning_rate * lr_factors[g])`, with schedules
    scaled pointwise, so every group follows the same schedule shape. Each group's
    learning rate is injected (`optax.inject_hyperparams`), so the train step
    reports the rate it used (the head's, the largest).
    `n=0` unfreezes everything; `n=-1` trains only the head.

    Args:
      model: the Flax model; with `bn='eval'` it must have a `frozen_bn`
        attribute (the ResNets, EfficientNet-Lite), which is set to the frozen groups' modules (and
        cleared otherwise).
      params: its 'params' collection (only the structure is used).
      n: number of leading groups to freeze (negative counts from the end).
      optimizer: `learning_rate -> GradientTransformation`, e.g. `optax.adam` or
        `functools.partial(optax.sgd, momentum=0.9)`; its argument must be named
        `learning_rate` (`optax.inject_hyperparams` passes it by name).
      learning_rate: float or schedule of the last group (the head).
      lr_factors: per-group multipliers, e.g. `discriminative_factors(lo, hi, 3)`;
        default 1 for every group.
      split_at: group boundaries (see `layer_groups`); default `default_split(model)`.
      bn: 'train', 'stats' or 'eval' for BatchNorm in frozen groups (module docstring).
      stats_frozen_to: the first this many groups normalise with their running
        statistics and keep them, trainable or not (needs `frozen_bn`); default:
        the frozen groups with `bn='eval'`, none otherwise. `fine_tune`'s
        `unfrozen_bn='eval'` keeps the whole body's statistics this way.

    Returns:
      `(model, tx)`: the model to build the train state with and its optimizer.
    """
    split_at = default_split(model) if split_at is None else split_at
    labels = param_labels(params, n, split_at=split_at, bn=bn)
    num_groups = len(split_at) + 1
    factors = tuple(lr_factors) if lr_factors is not None else (1.0,) * num_groups
    if len(factors) != num_groups or not all(f > 0 for f in factors):
        raise ValueError(f"lr_factors must be {num_groups} positive numbers, got {lr_factors}")
    if len(set(factors)) > 1:
        _check_groups_filled(layer_groups(params, split_at), split_at, "per-group rates")
    _check_optimizer(optimizer)
    used = set(jax.tree.leaves(labels))
    build = optimizer if _injects(optimizer) else optax.inject_hyperparams(optimizer)
    transforms = {
        f"group{g}": build(learning_rate=_scaled(learning_rate, f))
        for g, f in enumerate(factors)
        if f"group{g}" in used
    }
    transforms["frozen"] = optax.set_to_zero()
    if bn == "eval" or stats_frozen_to is not None or hasattr(model, "frozen_bn"):
        if not hasattr(model, "frozen_bn"):
            raise ValueError(
                f"bn='eval' and stats_frozen_to need a model with `frozen_bn`, "
                f"got {type(model).__name__}"
            )
        if stats_frozen_to is None:
            stats_frozen_to = (n % num_groups if n < 0 else n) if bn == "eval" else 0
        groups = layer_groups(params, split_at)
        model = model.clone(frozen_bn=tuple(sorted(m for m, g in groups.items()
                                                   if g < stats_frozen_to)))  # fmt: skip
    return model, optax.partition(transforms, labels)


def _injects(optimizer: Optimizer) -> bool:
    """Whether `optimizer(lr)` injects its learning rate already.

    Wrapping such a factory in `optax.inject_hyperparams` again would freeze its
    rate: the inner injection reads a number from its own state and never sees
    the outer schedule's new values.
    """
    probe = {"w": jnp.zeros((1,), jnp.float32)}
    return injected_learning_rate(optimizer(learning_rate=1.0).init(probe)) is not None


def optimizer_state_size(opt_state: Any) -> int:
    """Number of array elements held in an optimizer state (what freezing saves)."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(opt_state))


def replace_head(
    model: nn.Module, variables: Mapping, num_classes: int, key: jax.Array
) -> tuple[nn.Module, dict]:
    """A model and variables with a freshly initialised `fc` for `num_classes` classes.

    Every other variable is kept, e.g. to fine-tune 1000-class ImageNet weights
    on a 10-class data set. The new head is initialised as the models initialise
    theirs (LeCun-normal kernel, zero bias).

    Args:
      model: a model whose head is named `fc` and has a `num_classes` attribute.
      variables: its `{'params', 'batch_stats'}`.
      num_classes: the new number of outputs.
      key: PRNG key for the new head.

    Returns:
      `(model, variables)` for the new head.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if "fc" not in variables.get("params", {}):
        raise ValueError("variables must have a head named params['fc']")
    in_features = variables["params"]["fc"]["kernel"].shape[0]
    fc = head(num_classes).init(key, jnp.zeros((1, in_features), jnp.float32))["params"]
    new = {**variables, "params": {**variables["params"], "fc": fc}}
    return model.clone(num_classes=num_classes), new


class LinearHead(nn.Module):
    """The `fc` layer alone, to train on precomputed features (see `extract_features`).

    Its params are `{'fc': ...}`, the same subtree as the full model's head, so
    `attach_head` puts the trained head back into the full model.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits (N, num_classes) for features (N, D)."""
        return head(self.num_classes)(x)


def attach_head(variables: Mapping, head_params: Mapping) -> dict:
    """`variables` with `params['fc']` replaced by `head_params['fc']` (shapes checked)."""
    old, new = variables["params"]["fc"], head_params["fc"]
    shapes = {k: (np.shape(old[k]), np.shape(new[k])) for k in old}
    if set(old) != set(new) or any(a != b for a, b in shapes.values()):
        raise ValueError(f"head_params['fc'] does not fit the model's fc: {shapes}")
    return {**variables, "params": {**variables["params"], "fc": new}}


def extract_features(
    model: nn.Module,
    variables: Mapping,
    images: np.ndarray,
    batch_size: int = 64,
    *,
    preprocess: Callable[[jax.Array], jax.Array] = default_preprocess,
) -> np.ndarray:
    """Penultimate features of a frozen body for every image, computed once.

    Training only the head on these (with `LinearHead`) costs one forward pass
    per image in total instead of one per image per epoch; this is what the
    "0.046% of the training examples" post did with VGG features. BatchNorm
    runs in inference mode.

    Args:
      model: a model accepting `features_only=True`.
      variables: its variables.
      images: (N, H, W, C) uint8 or float images.
      batch_size: images per forward pass (`jaxlearn.inference.apply_batched`: the
        last batch is padded, so one compilation serves all).
      preprocess: `images -> float images`, as for training (default uint8 -> [0, 1];
        `jaxlearn.pretrained.imagenet_normalize` for ImageNet weights).

    Returns:
      (N, D) float32 NumPy array.
    """
    return apply_batched(
        model.apply, variables, images, batch_size=batch_size, preprocess=preprocess,
        features_only=True,
    )  # fmt: skip


def make_state(
    model: nn.Module,
    variables: Mapping,
    tx: optax.GradientTransformation,
    key: jax.Array,
    *,
    step: int = 0,
) -> TrainState:
    """A `TrainState` from existing (e.g. pretrained) variables and a new optimizer.

    Args:
      model: the model (its `apply` goes into the state).
      variables: `{'params': ..., 'batch_stats': ...}`.
      tx: the optimizer; its state is initialised here (its own count starts at 0,
        so its schedule starts from the beginning).
      key: PRNG key for dropout and augmentation.
      step: the state's step count, e.g. where a previous phase of the same run
        ended, so that checkpoints and history keep one count.

    Returns:
      The `TrainState`, holding copies of `variables` and `key` (the train step
      donates its input state, which must not invalidate the caller's arrays).
    """
    # Copies: the jitted train step donates the state's buffers, the caller keeps theirs
    # (a raw key too, e.g. another state's `rng`). `device_put` copies buffers as they
    # are; `jnp.array` compiled a copy program per distinct shape (a ResNet-18: 21).
    key = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    params, batch_stats, key, step = jax.device_put(
        (variables["params"], variables.get("batch_stats", {}), key, np.int32(step)),
        may_alias=False,
    )
    return TrainState(
        step=step,
        params=params,
        batch_stats=batch_stats,
        opt_state=init_optimizer(tx, params),
        rng=key,
        apply_fn=model.apply,
        tx=tx,
    )


def fastai_adam(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """fastai's default optimizer: Adam(0.9, 0.99, eps 1e-5) with decoupled weight decay 0.01.

    As fastai (`wd_bn_bias=False`), the decay applies to kernels only, not to
    biases or BatchNorm parameters.
    """
    return optax.adamw(
        learning_rate,
        b1=0.9,
        b2=0.99,
        eps=1e-5,
        weight_decay=0.01,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )


def fine_tune(
    model: nn.Module,
    variables: Mapping,
    train_data,
    *,
    epochs: int,
    key: jax.Array,
    base_lr: float = 2e-3,
    freeze_epochs: int = 1,
    lr_mult: float = 100.0,
    pct_start: float = 0.3,
    div: float = 5.0,
    optimizer: Optimizer = fastai_adam,
    split_at: Sequence[str] | None = None,
    bn: str = "train",
    unfrozen_bn: str = "train",
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    batch_augment: Callable[[jax.Array, dict], dict] | None = None,
    compute_dtype: Any = None,
    label_smoothing: float = 0.0,
    eval_data=None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    step: int = 0,
) -> tuple[TrainState, dict[str, dict[str, np.ndarray]]]:
    """fastai's `Learner.fine_tune`: train the head with a frozen body, then everything.

    Phase 1 (`freeze_epochs`): all groups but the head frozen, one-cycle with
    peak `base_lr` and pct_start 0.99 (`fit_one_cycle(freeze_epochs,
    slice(base_lr), pct_start=0.99)`: trainable BatchNorm layers of frozen groups
    at base_lr / 10). Phase 2 (`epochs`): unfrozen, one-cycle with peak
    `base_lr / 2` for the head and learning rates spread geometrically down to
    `base_lr / 2 / lr_mult` for the first group, warm-up `pct_start`, start at
    peak / `div`. Each phase starts a fresh optimizer state (its schedule from the
    beginning); the step count runs on through both phases, so one `Checkpoint`
    callback and the history's steps serve the whole run. `step` continues a
    count that earlier training started (`jaxlearn.learner.Learner.fine_tune`).
    fastai also cycles Adam's momentum (0.95 -> 0.85 -> 0.95); this does not.

    Args:
      model: the model with its new head (see `replace_head`).
      variables: its variables, e.g. converted pretrained weights.
      train_data: the training loader (`ArrayLoader`).
      epochs: epochs of the unfrozen phase (>= 1).
      key: PRNG key of the train state (dropout, augmentation).
      base_lr: peak learning rate of the head in phase 1 (fastai's default 2e-3).
      freeze_epochs: epochs of the head-only phase (>= 0).
      lr_mult: ratio of the head's to the first group's rate in phase 2.
      pct_start: warm-up fraction of phase 2.
      div: phase 2 starts at peak / div.
      optimizer: `learning_rate -> GradientTransformation` (default `fastai_adam`).
      split_at: layer-group boundaries (`RESNET_SPLIT`, `CIFAR_RESNET_SPLIT`,
        `EFFICIENTNET_SPLIT`, ...); default `default_split(model)`.
      bn: BatchNorm of frozen groups in phase 1: 'train', 'stats' or 'eval'.
      unfrozen_bn: BatchNorm of the body (every group but the head) in phase 2:
        'train' (fastai), or 'eval' -- normalise with the pretrained running
        statistics and keep them while scale, bias and weights train (the Keras
        fine-tuning advice; needs a model with `frozen_bn`).
      preprocess: images -> float images for train and eval steps
        (`jaxlearn.pretrained.imagenet_normalize` for ImageNet weights).
      augment: `(key, images) -> images` for training.
      batch_augment: `(key, batch) -> batch` after `preprocess`, e.g. `MixUp(0.4, C)`
        (`make_train_step`), in both phases.
      compute_dtype: e.g. `jnp.bfloat16` for mixed precision.
      label_smoothing: of the training loss (`make_train_step`).
      eval_data: evaluation loader, evaluated at each epoch's end.
      callbacks: `jaxlearn.loop` callbacks, given to both phases (one step count).
      progress: show progress bars.
      step: the step count to start from (>= 0): the phases run `freeze_epochs` and
        `epochs` epochs of steps from there.

    Returns:
      `(state, {'frozen': history, 'unfrozen': history})`, each phase's own records
      (the unfrozen phase's steps and epochs continue the frozen phase's). A callback
      that stops phase 1 (e.g. `StopAtMetric`) ends the run there: no 'unfrozen' entry.
    """
    if epochs < 1 or freeze_epochs < 0:
        raise ValueError(
            f"epochs must be >= 1 and freeze_epochs >= 0, got {epochs}, {freeze_epochs}"
        )
    if unfrozen_bn not in ("train", "eval"):
        raise ValueError(f"unfrozen_bn must be 'train' or 'eval', got {unfrozen_bn!r}")
    if unfrozen_bn == "eval" and not hasattr(model, "frozen_bn"):
        raise ValueError(
            f"unfrozen_bn='eval' needs a model with `frozen_bn`, got {type(model).__name__}"
        )
    if not base_lr > 0 or not lr_mult >= 1:
        raise ValueError(f"base_lr must be > 0 and lr_mult >= 1, got {base_lr}, {lr_mult}")
    split_at = default_split(model) if split_at is None else split_at
    num_groups = len(split_at) + 1
    callbacks = watch_stops(callbacks)  # a stop in phase 1 ends the run, not just the phase
    mesh = mesh_of(train_data)  # the steps run where the loader's batches are
    eval_step = None
    if eval_data is not None:
        eval_step = make_eval_step(preprocess=preprocess, compute_dtype=compute_dtype, mesh=mesh)

    # One train step for both phases: each phase's optimizer is its own program.
    train_step = make_train_step(
        label_smoothing=label_smoothing, preprocess=preprocess, augment=augment,
        batch_augment=batch_augment, compute_dtype=compute_dtype, mesh=mesh,
    )  # fmt: skip

    def phase(variables, n, until_step, schedule, factors, key, step):
        phase_model, tx = freeze_to(
            model,
            variables["params"],
            n,
            optimizer,
            schedule,
            lr_factors=factors,
            split_at=split_at,
            bn=bn,
            stats_frozen_to=num_groups - 1 if n == 0 and unfrozen_bn == "eval" else None,
        )
        return fit(
            make_state(phase_model, variables, tx, key, step=step),
            train_data,
            train_step=train_step,
            steps=until_step,
            eval_data=eval_data,
            eval_step=eval_step,
            callbacks=callbacks,
            progress=progress,
        )

    steps_per_epoch = len(train_data)
    histories = {}
    if freeze_epochs:
        schedule = one_cycle(base_lr, freeze_epochs * steps_per_epoch, pct_start=0.99)
        factors = (0.1,) * (num_groups - 1) + (1.0,)  # fastai's slice(base_lr)
        until = step + freeze_epochs * steps_per_epoch
        state, histories["frozen"] = phase(variables, -1, until, schedule, factors, key, step)
        if stop_requested(callbacks) or int(state.step) < until:
            return state, histories
        variables, key = state.variables, jax.random.fold_in(state.rng, 1)
        step = int(state.step)
    lr = base_lr / 2
    schedule = one_cycle(lr, epochs * steps_per_epoch, pct_start=pct_start, div=div)
    factors = discriminative_factors(lr / lr_mult, lr, num_groups)
    until = step + epochs * steps_per_epoch
    state, histories["unfrozen"] = phase(variables, 0, until, schedule, factors, key, step)
    return state, histories
