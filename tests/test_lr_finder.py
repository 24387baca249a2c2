"""LR range test: the caller's state survives, the sweep drives the optimizer, rules are total."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlearn import schedules as S
from jaxlearn.lr_finder import RULES, lr_find, lr_sweep, suggest
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(2)(x)


@functools.cache
def _blobs():
    """Two Gaussian blobs at (-1, -1) and (1, 1), unit variance: 512 points, batches of 32."""
    rng = np.random.default_rng(0)
    y = (rng.random(512) < 0.5).astype(np.int32)
    x = (rng.normal(size=(512, 2)) + (2 * y[:, None] - 1)).astype(np.float32)
    return [{"image": x[i : i + 32], "label": y[i : i + 32]} for i in range(0, 512, 32)]


def _state(tx=None):
    tx = tx or optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    return TrainState.create(Linear(), tx, jax.random.key(0), _blobs()[0]["image"])


@functools.cache
def _step():
    return make_train_step()  # jitted, donates its state argument


def test_callers_state_is_unchanged_and_still_usable():
    state = _state()
    before = jax.tree.map(np.array, state)
    result = lr_find(state, _step(), itertools.cycle(_blobs()), num_steps=30)
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), before)
    assert state.tx is not None and int(state.step) == 0
    new, metrics = _step()(state, _blobs()[0])  # the buffers were not donated away
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1


def test_sweep_drives_the_optimizer():
    # A step whose "loss" is the size of a plain SGD update on a unit gradient: the LR used.
    def probe_step(state, batch):
        updates, opt_state = state.tx.update({"w": jnp.ones(())}, state.opt_state)
        return state.replace(opt_state=opt_state, step=state.step + 1), {"loss": -updates["w"]}

    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.zeros(())},
        batch_stats={},
        opt_state=(),
        rng=jax.random.key_data(jax.random.key(0)),
        apply_fn=None,
        tx=optax.identity(),
    )
    for mode in ("exp", "linear"):
        result = lr_find(
            state, probe_step, itertools.repeat({}), make_tx=optax.sgd, start_lr=1e-3,
            end_lr=1.0, num_steps=12, mode=mode, stop_factor=1e9,
        )  # fmt: skip
        np.testing.assert_allclose(result.lrs, lr_sweep(1e-3, 1.0, 12, mode))
        np.testing.assert_allclose(result.losses, result.lrs, rtol=1e-6)
        assert result.stopped == "completed"
    expected = [1e-7, 10 ** (-7 + 8 * 50 / 99), 10]  # 8 decades in 99 intervals
    np.testing.assert_allclose(lr_sweep(1e-7, 10, 100)[[0, 50, 99]], expected)


def test_suggestions_fall_in_the_empirically_good_range():
    # The good range: LRs at which 3 epochs (48 steps) of SGD with momentum 0.9 at a constant
    # LR end (mean loss of the last 16 steps) within 1.5x of the best such loss on a grid of 25.
    train = make_train_step(jit=False)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    start = _state(tx)
    xs = jnp.stack([b["image"] for b in _blobs()] * 3)
    ys = jnp.stack([b["label"] for b in _blobs()] * 3)

    def final_loss(lr):
        hyper = {**start.opt_state.hyperparams, "learning_rate": lr}
        state = start.replace(opt_state=start.opt_state._replace(hyperparams=hyper))
        body = lambda s, b: train(s, {"image": b[0], "label": b[1]})
        _, metrics = jax.lax.scan(body, state, (xs, ys))
        return metrics["loss"][-16:].mean()

    grid = np.geomspace(1e-5, 1e3, 25)
    final = np.asarray(jax.jit(jax.vmap(final_loss))(jnp.asarray(grid, jnp.float32)))
    good = grid[final <= 1.5 * final.min()]
    low, high = good.min(), good.max()
    assert 1e-4 < low and high < 1e2  # the range is bounded on both sides
    result = lr_find(_state(), _step(), itertools.cycle(_blobs()))
    for name, suggestion in result.suggestions.items():
        assert suggestion.lr is not None, suggestion.reason
        assert low <= suggestion.lr <= high, (name, suggestion.lr, low, high)


def test_diverging_sweep_stops_and_explains():
    # Starting at LR 1e3 the loss explodes at once: stop early, no exception, reasons given.
    result = lr_find(_state(), _step(), itertools.cycle(_blobs()), start_lr=1e3, end_lr=1e6)
    assert len(result.lrs) < 100
    assert result.stopped.startswith(("diverged", "non-finite"))
    for suggestion in result.suggestions.values():
        assert suggestion.lr is None and suggestion.reason


def _check_total(suggestions):
    for name, s in suggestions.items():
        assert (s.lr is None) == bool(s.reason), (name, s)
        if s.lr is not None:
            assert np.isfinite(s.lr) and s.lr > 0 and np.isfinite(s.loss)


LRS = np.geomspace(1e-6, 1.0, 60)


def test_rules_on_a_curve_that_diverges_at_once():
    out = suggest(LRS, np.exp(np.linspace(0, 3, 60)), skip_start=0, skip_end=0)
    _check_total(out)
    for name in ("valley", "steep", "minimum"):
        assert out[name].lr is None and "start_lr" in out[name].reason


def test_rules_on_a_flat_curve():
    out = suggest(LRS, np.full(60, 2.3), skip_start=0, skip_end=0)
    assert all(s.lr is None and "flat" in s.reason for s in out.values())


@pytest.mark.parametrize("n", [0, 1, 5, 9])
def test_rules_on_short_curves(n):
    out = suggest(LRS[:n], np.linspace(2, 1, n), skip_start=0, skip_end=0)
    assert all(s.lr is None and f"only {n} usable points" in s.reason for s in out.values())
    # fast.ai's trimming (a tenth of the start, 5 at the end) of a 12-point curve leaves 6.
    out = suggest(LRS[:12], np.linspace(2, 1, 12))
    assert all(s.lr is None for s in out.values())


def test_rules_on_nan_truncated_curves():
    losses = np.concatenate([np.linspace(2.0, 0.5, 30), [np.nan] * 30])
    out = suggest(LRS, losses, skip_start=0, skip_end=0)
    _check_total(out)
    assert all(s.lr is None or s.lr <= LRS[29] for s in out.values())
    assert out["valley"].lr is not None and out["minimum"].lr == pytest.approx(LRS[29] / 10)
    losses[5] = np.inf
    out = suggest(LRS, losses, skip_start=0, skip_end=0)
    assert all(s.lr is None and "non-finite" in s.reason for s in out.values())


def test_rules_on_a_textbook_curve():
    # Flat, then falling fastest at log10(lr) = -3, then blowing up after 1e-1.
    x = np.log10(LRS)
    losses = 2.0 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.exp(3 * (x + 1))
    out = suggest(LRS, losses, skip_start=0, skip_end=0)
    _check_total(out)
    assert 10**-3.3 < out["steep"].lr < 10**-2.7
    lowest = LRS[np.argmin(losses)]
    assert out["minimum"].lr == pytest.approx(lowest / 10)
    assert LRS[0] < out["valley"].lr < lowest
    assert set(out) == set(RULES)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="start_lr"):
        lr_sweep(0.0, 1.0, 10)
    for end_lr in (0.1, np.inf):
        with pytest.raises(ValueError, match="end_lr"):
            lr_sweep(1.0, end_lr, 10)
    with pytest.raises(ValueError, match="mode"):
        lr_sweep(1e-3, 1.0, 10, mode="cos")
    for stop_factor in (1.0, np.nan):  # NaN would never stop a diverging sweep
        with pytest.raises(ValueError, match="stop_factor"):
            lr_find(None, None, [], stop_factor=stop_factor)


class _EmptyEpochs:
    """A loader whose epochs yield nothing (a custom one: jaxlearn's refuse empty data)."""

    def __len__(self):
        return 0

    def epoch(self, e):
        return iter(())


def test_a_loader_without_batches_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="no batch in epoch 0"):
        lr_find(_state(), _step(), _EmptyEpochs(), num_steps=5)


