"""The learning-rate range test (Smith 2015) and fast.ai's rules for reading its curve.

Train for a short while with a learning rate that grows from tiny to huge, one step
per value, and watch the loss: it stays flat while the LR is too small, falls while
the LR is useful and explodes once the LR is too large. A good LR sits where the
loss falls fastest, well before the explosion.

`lr_find` runs the sweep on a copy of the caller's state with the caller's own train
step and the state's own optimizer -- its momentum or Adam betas, its weight decay, its
frozen and trainable parameters -- only its learning rate replaced by the sweep, as
fast.ai's `Learner.lr_find` does. An optax optimizer has no learning rate to set from
outside, so each update is rescaled from the rate the optimizer used (which it reports
when built with `optax.inject_hyperparams`) to the sweep's; for the optimizers whose
update is proportional to the rate (SGD, momentum, Adam, AdamW, ...) that is the same
update. The caller's state is never touched, even though the jitted train step donates
its input. The suggestion rules are fast.ai's
(v2.4+: `valley`, `steep`, `minimum`, `slide`), made total: on a curve too short, flat,
diverging from the start or cut by NaN they return ``lr=None`` and say why, where
fast.ai raises (fastai issue #3658).

References:
  Smith, Cyclical Learning Rates for Training Neural Networks, WACV 2017 (arXiv 2015).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn.parallel import to_device
from jaxlearn.state import init_optimizer
from jaxlearn.steps import injected_learning_rate

#: Fewest points a curve needs (after trimming) before a rule will read it.
MIN_POINTS = 10
#: A curve whose smoothed loss varies by less than this fraction of its level is flat.
FLAT_RTOL = 1e-3


class Suggestion(NamedTuple):
    """A suggested learning rate, or None with the reason.

    Attributes:
      lr: the suggested learning rate, or None when the rule cannot read the curve.
      loss: the (smoothed) loss on the curve at ``lr``, for marking it on the plot.
      reason: why ``lr`` is None ('' when there is a suggestion).
    """

    lr: float | None
    loss: float | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class LRFindResult:
    """What the range test saw.

    Attributes:
      lrs: learning rate of each step taken.
      losses: raw training loss of each step.
      smoothed: debiased exponential moving average of ``losses``.
      suggestions: rule name -> `Suggestion`, read from the trimmed smoothed curve.
      stopped: why the sweep ended ('completed', 'diverged', 'non-finite loss',
        'data exhausted'), with the step.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestions: Mapping[str, Suggestion]
    stopped: str


def lr_sweep(start_lr: float, end_lr: float, num_steps: int, mode: str = "exp") -> np.ndarray:
    """The learning rates of the range test: ``num_steps`` values from start_lr to end_lr.

    Args:
      start_lr: first value (> 0).
      end_lr: last value (> start_lr).
      num_steps: number of values (>= 2).
      mode: 'exp' (evenly spaced in log space, fast.ai's default) or 'linear'.

    Returns:
      A float64 array whose first and last entries are start_lr and end_lr.
    """
    if not 0 < start_lr < math.inf:
        raise ValueError(f"start_lr must be finite and > 0, got {start_lr}")
    if not start_lr < end_lr < math.inf:
        raise ValueError(f"end_lr must be finite and > start_lr ({start_lr}), got {end_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if mode == "exp":
        return np.geomspace(start_lr, end_lr, num_steps)
    if mode == "linear":
        return np.linspace(start_lr, end_lr, num_steps)
    raise ValueError(f"mode must be 'exp' or 'linear', got {mode!r}")


def _is_injected(s: Any) -> bool:
    return hasattr(s, "hyperparams_states")


def _schedule_positions(state: Any) -> list:
    """Where every injected schedule of an optimizer state stands: (count, schedule states)."""
    return [
        (s.count, s.hyperparams_states)
        for s in jax.tree.leaves(state, is_leaf=_is_injected)
        if _is_injected(s)
    ]


def _at_positions(state: Any, positions: list) -> Any:
    """`state` with its injected schedules put back at `positions` (as `_schedule_positions`)."""
    it = iter(positions)

    def put(s):
        if not _is_injected(s):
            return s
        count, schedules = next(it)
        return s._replace(count=count, hyperparams_states=schedules)

    return jax.tree.map(put, state, is_leaf=_is_injected)


def sweeping(tx: optax.GradientTransformation, lrs: Any) -> optax.GradientTransformation:
    """`tx` with its learning rate replaced: update i is made at `lrs[i]`.

    `tx`'s schedules are held where they stand (its own momentum, Adam moments and
    counts go on), so every update is made at one rate of `tx`'s, which `tx`
    reports (its injected hyperparameters; the largest, the head's, under
    per-group rates, whose ratios are kept), and is rescaled from it to `lrs[i]`.
    A schedule that stands at rate 0 (a warm-up's first step) moves on until its
    rate is positive; those updates are 0.

    Args:
      tx: an optimizer built with `optax.inject_hyperparams` (anywhere inside it).
      lrs: the learning rate of each update; the last one repeats.

    Returns:
      The rescaled transformation; its state is `(tx's state, count)`.
    """
    table = to_device(lrs, np.float32)  # an array: every sweep shares one compiled step

    def init(params):
        return tx.init(params), jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
        inner, count = state
        before = _schedule_positions(inner)
        updates, inner = tx.update(updates, inner, params)
        used = injected_learning_rate(inner)
        positive = used > 0
        # Hold the schedules at a positive rate; let them move on from a zero one.
        held = jax.tree.map(
            lambda b, a: jnp.where(positive, b, a), before, _schedule_positions(inner)
        )
        inner = _at_positions(inner, held)
        want = table[jnp.minimum(count, table.shape[0] - 1)]
        scale = jnp.where(positive, want / jnp.where(positive, used, 1.0), 0.0)
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), (inner, count + 1)

    return optax.GradientTransformation(init, update)


