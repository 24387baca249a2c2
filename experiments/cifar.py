"""The CIFAR-10 recipe shared by quickstart, snapshot_ensembles and cosine_annealing.

Radek's setup for ResNet-20 (and the ResNet paper's, He et al. 2016 §4.2): 45k/5k
train/validation carved from the 50k training images, the 10k test images looked at
once at the end, random horizontal flips and 4-pixel zero-pad random crops, per-channel
normalisation with the training set's mean and std, SGD with momentum 0.9 and L2
weight decay 1e-4. Each script picks its model, schedule and budget on top of this.

Data come from one of three places: an image folder ROOT/{train,test}/CLASS/*
(default $JAXLEARN_DATA/cifar10; `--folder ROOT` for any other), or tensorflow-datasets
(`--tfds cifar10`, for users who are online).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn import ensemble, loop, runs
from jaxlearn.data import (
    ArrayLoader,
    ImageArrays,
    carve,
    channel_stats,
    compose,
    load_image_folder,
    load_tfds,
    normalize,
    random_crop,
    random_flip,
    subset,
)
from jaxlearn.models import CifarResNet, get_model
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step, make_train_step

IMAGE_SIZE = 32  # CIFAR's native size: no resizing
MOMENTUM = 0.9  # SGD momentum of the ResNet paper and of Radek's runs
WEIGHT_DECAY = 1e-4  # L2 coefficient of the ResNet paper (He et al. 2016)
EVAL_BATCH = 500  # evaluation only runs forward passes: big batches, 20 per 10k test images


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """`--tfds NAME`, `--folder ROOT` (alias `--data-dir`) and the subset sizes."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tfds", metavar="NAME", help="load a tfds data set, e.g. cifar10")
    source.add_argument(
        "--folder",
        "--data-dir",
        metavar="ROOT",
        help="image folder ROOT/{train,test}/CLASS/* (default: DATA/cifar10)",
    )
    parser.add_argument("--train-size", type=int, help="training images (after the carve)")
    parser.add_argument("--valid-size", type=int, help="validation images carved from train")
    parser.add_argument("--test-size", type=int, help="test images (default: all)")


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train / validation / test arrays and the training set's channel statistics."""

    train: ImageArrays
    valid: ImageArrays
    test: ImageArrays
    mean: np.ndarray
    std: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def describe(self) -> dict:
        """Sizes and normalisation constants, for results.json."""
        return {
            "train": len(self.train),
            "valid": len(self.valid),
            "test": len(self.test),
            "classes": list(self.train.class_names),
            "mean": self.mean,
            "std": self.std,
        }


def load_splits(
    args: argparse.Namespace, *, train_size: int, valid_size: int, test_size: int | None, seed=0
) -> Splits:
    """Load the data named by the flags and carve a stratified validation set.

    The validation set is carved first (`valid_size` images), then the training images
    are a stratified subset of the rest (`train_size`, the 10-second rule), so the same
    seed gives the same validation set whatever the training budget.

    Args:
      args: parsed flags (`--tfds`, `--folder`, `--data` and the subset sizes; a size
        flag overrides the keyword of the same name).
      train_size, valid_size, test_size: default sizes (test None: all of it).
      seed: seed of the carve and the subsets.

    Returns:
      `Splits`.
    """
    if args.tfds:
        full = load_tfds(args.tfds, "train")
        test = load_tfds(args.tfds, "test")
        if full.images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"--tfds {args.tfds} images are not {IMAGE_SIZE} px")
    else:
        root = source(args)
        full = load_image_folder(root, "train", IMAGE_SIZE)
        test = load_image_folder(root, "test", IMAGE_SIZE, class_names=full.class_names)
    train_size = args.train_size or train_size
    valid_size = args.valid_size or valid_size
    test_size = args.test_size or test_size
    if train_size + valid_size > len(full):
        raise ValueError(
            f"train_size + valid_size = {train_size + valid_size} exceeds the "
            f"{len(full)} training images"
        )
    pool, valid = carve(full, len(full) - valid_size, seed=seed)
    train = pool if train_size == len(pool) else subset(pool, train_size, seed=seed)
    if test_size is not None and test_size < len(test):
        test = subset(test, test_size, seed=seed)
    mean, std = channel_stats(train.images)
    return Splits(train, valid, test, mean, std)


def source(args: argparse.Namespace) -> str:
    """Where the data come from, as the flags say: 'tfds:NAME' or the image folder."""
    if args.tfds:
        return f"tfds:{args.tfds}"
    return str(args.folder or runs.data_root(args.data) / "cifar10")


def sizes(splits: Splits) -> str:
    """'N train / N valid / N test images', for the log."""
    return f"{len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test images"


def majority_baseline(splits: Splits) -> dict:
    """The trivial baseline: always predict the training set's most frequent class."""
    guess = int(np.bincount(splits.train.labels).argmax())
    return {
        "valid_accuracy": float(np.mean(splits.valid.labels == guess)),
        "test_accuracy": float(np.mean(splits.test.labels == guess)),
    }


