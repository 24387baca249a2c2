"""Progressive resizing: each stage trains at its size, one run's steps and schedule, one
compiled step per size for every seed and optimizer, exact resume, bad stages refused.

tiny_data's images are 8 px and the loader takes 4 steps an epoch, so STAGES trains
steps 0-3 at 6 px and steps 4-11 at 8 px (the stored size: `resize` passes them through).
"""

import functools

import jax
import numpy as np
import optax
import pytest
from conftest import count_compilations
from core_worker import TinyNet, make_run, tiny_data

from jaxlearn.checkpoint import Checkpointer
from jaxlearn.data.augment import compose, random_flip, resize
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import Callback, Checkpoint, StopAtMetric
from jaxlearn.progressive import fit_progressive
from jaxlearn.steps import make_eval_step, make_train_step

STAGES = [(6, 1), (8, 2)]
SEEN: list = []  # (height, width) of every training batch the model ran on, in order


class SizeNet(TinyNet):
    """TinyNet (the same parameters) noting each training batch's size from the device."""

    def __call__(self, x, train: bool):
        if train:  # a host callback: runs at every execution of the step, not once per trace
            jax.debug.callback(functools.partial(SEEN.append, x.shape[1:3]))
        return super().__call__(x, train)


def _step_for_size(size):
    """The README's recipe: the pipeline rebuilt on every call (the same objects come back)."""
    return make_train_step(augment=compose(random_flip(), resize(size)))


def _run(seed=0):
    """core_worker's tiny run (cosine LR from 0.05 over 40 steps) with SizeNet as its model."""
    state, loader, _ = make_run(seed=seed)
    return state.replace(apply_fn=SizeNet().apply), loader


def _host(state, history):
    history = {k: v for k, v in history.items() if k != "time"}  # wall-clock seconds
    return jax.device_get((state.params, state.batch_stats, state.opt_state, state.rng)), history


@functools.cache
def _straight():
    """The uninterrupted run, on the host."""
    state, loader = _run()
    return _host(*fit_progressive(state, loader, stages=STAGES, step_for_size=_step_for_size,
                                  progress=False))  # fmt: skip


def test_each_stage_trains_at_its_size_and_the_run_goes_on_across_stages():
    state, loader = _run()
    eval_data = ArrayLoader(*tiny_data(24, seed=1), 8, train=False)  # at the final size
    SEEN.clear()
    state, history = fit_progressive(
        state, loader, stages=STAGES, step_for_size=_step_for_size, eval_data=eval_data,
        eval_step=make_eval_step(), progress=False,
    )  # fmt: skip
    jax.effects_barrier()
    assert SEEN == [(6, 6)] * 4 + [(8, 8)] * 8
    assert int(state.step) == 12
    np.testing.assert_array_equal(history["step"], np.arange(12))
    np.testing.assert_array_equal(history["epoch"], [0, 1, 2])
    assert history["eval_accuracy"].shape == (3,)
    # One schedule over the whole run: the optimizer's step count never restarts.
    schedule = optax.cosine_decay_schedule(0.05, 40)
    np.testing.assert_allclose(history["lr"], [schedule(i) for i in range(12)], rtol=1e-6)


def test_each_size_can_train_on_its_own_loader_of_copies_stored_at_that_size():
    state, loader = _run()
    images, labels = tiny_data()
    small = ArrayLoader(images[:, 1:7, 1:7], labels, 16, seed=0)  # 6 px copies, same order
    SEEN.clear()
    state, history = fit_progressive(
        state, {6: small, 8: loader}, stages=STAGES,
        step_for_size=lambda size: make_train_step(), progress=False,  # no resizing
    )  # fmt: skip
    jax.effects_barrier()
    assert SEEN == [(6, 6)] * 4 + [(8, 8)] * 8  # each stage ran on its own loader's images
    assert int(state.step) == 12
    np.testing.assert_array_equal(history["epoch"], [0, 1, 2])


