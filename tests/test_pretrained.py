"""Weight conversion: torchvision-named PyTorch ResNets -> Flax, files, cache, bad input.

The PyTorch reference below is a minimal re-implementation of torchvision's
ResNet with torch.nn modules and torchvision's exact parameter names
(conv1, bn1, layerK.J.{conv,bn}N, layerK.J.downsample.{0,1}, fc): torchvision's
wheels on these machines are CUDA builds that fail to import, so it cannot be
the reference itself.
"""

import copy
import io
import urllib.error
import urllib.request

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compilations
from model_init import jit_apply

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch (CPU build)")
tnn = torch.nn

from jaxlearn import pretrained  # noqa: E402
from jaxlearn.models import CifarResNet, get_model  # noqa: E402


class TorchBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # torchvision v1.5
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.fc = tnn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = tnn.Sequential(
                tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                tnn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        """Logits and the NHWC activations after the stem and each stage."""
        stages = {"stem": self.maxpool(torch.relu(self.bn1(self.conv1(x))))}
        x = stages["stem"]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = stages[name] = getattr(self, name)(x)
        logits = self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))
        return logits, {k: v.permute(0, 2, 3, 1).numpy() for k, v in stages.items()}


TORCH_ARCHS = {
    "resnet18": (TorchBasicBlock, (2, 2, 2, 2)),
    "resnet50": (TorchBottleneck, (3, 4, 6, 3)),
}


def random_torch_resnet(name, num_classes=1000, seed=0):
    """A reference ResNet with random weights and randomised BatchNorm affine and statistics.

    Running statistics start as the batch statistics of random images (so every
    layer sees inputs of a sensible scale) and are then scaled by random factors.
    Each block's last BatchNorm scale is drawn from [0.1, 0.3], as in trained
    ResNets, where residual branches are small: with scales near 1 the residual
    stream of ResNet-50 grows to ~30 and float32 PyTorch itself then differs
    from its own float64 result by 1e-3, which no port can beat.
    """
    torch.manual_seed(seed)
    block, layers = TORCH_ARCHS[name]
    net = TorchResNet(block, layers, num_classes)
    bns = [m for m in net.modules() if isinstance(m, tnn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None  # cumulative average: one batch -> its statistics
        for block in net.modules():
            if isinstance(block, TorchBasicBlock | TorchBottleneck):
                (block.bn3 if isinstance(block, TorchBottleneck) else block.bn2).weight.uniform_(
                    0.1, 0.3
                )
        net.train()(torch.rand(4, 3, 64, 64))
        for bn in bns:
            bn.running_mean.mul_(torch.empty_like(bn.running_mean).uniform_(0.8, 1.2))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.2))
    return net.eval()


def numpy_state_dict(net):
    return {k: v.numpy() for k, v in net.state_dict().items()}


def flax_forward(model, variables, images_nchw):
    x = jnp.asarray(images_nchw.permute(0, 2, 3, 1).numpy())
    logits, state = jit_apply(model, train=False, mutable=["intermediates"])(variables, x)
    return np.asarray(logits), {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}


@pytest.fixture(scope="module")
def resnet18_torch():
    return random_torch_resnet("resnet18")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_converted_resnet_matches_torch_logits_and_stages(name):
    net = random_torch_resnet(name)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits, want_stages = net(images)
    model = get_model(name, num_classes=1000)
    variables = pretrained.convert_state_dict(numpy_state_dict(net), model)
    logits, stages = flax_forward(model, variables, images)
    assert set(stages) == set(want_stages)
    for stage, want in want_stages.items():
        assert stages[stage].shape == want.shape
        np.testing.assert_allclose(stages[stage], want, atol=1e-4, rtol=0, err_msg=stage)
    assert np.abs(want_logits.numpy()).max() > 0.1  # a real comparison, not of near-zeros
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4, rtol=0)


