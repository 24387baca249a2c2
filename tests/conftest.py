"""Shared test set-up: CPU only, a fixed hypothesis profile, the real-data path."""

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

from jaxlearn import runs

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# jaxlib 0.10 sends CPU convolutions to YNNPACK, which on this project's AMD EPYC runs a
# ResNet train step 2.7-3.8x slower than XLA's own Eigen convolutions
# (benchmarks/results/train_step.json): hand convolutions back to Eigen when the tests run
# on the CPU, and only where this jaxlib defines the flag (XLA aborts on flags it does not).
#
# The suite is compile-bound, so it also compiles fast rather than well: XLA:CPU's legacy
# loop emitters instead of its MLIR fusion emitters, and LLVM at -O0. A ResNet-10 train
# step compiles in 1.5 s instead of 3.0 s; the whole suite ran 211 -> 136 s on 2 workers.
# Programs compute the same functions (the 8-vs-1-device, resume and Learner tests stay
# bit for bit: both sides compile under the same flags); only run time and fusion-dependent
# rounding differ from a user's run. And each of the two xdist workers runs its Eigen
# kernels on one thread, not on two that contend with the other worker's (suite, two pairs
# of runs on the same hour: 150 -> 142 s, 132 -> 128 s). Where a run's time goes
# (2026-12-03, 519 tests, a slow Xeon: a Python loop of 10^7 additions 1.9 s; 226-273 s a
# run; JAX's monitoring events summed over both workers): 462 s of test time, of which
# 148 s XLA compiles (1,956 programs: 99 train / eval steps 54 s, 27 model inits 12 s,
# inference 17 s, eager ops ~20 s), 66 s lowering, 79 s tracing (Flax traces whole
# networks: 13 s for the 22 weight-conversion templates, 9 s for the parameter counts),
# and ~170 s running: the subprocess tests ~50 s (each process imports JAX ~2 s and
# compiles its own programs), 68 figures 24 s, the PyTorch references. Collecting takes
# 14 s a worker. Tried and dropped: writing bytecode (PYTHONDONTWRITEBYTECODE unset)
# collects in 9 instead of 14 s once warm, but a fresh clone's two workers compile the
# same sources at once (whole fresh suites: 273 s writing bytecode, 265 s not); the rbg and
# unsafe_rbg PRNGs do not compile model inits faster (ResNet-10: 2.3, 2.4, 2.7 s); three
# xdist workers instead of two on the 2 cores took 238 s against 217 and 218 s, in turn.
# A per-worker timeline (2026-12-03, the same host, a 201 s run) shows the two workers
# equally busy: collection ends at 10 s, and each worker is busy 182 s with 0.2 s of
# gaps. The last 8 s are the workers' exit, while the controller waits. That is pytest's
# last gc pass, then JAX's atexit `clear_backends` freeing ~2,000 compiled programs.
# Skipping it would mean `os._exit` in the workers; that was not done.
# A mixup or cutmix train step compiles in ~2.4 s against a plain step's 0.9 s (cnn_small,
# 32 px, these flags): `jax.random.beta` is two gamma rejection loops (1.2 s alone); kept,
# as another sampler would change every recorded run's random draws.
# `--xla_cpu_opt_preset=FAST_COMPILE` changed nothing
# on top of these flags (the transfer smoke test's compiles 5.2, 5.9 -> 5.4, 5.5 s).
# `-O1` instead of `-O0` runs elementwise code ~5x faster but compiles slower: on an
# AVX2-only host, alternating whole suites, 190 and 207 s against 178 and 175 s.
# And LLVM codegen in one piece: XLA:CPU splits each program's LLVM module to compile the
# parts on a thread pool, which on 2 cores that both already run a worker is pure overhead
# (train steps of resnet10 / cnn_small / resnet20 compile in 1.05 / 0.36 / 1.3 s instead of
# 1.25 / 0.48 / 1.65 s; the transfer and cats_dogs smoke tests' XLA compiles 25.1 -> 17.5 s;
# whole suites alternating in a slow hour, split in 32 (XLA's default) / in one piece:
# 377 / 301 s and 350 / 289 s; benchmarks/bench_compile.py).
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ["XLA_FLAGS"] = runs.with_xla_flags(
        [runs.YNN_CONV_OFF, *runs.FAST_COMPILE, runs.ONE_EIGEN_THREAD, runs.ONE_PIECE_CODEGEN]
    )
