"""fit(): the training loop, the one place with side effects.

It feeds batches to the pure train step, keeps the history, draws the progress
bar, evaluates each epoch and calls the callbacks. It never waits for the device
between steps: metrics are fetched in batches (`log_every`), and the step count
the callbacks see is the host's own. Callbacks are objects with optional hooks
(`on_train_begin`, `on_step_end`, `on_epoch_end`, `on_train_end`); a hook
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
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlearn.inference import check_fits
from jaxlearn.parallel import data_mesh, replicate
from jaxlearn.runs import json_config
from jaxlearn.state import TrainState, ema_variables
from jaxlearn.steps import TARGET_TOLERANCE

#: Per-step history keys (the step's index, then its metrics).
STEP_KEYS = ("step", "loss", "accuracy", "lr")
#: Smoothing of the loss in the progress bar: fast.ai's debiased EMA with beta 0.98.
SMOOTHING = 0.98


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


class Loader(Protocol):
    """What `fit` needs from training data (`ArrayLoader` is one)."""

    def __len__(self) -> int:
        """Steps (batches) per epoch."""
        ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterable[dict]:
        """The batches of `epoch` from its `start_step`-th on, the same for the same arguments.

        `fit` resumes a run mid-epoch by asking for the epoch again from the step it
        stopped at, so the order must be a function of `epoch` alone.
        """
        ...


class Callback:
    """Base class with no-op hooks; override the ones you need.

    Every hook gets `step`, the host's count of updates taken (`state.step`
    without asking the device, which would stall its queue of work), and the
    state after that step: do not keep references to its arrays, the next step
    donates them; copy with `jax.device_get`.
    """

    def on_train_begin(self, step: int, state: TrainState, history: dict) -> None:
        """Once, before the first step (`history`: the run's records so far)."""

    def needs_history(self, step: int) -> bool:
        """Whether `on_step_end` at `step` needs the per-step history complete up to it.

        `fit` fetches metrics from the device every `log_every` steps, not after
        each step (that would stall the device's queue); answering True makes it
        fetch before this step's `on_step_end` (e.g. to checkpoint the history).
        """
        return False

    def on_step_end(
        self, step: int, state: TrainState, metrics: dict, history: dict
    ) -> bool | None:
        """After each step. `metrics` are this step's device arrays: reading one
        waits for the step to finish, so read them only now and then. `history`
        holds the records fetched so far (all of them if `needs_history(step)`).
        Return True to stop."""

    def on_epoch_end(self, step: int, state: TrainState, history: dict) -> bool | None:
        """After each full epoch and its evaluation; `history` is up to date. True stops."""

    def on_train_end(self, step: int, state: TrainState, history: dict) -> None:
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

    def on_epoch_end(self, step, state, history):
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
    invalidate them. With `ema=True` the captures are the state's EMA of its
    weights (`jaxlearn.state.ema_variables`) instead.
    """

    def __init__(
        self, at_steps: Iterable[int], snapshots: list | None = None, *, ema: bool = False
    ):
        """Args: at_steps: step counts (`state.step` after the update) to capture at;
        snapshots: earlier captures to continue (e.g. restored from a checkpoint);
        ema: capture the EMA weights (the state must carry an EMA)."""
        self.at_steps = {int(s) for s in at_steps}
        if any(s <= 0 for s in self.at_steps):
            raise ValueError(f"at_steps must be positive step counts, got {sorted(self.at_steps)}")
        self.snapshots: list = list(snapshots or [])
        self.ema = ema

    def on_train_begin(self, step, state, history):
        if self.ema:
            ema_variables(state)  # a state without an EMA fails here, not steps later

    def on_step_end(self, step, state, metrics, history):
        if step in self.at_steps:
            live = {"params": state.params, "batch_stats": state.batch_stats}
            self.snapshots.append(jax.device_get(ema_variables(state) if self.ema else live))


class Checkpoint(Callback):
    """Save state, history, snapshots and config every N steps and/or epochs, and at the end.

    A state whose parameters are not all finite is never written, so the last
    checkpoint stays the last good one. Before the first step the directory is
    checked, so that two runs never mix in it: it must be empty, or hold this run
    (same model and optimizer state layout, same `config`) up to exactly the
    step the run starts from -- i.e. the run was restored from its newest
    checkpoint to resume. Anything else is refused with a ValueError.
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
        config: the run's configuration, to store alongside (and to recognise the run
          by when resuming), in JSON values (`runs.json_config`)."""
        for name, value in (("every_steps", every_steps), ("every_epochs", every_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.checkpointer, self.capture = checkpointer, capture
        self.config = json_config(config) if config is not None else None
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.last_saved: int | None = None
        # Set by `fit`: a step save that falls on an epoch's last step waits for that
        # epoch's record (`on_epoch_end`), so the checkpoint's history holds it.
        self.steps_per_epoch: int | None = None

    def on_train_begin(self, step, state, history):
        latest = self.checkpointer.latest_step()
        if latest is None or latest == self.last_saved:
            return  # an empty directory, or this object's own checkpoints (a later phase)
        where = f"{self.checkpointer.directory} holds checkpoints up to step {latest}"
        if step != latest:
            raise ValueError(
                f"{where}, and this run starts at step {step}: restore its newest checkpoint "
                "to resume that run, or give this run an empty directory"
            )
        self.checkpointer.check_matches(state, latest)
        saved = self.checkpointer.config(latest)
        if (self.config or {}) != saved:
            raise ValueError(f"{where} of a run with config {saved}, not {self.config}")
        self.last_saved = latest

    def save(self, step: int, state: TrainState, history: dict) -> None:
        """Write a checkpoint at `step` unless the parameters hold NaN or inf."""
        if not bool(_all_finite(state.params)):
            raise NonFiniteLossError(
                f"parameters are not finite at step {step}; not checkpointed "
                f"(last good checkpoint: step {self.last_saved})"
            )
        self.checkpointer.save(
            state,
            history=history_arrays(history),
            snapshots=self.capture.snapshots if self.capture else None,
            config=self.config,
        )
        self.last_saved = step

    def needs_history(self, step):
        return bool(self.every_steps) and step % self.every_steps == 0

    def on_step_end(self, step, state, metrics, history):
        at_epoch_end = self.steps_per_epoch and step % self.steps_per_epoch == 0
        if self.needs_history(step) and not at_epoch_end:
            self.save(step, state, history)

    def on_epoch_end(self, step, state, history):
        epochs_due = self.every_epochs and len(history["epoch"]) % self.every_epochs == 0
        if (epochs_due or self.needs_history(step)) and self.last_saved != step:
            self.save(step, state, history)

    def on_train_end(self, step, state, history):
        if self.last_saved != step:
            self.save(step, state, history)
        self.checkpointer.wait()


class _Watched(Callback):
    """A callback whose requests to stop are noted (`watch_stops`)."""

    def __init__(self, inner: Callback):
        self.inner, self.stopped = inner, False

    def _noted(self, stop: bool | None) -> bool | None:
        self.stopped = self.stopped or bool(stop)
        return stop

    def on_train_begin(self, step, state, history):
        self.inner.on_train_begin(step, state, history)

    def needs_history(self, step):
        return self.inner.needs_history(step)

    def on_step_end(self, step, state, metrics, history):
        return self._noted(self.inner.on_step_end(step, state, metrics, history))

    def on_epoch_end(self, step, state, history):
        return self._noted(self.inner.on_epoch_end(step, state, history))

    def on_train_end(self, step, state, history):
        self.inner.on_train_end(step, state, history)


def watch_stops(callbacks: Iterable[Callback]) -> list[Callback]:
    """The callbacks, each wrapped so that a request to stop is noted (`stop_requested`).

    For runs made of several `fit` calls (`fine_tune`'s phases, `fit_progressive`'s
    stages): `fit` stops when a hook returns True but does not say so, and a stop at a
    phase's last epoch (`StopAtMetric`) would look like the phase's normal end. The
    same wrapped list goes to every phase. `Checkpoint`s stay as they are (`fit` finds
    them by type to wait for their saves; they never ask to stop).
    """
    return [c if isinstance(c, Checkpoint) else _Watched(c) for c in callbacks]


def stop_requested(callbacks: Iterable[Callback]) -> bool:
    """Whether a callback of a `watch_stops` list has asked to stop."""
    return any(c.stopped for c in callbacks if isinstance(c, _Watched))


@jax.jit
def _stack(metrics: list[dict]) -> dict:
    """Many steps' metrics as one array per name, so a fetch is one transfer per name.

    Fetching 50 steps x 4 scalars one by one cost 1.4 ms on CPU (28 us a step, a
    fifth of a small MLP's step, benchmarks/bench_fit.py); on a GPU each is a copy.
    Compiled once per number of steps fetched (log_every, and epoch remainders).
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every float in `tree` is finite: one scalar back instead of the whole tree."""
    return jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def history_arrays(history: dict[str, list]) -> dict[str, np.ndarray]:
    """History lists -> NumPy arrays (float32, int64 for step and epoch counters)."""
    ints = ("step", "epoch", "epoch_step")
    return {k: np.asarray(v, np.int64 if k in ints else np.float32) for k, v in history.items()}


def evaluate(state: TrainState, data: Iterable[dict], eval_step: Callable) -> dict[str, float]:
    """Mean loss and accuracy of `state` over every unmasked example of `data`.

    Every batch is dispatched before any result is fetched (one transfer at the
    end, not one wait per batch).

    Args:
      state: the train state (not modified).
      data: iterable of batches (e.g. an evaluation `ArrayLoader`).
      eval_step: from `make_eval_step`.

    Returns:
      `{'loss': float, 'accuracy': float}`.

    Raises:
      ValueError: no examples, labels outside the model's classes, or a first
        batch that does not fit the model (the message names its shapes).
    """
    outputs = []
    for batch in data:
        if not outputs:
            check_batch(eval_step, state, batch, "evaluation")
        outputs.append(eval_step(state, batch))
    keys = ("loss_sum", "correct", "count", "bad_labels")
    totals = {k: sum(float(o[k]) for o in jax.device_get(outputs)) for k in keys}
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


def check_batch(step_fn: Callable, state: TrainState, batch: dict, what: str) -> None:
    """Check a batch's keys and label dtype, and trace `step_fn` on it (not running it).

    A batch that does not fit the model fails here with a ValueError naming its
    shapes, not deep inside Flax -- and before anything is donated.
    """
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}
    if "image" not in batch or "label" not in batch:
        raise ValueError(f"batches must be dicts with 'image' and 'label', got {shapes}")
    if not np.issubdtype(batch["label"].dtype, np.integer):
        raise ValueError(f"batch 'label' must be integer class indices, got {shapes['label']}")
    if "target" in batch:
        _check_targets(np.asarray(jax.device_get(batch["target"])), len(batch["label"]))
    check_fits(step_fn, state, batch, what=f"the first {what} batch {shapes}")


def _check_targets(target: np.ndarray, n: int) -> None:
    """ValueError unless `target` is (n, C) float probability rows (the steps' tolerance)."""
    if target.ndim != 2 or len(target) != n or not np.issubdtype(target.dtype, np.floating):
        raise ValueError(
            f"batch 'target' must be (N, C) float probability rows for N={n} labels, got "
            f"{target.shape} {target.dtype}"
        )
    sums = target.sum(-1, dtype=np.float64)
    bad = np.flatnonzero((np.abs(sums - 1.0) > TARGET_TOLERANCE) | (target < 0).any(-1))
    if bad.size:
        raise ValueError(
            f"batch 'target' rows must be distributions (>= 0, summing to 1); "
            f"rows {bad[:5].tolist()} sum to {sums[bad[:5]].tolist()}"
        )


class _Progress:
    """The progress bar: fast.ai's smoothed loss, the LR, images/s, from each fetch."""

    def __init__(self, total: float, initial: int, show: bool):
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=None if math.isinf(total) else total, initial=initial, unit="step"
            )
        self.smooth, self.count = 0.0, 0
        self.start, self.images = time.perf_counter(), 0

    def update(self, epoch: int, records: list[dict], images: int) -> None:
        if self.bar is None or not records:
            return
        for m in records:
            self.count += 1
            self.smooth = SMOOTHING * self.smooth + (1 - SMOOTHING) * m["loss"]
        self.images += images
        self.bar.update(len(records))
        lr = records[-1].get("lr", math.nan)  # NaN: an optimizer that does not report it
        self.bar.set_postfix(
            epoch=epoch,
            loss=f"{self.smooth / (1 - SMOOTHING**self.count):.4f}",
            **({"lr": f"{lr:.3g}"} if math.isfinite(lr) else {}),
            img_s=f"{self.images / (time.perf_counter() - self.start):.0f}",
            refresh=False,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    log_every: int = 50,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Train until `epochs` epochs or `steps` steps in total have been run.

    Both counts are totals since step 0, so passing a restored state and its
    history continues the same run. The state passed in is consumed (the
    train step donates its buffers); use the returned one.

    The loop never waits for the device between steps: each step's metrics stay
    on the device and are fetched together every `log_every` steps, at the end
    of each epoch and when a callback asks (`Callback.needs_history`). The
    progress bar and the history come from those fetches, and the history still
    holds every step. A NaN or inf loss, or a label outside the model's classes,
    is therefore reported up to `log_every` steps late, naming the step where it
    happened; checkpoints never hold non-finite parameters.

    Args:
      state: the train state (fresh, or restored from a checkpoint).
      train_data: a `Loader` (`len()` steps per epoch, `.epoch(e, start_step)`).
      train_step: from `make_train_step`.
      epochs: total number of epochs to reach.
      steps: total number of steps to reach (stops mid-epoch if needed).
      eval_data: batches evaluated at the end of each epoch (needs `eval_step`).
      eval_step: from `make_eval_step`.
      callbacks: `Callback`s, called in order, `Checkpoint`s after the others.
      history: the history of the run being resumed.
      mesh: mesh to replicate the state on (default: the loader's, else all devices).
      progress: show a tqdm progress bar.
      log_every: steps between fetches of the metrics (>= 1).

    Returns:
      `(state, history)`; history maps 'step', 'loss', 'accuracy', 'lr' to
      per-step arrays ('lr' is NaN where the optimizer does not report it) and
      'epoch', 'epoch_step', 'train_loss', 'train_accuracy', 'eval_loss',
      'eval_accuracy', 'time' (seconds since the run's start, summed over resumed
      sessions) to per-epoch arrays.

    Raises:
      ValueError: bad arguments, a first batch that does not fit the model, or
        labels outside the model's classes (soft targets that are not distributions).
      NonFiniteLossError: the loss became NaN or inf (checkpoints stop at the last good step).
    """
    if epochs is None and steps is None:
        raise ValueError("give epochs or steps (or both)")
    for name, value in (("epochs", epochs), ("steps", steps)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if (eval_data is None) != (eval_step is None):
        raise ValueError("eval_data and eval_step go together: give both or neither")
    if eval_data is not None and iter(eval_data) is eval_data:
        raise ValueError(
            "eval_data is read at every epoch's end: pass a loader or a list of batches, "
            "not an iterator or generator (it would be empty after the first epoch)"
        )
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
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
    # A Python float: a float32 offset (a returned history's) plus perf_counter()
    # (seconds since boot, ~1e5-1e6) rounds to float32's 8-60 ms there.
    time_offset = float(history["time"][-1]) if history["time"] else 0.0
    start = time.perf_counter()
    step = int(state.step)  # the host's count from here on: the device is never asked again
    bar = _Progress(total, step, progress)
    pending: list[tuple[int, dict, int]] = []  # (step index, device metrics, images)

    def fetch(epoch: int) -> None:
        """Bring the pending steps' metrics to the host, check them, record them."""
        if not pending:
            return
        stacked = jax.device_get(_stack([m for _, m, _ in pending]))
        records = [{k: v[j] for k, v in stacked.items()} for j in range(len(pending))]
        for (i, _, _), m in zip(pending, records, strict=True):
            if m.pop("bad_labels", 0):
                raise ValueError(
                    f"labels outside the model's classes (or soft targets that are not "
                    f"distributions) in the batch of step {i}"
                )
            if not math.isfinite(m["loss"]):
                saved = [c.last_saved for c in callbacks if isinstance(c, Checkpoint)]
                raise NonFiniteLossError(
                    f"loss is {m['loss']} at step {i} (epoch {i // steps_per_epoch}); "
                    f"last good checkpoint: step {saved[0] if saved else None}"
                )
            history["step"].append(i)
            for k in STEP_KEYS[1:]:
                history[k].append(float(m.get(k, math.nan)))
        bar.update(epoch, records, sum(n for _, _, n in pending))
        pending.clear()

    def end_epoch() -> bool:
        """The epoch's records (evaluation included) and the callbacks; True to stop."""
        _end_epoch(state, history, step, steps_per_epoch, eval_data, eval_step)
        history["time"].append(time_offset + (time.perf_counter() - start))
        return any([c.on_epoch_end(step, state, history) for c in callbacks])

    # Checkpoints last: a save at a step then holds what the others recorded at it
    # (a CaptureParams snapshot), whatever order they were given in.
    callbacks = sorted(callbacks, key=lambda c: isinstance(c, Checkpoint))
    for c in callbacks:
        if isinstance(c, Checkpoint):
            c.steps_per_epoch = steps_per_epoch
    try:
        for c in callbacks:
            c.on_train_begin(step, state, history)
        stop = step >= total
        done = step // steps_per_epoch
        recorded = history["epoch"][-1] if history["epoch"] else -1
        if step % steps_per_epoch == 0 and history["step"] and recorded < done - 1:
            # Resumed from a checkpoint written at the last step of an epoch, before its
            # record. (The history may start at a later epoch: a later phase's own.)
            stop = end_epoch() or stop
        checked = False
        while not stop:
            epoch, first = divmod(step, steps_per_epoch)
            epoch_first_step = step
            for batch in train_data.epoch(epoch, first):
                if not checked:
                    check_batch(train_step, state, batch, "training")
                    checked = True
                state, metrics = train_step(state, batch)
                pending.append((step, metrics, int(batch["label"].shape[0])))
                step += 1
                if len(pending) >= log_every or any(c.needs_history(step) for c in callbacks):
                    fetch(epoch)
                try:
                    stop = any([c.on_step_end(step, state, metrics, history) for c in callbacks])
                except NonFiniteLossError:
                    fetch(epoch)  # a NaN loss that came first is the error to report
                    raise
                if stop or step >= total:
                    break
            if step == epoch_first_step:
                raise ValueError(f"train_data yielded no batch for epoch {epoch} from step {first}")
            fetch(epoch)
            if step % steps_per_epoch == 0 and end_epoch():
                stop = True
            stop = stop or step >= total
        for c in callbacks:
            c.on_train_end(step, state, history)
    finally:
        bar.close()
        for c in callbacks:
            if isinstance(c, Checkpoint):
                c.checkpointer.wait()  # what was saved is on disk, even after an error
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
