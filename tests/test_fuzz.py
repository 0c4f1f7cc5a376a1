"""Property tests over random problems: every valid input gets the closed form, every bad input a
named error.

The problems are linear, ``dy/dt = A y`` with ``A`` of negative definite symmetric part, whose
solution ``expm(A (t - t0)) y0`` (SciPy) is the reference for the values, and ``expm(A (T -
t0))^T w`` for the gradient of ``sum(w * y(T))`` with respect to ``y0`` (the gradient with
respect to ``A``: central differences of ``expm``). The bad inputs are each one argument of a
valid call made wrong; each must raise ``TypeError`` or ``ValueError`` naming that argument,
within seconds.

Examples are derandomized and few, so that the file runs in seconds per backend; the checks
are plain functions, for a longer run with other settings.
"""

from __future__ import annotations

import contextlib
import math
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.linalg import expm

import odecore

BACKENDS = [
    pytest.param(name, marks=pytest.mark.backend(name)) for name in ("numpy", "torch", "jax")
]
# Seconds a call may take before it counts as a hang (JAX compiles each new configuration).
HANG = 60


@contextlib.contextmanager
def no_hang(seconds: int = HANG):
    """Fail a call that does not return within ``seconds``: a solve must end, by its answer,
    an error or ``max_num_steps``."""

    def interrupt(signum, frame):
        raise AssertionError(f"the call did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def to_backend(name: str, x, dtype=None):
    """A NumPy array as an array of the backend ``name``."""
    bk = odecore.get_backend(name)
    return bk.asarray(np.asarray(x), dtype=None if dtype is None else getattr(bk.xp, dtype))


def to_numpy(x) -> np.ndarray:
    x = x.detach().cpu() if hasattr(x, "detach") else x
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Valid problems
# ---------------------------------------------------------------------------------------------


@st.composite
def linear_problems(draw, methods=odecore.METHODS, dtypes=("float64", "float32")):
    """A dict: ``a`` (D, D), ``y0`` ((D,) or with a batch axis of B), ``batch_axis``, ``t``,
    ``method``, ``dtype``, ``rtol``, ``atol``, ``options``."""
    d = draw(st.integers(1, 5))
    entries = st.floats(-1.0, 1.0, allow_nan=False)
    m = np.array(draw(st.lists(entries, min_size=d * d, max_size=d * d))).reshape(d, d)
    s = np.array(draw(st.lists(entries, min_size=d * d, max_size=d * d))).reshape(d, d)
    # The symmetric part -(m m^T) - eps I is negative definite: ||expm(A t)||_2 <= 1 for t >= 0.
    a = -(m @ m.T) - draw(st.floats(0.05, 1.0)) * np.eye(d) + (s - s.T)
    a *= draw(st.floats(0.1, 2.0)) / np.linalg.norm(a, 2)

    batch_axis = draw(st.sampled_from([None, 0, 1]))
    b = draw(st.integers(1, 4))
    shape = (d,) if batch_axis is None else ((b, d) if batch_axis == 0 else (d, b))
    y0 = draw(st.lists(entries, min_size=math.prod(shape), max_size=math.prod(shape)))
    y0 = np.array(y0).reshape(shape)
    y0[np.abs(y0) < 0.05] = 0.5  # a scale of order one in every sample

    n = draw(st.integers(2, 20))
    # Uneven gaps, some of them far shorter than the others (close output times).
    gaps = np.array(
        draw(st.lists(st.sampled_from([1e-9, 1e-4, 0.3, 1.0, 2.0]), min_size=n - 1, max_size=n - 1))
    )
    span = draw(st.sampled_from([0.01, 1.0, 3.0, 20.0]))
    direction = draw(st.sampled_from([1.0, -1.0]))
    if direction < 0:
        # Backward in time the solution grows like exp(||A|| span): kept below e**3.
        span = min(span, 3.0 / np.linalg.norm(a, 2))
    t0 = draw(st.floats(-5.0, 5.0))
    t = t0 + direction * span * np.concatenate([[0.0], np.cumsum(gaps) / gaps.sum()])
    assert np.all(np.diff(t) * direction > 0)

    dtype = draw(st.sampled_from(dtypes))
    method = draw(st.sampled_from(methods))
    tab = odecore.TABLEAUS[method]
    # float32 resolves relative errors down to its unit roundoff, 6e-8: tolerances above 1e-5.
    # An error estimate of order q takes steps of tol**(1 / (q + 1)): below q = 4, a tolerance
    # of 1e-9 over a span of 20 would need more than max_num_steps steps.
    tight = dtype == "float64" and (tab.error_order or 0) >= 4
    rtol = draw(st.sampled_from([1e-3, 1e-5] + ([1e-7, 1e-9] if tight else [])))
    atol = rtol * draw(st.sampled_from([1e-3, 1.0]))
    options = {}
    if not tab.adaptive or draw(st.booleans()):
        # h ||A|| <= 0.1: the step's truncation error (below) is small at every order.
        options["step_size"] = float(draw(st.sampled_from([0.1, 0.03]))) / np.linalg.norm(a, 2)
    else:
        if draw(st.booleans()):
            options["first_step"] = draw(st.sampled_from([1e-6, 1e-2, 0.5]))
        if draw(st.booleans()):
            options["max_step"] = draw(st.sampled_from([0.05, 0.5]))
        if draw(st.booleans()):
            options["norm"] = draw(st.sampled_from(["rms", "max"]))
        if draw(st.booleans()):
            options["controller"] = draw(st.sampled_from(["I", "PI", "hairer"]))
    if draw(st.booleans()):
        inner = t[0] + (t[-1] - t[0]) * np.array(
            draw(st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3))
        )
        options[draw(st.sampled_from(["step_t", "jump_t"]))] = inner.tolist()
    return {
        "a": a,
        "y0": y0,
        "batch_axis": batch_axis,
        "t": t,
        "method": method,
        "dtype": dtype,
        "rtol": rtol,
        "atol": atol,
        "options": options,
    }


