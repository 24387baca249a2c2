"""EMA of the weights in the train state: optax's average, no effect on training, exact resume,
evaluation / prediction / TTA / snapshots from it, and nothing at all without one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compilations
from core_worker import make_run, tiny_data

from jaxlearn import ensemble, programs
from jaxlearn.checkpoint import Checkpointer
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import CaptureParams, evaluate
from jaxlearn.parallel import replicated_sharding
from jaxlearn.state import ema_variables, with_ema, with_ema_weights
from jaxlearn.steps import make_eval_step

DECAY = 0.8  # short runs: an average that still moves over 3-4 steps


def _batches(n=4):
    _, loader, _ = make_run()
    return [b for _, b in zip(range(n), loader.epoch(0), strict=False)]


def _run(state, step, batches):
    """The states after each batch, fetched to the host (the step donates the device ones)."""
    seen = []
    for batch in batches:
        state, _ = step(state, batch)
        seen.append(jax.device_get(state))
    return state, seen


def _assert_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_ema_is_optax_ema_of_the_variables_and_changes_no_training():
    state, _, step = make_run()
    assert state.ema is None and len(programs.arrays(state)) == 6
    plain_leaves = len(jax.tree.leaves(state))
    batches = _batches(3)
    _, plain = _run(state, step, batches)
    fresh, _, _ = make_run()
    with count_compilations() as compiled:
        ema_state = with_ema(fresh, DECAY)
    assert compiled == []  # filled on the host (zeros_like compiled a program per shape)
    assert all(x.sharding == fresh.step.sharding for x in jax.tree.leaves(ema_state.ema))
    # Attached: count 0, the EMA reads as the live variables; its arrays sit with the params'.
    _assert_equal(
        ema_variables(ema_state), {"params": fresh.params, "batch_stats": fresh.batch_stats}
    )
    averaged_leaves = len(jax.tree.leaves((fresh.params, fresh.batch_stats)))
    assert len(jax.tree.leaves(ema_state)) == plain_leaves + 2 + averaged_leaves  # decay, count
    final, averaged = _run(ema_state, step, batches)
    replicated = replicated_sharding(jax.sharding.Mesh(jax.devices(), ("data",)))
    assert all(x.sharding == replicated for x in jax.tree.leaves(final.ema))
    # Training is untouched: the same parameters with or without the EMA. Up to rounding:
    # the two are different programs, and the suite's fast-compile flags (conftest) fuse
    # them differently (values near 0 then differ by up to ~5e-8).
    for p, e in zip(plain, averaged, strict=True):
        got, want = (e.params, e.batch_stats, e.opt_state), (p.params, p.batch_stats, p.opt_state)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    # The average is optax.ema(decay, debias=True) of the variables after each update.
    tx = optax.ema(DECAY, debias=True)
    variables = lambda s: {"params": s.params, "batch_stats": s.batch_stats}
    ema = tx.init(variables(plain[0]))
    for p, e in zip(plain, averaged, strict=True):
        expected, ema = tx.update(variables(p), ema)
        got = ema_variables(e)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert int(final.ema.count) == 3
    # The decay is data: another decay (another seed) runs the compiled program.
    other = with_ema(make_run(seed=1)[0], 0.95)
    with count_compilations() as compiled:
        step(other, batches[0])
    assert len(compiled) == 0
    # Not the live weights: an average of three different ones.
    assert not np.allclose(got["params"]["Dense_0"]["kernel"], final.params["Dense_0"]["kernel"])


def test_ema_checkpoint_resumes_bit_for_bit_and_plain_checkpoints_keep_their_keys(tmp_path):
    batches = _batches(4)
    state, _, step = make_run()
    state = with_ema(state, DECAY)
    state, _ = _run(state, step, batches[:2])
    ckpt = Checkpointer(tmp_path / "ema")
    ckpt.save(state)
    straight, _ = _run(state, step, batches[2:])
    target, _, _ = make_run(seed=5)  # another init: everything must come from the checkpoint
    restored = ckpt.restore(with_ema(target, 0.5))["state"]
    assert isinstance(restored.ema, type(straight.ema))
    resumed, _ = _run(restored, step, batches[2:])
    _assert_equal(resumed, straight)  # params, statistics, optimizer, key and the EMA
    _assert_equal(ema_variables(resumed), ema_variables(straight))
    # A target without an EMA is refused, naming the EMA's keys.
    with pytest.raises(ValueError, match="unexpected: ema/count, ema/decay"):
        ckpt.restore(make_run()[0])
    # Without an EMA, a checkpoint holds exactly the keys it always did.
    plain = Checkpointer(tmp_path / "plain")
    plain.save(make_run()[0])
    plain.wait()
    keys = set(plain.manager.item_metadata(0)["state"])
    assert keys == {"step", "params", "batch_stats", "opt_state", "rng"}


def test_ema_weights_evaluate_predict_tta_and_snapshot():
    state, _, step = make_run()
    state, _ = _run(with_ema(state, DECAY), step, _batches(3))
    images, labels = tiny_data(13, seed=2)
    held = ArrayLoader(images, labels, 8, train=False)
    averaged = ema_variables(state)
    probs = ensemble.predict(state.apply_fn, [averaged], images)
    result = evaluate(with_ema_weights(state), held, make_eval_step())
    np.testing.assert_allclose(result["accuracy"], np.mean(probs.argmax(-1) == labels))
    nll = -np.mean(np.log(probs[np.arange(13), labels]))
    np.testing.assert_allclose(result["loss"], nll, rtol=1e-5)
    assert not np.allclose(probs, ensemble.predict(state.apply_fn, [state.variables], images))
    tta = ensemble.predict_tta(state.apply_fn, averaged, images)
    np.testing.assert_allclose(tta.sum(-1), 1.0, rtol=1e-5)
    # A snapshot of the EMA survives the next (donating) step.
    capture = CaptureParams([3], ema=True)
    capture.on_step_end(3, state, {}, {})
    step(state, _batches(1)[0])
    _assert_equal(capture.snapshots[0], averaged)


def test_ema_refuses_bad_decays_and_a_state_without_one():
    state, _, _ = make_run()
    for decay in (0.0, 1.0, -0.5, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="decay"):
            with_ema(state, decay)
    with pytest.raises(ValueError, match="no EMA"):
        ema_variables(state)
    assert with_ema(state, np.float32(0.99)).ema is not None  # NumPy numbers are numbers
    # A stacked state (as init_many makes) gets one EMA per model.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    ema = with_ema(stacked, 0.9).ema
    assert ema.decay.shape == ema.count.shape == (2,)
