"""A solve is never silent: 16-bit states, tolerances finer than the dtype, stalls, bad types.

References: closed forms (exponential decay ``y' = -y``, the Gaussian ``y' = -2ty``, linear
growth ``y' = a y`` and its gradients), and the rounding arithmetic of each dtype.
"""

from __future__ import annotations

import math
import re
import warnings

import array_api_compat
import numpy as np
import pytest

import odecore
from odecore import PrecisionWarning, SolveError, Status

namespace = array_api_compat.array_namespace

# Unit roundoff (half the machine epsilon) of the 16-bit formats: float16 keeps 11
# significant bits, bfloat16 8.
ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


LOW_PRECISION_DTYPES = ["float16", "bfloat16"]


def low_precision_dtype(backend, dtype):
    """``dtype``, or a skip where the backend's library has no such dtype (NumPy: bfloat16)."""
    if backend.name == "numpy" and dtype == "bfloat16":
        pytest.skip("NumPy has no bfloat16")
    return dtype


def decay(t, y):
    return -y


def gaussian(t, y):
    """``y' = -2 t y``: y(t) = y(0) exp(-t^2). ``t`` has one time per sample when batched."""
    if t.ndim:
        t = t[:, None]
    return -2 * t * y


# ---------------------------------------------------------------------------------------------
# 16-bit states: the loop runs in float32, func and the outputs keep the user's dtype
# ---------------------------------------------------------------------------------------------

TIMES = np.array([0.0, 0.25, 0.5, 1.0])

# Every solve here uses the default tolerances (rtol 1e-7, atol 1e-9), where 16-bit states
# failed: each step's y + h*k rounded back to y, so bfloat16 returned y(1) = 0.996 for
# y' = -y with SUCCESS, and float16 took 100000 steps that did not move y. rtol 1e-7 is
# below a 16-bit dtype's resolution, so each solve also warns. The float32 loop meets it,
# so what remains is the rounding that the dtype itself brings: the output is rounded once
# (u, the unit roundoff), and f sees its input rounded to the dtype, so its value carries
# k relative roundings of at most u each (k = 1 for a*y, 3 for -2*t*y: t, y and the
# product). By Gronwall a relative perturbation of f of at most k*u moves y(t) by at most
# k*u*int |f/y| dt relative, which is k*u*t for the decay and k*u*t^2 for the Gaussian,
# both at most k*u up to t = 1. The float32 solve at rtol 1e-7 adds far less (u >= 4.9e-4).


def _default_tolerance_solve(*args, **kwargs):
    with pytest.warns(PrecisionWarning, match="rtol=1e-07"):
        return odecore.solve(*args, **kwargs)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize(
    ("problem", "exact", "roundings"),
    [(decay, lambda t: np.exp(-t), 1), (gaussian, lambda t: np.exp(-t * t), 3)],
    ids=["decay", "gaussian"],
)
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_low_precision_state_matches_closed_form(
    backend, dtype, problem, exact, roundings, batched
):
    dtype = low_precision_dtype(backend, dtype)
    y0 = np.array([[1.0], [-3.0], [0.3]]) if batched else np.array([1.0, -3.0])
    seen = []

    def func(t, y):
        seen.append((backend.dtype_name(t), backend.dtype_name(y)))
        return problem(t, y)

    # What JAX users get by default (time in float32), as the 16-bit users of NumPy and
    # torch get float64 time.
    with backend.default_precision():
        sol = _default_tolerance_solve(
            func,
            backend.asarray(y0, dtype),
            backend.asarray(TIMES, dtype),
            batch_axis=0 if batched else None,
        )
    assert sol.success
    assert backend.dtype_name(sol.ys) == dtype
    assert set(seen) == {(dtype, dtype)}
    reference = exact(TIMES).reshape((-1,) + (1,) * y0.ndim) * y0
    error = np.abs(backend.to_numpy(sol.ys) - reference) / np.abs(reference)
    assert np.max(error) <= (1 + roundings) * ROUNDOFF[dtype]


