"""Pure train and eval steps: `(state, batch) -> (state, metrics)` and `(state, batch) -> metrics`.

Everything here is a function of its inputs: the step's dropout and
augmentation keys are `fold_in(state.rng, state.step)`, so the same state and
batch always give the same result, and a resumed run replays the same keys.
The steps come back jitted over the data mesh (batch split over devices,
state replicated) and compiled once per program: the state's model and
optimizer enter `jax.jit` by value (`jaxlearn.programs`), so every seed's,
phase's or `lr_find`'s new optimizer object of the same kind reuses the compiled
step. `jit=False` returns the plain function, e.g. to `jax.vmap` it over seeds.

The learning rate is not passed to the step: the optimizer says which one it
used. Build it with `optax.inject_hyperparams` (e.g.
`optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)`)
and the step reports the injected `learning_rate` of this update as `lr`; any
other optimizer runs the same but reports no `lr`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxlearn import programs
from jaxlearn.inference import (
    check_compute_dtype,
    default_preprocess,
    forward,
    forward_spec,
    with_compute_dtype,
)
from jaxlearn.parallel import batch_sharding, data_mesh, local_batch_size, replicated_sharding
from jaxlearn.state import TrainState, update_ema

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

__all__ = [
    "EvalStep",
    "TrainStep",
    "cross_entropy",
    "default_preprocess",
    "injected_learning_rate",
    "l2_penalty",
    "make_eval_step",
    "make_train_step",
]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against integer or soft labels, with label smoothing.

    Label smoothing (Szegedy et al. 2016, "Rethinking the Inception
    Architecture") mixes the target with the uniform distribution:
    `(1 - a) * target + a / num_classes`. Soft labels are probability rows, e.g.
    mixup's and cutmix's mixed targets (`jaxlearn.data.mix`); an integer label
    is its one-hot row.

    Args:
      logits: (N, C) float logits.
      labels: (N,) integer labels in [0, C), or (N, C) float rows summing to 1.
      label_smoothing: a in [0, 1).

    Returns:
      (N,) float32 losses.
    """
    if jnp.issubdtype(labels.dtype, jnp.integer):
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    elif labels.shape == logits.shape:
        targets = labels.astype(jnp.float32)
    else:
        raise ValueError(
            f"soft labels must have the logits' shape {logits.shape}, got {labels.shape}"
        )
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def l2_penalty(params: Any) -> jax.Array:
    """Half the sum of squares of every parameter: `0.5 * ||w||^2`."""
    return 0.5 * sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in jax.tree.leaves(params))


def injected_learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate of the update that produced `opt_state`, if the optimizer exposes it.

    `optax.inject_hyperparams` keeps the hyperparameters of the last update in its
    state; with several injected learning rates (a partitioned optimizer with
    per-group rates, as `jaxlearn.transfer.freeze_to` builds) the largest, the
    head's, is reported. None when no `learning_rate` is injected.
    """
    found = [
        jnp.asarray(s.hyperparams["learning_rate"], jnp.float32)
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))
        if hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams
    ]
    return jnp.max(jnp.stack(found)) if found else None


def _check_options(preprocess, augment, label_smoothing: float = 0.0, batch_augment=None) -> None:
    for name, fn in (
        ("preprocess", preprocess),
        ("augment", augment),
        ("batch_augment", batch_augment),
    ):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


#: How far a soft-label row's sum may stray from 1: float32 sums of up to ~1,000
#: classes round to ~1e-5, a row that is not a distribution misses by far more.
TARGET_TOLERANCE = 1e-3


def _weights_and_checks(batch: Batch, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Row weights (the mask, or ones) and the number of unmasked bad rows.

    A row is bad when its label is outside [0, num_classes) or its soft `target`
    (if any) is not a probability row: a negative entry or a sum off 1.
    """
    labels = batch["label"]
    mask = batch.get("mask")
    rows = batch["image"].shape[0] if "image" in batch else labels.shape[0]
    # (N, 1) labels would broadcast against (N, C) logits into an (N, N) loss: refuse.
    if labels.shape != (rows,) or (mask is not None and mask.shape != (rows,)):
        shapes = {k: tuple(batch[k].shape) for k in ("image", "label", "mask") if k in batch}
        raise ValueError(f"batch 'label' (and 'mask') must have shape ({rows},), got {shapes}")
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    bad = (labels < 0) | (labels >= num_classes)
    if "target" in batch:
        target = batch["target"].astype(jnp.float32)
        off = jnp.abs(jnp.sum(target, -1) - 1.0) > TARGET_TOLERANCE
        bad = bad | off | jnp.any(target < 0, -1)
    return weights, jnp.sum(bad & (weights > 0), dtype=jnp.int32)


