"""Interpretation figures: the most confidently wrong images, the confusion matrix."""

import numpy as np
import pytest
from PIL import Image

from jaxlearn.plots import plot_confusion_matrix, plot_top_losses, top_losses


def test_top_losses_are_the_least_probable_true_classes_worst_first():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.01, 0.99]])
    order, losses = top_losses(labels, probs, k=3)
    assert order.tolist() == [3, 1, 2]
    np.testing.assert_allclose(losses, -np.log([0.01, 0.2, 0.6]))
    with pytest.raises(ValueError, match="labels"):
        top_losses(labels[:3], probs, k=2)


def test_top_losses_rank_confident_mistakes_by_their_loss():
    # float32 softmax of logit gaps 30, 90, 60: p(true) = 9e-14, 8e-40 (subnormal), 9e-27
    logits = np.array([[0.0, 30.0], [0.0, 90.0], [0.0, 60.0]], np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order, losses = top_losses(np.zeros(3, int), probs, k=3)
    assert order.tolist() == [1, 2, 0]
    np.testing.assert_allclose(losses, [90, 60, 30], rtol=1e-3)


def test_plot_top_losses_titles_predicted_and_actual(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0])
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [0.6, 0.4]])
    fig = plot_top_losses(images, labels, probs, ("cats", "dogs"), k=2, path=tmp_path / "t.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("dogs / cats\n1.61 / 0.20")  # image 2: p(cats) 0.2
    assert titles[1].startswith("cats / dogs\n1.20 / 0.30")  # image 1
    with Image.open(tmp_path / "t.png") as png:
        assert png.format == "PNG"
    with pytest.raises(ValueError, match="classes"):
        plot_top_losses(images, labels, probs, ("cats",))


def test_confusion_matrix_counts_each_pair(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 2, 0])
    fig = plot_confusion_matrix(labels, predictions, ("a", "b", "c"), path=tmp_path / "c.png")
    counts = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    with pytest.raises(ValueError, match="classes"):
        plot_confusion_matrix(labels, predictions + 1, ("a", "b", "c"))
