"""StreamLoader: ArrayLoader's batches from files decoded by Grain, exact resume, 2 processes.

Also run as a script (`python tests/test_stream.py ROOT OUT PORT PID`): one of the two
processes of `test_two_processes_read_disjoint_shards_of_the_one_process_batches`.
"""

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlearn.data import (
    ArrayLoader,
    ImageFolderSource,
    StreamLoader,
    TfdsSource,
    folder_loader,
    load_image_folder,
)

# The test extra installs Grain; a machine set up without it (the GPU check's) skips these.
pytest.importorskip("grain", reason='StreamLoader needs Grain: pip install "jaxlearn[stream]"')

SIZE, BATCH = 8, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ROOT/train with 2 classes of 9 PNGs of 36x40 px (not square: the loaders crop)."""
    from conftest import write_color_folder

    root = tmp_path_factory.mktemp("stream")
    write_color_folder(root / "train", per_class=9)
    return root


def _host(batches) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def _assert_batches_equal(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            assert a[k].dtype == b[k].dtype, k


@pytest.mark.parametrize("train", [True, False])
def test_batches_equal_array_loader_and_resume_anywhere(folder, train):
    data = load_image_folder(folder, "train", SIZE, cache=False, progress=False)
    arrays = ArrayLoader(data.images, data.labels, BATCH, seed=3, train=train)
    # threads=1: batches decoded ahead in a thread, as by default
    stream = StreamLoader(ImageFolderSource(folder, "train"), BATCH, SIZE, seed=3, train=train)
    assert len(stream) == len(arrays) == (4 if train else 5)  # 18 examples
    for epoch, start in [(0, 0), (1, 0), (1, 2), (2, 3)]:  # runs on, then restarts twice
        want = _host(arrays.epoch(epoch, start))
        _assert_batches_equal(_host(stream.epoch(epoch, start)), want)
    if not train:  # the padded last batch: 18 = 4 * 4 + 2
        np.testing.assert_array_equal(want[-1]["mask"], np.arange(BATCH) < 2)
    batch = next(iter(stream.epoch(0)))
    assert batch["image"].sharding.is_equivalent_to(
        jax.sharding.NamedSharding(stream.mesh, jax.sharding.PartitionSpec("data")), 4
    )
    stream.close()


def test_broken_files_are_counted_replaced_in_training_and_masked_in_evaluation(tmp_path):
    from conftest import write_color_folder

    write_color_folder(tmp_path / "train", per_class=3)
    (tmp_path / "train" / "cats" / "empty.png").write_bytes(b"")
    (tmp_path / "train" / "dogs" / "notes.png").write_text("not an image")
    source = ImageFolderSource(tmp_path, "train")  # 8 files, 2 of them broken
    train = StreamLoader(source, 4, SIZE, seed=1, threads=0)
    with pytest.warns(UserWarning, match="skipped 2 of 8 files: 1 empty file, 1 not an image"):
        batches = _host(train.epoch(0))
    assert len(batches) == 2 and all(len(b["label"]) == 4 for b in batches)
    images = np.concatenate([b["image"] for b in batches]).reshape(8, -1)
    assert len(np.unique(images, axis=0)) == 6  # the 6 readable files, each broken slot refilled
    assert sorted(train.skipped.values()) == ["empty file", "not an image"]
    evaluation = StreamLoader(source, 4, SIZE, train=False, threads=0)
    with pytest.warns(UserWarning, match="skipped 2 of 8"):
        batches = _host(evaluation)
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(np.flatnonzero(~mask), sorted(evaluation.skipped))
    with warnings.catch_warnings():  # the next epoch meets no new broken file: no warning
        warnings.simplefilter("error")
        _host(train.epoch(1))
    # Predictions regroup the readable images into chunks of the forward's size: batches
    # of 1 (two of them all padding) become chunks of 4 and of 2 padded to 4.
    from jaxlearn.learner import _readable_chunks

    ones = StreamLoader(source, 1, SIZE, train=False, threads=0)
    with pytest.warns(UserWarning, match="skipped 2 of 8"):
        chunks = list(_readable_chunks(ones, 4))
    assert [(len(x), rows) for x, _, _, rows in chunks] == [(4, 4), (4, 2)]
    np.testing.assert_array_equal(
        np.concatenate([i for _, _, i, _ in chunks]), np.flatnonzero(mask)
    )
    readable = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(np.concatenate([x[:r] for x, _, _, r in chunks]), readable)
    assert not chunks[1][0][2:].any()  # the padding rows are zeros


def test_killed_and_resumed_fit_is_bit_identical(tmp_path):
    """fit to step 3 (checkpointed, mid-epoch 1), a fresh loader and the checkpoint, on to 6.

    The state and the train step are core_worker's (batch 16 of 8x8 images), so the
    program is the one the ArrayLoader resume tests compile.
    """
    from conftest import write_color_folder
    from core_worker import make_run

    from jaxlearn.checkpoint import Checkpointer
    from jaxlearn.loop import Checkpoint, fit

    write_color_folder(tmp_path / "train", per_class=16)  # 32 images: 2 steps an epoch

    def run(steps: int, ckpt: Checkpointer | None):
        state, _, step = make_run(batch_size=16)
        loader = StreamLoader(ImageFolderSource(tmp_path, "train"), 16, SIZE, seed=5, threads=0)
        history = None
        if ckpt is not None and ckpt.latest_step() is not None:
            restored = ckpt.restore(state)
            state, history = restored["state"], restored["history"]
        callbacks = [Checkpoint(ckpt, every_steps=2)] if ckpt is not None else []
        state, _ = fit(
            state, loader, train_step=step, steps=steps, history=history,
            callbacks=callbacks, progress=False,
        )  # fmt: skip
        return jax.device_get(state.params)

    straight = run(6, None)
    ckpt = Checkpointer(tmp_path / "ckpt")
    run(3, ckpt)  # stopped after step 3, as if killed: the next run restores its checkpoint
    resumed = run(6, ckpt)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_random_crops_replay_per_epoch_and_bad_arguments_are_refused(folder):
    source = ImageFolderSource(folder, "train")
    loader = StreamLoader(source, BATCH, SIZE, crop="random", seed=2, threads=0)
    first, again = _host(loader.epoch(0)), _host(loader.epoch(0))
    _assert_batches_equal(again, first)  # a pure function of (seed, epoch)
    assert first[0]["image"].shape == (BATCH, SIZE, SIZE, 3)
    centre = _host(StreamLoader(source, BATCH, SIZE, seed=2, threads=0).epoch(0))
    assert not np.array_equal(first[0]["image"], centre[0]["image"])
    for kwargs, match in [
        ({"batch_size": 20}, "exceeds the 18 training"),
        ({"prefetch": -1}, "prefetch must be an int >= 0"),
        ({"crop": "middle"}, "crop must be one of"),
        ({"crop": "random", "train": False}, "for training"),
        ({"size": 0}, "size must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=match):
            StreamLoader(source, **{"batch_size": BATCH, "size": SIZE, **kwargs})


def test_folder_loader_streams_above_the_budget_and_says_so(folder, monkeypatch, caplog):
    monkeypatch.setenv("JAXLEARN_CACHE", str(folder / "cache"))
    caplog.set_level(logging.INFO, logger="jaxlearn.data.stream")
    # 18 files x 8 x 8 x 3 = 3,456 bytes decoded
    small = folder_loader(folder, "train", SIZE, BATCH, budget=3456, progress=False)
    large = folder_loader(folder, "train", SIZE, BATCH, budget=3455, threads=0)
    forced = folder_loader(folder, "train", SIZE, BATCH, budget=0, stream=False, progress=False)
    assert isinstance(small, ArrayLoader) and isinstance(forced, ArrayLoader)
    assert isinstance(large, StreamLoader)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "into memory (ArrayLoader)" in lines[0]
    assert "18 images at 8 px" in lines[1] and "streamed from disk (StreamLoader)" in lines[1]
    _assert_batches_equal(_host(large.epoch(1)), _host(small.epoch(1)))
    with pytest.raises(TypeError, match="worker"):  # a typo is not ignored on either path
        folder_loader(folder, "train", SIZE, BATCH, worker=2)
    # The host-side random crop exists only when streaming: it streams under any budget.
    cropped = folder_loader(folder, "train", SIZE, BATCH, budget=3456, crop="random", threads=0)
    assert isinstance(cropped, StreamLoader) and cropped.crop == "random"
    with pytest.raises(ValueError, match="crop='random'"):
        folder_loader(folder, "train", SIZE, BATCH, stream=False, crop="random")


def test_a_learner_on_a_streamed_folder_trains_and_predicts_as_in_memory(folder, caplog, tmp_path):
    import jaxlearn as jl
    from jaxlearn.interpret import ClassificationInterpretation
    from jaxlearn.learner import vision_learner

    caplog.set_level(logging.INFO, logger="jaxlearn.data.stream")
    flip = jl.data.random_flip()
    common = dict(valid_pct=0.3, size=SIZE, batch_size=BATCH, augment=flip, seed=1)
    memory = jl.ImageDataLoaders.from_folder(folder, **common, budget=3456,
                                             cache_dir=tmp_path, progress=False)  # fmt: skip
    streamed = jl.ImageDataLoaders.from_folder(folder, **common, budget=3455, threads=0)
    assert not memory.streamed and streamed.streamed
    lines = [r.getMessage() for r in caplog.records if "images at" in r.getMessage()]
    assert "into memory" in lines[0] and "streamed from disk" in lines[1]
    assert isinstance(streamed.train_ds, ImageFolderSource) and streamed.image_shape == (8, 8, 3)
    # the same carved split, file for file
    np.testing.assert_array_equal(streamed.valid_ds.labels, memory.valid_ds.labels)
    assert len(streamed.train_ds) == len(memory.train_ds) == 13  # 5 valid: a padded batch
    for got, want in zip(streamed.one_batch(6), memory.one_batch(6), strict=True):
        np.testing.assert_array_equal(got, want)

    metrics = ("accuracy", "error_rate")
    learners = [vision_learner(d, "mlp", pretrained=False, metrics=metrics, path=tmp_path,
                               progress=False) for d in (streamed, memory)]  # fmt: skip
    for learn in learners:
        learn.fit_one_cycle(2, lr_max=1e-2)
    got, want = learners
    for a, b in zip(jax.tree.leaves(got.state.params), jax.tree.leaves(want.state.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    assert got.history.keys() == want.history.keys() and "eval_error_rate" in got.history
    for k in set(want.history) - {"time"}:
        np.testing.assert_array_equal(got.history[k], want.history[k], err_msg=k)
    for a, b in zip(got.tta(), want.tta(), strict=True):  # the validation set, with TTA
        np.testing.assert_array_equal(a, b)
    # 5 images in forwards of 2: chunks of 2, 2 and a padded 1, as in memory
    for a, b in zip(got.get_preds(batch_size=2), want.get_preds(batch_size=2), strict=True):
        np.testing.assert_array_equal(a, b)

    shown = ClassificationInterpretation.from_learner(got)
    kept = ClassificationInterpretation.from_learner(want)
    assert shown.images.shape == kept.images.shape  # on disk, not in memory
    worst, _ = kept.top_losses(3)
    np.testing.assert_array_equal(shown.images[worst], kept.images[worst])
    shown.plot_top_losses(3, path=tmp_path / "top.png")
    with pytest.raises(ValueError, match="evaluation loader"):
        got.get_preds(streamed.train)
    for name in ("cats/empty.png", "dogs/notes.png"):  # a set of broken files only
        (tmp_path / "broken" / "valid" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "broken" / "valid" / name).write_bytes(b"")
    broken = StreamLoader(ImageFolderSource(tmp_path / "broken", "valid"), BATCH, SIZE,
                          train=False, threads=0)  # fmt: skip
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable image"):
        got.get_preds(broken)
    with pytest.raises(TypeError, match="worker"):
        jl.ImageDataLoaders.from_folder(folder, **common, worker=2)
    cropped = jl.ImageDataLoaders.from_folder(folder, **common, budget=3456, crop="random",
                                              threads=0)  # fmt: skip
    assert cropped.streamed and cropped.train.crop == "random"
    with pytest.raises(ValueError, match="crop='random'"):
        jl.ImageDataLoaders.from_folder(folder, **common, stream=False, crop="random")
    (folder / "val").mkdir()  # a split beside train that valid='valid' would not see
    carved = {k: v for k, v in common.items() if k != "valid_pct"}
    with pytest.warns(UserWarning, match=r"\['val'\] lie beside it: pass valid='val'"):
        jl.ImageDataLoaders.from_folder(folder, **carved, budget=0, threads=0)
    (folder / "val").rmdir()
    with pytest.raises(ValueError, match="both be ImageArrays or both"):
        jl.ImageDataLoaders(streamed.train_ds, memory.valid_ds)
    with pytest.raises(ValueError, match="need size="):
        jl.ImageDataLoaders(streamed.train_ds, streamed.valid_ds)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    """A prepared tfds data set (real array_record files, written without TensorFlow)."""
    from tfds_colors import prepare

    return prepare(tmp_path_factory.mktemp("tfds"))


def test_tfds_source_streams_what_load_tfds_loads_from_prepared_files(tfds_dir):
    from tfds_colors import NAME

    from jaxlearn.data import load_tfds

    data = load_tfds(NAME, "train", data_dir=tfds_dir, size=SIZE, progress=False)
    source = TfdsSource(NAME, "train", data_dir=tfds_dir, progress=False)
    assert source.class_names == data.class_names == ("cats", "dogs") and source.channels == 3
    np.testing.assert_array_equal(source.labels, data.labels)  # read without the images
    stream = _host(StreamLoader(source, BATCH, SIZE, train=False, threads=0))
    _assert_batches_equal(stream, _host(ArrayLoader(data.images, data.labels, BATCH, train=False)))
    part = source.take([5, 0, 3])  # a carved split's view, in that order
    assert len(part) == 3 and part.labels.tolist() == data.labels[[5, 0, 3]].tolist()
    image, label = part.read(0, SIZE, "crop")
    np.testing.assert_array_equal(image, data.images[5])
    assert label == data.labels[5] and len(source) == 24  # the whole split, untouched
    with pytest.raises(IndexError):
        source.take([24])
    masked = source.take(data.labels == 1)  # a mask selects, as NumPy's indexing does
    assert masked.labels.tolist() == [1] * int((data.labels == 1).sum())


def test_from_tfds_streams_above_the_budget_with_the_same_split_and_batches(tfds_dir, caplog):
    from tfds_colors import NAME

    import jaxlearn as jl

    caplog.set_level(logging.INFO, logger="jaxlearn.data.stream")
    common = dict(size=SIZE, batch_size=BATCH, data_dir=tfds_dir, progress=False, seed=2)
    # 24 images x 8 x 8 x 3 = 4,608 bytes decoded
    memory = jl.ImageDataLoaders.from_tfds(NAME, valid_pct=0.25, budget=4608, **common)
    streamed = jl.ImageDataLoaders.from_tfds(NAME, valid_pct=0.25, budget=4607, threads=0,
                                             **common)  # fmt: skip
    assert not memory.streamed and streamed.streamed
    assert isinstance(streamed.train_ds, TfdsSource) and streamed.image_shape == (8, 8, 3)
    lines = [r.getMessage() for r in caplog.records if "images at" in r.getMessage()]
    assert "24 images at 8 px" in lines[1] and "streamed from disk" in lines[1]
    # the same carved split, example for example, and the same batches
    np.testing.assert_array_equal(streamed.train_ds.labels, memory.train_ds.labels)
    assert len(streamed.valid_ds) == len(memory.valid_ds) == 6
    for got, want in ((streamed.train.epoch(1), memory.train.epoch(1)), (streamed.valid,
                                                                        memory.valid)):  # fmt: skip
        _assert_batches_equal(_host(got), _host(want))
    # A validation split of its own: 24 + 8 images, streamed as asked.
    both = jl.ImageDataLoaders.from_tfds(NAME, valid="test", stream=True, threads=0, **common)
    assert both.streamed and len(both.train_ds) == 24 and len(both.valid_ds) == 8
    assert "32 images at 8 px" in caplog.records[-1].getMessage()
    with pytest.raises(ValueError, match="pass size="):  # no declared square side
        jl.ImageDataLoaders.from_tfds(NAME, stream=True, data_dir=tfds_dir, progress=False)
    with pytest.raises(TypeError, match="worker"):
        jl.ImageDataLoaders.from_tfds(NAME, worker=2, **common)
    cropped = jl.ImageDataLoaders.from_tfds(NAME, valid_pct=0.25, budget=4608, crop="random",
                                            threads=0, **common)  # fmt: skip
    assert cropped.streamed and cropped.train.crop == "random"


class _Recorded(ImageFolderSource):
    """An image folder source that notes the index of every example it reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def read(self, index, size, resize):
        self.seen.append(index)
        return super().read(index, size, resize)


