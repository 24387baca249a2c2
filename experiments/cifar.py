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
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn import ensemble, loop, plots, runs
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
    args: argparse.Namespace, *, train_size: int, valid_size: int, test_size: int | None,
    seed: int = 0, progress: bool = False,
) -> Splits:  # fmt: skip
    """Load the data named by the flags and carve a stratified validation set.

    The validation set is carved first (`valid_size` images), then the training images
    are a stratified subset of the rest (`train_size`, the 10-second rule), so the same
    seed gives the same validation set whatever the training budget.

    Args:
      args: parsed flags (`--tfds`, `--folder`, `--data`).
      train_size, valid_size, test_size: the sizes (test None: all of it);
        `pick_setup` has already applied the size flags.
      seed: seed of the carve and the subsets.
      progress: a progress bar while an image folder is decoded.

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
        full = load_image_folder(root, "train", IMAGE_SIZE, progress=progress)
        test = load_image_folder(root, "test", IMAGE_SIZE, class_names=full.class_names,
                                 progress=progress)  # fmt: skip
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


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every mode of a script chooses: data sizes, model and batch size.

    Scripts extend it with their own budget (cycles, epochs, seeds).
    """

    train: int  # training images after the carve
    valid: int  # validation images carved from the training split
    test: int | None  # test images (None: all)
    model: str  # see `build_model`
    batch_size: int


def prepare(args, setup: Setup):
    """Load the data, print its sizes and the majority-class baseline, build the recipe.

    Returns:
      `(splits, baseline, recipe)`; see `load_splits`, `majority_baseline`, `Recipe`.
    """
    splits = load_splits(args, train_size=setup.train, valid_size=setup.valid,
                         test_size=setup.test, progress=args.progress)  # fmt: skip
    baseline = majority_baseline(splits)
    print(f"data: {source(args)}: {sizes(splits)}")
    print(f"baseline (majority class): valid accuracy {baseline['valid_accuracy']:.4f}, "
          f"test accuracy {baseline['test_accuracy']:.4f}")  # fmt: skip
    return splits, baseline, Recipe(splits, setup.model, setup.batch_size, args.progress)


