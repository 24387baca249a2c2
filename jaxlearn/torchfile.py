"""Read PyTorch `.pth` / `.pt` / `.bin` files with numpy alone: no torch, no code from the file.

`torch.save` pickles the object (for weights, a state dict: name -> tensor) and keeps each
tensor's storage as raw bytes next to the pickle. Both layouts PyTorch writes are read:

- zip (the default since PyTorch 1.6): `<archive>/data.pkl` is the pickle, `<archive>/data/<key>`
  holds storage `<key>`'s bytes, and `<archive>/byteorder` says 'little' or 'big' (absent:
  little, as `torch.load` assumes). Records are read at their offsets, so files written with
  `torch.utils.serialization.config.save.compute_crc32 = False` (CRC fields 0) read too;
  every non-zero CRC is checked.
- legacy (PyTorch < 1.6, or `torch.save(..., _use_new_zipfile_serialization=False)`): one
  stream of pickles (magic number, protocol 1001, system info, the object, the storage keys),
  then each storage as an int64 element count and its bytes, little-endian (PyTorch swaps on
  big-endian hosts). The registry's EfficientNet-Lite weights are in this layout.

The even older tar layout, which `torch.load(weights_only=True)` refuses as well, is refused
with a ValueError saying how to convert it.

The pickle is read by a restricted unpickler (the allow-list is `ALLOWED_GLOBALS`): it rebuilds
`collections.OrderedDict`, tensors (`torch._utils._rebuild_tensor`, `_v2`, `_v3`,
`_rebuild_parameter`), storage types, `torch.Size`, dtypes and plain values, and refuses any
other global with a ValueError naming it, before anything is called. Nothing from the file is
imported or run. Tensors come back as numpy arrays that own their memory: the storage's bytes
viewed with the tensor's dtype, byte order, storage offset, shape and strides, then copied.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# torch.serialization's MAGIC_NUMBER and PROTOCOL_VERSION: the legacy stream's first two pickles.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A zip local file header: signature, then 26 bytes of which the last 4 are the name and
# extra-field lengths; the record's bytes follow the name and the extra field.
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
# ustar's magic sits 257 bytes into a tar file (POSIX.1-1988).
_TAR_MAGIC_OFFSET = 257

# torch dtype name -> numpy type code, before the byte order is applied. bfloat16 is read as
# its 16 bits and widened to float32 (numpy has no bfloat16); bool is read as bytes, != 0.
_NUMPY_CODES = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "bfloat16": "u2",
    "complex128": "c16",
    "complex64": "c8",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint64": "u8",
    "uint32": "u4",
    "uint16": "u2",
    "uint8": "u1",
    "bool": "u1",
}

# The storage classes `torch.save` names, with the dtype of their elements
# (torch.storage._dtype_to_storage_type_map). UntypedStorage holds bytes: torch 2.x writes it
# for dtypes without a legacy class (uint16/32/64, float8) with `_rebuild_tensor_v3`, which
# names the dtype. Quantized storages (QInt8Storage, ...) are not listed, so they are refused.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


class _StorageType(NamedTuple):
    """A storage class named in the pickle, e.g. `torch.FloatStorage` -> ('float32')."""

    dtype: str


class _DType(NamedTuple):
    """A torch dtype named in the pickle, e.g. `torch.uint16` -> ('uint16')."""

    name: str


class _Storage:
    """One storage of the file: its element dtype, element count, byte order and bytes.

    `data` is set once the file's storage bytes are found (after the pickle, in the legacy
    layout); a legacy storage view has `root` and a byte offset into it instead.
    """

    __slots__ = ("byte_offset", "byteorder", "data", "dtype", "numel", "root")

    def __init__(self, dtype: str, numel: int, byteorder: str, root=None, byte_offset=0):
        self.dtype, self.numel, self.byteorder = dtype, numel, byteorder
        self.data, self.root, self.byte_offset = None, root, byte_offset

    def __setstate__(self, state):  # pickle's BUILD opcode must not reach into it
        raise ValueError("the pickle sets attributes on a storage")

    def nbytes(self) -> int:
        return self.numel * np.dtype(_NUMPY_CODES[self.dtype]).itemsize

    def buffer(self) -> memoryview:
        if self.root is not None:
            data = self.root.buffer()[self.byte_offset : self.byte_offset + self.nbytes()]
        else:
            data = self.data
        if data is None or len(data) != self.nbytes():
            raise _corrupt(f"a storage of {self.nbytes()} bytes has no or short data")
        return data


class _Tensor:
    """A tensor rebuilt by the pickle, turned into a numpy array once the storages are read."""

    __slots__ = ("dtype", "metadata", "offset", "shape", "storage", "strides")

    def __init__(self, storage, dtype, offset, shape, strides, metadata):
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.shape, self.strides, self.metadata = shape, strides, metadata

    def __setstate__(self, state):
        raise ValueError("the pickle sets attributes on a tensor")

    def to_numpy(self) -> np.ndarray:
        raw = self.storage.buffer()
        dtype = np.dtype(_NUMPY_CODES[self.dtype]).newbyteorder(self.storage.byteorder)
        base = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        if all(self.shape):  # not empty: the last element it reaches must be in the storage
            last = self.offset + sum(
                (n - 1) * s for n, s in zip(self.shape, self.strides, strict=True)
            )
            if last >= base.size:
                raise _corrupt(
                    f"a tensor of shape {self.shape}, strides {self.strides} at offset "
                    f"{self.offset} reaches element {last} of a storage of {base.size}"
                )
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=tuple(s * dtype.itemsize for s in self.strides),
            writeable=False,
        )
        array = np.array(view, dtype=dtype.newbyteorder("="))  # a copy in native byte order
        if self.dtype == "bfloat16":  # bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif self.dtype == "bool":
            array = array != 0
        metadata = dict(self.metadata or {})
        if metadata.pop("neg", False):  # torch's lazy negation bit (torch._neg_view)
            array = -array
        if metadata.pop("conj", False):  # the lazy conjugation bit of `Tensor.conj()`
            array = np.conj(array)
        if any(metadata.values()):
            raise ValueError(f"unknown tensor metadata {sorted(metadata)}")
        return np.asarray(array)  # NumPy's operators give a 0-d array back as a scalar


def _corrupt(detail: str) -> ValueError:
    return ValueError(f"not a readable PyTorch file: {detail}")


def _tensor(storage, storage_offset, size, stride, dtype: str | None, metadata) -> _Tensor:
    """Check what a rebuild function got from the pickle; the array is made later."""
    if not isinstance(storage, _Storage):
        raise _corrupt(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")

    def ints(values, name):
        if not isinstance(values, tuple | list) or not all(
            type(v) is int and v >= 0 for v in values
        ):
            raise _corrupt(f"tensor {name} {values!r} is not a tuple of ints >= 0")
        return tuple(values)

    shape, strides = ints(size, "size"), ints(stride, "stride")
    (offset,) = ints((storage_offset,), "storage offset")
    if len(shape) != len(strides):
        raise _corrupt(f"tensor size {shape} and stride {strides} differ in length")
    if metadata is not None and not isinstance(metadata, dict):
        raise _corrupt(f"tensor metadata is a {type(metadata).__name__}, not a dict")
    return _Tensor(storage, dtype or storage.dtype, offset, shape, strides, metadata)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    return _tensor(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, _DType):
        raise _corrupt(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data  # a Parameter is its tensor; gradients and Python attributes are dropped


def _latin1_encode(text, encoding="utf-8"):
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`, for latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _corrupt(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch.Size": tuple,
        "_codecs.encode": _latin1_encode,
    }
    # Protocol 2 names builtins '__builtin__' (Python 2's name) when Python 3 writes it.
    for module in ("builtins", "__builtin__"):
        for value in (set, frozenset, complex, bytearray):
            allowed[f"{module}.{value.__name__}"] = value
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = _StorageType(dtype)
    allowed["torch.storage.UntypedStorage"] = _StorageType("uint8")
    for name in _NUMPY_CODES:
        allowed[f"torch.{name}"] = _DType(name)
    return allowed


_GLOBALS = _allowed_globals()
#: The 'module.name' globals a file's pickle may name; any other is refused with a ValueError.
ALLOWED_GLOBALS: frozenset[str] = frozenset(_GLOBALS)


class _Unpickler(pickle.Unpickler):
    """Rebuilds only `ALLOWED_GLOBALS`; storages go through `storage(persistent id)`."""

    def __init__(self, file, storage: Callable[[tuple], _Storage] | None = None):
        super().__init__(file)
        self._storage = storage

    def find_class(self, module, name):
        try:
            return _GLOBALS[f"{module}.{name}"]
        except KeyError:
            raise ValueError(
                f"torchfile refuses to load global '{module}.{name}': only tensors, storages, "
                "OrderedDict and plain values are rebuilt, and nothing from the file is "
                "imported or run"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise _corrupt(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # `torch.save(model)` in the legacy layout
            raise ValueError(
                "the file holds a pickled torch.nn.Module, not weights: load it with "
                "torch.load(weights_only=False) where you trust it and save model.state_dict()"
            )
        if kind != "storage" or self._storage is None:
            raise _corrupt(f"unexpected persistent id {pid[:1]!r}")
        return self._storage(pid)


class _Storages:
    """The storages a pickle refers to, one per key, checked to agree on dtype and size."""

    def __init__(self, byteorder: str):
        self.byteorder = byteorder
        self.by_key: dict[str, _Storage] = {}

    def __call__(self, pid: tuple) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds a view (key, offset, numel).
        if len(pid) not in (5, 6):
            raise _corrupt(f"a storage id of {len(pid)} fields")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise _corrupt(f"storage type {storage_type!r}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _corrupt(f"storage key {key!r} with {numel!r} elements")
        storage = self._get(key, storage_type.dtype, numel)
        if view is None:
            return storage
        view_key, offset, view_numel = view
        if not (type(offset) is int and type(view_numel) is int and 0 <= offset):
            raise _corrupt(f"storage view {view!r}")
        if offset + view_numel > numel:
            raise _corrupt(f"storage view {view!r} beyond a storage of {numel} elements")
        itemsize = np.dtype(_NUMPY_CODES[storage.dtype]).itemsize
        return self._get(view_key, storage.dtype, view_numel, storage, offset * itemsize)

    def _get(self, key, dtype, numel, root=None, byte_offset=0) -> _Storage:
        storage = self.by_key.get(key)
        if storage is None:
            storage = _Storage(dtype, numel, self.byteorder, root, byte_offset)
            self.by_key[key] = storage
        elif (storage.dtype, storage.numel) != (dtype, numel):
            raise _corrupt(
                f"storage {key!r} is named as {storage.numel} {storage.dtype} "
                f"and as {numel} {dtype}"
            )
        return storage


def _zip_record(archive: zipfile.ZipFile, buf: memoryview, name: str) -> memoryview:
    """A record's bytes: a view of `buf` where stored uncompressed (as torch writes them)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _corrupt(f"no record {name!r} in the archive") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return memoryview(archive.read(name))  # inflates and checks the CRC
    start = info.header_offset
    signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(
        buf[start : start + _ZIP_LOCAL_HEADER.size]
    )
    if signature != b"PK\x03\x04":
        raise _corrupt(f"record {name!r} has no local header at byte {start}")
    start += _ZIP_LOCAL_HEADER.size + name_len + extra_len
    data = buf[start : start + info.file_size]
    if len(data) != info.file_size:
        raise _corrupt(f"record {name!r} is cut short")
    # torch writes CRC 0 when told not to compute it; check every other one (19 MB: 3 ms).
    if info.CRC and zlib.crc32(data) != info.CRC:
        raise _corrupt(f"record {name!r} fails its CRC-32 check")
    return data