def linear(a, batch_axis):
    """``func`` of ``dy/dt = A y`` for states shaped as ``y0`` with ``batch_axis``."""
    if batch_axis == 0:
        return lambda t, y: y @ a.T
    return lambda t, y: a @ y


def exact(p) -> np.ndarray:
    """``expm(A (t - t0)) y0`` at every time of ``t``, shaped as ``odeint``'s output."""
    return np.stack([_apply(p, expm(p["a"] * (ti - p["t"][0])), p["y0"]) for ti in p["t"]])


def _apply(p, m, y):
    return y @ m.T if p["batch_axis"] == 0 else m @ y


def _stability_matrix(tab, z):
    """``R(Z)``, one step of the method on ``y' = A y`` with ``Z = h A``: ``y1 = R(Z) y0``."""
    eye = np.eye(z.shape[0])
    stages = []  # stage i's state as a matrix applied to y0
    for row in tab.a:
        stages.append(
            eye + sum((float(w) * z @ k for w, k in zip(row, stages, strict=True)), 0 * eye)
        )
    return eye + sum(float(w) * z @ k for w, k in zip(tab.b, stages, strict=True))


def error_bound(p, solution) -> float:
    """A bound on the largest error of any output, from the tolerances (an adaptive step) or the
    step's truncation error (a fixed step), plus rounding.

    - ``||expm(A s)||_2 <= 1`` for ``s >= 0`` (the symmetric part of ``A`` is negative
      definite): errors made along the way do not grow forward in time. Backward in time they
      grow at most by ``amp = exp(||A|| span)``.
    - Adaptive: an accepted step's error estimate has an RMS (or max) norm of at most 1 against
      ``atol + rtol |y|``, so its 2-norm is at most ``sqrt(D) (atol + rtol * ymax)``. With local
      extrapolation the solution's own local error is below the estimate asymptotically; a
      factor of 10 covers steps outside the asymptotic regime. The errors of ``nsteps`` steps
      add up: ``10 nsteps sqrt(D) (atol + rtol ymax) amp``.
    - Fixed: each step's truncation error is ``||R(hA) - expm(hA)||_2 ymax`` (``R``, the
      method's stability matrix, computed from its tableau), over ``ceil(span / h)`` steps, and
      the interpolant between grid points errs by at most ``(h ||A||)**4 ymax``: cubic Hermite
      by ``h**4 ||y''''|| / 384``, and the methods' own interpolants are of order 4 or more.
      A factor of 2 covers ``||R^k||`` against ``||expm(A k h)||``, both below ``1 + k E``.
    - Rounding: a few units of roundoff of ``ymax`` for every step and stage, ``10 (nsteps + n)
      stages eps ymax``. The ``step_t``/``jump_t`` landings add steps that the count includes.
      In float32 the problem itself is rounded (``A`` and ``y0``): its solution moves by at most
      ``eps (1 + ||A|| span) ymax amp``, added.
    """
    a, t = p["a"], p["t"]
    tab = odecore.TABLEAUS[p["method"]]
    d = a.shape[0]
    norm_a = np.linalg.norm(a, 2)
    span = abs(t[-1] - t[0])
    ys = exact(p)
    ymax = float(np.max(np.abs(ys)))
    amp = 1.0 if t[-1] > t[0] else math.exp(norm_a * span)
    nsteps = float(np.max(to_numpy(solution.stats["nsteps"])))
    eps = float(np.finfo(p["dtype"]).eps)
    rounding = (10 * (nsteps + len(t)) * len(tab.c) + 1 + norm_a * span) * eps * ymax * amp
    h = p["options"].get("step_size")
    if h is None:
        local = math.sqrt(d) * (p["atol"] + p["rtol"] * ymax)
        return 10 * nsteps * local * amp + rounding
    truncation = np.linalg.norm(_stability_matrix(tab, h * a) - expm(h * a), 2)
    steps = (
        math.ceil(span / h * (1 + 1e-9))
        + len(p["options"].get("step_t", []))
        + len(p["options"].get("jump_t", []))
    )
    interpolation = (h * norm_a) ** 4 * ymax
    return 2 * amp * (steps * truncation * ymax + interpolation) + rounding


