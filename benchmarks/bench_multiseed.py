"""Many seeds at once: N = 100 MLPs (784-20-10) trained vmapped against a loop of N trainings.

The flat-minima post trained 100 small MLPs on MNIST. Side by side in one run, on the
same data, init keys and data orders:
  - vmapped: `jaxlearn.multiseed.train_many` — all N models in one compiled program
    per epoch (vmap over models of a lax.scan over steps);
  - loop: N separate runs of `jaxlearn.loop.fit` with the jitted train step and an
    `ArrayLoader` (what one writes without vmap: one dispatch per step and model).
Compilation is excluded (a warm-up run of each); the vmapped run is repeated and its
median taken, the loop's time is the median single run times N (and its total).
The trained weights are checked equal. SGD momentum 0.9, LR 0.1, batch 128, 1 epoch.
Uses the real MNIST idx files when found ($JAXLEARN_DATA or ../shared/data), random
MNIST-shaped data otherwise. Writes benchmarks/results/multiseed.json.

  python benchmarks/bench_multiseed.py            # 60,000 images, 100 models
  python benchmarks/bench_multiseed.py --quick    # 4,096 images, 100 models
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
from jaxlearn.data.mnist import load_mnist
from jaxlearn.loop import fit
from jaxlearn.models import MLP
from jaxlearn.multiseed import init_many, train_many
from jaxlearn.runs import data_root, environment
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step

REPO = Path(__file__).resolve().parents[1]


def mnist_or_random(num_images: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first `num_images` MNIST training images, or random ones shaped like them."""
    try:
        data = load_mnist(data_root() / "mnist", "train")
        return data.images[:num_images], data.labels[:num_images].astype(np.int32), "mnist"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (num_images, 28, 28, 1), dtype=np.uint8)
        return images, rng.integers(0, 10, num_images).astype(np.int32), "random"


def timed(fn):
    """(seconds, output) of one call, blocking on the result."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def measure(num_models: int, num_images: int, batch_size: int, repeats: int) -> dict:
    """`train_many` of `num_models` MLPs against a loop of `fit`, one epoch each.

    Returns:
      The config, the median vmapped time, the loop's time (median single run x N, and
      its total), their ratio, and the largest difference between the two paths' trained
      weights (`weights_equal`; `equal` when within 1e-5, as on CPU).
    """
    images, labels, source = mnist_or_random(num_images)
    model, tx = MLP(features=(20,), num_classes=10), optax.sgd(0.1, momentum=0.9)
    keys = jax.random.split(jax.random.key(0), num_models)
    seeds = list(range(num_models))
    pure_step, jit_step = make_train_step(jit=False), make_train_step()

    def vmapped():
        states = init_many(model, tx, keys, images[:1])
        kw = dict(train_step=pure_step, batch_size=batch_size, seeds=seeds, epochs=1)
        return train_many(states, images, labels, **kw)[0].params

    def one(i):
        state = TrainState.create(model, tx, keys[i], images[:1])
        loader = ArrayLoader(images, labels, batch_size, seed=seeds[i])
        return fit(state, loader, train_step=jit_step, epochs=1, progress=False)[0].params

    timed(vmapped)  # warm-up: compile
    vmap_times, params = zip(*(timed(vmapped) for _ in range(repeats)), strict=True)
    timed(lambda: one(0))  # warm-up: compile
    loop_times, loop_params = zip(
        *(timed(lambda i=i: one(i)) for i in range(num_models)), strict=True
    )
    max_diff = max(
        float(np.max(np.abs(np.asarray(a[i]) - np.asarray(b))))
        for i, p in enumerate(loop_params)
        for a, b in zip(jax.tree.leaves(params[-1]), jax.tree.leaves(p), strict=True)
    )
    vmap_s = statistics.median(vmap_times)
    loop_s = statistics.median(loop_times) * num_models
    return {
        "config": {
            "models": num_models,
            "images": num_images,
            "data": source,
            "batch_size": batch_size,
            "steps_per_model": num_images // batch_size,
            "optimizer": "sgd lr 0.1 momentum 0.9",
            "repeats_vmapped": repeats,
        },
        "backend": jax.default_backend(),
        "vmapped_s": vmap_s,
        "loop_s": loop_s,
        "loop_total_s": sum(loop_times),
        "loop_over_vmapped": loop_s / vmap_s,
        "vmapped_times_s": list(vmap_times),
        "loop_single_run_median_s": statistics.median(loop_times),
        "weights_equal": {"max_abs_diff": max_diff, "equal": max_diff <= 1e-5},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4,096 images, 2 repeats")
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "multiseed.json"
    )
    args = parser.parse_args()
    num_images, repeats = (4096, 2) if args.quick else (60000, 3)
    load_before = os.getloadavg()
    measured = measure(args.models, num_images, args.batch_size, repeats)
    max_diff = measured["weights_equal"]["max_abs_diff"]
    assert measured["weights_equal"]["equal"], f"vmapped and looped weights differ by {max_diff}"
    load_after = os.getloadavg()
    result = {
        "benchmark": "N MLPs 784-20-10, one epoch each: vmapped train_many vs loop of fit",
        **measured,
        "config": {**measured["config"], "quick": args.quick},
        "machine": {
            **environment(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "loaded": max(load_before[0], load_after[0]) > (os.cpu_count() or 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
