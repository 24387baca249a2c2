"""On-device augmentations: shapes and dtypes, determinism per key, bounds, inverses, jit/vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxlearn.data import augment as aug

KEY = jax.random.key(0)
N, H, W, C = 6, 8, 8, 3


def _uint8_batch(seed=0):
    # Pixel values in 1..255 so that 0 can only come from padding.
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (N, H, W, C), dtype=np.uint8))


def _float_batch(seed=0):
    return aug.to_float(_uint8_batch(seed))


AUGMENTS = {
    "crop_zero": (aug.random_crop(2), _uint8_batch),
    "crop_reflect": (aug.random_crop(2, mode="reflect"), _uint8_batch),
    "flip": (aug.random_flip(), _uint8_batch),
    "resized_crop": (aug.random_resized_crop(H, scale=(0.2, 1.0)), _uint8_batch),
    "resized_crop_float": (aug.random_resized_crop(H), _float_batch),
    "jitter": (aug.color_jitter(0.4, 0.4, 0.4), _float_batch),
    "cutout": (aug.cutout(3), _uint8_batch),
    "rotate": (aug.random_rotate(30.0), _uint8_batch),
    "rotate_float": (aug.random_rotate(30.0, p=1.0, mode="constant"), _float_batch),
    "composed": (aug.compose(aug.random_crop(2), aug.random_flip(), aug.cutout(2)), _uint8_batch),
}


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_shape_dtype_kept_same_key_same_output_other_key_differs(name):
    augment, batch = AUGMENTS[name]
    images = batch()
    jitted = jax.jit(augment)
    out = jitted(KEY, images)
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out, jitted(KEY, images))
    tolerance = 1 if jnp.issubdtype(images.dtype, jnp.integer) else 1e-6  # rounding, float order
    assert not np.array_equal(out, jitted(jax.random.key(1), images))
    # Under vmap over keys: one batch per key, each equal to the unbatched call.
    keys = jax.random.split(KEY, 2)
    stacked = jax.jit(jax.vmap(augment, in_axes=(0, None)))(keys, images)
    np.testing.assert_allclose(stacked[1], jitted(keys[1], images), atol=tolerance)


def test_flip_twice_is_identity_and_random_flip_mirrors_some():
    images = _uint8_batch()
    np.testing.assert_array_equal(aug.hflip(aug.hflip(images)), images)
    flip = aug.random_flip()
    out = flip(KEY, images)
    np.testing.assert_array_equal(flip(KEY, out), images)  # the same key flips the same rows
    mirrored = [bool(jnp.all(o == aug.hflip(i[None])[0])) for o, i in zip(out, images, strict=True)]
    kept = [bool(jnp.all(o == i)) for o, i in zip(out, images, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)
    np.testing.assert_array_equal(aug.random_flip(1.0)(KEY, images), aug.hflip(images))


def test_random_crop_is_a_shift_of_the_original_padded_with_zeros():
    images, pad = _uint8_batch(), 2
    out = np.asarray(jax.jit(aug.random_crop(pad))(jax.random.key(3), images))
    padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    shifts = set()
    for o, p in zip(out, padded, strict=True):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(o, p[dy : dy + H, dx : dx + W])
        ]
        assert matches, "crop is not a window of the padded image"
        shifts.add(matches[0])
    assert len(shifts) > 1


def test_reflect_crop_contains_only_original_pixels():
    images = _uint8_batch()
    out = aug.random_crop(3, mode="reflect")(KEY, images)
    for o, i in zip(np.asarray(out), np.asarray(images), strict=True):
        assert set(map(tuple, o.reshape(-1, C))) <= set(map(tuple, i.reshape(-1, C)))
    with pytest.raises(ValueError, match="reflect padding"):
        aug.random_crop(H, mode="reflect")(KEY, images)


def test_resized_crop_boxes_lie_inside_and_constant_image_stays_constant():
    top, left, box_h, box_w = aug.resized_crop_boxes(KEY, 500, 30, 20, (0.05, 1.0), (0.3, 3.0))
    assert jnp.all(top >= 0) and jnp.all(left >= 0)
    assert jnp.all(top + box_h <= 30 + 1e-4) and jnp.all(left + box_w <= 20 + 1e-4)
    assert float(box_h.min()) < 15 < float(box_h.max())  # the scale range is used
    # Sampling outside the image would blend in zeros.
    constant = jnp.full((N, 30, 20, C), 0.7, jnp.float32)
    out = jax.jit(aug.random_resized_crop(10))(KEY, constant)
    assert out.shape == (N, 10, 10, C)
    np.testing.assert_allclose(out, 0.7, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(40, 80), (80, 40), (32, 32)])
def test_resized_crop_boxes_keep_their_ratio_on_any_image(height, width):
    ratio = (3 / 4, 4 / 3)
    top, left, box_h, box_w = aug.resized_crop_boxes(KEY, 2000, height, width, (0.08, 1.0), ratio)
    r = np.asarray(box_w / box_h)
    assert r.min() >= ratio[0] * (1 - 1e-6) and r.max() <= ratio[1] * (1 + 1e-6)
    assert np.all(np.asarray(top + box_h) <= height + 1e-4)
    assert np.all(np.asarray(left + box_w) <= width + 1e-4)
    # `resize`'s centre crop of a non-square image: the largest square window.
    _, _, box_h, box_w = aug.resized_crop_boxes(KEY, 4, height, width, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_allclose(np.asarray(box_w), min(height, width), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(box_h), min(height, width), rtol=1e-6)


def test_full_box_resized_crop_equals_jax_image_resize():
    images = jax.random.uniform(KEY, (2, 16, 12, C))  # a 3:4 box of all the area: whole image
    crop = jax.jit(aug.random_resized_crop(8, scale=(1.0, 1.0), ratio=(0.75, 0.75)))
    reference = jax.image.resize(images, (2, 8, 8, C), "linear", antialias=True)
    np.testing.assert_allclose(crop(KEY, images), reference, atol=1e-5)
    same_size = aug.random_resized_crop(H, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(jax.jit(same_size)(KEY, _float_batch()), _float_batch(), atol=1e-6)


def test_resize_is_the_whole_image_resized_crop_without_randomness():
    images = _uint8_batch()
    resize = jax.jit(aug.resize(5))
    out = resize(KEY, images)
    assert out.shape == (N, 5, 5, C) and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, resize(jax.random.key(1), images))  # any key
    whole = aug.random_resized_crop(5, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # square: all of it
    np.testing.assert_allclose(out, whole(KEY, images), atol=1)  # uint8 rounding
    np.testing.assert_allclose(resize(KEY, _float_batch()), whole(KEY, _float_batch()), atol=1e-6)
    np.testing.assert_array_equal(aug.resize(H)(KEY, images), images)  # already that size
    wide = jax.random.uniform(KEY, (2, 6, 10, C))  # not square: squashed, not cropped
    squashed = aug.random_resized_crop(4, scale=(1.0, 1.0), ratio=(10 / 6, 10 / 6))
    np.testing.assert_allclose(aug.resize(4)(KEY, wide), squashed(KEY, wide), atol=1e-6)
    stacked = jax.vmap(aug.resize(5), in_axes=(0, None))(jax.random.split(KEY, 2), images)
    np.testing.assert_array_equal(stacked[1], out)


def test_rotate_quarter_turn_is_rot90_counter_clockwise_and_no_turn_is_exact():
    images = _float_batch()
    turned = jax.jit(aug.rotate)(images, jnp.full((N,), math.pi / 2))
    np.testing.assert_allclose(turned, jnp.rot90(images, k=1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(aug.rotate(images, jnp.zeros(N)), images)
    u8 = _uint8_batch()
    for unturned in (aug.random_rotate(30.0, p=0.0), aug.random_rotate(0.0, p=1.0)):
        np.testing.assert_array_equal(unturned(KEY, u8), u8)
    out = np.asarray(aug.random_rotate(30.0, p=0.5)(jax.random.key(2), u8))
    changed = [not np.array_equal(o, i) for o, i in zip(out, np.asarray(u8), strict=True)]
    assert any(changed) and not all(changed)  # some turned, some left as they were
    # 'constant' reads zeros beyond the edges: a 45-degree turn brings them into the corners.
    corners = aug.rotate(images + 1.0, jnp.full((N,), math.pi / 4), mode="constant")
    assert float(jnp.max(corners[:, 0, 0])) < 1.0 and float(jnp.min(corners[:, 3:5, 3:5])) >= 1.0


ROTATE_ODD = jax.jit(aug.rotate)  # one program: the examples below differ in values only


@given(st.floats(-math.pi, math.pi), st.integers(0, 2**31 - 1))
def test_rotation_fixes_the_centre_and_stays_within_the_pixel_range(angle, seed):
    images = jax.random.uniform(jax.random.key(seed), (2, 7, 7, C))
    out = ROTATE_ODD(images, jnp.asarray([angle, -angle], jnp.float32))
    np.testing.assert_allclose(out[:, 3, 3], images[:, 3, 3], atol=1e-6)  # the pivot
    # Bilinear reads blend the image's own pixels (mirrored beyond the edge): no new values.
    assert float(out.min()) >= float(images.min()) - 1e-6
    assert float(out.max()) <= float(images.max()) + 1e-6


def test_color_jitter_keeps_range_zero_strength_is_identity_and_uint8_becomes_float():
    images = _float_batch()
    np.testing.assert_allclose(aug.color_jitter()(KEY, images), images, atol=1e-6)
    out = aug.color_jitter(1.0, 1.0, 1.0)(KEY, images)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    from_uint8 = aug.color_jitter(0.3)(KEY, _uint8_batch())
    assert from_uint8.dtype == jnp.float32
    np.testing.assert_allclose(from_uint8, aug.color_jitter(0.3)(KEY, images), atol=1e-6)
    # Saturation 1 can reach grey: the per-pixel channel spread shrinks for some images.
    grey = aug.color_jitter(saturation=1.0)(KEY, images)
    assert bool(
        jnp.any(jnp.ptp(grey, axis=-1).mean((1, 2)) < jnp.ptp(images, axis=-1).mean((1, 2)))
    )


def test_cutout_zeros_one_square_per_image():
    images = _uint8_batch()
    out = np.asarray(aug.cutout(3)(KEY, images))
    for o in out:
        rows, cols = np.nonzero(np.all(o == 0, axis=-1))
        assert 1 <= len(rows) <= 9
        assert rows.max() - rows.min() < 3 and cols.max() - cols.min() < 3


def test_normalize_inverts_and_uses_the_channel_stats():
    images = _uint8_batch()
    mean, std = aug.channel_stats(np.asarray(images), chunk=4)
    x = aug.to_float(images)
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, x.std((0, 1, 2)), rtol=1e-4)
    normalized = aug.normalize(images, mean, std)
    np.testing.assert_allclose(normalized.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.std((0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(aug.denormalize(normalized, mean, std), x, atol=1e-6)
    with pytest.raises(ValueError, match="std"):
        aug.normalize(images, mean, [0.1, 0.0, 0.1])
    with pytest.raises(ValueError, match="mean"):
        aug.normalize(images, [0.5, 0.5], std)


def test_tta_views_are_stacked_flips_and_shifts():
    images = _uint8_batch()
    views = aug.tta_views(images, shifts=((0, 0), (1, -1)))
    assert views.shape == (4, N, H, W, C)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], aug.hflip(images))
    # Window moved down 1 and left 1: row r, col c shows the original at (r + 1, c - 1).
    np.testing.assert_array_equal(views[2][:, : H - 1, 1:], images[:, 1:, : W - 1])
    assert aug.tta_views(images, flip=False).shape == (1, N, H, W, C)
    with pytest.raises(ValueError, match="less than the image size"):
        aug.tta_views(images, shifts=((0, 0), (0, -W)))  # a view of padding alone


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: aug.random_crop(-1), "padding"),
        (lambda: aug.random_crop(2, mode="wrap"), "mode"),
        (lambda: aug.random_flip(1.5), "p"),
        (lambda: aug.random_resized_crop(8, scale=(0.5, 0.2)), "scale"),
        (lambda: aug.random_resized_crop(8, ratio=(0.0, 1.0)), "ratio"),
        (lambda: aug.color_jitter(contrast=1.5), "contrast"),
        (lambda: aug.cutout(0), "size"),
        (lambda: aug.random_rotate(200.0), "max_degrees"),
        (lambda: aug.random_rotate(10.0, p=-0.1), "p"),
        (lambda: aug.random_rotate(10.0, mode="wrap"), "mode"),
        (lambda: aug.rotate(jnp.zeros((1, 4, 4, 1)), jnp.zeros(1), mode="wrap"), "mode"),
        (lambda: aug.resize(0), "size"),
        (lambda: aug.compose(), "at least one"),
    ],
)
def test_bad_settings_are_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_integer_sizes_are_taken_as_ints():
    images = jnp.zeros((2, 12, 12, 3))
    for make in (aug.resize, aug.cutout, lambda s: aug.random_resized_crop(s)):
        assert make(np.int64(8))(jax.random.key(0), images).shape[1] in (8, 12)
    assert aug.random_crop(np.int32(2))(jax.random.key(0), images).shape == images.shape
    with pytest.raises(ValueError, match="size"):
        aug.resize(True)


def test_a_single_image_is_rejected():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        aug.random_flip()(KEY, _uint8_batch()[0])


def test_the_same_settings_give_the_same_augmentation_and_so_the_same_compiled_step():
    from conftest import count_compilations
    from core_worker import make_run

    from jaxlearn.steps import make_train_step

    def pipeline(scale=(0.35, 1.0)):
        return aug.compose(aug.random_flip(), aug.random_resized_crop(H, scale=scale))

    assert pipeline() is pipeline()  # defaults filled in: scale=(0.35, 1) is the same key
    assert aug.random_resized_crop(H, (0.35, 1)) is aug.random_resized_crop(H, scale=(0.35, 1.0))
    assert pipeline((0.5, 1.0)) is not pipeline()
    assert aug.random_resized_crop(H, scale=[0.5, 1.0]) is not aug.random_resized_crop(
        H, scale=[0.5, 1.0]
    )  # unhashable settings: built anew, never wrongly shared
    state, loader, _ = make_run()
    batch = next(iter(loader.epoch(0)))
    make_train_step(augment=pipeline())(state, batch)
    state, _, _ = make_run(seed=1)
    with count_compilations() as compiled:
        make_train_step(augment=pipeline())(state, batch)  # rebuilt, as per seed in a script
    assert len(compiled) == 0