def _dead() -> None:
    """A reference to nothing: no state returned yet, or another state came in."""


class _Compiled:
    """A pure function of a `TrainState` and a batch, jitted with the state's program static.

    The state enters `jax.jit` as its program keys (`programs.static_of`: the model
    and optimizer by value, the static argument), its arrays and its optimizer's
    constants; the caller's own model and optimizer objects are put back on a
    returned state. A state this object returned comes back with its keys cached
    (checked by identity), so a training loop pays no key lookup per step.
    """

    def __init__(self, fn: Callable, mesh: Mesh | None, *, donate: bool, returns_state: bool):
        self.fn, self.mesh = fn, mesh or data_mesh()
        self._returns_state = returns_state
        self._replicated = replicated = replicated_sharding(self.mesh)
        self._batch_sharding = batch_sharding(self.mesh)
        self._placed: dict[int, tuple] = {}
        # The last returned state, weakly (holding it would keep its buffers alive after the
        # caller drops it: a model's weights and optimizer state), with its keys and consts.
        self._last: tuple = (_dead, None, None)
        self._jitted = jax.jit(
            self._run,
            static_argnums=0,
            in_shardings=(replicated, replicated, self._batch_sharding),
            out_shardings=(replicated, replicated) if returns_state else replicated,
            donate_argnums=1 if donate else (),
        )

    def _run(self, static, fields, consts, batch):
        out = self.fn(programs.merge(static, fields, consts), batch)
        if self._returns_state:
            return programs.arrays(out[0]), out[1]
        return out

    def _args(self, state: TrainState, batch: Batch) -> tuple:
        last, static, consts = self._last
        last = last()
        if last is not None and all(
            getattr(state, f) is getattr(last, f) for f in ("params", "opt_state", "tx", "apply_fn")
        ):
            fields = programs.arrays(state)  # the state this step returned: placed, same keys
        else:
            static = programs.static_of(state)
            consts = self._place(programs.consts_of(state))
            fields = self._on_mesh(programs.arrays(state))
            self._last = (_dead, static, consts)
        return static, fields, consts, self._batch_on_mesh(batch)

    def _returned(self, new: TrainState) -> None:
        """Remember the state just returned: its next call skips the key lookup."""
        self._last = (weakref.ref(new), *self._last[1:])

    def _on_mesh(self, fields: tuple) -> tuple:
        """The state's arrays replicated on the mesh, as the step returns them.

        jit compiles a fresh (uncommitted) state and a placed one separately -- the
        same program twice -- so a fresh state is placed first; a placed state
        (checked on its step counter) passes through untouched.
        """
        if getattr(fields[0], "sharding", None) == self._replicated:
            return fields
        return jax.device_put(fields, self._replicated)

    def _batch_on_mesh(self, batch: Batch) -> Batch:
        """Host or unplaced batch arrays split over the mesh (the loader's batches already are).

        A batch that does not split evenly gets `local_batch_size`'s ValueError (how
        to pad it), not XLA's IndivisibleError.
        """
        placed = {}
        for k, v in batch.items():
            if getattr(v, "sharding", None) != self._batch_sharding:
                if jax.process_count() == 1:
                    local_batch_size(np.shape(v)[0], self.mesh)
                v = jax.device_put(v, self._batch_sharding)
            placed[k] = v
        return placed

    def _place(self, consts: tuple) -> tuple:
        """The optimizer's constants replicated on the mesh once, not transferred every step."""
        if not consts:
            return consts
        hit = self._placed.get(id(consts))
        if hit is None or hit[0] is not consts:
            if len(self._placed) > programs.CACHE_SIZE:
                self._placed.clear()
            hit = self._placed[id(consts)] = (
                consts,
                jax.device_put(consts, replicated_sharding(self.mesh)),
            )
        return hit[1]

    def trace(self, state: TrainState, batch: Batch):
        """Trace (not run) the step for `state` and `batch`; nothing is donated."""
        return self._jitted.trace(*self._args(state, batch))

    def lower(self, state: TrainState, batch: Batch):
        """The lowered program for `state` and `batch` (to inspect it, or `.compile()`)."""
        return self._jitted.lower(*self._args(state, batch))

    def cache_size(self) -> int:
        """How many programs this step has compiled (one per model, optimizer program, shapes)."""
        return self._jitted._cache_size()