def test_conversion_copies_the_callers_arrays_and_compiles_nothing(resnet18_torch):
    # A live torch model's `.numpy()` arrays share its memory, which its next training
    # step overwrites in place: the converted variables must not change with them. The
    # copy and the cast are host work, no XLA program per weight shape (a 7-class head
    # is a shape no other test converts, so no earlier test compiled one for it).
    net = copy.deepcopy(resnet18_torch)
    state_dict = numpy_state_dict(net)
    rng = np.random.default_rng(0)
    state_dict["fc.weight"] = rng.normal(size=(7, 512)).astype(np.float32)
    state_dict["fc.bias"] = rng.normal(size=7).astype(np.float32)
    model = get_model("resnet18", num_classes=7)
    with count_compilations() as compiles:
        variables = pretrained.convert_state_dict(state_dict, model)
    assert len(compiles) == 0
    scale = np.array(variables["params"]["bn1"]["scale"])
    with torch.no_grad():
        net.bn1.weight.add_(1.0)  # in place, as an optimizer step
    assert state_dict["bn1.weight"][0] == net.bn1.weight[0]  # the caller's array moved too
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], scale)


def test_round_trip_pth_to_flax_to_file_and_back(resnet18_torch, tmp_path):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = resnet18_torch(images)
    torch.save(resnet18_torch.state_dict(), tmp_path / "w.pth")
    model = get_model("resnet18", num_classes=1000)
    variables = pretrained.load_torch_weights(tmp_path / "w.pth", model)
    path = pretrained.save_variables(tmp_path / "cache" / "r18.msgpack", variables)
    loaded = pretrained.load_variables(path, model)
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    logits, _ = flax_forward(model, loaded, images)
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=0)


def test_safetensors_read_without_torch_gives_the_same_arrays(
    resnet18_torch, tmp_path, monkeypatch
):
    from safetensors.numpy import save_file

    state = numpy_state_dict(resnet18_torch)
    save_file(state, str(tmp_path / "w.safetensors"))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    read = pretrained.load_state_dict(tmp_path / "w.safetensors")
    assert read.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(read[k], state[k])


def test_pth_read_without_torch_gives_the_same_arrays(resnet18_torch, tmp_path, monkeypatch):
    state = numpy_state_dict(resnet18_torch)
    torch.save(resnet18_torch.state_dict(), tmp_path / "w.pth")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    read = pretrained.load_state_dict(tmp_path / "w.pth")
    assert type(read) is dict and list(read) == list(state)
    for k in state:
        assert read[k].dtype == state[k].dtype, k
        np.testing.assert_array_equal(read[k], state[k])


def test_weights_for_another_arch_or_class_count_name_keys_and_shapes(resnet18_torch):
    state = numpy_state_dict(resnet18_torch)
    with pytest.raises(ValueError) as info:
        pretrained.convert_state_dict(state, get_model("resnet18", num_classes=10))
    assert "fc.weight: file (1000, 512), model (10, 512)" in str(info.value)
    assert "fc.bias: file (1000,), model (10,)" in str(info.value)
    with pytest.raises(ValueError) as info:
        pretrained.convert_state_dict(state, get_model("resnet50", num_classes=1000))
    report = str(info.value)
    assert "missing" in report and "layer1.0.conv3.weight (256, 64, 1, 1)" in report
    assert "mis-shaped" in report and "layer1.0.conv1.weight: file (64, 64, 3, 3)" in report
    extra = {**state, "head.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\):\n  head.weight \(3, 3\)"):
        pretrained.convert_state_dict(extra, get_model("resnet18", num_classes=1000))


