"""Quickstart: fast.ai lesson 1, dogs vs cats from Google's pretrained EfficientNet-Lite0.

The 2017 lesson-1 loop (`ConvLearner.pretrained(arch, data, precompute=True)`,
`lr_find()`, `fit(lr, 3, cycle_len=1, cycle_mult=2)`, `TTA()`) in pure JAX, on real data:

1. data: $JAXLEARN_DATA/cats_and_dogs/train (999 cats, 1,000 dogs, photos of every
   size), a stratified 20% carved off as the validation set, images centre-cropped to
   the weights' resolution (224 px);
2. the pretrained network: Google's EfficientNet-Lite0 ImageNet checkpoint
   (`pretrained.load`, from the `jaxlearn[weights]` packages, with the input
   normalisation it was trained with). Its body stays frozen, so its pooled features of
   every image, and of every validation image's mirror, are computed once (lesson 1's
   `precompute=True`) and the classifier trains on those;
3. the LR range test (Smith 2015) picks the classifier's learning rate ('valley');
4. SGDR (Loshchilov & Hutter 2017) with cycle_len 1 and cycle_mult 2, 1 + 2 + 4 = 7
   epochs, a snapshot at the bottom of each cycle;
5. on the validation set: the final model, with test-time augmentation (the image and
   its mirror), and the ensemble of the snapshots (Huang et al. 2017), for several
   seeds; the most confidently wrong images in a grid, and the confusion matrix.

Nothing is tuned on the validation set: the recipe is lesson 1's, the LR the finder's
on the training images.

    python experiments/quickstart.py                  # ~2 min on 2 CPU cores
    python experiments/quickstart.py --quick          # ~20 s: 96 images at 64 px
    python experiments/quickstart.py --folder ROOT    # your own ROOT/train/CLASS/*.jpg

Writes results.json, lr_find.png, schedule.png, history.png, ensemble.png,
top_losses.png and confusion.png to --out.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlearn import ensemble, plots, pretrained, runs
from jaxlearn.data import ArrayLoader, carve, load_image_folder, subset
from jaxlearn.loop import CaptureParams, evaluate, fit
from jaxlearn.lr_finder import lr_find
from jaxlearn.schedules import sgdr
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step, make_train_step
from jaxlearn.transfer import LinearHead, extract_features, fastai_adam


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much data and compute a mode spends."""

    size: int | None  # image side in px; None: the weights' own resolution
    images: int | None  # images used of the folder (stratified); None: all
    seeds: int
    cycles: int  # SGDR cycles of 1, 2, 4, ... epochs = snapshots
    finder_steps: int


# 7 epochs of a linear head on 1,599 feature vectors take ~1 s per seed: the features
# (2,399 forward passes of Lite0 at 224 px, ~25 s on 2 cores) are the run's cost.
DEFAULT = Budget(size=None, images=None, seeds=5, cycles=3, finder_steps=100)
QUICK = Budget(size=64, images=96, seeds=2, cycles=2, finder_steps=30)
VALID_PCT = 0.2  # fastai's default valid_pct
BATCH = 64  # lesson 1's batch size
FINDER_RANGE = (1e-5, 10.0)  # the head's loss is flat at 1e-5 and diverges before 10
FEATURE_BATCH = 64