def test_a_callback_that_stops_at_a_stage_end_ends_the_run():
    state, loader = _run()
    stop = StopAtMetric("train_accuracy", 0.0)  # reached at the end of epoch 0: stage 1's end
    state, history = fit_progressive(state, loader, stages=STAGES, step_for_size=_step_for_size,
                                     callbacks=[stop], progress=False)  # fmt: skip
    assert stop.reached_epoch == 0 and int(state.step) == 4
    np.testing.assert_array_equal(history["epoch"], [0])


def test_one_step_per_size_compiled_once_for_every_seed_and_optimizer():
    state, loader = _run()
    fit_progressive(state, loader, stages=STAGES, step_for_size=_step_for_size, progress=False)
    state, loader = _run(seed=1)  # another key, data order and optimizer object
    with count_compilations() as compiled:
        state, _ = fit_progressive(
            state, loader, stages=[*STAGES, (6, 1)], step_for_size=_step_for_size, progress=False
        )
    assert int(state.step) == 16
    assert len(compiled) == 0
    assert _step_for_size(6) is _step_for_size(6) and _step_for_size(6) is not _step_for_size(8)


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, state, metrics, history):
        return step == self.step


@pytest.mark.parametrize("stop_at", [4, 10])  # stage 1's end (saved with its epoch); in 2
def test_resume_from_a_mid_run_checkpoint_is_bit_identical(tmp_path, stop_at):
    state, loader = _run()
    ckpt = Checkpointer(tmp_path)
    fit_progressive(state, loader, stages=STAGES, step_for_size=_step_for_size, progress=False,
                    callbacks=[Checkpoint(ckpt, every_steps=2), _StopAt(stop_at)])  # fmt: skip
    assert ckpt.latest_step() == stop_at
    restored = ckpt.restore(_run()[0])
    assert len(restored["history"]["epoch"]) == {4: 1, 10: 2}[stop_at]
    resumed = fit_progressive(
        restored["state"], loader, stages=STAGES, step_for_size=_step_for_size,
        history=restored["history"], callbacks=[Checkpoint(ckpt, every_steps=2)], progress=False,
    )  # fmt: skip
    ckpt.close()
    (straight_state, straight_history), (state, history) = _straight(), _host(*resumed)
    assert sorted(history) == sorted(straight_history)
    for key, value in straight_history.items():
        np.testing.assert_array_equal(history[key], value, err_msg=key)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(straight_state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": []}, "at least one"),
        ({"stages": [6, 8]}, r"\(size, epochs\) pairs"),
        ({"stages": [(6, 1), (0, 1)]}, "size must be an int >= 1"),
        ({"stages": [(6, 0)]}, "epochs must be an int >= 1"),
        ({"stages": [(6, 1.5)]}, "epochs must be an int >= 1"),
        ({"stages": [(6, 1), (9, 1)]}, r"size 9 exceeds the stored images \(8x8\)"),
        ({"epochs": 3}, r"the stages set \['epochs'\]"),
        ({"step_for_size": None}, "step_for_size must be callable"),
        ({"step_for_size": lambda size: "a step"}, r"step_for_size\(6\) must return"),
        ({"train_data": {8: "loader"}}, r"loaders for sizes \[8\], none for \[6\]"),
        (
            {"train_data": {6: ArrayLoader(*tiny_data(), 8), 8: ArrayLoader(*tiny_data(), 16)}},
            r"same steps per epoch, got \{6: 8, 8: 4\}",
        ),
        (
            {
                "train_data": {
                    6: ArrayLoader(tiny_data()[0][:, :4, :4], tiny_data()[1], 16),
                    8: ArrayLoader(*tiny_data(), 16),
                }
            },
            r"stage size 6 exceeds the stored images \(4x4\)",
        ),
    ],
)
def test_bad_stages_are_value_errors(kwargs, match):
    kwargs = {"train_data": ArrayLoader(*tiny_data(), 16), "stages": STAGES,
              "step_for_size": _step_for_size, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        fit_progressive(None, progress=False, **kwargs)
