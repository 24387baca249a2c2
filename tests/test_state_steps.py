"""TrainState, the pure train/eval steps and the array loader."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compilations
from core_worker import TinyNet, make_run, tiny_data

from jaxlearn import schedules as S
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.models import SimpleCNN
from jaxlearn.state import TrainState, init_variables
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
    with pytest.raises(ValueError, match=r"jax.random.key\(0\), got 0"):
        TrainState.create(TinyNet(), optax.sgd(0.1), 0, images)  # an int seed


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


def _loss_by_hand(state, images, labels, wd=0.0, ls=0.0):
    """The first step's training loss written out: (total, cross-entropy) of the params."""

    def loss(params):
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

    # Jitted: run eagerly, every operation would compile on its own (6 s here).
    return jax.jit(jax.grad(loss, has_aux=True))


def _one_sgd_step(**kw):
    """(state, batch, the step's new state and metrics) for one jitted step of SGD at lr 1."""
    images, labels = tiny_data(16)
    state = TrainState.create(TinyNet(), optax.sgd(1.0), jax.random.key(0), images[:1])
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    new, m = jax.jit(make_train_step(jit=False, **kw))(state, batch)
    return state, (images, labels), new, m


def _assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_loss_smoothing_and_weight_decay_match_by_hand():
    wd, ls = 0.1, 0.2
    state, data, new, m = _one_sgd_step(label_smoothing=ls, weight_decay=wd)
    grads, ce = _loss_by_hand(state, *data, wd=wd, ls=ls)(state.params)
    np.testing.assert_allclose(m["loss"], ce, rtol=1e-5)
    _assert_trees_close(new.params, jax.tree.map(lambda p, g: p - g, state.params, grads))


def test_sam_steps_with_the_gradient_at_the_steepest_point_within_rho():
    rho = 0.5
    state, data, new, m = _one_sgd_step(sam_rho=rho, weight_decay=0.1)
    grad_fn = _loss_by_hand(state, *data, wd=0.1)
    grads, ce = grad_fn(state.params)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    worst = jax.tree.map(lambda p, g: p + rho * g / norm, state.params, grads)
    sam_grads, _ = grad_fn(worst)
    _assert_trees_close(new.params, jax.tree.map(lambda p, g: p - g, state.params, sam_grads))
    np.testing.assert_allclose(m["loss"], ce, rtol=1e-5)  # reported at w, not at w + e
    # The BatchNorm statistics are the first pass's: those of the plain step.
    _, _, plain, _ = _one_sgd_step(weight_decay=0.1)
    _assert_trees_close(new.batch_stats, plain.batch_stats)
    assert not np.allclose(new.params["Dense_0"]["kernel"], plain.params["Dense_0"]["kernel"])


def test_dropout_and_augment_keys_follow_step():
    seen = []

    def augment(key, x):
        jax.debug.callback(seen.append, jax.random.key_data(key))
        return x

    images, labels = tiny_data(16)
    state = TrainState.create(TinyNet(), optax.sgd(0.0), jax.random.key(0), images[:1])
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    # Jitted: run eagerly, the step compiled ~150 programs of one operation each (2.4 s).
    step = jax.jit(make_train_step(augment=augment, jit=False))
    s1, m1 = step(state, batch)
    _, m2 = step(s1, batch)  # lr 0: only the dropout key changes between the steps
    jax.effects_barrier()
    expected = jax.random.split(jax.random.fold_in(state.rng, 0))[0]
    np.testing.assert_array_equal(seen[0], jax.random.key_data(expected))
    assert not np.array_equal(seen[1], seen[0])  # the next step, the next key
    assert float(m1["loss"]) != float(m2["loss"])


