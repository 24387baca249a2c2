"""Models: parameter counts against the published figures, shapes, dtypes, BatchNorm
conventions, option-A shortcuts, dropout, the registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_init import jit_apply, numpy_variables

from jaxlearn.models import MODELS, BasicBlock, CifarResNet, SimpleCNN, get_model
from jaxlearn.models.layers import BatchNorm, add_relu, conv, max_pool_2x2


def count(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def shapes(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


# torchvision's published `num_params` of the ImageNet models.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_resnet_parameter_counts(name):
    variables = shapes(get_model(name, 1000), jnp.zeros((1, 64, 64, 3)))
    assert count(variables["params"]) == TORCHVISION_PARAMS[name]


def test_cifar_resnet_parameter_counts():
    variables = shapes(get_model("resnet20", 10), jnp.zeros((1, 32, 32, 3)))
    # The paper's "0.27M" with option A; option-B projections would add 2,752 (272,474).
    assert count(variables["params"]) == 269_722
    assert not any("downsample" in str(p) for p in jax.tree_util.tree_leaves_with_path(variables))
    assert (
        count(shapes(get_model("resnet110", 10), jnp.zeros((1, 32, 32, 3)))["params"]) == 1_727_962
    )
    # ResNet-9, 10 classes: 3x3 convs 6,563,520 + BatchNorm scale/bias 4,480 + fc 5,130.
    assert count(shapes(get_model("resnet9", 10), jnp.zeros((1, 32, 32, 3)))["params"]) == 6_573_130
    mlp = shapes(get_model("mlp", 10), jnp.zeros((1, 28, 28, 1)))  # 784-20-10
    assert count(mlp["params"]) == 784 * 20 + 20 + 20 * 10 + 10


@pytest.mark.parametrize(
    ("name", "size", "features"),
    [
        ("resnet18", 64, 512),
        ("resnet50", 64, 2048),
        ("resnet20", 32, 64),
        ("cnn_small", 64, 256),
        ("cnn_medium", 224, 512),
        ("cnn_large", 96, 512),
        ("resnet9", 32, 512),
        ("efficientnet_lite0", 64, 1280),
    ],
)
def test_registry_models_give_logits_and_features(name, size, features):
    model = get_model(name, num_classes=7)
    x = jnp.zeros((2, size, size, 3))
    variables = shapes(model, x)
    assert set(variables) == {"params", "batch_stats"}
    logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    feats = jax.eval_shape(lambda v: model.apply(v, x, train=False, features_only=True), variables)
    assert feats.shape == (2, features)


@pytest.mark.parametrize(
    ("name", "size"), [("resnet10", 32), ("resnet50", 32), ("resnet20", 16), ("cnn_small", 16),
                       ("mlp", 28), ("efficientnet_lite0", 32), ("resnet9", 16)],
)  # fmt: skip
def test_dtype_reaches_every_convolution_and_matmul(name, size):
    # Mixed precision is the model's dtype (make_train_step clones the model with it): a
    # layer that is not given the dtype would silently compute in float32.
    channels = 1 if name == "mlp" else 3
    x = jnp.zeros((2, size, size, channels), jnp.float32)
    model = get_model(name, 3, dtype=jnp.bfloat16)
    variables = shapes(model, x)
    text = jax.jit(lambda v: model.apply(v, x, train=False)).lower(variables).as_text()
    ops = [line for line in text.splitlines() if "stablehlo.convolution" in line
           or "stablehlo.dot_general" in line]  # fmt: skip
    assert ops
    for op in ops:
        operands = op.rsplit(" : ", 1)[-1].split("->")[0]
        assert "bf16" in operands and "f32" not in operands, op
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    variables = numpy_variables(CifarResNet(depth=8, num_classes=4), x)
    bf16 = CifarResNet(depth=8, num_classes=4, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes(bf16, x)))
    out = jit_apply(bf16, train=False)(variables, x)
    assert out.dtype == jnp.float32
    want = jit_apply(CifarResNet(depth=8, num_classes=4), train=False)(variables, x)
    np.testing.assert_allclose(out, want, atol=0.05 * float(np.abs(want).max()))
    assert not np.array_equal(out, want)  # bf16 really was used


def test_batchnorm_is_torch_momentum_0_1_and_eps_1e_5():
    model = SimpleCNN(widths=(4,), num_classes=2)
    x = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    variables = numpy_variables(model, x)
    _, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    conv_out = np.asarray(state["intermediates"]["stage1_conv1"]["__call__"][0])
    stats = state["batch_stats"]["stage1_bn1"]
    np.testing.assert_allclose(stats["mean"], 0.1 * conv_out.mean((0, 1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv_out.var((0, 1, 2)), rtol=1e-5)
    variables["batch_stats"]["stage1_bn1"]["var"] = np.full(4, 1e-5, np.float32)
    _, state = model.apply(
        variables, x, train=False, mutable=["intermediates"], capture_intermediates=True
    )
    bn_out = np.asarray(state["intermediates"]["stage1_bn1"]["__call__"][0])
    np.testing.assert_allclose(
        bn_out, conv_out / np.sqrt(2e-5), rtol=1e-4
    )  # (x - 0) / sqrt(var + eps)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = BasicBlock(planes=8, stride=2, shortcut="pad")
    x = np.random.default_rng(0).random((1, 4, 4, 4), dtype=np.float32)
    variables = numpy_variables(block, x)
    assert "downsample_0" not in variables["params"]
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: np.zeros_like(v) if p[-1].key == "kernel" else v, variables
    )  # residual branch 0: the output is relu(shortcut)
    out = np.asarray(block.apply(variables, x, train=False))
    assert out.shape == (1, 2, 2, 8)
    np.testing.assert_array_equal(out[..., 2:6], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(out[..., [0, 1, 6, 7]], 0.0)


def test_zero_init_residual_zeroes_the_last_batchnorm_scale():
    x = jnp.zeros((1, 4, 4, 4))
    variables = BasicBlock(planes=4, zero_init_residual=True).init(
        jax.random.key(0), x, train=False
    )
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], 1.0)


def test_dropout_draws_from_the_dropout_stream_only_in_training():
    model = SimpleCNN(widths=(4,), num_classes=2, dropout=0.5)
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    variables = numpy_variables(model, x)

    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]

    assert not np.array_equal(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_mlp_flattens_its_input():
    model = get_model("mlp", 10, features=(20,))
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    variables = numpy_variables(model, x)
    np.testing.assert_array_equal(
        model.apply(variables, x), model.apply(variables, x.reshape(2, 784))
    )


def test_cnn_presets_take_other_widths_and_refuse_images_too_small_for_their_stages():
    # The preset's widths are a default: a fifth stage keeps one conv a stage.
    model = get_model("cnn_small", 2, widths=(4, 8, 8, 8, 16))
    params = shapes(model, jnp.zeros((1, 32, 32, 3)))["params"]
    assert sorted(k for k in params if k.startswith("stage")) == [
        f"stage{i}_{layer}1" for i in range(1, 6) for layer in ("bn", "conv")
    ]
    assert params["fc"]["kernel"].shape == (16, 2)
    # 5 stages halve 32 px to 1 px; at 31 px the last map would be empty (a NaN mean).
    assert model.min_size == 32
    with pytest.raises(ValueError, match="SimpleCNN needs images of at least 32 px"):
        shapes(model, jnp.zeros((1, 31, 40, 3)))
    assert get_model("resnet9", 2, stem_pool=True).min_size == 16  # 4 pools


@pytest.mark.parametrize("name", ["cnn_small", "resnet9", "resnet20", "resnet18",
                                  "efficientnet_lite0"])  # fmt: skip
def test_image_models_refuse_what_is_not_an_nhwc_batch(name):
    # Flax would build the first kernel from whatever came: (N, 28, 28) as one 28-channel
    # image, (N, 3, H, W) as images 3 px high with H channels, and train on it.
    model = get_model(name, 10)
    for bad, match in (((8, 28, 28), r"\(N, H, W, C\), got shape \(8, 28, 28\)"),
                       ((4, 3, 32, 32), "channels-first"), ((4, 1, 32, 32), "channels-first"),
                       ((4, 4, 4, 3), "at least")):  # fmt: skip
        if match == "at least" and name in ("resnet20", "resnet18", "efficientnet_lite0"):
            continue  # strided convolutions and adaptive pooling take any size
        with pytest.raises(ValueError, match=match):
            shapes(model, jnp.zeros(bad))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "efficientnet_lite0"])
def test_frozen_bn_names_that_are_no_module_are_refused(name):
    model = get_model(name, 10)
    for known in ((), ("layer1_0",) if "resnet" in name else ("stage1_0",)):
        shapes(model.clone(frozen_bn=known), jnp.zeros((1, 32, 32, 3)))
    for typo in ("layer1", "layer1.0", "stage1"):  # a stage's, torch's, a stage's
        with pytest.raises(ValueError, match=rf"frozen_bn names no module .*'{typo}'"):
            shapes(model.clone(frozen_bn=(typo,)), jnp.zeros((1, 32, 32, 3)))


def test_bad_names_and_depths_are_errors():
    with pytest.raises(ValueError, match="name must be one of"):
        get_model("resnet19", 10)
    with pytest.raises(ValueError, match="depth must be 6n"):
        CifarResNet(depth=21)
    for bad in (0, 2.0, True):  # an empty head would fail in Flax's init with 1 / 0
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            jax.eval_shape(get_model("mlp", bad).init, jax.random.key(0), jnp.zeros((1, 4)))
    assert {"resnet18", "resnet50", "resnet20", "resnet110", "cnn_small", "mlp"} <= set(MODELS)


# The layers with hand-written backward passes against the plain formulations they replace.


def _vjp(f, *args):
    """f(*args) and its gradients for a fixed random cotangent."""
    out, pullback = jax.vjp(f, *args)
    g = np.random.default_rng(1).standard_normal(jnp.shape(out)).astype(np.float32)
    return out, pullback(jnp.asarray(g, out.dtype))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2)])
def test_max_pool_2x2_is_nn_max_pool(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # no ties
    want, (want_dx,) = _vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
    got, (got_dx,) = _vjp(max_pool_2x2, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_dx, want_dx)
    # A block of tied maxima gives each of them the block's gradient.
    (dx,) = jax.vjp(max_pool_2x2, jnp.zeros((1, 2, 2, 1)))[1](jnp.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(dx, 1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_is_flax_batch_norm(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.standard_normal((4, 5, 5, 6)) + 1, dtype)
    params = {"scale": 1 + rng.random(6, np.float32), "bias": rng.standard_normal(6, np.float32)}
    stats = {"mean": rng.random(6, np.float32), "var": 1 + rng.random(6, np.float32)}
    kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)

    def run(module, train):
        def f(params, x):
            variables = {"params": params, "batch_stats": stats}
            y, new = module(use_running_average=not train, **kw).apply(
                variables, x, mutable=["batch_stats"]
            )
            return jnp.maximum(y, 0).astype(jnp.float32), new  # with the ReLU that follows it

        y, pullback, new = jax.vjp(f, params, x, has_aux=True)
        g = rng.standard_normal(y.shape).astype(np.float32)
        return y, new, pullback(jnp.asarray(g))

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for train in (True, False):
        rng = np.random.default_rng(1)
        want_y, want_stats, want_grads = run(nn.BatchNorm, train)
        rng = np.random.default_rng(1)
        got_y, got_stats, got_grads = run(BatchNorm, train)
        np.testing.assert_array_equal(got_y, want_y)
        jax.tree.map(np.testing.assert_array_equal, got_stats, want_stats)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), **tol
            ),
            got_grads,
            want_grads,
        )


def test_add_relu_is_relu_of_the_sum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 4, 5)).astype(np.float32)
    shortcut = np.maximum(rng.standard_normal(x.shape), 0).astype(np.float32)  # half zeros
    x[0, 0, 0] = -shortcut[0, 0, 0]  # sums of exactly 0
    want, want_grads = _vjp(lambda x, s: jax.nn.relu(x + s), x, shortcut)
    got, got_grads = _vjp(add_relu, x, shortcut)
    np.testing.assert_array_equal(got, want)
    jax.tree.map(np.testing.assert_array_equal, got_grads, want_grads)


@pytest.mark.parametrize(
    ("hw", "kernel", "stride", "padding"),
    [((1, 1), 3, 1, "torch"), ((2, 2), 3, 1, "torch"), ((2, 3), 3, 2, "torch"),
     ((4, 4), 3, 2, "torch"), ((3, 3), 3, 1, "torch"), ((5, 4), 7, 2, "torch"),
     ((2, 2), 3, 2, "same"), ((3, 1), 3, 1, "same")],
)  # fmt: skip
def test_small_map_convolution_is_the_convolution(hw, kernel, stride, padding):
    # Outputs of fewer pixels than the kernel are computed as a dot of patches (all but
    # the (3, 3) map, whose 9 outputs take the convolution itself): same values, same
    # gradients for the input and the kernel.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *hw, 5)).astype(np.float32)
    kernel_value = rng.standard_normal((kernel, kernel, 5, 4)).astype(np.float32)
    layer = conv(4, kernel, stride, name="c", padding=padding)
    plain = layer.clone(conv_general_dilated=None)  # flax's lax.conv_general_dilated
    variables = {"params": {"kernel": kernel_value}}
    want, want_grads = _vjp(jax.jit(plain.apply), variables, x)  # jitted: 49 taps at 7x7
    got, got_grads = _vjp(jax.jit(layer.apply), variables, x)
    assert got.shape == want.shape
    for a, b in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads)),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_small_maps_compile_to_no_swapped_convolutions():
    # XLA swaps the input and the kernel of a convolution whose output has fewer pixels
    # than its kernel, and XLA:CPU runs the swapped form as a naive loop (ResNet-10's
    # train step at 32 px: 108 ms instead of 27, benchmarks/results/small_maps.json).
    # ResNet-10 at 32 px ends on 2x2 and 1x1 maps; its compiled gradient must hold no
    # swapped convolution (window reversed, or the output's feature dimension first), in
    # the forward or the backward.
    model = get_model("resnet10", 2)
    x = jnp.zeros((2, 32, 32, 3))
    variables = numpy_variables(model, x)

    def loss(v):
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0].sum()

    text = jax.jit(jax.grad(loss)).lower(variables).compile().as_text()
    convs = [line for line in text.splitlines() if " convolution(" in line]
    assert convs
    assert not [c for c in convs if "rhs_reversal" in c or "->f01b" in c]