@pytest.mark.backend("jax")
def test_low_precision_under_jit():
    import jax

    jnp = jax.numpy
    y0 = jnp.asarray([1.0, -3.0], dtype=jnp.bfloat16)
    t = jnp.asarray(TIMES, dtype=jnp.bfloat16)
    with pytest.warns(PrecisionWarning):
        ys = jax.jit(lambda y0, t: odecore.odeint(decay, y0, t))(y0, t)
    assert ys.dtype == jnp.bfloat16
    reference = np.exp(-TIMES)[:, None] * np.array([1.0, -3.0])
    error = np.abs(np.asarray(ys, dtype=np.float64) - reference) / np.abs(reference)
    assert np.max(error) <= 2 * ROUNDOFF["bfloat16"]  # the decay's bound, 2u


@pytest.mark.backend("torch")
def test_bfloat16_module_as_func():
    import torch

    # An nn.Module in bfloat16 refuses float32 inputs: func must see the user's dtype.
    layer = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(-1.0)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16)
    t = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    with torch.no_grad():
        sol = _default_tolerance_solve(lambda t, y: layer(y), y0, t)
    assert sol.ys.dtype == torch.bfloat16
    error = sol.ys[-1].double() / (y0.double() * math.exp(-1.0)) - 1
    # The layer's y @ W^T with W = -1 rounds once, as the decay: 2u.
    assert float(error.abs().max()) <= 2 * ROUNDOFF["bfloat16"]


# Gradients of y(1) = y0 exp(a) for y' = a y: d/dy0 = exp(a), d/da = y0 exp(a). Bound: the
# output and each gradient are rounded once (u); the forward and the backward pass see their
# states (and the backward its cotangents) rounded to the dtype, a relative perturbation of
# at most u each, integrated over |a| t <= 0.7: 3u in all. float32 accumulates the parameter
# gradient in checkpoint and backsolve.
GROWTH_RATE = -0.7
GROWTH_Y0 = [1.5, -0.5]
GROWTH_TIMES = [0.0, 0.5, 1.0]


def _check_growth(dtype, ys, y0_bar, a_bar, a):
    e = math.exp(a)
    u = ROUNDOFF[dtype]
    np.testing.assert_allclose(ys[-1], np.array(GROWTH_Y0) * e, rtol=2 * u)
    np.testing.assert_allclose(y0_bar, [e, e], rtol=3 * u)
    if a_bar is not None:
        np.testing.assert_allclose(a_bar, sum(GROWTH_Y0) * e, rtol=3 * u)


def torch_tensor(values, dtype):
    import torch

    return torch.tensor(np.asarray(values), dtype=getattr(torch, dtype))


def torch_to_numpy(x):
    return x.detach().double().numpy()


@pytest.mark.backend("torch")
@pytest.mark.parametrize("adjoint", ["direct", "checkpoint", "backsolve"])
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_low_precision_gradients_torch(dtype, adjoint):
    import torch

    a = torch_tensor(GROWTH_RATE, dtype).requires_grad_(True)
    y0 = torch_tensor(GROWTH_Y0, dtype).requires_grad_(True)
    sol = _default_tolerance_solve(
        lambda t, y, a: a * y, y0, torch_tensor(GROWTH_TIMES, dtype), params=a, adjoint=adjoint
    )
    a_bar, y0_bar = torch.autograd.grad(sol.ys[-1].sum(), [a, y0])
    assert a_bar.dtype == y0_bar.dtype == sol.ys.dtype == getattr(torch, dtype)
    # In direct mode autograd sums the parameter's gradient over every evaluation of f
    # (about a thousand here) in the parameter's own dtype, which no bound of a few u
    # covers; its y0 gradient flows through the float32 loop like the other modes'.
    a_bar = None if adjoint == "direct" else torch_to_numpy(a_bar)
    ys, y0_bar = torch_to_numpy(sol.ys), torch_to_numpy(y0_bar)
    _check_growth(dtype, ys, y0_bar, a_bar, float(a.detach()))


@pytest.mark.backend("jax")
@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_low_precision_gradients_jax(dtype, adjoint):
    import jax
    import jax.numpy as jnp

    t = jnp.asarray(GROWTH_TIMES, dtype=dtype)

    def loss(y0, a):
        ys = odecore.odeint(lambda t, y, a: a * y, y0, t, params=a, adjoint=adjoint)
        return ys[-1].sum(), ys

    a = jnp.asarray(GROWTH_RATE, dtype=dtype)
    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    with pytest.warns(PrecisionWarning):
        (_, ys), (y0_bar, a_bar) = grad(jnp.asarray(GROWTH_Y0, dtype=dtype), a)
    assert str(ys.dtype) == str(y0_bar.dtype) == str(a_bar.dtype) == dtype
    _check_growth(dtype, *(np.asarray(x, dtype=np.float64) for x in (ys, y0_bar, a_bar)), float(a))


