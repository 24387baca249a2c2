"""jaxlearn: train image classifiers in JAX the fast.ai way, with pure functions."""

__version__ = "0.1.0"