def _load_zip(data: bytes) -> Any:
    archive = zipfile.ZipFile(io.BytesIO(data))  # BytesIO shares a bytes object's memory
    buf = memoryview(data)
    names = archive.namelist()
    # Every record sits under one folder: the file's stem when torch.save got a path, else
    # 'archive'.
    prefixes = {name.split("/", 1)[0] for name in names}
    if len(prefixes) != 1 or f"{next(iter(prefixes))}/data.pkl" not in names:
        raise _corrupt("a zip archive without a single '<archive>/data.pkl'")
    prefix = prefixes.pop()
    if f"{prefix}/constants.pkl" in names:
        raise ValueError(
            "the file is a TorchScript archive (torch.jit.save): load it with torch.jit.load "
            "and save its state_dict() with torch.save"
        )
    byteorder = "<"
    if f"{prefix}/byteorder" in names:
        order = bytes(_zip_record(archive, buf, f"{prefix}/byteorder"))
        if order not in (b"little", b"big"):
            raise _corrupt(f"byteorder {order!r}")
        byteorder = "<" if order == b"little" else ">"
    storages = _Storages(byteorder)
    obj = _Unpickler(io.BytesIO(_zip_record(archive, buf, f"{prefix}/data.pkl")), storages).load()
    for key, storage in storages.by_key.items():
        if storage.root is None:
            storage.data = _zip_record(archive, buf, f"{prefix}/data/{key}")
    return obj


