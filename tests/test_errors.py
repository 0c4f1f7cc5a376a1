"""Bad inputs and failed solves: every one gets an error (or a status) that names the problem.

Every test runs on every backend (the ``backend`` fixture, tests/conftest.py): JAX's eager
calls raise as the others do (only under ``jit`` must a failure live in the status).
"""

from __future__ import annotations

import math
import re

import array_api_compat
import numpy as np
import pytest

import odecore
from odecore import SolveError, Status

namespace = array_api_compat.array_namespace


def decay(t, y):
    return -y


Y0 = np.array([1.0, 2.0])
TS = np.array([0.0, 1.0])


def solve(bk, func=decay, y0=Y0, t=TS, **kwargs):
    """``odecore.solve`` with NumPy arrays among the inputs made on the test backend ``bk``."""
    y0, t = (bk.asarray(x, dtype=None) if isinstance(x, np.ndarray) else x for x in (y0, t))
    return odecore.solve(func, y0, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# Output times
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [np.zeros((2, 2)), 1.0, np.array(3.0)], ids=["2-d", "float", "0-d"])
def test_t_must_be_1d(backend, t):
    with pytest.raises(ValueError, match="t must be a 1-D array"):
        solve(backend, t=t)


@pytest.mark.parametrize(
    "t",
    [[0.0, 1.0, 1.0, 2.0], [0.0, 2.0, 1.0], [2.0, 1.0, 1.5], [1.0, 1.0]],
    ids=["repeated", "non-monotonic", "non-monotonic-decreasing", "all-repeated"],
)
def test_t_must_be_strictly_monotonic(backend, t):
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        solve(backend, t=np.array(t))


@pytest.mark.parametrize(
    "t",
    [
        [0.0, math.nan, 2.0],
        [0.0, math.inf, 2.0],
        [0.0, -math.inf, 2.0],
        # Infinite ends keep the times increasing: the check must still see them.
        [0.0, 1.0, math.inf],
        [-math.inf, 0.0, 1.0],
        [2.0, 1.0, -math.inf],
        [0.0, math.nan],
    ],
    ids=["nan", "inf", "-inf", "inf-end", "-inf-start", "-inf-end-decreasing", "nan-end"],
)
def test_t_must_be_finite(backend, t):
    with pytest.raises(ValueError, match="t contains NaN"):
        solve(backend, t=np.array(t))


def test_python_ints_beyond_int64_in_t_are_read_as_floats(backend):
    # No integer dtype holds 2**70 (NumPy made an object array, which was refused; torch and
    # JAX refused the int): it is read as the float 2**70, as scipy's solve_ivp reads it.
    # y' = -k y with k = 1e-21 has y(T) = y0 exp(-k T), k T = 1.18..., the span a few
    # dozen steps; rtol 1e-10 leaves a global error far below the 1e-8 checked.
    rate = 1e-21
    sol = solve(backend, func=lambda t, y: -rate * y, t=[0, 2**70], rtol=1e-10, atol=1e-12)
    assert backend.to_numpy(sol.ts).tolist() == [0.0, float(2**70)]
    expected = Y0 * math.exp(-rate * float(2**70))
    np.testing.assert_allclose(backend.to_numpy(sol.ys[-1]), expected, rtol=1e-8)


def test_a_python_int_too_large_for_a_float_in_t_is_refused(backend):
    with pytest.raises(ValueError, match="t holds a Python int too large for a float.*floats"):
        solve(backend, t=[0, 2**2000])


@pytest.mark.parametrize(
    "t",
    [[-1.7e308, 1.7e308], [-1.7e308, 0.0, 1.7e308], [1.7e308, -1.7e308]],
    ids=["two", "halves-finite", "decreasing"],
)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_t_whose_span_overflows_is_refused(backend, t):
    # Finite times 3.4e308 apart, beyond float64's largest 1.8e308: the distance to the end
    # is infinite, and the solve failed at its first step with an underflow in dt.
    with pytest.raises(ValueError, match=r"^t spans from .*farther than the largest number"):
        solve(backend, t=np.array(t))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_t_whose_differences_overflow_is_not_called_non_monotonic():
    # Finite, increasing times whose difference is not a finite float64 fail the one
    # reduction of the usual case; the checks after it name their span, not their order.
    bk = odecore.get_backend("numpy")
    t = np.array([-1e308, 1e308])
    assert np.all(np.isinf(np.diff(t)))
    with pytest.raises(ValueError, match=r"^t spans from -1e\+308 to 1e\+308"):
        odecore._validate.times(bk, t)


def test_t_must_not_be_empty(backend):
    with pytest.raises(ValueError, match="t is empty"):
        solve(backend, t=np.zeros(0))


@pytest.mark.parametrize("dtype", ["complex128", "bool"])
def test_t_must_hold_real_numbers(backend, dtype):
    t = backend.asarray([0, 1], dtype=dtype)
    with pytest.raises(TypeError, match=f"t must hold real numbers, got dtype {t.dtype}"):
        solve(backend, t=t)


