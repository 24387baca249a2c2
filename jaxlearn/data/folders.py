"""Image folders laid out as ROOT/SPLIT/CLASS/* -> `ImageArrays`, decoded on all cores, cached.

This is the layout of ../shared/data and of most people's own data: one
folder per split, one sub-folder per class, any mix of JPEG, PNG, BMP, GIF,
TIFF or WebP files inside. Broken files are part of real folders, so each
file that cannot be read is skipped and counted, and the load ends with ONE
warning saying how many files were skipped and why.
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from jaxlearn.data import cache as cache_lib
from jaxlearn.data.arrays import ImageArrays
from jaxlearn.data.images import check_resize, decode_file

# Files per task handed to a worker thread: CIFAR's 32 px JPEGs decode in
# ~50 us, so one future per file would cost as much as the decoding itself.
_CHUNK = 64

_OUTSIDE = "outside a class folder"


def load_image_folder(
    root: str | os.PathLike,
    split: str,
    size: int,
    *,
    resize: str = "crop",
    class_names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> ImageArrays:
    """Load ROOT/SPLIT/CLASS/* as (N, size, size, 3) uint8 images with integer labels.

    Files in sub-folders of a class folder belong to that class (as in torchvision's
    ImageFolder).

    Class names are the sorted sub-folder names of ROOT/train -- for every split,
    when ROOT/train exists, so that each class has the same index in every split
    (a validation folder lacking a class would otherwise shift the labels of the
    others) -- else of ROOT/SPLIT; `class_names` overrides them. A class folder
    that is not among the names is an error (it would get a wrong label), while a
    class missing from this split is fine (it simply has no examples here). An
    empty class folder keeps its index and is named in the warning.

    Every file is read (hidden files, whose names start with '.', are
    ignored); images of any mode become RGB (see `images.to_rgb`: alpha is
    composited on white, 16-bit is scaled to 8-bit), EXIF rotation is applied,
    and files that cannot be decoded are skipped with one warning that counts
    them by reason, e.g. "skipped 3 of 120 files: 2 corrupt, 1 not an image".

    Decoding runs in a thread pool (PIL releases the GIL while decoding and
    resizing) with a progress bar; the result is cached on disk (see
    `jaxlearn.data.cache`), so a second load of an unchanged folder only reads
    one .npz file.

    Args:
      root: the data set folder, holding one folder per split.
      split: the split folder name ('train', 'valid', 'test', ...).
      size: side of the square output images, in pixels.
      resize: 'crop' (default): shortest side to `size`, then the centre
        square; 'squash': both sides to `size`, distorting the aspect ratio.
      class_names: the classes in label order, e.g. `train.class_names`;
        None: the sorted sub-folders of ROOT/train if it exists, else of ROOT/SPLIT.
      cache_dir: where decoded arrays are cached; None: $JAXLEARN_CACHE or
        ~/.cache/jaxlearn.
      cache: False to neither read nor write the cache.
      workers: decoding threads; None: one per available core.
      progress: show a tqdm progress bar while decoding.

    Returns:
      `ImageArrays` with the files in a fixed order (by class, then file name).

    Raises:
      FileNotFoundError: ROOT or ROOT/SPLIT does not exist.
      ValueError: bad `size`, `resize`, `workers` or `class_names`; a class
        folder not in `class_names`; no image could be read.
    """
    size = check_resize(size, resize)
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    folder, names, paths, labels, report = scan_split(root, split, class_names)

    entry = None
    if cache:
        description = {
            "folder": str(folder.resolve()),
            "size": size,
            "resize": resize,
            "class_names": names,
            "files": [[os.path.relpath(p, folder), *_stat(p)] for p in paths],
        }
        key = cache_lib.cache_key(description)
        entry = cache_lib.cache_path(cache_dir, f"{folder.parent.name}-{split}-{size}", key)
        stored = cache_lib.load_arrays(entry, ("images", "labels", "report"))
        if stored is not None:
            _warn_skipped(folder, json.loads(str(stored["report"])))
            _check_not_empty(folder, stored["labels"])
            return ImageArrays(stored["images"], stored["labels"], names)

    images, reasons = _decode_all(paths, size, resize, workers, progress, desc=str(folder))
    keep = np.array([r is None for r in reasons], dtype=bool)
    report["skipped"].update(collections.Counter(r for r in reasons if r is not None))
    images, labels = images[keep], np.asarray(labels, np.int32)[keep]
    if entry is not None:
        arrays = {"images": images, "labels": labels, "report": np.array(json.dumps(report))}
        try:
            cache_lib.save_arrays(entry, arrays)
        except OSError as e:  # a read-only or full disk: the cache is only a speed-up
            warnings.warn(f"could not cache the decoded {folder} in {entry}: {e}", stacklevel=2)
    _warn_skipped(folder, report)
    _check_not_empty(folder, labels)
    return ImageArrays(images, labels, names)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, else all of them)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+, every OS
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def scan_split(
    root: str | os.PathLike, split: str, class_names: Sequence[str] | None = None
) -> tuple[Path, tuple[str, ...], list[str], list[int], dict]:
    """ROOT/SPLIT's class names, files and labels, as `load_image_folder` finds them; nothing read.

    Shared with the streaming source (`jaxlearn.data.stream`), so that both paths give
    a file the same label.

    Returns:
      (the split folder, class names, file paths, their labels, the report of
      what was left out: 'total', 'skipped' by reason, 'empty_classes').

    Raises:
      FileNotFoundError: ROOT or ROOT/SPLIT does not exist.
      ValueError: bad `class_names`, a class folder not among them, or no file at all.
    """
    folder = _split_folder(root, split)
    train = Path(root, "train")
    if class_names is None and split != "train" and train.is_dir():
        class_names = _class_folders(train)
    names, paths, labels, report = _scan(folder, class_names)
    if not paths:
        loose = report["skipped"].get(_OUTSIDE, 0)
        where = f"{loose} files lie directly in it, outside any class folder" if loose else ""
        raise ValueError(
            f"no image files in the class folders of {folder} (found: {_class_folders(folder)}"
            f"{'; ' + where if where else ''}): the layout is ROOT/SPLIT/CLASS/*; an "
            "unlabelled test folder is read as one class, e.g. ROOT/test/unknown/* with "
            "class_names=['unknown'] (else a split beside ROOT/train takes train's classes)"
        )
    return folder, names, paths, labels, report


def _split_folder(root: str | os.PathLike, split: str) -> Path:
    """ROOT/SPLIT, or FileNotFoundError naming what is missing (and the splits there are)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root folder not found: {root}")
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(
            f"split folder not found: {folder} (split={split!r}; folders in root: {found})"
        )
    return folder


def _scan(
    folder: Path, class_names: Sequence[str] | None
) -> tuple[tuple[str, ...], list[str], list[int], dict]:
    """Class names, file paths, their labels, and a report of what was left out.

    The report: 'total' files seen, 'skipped' counts by reason, 'empty_classes'.
    """
    found = _class_folders(folder)
    if class_names is None:
        names = tuple(found)
    else:
        names = tuple(str(n) for n in class_names)
        if len(set(names)) != len(names):
            raise ValueError(f"class_names has duplicates: {list(names)}")
        unknown = [n for n in found if n not in names]
        if unknown:
            raise ValueError(
                f"class folder(s) {unknown} in {folder} are not in class_names {list(names)}: "
                "their images would get no label or a wrong one. Pass the class names of "
                "the training split only if every split has the same classes."
            )
    loose = sum(1 for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    index = {n: i for i, n in enumerate(names)}
    paths, labels, empty = [], [], []
    for name in found:
        files = _files_under(Path(folder, name))
        if not files:
            empty.append(name)
        paths += files
        labels += [index[name]] * len(files)
    report = {"total": len(paths) + loose, "skipped": {_OUTSIDE: loose} if loose else {}}
    return names, paths, labels, {**report, "empty_classes": empty}


def _files_under(folder: Path) -> list[str]:
    """Every file in `folder` and its sub-folders, sorted by path (hidden ones ignored).

    A class folder's sub-folders belong to the class (`cat/batch1/*.jpg`), as in
    torchvision's ImageFolder; only looking one level down would drop them unsaid.
    """
    files = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(parent, n) for n in names if not n.startswith(".")]
    return sorted(files)


def _class_folders(folder: Path) -> list[str]:
    """The class sub-folders of a split folder, sorted (hidden ones ignored)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _stat(path: str) -> list[int]:
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def _decode_all(
    paths: list[str], size: int, resize: str, workers: int | None, progress: bool, desc: str
) -> tuple[np.ndarray, list[str | None]]:
    """Decode every path in a thread pool; arrays for the good files, a reason for the others."""
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    reasons: list[str | None] = [None] * len(paths)
    chunks = [range(i, min(i + _CHUNK, len(paths))) for i in range(0, len(paths), _CHUNK)]

    def work(chunk: range) -> tuple[range, list[np.ndarray | str]]:
        return chunk, [decode_file(paths[i], size, resize) for i in chunk]

    workers = workers or available_cpus()
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; make it an error
    # here so that such a file is skipped as a bomb like the larger ones.
    # (The filter is process-wide while the pool runs: worker threads see it.)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with (
            ThreadPoolExecutor(workers) as pool,
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar,
        ):
            for chunk, results in pool.map(work, chunks):
                for i, result in zip(chunk, results, strict=True):
                    if isinstance(result, str):
                        reasons[i] = result
                    else:
                        images[i] = result
                bar.update(len(chunk))
    return images, reasons


def _warn_skipped(folder: Path, report: dict) -> None:
    """One warning listing the files left out by reason and the empty class folders, if any."""
    skipped, empty = report["skipped"], report["empty_classes"]
    if not skipped and not empty:
        return
    text = f"{folder}: skipped {sum(skipped.values())} of {report['total']} files"
    if skipped:
        text += ": " + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    if empty:
        text += f"; class folders without files (kept as classes with no examples): {empty}"
    warnings.warn(text, stacklevel=3)


def _check_not_empty(folder: Path, labels: np.ndarray) -> None:
    if len(labels) == 0:
        raise ValueError(f"no readable image in {folder}: every file was skipped")