def _load_legacy(data: bytes) -> Any:
    stream, buf = io.BytesIO(data), memoryview(data)
    if _Unpickler(stream).load() != _LEGACY_MAGIC:
        raise _corrupt("neither a zip archive nor a legacy stream (no magic number)")
    protocol = _Unpickler(stream).load()
    if protocol != _LEGACY_PROTOCOL:
        raise _corrupt(f"legacy protocol {protocol!r}, expected {_LEGACY_PROTOCOL}")
    _Unpickler(stream).load()  # system info: byte order and C type sizes; data is little-endian
    storages = _Storages("<")
    obj = _Unpickler(stream, storages).load()
    keys = _Unpickler(stream).load()
    if not isinstance(keys, list):
        raise _corrupt(f"legacy storage keys are a {type(keys).__name__}")
    position = stream.tell()
    for key in keys:
        storage = storages.by_key.get(key) if isinstance(key, str) else None
        if storage is None or storage.root is not None:
            raise _corrupt(f"legacy storage key {key!r} is not a storage of the pickle")
        (numel,) = struct.unpack("<q", buf[position : position + 8])
        if numel != storage.numel:
            raise _corrupt(f"storage {key!r}: {numel} elements in the data, {storage.numel} named")
        storage.data = buf[position + 8 : position + 8 + storage.nbytes()]
        position += 8 + storage.nbytes()
    return obj