class GrowthFloat16:
    """``y' = a y`` with its own VJP, for NumPy; checks that it only ever sees float16."""

    def __call__(self, t, y, params):
        assert y.dtype == np.float16 and t.dtype == np.float16
        return params[0] * y

    def vjp(self, t, y, params, cot):
        assert y.dtype == cot.dtype == np.float16
        return params[0] * cot, (np.sum(cot * y),)


@pytest.mark.backend("numpy")
@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_low_precision_gradients_numpy(adjoint):
    a = np.asarray(GROWTH_RATE, dtype=np.float16)
    with pytest.warns(PrecisionWarning):
        ys, pullback = odecore.vjp_odeint(
            GrowthFloat16(),
            np.asarray(GROWTH_Y0, dtype=np.float16),
            np.asarray(GROWTH_TIMES, dtype=np.float16),
            (a,),
            adjoint=adjoint,
        )
    cotangent = np.zeros(ys.shape, dtype=np.float16)
    cotangent[-1] = 1.0
    y0_bar, (a_bar,), _ = pullback(cotangent)
    assert ys.dtype == y0_bar.dtype == np.float16
    _check_growth(
        "float16", *(np.asarray(x, dtype=np.float64) for x in (ys, y0_bar, a_bar)), float(a)
    )


# ---------------------------------------------------------------------------------------------
# Tolerances below what the dtype resolves
# ---------------------------------------------------------------------------------------------


def _precision_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, PrecisionWarning)]


def test_precision_warning_is_a_user_warning():
    assert issubclass(odecore.PrecisionWarning, UserWarning)
    assert "PrecisionWarning" in odecore.__all__


def test_float32_rtol_below_roundoff_warns(backend):
    y0, t = backend.asarray([1.0], "float32"), backend.asarray([0.0, 1.0], "float32")
    with pytest.warns(PrecisionWarning) as record:
        odecore.solve(decay, y0, t, rtol=1e-12)
    (message,) = _precision_warnings(record)
    # Names the argument, the dtype, its resolution (2^-24) and the remedies.
    assert "rtol=1e-12" in message and "float32" in message
    assert f"{2.0**-24:.3g}" in message
    assert "Loosen rtol" in message and "float64" in message


def test_float32_default_rtol_does_not_warn(backend):
    # 1e-7 is above float32's unit roundoff 5.96e-8.
    with warnings.catch_warnings():
        warnings.simplefilter("error", odecore.PrecisionWarning)
        sol = odecore.solve(decay, backend.asarray([1.0], "float32"), backend.asarray([0.0, 1.0]))
    assert sol.success


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_16_bit_default_rtol_warns(backend, dtype):
    dtype = low_precision_dtype(backend, dtype)
    y0, t = backend.asarray([1.0], dtype), backend.asarray([0.0, 1.0], dtype)
    with pytest.warns(PrecisionWarning, match=rf"rtol=1e-07 .* {dtype} \({ROUNDOFF[dtype]:.3g}\)"):
        odecore.solve(decay, y0, t)


def test_float64_rtol_below_roundoff_warns_without_a_wider_dtype(backend):
    with pytest.warns(PrecisionWarning, match="rtol=1e-17 .* float64") as record:
        odecore.solve(decay, backend.asarray([1.0]), backend.asarray([0.0, 1.0]), rtol=1e-17)
    (message,) = _precision_warnings(record)
    assert f"at least {2.0**-53:.3g}" in message
    assert "wider" not in message


def test_array_rtol_names_its_smallest_element(backend):
    with pytest.warns(PrecisionWarning, match="smallest element of rtol, 1e-09,"):
        odecore.solve(
            decay,
            backend.asarray([1.0, 2.0], "float32"),
            backend.asarray([0.0, 1.0]),
            rtol=backend.asarray([1e-5, 1e-9]),
        )


