"""On-disk cache of decoded arrays, so that the second load of a folder takes a second.

Decoding 60,000 JPEGs costs tens of seconds on two cores; reading the same
pixels back from one .npz file costs well under a second. A cache entry is
keyed by everything that decides its content: the source folder, the list of
files with their sizes and modification times, the target size, the resize
policy, the class names and `CODE_VERSION` (bumped whenever decoding changes).
Change any of these and the old entry is simply not found (and stays on disk:
delete the cache folder to reclaim the space).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when decoding or resizing changes, so that stale entries are never read.
CODE_VERSION = 1

#: Environment variable that overrides the default cache folder.
CACHE_ENV = "JAXLEARN_CACHE"


def default_cache_dir() -> Path:
    """$JAXLEARN_CACHE if set, else ~/.cache/jaxlearn."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "jaxlearn"


def cache_key(description: dict[str, Any]) -> str:
    """A hex digest of `description` (JSON-able) and `CODE_VERSION`."""
    text = json.dumps({"code_version": CODE_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(cache_dir: str | os.PathLike | None, stem: str, key: str) -> Path:
    """Where the entry `key` lives: CACHE_DIR/STEM-KEY.npz (`cache_dir` None: the default)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{stem}-{key}.npz"


def load_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays `names` stored at `path`, or None if there is no readable, whole entry."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        # Absent, or damaged by something other than us (a truncated or partly copied
        # file, one without our arrays): decode again and overwrite.
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically: a temporary file in the same folder, then rename.

    A reader never sees a half-written entry, even if two processes fill the
    same cache at once or the writer is killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power loss keeps old or new
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
