"""Mixup and cutmix: label mass, the lambda each draws, identity as alpha -> 0, padded rows.

The transforms run eagerly here: their few operations compile once per shape, and the
drawn alphas are data to `jax.random.beta`, so every hypothesis example after the first
costs milliseconds. Images are constant per example (value i + 1 in image i), so
where each pixel came from can be read off the output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compilations
from core_worker import TinyNet, tiny_data
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from jaxlearn.data.augment import compose
from jaxlearn.data.mix import CutMix, MixUp
from jaxlearn.loop import fit
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step

N, H, W = 8, 6, 5
LARGE = 1000  # examples in the distribution tests (one shape: jax.random.beta compiles in 1.7 s)
MIXES = {"mixup": MixUp, "cutmix": CutMix}


def _batch(num_classes=N, mask=None, soft=None, seed=0):
    """Image i has channels (a, a^2), a = i + 1; labels drawn in [0, num_classes)."""
    a = jnp.arange(1.0, N + 1)[:, None, None, None]
    images = jnp.broadcast_to(jnp.concatenate([a, a**2], -1), (N, H, W, 2))
    labels = np.random.default_rng(seed).integers(0, num_classes, N).astype(np.int32)
    batch = {"image": images, "label": jnp.asarray(labels)}
    if mask is not None:
        batch["mask"] = jnp.asarray(mask)
    if soft is not None:
        batch["target"] = jnp.asarray(soft, jnp.float32)
    return batch


def _origins(out_images):
    """(N, H, W) index of the input image each output pixel of a cutmix came from."""
    return np.asarray(out_images[..., 0]).round().astype(int) - 1


def _blend(pixel, i):
    """(partner, lam) of a mixup pixel lam * (a, a^2) + (1 - lam) * (b, b^2), a = i + 1.

    From v0 - a = (1 - lam)(b - a) and v1 - a^2 = (1 - lam)(b^2 - a^2): b = ratio - a.
    None when the partner's share is below float32's resolution of it (1 - lam < 1e-3).
    """
    a, (v0, v1) = i + 1, np.asarray(pixel, np.float64)
    if abs(v0 - a) < 1e-3:
        return None
    b = round((v1 - a * a) / (v0 - a) - a)
    return b - 1, (b - v0) / (b - a)


@settings(max_examples=10)  # eager, ~0.2 s each after the first
@given(
    name=st.sampled_from(sorted(MIXES)),
    alpha=st.floats(0.05, 8.0),
    num_classes=st.sampled_from([2, 3, 10]),  # each size compiles the eager ops once
    seed=st.integers(0, 2**16),
    padded=st.integers(0, 3),
    soft=st.booleans(),
)
def test_targets_are_distributions_labels_dominant_padding_untouched(
    name, alpha, num_classes, seed, padded, soft
):
    mask = np.arange(N) < N - padded
    rows = np.random.default_rng(seed).dirichlet(np.ones(num_classes), N) if soft else None
    batch = _batch(num_classes, mask=mask, soft=rows, seed=seed)
    out = MIXES[name](alpha, num_classes)(jax.random.key(seed), batch)
    target, labels = np.asarray(out["target"]), np.asarray(batch["label"])
    given_target = rows if soft else np.eye(num_classes)[labels]
    # Label mass is conserved: every row a distribution (float32 rounding only).
    np.testing.assert_allclose(target.sum(-1), 1.0, atol=1e-6)
    assert (target >= 0).all()
    np.testing.assert_array_equal(out["mask"], mask)
    for i in range(N):
        if not mask[i]:  # padding: untouched
            np.testing.assert_array_equal(out["image"][i], batch["image"][i])
            np.testing.assert_allclose(target[i], given_target[i], atol=1e-7)
            assert out["label"][i] == labels[i]
            continue
        if name == "cutmix":
            sources = np.unique(_origins(out["image"])[i])
            own = np.mean(_origins(out["image"])[i] == i)
            j = next((s for s in sources if s != i), i)
        else:
            blend = _blend(out["image"][i, 0, 0], i)
            if blend is None:  # (almost) no partner: the row's own target
                np.testing.assert_allclose(target[i], given_target[i], atol=2e-3)
                assert out["label"][i] == labels[i]
                continue
            j, own = blend
            assert own >= 0.5 - 1e-4  # folded
        # Real rows take content from real rows only, and the label of the larger part.
        assert mask[j]
        expected = own * given_target[i] + (1 - own) * given_target[j]
        np.testing.assert_allclose(target[i], expected, atol=1e-3 if name == "mixup" else 1e-6)
        assert out["label"][i] == (labels[i] if own >= 0.5 else labels[j])


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_mixup_lambda_is_folded_beta(alpha):
    # Two classes alternating: a row paired with the other class shows lam as its own
    # class's weight; pairing is independent of lam, so those rows sample lam itself.
    n = LARGE
    batch = {
        "image": jnp.zeros((n, 1, 1, 1)),
        "label": jnp.asarray(np.arange(n) % 2, jnp.int32),
    }
    out = MixUp(alpha, 2)(jax.random.key(7), batch)
    own = np.asarray(out["target"])[np.arange(n), np.arange(n) % 2]
    lam = own[own < 1.0]
    assert len(lam) > n // 3
    assert (lam >= 0.5).all()  # folded: the own image dominates, its label is kept
    np.testing.assert_array_equal(out["label"], batch["label"])

    def folded_cdf(x):
        return stats.beta.cdf(x, alpha, alpha) - stats.beta.cdf(1 - x, alpha, alpha)

    assert stats.kstest(lam, folded_cdf).pvalue > 1e-3
    # The test can tell: an unfolded or uniform lambda is rejected.
    assert stats.kstest(np.concatenate([lam, 1 - lam]), folded_cdf).pvalue < 1e-6
    if alpha != 1.0:
        assert stats.kstest(lam, lambda x: 2 * x - 1).pvalue < 1e-6


@settings(max_examples=25)
@given(alpha=st.floats(0.05, 8.0), seed=st.integers(0, 2**16))
def test_cutmix_lambda_is_the_exact_pasted_area_of_one_box(alpha, seed):
    batch = _batch()
    batch["label"] = jnp.arange(N, dtype=jnp.int32)  # one class per image: targets say who
    out = CutMix(alpha, N)(jax.random.key(seed), batch)
    origins = _origins(out["image"])
    target = np.asarray(out["target"])
    for i in range(N):
        own = np.mean(origins[i] == i)
        np.testing.assert_allclose(target[i, i], own, atol=1e-6)
        pasted = origins[i] != i
        if pasted.any():  # one axis-aligned box of one partner
            rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            (j,) = np.unique(origins[i][pasted])
            np.testing.assert_allclose(target[i, j], 1 - own, atol=1e-6)
        assert out["label"][i] == (i if own >= 0.5 else origins[i][pasted][0])


def test_cutmix_pasted_area_is_one_minus_lambda_up_to_rounding():
    # The box lies inside the image (never clipped), so the pasted area is 1 - lam, lam
    # the Beta(alpha, alpha) draw, up to rounding each side to whole pixels.
    n, side, alpha = LARGE, 32, 1.0
    batch = {"image": jnp.zeros((n, side, side, 1)), "label": jnp.arange(n, dtype=jnp.int32)}
    key = jax.random.key(3)
    k_lam, _, _, k_pair = jax.random.split(key, 4)  # CutMix's own keys, to see its draws
    real = np.asarray(jax.random.permutation(k_pair, n)) != np.arange(n)  # not self-paired
    kept = np.diagonal(np.asarray(CutMix(alpha, n)(key, batch)["target"]))[real]
    lam = np.asarray(jax.random.beta(k_lam, alpha, alpha, (n,)))[real]
    # |(s + e1)(s + e2) - s^2| <= |e1 + e2| s + e1 e2, |e| <= 0.5 px, s <= side.
    np.testing.assert_allclose(kept, lam, atol=(side + 0.25) / side**2)
    assert np.abs(kept - lam).max() > 1e-3  # rounded to pixels, not the draw itself
    assert stats.kstest(1 - kept, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


@pytest.mark.parametrize("name", sorted(MIXES))
def test_identity_as_alpha_goes_to_zero(name):
    batch = _batch(num_classes=5)
    out = MIXES[name](1e-6, 5)(jax.random.key(1), batch)
    origins = _origins(out["image"])
    labels = np.asarray(batch["label"])
    for i in range(N):
        (j,) = np.unique(origins[i])  # one whole input image, never a blend or a box
        np.testing.assert_array_equal(out["image"][i], batch["image"][j])
        assert out["label"][i] == labels[j]
        np.testing.assert_array_equal(out["target"][i], np.eye(5)[labels[j]])
    if name == "mixup":  # folded lambda -> 1: each row is itself
        np.testing.assert_array_equal(out["image"], batch["image"])


def test_same_key_same_batch_and_composes():
    # Eager (the train step tests run them under jit): a jit here would compile the
    # Beta sampler once more for nothing.
    batch = _batch(num_classes=4)
    both = compose(MixUp(0.4, 4), CutMix(1.0, 4))
    a, b = both(jax.random.key(0), batch), both(jax.random.key(0), batch)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(np.asarray(a["target"]).sum(-1), 1.0, atol=1e-6)
    assert not np.array_equal(a["image"], both(jax.random.key(1), batch)["image"])


def test_bad_settings_and_batches_are_refused():
    for bad in (0.0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="alpha"):
            MixUp(bad, 3)
    with pytest.raises(ValueError, match="num_classes"):
        CutMix(1.0, 1)
    assert MixUp(0.4, 3) == MixUp(0.4, 3) and hash(CutMix(1.0, 3)) == hash(CutMix(1.0, 3))
    batch = _batch(num_classes=3)
    with pytest.raises(ValueError, match="float"):
        MixUp(0.4, 3)(jax.random.key(0), {**batch, "image": batch["image"].astype(jnp.uint8)})
    with pytest.raises(ValueError, match="target"):
        CutMix(1.0, 3)(jax.random.key(0), {**batch, "target": jnp.ones((N, 4)) / 4})


def _loader(batches):
    """The smallest `fit` loader: the same list of batches every epoch."""

    class Batches:
        def __len__(self):
            return len(batches)

        def epoch(self, epoch, start_step=0):
            return iter(batches[start_step:])

    return Batches()


def test_train_step_mixes_on_the_device_with_smoothing_and_compiles_once():
    images, labels = tiny_data(N)
    # A batch may bring soft labels of its own; the mix mixes them. Every row differs, so
    # the mix changes targets whatever partners the PRNG draws: with one-hot rows, JAX's
    # default (partitionable) threefry pairs every row within its class here.
    soft = np.random.default_rng(0).dirichlet(np.ones(3), N).astype(np.float32)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels), "target": soft}
    mix, smoothing = MixUp(0.4, 3), 0.1
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(0), images[:1])

    # By hand: the step's keys, the mix of the preprocessed batch, the smoothed loss.
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, 0))
    mixed = mix(jax.random.split(aug_key)[1], {**batch, "image": images / np.float32(255)})
    logits, _ = jax.jit(state.apply_fn, static_argnames=("train", "mutable"))(
        state.variables, mixed["image"], train=True, rngs={"dropout": dropout_key},
        mutable=("batch_stats",),
    )  # fmt: skip
    target = np.asarray(mixed["target"]) * (1 - smoothing) + smoothing / 3
    loss = -np.mean(np.sum(target * jax.nn.log_softmax(logits), -1))
    accuracy = np.mean(np.argmax(logits, -1) == np.asarray(mixed["label"]))
    assert not np.array_equal(mixed["target"], soft)  # the mix did mix

    step = make_train_step(batch_augment=mix, label_smoothing=smoothing)
    assert step is make_train_step(batch_augment=MixUp(0.4, 3), label_smoothing=smoothing)
    new, m = step(state, batch)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], accuracy)
    assert int(m["bad_labels"]) == 0
    # Another seed, another optimizer object, an equal mix: the compiled program serves.
    other = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(1), images[:1])
    bad = {**batch, "target": np.full((N, 3), 0.5, np.float32)}  # rows summing to 1.5
    with count_compilations() as compiled:
        _, m_bad = make_train_step(batch_augment=MixUp(0.4, 3), label_smoothing=0.1)(other, bad)
        new, _ = step(new, batch)
    assert len(compiled) == 0
    assert int(m_bad["bad_labels"]) == N  # counted inside the step: fit raises on it
    # fit refuses such a batch before the first step, naming the rows.
    with pytest.raises(ValueError, match=r"distributions .* rows \[0, 1, 2, 3, 4\]"):
        fit(new, _loader([bad]), train_step=step, epochs=3, progress=False)  # at step 2
    with pytest.raises(ValueError, match="batch_augment"):
        make_train_step(batch_augment="mixup")
