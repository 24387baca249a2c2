"""In-memory batch loader whose data order is a pure function of (seed, epoch).

Small data sets (CIFAR-10 is 150 MB as uint8) are copied to every device once
and each batch is gathered there by a jitted `take`: per step only the batch's
indices (4 bytes an example) cross from the host, never the pixels. That is the
airbench recipe (no data loader at all: 94% on CIFAR-10 in 2.6 s on an A100).
Larger data sets, or runs over several processes, stay in host memory: each step
gathers one global batch, takes this process's share of its rows and puts them
on the device mesh (`shard_batch`). Either way the permutation of epoch `e` is
`default_rng([seed, e]).permutation(n)`, so a run resumed at (epoch, step) sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlearn.parallel import (
    batch_sharding,
    data_mesh,
    local_batch_size,
    replicated_sharding,
    shard_batch,
)

#: Data sets up to this size are kept on the device by default (a replica on every
#: device: 8 copies of CIFAR-10 take 1.2 GB, small next to an accelerator's memory).
DEVICE_RESIDENT_BYTES = 2 * 1024**3


class ArrayLoader:
    """Batches of `{'image', 'label'[, 'mask']}` from in-memory arrays, sharded on a mesh.

    Training loaders shuffle each epoch and drop the last partial batch (every
    step sees `batch_size` examples, so BatchNorm statistics and the LR per
    example stay constant). Evaluation loaders keep the order and pad the last
    batch with `mask=False` rows, so every example counts exactly once.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        train: bool = True,
        num_classes: int | None = None,
        mesh: Mesh | None = None,
        on_device: bool | None = None,
    ):
        """Check the arrays and the batch size; copy small data sets to the devices.

        Args:
          images: (N, H, W, C) array (uint8 or float).
          labels: (N,) integer labels.
          batch_size: global examples per step (over all processes); must be a
            multiple of the device count.
          seed: seed of the per-epoch shuffle (training only).
          train: shuffle and drop the last partial batch (True) or keep order and pad (False).
          num_classes: when given, labels outside [0, num_classes) are a ValueError.
          mesh: data mesh (default `data_mesh()`).
          on_device: keep the arrays on every device and gather batches there (True),
            or in host memory (False). Default: on the device when the arrays take at
            most `DEVICE_RESIDENT_BYTES` and the run is a single process (with several
            processes each one feeds its own rows from the host).
        """
        images, labels = check_examples(images, labels, num_classes)
        self.mesh = mesh or data_mesh()
        self._local = local_batch_size(batch_size, self.mesh)
        if train and batch_size > len(images):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(images)} training examples")
        self.images, self.labels = images, labels.astype(np.int32)
        self.batch_size, self.seed, self.train = batch_size, seed, train
        if on_device is None:
            small = images.nbytes + labels.nbytes <= DEVICE_RESIDENT_BYTES
            on_device = small and jax.process_count() == 1
        if on_device and jax.process_count() > 1:
            raise ValueError("on_device=True needs a single process; feed from the host instead")
        self.on_device = on_device
        if on_device:
            replicated = replicated_sharding(self.mesh)
            self._resident = jax.device_put((self.images, self.labels), replicated)
            self._take = jax.jit(
                _take, static_argnames="train", out_shardings=batch_sharding(self.mesh)
            )

    @property
    def num_examples(self) -> int:
        """Number of examples in the data set."""
        return len(self.images)

    def __len__(self) -> int:
        """Steps per epoch."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.train else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch`, in the order they are served (pure in seed, epoch)."""
        if not self.train:
            return np.arange(self.num_examples)
        return epoch_order(self.seed, epoch, self.num_examples)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Yield the batches of `epoch` from `start_step` on, sharded on the mesh.

        Args:
          epoch: epoch index (selects the shuffle).
          start_step: first step within the epoch (to resume mid-epoch).
        """
        order = self.order(epoch)
        first = jax.process_index() * self._local
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            if self.on_device:
                yield self._take(*self._resident, self._padded(idx), len(idx), train=self.train)
                continue
            batch = {"image": self.images[idx], "label": self.labels[idx]}
            if not self.train:
                pad = self.batch_size - len(idx)
                batch["mask"] = np.arange(self.batch_size) < len(idx)
                batch["image"] = np.pad(
                    batch["image"], [(0, pad)] + [(0, 0)] * (batch["image"].ndim - 1)
                )
                batch["label"] = np.pad(batch["label"], (0, pad))
            local = {k: v[first : first + self._local] for k, v in batch.items()}
            yield shard_batch(local, self.mesh)

    def _padded(self, idx: np.ndarray) -> np.ndarray:
        """`idx` padded with index 0 to a full batch (the padded rows are masked out).

        Only the last evaluation batch is short: np.pad on every step cost 46 us of a
        0.15 ms MLP step (benchmarks/bench_fit.py).
        """
        short = self.batch_size - len(idx)
        return (np.pad(idx, (0, short)) if short else idx).astype(np.int32, copy=False)

    def __iter__(self) -> Iterator[dict]:
        """The batches of epoch 0 (for evaluation loaders)."""
        return self.epoch(0)


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffle of a training epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def check_examples(
    images: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) as arrays, after checking they are examples a step can train on.

    Raises:
      ValueError: images not a non-empty (N, ...) array; labels not integers of shape
        (N,) (float labels would be truncated, (N, 1) ones broadcast); labels outside
        [0, num_classes) when it is given.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, ...) array, got shape {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer array of shape ({len(images)},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), "
            f"got min {labels.min()} max {labels.max()}"
        )
    return images, labels


def _take(images: jax.Array, labels: jax.Array, idx: jax.Array, valid, train: bool) -> dict:
    """Gather one batch on the device; evaluation batches get a mask of the `valid` rows."""
    batch = {"image": jnp.take(images, idx, axis=0), "label": jnp.take(labels, idx, axis=0)}
    if not train:  # padded rows read as zeros, exactly as the host path pads them
        mask = jnp.arange(idx.shape[0]) < valid
        batch = {
            k: jnp.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0) for k, v in batch.items()
        }
        batch["mask"] = mask
    return batch
