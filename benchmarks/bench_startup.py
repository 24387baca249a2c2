"""Start-up costs: `import jax` with two ml_dtypes, and per-leaf eager ops against one program.

Two things every process and every script pays before its first step:

- `import jax`, in fresh processes, with the installed ml_dtypes and, when
  `--other-ml-dtypes DIR` names a folder holding another one (e.g. the 0.7.0 wheel
  unpacked: `pip download --no-deps ml_dtypes==0.7.0` and unzip it), with that one
  first on PYTHONPATH; the two alternate.
- Eager per-leaf work on a ResNet's variables, in fresh processes (cold, as a script
  meets it): `jnp.stack` / indexing per leaf against `ensemble.stack` / `unstack` (one
  jitted program each), and `jax.tree.map(jnp.array, ...)` copies against
  `device_put(may_alias=False)`; XLA compilations counted. The two alternate.

Medians over `--repeats`; writes one JSON with the machine.

    python benchmarks/bench_startup.py --other-ml-dtypes /tmp/ml07
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

IMPORT = "import time; t = time.perf_counter(); import jax, ml_dtypes; " \
    "print(time.perf_counter() - t, ml_dtypes.__version__)"  # fmt: skip

TREE_WORK = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxlearn import ensemble
from jaxlearn.models import get_model
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: compiles.append(d) if e.endswith("backend_compile_duration") else None)
shapes = jax.eval_shape(lambda: get_model(sys.argv[1], 10).init(
    jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
snaps = [jax.tree.map(lambda s: jax.device_put(np.full(s.shape, i, s.dtype)), shapes)
         for i in range(3)]
jax.block_until_ready(snaps)
compiles.clear()
t = time.perf_counter()
if sys.argv[2] == "eager":
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *snaps)
    out = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(3)]
    out.append(jax.tree.map(jnp.array, snaps[0]))
else:
    out = ensemble.unstack(ensemble.stack(snaps))
    out.append(jax.device_put(snaps[0], may_alias=False))
jax.block_until_ready(out)
print(time.perf_counter() - t, len(compiles), len(jax.tree.leaves(shapes)))
"""


def _run(code: str, *args: str, pythonpath: str | None = None) -> list[str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return out.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-ml-dtypes", help="a folder holding another ml_dtypes")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "startup.json"))
    args = parser.parse_args()
    record = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "python": platform.python_version()},
              "repeats": args.repeats, "xla_flags": os.environ.get("XLA_FLAGS", "")}  # fmt: skip
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        record["machine"]["model"] = next(
            line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line
        )
        record["machine"]["avx512"] = "avx512f" in info
    except (OSError, StopIteration):
        pass

    paths = {"installed": None, "other": args.other_ml_dtypes}
    times: dict[str, list[float]] = {k: [] for k, v in paths.items() if k == "installed" or v}
    versions = {}
    for _ in range(args.repeats):
        for name in times:
            seconds, version = _run(IMPORT, pythonpath=paths[name])
            times[name].append(float(seconds))
            versions[name] = version
    record["import_jax"] = {
        name: {"ml_dtypes": versions[name], "median_s": statistics.median(ts), "runs_s": ts}
        for name, ts in times.items()
    }
    for name, row in record["import_jax"].items():
        print(f"import jax, ml_dtypes {row['ml_dtypes']} ({name}): {row['median_s']:.2f} s")

    record["tree_work"] = {}
    for model in args.models.split(","):
        runs = {"eager": [], "one_program": []}
        for _ in range(args.repeats):
            for how in runs:
                seconds, compiles, leaves = _run(TREE_WORK, model, how.split("_")[0])
                runs[how].append((float(seconds), int(compiles)))
        row = {"leaves": int(leaves)}
        for how, rs in runs.items():
            row[how] = {"median_s": statistics.median(s for s, _ in rs),
                        "compiles": rs[0][1], "runs_s": [s for s, _ in rs]}  # fmt: skip
        record["tree_work"][model] = row
        print(f"{model} ({leaves} leaves), stack + unstack of 3 + a copy: eager "
              f"{row['eager']['median_s']:.2f} s ({row['eager']['compiles']} compiles), "
              f"one program each {row['one_program']['median_s']:.2f} s "
              f"({row['one_program']['compiles']} compiles)")  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
