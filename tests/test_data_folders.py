"""Image folders ROOT/SPLIT/CLASS/*: every broken-file case, class indices, resize, cache."""

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxlearn.data import folders, load_image_folder

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _solid(path: Path, color, size=(12, 12), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _noise_jpeg(path: Path, side=64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path.read_bytes()


def _bomb_png(path: Path, width=20_000, height=20_000) -> None:
    """A valid 1x1 PNG whose header claims width x height pixels (400 M > 2 x 89 M)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b'IHDR' + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def _good_files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every odd-but-valid image kind, each expected to come out as one RGB colour."""
    _solid(folder / "rgb.jpg", GREEN)
    _solid(folder / "grey.png", 128, mode="L")
    # RGBA: fully transparent pixels storing black must come out white (composited).
    _solid(folder / "rgba.png", (0, 0, 0, 0), mode="RGBA")
    _solid(folder / "cmyk.jpg", (0, 0, 0, 0), mode="CMYK")  # no ink = white
    i16 = Image.fromarray(np.full((12, 12), 128 * 257, np.uint16))
    assert i16.mode.startswith("I;16")
    i16.save(folder / "sixteen.png")
    Image.new("RGB", (12, 12), BLUE).convert("P").save(folder / "palette.png")
    palette = Image.new("P", (12, 12), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(folder / "palette_transparent.png", transparency=0)
    return {
        "rgb.jpg": GREEN,
        "grey.png": (128, 128, 128),
        "rgba.png": (255, 255, 255),
        "cmyk.jpg": (255, 255, 255),
        "sixteen.png": (128, 128, 128),
        "palette.png": BLUE,
        "palette_transparent.png": (255, 255, 255),
    }


def _broken_files(folder: Path) -> None:
    """One file of each kind that must be skipped: 5 in all."""
    jpeg = _noise_jpeg(folder / "truncated.jpg")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    _bomb_png(folder / "bomb.png")


def _load(root, split="train", size=8, **kwargs):
    kwargs.setdefault("cache", False)
    return load_image_folder(root, split, size, workers=2, progress=False, **kwargs)


def test_every_odd_mode_converted_and_every_broken_file_skipped_with_one_warning(tmp_path):
    expected = _good_files(tmp_path / "train" / "odd")
    _broken_files(tmp_path / "train" / "odd")
    _solid(tmp_path / "train" / "loose.png", RED)  # not inside a class folder
    (tmp_path / "train" / "odd" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _load(tmp_path)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    message = messages[0]
    assert "skipped 6 of 13 files" in message
    for part in ("1 corrupt", "1 decompression bomb", "1 empty file", "2 not an image"):
        assert part in message
    assert "1 outside a class folder" in message

    assert data.images.shape == (len(expected), 8, 8, 3) and data.images.dtype == np.uint8
    assert data.class_names == ("odd",)
    for image, name in zip(data.images, sorted(expected), strict=True):
        # JPEG rounding moves solid colours by a few levels.
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), expected[name], atol=3)


def test_exif_rotation_is_applied(tmp_path):
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :10], image[:, 10:] = RED, BLUE  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation 3: shown rotated by 180 degrees
    path = tmp_path / "train" / "photo" / "rotated.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(image).save(path, exif=exif, quality=95)
    data = _load(tmp_path, size=10, resize="squash")
    left, right = data.images[0, :, :3].mean((0, 1)), data.images[0, :, -3:].mean((0, 1))
    assert left[2] > 200 > left[0] and right[0] > 200 > right[2]  # blue left, red right


def test_decompression_bomb_between_limit_and_twice_limit_is_skipped(tmp_path, monkeypatch):
    # PIL only warns for images of MAX_IMAGE_PIXELS .. 2 x MAX_IMAGE_PIXELS pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _solid(tmp_path / "train" / "a" / "big.png", RED, size=(40, 40))  # 1,600 pixels
    _solid(tmp_path / "train" / "a" / "small.png", RED, size=(20, 20))
    with pytest.warns(UserWarning, match="1 decompression bomb"):
        data = _load(tmp_path)
    assert len(data) == 1


def test_resize_crop_keeps_centre_squash_keeps_everything(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10], image[:, 10:30], image[:, 30:] = RED, GREEN, BLUE
    path = tmp_path / "train" / "a" / "wide.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(image).save(path)
    crop = _load(tmp_path, size=10, resize="crop").images[0]
    squash = _load(tmp_path, size=10, resize="squash").images[0]
    # Crop: only the green centre (bicubic lets the neighbours bleed in a little at the edge).
    assert crop[..., 1].min() > 200 and crop[..., [0, 2]].max() < 40
    np.testing.assert_array_equal(squash[:, 0], np.broadcast_to(RED, (10, 3)))
    np.testing.assert_array_equal(squash[:, -1], np.broadcast_to(BLUE, (10, 3)))


def test_class_indices_agree_across_splits_and_unknown_class_is_an_error(tmp_path):
    for split, classes in (("train", "abc"), ("valid", "bc"), ("test", "bcd")):
        for name in classes:
            _solid(tmp_path / split / name / "x.png", RED)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.warns(UserWarning, match=r"class folders without files.*'empty'"):
        train = _load(tmp_path)
    assert train.class_names == ("a", "b", "c", "empty")
    valid = _load(tmp_path, "valid", class_names=train.class_names)
    assert valid.class_names == train.class_names
    assert valid.labels.tolist() == [1, 2]  # b and c keep the training indices
    with pytest.raises(ValueError, match=r"\['d'\]"):
        _load(tmp_path, "test", class_names=train.class_names)
    # Without class_names, a split beside ROOT/train takes train's names: the same labels.
    assert _load(tmp_path, "valid").labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"\['d'\]"):
        _load(tmp_path, "test")


