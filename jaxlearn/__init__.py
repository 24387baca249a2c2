"""jaxlearn: train image classifiers in JAX the fast.ai way, with pure functions.

Submodules load on first use (``jaxlearn.schedules``, ``jaxlearn.data``, ...), so
``import jaxlearn`` stays cheap; the names most scripts need are also available
at the top level, e.g. ``jaxlearn.fit`` or ``jaxlearn.TrainState``.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint",
    "data",
    "ensemble",
    "flatness",
    "inference",
    "interpret",
    "learner",
    "loop",
    "lr_finder",
    "models",
    "multiseed",
    "parallel",
    "plots",
    "pretrained",
    "programs",
    "progressive",
    "pseudo",
    "runs",
    "schedules",
    "state",
    "steps",
    "torchfile",
    "transfer",
)

#: Top-level name -> the submodule that defines it.
_NAMES = {
    "TrainState": "state",
    "make_train_step": "steps",
    "make_eval_step": "steps",
    "fit": "loop",
    "fit_progressive": "progressive",
    "evaluate": "loop",
    "CaptureParams": "loop",
    "StopAtMetric": "loop",
    "Checkpoint": "loop",
    "Checkpointer": "checkpoint",
    "ArrayLoader": "data",
    "data_mesh": "parallel",
    "get_model": "models",
    "lr_find": "lr_finder",
    "sgdr": "schedules",
    "one_cycle": "schedules",
    "cosine_warmup": "schedules",
    "fine_tune": "transfer",
    "ImageDataLoaders": "data",
    "vision_learner": "learner",
    "Learner": "learner",
    "load_learner": "learner",
    "ClassificationInterpretation": "interpret",
}

__all__ = [*_SUBMODULES, *_NAMES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxlearn.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"jaxlearn.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'jaxlearn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
