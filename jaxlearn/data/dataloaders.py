"""`ImageDataLoaders`: a training and a validation loader over one labelled data set, fastai's way.

fastai's `ImageDataLoaders.from_folder(path, valid_pct=0.2, item_tfms=Resize(224))` in
one call: the images decoded at one size (`load_image_folder`, cached), a validation
set carved off when the folder has none (`carve`: stratified and seeded), the class
names taken from the training split, and the two `ArrayLoader`s the pure training loop
takes (`dls.train` shuffles per (seed, epoch), `dls.valid` keeps order and pads). The
augmentation travels with the data, as fastai's `batch_tfms` do, and the train step
applies it on the device. A folder or tfds data set too large to decode into memory is
streamed from disk instead (`StreamLoader`, chosen by a memory budget as `folder_loader`
chooses), with the same split and the same batches. Everything here can be done by hand
with those functions.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import partial
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlearn.data.arrays import ImageArrays
from jaxlearn.data.augment import Augment
from jaxlearn.data.folders import _class_folders, load_image_folder, scan_split
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.data.split import carve_indices
from jaxlearn.data.stream import (
    STREAMED_SOURCES,
    ImageFolderSource,
    StreamLoader,
    TfdsSource,
    check_stream_options,
    choose_stream,
)
from jaxlearn.data.tfds import load_tfds, prepared_builder

logger = logging.getLogger(__name__)

#: The validation fraction carved off when a data set has no validation split (fastai's).
DEFAULT_VALID_PCT = 0.2


class ImageDataLoaders:
    """The training and validation loaders of one image classification data set.

    The splits are decoded into memory (`ImageArrays`, served by `ArrayLoader`s) or,
    when they would not fit (`from_folder` and `from_tfds` choose by a memory budget),
    streamed from disk (`ImageFolderSource` or `TfdsSource`, served by `StreamLoader`s);
    both serve the same batches.

    Attributes:
      train_ds, valid_ds: each split (fastai's names): `ImageArrays`, or its
        `ImageFolderSource` / `TfdsSource` when streamed.
      train: the loader of `train_ds`, shuffled per (seed, epoch), last partial
        batch dropped.
      valid: the evaluation loader of `valid_ds`, in order, last batch padded.
      image_shape: (H, W, C) of every image, as the model takes them.
      augment: `(key, images) -> images`, applied by the train step on the device.
      resize: how the images were brought to their size ('crop' or 'squash'), so
        that a new image is prepared the same way (`Learner.predict`).
      seed: the seed of the training shuffle (and of the carved split).
    """

    def __init__(
        self,
        train: ImageArrays | ImageFolderSource | TfdsSource,
        valid: ImageArrays | ImageFolderSource | TfdsSource,
        *,
        batch_size: int = 64,
        augment: Augment | None = None,
        seed: int = 0,
        resize: str = "crop",
        mesh: Mesh | None = None,
        size: int | None = None,
        **stream_options,
    ):
        """Check that the splits fit together and build their loaders.

        Args:
          train: the training split: decoded images (`ImageArrays`, served by an
            `ArrayLoader`), or a source to stream (`ImageFolderSource`, `TfdsSource`,
            served by a `StreamLoader`).
          valid: the validation split, of the same kind, with the same class names.
          batch_size: examples per step (a multiple of the device count).
          augment: on-device augmentation of training batches, e.g.
            `jaxlearn.data.compose(random_crop(4), random_flip())`; None: none.
          seed: seed of the training shuffle.
          resize: the policy the images were (or are, when streamed) resized with
            ('crop' or 'squash').
          mesh: data mesh of the loaders (default: all devices).
          size: side the streamed images are decoded to (streamed splits only: decoded
            ones have theirs).
          **stream_options: `StreamLoader`'s `workers`, `threads`, `prefetch`, `crop`
            (streamed splits only).

        Raises:
          ValueError: splits of different kinds, class names or image shapes, fewer
            than two classes with training images, a class with validation images but
            no training image, a `size` missing (streamed) or given (decoded), or a bad
            `batch_size` or `augment`.
          TypeError: a keyword that is none of these.
        """
        check_stream_options(stream_options, "ImageDataLoaders")
        streamed = isinstance(train, STREAMED_SOURCES)
        if streamed != isinstance(valid, STREAMED_SOURCES):
            raise ValueError(
                "train and valid must both be ImageArrays or both streamed sources "
                f"(ImageFolderSource, TfdsSource), got {type(train).__name__} and "
                f"{type(valid).__name__}"
            )
        if streamed and size is None:
            raise ValueError("streamed splits need size=, the side they are decoded to")
        if not streamed and (size is not None or stream_options):
            raise ValueError(
                "size= and streaming options are for streamed splits: decoded images have "
                "their size already"
            )
        if train.class_names != valid.class_names:
            raise ValueError(
                f"train and valid must share their class names, got {list(train.class_names)} "
                f"and {list(valid.class_names)}"
            )
        if not streamed and train.images.shape[1:] != valid.images.shape[1:]:
            raise ValueError(
                f"train and valid images differ in shape: {train.images.shape[1:]} vs "
                f"{valid.images.shape[1:]}"
            )
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be a function (key, images) -> images, got {augment!r}")
        names = train.class_names
        seen = np.unique(train.labels)
        if len(seen) < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes with training images, found "
                f"{[names[i] for i in seen]} (class names {list(names)})"
            )
        unseen = sorted(set(np.unique(valid.labels).tolist()) - set(seen.tolist()))
        if unseen:
            raise ValueError(
                f"class(es) {[names[i] for i in unseen]} have validation images but no "
                "training image: the model could never learn them"
            )
        self.train_ds, self.valid_ds = train, valid
        self.augment, self.seed, self.resize = augment, seed, resize
        if streamed:
            common = dict(resize=resize, mesh=mesh, **stream_options)
            self.image_shape = (size, size, train.channels)
            self.train = StreamLoader(train, batch_size, size, seed=seed, **common)
            valid_options = {k: v for k, v in common.items() if k != "crop"}  # centre only
            self.valid = StreamLoader(valid, batch_size, size, train=False, **valid_options)
        else:
            self.image_shape = tuple(train.images.shape[1:])
            self.train = ArrayLoader(
                train.images, train.labels, batch_size, seed=seed, num_classes=len(names),
                mesh=mesh,
            )  # fmt: skip
            self.valid = ArrayLoader(
                valid.images, valid.labels, batch_size, train=False, num_classes=len(names),
                mesh=mesh,
            )  # fmt: skip

    @property
    def streamed(self) -> bool:
        """Whether the loaders stream their images from disk (`StreamLoader`)."""
        return isinstance(self.train, StreamLoader)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in label order (fastai's `dls.vocab`)."""
        return self.train_ds.class_names

    @property
    def c(self) -> int:
        """The number of classes (fastai's `dls.c`)."""
        return len(self.classes)

    @property
    def batch_size(self) -> int:
        """Examples per training step."""
        return self.train.batch_size

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        train: str = "train",
        valid: str = "valid",
        valid_pct: float | None = None,
        *,
        size: int = 224,
        batch_size: int = 64,
        augment: Augment | None = None,
        seed: int = 0,
        resize: str = "crop",
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        mesh: Mesh | None = None,
        stream: bool | None = None,
        budget: int | None = None,
        **stream_options,
    ) -> ImageDataLoaders:
        """Loaders of PATH/TRAIN/CLASS/* and PATH/VALID/CLASS/* (fastai's `from_folder`).

        The class names are the sub-folders of PATH/TRAIN. When PATH/VALID does not
        exist, or `valid_pct` is given, a stratified, seeded `valid_pct` of PATH/TRAIN
        (default `DEFAULT_VALID_PCT`) is carved off as the validation set (and
        PATH/VALID, if any, is not read).

        The images are decoded into memory while they fit `budget`, and streamed
        from disk beyond it (`folder_loader`'s choice, said in one log line); the
        batches are the same either way, the carved split too.

        Args:
          path: the data set folder.
          train, valid: names of the split folders.
          valid_pct: fraction of the training images to validate on, in (0, 1).
          size: side of the square images, in pixels (`load_image_folder`).
          batch_size, augment, seed, mesh: as in `ImageDataLoaders`; `seed` also picks
            the carved split.
          resize: 'crop' (shortest side to `size`, centre square) or 'squash'.
          cache_dir: where decoded arrays are cached (default $JAXLEARN_CACHE or
            ~/.cache/jaxlearn).
          progress: show progress bars while decoding.
          stream: True or False forces streaming or decoding; None chooses by `budget`.
          budget: bytes the decoded images may take (default `stream.memory_budget()`).
          **stream_options: `StreamLoader`'s `workers`, `threads`, `prefetch`, `crop`,
            used when it streams; `crop='random'` streams always (a host-side crop
            exists only there; `stream=False` with it is a ValueError).

        Raises:
          FileNotFoundError: PATH or PATH/TRAIN does not exist.
          ValueError: `valid_pct` outside (0, 1), a class folder in PATH/VALID that
            PATH/TRAIN lacks, no readable image, fewer than two classes, and the
            errors of `ImageDataLoaders`.
          TypeError: a keyword that is none of these.
        """
        _check_valid_pct(valid_pct)
        stream = check_stream_options(stream_options, "from_folder", stream)
        load = dict(resize=resize, cache_dir=cache_dir, progress=progress)
        carve_it = valid_pct is not None or not Path(path, valid).is_dir()
        beside = ("val", "validation", "valid")
        unused = [d for d in beside if d != valid and Path(path, d).is_dir()]
        if carve_it and valid_pct is None and unused:
            warnings.warn(
                f"{Path(path, valid)} does not exist, so {DEFAULT_VALID_PCT:.0%} of "
                f"{Path(path, train)} is carved off to validate on, while {unused} lie beside "
                f"it: pass valid={unused[0]!r} to validate on that split",
                stacklevel=2,
            )
        if not carve_it:
            train_dir, valid_dir = Path(path, train), Path(path, valid)
            if train_dir.is_dir():
                extra = sorted(set(_class_folders(valid_dir)) - set(_class_folders(train_dir)))
                if extra:
                    raise ValueError(
                        f"class folder(s) {extra} in {valid_dir} have no folder in {train_dir}: "
                        "the model could never learn them"
                    )
        splits = [train] if carve_it else [train, valid]
        files = sum(len(scan_split(path, split)[2]) for split in splits)  # listed, not read
        streamed = choose_stream(Path(path), files, size, stream=stream, budget=budget)
        if streamed:
            data = ImageFolderSource(path, train)
            read_valid = partial(ImageFolderSource, path, valid)
            stream_options["size"] = size
        else:
            data = load_image_folder(path, train, size, **load)
            read_valid = partial(load_image_folder, path, valid, size, **load)
            if stream_options:
                logger.info("decoded into memory: streaming options %s unused", stream_options)
                stream_options = {}
        if carve_it:
            train_ds, valid_ds = _carved(data, valid_pct, seed)
        else:
            train_ds, valid_ds = data, read_valid(class_names=data.class_names)
        return cls(
            train_ds, valid_ds, batch_size=batch_size, augment=augment, seed=seed,
            resize=resize, mesh=mesh, **stream_options,
        )  # fmt: skip

    @classmethod
    def from_tfds(
        cls,
        name: str,
        train: str = "train",
        valid: str | None = None,
        valid_pct: float | None = None,
        *,
        size: int | None = None,
        batch_size: int = 64,
        augment: Augment | None = None,
        seed: int = 0,
        resize: str = "crop",
        data_dir: str | os.PathLike | None = None,
        progress: bool = True,
        mesh: Mesh | None = None,
        stream: bool | None = None,
        budget: int | None = None,
        **stream_options,
    ) -> ImageDataLoaders:
        """Loaders of a tensorflow-datasets data set (`load_tfds`; tfds is imported on call).

        The data set is prepared first if need be (with TensorFlow). Its images are
        decoded into memory while they fit `budget`, and read from the prepared files
        beyond it (`TfdsSource`, the choice said in one log line, as `from_folder`'s);
        the batches and the carved split are the same either way.

        Args:
          name: tfds name, e.g. 'mnist', 'cifar10', 'imagenette/160px'.
          train: the training split, slices included ('train', 'train[:90%]').
          valid: the validation split; None (or `valid_pct` given): carve a stratified,
            seeded `valid_pct` (default `DEFAULT_VALID_PCT`) of `train` instead.
          valid_pct: fraction of `train` to validate on, in (0, 1).
          size: side of the square images; None keeps their size (they must agree).
          batch_size, augment, seed, resize, mesh: as in `from_folder`.
          data_dir: tfds data folder (default: tfds's).
          progress: show progress bars while decoding (or reading the labels).
          stream: True or False forces streaming or decoding; None chooses by `budget`.
            Streaming decodes to one square side: `size`, or the images' own when the
            data set declares them square (cifar10's 32, mnist's 28).
          budget: bytes the decoded images may take (default `stream.memory_budget()`).
          **stream_options: `StreamLoader`'s `workers`, `threads`, `prefetch`, `crop`
            (`crop='random'` streams always, as in `from_folder`).

        Raises:
          ImportError: the data set is not prepared and TensorFlow is missing.
          ValueError: as `from_folder`, `load_tfds`'s errors, and `stream=True`
            without a square side to decode to.
          TypeError: a keyword that is none of these.
        """
        _check_valid_pct(valid_pct)
        stream = check_stream_options(stream_options, "from_tfds", stream)
        carve_it = valid is None or valid_pct is not None
        builder = prepared_builder(name, data_dir)
        features = builder.info.features
        shape = tuple(features["image"].shape) if "image" in features else ()  # else load_tfds says
        side = size or (shape[0] if len(shape) == 3 and shape[0] == shape[1] else None)
        if side is None:
            if stream:
                raise ValueError(
                    f"streaming {name} decodes its images to one square side: pass size="
                )
            streamed = False
        else:
            splits = [train] if carve_it else [train, valid]
            examples = sum(len(builder.as_data_source(split=split)) for split in splits)
            streamed = choose_stream(
                builder.data_dir, examples, side, stream=stream, budget=budget,
                channels=shape[-1] if shape else 3,
            )  # fmt: skip
        if streamed:
            read = partial(TfdsSource, name, data_dir=data_dir, progress=progress)
            stream_options["size"] = side
        else:
            read = partial(load_tfds, name, data_dir=data_dir, size=size, resize=resize,
                           progress=progress)  # fmt: skip
            if stream_options:
                logger.info("decoded into memory: streaming options %s unused", stream_options)
                stream_options = {}
        data = read(train)
        train_ds, valid_ds = _carved(data, valid_pct, seed) if carve_it else (data, read(valid))
        return cls(
            train_ds, valid_ds, batch_size=batch_size, augment=augment, seed=seed,
            resize=resize, mesh=mesh, **stream_options,
        )  # fmt: skip

    def one_batch(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first `n` (default a batch) training images as the train step sees them.

        They are epoch 0's first images in the loader's order, augmented with
        `jax.random.key(seed)` when the loaders have an augmentation.

        Args:
          n: how many images (>= 1); None: the loaders' `batch_size`.

        Returns:
          (images, labels) as NumPy arrays.

        Raises:
          ValueError: `n` < 1.
        """
        n = self.batch_size if n is None else n
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.streamed:
            images, labels = _first_rows(self.train, n)
        else:
            idx = self.train.order(0)[:n]
            images, labels = self.train_ds.images[idx], self.train_ds.labels[idx]
        if self.augment is not None:
            images = np.asarray(self.augment(jax.random.key(self.seed), images))
        return images, labels

    def show_batch(self, n: int = 9, path: str | os.PathLike | None = None):
        """A grid of `n` training images (`one_batch`), each titled with its class.

        Args:
          n: how many images (>= 1; default 9).
          path: also save the figure as a PNG here (optional).

        Returns:
          The matplotlib Figure (`jaxlearn.plots.plot_images`); saved as a PNG at `path`.

        Raises:
          ValueError: `n` < 1.
        """
        from jaxlearn.plots import plot_images

        images, labels = self.one_batch(n)
        if np.issubdtype(images.dtype, np.floating):
            images = np.clip(images, 0.0, 1.0)  # colour augmentations may overshoot [0, 1]
        return plot_images(images, [self.classes[i] for i in labels], path=path)

    def __repr__(self) -> str:
        return (
            f"ImageDataLoaders({len(self.train_ds)} train / {len(self.valid_ds)} valid images "
            f"of shape {self.image_shape}, {self.c} classes {list(self.classes)}, "
            f"batch_size {self.batch_size})"
        )


def _first_rows(loader: StreamLoader, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Epoch 0's first `n` training rows of a streamed loader, as the train step gets them."""
    images, labels = [], []
    batches = loader.epoch(0)
    for batch in batches:
        images.append(np.asarray(batch["image"]))
        labels.append(np.asarray(batch["label"]))
        if sum(map(len, labels)) >= n:
            break
    batches.close()
    loader.close()  # the pipeline stands mid-epoch: training starts its own
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def _check_valid_pct(valid_pct: float | None) -> None:
    if valid_pct is not None and not 0.0 < valid_pct < 1.0:
        raise ValueError(f"valid_pct must lie in (0, 1), got {valid_pct}")


def _carved(
    data: ImageArrays | ImageFolderSource | TfdsSource, valid_pct: float | None, seed: int
) -> tuple:
    """(train, valid): a stratified, seeded `valid_pct` of `data` carved off to validate on.

    `carve`'s split, on decoded images or on the examples of a streamed source alike.
    """
    valid_pct = DEFAULT_VALID_PCT if valid_pct is None else valid_pct
    picked, rest = carve_indices(data.labels, 1.0 - valid_pct, seed=seed)
    if len(rest) == 0:
        raise ValueError(f"valid_pct={valid_pct} of {len(data)} images leaves no validation image")
    return data.take(picked), data.take(rest)