@pytest.mark.backend("numpy")
def test_t_of_strings_must_hold_numbers():
    # Only NumPy has arrays of strings.
    with pytest.raises(TypeError, match="t must hold real numbers"):
        odecore.solve(decay, Y0, np.array(["0", "1"]))


# ---------------------------------------------------------------------------------------------
# Initial state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([1, 2], "int64"), ([1, 2], "int32"), ([True, False], "bool"), ([1, 2], None)],
    ids=["int64", "int32", "bool", "int-list"],
)
def test_y0_must_be_floating(backend, values, dtype):
    if dtype is None:  # a plain list, converted by the backend named in the call
        y0, got = values, backend.dtype_text("int64")
        kwargs = {"backend": backend.name}
    else:
        y0 = backend.asarray(values, dtype=dtype)
        got, kwargs = str(y0.dtype), {}
    match = f"y0 must have a real floating dtype, got {re.escape(got)}"
    with pytest.raises(TypeError, match=match) as info:
        solve(backend, y0=y0, **kwargs)
    # The conversion the message suggests works on the array the user holds.
    suggested = re.search(r"\((y0\.[a-z]+\([a-z0-9]*\))\)", str(info.value)).group(1)
    converted = eval(suggested, {"y0": backend.asarray(values), "float64": np.float64})
    assert "float64" in str(converted.dtype)


@pytest.mark.parametrize("y0", [{}, {"x": {}}], ids=["empty", "nested-empty"])
def test_a_dict_without_arrays_as_y0_is_refused_as_a_dict(backend, y0):
    # NumPy made it a 0-d object array, refused as "got object", naming no dict.
    with pytest.raises(TypeError, match=r"^y0 must be an array of real floating numbers, got \{"):
        odecore.solve(decay, y0, backend.asarray([0.0, 1.0]))


def test_y0_complex_is_refused(backend):
    y0 = backend.asarray([1.0 + 1.0j], dtype="complex128")
    with pytest.raises(TypeError, match=f"real floating dtype, got {re.escape(str(y0.dtype))}"):
        solve(backend, y0=y0)
    # The message says what to do instead (torchdiffeq solves complex states).
    with pytest.raises(TypeError, match="as a real state of twice the size"):
        solve(backend, y0=y0)


@pytest.mark.backend("torch")
def test_y0_on_the_meta_device_is_refused():
    # The first check that read a value failed with torch's words about .item().
    import torch

    y0 = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match=r"meta tensor.*hold no values.*real device"):
        odecore.odeint(decay, y0, torch.tensor([0.0, 1.0]))


def _on_meta(value):
    import torch

    return torch.tensor(value, device="meta")


@pytest.mark.backend("torch")
@pytest.mark.parametrize(
    ("name", "y0", "meta_t", "kwargs"),
    [
        # t on the meta device was refused as unmovable to y0's device, or, with y0 a list
        # that takes t's backend, failed with torch's words about .item(); so did the rest.
        ("t", "tensor", True, lambda: {}),
        ("t", "list", True, lambda: {}),
        ("options['step_t']", "tensor", False, lambda: {"options": {"step_t": _on_meta([0.5])}}),
        ("options['jump_t']", "tensor", False, lambda: {"options": {"jump_t": _on_meta([0.5])}}),
        ("rtol", "tensor", False, lambda: {"rtol": _on_meta([1e-6])}),
    ],
)
def test_an_input_on_the_meta_device_is_refused_by_name(name, y0, meta_t, kwargs):
    import torch

    y0 = torch.ones(2) if y0 == "tensor" else [1.0, 2.0]
    t = _on_meta([0.0, 1.0]) if meta_t else torch.tensor([0.0, 1.0])
    match = rf"^{re.escape(name)} is a meta tensor.*hold no values.*Create {re.escape(name)} on a"
    for method in ("dopri5", "rk4"):
        with pytest.raises(ValueError, match=match):
            odecore.odeint(decay, y0, t, method=method, **kwargs())


@pytest.mark.backend("torch")
@pytest.mark.parametrize(
    ("option", "method"),
    [
        ("first_step", "dopri5"),
        ("max_step", "dopri5"),
        ("min_step", "dopri5"),
        ("safety", "dopri5"),
        ("step_size", "rk4"),
        ("event_tol", "dopri5"),
    ],
)
def test_a_scalar_option_on_the_meta_device_is_refused_by_name(option, method):
    # Reading the option as a float failed with torch's words about .item().
    import torch

    name = f"options[{option!r}]"
    match = rf"^{re.escape(name)} is a meta tensor.*hold no values.*Create {re.escape(name)} on a"
    with pytest.raises(ValueError, match=match):
        odecore.odeint_event(
            decay,
            torch.ones(1),
            torch.tensor(0.0),
            event_fn=lambda t, y: y[0] - 0.5,
            method=method,
            options={option: torch.tensor(0.1, device="meta")},
        )


def test_y0_must_be_finite(backend):
    with pytest.raises(ValueError, match="y0 contains NaN"):
        solve(backend, y0=np.array([1.0, math.nan]))