def build_model(name: str, num_classes: int):
    """A registered model, or 'resnetD' for any CIFAR depth 6n + 2 (resnet8, resnet14)."""
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) < 18:
        return CifarResNet(depth=int(name[6:]), num_classes=num_classes)
    return get_model(name, num_classes)


def sgd(learning_rate) -> optax.GradientTransformation:
    """SGD with momentum 0.9 (weight decay is the train step's L2 term)."""
    return optax.sgd(learning_rate, momentum=MOMENTUM)


class Recipe:
    """Model, preprocessing, augmentation and steps, shared by every run of a script.

    The jitted train step sees the optimizer as a static part of the state, so each
    schedule compiles once (~10 s on this CPU): `fit` builds the optimizer and step of
    a schedule the first time it sees it and reuses them for every seed.
    """

    def __init__(self, splits: Splits, model_name: str, batch_size: int):
        """Args: splits: the data (normalised with the training set's statistics);
        model_name: see `build_model`; batch_size: training images per step."""
        mean, std = splits.mean, splits.std

        def preprocess(images):
            return normalize(images, mean, std)

        self.model = build_model(model_name, splits.num_classes)
        self.preprocess = preprocess
        # Random flip + crop of the 4-px zero-padded image (He et al. 2016), on the
        # device inside the train step, on the uint8 batch.
        self.augment = compose(random_flip(), random_crop(4))
        self.eval_step = make_eval_step(preprocess=preprocess)
        self.valid = ArrayLoader(splits.valid.images, splits.valid.labels, EVAL_BATCH, train=False)
        self.batch_size = batch_size
        self._compiled: dict[int, tuple] = {}

    def train_step(self, learning_rate=None) -> Callable:
        """The jitted train step (L2 weight decay 1e-4); `learning_rate` is logged as 'lr'."""
        return make_train_step(
            learning_rate=learning_rate,
            weight_decay=WEIGHT_DECAY,
            augment=self.augment,
            preprocess=self.preprocess,
        )

    def loader(self, splits: Splits, seed: int) -> ArrayLoader:
        """The training loader: shuffled per (seed, epoch), last partial batch dropped."""
        return ArrayLoader(splits.train.images, splits.train.labels, self.batch_size, seed=seed)

    def state(self, tx: optax.GradientTransformation, seed: int) -> TrainState:
        """A fresh model with optimizer `tx`, initialised from `seed`.

        Jitted: run eagerly, the init compiles each of its ~90 small operations on its
        own, ~35 s on this loaded CPU against ~3 s for one compiled program.
        """
        example = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        return _create(self.model, tx, jax.random.key(seed), example)

    def fit(self, splits: Splits, schedule, seed: int, epochs: int, callbacks=(), **kwargs):
        """Train a fresh model with SGD on `schedule` for `epochs` epochs (validating each).

        Returns:
          `(state, history)` as `jaxlearn.loop.fit`.
        """
        if id(schedule) not in self._compiled:
            self._compiled[id(schedule)] = (schedule, sgd(schedule), self.train_step(schedule))
        _, tx, train_step = self._compiled[id(schedule)]
        return loop.fit(
            self.state(tx, seed),
            self.loader(splits, seed),
            train_step=train_step,
            epochs=epochs,
            eval_data=self.valid,
            eval_step=self.eval_step,
            callbacks=callbacks,
            **kwargs,
        )

    def accuracy(self, members: Sequence[dict], data: ImageArrays) -> ensemble.EnsembleCurve:
        """Accuracy on `data` of each snapshot and of the first-k ensembles (k = 1 .. M)."""
        return ensemble.accuracy_curve(
            self.model.apply,
            list(members),
            data.images,
            data.labels,
            batch_size=EVAL_BATCH,
            preprocess=self.preprocess,
        )


_create = jax.jit(TrainState.create, static_argnums=(0, 1))


def variables(state: TrainState) -> dict:
    """The state's `{'params', 'batch_stats'}` copied to host memory (safe from donation)."""
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


class KeepBest(loop.Callback):
    """Keep a host copy of the variables of the epoch with the best validation accuracy.

    Radek's (B): the checkpoint is chosen on the validation set, and only that one
    model is scored on the test set.
    """

    def __init__(self):
        self.best: dict | None = None
        self.best_accuracy = -1.0
        self.best_epoch: int | None = None

    def on_epoch_end(self, state, history):
        if history["eval_accuracy"][-1] > self.best_accuracy:
            self.best_accuracy = float(history["eval_accuracy"][-1])
            self.best_epoch = int(history["epoch"][-1])
            self.best = variables(state)


def mean_std(values: Sequence[float]) -> dict:
    """Mean, standard deviation (ddof 1, 0 for one value), min, max and the values."""
    v = np.asarray(values, np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()),
            "values": v.tolist()}  # fmt: skip


def fmt(stats: dict, digits: int = 4) -> str:
    """'mean ± std' of a `mean_std` record."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
