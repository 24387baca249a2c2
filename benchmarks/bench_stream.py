"""Streaming input (`StreamLoader` on Grain) against torch's DataLoader and the train step.

On a generated image folder of small JPEGs of many sizes (written under /tmp, never
in the repository; kept between runs), measures:
  1. peak RSS (this process and the loader's workers) in every epoch of either loader,
     sampled every 50 ms and reported at each tenth of the epoch: it must stay flat,
     bounded by the prefetch buffers, not grow with the data set;
  2. decoded images/s side by side, in alternating epochs after a first one (which
     starts the workers, timed apart): `StreamLoader` (`workers`
     processes, batches on the device) against `torch.utils.data.DataLoader` with as
     many workers over the same files, with the same decode and resize
     (`jaxlearn.data.images.decode_file`); the ratio should be >= 1.0;
  3. headroom: those images/s over what the `cnn_small` train step eats at 128 px.
Writes benchmarks/results/stream.json.

  python benchmarks/bench_stream.py            # 100,000 JPEGs, about 3 GB of /tmp
  python benchmarks/bench_stream.py --quick    # 2,000 JPEGs, 1 timed round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
import optax
import psutil

from jaxlearn.data import ImageFolderSource, StreamLoader
from jaxlearn.data.images import decode_file

REPO = Path(__file__).resolve().parents[1]
#: Sides of the generated JPEGs, drawn uniformly: small photos of every shape.
SIDES = (96, 200)
CLASSES = 10
#: Batches of an epoch not timed: decoded ahead while the other loader ran (Grain's
#: buffers hold up to workers * (threads + 1) + prefetch = 6 batches at the defaults).
SKIP = 8


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """ROOT/train/CLASS/*.jpg with `count` JPEGs of random sizes (made once, then reused)."""
    from PIL import Image

    done = root / f"done-{count}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / "train" / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(*SIDES, 2)
        # A smooth picture (a coarse noise upsampled), not white noise: JPEG-like sizes.
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((int(w), int(h)), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:06d}.jpg", quality=85)
    done.touch()
    return root


def _children() -> set[int]:
    """Pids of this process's children (the loaders' workers)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _cpu_seconds(skip: set[int]) -> dict:
    """CPU seconds (user + system) so far of this process and of its children but `skip`."""
    me = psutil.Process()
    times = me.cpu_times()
    workers = 0.0
    for child in me.children(recursive=True):
        if child.pid in skip:
            continue
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        workers += child_times.user + child_times.system
    return {"main": times.user + times.system, "workers": workers}


def _tree_rss(skip: set[int]) -> int:
    """Resident bytes of this process and its children but those in `skip` (the other
    loader's workers); shared memory pages count in each process that maps them."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        if child.pid in skip:
            continue
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def timed_epoch(batches: Iterator, labels: Callable, skip: set[int]) -> dict:
    """Images/s from batch `SKIP` to the epoch's end, the CPU seconds this process and the
    loader's workers (its children but `skip`) spent on the whole epoch, and their RSS
    through it (sampled every 50 ms by a thread of this process for either loader, so
    that both pay for the sampling alike)."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_tree_rss(skip))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu = _cpu_seconds(skip)
    start = time.perf_counter()
    sampler.start()
    images, timed = 0, start
    for i, batch in enumerate(batches):
        if i == SKIP:
            images, timed = 0, time.perf_counter()
        images += len(labels(batch))
    seconds = time.perf_counter() - timed
    stop.set()
    result = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
    result["cpu_s"] = {k: v - cpu[k] for k, v in _cpu_seconds(skip).items()}
    sampler.join()
    rss = np.array(samples) / 2**20
    tenths = [float(rss[min(len(rss) - 1, int(f * len(rss)))]) for f in np.arange(0, 1.01, 0.1)]
    result["rss_mib"] = {"peak": float(rss.max()), "at_each_tenth": tenths}
    return result


def stream_epoch(loader: StreamLoader, epoch: int, skip: set[int]) -> dict:
    """`timed_epoch` of the stream: each batch on the device (blocking on it)."""
    return timed_epoch(map(jax.block_until_ready, loader.epoch(epoch)), lambda b: b["label"], skip)


class _Files:
    """torch Dataset of (image tensor, label): the same decode and resize as the stream's."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        # decode_file's arrays are read-only views of PIL's memory: torch wants its own
        image = decode_file(self.paths[i], self.size, "crop").copy()
        return torch.from_numpy(image), int(self.labels[i])


def torch_loader(paths: list[str], labels: np.ndarray, size: int, batch: int, workers: int):
    """torch's DataLoader over the same files with the same decode and resize.

    Its workers are spawned (forking a process that runs JAX's threads may deadlock)
    and persistent, as Grain's pipeline runs on over the epochs.
    """
    import torch

    return torch.utils.data.DataLoader(
        _Files(paths, labels, size), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, generator=torch.Generator().manual_seed(0),
        multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=2,
    )  # fmt: skip


def torch_epoch(loader, skip: set[int]) -> dict:
    """`timed_epoch` of a torch DataLoader."""
    return timed_epoch(iter(loader), lambda b: b[1], skip)


def train_step_rate(batch: int, size: int, repeats: int) -> dict:
    """Images/s of the `cnn_small` train step at `size` px (compiled once, then the median)."""
    from jaxlearn.models import get_model
    from jaxlearn.state import TrainState
    from jaxlearn.steps import make_train_step

    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    data = {"image": images, "label": np.arange(batch, dtype=np.int32) % CLASSES}
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01, momentum=0.9)
    state = TrainState.create(get_model("cnn_small", CLASSES), tx, jax.random.key(0), images[:1])
    step = make_train_step()
    state, metrics = step(state, data)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"step_s": seconds, "images_per_s": batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 JPEGs, 1 round")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/jaxlearn-bench-stream"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="processes, both loaders")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed epochs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/stream.json")
    args = parser.parse_args()
    count, rounds = (2_000, 1) if args.quick else (args.images, args.rounds)
    root = args.dir / str(count)
    start = time.perf_counter()
    make_folder(root, count)
    made = time.perf_counter() - start

    load_before = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    source = ImageFolderSource(root, "train")
    loader = StreamLoader(source, args.batch_size, args.size, workers=args.workers)
    rss_before = _tree_rss(set()) / 2**20
    torch_data = torch_loader(source.paths, source.labels, args.size, args.batch_size, args.workers)
    # Epoch 0 of each starts the workers (Grain's import JAX: ~2-5 s here) and is not timed
    # against the other; it is the epoch whose RSS is sampled.
    warmup = {"stream": stream_epoch(loader, 0, set())}  # before torch has any worker
    grain_workers = _children()
    warmup["torch"] = torch_epoch(torch_data, grain_workers)
    torch_workers = _children() - grain_workers
    stream, torch_runs = [], []
    for r in range(1, rounds + 1):  # alternate, so that both see the same load
        stream.append(stream_epoch(loader, r, torch_workers))
        torch_runs.append(torch_epoch(torch_data, grain_workers))
    loader.close()
    del torch_data
    stream_rate = statistics.median(s["images_per_s"] for s in stream)
    torch_rate = statistics.median(t["images_per_s"] for t in torch_runs)
    step = train_step_rate(args.batch_size, 128, repeats=3 if args.quick else 10)
    load_after = os.getloadavg()
    results = {
        "quick": args.quick,
        "folder": {"root": str(root), "images": count, "sides": SIDES, "seconds_to_make": made},
        "config": {
            "size": args.size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "rounds": rounds,
        },
        "rss_mib_before": rss_before,
        "first_epoch": warmup,
        "stream": stream,
        "torch_dataloader": torch_runs,
        "stream_over_torch": stream_rate / torch_rate,
        "cnn_small_128px_train_step": step,
        "headroom_over_train_step": stream_rate / step["images_per_s"],
        "machine": {
            "platform": platform.platform(),
            "cores": cores,
            "device": str(jax.devices()[0]),
            "load_average_before": load_before,
            "load_average_after": load_after,
            # Other jobs share these cores: a 1-minute load above the core count slows
            # every number here (the side-by-side ratio less so).
            "loaded": max(load_before[0], load_after[0]) > cores,
        },
        "versions": {
            "jax": jax.__version__,
            "grain": _version("grain"),
            "torch": _version("torch"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    keys = ("stream_over_torch", "headroom_over_train_step")
    print(json.dumps({k: results[k] for k in keys}))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
