"""`Learner`: fast.ai's five-line path, a thin convenience over the pure functions.

    dls = ImageDataLoaders.from_folder(path, valid_pct=0.2, size=224)
    learn = vision_learner(dls, "efficientnet_lite0")   # ImageNet weights, body frozen
    learn.fine_tune(2)
    probs, labels = learn.tta()
    learn.export("cats_dogs.jaxlearn")

A `Learner` holds a `TrainState` (`learn.state`: the pytree the pure functions take
and return), the history of its fits and the snapshots SGDR captured. Each method
calls the functional core -- `transfer.freeze_to` and `make_state` for the optimizer
and its frozen groups, the jitted `make_train_step` / `make_eval_step`, `loop.fit`,
`lr_finder.lr_find`, `transfer.fine_tune`, `ensemble.member_logits`, `Checkpointer`
-- and keeps what they return. Nothing here runs under `jit`, and anything it does can
be done by hand, bit for bit (tests/test_learner.py checks that).

Between fits `learn.state` holds the learner's optimizer (`opt` at `lr`, its frozen
groups as `freeze_to` builds them) with a fresh optimizer state. Each fit method
builds its own schedule's optimizer from the state's parameters, BatchNorm
statistics, key and step with `make_state`, as `fine_tune`'s phases do: every fit
starts its optimizer afresh (fastai keeps Adam's moments across fits; here a fit is
a pure function of the state), and the step count runs on through them all. So
`learn.state` can go to `lr_find` or `fit` by hand, and a saved learner resumes
exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import numbers
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn import loop, lr_finder, plots
from jaxlearn.checkpoint import Checkpointer
from jaxlearn.data.arrays import ImageArrays
from jaxlearn.data.augment import tta_views
from jaxlearn.data.images import decode_file, resize_array
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.data.stream import SourceImages, StreamLoader
from jaxlearn.ensemble import combine_logits, member_logits, snapshot_steps
from jaxlearn.inference import pad_rows
from jaxlearn.parallel import mesh_of
from jaxlearn.runs import json_config
from jaxlearn.schedules import one_cycle, sgdr
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step, make_train_step
from jaxlearn.transfer import (
    Optimizer,
    default_split,
    discriminative_factors,
    fastai_adam,
    fine_tune,
    freeze_to,
    make_state,
)

#: fastai's classification losses as the train step's label smoothing: plain
#: cross-entropy (`CrossEntropyLossFlat`) and `LabelSmoothingCrossEntropy` (eps 0.1).
LOSSES = {"cross_entropy": 0.0, "label_smoothing_cross_entropy": 0.1}
#: fastai's default learning rate (`defaults.lr`).
DEFAULT_LR = 1e-3
#: The format `export` writes; `load_learner` refuses others.
EXPORT_FORMAT = 1


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose most probable class is the label.

    Args:
      probs: (N, C) class probabilities (any scores do: only their argmax counts).
      labels: (N,) integer class labels.
    """
    return float(np.mean(np.argmax(probs, -1) == labels))


def error_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    """1 - accuracy (fastai's `error_rate`).

    Args:
      probs, labels: as in `accuracy`.
    """
    return 1.0 - accuracy(probs, labels)


#: Metrics by name: `(probs (N, C), labels (N,)) -> float`.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "error_rate": error_rate,
}

#: A learning rate: a number, or fastai's slice(lo, hi), spread geometrically from the
#: first layer group (lo) to the head (hi).
Rate = float | slice


class _EpochMetrics(loop.Callback):
    """Each epoch's validation metrics other than accuracy (which `fit` records), as
    `eval_<name>` in the history."""

    def __init__(self, learn: Learner, metrics: dict):
        self.learn, self.metrics = learn, metrics

    def on_epoch_end(self, step, state, history):
        probs, labels, _ = self.learn._predictions(None, state.apply_fn, [state.variables])
        for name, metric in self.metrics.items():
            history.setdefault(f"eval_{name}", []).append(metric(probs, labels))


