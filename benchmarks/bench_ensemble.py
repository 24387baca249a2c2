"""Snapshot-ensemble prediction: vmap over M stacked snapshots against a Python loop over M.

Side by side in one run on the same images and the same M = 5 ResNet-20 snapshots
(CIFAR-sized 32x32x3 uint8 inputs, random weights and BatchNorm statistics: speed does
not depend on what the weights learned):
  - vmap: `jaxlearn.ensemble.member_logits` with ``member_batch=M`` — the snapshots
    stacked once, the model's apply vmapped over them, one compiled program per chunk
    of images (the default on accelerators);
  - map: the same with ``member_batch=1``: members in sequence (`lax.map`) inside the
    one program (the default on CPU);
  - loop: one jitted `apply` per snapshot, called M times per chunk (what one would
    write without stacking).
Outputs are checked equal (allclose), compilation is excluded (one warm-up run), and
the median of the repeats is reported, with the loop/vmap ratio. Writes
benchmarks/results/ensemble.json.

  python benchmarks/bench_ensemble.py            # 2,048 images, 5 repeats
  python benchmarks/bench_ensemble.py --quick    # 256 images, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn import ensemble
from jaxlearn.models import get_model
from jaxlearn.runs import environment
from jaxlearn.state import init_variables
from jaxlearn.steps import default_preprocess

REPO = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    """Run `fn` once to warm up (compile), then `repeats` times; median wall time and output."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def measure(model_name: str, members: int, num_images: int, batch_size: int, repeats: int) -> dict:
    """vmap, map and loop prediction of `members` random snapshots on random CIFAR-sized images.

    Returns:
      The config, median and every time of each arm, images/s, the loop/vmap and loop/map
      ratios, and the largest difference between the arms' outputs (`outputs_equal`, with
      `allclose` at rtol = atol = 1e-4).
    """
    model = get_model(model_name, num_classes=10)
    images = np.random.default_rng(0).integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    snapshots = []
    for i in range(members):
        variables = init_variables(model, jax.random.key(i), np.zeros((1, 32, 32, 3), np.float32))
        # Non-trivial statistics so every member computes something different (none: an MLP).
        stats = jax.tree.map(lambda s, i=i: s + 0.01 * i, variables.get("batch_stats", {}))
        snapshots.append({"params": variables["params"], "batch_stats": stats})
    stacked = ensemble.stack(snapshots)
    bs = batch_size

    def vmapped(member_batch=members):
        return ensemble.member_logits(
            model.apply, stacked, images, batch_size=bs, member_batch=member_batch
        )[:, 0]

    apply = jax.jit(lambda v, x: model.apply(v, default_preprocess(x), train=False))

    def loop():
        chunks = [jnp.asarray(images[i : i + bs]) for i in range(0, num_images, bs)]
        return np.stack(
            [np.concatenate([np.asarray(apply(s, x)) for x in chunks]) for s in snapshots]
        )

    vmap_s, vmap_times, vmap_out = median_seconds(vmapped, repeats)
    map_s, map_times, map_out = median_seconds(lambda: vmapped(1), repeats)
    loop_s, loop_times, loop_out = median_seconds(loop, repeats)
    max_diff = float(max(np.max(np.abs(o - loop_out)) for o in (vmap_out, map_out)))
    close = all(np.allclose(o, loop_out, rtol=1e-4, atol=1e-4) for o in (vmap_out, map_out))
    return {
        "config": {
            "model": model_name,
            "members": members,
            "images": num_images,
            "image_shape": [32, 32, 3],
            "batch_size": bs,
            "repeats": repeats,
        },
        "backend": jax.default_backend(),
        "vmap_s": vmap_s,
        "map_s": map_s,
        "loop_s": loop_s,
        "loop_over_vmap": loop_s / vmap_s,
        "loop_over_map": loop_s / map_s,
        "vmap_images_per_s": num_images * members / vmap_s,
        "map_images_per_s": num_images * members / map_s,
        "loop_images_per_s": num_images * members / loop_s,
        "vmap_times_s": vmap_times,
        "map_times_s": map_times,
        "loop_times_s": loop_times,
        "outputs_equal": {"max_abs_diff": max_diff, "rtol": 1e-4, "atol": 1e-4, "close": close},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 images, 3 repeats")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "ensemble.json"
    )
    args = parser.parse_args()
    num_images, repeats = (256, 3) if args.quick else (2048, 5)
    load_before = os.getloadavg()
    measured = measure(args.model, args.members, num_images, args.batch_size, repeats)
    assert measured["outputs_equal"]["close"], f"outputs differ: {measured['outputs_equal']}"
    load_after = os.getloadavg()
    cores = os.cpu_count() or 1
    result = {
        "benchmark": "snapshot ensemble prediction: vmap over stacked members vs Python loop",
        **measured,
        "config": {**measured["config"], "quick": args.quick},
        "machine": {
            **environment(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "loaded": max(load_before[0], load_after[0]) > cores,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