# ---------------------------------------------------------------------------------------------
# What func returns
# ---------------------------------------------------------------------------------------------


def three_zeros(t, y):
    return namespace(y).zeros(3, dtype=y.dtype)


def first_row(t, y):
    return -y[0]


def decay_in_float32(t, y):
    xp = namespace(y)
    return xp.astype(-y, xp.float32)


def decay_in_float64(t, y):
    xp = namespace(y)
    return xp.astype(-y, xp.float64)


def returns_a_list(t, y):
    return [0.0, 0.0]


def test_func_wrong_shape(backend):
    with pytest.raises(ValueError, match=r"func returned shape \(3,\) but the state y has shape"):
        solve(backend, func=three_zeros)


def test_func_wrong_shape_batched(backend):
    with pytest.raises(ValueError, match="func returned shape"):
        solve(backend, func=first_row, y0=np.ones((2, 3)), batch_axis=0)


def test_func_wrong_dtype(backend):
    match = f"func returned dtype {re.escape(backend.dtype_text('float32'))} but the state y has"
    with pytest.raises(TypeError, match=match):
        solve(backend, func=decay_in_float32)


def test_func_wrong_dtype_float64_for_float32_state(backend):
    match = f"func returned dtype {re.escape(backend.dtype_text('float64'))}"
    with pytest.raises(TypeError, match=match):
        solve(backend, func=decay_in_float64, y0=Y0.astype(np.float32))


def test_float64_params_with_a_float32_state_are_refused_saying_what_to_do(backend):
    # The state is not promoted to func's float64 (nor func's result cast): every backend
    # refuses, naming where the float64 comes from and the three ways out.
    def scaled(t, y, p):
        return -p * y

    y0 = backend.asarray(Y0, dtype="float32")
    t = backend.asarray(TS, dtype="float32")
    wide = backend.dtype_text("float64")
    with pytest.raises(TypeError, match=rf"An array of params.*in {re.escape(wide)} promoted"):
        odecore.solve(scaled, y0, t, params=backend.asarray([0.5, 0.5], dtype="float64"))
    # The first remedy: params in y0's dtype. y(1) = y0 exp(-1/2), to float32's rounding
    # and rtol 1e-7.
    sol = odecore.solve(scaled, y0, t, params=backend.asarray([0.5, 0.5], dtype="float32"))
    np.testing.assert_allclose(backend.to_numpy(sol.ys[-1]), Y0 * math.exp(-0.5), rtol=1e-5)


def test_func_returns_a_non_array(backend):
    with pytest.raises(TypeError, match=f"func must return a {backend.name} array"):
        solve(backend, func=returns_a_list)


def decay_in_place(t, y, dy, params):
    dy[:] = -params[0] * y


@pytest.mark.parametrize(
    "func, params, match",
    [
        (decay, np.array([1.0]), r"calls func\(t, y, params\) .* signature \(t, y\) cannot"),
        (lambda t, y, k: -k * y, None, r"calls func\(t, y\) .* \(t, y, k\) cannot"),
        (lambda y: -y, None, r"calls func\(t, y\) .* \(y\) cannot"),
        (decay_in_place, np.array([1.0]), r"in-place form .* only backend='numba'"),
    ],
)
def test_func_whose_signature_does_not_fit_the_call(backend, func, params, match):
    # Python's message would name neither odecore's call nor the fix; Numba's ("not enough
    # arguments: expected 4, got 3") not even the function.
    params = None if params is None else backend.asarray(params)
    with pytest.raises(TypeError, match=match):
        solve(backend, func=func, params=params)


def test_type_error_inside_func_is_left_as_it_is(backend):
    def broken(t, y):
        return len(3)

    with pytest.raises(TypeError, match="has no len"):
        solve(backend, func=broken)


def test_event_and_fixed_point_map_whose_signature_does_not_fit(backend):
    k = backend.asarray([1.0])
    with pytest.raises(TypeError, match=r"calls event\(t, y, params\) .* \(t, y\) cannot"):
        solve(backend, func=lambda t, y, k: -k * y, params=k, event=lambda t, y: y[0] - 0.5)
    with pytest.raises(TypeError, match=r"calls f\(z\) .* \(z, w\) cannot"):
        odecore.fixed_point(lambda z, w: 0.5 * z, backend.asarray([1.0]))
    with pytest.raises(TypeError, match=r"calls f\(z, params\) .* \(z\) cannot"):
        odecore.fixed_point(lambda z: 0.5 * z, backend.asarray([1.0]), k)


def test_a_vjp_whose_signature_does_not_fit_the_call():
    # NumPy calls the dynamics' own vjp(t, y, params, cotangent).
    class Decay:
        def __call__(self, t, y, k):
            return -k[0] * y

        def vjp(self, t, y, cotangent):
            return -cotangent, None

    _, pullback = odecore.vjp_odeint(Decay(), Y0, TS, np.array([1.0]))
    with pytest.raises(TypeError, match=r"calls Decay\.vjp\(t, y, params, cotangent\), .*"
                       r"\(t, y, cotangent\) cannot"):  # fmt: skip
        pullback(np.ones((2, 2)))


