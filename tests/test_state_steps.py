"""TrainState, the pure train/eval steps and the array loader."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_worker import TinyNet, make_run, tiny_data

from jaxlearn.data.loader import ArrayLoader
from jaxlearn.state import TrainState
from jaxlearn.steps import cross_entropy, make_eval_step, make_train_step


def _train(n_steps=3, **kw):
    state, loader, step = make_run(**kw)
    metrics = []
    for batch in loader.epoch(0):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
        if len(metrics) == n_steps:
            break
    return state, metrics


def test_create_collections_and_variables():
    images, _ = tiny_data(4)
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(0), images)
    assert int(state.step) == 0
    assert set(state.variables) == {"params", "batch_stats"}
    assert state.rng.dtype == jnp.uint32  # typed keys are stored as raw key data
    with pytest.raises(ValueError, match="model"):
        TrainState.create(object(), optax.sgd(0.1), jax.random.key(0), images)


def test_same_seed_bit_identical_and_seed_matters():
    a, ma = _train()
    b, mb = _train()
    c, _ = _train(seed=1)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert int(a.step) == 3
    assert not np.array_equal(a.params["Dense_0"]["kernel"], c.params["Dense_0"]["kernel"])


def test_lr_metric_is_schedule_at_step_taken():
    _, metrics = _train(n_steps=3)
    schedule = optax.cosine_decay_schedule(0.05, 40)
    np.testing.assert_allclose([m["lr"] for m in metrics], [schedule(i) for i in range(3)])


def test_lr_metric_from_inject_hyperparams():
    images, labels = tiny_data()
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    state = TrainState.create(TinyNet(), tx, jax.random.key(0), images[:1])
    step = make_train_step()
    lrs = []
    for batch in ArrayLoader(images, labels, 16).epoch(0):
        state, m = step(state, batch)
        lrs.append(float(m["lr"]))
    np.testing.assert_allclose(lrs, [schedule(i) for i in range(4)], rtol=1e-6)


def test_loss_smoothing_and_weight_decay_match_by_hand():
    images, labels = tiny_data(16)
    state = TrainState.create(TinyNet(), optax.sgd(1.0), jax.random.key(0), images[:1])
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    wd, ls = 0.1, 0.2

    def by_hand(params):
        x = images.astype(np.float32) / 255
        key = jax.random.split(jax.random.fold_in(state.rng, 0))[1]
        logits, _ = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            rngs={"dropout": key}, mutable=["batch_stats"],
        )  # fmt: skip
        onehot = jax.nn.one_hot(labels, 3) * (1 - ls) + ls / 3
        ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
        sq = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        return ce + 0.5 * wd * sq, ce

    grads, ce = jax.grad(by_hand, has_aux=True)(state.params)
    expected = jax.tree.map(lambda p, g: p - g, state.params, grads)
    step = make_train_step(label_smoothing=ls, weight_decay=wd, jit=False)
    new, m = step(state, batch)
    np.testing.assert_allclose(m["loss"], ce, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_dropout_and_augment_keys_follow_step():
    seen = []

    def augment(key, x):
        seen.append(key)
        return x

    images, labels = tiny_data(16)
    state = TrainState.create(TinyNet(), optax.sgd(0.0), jax.random.key(0), images[:1])
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    step = make_train_step(augment=augment, jit=False)
    s1, m1 = step(state, batch)
    _, m2 = step(s1, batch)  # lr 0: only the dropout key changes between the steps
    expected = jax.random.split(jax.random.fold_in(state.rng, 0))[0]
    np.testing.assert_array_equal(seen[0], expected)
    assert float(m1["loss"]) != float(m2["loss"])


def test_bf16_compute_keeps_float32_state():
    images, labels = tiny_data(16)
    state = TrainState.create(TinyNet(), optax.adam(1e-3), jax.random.key(0), images[:1])
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    new, m = make_train_step(compute_dtype=jnp.bfloat16)(state, batch)
    dtypes = {x.dtype for x in jax.tree.leaves((new.params, new.batch_stats, new.opt_state))}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    assert np.isfinite(float(m["loss"]))


def test_eval_sums_skip_masked_rows_and_count_bad_labels():
    images, labels = tiny_data(10)
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(0), images[:1])
    loader = ArrayLoader(images, labels, 8, train=False)
    assert len(loader) == 2
    step = make_eval_step(with_logits=True)
    out = [jax.device_get(step(state, b)) for b in loader]
    assert sum(o["count"] for o in out) == 10
    logits = np.concatenate([o["logits"] for o in out])[:10]
    ce = cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(sum(o["loss_sum"] for o in out), ce.sum(), rtol=1e-5)
    assert sum(o["correct"] for o in out) == np.sum(logits.argmax(-1) == labels)
    bad = {"image": jnp.asarray(images[:8]), "label": jnp.asarray([0, 1, 2, 3, -1, 0, 0, 0])}
    assert int(step(state, bad)["bad_labels"]) == 2


def test_loader_order_is_pure_and_resumable():
    images, labels = tiny_data(50)
    a = ArrayLoader(images, labels, 16, seed=3)
    assert len(a) == 3  # drops the partial batch
    first = [np.asarray(b["label"]) for b in a.epoch(2)]
    again = [np.asarray(b["label"]) for b in ArrayLoader(images, labels, 16, seed=3).epoch(2)]
    resumed = [np.asarray(b["label"]) for b in a.epoch(2, start_step=1)]
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[1:], resumed)
    assert not np.array_equal(first, [np.asarray(b["label"]) for b in a.epoch(3)])
    np.testing.assert_array_equal(np.concatenate(first), labels[a.order(2)[:48]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100}, "batch_size"),
        ({"labels": np.zeros(3, np.int32)}, "labels"),
        ({"labels": np.full(50, 5)}, "num_classes"),
    ],
)
def test_loader_rejects_bad_input(kwargs, match):
    images, labels = tiny_data(50)
    args = {"images": images, "labels": labels, "batch_size": 16, "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        ArrayLoader(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"compute_dtype": jnp.int8}, "compute_dtype"),
        ({"augment": 3}, "augment"),
    ],
)
def test_train_step_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_train_step(**kwargs)
