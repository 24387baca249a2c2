"""Compile once per program, not once per Python object.

`jax.jit` keys its cache on static arguments by `==` and `hash`. A `TrainState`
carries two non-array things, the model's `apply` and the Optax transformation,
and both compare by identity: `model.apply` is a bound method (Python compares its
module by identity) and an optax transformation is a pair of closures. So every
new optimizer object -- each seed's, each `fine_tune` phase's, each `lr_find`
call's -- retraced and recompiled a program XLA had already compiled.

Here the static part of a state becomes a value:

- the model is keyed by its Flax module, which compares by its fields (two
  `get_model("resnet20", 10)` are equal);
- the optimizer is keyed by what it computes: `tx.update` traced to a jaxpr for
  the state's shapes. Two transformations whose jaxprs print the same compute the
  same function of (updates, state, params, constants), and the constants they
  close over as arrays (SGDR's cycle boundaries, `lr_find`'s table of learning
  rates) travel as data. Python numbers they close over are part of the program
  (a schedule with another peak LR compiles once more), never silently shared.

A function that prints an object's identity into its jaxpr (a callback, a custom
derivative) simply gets a key of its own: a cache miss, never a wrong program.
An optimizer that cannot be traced on its own (one that needs extra arguments) is
keyed by identity, as before. `static_of`, `arrays`, `consts_of` and `merge` are
what jitted entry points use to pass a state through `jax.jit` with its keys as the
static argument.
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

if TYPE_CHECKING:
    from jaxlearn.state import TrainState

#: Optimizer programs kept per (transformation object, shapes); a few dozen are plenty
#: (one per optimizer alive in a session), and the cache holds the objects alive.
CACHE_SIZE = 64


def by_arguments(build: Callable) -> Callable:
    """`build` returning the same object for the same arguments, so compilations are shared.

    For the factories whose results key `jax.jit`'s caches (`make_train_step`,
    `make_eval_step`, the augmentations): a script that rebuilds its pipeline per
    seed, phase or image size with the same settings gets the same objects back, and
    compiles each program once (an EfficientNet-Lite0 train step takes ~20 s to
    compile on 2 cores). Arguments are compared as `jax.jit` compares static
    arguments, functions by identity, with the defaults filled in (`f()` is `f(x=0)`
    when 0 is x's default). Unhashable arguments (a list, an array) build a new object.
    At most `CACHE_SIZE` objects are kept per factory.
    """
    cache: dict = {}
    signature = inspect.signature(build)

    @functools.wraps(build)
    def shared(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            key = tuple(sorted(bound.arguments.items()))
            hash(key)
        except TypeError:
            return build(*args, **kwargs)
        if key not in cache:
            if len(cache) >= CACHE_SIZE:
                cache.clear()
            cache[key] = build(*args, **kwargs)
        return cache[key]

    return shared


class Keyed:
    """A value compared and hashed by an explicit key instead of its identity.

    Attributes:
      key: what equality and hashing use.
      value: what a trace uses (from the first of several equal objects jit sees).
    """

    __slots__ = ("_hash", "key", "value")

    def __init__(self, key: Any, value: Any):
        self.key, self.value, self._hash = key, value, hash(key)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._hash == self._hash and other.key == self.key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


def by_identity(fn: Callable) -> Keyed:
    """`fn` keyed by its identity: always correct, shared by nothing else."""
    return Keyed(("object", id(fn)), fn)


def model_key(apply_fn: Callable) -> Keyed:
    """`apply_fn` keyed by its Flax module's fields when it is a module's bound method.

    Anything else (a plain function, a module with unhashable fields) is keyed by
    identity, which is always correct.
    """
    module, func = getattr(apply_fn, "__self__", None), getattr(apply_fn, "__func__", None)
    if isinstance(module, nn.Module):
        try:
            return Keyed(("module", type(module), func, module), apply_fn)
        except TypeError:  # a field holds a list or dict: fall back to identity
            pass
    return by_identity(apply_fn)


def module_of(apply_fn: Callable) -> nn.Module | None:
    """The Flax module whose `apply` this is, or None."""
    module = getattr(apply_fn, "__self__", None)
    if isinstance(module, nn.Module) and getattr(apply_fn, "__func__", None) is nn.Module.apply:
        return module
    return None


class _Traced:
    """A function traced to a jaxpr for given shapes: a key shared by equal programs, constants."""

    __slots__ = ("consts", "fn", "key")

    def __init__(self, fn: Callable, args: tuple):
        self.fn = fn  # holds the object alive, so its id() is not reused while cached
        try:
            closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        except Exception:  # needs other arguments or is not traceable alone: identity
            self.key, self.consts = by_identity(fn), ()
            return
        in_tree, out_tree = jax.tree.structure(args), jax.tree.structure(out_shape)
        program = (closed.jaxpr, in_tree, out_tree)
        self.key = Keyed(("jaxpr", in_tree, out_tree, str(closed.jaxpr)), program)
        self.consts = tuple(closed.consts)


_TRACED: collections.OrderedDict[tuple, _Traced] = collections.OrderedDict()


def _signature(tree: Any) -> tuple:
    """Structure, shapes and dtypes of a pytree's leaves (what a trace depends on)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", ()), getattr(x, "dtype", type(x))) for x in leaves)


def function_program(fn: Callable, *args: Any) -> tuple[Keyed, tuple]:
    """`fn`'s program key for arguments shaped like `args`, and the constants it closes over.

    Cached per function object and shapes, so a loop pays one dictionary lookup
    per call after the first.

    Returns:
      `(key, consts)`: equal keys mean the same program; `bind(key, consts)` is a
      function equivalent to `fn` (inside a trace, `consts` may be traced values).
    """
    cache_key = (id(fn), _signature(args))
    entry = _TRACED.get(cache_key)
    if entry is None or entry.fn is not fn:
        entry = _TRACED[cache_key] = _Traced(fn, args)
        while len(_TRACED) > CACHE_SIZE:
            _TRACED.popitem(last=False)
    else:
        _TRACED.move_to_end(cache_key)
    return entry.key, entry.consts


def bind(key: Keyed, consts: tuple) -> Callable:
    """The function a program key stands for, evaluated with these constants."""
    if key.key[0] == "object":
        return key.value
    jaxpr, in_tree, out_tree = key.value

    def fn(*args):
        flat, tree = jax.tree.flatten(args)
        avals = [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in flat]
        traced = [(tuple(v.aval.shape), v.aval.dtype) for v in jaxpr.invars]
        if tree != in_tree or avals != traced:
            raise ValueError(
                f"program traced for arguments {in_tree} {traced}, called with {tree} {avals}"
            )
        return jax.tree.unflatten(out_tree, jaxpr_as_fun(ClosedJaxpr(jaxpr, list(consts)))(*flat))

    return fn


def optimizer_program(
    tx: optax.GradientTransformation, opt_state: Any, params: Any
) -> tuple[Keyed, tuple]:
    """`tx.update`'s program key for these shapes and its constants (see `function_program`)."""
    return function_program(tx.update, params, opt_state, params)


def _no_init(params):
    raise ValueError(
        "the optimizer's init is not available inside a compiled jaxlearn step: "
        "initialise optimizer states outside it (tx.init(params))"
    )


def bind_optimizer(key: Keyed, consts: tuple) -> optax.GradientTransformation:
    """The transformation a program key stands for, with this state's constants (in a trace)."""
    return optax.GradientTransformation(_no_init, bind(key, consts))


def static_of(state: TrainState) -> tuple[Keyed, Keyed]:
    """The static part of a state for `jax.jit`: its model and optimizer program keys.

    Hashable, and equal for states of equal models and optimizer programs.
    """
    tx_key, _ = optimizer_program(state.tx, state.opt_state, state.params)
    return model_key(state.apply_fn), tx_key


def consts_of(state: TrainState) -> tuple:
    """The arrays the state's optimizer closes over (data for its program)."""
    return optimizer_program(state.tx, state.opt_state, state.params)[1]


#: The array fields of a `TrainState`, in the order `arrays` gives them.
FIELDS = ("step", "params", "batch_stats", "opt_state", "rng", "ema")


def arrays(state: TrainState) -> tuple:
    """The state's arrays alone: (step, params, batch_stats, opt_state, rng, ema).

    `ema` is None (no arrays) unless the state carries an EMA of its weights.
    """
    return tuple(getattr(state, f) for f in FIELDS)


def merge(static: tuple[Keyed, Keyed | None], fields: tuple, consts: tuple) -> TrainState:
    """The state rebuilt in a trace from `static_of`, `arrays` and `consts_of`.

    Its optimizer runs from its program with these constants; a None optimizer
    key (an evaluation) leaves it out.
    """
    from jaxlearn.state import TrainState

    model, tx_key = static
    tx = None if tx_key is None else bind_optimizer(tx_key, consts)
    return TrainState(**dict(zip(FIELDS, fields, strict=True)), apply_fn=model.value, tx=tx)


def with_arrays(fields: tuple, like: TrainState) -> TrainState:
    """`like` with these arrays: its model and optimizer objects, and the fields a
    subclass adds (which the step does not see), carried over unchanged."""
    return like.replace(**dict(zip(FIELDS, fields, strict=True)))
