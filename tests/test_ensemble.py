"""Snapshot ensembles: stacking, vmapped prediction, combiners, TTA, capture at cycle ends."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlearn import ensemble
from jaxlearn.data.augment import tta_views
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import CaptureParams, fit
from jaxlearn.models import MLP
from jaxlearn.schedules import sgdr
from jaxlearn.state import TrainState
from jaxlearn.steps import default_preprocess, make_train_step


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> mean pool -> Dense: uses both collections."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(3)(x)


MODEL = TinyCNN()
IMAGES = np.asarray(jax.random.randint(jax.random.key(0), (7, 6, 6, 2), 0, 256), np.uint8)
LABELS = np.array([0, 1, 2, 0, 1, 2, 0], np.int32)


@functools.cache
def _member(i):
    """TinyCNN variables drawn with NumPy (no init to compile): weights and BatchNorm stats."""
    rng = np.random.default_rng(i)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    params = {
        "Conv_0": {"kernel": normal(3, 3, 2, 4), "bias": normal(4)},
        "BatchNorm_0": {"scale": 1 + 0.1 * normal(4), "bias": normal(4)},
        "Dense_0": {"kernel": normal(4, 3), "bias": normal(3)},
    }
    stats = {"BatchNorm_0": {"mean": normal(4), "var": 1 + np.abs(normal(4))}}
    return {"params": params, "batch_stats": stats}


def _snapshots(m=3):
    """m members with different weights and non-trivial BatchNorm statistics."""
    return [_member(i) for i in range(m)]


def _loop_logits(snapshots, images):
    x = default_preprocess(jnp.asarray(images))
    return np.stack([np.asarray(MODEL.apply(s, x, train=False)) for s in snapshots])


def test_stack_unstack_round_trip_and_mismatch():
    snaps = _snapshots()
    stacked = ensemble.stack(snaps)
    assert ensemble.num_members(stacked) == 3
    assert stacked["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 2, 4)
    for a, b in zip(ensemble.unstack(stacked), snaps, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    other = {"params": {"Dense_0": {"kernel": np.zeros((4, 3))}}, "batch_stats": {}}
    with pytest.raises(ValueError, match=r"snapshots\[1\]"):
        ensemble.stack([snaps[0], other])
    reshaped = {
        **snaps[1],
        "params": {
            **snaps[1]["params"],
            "Dense_0": {"kernel": np.zeros((5, 3)), "bias": np.zeros(3)},
        },
    }
    with pytest.raises(ValueError, match=r"snapshots\[1\]"):
        ensemble.stack([snaps[0], reshaped])
    with pytest.raises(ValueError, match="non-empty"):
        ensemble.stack([])


def test_stacking_compiles_one_program_however_many_leaf_shapes():
    from conftest import count_compilations

    # Seven leaf shapes no other test uses; NumPy and device arrays mixed.
    rng = np.random.default_rng(0)
    snaps = [{f"w{i}": rng.random((i + 3, 11)).astype(np.float32) for i in range(7)}
             for _ in range(3)]  # fmt: skip
    snaps[1] = jax.device_put(snaps[1])
    with count_compilations() as compiled:
        stacked = ensemble.stack(snaps)
        members = ensemble.unstack(stacked)
    # A stack program and an unstack program; per leaf they were 7 + 21.
    assert len(compiled) == 2
    for a, b in zip(members, snaps, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_vmapped_members_equal_python_loop():
    snaps = _snapshots()
    expected = _loop_logits(snaps, IMAGES)
    # batch_size 3 over 7 images: two full chunks and one padded chunk.
    got = ensemble.member_logits(MODEL.apply, snaps, IMAGES, batch_size=3, member_batch=3)
    assert got.shape == (3, 1, 7, 3)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-6)
    stacked = ensemble.member_logits(MODEL.apply, ensemble.stack(snaps), IMAGES, batch_size=7)
    np.testing.assert_allclose(stacked, got, rtol=1e-6, atol=1e-6)
    # Default (in sequence on CPU), in sequence, in pairs plus a remainder of one.
    for member_batch in (None, 1, 2):
        part = ensemble.member_logits(MODEL.apply, snaps, IMAGES, member_batch=member_batch)
        np.testing.assert_allclose(part, got, rtol=1e-5, atol=1e-6)


def test_predict_is_mean_of_softmax_or_softmax_of_mean_logits():
    snaps = _snapshots()
    logits = _loop_logits(snaps, IMAGES)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        ensemble.predict(MODEL.apply, snaps, IMAGES), probs.mean(0), rtol=1e-5, atol=1e-6
    )
    mean = logits.mean(0)
    np.testing.assert_allclose(
        ensemble.predict(MODEL.apply, snaps, IMAGES, combine="logits"),
        np.exp(mean) / np.exp(mean).sum(-1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )


def test_combiners_by_hand():
    # Two members, one example: (0.9, 0.1) and (0.2, 0.8).
    logits = np.log(np.array([[[0.9, 0.1]], [[0.2, 0.8]]], np.float32))
    np.testing.assert_allclose(ensemble.combine_logits(logits), [[0.55, 0.45]], rtol=1e-6)
    # Mean logit = log of the geometric mean: sqrt(.18) : sqrt(.08) = 0.6 : 0.4.
    np.testing.assert_allclose(ensemble.combine_logits(logits, "logits"), [[0.6, 0.4]], rtol=1e-5)
    with pytest.raises(ValueError, match="combine"):
        ensemble.combine_logits(logits, "vote")
    with pytest.raises(ValueError, match="combine"):
        ensemble.predict(MODEL.apply, _snapshots(1), IMAGES, combine="max")
    with pytest.raises(ValueError, match=r"one model's variables\? pass \[variables\]"):
        ensemble.predict(MODEL.apply, _snapshots(1)[0], IMAGES)


def test_accuracy_curve_is_accuracy_of_first_k_ensembles():
    snaps = _snapshots(4)
    curve = ensemble.accuracy_curve(MODEL.apply, snaps, IMAGES, LABELS, batch_size=4)
    assert curve.ensemble.shape == curve.members.shape == (4,)
    for k in range(1, 5):
        probs = ensemble.predict(MODEL.apply, snaps[:k], IMAGES)
        assert curve.ensemble[k - 1] == np.mean(probs.argmax(-1) == LABELS)
        alone = ensemble.predict(MODEL.apply, snaps[k - 1 : k], IMAGES)
        assert curve.members[k - 1] == np.mean(alone.argmax(-1) == LABELS)
    assert curve.ensemble[0] == curve.members[0]


def test_accuracy_curve_with_views_is_that_of_tta_ensembles():
    snaps = _snapshots(3)
    for combine in ("prob", "logits"):
        curve = ensemble.accuracy_curve(
            MODEL.apply, snaps, IMAGES, LABELS, views_fn=tta_views, combine=combine
        )
        logits = ensemble.member_logits(MODEL.apply, snaps, IMAGES, views_fn=tta_views)
        for k in range(1, 4):
            probs = ensemble.combine_logits(logits[:k].reshape(-1, *logits.shape[2:]), combine)
            assert curve.ensemble[k - 1] == np.mean(probs.argmax(-1) == LABELS)
        alone = [ensemble.predict_tta(MODEL.apply, s, IMAGES, combine=combine) for s in snaps]
        hits = np.equal([p.argmax(-1) for p in alone], LABELS)
        np.testing.assert_array_equal(curve.members, np.mean(hits, axis=1))


def test_mean_curve_averages_pointwise_and_rejects_ragged_curves():
    a = ensemble.EnsembleCurve(np.array([0.5, 0.7]), np.array([0.5, 0.6]))
    b = ensemble.EnsembleCurve(np.array([0.7, 0.9]), np.array([0.7, 0.8]))
    mean = ensemble.mean_curve([a, b])
    np.testing.assert_allclose(mean.ensemble, [0.6, 0.8])
    np.testing.assert_allclose(mean.members, [0.6, 0.7])
    short = ensemble.EnsembleCurve(np.array([0.5]), np.array([0.5]))
    with pytest.raises(ValueError, match="lengths"):
        ensemble.mean_curve([a, short])
    with pytest.raises(ValueError, match="one or more"):
        ensemble.mean_curve([])


def test_tta_averages_probabilities_over_views():
    snap = _snapshots(1)[0]
    got = ensemble.predict_tta(MODEL.apply, snap, IMAGES, batch_size=4)
    views = [IMAGES, IMAGES[:, :, ::-1]]
    probs = [jax.nn.softmax(_loop_logits([snap], v)[0]) for v in views]
    np.testing.assert_allclose(got, np.mean(probs, axis=0), rtol=1e-5, atol=1e-6)
    shifted = ensemble.predict_tta(
        MODEL.apply, snap, IMAGES, lambda x: tta_views(x, shifts=((0, 0), (1, 1)))
    )
    assert not np.allclose(shifted, got)  # the shifted views did count


def test_save_and_load_snapshots(tmp_path):
    snaps = _snapshots(2)
    ensemble.save_snapshots(tmp_path / "snaps", snaps)
    loaded = ensemble.load_snapshots(tmp_path / "snaps")
    assert len(loaded) == 2
    for a, b in zip(loaded, snaps, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ValueError, match="exists"):
        ensemble.save_snapshots(tmp_path / "snaps", snaps)
    with pytest.raises(FileNotFoundError):
        ensemble.load_snapshots(tmp_path / "missing")


def test_snapshot_steps_are_the_step_counts_after_each_cycle_bottom():
    schedule = sgdr(0.1, cycle_steps=2, cycle_mult=2, num_cycles=3, min_lr=0.001)
    steps = ensemble.snapshot_steps(schedule)
    assert steps == [2, 6, 14]
    for count in steps:
        # The update that produced step count `count` used the cycle's minimum;
        # the next one restarts (or the schedule is over).
        assert float(schedule(count - 1)) == pytest.approx(0.001)
        assert float(schedule(count)) > 0.001 or count == steps[-1]
    with pytest.raises(ValueError, match="schedule"):
        ensemble.snapshot_steps(optax.constant_schedule(0.1))


def test_fit_captures_the_state_at_cycle_ends():
    x = np.asarray(jax.random.normal(jax.random.key(1), (16, 5)), np.float32)
    y = np.arange(16, dtype=np.int32) % 3
    schedule = sgdr(0.5, cycle_steps=2, cycle_mult=2, num_cycles=3)
    model = MLP(features=(8,), num_classes=3)
    step_fn = make_train_step()
    loader = ArrayLoader(x, y, batch_size=4, seed=0)  # 4 steps per epoch

    def fresh():
        return TrainState.create(model, optax.sgd(schedule, momentum=0.9), jax.random.key(2), x[:1])

    capture = CaptureParams(ensemble.snapshot_steps(schedule))
    fit(fresh(), loader, train_step=step_fn, steps=14, callbacks=[capture], progress=False)
    assert len(capture.snapshots) == 3
    # A second run stopped at 2, 6 and 14 steps (fit continues from state.step).
    state = fresh()
    for snap, count in zip(capture.snapshots, [2, 6, 14], strict=True):
        state, _ = fit(state, loader, train_step=step_fn, steps=count, progress=False)
        assert int(state.step) == count
        jax.tree.map(np.testing.assert_array_equal, snap["params"], jax.device_get(state.params))


def test_plot_ensemble_curve(tmp_path):
    from jaxlearn.plots import plot_ensemble_curve

    curve = ensemble.EnsembleCurve(np.array([0.8, 0.84, 0.86]), np.array([0.8, 0.81, 0.82]))
    fig = plot_ensemble_curve(curve, path=tmp_path / "ens.png")
    assert (tmp_path / "ens.png").stat().st_size > 0
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), curve.ensemble)
    reference = ax.get_lines()[-1]
    assert list(reference.get_ydata()) == [0.82, 0.82]  # the last snapshot alone by default
    with pytest.raises(ValueError, match="curve"):
        plot_ensemble_curve(ensemble.EnsembleCurve(np.array([]), np.array([])))
