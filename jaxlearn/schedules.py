"""Learning-rate and momentum schedules: pure `step -> value` functions (optax.Schedule).

Every schedule here can be passed straight to an Optax optimizer
(`optax.sgd(learning_rate=sgdr(...), momentum=0.9)`): it is jittable and vmappable and
returns float32. Conventions shared by all of them:

- Step `t` is the 0-based index of the update: optax evaluates the schedule at its
  update count, so the first update uses `schedule(0)`.
- Integer arithmetic locates a step (which cycle, which position), so cycle boundaries
  are exact. Traced steps are int32 (optax's counter) and saturate just below 2**31;
  plain Python ints and floats (e.g. a global step kept in a script) are located with
  int64 arithmetic, so steps beyond 2**31 give the right value instead of overflowing.
  Float steps are floored; negative steps read as step 0.
- Bad arguments raise ValueError naming the argument when the schedule is built.

Cycle arithmetic (lengths, starts, ends) lives in one place, `_Cycles`, which drives
`sgdr`, `cosine_warmup`, `fastai_cos_anneal` and `cycle_ends` alike, so the schedule that
drives the optimizer is also the one that says where cycles end (snapshot ensembles ask
`schedule.cycle_ends(...)`).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from jaxlearn.parallel import to_device

_INT32_MAX = 2**31 - 1
# Python-int steps are located in int64; 2**62 leaves headroom for `t - warmup` and sums.
_MAX_STEP = 2**62
# Traced float steps are clamped here before the cast to int32: the largest float32
# below 2**31 (the float32 spacing there is 128), so the cast never overflows.
_MAX_TRACED_FLOAT_STEP = 2.0**31 - 128
# An unbounded schedule with cycle_mult > 1 keeps a table of cycle starts up to 2**62:
# cycle_mult = 1.0001 needs ~3.3e5 entries (2.6 MB); closer to 1 needs num_cycles.
_MAX_TABLE = 2**20


# ----------------------------------------------------------------------------- checks


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if value > _INT32_MAX:
        raise ValueError(f"{name} must be < 2**31 (optax counts steps in int32), got {value!r}")
    return int(value)


def _check_lr(name: str, value) -> float:
    value = _check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _check_peak(peak_lr, *lower: tuple[str, float]) -> float:
    """peak_lr > 0, and every (name, value) in `lower` at most peak_lr."""
    peak = _check_lr("peak_lr", peak_lr)
    if peak == 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr!r}")
    for name, value in lower:
        if value > peak:
            raise ValueError(f"{name} must be <= peak_lr ({peak_lr!r}), got {value!r}")
    return peak


# ------------------------------------------------------------------------------ steps


def _is_host(step) -> bool:
    """Python or NumPy numbers (not JAX arrays): located exactly with int64 arithmetic."""
    return isinstance(step, (numbers.Real, np.number, np.ndarray))


def _host_step(step) -> np.ndarray:
    """Python/NumPy step(s) as exact int64: floats floored, negatives read as 0."""
    x = np.asarray(step)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"step must be a number below 2**62, got {step!r}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise ValueError(f"step must be finite, got {step!r}")
    if np.any(x >= _MAX_STEP):
        raise ValueError(f"step must be < 2**62, got {step!r}")
    return np.maximum(np.floor(x) if x.dtype.kind == "f" else x, 0).astype(np.int64)


def _device_step(step) -> jnp.ndarray:
    """A JAX array or traced step as int32: floats floored, negatives read as 0.

    Saturates at 2**31 - 2 (integers) or 2**31 - 128 (floats, the float32 spacing there),
    so every int32 sum below stays in range.
    """
    step = jnp.asarray(step)
    if jnp.issubdtype(step.dtype, jnp.floating):
        step = jnp.clip(jnp.floor(step), 0.0, _MAX_TRACED_FLOAT_STEP)
    return jnp.clip(step, 0, _INT32_MAX - 1).astype(jnp.int32)


def _clamped_step(step, last: int) -> jnp.ndarray:
    """The step as int32, saturated at `last`, from which the schedule stays constant."""
    if _is_host(step):
        return jnp.asarray(np.minimum(_host_step(step), last), jnp.int32)
    return jnp.minimum(_device_step(step), last)


def _f32(x) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32)


def _cos_anneal(start, end, frac):
    """Half-cosine from `start` (frac 0) to `end` (frac 1), exact at both ends.

    Written as a convex combination so frac = 0 returns `start` and frac = 1 returns
    `end` bit for bit (cos(float32(pi)) is -1.0 exactly), and clipped to [end, start]
    against the last-bit float32 rounding that could otherwise step outside it.
    """
    c = (1.0 + jnp.cos(jnp.pi * frac)) / 2.0
    value = start * c + end * (1.0 - c)
    return jnp.clip(value, jnp.minimum(start, end), jnp.maximum(start, end))


def _lerp(start, end, frac):
    """Straight line from `start` (frac 0) to `end` (frac 1)."""
    return start * (1.0 - frac) + end * frac


# ----------------------------------------------------------------------------- cycles


def _cycle_lengths(cycle_steps: int, cycle_mult: float) -> Iterator[int]:
    """Yield the length of cycle 0, 1, 2, ...: the single rule for cycle lengths.

    Cycle i lasts `cycle_steps * cycle_mult**i` steps. For an integer `cycle_mult` this
    is exact integer arithmetic; otherwise it is rounded half up, `floor(x + 0.5)`, each
    length computed from i directly (no accumulated rounding). Since cycle_mult >= 1 and
    cycle_steps >= 1, every length is at least 1 and lengths never decrease.
    """
    mult = int(cycle_mult) if float(cycle_mult).is_integer() else float(cycle_mult)
    i = 0
    while True:
        if isinstance(mult, int):
            yield cycle_steps * mult**i
        else:
            yield math.floor(cycle_steps * mult**i + 0.5)
        i += 1


def cycle_ends(
    cycle_steps: int, num_cycles: int, cycle_mult: float = 1, warmup_steps: int = 0
) -> list[int]:
    """Step index of the last step of each of the first `num_cycles` cycles of `sgdr`.

    Computed from the same arithmetic as `sgdr`, so a snapshot taken at these steps is
    taken at the bottom of each cosine (where `sgdr` reaches its cycle's minimum).

    Args:
      cycle_steps: length of the first cycle, in steps.
      num_cycles: how many cycle ends to return.
      cycle_mult: growth factor of the cycle length (lengths rounded as in `sgdr`).
      warmup_steps: steps of warmup before the first cycle.

    Returns:
      A list of `num_cycles` increasing step indices.
    """
    cycles = _Cycles(cycle_steps, cycle_mult, warmup_steps, num_cycles)
    return cycles.ends(num_cycles)


class _Cycles:
    """Where each step falls: warmup, cycle i at position j of length L, or done.

    Holds the table of cycle starts (relative to the end of warmup) when cycle_mult > 1;
    with cycle_mult = 1 the position is a closed-form division.
    """

    def __init__(self, cycle_steps, cycle_mult, warmup_steps, num_cycles, *, int_mult=False):
        self.cycle_steps = _check_int("cycle_steps", cycle_steps, 1)
        mult = _check_real("cycle_mult", cycle_mult)
        if mult < 1:
            raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult!r}")
        if int_mult and not mult.is_integer():
            raise ValueError(f"cycle_mult must be an integer here, got {cycle_mult!r}")
        self.cycle_mult = int(mult) if mult.is_integer() else mult
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.num_cycles = None if num_cycles is None else _check_int("num_cycles", num_cycles, 1)
        self._starts = None if self.cycle_mult == 1 else self._start_table()
        if self._starts is not None:
            # Device copies for int32 steps (< 2**31 - 1): starts beyond int32 are
            # unreachable there and saturate; lengths keep their true value up to int32.
            self._starts_dev = to_device(np.minimum(self._starts, _INT32_MAX), np.int32)
            lengths = np.minimum(np.diff(self._starts), _INT32_MAX)
            self._lengths_dev = to_device(lengths, np.int32)

    def _start_table(self) -> np.ndarray:
        """Start of each cycle after warmup, plus the end of the last one (int64).

        Bounded schedules list their num_cycles cycles; unbounded ones list cycles while
        they end before step 2**62, which takes about log(2**62 (m - 1) / cycle_steps) /
        log(m) cycles for cycle_mult m (steps past the table raise ValueError).
        """
        m, room = self.cycle_mult, _MAX_STEP - self.warmup_steps
        if self.num_cycles is None and (
            math.log1p(room * (m - 1) / self.cycle_steps) / math.log(m) > _MAX_TABLE
        ):
            raise ValueError(
                f"cycle_mult: {m!r} is too close to 1 for an unbounded schedule; pass num_cycles"
            )
        starts = [0]
        for length in _cycle_lengths(self.cycle_steps, m):
            if self.num_cycles is not None and len(starts) > self.num_cycles:
                break
            if starts[-1] + length >= room:
                if self.num_cycles is not None:
                    raise ValueError(f"num_cycles: {self.num_cycles} cycles last beyond step 2**62")
                break
            starts.append(starts[-1] + length)
        if self.num_cycles is None and starts[-1] + self.warmup_steps <= _INT32_MAX:
            # the table must cover every int32 step; only an absurd cycle_mult gets here
            raise ValueError(f"cycle_mult: {m!r} is too large for an unbounded schedule")
        return np.asarray(starts, np.int64)

    def ends(self, num_cycles: int | None = None, *, num_steps: int | None = None) -> list[int]:
        """Last step of each cycle: the first `num_cycles`, and/or those before `num_steps`."""
        if num_cycles is not None:
            num_cycles = _check_int("num_cycles", num_cycles, 0)
            if self.num_cycles is not None and num_cycles > self.num_cycles:
                raise ValueError(
                    f"num_cycles: the schedule has {self.num_cycles} cycles, asked {num_cycles}"
                )
        elif self.num_cycles is not None:
            num_cycles = self.num_cycles
        elif num_steps is None:
            raise ValueError("num_cycles: the schedule is unbounded; pass num_cycles or num_steps")
        if num_steps is not None:
            num_steps = _check_int("num_steps", num_steps, 0)
        ends, end = [], self.warmup_steps - 1
        for length in _cycle_lengths(self.cycle_steps, self.cycle_mult):
            end += length
            if num_cycles is not None and len(ends) >= num_cycles:
                break
            if num_steps is not None and end >= num_steps:
                break
            ends.append(end)
        return ends

    def locate(self, step):
        """(t, warm, done, i, j, L) for a step: all ints (int64 on host, int32 traced)."""
        if _is_host(step):
            xp, t = np, _host_step(step)
            starts = self._starts
            lengths = None if starts is None else np.diff(starts)
            if self.num_cycles is None and starts is not None:
                if np.any(t - self.warmup_steps >= starts[-1]):
                    raise ValueError(f"step must be < {self.warmup_steps + starts[-1]} here")
        else:
            xp, t = jnp, _device_step(step)
            starts = None if self._starts is None else self._starts_dev
            lengths = None if starts is None else self._lengths_dev
        warm = t < self.warmup_steps
        u = xp.maximum(t - self.warmup_steps, 0)
        if starts is None:
            i = u // self.cycle_steps
            j = u - i * self.cycle_steps
            length = self.cycle_steps
            done = False if self.num_cycles is None else i >= self.num_cycles
        else:
            last = len(lengths) - 1  # index of the last cycle in the table
            k = xp.searchsorted(starts, u, side="right") - 1
            done = False if self.num_cycles is None else k > last
            i = xp.minimum(k, last)
            j = u - starts[i]
            length = lengths[i]
        return t, warm, done, i, j, length


class CyclicSchedule:
    """An optax.Schedule made of cycles that also knows where its cycles end.

    Call it like any schedule (`schedule(step)`); ask `schedule.cycle_ends(...)` for the
    last step of each cycle, e.g. to take snapshots (Huang et al. 2017).
    """

    def __init__(self, cycles: _Cycles, value_at):
        self._cycles = cycles
        self._value_at = value_at
        self.cycle_steps = cycles.cycle_steps
        self.cycle_mult = cycles.cycle_mult
        self.warmup_steps = cycles.warmup_steps
        self.num_cycles = cycles.num_cycles

    def __call__(self, step):
        """The value at `step` (the 0-based update count: host int or array, or traced)."""
        return self._value_at(*self._cycles.locate(step))

    def cycle_ends(self, num_cycles: int | None = None, *, num_steps: int | None = None):
        """Last step of each cycle: the first `num_cycles` and/or those before `num_steps`.

        Args:
          num_cycles: how many cycles (default: all of a schedule built with num_cycles).
          num_steps: keep only cycles that end within steps 0 .. num_steps - 1.

        Returns:
          A list of increasing step indices.
        """
        return self._cycles.ends(num_cycles, num_steps=num_steps)

    def __repr__(self):
        return (
            f"CyclicSchedule(cycle_steps={self.cycle_steps}, cycle_mult={self.cycle_mult}, "
            f"warmup_steps={self.warmup_steps}, num_cycles={self.num_cycles})"
        )


def _cosine_cycles(cycles, peak, decay, min_lr, init_lr) -> CyclicSchedule:
    """Linear warmup from init_lr, then cosine cycles from peak * decay**i to min_lr."""
    warmup = cycles.warmup_steps

    def value_at(t, warm, done, i, j, length):
        warm_value = _lerp(init_lr, peak, _f32(t) / max(warmup, 1))
        start = jnp.maximum(peak * jnp.power(jnp.float32(decay), _f32(i)), min_lr)
        # A cycle of L steps anneals over L - 1 intervals: step 0 is the peak and step
        # L - 1 exactly min_lr. A one-step cycle stays at its peak.
        frac = _f32(j) / jnp.maximum(_f32(length) - 1.0, 1.0)
        value = jnp.where(done, min_lr, _cos_anneal(start, min_lr, frac))
        return jnp.where(warm, warm_value, value).astype(jnp.float32)

    return CyclicSchedule(cycles, value_at)


# -------------------------------------------------------------------------- schedules


def sgdr(
    peak_lr: float,
    cycle_steps: int,
    cycle_mult: float = 1,
    cycle_decay: float = 1.0,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    num_cycles: int | None = None,
) -> CyclicSchedule:
    """Cosine annealing with warm restarts (SGDR).

    After `warmup_steps` of linear warmup from `min_lr` towards `peak_lr`, cycle i
    (i = 0, 1, ...) lasts `L_i = cycle_steps * cycle_mult**i` steps (rounded half up when
    cycle_mult is not an integer), starts at `max(peak_lr * cycle_decay**i, min_lr)` and
    follows a half cosine down to `min_lr`. Within a cycle, step j = 0 .. L_i - 1 has

        min_lr + (start_i - min_lr) * (1 + cos(pi * j / (L_i - 1))) / 2,

    so the first step of a cycle is its peak and the LAST step is exactly `min_lr` (the
    place to take a snapshot). optax.sgdr_schedule anneals over L_i intervals instead and
    restarts before reaching its end value. A cycle of one step stays at its peak.
    After `num_cycles` cycles (when given) the value stays at `min_lr`.

    References:
      Loshchilov & Hutter, SGDR: Stochastic Gradient Descent with Warm Restarts, ICLR 2017.

    Args:
      peak_lr: value at the first step of cycle 0 (> 0).
      cycle_steps: length of cycle 0 in steps (>= 1).
      cycle_mult: growth factor of the cycle length (>= 1; Loshchilov & Hutter's T_mult).
      cycle_decay: factor applied to the peak at each restart (0 < cycle_decay <= 1).
      min_lr: the value at the bottom of every cycle (0 <= min_lr <= peak_lr).
      warmup_steps: steps of linear warmup before cycle 0; step `warmup_steps` is the
        peak, so the warmup line continues straight into it.
      num_cycles: number of cycles, or None for restarts forever.

    Returns:
      A `CyclicSchedule`: `schedule(step)` and `schedule.cycle_ends(...)`.
    """
    min_lr = _check_lr("min_lr", min_lr)
    peak = _check_peak(peak_lr, ("min_lr", min_lr))
    decay = _check_real("cycle_decay", cycle_decay)
    if not 0 < decay <= 1:
        raise ValueError(f"cycle_decay must be in (0, 1], got {cycle_decay!r}")
    cycles = _Cycles(cycle_steps, cycle_mult, warmup_steps, num_cycles)
    return _cosine_cycles(cycles, peak, decay, min_lr, init_lr=min_lr)


def cosine_warmup(
    peak_lr: float, total_steps: int, warmup_steps: int, init_lr: float = 0.0, end_lr: float = 0.0
) -> CyclicSchedule:
    """Linear warmup from `init_lr` to `peak_lr`, then one cosine down to `end_lr`.

    `total_steps` INCLUDES the warmup: steps 0 .. warmup_steps - 1 warm up, steps
    warmup_steps .. total_steps - 1 anneal, and the last step, `total_steps - 1`, is
    exactly `end_lr` (the value stays there afterwards). optax's
    `warmup_cosine_decay_schedule(decay_steps=total_steps)` reaches `end_value` one step
    later, at step `total_steps`; ours equals it with `decay_steps=total_steps - 1`.

    Args:
      peak_lr: value at step `warmup_steps` (> 0).
      total_steps: length of the whole schedule, warmup included (>= 2).
      warmup_steps: steps of linear warmup (0 <= warmup_steps <= total_steps - 2).
      init_lr: value at step 0 (0 <= init_lr <= peak_lr).
      end_lr: value at the last step (0 <= end_lr <= peak_lr).

    Returns:
      A `CyclicSchedule` with one cycle, ending at step `total_steps - 1`.
    """
    init_lr = _check_lr("init_lr", init_lr)
    end_lr = _check_lr("end_lr", end_lr)
    peak = _check_peak(peak_lr, ("init_lr", init_lr), ("end_lr", end_lr))
    total = _check_int("total_steps", total_steps, 2)
    warmup = _check_int("warmup_steps", warmup_steps, 0)
    if warmup > total - 2:  # the anneal: the peak at step warmup, end_lr at step total - 1
        raise ValueError(
            f"warmup_steps must be <= total_steps - 2 ({total_steps!r} - 2): the cosine needs "
            f"a step at the peak and one at end_lr; got {warmup_steps!r}"
        )
    cycles = _Cycles(total - warmup, 1, warmup, 1)
    return _cosine_cycles(cycles, peak, 1.0, end_lr, init_lr=init_lr)


def fastai_cos_anneal(peak_lr: float, cycle_steps: int, cycle_mult: int = 1) -> CyclicSchedule:
    """fastai 0.7's `CosAnneal` (learner.fit(lr, n_cycle, cycle_len, cycle_mult)) exactly.

    The schedule of Radek Osmulski's cosine-annealing experiments. fastai 0.7 computes
    the LR of step t (its global `iteration`) with a stateful callback; in closed form,
    for step t at position j of cycle i of length L_i = cycle_steps * cycle_mult**i:

        peak_lr / 100                            if t < L_i / 20
        peak_lr / 2 * (1 + cos(pi * j / L_i))    otherwise

    so the first 1/20 of the first cycle runs at peak_lr / 100 while the cosine position
    keeps advancing, and the last step of a cycle is peak_lr/2 * (1 + cos(pi (L-1)/L)),
    about 0 but not 0. (With cycle_mult >= 20 the global-step test also fires early in
    later cycles, as in fastai.) Unlike `sgdr` it never stops restarting.

    Args:
      peak_lr: fastai's `lr` (> 0).
      cycle_steps: batches per cycle, `cycle_len * len(train_dl)` (>= 2: fastai 0.7 never
        ends a one-step cycle).
      cycle_mult: integer growth factor of the cycle length (fastai multiplies `nb`).

    Returns:
      A `CyclicSchedule`, unbounded.
    """
    peak = _check_peak(peak_lr)
    cycles = _Cycles(cycle_steps, cycle_mult, 0, None, int_mult=True)
    if cycles.cycle_steps < 2:
        raise ValueError(f"cycle_steps must be >= 2 for fastai's CosAnneal, got {cycle_steps!r}")

    def value_at(t, warm, done, i, j, length):
        ramp = t < (length - 1) // 20 + 1  # t < L / 20 in integers: ceil(L / 20)
        cosine = peak / 2 * (1.0 + jnp.cos(jnp.pi * _f32(j) / _f32(length)))
        return jnp.where(ramp, peak / 100, cosine).astype(jnp.float32)

    return CyclicSchedule(cycles, value_at)


def _combined_cos(total_steps: int, pct_start: float, start: float, middle: float, end: float):
    """fastai v2's combined_cos(pct_start, start, middle, end) at position t / total_steps."""
    total = _check_int("total_steps", total_steps, 1)
    pct = _check_real("pct_start", pct_start)
    if not 0 < pct < 1:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start!r}")
    turn = pct * total  # the step (possibly fractional) at which `middle` is reached

    def schedule(step):
        t = _f32(_clamped_step(step, total))
        up = _cos_anneal(start, middle, t / turn)
        down = _cos_anneal(middle, end, (t - turn) / (total - turn))
        return jnp.where(t < turn, up, down).astype(jnp.float32)

    return schedule


def one_cycle(
    peak_lr: float,
    total_steps: int,
    pct_start: float = 0.25,
    div: float = 25.0,
    final_div: float = 1e5,
):
    """The 1cycle learning rate with fastai v2's conventions (`fit_one_cycle`).

    Step t sits at position p = t / total_steps; a half cosine rises from
    `peak_lr / div` (p = 0) to `peak_lr` (p = pct_start), then falls towards
    `peak_lr / final_div` (p = 1, i.e. step total_steps; the value stays there after).
    Differences with optax.cosine_onecycle_schedule: optax's final value is
    peak / (div_factor * final_div_factor) (defaults pct_start 0.3, final_div_factor 1e4,
    so peak / 2.5e5), fastai's is peak / final_div (default peak / 1e5). With
    final_div_factor = final_div / div and pct_start * total_steps an integer the two agree.

    References:
      Smith, Super-Convergence, 2017 (arXiv:1708.07120); Smith, A disciplined approach to
      neural network hyper-parameters, 2018 (arXiv:1803.09820).

    Args:
      peak_lr: highest value (> 0), reached at step pct_start * total_steps.
      total_steps: number of training steps (>= 1).
      pct_start: fraction of the steps spent rising (0 < pct_start < 1).
      div: the first value is peak_lr / div (div >= 1).
      final_div: the last value is peak_lr / final_div (final_div >= 1).

    Returns:
      A schedule `step -> lr`.
    """
    peak = _check_peak(peak_lr)
    div = _check_real("div", div)
    final_div = _check_real("final_div", final_div)
    for name, value in (("div", div), ("final_div", final_div)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    return _combined_cos(total_steps, pct_start, peak / div, peak, peak / final_div)


def one_cycle_momentum(
    total_steps: int,
    pct_start: float = 0.25,
    moms: Sequence[float] = (0.95, 0.85, 0.95),
):
    """The momentum that goes with `one_cycle`: moms[0] -> moms[1] -> moms[2] (fastai v2).

    Momentum falls while the LR rises and rises while it falls (Smith 2018), on the same
    half cosines and positions as `one_cycle`. Use it as e.g. `optax.inject_hyperparams`'s
    momentum, or `b1` of Adam.

    Args:
      total_steps: number of training steps (>= 1).
      pct_start: fraction of the steps spent going from moms[0] to moms[1].
      moms: (start, middle, end) momentum values, each in [0, 1).

    Returns:
      A schedule `step -> momentum`.
    """
    if len(moms) != 3:
        raise ValueError(f"moms must have 3 values (start, middle, end), got {moms!r}")
    for value in moms:
        if not 0 <= _check_real("moms", value) < 1:
            raise ValueError(f"moms must lie in [0, 1), got {moms!r}")
    return _combined_cos(total_steps, pct_start, *map(float, moms))


def step_decay(init_lr: float, boundaries: Sequence[int], factor: float = 0.1):
    """Piecewise constant: `init_lr`, multiplied by `factor` at each boundary step.

    The ResNet schedule (He et al. 2016): step_decay(0.1, [32000, 48000]) gives 0.1, then
    0.01 from step 32000, then 0.001 from step 48000. A boundary step already uses the
    new value (as optax.piecewise_constant_schedule).

    Args:
      init_lr: value before the first boundary (>= 0).
      boundaries: strictly increasing steps (>= 1) at which the value is multiplied.
      factor: the multiplier (> 0).

    Returns:
      A schedule `step -> lr`.
    """
    init = _check_lr("init_lr", init_lr)
    factor = _check_real("factor", factor)
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    bounds = [_check_int("boundaries", b, 1) for b in boundaries]
    if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"boundaries must be a non-empty increasing list, got {boundaries!r}")
    table = to_device(bounds, np.int32)
    values = to_device([init * factor**k for k in range(len(bounds) + 1)], np.float32)

    def schedule(step):
        return values[jnp.searchsorted(table, _clamped_step(step, bounds[-1]), side="right")]

    return schedule


def constant(value: float):
    """The same value at every step (as optax.constant_schedule, but shaped like the step).

    Args:
      value: the value (finite).

    Returns:
      A schedule `step -> value` returning float32 with the shape of `step`.
    """
    value = _check_real("value", value)
    return lambda step: jnp.full(jnp.shape(step), value, jnp.float32)