def check_values(backend: str, p) -> None:
    """``odecore.solve`` and ``odecore.odeint`` of the problem ``p`` on ``backend`` agree with
    the closed form to within ``error_bound``."""
    bk = odecore.get_backend(backend)
    with bk.float64(), no_hang():
        a = to_backend(backend, p["a"], p["dtype"])
        y0 = to_backend(backend, p["y0"], p["dtype"])
        t = to_backend(backend, p["t"], "float64")
        kwargs = {k: p[k] for k in ("method", "rtol", "atol", "options", "batch_axis")}
        solution = odecore.solve(linear(a, p["batch_axis"]), y0, t, **kwargs)
        ys = odecore.odeint(linear(a, p["batch_axis"]), y0, t, **kwargs)
    assert solution.success, solution.message
    assert tuple(solution.ys.shape) == (len(p["t"]), *p["y0"].shape)
    assert str(solution.ys.dtype).endswith(p["dtype"])
    np.testing.assert_array_equal(to_numpy(ys), to_numpy(solution.ys))
    error = float(np.max(np.abs(to_numpy(solution.ys) - exact(p))))
    assert error <= error_bound(p, solution), (error, error_bound(p, solution))


# JAX compiles each new shape and configuration (seconds each): it gets a few examples.
EAGER = [pytest.param(name, marks=pytest.mark.backend(name)) for name in ("numpy", "torch")]
FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}


@pytest.mark.parametrize("backend", EAGER)
@settings(max_examples=60, **FUZZ)
@given(problem=linear_problems())
def test_random_linear_problems_match_expm(backend, problem):
    check_values(backend, problem)


@pytest.mark.backend("jax")
@settings(max_examples=3, **FUZZ)
@given(problem=linear_problems())
def test_random_linear_problems_match_expm_on_jax(problem):
    check_values("jax", problem)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

# The tangents of a linear system obey the same ODE as its state, so the steps chosen for y
# resolve them to the values' accuracy: error_bound at these tolerances, over the few hundred
# steps of these problems, is below 1e-6 of the gradient's scale. The central differences of
# expm with step DA err by DA**2 ||A||**3 T**3 / 6 (truncation) and eps / DA (rounding), both
# far below it.
GRAD_TOL = {"rtol": 1e-10, "atol": 1e-12}
GRAD_BOUND = 1e-6
DA = 1e-5


@st.composite
def gradient_problems(draw):
    p = draw(linear_problems(methods=("dopri5", "tsit5", "dopri8"), dtypes=("float64",)))
    p = {**p, **GRAD_TOL, "options": {}}
    w = np.array(draw(st.lists(st.floats(-1.0, 1.0), min_size=p["y0"].size, max_size=p["y0"].size)))
    return {**p, "w": w.reshape(p["y0"].shape)}


