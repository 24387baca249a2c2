"""Sources: MNIST idx files, tensorflow-datasets (mocked, no network, no TensorFlow), real data."""

import gzip
import importlib.machinery
import importlib.util
import shutil
import sys
import types
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlearn.data import (
    ImageArrays,
    hide_gpus_from_tensorflow,
    load_image_folder,
    load_mnist,
    load_tfds,
)


def _write_idx(path, array, magic, compress):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _mnist_files(root, n=5, compress=True, label_count=None):
    suffix = ".gz" if compress else ""
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    labels = np.arange(label_count or n) % 10
    _write_idx(root / f"t10k-images-idx3-ubyte{suffix}", images, 0x803, compress)
    _write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", labels, 0x801, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_idx_files_gzipped_or_not(tmp_path, compress):
    images, labels = _mnist_files(tmp_path, compress=compress)
    data = load_mnist(tmp_path, "test")
    assert data.images.shape == (5, 28, 28, 1) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[..., 0], images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.class_names == tuple("0123456789")


def test_mnist_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist(tmp_path / "nowhere", "test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "valid")
    _mnist_files(tmp_path, label_count=4)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_mnist(tmp_path, "test")
    # Labels file in the images' place: wrong magic number.
    shutil.copy(tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path, "test")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), 0x803, True)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "ab") as f:
        f.write(b"\0")  # one byte more than the header says
    with pytest.raises(ValueError, match="header says"):
        load_mnist(tmp_path, "test")


@pytest.fixture
def prepared_mock(monkeypatch):
    """tfds mocked (random examples, no files, no network) and reported as prepared."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=6):
        yield


def test_tfds_split_slice_by_name_without_tensorflow(prepared_mock):
    data = load_tfds("mnist", "train[:50%]", progress=False)
    assert isinstance(data, ImageArrays)
    assert data.images.shape == (6, 28, 28, 1) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int32 and set(data.labels.tolist()) <= set(range(10))
    assert data.class_names == tuple(str(d) for d in range(10))
    expected = tfds.data_source("mnist", split="train[:50%]")
    np.testing.assert_array_equal(data.images[3], expected[3]["image"])


def test_tfds_images_of_many_sizes_need_a_size(prepared_mock):
    with pytest.raises(ValueError, match="pass size="):
        load_tfds("cats_vs_dogs", "train", progress=False)
    data = load_tfds("cats_vs_dogs", "train", size=16, resize="squash", progress=False)
    assert data.images.shape == (6, 16, 16, 3) and data.num_classes == 2
    with pytest.raises(ValueError, match="'picture'"):
        load_tfds("cats_vs_dogs", "train", size=16, image_key="picture", progress=False)


def test_tfds_not_prepared_without_tensorflow_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r'pip install "jaxlearn\[tf\]".*network'):
        load_tfds("mnist", "train", data_dir=tmp_path, progress=False)


@pytest.fixture
def fake_tensorflow(monkeypatch):
    """A stand-in `tensorflow` module recording the devices it was told to show."""
    calls = []
    tf = types.ModuleType("tensorflow")
    tf.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
    tf.config = types.SimpleNamespace(set_visible_devices=lambda *args: calls.append(args))
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    return calls


def test_tensorflow_sees_no_gpu_before_tfds_builds_anything(fake_tensorflow, monkeypatch):
    events = fake_tensorflow  # the fake records its calls here; the builder call follows
    real_builder = tfds.builder  # the module the loader imports when it is called
    monkeypatch.setattr(
        tfds,
        "builder",
        lambda *a, **k: events.append("builder") or real_builder(*a, **k),
    )
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=2):
        load_tfds("mnist", "test", progress=False)
    assert events == [([], "GPU"), "builder"]


def test_hiding_gpus_too_late_warns(monkeypatch, fake_tensorflow):
    def refuse(*args):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    sys.modules["tensorflow"].config.set_visible_devices = refuse
    with pytest.warns(UserWarning, match="already initialised"):
        hide_gpus_from_tensorflow()


def test_real_folders_and_mnist(shared_data, tmp_path):
    """20 real JPEGs from cats_and_dogs (copied to tmp_path) and the real MNIST idx files."""
    for name in ("cats", "dogs"):
        target = tmp_path / "train" / name
        target.mkdir(parents=True)
        for path in sorted((shared_data / "cats_and_dogs" / "train" / name).iterdir())[:10]:
            shutil.copy(path, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all real files are good: no warning
        pets = load_image_folder(tmp_path, "train", 32, cache=False, progress=False)
    assert pets.images.shape == (20, 32, 32, 3) and pets.class_names == ("cats", "dogs")
    assert np.bincount(pets.labels).tolist() == [10, 10]
    assert 30 < pets.images.mean() < 220  # real photos, not blank arrays

    mnist = load_mnist(shared_data / "mnist", "test")
    assert mnist.images.shape == (10_000, 28, 28, 1)
    assert mnist.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the known t10k start
    assert np.bincount(mnist.labels).sum() == 10_000 and len(np.bincount(mnist.labels)) == 10