def parse(argv):
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/quickstart")
    parser.add_argument(
        "--folder", help="ROOT holding ROOT/train/CLASS/* (default: $JAXLEARN_DATA/cats_and_dogs)"
    )
    installed = sorted(k for k, v in pretrained.WEIGHTS.items() if v.package)
    parser.add_argument("--arch", default="efficientnet_lite0", choices=installed)
    parser.add_argument("--cycles", type=int, help="SGDR cycles (1, 2, 4, ... epochs) = snapshots")
    parser.add_argument("--lr", type=float, help="peak LR (default: the LR finder's valley)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else DEFAULT
    budget = dataclasses.replace(
        budget, seeds=args.seeds or budget.seeds, cycles=args.cycles or budget.cycles
    )
    if budget.seeds < 1 or budget.cycles < 1:
        parser.error(f"--seeds and --cycles must be >= 1, got {budget.seeds}, {budget.cycles}")
    return args, budget


def features(source: pretrained.Pretrained, images: np.ndarray) -> np.ndarray:
    """The frozen body's pooled features of `images`, (N, D) float32."""
    return extract_features(source.model, source.variables, images, FEATURE_BATCH,
                            preprocess=source.preprocess)  # fmt: skip


def train_head(feats, labels, num_classes, schedule, snapshot_at, seed, train_step, eval_data):
    """A linear classifier on features under `schedule`; returns (state, history, snapshots)."""
    tx = optax.inject_hyperparams(fastai_adam)(learning_rate=schedule)
    state = TrainState.create(LinearHead(num_classes), tx, jax.random.key(seed), feats[:1])
    capture = CaptureParams(snapshot_at)
    state, history = fit(
        state, ArrayLoader(feats, labels, BATCH, seed=seed), train_step=train_step,
        steps=max(snapshot_at), eval_data=eval_data, eval_step=make_eval_step(),
        callbacks=[capture], progress=False,
    )  # fmt: skip
    return state, history, capture.snapshots


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart; return the metrics written to results.json."""
    args, budget = parse(argv)
    started = time.time()
    out = Path(args.out)

    # --- 2 first: a missing weights package fails before any image is decoded.
    source = pretrained.load(args.arch)
    size = budget.size or source.size

    # --- 1. data: the folder's train split, a stratified 20% of it as validation.
    root = Path(args.folder) if args.folder else runs.data_root(args.data) / "cats_and_dogs"
    data = load_image_folder(root, "train", size, progress=args.progress)
    if budget.images is not None:
        data = subset(data, min(budget.images, len(data)), seed=0)
    train, valid = carve(data, 1 - VALID_PCT, seed=0)
    names = train.class_names
    print(f"{len(train)} train / {len(valid)} valid images of {names} at {size} px; "
          f"weights: {source.name}")  # fmt: skip
    majority = np.bincount(train.labels, minlength=train.num_classes).argmax()
    baseline = float(np.mean(valid.labels == majority))

    # --- 2. precompute: the frozen body's features, once (mirrors for the TTA views).
    t0 = time.time()
    train_x = features(source, train.images)
    valid_views = np.stack([features(source, valid.images),
                            features(source, valid.images[:, :, ::-1])], axis=1)  # fmt: skip
    feature_s = time.time() - t0
    print(f"features: {train_x.shape[1]} per image, {len(train) + 2 * len(valid)} "
          f"forward passes in {feature_s:.0f} s")  # fmt: skip
    views = lambda x: jnp.swapaxes(x, 0, 1)  # (N, V, D) -> the (V, N, D) views of TTA
    valid_loader = ArrayLoader(valid_views[:, 0], valid.labels, 256, train=False)

    # --- 3. LR range test on the training features, with the optimizer the run uses.
    train_step = make_train_step()
    finder_state = TrainState.create(
        LinearHead(train.num_classes), optax.inject_hyperparams(fastai_adam)(learning_rate=1e-3),
        jax.random.key(0), train_x[:1],
    )  # fmt: skip
    finder = lr_find(finder_state, train_step, ArrayLoader(train_x, train.labels, BATCH, seed=0),
                     start_lr=FINDER_RANGE[0], end_lr=FINDER_RANGE[1],
                     num_steps=budget.finder_steps)  # fmt: skip
    valley = finder.suggestions["valley"].lr
    peak_lr = args.lr or valley or 1e-2  # lesson 1's 0.01 when the curve cannot be read
    print(f"LR finder ({finder.stopped}): valley {valley} -> peak LR {peak_lr:.3g}")
    plots.plot_lr_find(finder, path=out / "lr_find.png")

    # --- 4. SGDR, cycle_len 1, cycle_mult 2: a snapshot at the bottom of each cycle.
    steps_per_epoch = len(ArrayLoader(train_x, train.labels, BATCH, seed=0))
    schedule = sgdr(peak_lr, steps_per_epoch, cycle_mult=2, num_cycles=budget.cycles)
    snapshot_at = ensemble.snapshot_steps(schedule)
    plots.plot_schedule(schedule, snapshot_at[-1], label="SGDR", path=out / "schedule.png")

    # --- 5. each seed: final model, its TTA, the TTA ensemble of its snapshots.
    per_seed = []
    for seed in range(budget.seeds):
        state, history, snapshots = train_head(
            train_x, train.labels, train.num_classes, schedule, snapshot_at, seed, train_step,
            valid_loader,
        )  # fmt: skip
        final = evaluate(state, valid_loader, make_eval_step())["accuracy"]
        curve = ensemble.accuracy_curve(state.apply_fn, snapshots, valid_views, valid.labels,
                                        views_fn=views)  # fmt: skip
        per_seed.append({"final": final, "final_tta": float(curve.members[-1]),
                         "ensemble_tta": float(curve.ensemble[-1]),
                         "members_tta": curve.members.tolist(),
                         "ensemble_curve_tta": curve.ensemble.tolist()})  # fmt: skip
        print(f"seed {seed}: final {final:.4f}  + TTA {curve.members[-1]:.4f}  "
              f"{len(snapshots)}-snapshot ensemble + TTA {curve.ensemble[-1]:.4f}")  # fmt: skip
        if seed == 0:
            plots.plot_history(history, path=out / "history.png")
            probs = ensemble.predict_tta(state.apply_fn, state.variables, valid_views,
                                         views_fn=views)  # fmt: skip
            plots.plot_top_losses(valid.images, valid.labels, probs, names, k=16,
                                  path=out / "top_losses.png")  # fmt: skip
            plots.plot_confusion_matrix(valid.labels, probs.argmax(-1), names,
                                        path=out / "confusion.png")  # fmt: skip
    mean_curve = ensemble.mean_curve(
        [ensemble.EnsembleCurve(r["ensemble_curve_tta"], r["members_tta"]) for r in per_seed]
    )
    plots.plot_ensemble_curve(mean_curve, path=out / "ensemble.png")

    arms = ("final", "final_tta", "ensemble_tta")
    summary = {k: runs.summarize([r[k] for r in per_seed]) for k in arms}
    print_table(baseline, summary, budget.seeds, len(valid))
    metrics = {
        "baseline_majority": baseline,
        "lr_finder": {"stopped": finder.stopped, "peak_lr": peak_lr,
                      "suggestions": {k: s._asdict() for k, s in finder.suggestions.items()}},
        "summary": summary,
        "per_seed": per_seed,
        "feature_seconds": feature_s,
    }  # fmt: skip
    config = {
        "data": str(root / "train"),
        "sizes": {"train": len(train), "valid": len(valid)},
        "weights": source.name,
        "image_size": size,
        "preprocess": source.preprocess.__name__,
        **dataclasses.asdict(budget),
        "head": "LinearHead on the frozen body's pooled features (precompute)",
        "optimizer": "fastai_adam (AdamW 0.9/0.99, eps 1e-5, wd 0.01)",
        "schedule": f"sgdr(peak_lr={peak_lr:.4g}, cycle_steps={steps_per_epoch}, "
        f"cycle_mult=2, num_cycles={budget.cycles})",
        "snapshot_steps": snapshot_at,
        "batch_size": BATCH,
        "tta": "image + mirror",
        "lr_finder": {"range": FINDER_RANGE, "steps": budget.finder_steps},
    }
    path = runs.write_results(out, config=config, metrics=metrics,
                              seeds=list(range(budget.seeds)), started=started)  # fmt: skip
    print(f"wrote {path} and figures in {out} ({time.time() - started:.0f} s)")
    return metrics


def print_table(baseline: float, summary: dict, n_seeds: int, n_valid: int) -> None:
    """The summary table: validation accuracy of the baseline, the model, TTA, the ensemble."""
    print(f"\nvalidation accuracy ({n_valid} images, {n_seeds} seed(s))")
    print(f"{'majority-class baseline':<34}{baseline:.4f}")
    for key, name in (("final", "final model"), ("final_tta", "final model + TTA"),
                      ("ensemble_tta", "snapshot ensemble + TTA")):  # fmt: skip
        s = summary[key]
        print(f"{name:<34}{s['mean']:.4f} +- {s['std']:.4f}")
    print()


if __name__ == "__main__":
    main()
