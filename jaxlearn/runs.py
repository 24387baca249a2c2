"""Run records for experiments: where the data is, what machine ran, what came out.

Radek's rules ask every run to leave behind its config, seeds, metrics, wall time,
hardware and library versions. `write_results` writes exactly that as
``results.json`` next to the run's figures, so every number quoted in
experiments/RESULTS.md can be traced to a file. `with_xla_flags` adds the XLA:CPU
flags of this project's CPU runs where the installed jaxlib defines them.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import mmap
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Packages whose versions go into every results.json.
_PACKAGES = ("jaxlearn", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")

#: XLA:CPU flags of this project's CPU runs (benchmarks/README.md has the numbers; both
#: leave every other backend alone). jaxlib 0.10 sends CPU convolutions to YNNPACK, which
#: runs a ResNet train step 2.7-3.8x slower than XLA's Eigen convolutions on our AMD EPYC:
YNN_CONV_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
#: XLA:CPU's concurrency-optimised scheduler keeps more temporaries alive, allocated anew on
#: every call: an EfficientNet-Lite0 train step takes 2.3 s with the memory-minimising one,
#: 6.1 s without.
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
#: XLA:CPU flags that compile fast rather than well, for compile-bound runs such as the test
#: suite (tests/conftest.py has the numbers) and --quick runs: legacy loop emitters, LLVM
#: at -O0.
FAST_COMPILE = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
)
#: One Eigen thread per process, for processes that share the cores (the suite's two xdist
#: workers); a process alone on them gains nothing from it (`compile_fast_when_quick`).
ONE_EIGEN_THREAD = "--xla_cpu_multi_thread_eigen=false"
#: LLVM codegen of each program in one piece instead of XLA:CPU's 32 parts on a thread pool:
#: faster where every core already compiles (benchmarks/bench_compile.py).
ONE_PIECE_CODEGEN = "--xla_cpu_parallel_codegen_split_count=1"


#: Most disk the --quick runs' compiled programs may take (`cache_compilations_when_quick`).
QUICK_COMPILE_CACHE_BYTES = 2**30


class _ExperimentParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``--quick`` has XLA compile fast (`compile_fast_when_quick`)
    and keep its programs for the next run (`cache_compilations_when_quick`), and whose
    ``--progress`` defaults to whether stderr is a terminal, and whose ``--out`` defaults
    to `default_out`, with '_quick' added for a ``--quick`` run."""

    def __init__(self, *args, default_out: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_out = default_out

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if parsed.out is None:  # a quick run never replaces the real run's results
            parsed.out = self.default_out + ("_quick" if parsed.quick else "")
        compile_fast_when_quick(parsed.quick)
        cache_compilations_when_quick(parsed.quick)
        if parsed.progress is None:
            parsed.progress = sys.stderr.isatty()
        return parsed, extras


def experiment_parser(description: str, *, default_out: str) -> argparse.ArgumentParser:
    """The flags every experiment script shares; a script adds its own on top.

    ``--quick`` switches to the ~10-second mode (a subset, few steps: Radek's
    10-second rule), ``--data`` names the data folder (else ``JAXLEARN_DATA``, else
    ../shared/data), ``--out`` the folder for results.json and figures (default
    `default_out`, or `default_out` + '_quick' with ``--quick``, so that a quick
    run never overwrites the real run's results), and
    ``--seeds`` how many seeds to run (0, 1, ..., n-1), ``--progress`` /
    ``--no-progress`` whether training and decoding show progress bars (default: when
    stderr is a terminal, so a log written by ``nohup`` stays free of bar redraws).
    Parsing ``--quick`` calls `compile_fast_when_quick` and
    `cache_compilations_when_quick`, before the script can start JAX.
    """
    parser = _ExperimentParser(description=description, default_out=default_out)
    parser.add_argument("--quick", action="store_true", help="a smoke run on a subset (~10-30 s)")
    parser.add_argument("--data", default=None, help="data folder (default: $JAXLEARN_DATA)")
    parser.add_argument(
        "--out", default=None,
        help=f"output folder for results.json and figures (default: {default_out}, "
        f"{default_out}_quick with --quick)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    return parser


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The folder that holds the real data sets.

    Precedence: the explicit ``path`` (a script's ``--data`` flag), then the
    ``JAXLEARN_DATA`` environment variable, then ``../shared/data`` beside the
    repository (this project's machines).

    Raises:
      FileNotFoundError: naming the folder that was tried, and how to set it.
    """
    if path is None:
        path = os.environ.get("JAXLEARN_DATA")
    if path is None:
        path = Path(__file__).resolve().parents[2] / "shared" / "data"
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist: pass --data PATH or set JAXLEARN_DATA"
        )
    return root


def package_versions(names: Sequence[str] = _PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution named (None for one not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """Hardware and library versions of this process, for results.json."""
    import jax

    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        # XLA flags change speed by 3x on CPU (README, "Speed on a CPU"): record them.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": package_versions(),
        "git_commit": _git_commit(),
    }


def jaxlib_knows_flag(flag: str) -> bool:
    """Whether the installed jaxlib defines the XLA flag `flag` ('--name=value' or 'name').

    XLA aborts the process when XLA_FLAGS names a flag it does not define ("Unknown flags
    in XLA_FLAGS"), and flags come and go between jaxlib releases. Every flag is registered
    under its name, a NUL-terminated string constant in jaxlib's libraries, so the name is
    looked up there, without importing jax (a scan of jaxlib 0.10.2's 350 MB library takes
    0.03 s when the name is found early, ~0.3 s for an unknown one).
    """
    name = b"\0" + flag.lstrip("-").split("=", 1)[0].encode() + b"\0"
    for path in _jaxlib_libraries():
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(name) >= 0:
                return True
    return False


@functools.cache
def _jaxlib_libraries() -> tuple[Path, ...]:
    """jaxlib's shared libraries, largest (XLA's) first; none when jaxlib is not installed."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return ()
    found = Path(next(iter(spec.submodule_search_locations))).rglob("*.so")
    return tuple(sorted(found, key=lambda p: -p.stat().st_size))


def with_xla_flags(flags: Sequence[str], xla_flags: str | None = None) -> str:
    """XLA_FLAGS with each of `flags` appended unless it is set there already or unknown.

    For flags that only tune one backend (`YNN_CONV_OFF`, `MEMORY_SCHEDULER`): a flag whose
    name XLA_FLAGS already holds is left as the user set it, and one this jaxlib does not
    define (`jaxlib_knows_flag`) is left out rather than abort the process. Call it before
    jax starts a backend (XLA reads XLA_FLAGS once).

    Args:
      flags: '--name=value' strings.
      xla_flags: the current value; None: the XLA_FLAGS environment variable.

    Returns:
      The new value, to be put in the environment.
    """
    value = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    for flag in flags:
        name = flag.lstrip("-").split("=", 1)[0]
        if name not in value and jaxlib_knows_flag(flag):
            value = f"{value} {flag}".strip()
    return value


def compile_fast_when_quick(quick: bool) -> bool:
    """In an experiment's --quick mode on the CPU, have XLA compile fast rather than well.

    A quick run takes a few steps of each program, so compiling is most of its time: the
    experiments' --quick runs take 0.58-0.79x the wall time with `FAST_COMPILE`
    (benchmarks/bench_quick.py; one Eigen thread or one-piece codegen on top changed
    nothing). XLA reads XLA_FLAGS when JAX starts its first backend, so
    `experiment_parser`'s parser calls this as it parses. Where a backend is already up
    (a test process, a notebook that ran JAX), or a GPU/TPU plugin is installed and
    JAX_PLATFORMS does not say "cpu" (LLVM -O0 would slow its kernels), nothing changes.
    Flags the user set in XLA_FLAGS stay as set (`with_xla_flags`).

    Returns:
      Whether the flags were put in the environment.
    """
    if not quick or _jax_backend_started() or not _cpu_only():
        return False
    os.environ["XLA_FLAGS"] = with_xla_flags(FAST_COMPILE)
    return True


def cache_compilations_when_quick(quick: bool) -> Path | None:
    """In an experiment's --quick mode, keep compiled programs on disk for the next run.

    A quick run is meant to be run again and again (Radek's 10-second rule), and much of
    its time is compiling the same programs each time (later runs take 0.63-0.90x the
    first: benchmarks/bench_quick.py). With JAX's persistent compilation
    cache in `default_cache_dir()`/xla (the folder of the decoded-image cache; at most
    `QUICK_COMPILE_CACHE_BYTES`, least recently used entries deleted first), a second
    quick run reads them back. The cache key holds the program, XLA_FLAGS and the jax
    version, so a changed model or flag compiles anew. Only a run whose JAX has not
    compiled anything yet changes (the cache folder is fixed at the first compilation);
    a folder the user set (JAX_COMPILATION_CACHE_DIR) is used as set.

    Returns:
      The cache folder, or None where nothing was set up.
    """
    if not quick or _jax_backend_started():
        return None
    import jax

    from jaxlearn.data.cache import default_cache_dir

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
        jax.config.update("jax_compilation_cache_max_size", QUICK_COMPILE_CACHE_BYTES)
        # JAX's default keeps only programs that took over 1 s; at -O0 most take less.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return Path(jax.config.jax_compilation_cache_dir)


def _jax_backend_started() -> bool:
    """Whether JAX has started a backend (and read XLA_FLAGS); True when it cannot tell.

    jax has no public way to ask; `backends_are_initialized` is its internal one.
    """
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not importlib.metadata.entry_points(group="jax_plugins") and (
        importlib.util.find_spec("jax_plugins") is None
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def jsonable(value: Any) -> Any:
    """`value` in plain JSON values, recursively: NumPy and JAX scalars and arrays to
    Python numbers and lists, tuples to lists, keys and paths to strings, NaN and
    infinities to the strings 'nan', 'inf', '-inf' (JSON has none). Anything else is
    returned as it is."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__array__") and not isinstance(value, str | bytes):
        array = np.asarray(value)
        return jsonable(array.item() if array.ndim == 0 else array.tolist())  # NaN inside
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


def json_config(config: Mapping[str, Any] | None) -> dict:
    """A run's configuration as a checkpoint stores and returns it: plain JSON values
    (`jsonable`: NumPy scalars to Python numbers, tuples to lists).

    Raises:
      ValueError: a value JSON cannot hold (a function, an object), named.
    """
    try:
        return json.loads(json.dumps(jsonable(dict(config or {}))))
    except TypeError as e:
        raise ValueError(f"config must hold plain JSON values: {e}") from e


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Summary statistics of per-seed (or per-draw) results, for results.json.

    Returns:
      mean, std (sample, ddof 1; 0 for one value), median, quartiles q1 and q3, min,
      max, n and the values themselves, all plain Python numbers.
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {v.shape}")
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(median), "q1": float(q1), "q3": float(q3), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size), "values": v.tolist()}  # fmt: skip


def write_results(
    out_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    seeds: list[int] | tuple[int, ...],
    started: float,
) -> Path:
    """Write ``out_dir/results.json`` with config, seeds, metrics, wall time and environment.

    Args:
      out_dir: the run's output folder (created if missing).
      config: everything needed to rerun (data path, model, schedule, quick or full).
      metrics: the measured numbers.
      seeds: the seeds the run used.
      started: ``time.time()`` at the start of the run; wall time is measured up to now.

    Returns:
      The path of the written file. The file is written to a temporary name and
      renamed, so a killed run never leaves half a results.json behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": jsonable(config),
        "seeds": jsonable(list(seeds)),
        "metrics": jsonable(metrics),
        "wall_time_s": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(),
    }
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path
