"""Property-based tests of jaxlearn.schedules, plus agreement with optax and fastai.

Most properties evaluate a schedule once per example on a NumPy vector of steps
(`np.arange(NSTEPS)`: the exact host path, whose few ops compile once for all examples);
`test_python_int_jit_and_vmap_agree` pins the traced int32 path (what
optax calls) to it. The cycle lengths the tests expect come from `spec_lengths`, the
documented rule written out here, never from the module's own helper.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlearn import plots
from jaxlearn import schedules as S

NSTEPS = 512  # every drawn schedule finishes its cycles well within this (at most 486)
RTOL = 2e-6  # float32 rounding of peak * decay**i and of the cosine


def spec_length(cycle_steps, cycle_mult, i):
    """Documented rule: cycle i lasts cycle_steps * cycle_mult**i, rounded half up."""
    if float(cycle_mult).is_integer():
        return cycle_steps * int(cycle_mult) ** i
    return math.floor(cycle_steps * cycle_mult**i + 0.5)


def spec_lengths(cycle_steps, cycle_mult, count):
    return [spec_length(cycle_steps, cycle_mult, i) for i in range(count)]


def spec_sgdr(t, peak_lr, cycle_steps, cycle_mult, cycle_decay, min_lr, warmup_steps, num_cycles):
    """sgdr's definition in float64, one step at a time."""
    if t < warmup_steps:
        return min_lr + (peak_lr - min_lr) * t / warmup_steps
    u, i = t - warmup_steps, 0
    if cycle_mult == 1:
        i, u = divmod(u, cycle_steps)
    while num_cycles is None or i < num_cycles:
        length = spec_length(cycle_steps, cycle_mult, i)
        if u < length:
            # The schedule holds its decay in float32 (an Optax schedule's dtype): with
            # decay 0.99918 the float64 value's rounding alone grows to 1.4e-5 relative by
            # cycle 511, beyond the tolerance; the float32 value matches to 4e-8.
            start = max(peak_lr * float(np.float32(cycle_decay)) ** i, min_lr)
            frac = u / (length - 1) if length > 1 else 0.0
            return min_lr + (start - min_lr) * (1 + math.cos(math.pi * frac)) / 2
        u, i = u - length, i + 1
    return min_lr


@st.composite
def sgdr_configs(draw, min_cycle=1, bounded=False):
    """Keyword arguments of sgdr; all cycles of a bounded one end before NSTEPS."""
    num_cycles = st.integers(1, 4) if bounded else st.one_of(st.none(), st.integers(1, 4))
    peak = draw(st.floats(1e-3, 2.0))
    return dict(
        peak_lr=peak,
        cycle_steps=draw(st.integers(min_cycle, 12)),
        cycle_mult=draw(st.one_of(st.sampled_from([1, 2, 3]), st.floats(1.05, 2.5))),
        cycle_decay=draw(st.one_of(st.just(1.0), st.floats(0.3, 1.0))),
        min_lr=peak * draw(st.sampled_from([0.0, 0.01, 0.2, 0.9])),
        warmup_steps=draw(st.integers(0, 6)),
        num_cycles=draw(num_cycles),
    )


def cycles_within(cfg, nsteps=NSTEPS):
    """(index, start, length) of each cycle of cfg that ends before nsteps."""
    out, start = [], cfg["warmup_steps"]
    count = cfg["num_cycles"] or 64
    for i, length in enumerate(spec_lengths(cfg["cycle_steps"], cfg["cycle_mult"], count)):
        if start + length > nsteps:
            break
        out.append((i, start, length))
        start += length
    return out


def values(schedule, n=NSTEPS):
    """Values at steps 0 .. n - 1 (n <= NSTEPS), computed on one shape for all examples."""
    return np.asarray(schedule(np.arange(NSTEPS)))[:n]


def optax_values(schedule, n=NSTEPS):
    """optax's piecewise schedules take one step at a time: vmap them."""
    return np.asarray(jax.vmap(schedule)(jnp.arange(NSTEPS)))[:n]


