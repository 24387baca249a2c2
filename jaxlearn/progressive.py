"""Progressive resizing: train on small images first, then on larger ones, in one run.

fast.ai's DAWNBench ImageNet runs (2018) trained the early epochs at 128 px, then
at 224 and 288: an epoch at half the side costs about a quarter of the compute,
and the network learns the coarse features there before the fine ones. Either the
images stay stored at the largest size (one `ArrayLoader`), and each stage's train
step resizes them on the device in its augmentation (`jaxlearn.data.augment.resize`,
or `random_resized_crop(size)`), or each size gets its own loader of copies stored
at that size (`{size: loader}`): a random resized crop's dense resampling costs in
proportion to the stored pixels (on a 2-core CPU, flip + crop + colour jitter of 32
images to 64 px: 7 ms from 64 px copies, 20 ms from 128 px images). A stage is one `fit` call up
to the run's cumulative epoch count, so the step count, the optimizer's state and its
schedule, the history and the callbacks run on through the stages as through one
`fit`, and a run restored from a checkpoint resumes inside the stage it was in.

Each size's train step is built once per run (`step_for_size(size)`) and compiled
once per program: `make_train_step` and the augmentation factories return the same
objects for the same settings (`jaxlearn.programs.by_arguments`), so another seed's
or optimizer object's run compiles nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxlearn.loop import Loader, fit, stop_requested, watch_stops
from jaxlearn.state import TrainState

__all__ = ["fit_progressive"]


def _check_stages(stages) -> tuple[tuple[int, int], ...]:
    """The stages as (size, epochs) int pairs; ValueError naming what is wrong."""
    try:
        checked = tuple((size, epochs) for size, epochs in stages)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"stages must be a sequence of (size, epochs) pairs, got {stages!r}"
        ) from e
    if not checked:
        raise ValueError("stages must hold at least one (size, epochs) pair, got none")
    for size, epochs in checked:
        for name, value in (("size", size), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"stage {(size, epochs)}: {name} must be an int >= 1")
    return tuple((int(size), int(epochs)) for size, epochs in checked)


def _loaders(train_data: Loader | Mapping[int, Loader], stages) -> dict[int, Loader]:
    """Each stage size's loader: the one loader, or the mapping's; ValueError for a mapping
    without a stage's size or whose loaders differ in steps per epoch (the stages count
    epochs in steps), and for stored images smaller than their stages' size."""
    sizes = sorted({size for size, _ in stages})
    if not isinstance(train_data, Mapping):
        loaders = dict.fromkeys(sizes, train_data)
    else:
        missing = [size for size in sizes if size not in train_data]
        if missing:
            raise ValueError(
                f"train_data has loaders for sizes {sorted(train_data)}, none for {missing}"
            )
        loaders = {size: train_data[size] for size in sizes}
        lengths = {size: len(loader) for size, loader in loaders.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"the loaders must take the same steps per epoch, got {lengths} (size: steps)"
            )
    for size, loader in loaders.items():
        images = getattr(loader, "images", None)
        stored = tuple(np.shape(images)[1:3]) if np.ndim(images) == 4 else None
        if stored is not None and size > min(stored):
            raise ValueError(
                f"stage size {size} exceeds the stored images ({stored[0]}x{stored[1]}); "
                "store them at least at that size"
            )
    return loaders


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
    train_data: Loader | Mapping[int, Loader],
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

    The train images stay at their stored size, one loader's (the largest) or each
    size's own (`{size: loader}`); `step_for_size(size)`
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
      train_data: the training `Loader`, or a mapping from every stage's size to
        its loader (copies of the same images stored at that size, the same seed and
        batch size, so the same order and steps per epoch: a resumed run then
        continues bit for bit); an `ArrayLoader`'s images must be at least as large
        as the size of the stages it feeds.
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
        the stored images, a mapping without a stage's size or with loaders of
        different lengths, an argument the stages set, or what `fit` refuses.
    """
    stages = _check_stages(stages)
    loaders = _loaders(train_data, stages)
    if not callable(step_for_size):
        raise ValueError(f"step_for_size must be callable, got {step_for_size!r}")
    clashing = sorted({"epochs", "steps", "train_step"} & set(fit_kwargs))
    if clashing:
        raise ValueError(f"fit_progressive: the stages set {clashing}; do not pass them")
    steps = _steps_for(step_for_size, [size for size, _ in stages])
    callbacks = watch_stops(fit_kwargs.pop("callbacks", None) or ())
    history = fit_kwargs.pop("history", None)
    ends = np.cumsum([epochs for _, epochs in stages])  # epochs done at each stage's end
    steps_per_epoch = len(loaders[stages[0][0]])
    step = int(state.step)
    # The stage the run is in: the first that ends after its step. A run that is done
    # (or restored at its last step) goes to the last stage's fit, which trains nothing
    # and adds the last epoch's record if the checkpoint was written before it.
    first = next((k for k, end in enumerate(ends) if end * steps_per_epoch > step), len(ends) - 1)
    for (size, _), end in zip(stages[first:], ends[first:], strict=True):
        state, history = fit(
            state,
            loaders[size],
            train_step=steps[size],
            epochs=int(end),
            history=history,
            callbacks=callbacks,
            **fit_kwargs,
        )
        if stop_requested(callbacks) or int(state.step) < end * steps_per_epoch:
            break
    return state, history
