"""Data parallelism with `jax.jit` and `NamedSharding` over a 1-D 'data' mesh.

The batch is split along its first axis over every device (of every process);
the train state is replicated. Under `jit` XLA inserts the gradient all-reduce
itself, and BatchNorm statistics are computed over the global batch, so N
devices give the same numbers as one (tests/test_parallel.py checks 8 vs 1).
This is what JAX recommends in place of `pmap`; a `shard_map` port of pmap code
that also `pmean`s gradients would double-count them.

A global batch that does not divide by the device count is an error, not
silently padded: training batches are dropped-last by the loader and
evaluation batches are padded by it with `mask=False` rows, so the loader is
the one place that decides what padding means.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Name of the mesh axis the batch is split over.
DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> None:
    """Start a multi-process run (`jax.distributed.initialize`), before any JAX computation.

    Each process then sees every device of the run in `jax.devices()` and
    feeds only its own part of each global batch (`shard_batch`). On CPU the
    collectives go over gloo (`jax_cpu_collectives_implementation`).

    Args:
      coordinator_address: 'host:port' of process 0; None lets JAX detect a cluster.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      **kwargs: passed on to `jax.distributed.initialize`.
    """
    # Only the CPU client reads this; asking for the backend first would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def to_device(x: Any, dtype: Any = None) -> jax.Array:
    """A host value (NumPy array, list, number) as a device array, compiling nothing.

    In jax 0.10 `jnp.asarray` of a NumPy array runs a program (`jit(stage)`, or a
    conversion when the dtype changes), compiled once per shape and dtype: 10-40 ms
    each on CPU, paid again for every new shape of a table, batch or weight. Here the
    conversion is NumPy's and the buffer is copied as it is. JAX arrays pass through
    (cast when `dtype` differs).
    """
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype))


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must not be empty")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_of(loader: Any) -> Mesh | None:
    """The mesh `loader` splits its batches over; None for the default (every device).

    What the steps of a loop over `loader` should be built with, so they run where
    its batches are; None keeps the default `make_train_step()` objects, whose
    compiled programs every other user of the default shares.
    """
    mesh = getattr(loader, "mesh", None)
    return None if mesh is None or mesh == data_mesh() else mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; ValueError unless it divides evenly.

    Args:
      global_batch_size: examples per step over all processes and devices.
      mesh: the data mesh.

    Returns:
      `global_batch_size // jax.process_count()`.
    """
    n = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"batch_size={global_batch_size} must be a positive multiple of the number of "
            f"devices ({n}); pad evaluation batches with mask=False rows instead"
        )
    return global_batch_size // jax.process_count()


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Put this process's part of a global batch on the mesh, split along axis 0.

    In a single process `batch` is the whole global batch; with P processes
    each passes its own 1/P of the rows (in process order) and gets back the
    global array.

    Args:
      batch: dict of host arrays with the same leading size.
      mesh: the data mesh.

    Returns:
      The same dict of global `jax.Array`s sharded over 'data'.
    """
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"batch arrays must share a leading batch axis, got sizes {sizes}")
    local = next(iter(sizes.values()))
    local_batch_size(local * jax.process_count(), mesh)
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A full copy of `tree` on every device of the mesh (all processes pass equal values)."""
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )
