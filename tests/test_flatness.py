"""Sharpness: zero at radius 0, the exact rise on a quadratic, filter normalisation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlearn.flatness import dataset_loss, generalization_gap, random_direction
from jaxlearn.flatness import sharpness as _sharpness

# Jitted as users would (eager lax.map dispatches op by op: ~5x slower here).
sharpness = jax.jit(
    _sharpness, static_argnames=("loss_fn", "num_directions", "filter_norm", "batch_size")
)

CENTRE = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.array([0.5, -1.0, 2.0])}


def quadratic(params):
    """0.5 * ||params - CENTRE||^2: minimum at CENTRE, Hessian the identity."""
    sq = jax.tree.map(lambda p, c: jnp.sum((p - c) ** 2), params, CENTRE)
    return 0.5 * sum(jax.tree.leaves(sq))


def test_zero_for_radius_zero():
    result = sharpness(quadratic, CENTRE, jax.random.key(0), radius=0.0, num_directions=4)
    np.testing.assert_array_equal(result.per_direction, np.zeros(4))
    assert result.per_direction.shape == (4,)


@pytest.mark.parametrize("radius", [0.01, 0.1, 0.5])
def test_quadratic_rise_is_half_radius_squared_times_weight_norm(radius):
    # Filter norm gives every column of w the norm of CENTRE's column and leaves b alone, so
    # each direction has ||d||^2 = ||w||^2 and the rise is exactly 0.5 r^2 ||w||^2.
    result = sharpness(quadratic, CENTRE, jax.random.key(1), radius=radius, num_directions=5)
    expected = 0.5 * radius**2 * float(jnp.sum(CENTRE["w"] ** 2))
    np.testing.assert_allclose(result.per_direction, expected, rtol=1e-4)
    np.testing.assert_allclose(result.mean, expected, rtol=1e-4)


def test_grows_with_radius_without_filter_norm():
    means = [
        float(sharpness(quadratic, CENTRE, jax.random.key(2), radius=r, filter_norm=False).mean)
        for r in (0.01, 0.05, 0.2)
    ]
    assert 0 < means[0] < means[1] < means[2]


def test_filter_norm_leaves_one_axis_leaves_alone():
    direction = random_direction(jax.random.key(3), CENTRE)
    np.testing.assert_array_equal(direction["b"], np.zeros(3))
    np.testing.assert_allclose(
        jnp.linalg.norm(direction["w"], axis=0), jnp.linalg.norm(CENTRE["w"], axis=0), rtol=1e-5
    )


class ReLUNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


@functools.cache
def _relu_problem():
    model = ReLUNet()
    x = jax.random.normal(jax.random.key(4), (64, 5))
    y = jax.random.randint(jax.random.key(5), (64,), 0, 3)
    params = model.init(jax.random.key(6), x)["params"]
    loss = jax.jit(lambda p: dataset_loss(model.apply, {"params": p}, x, y))
    # Layer 0 (weights and bias) times 10, layer 1's kernel divided by 10: the same function.
    rescaled = {
        "Dense_0": jax.tree.map(lambda a: 10.0 * a, params["Dense_0"]),
        "Dense_1": {**params["Dense_1"], "kernel": params["Dense_1"]["kernel"] / 10.0},
    }
    np.testing.assert_allclose(loss(params), loss(rescaled), rtol=1e-5)
    return loss, params, rescaled


def test_filter_norm_is_invariant_to_relu_rescaling():
    loss, params, rescaled = _relu_problem()
    kw = dict(radius=0.1, num_directions=6)
    a = sharpness(loss, params, jax.random.key(7), **kw)
    b = sharpness(loss, rescaled, jax.random.key(7), **kw)
    np.testing.assert_allclose(a.per_direction, b.per_direction, rtol=1e-3, atol=1e-6)
    assert float(jnp.max(jnp.abs(a.per_direction))) > 1e-3  # the perturbation did something


def test_without_filter_norm_rescaling_changes_sharpness():
    loss, params, rescaled = _relu_problem()
    kw = dict(radius=0.1, num_directions=6, filter_norm=False)
    a = sharpness(loss, params, jax.random.key(7), **kw)
    b = sharpness(loss, rescaled, jax.random.key(7), **kw)
    assert abs(float(a.mean) - float(b.mean)) > 0.5 * abs(float(a.mean))


def test_chunked_directions_equal_all_at_once():
    loss, params, _ = _relu_problem()
    a = sharpness(loss, params, jax.random.key(8), radius=0.1, num_directions=5)
    b = sharpness(loss, params, jax.random.key(8), radius=0.1, num_directions=5, batch_size=2)
    # Each value is a difference of two float32 losses near 1.4 (ulp 1.2e-7): chunking may
    # round either loss by an ulp, and the difference carries that rounding whole.
    np.testing.assert_allclose(a.per_direction, b.per_direction, rtol=1e-5, atol=5e-7)


def test_jit_and_vmap_over_models():
    loss, params, rescaled = _relu_problem()
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, rescaled)
    fn = jax.jit(jax.vmap(lambda p: sharpness(loss, p, jax.random.key(9), radius=0.1).mean))
    means = fn(stacked)
    np.testing.assert_allclose(means[0], means[1], rtol=1e-3)


def test_dataset_loss_chunks_count_every_example_once():
    model = ReLUNet()
    x = jax.random.normal(jax.random.key(10), (10, 5))
    y = jnp.arange(10) % 3
    variables = model.init(jax.random.key(11), x)
    whole = dataset_loss(model.apply, variables, x, y)
    chunked = dataset_loss(model.apply, variables, x, y, batch_size=4)
    expected = optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, x), y).mean()
    np.testing.assert_allclose(whole, expected, rtol=1e-6)
    np.testing.assert_allclose(chunked, expected, rtol=1e-6)
    # uint8 images are scaled to [0, 1] by default, as the train and eval steps do
    pixels = (jnp.abs(x) * 60).astype(jnp.uint8)
    scaled = model.apply(variables, pixels.astype(jnp.float32) / 255.0)
    np.testing.assert_allclose(
        dataset_loss(model.apply, variables, pixels, y),
        optax.softmax_cross_entropy_with_integer_labels(scaled, y).mean(),
        rtol=1e-6,
    )


def test_generalization_gap_is_test_minus_train():
    model = ReLUNet()
    x = jax.random.normal(jax.random.key(12), (20, 5))
    y = jnp.arange(20) % 3
    variables = model.init(jax.random.key(13), x)
    gap = generalization_gap(model.apply, variables, (x[:10], y[:10]), (x[10:], y[10:]))
    train = dataset_loss(model.apply, variables, x[:10], y[:10])
    test = dataset_loss(model.apply, variables, x[10:], y[10:])
    np.testing.assert_allclose(gap.gap, test - train, rtol=1e-6)
    np.testing.assert_allclose(gap.train_loss, train, rtol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_directions"):
        _sharpness(quadratic, CENTRE, jax.random.key(0), radius=0.1, num_directions=0)
    for radius in (-0.1, np.float32(-0.1), jnp.float32(-0.1), float("nan")):
        with pytest.raises(ValueError, match="radius"):
            _sharpness(quadratic, CENTRE, jax.random.key(0), radius=radius)
    with pytest.raises(ValueError, match="labels"):
        dataset_loss(lambda v, x, train: x, {}, jnp.zeros((4, 3)), jnp.zeros((3,), jnp.int32))


def test_plot_sharpness_reports_correlations(tmp_path):
    from jaxlearn.plots import plot_sharpness

    x = np.array([0.1, 0.2, 0.3, 0.4])
    fig = plot_sharpness(x, 2 * x + 1, path=tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
    assert "Pearson r = 1.00, Spearman ρ = 1.00" in fig.axes[0].get_title()
    fig = plot_sharpness(x, -x)
    assert "Spearman ρ = -1.00" in fig.axes[0].get_title()
    # ties share their mean rank (scipy.stats.spearmanr): the order of the models is moot
    ties = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    for gap in ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, 4.0, 5.0]):
        assert "Spearman ρ = 0.85" in plot_sharpness(ties, np.array(gap)).axes[0].get_title()
    with pytest.raises(ValueError, match="sharpness"):
        plot_sharpness(x, x[:3])