def test_init_variables_is_model_init_compiled_once_for_equal_models():
    x = np.zeros((2, 8, 8, 3), np.float32)
    key = jax.random.key(7)
    expected = TinyNet().init(key, x, train=False)
    init_variables(TinyNet(), jax.random.key(0), x)  # compile (or read the run's cache)
    with count_compilations() as compiled:
        # An equal module built apart, another key: the same program, the caller's key.
        got = init_variables(TinyNet(), key, x)
    assert len(compiled) == 0
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    with count_compilations() as compiled:
        init_variables(TinyNet(), key, np.zeros((2, 16, 16, 3), np.float32))
    assert compiled  # another input shape: another program (the count is live)
    with pytest.raises(ValueError, match=r"flax\.linen\.Module"):
        init_variables(lambda key, x: x, key, x)


def test_steps_compile_once_per_program_not_per_optimizer_object():
    images, labels = tiny_data(16)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    sgdr = lambda cycle: S.sgdr(0.1, cycle_steps=cycle, cycle_mult=2, num_cycles=3)

    def state(seed, tx):  # a new model object and a new optimizer object for every run
        return TrainState.create(TinyNet(), tx, jax.random.key(seed), images[:1])

    sgd = lambda lr: optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9)
    runs = [state(s, sgd(sgdr(c))) for s, c in ((0, 10), (1, 10), (2, 20), (3, 40))]
    other = [state(4, optax.adam(1e-3)), state(5, sgd(S.sgdr(0.2, cycle_steps=10)))]
    # Fresh steps (`__wrapped__`: not the shared ones) so other tests' programs don't count.
    step, eval_step = make_train_step.__wrapped__(), make_eval_step.__wrapped__()
    step(state(9, sgd(0.1)), batch)  # warm the helpers (PRNG, device puts) outside the count
    with count_compilations() as compiled:
        results = [step(s, batch) for s in runs]
    # Seeds and cycle lengths are data (SGDR's boundaries are arrays): one program.
    assert len(compiled) == 1
    with count_compilations() as compiled:
        trained = [step(s, batch)[0] for s in other]
    # Another optimizer, or another Python number in the schedule: a program each.
    assert len(compiled) == 2
    with count_compilations() as compiled:
        for s in [*(r for r, _ in results), *trained]:
            eval_step(s, batch)  # evaluation never sees the optimizer
    assert len(compiled) == 1
    # Shared programs still compute each run's own update: the cycle length matters.
    lrs = [float(m["lr"]) for _, m in results]
    assert lrs == [float(sgdr(c)(0)) for c in (10, 10, 20, 40)]
    later = [step(step(r, batch)[0], batch)[1]["lr"] for r, _ in results[1:]]
    np.testing.assert_allclose(later, [sgdr(c)(2) for c in (10, 20, 40)], rtol=1e-6)
    assert step.cache_size() == 4  # constant LR (the warm-up), the SGDR runs, Adam, SGDR at 0.2


def test_a_step_keeps_no_state_alive_once_its_caller_drops_it():
    import gc
    import weakref

    state, loader, _ = make_run()
    step = make_train_step.__wrapped__()
    batch = next(iter(loader.epoch(0)))
    state, _ = step(state, batch)
    again, _ = step(state, batch)  # the fast path: the state it returned comes back
    leaf = weakref.ref(jax.tree.leaves(again.opt_state)[0])
    del state, again
    gc.collect()
    assert leaf() is None  # freed: the step object held only a weak reference


def test_a_train_state_subclass_keeps_its_own_fields_through_a_step():
    import dataclasses

    from flax import struct

    @struct.dataclass
    class Tagged(TrainState):
        tag: str = struct.field(pytree_node=False, default="")

    state, loader, step = make_run()
    tagged = Tagged(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
                    tag="seed 0")  # fmt: skip
    new, _ = step(tagged, next(iter(loader.epoch(0))))
    assert type(new) is Tagged and new.tag == "seed 0" and int(new.step) == 1


