"""Orbax checkpoints of a training run: state, history, captured snapshots and config.

One checkpoint per saved step, each a directory with four items written by
Orbax's CheckpointManager: `state` (the TrainState's arrays), `history` (JSON:
per-step and per-epoch records, the number of snapshots), `config` (JSON, what
the user passes) and `snapshots` (captured params + batch_stats, when any).
Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoints intact;
an existing checkpoint is never deleted to make room for a new one at the same
step (that is refused). Saves are asynchronous: `save` returns once the arrays
are copied to host memory (Orbax's blocking device-to-host transfer), so the
donating train step may reuse their buffers at once, and the files are written
in the background while training goes on; reads wait for pending writes, and so does
the end of the process (or of the Checkpointer: `close`, a ``with`` block, garbage
collection), so a script's last save is never lost to a normal exit.

Restoring reads arrays against an abstract target built from a live state (shapes,
dtypes, shardings), so the optimizer state keeps its NamedTuple structure and
arrays land directly on the mesh. A checkpoint of a different model is refused
with the mismatched keys named, before anything is read. A state with an EMA of
its weights (`jaxlearn.state.with_ema`) saves it as `state/ema/...`; one without
saves exactly what it did before, so restoring needs a target with (or without)
an EMA as the checkpoint has it (the refusal names the `ema/...` keys).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlearn.runs import json_config
from jaxlearn.state import TrainState

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng")


def _state_tree(state: TrainState) -> dict:
    """The arrays to save; `ema` only when the state has one (older checkpoints lack it)."""
    tree = {f: getattr(state, f) for f in _STATE_FIELDS}
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


def _key_name(entry: Any) -> str:
    """One key-path entry as a plain name (NamedTuple fields are dict keys in Orbax metadata)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes_by_key(tree: Any) -> dict[str, tuple]:
    """'a/b/c' key path -> shape of every array leaf (metadata or array alike)."""
    return {
        "/".join(map(_key_name, path)): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore `tree`'s arrays into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def history_to_json(history: dict[str, np.ndarray]) -> dict[str, list]:
    """History arrays -> JSON lists (float32 values survive the float64 round trip exactly)."""
    return {k: np.asarray(v).tolist() for k, v in history.items()}


#: Checkpointers not yet closed, whose pending writes the end of the process waits for.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _close_open_checkpointers() -> None:
    for checkpointer in list(_OPEN):
        checkpointer.close()


@functools.cache
def _close_open_checkpointers_at_exit() -> None:
    """Have the end of the process wait for pending writes (once per process).

    Orbax writes through thread pools that refuse new work once the interpreter's
    shutdown has begun, before `atexit` handlers run: a script whose last line is a
    save would exit 0 with only a temporary directory on disk. `threading`'s own exit
    hooks (which `concurrent.futures` uses to stop its pools) run last-registered
    first, so this one, registered after Orbax's imports, runs while the pools work.
    """
    threading._register_atexit(_close_open_checkpointers)


class Checkpointer:
    """Save and restore training runs in one directory, keeping the newest `max_to_keep`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        """Open (or create) the checkpoint directory.

        Args:
          directory: where checkpoints live, one sub-directory per step.
          max_to_keep: how many of the newest checkpoints to keep (None: all).
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Safe with the donating train step: without a device-host byte limit,
            # Orbax copies every array to host before `save` returns.
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
        )
        # Handlers named up front, so a fresh process can read item metadata before restoring.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "history": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "snapshots": ocp.StandardCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._close = weakref.finalize(self, self.manager.close)  # when garbage-collected
        self._close.atexit = False  # too late at exit: `_close_open_checkpointers`
        _OPEN.add(self)
        _close_open_checkpointers_at_exit()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self) -> None:
        """Block until every pending (background) write is on disk."""
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None (after pending writes)."""
        self.wait()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every kept checkpoint, oldest first (after pending writes)."""
        self.wait()
        return sorted(self.manager.all_steps())

    def save(
        self,
        state: TrainState,
        *,
        history: dict[str, np.ndarray] | None = None,
        snapshots: list | None = None,
        config: dict | None = None,
    ) -> None:
        """Start writing a checkpoint at `state.step`; returns once the arrays are on the host.

        Args:
          state: the train state.
          history: `fit`'s history (dict of arrays).
          snapshots: list of captured `{'params', 'batch_stats'}` pytrees.
          config: the run's configuration, in JSON values (`runs.json_config`).

        Raises:
          ValueError: a checkpoint at this step exists already (it is kept: a run
            that reaches the same step again is another run, or a replay), or
            `config` holds what JSON cannot.
        """
        step = int(jax.device_get(state.step))
        snapshots = list(snapshots or [])
        config = json_config(config)  # here: in the background write, an error loses the save
        items = {
            "state": ocp.args.StandardSave(_state_tree(state)),
            "history": ocp.args.JsonSave(
                {"history": history_to_json(history or {}), "num_snapshots": len(snapshots)}
            ),
            "config": ocp.args.JsonSave(config),
        }
        if snapshots:
            items["snapshots"] = ocp.args.StandardSave({str(i): s for i, s in enumerate(snapshots)})
        if step in self.all_steps():
            raise ValueError(
                f"a checkpoint at step {step} exists in {self.directory}; it is kept "
                "(restore it to resume that run, or write to another directory)"
            )
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, target: TrainState, step: int | None = None) -> dict[str, Any]:
        """Read a checkpoint into the structure, dtypes and shardings of `target`.

        Args:
          target: a live state of the same model and optimizer (e.g. freshly
            created); it is only read, never modified.
          step: which checkpoint (default: the newest).

        Returns:
          `{'state': TrainState, 'history': dict of arrays, 'snapshots': list of
          pytrees of NumPy arrays, 'config': dict}`.

        Raises:
          FileNotFoundError: no checkpoint in the directory, or not at `step`.
          ValueError: the checkpoint holds a different model or optimizer; the
            message names the missing, unexpected and reshaped keys.
        """
        step = self._existing(step)
        self.check_matches(target, step)
        meta = self._json(step)
        num_snapshots = meta["history"]["num_snapshots"]
        items = {"state": ocp.args.StandardRestore(_abstract(_state_tree(target)))}
        if num_snapshots:
            host = {
                "params": target.params,
                "batch_stats": target.batch_stats,
            }
            like = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), host)
            items["snapshots"] = ocp.args.StandardRestore(
                {str(i): like for i in range(num_snapshots)}
            )
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        history = {k: np.asarray(v) for k, v in meta["history"]["history"].items()}
        snapshots = [restored["snapshots"][str(i)] for i in range(num_snapshots)]
        return {
            "state": target.replace(**restored["state"]),
            "history": history,
            "snapshots": snapshots,
            "config": meta["config"],
        }

    def _existing(self, step: int | None) -> int:
        """`step`, or the newest when None; FileNotFoundError if there is no such checkpoint."""
        steps = self.all_steps()
        if step is None:
            step = steps[-1] if steps else None
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {self.directory} (have {steps})"
            )
        return step

    def _json(self, step: int) -> dict:
        return self.manager.restore(
            step,
            args=ocp.args.Composite(history=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()),
        )

    def config(self, step: int | None = None) -> dict:
        """The config stored with a checkpoint (default: the newest), without reading arrays."""
        return self._json(self._existing(step))["config"]

    def check_matches(self, target: TrainState, step: int) -> None:
        """ValueError naming the keys where the checkpoint's state differs from `target`'s."""
        saved = _shapes_by_key(self.manager.item_metadata(step)["state"])
        wanted = _shapes_by_key(_state_tree(target))
        missing = sorted(set(wanted) - set(saved))
        unexpected = sorted(set(saved) - set(wanted))
        reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
        if missing or unexpected or reshaped:
            detail = [
                f"{name}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape differs", reshaped))
                if keys
            ]  # fmt: skip
            raise ValueError(
                f"checkpoint {self.directory} step {step} does not match the target state "
                f"(a different model or optimizer?); " + "; ".join(detail)
            )

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self._close()