# ---------------------------------------------------------------------------------------------
# Method, tolerances, options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rk45", "RK4", "", 4])
def test_unknown_method_lists_valid_ones(backend, method):
    with pytest.raises(ValueError, match="unknown method") as info:
        solve(backend, method=method)
    for name in odecore.METHODS:
        assert name in str(info.value)
    assert "'scipy_solver'" in str(info.value)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        ("vjp_odeint", r"^method='scipy_solver' is not available here"),
        ("adjoint_method", r"^adjoint_method='scipy_solver' is not available here"),
    ],
)
def test_scipy_solver_where_scipy_does_not_run_is_refused_as_such(call, match):
    """Where scipy runs no solve, 'scipy_solver' was refused as an unknown method by a
    message that listed it among the valid ones."""
    t = np.array([0.0, 1.0])
    with pytest.raises(ValueError, match=match) as info:
        if call == "vjp_odeint":

            class Decay:
                def __call__(self, t, y, k):
                    return -k * y

                def vjp(self, t, y, k, c):
                    return -k * c, np.asarray(-np.sum(c * y))

            odecore.vjp_odeint(Decay(), np.ones(1), t, np.asarray(1.0), method="scipy_solver")
        else:
            torch = pytest.importorskip("torch")
            odecore.odeint(
                lambda t, y: -y,
                torch.ones(1, requires_grad=True),
                torch.tensor(t),
                adjoint="backsolve",
                adjoint_method="scipy_solver",
            )
    for name in odecore.METHODS:
        assert name in str(info.value)


def test_unknown_adjoint_method_is_named_and_lists_odecores_methods():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"^unknown adjoint_method 'LSODA'") as info:
        odecore.odeint(
            lambda t, y: -y,
            torch.ones(1, requires_grad=True),
            torch.tensor([0.0, 1.0]),
            adjoint="backsolve",
            adjoint_method="LSODA",
        )
    for name in odecore.METHODS:
        assert name in str(info.value)
    # The backward solve is odecore's: scipy's solvers are no choice there.
    assert "scipy_solver" not in str(info.value)


@pytest.mark.parametrize(
    ("method", "pointer"),
    [
        ("RK45", r"scipy's RK45 is 'dopri5'"),
        ("DOP853", r"scipy's DOP853 is 'dopri8'"),
        ("RK23", r"scipy's RK23 is 'bosh3'"),
        ("LSODA", r"method='scipy_solver', options=\{'solver': 'LSODA'\}"),
        ("implicit_adams", r"torchdiffeq's implicit_adams has no counterpart .* 'LSODA'"),
    ],
)
def test_another_librarys_method_name_points_to_odecores(method, pointer):
    # scipy's and torchdiffeq's names got the list of odecore's alone, without
    # 'scipy_solver', which runs scipy's LSODA, BDF and Radau.
    with pytest.raises(ValueError, match=pointer):
        odecore.odeint(lambda t, y: -y, np.ones(1), np.linspace(0.0, 1.0, 3), method=method)


# rtol may be 0 (the error is then measured against atol alone, as torchdiffeq, diffrax
# and scipy allow); atol may not: a state element at zero would have no error scale.
@pytest.mark.parametrize(
    ("name", "value"),
    [("rtol", v) for v in (-1e-6, math.nan, math.inf, -1)]
    + [("atol", v) for v in (0.0, -1e-6, math.nan, math.inf, 0)],
)
def test_scalar_tolerance_must_be_valid(backend, name, value):
    # Anchored: the message must name the argument the user gave, not a derived one.
    rule = "non-negative and finite" if name == "rtol" else "positive and finite"
    with pytest.raises(ValueError, match=f"^{name} must be {rule}"):
        solve(backend, **{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("rtol", np.array([-1e-6, 1e-6])),
        ("rtol", np.array([math.nan, 1e-6])),
        ("atol", np.array([1e-6, 0.0])),
        ("atol", np.array([-1e-6, 1e-6])),
        ("atol", np.array([math.nan, 1e-6])),
        ("atol", np.array(0.0)),
    ],
    ids=["rtol-negative", "rtol-nan", "atol-zero", "atol-negative", "atol-nan", "atol-0-d-zero"],
)
def test_array_tolerance_must_be_valid(backend, name, value):
    rule = "non-negative and finite" if name == "rtol" else "positive and finite"
    with pytest.raises(ValueError, match=f"^every element of {name} must be {rule}"):
        solve(backend, **{name: backend.asarray(value)})


def test_tolerance_must_broadcast(backend):
    with pytest.raises(ValueError, match=r"rtol of shape \(3,\) does not broadcast"):
        solve(backend, rtol=backend.asarray(np.full(3, 1e-6)))


