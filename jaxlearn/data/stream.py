"""Data beyond memory: batches decoded on the fly by Grain, in the order `ArrayLoader` serves.

`ArrayLoader` needs the decoded data set in memory: ImageNet at 224 px is 190 GB of
uint8. `StreamLoader` keeps only a few batches: each step's images are read from a
random-access source (an image folder, a prepared tfds data set) and decoded to a
fixed size by Grain (google/grain), in worker processes, while the device trains.
Its batches are those of `ArrayLoader`: `{'image', 'label'[, 'mask']}` on the data
mesh, `len()` steps per epoch, `epoch(e, start_step)`, so `fit`, `lr_find`,
`evaluate` and checkpoints take either loader, and the on-device augmentations of
the train step come after it unchanged.

Order and resume: the permutation of epoch `e` is `ArrayLoader`'s,
`default_rng([seed, e]).permutation(n)`, cut into steps; the unit of work handed to
Grain is one step's batch, so where a run stands is `(epoch, step)`, which the train
state's `step` already says. Resuming at `(e, s)` rebuilds the pipeline from step `s`
of epoch `e` and yields exactly the batches an uninterrupted run would have: no Grain
iterator state needs to go into the checkpoint (its position is the state's step).
A random crop draws from `default_rng([seed, epoch, index])`, so it replays too.

Processes: each process reads only its own rows of every global batch (the rows
`ArrayLoader` gives it) and assembles its part with `shard_batch`
(`jax.make_array_from_process_local_data`).

Broken files are read as they come, so they cannot be dropped before the epoch's
batches are cut: a training row whose file cannot be decoded takes the next
readable file of the epoch's order instead (every step keeps `batch_size`
examples), and an evaluation row gets `mask=False` (it never counts). Each file is
counted once and reported in one warning per epoch that met new ones, as
`load_image_folder` words it. Without broken files the batches equal those of an
`ArrayLoader` over `load_image_folder`'s arrays, pixel for pixel (same decoder).

Grain is optional (`pip install "jaxlearn[stream]"`) and imported on first use.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import gc
import logging
import math
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from PIL import Image
from tqdm.auto import tqdm

from jaxlearn.data.arrays import as_indices
from jaxlearn.data.folders import _warn_skipped, load_image_folder, scan_split
from jaxlearn.data.images import check_resize, decode_file, resize_array
from jaxlearn.data.loader import ArrayLoader, epoch_order
from jaxlearn.parallel import data_mesh, local_batch_size, shard_batch

logger = logging.getLogger(__name__)

#: Host-side crops: 'centre' (the square `load_image_folder` makes) or 'random'
#: (a `size` square at a random place in a square of `RANDOM_CROP_SCALE * size`).
CROPS = ("centre", "random")
#: ImageNet's recipe: resize to 256, crop 224 (256 / 224 = 8 / 7).
RANDOM_CROP_SCALE = 8 / 7
#: Share of the machine's memory `folder_loader` lets decoded images take before it streams.
MEMORY_FRACTION = 0.25

#: `StreamLoader` arguments `folder_loader` passes on.
_STREAM_OPTIONS = {"workers", "threads", "prefetch", "crop"}

#: The end of the global step range a pipeline runs over: never reached.
_ENDLESS = 2**62

_INSTALL = 'StreamLoader needs Grain: pip install "jaxlearn[stream]" (grain==0.2.18)'


class ImageFolderSource:
    """ROOT/SPLIT/CLASS/* as a random-access source: files listed now, decoded when read.

    Classes, labels and the files left out are `load_image_folder`'s (`scan_split`);
    files outside a class folder and empty class folders are reported at once, in
    the same warning. Picklable, so Grain's worker processes read it.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        class_names: Sequence[str] | None = None,
    ):
        """List ROOT/SPLIT (as `load_image_folder`: same classes, same order of files).

        Raises:
          FileNotFoundError: ROOT or ROOT/SPLIT does not exist.
          ValueError: no file, bad `class_names`, or a class folder not among them.
        """
        self.folder, self.class_names, self.paths, labels, self.report = scan_split(
            root, split, class_names
        )
        self.labels = np.asarray(labels, np.int32)
        self.channels = 3
        _warn_skipped(self.folder, self.report)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int, size: int, resize: str) -> tuple[np.ndarray | str, int]:
        """(the image at `index` as (size, size, 3) uint8, or why it cannot be read; its label).

        Args:
          index: position of the file in this source (`paths[index]`).
          size: side of the square image, in pixels.
          resize: 'crop' (shortest side to `size`, then the centre) or 'squash'
            (`decode_file`).
        """
        return decode_file(self.paths[index], size, resize), int(self.labels[index])

    def take(self, indices) -> ImageFolderSource:
        """The source of the files at `indices`, in that order (`ImageArrays.take`'s counterpart).

        What a carved split (`carve_indices` on `labels`) streams; the folder's
        report stays the whole folder's.

        Args:
          indices: positions in this source: integers (negative ones count from the end)
            or a boolean mask of its length (`as_indices`).

        Raises:
          ValueError: a mask of another length, or indices neither integer nor boolean.
          IndexError: an index out of range.
        """
        indices = as_indices(indices, len(self.labels))
        part = copy.copy(self)
        part.labels = self.labels[indices]  # NumPy's IndexError for an index out of range
        part.paths = [self.paths[i] for i in indices]
        return part


class TfdsSource:
    """A prepared tensorflow-datasets split read through `tfds.data_source` (no TensorFlow).

    The array_record files are read one example at a time, so the split never has
    to fit in memory; preparing a data set is `load_tfds`'s (`prepared_builder`'s)
    job. Picklable, so Grain's worker processes read it.
    """

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        image_key: str = "image",
        label_key: str = "label",
        progress: bool = True,
    ):
        """Open a prepared split ('train', 'train[:90%]', ...) of tfds data set `name`.

        `progress` shows a bar while `labels` are read (once, on first use).

        Raises:
          FileNotFoundError: the data set is not prepared in `data_dir`.
          ValueError: an unknown feature key, or an empty split.
        """
        # Imported here: tensorflow_datasets takes ~2 s to import, and only this source needs it.
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds data set {name!r} is not prepared in {builder.data_dir}: "
                "prepare it first (load_tfds does, with TensorFlow)"
            )
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f"{name} has no feature {key!r}; its features: {list(features)}")
        self.source = builder.as_data_source(split=split)
        if len(self.source) == 0:
            raise ValueError(f"tfds split {split!r} of {name} in {builder.data_dir} is empty")
        self.name, self.split, self.data_dir, self.progress = name, split, data_dir, progress
        self.folder = Path(builder.data_dir)
        self.class_names = tuple(features[label_key].names)
        self.channels = features[image_key].shape[-1]
        self.image_key, self.label_key = image_key, label_key
        self.report = {"total": len(self.source), "skipped": {}, "empty_classes": []}
        self.rows = np.arange(len(self.source))  # the split's examples this source serves
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: int, size: int, resize: str) -> tuple[np.ndarray, int]:
        """(example `index`'s image as (size, size, channels) uint8; its label).

        Args:
          index: position in this source (of its `rows`, the split's examples it serves).
          size, resize: as in `ImageFolderSource.read` (`resize_array`).
        """
        example = self.source[int(self.rows[index])]
        image = np.asarray(example[self.image_key], np.uint8)
        return resize_array(image, size, resize), int(example[self.label_key])

    @property
    def labels(self) -> np.ndarray:
        """Every example's label (int32), read once: the records are read, not their images.

        A carved split (`carve_indices`) and the loaders' checks need them; tfds's
        `SkipDecoding` leaves the image bytes undecoded, so this costs a pass over the
        files, not a decode of every image.
        """
        if self._labels is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder(self.name, data_dir=self.data_dir)
            raw = builder.as_data_source(
                split=self.split, decoders={self.image_key: tfds.decode.SkipDecoding()}
            )
            labels = np.empty(len(self.rows), np.int32)
            # Records per read: few calls, and a chunk's undecoded image bytes stay small
            # (~110 MB of ImageNet's ~110 KB JPEGs).
            chunk = 1024
            bar = tqdm(total=len(labels), desc=f"{self.name} {self.split} labels", unit="ex",
                       disable=not self.progress)  # fmt: skip
            for start in range(0, len(labels), chunk):
                rows = self.rows[start : start + chunk].tolist()
                records = raw.__getitems__(rows)
                labels[start : start + len(rows)] = [r[self.label_key] for r in records]
                bar.update(len(rows))
            bar.close()
            self._labels = labels
        return self._labels

    def take(self, indices) -> TfdsSource:
        """The source of the examples at `indices`, in that order (`ImageFolderSource.take`'s).

        The labels are read first (once), as the carved split needs them anyway.

        Args:
          indices: as in `ImageFolderSource.take`.

        Raises:
          ValueError: a mask of another length, or indices neither integer nor boolean.
          IndexError: an index out of range.
        """
        indices = as_indices(indices, len(self.rows))
        labels = self.labels[indices]  # NumPy's IndexError for an index out of range
        part = copy.copy(self)
        part.rows, part._labels = self.rows[indices], labels
        return part


#: The sources `StreamLoader` and the Learner's data constructors stream from.
STREAMED_SOURCES = (ImageFolderSource, TfdsSource)


@dataclasses.dataclass(frozen=True)
class _ReadBatch:
    """Global step -> this process's rows of that step's batch, and the files that failed.

    The global step is `epoch * steps_per_epoch + step`, so one Grain pipeline runs
    on over the epochs. Runs in Grain's workers (pickled to each): it holds all it needs.
    """

    source: Any
    seed: int
    train: bool
    steps: int  # steps per epoch
    batch_size: int
    first: int  # this process's first row of each global batch
    local: int  # and how many rows it reads
    size: int
    resize: str
    crop: str
    orders: dict = dataclasses.field(default_factory=dict, compare=False)  # the last epoch's

    def __call__(self, global_step: int) -> tuple[dict, dict[int, str]]:
        epoch, step = divmod(global_step, self.steps)
        order = self.orders.get(epoch)
        if order is None:  # ImageNet's permutation takes ~30 ms: once per epoch and process
            order = _order(self.seed, epoch, len(self.source), self.train)
            self.orders.clear()
            self.orders[epoch] = order
        positions = step * self.batch_size + self.first + np.arange(self.local)
        mask = positions < len(order)  # only the last evaluation batch has rows past the end
        images = np.zeros((self.local, self.size, self.size, self.source.channels), np.uint8)
        labels = np.zeros(self.local, np.int32)
        skipped: dict[int, str] = {}
        # PIL only warns between MAX_IMAGE_PIXELS and twice that: an error here, so that
        # such a file is skipped as a bomb, as `load_image_folder` skips it.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for row in np.flatnonzero(mask):
                example = self._example(order, int(positions[row]), epoch, skipped)
                if example is None:
                    mask[row] = False
                else:
                    images[row], labels[row] = example
        batch = {"image": images, "label": labels}
        if not self.train:
            batch["mask"] = mask
        return batch, skipped

    def _example(
        self, order: np.ndarray, position: int, epoch: int, skipped: dict
    ) -> tuple[np.ndarray, int] | None:
        """The example at `position` of the epoch's order; in training, the next readable one."""
        n = len(order)
        side = math.ceil(self.size * RANDOM_CROP_SCALE) if self.crop == "random" else self.size
        for offset in range(n if self.train else 1):
            index = int(order[(position + offset) % n])
            image, label = self.source.read(index, side, self.resize)
            if isinstance(image, str):
                skipped[index] = image
                continue
            if self.crop == "random":
                rng = np.random.default_rng([self.seed, epoch, index])
                top, left = rng.integers(0, side - self.size + 1, 2)
                image = image[top : top + self.size, left : left + self.size]
            return image, label
        if self.train:
            raise ValueError(f"no readable image in {self.source.folder}: every file was skipped")
        return None


def _close_pipeline(pipeline: list) -> None:
    """Close the Grain iterator held in `pipeline` (a one-element list) and drop it, then
    have the shared memory its workers' batches came in freed (`_free_shared_memory`)."""
    while pipeline:
        pipeline.pop().close()
    _free_shared_memory()


def _free_shared_memory() -> None:
    """Run Grain's queued frees of worker batches' shared memory now, not never.

    With worker processes Grain frees each batch's shared memory from a thread pool
    (`SharedMemoryArray.enable_async_del`). Frees still queued when the interpreter
    exits never run, and Python's resource tracker then warns of "12 leaked
    shared_memory objects" at every script's end: a false alarm (/dev/shm is empty
    after `close`), but one that reads like a leak. Grain has no public call to drain
    that pool; where its private one is not there (another Grain), nothing is done.
    """
    gc.collect()  # the batches dropped with the iterator queue their frees
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None and hasattr(SharedMemoryArray, "_disable_async_del"):
        pool.close()
        pool.join()  # every queued free done
        SharedMemoryArray._disable_async_del()  # the next pipeline starts another pool


def _order(seed: int, epoch: int, num_examples: int, train: bool) -> np.ndarray:
    """`ArrayLoader.order`: the epoch's shuffle in training, the examples in order otherwise."""
    return epoch_order(seed, epoch, num_examples) if train else np.arange(num_examples)


class StreamLoader:
    """Batches of `{'image', 'label'[, 'mask']}` decoded from a source by Grain, on a mesh.

    The batch contract and the order are `ArrayLoader`'s (see the module
    docstring): training shuffles per (seed, epoch) and drops the last partial
    batch; evaluation keeps the order and pads the last batch with `mask=False`
    rows of zeros.

    One Grain pipeline serves epoch after epoch (worker processes take ~2 s each to
    start here: they import JAX, as Grain does), so the workers decode the next
    epoch's first batches while the last ones train and the evaluation runs. It is
    started again only when `epoch(e, s)` asks for another place than where it
    stands (a resumed run, a loop that broke off mid-epoch), and stopped by `close()`.

    Memory: at most `workers * (threads + 1)` host batches are being decoded or wait
    in Grain's buffers (a worker's output buffer holds 1 batch), `threads` more in
    this process, and `prefetch` wait on the device, whatever the data set's size.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        size: int,
        *,
        resize: str = "crop",
        crop: str = "centre",
        seed: int = 0,
        train: bool = True,
        mesh: Mesh | None = None,
        workers: int = 0,
        threads: int = 1,
        prefetch: int = 2,
    ):
        """Check the arguments; nothing is read until an epoch is iterated.

        Args:
          source: `ImageFolderSource`, `TfdsSource`, or any picklable object with
            `len()`, `class_names`, `channels`, `folder`, `report` (as `scan_split`'s)
            and `read(index, size, resize) -> (image or why it failed, label)`.
          batch_size: global examples per step (a multiple of the device count).
          size: side of the square images, in pixels.
          resize: 'crop' (shortest side to the side read, centre square) or 'squash'.
          crop: 'centre', or 'random' (training only): read at `RANDOM_CROP_SCALE *
            size` and cut a `size` square at a place drawn from (seed, epoch, index).
          seed: seed of the per-epoch shuffle and of the random crops.
          train: shuffle and drop the last partial batch (True) or keep order and pad (False).
          mesh: data mesh (default `data_mesh()`).
          workers: Grain worker processes decoding batches (0: in this process). They
            are spawned, and each imports the main module: a script must start its work
            under `if __name__ == "__main__":`, as with torch's DataLoader (without it,
            each worker runs the script again and the pipeline stalls).
          threads: decoding threads in each process that decodes (0: inline, no thread).
          prefetch: batches put on the device ahead of the one training (>= 0).

        Raises:
          ValueError: an empty source, a bad size, resize, crop, batch size (not a
            multiple of the devices, or more than the training examples), or a
            negative `workers`, `threads` or `prefetch`.
        """
        size = check_resize(size, resize)
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if crop == "random" and not train:
            raise ValueError("crop='random' is for training; evaluation reads the centre")
        for name, value in (("workers", workers), ("threads", threads), ("prefetch", prefetch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if len(source) == 0:
            raise ValueError(f"the source {source.folder} holds no example")
        self.mesh = mesh or data_mesh()
        self._local = local_batch_size(batch_size, self.mesh)
        if train and batch_size > len(source):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(source)} training examples")
        self.source, self.batch_size, self.size = source, batch_size, size
        self.resize, self.crop, self.seed, self.train = resize, crop, seed, train
        self.workers, self.threads, self.prefetch = workers, threads, prefetch
        self.skipped: dict[int, str] = {}  # index -> reason, of every broken file met so far
        self._batches: list | None = None  # [the live Grain iterator]
        self._closer: weakref.finalize | None = None  # closes it, by `close()` or at exit
        self._next = 0  # the global step it yields next

    @property
    def num_examples(self) -> int:
        """Number of examples in the source (broken files included: they are found on reading)."""
        return len(self.source)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The source's class names, in label order."""
        return self.source.class_names

    def __len__(self) -> int:
        """Steps per epoch."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.train else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch`, in the order they are served (pure in seed, epoch).

        Args:
          epoch: epoch index: it selects the shuffle in training
            (`default_rng([seed, epoch])`); evaluation serves 0 .. N-1 in every epoch.
        """
        return _order(self.seed, epoch, self.num_examples, self.train)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Yield the batches of `epoch` from `start_step` on, sharded on the mesh.

        Args:
          epoch: epoch index (selects the shuffle).
          start_step: first step within the epoch (to resume mid-epoch).
        """
        steps = len(self)
        wanted = epoch * steps + start_step
        if not self.train and self._next % steps == start_step:
            wanted = self._next  # every evaluation pass is the same: the pipeline runs on
        if self._batches is None or self._next != wanted:
            self.close()
            self._batches, self._next = [self._start(wanted)], wanted
            # Closed and dropped at the latest when the interpreter exits, before the
            # modules Grain's cleanup needs are torn down (left to the garbage collector
            # then, every open pipeline printed "Exception ignored" tracebacks at exit).
            self._closer = weakref.finalize(self, _close_pipeline, self._batches)
        ready: collections.deque = collections.deque()
        known = len(self.skipped)
        try:
            for _ in range(start_step, steps):
                batch, skipped = next(self._batches[0])
                if self.workers:  # out of Grain's shared memory: `_free_shared_memory`
                    batch = {k: np.array(v) for k, v in batch.items()}
                self._next += 1
                self.skipped.update(skipped)
                ready.append(shard_batch(batch, self.mesh))  # transfers start now
                if len(ready) > self.prefetch:
                    yield ready.popleft()
            while ready:
                yield ready.popleft()
        except Exception:
            self.close()  # a pipeline that raised is not resumed
            raise
        finally:
            if len(self.skipped) > known:  # one warning, counting every file left out so far
                report = self.source.report
                broken = collections.Counter(report["skipped"]) + collections.Counter(
                    self.skipped.values()
                )
                _warn_skipped(self.source.folder, {**report, "skipped": dict(broken)})

    def _start(self, global_step: int):
        """A Grain iterator over the batches from `global_step` on, epoch after epoch."""
        try:
            import grain
        except ImportError as error:
            raise ImportError(_INSTALL) from error

        read = _ReadBatch(
            self.source, self.seed, self.train, len(self), self.batch_size,
            jax.process_index() * self._local, self._local, self.size, self.resize, self.crop,
        )  # fmt: skip
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.threads)
        dataset = grain.MapDataset.range(global_step, _ENDLESS).map(read)
        dataset = dataset.to_iter_dataset(options)
        if self.workers:  # worker i decodes steps i, i + workers, ...; read back in order
            _parse_absl_flags()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(dataset)

    def close(self) -> None:
        """Stop the Grain pipeline and its worker processes (the next epoch starts another)."""
        if self._batches is not None:
            self._closer()  # closes the iterator once; the exit hook is then spent
            self._batches = None

    def __iter__(self) -> Iterator[dict]:
        """The batches of epoch 0 (for evaluation loaders)."""
        return self.epoch(0)


class SourceImages:
    """Images of a source, read from disk when indexed: a data set that stays on disk.

    What `Learner.get_preds` hands to `ClassificationInterpretation` for a streamed
    validation set, so that `plot_top_losses` reads the few images it shows and
    nothing else. Indexing takes what NumPy takes on the first axis (an int, a
    slice, an index array) and returns uint8 arrays, decoded as the loader decodes.
    """

    def __init__(self, source, indices, size: int, resize: str = "crop"):
        """The images `indices` of `source`, at `size` px, resized by `resize`."""
        size = check_resize(size, resize)
        self.source, self.indices = source, as_indices(indices, len(source))
        self.size, self.resize = size, resize

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, size, size, channels), as the array of them would have."""
        return (len(self.indices), self.size, self.size, self.source.channels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key) -> np.ndarray:
        """The image(s) at `key`; ValueError naming a file that can no longer be read."""
        picked = self.indices[key]
        images = [self._read(int(i)) for i in np.atleast_1d(picked)]
        if np.ndim(picked) == 0:
            return images[0]
        return np.stack(images) if images else np.zeros((0, *self.shape[1:]), np.uint8)

    def _read(self, index: int) -> np.ndarray:
        image, _ = self.source.read(index, self.size, self.resize)
        if isinstance(image, str):
            raise ValueError(f"example {index} of {self.source.folder} cannot be read: {image}")
        return image


def _parse_absl_flags() -> None:
    """Let Grain's worker processes read their absl flags outside an absl app.

    Grain 0.2.18 reads `--grain_enable_multiprocess_worker_profiling` when it starts
    workers with JAX loaded, and absl refuses to read flags before they are parsed
    (google/grain#1355). Programs run by `absl.app.run` have parsed theirs already; for
    the others the flags keep their defaults, as Grain's workaround does.
    """
    from absl import flags  # a dependency of Grain's

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def check_stream_options(options: dict, caller: str, stream: bool | None = None) -> bool | None:
    """Check `StreamLoader` keywords passed through `caller`; `stream`, forced where need be.

    The host-side random crop (`crop='random'`) exists only when streaming: images
    decoded into memory are already `size` squares. So that it is never dropped on
    machines where the data set happens to fit the memory budget, it forces
    streaming (True); the other options (`workers`, `threads`, `prefetch`) only
    tune the streaming path and change no batch.

    Args:
      options: the `**stream_options` the caller received.
      caller: the caller's name, for the error messages (e.g. 'folder_loader').
      stream: the caller's `stream`: True, False, or None (decide by the memory budget).

    Returns:
      `stream` as given, or True with `crop='random'`.

    Raises:
      TypeError: keywords that `StreamLoader` does not take.
      ValueError: `crop='random'` with `stream=False`.
    """
    unknown = set(options) - _STREAM_OPTIONS
    if unknown:
        raise TypeError(
            f"{caller} got unexpected keywords {sorted(unknown)} (streaming options: "
            f"{sorted(_STREAM_OPTIONS)})"
        )
    if options.get("crop") != "random":
        return stream
    if stream is False:
        raise ValueError(
            f"{caller}: crop='random' crops on the host while streaming, and stream=False "
            "decodes into memory; use stream=None or True, or with stream=False an on-device "
            "crop (augment.random_crop, augment.random_resized_crop)"
        )
    return True


def choose_stream(
    folder: str | os.PathLike,
    images: int,
    size: int,
    *,
    stream: bool | None,
    budget: int | None,
    channels: int = 3,
) -> bool:
    """Whether `images` images at `size` px stream from disk; one log line says which and why.

    The decoded size is `images * size * size * channels` bytes (ImageNet at 224 px:
    190 GB). `stream` True or False forces a path; None streams above `budget` bytes
    (default `memory_budget()`). The line goes to logger `jaxlearn.data.stream`, level INFO.

    Args:
      folder: the data's folder, as the log line names it.
      images: number of images.
      size: side of the square decoded images, in pixels.
      stream: True (stream) or False (decode into memory) forces a path; None decides.
      budget: bytes the decoded images may take; None: `memory_budget()`.
      channels: channels per pixel (default 3).

    Returns:
      True to stream from disk (`StreamLoader`), False to decode into memory.
    """
    need = images * size * size * channels
    budget = memory_budget() if budget is None else budget
    if stream is None:
        stream = need > budget
    logger.info(
        "%s: %d images at %d px take %.2f GiB decoded, budget %.2f GiB: %s",
        folder, images, size, need / 1024**3, budget / 1024**3,
        "streamed from disk (StreamLoader)" if stream else "decoded into memory (ArrayLoader)",
    )  # fmt: skip
    return bool(stream)


def memory_budget() -> int:
    """`MEMORY_FRACTION` of this machine's physical memory, in bytes (4 GiB where unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 4 * 1024**3
    return int(total * MEMORY_FRACTION)


def folder_loader(
    root: str | os.PathLike,
    split: str,
    size: int,
    batch_size: int,
    *,
    stream: bool | None = None,
    budget: int | None = None,
    train: bool = True,
    seed: int = 0,
    resize: str = "crop",
    class_names: Sequence[str] | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    **stream_options,
) -> ArrayLoader | StreamLoader:
    """A loader of ROOT/SPLIT/CLASS/*: in memory while it fits the budget, else streamed.

    Up to `budget` the folder is decoded by `load_image_folder` (cached) and served
    by an `ArrayLoader`; beyond it, a `StreamLoader` reads it from disk
    (`choose_stream`, whose log line says which and why).

    Args:
      root, split, size, resize, class_names: as `load_image_folder`.
      batch_size, train, seed, mesh: as both loaders.
      stream: True or False forces a path; None chooses by the budget.
      budget: bytes the decoded images may take (default `memory_budget()`).
      progress: `load_image_folder`'s progress bar, when it decodes into memory.
      **stream_options: `StreamLoader`'s own arguments (`workers`, `threads`,
        `prefetch`, `crop`), used when it streams; `crop='random'` streams always
        (`check_stream_options`).

    Raises:
      TypeError: a keyword that is none of these.

    Returns:
      An `ArrayLoader` or a `StreamLoader`, with the same batches for the same
      seed when no file is broken.
    """
    stream = check_stream_options(stream_options, "folder_loader", stream)
    folder, names, paths, _, _ = scan_split(root, split, class_names)
    size = check_resize(size, resize)
    if choose_stream(folder, len(paths), size, stream=stream, budget=budget):
        source = ImageFolderSource(root, split, class_names=names)
        return StreamLoader(
            source, batch_size, size, resize=resize, seed=seed, train=train, mesh=mesh,
            **stream_options,
        )  # fmt: skip
    data = load_image_folder(root, split, size, resize=resize, class_names=names,
                             progress=progress)  # fmt: skip
    return ArrayLoader(
        data.images, data.labels, batch_size, seed=seed, train=train,
        num_classes=data.num_classes, mesh=mesh,
    )  # fmt: skip
