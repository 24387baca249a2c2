"""The one inference primitive: padding, chunks, members, views, compile-once, input checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compilations
from core_worker import TinyNet, tiny_data

from jaxlearn import ensemble, inference
from jaxlearn.data.loader import ArrayLoader
from jaxlearn.loop import evaluate
from jaxlearn.models import MLP
from jaxlearn.state import TrainState
from jaxlearn.steps import make_eval_step
from jaxlearn.transfer import extract_features


def _variables(seed=0):
    images, _ = tiny_data(2)
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(seed), images[:1])
    return state, state.variables


def _direct(variables, images):
    x = jnp.asarray(images, jnp.float32) / 255
    return np.asarray(TinyNet().apply(variables, x, train=False))


def test_chunks_padding_members_and_views_equal_a_direct_apply():
    images, _ = tiny_data(11)
    _, a = _variables(0)
    _, b = _variables(1)
    direct = np.stack([_direct(a, images), _direct(b, images)])
    for batch_size in (4, 11, 64):  # 4 + 4 + 3 padded rows; one chunk; one chunk padded
        out = inference.apply_batched(TinyNet().apply, a, images, batch_size=batch_size)
        np.testing.assert_allclose(out, direct[0], rtol=1e-5, atol=1e-6)
    stacked = ensemble.stack([a, b])
    out = inference.apply_batched(TinyNet().apply, stacked, images, batch_size=4, stacked=True)
    np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-6)
    views = lambda x: jnp.stack([x, x[:, :, ::-1]])
    out = inference.apply_batched(TinyNet().apply, stacked, images, batch_size=4, stacked=True,
                                  views_fn=views)  # fmt: skip
    assert out.shape == (2, 2, 11, 3)
    np.testing.assert_allclose(out[:, 0], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, 1], _direct(b, images[:, :, ::-1]), rtol=1e-5, atol=1e-6)


def test_a_per_pixel_output_keeps_its_rows_whole():
    images, _ = tiny_data(5)
    conv = nn.Conv(2, (1, 1))  # (N, H, W, 2) out: the rows are the first axis, not -2
    variables = conv.init(jax.random.key(0), jnp.zeros((1, *images.shape[1:])))
    apply = lambda v, x, train=False: conv.apply(v, x)
    out = inference.apply_batched(apply, variables, images, batch_size=3)
    want = conv.apply(variables, jnp.asarray(images, jnp.float32) / 255)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_an_inline_preprocess_compiles_once():
    images, _ = tiny_data(8)
    _, variables = _variables()
    mean = np.full(3, 100.0, np.float32)  # per-channel statistics, an array
    run = lambda: ensemble.predict(TinyNet().apply, [variables], images,
                                   preprocess=lambda x: (x - mean) / 50.0)  # fmt: skip
    first = run()
    with count_compilations() as compiled:
        again = run()  # a new lambda object, the same program
    assert len(compiled) == 0
    np.testing.assert_array_equal(first, again)
    mean = np.zeros(3, np.float32)  # a closed-over array is data: same program, its values
    with count_compilations() as compiled:
        other = run()
    assert len(compiled) == 0 and not np.allclose(first, other)


def test_images_that_do_not_fit_are_a_value_error_naming_their_shape():
    images, labels = tiny_data(8)
    state, variables = _variables()
    gray = images[..., :1]  # one channel into a three-channel convolution
    for call in (
        lambda: inference.apply_batched(TinyNet().apply, variables, gray),
        lambda: ensemble.predict(TinyNet().apply, [variables], gray),
        lambda: ensemble.predict(TinyNet().apply, [variables], images[0]),  # one image, no N
        lambda: extract_features(MLP(num_classes=3), {"params": {}}, np.zeros((0, 4))),
        lambda: evaluate(state, ArrayLoader(gray, labels, 8, train=False), make_eval_step()),
    ):
        with pytest.raises(ValueError, match=r"\((8, )?8, 8, [13]\).*does not fit|\(0, 4\)"):
            call()


def test_map_batches_inside_jit_and_vmap():
    x = jnp.arange(10.0)
    fn = lambda v: v * 2 + 1
    for batch_size in (None, 1, 3, 10, 20):
        np.testing.assert_array_equal(inference.map_batches(fn, x, batch_size), fn(x))
    jitted = jax.jit(lambda a: inference.map_batches(fn, a, 3))
    np.testing.assert_array_equal(jitted(x), fn(x))
    many = jax.vmap(lambda a: inference.map_batches(fn, a, 4))(jnp.stack([x, -x]))
    np.testing.assert_array_equal(many, jnp.stack([fn(x), fn(-x)]))
    with pytest.raises(ValueError, match="batch_size"):
        inference.map_batches(fn, x, 0)