def exact_gradients(p):
    """``d/dy0`` and ``d/dA`` of ``sum(w * y(T))``: ``expm(A (T - t0))^T`` applied to ``w``, and
    central differences of ``expm`` entry by entry."""
    a, w, y0, span = p["a"], p["w"], p["y0"], p["t"][-1] - p["t"][0]
    m = expm(a * span)
    grad_y0 = w @ m if p["batch_axis"] == 0 else m.T @ w

    def loss(aa):
        return float(np.sum(w * _apply(p, expm(aa * span), y0)))

    grad_a = np.zeros_like(a)
    for i, j in np.ndindex(*a.shape):
        step = np.zeros_like(a)
        step[i, j] = DA
        grad_a[i, j] = (loss(a + step) - loss(a - step)) / (2 * DA)
    return grad_y0, grad_a


def assert_gradients_close(p, grad_y0, grad_a) -> None:
    ref_y0, ref_a = exact_gradients(p)
    scale = max(1.0, float(np.max(np.abs(ref_y0))), float(np.max(np.abs(ref_a))))
    np.testing.assert_allclose(to_numpy(grad_y0), ref_y0, rtol=0, atol=GRAD_BOUND * scale)
    np.testing.assert_allclose(to_numpy(grad_a), ref_a, rtol=0, atol=GRAD_BOUND * scale)


def check_gradients(backend: str, p) -> None:
    """Gradients of ``sum(w * odeint(...)[-1])``: torch's ``backward``, ``jax.grad``, or on NumPy
    ``vjp_odeint``'s pullback, against the closed form."""
    t, kwargs = p["t"], {k: p[k] for k in ("method", "rtol", "atol", "batch_axis")}
    with no_hang():
        if backend == "torch":
            import torch

            a = torch.tensor(p["a"], requires_grad=True)
            y0 = torch.tensor(p["y0"], requires_grad=True)
            ys = odecore.odeint(linear(a, p["batch_axis"]), y0, torch.tensor(t), **kwargs)
            (torch.tensor(p["w"]) * ys[-1]).sum().backward()
            assert_gradients_close(p, y0.grad, a.grad)
        elif backend == "jax":
            import jax

            with jax.enable_x64(True):

                def func(s, y, a):
                    return linear(a, p["batch_axis"])(s, y)

                def loss(y0, a):
                    ys = odecore.odeint(func, y0, jax.numpy.asarray(t), params=a, **kwargs)
                    return (p["w"] * ys[-1]).sum()

                grads = jax.grad(loss, argnums=(0, 1))(
                    jax.numpy.asarray(p["y0"]), jax.numpy.asarray(p["a"])
                )
                assert_gradients_close(p, *grads)
        else:
            ys, pullback = odecore.vjp_odeint(
                LinearWithVjp(p["batch_axis"]), p["y0"], t, p["a"], **kwargs
            )
            ys_bar = np.zeros(ys.shape)
            ys_bar[-1] = p["w"]
            grad_y0, grad_a, _ = pullback(ys_bar)
            assert_gradients_close(p, grad_y0, grad_a)


class LinearWithVjp:
    """``A y`` (``y A^T`` with samples along axis 0) with its VJP, for ``vjp_odeint``."""

    def __init__(self, batch_axis):
        self.batch_axis = batch_axis

    def __call__(self, t, y, a):
        return linear(a, self.batch_axis)(t, y)

    def vjp(self, t, y, a, cot):
        if self.batch_axis == 0:
            return cot @ a, cot.T @ y
        return a.T @ cot, (np.outer(cot, y) if y.ndim == 1 else cot @ y.T)


@pytest.mark.parametrize("backend", EAGER)
@settings(max_examples=10, **FUZZ)
@given(problem=gradient_problems())
def test_gradients_of_random_linear_problems_match_the_closed_form(backend, problem):
    check_gradients(backend, problem)


@pytest.mark.backend("jax")
@settings(max_examples=2, **FUZZ)
@given(problem=gradient_problems())
def test_gradients_of_random_linear_problems_match_the_closed_form_on_jax(problem):
    check_gradients("jax", problem)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

# Another framework's arrays, for the one under test.
OTHER_FRAMEWORK = {"numpy": "torch", "torch": "jax", "jax": "numpy"}


def _decay(t, y):
    return -y


def _bad(change, error, match, entry=None):
    """A bad input: ``change(call)`` makes one argument of a valid ``call`` (a dict of
    ``func``, ``y0``, ``t`` and keyword arguments, on the backend ``call["backend"]``) wrong;
    the entry point must raise ``error`` with a message matching ``match``. ``entry``: the
    entry point it needs (default: ``solve`` and ``odeint`` alike)."""
    return change, error, match, entry


