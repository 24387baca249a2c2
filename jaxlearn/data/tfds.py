"""tensorflow-datasets by name and split -> `ImageArrays`, without TensorFlow where possible.

How TensorFlow comes in: it is an optional extra (`pip install "jaxlearn[tf]"`,
which installs tensorflow-cpu). Reading a data set that is already prepared
(array_record files in `data_dir`) goes through `tfds.data_source`, which
needs no TensorFlow at all. Downloading and preparing a data set with images
does need it (tfds encodes images with TensorFlow), and network access; when
TensorFlow is missing, `load_tfds` says so instead of failing deep inside tfds.

TensorFlow never takes GPU memory from JAX: before anything of TensorFlow is
built, `hide_gpus_from_tensorflow` makes no GPU visible to it
(`tf.config.set_visible_devices([], 'GPU')`); it only encodes images on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
from tqdm.auto import tqdm

from jaxlearn.data.arrays import ImageArrays
from jaxlearn.data.images import check_resize, resize_array

_NEEDS_TF = (
    "tfds data set {name!r} is not prepared in {data_dir}, and preparing it needs "
    'TensorFlow, which is not installed: pip install "jaxlearn[tf]" (tensorflow-cpu). '
    "Downloading also needs network access; alternatively prepare it on another machine "
    "and copy the {name} folder into data_dir."
)


def hide_gpus_from_tensorflow() -> None:
    """Make no GPU visible to TensorFlow, if it is installed, so that it leaves GPU memory to JAX.

    TensorFlow by default reserves nearly all of every GPU's memory when it
    first touches one. Call this before TensorFlow builds anything; if it has
    already claimed its devices, a warning says so (the memory is then taken).
    """
    if importlib.util.find_spec("tensorflow") is None:
        return
    import tensorflow as tf  # optional dependency, see the module docstring

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:
        warnings.warn(
            f"TensorFlow had already initialised its GPUs and may hold GPU memory: {error}",
            stacklevel=2,
        )


def prepared_builder(name: str, data_dir: str | os.PathLike | None = None):
    """tfds's builder of data set `name`, prepared in `data_dir` (preparing it if need be).

    Preparing downloads the data set (network access) and needs TensorFlow; TensorFlow is
    first kept off the GPUs (`hide_gpus_from_tensorflow`).

    Args:
      name: tfds name, with config and version if needed, as in `load_tfds`.
      data_dir: tfds data folder; None: tfds's default (~/tensorflow_datasets or
        $TFDS_DATA_DIR).

    Raises:
      ImportError: the data set is not prepared and TensorFlow, which preparing
        it needs, is not installed (the message says how to get it).
    """
    # Imported here: tensorflow_datasets takes ~2 s to import, and only tfds data needs it.
    import tensorflow_datasets as tfds

    hide_gpus_from_tensorflow()
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if importlib.util.find_spec("tensorflow") is None:
            raise ImportError(_NEEDS_TF.format(name=name, data_dir=builder.data_dir))
        builder.download_and_prepare()
    return builder


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    size: int | None = None,
    resize: str = "crop",
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = True,
) -> ImageArrays:
    """Load a tfds image classification data set's `split` into memory.

    Args:
      name: tfds name, with config and version if needed: 'cifar10',
        'mnist', 'cats_vs_dogs', 'imagenette/160px', 'cifar10:3.0.2'.
      split: a tfds split, slices included: 'train', 'test', 'train[:90%]',
        'train[90%:]', 'train[:1000]'.
      data_dir: tfds data folder; None: tfds's default (~/tensorflow_datasets
        or $TFDS_DATA_DIR).
      size: side of square output images; required when the images differ in
        size (cats_vs_dogs), None keeps them as they are (cifar10, mnist).
      resize: 'crop' (shortest side to `size`, then the centre) or 'squash'.
      image_key: the feature holding the image.
      label_key: the `ClassLabel` feature holding the label.
      progress: show a progress bar while decoding.

    Returns:
      `ImageArrays` (channels as stored: 1 for mnist, 3 for colour), with the
      `ClassLabel`'s names as class names.

    Raises:
      ImportError: the data set is not prepared and TensorFlow is missing.
      ValueError: empty split, unknown feature key, bad `size`/`resize`, or
        images of different sizes with `size=None`.
    """
    if size is not None:
        size = check_resize(size, resize)
    builder = prepared_builder(name, data_dir)
    source = builder.as_data_source(split=split)
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"{name} has no feature {key!r}; its features: {list(features)}")
    if len(source) == 0:
        raise ValueError(f"tfds split {split!r} of {name} in {builder.data_dir} is empty")

    images, labels = [], np.empty(len(source), np.int32)
    for i in tqdm(range(len(source)), desc=f"{name} {split}", unit="img", disable=not progress):
        example = source[i]
        image = np.asarray(example[image_key], dtype=np.uint8)
        images.append(image if size is None else resize_array(image, size, resize))
        labels[i] = example[label_key]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images of {name} {split!r} differ in size ({len(shapes)} shapes, e.g. "
            f"{sorted(shapes)[:3]}): pass size= to resize them to one square size"
        )
    return ImageArrays(np.stack(images), labels, tuple(features[label_key].names))
