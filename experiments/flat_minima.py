"""Do flatter minima generalise better? 100 MLPs 784-20-10 on MNIST, trained at once.

Radek's post "Do smoother areas of the error surface lead to better generalization?"
trained 100 small MLPs on MNIST (mean test accuracy 95.4%) and asked whether the
sharpness of each model's minimum predicts its generalisation gap (test loss minus
train loss). The recipe, top to bottom:

1. MNIST: 55,000 training images, 5,000 carved out (stratified) for validation, the
   10,000 test images looked at once, for the final numbers.
2. Baselines: the majority class, and a linear softmax model (784-10).
3. 100 MLPs 784-20-10, all in one vmapped program (`jaxlearn.multiseed`). Pure seed
   variation barely moves the gap of a model this small (16k weights, 55k examples),
   so the models differ in what is known to change the minimum SGD lands in: the
   noise scale lr / batch (Keskar et al. 2017; Smith & Le 2018). Each model draws
   its own learning rate (log-uniform over 30x) and sits in one of four batch-size
   groups (16 ... 128), besides its own init and data-order seed.
4. For each model: train, validation and test loss; sharpness = mean rise of the
   training loss over K filter-normalised random directions (Li et al. 2018), at
   several relative radii.
5. Spearman's rank correlation of sharpness with the gap, with a bootstrap 95%
   interval over the models. The radius reported first is picked on the validation
   gap; the test gap is then reported for it (and, for completeness, for every radius).

    python experiments/flat_minima.py [--quick] [--data PATH] [--tfds mnist] [--out DIR]

Writes results.json and one scatter plot per radius (sharpness_r*.png) into --out.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.special import logsumexp
from scipy.stats import rankdata

from jaxlearn import plots, runs
from jaxlearn.data import ImageArrays, carve, load_mnist, load_tfds, subset
from jaxlearn.flatness import dataset_loss, sharpness
from jaxlearn.inference import apply_batched
from jaxlearn.models import get_model
from jaxlearn.multiseed import init_many, train_many
from jaxlearn.steps import make_train_step

# Full mode; --quick shrinks the data, the models and the directions (see QUICK).
FULL = dict(
    valid=5_000,  # carved from the 60k training images: 11 examples per class per 1% of accuracy
    test=None,  # all 10,000 test images
    train=None,  # the other 55,000
    models=100,  # Radek's count
    epochs=5,  # 55k x 5 examples per model; ~60 s per epoch of all 100 models on the loaded CPU
    directions=10,  # K: the spread over directions is ~10% of the mean, so K=10 gives ~3%
    sharp_examples=10_000,  # training examples for the sharpness loss (all 55k: 5.5x slower)
    boot=2_000,  # bootstrap resamples for the 95% interval
    # Four noise-scale groups (model i in group i % 4): with the 30x LR range, a 240x range
    # of lr / batch, but every model still trains (bs 1024 with lr 0.01 would not in 5 epochs).
    batch_sizes=(16, 32, 64, 128),
)
QUICK = dict(
    valid=500,
    test=1_000,
    train=3_000,
    models=8,
    epochs=2,
    directions=4,
    sharp_examples=1_000,
    boot=200,
    batch_sizes=(32, 128),  # two groups: half the train-program compilations
)
LR_RANGE = (0.01, 0.3)  # log-uniform, plain SGD: a 30x range of noise scale lr / batch
# Filter-relative step sizes: 10%, 25%, 50% of each neuron's weight norm. At 2-5% the
# rise (~1e-3) was as small as its spread over 4 directions in a trial run.
RADII = (0.1, 0.25, 0.5)
HIDDEN = 20  # 784-20-10
# Plain SGD with the learning rate as an optimizer-state leaf (`optax.inject_hyperparams`):
# one vmapped program then trains every model at its own rate. Built once, so that the
# compiled init and train programs are reused by every group.
TX = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
TRAIN_STEP = make_train_step(jit=False)


def load(args) -> tuple[ImageArrays, ImageArrays]:
    """MNIST train and test: the idx files under DATA/mnist, or tfds by name (--tfds)."""
    if args.tfds:
        return load_tfds(args.tfds, "train"), load_tfds(args.tfds, "test")
    root = runs.data_root(args.data) / "mnist"
    return load_mnist(root, "train"), load_mnist(root, "test")


def model_settings(n_models: int, batch_sizes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each model's batch size (model i in group i % G) and learning rate (log-uniform)."""
    batch = np.array([batch_sizes[i % len(batch_sizes)] for i in range(n_models)])
    log_lo, log_hi = np.log(LR_RANGE)
    lr = np.exp(np.random.default_rng(seed).uniform(log_lo, log_hi, n_models))
    return batch, lr


def train_group(model, images, labels, lrs, seeds, *, batch_size, epochs):
    """Train len(seeds) models at once, model j with learning rate lrs[j] and seed seeds[j]."""
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    states = init_many(model, TX, keys, images[:1])
    hyper = {**states.opt_state.hyperparams, "learning_rate": jnp.asarray(lrs, jnp.float32)}
    states = states.replace(opt_state=states.opt_state._replace(hyperparams=hyper))
    states, _ = train_many(
        states,
        images,
        labels,
        train_step=TRAIN_STEP,
        batch_size=batch_size,
        seeds=[int(s) for s in seeds],
        epochs=epochs,
    )
    return states.params


