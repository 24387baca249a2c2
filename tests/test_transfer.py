"""Transfer learning: layer groups, freezing (and its optimizer state), BatchNorm modes,
discriminative learning rates, cached features for head-only training, fine_tune."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_init import jit_apply, numpy_variables

from jaxlearn import transfer
from jaxlearn.checkpoint import Checkpointer
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import Callback, CaptureParams, Checkpoint
from jaxlearn.models import CifarResNet, get_model
from jaxlearn.schedules import one_cycle
from jaxlearn.steps import cross_entropy, injected_learning_rate, make_train_step

SPLIT = transfer.CIFAR_RESNET_SPLIT  # stem + layer1 | layer2 + layer3 | fc


@pytest.fixture(scope="module")
def tiny():
    """A CIFAR ResNet-8 (one block per stage), its variables, and a batch of 16 px images."""
    model = CifarResNet(depth=8, num_classes=3)
    rng = np.random.default_rng(0)
    images = rng.random((8, 16, 16, 3), dtype=np.float32)
    labels = rng.integers(0, 3, 8).astype(np.int32)
    return model, numpy_variables(model, images), images, labels


def _train(model, variables, tx, batch, steps=3):
    state = transfer.make_state(model, variables, tx, jax.random.key(1))
    train_step = make_train_step()
    for _ in range(steps):
        state, _ = train_step(state, batch)
    return state


def _same(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_make_state_copies_the_variables_and_compiles_only_the_optimizer_init():
    from conftest import count_compilations

    # Leaf shapes no other test uses, so nothing is compiled for them yet.
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.random((i + 5, 2 * i + 7), dtype=np.float32))
              for i in range(6)}  # fmt: skip
    variables = {"params": params, "batch_stats": {"mean": jnp.zeros((1, 19))}}
    tx, key = optax.sgd(0.1, momentum=0.9), jax.random.key(1)
    with count_compilations() as compiled:
        state = transfer.make_state(CifarResNet(depth=8), variables, tx, key, step=5)
    assert state.step.dtype == jnp.int32 and int(state.step) == 5
    # One program: the momentum init. A copy per leaf shape compiled 7 more.
    assert len(compiled) == 1
    mine = jax.tree.leaves((state.params, state.batch_stats))
    given = jax.tree.leaves((params, variables["batch_stats"]))
    for a, b in zip(mine, given, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    # Copies: donating the state (as the train step does) leaves the caller's arrays alive.
    jax.jit(lambda s: s, donate_argnums=0)(state)
    assert all(a.is_deleted() for a in mine) and not any(b.is_deleted() for b in given)


def test_layer_groups_are_fastais_resnet_split():
    model = get_model("resnet18", 10)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))[
        "params"
    ]
    groups = transfer.layer_groups(params)
    assert {n for n, g in groups.items() if g == 0} == {
        "conv1",
        "bn1",
        "layer1_0",
        "layer1_1",
        "layer2_0",
        "layer2_1",
    }
    assert {n for n, g in groups.items() if g == 1} == {
        "layer3_0",
        "layer3_1",
        "layer4_0",
        "layer4_1",
    }
    assert {n for n, g in groups.items() if g == 2} == {"fc"}
    for bad in [(), ("fc", "layer3"), ("conv1",)]:
        with pytest.raises(ValueError, match="split_at"):
            transfer.layer_groups(params, bad)


def test_frozen_body_holds_no_adam_state():
    params = {"layer1_0": {"kernel": jnp.zeros(1000)}, "fc": {"kernel": jnp.zeros(10)}}
    model = get_model("mlp", 10)
    _, frozen = transfer.freeze_to(model, params, -1, optax.adam, 1e-3, split_at=("fc",))
    _, unfrozen = transfer.freeze_to(model, params, 0, optax.adam, 1e-3, split_at=("fc",))
    # Each group's Adam is injected: 6 scalars (its count, learning_rate, b1, b2, eps,
    # eps_root) on top of Adam's own count and its mu and nu of the group's weights.
    assert transfer.optimizer_state_size(frozen.init(params)) == 6 + 21  # mu, nu of 10 + count
    assert transfer.optimizer_state_size(optax.adam(1e-3).init(params)) == 2021
    assert transfer.optimizer_state_size(unfrozen.init(params)) == 2 * 6 + 2022  # two groups


@pytest.mark.parametrize("bn", ["train", "stats"])
def test_freezing_and_batchnorm_modes(tiny, bn):
    """Group 0 frozen; bn='eval' is trained in the cached-features and fine_tune tests."""
    model, variables, images, labels = tiny
    frozen_model, tx = transfer.freeze_to(
        model, variables["params"], 1, optax.adam, 1e-2, split_at=SPLIT, bn=bn
    )
    assert frozen_model.frozen_bn == ()
    state = _train(frozen_model, variables, tx, {"image": images, "label": labels})
    p0, p1 = variables["params"], state.params
    s0, s1 = variables["batch_stats"], state.batch_stats
    # Frozen group 0 (stem, layer1): convolutions never move.
    assert np.array_equal(p0["conv1"]["kernel"], p1["conv1"]["kernel"])
    assert np.array_equal(p0["layer1_0"]["conv2"]["kernel"], p1["layer1_0"]["conv2"]["kernel"])
    # Its BatchNorm: parameters train only with 'train'; statistics update with both.
    assert _same(p0["layer1_0"]["bn1"], p1["layer1_0"]["bn1"]) == (bn == "stats")
    assert _same(p0["bn1"], p1["bn1"]) == (bn == "stats")
    assert not _same(s0["layer1_0"], s1["layer1_0"])
    # Unfrozen groups train, parameters and statistics alike.
    assert not np.array_equal(p0["layer2_0"]["conv1"]["kernel"], p1["layer2_0"]["conv1"]["kernel"])
    assert not np.array_equal(p0["fc"]["kernel"], p1["fc"]["kernel"])
    assert not _same(s0["layer3_0"], s1["layer3_0"])
    # Optimizer state only for trainable parameters: Adam's mu and nu, plus per group its
    # count and the 6 injected scalars (count, learning_rate, b1, b2, eps, eps_root).
    labels_tree = transfer.param_labels(variables["params"], 1, split_at=SPLIT, bn=bn)
    leaves = zip(jax.tree.leaves(p0), jax.tree.leaves(labels_tree), strict=True)
    trainable = sum(np.size(p) for p, label in leaves if label != "frozen")
    groups = {label for label in jax.tree.leaves(labels_tree) if label != "frozen"}
    assert transfer.optimizer_state_size(state.opt_state) == 2 * trainable + 7 * len(groups)


def test_eval_mode_freezes_the_frozen_groups_batchnorm(tiny):
    model, variables, _, _ = tiny
    frozen_model, _ = transfer.freeze_to(
        model, variables["params"], 1, optax.adam, 1e-2, split_at=SPLIT, bn="eval"
    )
    assert frozen_model.frozen_bn == ("bn1", "conv1", "layer1_0")
    labels = transfer.param_labels(variables["params"], 1, split_at=SPLIT, bn="eval")
    assert set(jax.tree.leaves(labels["layer1_0"])) == {"frozen"}
    unfrozen_model, _ = transfer.freeze_to(
        frozen_model, variables["params"], 0, optax.adam, 1e-2, split_at=SPLIT, bn="eval"
    )
    assert unfrozen_model.frozen_bn == ()
    x = np.random.default_rng(2).random((4, 16, 16, 3), dtype=np.float32)
    _, updated = jit_apply(frozen_model, train=True, mutable=["batch_stats"])(variables, x)
    assert _same(updated["batch_stats"]["layer1_0"], variables["batch_stats"]["layer1_0"])
    assert not _same(updated["batch_stats"]["layer2_0"], variables["batch_stats"]["layer2_0"])


def test_discriminative_rates_follow_the_same_schedule():
    assert transfer.discriminative_factors(1e-4, 1e-2, 3) == pytest.approx((0.01, 0.1, 1.0))
    assert transfer.discriminative_factors(1e-3, 1e-3, 1) == (1.0,)
    with pytest.raises(ValueError, match="lo"):
        transfer.discriminative_factors(1e-2, 1e-4, 3)
    params = {name: {"kernel": jnp.zeros(2)} for name in ("conv1", "layer3_0", "fc")}
    schedule = one_cycle(0.1, 6)
    factors = transfer.discriminative_factors(1e-3, 1e-1, 3)
    _, tx = transfer.freeze_to(
        get_model("mlp", 10), params, 0, optax.sgd, schedule, lr_factors=factors,
        split_at=transfer.RESNET_SPLIT,
    )  # fmt: skip
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for step in range(6):
        updates, opt_state = tx.update(grads, opt_state, params)
        for name, factor in zip(("conv1", "layer3_0", "fc"), factors, strict=True):
            np.testing.assert_allclose(updates[name]["kernel"], -schedule(step) * factor, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_factors"):
        transfer.freeze_to(get_model("mlp", 10), params, 0, optax.sgd, 0.1, lr_factors=(1.0, 1.0),
                           split_at=transfer.RESNET_SPLIT)  # fmt: skip


def test_head_on_cached_features_equals_training_with_a_frozen_body(tiny):
    model, variables, images, labels = tiny
    features = transfer.extract_features(model, variables, images, batch_size=3)  # 3 + 3 + 2 padded
    want = jit_apply(model, train=False, features_only=True)(variables, images)
    assert features.shape == (8, 64)
    np.testing.assert_allclose(features, want, atol=1e-6)

    full_model, tx = transfer.freeze_to(
        model, variables["params"], -1, optax.sgd, 0.5, split_at=SPLIT, bn="eval"
    )
    full = _train(full_model, variables, tx, {"image": images, "label": labels})
    head_only = _train(
        transfer.LinearHead(3),
        {"params": {"fc": variables["params"]["fc"]}},
        optax.sgd(0.5),
        {"image": features, "label": labels},
    )
    assert not np.allclose(full.params["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    assert _same(full.batch_stats, variables["batch_stats"])  # bn='eval': running averages kept
    body = {k: v for k, v in variables["params"].items() if k != "fc"}
    assert _same({k: full.params[k] for k in body}, body)
    for a, b in zip(
        jax.tree.leaves(full.params["fc"]), jax.tree.leaves(head_only.params["fc"]), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
    merged = transfer.attach_head(variables, head_only.params)
    np.testing.assert_allclose(
        model.apply(merged, images),
        transfer.LinearHead(3).apply({"params": head_only.params}, features),
        atol=1e-5,
    )


def test_replace_head_keeps_the_body(tiny):
    model, variables, images, _ = tiny
    new_model, new_vars = transfer.replace_head(model, variables, 5, jax.random.key(3))
    assert new_model.num_classes == 5 and new_vars["params"]["fc"]["kernel"].shape == (64, 5)
    body = {k: v for k, v in variables["params"].items() if k != "fc"}
    assert _same(body, {k: v for k, v in new_vars["params"].items() if k != "fc"})
    assert _same(variables["batch_stats"], new_vars["batch_stats"])
    assert new_model.apply(new_vars, images).shape == (8, 5)
    with pytest.raises(ValueError, match="does not fit"):
        transfer.attach_head(variables, {"fc": new_vars["params"]["fc"]})


def test_bad_arguments_are_named(tiny):
    model, variables, _, _ = tiny
    with pytest.raises(ValueError, match="bn must be"):
        transfer.freeze_to(
            model, variables["params"], 1, optax.sgd, 0.1, split_at=SPLIT, bn="frozen"
        )
    with pytest.raises(ValueError, match="n must be"):
        transfer.freeze_to(model, variables["params"], 4, optax.sgd, 0.1, split_at=SPLIT)
    with pytest.raises(ValueError, match="frozen_bn"):
        transfer.freeze_to(
            get_model("mlp", 10),
            {"dense1": {}, "fc": {}},
            -1,
            optax.sgd,
            0.1,
            split_at=("fc",),
            bn="eval",
        )


def test_fine_tune_trains_the_head_then_everything(tiny, tmp_path):
    model, variables, _, _ = tiny
    rng = np.random.default_rng(1)
    loader = ArrayLoader(
        rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
        rng.integers(0, 3, 16).astype(np.int32),
        8,
    )
    capture = CaptureParams([2, 4])  # the last step of each phase (2 steps per epoch)
    ckpt = Checkpointer(tmp_path)
    state, histories = transfer.fine_tune(
        model,
        variables,
        loader,
        epochs=1,
        freeze_epochs=1,
        base_lr=1e-2,
        key=jax.random.key(0),
        split_at=SPLIT,
        bn="eval",
        callbacks=[capture, Checkpoint(ckpt, every_epochs=1)],
        progress=False,
    )
    frozen, unfrozen = capture.snapshots
    # One step count through both phases: phase 2 continues, never overwrites, phase 1.
    assert ckpt.all_steps() == [2, 4]
    np.testing.assert_array_equal(histories["frozen"]["step"], [0, 1])
    np.testing.assert_array_equal(histories["unfrozen"]["step"], [2, 3])
    np.testing.assert_array_equal(histories["unfrozen"]["epoch"], [1])
    p0 = variables["params"]
    assert np.array_equal(
        frozen["params"]["layer2_0"]["conv1"]["kernel"], p0["layer2_0"]["conv1"]["kernel"]
    )
    assert _same(frozen["batch_stats"], variables["batch_stats"])  # bn='eval': frozen statistics
    assert not np.array_equal(frozen["params"]["fc"]["kernel"], p0["fc"]["kernel"])
    assert not np.array_equal(
        unfrozen["params"]["conv1"]["kernel"], frozen["params"]["conv1"]["kernel"]
    )
    assert int(state.step) == 4
    # Phase 1 starts at base_lr / 25 (one-cycle div 25); phase 2 at (base_lr / 2) / 5.
    np.testing.assert_allclose(histories["frozen"]["lr"][0], 1e-2 / 25, rtol=1e-5)
    np.testing.assert_allclose(histories["unfrozen"]["lr"][0], 1e-2 / 2 / 5, rtol=1e-5)


def test_unfrozen_bn_eval_keeps_the_body_statistics_while_everything_trains(tiny):
    model, variables, _, _ = tiny
    rng = np.random.default_rng(1)
    loader = ArrayLoader(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                         rng.integers(0, 3, 16).astype(np.int32), 8)  # fmt: skip
    ends = {}
    for mode in ("train", "eval"):
        capture = CaptureParams([2, 4])
        transfer.fine_tune(model, variables, loader, epochs=1, freeze_epochs=1, base_lr=1e-2,
                           key=jax.random.key(0), split_at=SPLIT, bn="eval", unfrozen_bn=mode,
                           callbacks=[capture], progress=False)  # fmt: skip
        ends[mode] = capture.snapshots
    frozen, unfrozen = ends["eval"]
    assert _same(unfrozen["batch_stats"], variables["batch_stats"])  # never updated
    for name in ("conv1", "bn1"):  # weights, BatchNorm scale and bias still train
        assert not _same(unfrozen["params"][name], frozen["params"][name])
    # With 'train' (fastai) the statistics move in phase 2; phase 1 is the same either way.
    assert _same(ends["train"][0], frozen)
    assert not _same(ends["train"][1]["batch_stats"], variables["batch_stats"])


class _StopAfterEpoch(Callback):
    def __init__(self):
        self.epochs = 0

    def on_epoch_end(self, step, state, history):
        self.epochs += 1
        return True


def test_a_stop_in_the_head_only_phase_ends_fine_tune(tiny):
    model, variables, _, _ = tiny
    rng = np.random.default_rng(1)
    loader = ArrayLoader(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                         rng.integers(0, 3, 16).astype(np.int32), 8)  # fmt: skip
    stop = _StopAfterEpoch()
    # The stop comes at phase 1's last epoch, where fit's own end looks the same.
    state, histories = transfer.fine_tune(model, variables, loader, epochs=2, freeze_epochs=1,
                                          key=jax.random.key(0), split_at=SPLIT,
                                          callbacks=[stop], progress=False)  # fmt: skip
    assert stop.epochs == 1 and int(state.step) == 2
    assert set(histories) == {"frozen"}


def test_unfrozen_bn_is_checked_before_any_training(tiny):
    model, variables, images, labels = tiny
    loader = ArrayLoader(images, labels, 4)
    with pytest.raises(ValueError, match="unfrozen_bn must be"):
        transfer.fine_tune(model, variables, loader, epochs=1, key=jax.random.key(0),
                           unfrozen_bn="stats", split_at=SPLIT)  # fmt: skip
    mlp = get_model("mlp", 3)
    with pytest.raises(ValueError, match="frozen_bn"):
        transfer.fine_tune(mlp, numpy_variables(mlp, images[:1]), loader, epochs=1,
                           key=jax.random.key(0), unfrozen_bn="eval")  # fmt: skip


def test_an_optimizer_that_injects_its_rate_is_not_wrapped_again(tiny):
    model, variables, _, _ = tiny
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    for optimizer in (optax.sgd, optax.inject_hyperparams(optax.sgd)):
        _, tx = transfer.freeze_to(model, variables["params"], 0, optimizer, schedule,
                                   split_at=SPLIT)  # fmt: skip
        params = variables["params"]
        ones = jax.tree.map(jnp.ones_like, params)
        state = tx.init(params)
        for i in range(3):  # the schedule's rate, not one frozen at its first value
            updates, state = tx.update(ones, state, params)
            np.testing.assert_allclose(updates["fc"]["bias"], -schedule(i), rtol=1e-6)
            assert float(injected_learning_rate(state)) == pytest.approx(schedule(i))


def test_default_split_knows_each_family():
    assert transfer.default_split(get_model("resnet34", 2)) == transfer.RESNET_SPLIT
    assert transfer.default_split(get_model("resnet20", 2)) == transfer.CIFAR_RESNET_SPLIT
    lite = get_model("efficientnet_lite0", 2)
    assert transfer.default_split(lite) == transfer.EFFICIENTNET_SPLIT
    assert transfer.default_split(get_model("cnn_small", 2)) == ("fc",)


def test_fine_tune_continues_a_step_count_with_label_smoothing():
    model = get_model("mlp", 3)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8)
    loader = ArrayLoader(images, rng.integers(0, 3, 16).astype(np.int32), 8)  # 2 steps an epoch
    variables = numpy_variables(model, images[:1])
    state, histories = transfer.fine_tune(
        model, variables, loader, epochs=1, key=jax.random.key(0), label_smoothing=0.1,
        progress=False, step=6,
    )  # fmt: skip
    assert int(state.step) == 10
    np.testing.assert_array_equal(histories["frozen"]["step"], [6, 7])
    np.testing.assert_array_equal(histories["unfrozen"]["step"], [8, 9])
    np.testing.assert_array_equal(histories["unfrozen"]["epoch"], [4])
    # Step 6 trains on epoch 3's first batch, with the smoothed loss.
    batch = next(loader.epoch(3))
    logits = model.apply(variables, batch["image"] / 255.0)
    expected = np.mean(cross_entropy(logits, batch["label"], label_smoothing=0.1))
    np.testing.assert_allclose(histories["frozen"]["loss"][0], expected, rtol=1e-5)
