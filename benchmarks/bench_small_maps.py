"""Convolutions on maps smaller than their kernel: XLA's convolution against a dot.

A torchvision ResNet halves its maps five times, so at 32-64 px its last stages run
3x3 convolutions on 2x2 and 1x1 maps. There XLA's algebraic simplifier swaps the
convolution's input and kernel, and XLA:CPU runs the swapped convolution (and the
input gradient of a stride-2 one) as a naive loop instead of an Eigen kernel.
`jaxlearn.models.layers.conv` computes such a layer as a dot of its input patches
instead. This script measures both, side by side in one process: each arm's train
step (forward, backward, SGD update; BatchNorm in training mode) and inference pass
are compiled, then the arms alternate, `--repeats` times `--steps` calls each, and
the medians are reported with `speedup` = lax time / dot time. `max_abs_diff` is the
largest difference between the two arms' logits (float rounding only). At 128 px no
map is that small: that row is the control (speedup ~1).

    python benchmarks/bench_small_maps.py           # writes results/small_maps.json
    python benchmarks/bench_small_maps.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

from jaxlearn import runs

# The experiments' CPU flags (Eigen convolutions), before jax starts a backend.
os.environ["XLA_FLAGS"] = runs.with_xla_flags([runs.YNN_CONV_OFF])

import jax
import numpy as np
import optax
from jax import lax

from jaxlearn.models import get_model, layers
from jaxlearn.state import init_variables

REPO = Path(__file__).resolve().parents[1]
CASES = [("resnet10", 32), ("resnet10", 64), ("resnet18", 64), ("resnet18", 128)]


def _lax_conv(lhs, rhs, window_strides, padding, **kwargs):
    """flax's default: `lax.conv_general_dilated` whatever the map size."""
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


@contextlib.contextmanager
def conv_path(arm: str):
    """Trace `conv` layers with the library's path ('dot') or plain XLA convolutions ('lax')."""
    kept = layers._conv_general_dilated
    if arm == "lax":
        layers._conv_general_dilated = _lax_conv
    try:
        yield
    finally:
        layers._conv_general_dilated = kept


def _programs(name: str, size: int, batch: int, eval_batch: int, arm: str):
    """(train step, its arguments, inference, its arguments), compiled under `arm`."""
    model = get_model(name, 10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    x_eval = rng.standard_normal((eval_batch, size, size, 3)).astype(np.float32)
    tx = optax.sgd(0.01, momentum=0.9)
    with conv_path(arm):
        variables = init_variables(model, jax.random.key(0), x[:1])
        opt_state = tx.init(variables["params"])

        def loss_fn(params, batch_stats):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                mutable=["batch_stats"],
            )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        @jax.jit
        def train_step(params, batch_stats, opt_state):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        infer = jax.jit(lambda v, images: model.apply(v, images, train=False))
        train_args = (variables["params"], variables["batch_stats"], opt_state)
        jax.block_until_ready(train_step(*train_args))  # compile under this arm
        jax.block_until_ready(infer(variables, x_eval))
    return train_step, train_args, infer, (variables, x_eval)


def measure(name: str, size: int, *, batch: int, eval_batch: int, steps: int, repeats: int):
    """Median ms per train step and per inference batch of both arms, alternating."""
    arms = {arm: _programs(name, size, batch, eval_batch, arm) for arm in ("lax", "dot")}
    times = {f"{arm}_{kind}": [] for arm in arms for kind in ("train", "infer")}
    for _ in range(repeats):
        for arm, (train_step, train_args, infer, infer_args) in arms.items():
            for kind, fn, args in (("train", train_step, train_args), ("infer", infer, infer_args)):
                start = time.perf_counter()
                for _ in range(steps):
                    out = fn(*args)
                jax.block_until_ready(out)
                times[f"{arm}_{kind}"].append(1000 * (time.perf_counter() - start) / steps)
    ms = {k: statistics.median(v) for k, v in times.items()}
    logits = {arm: np.asarray(infer(*args)) for arm, (_, _, infer, args) in arms.items()}
    return {
        "model": name,
        "size": size,
        "batch": batch,
        "eval_batch": eval_batch,
        "ms": ms,
        "speedup_train": ms["lax_train"] / ms["dot_train"],
        "speedup_infer": ms["lax_infer"] / ms["dot_infer"],
        "max_abs_diff": float(np.max(np.abs(logits["lax"] - logits["dot"]))),
        "times_ms": times,
    }


def main(argv=None) -> dict:
    """Run every case and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case, 2 repeats of 2 steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "small_maps.json"))
    args = parser.parse_args(argv)
    cases = CASES[:1] if args.quick else CASES
    repeats, steps = (2, 2) if args.quick else (args.repeats, args.steps)
    started = time.time()
    rows = []
    for name, size in cases:
        row = measure(name, size, batch=16, eval_batch=64, steps=steps, repeats=repeats)
        print(
            f"{name} {size} px: train {row['ms']['lax_train']:.1f} -> {row['ms']['dot_train']:.1f}"
            f" ms (x{row['speedup_train']:.2f}), inference {row['ms']['lax_infer']:.1f} -> "
            f"{row['ms']['dot_infer']:.1f} ms (x{row['speedup_infer']:.2f})"
        )
        rows.append(row)
    record = {
        "config": {"quick": args.quick, "repeats": repeats, "steps": steps},
        "rows": rows,
        "wall_s": time.time() - started,
        "load_average_at_end": list(os.getloadavg()),
        **runs.environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