def _loaders(root) -> list:
    """Batches of a training loader (resumed at epoch 1, step 1) and an evaluation loader
    (padded), each over its own recording source."""
    train, evaluation = _Recorded(root, "train"), _Recorded(root, "train")
    return [
        (train, StreamLoader(train, BATCH, SIZE, seed=3, threads=0).epoch(1, 1)),
        (evaluation, StreamLoader(evaluation, BATCH, SIZE, train=False, threads=0).epoch(0)),
    ]


def _shard_worker(root: str, out: str, port: str, pid: int) -> None:
    """One of 2 processes: its loaders' global batches, gathered, and the examples it read."""
    from jax.experimental import multihost_utils

    from jaxlearn.parallel import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    arrays = {}
    for i, (source, batches) in enumerate(_loaders(root)):
        for j, batch in enumerate(batches):
            for k, v in multihost_utils.process_allgather(batch, tiled=True).items():
                arrays[f"{i}/{j}/{k}"] = v
        arrays[f"seen{i}"] = np.asarray(source.seen)
    np.savez(f"{out}.{pid}.npz", **arrays)


def test_two_processes_read_disjoint_shards_of_the_one_process_batches(folder, tmp_path):
    from test_parallel import _env, _free_port

    out, port = tmp_path / "shard", str(_free_port())
    command = [sys.executable, __file__, str(folder), str(out), port]
    procs = [
        subprocess.Popen(
            [*command, str(pid)],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, f"worker failed:\n{log[-3000:]}"
    shards = [np.load(f"{out}.{pid}.npz") for pid in range(2)]
    for shard in shards[1:]:  # every process gathered the same global batches
        for key in shard.files:
            if not key.startswith("seen"):
                np.testing.assert_array_equal(shard[key], shards[0][key], err_msg=key)
    for i, (source, batches) in enumerate(_loaders(folder)):
        want = _host(batches)
        got = [{k: shards[0][f"{i}/{j}/{k}"] for k in b} for j, b in enumerate(want)]
        _assert_batches_equal(got, want)  # the one-process batches
        seen = [set(s[f"seen{i}"].tolist()) for s in shards]
        assert not seen[0] & seen[1]  # disjoint: each process read only its rows
        assert seen[0] | seen[1] == set(source.seen)


def _workers_script(root: str, out: str) -> StreamLoader:
    """A script's run with worker processes: the batches of epoch 0 and of epoch 1 from step 2."""
    loader = StreamLoader(ImageFolderSource(root, "train"), BATCH, SIZE, seed=3, workers=1)
    batches = [*_host(loader.epoch(0)), *_host(loader.epoch(1, 2))]
    np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    return loader  # kept by the script until it exits, its pipeline open, as scripts do


def test_worker_processes_decode_the_same_batches_and_a_script_exits_cleanly(folder, tmp_path):
    out = tmp_path / "workers.npz"
    run = subprocess.run(
        [sys.executable, __file__, "--workers", str(folder), str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # Left to the garbage collector at exit, Grain's pipelines printed tracebacks here.
    assert "Exception ignored" not in run.stderr, run.stderr[-3000:]
    # Nor a false "leaked shared_memory objects" from Grain's frees still queued at exit.
    assert "leaked" not in run.stderr, run.stderr[-3000:]
    loader = StreamLoader(ImageFolderSource(folder, "train"), BATCH, SIZE, seed=3, threads=0)
    want = [*_host(loader.epoch(0)), *_host(loader.epoch(1, 2))]
    saved = np.load(out)
    got = [{k: saved[f"{i}/{k}"] for k in b} for i, b in enumerate(want)]
    _assert_batches_equal(got, want)


if __name__ == "__main__":
    if sys.argv[1] == "--workers":
        LOADER = _workers_script(*sys.argv[2:4])
    else:
        _shard_worker(*sys.argv[1:4], int(sys.argv[4]))
