"""The Learner: the same bits as the functional core, every method on a tiny folder,
exact resume, export to a fresh process, the README's five lines, and bad input named."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, readme_code, write_color_folder
from PIL import Image

import jaxlearn as jl
from jaxlearn import data, ensemble, pretrained
from jaxlearn.interpret import ClassificationInterpretation
from jaxlearn.learner import Learner, load_learner, vision_learner
from jaxlearn.loop import Callback
from jaxlearn.models import get_model
from jaxlearn.transfer import fastai_adam, optimizer_state_size

SIZE, BATCH = 16, 8  # 16 px images, 19 training images: 2 steps an epoch
# Random augmentation: a learner's key must be what the functional core makes of its seed.
# One object for every learner here, so that they share their compiled train steps.
FLIP = data.random_flip()


def _same(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True)
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/train/{cats,dogs}, 12 colour-coded images each, and a private decoding cache."""
    root = tmp_path_factory.mktemp("pets")
    write_color_folder(root / "train", per_class=12)
    return root


@pytest.fixture(scope="module")
def dls(folder):
    return jl.ImageDataLoaders.from_folder(
        folder, size=SIZE, batch_size=BATCH, augment=FLIP, cache_dir=folder / "cache",
        progress=False,
    )  # fmt: skip


def _learner(dls, tmp_path=None, **kwargs):
    kwargs.setdefault("progress", False)
    return vision_learner(dls, "mlp", pretrained=False, path=tmp_path or ".", **kwargs)


def test_a_learner_run_is_the_functional_core_bit_for_bit(dls, folder):
    mix = data.MixUp(0.4, 2)  # batch-level augmentation on top of the loaders' flips
    learn = _learner(dls, seed=3, batch_augment=mix)
    learn.fit_sgdr(2, cycle_len=1, cycle_mult=2, lr_max=1e-2)

    # The same run by hand: load, carve, loader, schedule, optimizer, state, step, fit.
    pets = data.load_image_folder(folder, "train", SIZE, cache_dir=folder / "cache")
    train, valid = data.carve(pets, 0.8, seed=0)
    loader = jl.ArrayLoader(train.images, train.labels, BATCH, seed=0)
    lr = jl.sgdr(1e-2, cycle_steps=len(loader), cycle_mult=2, num_cycles=2)
    tx = optax.inject_hyperparams(fastai_adam)(learning_rate=lr)
    state = jl.TrainState.create(get_model("mlp", 2), tx, jax.random.key(3), train.images[:1])
    capture = jl.CaptureParams(ensemble.snapshot_steps(lr))
    step = jl.make_train_step(augment=FLIP, batch_augment=mix)
    state, history = jl.fit(state, loader, train_step=step, epochs=3, callbacks=[capture],
                            progress=False)  # fmt: skip

    assert _same(learn.state.params, state.params)
    assert len(learn.snapshots) == 2 and _same(learn.snapshots, capture.snapshots)
    assert int(learn.state.step) == int(state.step) == 3 * len(loader)
    np.testing.assert_array_equal(learn.history["loss"], history["loss"])
    np.testing.assert_array_equal(learn.history["lr"], history["lr"])
    assert np.array_equal(dls.valid_ds.images, valid.images)


def test_new_data_train_at_their_size_as_fastais_progressive_resizing(folder, dls, tmp_path):
    learn = vision_learner(dls, "cnn_small", pretrained=False, path=tmp_path, progress=False)
    learn.fit(1, 1e-2)
    crop = data.compose(FLIP, data.random_resized_crop(24, scale=(0.5, 1.0)))
    learn.dls = jl.ImageDataLoaders.from_folder(
        folder, size=24, batch_size=BATCH, augment=crop, cache_dir=folder / "cache",
        progress=False,
    )  # fmt: skip
    assert learn.image_shape == (24, 24, 3)
    assert learn.train_step is jl.make_train_step(augment=crop)  # the new data's augmentation
    learn.fit(1, 1e-2)
    assert int(learn.state.step) == 2 * len(dls.train) and len(learn.history["loss"]) == 4
    # Data of other steps per epoch: the count moves on to an epoch boundary of theirs.
    fewer = jl.ImageDataLoaders.from_folder(
        folder, size=24, batch_size=5, augment=crop, cache_dir=folder / "cache", progress=False
    )
    per_epoch = len(fewer.train)
    assert (2 * len(dls.train)) % per_epoch  # 4 steps are not whole epochs of 3
    learn.dls = fewer
    learn.fit(1, 1e-2)
    assert int(learn.state.step) % per_epoch == 0 and learn.history["epoch_step"][-1] % 3 == 0
    assert learn.history["step"][-per_epoch] % per_epoch == 0  # the epoch's first batch
    assert learn.predict(folder / "train" / "cats" / "0.png")[0] in learn.classes  # at 24 px
    write_color_folder(tmp_path / "birds" / "train", names=("birds", "dogs"), per_class=4)
    with pytest.raises(ValueError, match=r"classes \['birds', 'dogs'\] are not the learner's"):
        learn.dls = jl.ImageDataLoaders.from_folder(tmp_path / "birds", size=24, batch_size=4,
                                                    cache_dir=tmp_path, progress=False)  # fmt: skip


