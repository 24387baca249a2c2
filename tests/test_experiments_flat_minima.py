"""Smoke test of experiments/flat_minima.py on tiny MNIST idx files, and its rank correlation."""

import gzip
import json

import flat_minima
import numpy as np
import pytest
from scipy.stats import spearmanr


def _write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.asarray(array, np.uint8).tobytes())


def _fake_mnist(root, n_train=1300, n_test=300):
    """Digits a linear model can tell apart: class c lights up row band c, plus noise."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 6, 4:24] = 255
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)


def test_quick_mode_writes_results_and_plots(tmp_path):
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    _fake_mnist(tmp_path / "data" / "mnist")
    out = tmp_path / "out"
    metrics = flat_minima.main(["--quick", "--data", str(tmp_path / "data"), "--out", str(out)])
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["quick"] and record["config"]["split_sizes"] == [800, 500, 300]
    n = flat_minima.QUICK["models"]
    per_model = record["metrics"]["per_model"]
    assert len(per_model["test_loss"]) == n and set(per_model["batch_size"]) == {32, 128}
    gaps = np.array(per_model["test_loss"]) - np.array(per_model["train_loss"])
    assert np.allclose(gaps.mean(), metrics["gap_test"]["mean"])
    # The bands are linearly separable: the linear baseline must beat the majority class.
    base = record["metrics"]["baselines"]
    assert base["linear_test_accuracy"] > base["majority_test_accuracy"] + 0.3
    # Near a minimum the loss rises with the step size (about quadratically).
    rises = [np.mean(per_model[f"sharpness_r{r}"]) for r in flat_minima.RADII]
    assert 0 < rises[0] < rises[1] < rises[2]
    head = record["metrics"]["headline"]
    assert head["radius"] in flat_minima.RADII
    assert -1 <= head["ci95"][0] <= head["ci95"][1] <= 1
    for r in flat_minima.RADII:
        assert (out / f"sharpness_r{r}.png").stat().st_size > 1000


def test_rank_correlation_matches_scipy_and_brackets_it():
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    got = flat_minima.rank_correlation(x, y, boot=500)
    assert got["spearman"] == pytest.approx(spearmanr(x, y).statistic)
    assert got["ci95"][0] < got["spearman"] < got["ci95"][1]
    assert 0.1 < got["ci95"][1] - got["ci95"][0] < 0.6  # ~4 standard errors of rho at n=60
    exact = flat_minima.rank_correlation(x, -(x**3), boot=100)  # a monotone decreasing map
    assert exact["spearman"] == pytest.approx(-1.0) and exact["ci95"] == pytest.approx([-1, -1])


def test_too_few_models_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--seeds"):
        flat_minima.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
