"""The experiments' --quick runs with and without compiling fast (`runs.compile_fast_when_quick`).

A --quick run takes a few steps of each program, so XLA's compile time is most of its
wall time. Each script's `--quick` run is timed in fresh processes (XLA reads XLA_FLAGS
once), the two arms alternating:

- `default`: the project's CPU flags (`runs.YNN_CONV_OFF`, `runs.MEMORY_SCHEDULER`), with
  `runs.FAST_COMPILE`'s flags set to XLA's defaults (LLVM -O3, fusion emitters), which
  `compile_fast_when_quick` leaves as set: a --quick run before it existed;
- `fast`: the project's CPU flags alone; the script adds `runs.FAST_COMPILE` itself.

Medians of the wall times over `--repeats`; writes one JSON. Needs the real data
(`JAXLEARN_DATA`, else ../shared/data).

    python benchmarks/bench_quick.py [--scripts quickstart,flat_minima] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxlearn import runs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
#: The scripts timed by default, with their extra flags: cats_dogs_scratch with one seed
#: (its quick mode's two seeds share compiled programs, so the second adds only running).
SCRIPTS = {
    "quickstart": [],
    "flat_minima": [],
    "imagenette": [],
    "cifar_quickstart": [],
    "snapshot_ensembles": [],
    "cats_dogs_scratch": ["--seeds", "1"],
}
#: XLA's own values of `runs.FAST_COMPILE`'s flags.
XLA_DEFAULTS = ("--xla_cpu_use_fusion_emitters=true", "--xla_backend_optimization_level=3")


def _wall_time(script: str, extra: list[str], xla_flags: str) -> float:
    """Seconds of one `--quick` run of `script` in a fresh process."""
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(EXPERIMENTS / f"{script}.py"), "--quick", "--out", out]
        started = time.perf_counter()
        subprocess.run([*command, *extra], env=env, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quick.json"))
    args = parser.parse_args()
    scripts = args.scripts.split(",")
    unknown = sorted(set(scripts) - {p.stem for p in EXPERIMENTS.glob("*.py")})
    if unknown:
        parser.error(f"no experiment script named {unknown}")
    user = runs.with_xla_flags([runs.YNN_CONV_OFF, runs.MEMORY_SCHEDULER], "")
    arms = {"default": runs.with_xla_flags(XLA_DEFAULTS, user), "fast": user}
    record = {"machine": runs.environment(), "load_average_at_start": os.getloadavg(),
              "repeats": args.repeats, "flag_sets": arms, "scripts": {}}  # fmt: skip
    for script in scripts:
        times = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm, flags in arms.items():
                times[arm].append(_wall_time(script, SCRIPTS.get(script, []), flags))
        row = {arm: {"median_s": statistics.median(t), "runs_s": t} for arm, t in times.items()}
        fast, default = row["fast"]["median_s"], row["default"]["median_s"]
        row["ratio_fast"] = fast / default
        record["scripts"][script] = row
        print(f"{script:20} default {default:6.1f} s, fast {fast:6.1f} s ({fast / default:.2f}x)")
    record["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