class Learner:
    """A model, its data and its training state, with fastai's methods.

    Attributes:
      state: the `TrainState` (see the module docstring for what it holds between fits).
      history: the records of every fit, as one run (`loop.fit`'s keys; each fit
        continues the step count and the epochs).
      snapshots: parameters captured at the end of each SGDR cycle (`fit_sgdr`).
      dls: the `ImageDataLoaders` (None for a learner from `load_learner`).
      model, preprocess, classes, image_shape, resize: what inference needs.
      lr_found: the last `lr_find` result.
    """

    def __init__(
        self,
        dls,
        model: nn.Module,
        variables: Mapping | None = None,
        preprocess: Callable[[jax.Array], jax.Array] | None = None,
        *,
        metrics: Sequence[str | Callable] = ("accuracy",),
        opt: Optimizer = fastai_adam,
        loss: str = "cross_entropy",
        lr: float = DEFAULT_LR,
        seed: int = 0,
        split_at: Sequence[str] | None = None,
        bn: str = "train",
        batch_augment: Callable[[jax.Array, dict], dict] | None = None,
        compute_dtype: Any = None,
        path: str | os.PathLike = ".",
        callbacks: Sequence[loop.Callback] = (),
        progress: bool = True,
        classes: Sequence[str] | None = None,
        image_shape: Sequence[int] | None = None,
        resize: str = "crop",
    ):
        """Put a model, its variables and its data together.

        Args:
          dls: the `ImageDataLoaders` to train and validate on; None for inference
            only (then `variables`, `classes` and `image_shape` are needed).
          model: any Flax Linen module called as `model.apply(variables, x, train=bool)`.
          variables: its `{'params', 'batch_stats'}` (e.g. pretrained); None initialises
            them as `TrainState.create(model, tx, jax.random.key(seed), images[:1])` does.
          preprocess: `uint8 images -> float images`, for training and inference
            (default: [0, 1]); the one the weights were trained with when pretrained.
          metrics: names in `METRICS` or functions `(probs, labels) -> float`,
            reported by `validate` and, beyond accuracy, each epoch as `eval_<name>`.
          opt: `learning_rate -> optax.GradientTransformation` (default `fastai_adam`).
          loss: a key of `LOSSES` (cross-entropy, or with fastai's label smoothing 0.1).
          lr: the learning rate of `fit` and `fit_one_cycle` when none is given.
          seed: the PRNG seed of the initial parameters and of dropout / augmentation
            (the loaders' shuffle has its own, `dls.seed`).
          split_at: layer-group boundaries (`transfer.layer_groups`); default
            `transfer.default_split(model)`.
          bn: BatchNorm of frozen groups: 'train', 'stats' or 'eval' (`transfer`).
          batch_augment: `(key, batch) -> batch` on the device after `preprocess`, e.g.
            `MixUp(0.4, dls.c)` or `CutMix(1.0, dls.c)` (fastai's MixUp callback): the
            loss takes its soft targets, accuracy the labels (`make_train_step`).
          compute_dtype: e.g. `jnp.bfloat16` for mixed-precision training.
          path: `save` and `load` use PATH/models/NAME.
          callbacks: `loop.Callback`s given to every fit.
          progress: show `fit`'s progress bar.
          classes, image_shape, resize: what inference needs, taken from `dls` when given.

        Raises:
          ValueError: an unknown metric or loss, a model that is not a Flax module, a
            model (its `num_classes`) or `batch_augment` for another number of classes,
            or inference-only use without variables, classes or image_shape.
        """
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a flax.linen.Module, got {type(model).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        self.metrics = _metric_functions(metrics)
        self.model, self.preprocess = model, preprocess
        self.opt, self.loss, self.lr, self.seed = opt, loss, lr, seed
        self.split_at = tuple(default_split(model) if split_at is None else split_at)
        self.bn, self.compute_dtype, self.batch_augment = bn, compute_dtype, batch_augment
        self.path, self.callbacks, self.progress = Path(path), tuple(callbacks), progress
        if dls is None and (variables is None or classes is None or image_shape is None):
            raise ValueError(
                "a Learner without data (dls=None) needs variables, classes and image_shape"
            )
        if dls is None:
            self.classes, self.image_shape = tuple(classes), tuple(image_shape)
        else:  # the data's, set with it
            self.classes, self.image_shape = (), None
        self.resize = resize
        self.dls = dls  # the data's classes, image shape and resize; the train step
        outputs = getattr(model, "num_classes", len(self.classes))  # jaxlearn's models have it
        if outputs != len(self.classes):
            raise ValueError(
                f"the model's head has {outputs} outputs for {len(self.classes)} classes: "
                "e.g. get_model(arch, dls.c), or transfer.replace_head"
            )
        if getattr(batch_augment, "num_classes", len(self.classes)) != len(self.classes):
            raise ValueError(
                f"batch_augment makes targets of {batch_augment.num_classes} classes, the data "
                f"has {len(self.classes)}: e.g. MixUp(alpha, dls.c)"
            )
        self.history: dict[str, np.ndarray] = {}
        self.snapshots: list = []
        self.lr_found: lr_finder.LRFindResult | None = None
        self._frozen = 0
        key = jax.random.key(seed)
        if variables is None:
            # The initialisation does not depend on the optimizer: a stand-in one here.
            sample = np.zeros((1, *dls.image_shape), np.uint8)  # loaders serve uint8
            fresh = TrainState.create(model, optax.identity(), key, sample)
            variables, key = fresh.variables, fresh.rng
        self.state = self._resting(variables, key, 0)

    # ---------------------------------------------------------------------- the data

    @property
    def dls(self):
        """The `ImageDataLoaders` trained and validated on (None: inference only)."""
        return self._dls

    @dls.setter
    def dls(self, dls) -> None:
        """Train on other data from here on: fastai's `learn.dls = ...`.

        E.g. progressive resizing by hand: `learn.dls = ImageDataLoaders.from_folder(path,
        size=128, augment=...)` after fitting at 64 px (`progressive.fit_progressive` is
        the functional way). The image shape, the resize policy and the train step's
        augmentation become the new data's, so `fit` trains at their size and `predict`
        prepares images for it. Fits count epochs from the step count (`loop.fit`), so
        when the new data has other steps per epoch than divide the steps run so far,
        the count moves on to the next multiple of them: the next fit starts at an
        epoch's first batch (the history's steps jump there).

        Args:
          dls: the new `ImageDataLoaders`, of the learner's classes; None leaves the
            learner without data (inference only; its classes, image shape and resize stay).

        Raises:
          ValueError: data of other classes than the learner's (its head's).
        """
        if dls is not None:
            if self.classes and tuple(dls.classes) != self.classes:
                raise ValueError(
                    f"the new data's classes {list(dls.classes)} are not the learner's "
                    f"{list(self.classes)}: its head predicts those"
                )
            self.classes, self.image_shape = tuple(dls.classes), tuple(dls.image_shape)
            self.resize = dls.resize
        self._dls = dls
        if dls is not None and hasattr(self, "state") and self._step % len(dls.train):
            per_epoch = len(dls.train)
            aligned = -(-self._step // per_epoch) * per_epoch
            self.state = self._resting(self.state.variables, self.state.rng, aligned)
        # The loaders' devices: the steps and predictions run where the batches are.
        self.train_step = make_train_step(
            label_smoothing=LOSSES[self.loss], preprocess=self.preprocess,
            augment=dls.augment if dls is not None else None, batch_augment=self.batch_augment,
            compute_dtype=self.compute_dtype, mesh=self._mesh,
        )  # fmt: skip
        self.eval_step = make_eval_step(
            preprocess=self.preprocess, compute_dtype=self.compute_dtype, mesh=self._mesh
        )

    @property
    def _mesh(self):
        """The devices the data's batches are split over (`parallel.mesh_of`)."""
        return mesh_of(self.dls.train) if self.dls is not None else None

    # ---------------------------------------------------------------- the frozen groups

    def _resting(self, variables: Mapping, rng: jax.Array, step: int) -> TrainState:
        """The state between fits: the learner's optimizer at `lr`, fresh, for its frozen set."""
        model, tx = freeze_to(
            self.model, variables["params"], self._frozen, self.opt, self.lr,
            split_at=self.split_at, bn=self.bn,
        )  # fmt: skip
        return make_state(model, variables, tx, rng, step=step)

    def freeze_to(self, n: int) -> None:
        """Train only the layer groups from `n` on (negative counts from the end; fastai's).

        The frozen parameters get no update and keep no optimizer state
        (`transfer.freeze_to`); `learn.state` gets the new optimizer, freshly initialised.

        Args:
          n: number of leading layer groups to freeze: 0 none, -1 all but the head
            (negative counts from the end); kept as `learn.frozen`.

        Raises:
          ValueError: `n` outside [-G, G] for the G layer groups (`len(split_at) + 1`);
            the learner is left as it was.
        """
        previous, self._frozen = self._frozen, n
        try:
            self.state = self._resting(self.state.variables, self.state.rng, self._step)
        except ValueError:
            self._frozen = previous
            raise

    def freeze(self) -> None:
        """Train the head only (`freeze_to(-1)`), as after `vision_learner` with weights."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every layer group (`freeze_to(0)`)."""
        self.freeze_to(0)

    @property
    def frozen(self) -> int:
        """The `n` of the last `freeze_to` (0: nothing frozen)."""
        return self._frozen

    @property
    def _step(self) -> int:
        return int(self.state.step)

    # ---------------------------------------------------------------------- training

    def _need_data(self) -> None:
        if self.dls is None:
            raise ValueError(
                "this Learner has no data (dls=None, e.g. from load_learner): it can predict, "
                "not train or validate; build one with ImageDataLoaders and vision_learner"
            )

    def _rates(self, lr: Rate | None) -> tuple[float, tuple[float, ...] | None]:
        """(the head's rate, per-group factors): a number, or fastai's slice(lo, hi)."""
        lr = self.lr if lr is None else lr
        if isinstance(lr, slice):
            if lr.start is None or lr.stop is None or lr.step is not None:
                raise ValueError(
                    f"lr as a slice must be slice(lo, hi): lo for the first layer group, hi for "
                    f"the head, geometric in between; got {lr}"
                )
            groups = len(self.split_at) + 1
            return float(lr.stop), discriminative_factors(lr.start, lr.stop, groups)
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (or slice(lo, hi)), got {lr}")
        return float(lr), None

    def _callbacks(self, callbacks: Sequence[loop.Callback]) -> list[loop.Callback]:
        extra = {k: f for k, f in self.metrics.items() if k != "accuracy"}
        metrics = [_EpochMetrics(self, extra)] if extra else []
        return [*self.callbacks, *callbacks, *metrics]

    def _fit(
        self,
        schedule: Callable[[float], optax.ScalarOrSchedule],
        num_steps: int,
        lr: Rate | None,
        *,
        capture_at: Sequence[int] = (),
        callbacks: Sequence[loop.Callback],
        checkpoint: str | os.PathLike | None,
        config: dict,
    ) -> None:
        """`num_steps` steps of `loop.fit` under `schedule(peak)`; keep what it returns."""
        self._need_data()
        peak, factors = self._rates(lr)
        start = self._step
        model, tx = freeze_to(
            self.model, self.state.params, self._frozen, self.opt, schedule(peak),
            lr_factors=factors, split_at=self.split_at, bn=self.bn,
        )  # fmt: skip
        state = make_state(model, self.state.variables, tx, self.state.rng, step=start)
        capture = loop.CaptureParams([start + s for s in capture_at]) if capture_at else None
        callbacks = self._callbacks(callbacks) + ([capture] if capture else [])
        history = self.history  # the whole run's: `fit` continues it, as when resuming
        if checkpoint is not None:
            checkpointer = Checkpointer(checkpoint)
            lrs = [lr.start, lr.stop] if isinstance(lr, slice) else lr
            run = {**config, "lr": lrs, "frozen": self._frozen, "start_step": start}
            callbacks.append(loop.Checkpoint(checkpointer, every_epochs=1, capture=capture,
                                             config=run))  # fmt: skip
            if checkpointer.latest_step() is not None:
                if checkpointer.config() != json_config(run):
                    raise ValueError(
                        f"{checkpointer.directory} holds checkpoints of another run "
                        f"({checkpointer.config()}), not of {run}: give this run an empty "
                        "directory"
                    )
                restored = checkpointer.restore(state)  # resume the interrupted run
                state, history = restored["state"], restored["history"]
                if capture:
                    capture.snapshots = restored["snapshots"]
        # Without a checkpoint, an interrupted fit keeps its finished epochs; with one, the
        # learner stays where the fit began, so that the same call resumes from the disk.
        kept = _LastEpoch() if checkpoint is None else None
        try:
            state, history = loop.fit(
                state, self.dls.train, train_step=self.train_step, steps=start + num_steps,
                eval_data=self.dls.valid, eval_step=self.eval_step,
                callbacks=callbacks + ([kept] if kept else []), history=history,
                progress=self.progress,
            )  # fmt: skip
        except BaseException:
            if kept is not None and kept.step is not None:
                done = sum(s <= kept.step for s in capture.at_steps) if capture else 0
                snapshots = capture.snapshots[:done] if capture else []
                self._keep(kept.variables, kept.rng, kept.step, kept.histories[-1], snapshots)
            raise
        self._keep(state.variables, state.rng, int(state.step), history,
                   capture.snapshots if capture else [])  # fmt: skip

    def _keep(
        self, variables: Mapping, rng: jax.Array, step: int, history: dict, snapshots: list
    ) -> None:
        """Take a fit's weights (resting again), the run's history and new snapshots."""
        self.history = {k: np.asarray(v) for k, v in history.items()}
        self.snapshots += snapshots
        self.state = self._resting(variables, rng, step)

    def fit(
        self,
        n_epoch: int,
        lr: Rate | None = None,
        *,
        callbacks: Sequence[loop.Callback] = (),
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        """Train `n_epoch` epochs at a constant learning rate (fastai's `fit`).

        The records go to `learn.history`, which `loop.fit` continues as one run. A fit
        that does not finish (Ctrl-C, `NonFiniteLossError`) leaves the learner at its
        last finished epoch (weights, history, snapshots) -- or, with `checkpoint`,
        where the fit began, so that the same call resumes from the newest checkpoint.
        The same holds for `fit_one_cycle`, `fit_sgdr` and `fine_tune` (no checkpoint).

        Args:
          n_epoch: epochs to train (>= 1).
          lr: the rate (default the learner's `lr`), or slice(lo, hi) for rates spread
            geometrically from the first layer group to the head.
          callbacks: `loop.Callback`s for this fit (after the learner's own).
          checkpoint: a directory: checkpoint each epoch's end (state, history,
            snapshots); when it holds this fit's checkpoints already, resume from the
            newest, exactly (the learner must be where it was when the fit began).
        """
        steps = self._epochs_to_steps(n_epoch)
        self._fit(
            lambda peak: peak, steps, lr, callbacks=callbacks, checkpoint=checkpoint,
            config={"method": "fit", "n_epoch": n_epoch},
        )  # fmt: skip

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max: Rate | None = None,
        *,
        pct_start: float = 0.25,
        div: float = 25.0,
        final_div: float = 1e5,
        callbacks: Sequence[loop.Callback] = (),
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        """Train `n_epoch` epochs under the 1cycle schedule (`schedules.one_cycle`, fastai's).

        Args:
          n_epoch: epochs (>= 1).
          lr_max: the peak rate (default the learner's `lr`) or slice(lo, hi).
          pct_start, div, final_div: as `schedules.one_cycle` (fastai's defaults).
          callbacks, checkpoint: as in `fit`.
        """
        steps = self._epochs_to_steps(n_epoch)
        self._fit(
            lambda peak: one_cycle(peak, steps, pct_start=pct_start, div=div, final_div=final_div),
            steps, lr_max, callbacks=callbacks, checkpoint=checkpoint,
            config={"method": "fit_one_cycle", "n_epoch": n_epoch, "pct_start": pct_start,
                    "div": div, "final_div": final_div},
        )  # fmt: skip

    def fit_sgdr(
        self,
        n_cycles: int,
        cycle_len: int = 1,
        cycle_mult: int = 1,
        lr_max: Rate | None = None,
        *,
        callbacks: Sequence[loop.Callback] = (),
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        """SGDR (`schedules.sgdr`) for `n_cycles` cycles, a snapshot at the bottom of each.

        fastai 0.7's `fit(lr, n_cycles, cycle_len, cycle_mult)`: cycle i lasts
        `cycle_len * cycle_mult**i` epochs; the schedule says where its cycles end
        (`ensemble.snapshot_steps`), and the parameters there go to `learn.snapshots`
        (for `get_preds(ensemble=True)`, Huang et al.'s snapshot ensemble).

        Args:
          n_cycles: number of cycles (>= 1).
          cycle_len: epochs of the first cycle (>= 1).
          cycle_mult: growth of the cycle length (>= 1).
          lr_max: the peak rate of every cycle (default the learner's `lr`) or slice(lo, hi).
          callbacks, checkpoint: as in `fit`.
        """
        self._need_data()
        cycle_steps = self._epochs_to_steps(cycle_len)
        make = lambda peak: sgdr(peak, cycle_steps, cycle_mult, num_cycles=n_cycles)
        at = snapshot_steps(make(1.0))  # the cycle ends do not depend on the peak
        self._fit(
            make, at[-1], lr_max, capture_at=at, callbacks=callbacks, checkpoint=checkpoint,
            config={"method": "fit_sgdr", "n_cycles": n_cycles, "cycle_len": cycle_len,
                    "cycle_mult": cycle_mult},
        )  # fmt: skip

    def fine_tune(
        self,
        epochs: int,
        base_lr: float = 2e-3,
        freeze_epochs: int = 1,
        *,
        lr_mult: float = 100.0,
        pct_start: float = 0.3,
        div: float = 5.0,
        unfrozen_bn: str = "train",
        callbacks: Sequence[loop.Callback] = (),
    ) -> None:
        """fastai's `fine_tune`: the head alone, then every layer (`transfer.fine_tune`).

        `freeze_epochs` of one-cycle with the body frozen, then `epochs` unfrozen with
        discriminative rates; the learner ends unfrozen, the records in `learn.history`.
        There is no `checkpoint` argument (each phase would need its own resume point):
        a run that checkpoints and resumes is `freeze()`, `fit_one_cycle(...,
        checkpoint=)`, `unfreeze()`, `fit_one_cycle(..., slice(lo, hi), checkpoint=)`.

        Args:
          epochs: epochs with every layer training (>= 1).
          base_lr, freeze_epochs, lr_mult, pct_start, div: as `transfer.fine_tune`
            (fastai's defaults).
          unfrozen_bn: 'eval' keeps the body's BatchNorm statistics while everything
            trains (`transfer.fine_tune`); the learner's `bn` applies to phase 1.
          callbacks: `loop.Callback`s for both phases (after the learner's own).
        """
        self._need_data()
        start, kept = self._step, _LastEpoch()
        try:
            state, histories = fine_tune(
                self.model, self.state.variables, self.dls.train, epochs=epochs,
                key=self.state.rng, base_lr=base_lr, freeze_epochs=freeze_epochs,
                lr_mult=lr_mult, pct_start=pct_start, div=div, optimizer=self.opt,
                split_at=self.split_at, bn=self.bn, unfrozen_bn=unfrozen_bn,
                preprocess=self.preprocess, augment=self.dls.augment,
                batch_augment=self.batch_augment, compute_dtype=self.compute_dtype,
                label_smoothing=LOSSES[self.loss], eval_data=self.dls.valid,
                callbacks=[*self._callbacks(callbacks), kept], progress=self.progress,
                step=start,
            )  # fmt: skip
        except BaseException:  # keep the finished epochs, in the phase they ended in
            if kept.step is not None:
                unfrozen = kept.step > start + freeze_epochs * len(self.dls.train)
                self._frozen = 0 if unfrozen or not freeze_epochs else -1
                history = self.history
                for phase_history in kept.histories:
                    history = _concatenated(history, phase_history)
                self._keep(kept.variables, kept.rng, kept.step, history, [])
            raise
        self._frozen = 0
        history = self.history
        for phase in ("frozen", "unfrozen"):
            history = _concatenated(history, histories.get(phase, {}))
        self._keep(state.variables, state.rng, int(state.step), history, [])

    def _epochs_to_steps(self, n_epoch: int) -> int:
        self._need_data()
        if isinstance(n_epoch, bool) or not isinstance(n_epoch, numbers.Integral) or n_epoch < 1:
            raise ValueError(f"the number of epochs must be a positive int, got {n_epoch!r}")
        return int(n_epoch) * len(self.dls.train)

    def lr_find(
        self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100
    ) -> lr_finder.LRFindResult:
        """The LR range test with the learner's optimizer and frozen groups (`lr_finder.lr_find`).

        `learn.state` is not changed. The result is kept as `learn.lr_found`;
        `plot_lr_find()` draws it. Arguments as `lr_finder.lr_find` (fastai's defaults).

        Args:
          start_lr: the sweep's first learning rate (> 0).
          end_lr: its last (> `start_lr`); the rates grow exponentially in between.
          num_steps: training steps of the sweep (>= 2); it stops early once the
            smoothed loss diverges.

        Returns:
          The `lr_finder.LRFindResult` (rates, losses, suggestions), also kept as
          `learn.lr_found`.

        Raises:
          ValueError: a learner without data (`dls=None`), or bad sweep arguments.
        """
        self._need_data()
        self.lr_found = lr_finder.lr_find(
            self.state, self.train_step, self.dls.train, start_lr=start_lr, end_lr=end_lr,
            num_steps=num_steps,
        )  # fmt: skip
        return self.lr_found

    def plot_lr_find(self, path: str | os.PathLike | None = None):
        """The last `lr_find`'s curve and suggestions (`plots.plot_lr_find`).

        Args:
          path: also save the figure as a PNG here (optional).

        Returns:
          The matplotlib Figure.

        Raises:
          ValueError: no `lr_find` has run yet.
        """
        if self.lr_found is None:
            raise ValueError("no LR range test to plot: call lr_find() first")
        return plots.plot_lr_find(self.lr_found, path=path)

    def plot_losses(self, path: str | os.PathLike | None = None):
        """Loss, accuracy and learning rate of every fit so far (`plots.plot_history`).

        Args:
          path: also save the figure as a PNG here (optional).

        Returns:
          The matplotlib Figure (three panels against the step).

        Raises:
          ValueError: nothing trained yet (an empty `learn.history`).
        """
        if not self.history:
            raise ValueError("no history to plot: train first")
        return plots.plot_history(self.history, path=path)

    # ---------------------------------------------------------------------- inference

    def validate(self) -> dict[str, float]:
        """Loss and metrics on the validation set (`loop.evaluate`, then `metrics`)."""
        self._need_data()
        result = loop.evaluate(self.state, self.dls.valid, self.eval_step)
        extra = {k: f for k, f in self.metrics.items() if k != "accuracy"}
        if extra:
            probs, labels = self.get_preds()
            result.update({k: f(probs, labels) for k, f in extra.items()})
        if "accuracy" not in self.metrics:
            del result["accuracy"]
        return result

    def _images_of(self, data) -> tuple[Any, np.ndarray | None]:
        """(images, labels or None) of the validation set, `ImageArrays`, a loader or images.

        A streamed set's images stay on disk: its `StreamLoader` stands for them.
        """
        if data is None:
            self._need_data()
            data = self.dls.valid if self.dls.streamed else self.dls.valid_ds
        if isinstance(data, ImageArrays | ArrayLoader):
            return data.images, data.labels
        if isinstance(data, StreamLoader):
            if data.train:
                raise ValueError(
                    "predictions need an evaluation loader (train=False: every image once, "
                    "in order), got a training StreamLoader"
                )
            return data, None  # labels come with the batches
        return data, None

    def _predictions(
        self, dl_or_images, apply_fn, members, *, with_tta: bool = False, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """(probs averaged over `members`, labels, images); a streamed set's as `SourceImages`."""
        images, labels = self._images_of(dl_or_images)
        probabilities = functools.partial(
            _probabilities, apply_fn, members, preprocess=self.preprocess,
            views_fn=tta_views if with_tta else None, batch_size=batch_size,
            compute_dtype=self.compute_dtype, mesh=self._mesh,
        )  # fmt: skip
        if not isinstance(images, StreamLoader):
            return probabilities(images), labels, images
        if jax.process_count() > 1:
            raise ValueError("predictions over a streamed set run in one process")
        probs, labels, kept = [], [], []
        for x, y, index, rows in _readable_chunks(images, batch_size):
            probs.append(probabilities(x)[:rows])
            labels.append(y)
            kept.append(index)
        if not kept:
            raise ValueError(
                f"no readable image in the streamed set ({len(images.skipped)} skipped)"
            )
        kept = np.concatenate(kept)
        on_disk = SourceImages(images.source, kept, images.size, images.resize)
        return np.concatenate(probs), np.concatenate(labels), on_disk

    def get_preds(
        self,
        dl_or_images=None,
        with_tta: bool = False,
        ensemble: bool = False,
        batch_size: int = 256,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities of every image (fastai's `get_preds`).

        Args:
          dl_or_images: None (the validation set), an `ImageArrays`, an `ArrayLoader`,
            an evaluation `StreamLoader` (its readable images, in order), or
            (N, H, W, C) images as the loaders hold them.
          with_tta: average over test-time views (`data.augment.tta_views`: the image
            and its mirror), fastai's TTA.
          ensemble: average over `learn.snapshots` (from `fit_sgdr`) instead of the
            current parameters.
          batch_size: images per forward pass.

        Returns:
          `(probs (N, C), labels (N,) or None when images were given alone)`.
        """
        probs, labels, _ = self._predictions(
            dl_or_images, self.state.apply_fn, self._members(ensemble), with_tta=with_tta,
            batch_size=batch_size,
        )  # fmt: skip
        return probs, labels

    def _members(self, ensemble: bool) -> list:
        """The variables predictions average over: the snapshots, or the current ones."""
        if ensemble and not self.snapshots:
            raise ValueError("ensemble=True needs snapshots: fit_sgdr captures one per cycle")
        return self.snapshots if ensemble else [self.state.variables]

    def tta(self, dl_or_images=None, ensemble: bool = False):
        """`get_preds(..., with_tta=True)`: probabilities averaged over the image and its mirror.

        Args:
          dl_or_images: the images, as in `get_preds` (None: the validation set).
          ensemble: average over `learn.snapshots` as well, as in `get_preds`.

        Returns:
          `(probs (N, C), labels (N,) or None)`, as `get_preds`.
        """
        return self.get_preds(dl_or_images, with_tta=True, ensemble=ensemble)

    def predict(self, item) -> tuple[str, int, np.ndarray]:
        """The class of one image: a file path, or an (H, W, C) uint8 array of any size.

        The image is prepared as the training images were (`resize` to the learner's
        size; files decoded as `load_image_folder` decodes them).

        Args:
          item: an image file's path (str or `os.PathLike`), or an (H, W, C) uint8 array
            with the learner's channels (see above).

        Returns:
          `(class name, class index, probabilities (C,))`.

        Raises:
          FileNotFoundError: no such file.
          ValueError: a file that is not a readable image, or an array of the wrong shape.
        """
        image = self._prepared(item)
        probs = self.get_preds(image[None])[0][0]
        index = int(np.argmax(probs))
        return self.classes[index], index, probs

    def _prepared(self, item) -> np.ndarray:
        """One image at the learner's shape: decoded from a file, or resized from an array."""
        height, width, channels = self.image_shape
        if isinstance(item, str | os.PathLike):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"no image file at {item}")
            if height != width or channels != 3:
                raise ValueError(
                    f"files decode to square RGB images, this learner takes {self.image_shape}: "
                    "pass the image as an array"
                )
            image = decode_file(os.fspath(item), height, self.resize)
            if isinstance(image, str):
                raise ValueError(f"{item} cannot be read as an image: {image}")
            return image
        image = np.asarray(item)
        if image.shape == self.image_shape and image.dtype == np.uint8:
            return image  # float pixels would pass `preprocess` unscaled: refused below
        if image.ndim == 3 and image.dtype == np.uint8 and image.shape[-1] == channels:
            if height == width:
                return resize_array(image, height, self.resize)
        raise ValueError(
            f"the image must be a file or an (H, W, {channels}) uint8 array (resized to "
            f"{self.image_shape}), got {image.dtype} {image.shape}"
        )

    # ------------------------------------------------------------------ save and export

    def save(self, name: str) -> Path:
        """Write state, history and snapshots to PATH/models/NAME with Orbax (fastai's `save`).

        An earlier save of that name is replaced once the new one is complete.

        Args:
          name: the save's name: the directory PATH/models/NAME, PATH the learner's `path`.

        Returns:
          The directory written.
        """
        directory = self.path / "models" / name
        staging = directory.with_name(f".{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        checkpointer = Checkpointer(staging, max_to_keep=1)
        checkpointer.save(
            self.state, history=self.history, snapshots=self.snapshots,
            config={"frozen": self._frozen},
        )  # fmt: skip
        checkpointer.close()
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
        return directory

    def load(self, name: str) -> None:
        """Read what `save(name)` wrote: state, frozen groups, history and snapshots, exactly.

        Training on from here gives the same result, bit for bit, as the learner that
        saved it training on.

        Args:
          name: the name given to `save` (reads PATH/models/NAME).

        Raises:
          FileNotFoundError: no save of that name.
          ValueError: a save of another model (the mismatched keys are named).
        """
        directory = self.path / "models" / name
        if not directory.is_dir():
            raise FileNotFoundError(f"no saved learner {name!r} at {directory}")
        checkpointer = Checkpointer(directory, max_to_keep=None)
        self.freeze_to(checkpointer.config()["frozen"])
        restored = checkpointer.restore(self.state)
        checkpointer.close()
        self.state = restored["state"]
        self.history, self.snapshots = restored["history"], restored["snapshots"]

    def export(self, path: str | os.PathLike = "export.jaxlearn") -> Path:
        """One file for inference elsewhere: weights, architecture, classes, preprocessing, size.

        `load_learner(path)` rebuilds a learner that predicts without the training
        data. The architecture is stored as the module's class (imported by name) and
        its fields, the preprocessing as an importable function, so neither may be
        defined in `__main__` or inside a function, and `preprocess` may not be a
        lambda (use a module-level function or a `functools.partial` of one).

        Args:
          path: the file to write (default 'export.jaxlearn'; missing parent folders are
            created).

        Returns:
          The file written (Flax msgpack, no pickle).

        Raises:
          ValueError: the model or the preprocessing cannot be exported (the message
            names what and why).
        """
        from jaxlearn.pretrained import save_variables

        meta = {
            "format": EXPORT_FORMAT,
            "model": _encode(self.model, "the model"),
            "preprocess": _encode(self.preprocess, "preprocess"),
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "resize": self.resize,
            # bf16-trained weights predict as they were validated (None: float32).
            "compute_dtype": None if self.compute_dtype is None else
            jnp.dtype(self.compute_dtype).name,
        }  # fmt: skip
        text = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        return save_variables(path, {"learner": text, "variables": self.state.variables})


def _metric_functions(metrics: Sequence[str | Callable]) -> dict[str, Callable]:
    """Metric name -> function, from names in `METRICS` and functions (named by `__name__`)."""
    if isinstance(metrics, str) or callable(metrics):
        metrics = (metrics,)
    out = {}
    for m in metrics:
        if isinstance(m, str) and m in METRICS:
            out[m] = METRICS[m]
        elif callable(m):
            name = getattr(m, "__name__", type(m).__name__)
            if name in out:  # e.g. two functools.partial objects: one would replace the other
                raise ValueError(
                    f"two metrics are named {name!r}: give each function its own __name__"
                )
            out[name] = m
        else:
            raise ValueError(f"metrics must be names in {sorted(METRICS)} or functions, got {m!r}")
    return out


def _probabilities(apply_fn, members, images, **options):
    """(N, C) probabilities averaged over members and views (`ensemble.member_logits`)."""
    logits = member_logits(apply_fn, members, images, **options)
    return combine_logits(logits.reshape(-1, *logits.shape[2:]))


def _readable_chunks(loader: StreamLoader, size: int):
    """A streamed evaluation set's readable images, `size` at a time, in order.

    Yields `(images, labels, indices, rows)`. The chunks are those `apply_batched` cuts
    from the same images held in memory: `size` rows each, the last padded with zero
    rows to `size` (`rows` real ones) unless it is the only chunk. The same programs
    then run on the same rows, so streamed predictions equal in-memory ones bit for bit
    (a loader's batch of 4 and a chunk of 5 compile to matmuls that round differently
    on some CPUs), and the loader's batch size does not set the forward's.
    """
    held = [[], [], []]  # images, labels, indices not yet yielded
    count, first = 0, True
    for step, batch in enumerate(loader):  # evaluation order: examples 0, 1, ...
        mask = np.asarray(batch["mask"])  # False: padding, or a file that cannot be read
        held[0].append(np.asarray(batch["image"])[mask])
        held[1].append(np.asarray(batch["label"])[mask])
        held[2].append(step * loader.batch_size + np.flatnonzero(mask))
        count += int(mask.sum())
        while count >= size:
            x, y, index = (np.concatenate(parts) for parts in held)
            yield x[:size], y[:size], index[:size], size
            held = [[x[size:]], [y[size:]], [index[size:]]]
            count, first = count - size, False
    if count:
        x, y, index = (np.concatenate(parts) for parts in held)
        yield (x if first else pad_rows(x, size)), y, index, count


def _concatenated(old: dict, new: dict) -> dict[str, np.ndarray]:
    """Histories one after the other (their steps and epochs already run on).

    'time' (seconds since the run's start) of `new` counts on from `old`'s last.
    """
    out = dict(old)
    for k, v in new.items():
        v = np.asarray(v)
        if k == "time" and len(old.get(k, ())):
            v = v + old[k][-1]
        out[k] = np.concatenate([old[k], v]) if k in old else v
    return out


class _LastEpoch(loop.Callback):
    """The weights and history of the last finished epoch, for a fit that does not finish.

    The next step donates the state's buffers, so the weights are copied (on the
    device: once an epoch, the size of the model). `histories` holds one entry
    per `loop.fit` call (`fine_tune`'s two phases), the last of them as it was at
    that epoch's end.
    """

    def __init__(self):
        self.variables, self.rng, self.step = None, None, None
        self.histories: list[dict] = []

    def on_train_begin(self, step, state, history):
        self.histories.append({})

    def on_epoch_end(self, step, state, history):
        self.variables = jax.tree.map(lambda x: x.copy(), state.variables)
        self.rng, self.step = state.rng.copy(), int(step)
        self.histories[-1] = loop.history_arrays(history)  # as `loop.fit` returns it


def vision_learner(
    dls,
    arch: str,
    *,
    pretrained: bool = True,
    seed: int = 0,
    model_kwargs: Mapping | None = None,
    **learner_kwargs,
) -> Learner:
    """A `Learner` for a registry architecture, from ImageNet weights when it has them.

    fastai's `vision_learner(dls, resnet34)`: with `pretrained` and a name of
    `pretrained.WEIGHTS` (EfficientNet-Lite0/1/2 installed locally, torchvision's ResNets
    by download), the weights are loaded with a fresh head of `dls.c` classes and the
    preprocessing they were trained with, and the body is frozen (`freeze()`), as
    fastai does; an architecture without weights (e.g. 'cnn_small') trains from
    scratch, with a warning when `pretrained` asked for weights.

    Args:
      dls: the `ImageDataLoaders`.
      arch: a name of `models.MODELS` or `pretrained.WEIGHTS`, e.g. 'efficientnet_lite0',
        'resnet34', 'cnn_small'.
      pretrained: start from the named ImageNet weights.
      seed: as in `Learner` (also the seed of the new head).
      model_kwargs: further model attributes (e.g. `{'dropout': 0.1}`).
      **learner_kwargs: `Learner`'s keyword arguments (metrics, opt, loss, lr, ...).

    Raises:
      ValueError: an unknown `arch`.
      FileNotFoundError: weights named but not available (not installed, or no network
        for a download); the message says how to get them, or to pass pretrained=False.
    """
    from jaxlearn import pretrained as weights
    from jaxlearn.models import MODELS, get_model

    known = sorted(set(MODELS) | set(weights.WEIGHTS))
    if not isinstance(arch, str) or arch not in known:
        raise ValueError(f"arch must be one of {known}, got {arch!r}")
    model_kwargs = dict(model_kwargs or {})
    if pretrained and arch in weights.WEIGHTS:
        try:
            net = weights.load(arch, dls.c, key=jax.random.key(seed))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"vision_learner: the pretrained {arch} weights are not available: {err}; "
                f"or pass pretrained=False to train {arch} from scratch"
            ) from err
        model = net.model.clone(**model_kwargs) if model_kwargs else net.model
        learn = Learner(dls, model, net.variables, net.preprocess, seed=seed, **learner_kwargs)
        learn.freeze()
        return learn
    if pretrained:
        warnings.warn(
            f"no pretrained weights for {arch!r} (named weights: {sorted(weights.WEIGHTS)}): "
            "training it from scratch",
            stacklevel=2,
        )
    model = get_model(weights.WEIGHTS[arch].arch if arch not in MODELS else arch, dls.c,
                      **model_kwargs)  # fmt: skip
    return Learner(dls, model, seed=seed, **learner_kwargs)


def load_learner(path: str | os.PathLike, **learner_kwargs) -> Learner:
    """The learner `export` wrote, for inference: `predict`, `get_preds`, `tta`.

    It needs none of the training data; its modules (the model's class, the
    preprocessing) are imported by name.

    Args:
      path: the exported file.
      **learner_kwargs: further `Learner` arguments (e.g. `path` for `save`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a file `export` wrote, or a format this version cannot read.
    """
    from jaxlearn.pretrained import load_variables

    stored = load_variables(path)
    if set(stored) != {"learner", "variables"}:
        raise ValueError(f"{path} is not a learner written by Learner.export")
    meta = json.loads(bytes(np.asarray(stored["learner"], np.uint8)).decode())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path} has export format {meta.get('format')}, this reads {EXPORT_FORMAT}"
        )
    dtype = meta.get("compute_dtype")  # absent from files of before it was stored
    learner_kwargs.setdefault("compute_dtype", None if dtype is None else jnp.dtype(dtype))
    return Learner(
        None, _decode(meta["model"]), stored["variables"], _decode(meta["preprocess"]),
        classes=meta["classes"], image_shape=meta["image_shape"], resize=meta["resize"],
        **learner_kwargs,
    )  # fmt: skip


# ---------------------------------------------------------- what export writes of code

_FLAX_FIELDS = ("parent", "name")


def _importable(obj: Any, what: str) -> str:
    """'module:qualname' of a module-level class or function, else ValueError saying why."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module is None or qualname is None:
        raise ValueError(f"{what}: {obj!r} cannot be exported (not a class or function)")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise ValueError(
            f"{what}: {qualname} is a lambda or defined inside a function, which a fresh "
            "process cannot import; define it at the top level of a module"
        )
    if module == "__main__":
        raise ValueError(
            f"{what}: {qualname} is defined in __main__, which a fresh process cannot import; "
            "move it to a module"
        )
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj:
        raise ValueError(f"{what}: {module}.{qualname} does not import back as {obj!r}")
    return f"{module}:{qualname}"


def _encode(value: Any, what: str) -> Any:
    """`value` as JSON: numbers, strings, lists, importable classes and functions,
    `functools.partial`s of them, Flax modules with such fields; else a ValueError."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, tuple | list):
        return [_encode(v, what) for v in value]
    if isinstance(value, np.dtype):
        return {"dtype": value.name}
    if isinstance(value, functools.partial):
        return {
            "partial": _importable(value.func, what),
            "args": [_encode(v, what) for v in value.args],
            "kwargs": {k: _encode(v, what) for k, v in value.keywords.items()},
        }
    if isinstance(value, nn.Module):
        fields = {
            f.name: _encode(getattr(value, f.name), f"{what}'s field {f.name}")
            for f in dataclasses.fields(value)
            if f.name not in _FLAX_FIELDS
        }
        return {"module": _importable(type(value), what), "fields": fields}
    if isinstance(value, type) or callable(value):
        return {"object": _importable(value, what)}
    raise ValueError(f"{what}: {value!r} ({type(value).__name__}) cannot be exported")


def _decode(value: Any) -> Any:
    """The inverse of `_encode` (lists come back as tuples, as Flax fields hold them)."""
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    if "dtype" in value:
        return np.dtype(value["dtype"])
    if "partial" in value:
        return functools.partial(
            _load_object(value["partial"]),
            *(_decode(v) for v in value["args"]),
            **{k: _decode(v) for k, v in value["kwargs"].items()},
        )
    if "module" in value:
        return _load_object(value["module"])(**{k: _decode(v) for k, v in value["fields"].items()})
    return _load_object(value["object"])


def _load_object(name: str) -> Any:
    module, qualname = name.split(":")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found
