"""Input pipeline throughput: decoding (cold and cached) and on-device augmentation vs training.

Measures, on the real data in ../shared/data (or $JAXLEARN_DATA):
  1. decoding cats_and_dogs/train (1,999 JPEGs of every size, to 128 px) and
     cifar10 train + test (60,000 32 px JPEGs) with `load_image_folder`: a cold
     load (decode on all cores, write the cache) and a second, cached load;
  2. side by side at one batch size, images per second of
     - device-resident batching + augmentation (gather a batch from the data
       set on the device, random crop with 4 px padding + flip, to float),
     - `ArrayLoader` batches (host gather + transfer), when it exists,
     - the ResNet-20 train step (`make_train_step`) that consumes them;
     the input path should deliver at least 10x what the train step eats.
Writes benchmarks/results/data.json.

  python benchmarks/bench_data.py            # full: all 60,000 CIFAR images
  python benchmarks/bench_data.py --quick    # 500 CIFAR images per class and split
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn.data import augment as aug
from jaxlearn.data import load_image_folder

REPO = Path(__file__).resolve().parents[1]


def _linked_subset(source: Path, target: Path, per_class: int) -> Path:
    """A folder of symlinks to the first `per_class` files of each class of each split."""
    for split in sorted(p for p in source.iterdir() if p.is_dir()):
        for folder in sorted(p for p in split.iterdir() if p.is_dir()):
            out = target / split.name / folder.name
            out.mkdir(parents=True)
            for path in sorted(folder.iterdir())[:per_class]:
                (out / path.name).symlink_to(path)
    return target


def bench_decode(root: Path, splits: list[str], size: int, cache_dir: Path) -> dict:
    """Cold (decode + cache write) and cached load times of `splits` of `root`."""
    result = {"root": str(root), "size": size, "splits": splits}
    for phase in ("cold", "cached"):
        start = time.perf_counter()
        count = 0
        classes = None
        for split in splits:
            data = load_image_folder(
                root, split, size, class_names=classes, cache_dir=cache_dir, progress=False
            )
            classes, count = data.class_names, count + len(data)
        seconds = time.perf_counter() - start
        result[phase] = {"seconds": seconds, "images": count, "images_per_s": count / seconds}
    result["cached_speedup"] = result["cached"]["images_per_s"] / result["cold"]["images_per_s"]
    return result


def _rate(run_once, images_per_call: int, repeats: int) -> dict:
    """Median images/s over `repeats` timed calls of `run_once` (after one warm-up call)."""
    jax.block_until_ready(run_once())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run_once())
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"median_s": median, "images_per_s": images_per_call / median, "repeats": repeats}


def bench_pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, steps: int) -> dict:
    """Device batching + augmentation, ArrayLoader, and ResNet-20 train step, in images/s."""
    augment = aug.compose(aug.random_crop(4), aug.random_flip())
    device_images, device_labels = jax.device_put(images), jax.device_put(labels)

    @jax.jit
    def batches(key, images, labels):
        """`steps` augmented batches drawn from the device-resident data set."""
        order = jnp.resize(jax.random.permutation(key, images.shape[0]), steps * batch_size)

        def one(step, idx):
            x = aug.to_float(augment(jax.random.fold_in(key, step), images[idx]))
            # Reduce each batch so that nothing but the pipeline is kept alive.
            return step + 1, (jnp.sum(x), jnp.sum(labels[idx]))

        return jax.lax.scan(one, 0, order.reshape(steps, batch_size))[1]

    keys = iter(jax.random.split(jax.random.key(0), 1000))
    result = {
        "device_augment_batching": _rate(
            lambda: batches(next(keys), device_images, device_labels), steps * batch_size, 5
        )
    }

    try:
        from jaxlearn.data.loader import ArrayLoader
    except ImportError:
        ArrayLoader = None
    if ArrayLoader is not None:
        loader = ArrayLoader(images, labels, batch_size, seed=0)
        epochs = iter(range(1000))

        def host_batches():
            batches = loader.epoch(next(epochs))
            return [next(batches)["image"] for _ in range(min(steps, len(loader)))]

        result["array_loader"] = _rate(host_batches, min(steps, len(loader)) * batch_size, 5)

    from jaxlearn.models import get_model
    from jaxlearn.state import TrainState
    from jaxlearn.steps import make_train_step

    model = get_model("resnet20", num_classes=10)
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(model, tx, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    train_step = make_train_step()
    batch = {"image": device_images[:batch_size], "label": device_labels[:batch_size]}
    train_steps = 3

    def train():
        nonlocal state
        for _ in range(train_steps):
            state, metrics = train_step(state, batch)
        return metrics["loss"]

    result["train_step_resnet20"] = _rate(train, train_steps * batch_size, 3)
    train_rate = result["train_step_resnet20"]["images_per_s"]
    result["input_over_train"] = {
        name: value["images_per_s"] / train_rate
        for name, value in result.items()
        if name != "train_step_resnet20"
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("JAXLEARN_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--quick", action="store_true", help="500 CIFAR images per class/split")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="batches per timed pipeline call")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    results: dict = {
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "cores": cores,
            "device": str(jax.devices()[0]),
            "load_average_before": load_before,
        },
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
    }
    with tempfile.TemporaryDirectory(prefix="jaxlearn_bench_", dir="/tmp") as tmp:
        cache = Path(tmp) / "cache"
        results["decode_cats_and_dogs"] = bench_decode(
            args.data / "cats_and_dogs", ["train"], 128, cache
        )
        cifar = args.data / "cifar10"
        if args.quick:
            cifar = _linked_subset(cifar, Path(tmp) / "cifar10_subset", 500)
        results["decode_cifar10"] = bench_decode(cifar, ["train", "test"], 32, cache)
        train = load_image_folder(cifar, "train", 32, cache_dir=cache, progress=False)
    results["pipeline"] = {
        "batch_size": args.batch_size,
        **bench_pipeline(train.images, train.labels, args.batch_size, args.steps),
    }
    load_after = os.getloadavg()
    results["machine"]["load_average_after"] = load_after
    # Other engineers share these cores: a 1-minute load above the core count
    # means every number here is slowed by contention (ratios less so).
    results["machine"]["loaded"] = max(load_before[0], load_after[0]) > cores
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
