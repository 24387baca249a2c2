"""One way to run a model over many images: pad, shard, compile once, unpad.

Every inference path of jaxlearn goes through here -- the eval step, snapshot
ensembles and TTA, features of a frozen body, the data-set loss of the sharpness
measure, the many-model evaluation of the flat-minima experiment -- so padding,
sharding, input validation and the compiled program are written once:

- `forward` is the pure forward pass: preprocess, optional test-time views,
  optional stacked members, inference-mode apply in the computation dtype,
  float32 out.
- `apply_batched` runs it over host images in chunks of one shape (the last one
  padded with zero rows, so one compilation serves every chunk), split over the
  devices, with the padding dropped from the result.
- `map_batches` does the same inside `jit` (a `lax.map` over chunks), for
  quantities that must stay differentiable or vmappable.

Compiled programs are shared by value (`jaxlearn.programs`): the model by its
Flax module's fields, `preprocess` and `views_fn` by what they compute, so an
inline `lambda` passed on every call compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlearn import programs
from jaxlearn.parallel import (
    batch_sharding,
    data_mesh,
    local_batch_size,
    replicate,
    replicated_sharding,
    shard_batch,
)

PyTree = Any


def default_preprocess(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images -> float32 unchanged."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def check_compute_dtype(compute_dtype: Any) -> Any:
    """None or float32 (full precision) or bfloat16; float16 is refused.

    float16's 5-bit exponent underflows small gradients unless the loss is scaled
    dynamically, which jaxlearn does not do; bfloat16 keeps float32's range at the
    same memory and speed, so it needs no scaling.
    """
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError as e:
        raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}") from e
    if dtype == jnp.float16:
        raise ValueError(
            "compute_dtype float16 needs dynamic loss scaling, which jaxlearn does not do; "
            "use jnp.bfloat16 (float32's range, no scaling needed)"
        )
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
    return dtype


def with_compute_dtype(apply_fn: Callable, compute_dtype: Any) -> Callable:
    """`apply_fn` of the same Flax module computing in `compute_dtype` (None: its own dtype).

    The models cast parameters to their `dtype` inside each layer and keep the
    parameters, BatchNorm statistics and logits float32, so this is all mixed
    precision needs: convolutions and matmuls run in bf16, the rest stays float32.
    float32 makes a module built for bf16 compute in float32.

    Raises:
      ValueError: `apply_fn` is not a Flax module's `apply`, or the module has no
        `dtype` attribute to set; a module built with dtype float16 (it would train
        without the loss scaling float16 needs: `check_compute_dtype`).
    """
    module = programs.module_of(apply_fn)
    if compute_dtype is None:
        if module is not None and getattr(module, "dtype", None) == jnp.float16:
            check_compute_dtype(jnp.float16)  # the same refusal, for the model's own dtype
        return apply_fn
    if compute_dtype == jnp.float32 and not hasattr(module, "dtype"):
        return apply_fn  # no dtype to set: it computes in its parameters' float32
    if module is None or not hasattr(module, "dtype"):
        raise ValueError(
            f"compute_dtype={jnp.dtype(compute_dtype).name} needs the state's apply_fn to be a "
            f"Flax module's apply with a `dtype` attribute, got {apply_fn!r}"
        )
    return module.clone(dtype=compute_dtype).apply


class Spec(NamedTuple):
    """The static part of a forward pass (hashable; equal specs share one program)."""

    model: programs.Keyed
    preprocess: programs.Keyed
    views: programs.Keyed | None
    stacked: bool
    member_batch: int | None
    features_only: bool
    compute_dtype: Any


def forward_spec(
    apply_fn: Callable,
    images: Any,
    *,
    preprocess: Callable | None = None,
    views_fn: Callable | None = None,
    stacked: bool = False,
    member_batch: int | None = None,
    features_only: bool = False,
    compute_dtype: Any = None,
    by_value: bool = True,
) -> tuple[Spec, tuple]:
    """The static spec of a forward pass over batches shaped like `images`, and its constants.

    Args:
      apply_fn: `apply_fn(variables, x, train=False) -> logits`.
      images: one batch (or its `jax.ShapeDtypeStruct`), as the data yields it.
      preprocess: `images -> float images` (default uint8 -> [0, 1]).
      views_fn: `images -> (V, B, ...)` test-time views, before `preprocess`.
      stacked: the variables carry a leading member axis (a snapshot ensemble).
      member_batch: members computed at once with `stacked` (`lax.map` batch size).
      features_only: return the model's penultimate features instead of logits.
      compute_dtype: None/float32 or bfloat16.
      by_value: key `preprocess` and `views_fn` by what they compute, so equal
        functions share a compiled program (from the host); False keys them by
        identity without tracing them (inside a trace, where they may close over
        traced values).

    Returns:
      `(spec, consts)` for `forward`.
    """
    compute_dtype = check_compute_dtype(compute_dtype)
    preprocess = preprocess or default_preprocess
    if not by_value:
        keys = programs.by_identity(preprocess), views_fn and programs.by_identity(views_fn)
        consts = ((), ())
    else:
        aval = jax.ShapeDtypeStruct(np.shape(images), images.dtype)
        view_key, view_consts = None, ()
        if views_fn is not None:
            view_key, view_consts = programs.function_program(views_fn, aval)
            out = jax.eval_shape(views_fn, aval)
            aval = jax.ShapeDtypeStruct(out.shape[1:], out.dtype)
        prep_key, prep_consts = programs.function_program(preprocess, aval)
        keys, consts = (prep_key, view_key), (prep_consts, view_consts)
    spec = Spec(
        programs.model_key(apply_fn), *keys, stacked, member_batch, features_only, compute_dtype
    )
    return spec, consts


def forward(spec: Spec, variables: PyTree, consts: tuple, images: jax.Array) -> jax.Array:
    """The pure forward pass of `spec`: float32 logits (or features).

    Shape `[M,] [V,] B, C`: M members when `spec.stacked`, V views when the spec
    has a `views_fn`.
    """
    apply_fn = with_compute_dtype(spec.model.value, spec.compute_dtype)
    preprocess = programs.bind(spec.preprocess, consts[0])
    kwargs = {"features_only": True} if spec.features_only else {}

    def one(v, x):
        return apply_fn(v, preprocess(x), train=False, **kwargs).astype(jnp.float32)

    if spec.views is None:
        run = one
    else:
        views_fn = programs.bind(spec.views, consts[1])
        run = lambda v, x: jax.vmap(one, in_axes=(None, 0))(v, views_fn(x))
    if not spec.stacked:
        return run(variables, images)
    return jax.lax.map(lambda v: run(v, images), variables, batch_size=spec.member_batch)


def check_images(images: Any) -> Any:
    """Images as a non-empty (N, ...) array, else a ValueError naming the shape."""
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, ...) array, got shape {images.shape}")
    return images


def check_fits(fn: Callable, *args: Any, what: str) -> None:
    """Trace `fn(*args)` without running it; a failure becomes a ValueError naming `what`.

    A batch of the wrong rank or size otherwise fails deep inside Flax
    (`ScopeParamShapeError`, a dot_general shape error) with no word about the
    input. A jitted `fn` is traced through its own cache (`fn.trace`), so the call
    that follows does not trace again.
    """
    try:
        if hasattr(fn, "trace"):
            fn.trace(*args)
        else:
            jax.eval_shape(fn, *args)
    except Exception as e:  # a trace error: the input, or the step's own settings
        message = str(e).split("\n")[0][:500]
        raise ValueError(
            f"{what} does not fit the model (tracing the step on it failed): "
            f"{type(e).__name__}: {message}"
        ) from e


def pad_rows(x: Any, size: int) -> Any:
    """`x` (NumPy or JAX) padded with zero rows along axis 0 to `size` rows."""
    widths = [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)


_JITTED: dict[Mesh, Callable] = {}


def _jitted(mesh: Mesh) -> Callable:
    """`forward` compiled for `mesh`: batch split over 'data', the rest replicated."""
    if mesh not in _JITTED:
        replicated = replicated_sharding(mesh)
        _JITTED[mesh] = jax.jit(
            forward,
            static_argnums=0,
            in_shardings=(replicated, replicated, batch_sharding(mesh)),
            out_shardings=replicated,
        )
    return _JITTED[mesh]


def apply_batched(
    apply_fn: Callable,
    variables: PyTree,
    images: Any,
    *,
    batch_size: int = 256,
    preprocess: Callable | None = None,
    views_fn: Callable | None = None,
    stacked: bool = False,
    member_batch: int | None = None,
    features_only: bool = False,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Run a model over every image: logits (or features) as one NumPy array.

    Images go through in chunks of `batch_size` (rounded up to a multiple of the
    device count), each split over the devices of `mesh`; the last chunk is padded
    with zero rows, so every chunk runs the same compiled program, and the padded
    rows are dropped. All chunks are dispatched before any result is fetched.

    Args:
      apply_fn: `apply_fn(variables, x, train=False) -> logits`.
      variables: `{'params', 'batch_stats'}`, or a stacked pytree of members.
      images: (N, ...) raw images (uint8 or float), as the loader yields them.
      batch_size: images per chunk.
      preprocess, views_fn, stacked, features_only, compute_dtype: see `forward_spec`.
      member_batch: members computed at once with `stacked`. None: all of them on
        an accelerator, 1 on CPU, because vmapping convolutions over members makes
        them grouped convolutions, which XLA:CPU runs slowly (ResNet-20, M = 5:
        vmap 5x slower than a loop, members in sequence 1.5x faster;
        benchmarks/results/ensemble.json).
      mesh: devices to split chunks over (default: all).

    Returns:
      float32 array of shape `[M,] [V,] N, C` (see `forward`); a model whose output per
      image is not a vector gives `[M,] [V,] N, ...` alike.

    Raises:
      ValueError: bad arguments, or images that do not fit the model (the message
        names their shape).
    """
    images = check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if member_batch is not None and member_batch < 1:
        raise ValueError(f"member_batch must be >= 1 or None, got {member_batch}")
    if stacked and member_batch is None:
        leaves = jax.tree.leaves(variables)
        if not leaves:
            raise ValueError("stacked variables hold no arrays")
        member_batch = 1 if jax.default_backend() == "cpu" else int(np.shape(leaves[0])[0])
    mesh = mesh or data_mesh()
    n, devices = images.shape[0], mesh.devices.size
    chunk = -(-min(batch_size, n) // devices) * devices
    local = local_batch_size(chunk, mesh)
    first = jax.process_index() * local
    spec, consts = forward_spec(
        apply_fn, jax.ShapeDtypeStruct((chunk, *images.shape[1:]), images.dtype),
        preprocess=preprocess, views_fn=views_fn, stacked=stacked,
        member_batch=member_batch, features_only=features_only, compute_dtype=compute_dtype,
    )  # fmt: skip
    variables, consts = replicate((variables, consts), mesh)
    run = _jitted(mesh)
    outputs = []
    for start in range(0, n, chunk):
        x = images[start : start + chunk]
        rows = x.shape[0]
        x = shard_batch({"image": pad_rows(x, chunk)[first : first + local]}, mesh)["image"]
        if start == 0:
            what = f"the input, images of shape {images.shape} ({images.dtype}),"
            check_fits(run, spec, variables, consts, x, what=what)
        outputs.append((run(spec, variables, consts, x), rows))
    axis = int(stacked) + int(views_fn is not None)  # the images' (after members, views)
    keep = (slice(None),) * axis
    return np.concatenate([np.asarray(out)[(*keep, slice(rows))] for out, rows in outputs], axis)


def map_batches(fn: Callable, xs: PyTree, batch_size: int | None) -> PyTree:
    """`fn` over the rows of `xs` in chunks of `batch_size`, inside `jit` (pure).

    The rows are padded with zeros to whole chunks, the chunks run one after
    another (`lax.map`, bounding memory), and the padded rows are dropped from the
    result, so `fn` must work row by row (no reduction over the batch). None runs
    all rows at once.

    Args:
      fn: `xs_chunk -> outputs`, every output with the chunk's rows on axis 0.
      xs: pytree of arrays sharing their leading size N.
      batch_size: rows per chunk (>= 1) or None.

    Returns:
      `fn`'s outputs for all N rows.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if batch_size is None or batch_size >= n:
        return fn(xs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = -(-n // batch_size)
    shaped = jax.tree.map(
        lambda a: pad_rows(a, chunks * batch_size).reshape(chunks, batch_size, *a.shape[1:]), xs
    )
    out = jax.lax.map(fn, shaped)
    return jax.tree.map(lambda a: a.reshape(chunks * batch_size, *a.shape[2:])[:n], out)