def _set(**values):
    def change(call):
        name = call["backend"]
        for key, value in values.items():
            call[key] = value(name, call) if callable(value) else value

    return change


def _arr(values, dtype="float64"):
    return lambda name, call: to_backend(name, np.asarray(values), dtype)


def _y0_like(fill):
    return lambda name, call: to_backend(name, np.full(call["shape"], fill))


def _func(make):
    def change(call):
        xp = odecore.get_backend(call["backend"]).xp
        call["func"] = make(xp)

    return change


def _other_framework_t(call):
    other = OTHER_FRAMEWORK[call["backend"]]
    with odecore.get_backend(other).float64():
        call["t"] = to_backend(other, np.array([0.0, 1.0]))


def _option(key, value):
    def change(call):
        call["options"] = {key: value}

    return change


BAD_INPUTS = [
    _bad(_set(y0=_y0_like(np.nan)), ValueError, r"^y0 contains NaN or infinite values"),
    _bad(_set(y0=_arr([])), ValueError, r"^y0 is empty"),
    _bad(_set(y0=_arr([1, 2], "int64")), TypeError, r"^y0 must have a real floating dtype"),
    _bad(_set(y0=_arr([1 + 1j], "complex128")), TypeError, r"^y0 must have a real floating dtype"),
    _bad(_set(y0=lambda name, call: None), TypeError, r"^y0 must be an array"),
    _bad(_set(y0=lambda name, call: "01"), TypeError, r"^y0 must be an array"),
    _bad(_set(t=_arr([[0.0, 1.0]])), ValueError, r"^t must be a 1-D array"),
    _bad(_set(t=_arr([])), ValueError, r"^t is empty"),
    _bad(
        _set(t=_arr([0.0, 1.0, 1.0])),
        ValueError,
        r"^t must be strictly increasing or strictly decreasing",
    ),
    _bad(
        _set(t=_arr([0.0, 2.0, 1.0])),
        ValueError,
        r"^t must be strictly increasing or strictly decreasing",
    ),
    _bad(_set(t=_arr([0.0, np.nan])), ValueError, r"^t contains NaN or infinite values"),
    _bad(_set(t=_arr([0.0, np.inf])), ValueError, r"^t contains NaN or infinite values"),
    _bad(_set(t=_arr([False, True], "bool")), TypeError, r"^t must hold real numbers"),
    _bad(_set(t=lambda name, call: "01"), TypeError, r"^t must be a 1-D array"),
    _bad(_other_framework_t, TypeError, r"^arrays from two libraries in one call: y0 .* t "),
    _bad(
        _set(rtol=lambda name, call: np.nan), ValueError, r"^rtol must be non-negative and finite"
    ),
    _bad(_set(rtol=lambda name, call: -1e-6), ValueError, r"^rtol must be non-negative and finite"),
    _bad(_set(rtol=lambda name, call: "1e-6"), TypeError, r"^rtol must be a positive number"),
    _bad(_set(atol=lambda name, call: 0.0), ValueError, r"^atol must be positive and finite"),
    _bad(_set(atol=_arr([1e-6] * 7)), ValueError, r"^atol of shape \(7,\) does not broadcast"),
    _bad(_set(atol=_arr([np.inf])), ValueError, r"^every element of atol must be positive"),
    _bad(_set(method=lambda name, call: "RK45"), ValueError, r"^unknown method 'RK45'"),
    _bad(
        _set(options=lambda name, call: [("step_size", 0.1)]), TypeError, r"^options must be a dict"
    ),
    _bad(_option("stepsize", 0.1), ValueError, r"^unknown option\(s\) 'stepsize'"),
    _bad(_option("step_size", 0.0), ValueError, r"^options\['step_size'\] must be positive"),
    _bad(_option("step_size", -0.1), ValueError, r"^options\['step_size'\] must be positive"),
    _bad(_option("step_size", np.nan), ValueError, r"^options\['step_size'\] must be positive"),
    _bad(_option("first_step", "0.1"), TypeError, r"^options\['first_step'\] must be a number"),
    _bad(_option("max_step", np.nan), ValueError, r"^options\['max_step'\] must be positive"),
    _bad(
        _option("max_num_steps", 0), ValueError, r"^options\['max_num_steps'\] must be a positive"
    ),
    _bad(_option("step_t", [np.nan]), ValueError, r"^options\['step_t'\] contains NaN"),
    _bad(
        _option("jump_t", [[0.5], [0.7]]), ValueError, r"^options\['jump_t'\] must be a 1-D array"
    ),
    _bad(
        _option("norm", lambda x: None),
        TypeError,
        r"^the value options\['norm'\] returned must be a real",
    ),
    _bad(_option("norm", "l2"), ValueError, r"^unknown norm 'l2'"),
    _bad(_option("controller", "PID"), ValueError, r"^options\['controller'\] must be one of"),
    _bad(
        _set(batch_axis=lambda name, call: len(call["shape"])),
        ValueError,
        r"^batch_axis=\d+ is out of range",
    ),
    _bad(_set(batch_axis=lambda name, call: 0.0), TypeError, r"^batch_axis must be an int or None"),
    _bad(_func(lambda xp: lambda t, y: -y[..., None]), ValueError, r"^func returned shape"),
    _bad(
        _func(lambda xp: lambda t, y: None),
        TypeError,
        r"^func must return a \w+ array shaped like y",
    ),
    _bad(
        _func(lambda xp: lambda t, y: [1.0]),
        TypeError,
        r"^func must return a \w+ array shaped like y",
    ),
    _bad(
        _func(lambda xp: lambda t, y: xp.astype(y, xp.float32)), TypeError, r"^func returned dtype"
    ),
    _bad(_set(func=3), TypeError, r"^func must be a callable"),
    _bad(
        _set(params=_arr([1.0])),
        TypeError,
        r"odecore calls func\(t, y, params\) when params are given",
    ),
    _bad(
        _set(throw=lambda name, call: 1), TypeError, r"^throw must be True or False", entry="solve"
    ),
]


