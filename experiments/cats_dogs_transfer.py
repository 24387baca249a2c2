"""Dogs vs cats by transfer: 6 images on frozen features, and 650 images fine-tuned.

Radek's "Can we beat the state of the art from 2013 with 0.046% of the training
examples?": frozen VGG19 features, a small head (MaxPool -> Dense 4096 -> BN -> ReLU ->
Dense 2 -> BN), 6 random training images, Adam 1e-4 for 41 epochs: 89.97%, and 71.63%
and 82.04% when he ran it again. One draw says little, so here the head is trained on
many random draws of 6 images at once (vmapped) and the distribution is reported. Then
fast.ai's lesson-1 recipe on 650 images: `fine_tune` with discriminative learning rates
(fast.ai's ResNet-34 got 99.46% with all 23,000 training images).

The recipe, top to bottom:

1. $JAXLEARN_DATA/cats_and_dogs/train (999 cats, 1,000 dogs) at --size px; 650 carved
   out for training (stratified, --split-seed), the other 1,349 are the validation set.
   The report is on --eval-dir when given (never used for a choice), else on the
   validation set. No choice is tuned here: both recipes are fixed in advance (the post's
   head recipe, fastai's fine_tune defaults), so the carved set is a clean report set.
2. The trivial baseline: the majority class of the 650 (a coin flip: 50%).
3. Pretrained weights: torchvision's (`--weights resnet18-f37072fd.pth`, 1000 classes)
   or, by default, experiment 6's Imagenette ResNet (`--imagenette-weights`). The
   from-scratch arm is the same network with random weights, on the same report set.
4. (a) Few-shot: features of every image computed once (`extract_features`), then
   --draws heads trained at once with `jax.vmap`, each on its own 6 images.
5. (b) 650 images: `fine_tune` (1 frozen epoch, then all layers with learning rates
   spread over 100x), against the same ResNet trained from scratch for as many epochs.

    python experiments/cats_dogs_transfer.py [--quick] [--weights FILE] [--eval-dir DIR]

Writes results.json, the few-shot accuracy distribution (few_shot.png) and the
fine-tuning curves (history_*.png) to --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling experiments

from cats_dogs_scratch import load  # the same data and --eval-dir handling
from imagenette import CROP_SCALE, PEAK_LR, default_weights_path

from jaxlearn import plots, runs
from jaxlearn.data import (
    ArrayLoader,
    carve,
    carve_indices,
    compose,
    random_flip,
    random_resized_crop,
    subset,
)
from jaxlearn.loop import evaluate, fit
from jaxlearn.models import get_model
from jaxlearn.multiseed import init_many
from jaxlearn.pretrained import imagenet_normalize, load_torch_weights, load_variables
from jaxlearn.schedules import one_cycle
from jaxlearn.steps import make_eval_step, make_train_step
from jaxlearn.transfer import (
    extract_features,
    fastai_adam,
    fine_tune,
    make_state,
    replace_head,
)

REFERENCE_FEW_SHOT = {"post": 0.8997, "rerun 1": 0.7163, "rerun 2": 0.8204}
REFERENCE_FINE_TUNE = 0.9946  # fast.ai ResNet-34, all 23,000 training images
FULL = dict(size=128, n_train=650, draws=50, seeds=3, freeze_epochs=1, epochs=7, batch=32)
QUICK = dict(size=32, n_train=40, draws=8, seeds=1, freeze_epochs=1, epochs=1, batch=16)
SHOTS = 6  # the post's 6 images; drawn stratified, so always 3 cats and 3 dogs
HEAD_LR = 1e-4  # the post's Adam learning rate
HEAD_EPOCHS = 41  # the post's epochs; 6 images are one batch, so one step per epoch
# Torch-style BN momentum: 41 steps take the running statistics 98.7% of the way to the
# data's (Keras' 0.99, the post's, would leave 66% of the initial mean 0 / variance 1).
BN_MOMENTUM = 0.9
# fast.ai lesson 1 trained 1 + 2 + 4 = 7 epochs (cycle_len 1, cycle_mult 2) after the head.
FINE_TUNE_LR = 2e-3  # fastai's fine_tune default base_lr
EVAL_BATCH = 128


class PostHead(nn.Module):
    """The post's head after the pooled features: Dense 4096 -> BN -> ReLU -> Dense 2 -> BN.

    The post's MaxPool shrank VGG19's 7x7x512 feature map to 3x3x512 before the first
    Dense layer. A ResNet ends in a global average pool trained with the network, so its
    pooled 512 features (`features_only=True`) take that place and the head starts there.
    """

    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits (N, num_classes) for pooled features (N, D)."""
        x = nn.Dense(4096)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)
        x = nn.Dense(self.num_classes)(nn.relu(x))
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)


