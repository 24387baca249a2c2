"""Snapshot ensembles and test-time augmentation as vmapped parameter pytrees.

A snapshot ensemble (Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for
free") keeps the weights at the end of every cycle of a cyclic schedule (SGDR) and
averages the members' predictions. Here a snapshot is a `{'params', 'batch_stats'}`
pytree and the ensemble is a list of them. Prediction stacks the list once (a leading
member axis on every leaf) and `jax.vmap`s the model's apply over that axis, so M
members cost one compilation and one device program instead of M.

Members are combined by the mean of their softmax probabilities (the paper's choice,
the default) or by the mean of their logits. Test-time augmentation (fast.ai's TTA)
goes through the same combiner: the model's predictions on several views of each
image (flips, shifted crops) are averaged like ensemble members.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxlearn.data.augment import tta_views
from jaxlearn.inference import apply_batched
from jaxlearn.schedules import CyclicSchedule

PyTree = Any
COMBINE = ("prob", "logits")


def stack(snapshots: Sequence[PyTree]) -> PyTree:
    """A list of M same-structured pytrees -> one pytree whose leaves have a leading M axis.

    Args:
      snapshots: a non-empty sequence of pytrees (e.g. `{'params', 'batch_stats'}`) of
        one structure and leaf shapes.

    Raises:
      ValueError: if ``snapshots`` is empty or the members differ in structure or shapes.
    """
    if not isinstance(snapshots, Sequence) or len(snapshots) == 0:
        raise ValueError("snapshots must be a non-empty list of variable pytrees")
    first = jax.tree.structure(snapshots[0])
    shapes = [jnp.shape(x) for x in jax.tree.leaves(snapshots[0])]
    for i, s in enumerate(snapshots[1:], 1):
        if jax.tree.structure(s) != first or [jnp.shape(x) for x in jax.tree.leaves(s)] != shapes:
            raise ValueError(f"snapshots[{i}] differs in structure or shapes from snapshots[0]")
    return _stacked(*snapshots)


# One program per structure and member count. Eagerly, `jnp.stack` (and indexing, in
# `unstack`) compiled a program per distinct leaf shape: 21 for a ResNet-18.
@jax.jit
def _stacked(*snapshots: PyTree) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *snapshots)


@jax.jit
def _unstacked(stacked: PyTree) -> list[PyTree]:
    members = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(members)]


def num_members(stacked: PyTree) -> int:
    """Size M of the leading member axis of a stacked pytree.

    Args:
      stacked: a pytree stacked along a leading member axis (`stack`); only its first
        leaf is read.

    Raises:
      ValueError: a pytree without arrays.
    """
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("stacked pytree has no arrays")
    return int(jnp.shape(leaves[0])[0])


def unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of `stack`: a pytree with a leading M axis -> list of M pytrees.

    Args:
      stacked: a pytree stacked along a leading member axis (`stack`).

    Raises:
      ValueError: a pytree without arrays.
    """
    num_members(stacked)  # a ValueError when it holds no arrays
    return _unstacked(stacked)


def _as_stacked(members: Sequence[PyTree] | PyTree) -> PyTree:
    """A list of snapshots is stacked; a pytree is taken as already stacked.

    Raises:
      ValueError: a pytree whose leaves do not share a leading (member) axis, such
        as one model's variables: they would fail later, blamed on the images.
    """
    if isinstance(members, list | tuple):
        return stack(members)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(members)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "members must be a list of variables pytrees, or one pytree stacked along a "
            f"leading member axis (`stack`); got a pytree whose leaves lead with {sizes}: "
            "one model's variables? pass [variables]"
        )
    return members


