"""The JAX backend where it used to go wrong: failures under grad, integer parameters, invalid
samples and stop times under jit, silent downcasts, and the cost of repeated eager calls.

References: closed forms, odecore's NumPy backend, and central finite differences in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX tests need jax installed")
jnp = jax.numpy

import odecore  # noqa: E402
from odecore import Status  # noqa: E402


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _central_differences(f, x, eps=1e-6):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    for j in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[j] += eps
        minus[j] -= eps
        out[j] = (float(f(jnp.asarray(plus))) - float(f(jnp.asarray(minus)))) / (2 * eps)
    return out


# --------------------------------------------------------------------------------------------
# A failed solve under grad raises SolveError


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_grad_of_a_failing_solve_raises_solve_error(x64, mode, batch_axis):
    """Outside jit the status is known, under grad too: the failure is reported by name,
    with the time reached, not by an error about tracers."""
    y0 = jnp.ones((2, 1)) if batch_axis == 0 else jnp.ones(1)

    def loss(y0):
        ys = odecore.odeint(
            lambda t, y: -y,
            y0,
            jnp.asarray([0.0, 50.0]),
            options={"max_num_steps": 5},
            adjoint=mode,
            batch_axis=batch_axis,
        )
        return jnp.sum(ys)

    with pytest.raises(odecore.SolveError, match=r"max_num_steps reached") as info:
        jax.grad(loss)(y0)
    # Five steps of dopri5 from t = 0 on y' = -y (a first step near 1e-1) end well before 50.
    assert 0.0 < float(np.max(np.asarray(info.value.solution.t_reached))) < 50.0
    assert "stopped at t=" in str(info.value) or "failed at t=" in str(info.value)


# --------------------------------------------------------------------------------------------
# Integer and boolean parameters are constants


def _indexed(t, y, params):
    """``dy/dt = -rates[order] * y + shift``, the shift only where ``free``: an integer index
    array picks the rates, a boolean mask the shifted components."""
    shift = jnp.where(params["free"], params["shift"], 0.0)
    return -params["rates"][params["order"]] * y + shift


def _integer_params():
    return {
        "rates": jnp.asarray([0.5, 1.5, 0.8]),
        "order": jnp.asarray([2, 0]),
        "shift": jnp.asarray(0.25),
        "free": jnp.asarray([True, False]),
    }


def _indexed_loss(mode):
    t = jnp.asarray([0.0, 0.7, 1.3])
    y0 = jnp.asarray([1.0, -0.5])

    def loss(params):
        ys = odecore.odeint(_indexed, y0, t, params=params, adjoint=mode, rtol=1e-10, atol=1e-12)
        return jnp.sum(ys**2)

    return loss


@pytest.mark.parametrize("wrap", ["grad", "jit(grad)", "grad(jit)"])
@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_integer_parameter_is_a_constant(x64, mode, wrap):
    loss = _indexed_loss(mode)
    params = _integer_params()
    if wrap == "grad":
        grad = jax.grad(loss, allow_int=True)
    elif wrap == "jit(grad)":
        grad = jax.jit(jax.grad(loss, allow_int=True))
    else:
        grad = jax.grad(jax.jit(loss), allow_int=True)
    g = grad(params)
    assert g["order"].dtype == jax.dtypes.float0
    assert g["free"].dtype == jax.dtypes.float0
    for name in ("rates", "shift"):

        def along(value, name=name):
            return loss({**params, name: value})

        fd = _central_differences(along, params[name])
        # A perturbation of 1e-6 leaves the steps as they are, so the quotient is that of the
        # discrete solve, to O(1e-12) truncation and 1e-16 / 1e-6 rounding; the backsolve's
        # continuous adjoint differs from it by about the tolerance, 1e-10. 1e-5 of the
        # largest entry leaves a wide margin over both.
        scale = max(float(np.max(np.abs(fd))), 1.0)
        np.testing.assert_allclose(np.asarray(g[name]), fd, rtol=0, atol=1e-5 * scale)
    # rates[1] is never selected: its gradient is zero, not NaN.
    assert float(g["rates"][1]) == 0.0


# --------------------------------------------------------------------------------------------
# Validity under jit: per sample, except what the samples share


def _decay(t, y):
    return -y


TIMES = np.array([0.0, 0.5, 2.0])
BATCH = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])


def _exact(y0):
    return np.exp(-TIMES)[:, None] * y0


def test_per_element_tolerance_of_one_sample_invalidates_only_it(x64):
    atol = np.full(BATCH.shape, 1e-12)
    atol[2, 1] = -1.0
    run = jax.jit(
        lambda y0, t, atol: odecore.solve(
            _decay, y0, t, rtol=1e-10, atol=atol, batch_axis=0, throw=False
        )
    )
    sol = run(jnp.asarray(BATCH), jnp.asarray(TIMES), jnp.asarray(atol))
    assert [int(s) for s in sol.status] == [Status.SUCCESS, Status.SUCCESS, Status.INVALID_INPUT]
    assert bool(jnp.all(jnp.isnan(sol.ys[:, 2])))
    for i in (0, 1):
        # dopri5 at rtol 1e-10 to t = 2: a global error within a few hundred tolerances.
        np.testing.assert_allclose(np.asarray(sol.ys[:, i]), _exact(BATCH[i]), atol=1e-7)


@pytest.mark.parametrize("bad", ["t", "rtol"])
def test_invalid_shared_input_invalidates_every_sample(x64, bad):
    t = jnp.asarray([0.0, np.nan, 2.0]) if bad == "t" else jnp.asarray(TIMES)
    rtol = jnp.asarray(-1e-8) if bad == "rtol" else jnp.asarray(1e-8)
    run = jax.jit(lambda y0, t, rtol: odecore.solve(_decay, y0, t, rtol=rtol, batch_axis=0))
    sol = run(jnp.asarray(BATCH), t, rtol)
    assert [int(s) for s in sol.status] == [Status.INVALID_INPUT] * 3
    assert bool(jnp.all(jnp.isnan(sol.ys[1:])))


def test_one_non_finite_sample_under_jit_leaves_the_others(x64):
    y0 = BATCH.copy()
    y0[1, 0] = np.inf
    sol = jax.jit(lambda y0, t: odecore.solve(_decay, y0, t, batch_axis=0, rtol=1e-10))(
        jnp.asarray(y0), jnp.asarray(TIMES)
    )
    assert [int(s) for s in sol.status] == [Status.SUCCESS, Status.INVALID_INPUT, Status.SUCCESS]
    for i in (0, 2):
        np.testing.assert_allclose(np.asarray(sol.ys[:, i]), _exact(BATCH[i]), atol=1e-7)


@pytest.mark.parametrize("key", ["step_t", "jump_t"])
def test_nan_stop_time_under_jit_is_invalid_input(x64, key):
    run = jax.jit(
        lambda y0, stops: odecore.solve(
            _decay, y0, jnp.asarray(TIMES), batch_axis=0, options={key: stops}
        )
    )
    sol = run(jnp.asarray(BATCH), jnp.asarray([0.7, np.nan]))
    assert [int(s) for s in sol.status] == [Status.INVALID_INPUT] * 3
    assert bool(jnp.all(jnp.isnan(sol.ys[1:])))
    # The same stops without the NaN are solved.
    sol = run(jnp.asarray(BATCH), jnp.asarray([0.7, 1.2]))
    assert [int(s) for s in sol.status] == [Status.SUCCESS] * 3
    with pytest.raises(ValueError, match=rf"options\['{key}'\] contains NaN"):
        odecore.solve(_decay, jnp.asarray(BATCH), jnp.asarray(TIMES), options={key: [np.nan]})
