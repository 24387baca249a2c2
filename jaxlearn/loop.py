"""fit(): the training loop, the one place with side effects.

It feeds batches to the pure train step, keeps the history, draws the progress
bar, evaluates each epoch and calls the callbacks. Callbacks are objects with
three optional hooks (`on_step_end`, `on_epoch_end`, `on_train_end`); a hook
returning True stops training after the current step or epoch.

Resuming is exact: `fit` starts at `state.step`, i.e. epoch
`step // steps_per_epoch` and step `step % steps_per_epoch` within it, and the
loader's data order and the step's random keys depend only on (seed, epoch,
step), so a run restored from a checkpoint replays the same stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlearn.parallel import data_mesh, replicate
from jaxlearn.state import TrainState

#: Per-step history keys (the step's index, then its metrics).
STEP_KEYS = ("step", "loss", "accuracy", "lr")
#: Smoothing of the loss in the progress bar: fast.ai's debiased EMA with beta 0.98.
SMOOTHING = 0.98


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


class Loader(Protocol):
    """What `fit` needs from training data (`ArrayLoader` is one)."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterable[dict]: ...


class Callback:
    """Base class with no-op hooks; override the ones you need.

    Hooks see the state after the step (do not keep references to its arrays:
    the next step donates them; copy with `jax.device_get`) and the history as
    a dict of lists being filled.
    """

    def on_step_end(self, state: TrainState, metrics: dict, history: dict) -> bool | None:
        """After each step; `metrics` are host floats. Return True to stop."""

    def on_epoch_end(self, state: TrainState, history: dict) -> bool | None:
        """After each full epoch and its evaluation. Return True to stop."""

    def on_train_end(self, state: TrainState, history: dict) -> None:
        """Once, when training ends normally (not after an error)."""


class StopAtMetric(Callback):
    """Stop at the end of the first epoch where a metric reaches a threshold.

    Radek's "race to 85% validation accuracy": `StopAtMetric('eval_accuracy', 0.85)`;
    the number of epochs run is then `len(history['epoch'])`.
    """

    def __init__(self, name: str, threshold: float, mode: str = "max"):
        """Args: name: a per-epoch history key ('eval_accuracy', 'train_loss', ...);
        threshold: the value to reach; mode: 'max' (stop when >=) or 'min' (when <=)."""
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.name, self.threshold, self.mode = name, float(threshold), mode
        self.reached_epoch: int | None = None

    def on_epoch_end(self, state, history):
        if not history.get(self.name):
            raise ValueError(
                f"StopAtMetric: no per-epoch metric {self.name!r}; have "
                f"{sorted(k for k, v in history.items() if v and k not in STEP_KEYS)}"
            )
        value = history[self.name][-1]
        if value >= self.threshold if self.mode == "max" else value <= self.threshold:
            self.reached_epoch = history["epoch"][-1]
            return True
        return None


class CaptureParams(Callback):
    """Copy `{'params', 'batch_stats'}` to host memory after the given steps.

    Snapshot ensembles (Huang et al. 2017) capture the weights at the end of
    each cosine cycle; the copies are NumPy, so the donating train step cannot
    invalidate them.
    """

    def __init__(self, at_steps: Iterable[int], snapshots: list | None = None):
        """Args: at_steps: step counts (`state.step` after the update) to capture at;
        snapshots: earlier captures to continue (e.g. restored from a checkpoint)."""
        self.at_steps = {int(s) for s in at_steps}
        if any(s <= 0 for s in self.at_steps):
            raise ValueError(f"at_steps must be positive step counts, got {sorted(self.at_steps)}")
        self.snapshots: list = list(snapshots or [])

    def on_step_end(self, state, metrics, history):
        if int(state.step) in self.at_steps:
            self.snapshots.append(
                jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
            )


