"""Tiny model, data and runs shared by the core tests, also run as a subprocess.

`python tests/core_worker.py MODE OUT [args]` runs one small training job and
writes its results to the .npz file OUT; the tests compare such files between
device counts, processes, and killed-then-resumed runs.
"""

from __future__ import annotations

import functools
import sys

import flax.linen as nn
import numpy as np


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> global average pool -> Dropout -> Dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.relu(x).mean((1, 2))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def tiny_data(n: int = 64, seed: int = 0, num_classes: int = 3):
    """(n, 8, 8, 3) uint8 images whose mean colour channel is the label (learnable)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.integers(0, 120, (n, 8, 8, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels % 3] += 120
    return images, labels


def _flip(key, x):
    """Random horizontal flip of each image."""
    import jax

    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jax.numpy.where(flip, x[:, :, ::-1], x)


@functools.cache
def _step():
    """One train step object per process: every run of the tests shares its compilations."""
    from jaxlearn.steps import make_train_step

    return make_train_step(weight_decay=1e-4, augment=_flip)


def make_run(batch_size: int = 16, seed: int = 0, lr: float = 0.05):
    """State, loader and train step of a tiny SGD run with BatchNorm, dropout and flips.

    The optimizer injects its learning rate (a cosine decay from `lr` over 40
    steps), so the step reports the LR it used.
    """
    import jax
    import optax

    from jaxlearn.data.loader import ArrayLoader
    from jaxlearn.parallel import replicate
    from jaxlearn.state import TrainState

    images, labels = tiny_data()
    schedule = optax.cosine_decay_schedule(lr, 40)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
    state = TrainState.create(TinyNet(), tx, jax.random.key(seed), images[:1])
    loader = ArrayLoader(images, labels, batch_size, seed=seed)
    # Placed as fit places it, so direct calls of the step hit the same compilation.
    return replicate(state, loader.mesh), loader, _step()


def _flat(tree, prefix):
    import jax

    return {
        prefix + jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def steps_run(out: str, steps: int = 6) -> None:
    """Run `steps` train steps on all visible devices; save losses, params, batch_stats,
    and the trained model's logits and evaluation on 13 held-out images (padded chunks)."""
    import jax

    from jaxlearn.data.loader import ArrayLoader
    from jaxlearn.inference import apply_batched
    from jaxlearn.loop import evaluate
    from jaxlearn.steps import make_eval_step

    state, loader, step = make_run()
    losses = []
    for batch in loader.epoch(0):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if len(losses) == steps:
            break
    try:  # a global batch that does not split evenly over the devices
        ArrayLoader(*tiny_data(), batch_size=len(jax.devices()) + 2)
        indivisible = ""
    except ValueError as e:
        indivisible = str(e)
    try:  # the same, handed to the step directly (a list of host batches)
        images, labels = tiny_data(len(jax.devices()) + 2)
        step.trace(state, {"image": images, "label": labels})  # traced: nothing donated
        indivisible_step = ""
    except ValueError as e:
        indivisible_step = str(e)
    held_images, held_labels = tiny_data(13, seed=2)
    # batch 5: chunks of 5 on one device, of 8 on eight (rounded up), of 3 + 3 on two processes
    logits = apply_batched(state.apply_fn, state.variables, held_images, batch_size=5)
    held = ArrayLoader(held_images, held_labels, 2 * len(jax.devices()), train=False)
    result = evaluate(state, held, make_eval_step())
    submesh = _learner_submesh_devices() if jax.process_count() == 1 else 0
    if jax.process_index() == 0:
        gathered = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        np.savez(
            out,
            logits=logits,
            eval_loss=result["loss"],
            losses=np.asarray(losses),
            num_devices=len(jax.devices()),
            indivisible=indivisible,
            indivisible_step=indivisible_step,
            submesh_devices=submesh,
            **_flat(gathered, "v"),
        )


def _learner_submesh_devices() -> int:
    """The devices a Learner trains and predicts on when its loaders use half of them:
    the loaders' (the steps would otherwise move every batch onto all devices)."""
    import jax

    from jaxlearn.data import ImageArrays
    from jaxlearn.data.dataloaders import ImageDataLoaders
    from jaxlearn.learner import vision_learner
    from jaxlearn.parallel import data_mesh

    half = data_mesh(jax.devices()[: max(1, len(jax.devices()) // 2)])
    images, labels = tiny_data(24)
    names = ("r", "g", "b")
    dls = ImageDataLoaders(ImageArrays(images[:16], labels[:16], names),
                           ImageArrays(images[16:], labels[16:], names),
                           batch_size=half.devices.size, mesh=half)  # fmt: skip
    learn = vision_learner(dls, "mlp", pretrained=False, progress=False)
    learn.fit(1, 1e-2)
    learn.get_preds()
    return len(jax.tree.leaves(learn.state.params)[0].sharding.device_set)


def fit_run(out: str, ckpt_dir: str, epochs: int, report: bool = False) -> None:
    """fit() for `epochs` epochs with a checkpoint every 2 steps, resuming if one exists.

    With `report`, each step's end prints "step N" once every checkpoint written so far
    is on disk, so a parent that kills the process on reading it knows which is the
    newest complete one.
    """
    import jax

    from jaxlearn.checkpoint import Checkpointer
    from jaxlearn.loop import Callback, Checkpoint, fit

    state, loader, step = make_run(batch_size=16)
    ckpt = Checkpointer(ckpt_dir, max_to_keep=2)
    history = None
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(state)
        state, history = restored["state"], restored["history"]

    class Report(Callback):
        def on_step_end(self, step, state, metrics, history):
            ckpt.wait()
            print("step", step, flush=True)

    state, history = fit(
        state,
        loader,
        train_step=step,
        epochs=epochs,
        history=history,
        callbacks=[Checkpoint(ckpt, every_steps=2), *([Report()] if report else [])],
        progress=False,
    )
    ckpt.close()
    np.savez(out, step=int(state.step), **_flat(jax.device_get(state.params), "v"))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "steps":
        steps_run(out)
    elif mode == "distributed":
        import jax

        from jaxlearn.parallel import initialize_distributed

        port, n, pid = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        initialize_distributed(f"127.0.0.1:{port}", n, pid)
        assert jax.process_count() == n, jax.process_count()
        steps_run(out)
    elif mode == "fit":
        fit_run(out, sys.argv[3], int(sys.argv[4]), report=sys.argv[5:] == ["report"])
    else:
        raise SystemExit(f"unknown mode {mode}")