@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_empty_tolerance_is_refused_by_name(backend, name):
    # The smallest element, which the precision warning and the backsolve's tolerances
    # take, of an empty array raised NumPy's (and JAX's) raw "zero-size array to reduction
    # operation" error.
    with pytest.raises(ValueError, match=rf"^{name} is empty \(shape \(0,\)\)"):
        solve(backend, **{name: backend.asarray(np.zeros(0))})


def test_empty_tolerance_is_refused_on_numba():
    pytest.importorskip("numba")
    with pytest.raises(ValueError, match=r"^rtol is empty"):
        odecore.solve(decay, Y0, TS, rtol=np.zeros(0), backend="numba")


def test_unknown_option(backend):
    with pytest.raises(ValueError, match="unknown option.*'foo'") as info:
        solve(backend, options={"foo": 1})
    assert "valid options are" in str(info.value)


def test_options_must_be_a_dict(backend):
    with pytest.raises(TypeError, match="options must be a dict"):
        solve(backend, options=[("first_step", 0.1)])


@pytest.mark.parametrize("method", odecore.ADAPTIVE_METHODS)
def test_step_size_options_are_refused_at_a_fixed_step(backend, method):
    # step_size runs an adaptive method at a fixed step (tests/test_solve.py), where the
    # controller's options have nothing to act on.
    match = r"'first_step' only applies to adaptive steps, and options\['step_size'\]"
    with pytest.raises(ValueError, match=match):
        solve(backend, method=method, options={"step_size": 0.1, "first_step": 0.01})


@pytest.mark.parametrize("key", ["first_step", "max_step", "min_step", "norm", "controller"])
def test_adaptive_options_are_refused_by_fixed_step_methods(backend, key):
    value = {"norm": "max", "controller": "PI"}.get(key, 0.1)
    with pytest.raises(ValueError, match=f"'{key}' only applies to adaptive methods"):
        solve(backend, method="rk4", options={key: value})


@pytest.mark.parametrize(("key", "value"), [("event_tol", 1e-6), ("max_events", 3)])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_event_options_are_refused_without_events(backend, key, value, method):
    # A solve without events has no root to locate and no crossing to keep: the option was
    # ignored, and an event the caller meant to pass went unnoticed.
    options = {key: value, **({"step_size": 0.1} if method == "rk4" else {})}
    match = rf"options\['{key}'\] configures the events of a solve, and this solve has none"
    with pytest.raises(ValueError, match=match):
        solve(backend, method=method, options=options)


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "10"])
def test_invalid_max_num_steps(backend, value):
    with pytest.raises(ValueError, match="max_num_steps'] must be a positive integer"):
        solve(backend, options={"max_num_steps": value})


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan])
def test_invalid_step_size(backend, value):
    with pytest.raises(ValueError, match="step_size'] must be positive"):
        solve(backend, method="rk4", options={"step_size": value})


@pytest.mark.parametrize(
    ("method", "key"),
    [("dopri5", "first_step"), ("dopri5", "max_step"), ("dopri5", "safety"), ("rk4", "step_size")],
)
def test_non_numeric_option(backend, method, key):
    # A string that reads as a number ("0.1") was taken as one, where the tolerances and
    # max_num_steps refuse strings.
    for value in ("small", "0.1"):
        with pytest.raises(TypeError, match=rf"{key}'\] must be a number, got '{value}'"):
            solve(backend, method=method, options={key: value})


@pytest.mark.parametrize("key", ["jump_t", "step_t"])
def test_stop_times_of_several_dimensions_are_refused(backend, key):
    # One time per trajectory of a batch, shape (N, 1), was flattened into N times at which
    # every trajectory stopped: the solve ran, slower and not as meant.
    match = rf"options\['{key}'\] must be a 1-D array of times, shared by every trajectory"
    with pytest.raises(ValueError, match=match + r" of a batch; got shape \(2, 1\)"):
        solve(backend, options={key: np.array([[0.25], [0.5]])})


def test_non_finite_stop_times(backend):
    with pytest.raises(ValueError, match="jump_t'] contains NaN"):
        solve(backend, options={"jump_t": [math.nan]})
    with pytest.raises(ValueError, match="step_t'] contains NaN"):
        solve(backend, options={"step_t": [0.5, math.inf]})


@pytest.mark.parametrize(
    ("batch_axis", "error", "match"),
    [(3, ValueError, "out of range"), (-3, ValueError, "out of range"), (0.0, TypeError, "int")],
)
def test_invalid_batch_axis(backend, batch_axis, error, match):
    with pytest.raises(error, match=match):
        solve(backend, batch_axis=batch_axis)


def test_unknown_backend_argument(backend):
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'.*'numpy'"):
        solve(backend, backend="tensorflow")


# ---------------------------------------------------------------------------------------------
# Arrays from two libraries
# ---------------------------------------------------------------------------------------------


@pytest.mark.backend("torch")
def test_torch_array_with_the_numpy_backend():
    import torch

    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend is 'numpy' but y0 is a torch array"):
        odecore.solve(decay, y0, TS, backend="numpy")
    # A parameter inside a container is named by its path.
    with pytest.raises(TypeError, match=re.escape("but params[1] is a torch array")):
        odecore.solve(decay, Y0, TS, params=(1.0, y0), backend="numpy")