class TrainStep(_Compiled):
    """The jitted train step `(state, batch) -> (state, metrics)` (see `make_train_step`).

    The incoming state's buffers are donated: use the returned state.
    """

    def __init__(self, fn: Callable, mesh: Mesh | None = None):
        super().__init__(fn, mesh, donate=True, returns_state=True)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One update on `batch`: `(new state, metrics)`; `state`'s buffers are donated."""
        fields, metrics = self._jitted(*self._args(state, batch))
        new = programs.with_arrays(fields, state)
        self._returned(new)
        return new, metrics


@programs.by_arguments
def make_train_step(
    *,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    batch_augment: Callable[[jax.Array, Batch], Batch] | None = None,
    compute_dtype: Any = None,
    sam_rho: float = 0.0,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build the training step: forward, cross-entropy, backward, one optimizer update.

    Weight decay is classic L2 regularization added to the loss,
    `weight_decay * 0.5 * ||w||^2` over every parameter, as in the ResNet paper
    (He et al. 2016, wd 1e-4) and `torch.optim.SGD(weight_decay=...)`, which is
    what Radek's runs used. For decoupled decay (AdamW, Loshchilov & Hutter
    2019) leave this at 0 and put `optax.add_decayed_weights` in the optimizer.
    The reported `loss` is the cross-entropy alone, comparable with eval loss.

    A state that carries an EMA of its weights (`jaxlearn.state.with_ema`) has it
    updated after the optimizer's step; a state without one pays nothing.

    Mixed precision (`compute_dtype=jnp.bfloat16`): the model runs with its
    `dtype` set to bf16, so every convolution and matmul takes bf16 operands
    (Flax casts the float32 parameters inside each layer); parameters, their
    gradients, optimizer state, BatchNorm statistics, logits and loss stay
    float32. float16 is refused (it needs loss scaling).

    Sharpness-aware minimization (`sam_rho > 0`; Foret et al. 2021, "Sharpness-Aware
    Minimization for Efficiently Improving Generalization"): the optimizer gets
    the gradient at `w + rho * g / ||g||`, the steepest point within `rho` of the
    weights to first order, instead of at `w`: it seeks weights whose whole
    neighbourhood has low loss, the flat minima `jaxlearn.flatness` measures. Each
    step costs two forward and backward passes over the same batch, with the same
    dropout key; the reported metrics and the BatchNorm statistics are those of
    the first pass at `w`.

    Args:
      label_smoothing: in [0, 1); 0 disables it.
      weight_decay: L2 coefficient (>= 0) added to the loss.
      augment: `(key, images) -> images` applied to the raw batch images before
        `preprocess`, with a key derived from `fold_in(state.rng, state.step)`.
      preprocess: `images -> float images` for the model; default uint8 -> [0, 1].
      batch_augment: `(key, batch) -> batch` applied to the preprocessed batch,
        e.g. `jaxlearn.data.mix.MixUp` / `CutMix`; it may add a `"target"` of
        (N, C) probability rows, which the loss then uses (smoothed by
        `label_smoothing`), while accuracy counts its `"label"`. Its key is split
        from the augment key, so steps without it keep their keys.
      compute_dtype: None/float32, or bfloat16 (needs a model with a `dtype`).
      sam_rho: SAM's neighbourhood radius (>= 0; 0 disables it; the paper's
        default is 0.05).
      mesh: data mesh (default `data_mesh()`): batch split over 'data', state replicated.
      jit: False returns the pure, unjitted function.

    A batch may also bring its own `"target"` rows (soft labels). Rows whose label
    is out of range or whose target is not a distribution count in `bad_labels`.

    Returns:
      `train_step(state, batch) -> (state, metrics)`, metrics being float32
      scalars `loss`, `accuracy`, `lr` (when the optimizer injects it, see the
      module docstring) and int32 `bad_labels` (rows with a label outside
      [0, num_classes) or a target that is not a distribution, which `fit` turns
      into an error). The jitted step (a `TrainStep`) donates
      the incoming state's buffers: do not use `state` after passing it in.
      Calls with the same arguments (functions compared by identity) return the
      same step, so its compiled programs serve every seed and phase.
    """
    _check_options(preprocess, augment, label_smoothing, batch_augment)
    compute_dtype = check_compute_dtype(compute_dtype)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not sam_rho >= 0.0:
        raise ValueError(f"sam_rho must be >= 0, got {sam_rho}")
    preprocess = preprocess or default_preprocess

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        if batch_augment is not None:
            aug_key, mix_key = jax.random.split(aug_key)
        images = batch["image"]
        if augment is not None:
            images = augment(aug_key, images)
        batch = {**batch, "image": preprocess(images)}
        if batch_augment is not None:
            batch = batch_augment(mix_key, batch)
        x, labels = batch["image"], batch["label"]
        apply_fn = with_compute_dtype(state.apply_fn, compute_dtype)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            logits, updates = apply_fn(
                variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
            )
            logits = logits.astype(jnp.float32)
            weights, bad = _weights_and_checks(batch, logits.shape[-1])
            per_example = cross_entropy(logits, batch.get("target", labels), label_smoothing)
            loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            total = loss + weight_decay * l2_penalty(params) if weight_decay else loss
            correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
            accuracy = correct / jnp.maximum(jnp.sum(weights), 1.0)
            aux = (loss, accuracy, bad, updates.get("batch_stats", {}))
            return total, aux

        grad_fn = jax.grad(loss_fn, has_aux=True)
        grads, (loss, accuracy, bad, batch_stats) = grad_fn(state.params)
        if sam_rho:
            # 1e-12 keeps a zero gradient (a dead network) from dividing by zero.
            scale = sam_rho / (optax.tree.norm(grads) + 1e-12)
            grads, _ = grad_fn(jax.tree.map(lambda p, g: p + scale * g, state.params, grads))
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # BatchNorm statistics are reduced in float32 even from bf16 activations; keep the dtype.
        batch_stats = jax.tree.map(
            lambda new, old: new.astype(old.dtype), batch_stats, state.batch_stats
        )
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        if state.ema is not None:  # the state's structure says: no EMA, no work
            variables = {"params": params, "batch_stats": batch_stats}
            new_state = new_state.replace(ema=update_ema(state.ema, variables))
        metrics = {"loss": loss, "accuracy": accuracy, "bad_labels": bad}
        lr = injected_learning_rate(opt_state)
        if lr is not None:
            metrics["lr"] = lr
        return new_state, metrics

    return TrainStep(train_step, mesh) if jit else train_step


class EvalStep(_Compiled):
    """The jitted eval step `(state, batch) -> metrics` (see `make_eval_step`).

    It reads only the state's model, parameters and BatchNorm statistics, so one
    compiled program serves every optimizer.
    """

    def __init__(self, fn: Callable, mesh: Mesh | None = None):
        super().__init__(fn, mesh, donate=False, returns_state=False)

    def _args(self, state: TrainState, batch: Batch) -> tuple:
        # Only what evaluation uses: no optimizer in the program key or the arguments.
        fields = (state.step, state.params, state.batch_stats, None, state.rng, None)
        static = (programs.model_key(state.apply_fn), None)
        return static, self._on_mesh(fields), (), self._batch_on_mesh(batch)

    def __call__(self, state: TrainState, batch: Batch) -> Metrics:
        """The summed metrics of `state`'s model on `batch` (see `make_eval_step`)."""
        return self._jitted(*self._args(state, batch))


