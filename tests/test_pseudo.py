"""Pseudo-labels: confident rows only, balanced per class, and a pool that never brings labels."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jaxlearn.data.arrays import ImageArrays
from jaxlearn.pseudo import PseudoLabels, select_confident, with_pseudo_labels


def _probs(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@given(
    arrays(np.float64, st.tuples(st.integers(0, 40), st.integers(2, 4)), elements=st.floats(-6, 6)),
    st.floats(0.5, 1.0),
)
def test_kept_rows_are_the_confident_ones_balanced_by_their_most_confident(logits, threshold):
    probs = _probs(logits)
    num_classes = probs.shape[1]
    threshold = max(threshold, 1 / num_classes)
    confident = np.flatnonzero(probs.max(1) >= threshold)
    free = select_confident(probs, threshold, balance=False)
    np.testing.assert_array_equal(free.index, confident)
    np.testing.assert_array_equal(free.label, probs.argmax(1)[confident])
    np.testing.assert_allclose(free.confidence, probs.max(1)[confident], rtol=1e-6)

    chosen = select_confident(probs, threshold)
    assert set(chosen.index) <= set(confident) and np.all(np.diff(chosen.index) > 0)
    counts = np.bincount(chosen.label, minlength=num_classes)
    least = np.bincount(free.label, minlength=num_classes).min()
    assert np.all(counts == least)
    for c in range(num_classes):  # nothing left out of a class beats what it kept
        kept = probs[chosen.index[chosen.label == c], c]
        dropped = np.setdiff1d(free.index[free.label == c], chosen.index)
        if kept.size and dropped.size:
            assert probs[dropped, c].max() <= kept.min()


def test_the_student_set_is_labelled_then_chosen_pool_images_with_the_teachers_labels():
    rng = np.random.default_rng(0)
    labelled = ImageArrays(rng.integers(0, 255, (4, 8, 8, 3), np.uint8), [0, 1, 0, 1], ("a", "b"))
    pool = ImageArrays(rng.integers(0, 255, (5, 8, 8, 3), np.uint8), [0, 0, 0, 0, 0], ("a", "b"))
    chosen = PseudoLabels(np.array([1, 3]), np.array([1, 1], np.int32), np.array([0.9, 0.8]))
    student = with_pseudo_labels(labelled, pool.images, chosen)
    assert student.class_names == ("a", "b") and len(student) == 6
    np.testing.assert_array_equal(student.images[4:], pool.images[[1, 3]])
    np.testing.assert_array_equal(student.labels, [0, 1, 0, 1, 1, 1])  # the teacher's, not 0
    with pytest.raises(ValueError, match="images only"):
        with_pseudo_labels(labelled, pool, chosen)
    with pytest.raises(ValueError, match="like the labelled"):
        with_pseudo_labels(labelled, pool.images[:, :4], chosen)
    with pytest.raises(ValueError, match="indices"):
        with_pseudo_labels(labelled, pool.images, chosen._replace(index=np.array([1, 5])))


def test_bad_probabilities_and_thresholds_are_refused():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    with pytest.raises(ValueError, match="shape"):
        select_confident(probs[:, :1], 0.9)
    with pytest.raises(ValueError, match="probability rows"):
        select_confident(np.array([[2.0, -1.0]]), 0.9)  # logits, not probabilities
    for threshold in (0.4, 1.1):
        with pytest.raises(ValueError, match="threshold"):
            select_confident(probs, threshold)
    none = select_confident(probs, 0.9)
    assert none.index.shape == (0,) and none.label.dtype == np.int32
