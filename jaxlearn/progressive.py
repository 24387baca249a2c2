"""Progressive resizing: train on small images first, then on larger ones, in one run.

fast.ai's DAWNBench ImageNet runs (2018) trained the early epochs at 128 px, then
at 224 and 288: an epoch at half the side costs about a quarter of the compute,
and the network learns the coarse features there before the fine ones. Here the
images stay stored at the largest size (`ArrayLoader`), and each stage's train
step resizes them on the device in its augmentation (`jaxlearn.data.augment.resize`,
or `random_resized_crop(size)`). A stage is one `fit` call up to the run's
cumulative epoch count, so the step count, the optimizer's state and its schedule,
the history and the callbacks run on through the stages as through one `fit`, and
a run restored from a checkpoint resumes inside the stage it was in.

Each size's train step is built once per run (`step_for_size(size)`) and compiled
once per program: `make_train_step` and the augmentation factories return the same
objects for the same settings (`jaxlearn.programs.by_arguments`), so another seed's
or optimizer object's run compiles nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxlearn.loop import Loader, fit, stop_requested, watch_stops
from jaxlearn.state import TrainState

__all__ = ["fit_progressive"]


def _check_stages(stages, train_data: Loader) -> tuple[tuple[int, int], ...]:
    """The stages as (size, epochs) int pairs; ValueError naming what is wrong."""
    try:
        checked = tuple((size, epochs) for size, epochs in stages)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"stages must be a sequence of (size, epochs) pairs, got {stages!r}"
        ) from e
    if not checked:
        raise ValueError("stages must hold at least one (size, epochs) pair, got none")
    images = getattr(train_data, "images", None)
    stored = tuple(np.shape(images)[1:3]) if np.ndim(images) == 4 else None
    for size, epochs in checked:
        for name, value in (("size", size), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"stage {(size, epochs)}: {name} must be an int >= 1")
        if stored is not None and size > min(stored):
            raise ValueError(
                f"stage {(size, epochs)}: size {size} exceeds the stored images "
                f"({stored[0]}x{stored[1]}); store them at the largest size"
            )
    return tuple((int(size), int(epochs)) for size, epochs in checked)


def _steps_for(step_for_size: Callable, sizes: Sequence[int]) -> dict[int, Callable]:
    """Each size's train step, built once per call (`make_train_step` and the augmentation
    factories return the same objects for the same settings, so another run with the same
    settings gets the compiled steps back)."""
    steps: dict[int, Callable] = {}
    for size in dict.fromkeys(sizes):
        steps[size] = step_for_size(size)
        if not callable(steps[size]):
            raise ValueError(f"step_for_size({size}) must return a train step, got {steps[size]!r}")
    return steps


def fit_progressive(
    state: TrainState,
    train_data: Loader,
    *,
    stages: Sequence[tuple[int, int]],
    step_for_size: Callable[[int], Callable],
    **fit_kwargs,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Train through `stages` of (image size, epochs), each with its size's train step.

    Progressive resizing (fast.ai, DAWNBench 2018): the first epochs at small
    images are cheap, the last at full size finish the job. Stage k is
    `fit(state, train_data, train_step=step_for_size(size_k), epochs=E_k, ...)`
    with `E_k` the epochs of stages 1..k together, and the history of the stages
    before: one run, whose step count, optimizer state and LR schedule continue
    across stages (build the schedule over all the stages' steps). A state and
    history restored from a `Checkpoint` resume in the stage their step falls in,
    bit for bit as the run without the interruption. A callback that stops
    training (`StopAtMetric`) ends the whole run.

    The train images stay at their stored (largest) size; `step_for_size(size)`
    must return a train step whose augmentation makes `size` x `size` images, e.g.
    `lambda s: make_train_step(augment=compose(random_flip(), random_resized_crop(s)))`
    or `augment=resize(s)` (`jaxlearn.data.augment`). It is called once per size
    and run; built from `make_train_step` and the library's augmentations, the
    same settings give the same step objects, so a later run (another seed, a new
    optimizer object) reuses the compiled steps. Evaluation
    (`eval_data`, `eval_step`) runs on the eval data as they are, at the same size
    in every stage: store them at the final stage's size, the size the model is
    used at.

    Args:
      state: the train state (fresh, or restored from a checkpoint).
      train_data: the training `Loader`; an `ArrayLoader`'s images must be at least
        as large as every stage's size.
      stages: (size, epochs) pairs in training order, each int >= 1; e.g.
        `[(128, 6), (224, 3)]`.
      step_for_size: `size -> train step` (see above).
      **fit_kwargs: `fit`'s other arguments (`eval_data`, `eval_step`,
        `callbacks`, `history`, `mesh`, `progress`, `log_every`), the same for
        every stage; not `epochs`, `steps` or `train_step`, which the stages set.

    Returns:
      `(state, history)` as `fit` returns them, the stages' records together.

    Raises:
      ValueError: empty stages, a size or epoch count below 1, a size larger than
        the stored images, an argument the stages set, or what `fit` refuses.
    """
    stages = _check_stages(stages, train_data)
    if not callable(step_for_size):
        raise ValueError(f"step_for_size must be callable, got {step_for_size!r}")
    clashing = sorted({"epochs", "steps", "train_step"} & set(fit_kwargs))
    if clashing:
        raise ValueError(f"fit_progressive: the stages set {clashing}; do not pass them")
    steps = _steps_for(step_for_size, [size for size, _ in stages])
    callbacks = watch_stops(fit_kwargs.pop("callbacks", None) or ())
    history = fit_kwargs.pop("history", None)
    ends = np.cumsum([epochs for _, epochs in stages])  # epochs done at each stage's end
    steps_per_epoch = len(train_data)
    step = int(state.step)
    # The stage the run is in: the first that ends after its step. A run that is done
    # (or restored at its last step) goes to the last stage's fit, which trains nothing
    # and adds the last epoch's record if the checkpoint was written before it.
    first = next((k for k, end in enumerate(ends) if end * steps_per_epoch > step), len(ends) - 1)
    for (size, _), end in zip(stages[first:], ends[first:], strict=True):
        state, history = fit(
            state,
            train_data,
            train_step=steps[size],
            epochs=int(end),
            history=history,
            callbacks=callbacks,
            **fit_kwargs,
        )
        if stop_requested(callbacks) or int(state.step) < end * steps_per_epoch:
            break
    return state, history
