"""fit() against a bare loop over the same jitted step and batches: what the loop costs.

`jaxlearn.loop.fit` adds the history, the progress bar, evaluation hooks, callbacks
and NaN / label checks around the train step. It must not add waiting: the device
(here the CPU's XLA runtime) runs the steps asynchronously, and a loop that fetches
every step's metrics to the host stalls that queue. Side by side in one process,
alternating run by run so both see the same load:
  - bare: `for batch in loader.epoch(e): state, metrics = step(state, batch)`, blocking
    once at the end;
  - fit: `fit(..., progress=False)` over the same epochs;
  - fit_bar: the same with the tqdm progress bar.
Two models: an MLP (784-64-10) at batch 32, where a step takes ~0.1 ms and dispatch is
the whole cost (the case where a per-step host sync shows most), and `cnn_small` (the
dogs-vs-cats network) at 64 px, batch 32. Compilation is excluded (a warm-up run of
each); `--repeats` runs of each, medians reported, and `ratio` = bare time / fit time
(1.0: fit costs nothing). Writes benchmarks/results/fit.json. `compare` is the same
measurement for any model, batch and dtype, with the step's FLOPs (gpu_check.py uses it).

    python benchmarks/bench_fit.py            # 5 repeats
    python benchmarks/bench_fit.py --quick    # smoke run, 2 repeats of a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import fit
from jaxlearn.models import get_model
from jaxlearn.runs import environment
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step

REPO = Path(__file__).resolve().parents[1]
# name -> (model, image shape, steps per epoch, epochs per timed run)
CASES = {
    "mlp_b32": (lambda: get_model("mlp", 10, features=(64,)), (28, 28, 1), 400, 2),
    "cnn_small_64px_b32": (lambda: get_model("cnn_small", 2), (64, 64, 3), 20, 1),
}
BATCH = 32


def compare(
    make_model,
    shape: tuple[int, ...],
    *,
    batch_size: int,
    steps: int,
    epochs: int,
    repeats: int,
    num_classes: int = 2,
    compute_dtype=None,
) -> dict:
    """Median seconds of bare / fit / fit_bar over the same epochs, alternating.

    Args:
      make_model: () -> a fresh Flax model.
      shape: one image's shape (H, W, C); images are random uint8.
      batch_size, steps, epochs: images per step, steps per epoch, epochs per timed run.
      repeats: timed runs of each arm, after one warm-up run of each.
      num_classes: labels are drawn from [0, num_classes).
      compute_dtype: the train step's `compute_dtype` (None: float32).

    Returns:
      Medians and every time, ms per step and images/s of each arm, the ratios, and the
      train step's FLOPs by XLA's cost analysis of the compiled program and of the
      program before optimisation (`flops_per_step`, `flops_per_step_hlo`; None where
      the backend gives none).
    """
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps * batch_size, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, steps * batch_size).astype(np.int32)
    loader = ArrayLoader(images, labels, batch_size, seed=0)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01, momentum=0.9)
    step = make_train_step(compute_dtype=compute_dtype)

    def fresh():
        return TrainState.create(make_model(), tx, jax.random.key(0), images[:1])

    # Compiled ahead of time to read its cost analysis; the runs below reuse this program.
    lowered = step.lower(fresh(), next(iter(loader.epoch(0))))
    flops = {"flops_per_step": _flops(lowered.compile()), "flops_per_step_hlo": _flops(lowered)}

    def bare():
        state = fresh()
        for epoch in range(epochs):
            for batch in loader.epoch(epoch):
                state, metrics = step(state, batch)
        return jax.block_until_ready((state, metrics))

    def with_fit(progress):
        def run():
            state, history = fit(fresh(), loader, train_step=step, epochs=epochs, progress=progress)
            return jax.block_until_ready(state), history

        return run

    runners = {"bare": bare, "fit": with_fit(False), "fit_bar": with_fit(True)}
    for run in runners.values():  # warm-up: compile everything once
        run()
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    n = steps * epochs
    return {
        "steps": n,
        "batch": batch_size,
        "median_s": medians,
        "step_ms": {k: 1000 * v / n for k, v in medians.items()},
        "images_per_s": {k: n * batch_size / v for k, v in medians.items()},
        "ratio_fit": medians["bare"] / medians["fit"],
        "ratio_fit_bar": medians["bare"] / medians["fit_bar"],
        **flops,
        "times_s": times,
    }


def _flops(program) -> float | None:
    """FLOPs of a lowered or compiled jax program by XLA's cost analysis (None if it has none)."""
    analysis = program.cost_analysis()
    if isinstance(analysis, list):  # one entry per device in older jax
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def run_case(name: str, repeats: int, quick: bool) -> dict:
    """`compare` on one of `CASES`, at batch 32 (8 steps an epoch with `quick`)."""
    make_model, shape, steps, epochs = CASES[name]
    steps = min(steps, 8) if quick else steps
    return compare(make_model, shape, batch_size=BATCH, steps=steps, epochs=epochs, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {sorted(CASES)}")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fit.json")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    load_before = os.getloadavg()
    results = {name: run_case(name, repeats, args.quick) for name in args.cases.split(",")}
    result = {
        "benchmark": "fit vs a bare loop over the same jitted step and batches",
        "quick": args.quick,
        "repeats": repeats,
        "cases": results,
        "machine": {
            **environment(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: bare {r['step_ms']['bare']:.3f} ms/step, fit ratio {r['ratio_fit']:.3f},"
              f" with bar {r['ratio_fit_bar']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
