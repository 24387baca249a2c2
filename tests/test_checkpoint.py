"""Orbax checkpoints: round trip, max_to_keep, model mismatch, and SIGKILL-then-resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from core_worker import TinyNet, fit_run, make_run, tiny_data

from jaxlearn.checkpoint import Checkpointer
from jaxlearn.state import TrainState

WORKER = Path(__file__).with_name("core_worker.py")


def _states(steps=3):
    """Host copies of the state after each of the first `steps` steps."""
    state, loader, step = make_run()
    states = []
    for _, batch in zip(range(steps), loader.epoch(0), strict=False):
        state, _ = step(state, batch)
        states.append(jax.device_get(state))
    return states


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_round_trip_keeps_everything_and_max_to_keep(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    first, state, third = _states(3)
    ckpt.save(first)
    snap = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    history = {"loss": np.array([2.5, 1.25], np.float32), "eval_loss": np.array([], np.float32)}
    ckpt.save(state, history=history, snapshots=[snap, snap], config={"lr": 0.05, "arch": "tiny"})
    ckpt.save(third)
    assert ckpt.all_steps() == [2, 3]
    fresh, _, _ = make_run()
    out = ckpt.restore(fresh, step=2)
    _assert_trees_equal(out["state"], state)
    assert type(out["state"].opt_state) is type(state.opt_state)  # optax NamedTuples, not dicts
    assert out["state"].apply_fn is fresh.apply_fn
    assert int(fresh.step) == 0  # the target is only read
    np.testing.assert_array_equal(out["history"]["loss"], history["loss"])
    assert out["config"] == {"lr": 0.05, "arch": "tiny"}
    assert len(out["snapshots"]) == 2
    _assert_trees_equal(out["snapshots"][1], snap)
    assert int(ckpt.restore(fresh)["state"].step) == 3
    with pytest.raises(FileNotFoundError, match="step 7"):
        ckpt.restore(fresh, step=7)


class _NoBN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.Dense(3)(x.reshape(len(x), -1))


def test_model_without_batchnorm_round_trips(tmp_path):
    images, _ = tiny_data(2)
    state = TrainState.create(_NoBN(), optax.adam(1e-3), jax.random.key(1), images)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state)
    out = ckpt.restore(TrainState.create(_NoBN(), optax.adam(1e-3), jax.random.key(2), images))
    _assert_trees_equal(out["state"], state)


def test_different_model_is_refused_naming_keys(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(make_run()[0])
    images, _ = tiny_data(2)
    other = TrainState.create(TinyNet(num_classes=5), optax.sgd(0.1), jax.random.key(0), images)
    before = jax.device_get(other)
    with pytest.raises(ValueError, match=r"shape differs: .*params/Dense_0/bias") as err:
        ckpt.restore(other)
    # Plain SGD has neither the injected hyperparameters nor momentum's trace.
    assert "unexpected: opt_state/count, opt_state/hyperparams/learning_rate" in str(err.value)
    assert "opt_state/inner_state/0/trace/BatchNorm_0/bias" in str(err.value)
    _assert_trees_equal(other, before)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path / "x", max_to_keep=0)


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    fit_run(str(tmp_path / "straight.npz"), str(tmp_path / "straight"), epochs=3)
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(WORKER), "fit", str(tmp_path / "unused.npz"), str(killed_dir), "3"]
    proc = subprocess.Popen([*cmd, "report"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            # Checkpoints at 2, 4, 6, all on disk when "step 7" is printed; killed during
            # step 8 or its checkpoint's write.
            if line.strip() == "step 7":
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "unused.npz").exists()
    assert Checkpointer(killed_dir).latest_step() == 6
    fit_run(str(tmp_path / "resumed.npz"), str(killed_dir), epochs=3)
    straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert int(resumed["step"]) == int(straight["step"]) == 12
    assert sorted(straight.files) == sorted(resumed.files)
    for key in straight.files:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)


def test_a_scripts_last_save_survives_its_normal_exit_and_a_bad_config_fails_at_once(tmp_path):
    # Orbax writes in background threads that die with the process: a save as a
    # script's last line must still be waited for.
    code = (
        f"import sys; sys.path.insert(0, {str(WORKER.parent)!r})\n"
        "from core_worker import make_run\n"
        "from jaxlearn.checkpoint import Checkpointer\n"
        f"ckpt = Checkpointer({str(tmp_path / 'run')!r})\n"
        "ckpt.save(make_run()[0], history={'loss': [1.0]})\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    assert Checkpointer(tmp_path / "run").latest_step() == 0
    with Checkpointer(tmp_path / "bad") as ckpt:
        with pytest.raises(ValueError, match="JSON"):
            ckpt.save(make_run()[0], config={"loss": print})  # here, not in the background
        ckpt.save(make_run()[0], config={"lr": np.float32(0.5), "sizes": (64, 128)})
        assert ckpt.config() == {"lr": 0.5, "sizes": [64, 128]}  # NumPy values as JSON ones


def test_async_save_is_safe_against_the_donating_step(tmp_path):
    state, loader, step = make_run()
    batch = next(iter(loader.epoch(0)))
    state, _ = step(state, batch)
    before = jax.device_get(state)  # what the checkpoint must hold
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state)  # returns once the arrays are on the host; the files come later
    step(state, batch)  # donates (deletes) the saved state's buffers at once
    _assert_trees_equal(ckpt.restore(make_run()[0])["state"], before)