def separate_restarts(cfg):
    """Lower min_lr below half of every cycle's peak, so each restart is a visible rise."""
    lowest_peak = cfg["peak_lr"] * cfg["cycle_decay"] ** (cfg["num_cycles"] - 1)
    cfg["min_lr"] = min(cfg["min_lr"], 0.5 * lowest_peak)


def cycle_peak(cfg, i):
    return max(cfg["peak_lr"] * cfg["cycle_decay"] ** i, cfg["min_lr"])


# ------------------------------------------------------------------ sgdr properties


@given(sgdr_configs())
def test_sgdr_stays_between_min_and_peak(cfg):
    v = values(S.sgdr(**cfg))
    assert np.all(v >= np.float32(cfg["min_lr"]))
    assert np.all(v <= np.float32(cfg["peak_lr"]) * (1 + RTOL))


@given(sgdr_configs())
def test_sgdr_first_step_of_each_cycle_is_its_peak(cfg):
    v = values(S.sgdr(**cfg))
    for i, start, _ in cycles_within(cfg):
        # decay**i in float32 drifts by ~i ulps, so far-down peaks (1e-27 at i = 51) also get
        # an absolute tolerance tied to the schedule's scale.
        np.testing.assert_allclose(
            v[start],
            cycle_peak(cfg, i),
            rtol=RTOL,
            atol=RTOL * 1e-3 * cfg["peak_lr"],
            err_msg=f"cycle {i}",
        )


@given(sgdr_configs())
def test_sgdr_last_step_of_each_cycle_is_min_lr(cfg):
    v = values(S.sgdr(**cfg))
    for i, start, length in cycles_within(cfg):
        if length > 1:  # a one-step cycle is only its peak (documented)
            assert v[start + length - 1] == np.float32(cfg["min_lr"]), f"cycle {i}"


@given(sgdr_configs())
def test_sgdr_non_increasing_inside_each_cycle(cfg):
    v = values(S.sgdr(**cfg))
    for i, start, length in cycles_within(cfg):
        steps = np.diff(v[start : start + length].astype(np.float64))
        assert np.all(steps <= RTOL * cfg["peak_lr"]), f"cycle {i}"


@given(sgdr_configs())
def test_sgdr_matches_its_definition(cfg):
    v = values(S.sgdr(**cfg))
    expect = [spec_sgdr(t, **cfg) for t in range(NSTEPS)]
    np.testing.assert_allclose(v, expect, rtol=1e-5, atol=1e-6 * cfg["peak_lr"])


@given(sgdr_configs(min_cycle=2, bounded=True))
def test_sgdr_cycle_lengths_follow_the_geometric_sum(cfg):
    """Restarts read off the values: a rise after warmup, the end: the first min_lr."""
    separate_restarts(cfg)
    v = values(S.sgdr(**cfg))
    w, n, cs, mult = (cfg[k] for k in ("warmup_steps", "num_cycles", "cycle_steps", "cycle_mult"))
    starts = [w] + [t for t in range(w + 1, NSTEPS) if v[t] > v[t - 1]]
    last_end = next(t for t in range(starts[-1], NSTEPS) if v[t] == np.float32(cfg["min_lr"]))
    lengths = np.diff([*starts, last_end + 1]).tolist()
    if float(mult).is_integer():  # closed form of the geometric sum; cycle_mult = 1 included
        mult = int(mult)
        total = cs * n if mult == 1 else cs * (mult**n - 1) // (mult - 1)
        assert lengths == [cs * mult**i for i in range(n)]
    else:  # each length rounded half up: the total is within n / 2 of the real sum
        total = sum(spec_lengths(cs, mult, n))
        assert lengths == spec_lengths(cs, mult, n)
        assert abs(total - cs * (mult**n - 1) / (mult - 1)) <= n / 2
    assert sum(lengths) == total
    assert last_end == w + total - 1


