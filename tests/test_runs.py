"""Run records: results.json content and the data-folder precedence."""

import json
import os
import time

import numpy as np
import pytest

from jaxlearn import runs
from jaxlearn.runs import data_root, summarize, write_results


def test_write_results_records_everything(tmp_path, monkeypatch):
    # A real flag: XLA aborts the process on unknown ones.
    flags = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    monkeypatch.setenv("XLA_FLAGS", flags)
    started = time.time() - 2.0
    path = write_results(
        tmp_path / "run",
        config={"quick": True, "data": tmp_path},
        metrics={
            "acc": np.float32(0.5),
            "curve": np.arange(3),
            "bad": float("nan"),
            "np_bad": np.float32("inf"),
            "bad_curve": np.array([0.5, np.nan]),
        },
        seeds=list(np.arange(2)),
        started=started,
    )
    record = json.loads(path.read_text())
    assert record["config"] == {"quick": True, "data": str(tmp_path)}
    assert record["metrics"]["acc"] == 0.5
    assert record["metrics"]["curve"] == [0, 1, 2]
    assert record["metrics"]["bad"] == "nan"  # JSON has no NaN: strict parsers read it
    assert record["metrics"]["np_bad"] == "inf" and record["metrics"]["bad_curve"] == [0.5, "nan"]
    assert record["seeds"] == [0, 1]
    assert record["wall_time_s"] >= 2.0
    env = record["environment"]
    assert env["versions"]["jax"] and env["devices"] and env["cpu_count"]
    assert env["xla_flags"] == flags
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_data_root_precedence(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("JAXLEARN_DATA", str(b))
    assert data_root(a) == a
    assert data_root() == b
    monkeypatch.setenv("JAXLEARN_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"missing.*JAXLEARN_DATA"):
        data_root()


def test_experiment_parser_shared_flags(monkeypatch):
    from jaxlearn.runs import experiment_parser

    calls = []
    monkeypatch.setattr(runs, "compile_fast_when_quick", lambda q: calls.append(("fast", q)))
    monkeypatch.setattr(runs, "cache_compilations_when_quick", lambda q: calls.append(("cache", q)))
    parser = experiment_parser("x", default_out="runs/x")
    args = parser.parse_args(["--quick", "--seeds", "3"])
    assert args.quick and args.seeds == 3 and args.data is None
    assert args.out == "runs/x_quick"  # never over the real run's results
    assert parser.parse_args([]).out == "runs/x"
    assert parser.parse_args(["--quick", "--out", "o"]).out == "o"
    # every parse tells both whether the run is quick
    assert calls == [(f, q) for q in (True, False, True) for f in ("fast", "cache")]


@pytest.mark.parametrize("tty", [True, False])
def test_experiment_progress_bars_follow_the_terminal_unless_asked(monkeypatch, tty):
    monkeypatch.setattr(runs, "compile_fast_when_quick", lambda quick: False)
    monkeypatch.setattr(runs.sys.stderr, "isatty", lambda: tty)
    parser = runs.experiment_parser("x", default_out="runs/x")
    assert parser.parse_args([]).progress is tty  # a nohup log gets no bar redraws
    assert parser.parse_args(["--progress"]).progress is True
    assert parser.parse_args(["--no-progress"]).progress is False


def test_summarize_gives_the_statistics_of_per_seed_results():
    s = summarize([0.9, 0.7, 0.8, 1.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (pytest.approx(0.85), 0.7, 1.0, 4)
    assert (s["q1"], s["q3"]) == (pytest.approx(0.775), pytest.approx(0.925))
    assert s["mean"] == pytest.approx(0.85) and s["std"] == pytest.approx(
        np.std([9, 7, 8, 10], ddof=1) / 10
    )
    assert s["values"] == [0.9, 0.7, 0.8, 1.0] and summarize([0.5])["std"] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        summarize([])


class _Config:
    """A stand-in for jax.config: records updates instead of changing this process's jax."""

    def __init__(self, cache_dir):
        self.jax_compilation_cache_dir, self.updates = cache_dir, {}

    def update(self, name, value):
        self.updates[name] = value
        setattr(self, name, value)


def test_quick_runs_keep_compiled_programs_in_the_cache_folder_unless_the_user_chose(
    monkeypatch, tmp_path
):
    import jax

    real = jax.config
    jax.devices()  # this process's backend is up: too late to choose a cache folder
    assert runs._jax_backend_started()
    assert runs.cache_compilations_when_quick(True) is None
    monkeypatch.setattr(runs, "_jax_backend_started", lambda: False)  # as in a fresh script
    monkeypatch.setenv("JAXLEARN_CACHE", str(tmp_path))
    fresh = _Config(None)
    monkeypatch.setattr(jax, "config", fresh)
    assert runs.cache_compilations_when_quick(False) is None and not fresh.updates
    assert runs.cache_compilations_when_quick(True) == tmp_path / "xla"
    assert fresh.updates == {
        "jax_compilation_cache_dir": str(tmp_path / "xla"),
        "jax_compilation_cache_max_size": runs.QUICK_COMPILE_CACHE_BYTES,
        "jax_persistent_cache_min_compile_time_secs": 0.0,  # -O0 programs take < 1 s
    }
    for name in fresh.updates:  # options this jax has
        getattr(real, name)
    chosen = _Config(str(tmp_path / "mine"))  # JAX_COMPILATION_CACHE_DIR: used as set
    monkeypatch.setattr(jax, "config", chosen)
    assert runs.cache_compilations_when_quick(True) == tmp_path / "mine" and not chosen.updates


def test_with_xla_flags_adds_only_flags_this_jaxlib_defines_and_the_user_did_not_set():
    unknown = "--xla_cpu_no_such_flag_in_any_jaxlib=true"  # XLA would abort on it
    assert runs.jaxlib_knows_flag(runs.YNN_CONV_OFF) and not runs.jaxlib_knows_flag(unknown)
    device_count = "--xla_force_host_platform_device_count=8"
    both = runs.with_xla_flags([runs.YNN_CONV_OFF, unknown], device_count)
    assert both == f"{device_count} {runs.YNN_CONV_OFF}"
    own = "--xla_cpu_experimental_ynn_fusion_type="  # the user's own value stays
    assert runs.with_xla_flags([runs.YNN_CONV_OFF], own) == own


def test_quick_runs_compile_fast_only_before_jax_starts_and_only_on_the_cpu(monkeypatch):
    import jax
    from jax._src import xla_bridge

    jax.devices()  # this process's backend is up: XLA has read its flags
    # jax's internal answer, which the function relies on (without it: never fast)
    assert hasattr(xla_bridge, "backends_are_initialized") and runs._jax_backend_started()
    user = "--xla_backend_optimization_level=2"  # the user's own value stays
    monkeypatch.setenv("XLA_FLAGS", user)
    assert not runs.compile_fast_when_quick(True)  # too late: nothing changes
    monkeypatch.setattr(runs, "_jax_backend_started", lambda: False)  # as in a fresh script
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not runs.compile_fast_when_quick(True)  # -O0 would slow a GPU's kernels
    assert not runs.compile_fast_when_quick(False)
    assert os.environ["XLA_FLAGS"] == user
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert runs.compile_fast_when_quick(True)
    assert os.environ["XLA_FLAGS"] == f"{user} --xla_cpu_use_fusion_emitters=false"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert runs.compile_fast_when_quick(True)
    assert os.environ["XLA_FLAGS"].split() == list(runs.FAST_COMPILE)