def member_logits(
    apply_fn: Callable[..., jax.Array],
    members: Sequence[PyTree] | PyTree,
    images: jax.Array | np.ndarray,
    *,
    views_fn: Callable[[jax.Array], jax.Array] | None = None,
    batch_size: int = 256,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    member_batch: int | None = None,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Logits of every member on every view of every image, shape (M, V, N, C).

    One compiled program runs the members (vmapped ``member_batch`` at a time) over
    chunks of ``batch_size`` images: `jaxlearn.inference.apply_batched`, the
    primitive under every inference path.

    Args:
      apply_fn: ``apply_fn(variables, x, train=False) -> logits``.
      members: list of ``{'params', 'batch_stats'}`` pytrees, or one stacked pytree.
      images: (N, ...) raw images (uint8 or float), as the loader yields them.
      views_fn: ``images -> (V, N, ...)`` test-time views of a chunk, applied before
        ``preprocess`` (e.g. `jaxlearn.data.augment.tta_views`); None: one view, V = 1.
      batch_size: images per chunk.
      preprocess: ``images -> float images``, as in training (default uint8 -> [0, 1]).
      member_batch: members vmapped at once; None: all of them on an accelerator, one
        at a time on CPU (see `jaxlearn.inference.apply_batched`).
      compute_dtype: e.g. `jnp.bfloat16`, the precision the members trained in.
      mesh: devices to split the chunks over (default: all).

    Returns:
      A float32 NumPy array (M, V, N, C).

    Raises:
      ValueError: bad arguments, or images that do not fit the model (naming their shape).
    """
    logits = apply_batched(
        apply_fn, _as_stacked(members), images, batch_size=batch_size, preprocess=preprocess,
        views_fn=views_fn, stacked=True, member_batch=member_batch,
        compute_dtype=compute_dtype, mesh=mesh,
    )  # fmt: skip
    return logits if views_fn is not None else logits[:, None]


def _check_combine(combine: str) -> None:
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")


# Combining runs in NumPy on the host: the logits are already there (`apply_batched`
# returns NumPy), and eager jax ops would compile a handful of programs for every new
# (K, N, C) shape (the test suite compiled 314 of them, 7 s).
def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _averaged(logits: np.ndarray, combine: str) -> np.ndarray:
    """What the combiner averages over members: softmax probabilities or raw logits."""
    _check_combine(combine)
    logits = np.asarray(logits, np.float32)
    return _softmax(logits) if combine == "prob" else logits


def _to_probs(mean: np.ndarray, combine: str) -> np.ndarray:
    """The averaged quantity -> probabilities (the softmax of mean logits for 'logits')."""
    return mean if combine == "prob" else _softmax(mean)


def combine_logits(logits: jax.Array | np.ndarray, combine: str = "prob") -> np.ndarray:
    """Combine K predictions (K, N, C) of logits into (N, C) probabilities.

    ``'prob'``: the mean of the K softmax distributions (Huang et al. 2017).
    ``'logits'``: the softmax of the mean logit (a geometric mean of the distributions,
    renormalised).

    Args:
      logits: (K, N, C) logits of K members or views.
      combine: ``'prob'`` (default) or ``'logits'``, as above.

    Returns:
      (N, C) float32 probabilities as a NumPy array.

    Raises:
      ValueError: ``logits`` that are not 3-D, or an unknown ``combine``.
    """
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (K, N, C), got {logits.shape}")
    return _to_probs(np.mean(_averaged(logits, combine), axis=0), combine)


def predict(
    apply_fn: Callable[..., jax.Array],
    members: Sequence[PyTree] | PyTree,
    images: jax.Array | np.ndarray,
    *,
    combine: str = "prob",
    batch_size: int = 256,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    member_batch: int | None = None,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Ensemble class probabilities (N, C): every member on every image, then combined.

    Args:
      apply_fn, members, images, batch_size, preprocess, member_batch, compute_dtype, mesh:
        as in `member_logits`.
      combine: 'prob' (mean of softmax probabilities, default) or 'logits' (mean logit).

    Returns:
      (N, C) probabilities as a NumPy array.
    """
    _check_combine(combine)  # before any work
    logits = member_logits(
        apply_fn, members, images, batch_size=batch_size, preprocess=preprocess,
        member_batch=member_batch, compute_dtype=compute_dtype, mesh=mesh,
    )  # fmt: skip
    return combine_logits(logits[:, 0], combine)


def predict_tta(
    apply_fn: Callable[..., jax.Array],
    variables: PyTree,
    images: jax.Array | np.ndarray,
    views_fn: Callable[[jax.Array], jax.Array] = tta_views,
    *,
    combine: str = "prob",
    batch_size: int = 256,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Test-time augmentation: one model's probabilities averaged over views of each image.

    Args:
      apply_fn: ``apply_fn(variables, x, train=False) -> logits``.
      variables: one model's ``{'params', 'batch_stats'}``.
      images: (N, ...) raw images.
      views_fn: ``images -> (V, N, ...)``; default `tta_views` (the image and its mirror).
        E.g. ``functools.partial(tta_views, shifts=((0, 0), (-4, -4), (4, 4)))`` adds
        shifted crops.
      combine, batch_size, preprocess, compute_dtype, mesh: as in `predict`.

    Returns:
      (N, C) probabilities as a NumPy array.
    """
    _check_combine(combine)
    one = stack([variables])
    logits = member_logits(
        apply_fn, one, images, views_fn=views_fn, batch_size=batch_size, preprocess=preprocess,
        compute_dtype=compute_dtype, mesh=mesh,
    )  # fmt: skip
    return combine_logits(logits[0], combine)


class EnsembleCurve(NamedTuple):
    """Accuracy of the first-k-snapshot ensembles (k = 1 .. M) and of each member alone."""

    ensemble: np.ndarray
    members: np.ndarray


def mean_curve(curves: Sequence[EnsembleCurve]) -> EnsembleCurve:
    """The point-wise mean of several runs' curves (e.g. one per seed), for plotting.

    Args:
      curves: `EnsembleCurve`s of one length, e.g. `accuracy_curve`'s of each seed.

    Returns:
      An `EnsembleCurve` of the means.

    Raises:
      ValueError: no curves, or curves of different lengths (different snapshot counts).
    """
    lengths = {len(np.asarray(c.ensemble)) for c in curves} | {
        len(np.asarray(c.members)) for c in curves
    }
    if len(lengths) != 1:
        raise ValueError(f"need one or more curves of one length, got lengths {sorted(lengths)}")
    return EnsembleCurve(
        ensemble=np.mean([np.asarray(c.ensemble) for c in curves], axis=0),
        members=np.mean([np.asarray(c.members) for c in curves], axis=0),
    )


def accuracy_curve(
    apply_fn: Callable[..., jax.Array],
    members: Sequence[PyTree] | PyTree,
    images: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    *,
    combine: str = "prob",
    batch_size: int = 256,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    member_batch: int | None = None,
    views_fn: Callable[[jax.Array], jax.Array] | None = None,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
) -> EnsembleCurve:
    """Accuracy of the ensemble of the first k snapshots, for every k (Huang et al.'s curve).

    Every member's predictions are computed once (arguments as in `predict`); the
    k-member ensembles are running (cumulative) means of them. With `views_fn`
    (e.g. `jaxlearn.data.augment.tta_views`) each member's prediction is its TTA
    average over the views, as in `predict_tta`, so the curve is that of TTA ensembles.

    Args:
      apply_fn, members, images, batch_size, preprocess, member_batch, compute_dtype, mesh:
        as in `member_logits`.
      labels: (N,) integer labels of ``images``.
      combine: 'prob' (mean of softmax probabilities, default) or 'logits' (mean logit),
        over the members and over the views alike.
      views_fn: ``images -> (V, N, ...)`` test-time views, as in `member_logits`; None:
        the images alone.

    Returns:
      `EnsembleCurve`: ``ensemble[k-1]`` is the accuracy of snapshots 0 .. k-1 combined,
      ``members[i]`` that of snapshot i alone (both NumPy arrays of length M).

    Raises:
      ValueError: ``labels`` not of shape (N,), an unknown ``combine``, or
        `member_logits`'s errors.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    _check_combine(combine)
    logits = member_logits(
        apply_fn, members, images, batch_size=batch_size, preprocess=preprocess,
        member_batch=member_batch, views_fn=views_fn, compute_dtype=compute_dtype, mesh=mesh,
    )  # fmt: skip
    # Each member's views averaged first (probabilities or logits, as `combine` says).
    scores = np.mean(_averaged(logits, combine), axis=1)
    k = np.arange(1, scores.shape[0] + 1, dtype=np.float32)[:, None, None]
    running = _to_probs(np.cumsum(scores, axis=0) / k, combine)
    hits = lambda scores: np.mean(np.argmax(scores, -1) == labels, axis=-1)
    return EnsembleCurve(ensemble=hits(running), members=hits(scores))


def snapshot_steps(
    schedule: CyclicSchedule, num_cycles: int | None = None, *, num_steps: int | None = None
) -> list[int]:
    """Step counts at which to capture snapshots: just after the last step of each cycle.

    The schedule is the single source of truth: its ``cycle_ends`` gives the 0-based
    index of each cycle's last update (where SGDR reaches its minimum); after that
    update ``state.step`` equals index + 1, which is what `jaxlearn.loop.CaptureParams`
    compares against. Use as ``CaptureParams(snapshot_steps(schedule, 5))``.

    Args:
      schedule: a `jaxlearn.schedules.CyclicSchedule` (e.g. from `sgdr`).
      num_cycles, num_steps: as in ``schedule.cycle_ends``.

    Returns:
      Increasing positive step counts, one per cycle.
    """
    if not isinstance(schedule, CyclicSchedule):
        raise ValueError(
            f"schedule must be a jaxlearn.schedules.CyclicSchedule (from sgdr), got {schedule!r}"
        )
    return [end + 1 for end in schedule.cycle_ends(num_cycles, num_steps=num_steps)]


def save_snapshots(path: str | os.PathLike, snapshots: Sequence[PyTree]) -> None:
    """Write a list of snapshots to the directory ``path`` with Orbax (stacked, one array per leaf).

    Args:
      path: a directory that does not exist yet.
      snapshots: the variable pytrees, of one structure and shapes (`stack`'s ValueError
        otherwise).

    Raises:
      ValueError: if ``path`` exists already (Orbax would refuse; pick a new directory).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise ValueError(f"path {path} exists already; snapshots are written to a new directory")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, stack(snapshots))
    checkpointer.wait_until_finished()


def load_snapshots(path: str | os.PathLike) -> list[PyTree]:
    """Read snapshots written by `save_snapshots` back as a list of pytrees.

    Args:
      path: the directory `save_snapshots` wrote.

    Returns:
      The snapshots, in the order they were saved.

    Raises:
      FileNotFoundError: if ``path`` is not a directory.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no snapshot directory at {path}")
    return unstack(ocp.StandardCheckpointer().restore(path))