@given(sgdr_configs(min_cycle=2, bounded=True))
def test_cycle_ends_agree_with_where_values_restart(cfg):
    separate_restarts(cfg)
    schedule = S.sgdr(**cfg)
    v = values(schedule)
    w = cfg["warmup_steps"]
    restarts = [t for t in range(w + 1, NSTEPS) if v[t] > v[t - 1]]
    ends = S.cycle_ends(cfg["cycle_steps"], cfg["num_cycles"], cfg["cycle_mult"], w)
    assert ends[:-1] == [t - 1 for t in restarts]
    assert v[ends[-1]] == np.float32(cfg["min_lr"]) and v[ends[-1] - 1] > v[ends[-1]]
    assert schedule.cycle_ends() == ends
    assert schedule.cycle_ends(num_steps=ends[-1]) == ends[:-1]


@given(sgdr_configs(bounded=True).filter(lambda c: c["warmup_steps"] > 0))
def test_sgdr_warmup_is_a_straight_line_into_the_peak(cfg):
    v = values(S.sgdr(**cfg)).astype(np.float64)
    w, peak, low = cfg["warmup_steps"], cfg["peak_lr"], cfg["min_lr"]
    assert v[0] == np.float32(low)
    assert v[w] == np.float32(peak)
    # continuous and monotone: every step of warmup, the last into the peak included, rises
    # by the same (peak - min_lr) / warmup_steps
    np.testing.assert_allclose(np.diff(v[: w + 1]), (peak - low) / w, rtol=1e-4, atol=1e-6 * peak)


# ------------------------------------------------------------ jit, vmap, big steps