def test_lr_find_leaves_the_state_unchanged_bit_for_bit(dls):
    learn = _learner(dls)
    learn.freeze()  # the sweep trains the learner's own frozen set
    before = jax.device_get(learn.state)
    found = learn.lr_find(num_steps=12)
    assert found.lrs.shape == (12,) and np.isfinite(found.losses).all()
    assert _same(jax.device_get(learn.state), before)
    assert learn.plot_lr_find().axes[0].get_xscale() == "log"


@pytest.fixture(scope="module")
def trained(dls, tmp_path_factory):
    """A learner taken through fit, fit_sgdr and fine_tune, with error_rate as a metric."""
    learn = _learner(dls, tmp_path_factory.mktemp("learner"), metrics=("accuracy", "error_rate"))
    learn.fit(np.int64(1), 1e-2)  # NumPy integers are epoch counts too
    learn.fit_sgdr(2, cycle_len=1, cycle_mult=2, lr_max=1e-2)
    learn.fine_tune(2)  # as the README's five lines: they reuse its compiled programs
    return learn


def test_fits_run_on_one_step_count_and_sgdr_snapshots_each_cycle(trained):
    steps_per_epoch = len(trained.dls.train)
    # fit 1 epoch, SGDR 1 + 2 epochs, fine_tune 1 frozen + 2 unfrozen: 7 epochs in all.
    np.testing.assert_array_equal(trained.history["step"], np.arange(7 * steps_per_epoch))
    np.testing.assert_array_equal(trained.history["epoch"], np.arange(7))
    assert len(trained.history["eval_error_rate"]) == 7
    np.testing.assert_allclose(
        trained.history["eval_error_rate"], 1 - trained.history["eval_accuracy"], atol=1e-6
    )
    # A snapshot at the bottom of each cycle, where SGDR's rate is 0.
    assert len(trained.snapshots) == 2
    assert trained.history["lr"][2 * steps_per_epoch - 1] == 0.0
    assert trained.history["lr"][4 * steps_per_epoch - 1] == 0.0
    assert trained.frozen == 0  # fine_tune ends unfrozen
    assert trained.plot_losses().axes


def test_freezing_rebuilds_the_optimizer_of_the_state(trained):
    unfrozen = optimizer_state_size(trained.state.opt_state)
    params = trained.state.params
    trained.freeze()
    assert optimizer_state_size(trained.state.opt_state) < unfrozen  # the body keeps no Adam state
    assert _same(trained.state.params, params)
    with pytest.raises(ValueError, match="n must be in"):
        trained.freeze_to(5)
    assert trained.frozen == -1  # unchanged by the refused call
    trained.unfreeze()
    assert optimizer_state_size(trained.state.opt_state) == unfrozen


def test_predictions_validation_tta_ensemble_and_predict(trained, folder):
    result = trained.validate()
    assert set(result) == {"loss", "accuracy", "error_rate"}
    probs, labels = trained.get_preds()
    np.testing.assert_array_equal(labels, trained.dls.valid_ds.labels)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
    tta, _ = trained.tta()
    mirrored, _ = trained.get_preds(trained.dls.valid_ds.images[:, :, ::-1])
    np.testing.assert_allclose(tta, (probs + mirrored) / 2, rtol=1e-5, atol=1e-6)
    ensemble, _ = trained.get_preds(ensemble=True)
    assert ensemble.shape == probs.shape and not np.allclose(ensemble, probs)

    path = folder / "train" / "dogs" / "3.png"
    name, index, p = trained.predict(path)
    assert name == trained.classes[index] == "dogs"
    pixels = np.asarray(Image.open(path))  # 36x40: cropped and resized as the folder was
    np.testing.assert_array_equal(trained.predict(pixels)[2], p)