def test_plot_marks_the_suggestions(tmp_path):
    from jaxlearn.lr_finder import LRFindResult
    from jaxlearn.plots import plot_lr_find

    x = np.log10(LRS)
    losses = 2.0 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.exp(3 * (x + 1))
    out = suggest(LRS, losses, skip_start=0, skip_end=0)
    out["slide"] = out["slide"]._replace(lr=None, loss=None, reason="slide: test")
    result = LRFindResult(LRS, losses, losses, out, "completed")
    fig = plot_lr_find(result, path=tmp_path / "lr.png")
    ax = fig.axes[0]
    assert (tmp_path / "lr.png").stat().st_size > 0 and ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "slide: n/a" in labels and any(t.startswith("valley: ") for t in labels)
    marked = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [float(m.get_xdata()[0]) for m in marked] == [out[k].lr for k in RULES if k != "slide"]


def _probe(grads):
    """A step whose "loss" is the head's update on unit gradients, plus 1000x the body's."""

    def step(state, batch):
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        size = -updates["fc"] + 1000 * jnp.abs(updates["body"])
        return state.replace(opt_state=opt_state, step=state.step + 1), {"loss": size}

    return step


def _probe_state(tx):
    params = {"body": jnp.zeros(()), "fc": jnp.zeros(())}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)), apply_fn=None, tx=tx,
    )  # fmt: skip