@settings(max_examples=8)  # each example compiles three functions
@given(sgdr_configs(), st.integers(0, 3))
def test_python_int_jit_and_vmap_agree(cfg, which):
    schedule = [
        S.sgdr(**cfg),
        S.cosine_warmup(cfg["peak_lr"], cfg["cycle_steps"] + cfg["warmup_steps"] + 2, 1),
        S.one_cycle(cfg["peak_lr"], cfg["cycle_steps"] * 10),
        S.fastai_cos_anneal(cfg["peak_lr"], cfg["cycle_steps"] + 1, int(cfg["cycle_mult"])),
    ][which]
    steps = np.arange(150)
    plain = np.array([schedule(int(t)) for t in steps])
    jitted_scalar = jax.jit(schedule)
    jitted = np.array([jitted_scalar(jnp.int32(t)) for t in steps])
    vmapped = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))
    host = np.asarray(schedule(steps))
    device = np.asarray(schedule(jnp.asarray(steps)))
    # The same float32 values up to the rounding of the cosine: XLA fuses a jitted or
    # vectorized computation differently from op-by-op scalars, a few 1e-8 apart at most.
    # Any step located differently (an off-by-one) is off by far more.
    atol = 3e-7 * cfg["peak_lr"]
    for name, other in [("jit", jitted), ("vmap", vmapped), ("numpy", host), ("jnp", device)]:
        np.testing.assert_allclose(other, plain, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("cycle_mult", [1, 2, 1.5])
@pytest.mark.parametrize("offset", [0, 5, 2**32 + 3])
def test_steps_beyond_2_to_the_31_do_not_overflow(cycle_mult, offset):
    cfg = dict(
        peak_lr=0.1,
        cycle_steps=7,
        cycle_mult=cycle_mult,
        cycle_decay=1.0,
        min_lr=0.001,
        warmup_steps=3,
        num_cycles=None,
    )
    schedule = S.sgdr(**cfg)
    for t in (2**31 + offset, 2**31 + offset + 1, 2**31 + offset + 2):
        expect = spec_sgdr(t, **cfg)
        for step in (t, float(t), np.int64(t)):
            np.testing.assert_allclose(float(schedule(step)), expect, rtol=1e-5)
    bounded = S.sgdr(**{**cfg, "num_cycles": 3})
    assert float(bounded(2**31 + offset)) == np.float32(cfg["min_lr"])


def test_traced_steps_saturate_below_2_to_the_31():
    schedule = S.sgdr(0.1, 7, cycle_mult=2)
    top = jax.jit(schedule)(jnp.int32(2**31 - 1))
    assert float(top) == float(schedule(2**31 - 2))
    assert float(jax.jit(schedule)(jnp.float32(2.0**40))) == float(schedule(2**31 - 128))


def test_finite_schedules_hold_their_last_value_at_huge_steps():
    huge = 2**31 + 5
    assert float(S.cosine_warmup(1.0, 100, 10, end_lr=0.01)(huge)) == np.float32(0.01)
    assert float(S.one_cycle(1.0, 100)(huge)) == np.float32(1e-5)
    assert float(S.one_cycle(1.0, 100)(float(huge))) == np.float32(1e-5)
    assert float(S.step_decay(0.1, [5, 10])(huge)) == np.float32(0.1 * 0.1 * 0.1)
    assert float(S.constant(0.3)(huge)) == np.float32(0.3)


# ------------------------------------------------------------------- optax agreement


@settings(max_examples=25)
@given(sgdr_configs(min_cycle=2, bounded=True))
def test_sgdr_agrees_with_optax_sgdr_schedule(cfg):
    """Convention difference: optax's cycle of L steps anneals over L intervals and
    restarts before reaching end_value; ours anneals over L - 1 intervals, so its last step
    is exactly min_lr. Hence: the same warmup, the same restart steps and restart values,
    and inside each cycle ours equals optax's cosine_decay_schedule with L - 1 decay steps.
    optax's warmup is part of its first cycle's decay_steps.
    """
    separate_restarts(cfg)
    w, low = cfg["warmup_steps"], cfg["min_lr"]
    cycles = cycles_within(cfg)
    kwargs = [
        dict(
            init_value=low if i == 0 else cycle_peak(cfg, i),
            peak_value=cycle_peak(cfg, i),
            warmup_steps=w if i == 0 else 0,
            decay_steps=length + (w if i == 0 else 0),
            end_value=low,
        )
        for i, _, length in cycles
    ]
    theirs = optax_values(optax.sgdr_schedule(kwargs))
    ours = values(S.sgdr(**cfg))
    np.testing.assert_allclose(ours[:w], theirs[:w], rtol=1e-5)
    for i, start, length in cycles:  # optax restarts here too, at this cycle's peak
        np.testing.assert_allclose(ours[start], theirs[start], rtol=1e-5)
        np.testing.assert_allclose(theirs[start], cycle_peak(cfg, i), rtol=1e-5)
        peak = cycle_peak(cfg, i)
        inside = optax.cosine_decay_schedule(peak, length - 1, alpha=low / peak)
        np.testing.assert_allclose(
            ours[start : start + length],
            optax_values(inside, length),
            rtol=1e-5,
            atol=1e-7,
            err_msg=f"cycle {i}",
        )


@given(
    st.floats(1e-3, 2.0),
    st.integers(2, 200),
    st.integers(0, 50),
    st.sampled_from([0.0, 0.1, 0.5]),
    st.sampled_from([0.0, 0.01, 0.3]),
)
def test_cosine_warmup_agrees_with_optax_warmup_cosine_decay(peak, decay_len, warmup, a, b):
    """Convention difference: our total_steps includes warmup and its last step,
    total_steps - 1, is end_lr; optax reaches end_value at decay_steps, so ours equals
    optax's with decay_steps = total_steps - 1 at every step.
    """
    total = warmup + decay_len
    ours = S.cosine_warmup(peak, total, warmup, init_lr=a * peak, end_lr=b * peak)
    theirs = optax.warmup_cosine_decay_schedule(a * peak, peak, warmup, total - 1, b * peak)
    np.testing.assert_allclose(values(ours), optax_values(theirs), rtol=2e-5, atol=1e-7)
    assert float(ours(total - 1)) == np.float32(b * peak)
    assert float(ours(warmup)) == np.float32(peak)


@given(
    st.floats(1e-3, 2.0),
    st.integers(1, 25).map(lambda k: 20 * k),
    st.sampled_from([0.25, 0.3, 0.5]),
    st.sampled_from([10.0, 25.0]),
    st.sampled_from([1e4, 1e5]),
)
def test_one_cycle_agrees_with_optax_cosine_onecycle(peak, total, pct, div, final_div):
    """Convention difference: optax's last value is peak / (div_factor * final_div_factor),
    fastai's (ours) is peak / final_div, so final_div_factor = final_div / div. optax rounds
    its turning step down to an integer: pct_start * total_steps is one here.
    """
    ours = S.one_cycle(peak, total, pct_start=pct, div=div, final_div=final_div)
    theirs = optax.cosine_onecycle_schedule(total, peak, pct, div, final_div / div)
    np.testing.assert_allclose(values(ours), optax_values(theirs), rtol=3e-5)


def test_one_cycle_final_value_differs_from_optax_defaults():
    # fastai: peak / final_div = 1e-5; optax defaults: peak / (25 * 1e4) = 4e-6.
    assert float(S.one_cycle(1.0, 100)(100)) == pytest.approx(1e-5)
    assert float(optax.cosine_onecycle_schedule(100, 1.0)(100)) == pytest.approx(4e-6)


# --------------------------------------------------------------- fastai references


class FastaiCosAnneal:
    """fastai 0.7 sgdr.py CosAnneal.calc_lr, transcribed; calc(t) is the LR of step t."""

    def __init__(self, lr, nb, cycle_mult=1):
        self.lr, self.nb, self.cycle_mult = lr, nb, cycle_mult
        self.cycle_iter, self.cycle_count, self.ends = 0, 0, []

    def calc(self, iteration):
        if iteration < self.nb / 20:
            self.cycle_iter += 1
            return self.lr / 100.0
        cos_out = np.cos(np.pi * (self.cycle_iter) / self.nb) + 1
        self.cycle_iter += 1
        if self.cycle_iter == self.nb:
            self.cycle_iter = 0
            self.nb *= self.cycle_mult
            self.ends.append(iteration)  # on_cycle_end
            self.cycle_count += 1
        return self.lr / 2 * cos_out


@given(st.floats(1e-3, 2.0), st.integers(2, 60), st.integers(1, 30))
def test_fastai_cos_anneal_reproduces_fastai_0_7_step_by_step(lr, nb, cycle_mult):
    ref = FastaiCosAnneal(lr, nb, cycle_mult)
    expect = [ref.calc(t) for t in range(NSTEPS)]
    schedule = S.fastai_cos_anneal(lr, nb, cycle_mult)
    np.testing.assert_allclose(values(schedule), expect, rtol=1e-5, atol=1e-7 * lr)
    assert schedule.cycle_ends(num_steps=NSTEPS) == ref.ends


def test_fastai_cos_anneal_first_twentieth_runs_at_lr_over_100():
    v = values(S.fastai_cos_anneal(0.1, 100), 200)
    np.testing.assert_allclose(v[:5], 0.001)  # steps 0..4 < 100 / 20
    np.testing.assert_allclose(v[5], 0.05 * (1 + np.cos(np.pi * 5 / 100)), rtol=1e-6)
    np.testing.assert_allclose(v[99], 0.05 * (1 + np.cos(np.pi * 99 / 100)), rtol=1e-4)  # ~0
    assert v[100] == np.float32(0.1)  # the restart has no lr / 100 ramp


def fastai_combined_cos(pct, start, middle, end):
    """fastai v2 combined_cos (SchedCos pieces joined by combine_scheds), transcribed."""
    sched_cos = lambda a, b, pos: a + (1 + math.cos(math.pi * (1 - pos))) * (b - a) / 2

    def inner(pos):
        if pos >= 1:
            return end
        if pos < pct:
            return sched_cos(start, middle, pos / pct)
        return sched_cos(middle, end, (pos - pct) / (1 - pct))

    return inner


@given(
    st.floats(1e-3, 2.0),
    st.integers(1, 300),
    st.floats(0.05, 0.95),
    st.sampled_from([(0.95, 0.85, 0.95), (0.9, 0.8, 0.99)]),
)
def test_one_cycle_and_momentum_follow_fastai_v2(peak, total, pct, moms):
    steps = range(total + 3)
    lr = fastai_combined_cos(pct, peak / 25, peak, peak / 1e5)
    np.testing.assert_allclose(
        values(S.one_cycle(peak, total, pct), total + 3),
        [lr(t / total) for t in steps],
        rtol=1e-4,
        atol=1e-6 * peak,
    )
    mom = fastai_combined_cos(pct, *moms)
    np.testing.assert_allclose(
        values(S.one_cycle_momentum(total, pct, moms), total + 3),
        [mom(t / total) for t in steps],
        rtol=1e-5,
    )


# ------------------------------------------------------------- step decay, constant


def test_step_decay_resnet_schedule():
    schedule = S.step_decay(0.1, [32000, 48000])
    got = schedule(jnp.array([0, 31999, 32000, 47999, 48000, 64000]))
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


@given(
    st.floats(1e-3, 1.0),
    st.lists(st.integers(1, 400), min_size=1, max_size=5, unique=True).map(sorted),
    st.floats(0.05, 0.9),
)
def test_step_decay_changes_exactly_at_each_boundary(lr, bounds, factor):
    v = values(S.step_decay(lr, bounds, factor)).astype(np.float64)
    changes = [t for t in range(1, NSTEPS) if v[t] != v[t - 1]]
    assert changes == bounds
    expect = [lr * factor ** (k + 1) for k in range(len(bounds))]
    np.testing.assert_allclose(v[bounds], expect, rtol=1e-6)


def test_constant_is_constant_and_shaped_like_the_step():
    schedule = S.constant(0.25)
    assert float(schedule(0)) == 0.25 and float(schedule(2**40)) == 0.25
    np.testing.assert_array_equal(jax.vmap(schedule)(jnp.arange(4)), np.full(4, 0.25))


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: S.sgdr(0.1, 0), "cycle_steps"),
        (lambda: S.sgdr(0.1, -3), "cycle_steps"),
        (lambda: S.sgdr(0.1, 2.5), "cycle_steps"),
        (lambda: S.sgdr(0.1, 10, cycle_mult=0.5), "cycle_mult"),
        (lambda: S.sgdr(0.1, 10, cycle_mult=float("nan")), "cycle_mult"),
        (lambda: S.sgdr(0.1, 10, cycle_mult=1.0000001), "cycle_mult"),
        (lambda: S.sgdr(0.1, 10, min_lr=0.2), "min_lr"),
        (lambda: S.sgdr(0.1, 10, min_lr=-0.01), "min_lr"),
        (lambda: S.sgdr(0.0, 10), "peak_lr"),
        (lambda: S.sgdr(float("inf"), 10), "peak_lr"),
        (lambda: S.sgdr(float("nan"), 10), "peak_lr"),
        (lambda: S.sgdr(0.1, 10, cycle_decay=0.0), "cycle_decay"),
        (lambda: S.sgdr(0.1, 10, cycle_decay=1.5), "cycle_decay"),
        (lambda: S.sgdr(0.1, 10, warmup_steps=-1), "warmup_steps"),
        (lambda: S.sgdr(0.1, 10, num_cycles=0), "num_cycles"),
        (lambda: S.sgdr(0.1, 10, cycle_mult=10, num_cycles=100), "num_cycles"),
        (lambda: S.cycle_ends(10, 0), "num_cycles"),
        (lambda: S.sgdr(0.1, 10).cycle_ends(), "num_cycles"),
        (lambda: S.sgdr(0.1, 10, num_cycles=2).cycle_ends(3), "num_cycles"),
        (lambda: S.cosine_warmup(0.1, 100, 100), "warmup_steps"),
        (lambda: S.cosine_warmup(0.1, 100, 120), "warmup_steps"),
        (lambda: S.cosine_warmup(0.1, 5, 4), "warmup_steps"),  # step 4: the peak or end_lr?
        (lambda: S.cosine_warmup(0.1, 1, 0), "total_steps"),
        (lambda: S.cosine_warmup(0.1, 0, 0), "total_steps"),
        (lambda: S.cosine_warmup(0.1, 100, 10, end_lr=0.5), "end_lr"),
        (lambda: S.cosine_warmup(0.1, 100, 10, init_lr=float("inf")), "init_lr"),
        (lambda: S.one_cycle(0.1, 100, pct_start=0.0), "pct_start"),
        (lambda: S.one_cycle(0.1, 100, pct_start=1.0), "pct_start"),
        (lambda: S.one_cycle(0.1, 0), "total_steps"),
        (lambda: S.one_cycle(0.1, 100, div=0.5), "div"),
        (lambda: S.one_cycle(0.1, 100, final_div=float("nan")), "final_div"),
        (lambda: S.one_cycle_momentum(100, moms=(0.95, 0.85)), "moms"),
        (lambda: S.one_cycle_momentum(100, moms=(0.95, 1.2, 0.95)), "moms"),
        (lambda: S.step_decay(0.1, []), "boundaries"),
        (lambda: S.step_decay(0.1, [10, 5]), "boundaries"),
        (lambda: S.step_decay(0.1, [0, 5]), "boundaries"),
        (lambda: S.step_decay(0.1, [5], factor=0.0), "factor"),
        (lambda: S.constant(float("nan")), "value"),
        (lambda: S.fastai_cos_anneal(0.1, 1), "cycle_steps"),
        (lambda: S.fastai_cos_anneal(0.1, 10, cycle_mult=1.5), "cycle_mult"),
        (lambda: S.sgdr(0.1, 10)(float("nan")), "step"),
        (lambda: S.sgdr(0.1, 10)(2**70), "step"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()


# -------------------------------------------------------------- in use with optax


def test_optax_sgd_uses_schedule_value_k_at_update_k():
    """Reading the LR in use: the k-th update (k = 0, 1, ...) applies schedule(k)."""
    schedule = S.sgdr(0.5, 4, cycle_mult=2, warmup_steps=2, min_lr=0.01, num_cycles=2)
    opt = optax.sgd(learning_rate=schedule)
    params, state = jnp.zeros(()), opt.init(jnp.zeros(()))
    moves = []
    for _ in range(16):  # loss = params, gradient 1: each update moves by -lr
        updates, state = opt.update(jnp.ones(()), state)
        moves.append(-float(updates))
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(moves, values(schedule, 16), rtol=1e-6)


def test_sgd_momentum_with_sgdr_trains_a_small_model():
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (64, 3))
    y = x @ jnp.array([1.5, -2.0, 0.5]) + 0.3
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    schedule = S.sgdr(0.05, cycle_steps=20, cycle_mult=2, num_cycles=3)
    opt = optax.sgd(learning_rate=schedule, momentum=0.9)
    params = {"w": jax.random.normal(key_w, (3,)), "b": jnp.zeros(())}
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    first = float(loss(params))
    for _ in range(schedule.cycle_ends()[-1] + 1):
        params, state, _ = step(params, state)
    assert float(loss(params)) < 1e-3 * first