def test_the_same_arguments_give_the_same_step():
    flip = lambda key, x: x
    assert make_train_step(weight_decay=0.1, augment=flip) is make_train_step(
        augment=flip, weight_decay=0.1
    )
    assert make_train_step(weight_decay=0.1) is not make_train_step(weight_decay=0.2)
    assert make_train_step() is make_train_step(weight_decay=0.0, preprocess=None)  # defaults
    assert make_train_step(augment=flip) is not make_train_step(augment=lambda key, x: x)
    assert make_eval_step(with_logits=True) is make_eval_step(with_logits=True)


def _op_types(text: str, op: str) -> list[str]:
    """The operand and result types of every `op` in a lowered StableHLO program."""
    return [line.rsplit(" : ", 1)[-1] for line in text.splitlines() if f"stablehlo.{op}" in line]


def test_bf16_compute_runs_convolutions_and_matmuls_in_bf16():
    images, labels = tiny_data(16)
    model = SimpleCNN(widths=(8,), num_classes=3)  # conv, BatchNorm, max-pool, dense head
    state = TrainState.create(model, optax.adam(1e-3), jax.random.key(0), images[:1])
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    programs = {}
    for name, dtype in (("f32", None), ("bf16", jnp.bfloat16)):
        step = make_train_step(compute_dtype=dtype)
        text = step.lower(state, batch).as_text()
        programs[name] = {op: _op_types(text, op) for op in ("convolution", "dot_general")}
    # Forward, input-gradient and kernel-gradient convolutions, and the head's matmuls.
    assert len(programs["bf16"]["convolution"]) >= 2 and programs["bf16"]["dot_general"]
    for types in programs["bf16"].values():
        assert all("bf16" in t and "f32" not in t.split("->")[0] for t in types), types
    for types in programs["f32"].values():
        assert all("bf16" not in t for t in types), types

    fresh = lambda: TrainState.create(model, optax.adam(1e-3), jax.random.key(0), images[:1])
    new, m = make_train_step(compute_dtype=jnp.bfloat16)(fresh(), batch)
    _, m32 = make_train_step()(fresh(), batch)
    leaves = jax.tree.leaves((new.params, new.batch_stats, new.opt_state))
    assert {x.dtype for x in leaves} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    assert m["loss"].dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: the loss moves, but not far.
    assert float(m["loss"]) != float(m32["loss"])
    np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=2e-2)


def test_bf16_eval_step_and_refusals():
    images, labels = tiny_data(16)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    model = SimpleCNN(widths=(8,), num_classes=3)
    state = TrainState.create(model, optax.sgd(0.1), jax.random.key(0), images[:1])
    text = make_eval_step(compute_dtype=jnp.bfloat16).lower(state, batch).as_text()
    assert all("bf16" in t for t in _op_types(text, "convolution"))
    with pytest.raises(ValueError, match="loss scaling"):
        make_train_step(compute_dtype=jnp.float16)
    # A model without a `dtype` cannot compute in bf16: refused, never silently float32.
    tiny = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(0), images[:1])
    with pytest.raises(ValueError, match="dtype"):
        make_train_step(compute_dtype=jnp.bfloat16)(tiny, batch)
    # float32 is full precision even for a model built to compute in bf16
    bf16_model = state.replace(apply_fn=model.clone(dtype=jnp.bfloat16).apply)
    text = make_eval_step(compute_dtype=jnp.float32).lower(bf16_model, batch).as_text()
    assert all("bf16" not in t for t in _op_types(text, "convolution"))
    make_eval_step(compute_dtype=jnp.float32)(tiny, batch)  # no dtype to set: as it is
    # a model built in float16 would train without loss scaling: refused like the argument
    fp16_model = state.replace(apply_fn=model.clone(dtype=jnp.float16).apply)
    with pytest.raises(ValueError, match="loss scaling"):
        make_train_step()(fp16_model, batch)


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
        ({"sam_rho": -0.05}, "sam_rho"),
        ({"compute_dtype": jnp.int8}, "compute_dtype"),
        ({"augment": 3}, "augment"),
    ],
)
def test_train_step_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_train_step(**kwargs)
