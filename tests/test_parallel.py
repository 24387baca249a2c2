"""Data parallelism: 8 fake CPU devices and 2 processes give the numbers of 1 device."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from core_worker import steps_run

WORKER = Path(__file__).with_name("core_worker.py")


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    )
    return env


def _assert_close(one, many):
    assert sorted(one.files) == sorted(many.files)
    for key in ("losses", "logits", "eval_loss"):  # training, inference, evaluation
        np.testing.assert_allclose(many[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in one.files:
        if key.startswith("v"):  # params and batch_stats
            np.testing.assert_allclose(many[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    if len(jax.devices()) != 1:
        pytest.skip(f"the reference run needs 1 device, this process has {len(jax.devices())}")
    out = tmp_path_factory.mktemp("one") / "one.npz"
    steps_run(str(out))
    return np.load(out)


def test_eight_devices_match_one(one_device, tmp_path):
    out = tmp_path / "eight.npz"
    subprocess.run(
        [sys.executable, str(WORKER), "steps", str(out)], env=_env(8), check=True, timeout=300
    )
    eight = np.load(out)
    assert int(eight["num_devices"]) == 8
    for key in ("indivisible", "indivisible_step"):
        assert "multiple of the number of devices (8)" in str(eight[key]), key
    assert int(eight["submesh_devices"]) == 4 and int(one_device["submesh_devices"]) == 1
    _assert_close(one_device, eight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(one_device, tmp_path):
    port, out = _free_port(), tmp_path / "two.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "distributed", str(out), str(port), "2", str(pid)],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"worker failed:\n{log[-3000:]}"
    two = np.load(out)
    assert int(two["num_devices"]) == 2
    _assert_close(one_device, two)


def test_to_device_compiles_nothing_and_keeps_values_and_dtypes():
    from conftest import count_compilations

    from jaxlearn.parallel import to_device

    table = np.arange(7 * 13).reshape(7, 13)  # int64 on the host, shapes no test uses
    with count_compilations() as compiled:
        ints = to_device(table, np.int32)
        floats = to_device([0.5, 1.5, 2.5, 3.5, 4.5])
        images = to_device(np.full((3, 5, 5, 3), 7, np.uint8))
    # `jnp.asarray` ran a program for each: a conversion and two `jit(stage)`.
    assert compiled == []
    assert isinstance(ints, jax.Array) and ints.dtype == np.int32 and ints.shape == (7, 13)
    np.testing.assert_array_equal(ints, table)
    assert floats.dtype == np.float32 and images.dtype == np.uint8  # x64 off: float64 -> 32
    np.testing.assert_array_equal(floats, [0.5, 1.5, 2.5, 3.5, 4.5])
    assert to_device(ints) is ints and to_device(ints, np.float32).dtype == np.float32
