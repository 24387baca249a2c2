"""ArrayLoader: device-resident and host batches are the same batches."""

import jax
import numpy as np
import pytest

from jaxlearn.data import ArrayLoader


def _data(n=37):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 5, n)


@pytest.mark.parametrize("train", [True, False])
def test_device_resident_batches_equal_host_batches(train):
    images, labels = _data()
    device = ArrayLoader(images, labels, 8, seed=3, train=train, on_device=True)
    host = ArrayLoader(images, labels, 8, seed=3, train=train, on_device=False)
    assert device.on_device and not host.on_device
    for epoch, start in [(0, 0), (1, 2)]:
        got = list(device.epoch(epoch, start_step=start))
        want = list(host.epoch(epoch, start_step=start))
        assert len(got) == len(want) == len(device) - start
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
                assert a[k].dtype == b[k].dtype, k
    if not train:  # the padded last batch: 37 = 4 * 8 + 5
        last = list(device.epoch(0))[-1]
        np.testing.assert_array_equal(np.asarray(last["mask"]), np.arange(8) < 5)


def test_small_data_is_resident_by_default_and_batches_are_sharded():
    images, labels = _data()
    loader = ArrayLoader(images, labels, 8)
    assert loader.on_device
    batch = next(iter(loader.epoch(0)))
    assert batch["image"].sharding.is_equivalent_to(
        jax.sharding.NamedSharding(loader.mesh, jax.sharding.PartitionSpec("data")), 4
    )
