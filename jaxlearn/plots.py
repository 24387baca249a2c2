"""Matplotlib figures people would rather look at than read.

Every function returns a `matplotlib.figure.Figure` and never shows it; pass
`path=` to save a PNG as well. matplotlib is imported lazily with the Agg
backend, so importing jaxlearn never opens a window or needs a display.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ranks(values):
    """Ranks from 0, ties sharing their mean rank (as `scipy.stats.rankdata`, less 1).

    Spearman's rho is Pearson's r of these; ranking ties by position instead would
    make it depend on the order of the models.
    """
    import numpy as np

    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values))
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count - 1) / 2
    return ranks


def _finish(fig, path: str | Path | None):
    """Lay out the figure, save it as a PNG when a path is given, return it.

    The PNG is a 256-colour palette image: line plots use few colours, and the
    palette makes the files 2-3x smaller than matplotlib's RGBA (the committed
    experiment figures went from 1.70 MB to 0.73 MB), small enough to keep beside
    results.json. The palette comes from Pillow's fast octree and the file from
    zlib's default level: for a 1680x480 `plot_history` 0.024 s and 62 kB, against
    0.195 s and 74 kB with a median cut and `optimize=True` (a 3x3 grid of photos:
    0.05 s against 0.53 s, 252 kB against 292 kB, posterised alike).
    The figure is released from pyplot's registry (it stays usable:
    `savefig`, notebook display), so scripts that draw dozens of figures don't pile
    them up.
    """
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        rgba = io.BytesIO()
        fig.savefig(rgba, format="png", dpi=120)
        palette = Image.open(rgba).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
        palette.save(path, format="PNG")
    _pyplot().close(fig)
    return fig


def plot_schedule(
    schedule,
    num_steps: int,
    *,
    cycle_ends=None,
    ax=None,
    path: str | Path | None = None,
    label: str | None = None,
):
    """Value of a schedule (`step -> value`) over steps 0 .. num_steps - 1.

    Cycle ends are marked with dotted vertical lines in the curve's colour: given
    explicitly, or asked of the schedule itself when it knows them (`cycle_ends(num_steps=)`
    of jaxlearn's cyclic schedules). Pass `ax=` to draw several schedules on one figure.

    Args:
      schedule: any optax.Schedule.
      num_steps: number of steps to draw (>= 1).
      cycle_ends: steps to mark; None asks the schedule, () marks none.
      ax: a matplotlib Axes to draw into; None makes a new figure.
      path: where to save the figure as a PNG (optional).
      label: legend entry for the curve.

    Returns:
      The matplotlib Figure.
    """
    import numpy as np

    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    steps = np.arange(num_steps)
    import jax
    import jax.numpy as jnp

    # vmapped: some optax schedules (cosine_onecycle_schedule) take only a scalar count
    values = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)), np.float64)
    if cycle_ends is None:
        ask = getattr(schedule, "cycle_ends", None)
        cycle_ends = ask(num_steps=num_steps) if ask is not None else ()
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=(7, 3.5))
    else:
        fig = ax.figure
    (line,) = ax.plot(steps, values, label=label)
    for end in cycle_ends:
        ax.axvline(end, color=line.get_color(), linestyle=":", linewidth=1, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    if label is not None:
        ax.legend()
    return _finish(fig, path)


def plot_lr_find(result, *, ax=None, path: str | Path | None = None):
    """Loss against learning rate (log axis) from `jaxlearn.lr_finder.lr_find`, suggestions marked.

    The raw loss of each step is drawn faintly behind its smoothed curve; each rule
    that made a suggestion is a marker on the smoothed curve, and a rule that could not
    read the curve is listed in the legend as 'n/a'.

    Args:
      result: an `LRFindResult` (lrs, losses, smoothed, suggestions).
      ax: a matplotlib Axes to draw into; None makes a new figure.
      path: where to save the figure as a PNG (optional).

    Returns:
      The matplotlib Figure.
    """
    if len(result.lrs) == 0:
        raise ValueError("result holds no steps: the sweep did not run")
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    for i, (name, s) in enumerate(result.suggestions.items(), start=1):
        if s.lr is None:
            ax.plot([], [], " ", label=f"{name}: n/a")
        else:
            ax.plot(s.lr, s.loss, "o", color=f"C{i}", label=f"{name}: {s.lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test ({result.stopped})", fontsize=9)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_ensemble_curve(
    curve, single: float | None = None, *, ax=None, path: str | Path | None = None, label=None
):
    """Accuracy of the snapshot ensemble against its number of snapshots (Huang et al. 2017).

    Args:
      curve: an `EnsembleCurve` from `jaxlearn.ensemble.accuracy_curve` (``ensemble`` and
        ``members`` accuracies, one per snapshot).
      single: accuracy of the single-model reference drawn as a horizontal line (e.g. a
        model trained with a standard schedule for the same budget); None uses the last
        snapshot alone, the model the run would otherwise have returned.
      ax: a matplotlib Axes to draw into; None makes a new figure.
      path: where to save the figure as a PNG (optional).
      label: legend entry for the ensemble curve.

    Returns:
      The matplotlib Figure.
    """
    import numpy as np

    ensemble, members = np.asarray(curve.ensemble), np.asarray(curve.members)
    if ensemble.ndim != 1 or len(ensemble) == 0 or members.shape != ensemble.shape:
        raise ValueError(
            f"curve must hold M >= 1 accuracies, got {ensemble.shape}, {members.shape}"
        )
    single = float(members[-1]) if single is None else float(single)
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    k = np.arange(1, len(ensemble) + 1)
    (line,) = ax.plot(k, ensemble, "o-", label=label or "ensemble of the first k snapshots")
    ax.plot(k, members, "x", color=line.get_color(), alpha=0.6, label="snapshot k alone")
    ax.axhline(single, color="0.4", linestyle="--", label=f"single model ({single:.4f})")
    ax.set_xticks(k)
    ax.set_xlabel("number of snapshots k")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_sharpness(
    sharpness, gap, *, ax=None, path: str | Path | None = None, xlabel: str = "sharpness"
):
    """Scatter of the generalisation gap against sharpness, one point per model.

    The flat-minima question: do flatter minima (smaller loss rise under random weight
    perturbations) generalise better (smaller test minus train loss)? The title gives
    Pearson's r and Spearman's rank correlation.

    Args:
      sharpness: (N,) sharpness of each model (`jaxlearn.flatness.sharpness(...).mean`).
      gap: (N,) generalisation gap of each model (test loss - train loss).
      ax: a matplotlib Axes to draw into; None makes a new figure.
      path: where to save the figure as a PNG (optional).
      xlabel: label of the x axis (say the radius used).

    Returns:
      The matplotlib Figure.
    """
    import numpy as np

    x, y = np.asarray(sharpness, np.float64), np.asarray(gap, np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(
            f"sharpness and gap must be 1-D of equal length >= 2, got {x.shape}, {y.shape}"
        )
    pearson = np.corrcoef(x, y)[0, 1]
    spearman = np.corrcoef(_ranks(x), _ranks(y))[0, 1]
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=(5, 4))
    else:
        fig = ax.figure
    ax.scatter(x, y, s=12, alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("generalisation gap (test - train loss)")
    ax.set_title(f"{len(x)} models: Pearson r = {pearson:.2f}, Spearman ρ = {spearman:.2f}")
    return _finish(fig, path)


def plot_history(history: dict, path: str | Path | None = None):
    """Training curves from `jaxlearn.loop.fit`'s history: loss, accuracy and LR against step.

    Per-step training values are thin lines (the loss also smoothed, with
    fast.ai's debiased EMA, beta 0.98); per-epoch means and evaluation results
    are markers at the step that ended each epoch.

    Args:
      history: dict of arrays with 'step', 'loss', 'accuracy', 'lr' and, per
        epoch, 'epoch_step', 'train_loss', 'train_accuracy', optionally
        'eval_loss', 'eval_accuracy'.
      path: save a PNG here as well.

    Returns:
      The figure (three panels side by side).
    """
    import numpy as np

    missing = [k for k in ("step", "loss", "accuracy", "lr") if k not in history]
    if missing:
        raise ValueError(f"history lacks {missing}; pass the history that fit() returned")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    step, loss = np.asarray(history["step"]), np.asarray(history["loss"], np.float64)
    beta, ema, smooth = 0.98, 0.0, np.empty_like(loss)
    for i, value in enumerate(loss):
        ema = beta * ema + (1 - beta) * value
        smooth[i] = ema / (1 - beta ** (i + 1))
    epoch_step = np.asarray(history.get("epoch_step", []))
    for ax, key in zip(axes[:2], ("loss", "accuracy"), strict=True):
        ax.plot(step, history[key], lw=0.6, alpha=0.4, label=f"train {key} (step)")
        if key == "loss":
            ax.plot(step, smooth, lw=1.2, label="train loss (smoothed)")
        for prefix, marker in (("train", "o"), ("eval", "s")):
            values = history.get(f"{prefix}_{key}")
            if values is not None and len(values):
                ax.plot(epoch_step, values, marker=marker, label=f"{prefix} {key} (epoch)")
        ax.set(xlabel="step", ylabel=key)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[2].plot(step, history["lr"])
    axes[2].set(xlabel="step", ylabel="learning rate")
    return _finish(fig, path)


def plot_metric_curves(
    curves: dict, *, ylabel: str, threshold: float | None = None, path: str | Path | None = None
):
    """A per-epoch metric of several runs per arm: one colour per arm, one line per run.

    E.g. the validation accuracy of every seed of each schedule in Radek's race to 85%,
    with the finishing line drawn at ``threshold``.

    Args:
      curves: arm name -> list of 1-D per-epoch values, one per run (runs may differ
        in length, e.g. when stopped at the threshold).
      ylabel: what the values are.
      threshold: a horizontal dashed line to draw (optional).
      path: where to save the figure as a PNG (optional).

    Returns:
      The matplotlib Figure.
    """
    import numpy as np

    if not curves or any(len(runs) == 0 for runs in curves.values()):
        raise ValueError("curves must map each arm name to at least one run")
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for i, (name, runs) in enumerate(curves.items()):
        for j, values in enumerate(runs):
            values = np.asarray(values, np.float64)
            epochs = np.arange(1, len(values) + 1)
            label = f"{name} ({len(runs)} runs)" if j == 0 else None
            ax.plot(epochs, values, "o-", color=f"C{i}", alpha=0.6, markersize=3, label=label)
    if threshold is not None:
        ax.axhline(threshold, color="0.4", linestyle="--", label=f"threshold {threshold:g}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_distributions(
    samples: dict, *, reference: dict | None = None, ylabel: str = "accuracy", path=None
):
    """Box plots with every sample on top, one per arm: results that vary a lot between runs.

    Radek's 6-image transfer post got 89.97%, then 71.63% and 82.04% on reruns; the
    spread over many random draws says more than any one of them.

    Args:
      samples: {arm name: 1-d array of values (one per run or draw)}.
      reference: {label: value} drawn as horizontal dashed lines (e.g. published numbers).
      ylabel: the axis label.
      path: save a PNG here as well.

    Returns:
      The figure.
    """
    import numpy as np

    if not samples or any(np.size(v) == 0 for v in samples.values()):
        raise ValueError("samples must map at least one arm name to a non-empty array")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(samples), 4))
    values = [np.asarray(v, np.float64).ravel() for v in samples.values()]
    ax.boxplot(values, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)  # fixed: the same figure for the same numbers
    for i, v in enumerate(values, start=1):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, v.size), v, s=10, alpha=0.6)
    ax.set_xticks(range(1, len(values) + 1), [f"{k}\n(n={v.size})" for k, v in
                                              zip(samples, values, strict=True)])  # fmt: skip
    for i, (label, value) in enumerate((reference or {}).items()):
        style = ("--", ":", "-.")[i % 3]
        ax.axhline(value, ls=style, color="grey", lw=1, label=f"{label} {value:.4g}")
    if reference:
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    return _finish(fig, path)


def top_losses(labels, probs, k: int):
    """Indices of the `k` examples with the highest loss `-log p(true class)`, worst first.

    Returns:
      `(indices, losses)`: int array of at most `k` indices and their float losses.
    """
    import numpy as np

    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    if probs.ndim != 2 or labels.shape != (len(probs),):
        raise ValueError(
            f"probs must be (N, C) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # float64's smallest normal, not 1e-12: float32 softmax reaches 1e-45 (a loss of 103)
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], np.finfo(float).tiny, 1))
    # Ties (p = 0 exactly) go to the more confident prediction.
    order = np.lexsort((-probs.max(1), -losses))[:k]
    return order, losses[order]


def plot_top_losses(
    images, labels, probs, class_names, *, k: int = 9, path: str | Path | None = None
):
    """The `k` images the model got most confidently wrong (highest loss), in a grid.

    fast.ai's `plot_top_losses`: each image is titled predicted / actual / loss /
    probability of the actual class. Looking at them shows label noise, ambiguous
    images and what the model confuses, which no accuracy number does.

    Args:
      images: (N, H, W, C) uint8 or [0, 1] float images, as loaded.
      labels: (N,) integer true classes.
      probs: (N, C) predicted probabilities.
      class_names: the C class names.
      k: how many images (the grid is as square as possible).
      path: save a PNG here as well.

    Returns:
      The figure.
    """
    import numpy as np

    images = np.asarray(images)
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if np.shape(probs)[-1] != len(class_names):
        raise ValueError(
            f"probs have {np.shape(probs)[-1]} classes, class_names {len(class_names)}"
        )
    order, losses = top_losses(labels, probs, k)
    titles = []
    for i, loss in zip(order, losses, strict=True):
        predicted, actual = int(np.argmax(probs[i])), int(labels[i])
        titles.append(
            f"{class_names[predicted]} / {class_names[actual]}\n"
            f"{loss:.2f} / {np.asarray(probs)[i, actual]:.2f}"
        )
    return plot_images(
        images[order], titles, suptitle="predicted / actual, loss / probability of actual",
        path=path,
    )  # fmt: skip


def plot_images(images, titles, *, suptitle: str | None = None, path: str | Path | None = None):
    """Images in a grid as square as possible, each with its title.

    What `plot_top_losses` and `ImageDataLoaders.show_batch` draw.

    Args:
      images: (N, H, W, C) uint8 or [0, 1] float images (C = 1 is drawn in grey).
      titles: N titles.
      suptitle: a title over the grid.
      path: save a PNG here as well.

    Returns:
      The figure.
    """
    import numpy as np

    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0 or len(titles) != len(images):
        raise ValueError(
            f"images must be (N, H, W, C) with N >= 1 and one title each, got shape "
            f"{images.shape} and {len(titles)} titles"
        )
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles, strict=False):
        image = image[..., 0] if image.shape[-1] == 1 else image
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _finish(fig, path)


def plot_confusion_matrix(labels, predictions, class_names, *, path: str | Path | None = None):
    """Counts of (actual, predicted) class pairs, with the counts written in the cells.

    Args:
      labels: (N,) integer true classes.
      predictions: (N,) integer predicted classes.
      class_names: the class names, in label order.
      path: save a PNG here as well.

    Returns:
      The figure.
    """
    import numpy as np

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    c = len(class_names)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and predictions must be (N,), got {labels.shape}, {predictions.shape}"
        )
    if labels.size and (
        min(labels.min(), predictions.min()) < 0 or max(labels.max(), predictions.max()) >= c
    ):
        raise ValueError(f"classes must lie in [0, {c}) for {c} class_names")
    counts = np.zeros((c, c), np.int64)
    np.add.at(counts, (labels, predictions), 1)
    plt = _pyplot()
    side = 1.2 + 0.5 * c
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(counts, cmap="Blues")
    for (a, p), n in np.ndenumerate(counts):
        color = "white" if n > counts.max() / 2 else "black"
        ax.text(p, a, str(n), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(c), class_names, rotation=90)
    ax.set_yticks(range(c), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    return _finish(fig, path)