@pytest.mark.backend("torch")
def test_adjoint_rtol_below_roundoff_warns():
    import torch

    y0 = torch.tensor([1.0], requires_grad=True)  # float32
    with pytest.warns(PrecisionWarning) as record:
        odecore.odeint(decay, y0, torch.tensor([0.0, 1.0]), adjoint="backsolve", adjoint_rtol=1e-10)
    (message,) = _precision_warnings(record)
    assert message.startswith("adjoint_rtol=1e-10 is below") and "Loosen adjoint_rtol" in message


def test_warning_points_at_the_caller(backend):
    y0, t = backend.asarray([1.0], "float32"), backend.asarray([0.0, 1.0])
    with pytest.warns(PrecisionWarning) as record:
        odecore.odeint(decay, y0, t, rtol=1e-9)
    assert record[0].filename == __file__


# ---------------------------------------------------------------------------------------------
# Stalls: reported at once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_step_too_small_to_advance_time_is_underflow_at_once(backend, batch_axis):
    # At t = 1 a step of 1e-17 is below half an ulp (1.1e-16): t + h == t.
    y0 = backend.asarray(np.ones((2, 1)) if batch_axis == 0 else np.ones(1))
    with pytest.raises(SolveError, match="underflow in dt") as info:
        odecore.solve(
            decay,
            y0,
            backend.asarray([1.0, 2.0]),
            method="rk4",
            options={"step_size": 1e-17},
            batch_axis=batch_axis,
        )
    sol = info.value.solution
    assert np.all(backend.status(sol) == Status.DT_UNDERFLOW)
    assert np.all(backend.stats(sol)["nsteps"] == 1)
    assert np.all(backend.to_numpy(sol.t_reached) == 1.0)
    assert "step_size" in str(info.value)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_an_error_norm_that_overflows_is_a_step_size_underflow(backend, batch_axis):
    """With rtol = 0 and atol = 1e-200 the scaled error of any step overflows in the norm's
    squares (error / 1e-200 > 1e154), though f and the state stay finite: shorter steps
    shrink it until the step underflows. That is DT_UNDERFLOW, whose message names the
    tolerances, not NONFINITE_STATE, which blamed func."""
    y0 = backend.asarray(np.ones((2, 1)) if batch_axis == 0 else np.ones(1))
    # From t0 = 1 a step stalls once t + h == t (h below 1.1e-16). From t0 = 0 no step is
    # too short to move time, and the steps would shrink past 1e-170 before the rounding
    # noise in their error estimates stopped overflowing.
    t = backend.asarray([1.0, 2.0])
    with pytest.raises(SolveError, match="tolerances may be too tight") as info:
        odecore.solve(decay, y0, t, rtol=0.0, atol=1e-200, batch_axis=batch_axis)
    sol = info.value.solution
    assert np.all(backend.status(sol) == Status.DT_UNDERFLOW)
    reached = backend.to_numpy(sol.t_reached)
    assert np.all((reached >= 1) & (reached < 2))


@pytest.mark.backend("jax")
def test_step_too_small_to_advance_time_under_jit():
    import jax

    jnp = jax.numpy
    with jax.enable_x64(True):
        run = jax.jit(
            lambda h: odecore.solve(
                decay, jnp.ones(1), jnp.asarray([1.0, 2.0]), method="rk4", options={"step_size": h}
            )
        )
        sol = run(jnp.asarray(1e-17))
        assert int(sol.status) == Status.DT_UNDERFLOW
        assert int(sol.stats["nsteps"]) == 1
        # A step size of zero is invalid input, as it is eagerly (where it raises): under jit
        # the value is checked at run time.
        assert int(run(jnp.asarray(0.0)).status) == Status.INVALID_INPUT


def nan_norm(x):
    return float("nan")


def test_norm_returning_nan_fails_at_once(backend):
    y0, t = backend.asarray([1.0]), backend.asarray([0.0, 1.0])
    with pytest.raises(SolveError, match=r"options\['norm'\]") as info:
        odecore.solve(decay, y0, t, options={"norm": nan_norm})
    sol = info.value.solution
    assert backend.status(sol) == Status.NONFINITE_ERROR
    # The first step is the one that fails: no retries with smaller steps.
    assert backend.stats(sol)["nsteps"] == 1
    assert "error estimate is not finite although the state is" in str(info.value)


