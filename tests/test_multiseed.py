"""Many seeds at once: vmapped training equals training every seed alone with `fit`."""

import functools

import jax
import numpy as np
import optax
import pytest

from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import fit
from jaxlearn.models import MLP
from jaxlearn.multiseed import init_many, train_many
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step

MODEL = MLP(features=(8,), num_classes=3)
TX = optax.sgd(0.3, momentum=0.9)
SEEDS = (0, 7, 3)


@functools.cache
def _data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 4, 4, 1), dtype=np.uint8)
    labels = (images.reshape(40, -1).mean(1) > 127).astype(np.int32) + (images[:, 0, 0, 0] > 200)
    return images, labels


def _keys():
    return jax.random.split(jax.random.key(42), len(SEEDS))


@functools.cache
def _trained():
    images, labels = _data()
    states = init_many(MODEL, TX, _keys(), images[:1])
    return train_many(
        states, images, labels, train_step=make_train_step(jit=False), batch_size=8,
        seeds=SEEDS, epochs=2,
    )  # fmt: skip


def test_vmapped_training_equals_fit_seed_by_seed():
    images, labels = _data()
    states, metrics = _trained()
    assert metrics["loss"].shape == (3, 10)  # 3 models, 2 epochs of 5 steps
    step = make_train_step()
    for i, (key, seed) in enumerate(zip(_keys(), SEEDS, strict=True)):
        alone = TrainState.create(MODEL, TX, key, images[:1])
        alone, history = fit(
            alone, ArrayLoader(images, labels, 8, seed=seed), train_step=step, epochs=2,
            progress=False,
        )  # fmt: skip
        # Bit for bit on CPU (XLA:CPU computes the batched products like the single ones);
        # on a GPU, batched matmuls may round differently: compare with rtol ~1e-5 there.
        np.testing.assert_array_equal(metrics["loss"][i], history["loss"])
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), states.params, alone.params
        )
        assert int(states.step[i]) == int(alone.step) == 10


def test_a_continued_run_takes_the_next_epochs_orders():
    images, labels = _data()
    kw = dict(train_step=make_train_step(jit=False), batch_size=8, seeds=SEEDS, epochs=1)
    states, _ = train_many(init_many(MODEL, TX, _keys(), images[:1]), images, labels, **kw)
    states, metrics = train_many(states, images, labels, **kw)  # epoch 1, not 0 again
    np.testing.assert_array_equal(metrics["loss"], _trained()[1]["loss"][:, 5:])
    with pytest.raises(ValueError, match="start_epoch"):  # 2 epochs of 5 steps: 3.3 of 3
        train_many(states, images[:24], labels[:24], **kw)


def test_models_differ_and_learn():
    states, metrics = _trained()
    kernels = np.asarray(states.params["dense1"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])
    assert not np.allclose(metrics["loss"][0], metrics["loss"][1])


def test_init_many_equals_create_per_key():
    images, _ = _data()
    states = init_many(MODEL, TX, _keys(), images[:1])
    for i, key in enumerate(_keys()):
        alone = TrainState.create(MODEL, TX, key, images[:1])
        same = lambda a, b, i=i: np.testing.assert_array_equal(a[i], b)
        jax.tree.map(same, states.params, alone.params)
        np.testing.assert_array_equal(states.rng[i], alone.rng)


def test_bad_arguments_raise():
    images, labels = _data()
    states = init_many(MODEL, TX, _keys(), images[:1])
    kw = dict(batch_size=8, epochs=1)
    with pytest.raises(ValueError, match="jit=False"):
        train_many(states, images, labels, train_step=make_train_step(), seeds=SEEDS, **kw)
    with pytest.raises(ValueError, match="seeds"):
        train_many(states, images, labels, train_step=make_train_step(jit=False), seeds=(1,), **kw)
    alone = TrainState.create(MODEL, TX, jax.random.key(0), images[:1])
    with pytest.raises(ValueError, match="stacked"):
        train_many(alone, images, labels, train_step=make_train_step(jit=False), seeds=(1,), **kw)
    with pytest.raises(ValueError, match="classes"):
        train_many(
            states, images, labels + 5, train_step=make_train_step(jit=False), seeds=SEEDS, **kw
        )
    pure = make_train_step(jit=False)
    with pytest.raises(ValueError, match="integer array"):  # not truncated to integers
        train_many(states, images, labels + 0.5, train_step=pure, seeds=SEEDS, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        train_many(states, images, labels, train_step=pure, seeds=SEEDS, batch_size=0, epochs=1)


def test_the_data_is_on_the_device_once_however_many_models(monkeypatch):
    import jaxlearn.multiseed as multiseed

    images, labels = _data()
    copies = []
    run_epoch = multiseed._run_epoch

    def counting(*args):
        copies.append(sum(a.shape == images.shape for a in jax.live_arrays()))
        return run_epoch(*args)

    monkeypatch.setattr(multiseed, "_run_epoch", counting)
    states = init_many(MODEL, TX, jax.random.split(jax.random.key(0), 8), images[:1])
    train_many(states, images, labels, train_step=make_train_step(jit=False), batch_size=8,
               seeds=range(8), epochs=2)  # fmt: skip
    assert copies == [1, 1]  # 8 models, one copy of the images


def test_new_optimizer_objects_reuse_the_compiled_programs():
    from conftest import count_compilations

    images, labels = _data()
    step = make_train_step(jit=False)  # one step function: a program per model and optimizer

    def run():  # a new model and optimizer object, as a script makes per group of seeds
        model, tx = MLP(features=(8,), num_classes=3), optax.sgd(0.3, momentum=0.9)
        states = init_many(model, tx, _keys(), images[:1])
        return train_many(states, images, labels, train_step=step, batch_size=8, seeds=SEEDS,
                          epochs=1)  # fmt: skip

    run()
    with count_compilations() as compiled:
        run()
    assert len(compiled) == 0