@pytest.mark.backend("torch")
@pytest.mark.backend("jax")
def test_torch_and_jax_arrays_in_one_call():
    import jax.numpy as jnp
    import torch

    # Named as the caller names them; the message said "[0]['y0'] is a torch array".
    two = "arrays from two libraries in one call: y0 is a torch array but t is a jax array"
    with pytest.raises(TypeError, match=re.escape(two)):
        odecore.solve(decay, torch.ones(2, dtype=torch.float64), jnp.asarray([0.0, 1.0]))
    two = "y0 is a torch array but params[1] is a jax array"
    with pytest.raises(TypeError, match=re.escape(two)):
        odecore.solve(
            decay, torch.ones(2, dtype=torch.float64), [0.0, 1.0], params=(1.0, jnp.ones(2))
        )


# ---------------------------------------------------------------------------------------------
# Failed solves
# ---------------------------------------------------------------------------------------------


def test_max_num_steps_exceeded(backend):
    with pytest.raises(SolveError, match="max_num_steps reached") as info:
        solve(backend, t=np.array([0.0, 10.0]), options={"max_num_steps": 5})
    message = str(info.value)
    assert "t=" in message and "nfev=" in message and "steps=5" in message
    assert "loosen rtol/atol" in message  # the error control chose the steps
    sol = info.value.solution
    assert backend.status(sol) == Status.MAX_STEPS_REACHED
    assert not sol.success
    assert backend.stats(sol)["nsteps"] == 5
    assert 0.0 < float(sol.t_reached) < 10.0
    assert f"t={float(sol.t_reached):.6g}"[:8] in message
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_max_num_steps_with_a_fixed_grid(backend, method):
    with pytest.raises(SolveError, match="max_num_steps reached") as info:
        solve(backend, method=method, options={"step_size": 0.01, "max_num_steps": 50})
    assert backend.status(info.value.solution) == Status.MAX_STEPS_REACHED
    assert float(info.value.solution.t_reached) == pytest.approx(0.5)
    # Tolerances do not size fixed steps (an adaptive method given step_size takes them too):
    # the remedy is the step's size, not rtol/atol.
    message = str(info.value)
    assert "take larger steps" in message and "step_size" in message
    assert "rtol" not in message


def test_a_max_step_too_small_for_max_num_steps_is_refused(backend):
    # Steps of at most 0.001 need 1000 to cover [0, 1]; 50 cannot, whatever the solve does,
    # and it stopped only when they ran out. The least max_step that fits is 1 / 50.
    with pytest.raises(ValueError, match=r"max_step'\] = 0\.001 needs at least 1000 steps") as info:
        solve(backend, options={"max_step": 1e-3, "max_num_steps": 50})
    message = str(info.value)
    assert "options['max_num_steps'] = 50" in message and "at least 0.02 " in message


@pytest.mark.backend("numba")
def test_numba_refuses_a_max_step_too_small_for_max_num_steps():
    # The compiled solve's problem is checked as the others' are, before it runs.
    with pytest.raises(ValueError, match=r"max_step'\] = 1e-300 needs at least 1e\+300 steps"):
        odecore.solve(decay, Y0, TS, backend="numba", options={"max_step": 1e-300})


def test_a_max_step_that_fits_max_num_steps_exactly_is_solved(backend):
    # 50 steps of 1 / 50 cover [0, 1]: exactly the budget, not over it. The first step is
    # max_step, and the error control accepts every step of that size on y' = -y at rtol
    # 1e-7, so the solve takes all 50. Dopri5's local error at h = 0.02 is about h^6 / 720.
    sol = solve(
        backend,
        t=np.array([0.0, 1.0]),
        options={"max_step": 1 / 50, "first_step": 1 / 50, "max_num_steps": 50},
    )
    assert backend.stats(sol)["nsteps"] == 50
    np.testing.assert_allclose(backend.to_numpy(sol.ys[-1]), Y0 * math.exp(-1.0), rtol=1e-8)


def test_a_small_max_step_with_a_terminal_event_is_not_refused(backend):
    # The event at t = 0.05 ends the solve in 50 steps of 0.001, long before t[-1] = 1; the
    # solve cannot know that before it runs.
    hit = odecore.Event(lambda t, y: t - 0.05, terminal=True)
    sol = solve(backend, options={"max_step": 1e-3, "max_num_steps": 60}, event=hit)
    assert backend.status(sol) == Status.EVENT
    assert float(backend.to_numpy(sol.events.t)) == pytest.approx(0.05, abs=1e-12)


@pytest.mark.backend("jax")
def test_a_small_max_step_under_jit_ends_in_the_status():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        jnp = jax.numpy
        options = {"max_step": 1e-3, "max_num_steps": 50}
        run = jax.jit(lambda y0, t: odecore.solve(decay, y0, t, options=options, throw=False))
        sol = run(jnp.asarray(Y0), jnp.asarray(TS))
        assert int(sol.status) == Status.MAX_STEPS_REACHED


