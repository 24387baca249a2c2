"""Smoke test of experiments/cats_dogs_scratch.py on tiny image folders written here."""

import json

import cats_dogs_scratch as cats_dogs
import numpy as np
import pytest
from conftest import write_cats_dogs
from PIL import Image


@pytest.fixture
def data(tmp_path, monkeypatch):
    return write_cats_dogs(tmp_path, monkeypatch, per_class=30, held_per_class=8)


def test_quick_ablation_reports_on_the_eval_dir(data):
    out = data / "out"
    argv = ["--quick", "--data", str(data / "data"), "--out", str(out),
            "--eval-dir", str(data / "held" / "validation"), "--n-train", "32"]  # fmt: skip
    cats_dogs.main(argv)
    record = json.loads((out / "results.json").read_text())
    metrics = record["metrics"]
    assert metrics["reported_on"] == "eval_dir" and metrics["report_size"] == 16
    assert record["config"]["split_sizes"] == [32, 28]  # stratified: 16 + 16 for training
    assert metrics["majority_class_accuracy"] == 0.5  # a 16-16 tie goes to class 0
    seeds = cats_dogs.QUICK["seeds"]
    ablation = metrics["ablation"]
    assert list(ablation) == ["baseline", "+tta", "+augmentation", "+both"]
    for row in ablation.values():
        assert len(row["values"]) == seeds and all(0 <= v <= 1 for v in row["values"])
        assert row["mean"] == pytest.approx(np.mean(row["values"]))
    # Each row of the table comes from the eval-dir scores of its arm, not the validation ones.
    per_seed = metrics["per_seed"]
    assert ablation["+both"]["values"] == [r["eval_dir_tta"] for r in per_seed["augment"]]
    assert ablation["baseline"]["values"] == [r["eval_dir_plain"] for r in per_seed["plain"]]
    # Colour alone separates the classes: augmentation-free training must learn it.
    assert np.mean(ablation["baseline"]["values"]) > 0.75
    for arm in ("plain", "augment"):
        assert (out / f"history_{arm}.png").stat().st_size > 1000


def test_eval_dir_with_a_foreign_class_is_rejected(data):
    (data / "held" / "validation" / "horses").mkdir()
    Image.new("RGB", (8, 8)).save(data / "held" / "validation" / "horses" / "0.png")
    with pytest.raises(ValueError, match="horses"):
        cats_dogs.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"),
                        "--eval-dir", str(data / "held" / "validation")])  # fmt: skip


def test_missing_eval_dir_is_a_file_not_found(data):
    with pytest.raises(FileNotFoundError, match="eval-dir"):
        cats_dogs.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"),
                        "--eval-dir", str(data / "nowhere")])  # fmt: skip


@pytest.mark.parametrize("flag", [["--size", "8"], ["--epochs", "0"], ["--seeds", "0"]])
def test_bad_size_epochs_or_seeds_are_rejected_before_any_work(data, flag):
    with pytest.raises(ValueError, match=f"{flag[0]} must be >= "):
        cats_dogs.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"), *flag])
    assert not (data / "o").exists()