def test_norm_returning_nan_for_one_sample(backend):
    def norm(x):  # per sample; sample 1 gets NaN
        xp = namespace(x)
        rms = xp.sqrt(xp.mean(x * x, axis=1))
        return xp.where(xp.arange(3) == 1, math.nan, rms)

    y0 = np.array([[1.0], [2.0], [3.0]])
    sol = odecore.solve(
        decay,
        backend.asarray(y0, "float32"),
        backend.asarray([0.0, 1.0], "float32"),
        batch_axis=0,
        options={"norm": norm},
        throw=False,
    )
    np.testing.assert_array_equal(
        backend.status(sol), [Status.SUCCESS, Status.NONFINITE_ERROR, Status.SUCCESS]
    )
    assert backend.stats(sol)["nsteps"][1] == 1
    ys = backend.to_numpy(sol.ys)
    # float32 at rtol 1e-7: a relative error of 1e-6 is ten times rtol, well above the
    # float32 arithmetic.
    np.testing.assert_allclose(ys[-1, [0, 2], 0], math.exp(-1.0) * y0[[0, 2], 0], rtol=1e-6)
    assert np.isnan(ys[-1, 1, 0])


def test_norm_returning_a_negative_value_fails_at_once(backend):
    """A negative error norm would accept every step however large its error: with the
    negated root mean square the solve used to finish with an error a thousand times rtol.
    It fails as a NaN norm does, in its first step."""

    def negated_rms(x):
        xp = namespace(x)
        return -xp.sqrt(xp.mean(x * x))

    y0, t = backend.asarray([1.0, 2.0]), backend.asarray([0.0, 1.0])
    with pytest.raises(SolveError, match="a norm that returns NaN or a negative value") as info:
        odecore.solve(decay, y0, t, options={"norm": negated_rms})
    assert backend.status(info.value.solution) == Status.NONFINITE_ERROR
    assert backend.stats(info.value.solution)["nsteps"] == 1


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_norm_returning_one_value_per_element_raises(backend, batch_axis):
    """The norm must reduce the state to one number per sample; one returned per element
    used to fail later with an error about converting arrays to scalars, or a reshape."""
    y0 = backend.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    expected = "shape \\(3,\\) for a batch of 3" if batch_axis == 0 else "a scalar"
    with pytest.raises(
        ValueError,
        match=rf"options\['norm'\] must return one number per "
        rf"sample \({expected}\), and it returned an array of shape \(3, 2\)",
    ):
        odecore.solve(
            decay,
            y0,
            backend.asarray([0.0, 1.0]),
            batch_axis=batch_axis,
            options={"norm": lambda x: namespace(x).abs(x)},
        )


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        (None, TypeError, r"the value options\['norm'\] returned must be a real number per sample"),
        (
            "0.5",
            TypeError,
            r"the value options\['norm'\] returned must be a real number per sample",
        ),
        (True, TypeError, r"options\['norm'\] must return real numbers .* dtype \S*bool"),
    ],
    ids=["None", "str", "bool"],
)
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_norm_returning_no_number_raises_naming_the_norm(
    backend, batch_axis, returned, error, match
):
    """A norm that forgets its return, or returns a string or a truth value, used to fail
    inside the library's comparison (``'>=' not supported``, ``Could not infer dtype``)."""
    y0 = backend.asarray([[1.0, 2.0]])
    with pytest.raises(error, match=match):
        odecore.solve(
            decay,
            y0,
            backend.asarray([0.0, 1.0]),
            batch_axis=batch_axis,
            options={"norm": lambda x: returned},
        )


def test_norm_returning_a_one_element_list_is_its_one_number(backend):
    """One sample's norm as ``[n]`` holds the one number the solve needs; NumPy's float() of
    its shape (1,) array used to fail with ``only 0-dimensional arrays can be converted``."""

    def listed_rms(x):
        xp = namespace(x)
        return [xp.sqrt(xp.mean(x * x))]

    y0, t = backend.asarray([1.0, 2.0]), backend.asarray([0.0, 1.0])
    ys = odecore.odeint(decay, y0, t, rtol=1e-9, atol=1e-12, options={"norm": listed_rms})
    # The global error of a tolerance-controlled solve of y' = -y over [0, 1] is a few rtol.
    np.testing.assert_allclose(
        backend.to_numpy(ys)[-1], np.exp(-1.0) * np.array([1.0, 2.0]), rtol=1e-7
    )


