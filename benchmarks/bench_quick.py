"""The experiments' --quick runs: compiling fast, and keeping compiled programs between runs.

A --quick run takes a few steps of each program, so XLA's compile time is most of its
wall time. Each script's `--quick` run is timed in fresh processes (XLA reads XLA_FLAGS
once, jax its cache options once), the arms alternating:

- `default`: the project's CPU flags (`runs.YNN_CONV_OFF`, `runs.MEMORY_SCHEDULER`), with
  `runs.FAST_COMPILE`'s flags set to XLA's defaults (LLVM -O3, fusion emitters), which
  `compile_fast_when_quick` leaves as set, and no compilation cache: a --quick run before
  either existed;
- `fast`: the project's CPU flags alone (the script adds `runs.FAST_COMPILE` itself), no
  compilation cache;
- `fast_cold`: as `fast`, with the persistent compilation cache
  (`runs.cache_compilations_when_quick`'s settings) in an empty folder: the first quick
  run, which writes every program;
- `fast_warm`: the same again into the folder `fast_cold` filled: every later quick run.

The cache arms name their folder in JAX_COMPILATION_CACHE_DIR (the data cache stays where
it is), with the minimum compile time and size the script would set. One untimed run of
each script first fills the decoded-image cache. Medians of the wall times over
`--repeats`; writes one JSON. Needs the real data (`JAXLEARN_DATA`, else ../shared/data).

    python benchmarks/bench_quick.py [--scripts quickstart,flat_minima] [--repeats 2]
    python benchmarks/bench_quick.py --arms fast,fast_cold,fast_warm --out results/x.json
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
    "cosine_annealing": [],
    "cats_dogs_transfer": [],
}
#: XLA's own values of `runs.FAST_COMPILE`'s flags.
XLA_DEFAULTS = ("--xla_cpu_use_fusion_emitters=true", "--xla_backend_optimization_level=3")


ARMS = ("default", "fast", "fast_cold", "fast_warm")


def _wall_time(script: str, extra: list[str], xla_flags: str, cache: str | None) -> float:
    """Seconds of one `--quick` run of `script` in a fresh process, compiled programs kept
    in the folder `cache` (None: no compilation cache)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    if cache is None:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    else:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(runs.QUICK_COMPILE_CACHE_BYTES)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(EXPERIMENTS / f"{script}.py"), "--quick", "--out", out]
        started = time.perf_counter()
        subprocess.run([*command, *extra], env=env, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of " + str(ARMS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quick.json"))
    args = parser.parse_args()
    scripts, arms = args.scripts.split(","), args.arms.split(",")
    unknown = sorted(set(scripts) - {p.stem for p in EXPERIMENTS.glob("*.py")})
    if unknown:
        parser.error(f"no experiment script named {unknown}")
    warm_first = "fast_warm" in arms and (
        "fast_cold" not in arms or arms.index("fast_warm") < arms.index("fast_cold")
    )
    if set(arms) - set(ARMS) or warm_first:
        parser.error(f"--arms must be among {ARMS}, fast_warm after fast_cold: {arms}")
    user = runs.with_xla_flags([runs.YNN_CONV_OFF, runs.MEMORY_SCHEDULER], "")
    flag_sets = {"default": runs.with_xla_flags(XLA_DEFAULTS, user), "fast": user}
    record = {"machine": runs.environment(), "load_average_at_start": os.getloadavg(),
              "repeats": args.repeats, "flag_sets": flag_sets, "scripts": {}}  # fmt: skip
    for script in scripts:
        extra = SCRIPTS.get(script, [])
        _wall_time(script, extra, user, None)  # fills the decoded-image cache, untimed
        times = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:  # empty for fast_cold, then warm
                for arm in arms:
                    flags = flag_sets["default" if arm == "default" else "fast"]
                    folder = cache if arm in ("fast_cold", "fast_warm") else None
                    times[arm].append(_wall_time(script, extra, flags, folder))
        row = {arm: {"median_s": statistics.median(t), "runs_s": t} for arm, t in times.items()}
        base = row[arms[0]]["median_s"]
        for arm in arms[1:]:
            row[f"ratio_{arm}_over_{arms[0]}"] = row[arm]["median_s"] / base
        record["scripts"][script] = row
        print(f"{script:20} " + ", ".join(f"{a} {row[a]['median_s']:6.1f} s" for a in arms))
    record["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
