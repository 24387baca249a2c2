"""Smoke tests of the CIFAR experiments (cifar_quickstart, snapshot_ensembles, cosine_annealing).

Each script's `main()` runs in quick mode on a tiny image folder written here: three
classes of flat-coloured 32 px images (plus noise), which a small MLP separates in a
few steps, so the tests check what the scripts compute, not only that they finish.
"""

import json
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

sys.path.insert(0, str(REPO / "experiments"))

import cifar
import cifar_quickstart
import cosine_annealing
import snapshot_ensembles

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
PER_CLASS = {"train": 48, "test": 12}
# 144 training images: 48 carved off for validation, 96 left = 3 steps of 32.
SIZES = ["--train-size", "96", "--valid-size", "48", "--test-size", "36"]
FAST = ["--quick", "--model", "mlp", *SIZES]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/{train,test}/{red,green,blue}/*.png, 32 x 32, colour plus uniform noise."""
    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (32, 32, 3))
                pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLEARN_CACHE", str(tmp_path / "cache"))


def _args(folder):
    parser = cifar.argparse.ArgumentParser()
    parser.add_argument("--data")
    cifar.add_data_flags(parser)
    return parser.parse_args(["--folder", str(folder)])


def test_load_splits_carves_disjoint_stratified_sets(folder):
    splits = cifar.load_splits(_args(folder), train_size=60, valid_size=30, test_size=None)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (60, 30, 36)
    for part in (splits.train, splits.valid):
        assert np.bincount(part.labels).tolist() == [len(part) // 3] * 3  # stratified
    # No training image is also a validation image (the noise makes every image unique).
    train = {im.tobytes() for im in splits.train.images}
    assert not train & {im.tobytes() for im in splits.valid.images}
    # The validation set does not depend on the training budget.
    again = cifar.load_splits(_args(folder), train_size=90, valid_size=30, test_size=None)
    np.testing.assert_array_equal(again.valid.images, splits.valid.images)
    np.testing.assert_allclose(splits.mean, splits.train.images.mean((0, 1, 2)) / 255, atol=1e-5)


def test_load_splits_rejects_too_large_a_budget(folder):
    with pytest.raises(ValueError, match="exceeds"):
        cifar.load_splits(_args(folder), train_size=140, valid_size=30, test_size=None)


def test_build_model_any_cifar_depth():
    assert cifar.build_model("resnet8", 10).depth == 8
    assert cifar.build_model("resnet20", 10).depth == 20
    with pytest.raises(ValueError, match="depth"):
        cifar.build_model("resnet9", 10)


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_cifar_quickstart_runs_finder_sgdr_and_ensemble(folder, tmp_path):
    out = tmp_path / "qs"
    argv = [*FAST, "--folder", str(folder), "--out", str(out), "--seeds", "2"]
    metrics = cifar_quickstart.main(argv)
    record = _results(out)
    for png in ("lr_find.png", "history.png", "schedule.png", "ensemble.png"):
        assert (out / png).stat().st_size > 0
    # The LR finder's valley drives the SGDR peak when --lr is not given.
    valley = metrics["lr_finder"]["suggestions"]["valley"]["lr"]
    assert metrics["lr_finder"]["peak_lr"] == (valley or 0.1)
    cycles = cifar_quickstart.QUICK.cycles
    assert record["config"]["snapshot_steps"] == [3 * (i + 1) for i in range(cycles)]
    for run in metrics["per_seed"]:
        test = run["test"]
        assert len(test["members"]) == len(test["ensemble"]) == cycles
        assert test["ensemble"][0] == test["members"][0]  # a 1-snapshot ensemble is itself
    single = [r["test"]["members"][-1] for r in metrics["per_seed"]]
    assert metrics["summary"]["test"]["single_final"]["mean"] == pytest.approx(np.mean(single))
    # Colours are easy: the trained models beat the majority-class baseline by far.
    assert metrics["summary"]["test"]["ensemble"]["mean"] > 0.6
    assert metrics["baseline_majority"]["test_accuracy"] == pytest.approx(1 / 3)
    assert record["seeds"] == [0, 1]


def test_snapshot_ensembles_compares_same_budget(folder, tmp_path):
    out = tmp_path / "se"
    argv = [*FAST, "--folder", str(folder), "--out", str(out), "--seeds", "1"]
    metrics = snapshot_ensembles.main(argv)
    record = _results(out)
    config = record["config"]
    assert config["epochs"] == config["cycles"] * config["cycle_epochs"]
    # The size flags are part of the recorded setup, not only of the data loaded.
    assert (config["train"], config["valid"], config["test"]) == (96, 48, 36)
    sgdr_runs, cosine_runs = metrics["per_seed"]["sgdr"], metrics["per_seed"]["cosine"]
    assert len(sgdr_runs) == len(cosine_runs) == 1
    assert all(len(r["test"]["members"]) == config["cycles"] for r in sgdr_runs)
    assert all(len(r["test"]["members"]) == 1 for r in cosine_runs)  # one cycle: one model
    by_k = metrics["summary"]["test"]["sgdr_ensemble_by_k"]
    assert by_k[-1] == pytest.approx(metrics["summary"]["test"]["sgdr_ensemble"]["mean"])
    assert (out / "ensemble.png").exists() and (out / "schedules.png").exists()


def test_cosine_annealing_race_and_long_runs(folder, tmp_path):
    out = tmp_path / "ca"
    argv = [*FAST, "--folder", str(folder), "--out", str(out), "--threshold", "0.6",
            "--seeds", "1", "--race-epochs", "3"]  # fmt: skip
    metrics = cosine_annealing.main(argv)
    race = metrics["race"]
    assert set(race) == {"constant", "sgdr_every_epoch", "one_cycle", "cosine_warmup"}
    for arm in race.values():
        (curve,) = arm["valid_accuracy_per_epoch"]
        (epochs,) = arm["epochs_to_threshold"]
        crossed = [i + 1 for i, acc in enumerate(curve) if acc >= 0.6]
        if crossed:  # the race stops at the first epoch at the bar, and counts it
            assert epochs == crossed[0] == len(curve)
        else:  # or runs out of epochs, counted as infinitely slow
            assert epochs == np.inf and len(curve) == 3
    # Three colours at 60%: the constant LR's MLP learns it within the race.
    assert race["constant"]["reached"] == 1
    long = metrics["long"]
    assert set(long) == {"sgdr_cycle_1", "sgdr_cycle_2"}
    for arm in long.values():
        for run in arm["runs"]:
            curve = arm["valid_accuracy_per_epoch"][run["seed"]]
            assert run["valid_accuracy"] == pytest.approx(max(curve))  # the best epoch is kept
            assert curve[run["best_epoch"]] == pytest.approx(max(curve))
    assert (out / "race.png").exists() and (out / "long.png").exists()


def test_cosine_annealing_race_not_reached_counts_as_infinite(folder, tmp_path):
    out = tmp_path / "ca"
    argv = [*FAST, "--folder", str(folder), "--out", str(out), "--part", "race",
            "--threshold", "1.01", "--seeds", "1", "--race-epochs", "1"]  # fmt: skip
    race = cosine_annealing.main(argv)["race"]
    assert all(arm["reached"] == 0 and arm["median"] == np.inf for arm in race.values())
    assert _results(out)["metrics"]["race"]["constant"]["median"] == "inf"


def test_plot_metric_curves_draws_one_line_per_run(tmp_path):
    from jaxlearn.plots import plot_metric_curves

    curves = {"a": [[0.1, 0.5], [0.2, 0.4, 0.9]], "b": [[0.3]]}
    fig = plot_metric_curves(curves, ylabel="acc", threshold=0.8, path=tmp_path / "c.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 + 1  # three runs and the threshold
    assert list(ax.lines[1].get_xdata()) == [1, 2, 3]  # epochs count from 1
    assert (tmp_path / "c.png").exists()
    with pytest.raises(ValueError, match="at least one run"):
        plot_metric_curves({"a": []}, ylabel="acc")