# ---------------------------------------------------------------------- figures


def test_plot_schedule_marks_cycle_ends_and_overlays_schedules(tmp_path):
    schedule = S.sgdr(0.1, 10, cycle_mult=2, warmup_steps=5)
    fig = plots.plot_schedule(schedule, 80, label="sgdr", path=tmp_path / "s.png")
    ax = fig.axes[0]
    curve, *marks = ax.lines
    np.testing.assert_allclose(curve.get_ydata(), values(schedule, 80))
    assert [line.get_xdata()[0] for line in marks] == schedule.cycle_ends(num_steps=80)
    assert [line.get_xdata()[0] for line in marks] == [14, 34, 74]
    assert (tmp_path / "s.png").stat().st_size > 0

    plots.plot_schedule(S.one_cycle(0.1, 80), 80, ax=ax, label="one cycle")
    plots.plot_schedule(S.constant(0.05), 80, ax=ax, cycle_ends=[39])
    assert len(ax.lines) == 1 + 3 + 1 + 1 + 1
    onecycle = optax.cosine_onecycle_schedule(80, 0.1)  # takes a scalar count only
    plots.plot_schedule(onecycle, 80, ax=ax)
    np.testing.assert_allclose(ax.lines[-1].get_ydata(), [onecycle(i) for i in range(80)],
                               atol=1e-7)  # fmt: skip
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sgdr", "one cycle"]


def test_schedules_demo_prints_a_table_and_writes_the_figure(tmp_path, capsys):
    import schedules_demo as demo

    demo.main(["--out", str(tmp_path), "--quick"])
    out = capsys.readouterr().out
    assert "sgdr" in out and "one_cycle" in out
    assert (tmp_path / "schedules.png").stat().st_size > 0