def blow_up(t, y):
    return y * y  # y(0) = 1: y = 1 / (1 - t), infinite at t = 1


def test_step_size_underflow(backend):
    with pytest.raises(SolveError, match="underflow in dt") as info:
        solve(backend, func=blow_up, y0=np.array([1.0]), t=np.array([0.0, 2.0]))
    sol = info.value.solution
    assert backend.status(sol) == Status.DT_UNDERFLOW
    assert abs(float(sol.t_reached) - 1.0) < 1e-3
    assert "t=1.0000" in str(info.value) or "t=0.9999" in str(info.value)
    assert math.isnan(backend.to_numpy(sol.ys)[-1, 0])


def test_min_step_underflow(backend):
    with pytest.raises(SolveError, match="underflow in dt") as info:
        solve(
            backend,
            func=blow_up,
            y0=np.array([1.0]),
            t=np.array([0.0, 2.0]),
            options={"min_step": 1e-4},
        )
    assert backend.status(info.value.solution) == Status.DT_UNDERFLOW
    assert 0.9 < float(info.value.solution.t_reached) < 1.0


@pytest.mark.parametrize("options", [{"min_step": 10.0}, {"min_step": 0.6, "step_t": [0.5]}])
def test_min_step_above_the_distance_to_a_stop_underflows_at_once(backend, options):
    # The first step is cut to land on the stop (t = 1, or step_t's 0.5), no longer than
    # min_step. dopri5's error estimate on a step h of y' = -y is about h^5 / 1300 of y (the
    # difference of its 5th- and 4th-order solutions): 2e-5 for h = 0.5, 8e-4 for h = 1, far
    # over the default tolerances' 1e-7: the step is rejected, and its retry, raised to
    # min_step and cut to the same stop, would be the same step. It was retried until
    # max_num_steps (100000 rejections).
    sol = solve(backend, options=options, throw=False)
    assert backend.status(sol) == Status.DT_UNDERFLOW
    assert int(backend.to_numpy(sol.stats["nsteps"])) == 1
    assert float(sol.t_reached) == 0.0


def test_min_step_above_the_span_takes_the_one_step_the_error_accepts(backend):
    # At rtol = atol = 1e-2 one dopri5 step of h = 1 is accepted (its error estimate is
    # 8e-4 of y): the solve ends in that step, within that of exp(-1).
    sol = solve(backend, options={"min_step": 10.0}, rtol=1e-2, atol=1e-2)
    assert backend.status(sol) == Status.SUCCESS
    assert int(backend.to_numpy(sol.stats["nsteps"])) == 1
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[-1], Y0 * math.exp(-1.0), rtol=1e-2)


def nan_after_half(t, y):
    return namespace(y).where(t <= 0.5, -y, y * math.nan)


def nan_after_half_batched(t, y):
    return namespace(y).where((t > 0.5)[:, None], math.nan, -y)


@pytest.mark.parametrize("method", odecore.METHODS)
def test_non_finite_state(backend, method):
    options = {"step_size": 0.01} if method in odecore.FIXED_STEP_METHODS else None
    ts = np.array([0.0, 0.25, 1.0])
    with pytest.raises(SolveError, match="non-finite") as info:
        solve(
            backend,
            func=nan_after_half,
            y0=np.array([1.0]),
            t=ts,
            method=method,
            options=options,
        )
    sol = info.value.solution
    assert backend.status(sol) == Status.NONFINITE_STATE
    assert float(sol.t_reached) == pytest.approx(0.5, abs=0.011)
    assert "t=0.5" in str(info.value) or "t=0.49" in str(info.value)
    # euler: 1.3e-3
    assert backend.to_numpy(sol.ys)[1, 0] == pytest.approx(math.exp(-0.25), rel=5e-3)


def test_non_finite_state_batched_dopri8(backend):
    sol = solve(
        backend,
        func=nan_after_half_batched,
        y0=np.ones((2, 1)),
        t=np.array([0.0, 0.25, 1.0]),
        batch_axis=0,
        method="dopri8",
        throw=False,
    )
    np.testing.assert_array_equal(backend.status(sol), [Status.NONFINITE_STATE] * 2)


def nan_derivative(t, y):
    return y * math.nan


def inf_derivative(t, y):
    return y * math.inf


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_non_finite_first_derivative_nan(backend, batch_axis):
    y0 = np.ones((1, 2)) if batch_axis == 0 else np.ones(2)
    with pytest.raises(SolveError, match="non-finite") as info:
        solve(backend, func=nan_derivative, y0=y0, batch_axis=batch_axis)
    status = backend.status(info.value.solution)
    assert np.all(np.asarray(status) == Status.NONFINITE_STATE)
    assert np.all(backend.to_numpy(info.value.solution.t_reached) == 0.0)


def test_non_finite_first_derivative_inf_batched(backend):
    with pytest.raises(SolveError, match="non-finite"):
        solve(backend, func=inf_derivative, y0=np.ones((1, 2)), batch_axis=0)