def evaluate_many(apply_fn, params, data: ImageArrays, chunk: int = 5_000) -> dict:
    """Per-model mean loss and accuracy over a data set (models on the leading axis of params).

    `jaxlearn.inference.apply_batched` runs all models vmapped at once (MLPs: batched
    matmuls, fast on CPU too) over chunks of one shape, so one compilation serves every
    split (train, valid, test).
    """
    logits = apply_batched(
        apply_fn, {"params": params}, data.images, batch_size=chunk, preprocess=_float,
        stacked=True, member_batch=len(jax.tree.leaves(params)[0]),
    )  # fmt: skip
    log_probs = logits - logsumexp(logits, axis=-1, keepdims=True)
    picked = np.take_along_axis(log_probs, data.labels[None, :, None], axis=-1)[..., 0]
    correct = np.argmax(logits, -1) == data.labels[None]
    return {"loss": -picked.mean(axis=1), "accuracy": correct.mean(axis=1)}


@partial(jax.jit, static_argnums=(0, 5))
def _sharpness_many(apply_fn, params, keys, images, labels, num_directions, radius):
    """`flatness.sharpness` of every model: a scan over the models, the K directions vmapped."""

    def one(p_k):
        p, k = p_k
        loss = lambda q: dataset_loss(apply_fn, {"params": q}, images, labels, preprocess=_float)
        return sharpness(loss, p, k, radius=radius, num_directions=num_directions).mean

    return jax.lax.map(one, (params, keys))


def _float(x):
    return x.astype(jnp.float32) / 255.0


