"""A tiny tensorflow-datasets data set, prepared as real array_record files without TensorFlow.

`prepare(data_dir)` writes `jaxlearn_colors` (train: 12 images per class, test: 4):
reddish 'cats' and bluish 'dogs' of 10-15 px sides (not square, so loaders crop), stored
as PNG bytes, the way tfds prepares a downloaded data set. tfds registers the builder
under that name when this module is imported, so `tfds.builder('jaxlearn_colors',
data_dir=...)`, `load_tfds` and `TfdsSource` find it.
"""

import io
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "jaxlearn_colors"
PER_CLASS = {"train": 12, "test": 4}


class JaxlearnColors(tfds.core.GeneratorBasedBuilder):
    """Colour-coded cats and dogs (class 0 reddish, class 1 bluish: noise plus 120)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cats", "dogs"]),
        })  # fmt: skip
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in PER_CLASS}

    def _generate_examples(self, split: str):
        rng = np.random.default_rng(len(split))
        for i in range(2 * PER_CLASS[split]):
            label = i % 2
            height, width = rng.integers(10, 16, 2)
            pixels = rng.integers(0, 120, (height, width, 3)).astype(np.uint8)
            pixels[..., 2 * label] += 120
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, format="PNG")
            yield i, {"image": encoded.getvalue(), "label": label}


def prepare(data_dir: Path) -> Path:
    """Write the data set's array_record files under `data_dir`; return `data_dir`."""
    JaxlearnColors(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir
