"""Compiling a train step: XLA:CPU's LLVM codegen split over a thread pool, or in one piece.

XLA:CPU cuts each program's LLVM module into up to 32 parts
(`--xla_cpu_parallel_codegen_split_count`, default 32) and compiles them on a thread pool.
This times `make_train_step(...).lower(...).compile()` for a few models (32 px, batch 8,
Adam) in fresh processes (XLA reads XLA_FLAGS once), with the default split and with
`--xla_cpu_parallel_codegen_split_count=1`, the two alternating, under two flag sets:

- `user`: the project's CPU flags (`runs.YNN_CONV_OFF`), what a script compiles with;
- `tests`: those plus the suite's compile-fast flags (`runs.FAST_COMPILE`: loop
  emitters, LLVM -O0; and `runs.ONE_EIGEN_THREAD`).

Medians over `--repeats`; writes one JSON.

    python benchmarks/bench_compile.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from jaxlearn import runs

COMPILE = """
import sys, time
import jax, numpy as np, optax
from jaxlearn.models import get_model
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step
x, y = np.zeros((8, 32, 32, 3), np.float32), np.zeros(8, np.int32)
for name in sys.argv[1].split(","):
    model = get_model(name, 10)
    state = TrainState.create(model, optax.adam(1e-3), jax.random.key(0), x[:1])
    lowered = make_train_step().lower(state, {"image": x, "label": y})
    t = time.perf_counter()
    lowered.compile()
    print(time.perf_counter() - t)
"""


def _compile_times(models: str, xla_flags: str) -> list[float]:
    """Seconds per model, compiled in one fresh process."""
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", COMPILE, models], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [float(t) for t in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet10,cnn_small,resnet20")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile.json"))
    args = parser.parse_args()
    models = args.models.split(",")
    user = runs.with_xla_flags([runs.YNN_CONV_OFF], "")
    tests = runs.with_xla_flags([*runs.FAST_COMPILE, runs.ONE_EIGEN_THREAD], user)
    record = {"machine": runs.environment(), "repeats": args.repeats, "models": models,
              "flag_sets": {"user": user, "tests": tests}}  # fmt: skip
    for name, flags in (("user", user), ("tests", tests)):
        arms = {"split_32": flags, "split_1": runs.with_xla_flags([runs.ONE_PIECE_CODEGEN], flags)}
        times = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm, arm_flags in arms.items():
                times[arm].append(_compile_times(args.models, arm_flags))
        rows = {}
        for i, model in enumerate(models):
            row = {arm: {"median_s": statistics.median(r[i] for r in ts),
                         "runs_s": [r[i] for r in ts]} for arm, ts in times.items()}  # fmt: skip
            row["ratio_split_1"] = row["split_1"]["median_s"] / row["split_32"]["median_s"]
            rows[model] = row
            print(
                f"{name:5} {model:10} split in 32 {row['split_32']['median_s']:.2f} s, "
                f"one piece {row['split_1']['median_s']:.2f} s ({row['ratio_split_1']:.2f}x)"
            )
        record[name] = rows
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