def call_entry(entry: str, call: dict):
    func, y0, t = call.pop("func"), call.pop("y0"), call.pop("t")
    call.pop("backend"), call.pop("shape")
    if entry == "odeint_event":
        return odecore.odeint_event(func, y0, t, event_fn=lambda s, y: y[..., 0] - 10.0, **call)
    return getattr(odecore, entry)(func, y0, t, **call)


def check_bad_input(backend: str, shape, bad, entry: str) -> None:
    """A valid solve of ``dy/dt = -y`` from ``y0`` of ``shape``, made wrong by ``bad``, raises
    the error ``bad`` names, with its message, within seconds."""
    change, error, match, needs = bad
    entry = needs or entry
    bk = odecore.get_backend(backend)
    with bk.float64(), no_hang(20):
        call = {
            "backend": backend,
            "shape": shape,
            "func": _decay,
            "y0": to_backend(backend, np.ones(shape)),
            "t": to_backend(backend, np.array([0.0, 1.0])),
        }
        change(call)
        with pytest.raises(error, match=match):
            call_entry(entry, call)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, **FUZZ)
@given(
    shape=st.sampled_from([(1,), (3,), (2, 3)]),
    bad=st.sampled_from(BAD_INPUTS),
    entry=st.sampled_from(["solve", "odeint"]),
)
def test_a_bad_argument_raises_an_error_naming_it(backend, shape, bad, entry):
    check_bad_input(backend, shape, bad, entry)


@st.composite
def bad_initial_times(draw):
    t0 = draw(st.sampled_from([None, "0", True, math.nan, -math.inf, (0.0, 1.0)]))
    error, match = {
        None: (TypeError, r"^t0 must be a time"),
        "0": (TypeError, r"^t0 must be a time"),
        True: (TypeError, r"^t0 must be a time"),
    }.get(t0, (ValueError, r"^t0 must be (a finite time|one time)"))
    return t0, error, match


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, **FUZZ)
@given(bad=bad_initial_times())
def test_odeint_event_names_a_bad_initial_time(backend, bad):
    t0, error, match = bad
    bk = odecore.get_backend(backend)
    with bk.float64(), no_hang(20), pytest.raises(error, match=match):
        odecore.odeint_event(
            _decay, to_backend(backend, np.ones(2)), t0, event_fn=lambda s, y: y[0] - 0.5
        )


@pytest.mark.backend("numpy")
def test_vjp_odeint_needs_two_output_times():
    with pytest.raises(ValueError, match="vjp_odeint needs at least two output times in t"):
        odecore.vjp_odeint(LinearWithVjp(None), np.ones(2), np.array([0.0]), -np.eye(2))