def _materialize(obj, memo: dict[int, Any], active: set[int]) -> Any:
    """`obj` with every tensor placeholder replaced by its numpy array; containers in place."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, _Tensor):
        memo[key] = obj.to_numpy()
    elif isinstance(obj, _Storage | _StorageType):
        raise ValueError("the file holds a bare storage, not a tensor")
    elif isinstance(obj, _DType):
        memo[key] = f"torch.{obj.name}"
    elif isinstance(obj, dict | list):
        memo[key] = obj  # mutable containers are filled in place, so cycles stay cycles
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, value in list(items):
            if isinstance(k, _Tensor):
                raise ValueError("the file uses a tensor as a dict key")
            obj[k] = _materialize(value, memo, active)
    elif isinstance(obj, tuple | set | frozenset):
        if key in active:
            raise ValueError("the file holds a tuple or set that contains itself")
        active.add(key)
        items = [_materialize(value, memo, active) for value in obj]
        active.discard(key)
        if isinstance(obj, set | frozenset) and any(isinstance(v, np.ndarray) for v in items):
            raise ValueError("the file holds tensors in a set")
        memo[key] = (
            obj if all(a is b for a, b in zip(items, obj, strict=True)) else type(obj)(items)
        )
    else:  # ints, floats, strings, bytes, None, ...: plain pickle values
        memo[key] = obj
    return memo[key]


def load(path: str | os.PathLike) -> Any:
    """Read what `torch.save` wrote to `path`, with tensors as numpy arrays and no torch.

    A state dict comes back as the (Ordered)dict of name -> array it was; a checkpoint such as
    `{'state_dict': {...}, 'epoch': 3}` comes back with the same nesting, plain values as they
    were. The 19 MB EfficientNet-Lite0 file (296 tensors, legacy layout) reads in 5 ms with
    the file in the OS cache, 9 ms re-saved in the zip layout (CRC checks included), against
    15 ms for `torch.load(weights_only=True)` (one CPU core).

    Arrays own their memory (nothing aliases the file or another array, even for tensors that
    shared a storage) and keep the tensor's dtype, except bfloat16 -> float32 (numpy has no
    bfloat16; the conversion is exact) and conjugate/negative views, which are resolved.
    Parameters become their arrays; `requires_grad` and hooks are dropped. Bare torch dtypes
    become their names ('torch.float16').

    Args:
      path: the file, in the zip layout (PyTorch >= 1.6) or the legacy one.

    Returns:
      The rebuilt object: for weights files, a mapping of name -> `np.ndarray`.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: the pickle names a global outside `ALLOWED_GLOBALS` (the message names it),
        the file is corrupt or cut short, is no PyTorch file, or is a layout this reader does
        not take (the old tar layout, TorchScript archives, pickled modules).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no file at {path}")
    data = path.read_bytes()
    try:
        if data[:4] == b"PK\x03\x04":
            obj = _load_zip(data)
        elif data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
            raise ValueError(
                "the file is in PyTorch's oldest (tar) layout, which torchfile does not read: "
                "re-save it where you trust it with torch.save(torch.load(path, "
                "weights_only=False), new_path) from a current PyTorch"
            )
        elif data[:1] == b"\x80":  # the PROTO opcode the legacy stream's first pickle starts with
            obj = _load_legacy(data)
        else:
            raise _corrupt("neither a zip archive nor a legacy pickle stream")
        return _materialize(obj, {}, set())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    except Exception as err:  # pickle, zipfile and struct raise many types on bad bytes
        raise ValueError(
            f"{path}: not a readable PyTorch file ({type(err).__name__}: {err})"
        ) from err