def _eager_only(backend):
    if not backend.backend.eager:
        pytest.skip(f"{backend.name} arrays cannot be written in place")


def halving_in_place(t, y):
    y *= 0.5  # writes into the solver's state
    return -y


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_func_writing_into_its_state_raises(backend, batch_axis):
    """The loop gives func its own state: ``y *= 0.5`` inside func used to halve the solution
    at every evaluation, and the solve ended near 1e-8 instead of exp(-1)."""
    _eager_only(backend)
    y0 = backend.asarray([[1.0, 2.0], [3.0, 4.0]] if batch_axis == 0 else [1.0, 2.0])
    with pytest.raises(ValueError, match=r"func modified its argument y in place.*y \*= 0\.5"):
        odecore.odeint(halving_in_place, y0, backend.asarray([0.0, 1.0]), batch_axis=batch_axis)


def test_fixed_point_map_writing_into_its_iterate_raises(backend):
    _eager_only(backend)

    def halving(z):
        z *= 0.5
        return z + 1.0

    with pytest.raises(ValueError, match="f modified its argument z in place"):
        odecore.fixed_point(halving, backend.asarray([1.0, 2.0]))


def test_func_returning_its_state_or_meeting_a_nan_sample_is_not_refused(backend):
    """Returning ``y`` itself (dy/dt = y) writes nothing, and a batch's invalid sample (NaN
    in y0) is NaN before and after the call: neither is a write. The valid samples grow as
    exp(t), the NaN sample is reported invalid."""
    _eager_only(backend)
    y0 = backend.asarray([[1.0], [math.nan], [2.0]])
    sol = odecore.solve(
        lambda t, y: y,
        y0,
        backend.asarray([0.0, 1.0]),
        batch_axis=0,
        rtol=1e-10,
        atol=1e-12,
        throw=False,
    )
    np.testing.assert_array_equal(
        backend.status(sol), [Status.SUCCESS, Status.INVALID_INPUT, Status.SUCCESS]
    )
    ys = backend.to_numpy(sol.ys)
    np.testing.assert_allclose(ys[-1, [0, 2], 0], [math.e, 2 * math.e], rtol=1e-9)


def test_adjoint_params_that_are_not_arrays_of_the_backend_raise(backend):
    """An entry of adjoint_params that is not one of the backend's arrays (a float, a NumPy
    array on torch) used to be passed over and get no gradient; on a backend without
    autodiff, adjoint_params as a whole was ignored."""
    y0, t = backend.asarray([1.0, 2.0]), backend.asarray([0.0, 1.0])
    given = [backend.asarray([0.5]), 1.0]
    if not backend.backend.has_autodiff:
        with pytest.raises(ValueError, match="'numpy' backend has no autodiff.*vjp_odeint"):
            odecore.odeint(decay, y0, t, adjoint_params=given[:1])
        return
    with pytest.raises(TypeError, match=rf"adjoint_params\[1\] must be a {backend.name} array"):
        odecore.odeint(decay, y0, t, adjoint_params=given)