def rank_correlation(x, y, *, boot: int, seed: int = 0) -> dict:
    """Spearman's rho of x and y, and a percentile-bootstrap 95% interval over the pairs.

    Args:
      x, y: (N,) paired measurements (one pair per model).
      boot: number of bootstrap resamples of the N pairs (with replacement).
      seed: seed of the resampling.

    Returns:
      {'spearman': rho, 'ci95': [lo, hi], 'pearson': r}.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), (boot, len(x)))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)  # ties get the mean rank
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    # A resample that repeats one pair N times has no spread: its rho is undefined (dropped).
    rhos = (rx * ry).sum(1)[denom > 0] / denom[denom > 0]
    rho = np.corrcoef(rankdata(x), rankdata(y))[0, 1]
    return {
        "spearman": float(rho),
        "ci95": [float(v) for v in np.percentile(rhos, [2.5, 97.5])],
        "pearson": float(np.corrcoef(x, y)[0, 1]),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the metrics written to results.json."""
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/flat_minima")
    parser.add_argument("--tfds", default=None, help="tfds name to load instead (e.g. mnist)")
    args = parser.parse_args(argv)
    started = time.time()
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["models"] = args.seeds
    if cfg["models"] < 3:
        raise ValueError(f"--seeds must be >= 3 for a rank correlation, got {cfg['models']}")

    # 1. Data: validation carved from train (stratified, seed 0); test kept for the end.
    full_train, test = load(args)
    train, valid = carve(full_train, len(full_train) - cfg["valid"], seed=0)
    if cfg["train"]:
        train = subset(train, min(cfg["train"], len(train)), seed=0)
    if cfg["test"]:
        test = subset(test, min(cfg["test"], len(test)), seed=0)
    print(f"MNIST: {len(train)} train / {len(valid)} valid / {len(test)} test")

    # 2. Baselines: the majority class, then a linear softmax model (bs 64, lr 0.1).
    majority = np.bincount(train.labels).argmax()
    baselines = {"majority_test_accuracy": float(np.mean(test.labels == majority))}
    linear = get_model("mlp", 10, features=())
    lin_params = train_group(
        linear, train.images, train.labels, [0.1], [0], batch_size=64, epochs=cfg["epochs"]
    )
    lin = evaluate_many(linear.apply, lin_params, test)
    baselines["linear_test_accuracy"] = float(lin["accuracy"][0])

    # 3. The MLPs: four batch-size groups, a learning rate per model, trained at once per group.
    model = get_model("mlp", 10, features=(HIDDEN,))
    batch, lr = model_settings(cfg["models"], cfg["batch_sizes"], seed=0)
    groups = []
    for b in cfg["batch_sizes"]:
        members = np.flatnonzero(batch == b)
        if len(members):
            params = train_group(
                model,
                train.images,
                train.labels,
                lr[members],
                members,
                batch_size=int(b),
                epochs=cfg["epochs"],
            )
            groups.append((members, params))
            print(f"trained {len(members)} MLPs at batch size {b}: {time.time() - started:.0f} s")
    order = np.concatenate([m for m, _ in groups])
    params = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[p for _, p in groups])
    params = jax.tree.map(lambda x: x[np.argsort(order)], params)  # back to model order
    trained_s = time.time() - started

    # 4. Losses, gaps and sharpness of every model.
    ev = {
        name: evaluate_many(model.apply, params, d)
        for name, d in (("train", train), ("valid", valid), ("test", test))
    }
    gap_test = ev["test"]["loss"] - ev["train"]["loss"]
    gap_valid = ev["valid"]["loss"] - ev["train"]["loss"]
    probe = subset(train, min(cfg["sharp_examples"], len(train)), seed=1)
    # The same K directions at every radius. 'rbg' keys: XLA:CPU compiles the threefry
    # normal sampler ~2x slower (10.5 s against 5.8 s for this program under load).
    keys = jax.random.split(jax.random.key(1, impl="rbg"), cfg["models"])
    sharp = {
        r: np.asarray(
            _sharpness_many(
                model.apply, params, keys, probe.images, probe.labels, cfg["directions"], r
            )
        )
        for r in RADII
    }

    # 5. Rank correlations; the headline radius is the one that predicts the VALIDATION gap best.
    corr = {
        f"{r}": {
            "valid_gap": rank_correlation(sharp[r], gap_valid, boot=cfg["boot"]),
            "test_gap": rank_correlation(sharp[r], gap_test, boot=cfg["boot"]),
        }
        for r in RADII
    }
    best = max(RADII, key=lambda r: abs(corr[f"{r}"]["valid_gap"]["spearman"]))
    noise = lr / batch  # the knob varied across the models, for comparison
    knob = rank_correlation(noise, gap_test, boot=cfg["boot"])
    for r in RADII:
        plots.plot_sharpness(
            sharp[r],
            gap_test,
            path=f"{args.out}/sharpness_r{r}.png",
            xlabel=f"sharpness (loss rise at radius {r}, K={cfg['directions']})",
        )

    acc = ev["test"]["accuracy"]
    metrics = {
        "baselines": baselines,
        "test_accuracy": {"mean": acc.mean(), "std": acc.std(), "min": acc.min(), "max": acc.max()},
        "valid_accuracy_mean": ev["valid"]["accuracy"].mean(),
        "gap_test": {
            "mean": gap_test.mean(),
            "std": gap_test.std(),
            "min": gap_test.min(),
            "max": gap_test.max(),
        },
        "radius_chosen_on_valid": best,
        "headline": {"radius": best, **corr[f"{best}"]["test_gap"]},
        "correlations": corr,
        "noise_scale_vs_test_gap": knob,
        "by_batch_size": {
            int(b): {
                "test_accuracy_mean": acc[batch == b].mean(),
                "gap_test_mean": gap_test[batch == b].mean(),
                f"sharpness_r{best}_mean": sharp[best][batch == b].mean(),
            }
            for b in cfg["batch_sizes"]
            if np.any(batch == b)
        },
        "per_model": {
            "batch_size": batch,
            "lr": lr,
            "train_loss": ev["train"]["loss"],
            "valid_loss": ev["valid"]["loss"],
            "test_loss": ev["test"]["loss"],
            "test_accuracy": acc,
            **{f"sharpness_r{r}": sharp[r] for r in RADII},
        },
        "train_time_s": trained_s,
    }
    config = {
        **cfg,
        "quick": args.quick,
        "data": args.tfds or str(runs.data_root(args.data) / "mnist"),
        "model": f"mlp 784-{HIDDEN}-10",
        "optimizer": "sgd (no momentum), constant lr",
        "lr_range_loguniform": LR_RANGE,
        "radii": RADII,
        "filter_norm": True,
        "split_sizes": [len(train), len(valid), len(test)],
    }
    runs.write_results(
        args.out, config=config, metrics=metrics, seeds=list(range(cfg["models"])), started=started
    )

    print(f"\n{'':34}{'value':>10}   reference")
    print(f"{'majority class, test acc':34}{baselines['majority_test_accuracy']:>10.4f}")
    print(f"{'linear 784-10, test acc':34}{baselines['linear_test_accuracy']:>10.4f}")
    print(
        f"{'MLP mean test acc (' + str(cfg['models']) + ' models)':34}{acc.mean():>10.4f}"
        f" ± {acc.std():.4f}   0.954"
    )
    print(f"{'gap (test - train loss), mean':34}{gap_test.mean():>10.4f} ± {gap_test.std():.4f}")
    for r in RADII:
        c = corr[f"{r}"]
        print(
            f"Spearman(sharpness r={r}, gap): valid {c['valid_gap']['spearman']:+.3f}  test "
            f"{c['test_gap']['spearman']:+.3f} [{c['test_gap']['ci95'][0]:+.3f}, "
            f"{c['test_gap']['ci95'][1]:+.3f}]"
        )
    print(
        f"Spearman(lr / batch, test gap): {knob['spearman']:+.3f} "
        f"[{knob['ci95'][0]:+.3f}, {knob['ci95'][1]:+.3f}]; radius chosen on valid: {best}"
    )
    return metrics


if __name__ == "__main__":
    main()
