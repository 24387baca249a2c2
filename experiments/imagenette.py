"""Pretrain a ResNet on Imagenette with one-cycle and save it for transfer learning.

fast.ai's Imagenette leaderboard (10 easy ImageNet classes): 85.77% validation
accuracy at 128 px after 5 epochs (xresnet50, one-cycle). No ImageNet weights can be
downloaded on these machines, so this run is also the "pretrained" source of
experiment 7 (cats_dogs_transfer): the weights go to --weights-out in the
converted-weights format (`jaxlearn.pretrained.save_variables`).

The recipe, top to bottom:

1. $JAXLEARN_DATA/imagenette_128/{train,val} (9,469 / 3,925 images), decoded at --size
   px; 5% of train carved off as the validation set for choices (seeded, stratified);
   the official `val` split is looked at once, for the final report.
2. The trivial baseline: the majority class of the training set (~10%).
3. A torchvision-style ResNet from scratch: fastai's Adam (AdamW wd 0.01) under
   one-cycle (fastai conventions: 25% warm-up from peak/25, cosine down to peak/1e5),
   label smoothing 0.1, random resized crops (35-100% of the area) and flips, inputs
   normalised with ImageNet's mean and std (as torchvision weights expect, so
   experiment 7 treats both weight sources alike).
4. The report: official-val accuracy per seed (mean +- std); seed 0's weights saved.

    python experiments/imagenette.py [--quick] [--size 128] [--epochs 5] [--model resnet18]

Full mode (128 px, 5 epochs, 3 seeds) takes ~34 minutes per seed on 2 CPU cores with the
Eigen-conv XLA flag (ResNet-18 at ~23 images/s); `--seeds 1` for one. Shrink it with
--size, --epochs and --train-subset, and say so.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax

from jaxlearn import plots, runs
from jaxlearn.data import (
    ArrayLoader,
    carve,
    compose,
    load_image_folder,
    load_tfds,
    random_flip,
    random_resized_crop,
    subset,
)
from jaxlearn.loop import evaluate, fit
from jaxlearn.models import get_model
from jaxlearn.pretrained import imagenet_normalize, save_variables
from jaxlearn.schedules import one_cycle
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step, make_train_step
from jaxlearn.transfer import fastai_adam

REFERENCE = 0.8577  # fast.ai leaderboard, Imagenette 128 px, 5 epochs (xresnet50)
FULL = dict(size=128, epochs=5, seeds=3, batch=64, train_subset=None, val_subset=None)
# Quick: a few steps on a subset at 32 px (the 10-second rule; a pipeline check, not a result).
QUICK = dict(size=32, epochs=1, seeds=1, batch=16, train_subset=96, val_subset=100)
VALID_FRACTION = 0.05  # 473 of 9,469 images: +-2% standard error at ~50% accuracy
PEAK_LR = 3e-3  # fastai's usual one-cycle peak for Adam on a ResNet from scratch
LABEL_SMOOTHING = 0.1  # fastai's Imagenette script trains with LabelSmoothingCrossEntropy
CROP_SCALE = (0.35, 1.0)  # fastai's Imagenette script: RandomResizedCrop(min_scale=0.35)
EVAL_BATCH = 128  # forward passes only: bigger batches, fewer dispatches
WEIGHTS_NAME = "imagenette_weights.msgpack"  # experiment 7's default looks for this name


def default_weights_path(out: str | Path) -> Path:
    """Where the weights go (and where experiment 7 looks) without --weights-out."""
    return Path(out) / WEIGHTS_NAME


def parse(argv):
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/imagenette")
    models = ("resnet10", "resnet18", "resnet34", "resnet50")
    parser.add_argument("--model", default="resnet18", choices=models)
    parser.add_argument("--size", type=int, help="image side in px (full 128)")
    parser.add_argument("--epochs", type=int, help="training epochs (full 5)")
    parser.add_argument("--batch-size", type=int, help="images per step (full 64)")
    parser.add_argument("--lr", type=float, default=PEAK_LR, help="one-cycle peak LR")
    parser.add_argument("--train-subset", type=int, help="train on this many carved images")
    parser.add_argument("--val-subset", type=int, help="report on this many val images")
    parser.add_argument("--tfds", metavar="NAME", help="tfds name instead, e.g. imagenette/160px")
    parser.add_argument(
        "--weights-out", help=f"weights file for experiment 7 (default OUT/{WEIGHTS_NAME})"
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key, flag in (("size", "size"), ("epochs", "epochs"), ("batch", "batch_size"),
                      ("seeds", "seeds"), ("train_subset", "train_subset"),
                      ("val_subset", "val_subset")):  # fmt: skip
        if getattr(args, flag) is not None:
            cfg[key] = getattr(args, flag)
    if cfg["size"] < 32 or cfg["epochs"] < 1 or cfg["seeds"] < 1:
        raise ValueError(f"need --size >= 32, --epochs >= 1 and --seeds >= 1, got {cfg}")
    return args, cfg


def load(args, size: int):
    """(train, val) ImageArrays from the image folder (or tfds), val classes aligned with train."""
    if args.tfds:
        return load_tfds(args.tfds, "train", size=size), load_tfds(args.tfds, "validation",
                                                                    size=size)  # fmt: skip
    root = runs.data_root(args.data) / "imagenette_128"
    train = load_image_folder(root, "train", size, progress=args.progress)
    val = load_image_folder(root, "val", size, class_names=train.class_names,
                            progress=args.progress)  # fmt: skip
    return train, val


def main(argv: list[str] | None = None) -> dict:
    """Train, report, save seed 0's weights; returns the metrics written to results.json."""
    args, cfg = parse(argv)
    started = time.time()
    weights_out = Path(args.weights_out) if args.weights_out else default_weights_path(args.out)

    # 1. Data: carve a validation set out of train; the official val is the report.
    data, val = load(args, cfg["size"])
    valid, train = carve(data, VALID_FRACTION, seed=0)
    if cfg["train_subset"]:
        train = subset(train, min(cfg["train_subset"], len(train)), seed=0)
    if cfg["val_subset"]:
        val = subset(val, min(cfg["val_subset"], len(val)), seed=0)
        valid = subset(valid, min(cfg["val_subset"], len(valid)), seed=0)
    batch = min(cfg["batch"], len(train))
    print(f"{len(train)} train / {len(valid)} valid (carved) / {len(val)} val (report)")

    # 2. Trivial baseline: always answer the training set's most frequent class.
    majority = np.bincount(train.labels, minlength=train.num_classes).argmax()
    baseline = float(np.mean(val.labels == majority))

    # 3. The ResNet, one compiled train step shared by all seeds (the optimizer enters the
    # step by value: every seed's new optimizer object is the same program).
    model = get_model(args.model, train.num_classes)
    steps_per_epoch = len(train) // batch
    schedule = one_cycle(args.lr, cfg["epochs"] * steps_per_epoch)
    augment = compose(random_resized_crop(cfg["size"], scale=CROP_SCALE), random_flip())
    train_step = make_train_step(label_smoothing=LABEL_SMOOTHING, augment=augment,
                                 preprocess=imagenet_normalize)  # fmt: skip
    eval_step = make_eval_step(preprocess=imagenet_normalize)
    valid_loader = ArrayLoader(valid.images, valid.labels, EVAL_BATCH, train=False)
    val_loader = ArrayLoader(val.images, val.labels, EVAL_BATCH, train=False)
    per_seed = []
    for seed in range(cfg["seeds"]):
        t0 = time.time()
        tx = optax.inject_hyperparams(fastai_adam)(learning_rate=schedule)
        state = TrainState.create(model, tx, jax.random.key(seed), train.images[:1])
        loader = ArrayLoader(train.images, train.labels, batch, seed=seed)
        state, history = fit(state, loader, train_step=train_step, epochs=cfg["epochs"],
                             eval_data=valid_loader, eval_step=eval_step,
                             progress=args.progress)  # fmt: skip
        train_s = time.time() - t0
        row = {
            "val_accuracy": evaluate(state, val_loader, eval_step)["accuracy"],
            "valid_accuracy": float(history["eval_accuracy"][-1]),
            "final_train_loss": float(history["train_loss"][-1]),
            "train_images_per_s": cfg["epochs"] * steps_per_epoch * batch / train_s,
        }
        per_seed.append(row)
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
        if seed == 0:
            save_variables(weights_out, state.variables)
            plots.plot_history(history, path=Path(args.out) / "history_seed0.png")

    # 4. Report on val: mean +- std over seeds against the leaderboard.
    accs = [r["val_accuracy"] for r in per_seed]
    metrics = {
        "majority_class_val_accuracy": baseline,
        "val_accuracy_mean": float(np.mean(accs)),
        "val_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "reference_val_accuracy": REFERENCE,
        "per_seed": per_seed,
        "weights_path": str(weights_out),
        "sizes": {"train": len(train), "valid": len(valid), "val": len(val)},
    }
    config = {**cfg, "quick": args.quick, "model": args.model, "peak_lr": args.lr,
              "batch": batch, "steps_per_epoch": steps_per_epoch,
              "label_smoothing": LABEL_SMOOTHING, "crop_scale": CROP_SCALE,
              "data": args.tfds or str(runs.data_root(args.data) / "imagenette_128")}  # fmt: skip
    runs.write_results(args.out, config=config, metrics=metrics,
                       seeds=list(range(cfg["seeds"])), started=started)  # fmt: skip
    print(f"\n{'arm':<22}{'val accuracy':>16}")
    print(f"{'majority class':<22}{baseline:>16.4f}")
    mean, std = metrics["val_accuracy_mean"], metrics["val_accuracy_std"]
    print(f"{args.model:<22}{mean:>9.4f} +- {std:.4f}")
    print(f"{'reference (xresnet50)':<22}{REFERENCE:>16.4f}")
    print(f"weights: {weights_out}")
    return metrics


if __name__ == "__main__":
    main()