def pretrained(args, size: int):
    """(model, variables, source name): torchvision weights if --weights, else experiment 6's."""
    shape = (1, size, size, 3)
    if args.weights:
        model = get_model(args.model, 1000)
        return model, load_torch_weights(args.weights, model, input_shape=shape), "torchvision"
    path = Path(args.imagenette_weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"--imagenette-weights {path} does not exist: run experiments/imagenette.py first "
            "(it writes this file), or pass --weights FILE (torchvision .pth/.safetensors)"
        )
    model = get_model(args.model, 10)
    return model, load_variables(path, model, input_shape=shape), "imagenette"


def draw_indices(labels: np.ndarray, draws: int) -> np.ndarray:
    """(draws, SHOTS) indices: draw d is a stratified random sample with seed d."""
    return np.stack([carve_indices(labels, SHOTS, seed=d)[0] for d in range(draws)])


def few_shot(train_feats, train_labels, report_feats, report_labels, draws, key) -> np.ndarray:
    """Accuracy on the report set of `draws` PostHeads, each trained on its own 6 images.

    All heads train at once: `jax.vmap` over the draws of a `lax.scan` over the 41 steps.
    """
    head = PostHead()
    tx = optax.adam(HEAD_LR)
    step = make_train_step(jit=False)  # features: float, no preprocess
    idx = draw_indices(train_labels, draws)
    states = init_many(head, tx, jax.random.split(key, draws), train_feats[:1])

    @jax.jit
    def train_and_predict(states, x, y, report):
        def one(state, xs, ys):
            def body(st, _):
                return step(st, {"image": xs, "label": ys})[0], None

            state = jax.lax.scan(body, state, None, length=HEAD_EPOCHS)[0]
            return state.apply_fn(state.variables, report, train=False)

        return jax.vmap(one)(states, x, y)

    logits = train_and_predict(states, train_feats[idx], train_labels[idx], report_feats)
    return np.mean(np.argmax(np.asarray(logits), -1) == report_labels[None], axis=1)


def describe(values) -> dict:
    """Median, quartiles, range, mean and std of a sample."""
    v = np.asarray(values, np.float64)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"median": median, "q1": q1, "q3": q3, "min": v.min(), "max": v.max(),
            "mean": v.mean(), "std": v.std(ddof=1) if v.size > 1 else 0.0, "n": v.size}  # fmt: skip


def train_scratch(model, random_variables, train_loader, epochs: int, train_step, seed: int):
    """The from-scratch arm of (b): the same ResNet, randomly initialised, a new 2-class head,
    all layers trained with fastai's Adam under one-cycle."""
    schedule = one_cycle(PEAK_LR, epochs * len(train_loader))
    tx = optax.inject_hyperparams(fastai_adam)(learning_rate=schedule)
    model, variables = replace_head(model, random_variables, 2, jax.random.key(seed))
    state = make_state(model, variables, tx, jax.random.key(seed))
    return fit(state, train_loader, train_step=train_step, epochs=epochs, progress=False)


