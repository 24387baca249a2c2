"""benchmarks/gpu_check.py at tiny size: every section's record, and failures kept as data."""

import dataclasses
import json
import subprocess
import sys
import tempfile
import time

import jax
import pytest
from conftest import REPO, write_color_folder

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check

PLANTED_TESTS = """
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "planted failure"

@pytest.mark.skip(reason="planted skip")
def test_skipped():
    pass
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> gpu_check.Config:
    """The smoke config shrunk to MLPs on random data, and planted tests to run."""
    monkeypatch.setenv("JAXLEARN_DATA", str(tmp_path / "no_data"))  # random MNIST-shaped data
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_planted.py").write_text(PLANTED_TESTS)
    (suite / "test_needs_absent.py").write_text("import no_such_package_here\n")
    return dataclasses.replace(
        gpu_check.SMOKE,
        budget_s=60,
        cases=(gpu_check.Case("mlp_8px_b4", "mlp", 8, 4, 2, steps=2),),
        ensemble={"model_name": "mlp", "members": 2, "num_images": 8, "batch_size": 8,
                  "repeats": 1},
        multiseed={"num_models": 2, "num_images": 32, "batch_size": 32, "repeats": 1},
        pytest_args=(str(suite),),
        probe_flags=False,
        race=gpu_check.Race("mlp", 24, 8, 8, threshold=0.5, max_epochs=2, seeds_per_round=2,
                            max_seeds=2),
        pack=str(tmp_path / "pack.npz"),
    )  # fmt: skip


def write_pack(tmp_path, monkeypatch) -> None:
    """A colour-coded 2-class image folder packed where `tiny` looks, unpacked under tmp_path."""
    monkeypatch.setenv("JAXLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    write_color_folder(tmp_path / "folder" / "train", per_class=16, seed=0)
    write_color_folder(tmp_path / "folder" / "test", per_class=4, seed=1)
    packed = gpu_check.pack_cifar(tmp_path / "folder", tmp_path / "pack.npz")
    assert packed["images"] == 40


def run(name: str, config: gpu_check.Config, work) -> dict:
    """One section in this process, as the driver's child runs it; the result it wrote, if ok."""
    gpu_check.run_section(name, config, work, deadline=time.time() + 60)
    record = json.loads((work / f"{name}.json").read_text())
    assert record["status"] == "ok", record.get("error")
    return record["result"]


def test_env_and_throughput_sections_record_sane_values(tiny, tmp_path):
    env = run("env", tiny, tmp_path)
    assert env["backend"] == jax.default_backend() and env["devices"] and env["versions"]["jax"]
    assert env["jaxlearn_modules"] == {}  # every module imports
    assert "no_such_package" not in env["missing_optional"]
    cases = run("throughput", tiny, tmp_path)["cases"]
    assert list(cases) == ["mlp_8px_b4_bfloat16", "mlp_8px_b4_float32"]
    for speed in cases.values():
        assert speed["images_per_s"]["bare"] > 0 and speed["ratio_fit"] > 0
        assert speed["flops_per_image"] > 0 and 0 < speed["fraction_of_bf16_peak"] < 1


def test_race_section_trains_both_arms_together_on_the_pack(tiny, tmp_path, monkeypatch):
    write_pack(tmp_path, monkeypatch)
    race = run("race", tiny, tmp_path)
    assert race["data"]["train_pixels_match"] and race["sizes"]["train"] == 24
    assert race["rounds"] == 1 and race["seeds_per_round"] == 2
    for arm, summary in race["arms"].items():
        assert summary["seeds"] == 2 and summary["censored"] == []
        assert all(e in (None, 1, 2) for e in summary["epochs_to_threshold"])
        assert summary["reference_median"] == gpu_check.RACE_REFERENCE[arm]
        assert all(len(r["valid_accuracy"]) in (1, 2) for r in race["runs"][arm])


def test_a_failing_section_is_recorded_with_what_it_measured(tiny, tmp_path):
    bad = gpu_check.Case("bad", "no_such_model", 8, 4, 2, steps=2)
    broken = dataclasses.replace(tiny, cases=(*tiny.cases, bad), dtypes=("float32",))
    record = gpu_check.run_section("throughput", broken, tmp_path, deadline=time.time() + 60)
    assert record["status"] == "error" and "no_such_model" in record["error"]
    assert list(record["result"]["cases"]) == ["mlp_8px_b4_float32"]  # measured before it broke
    assert json.loads((tmp_path / "throughput.json").read_text()) == record


def test_the_driver_runs_the_tests_in_a_process_and_merges_the_record(tiny, tmp_path):
    out = tmp_path / "out"
    record = gpu_check.drive(tiny, ["tests"], out)
    assert json.loads((out / "gpu_check.json").read_text()) == json.loads(json.dumps(record))
    assert (out / "gpu_check.log").read_text().startswith("==== tests ====")
    tests = record["sections"]["tests"]
    assert tests["status"] == "ok", tests
    result = tests["result"]
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1,
                                "xfailed": 0, "xpassed": 0}  # fmt: skip
    [failure] = result["failures"]
    assert failure["nodeid"].endswith("test_fails") and "planted failure" in failure["message"]
    assert list(result["ignored"].values()) == [["no_such_package_here"]]


def test_a_killed_or_overdue_section_keeps_what_it_reported():
    running = {"status": "running", "seconds": 5, "result": {"cases": {"a": 1}}}
    overdue = gpu_check.section_record(running, None, True, ["last line"])
    assert overdue["status"] == "timeout" and overdue["result"] == {"cases": {"a": 1}}
    died = gpu_check.section_record(running, -9, False, ["Fatal Python error"])
    assert died["status"] == "crashed" and died["log_tail"] == ["Fatal Python error"]
    silent = gpu_check.section_record({}, 134, False, ["Unknown flags in XLA_FLAGS"])
    assert silent["status"] == "crashed" and silent["returncode"] == 134
    ok = gpu_check.section_record({"status": "ok", "result": {}}, 0, False, ["noise"])
    assert ok == {"status": "ok", "result": {}}


def test_run_until_kills_the_whole_process_group_at_the_deadline():
    started = time.time()
    code = "import subprocess, time; subprocess.Popen(['sleep', '31.7']); time.sleep(30)"
    returncode = gpu_check.run_until([sys.executable, "-c", code], time.time() + 0.5)
    assert returncode is None and time.time() - started < 10
    left = subprocess.run(["pgrep", "-f", "sleep 31.7"], capture_output=True, text=True).stdout
    assert not left.strip(), "the grandchild outlived the deadline"


def test_race_summary_ranks_unreached_last_and_leaves_censored_seeds_out():
    race = gpu_check.Race("resnet20", 1, 1, 1, threshold=0.85, max_epochs=3, seeds_per_round=0,
                          max_seeds=4)  # fmt: skip
    runs = {"constant": [
        {"seed": 0, "valid_accuracy": [0.5, 0.86]},  # reached at epoch 2
        {"seed": 1, "valid_accuracy": [0.5, 0.6, 0.7]},  # never within max_epochs: last
        {"seed": 2, "valid_accuracy": [0.9]},  # epoch 1
        {"seed": 3, "valid_accuracy": [0.5]},  # stopped by the deadline after 1 epoch
    ], "sgdr_every_epoch": [{"seed": 0, "valid_accuracy": [0.1, 0.2, 0.3]}]}  # fmt: skip
    arms = gpu_check.race_summary(runs, race)["arms"]
    constant = arms["constant"]
    assert constant["epochs_to_threshold"] == [2, None, 1]
    assert constant["median"] == 2 and constant["seeds"] == 3
    assert constant["censored"] == [{"seed": 3, "epochs_run": 1}]
    assert arms["sgdr_every_epoch"]["median"] is None  # the median seed never got there


def test_seeds_that_fit_follow_the_measured_speed():
    assert gpu_check.seeds_that_fit(None, 300, 2, 45000) == 1
    slow, fast = (gpu_check.seeds_that_fit(s, 240, 2, 45000) for s in (20_000, 200_000))
    assert slow == 1 and fast > 2 * slow