def pick_setup(args, default: tuple[str, Setup], quick: Setup, full: Setup | None = None,
               **overrides):  # fmt: skip
    """The mode's setup (`--quick`, `--full` if the script has it, else the default),
    with the fields that flags override, the data flags' sizes included, so that the
    setup written to results.json is the one that ran.

    Args:
      args: parsed flags with `quick` (and `full` when `full` is given).
      default: (name, setup) of the mode without flags, e.g. ('reduced', REDUCED).
      quick, full: the setups of `--quick` and `--full`.
      **overrides: setup field -> flag value; None leaves the field as it is.

    Returns:
      `(mode name, setup)`.
    """
    if getattr(args, "full", False) and args.quick:
        raise ValueError("--full and --quick exclude each other")
    mode, setup = default
    if args.quick:
        mode, setup = "quick", quick
    elif getattr(args, "full", False):
        mode, setup = "full", full
    sizes = {"train": args.train_size, "valid": args.valid_size, "test": args.test_size}
    overrides = {**sizes, **overrides}
    return mode, dataclasses.replace(setup, **{k: v for k, v in overrides.items() if v is not None})


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
    """SGD with momentum 0.9 (weight decay is the train step's L2 term), its LR injected
    (`optax.inject_hyperparams`) so the train step logs the rate it used."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=MOMENTUM)


class Recipe:
    """Model, preprocessing, augmentation and steps, shared by every run of a script.

    One train step and one eval step serve every schedule and seed: the steps compile
    once per optimizer program (`jaxlearn.programs`), so the seeds of a schedule share
    one compilation, and so do the SGDR schedules that differ only in cycle length.
    """

    def __init__(self, splits: Splits, model_name: str, batch_size: int, progress: bool = False):
        """Args: splits: the data (normalised with the training set's statistics);
        model_name: see `build_model`; batch_size: training images per step;
        progress: whether `fit` shows a progress bar."""
        mean, std = splits.mean, splits.std

        def preprocess(images):
            return normalize(images, mean, std)

        self.model = build_model(model_name, splits.num_classes)
        self.preprocess = preprocess
        # Random flip + crop of the 4-px zero-padded image (He et al. 2016), on the
        # device inside the train step, on the uint8 batch.
        self.augment = compose(random_flip(), random_crop(4))
        self.eval_step = make_eval_step(preprocess=preprocess)
        self.train_step = make_train_step(
            weight_decay=WEIGHT_DECAY, augment=self.augment, preprocess=preprocess
        )
        self.valid = ArrayLoader(splits.valid.images, splits.valid.labels, EVAL_BATCH, train=False)
        self.batch_size = batch_size
        self.progress = progress

    def loader(self, splits: Splits, seed: int) -> ArrayLoader:
        """The training loader: shuffled per (seed, epoch), last partial batch dropped."""
        return ArrayLoader(splits.train.images, splits.train.labels, self.batch_size, seed=seed)

    def state(self, tx: optax.GradientTransformation, seed: int) -> TrainState:
        """A fresh model with optimizer `tx`, initialised from `seed`."""
        example = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        return TrainState.create(self.model, tx, jax.random.key(seed), example)

    def fit(self, splits: Splits, schedule, seed: int, epochs: int, callbacks=(), **kwargs):
        """Train a fresh model with SGD on `schedule` for `epochs` epochs (validating each).

        Returns:
          `(state, history)` as `jaxlearn.loop.fit`.
        """
        return loop.fit(
            self.state(sgd(schedule), seed),
            self.loader(splits, seed),
            train_step=self.train_step,
            epochs=epochs,
            eval_data=self.valid,
            eval_step=self.eval_step,
            callbacks=callbacks,
            **{"progress": self.progress, **kwargs},
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


def train_snapshots(recipe: Recipe, splits: Splits, schedule, seed: int, epochs: int):
    """Train with a snapshot at the end of each of the schedule's cycles, and score them.

    The schedule says where its cycles end (`ensemble.snapshot_steps`), so the capture
    lands on the bottom of each cosine; a one-cycle schedule yields just the final model.

    Returns:
      `(record, history)`: record holds the seed, the validation and test accuracy of
      each snapshot ('members') and of the first-k ensembles ('ensemble'), and the
      training time; history is `fit`'s.
    """
    capture = loop.CaptureParams(ensemble.snapshot_steps(schedule))
    _, history = recipe.fit(splits, schedule, seed, epochs, callbacks=[capture])
    record = {"seed": seed, "train_time_s": float(history["time"][-1])}
    for name in ("valid", "test"):
        curve = recipe.accuracy(capture.snapshots, getattr(splits, name))
        record[name] = {"ensemble": curve.ensemble, "members": curve.members}
    return record, history


def mean_curve(records: Sequence[dict], split: str = "test") -> ensemble.EnsembleCurve:
    """The seed-mean of `train_snapshots` curves, for `plots.plot_ensemble_curve`."""
    return ensemble.mean_curve([ensemble.EnsembleCurve(**r[split]) for r in records])


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

    def on_epoch_end(self, step, state, history):
        if history["eval_accuracy"][-1] > self.best_accuracy:
            self.best_accuracy = float(history["eval_accuracy"][-1])
            self.best_epoch = int(history["epoch"][-1])
            self.best = variables(state)


def plot_schedules(schedules: dict, num_steps: int, path) -> None:
    """The learning rate of several named schedules on one figure, saved as a PNG."""
    ax = None
    for name, schedule in schedules.items():
        ax = plots.plot_schedule(schedule, num_steps, ax=ax, label=name).axes[0]
    ax.set_ylabel("learning rate")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=120)


def fmt(stats: dict, digits: int = 4) -> str:
    """'mean ± std' of a `jaxlearn.runs.summarize` record."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
