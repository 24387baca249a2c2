"""Image data: sources -> `ImageArrays` in memory, carving, the loader, on-device augmentation.

Sources: `load_image_folder` (ROOT/SPLIT/CLASS/*), `load_tfds` (tensorflow-
datasets by name and split), `load_mnist` (the four idx files). Then `carve`
a validation set or take a `subset`, feed `ArrayLoader` (or stream data beyond
memory with `StreamLoader`, `folder_loader` choosing), and augment on the
device with the functions of `jaxlearn.data.augment` (and mix pairs of examples
with `jaxlearn.data.mix`). `ImageDataLoaders` does the steps from a folder or a
tfds name to the two loaders in one call.
"""

from jaxlearn.data.arrays import ImageArrays
from jaxlearn.data.augment import (
    Augment,
    channel_stats,
    color_jitter,
    compose,
    cutout,
    denormalize,
    hflip,
    normalize,
    random_crop,
    random_flip,
    random_resized_crop,
    random_rotate,
    resize,
    to_float,
    tta_views,
)
from jaxlearn.data.cache import default_cache_dir
from jaxlearn.data.dataloaders import ImageDataLoaders
from jaxlearn.data.folders import load_image_folder
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.data.mix import BatchAugment, CutMix, MixUp
from jaxlearn.data.mnist import load_mnist
from jaxlearn.data.split import carve, carve_indices, subset
from jaxlearn.data.stream import (
    ImageFolderSource,
    SourceImages,
    StreamLoader,
    TfdsSource,
    folder_loader,
)
from jaxlearn.data.tfds import hide_gpus_from_tensorflow, load_tfds

__all__ = [
    "ArrayLoader",
    "Augment",
    "BatchAugment",
    "CutMix",
    "ImageArrays",
    "ImageDataLoaders",
    "ImageFolderSource",
    "MixUp",
    "SourceImages",
    "StreamLoader",
    "TfdsSource",
    "carve",
    "carve_indices",
    "channel_stats",
    "color_jitter",
    "compose",
    "cutout",
    "default_cache_dir",
    "denormalize",
    "folder_loader",
    "hflip",
    "hide_gpus_from_tensorflow",
    "load_image_folder",
    "load_mnist",
    "load_tfds",
    "normalize",
    "random_crop",
    "random_flip",
    "random_resized_crop",
    "random_rotate",
    "resize",
    "subset",
    "to_float",
    "tta_views",
]