def test_dynamics_non_finite_right_after_the_start(backend):
    # f is NaN for every t > 0. The automatic first step, whose probe sees the NaN, used to
    # be NaN itself and every later step too, until max_num_steps. Now the steps shrink from
    # the first guess (1e-6) by dfactor 0.2 until they underflow: 0.2^n * 1e-6 is below half
    # the smallest subnormal (2.5e-324) for n = 454, and the rounding of subnormal steps
    # adds a few more; then the state is reported non-finite.
    def func(t, y):
        return namespace(y).where(t == 0, -y, y * math.nan)

    with pytest.raises(SolveError, match="non-finite state") as info:
        odecore.solve(func, backend.asarray([1.0]), backend.asarray([0.0, 1.0]))
    sol = info.value.solution
    assert backend.status(sol) == Status.NONFINITE_STATE
    assert backend.stats(sol)["nsteps"] < 500
    assert float(backend.to_numpy(sol.t_reached)) == 0.0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"min_step": math.inf}, r"options\['min_step'\] must be non-negative and finite"),
        ({"safety": 1.5}, r"options\['safety'\] must be in \(0, 1\]"),
        ({"pcoeff": math.inf}, r"options\['pcoeff'\] must be non-negative and finite"),
        ({"icoeff": math.inf}, r"options\['icoeff'\] must be non-negative and finite"),
        ({"icoeff": 0.0}, r"options\['icoeff'\] and options\['pcoeff'\] are both 0"),
        ({"icoeff": 0.0, "pcoeff": 0.0}, r"make icoeff positive"),
        ({"first_step": math.inf}, r"options\['first_step'\] must be positive and finite"),
        ({"safety": True}, r"options\['safety'\] must be a number"),
    ],
    ids=[
        "min_step-inf",
        "safety",
        "pcoeff-inf",
        "icoeff-inf",
        "icoeff-0",
        "gains-0",
        "first_step-inf",
        "safety-bool",
    ],
)
def test_invalid_controller_options(backend, options, match):
    error = TypeError if options.get("safety") is True else ValueError
    y0, t = backend.asarray([1.0]), backend.asarray([0.0, 1.0])
    with pytest.raises(error, match=match):
        odecore.solve(decay, y0, t, options=options)


def test_infinite_fixed_step_size_is_refused(backend):
    y0, t = backend.asarray([1.0]), backend.asarray([0.0, 1.0])
    with pytest.raises(ValueError, match=r"options\['step_size'\] must be positive and finite"):
        odecore.solve(decay, y0, t, method="rk4", options={"step_size": math.inf})


def test_controller_limits_that_remain_valid(backend):
    # The bounds are closed where they should be: safety 1, no limit on max_step and
    # ifactor, icoeff 0 with a positive pcoeff. The answer is e^-1 to rtol's order (a
    # relative 1e-5 is a hundred times rtol; float64 arithmetic adds nothing visible).
    options = {
        "safety": 1.0,
        "max_step": math.inf,
        "ifactor": math.inf,
        "icoeff": 0.0,
        "pcoeff": 0.4,
        "min_step": 0.0,
    }
    ys = odecore.odeint(decay, backend.asarray([1.0]), backend.asarray([0.0, 1.0]), options=options)
    assert backend.to_numpy(ys)[-1, 0] == pytest.approx(math.exp(-1.0), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Wrong types: TypeError naming the argument, on every backend
# ---------------------------------------------------------------------------------------------

# (keyword arguments, the start of the message). Each library words its own refusal of these
# and none names the argument, except where NUMPY_READS_AS_STRINGS says otherwise.
WRONG_TYPES = [
    ({"rtol": "1e-6"}, r"rtol must be a positive number"),
    ({"atol": "1e-9"}, r"atol must be a positive number"),
    ({"rtol": True}, r"rtol must be a positive number"),
    ({"rtol": None}, r"rtol must be a positive number"),
    ({"atol": [1e-9, "tight"]}, r"atol must be a positive number"),
    ({"options": {"step_t": "half"}}, r"options\['step_t'\] must be a time"),
    ({"options": {"jump_t": ["late"]}}, r"options\['jump_t'\] must be a time"),
    ({"throw": "no"}, r"throw must be True or False"),
    ({"func": 5}, r"func must be a callable"),
    ({"adjoint_params": 5}, r"adjoint_params must be a sequence of arrays"),
    ({"t": None}, r"t must be a 1-D array"),
    ({"y0": "abc"}, r"y0 must be an array of real floating numbers"),
    ({"t": [0.0, "1"]}, r"t must be a 1-D array of output times"),
    # JAX reads a string as the name of a dtype: "01" failed in its parser with SyntaxError.
    ({"t": "01"}, r"t must be a 1-D array of output times"),
    ({"y0": b"01"}, r"y0 must be an array of real floating numbers"),
]
# NumPy reads a list holding strings as an array of strings, whose dtype check names the
# argument instead.
NUMPY_READS_AS_STRINGS = {"y0": r"y0 must have a real floating dtype", "t": r"t must hold real"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [pytest.param(k, m, id=f"{next(iter(k))}{i}") for i, (k, m) in enumerate(WRONG_TYPES)],
)
def test_wrong_type_is_a_type_error_naming_the_argument(backend, kwargs, match):
    arguments = {
        "func": decay,
        "y0": backend.asarray([1.0], "float32"),
        "t": backend.asarray([0.0, 1.0], "float32"),
    }
    arguments.update(kwargs)
    (name,) = kwargs
    if backend.name == "numpy" and isinstance(kwargs[name], list):
        match = NUMPY_READS_AS_STRINGS.get(name, match)
    func, y0, t = arguments.pop("func"), arguments.pop("y0"), arguments.pop("t")
    with pytest.raises(TypeError, match=f"^{match}"):
        odecore.solve(func, y0, t, **arguments)


@pytest.mark.parametrize(
    "library", [pytest.param(name, marks=pytest.mark.backend(name)) for name in ("torch", "jax")]
)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # The backsolve reads options before the solve validates them.
        ({"options": [("first_step", 0.1)]}, r"^options must be a dict"),
        ({"options": "rk4"}, r"^options must be a dict"),
        ({"adjoint_rtol": "1e-3"}, r"^adjoint_rtol must be a positive number"),
        ({"adjoint_atol": [1.0, "tight"]}, r"^adjoint_atol must be a positive number"),
    ],
    ids=["options-list", "options-str", "adjoint_rtol", "adjoint_atol"],
)
def test_wrong_type_with_backsolve(library, kwargs, match):
    # A backsolve needs the library's own differentiation: NumPy has none.
    bk = odecore.get_backend(library)
    y0, t = (bk.asarray(np.asarray(x), dtype=bk.xp.float32) for x in ([1.0], [0.0, 1.0]))
    if library == "torch":
        y0.requires_grad_(True)
    with pytest.raises(TypeError, match=match):
        odecore.solve(decay, y0, t, adjoint="backsolve", **kwargs)


