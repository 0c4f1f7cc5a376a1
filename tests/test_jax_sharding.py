"""JAX's own sharding around odecore's batched solve: the batch split over two CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, which must be set before JAX starts,
hence a subprocess) gives the solve of the whole batch on one device.

The reference is the same jitted solve on unsharded arrays. Each sample takes its own steps,
so the forward solve is the same arithmetic on every row wherever it runs: equal to the bit.
The gradient's backward solve is one system over the batch whose parameter adjoint XLA sums
over the devices (an all-reduce, in another order than one device's sum); its error control
may then choose a step differently, which changes the gradient by no more than the adjoint
tolerance (1e-8 here), relative to its size.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from backend_params import framework_module

pytestmark = pytest.mark.backend("jax")
framework_module("jax")

SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import odecore

jax.config.update("jax_enable_x64", True)

def lorenz(t, y, p):
    x, v, z = y[:, 0], y[:, 1], y[:, 2]
    return jnp.stack([p[:, 0] * (v - x), x * (p[:, 1] - z) - v, x * v - p[:, 2] * z], axis=1)

n = 16
params = np.stack([np.full(n, 10.0), np.linspace(0.0, 21.0, n), np.full(n, 8.0 / 3.0)], 1)
y0 = np.tile([1.0, 0.0, 0.0], (n, 1))
t = jnp.linspace(0.0, 1.0, 3)

def final(p, y0):
    return odecore.odeint(lorenz, y0, t, params=p, batch_axis=0, rtol=1e-8, atol=1e-8)

def loss(p, y0):
    return jnp.sum(final(p, y0)[-1] ** 2)

rows = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec("batch"))
solve, grad = jax.jit(final), jax.jit(jax.grad(loss))
sharded = (jax.device_put(params, rows), jax.device_put(y0, rows))
whole = (jnp.asarray(params), jnp.asarray(y0))
ys_sharded, ys = solve(*sharded), solve(*whole)
print(json.dumps({
    "devices": len(jax.devices()),
    "ys_spec": [None if axis is None else str(axis) for axis in ys_sharded.sharding.spec],
    "ys_sharded": np.asarray(ys_sharded).tolist(),
    "ys": np.asarray(ys).tolist(),
    "grad_sharded": np.asarray(grad(*sharded)).tolist(),
    "grad": np.asarray(grad(*whole)).tolist(),
}))
"""


@pytest.fixture(scope="module")
def results():
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_batch_is_split_over_two_devices(results):
    assert results["devices"] == 2
    # The outputs (T, N, D) stay split along the batch, as the inputs were.
    assert results["ys_spec"] == [None, "batch"]


def test_sharded_solve_equals_one_device(results):
    np.testing.assert_array_equal(results["ys_sharded"], results["ys"])


def test_sharded_gradient_agrees_to_the_adjoint_tolerance(results):
    grad = np.asarray(results["grad"])
    np.testing.assert_allclose(
        results["grad_sharded"], grad, rtol=1e-8, atol=1e-8 * np.abs(grad).max()
    )