def test_non_finite_first_derivative_inf(backend):
    with pytest.raises(SolveError, match="non-finite") as info:
        solve(backend, func=inf_derivative)
    assert backend.status(info.value.solution) == Status.NONFINITE_STATE


def test_throw_false_reports_in_the_status(backend):
    ts = np.array([0.0, 0.25, 0.75, 1.0])
    sol = solve(backend, func=nan_after_half, y0=np.array([1.0]), t=ts, throw=False)
    assert backend.status(sol) == Status.NONFINITE_STATE
    assert not sol.success
    assert "non-finite" in sol.message
    # Outputs reached before the failure are right; those past it are NaN.
    ys = backend.to_numpy(sol.ys)
    assert ys[1, 0] == pytest.approx(math.exp(-0.25), rel=1e-6)
    assert np.all(np.isnan(ys[2:]))
    blown = solve(backend, blow_up, np.array([1.0]), np.array([0.0, 2.0]), throw=False)
    assert backend.status(blown) == 2


SIGN = np.array([[1.0], [-1.0], [1.0]])


def signed_square(t, y):
    # Samples 0 and 2 blow up at t = 1 / y0; sample 1 decays as 1 / (1 + t).
    return constant(SIGN[: y.shape[0]], y) * y * y


def constant(values, like):
    return namespace(like).asarray(values, dtype=like.dtype)


def test_batched_failure_only_marks_the_failing_sample(backend):
    # Sample 0 blows up at t = 1; sample 1 is y' = -y^2 (1 / (1 + t)); sample 2 blows up at
    # t = 2, after the end.
    y0 = np.array([[1.0], [1.0], [0.5]])
    ts = np.array([0.0, 0.5, 1.5])

    sol = solve(backend, signed_square, y0, ts, batch_axis=0, throw=False)
    np.testing.assert_array_equal(backend.status(sol), [Status.DT_UNDERFLOW, 0, 0])
    assert not sol.success
    ys = backend.to_numpy(sol.ys)
    np.testing.assert_allclose(ys[:, 1, 0], 1.0 / (1.0 + ts), rtol=1e-6)
    np.testing.assert_allclose(ys[:, 2, 0], 1.0 / (2.0 - ts), rtol=1e-6)
    assert math.isnan(ys[-1, 0, 0])
    assert ys[1, 0, 0] == pytest.approx(2.0, rel=1e-6)

    with pytest.raises(SolveError, match="failed for 1 of 3 samples; sample 0") as info:
        solve(backend, signed_square, y0, ts, batch_axis=0)
    assert "underflow in dt" in str(info.value)


def test_batched_failure_message_names_only_the_failures(backend):
    # Sample 0 blows up at t = 1, sample 1 decays.
    with pytest.raises(SolveError) as info:
        solve(backend, signed_square, np.array([[1.0], [1.0]]), np.array([0.0, 2.0]), batch_axis=0)
    assert "success" not in str(info.value)


def nan_in_sample_1_after_half(t, y):
    xp = namespace(y)
    failing = (xp.arange(y.shape[0]) == 1) & (t > 0.5)
    return xp.where(failing[:, None], math.nan, -y)


def test_batched_non_finite_sample(backend):
    sol = solve(
        backend,
        nan_in_sample_1_after_half,
        np.ones((3, 2)),
        np.array([0.0, 0.25, 1.0]),
        batch_axis=0,
        throw=False,
    )
    np.testing.assert_array_equal(backend.status(sol), [0, Status.NONFINITE_STATE, 0])
    ys = backend.to_numpy(sol.ys)
    np.testing.assert_allclose(ys[-1, [0, 2]], math.exp(-1.0), rtol=1e-6)
    assert np.all(np.isnan(ys[-1, 1]))
    np.testing.assert_allclose(ys[1, 1], math.exp(-0.25), rtol=1e-6)


RATES = np.array([[1.0], [500.0]])  # the second needs ~10x more steps


def fast_and_slow(t, y):
    return -constant(RATES, y) * y + namespace(y).cos(t)[:, None]


def test_batched_max_num_steps_stops_only_the_expensive_sample(backend):
    y0, ts = np.ones((2, 1)), np.array([0.0, 5.0])
    full = solve(backend, fast_and_slow, y0, ts, batch_axis=0)
    full_steps = backend.stats(full)["nsteps"]
    limit = int(full_steps[0]) + 5
    assert full_steps[1] > limit
    sol = solve(
        backend,
        fast_and_slow,
        y0,
        ts,
        batch_axis=0,
        throw=False,
        options={"max_num_steps": limit},
    )
    np.testing.assert_array_equal(backend.status(sol), [Status.SUCCESS, Status.MAX_STEPS_REACHED])
    ys = backend.to_numpy(sol.ys)
    np.testing.assert_array_equal(ys[-1, 0], backend.to_numpy(full.ys)[-1, 0])
    assert math.isnan(ys[-1, 1, 0])
    assert int(backend.stats(sol)["nsteps"][1]) == limit