def test_interpretation_and_show_batch(trained):
    interp = ClassificationInterpretation.from_learner(trained)
    counts = interp.confusion_matrix()
    assert counts.sum() == len(trained.dls.valid_ds)
    np.testing.assert_array_equal(np.diag(counts), np.bincount(
        interp.labels[interp.predictions == interp.labels], minlength=2))  # fmt: skip
    assert len(interp.plot_top_losses(k=4).axes) == 4
    drawn = interp.plot_confusion_matrix().axes[0].images[0].get_array()
    np.testing.assert_array_equal(drawn, counts)
    fig = trained.dls.show_batch(n=4)
    assert sorted(ax.get_title() for ax in fig.axes) == sorted(
        trained.classes[i] for i in trained.dls.one_batch(4)[1]
    )


def test_most_confused_lists_the_mistaken_pairs_most_frequent_first():
    labels = np.array([0, 0, 0, 1, 2])
    probs = np.eye(3)[[1, 1, 2, 0, 2]]  # predicted: b, b, c, a, c
    interp = ClassificationInterpretation(np.zeros((5, 2, 2, 3)), labels, probs, "abc")
    assert interp.most_confused() == [("a", "b", 2), ("a", "c", 1), ("b", "a", 1)]
    assert interp.most_confused(min_val=2) == [("a", "b", 2)]
    # MNIST's labels are uint8: label * C must not wrap at 256 (NumPy 2 keeps uint8).
    labels = np.arange(20, dtype=np.uint8)
    interp = ClassificationInterpretation(np.zeros((20, 2, 2, 3)), labels, np.eye(20), "a" * 20)
    np.testing.assert_array_equal(interp.confusion_matrix(), np.eye(20))
    for bad, match in ((np.eye(20), "class indices"), (labels - 1.0, "class indices"),
                       (np.arange(20) - 1, r"\[0, 20\)")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ClassificationInterpretation(np.zeros((20, 2, 2, 3)), bad, np.eye(20), "a" * 20)


def test_from_tfds_carves_a_stratified_validation_set(tmp_path):
    from tfds_colors import NAME, prepare

    prepared = prepare(tmp_path)  # real array_record files: 12 cats and 12 dogs in 'train'
    dls = jl.ImageDataLoaders.from_tfds(NAME, valid_pct=0.25, size=8, batch_size=4,
                                        data_dir=prepared, progress=False)  # fmt: skip
    assert (len(dls.train_ds), len(dls.valid_ds)) == (18, 6) and not dls.streamed
    assert dls.classes == ("cats", "dogs") and dls.image_shape == (8, 8, 3)
    assert np.bincount(dls.valid_ds.labels).tolist() == [3, 3]  # stratified


class _Interrupt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, step, state, metrics, history):
        if step == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_fit_keeps_its_finished_epochs(dls, tmp_path):
    one = _learner(dls, tmp_path)
    one.fit(1, 1e-2)
    cut = _learner(dls, tmp_path)
    with pytest.raises(KeyboardInterrupt):  # in the second epoch of two
        cut.fit(2, 1e-2, callbacks=[_Interrupt(len(dls.train) + 1)])
    assert int(cut.state.step) == len(dls.train) and _same(cut.state.params, one.state.params)
    np.testing.assert_array_equal(cut.history["loss"], one.history["loss"])
    np.testing.assert_array_equal(cut.history["eval_loss"], one.history["eval_loss"])
    # fine_tune: interrupted in its unfrozen phase, the learner keeps the frozen epoch
    tuned = _learner(dls, tmp_path)
    tuned.freeze()
    with pytest.raises(KeyboardInterrupt):
        tuned.fine_tune(2, callbacks=[_Interrupt(len(dls.train) + 1)])
    assert int(tuned.state.step) == len(dls.train) and tuned.frozen == -1
    assert len(tuned.history["epoch"]) == 1