def parse(argv):
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/cats_dogs_transfer")
    parser.add_argument("--weights", help="torchvision ResNet weights (.pth / .safetensors)")
    parser.add_argument(
        "--imagenette-weights",
        default=str(default_weights_path("runs/imagenette")),
        help="experiment 6's weights, used without --weights (default: where it writes them)",
    )
    models = ("resnet10", "resnet18", "resnet34", "resnet50")
    parser.add_argument("--model", default="resnet18", choices=models)
    parser.add_argument("--eval-dir", help="held-out folder with one sub-folder per class")
    parser.add_argument("--size", type=int, help="image side in px (full 128)")
    parser.add_argument("--draws", type=int, help="random 6-image draws for (a) (full 50)")
    parser.add_argument("--epochs", type=int, help="unfrozen fine-tuning epochs for (b) (full 7)")
    parser.add_argument("--n-train", type=int, help="training images (650)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 650-image draw")
    parser.add_argument("--parts", default="ab", choices=("a", "b", "ab"),
                        help="a: 6-image heads, b: 650-image fine-tuning")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("size", "draws", "epochs", "n_train", "seeds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["n_train"] < 2 * SHOTS or cfg["draws"] < 1 or cfg["epochs"] < 1 or cfg["seeds"] < 1:
        raise ValueError(f"need --n-train >= {2 * SHOTS}, --draws, --epochs, --seeds >= 1: {cfg}")
    return args, cfg


def main(argv: list[str] | None = None) -> dict:
    """Run (a) and/or (b); returns the metrics written to results.json."""
    args, cfg = parse(argv)
    started = time.time()

    # The weights first: a missing or mismatched file fails before any image is decoded.
    model, variables, source = pretrained(args, cfg["size"])

    # 1. Data: 650 to train on, the rest to validate; --eval-dir for the report if given.
    data, held = load(args, cfg["size"])
    train, valid = carve(data, cfg["n_train"], seed=args.split_seed)
    if args.quick:
        valid = subset(valid, min(60, len(valid)), seed=0)
    report_name, report = ("valid", valid) if held is None else ("eval_dir", held)
    print(f"{len(train)} train / {len(valid)} valid / report on {report_name} ({len(report)})")

    # 2. Trivial baseline.
    majority = np.bincount(train.labels, minlength=train.num_classes).argmax()
    metrics = {"reported_on": report_name, "report_size": len(report),
               "majority_class_accuracy": float(np.mean(report.labels == majority))}  # fmt: skip

    # 3. The pretrained network (loaded above) and the same one with random weights.
    # Jitted: un-jitted, a ResNet's init runs op by op (over a minute on 2 busy cores); one
    # compilation serves every seed.
    example = np.zeros((1, cfg["size"], cfg["size"], 3), np.float32)
    init = jax.jit(model.init)

    # 4. (a) 6 images: features once per body, then all draws' heads at once.
    if "a" in args.parts:
        bodies = {source: variables, "scratch": init(jax.random.key(0), example)}
        accs = {}
        for name, body in bodies.items():
            feats = [extract_features(model, body, d.images, EVAL_BATCH,
                                      preprocess=imagenet_normalize)
                     for d in (train, report)]  # fmt: skip
            accs[name] = few_shot(feats[0], train.labels, feats[1], report.labels, cfg["draws"],
                                  jax.random.key(1))  # fmt: skip
            print(f"(a) {name:12} " + "  ".join(f"{k} {v:.4f}" for k, v in
                                               describe(accs[name]).items()))  # fmt: skip
        metrics["few_shot"] = {k: {**describe(v), "values": v} for k, v in accs.items()}
        metrics["few_shot_reference"] = REFERENCE_FEW_SHOT
        plots.plot_distributions({f"{k} features": v for k, v in accs.items()},
                                 reference=REFERENCE_FEW_SHOT,
                                 ylabel=f"accuracy on {report_name}, 6 training images",
                                 path=Path(args.out) / "few_shot.png")  # fmt: skip

    # 5. (b) 650 images: fine_tune the pretrained ResNet vs the same ResNet from scratch.
    if "b" in args.parts:
        augment = compose(random_resized_crop(cfg["size"], scale=CROP_SCALE), random_flip())
        train_step = make_train_step(augment=augment, preprocess=imagenet_normalize)
        eval_step = make_eval_step(preprocess=imagenet_normalize)
        report_loader = ArrayLoader(report.images, report.labels, EVAL_BATCH, train=False)
        total_epochs = cfg["freeze_epochs"] + cfg["epochs"]
        rows = {"fine_tune": [], "scratch": []}
        for seed in range(cfg["seeds"]):
            loader = ArrayLoader(train.images, train.labels, cfg["batch"], seed=seed)
            new_model, new_vars = replace_head(model, variables, 2, jax.random.key(seed))
            state, hist = fine_tune(new_model, new_vars, loader, epochs=cfg["epochs"],
                                    freeze_epochs=cfg["freeze_epochs"], key=jax.random.key(seed),
                                    base_lr=FINE_TUNE_LR, preprocess=imagenet_normalize,
                                    augment=augment, progress=False)  # fmt: skip
            rows["fine_tune"].append(evaluate(state, report_loader, eval_step)["accuracy"])
            scratch_state, scratch_hist = train_scratch(
                model, init(jax.random.key(seed), example), loader, total_epochs, train_step, seed
            )
            rows["scratch"].append(evaluate(scratch_state, report_loader, eval_step)["accuracy"])
            print(f"(b) seed {seed}: fine_tune {rows['fine_tune'][-1]:.4f}  "
                  f"scratch {rows['scratch'][-1]:.4f}")  # fmt: skip
            if seed == 0:
                plots.plot_history(hist["unfrozen"], path=Path(args.out) / "history_fine_tune.png")
                plots.plot_history(scratch_hist, path=Path(args.out) / "history_scratch.png")
        metrics["fine_tune_650"] = {k: {**describe(v), "values": v} for k, v in rows.items()}
        metrics["fine_tune_reference"] = REFERENCE_FINE_TUNE

    config = {**cfg, "quick": args.quick, "parts": args.parts, "source": source,
              "model": args.model, "weights": args.weights or args.imagenette_weights,
              "shots": SHOTS, "head": {"lr": HEAD_LR, "epochs": HEAD_EPOCHS, "optimizer": "adam",
                                       "bn_momentum": BN_MOMENTUM},
              "fine_tune": {"base_lr": FINE_TUNE_LR, "lr_mult": 100, "scratch_peak_lr": PEAK_LR,
                            "crop_scale": CROP_SCALE},
              "data": str(runs.data_root(args.data) / "cats_and_dogs" / "train"),
              "eval_dir": args.eval_dir, "split_seed": args.split_seed,
              "split_sizes": [len(train), len(valid)]}  # fmt: skip
    runs.write_results(args.out, config=config, metrics=metrics,
                       seeds=list(range(cfg["seeds"])), started=started)  # fmt: skip
    print(f"\nreported on {report_name} ({len(report)} images); source: {source}")
    print(f"{'majority class':28}{metrics['majority_class_accuracy']:.4f}")
    for name, d in metrics.get("few_shot", {}).items():
        quartiles = f"[q1 {d['q1']:.4f}, q3 {d['q3']:.4f}]"
        span = f"range {d['min']:.4f}-{d['max']:.4f}"
        print(f"{'(a) 6 images, ' + name:28}median {d['median']:.4f} {quartiles} {span}")
    for name, d in metrics.get("fine_tune_650", {}).items():
        print(f"{'(b) 650 images, ' + name:28}{d['mean']:.4f} +- {d['std']:.4f} ({d['n']} seeds)")
    print(f"references: (a) {REFERENCE_FEW_SHOT}, (b) {REFERENCE_FINE_TUNE} (full data)")
    return metrics


if __name__ == "__main__":
    main()