@programs.by_arguments
def make_eval_step(
    *,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    compute_dtype: Any = None,
    with_logits: bool = False,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], Metrics]:
    """Build the evaluation step: inference-mode forward pass, summed metrics.

    The forward pass is `jaxlearn.inference.forward`, the one every inference
    path uses. Metrics are sums over the unmasked rows, so batches padded with
    `mask=False` rows count every real example exactly once; divide the totals
    (`loss_sum / count`, `correct / count`) after the last batch.

    Args:
      preprocess: `images -> float images`, the same as for training.
      compute_dtype: None/float32 or bfloat16 for the forward pass.
      with_logits: also return the (N, C) float32 `logits`.
      mesh: data mesh (default `data_mesh()`).
      jit: False returns the pure, unjitted function.

    Returns:
      `eval_step(state, batch) -> metrics` with float32 `loss_sum`, `correct`,
      `count`, int32 `bad_labels` (and `logits` if asked for).
    """
    _check_options(preprocess, None)
    compute_dtype = check_compute_dtype(compute_dtype)

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        spec, consts = forward_spec(
            state.apply_fn, batch["image"], preprocess=preprocess, compute_dtype=compute_dtype,
            by_value=False,
        )  # fmt: skip
        logits = forward(spec, state.variables, consts, batch["image"])
        labels = batch["label"]
        weights, bad = _weights_and_checks(batch, logits.shape[-1])
        metrics = {
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
            "count": jnp.sum(weights),
            "bad_labels": bad,
        }
        if with_logits:
            metrics["logits"] = logits
        return metrics

    return EvalStep(eval_step, mesh) if jit else eval_step