def test_workers_default_without_sched_getaffinity(tmp_path, monkeypatch):
    _solid(tmp_path / "train" / "a" / "x.png", RED)
    monkeypatch.delattr(folders.os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.delattr(folders.os, "process_cpu_count", raising=False)  # before Python 3.13
    assert folders.available_cpus() >= 1
    data = load_image_folder(tmp_path, "train", 8, cache=False, progress=False)
    assert data.labels.tolist() == [0]


def test_importing_the_data_package_does_not_import_tensorflow_datasets():
    import subprocess
    import sys

    code = "import sys, jaxlearn.data; print('tensorflow_datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_paths_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _load(tmp_path / "nowhere")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"valid.*\['train'\]"):
        _load(tmp_path, "valid")
    with pytest.raises(ValueError, match="no image files"):
        _load(tmp_path)
    (tmp_path / "train" / "a" / "zero.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image"), pytest.warns(UserWarning):
        _load(tmp_path)
    # An unlabelled test folder: its files are named, with the layout expected.
    _solid(tmp_path / "test" / "x.png", RED)
    with pytest.raises(ValueError, match=r"no image files.*1 files lie directly in it"):
        _load(tmp_path, "test")


def test_files_in_sub_folders_of_a_class_folder_belong_to_the_class(tmp_path):
    _solid(tmp_path / "train" / "cat" / "top.png", RED)
    _solid(tmp_path / "train" / "cat" / "batch1" / "deep.png", GREEN)
    _solid(tmp_path / "train" / "cat" / "batch1" / "more" / "deeper.png", BLUE)
    _solid(tmp_path / "train" / "cat" / ".hidden" / "skipped.png", RED)
    _solid(tmp_path / "train" / "dog" / "only" / "nested.png", BLUE)
    data = _load(tmp_path)
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1])
    # sorted by path: batch1/deep, batch1/more/deeper, top
    np.testing.assert_array_equal(data.images[:3, 0, 0], [GREEN, BLUE, RED])


def test_a_numpy_integer_size_loads_and_caches_as_an_int(tmp_path):
    _solid(tmp_path / "train" / "a" / "x.png", RED)
    data = _load(tmp_path, size=np.int64(6), cache=True, cache_dir=tmp_path / "cache")
    assert data.images.shape == (1, 6, 6, 3)


def test_a_cache_that_cannot_be_written_warns_and_returns_the_images(tmp_path):
    _solid(tmp_path / "train" / "a" / "x.png", RED)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would be")
    with pytest.warns(UserWarning, match="could not cache"):
        data = _load(tmp_path, cache=True, cache_dir=blocker / "cache")
    np.testing.assert_array_equal(data.images[0, 0, 0], RED)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 0}, "size"), ({"resize": "stretch"}, "resize"), ({"workers": 0}, "workers")],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, match):
    _solid(tmp_path / "train" / "a" / "x.png", RED)
    kwargs = {"size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_image_folder(tmp_path, "train", progress=False, cache=False, **kwargs)


def test_second_load_comes_from_the_cache_until_a_file_changes(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _solid(root / "train" / "a" / "x.png", RED)
    _solid(root / "train" / "b" / "y.png", BLUE)
    (root / "train" / "b" / "zero.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="1 empty file"):
        first = _load(root, cache=True, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded although the cache holds the arrays")

    monkeypatch.setattr(folders, "decode_file", no_decoding)
    with pytest.warns(UserWarning, match="1 empty file"):  # the cached load warns the same
        second = _load(root, cache=True, cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert second.class_names == first.class_names

    _solid(root / "train" / "a" / "x.png", GREEN, size=(13, 12))  # changed file: new key
    with pytest.raises(AssertionError, match="decoded although"):
        _load(root, cache=True, cache_dir=cache)
    with pytest.raises(AssertionError, match="decoded although"):  # other size: new key
        _load(root, size=4, cache=True, cache_dir=cache)


def test_a_damaged_cache_entry_is_decoded_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _solid(root / "train" / "a" / "x.png", RED)
    first = _load(root, cache=True, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    whole = entry.read_bytes()
    for damaged in (whole[: len(whole) // 2], b""):  # truncated (a power loss, a part copy)
        entry.write_bytes(damaged)
        np.testing.assert_array_equal(_load(root, cache=True, cache_dir=cache).images,
                                      first.images)  # fmt: skip
    np.savez(entry, images=first.images)  # a whole file without our other arrays
    np.testing.assert_array_equal(_load(root, cache=True, cache_dir=cache).labels, first.labels)


def test_cache_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLEARN_CACHE", str(tmp_path / "env_cache"))
    _solid(tmp_path / "train" / "a" / "x.png", RED)
    _load(tmp_path, cache=True)
    assert len(list((tmp_path / "env_cache").glob("*.npz"))) == 1