class Checkpoint(Callback):
    """Save state, history, snapshots and config every N steps and/or epochs, and at the end.

    A state whose parameters are not all finite is never written, so the last
    checkpoint stays the last good one.
    """

    def __init__(
        self,
        checkpointer,
        *,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        capture: CaptureParams | None = None,
        config: dict | None = None,
    ):
        """Args:
        checkpointer: a `jaxlearn.checkpoint.Checkpointer`.
        every_steps / every_epochs: save period (positive), either or both.
        capture: a CaptureParams whose snapshots go into each checkpoint.
        config: JSON-serializable run configuration to store alongside."""
        for name, value in (("every_steps", every_steps), ("every_epochs", every_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.checkpointer, self.capture, self.config = checkpointer, capture, config
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.last_saved: int | None = None

    def save(self, state: TrainState, history: dict) -> None:
        """Write a checkpoint at `state.step` unless the parameters hold NaN or inf."""
        finite = jax.tree.reduce(
            lambda ok, x: ok & bool(np.isfinite(jax.device_get(x)).all()), state.params, True
        )
        if not finite:
            raise NonFiniteLossError(
                f"parameters are not finite at step {int(state.step)}; not checkpointed "
                f"(last good checkpoint: step {self.last_saved})"
            )
        self.checkpointer.save(
            state,
            history=history_arrays(history),
            snapshots=self.capture.snapshots if self.capture else None,
            config=self.config,
        )
        self.last_saved = int(state.step)

    def on_step_end(self, state, metrics, history):
        if self.every_steps and int(state.step) % self.every_steps == 0:
            self.save(state, history)

    def on_epoch_end(self, state, history):
        if self.every_epochs and len(history["epoch"]) % self.every_epochs == 0:
            if self.last_saved != int(state.step):
                self.save(state, history)

    def on_train_end(self, state, history):
        if self.last_saved != int(state.step):
            self.save(state, history)


def history_arrays(history: dict[str, list]) -> dict[str, np.ndarray]:
    """History lists -> NumPy arrays (float32, int64 for step and epoch counters)."""
    ints = ("step", "epoch", "epoch_step")
    return {k: np.asarray(v, np.int64 if k in ints else np.float32) for k, v in history.items()}


def evaluate(state: TrainState, data: Iterable[dict], eval_step: Callable) -> dict[str, float]:
    """Mean loss and accuracy of `state` over every unmasked example of `data`.

    Args:
      state: the train state (not modified).
      data: iterable of batches (e.g. an evaluation `ArrayLoader`).
      eval_step: from `make_eval_step`.

    Returns:
      `{'loss': float, 'accuracy': float}`.
    """
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "bad_labels": 0}
    for batch in data:
        out = jax.device_get(eval_step(state, batch))
        for k in totals:
            totals[k] += out[k]
    if totals["bad_labels"]:
        raise ValueError(
            f"{int(totals['bad_labels'])} evaluation labels are outside the model's classes"
        )
    if not totals["count"]:
        raise ValueError("evaluation data yielded no examples")
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def _check_first_batch(train_step: Callable, state: TrainState, batch: dict) -> None:
    """Trace the train step on the first batch; re-raise a failure as a readable ValueError."""
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}
    if "image" not in batch or "label" not in batch:
        raise ValueError(f"batches must be dicts with 'image' and 'label', got {shapes}")
    if not np.issubdtype(batch["label"].dtype, np.integer):
        raise ValueError(f"batch 'label' must be integer class indices, got {shapes['label']}")
    try:
        jax.eval_shape(train_step, state, batch)
    except Exception as e:  # any trace error means the batch does not fit the model
        raise ValueError(
            f"the first training batch {shapes} does not fit the model or train step: "
            f"{type(e).__name__}: {e}"
        ) from e