def _epochs(batches) -> Iterable[dict]:
    """Batches forever from a loader with ``.epoch(e)``; any other iterable as it is.

    Raises:
      ValueError: (when iterated) an epoch of the loader yields no batch; chaining
        such epochs would never end.
    """
    if not hasattr(batches, "epoch"):
        return batches

    def forever():
        for e in itertools.count():
            empty = True
            for batch in batches.epoch(e):
                empty = False
                yield batch
            if empty:
                raise ValueError(f"the loader yielded no batch in epoch {e}")

    return forever()


def lr_find(
    state: Any,
    train_step: Callable[[Any, dict], tuple[Any, dict]],
    batches: Iterable[dict],
    *,
    make_tx: Callable[[optax.Schedule], optax.GradientTransformation] | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    beta: float = 0.98,
    stop_factor: float = 4.0,
    skip_start: int | None = None,
    skip_end: int = 5,
) -> LRFindResult:
    """Run the LR range test on a copy of ``state`` and suggest learning rates.

    Step i trains with ``lr_sweep(start_lr, end_lr, num_steps, mode)[i]``. The sweep
    stops early once the smoothed loss exceeds ``stop_factor`` times its best value or
    becomes NaN/inf. Defaults are fast.ai's (1e-7 to 10 in 100 steps, beta 0.98, 4x).

    Args:
      state: a `jaxlearn.state.TrainState` (anything with params, tx, opt_state and
        ``replace``). Never modified: the sweep trains a copy, with a fresh state of the
        state's own optimizer whose learning rate is the sweep's (see `sweeping`); that
        optimizer must report its rate (``optax.inject_hyperparams``, as
        `jaxlearn.transfer.freeze_to` builds them), unless ``make_tx`` is given.
      train_step: ``(state, batch) -> (state, metrics)`` with a scalar ``metrics['loss']``,
        e.g. from `jaxlearn.steps.make_train_step` (its augment and preprocess apply).
      batches: an iterable of batches, or a loader with ``.epoch(e)`` (epochs are chained).
      make_tx: ``schedule -> optax optimizer``: train the copy with
        ``make_tx(sweep_schedule)`` instead of the state's optimizer (then every
        parameter trains, unless ``make_tx`` partitions them itself).
      start_lr, end_lr, num_steps, mode: the sweep (see `lr_sweep`).
      beta: smoothing of the loss: the debiased exponential moving average
        ``avg_i / (1 - beta**(i+1))`` with ``avg_i = beta avg_{i-1} + (1 - beta) loss_i``
        (fast.ai's smooth loss; the division is Adam's bias correction).
      stop_factor: stop when the smoothed loss exceeds this multiple of its minimum
        (``math.inf``: only a non-finite loss stops the sweep).
      skip_start: points dropped from the start before the rules read the curve
        (default ``num_steps // 10``, as fast.ai).
      skip_end: points dropped from the end (default 5, as fast.ai).

    Returns:
      An `LRFindResult` with the curve and the four suggestions (see `suggest`).
    """
    lrs = lr_sweep(start_lr, end_lr, num_steps, mode)
    if not stop_factor > 1:  # NaN too: it would never stop the sweep
        raise ValueError(f"stop_factor must be > 1, got {stop_factor}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if make_tx is not None:
        table = to_device(lrs, np.float32)
        tx = make_tx(lambda count: table[jnp.minimum(count, num_steps - 1)])
    elif injected_learning_rate(state.opt_state) is None:
        raise ValueError(
            "lr_find sweeps the learning rate of the state's own optimizer, which must report "
            "it: build it with optax.inject_hyperparams (e.g. optax.inject_hyperparams("
            "optax.sgd)(learning_rate=0.1, momentum=0.9)), or pass make_tx=lambda lr: ..."
        )
    else:
        tx = sweeping(state.tx, lrs)
    # Fresh buffers: the jitted train step donates (deletes) the arrays it is given.
    # (`device_put` copies without compiling; `jnp.copy` compiled a program per shape.)
    work = jax.device_put(state, may_alias=False)
    work = work.replace(tx=tx, opt_state=init_optimizer(tx, work.params))

    losses, smoothed, best, avg = [], [], math.inf, 0.0
    stopped = "data exhausted"
    for i, batch in zip(range(num_steps), _epochs(batches), strict=False):
        work, metrics = train_step(work, batch)
        loss = float(metrics["loss"])
        avg = beta * avg + (1 - beta) * loss
        losses.append(loss)
        smoothed.append(avg / (1 - beta ** (i + 1)))
        best = min(best, smoothed[-1])
        if not math.isfinite(smoothed[-1]):
            stopped = f"non-finite loss at step {i}"
            break
        if smoothed[-1] > stop_factor * best:
            stopped = f"diverged at step {i} (smoothed loss > {stop_factor:g}x its minimum)"
            break
        if i == num_steps - 1:
            stopped = "completed"
    if make_tx is None and not float(injected_learning_rate(work.opt_state[0])) > 0:
        raise ValueError(
            "the state's optimizer used learning rate 0, and lr_find scales its updates from "
            "the rate it used to the sweep's: give the state an optimizer with a positive rate"
        )
    n = len(losses)
    lrs, smoothed = lrs[:n], np.asarray(smoothed)
    skip_start = num_steps // 10 if skip_start is None else skip_start
    return LRFindResult(
        lrs=lrs,
        losses=np.asarray(losses),
        smoothed=smoothed,
        suggestions=suggest(lrs, smoothed, skip_start=skip_start, skip_end=skip_end),
        stopped=stopped,
    )


# ------------------------------------------------------------------------------ rules


class _Unreadable(Exception):
    """The curve cannot support a suggestion; the message says why."""


def _readable(lrs, losses) -> tuple[np.ndarray, np.ndarray]:
    """The curve up to its first non-finite loss; raises _Unreadable if short or flat."""
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    if lrs.shape != losses.shape or lrs.ndim != 1:
        raise ValueError(
            f"lrs and losses must be 1-D of equal length, got {lrs.shape}, {losses.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        lrs, losses = lrs[: bad[0]], losses[: bad[0]]
    if len(losses) < MIN_POINTS:
        cut = f" (cut at the first non-finite loss, index {bad[0]})" if len(bad) else ""
        raise _Unreadable(
            f"only {len(losses)} usable points{cut}, need {MIN_POINTS}: run more steps, "
            "or lower start_lr if the loss diverged early"
        )
    span = np.max(losses) - np.min(losses)
    if span <= FLAT_RTOL * max(abs(np.median(losses)), 1e-12):
        raise _Unreadable(
            f"the loss is flat (varies by {span:.3g}): raise end_lr, or check that the model learns"
        )
    return lrs, losses


def _at(lr: float, lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """A suggestion with its loss read off the curve (interpolated in log LR)."""
    return Suggestion(float(lr), float(np.interp(np.log(lr), np.log(lrs), losses)))


def _total(rule: Callable[[np.ndarray, np.ndarray], Suggestion]):
    """Wrap a rule so that an unreadable curve gives Suggestion(None, None, reason)."""

    def wrapped(lrs, losses, **kwargs) -> Suggestion:
        try:
            return rule(*_readable(lrs, losses), **kwargs)
        except _Unreadable as e:
            return Suggestion(None, None, f"{rule.__name__}: {e}")

    wrapped.__name__, wrapped.__doc__ = rule.__name__, rule.__doc__
    return wrapped


@_total
def valley(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """fast.ai's default since 2.4: the middle of the longest valley of the curve.

    The valley ends at the point closing the longest strictly decreasing subsequence of
    the losses and spans that many points back; the suggestion is halfway through it
    (fast.ai's index ``start + int(s) + int(s / 2)`` with ``s = length / 3``).
    """
    n = len(losses)
    run = np.ones(n, np.int64)  # run[i]: longest decreasing subsequence ending at i
    for i in range(1, n):
        lower = losses[:i] > losses[i]
        if lower.any():
            run[i] = run[:i][lower].max() + 1
    end = int(np.argmax(run))
    if run[end] < 2:
        raise _Unreadable("the loss never decreases: lower start_lr")
    # fast.ai starts the valley at end - run (one point before it); start at its first point.
    start = end - int(run[end]) + 1
    third = (end - start) / 3
    return _at(lrs[start + int(third) + int(third / 2)], lrs, losses)


@_total
def steep(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """The LR where the loss falls fastest per unit of log LR (fast.ai's steep)."""
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    i = int(np.argmin(slopes))
    if slopes[i] >= 0:
        raise _Unreadable("the loss never decreases: lower start_lr")
    return _at(lrs[i], lrs, losses)


@_total
def minimum(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """A tenth of the LR at the lowest loss (fast.ai's lr_min, the pre-2.4 default)."""
    i = int(np.argmin(losses))
    if i == 0:
        raise _Unreadable("the lowest loss is at the first LR of the sweep: lower start_lr")
    return _at(lrs[i] / 10, lrs, losses)


@_total
def slide(
    lrs: np.ndarray, losses: np.ndarray, *, lr_diff: int = 15, thresh: float = 0.005
) -> Suggestion:
    """fast.ai's interval slide rule: walk back from the end to where the slope levels off.

    A window of ``lr_diff`` points slides from the end of the curve towards its start
    until the loss gradients (per step) at its two ends differ by at most ``thresh``;
    the suggestion is the left end of the last window that still differed by more.
    """
    if len(losses) <= lr_diff:
        raise _Unreadable(f"slide needs more than lr_diff={lr_diff} points, got {len(losses)}")
    grad = np.gradient(losses)
    right, left = len(losses) - 1, len(losses) - 1 - lr_diff
    suggestion = lrs[left]
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        suggestion = lrs[left]
        right, left = right - 1, left - 1
    if left < 0:
        raise _Unreadable(f"the slope never levels off within thresh={thresh}")
    return _at(suggestion, lrs, losses)


RULES: dict[str, Callable[..., Suggestion]] = {
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
    "slide": slide,
}


def suggest(
    lrs: np.ndarray, losses: np.ndarray, *, skip_start: int = 10, skip_end: int = 5
) -> dict[str, Suggestion]:
    """Every rule in `RULES` on the curve with ``skip_start`` and ``skip_end`` points dropped.

    fast.ai drops the first tenth of the sweep (the smoothed loss is still settling)
    and the last 5 points (the blow-up).

    Returns:
      Rule name -> `Suggestion`; a rule that cannot read the curve gives ``lr=None``
      and its reason, never an exception.
    """
    if skip_start < 0 or skip_end < 0:
        raise ValueError(f"skip_start and skip_end must be >= 0, got {skip_start}, {skip_end}")
    stop = len(losses) - skip_end
    lrs, losses = np.asarray(lrs)[skip_start:stop], np.asarray(losses)[skip_start:stop]
    return {name: rule(lrs, losses) for name, rule in RULES.items()}
