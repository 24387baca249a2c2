"""Carving a validation set and taking subsets: disjoint, stratified, deterministic per seed."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxlearn.data import ImageArrays, carve, carve_indices, subset


def _data(labels) -> ImageArrays:
    labels = np.asarray(labels)
    # Each image holds its own index, so that we can tell which examples went where.
    images = (np.arange(len(labels)) % 256).astype(np.uint8).reshape(-1, 1, 1, 1)
    return ImageArrays(images, labels, tuple(str(c) for c in range(labels.max() + 1)))


labels_st = st.lists(st.integers(0, 4), min_size=1, max_size=200).map(np.array)


@given(labels=labels_st, fraction=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_carve_is_disjoint_complete_and_stratified(labels, fraction, seed):
    n = max(1, round(fraction * len(labels)))
    picked, rest = carve_indices(labels, n, seed=seed)
    assert len(picked) == n
    assert np.intersect1d(picked, rest).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([picked, rest])), np.arange(len(labels)))
    counts = np.bincount(labels, minlength=5)
    share = np.bincount(labels[picked], minlength=5)
    # Each class within one example of its proportional share.
    assert np.all(np.abs(share - counts * n / len(labels)) < 1)


def test_carve_is_a_pure_function_of_the_seed():
    labels = np.repeat([0, 1], [999, 1000])
    first = carve_indices(labels, 650, seed=3)
    again = carve_indices(labels, 650, seed=3)
    other = carve_indices(labels, 650, seed=4)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_carve_650_of_cats_and_dogs():
    data = _data(np.repeat([0, 1], [999, 1000]))
    train, valid = carve(data, 650, seed=0)
    assert (len(train), len(valid)) == (650, 1349)
    assert np.bincount(train.labels).tolist() == [325, 325]
    assert train.class_names == data.class_names == valid.class_names


def test_images_travel_with_their_labels():
    labels = np.random.default_rng(0).integers(0, 3, 200)
    data = _data(labels)
    train, valid = carve(data, 0.25, seed=1)
    for part in (train, valid):
        np.testing.assert_array_equal(part.labels, labels[part.images[:, 0, 0, 0]])
    assert len(train) == 50


def test_take_reads_indices_and_boolean_masks_as_numpy_does():
    labels = np.array([0, 1, 1, 0, 1, 0])
    data = _data(labels)
    np.testing.assert_array_equal(data.take([4, 0, -1]).images[:, 0, 0, 0], [4, 0, 5])
    mask = labels == 1
    np.testing.assert_array_equal(data.take(mask).images[:, 0, 0, 0], [1, 2, 4])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        data.take(mask[:4])
    with pytest.raises(ValueError, match="integers or a boolean mask"):
        data.take([0.0, 1.0])


def test_subset_by_count_and_fraction():
    data = _data(np.arange(100) % 4)
    assert len(subset(data, 10, seed=0)) == 10
    assert len(subset(data, 0.3, seed=0)) == 30
    assert len(subset(data, 1.0, seed=0)) == 100
    np.testing.assert_array_equal(subset(data, 10, seed=5).images, subset(data, 10, seed=5).images)


@pytest.mark.parametrize("n", [0, 101, 0.0, 1.5, -0.1, True, "10"])
def test_bad_counts_are_value_errors(n):
    with pytest.raises(ValueError, match=r"^n (must|as a fraction)"):
        carve(_data(np.arange(100) % 4), n, seed=0)
