"""Bad inputs and failed solves: every one gets an error (or a status) that names the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest

import odecore
from odecore import SolveError, Status


def decay(t, y):
    return -y


Y0 = np.array([1.0, 2.0])
TS = np.array([0.0, 1.0])


def solve(func=decay, y0=Y0, t=TS, **kwargs):
    return odecore.solve(func, y0, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# Output times
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [np.zeros((2, 2)), 1.0, np.array(3.0)], ids=["2-d", "float", "0-d"])
def test_t_must_be_1d(t):
    with pytest.raises(ValueError, match="t must be a 1-D array"):
        solve(t=t)


@pytest.mark.parametrize(
    "t",
    [[0.0, 1.0, 1.0, 2.0], [0.0, 2.0, 1.0], [2.0, 1.0, 1.5], [1.0, 1.0]],
    ids=["repeated", "non-monotonic", "non-monotonic-decreasing", "all-repeated"],
)
def test_t_must_be_strictly_monotonic(t):
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        solve(t=t)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_t_must_be_finite(bad):
    with pytest.raises(ValueError, match="t contains NaN"):
        solve(t=[0.0, bad, 2.0])


def test_t_must_not_be_empty():
    with pytest.raises(ValueError, match="t is empty"):
        solve(t=[])


def test_t_must_hold_numbers():
    with pytest.raises(TypeError, match="t must hold real numbers"):
        solve(t=np.array(["0", "1"]))


# ---------------------------------------------------------------------------------------------
# Initial state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y0", "dtype"),
    [
        (np.array([1, 2]), "int64"),
        (np.array([1, 2], dtype=np.int32), "int32"),
        (np.array([True, False]), "bool"),
        ([1, 2], "int64"),
    ],
    ids=["int64", "int32", "bool", "int-list"],
)
def test_y0_must_be_floating(y0, dtype):
    with pytest.raises(TypeError, match=f"y0 must have a real floating dtype, got {dtype}"):
        solve(y0=y0)


def test_y0_complex_is_refused():
    with pytest.raises(TypeError, match="real floating dtype, got complex128"):
        solve(y0=np.array([1.0 + 1.0j]))


def test_y0_must_be_finite():
    with pytest.raises(ValueError, match="y0 contains NaN"):
        solve(y0=np.array([1.0, math.nan]))


# ---------------------------------------------------------------------------------------------
# What func returns
# ---------------------------------------------------------------------------------------------


def test_func_wrong_shape():
    with pytest.raises(ValueError, match=r"func returned shape \(3,\) but the state y has shape"):
        solve(func=lambda t, y: np.zeros(3))


def test_func_wrong_shape_batched():
    with pytest.raises(ValueError, match="func returned shape"):
        solve(func=lambda t, y: -y[0], y0=np.ones((2, 3)), batch_axis=0)


def test_func_wrong_dtype():
    with pytest.raises(TypeError, match="func returned dtype float32 but the state y has dtype"):
        solve(func=lambda t, y: (-y).astype(np.float32))


def test_func_wrong_dtype_float64_for_float32_state():
    with pytest.raises(TypeError, match="func returned dtype float64"):
        solve(func=lambda t, y: (-y).astype(np.float64), y0=Y0.astype(np.float32))


def test_func_returns_a_non_array():
    with pytest.raises(TypeError, match="func must return a numpy array"):
        solve(func=lambda t, y: [0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Method, tolerances, options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rk45", "RK4", "", 4])
def test_unknown_method_lists_valid_ones(method):
    with pytest.raises(ValueError, match="unknown method") as info:
        solve(method=method)
    for name in odecore.METHODS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [0.0, -1e-6, math.nan, math.inf, 0])
def test_scalar_tolerance_must_be_positive_and_finite(name, value):
    # Anchored: the message must name the argument the user gave, not a derived one.
    with pytest.raises(ValueError, match=f"^{name} must be positive and finite"):
        solve(**{name: value})


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize(
    "value",
    [np.array([1e-6, 0.0]), np.array([-1e-6, 1e-6]), np.array([math.nan, 1e-6]), np.array(0.0)],
    ids=["zero", "negative", "nan", "0-d-zero"],
)
def test_array_tolerance_must_be_positive_and_finite(name, value):
    with pytest.raises(ValueError, match=f"^every element of {name} must be positive"):
        solve(**{name: value})


def test_tolerance_must_broadcast():
    with pytest.raises(ValueError, match=r"rtol of shape \(3,\) does not broadcast"):
        solve(rtol=np.full(3, 1e-6))


def test_unknown_option():
    with pytest.raises(ValueError, match="unknown option.*'foo'") as info:
        solve(options={"foo": 1})
    assert "valid options are" in str(info.value)


def test_options_must_be_a_dict():
    with pytest.raises(TypeError, match="options must be a dict"):
        solve(options=[("first_step", 0.1)])


@pytest.mark.parametrize("method", odecore.ADAPTIVE_METHODS)
def test_step_size_is_for_fixed_step_methods(method):
    with pytest.raises(ValueError, match="'step_size' only applies to fixed-step methods"):
        solve(method=method, options={"step_size": 0.1})


@pytest.mark.parametrize("key", ["first_step", "max_step", "min_step", "norm", "controller"])
def test_adaptive_options_are_refused_by_fixed_step_methods(key):
    value = {"norm": "max", "controller": "PI"}.get(key, 0.1)
    with pytest.raises(ValueError, match=f"'{key}' only applies to adaptive methods"):
        solve(method="rk4", options={key: value})


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "10"])
def test_invalid_max_num_steps(value):
    with pytest.raises(ValueError, match="max_num_steps'] must be a positive integer"):
        solve(options={"max_num_steps": value})


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan])
def test_invalid_step_size(value):
    with pytest.raises(ValueError, match="step_size'] must be positive"):
        solve(method="rk4", options={"step_size": value})


def test_non_numeric_option():
    with pytest.raises(TypeError, match="first_step'] must be a number"):
        solve(options={"first_step": "small"})


def test_non_finite_stop_times():
    with pytest.raises(ValueError, match="jump_t'] contains NaN"):
        solve(options={"jump_t": [math.nan]})
    with pytest.raises(ValueError, match="step_t'] contains NaN"):
        solve(options={"step_t": [0.5, math.inf]})


@pytest.mark.parametrize(
    ("batch_axis", "error", "match"),
    [(3, ValueError, "out of range"), (-3, ValueError, "out of range"), (0.0, TypeError, "int")],
)
def test_invalid_batch_axis(batch_axis, error, match):
    with pytest.raises(error, match=match):
        solve(batch_axis=batch_axis)


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'.*'numpy'"):
        solve(backend="tensorflow")


# ---------------------------------------------------------------------------------------------
# Arrays from two libraries
# ---------------------------------------------------------------------------------------------


def test_torch_array_with_the_numpy_backend():
    torch = pytest.importorskip("torch", reason="mixing libraries needs torch installed")
    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend is 'numpy' but .* is a torch array"):
        solve(y0=y0, backend="numpy")


def test_torch_and_jax_arrays_in_one_call():
    torch = pytest.importorskip("torch", reason="mixing two libraries needs torch installed")
    jnp = pytest.importorskip("jax.numpy", reason="mixing two libraries needs jax installed")
    with pytest.raises(TypeError, match="arrays from two libraries.*(torch|jax).*(torch|jax)"):
        solve(y0=torch.ones(2, dtype=torch.float64), t=jnp.asarray([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# Failed solves
# ---------------------------------------------------------------------------------------------


def test_max_num_steps_exceeded():
    with pytest.raises(SolveError, match="max_num_steps reached") as info:
        solve(t=[0.0, 10.0], options={"max_num_steps": 5})
    message = str(info.value)
    assert "t=" in message and "nfev=" in message and "steps=5" in message
    sol = info.value.solution
    assert sol.status == Status.MAX_STEPS_REACHED
    assert not sol.success
    assert sol.stats["nsteps"] == 5
    assert 0.0 < float(sol.t_reached) < 10.0
    assert f"t={float(sol.t_reached):.6g}"[:8] in message
    assert isinstance(info.value, RuntimeError)


def test_max_num_steps_with_a_fixed_grid():
    with pytest.raises(SolveError, match="max_num_steps reached") as info:
        solve(method="rk4", t=[0.0, 1.0], options={"step_size": 0.01, "max_num_steps": 50})
    assert info.value.solution.status == Status.MAX_STEPS_REACHED
    assert float(info.value.solution.t_reached) == pytest.approx(0.5)


def blow_up(t, y):
    return y * y  # y(0) = 1: y = 1 / (1 - t), infinite at t = 1


def test_step_size_underflow():
    with pytest.raises(SolveError, match="underflow in dt") as info:
        solve(func=blow_up, y0=np.array([1.0]), t=[0.0, 2.0])
    sol = info.value.solution
    assert sol.status == Status.DT_UNDERFLOW
    assert abs(float(sol.t_reached) - 1.0) < 1e-3
    assert "t=1.0000" in str(info.value) or "t=0.9999" in str(info.value)
    assert math.isnan(sol.ys[-1, 0])


def test_min_step_underflow():
    with pytest.raises(SolveError, match="underflow in dt") as info:
        solve(func=blow_up, y0=np.array([1.0]), t=[0.0, 2.0], options={"min_step": 1e-4})
    assert info.value.solution.status == Status.DT_UNDERFLOW
    assert 0.9 < float(info.value.solution.t_reached) < 1.0


def nan_after_half(t, y):
    return -y if t <= 0.5 else y * math.nan


@pytest.mark.parametrize("method", odecore.METHODS)
def test_non_finite_state(method):
    options = {"step_size": 0.01} if method in odecore.FIXED_STEP_METHODS else None
    ts = [0.0, 0.25, 1.0]
    with pytest.raises(SolveError, match="non-finite") as info:
        solve(func=nan_after_half, y0=np.array([1.0]), t=ts, method=method, options=options)
    sol = info.value.solution
    assert sol.status == Status.NONFINITE_STATE
    assert float(sol.t_reached) == pytest.approx(0.5, abs=0.011)
    assert "t=0.5" in str(info.value) or "t=0.49" in str(info.value)
    assert sol.ys[1, 0] == pytest.approx(math.exp(-0.25), rel=5e-3)  # euler: 1.3e-3


def test_non_finite_state_batched_dopri8():
    def rhs(t, y):
        return np.where((t > 0.5)[:, None], math.nan, -y)

    sol = odecore.solve(
        rhs, np.ones((2, 1)), [0.0, 0.25, 1.0], batch_axis=0, method="dopri8", throw=False
    )
    np.testing.assert_array_equal(sol.status, [Status.NONFINITE_STATE] * 2)


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_non_finite_first_derivative_nan(batch_axis):
    y0 = np.ones((1, 2)) if batch_axis == 0 else np.ones(2)
    with pytest.raises(SolveError, match="non-finite") as info:
        solve(func=lambda t, y: y * math.nan, y0=y0, batch_axis=batch_axis)
    status = info.value.solution.status
    assert np.all(np.asarray(status) == Status.NONFINITE_STATE)
    assert np.all(np.asarray(info.value.solution.t_reached) == 0.0)


def test_non_finite_first_derivative_inf_batched():
    with pytest.raises(SolveError, match="non-finite"):
        solve(func=lambda t, y: y * math.inf, y0=np.ones((1, 2)), batch_axis=0)


def test_non_finite_first_derivative_inf():
    with pytest.raises(SolveError, match="non-finite") as info:
        solve(func=lambda t, y: y * math.inf)
    assert info.value.solution.status == Status.NONFINITE_STATE


def test_throw_false_reports_in_the_status():
    ts = [0.0, 0.25, 0.75, 1.0]
    sol = solve(func=nan_after_half, y0=np.array([1.0]), t=ts, throw=False)
    assert sol.status == Status.NONFINITE_STATE
    assert not sol.success
    assert "non-finite" in sol.message
    # Outputs reached before the failure are right; those past it are NaN.
    assert sol.ys[1, 0] == pytest.approx(math.exp(-0.25), rel=1e-6)
    assert np.all(np.isnan(sol.ys[2:]))
    assert odecore.solve(blow_up, np.array([1.0]), [0.0, 2.0], throw=False).status == 2


def test_batched_failure_only_marks_the_failing_sample():
    # Sample 0 blows up at t = 1; sample 1 is y' = -y^2 (1 / (1 + t)); sample 2 blows up at
    # t = 2, after the end.
    y0 = np.array([[1.0], [1.0], [0.5]])
    sign = np.array([[1.0], [-1.0], [1.0]])
    ts = np.array([0.0, 0.5, 1.5])

    def rhs(t, y):
        return sign * y * y

    sol = odecore.solve(rhs, y0, ts, batch_axis=0, throw=False)
    np.testing.assert_array_equal(sol.status, [Status.DT_UNDERFLOW, 0, 0])
    assert not sol.success
    np.testing.assert_allclose(sol.ys[:, 1, 0], 1.0 / (1.0 + ts), rtol=1e-6)
    np.testing.assert_allclose(sol.ys[:, 2, 0], 1.0 / (2.0 - ts), rtol=1e-6)
    assert math.isnan(sol.ys[-1, 0, 0])
    assert sol.ys[1, 0, 0] == pytest.approx(2.0, rel=1e-6)

    with pytest.raises(SolveError, match="failed for 1 of 3 samples; sample 0") as info:
        odecore.solve(rhs, y0, ts, batch_axis=0)
    assert "underflow in dt" in str(info.value)


def test_batched_failure_message_names_only_the_failures():
    y0 = np.array([[1.0], [1.0]])
    sign = np.array([[1.0], [-1.0]])
    with pytest.raises(SolveError) as info:
        odecore.solve(lambda t, y: sign * y * y, y0, [0.0, 2.0], batch_axis=0)
    assert "success" not in str(info.value)


def test_batched_non_finite_sample():
    def rhs(t, y):
        out = -y.copy()
        out[1] = np.where(t[1] > 0.5, math.nan, out[1])
        return out

    sol = odecore.solve(rhs, np.ones((3, 2)), [0.0, 0.25, 1.0], batch_axis=0, throw=False)
    np.testing.assert_array_equal(sol.status, [0, Status.NONFINITE_STATE, 0])
    np.testing.assert_allclose(sol.ys[-1, [0, 2]], math.exp(-1.0), rtol=1e-6)
    assert np.all(np.isnan(sol.ys[-1, 1]))
    np.testing.assert_allclose(sol.ys[1, 1], math.exp(-0.25), rtol=1e-6)


def test_batched_max_num_steps_stops_only_the_expensive_sample():
    rates = np.array([[1.0], [500.0]])  # the second needs ~10x more steps

    def rhs(t, y):
        return -rates * y + np.cos(t)[:, None]

    y0 = np.ones((2, 1))
    full = odecore.solve(rhs, y0, [0.0, 5.0], batch_axis=0)
    limit = int(full.stats["nsteps"][0]) + 5
    assert full.stats["nsteps"][1] > limit
    sol = odecore.solve(
        rhs, y0, [0.0, 5.0], batch_axis=0, throw=False, options={"max_num_steps": limit}
    )
    np.testing.assert_array_equal(sol.status, [Status.SUCCESS, Status.MAX_STEPS_REACHED])
    np.testing.assert_array_equal(sol.ys[-1, 0], full.ys[-1, 0])
    assert math.isnan(sol.ys[-1, 1, 0])
    assert int(sol.stats["nsteps"][1]) == limit