def fit(
    state: TrainState,
    train_data: Loader,
    *,
    train_step: Callable,
    epochs: int | None = None,
    steps: int | None = None,
    eval_data: Iterable[dict] | None = None,
    eval_step: Callable | None = None,
    callbacks: Sequence[Callback] = (),
    history: dict | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Train until `epochs` epochs or `steps` steps in total have been run.

    Both counts are totals since step 0, so passing a restored state and its
    history continues the same run. The state passed in is consumed (the
    train step donates its buffers); use the returned one.

    Args:
      state: the train state (fresh, or restored from a checkpoint).
      train_data: a `Loader` (`len()` steps per epoch, `.epoch(e, start_step)`).
      train_step: from `make_train_step`.
      epochs: total number of epochs to reach.
      steps: total number of steps to reach (stops mid-epoch if needed).
      eval_data: batches evaluated at the end of each epoch (needs `eval_step`).
      eval_step: from `make_eval_step`.
      callbacks: `Callback`s, called in order.
      history: the history of the run being resumed.
      mesh: mesh to replicate the state on (default: the loader's, else all devices).
      progress: show a tqdm progress bar.

    Returns:
      `(state, history)`; history maps 'step', 'loss', 'accuracy', 'lr' to
      per-step arrays and 'epoch', 'epoch_step', 'train_loss', 'train_accuracy',
      'eval_loss', 'eval_accuracy', 'time' (seconds since the run's start,
      summed over resumed sessions) to per-epoch arrays.

    Raises:
      ValueError: bad arguments, a first batch that does not fit the model, or
        labels outside the model's classes.
      NonFiniteLossError: the loss became NaN or inf (checkpoints stop at the last good step).
    """
    if epochs is None and steps is None:
        raise ValueError("give epochs or steps (or both)")
    for name, value in (("epochs", epochs), ("steps", steps)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if (eval_data is None) != (eval_step is None):
        raise ValueError("eval_data and eval_step go together: give both or neither")
    steps_per_epoch = len(train_data)
    if steps_per_epoch < 1:
        raise ValueError("train_data has no full batch in an epoch")
    total = math.inf if steps is None else steps
    if epochs is not None:
        total = min(total, epochs * steps_per_epoch)

    mesh = mesh or getattr(train_data, "mesh", None) or data_mesh()
    state = replicate(state, mesh)
    history = {k: list(v) for k, v in (history or {}).items()}
    for key in (*STEP_KEYS, "epoch", "epoch_step", "train_loss", "train_accuracy", "time"):
        history.setdefault(key, [])
    time_offset = history["time"][-1] if history["time"] else 0.0
    start = time.perf_counter()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if math.isinf(total) else total, initial=int(state.step), unit="step")
    smooth, n_smooth = 0.0, 0
    step = int(state.step)
    if step and step % steps_per_epoch == 0 and len(history["epoch"]) < step // steps_per_epoch:
        # Resumed from a checkpoint written at the last step of an epoch, before its record.
        _end_epoch(state, history, step, steps_per_epoch, eval_data, eval_step)
        history["time"].append(time_offset)
    stop = step >= total
    checked = False
    while not stop:
        epoch, first = divmod(step, steps_per_epoch)
        epoch_start, images, epoch_first_step = time.perf_counter(), 0, step
        for batch in train_data.epoch(epoch, first):
            if not checked:
                _check_first_batch(train_step, state, batch)
                checked = True
            state, metrics = train_step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if metrics.pop("bad_labels", 0):
                raise ValueError(f"labels outside the model's classes in the batch of step {step}")
            if not math.isfinite(metrics["loss"]):
                saved = [c.last_saved for c in callbacks if isinstance(c, Checkpoint)]
                raise NonFiniteLossError(
                    f"loss is {metrics['loss']} at step {step} (epoch {epoch}); "
                    f"last good checkpoint: step {saved[0] if saved else None}"
                )
            history["step"].append(step)
            for k in STEP_KEYS[1:]:
                history[k].append(metrics.get(k, math.nan))
            step += 1
            images += int(batch["label"].shape[0])
            if bar is not None:
                n_smooth += 1
                smooth = SMOOTHING * smooth + (1 - SMOOTHING) * metrics["loss"]
                bar.update(1)
                bar.set_postfix(
                    epoch=epoch,
                    loss=f"{smooth / (1 - SMOOTHING**n_smooth):.4f}",
                    lr=f"{metrics.get('lr', math.nan):.3g}",
                    img_s=f"{images / (time.perf_counter() - epoch_start):.0f}",
                    refresh=False,
                )
            stop = any([c.on_step_end(state, metrics, history) for c in callbacks])
            if stop or step >= total:
                break
        if step == epoch_first_step:
            raise ValueError(f"train_data yielded no batch for epoch {epoch} from step {first}")
        if step % steps_per_epoch == 0:
            _end_epoch(state, history, step, steps_per_epoch, eval_data, eval_step)
            history["time"].append(time_offset + time.perf_counter() - start)
            if any([c.on_epoch_end(state, history) for c in callbacks]):
                stop = True
        stop = stop or step >= total
    if bar is not None:
        bar.close()
    for c in callbacks:
        c.on_train_end(state, history)
    return state, history_arrays(history)


def _end_epoch(state, history, step, steps_per_epoch, eval_data, eval_step) -> None:
    """Append the epoch's records: train means over its steps, evaluation if given."""
    epoch = step // steps_per_epoch - 1
    in_epoch = np.asarray(history["step"]) // steps_per_epoch == epoch
    history["epoch"].append(epoch)
    history["epoch_step"].append(step)
    for key in ("loss", "accuracy"):
        history[f"train_{key}"].append(float(np.mean(np.asarray(history[key])[in_epoch])))
    if eval_data is not None:
        result = evaluate(state, eval_data, eval_step)
        history.setdefault("eval_loss", []).append(result["loss"])
        history.setdefault("eval_accuracy", []).append(result["accuracy"])
