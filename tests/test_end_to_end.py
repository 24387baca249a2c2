"""Tiny end-to-end fits: an image folder written here, and tfds through mock_data."""

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from conftest import write_color_folder

from jaxlearn.data import ArrayLoader, load_image_folder, load_tfds
from jaxlearn.loop import fit
from jaxlearn.models import get_model
from jaxlearn.schedules import one_cycle
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step, make_train_step


def _fit(train, valid, epochs, batch_size):
    model = get_model("mlp", train.num_classes, features=(16,))
    steps = epochs * (len(train) // batch_size)
    schedule = one_cycle(0.05, steps)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
    state = TrainState.create(model, tx, jax.random.key(0), train.images[:1])
    return fit(
        state,
        ArrayLoader(train.images, train.labels, batch_size, seed=0),
        train_step=make_train_step(),
        epochs=epochs,
        eval_data=ArrayLoader(valid.images, valid.labels, batch_size, train=False),
        eval_step=make_eval_step(),
        progress=False,
    )


def test_fit_on_an_image_folder(tmp_path):
    write_color_folder(tmp_path / "train", per_class=16, seed=0, ext=("png", "jpg"))
    write_color_folder(tmp_path / "valid", per_class=5, seed=1, ext=("png", "jpg"))
    train = load_image_folder(tmp_path, "train", 8, cache=False, progress=False)
    valid = load_image_folder(
        tmp_path, "valid", 8, class_names=train.class_names, cache=False, progress=False
    )
    assert train.class_names == ("cats", "dogs") and len(train) == 32 and len(valid) == 10
    _, history = _fit(train, valid, epochs=6, batch_size=8)
    assert len(history["loss"]) == 6 * 4 and np.all(np.isfinite(history["loss"]))
    assert history["eval_accuracy"][-1] == 1.0  # red vs blue: separable
    assert history["loss"][-4:].mean() < history["loss"][:4].mean()


def test_fit_on_tfds_mock_data(monkeypatch):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=24):
        train = load_tfds("mnist", "train", progress=False)
        valid = load_tfds("mnist", "test[:50%]", progress=False)
    assert train.images.shape[1:] == (28, 28, 1) and train.num_classes == 10
    _, history = _fit(train, valid, epochs=2, batch_size=8)
    assert len(history["loss"]) == 2 * 3 and np.all(np.isfinite(history["loss"]))
    assert len(history["eval_accuracy"]) == 2
    assert history["lr"][0] == pytest.approx(one_cycle(0.05, 6)(0))