# The suite is compile-bound (117 of 189 s, serially, are XLA compilations), and
# JAX's default partitionable threefry makes every model init compile 2.3x slower on CPU
# (cnn_small: 1.41 s vs 0.61 s): the classic threefry cuts the suite's CPU time by a
# quarter (4m43s -> 3m36s). Only the random bits differ; nothing tested depends on them:
# the suite passes under JAX's default too (`JAX_THREEFRY_PARTITIONABLE=1 ./test.sh`).
# Set in the environment, so the subprocess tests (8 devices, 2 processes) inherit it.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# One on-disk compilation cache for the run: the xdist workers and the subprocess tests
# (which inherit the environment) compile many of the same programs, and each one
# compiled by one process is read by the others instead. Programs that compile in under
# 0.2 s are not worth a file. A fresh folder per run (removed at its end), so CI's runs
# measure what a clean clone compiles.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JIT_CACHE = tempfile.mkdtemp(prefix="jaxlearn-tests-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JIT_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
    _JIT_CACHE = None


# The longest tests (5-22 s each: the experiments' smoke runs and the tests that start
# processes) run first, so that on xdist's two workers the many short ones fill in around
# them instead of one long test ending the run on a single worker.
_LONG_FIRST = (
    "test_experiments_",
    "test_sigkill",
    "two_processes",
    "fresh_process",
    "eight_devices",
    "worker_processes",
)


def pytest_collection_modifyitems(session, config, items):
    """Put the long tests first (a stable sort: the order within each group is kept)."""
    items.sort(key=lambda item: not any(part in item.nodeid for part in _LONG_FIRST))


def pytest_sessionfinish(session):
    """Remove the run's compilation cache (in the process that made it, not a worker)."""
    if _JIT_CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_JIT_CACHE, ignore_errors=True)


# Property tests compile JAX functions: the first example is slow, so no deadline.
# On CI (CI=true) the examples are derandomized, so a red run replays the same way.
settings.register_profile(
    "jaxlearn",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("jaxlearn")

REPO = Path(__file__).resolve().parents[1]
# The experiment scripts import their siblings (as when run as scripts): tests import
# them as modules the same way.
sys.path.insert(0, str(REPO / "experiments"))


def write_color_folder(root, names=("cats", "dogs"), per_class=8, seed=0, ext="png"):
    """One sub-folder per class name of 36x40 images that colour alone separates.

    Class 0 is reddish and class 1 bluish (noise plus 120 in one channel), so even a
    briefly trained model must beat chance; 36x40 is not square, so loaders crop.
    `ext` may be a tuple of extensions, used in turn.
    """
    rng = np.random.default_rng(seed)
    exts = (ext,) if isinstance(ext, str) else tuple(ext)
    for name, channel in zip(names, (0, 2), strict=True):
        (Path(root) / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (36, 40, 3)).astype(np.uint8)
            pixels[..., channel] += 120
            Image.fromarray(pixels).save(Path(root) / name / f"{i}.{exts[i % len(exts)]}")


def write_cats_dogs(tmp_path, monkeypatch, per_class: int, held_per_class: int) -> Path:
    """The experiments' cats-and-dogs layout under `tmp_path`, with a private cache.

    `data/cats_and_dogs/train/{cats,dogs}` (per_class images each) for `--data`, and
    `held/validation/{cats,dogs}` (held_per_class each) for `--eval-dir`.
    """
    monkeypatch.setenv("JAXLEARN_CACHE", str(tmp_path / "cache"))
    write_color_folder(tmp_path / "data" / "cats_and_dogs" / "train", per_class=per_class, seed=0)
    write_color_folder(tmp_path / "held" / "validation", per_class=held_per_class, seed=1)
    return tmp_path


def readme_code(section: str) -> str:
    """The one python block of the README's section under the heading `## {section}`."""
    text = (REPO / "README.md").read_text().split(f"## {section}")[1].split("## ")[0]
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    return code


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets (../shared/data or $JAXLEARN_DATA); skip when absent."""
    path = Path(os.environ.get("JAXLEARN_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set JAXLEARN_DATA)")
    return path


@contextlib.contextmanager
def count_compilations():
    """Count XLA compilations (JAX's backend-compile events) inside the block.

    Yields a list that gets one entry per compilation: the assertions of the
    compile-once tests are on `len()` of it after the block. A program another test
    process compiled first comes from the run's compilation cache instead: that counts
    too (jit had to produce it).
    """
    import jax

    events: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/cache_retrieval_time_sec",
        ):
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