def test_corrupt_files_raise_and_load_nothing(resnet18_torch, tmp_path):
    buffer = io.BytesIO()
    torch.save(resnet18_torch.state_dict(), buffer)
    (tmp_path / "cut.pth").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1\xc1 definitely not msgpack")
    for name in ("cut.pth", "junk.safetensors"):
        with pytest.raises(ValueError, match="not a readable"):
            pretrained.load_state_dict(tmp_path / name)
    with pytest.raises(ValueError, match="not a readable"):
        pretrained.load_variables(tmp_path / "junk.msgpack")
    with pytest.raises(FileNotFoundError, match="path"):
        pretrained.load_state_dict(tmp_path / "absent.pth")
    torch.save({"nested": {"w": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="flat mapping"):
        pretrained.load_state_dict(tmp_path / "nested.pth")


def test_load_variables_checks_the_model(tmp_path):
    model = get_model("resnet20", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    path = pretrained.save_variables(tmp_path / "r20.msgpack", flax.core.freeze(variables))
    with pytest.raises(ValueError, match=r"params/fc/kernel: file \(64, 10\), model \(64, 5\)"):
        pretrained.load_variables(
            path, get_model("resnet20", num_classes=5), input_shape=(1, 32, 32, 3)
        )


def _serve(payload):
    """A stand-in for urllib.request.urlopen that serves `payload` and records the URLs."""
    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(payload)

    return urlopen, calls


def test_download_checks_sha256_and_caches_the_converted_weights(
    resnet18_torch, tmp_path, monkeypatch
):
    import hashlib

    buffer = io.BytesIO()
    torch.save(resnet18_torch.state_dict(), buffer)
    payload = buffer.getvalue()
    url = f"https://example.invalid/models/resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    monkeypatch.setitem(pretrained.TORCHVISION_URLS, "resnet18", url)
    urlopen, calls = _serve(payload)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    variables = pretrained.torchvision_variables("resnet18", cache_dir=tmp_path)
    assert calls == [url]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        url.rsplit("/", 1)[1],
        url.rsplit("/", 1)[1] + ".msgpack",
    ]
    want = pretrained.convert_state_dict(
        numpy_state_dict(resnet18_torch), get_model("resnet18", 1000)
    )
    cached = pretrained.torchvision_variables("resnet18", cache_dir=tmp_path)
    assert calls == [url]  # the second call read the converted cache, no download
    for a, b, c in zip(
        jax.tree.leaves(variables), jax.tree.leaves(cached), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_download_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    urlopen, _ = _serve(b"not the checkpoint")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(ValueError, match="expected a prefix f37072fd"):
        pretrained.download_checkpoint(pretrained.TORCHVISION_URLS["resnet18"], tmp_path)


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        pretrained.torchvision_variables("resnet50", cache_dir=tmp_path)
    assert str(tmp_path / "resnet50-0676ba61.pth") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_imagenet_normalize_matches_torchvision_constants():
    images = np.full((1, 2, 2, 3), 255, np.uint8)
    out = pretrained.imagenet_normalize(images)
    want = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[0, 0, 0], want, rtol=1e-6)
    np.testing.assert_allclose(pretrained.imagenet_normalize(images / 255.0), out, rtol=1e-6)
    for dtype in (np.int32, np.uint16):  # any integer pixels are 0-255, as `to_float` reads them
        np.testing.assert_array_equal(pretrained.imagenet_normalize(images.astype(dtype)), out)


def test_a_models_template_is_traced_once_per_model_and_input_shape(monkeypatch):
    traced = []
    trace = pretrained._trace_template
    monkeypatch.setattr(
        pretrained,
        "_trace_template",
        lambda model, shape: traced.append(shape) or trace(model, shape),
    )
    first = pretrained._template(CifarResNet(depth=8, num_classes=11), (1, 16, 16, 3))
    again = pretrained._template(
        CifarResNet(depth=8, num_classes=11), [1, 16, 16, 3]
    )  # equal model
    assert len(traced) == 1 and again == first and again is not first
    first.clear()  # the caller's copy: the kept template stays whole
    assert pretrained._template(CifarResNet(depth=8, num_classes=11), (1, 16, 16, 3)) == again
    other = pretrained._template(CifarResNet(depth=8, num_classes=12), (1, 16, 16, 3))
    assert len(traced) == 2 and other[("params", "fc", "bias")].shape == (12,)