def test_vjp_odeint_wrong_types():
    with pytest.raises(TypeError, match="^func must be a callable"):
        odecore.vjp_odeint(None, np.ones(1), [0.0, 1.0])
    with pytest.raises(TypeError, match="^rtol must be a positive number"):
        odecore.vjp_odeint(GrowthFloat16(), np.ones(1), [0.0, 1.0], (1.0,), rtol="1e-6")


# ---------------------------------------------------------------------------------------------
# A failed batch names its failed samples
# ---------------------------------------------------------------------------------------------

LISTED = re.compile(r"sample (\d+) \((\w+) at t=([-0-9.e+]+)\)")


def test_batched_failure_lists_failed_samples(backend):
    # y' = y^2 from y(0) = c blows up at t = 1/c; with c <= 0 it decays and succeeds. Twelve
    # samples fail (the first ten are listed), at 1/c for c = 1, 1.25, ..., 3.75. Sample 5
    # instead turns NaN for t > 0.3.
    c = np.array([1.0 + 0.25 * i if i % 3 else -1.0 for i in range(18)])
    y0 = c[:, None]

    sample_5 = backend.asarray(np.arange(18) == 5, dtype=None)[:, None]

    def func(t, y):
        return namespace(y).where(sample_5 & (t[:, None] > 0.3), math.nan, y * y)

    with pytest.raises(SolveError) as info:
        odecore.solve(func, backend.asarray(y0), backend.asarray([0.0, 2.0]), batch_axis=0)
    message = str(info.value)
    failed = [i for i in range(18) if c[i] > 0]
    assert f"failed for {len(failed)} of 18 samples" in message
    listed = LISTED.findall(message)
    assert [int(i) for i, _, _ in listed] == failed[:10]
    assert message.count("and 2 more") == 1
    for index, status, t in listed:
        index = int(index)
        if index == 5:
            assert status == "NONFINITE_STATE"
            assert float(t) == pytest.approx(0.3, abs=0.05)
        else:
            assert status == "DT_UNDERFLOW"
            # As in test_errors.test_step_size_underflow: the steps stall within 1e-3 of
            # the blow-up.
            assert float(t) == pytest.approx(1.0 / c[index], abs=1e-3)
    # Both failures are explained by name.
    assert "DT_UNDERFLOW: underflow in dt" in message
    assert "NONFINITE_STATE: non-finite state" in message