def test_sweep_uses_the_states_own_optimizer_and_trainable_set():
    ones = {"body": jnp.ones(()), "fc": jnp.ones(())}
    sweep = dict(start_lr=1e-3, end_lr=1.0, num_steps=12, stop_factor=1e9)
    momentum = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.9)
    only_head = optax.partition(
        {"head": momentum, "frozen": optax.set_to_zero()}, {"body": "frozen", "fc": "head"}
    )
    # Momentum's trace of unit gradients after i+1 steps is sum_k 0.9^k: the sweep sets the
    # rate, the state's optimizer keeps its momentum; the frozen body never moves.
    trace = np.cumsum(0.9 ** np.arange(12))
    result = lr_find(_probe_state(only_head), _probe(ones), itertools.repeat({}), **sweep)
    np.testing.assert_allclose(result.losses, result.lrs * trace, rtol=1e-5)
    # make_tx replaces the optimizer: plain SGD, every parameter trains.
    result = lr_find(_probe_state(only_head), _probe({"body": jnp.zeros(()), "fc": jnp.ones(())}),
                     itertools.repeat({}), make_tx=optax.sgd, **sweep)  # fmt: skip
    np.testing.assert_allclose(result.losses, result.lrs, rtol=1e-5)


def test_the_states_schedule_is_held_so_cycles_and_warmups_do_not_zero_the_sweep():
    ones = {"body": jnp.zeros(()), "fc": jnp.ones(())}  # the head's update alone
    sweep = dict(start_lr=1e-3, end_lr=1.0, num_steps=12, stop_factor=1e9)
    trace = np.cumsum(0.9 ** np.arange(12))
    for schedule, skipped in (
        (S.sgdr(0.5, cycle_steps=3), 0),  # back to 0 every 3 steps: held at its peak
        (optax.linear_schedule(0.0, 1.0, 5), 1),  # starts at 0: moves on one step, then held
    ):
        sweep["stop_factor"] = np.inf  # a first "loss" of 0 would otherwise read as divergence
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
        result = lr_find(_probe_state(tx), _probe(ones), itertools.repeat({}), **sweep)
        assert result.stopped == "completed"
        expected = result.lrs * trace
        expected[:skipped] = 0.0
        np.testing.assert_allclose(result.losses, expected, rtol=1e-5)


def test_an_optimizer_that_hides_its_learning_rate_is_refused():
    with pytest.raises(ValueError, match="inject_hyperparams"):
        lr_find(_state(optax.sgd(0.1)), _step(), itertools.cycle(_blobs()))


def test_repeated_sweeps_compile_once():
    from conftest import count_compilations

    lr_find(_state(), _step(), itertools.cycle(_blobs()), num_steps=12)
    with count_compilations() as compiled:
        for end_lr in (1.0, 5.0):  # another table of rates is data, not another program
            lr_find(_state(), _step(), itertools.cycle(_blobs()), num_steps=12, end_lr=end_lr)
    assert len(compiled) == 0


def test_an_optimizer_at_rate_zero_is_refused():
    zero = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)
    with pytest.raises(ValueError, match="rate 0"):
        lr_find(_state(zero), _step(), itertools.cycle(_blobs()), num_steps=12)