def test_predictions_run_in_the_learners_compute_dtype(dls, monkeypatch):
    from jaxlearn import ensemble as ensemble_module

    asked = []
    real = ensemble_module.apply_batched

    def recording(*args, **kwargs):
        asked.append(kwargs.get("compute_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ensemble_module, "apply_batched", recording)
    learn = _learner(dls, compute_dtype=jnp.bfloat16)
    learn.get_preds()
    learn.tta()
    assert asked == [jnp.bfloat16, jnp.bfloat16]  # as validate's eval step


def test_fine_tune_takes_the_batch_augmentation_and_runs_on_one_clock(dls, trained):
    plain, mixed = _learner(dls), _learner(dls, batch_augment=data.MixUp(0.4, 2))
    for learn in (plain, mixed):
        learn.fine_tune(1, freeze_epochs=0)
    assert not _same(plain.state.params, mixed.state.params)  # MixUp reached the step
    assert (np.diff(trained.history["time"]) > 0).all()  # seconds since the run's start


def test_save_load_and_an_interrupted_checkpointed_fit_resume_exactly(dls, tmp_path):
    sgdr = dict(n_cycles=2, cycle_len=1, cycle_mult=2, lr_max=1e-2)  # the programs `trained` ran
    whole = _learner(dls, tmp_path)
    whole.fit(1, 1e-2)
    whole.save("one")
    whole.fit_sgdr(**sgdr)

    # Killed mid-run, then the same fit again from the same point: it resumes.
    cut = _learner(dls, tmp_path)
    cut.load("one")
    # Step 2 + 2: the end of the first cycle (a snapshot) and epoch (a checkpoint).
    just_after_a_checkpoint = _Interrupt(2 * len(dls.train) + 1)
    as_f32 = {**sgdr, "lr_max": np.float32(1e-2)}  # the same run: a NumPy rate goes in the config
    with pytest.raises(KeyboardInterrupt):
        cut.fit_sgdr(**as_f32, checkpoint=tmp_path / "ckpt", callbacks=[just_after_a_checkpoint])
    cut.fit_sgdr(**as_f32, checkpoint=tmp_path / "ckpt")

    assert _same(cut.state, whole.state)
    assert len(whole.snapshots) == 2 and _same(cut.snapshots, whole.snapshots)
    for key in ("step", "loss", "lr", "eval_loss"):
        np.testing.assert_array_equal(cut.history[key], whole.history[key])
    with pytest.raises(ValueError, match="another run"):
        cut.fit_sgdr(**{**sgdr, "n_cycles": 3}, checkpoint=tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no saved learner"):
        cut.load("two")


PROBE = """
import json, sys
import numpy as np
from jaxlearn import load_learner
name, index, probs = load_learner(sys.argv[1]).predict(sys.argv[2])
print(json.dumps([name, index, np.asarray(probs).tolist()]))
"""


def test_export_then_load_learner_in_a_fresh_process_predicts_the_same(trained, folder, tmp_path):
    path = trained.export(tmp_path / "pets.jaxlearn")
    image = folder / "train" / "cats" / "5.png"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(image)],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    name, index, probs = json.loads(out.stdout.splitlines()[-1])
    expected = trained.predict(image)
    assert (name, index) == expected[:2]
    np.testing.assert_array_equal(np.asarray(probs, np.float32), expected[2])

    loaded = load_learner(path)
    assert loaded.dls is None and loaded.classes == trained.classes
    with pytest.raises(ValueError, match="has no data"):
        loaded.fit(1)


def test_a_bf16_learner_predicts_as_it_was_validated_after_export(dls, folder, tmp_path):
    learn = _learner(dls, compute_dtype=jnp.bfloat16)
    loaded = load_learner(learn.export(tmp_path / "bf16.jaxlearn"))
    assert loaded.compute_dtype == jnp.bfloat16
    image = folder / "train" / "dogs" / "3.png"
    np.testing.assert_array_equal(loaded.predict(image)[2], learn.predict(image)[2])


def test_a_model_whose_head_is_not_the_datas_classes_is_refused(dls):
    with pytest.raises(ValueError, match="head has 10 outputs for 2 classes"):
        Learner(dls, get_model("mlp", 10), progress=False)


def test_export_refuses_what_a_fresh_process_could_not_rebuild(dls, tmp_path):
    learn = Learner(dls, get_model("mlp", 2), preprocess=lambda x: x / 255.0, progress=False)
    with pytest.raises(ValueError, match=r"preprocess: .*lambda"):
        learn.export(tmp_path / "x.jaxlearn")

    class Local(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2, name="fc")(x.reshape(len(x), -1))

    fc = {"kernel": np.zeros((SIZE * SIZE * 3, 2), np.float32), "bias": np.zeros(2, np.float32)}
    local = Learner(dls, Local(), {"params": {"fc": fc}}, progress=False)  # no init to compile
    with pytest.raises(ValueError, match=r"the model: .*inside a function"):
        local.export(tmp_path / "y.jaxlearn")
    assert not list(tmp_path.iterdir())


def test_the_readmes_five_lines_run(folder, tmp_path):
    code = readme_code("Five lines")
    # The README's folder, size and weights -> the tiny folder, and a tiny model from scratch.
    cache = str(folder / "cache")
    for old, new in (
        ('"../shared/data/cats_and_dogs"', repr(str(folder))),
        ("size=224", f"size={SIZE}, batch_size={BATCH}, augment=FLIP, cache_dir={cache!r}"),
        ('"efficientnet_lite0"', '"mlp", pretrained=False, progress=False'),
        ('"cats_dogs.jaxlearn"', repr(str(tmp_path / "cats_dogs.jaxlearn"))),
    ):
        assert old in code
        code = code.replace(old, new)
    scope = {"FLIP": FLIP}
    exec(compile(code, "README.md", "exec"), scope)
    probs, labels, learn = scope["probs"], scope["labels"], scope["learn"]
    assert probs.shape == (len(labels), 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # fine_tune(2) is 6 steps here at its small default rates: too few to turn a random
    # init's guess (all one class, or colour backwards, by the PRNG's draws) into an
    # accuracy worth asserting on 5 images; the validation loss falls every epoch.
    assert np.all(np.diff(learn.history["eval_loss"]) < 0)
    assert load_learner(tmp_path / "cats_dogs.jaxlearn").classes == ("cats", "dogs")


def test_bad_input_is_named(folder, dls, tmp_path, monkeypatch):
    kwargs = dict(size=SIZE, batch_size=BATCH, cache_dir=tmp_path / "cache", progress=False)
    one = tmp_path / "one" / "train" / "cats"
    one.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(one / f"{i}.png")
    with pytest.raises(ValueError, match=r"at least 2 classes .*\['cats'\]"):
        jl.ImageDataLoaders.from_folder(tmp_path / "one", **kwargs)
    for name in ("cats", "dogs"):
        (tmp_path / "empty" / "train" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        jl.ImageDataLoaders.from_folder(tmp_path / "empty", **kwargs)
    write_color_folder(tmp_path / "three" / "train", per_class=2)
    write_color_folder(tmp_path / "three" / "valid", names=("cats", "birds"), per_class=2)
    with pytest.raises(ValueError, match=r"\['birds'\] in .*valid have no folder in .*train"):
        jl.ImageDataLoaders.from_folder(tmp_path / "three", **kwargs)
    for pct in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="valid_pct must lie in"):
            jl.ImageDataLoaders.from_folder(folder, valid_pct=pct, **kwargs)

    with pytest.raises(ValueError, match=r"arch must be one of .*'resnet9000'"):
        vision_learner(dls, "resnet9000")
    gone = dataclasses.replace(pretrained.WEIGHTS["efficientnet_lite0"], package="no-such-weights")
    monkeypatch.setitem(pretrained.WEIGHTS, "efficientnet_lite0", gone)
    with pytest.raises(FileNotFoundError, match=r"not installed.*pretrained=False"):
        vision_learner(dls, "efficientnet_lite0")
    with pytest.warns(UserWarning, match="no pretrained weights for 'mlp'"):
        learn = vision_learner(dls, "mlp", progress=False)

    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes.txt cannot be read as an image: not an image"):
        learn.predict(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no image file"):
        learn.predict(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"uint8 array .* got float32 \(16, 16, 3\)"):
        learn.predict(np.full((SIZE, SIZE, 3), 200.0, np.float32))  # 0-255 floats: refused
    with pytest.raises(ValueError, match=r"slice\(lo, hi\)"):
        learn.fit(1, slice(1e-3))
    with pytest.raises(ValueError, match="metrics must be"):
        _learner(dls, metrics=("f1",))
    import functools

    top = lambda probs, labels, k: float(np.mean(np.argsort(-probs)[:, :k] == labels[:, None]))
    with pytest.raises(ValueError, match="two metrics are named 'partial'"):
        _learner(dls, metrics=(functools.partial(top, k=1), functools.partial(top, k=2)))
    with pytest.raises(ValueError, match=r"targets of 3 classes, the data has 2"):
        _learner(dls, batch_augment=data.CutMix(1.0, 3))
    with pytest.raises(ValueError, match="ensemble=True needs snapshots"):
        learn.get_preds(ensemble=True)

    class Unnamed(nn.Module):  # no module named 'fc': one layer group for all
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(4)(x.reshape(x.shape[0], -1))
            return nn.Dense(2)(x)

    anonymous = Learner(dls, Unnamed(), progress=False)
    anonymous.fit(1, 1e-2)  # unfrozen at one rate: fine
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] .* hold none"):
        anonymous.freeze()
    with pytest.raises(ValueError, match="hold none"):
        anonymous.fit(1, slice(1e-4, 1e-2))
    with pytest.raises(ValueError, match="must take its rate as `learning_rate`"):
        _learner(dls, opt=lambda lr: optax.sgd(lr, momentum=0.9))
