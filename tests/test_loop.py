"""fit(): history, evaluation, stopping, capture, NaN guard, bad input, exact continuation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_worker import TinyNet, make_run, tiny_data
from PIL import Image

from jaxlearn import loop
from jaxlearn.checkpoint import Checkpointer
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import (
    Callback,
    CaptureParams,
    Checkpoint,
    NonFiniteLossError,
    StopAtMetric,
    evaluate,
    fit,
)
from jaxlearn.plots import plot_history
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step, make_train_step


def _params(state):
    return jax.tree.leaves(jax.device_get(state.params))


def test_fit_history_and_eval_on_held_out_data(tmp_path):
    state, loader, step = make_run()
    images, labels = tiny_data(40, seed=1)
    eval_data = ArrayLoader(images, labels, 16, train=False)
    eval_step = make_eval_step()
    before = evaluate(state, eval_data, eval_step)
    state, history = fit(
        state, loader, train_step=step, epochs=3, eval_data=eval_data, eval_step=eval_step,
        progress=True,
    )  # fmt: skip
    assert int(state.step) == 12
    np.testing.assert_array_equal(history["step"], np.arange(12))
    assert history["loss"].shape == history["lr"].shape == history["accuracy"].shape == (12,)
    np.testing.assert_allclose(
        history["lr"], [optax.cosine_decay_schedule(0.05, 40)(i) for i in range(12)]
    )
    np.testing.assert_array_equal(history["epoch"], [0, 1, 2])
    np.testing.assert_allclose(
        history["train_loss"], history["loss"].reshape(3, 4).mean(1), rtol=1e-6
    )
    assert history["eval_accuracy"].shape == (3,) and np.all(np.diff(history["time"]) > 0)
    after = evaluate(state, eval_data, eval_step)
    assert history["eval_accuracy"][-1] == pytest.approx(after["accuracy"])
    assert after["loss"] < before["loss"]
    fig = plot_history(history, tmp_path / "history.png")
    with Image.open(tmp_path / "history.png") as png:  # a palette PNG: small files
        assert png.format == "PNG" and png.mode == "P" and png.size == (1680, 480)
    np.testing.assert_array_equal(fig.axes[2].lines[0].get_ydata(), history["lr"])


def test_the_progress_bar_shows_the_lr_only_when_the_optimizer_reports_it():
    bar = loop._Progress(4, 0, True)
    bar.update(0, [{"loss": 1.0, "lr": 0.1}], 32)
    assert "lr=0.1" in bar.bar.postfix
    bar.update(0, [{"loss": 1.0}], 32)  # a plain optax.adam: no 'lr=nan'
    assert "lr" not in bar.bar.postfix and "loss" in bar.bar.postfix
    bar.close()


def test_plot_history_rejects_other_dicts():
    with pytest.raises(ValueError, match="history lacks"):
        plot_history({"loss": [1.0]})


def test_fit_continues_exactly_from_a_returned_state():
    state, loader, step = make_run()
    straight, h1 = fit(state, loader, train_step=step, steps=7, progress=False)
    state, loader, step = make_run()
    half, h = fit(state, loader, train_step=step, steps=3, progress=False)
    assert len(h["epoch"]) == 0  # stopped mid-epoch: no epoch record
    resumed, h2 = fit(half, loader, train_step=step, steps=7, history=h, progress=False)
    for a, b in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(h1["loss"], h2["loss"])
    np.testing.assert_array_equal(h1["train_loss"], h2["train_loss"])


def test_stop_at_metric_and_capture_params():
    state, loader, step = make_run()
    stop = StopAtMetric("train_accuracy", 0.0)
    capture = CaptureParams(at_steps=[2, 3])
    state, history = fit(
        state, loader, train_step=step, epochs=5, callbacks=[capture, stop], progress=False
    )
    assert stop.reached_epoch == 0 and len(history["epoch"]) == 1 and int(state.step) == 4
    assert len(capture.snapshots) == 2
    assert isinstance(capture.snapshots[0]["params"]["Dense_0"]["kernel"], np.ndarray)
    state, loader, step = make_run()
    at3, _ = fit(state, loader, train_step=step, steps=3, progress=False)
    for a, b in zip(_params(at3), jax.tree.leaves(capture.snapshots[1]["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="eval_accuracy"):
        state, loader, step = make_run()
        fit(state, loader, train_step=step, epochs=1, callbacks=[StopAtMetric("eval_accuracy", 1)],
            progress=False)  # fmt: skip


class _PoisonedLoader:
    """Four good batches per epoch, then images full of NaN from step `bad` on."""

    def __init__(self, bad):
        images, labels = tiny_data()
        self.inner, self.bad = ArrayLoader(images.astype(np.float32), labels, 16), bad
        self.mesh = self.inner.mesh

    def __len__(self):
        return len(self.inner)

    def epoch(self, epoch, start_step=0):
        for i, batch in enumerate(self.inner.epoch(epoch, start_step), start_step):
            if epoch * len(self) + i >= self.bad:
                batch = {**batch, "image": batch["image"] * np.nan}
            yield batch


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(tmp_path):
    images, _ = tiny_data()
    state = TrainState.create(TinyNet(), optax.sgd(0.01), jax.random.key(0), images[:1])
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    with pytest.raises(NonFiniteLossError, match=r"step 5.*last good checkpoint: step 5"):
        fit(state, _PoisonedLoader(bad=5), train_step=make_train_step(), epochs=3,
            callbacks=[Checkpoint(ckpt, every_steps=1)], progress=False)  # fmt: skip
    assert ckpt.all_steps() == [4, 5]
    restored = ckpt.restore(
        TrainState.create(TinyNet(), optax.sgd(0.01), jax.random.key(0), images[:1])
    )
    assert all(np.isfinite(x).all() for x in _params(restored["state"]))


def test_bad_batches_and_labels_fail_before_training():
    images, labels = tiny_data()
    state = TrainState.create(TinyNet(), optax.sgd(0.01), jax.random.key(0), images[:1])
    gray = ArrayLoader(images[..., :1], labels, 16)  # 1 channel into a 3-channel conv
    with pytest.raises(ValueError, match="does not fit the model"):
        fit(state, gray, train_step=make_train_step(), steps=2, progress=False)
    assert int(state.step) == 0  # failed before any step (nothing donated)
    # (N, 1) labels would broadcast into an (N, N) loss: refused wherever a batch enters.
    column = [{"image": images[:16], "label": labels[:16, None]}]
    with pytest.raises(ValueError, match=r"must have shape \(16,\)"):
        evaluate(state, column, make_eval_step())
    with pytest.raises(ValueError, match=r"must have shape \(16,\)"):
        make_train_step()(state, column[0])
    once = iter([{"image": images[:16], "label": labels[:16]}])
    with pytest.raises(ValueError, match="not an iterator"):
        fit(state, ArrayLoader(images, labels, 16), train_step=make_train_step(), epochs=2,
            eval_data=once, eval_step=make_eval_step(), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no EMA"):
        fit(state, ArrayLoader(images, labels, 16), train_step=make_train_step(), epochs=2,
            callbacks=[CaptureParams([1], ema=True)], progress=False)  # fmt: skip
    assert int(state.step) == 0 and not state.params["Dense_0"]["kernel"].is_deleted()
    out_of_range = ArrayLoader(images, labels + 1, 16)  # class 3 of a 3-class model
    with pytest.raises(ValueError, match="labels outside"):
        fit(state, out_of_range, train_step=make_train_step(), steps=2, progress=False)
    state, loader, step = make_run()
    with pytest.raises(ValueError, match="eval_step"):
        fit(state, loader, train_step=step, epochs=1, eval_data=loader)
    with pytest.raises(ValueError, match="epochs or steps"):
        fit(state, loader, train_step=step)


def test_metrics_are_fetched_every_log_every_steps_not_every_step(monkeypatch):
    import jaxlearn.loop as loop

    fetched_at, seen_steps = [], []
    real_get = jax.device_get

    def counting_get(tree):
        fetched_at.append(len(seen_steps))
        return real_get(tree)

    class Record(loop.Callback):
        def on_step_end(self, step, state, metrics, history):
            seen_steps.append(step)

    monkeypatch.setattr(loop.jax, "device_get", counting_get)
    state, loader, step = make_run()  # 4 steps per epoch
    state, history = fit(
        state, loader, train_step=step, epochs=3, callbacks=[Record()], progress=False,
        log_every=3,
    )  # fmt: skip
    # Fetches (counted in callbacks seen so far): 3 pending steps (before the 3rd's callback),
    # then the epoch's end after step 4's callback, and so on; never step by step.
    assert fetched_at == [2, 4, 6, 8, 10, 12]
    assert seen_steps == list(range(1, 13))  # the host's count, not the device's
    np.testing.assert_array_equal(history["step"], np.arange(12))  # still every step
    with pytest.raises(ValueError, match="log_every"):
        fit(state, loader, train_step=step, epochs=4, log_every=0, progress=False)


class _Epochs(Callback):
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, step, state, history):
        self.epochs.append((step, history["epoch"][-1]))


def test_resume_at_an_epoch_boundary_runs_the_epoch_callbacks(tmp_path):
    state, loader, step = make_run()
    ckpt = Checkpointer(tmp_path / "run")
    # A checkpoint at the epoch's last step written before the epoch's record existed
    # (by hand, or by a Checkpoint used outside `fit`).
    state, history = fit(state, loader, train_step=step, steps=4, progress=False)
    per_step = ("step", "loss", "accuracy", "lr")
    ckpt.save(state, history={k: v if k in per_step else v[:0] for k, v in history.items()})
    ckpt.wait()
    restored = ckpt.restore(make_run()[0])
    assert len(restored["history"]["epoch"]) == 0 and int(restored["state"].step) == 4
    epochs = _Epochs()
    _, history = fit(restored["state"], loader, train_step=step, epochs=2,
                     history=restored["history"], callbacks=[epochs], progress=False)  # fmt: skip
    assert epochs.epochs == [(4, 0), (8, 1)]  # epoch 0's record, then epoch 1's
    np.testing.assert_array_equal(history["epoch"], [0, 1])


def test_a_step_save_at_an_epoch_end_holds_the_epoch_and_the_snapshot_in_any_order(tmp_path):
    for i, first in enumerate(("checkpoint", "capture")):
        state, loader, step = make_run()  # 4 steps an epoch
        ckpt = Checkpointer(tmp_path / str(i))
        capture = CaptureParams([4, 8])
        saver = Checkpoint(ckpt, every_steps=4, capture=capture)
        order = [saver, capture] if first == "checkpoint" else [capture, saver]
        _, history = fit(state, loader, train_step=step, epochs=2, callbacks=order,
                         progress=False)  # fmt: skip
        restored = ckpt.restore(make_run()[0])
        assert ckpt.all_steps() == [4, 8] and len(restored["snapshots"]) == 2
        np.testing.assert_array_equal(restored["history"]["epoch"], [0, 1])
        np.testing.assert_array_equal(restored["history"]["train_loss"], history["train_loss"])
        assert len(capture.snapshots) == 2  # captured once a step, not twice


def test_a_continued_history_keeps_the_clock_precise_on_a_long_running_machine(monkeypatch):
    # perf_counter() counts from boot: 1e6 s is 11.6 days up. A float32 time offset (a
    # returned history's) added to it first rounds to float32's 62.5 ms there.
    ticks = iter(1e6 + 1e-3 * np.arange(1000))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(ticks)))
    state, loader, step = make_run()
    state, history = fit(state, loader, train_step=step, epochs=1, progress=False)
    assert history["time"].dtype == np.float32
    _, history = fit(state, loader, train_step=step, epochs=3, history=history, progress=False)
    assert np.all(np.diff(history["time"]) > 0)


def test_a_history_that_starts_later_gets_its_last_epoch_once():
    # A later phase's own history (fine_tune's unfrozen phase, a Learner's fit), continued
    # at the epoch boundary where it ended: nothing to train, nothing to record again.
    state, loader, step = make_run()
    state, _ = fit(state, loader, train_step=step, epochs=1, progress=False)
    state, history = fit(state, loader, train_step=step, epochs=2, progress=False)
    np.testing.assert_array_equal(history["epoch"], [1])
    _, history = fit(state, loader, train_step=step, epochs=2, history=history, progress=False)
    np.testing.assert_array_equal(history["epoch"], [1])


def test_a_checkpoint_directory_never_mixes_two_runs(tmp_path):
    state, loader, step = make_run()
    ckpt = Checkpointer(tmp_path)
    config = {"lr": 0.05}
    fit(state, loader, train_step=step, steps=4, progress=False,
        callbacks=[Checkpoint(ckpt, every_steps=2, config=config)])  # fmt: skip
    assert ckpt.all_steps() == [2, 4]
    fresh, _, _ = make_run(seed=1)  # another run, from step 0, into the same directory
    with pytest.raises(ValueError, match="up to step 4, and this run starts at step 0"):
        fit(fresh, loader, train_step=step, steps=4, progress=False,
            callbacks=[Checkpoint(ckpt, every_steps=2, config=config)])  # fmt: skip
    restored = ckpt.restore(make_run()[0])
    with pytest.raises(ValueError, match="config"):
        fit(restored["state"], loader, train_step=step, steps=6, progress=False,
            callbacks=[Checkpoint(ckpt, every_steps=2, config={"lr": 0.1})])  # fmt: skip
    restored = ckpt.restore(make_run()[0])  # the same run resumes
    fit(restored["state"], loader, train_step=step, steps=6, history=restored["history"],
        callbacks=[Checkpoint(ckpt, every_steps=2, config=config)], progress=False)  # fmt: skip
    assert ckpt.all_steps() == [2, 4, 6]
    with pytest.raises(ValueError, match="step 6 exists"):  # never deleted to be rewritten
        ckpt.save(restored["state"].replace(step=jnp.asarray(6)))
