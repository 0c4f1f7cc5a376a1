"""The conformance runner: every check on every case, once per backend.

One test per (backend, case/method, check); ``conftest.py`` gathers their outcomes into the
table printed at the end of the run. Nothing here names a framework: a backend is whatever
``odecore.get_backend(name)`` returns for a name in ``odecore.BACKEND_NAMES``, inputs are
converted with ``backend.asarray``, and arrays come back to NumPy through DLPack. A backend
that is not installed is skipped with ``BackendNotAvailableError``'s message.

``ODECORE_CONFORMANCE_BACKENDS=numpy,torch`` restricts the run to those backends (the others
are skipped, and say so); nox's ``conformance`` session sets it to what imports there.

Checks:

- ``values``: the outputs match the case's reference (closed form or scipy at 1e-13) within
  the case's tolerance, with the solve reporting success and keeping the state's dtype.
- ``cross-backend``: the outputs match the NumPy backend's to 1e-10 relative (float64; float32
  states to 1e-5), for every backend but NumPy itself.
- ``vjp``: the case's hand-written VJP, evaluated on the backend in float64, matches central
  finite differences of the case's ``func`` on the same backend.
- ``gradient[mode]``: the gradient of the loss with respect to ``y0``, the parameters and the
  output times matches the reference gradient. Backends without autodiff get it from
  ``odecore.vjp_odeint`` (modes checkpoint and backsolve; ``direct`` needs autodiff); backends
  with autodiff through their ``Backend.vjp(fn, *primals) -> (out, pullback)`` (DESIGN.md).
- ``reference-gradient``: the reference gradient itself matches, to 1e-7, central finite
  differences of odecore's own NumPy solve (dopri8 at rtol = atol = 1e-12). It checks the
  case's data, so it runs on the NumPy row only.
"""

from __future__ import annotations

import functools
import os

import array_api_compat
import numpy as np
import pytest

import odecore
from conformance.cases import VARIANTS, Variant, loss_cotangent, reference_gradient

CHECKS = (
    "values",
    "cross-backend",
    "vjp",
    "gradient[checkpoint]",
    "gradient[backsolve]",
    "gradient[direct]",
    "reference-gradient",
)

REFERENCE_BACKEND = "numpy"
# Agreement between backends: the same algorithm in the same dtype differs only by rounding
# (summation order in stage combinations), which the error control can turn into slightly
# different steps; the differences stay orders of magnitude below these.
CROSS_BACKEND_RTOL = {"float64": 1e-10, "float32": 1e-5}
GRADIENT_MODES_WITHOUT_AUTODIFF = ("checkpoint", "backsolve")
NO_GRADIENT_API_REASON = "gradients land with the gradients issue (adapter has no vjp yet)"
# The finite-difference check of the reference gradients: a tight solve and a step h where
# the truncation error (~h^2, dominant) and the solver's noise (~tol / h) leave the measured
# differences from the references at 1e-8 relative or below (h = 1e-4 gave up to 9e-7).
FD_SOLVE_TOL = 1e-12
FD_METHOD = "dopri8"
FD_RELATIVE_STEP = 1e-5
FD_RTOL = 1e-7


# --------------------------------------------------------------------------------------------
# Backends, conversions and solves


def _selected_backends() -> set[str] | None:
    chosen = os.environ.get("ODECORE_CONFORMANCE_BACKENDS", "").strip()
    return {name.strip() for name in chosen.split(",") if name.strip()} if chosen else None


def backend_or_skip(name: str) -> odecore.Backend:
    selected = _selected_backends()
    if selected is not None and name not in selected:
        pytest.skip(f"not selected (ODECORE_CONFORMANCE_BACKENDS={','.join(sorted(selected))})")
    try:
        return odecore.get_backend(name)
    except odecore.BackendNotAvailableError as exc:
        pytest.skip(str(exc))


def to_numpy(bk, x) -> np.ndarray:
    """A backend array (or a Python or NumPy scalar) as a NumPy array on the host."""
    if isinstance(x, (int, float, np.generic)):
        return np.asarray(x)
    x = bk.stop_gradient(x)
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError, ValueError):
        # Device arrays (CuPy, GPU torch) do not export to NumPy through DLPack.
        return np.asarray(array_api_compat.to_device(x, "cpu"))


def _dtype(bk, name: str):
    return getattr(bk.xp, name)


def inputs(bk, case):
    """``(y0, t, params)`` of a case as the backend's arrays: the state and the parameters in
    the case's dtype, time in the backend's time dtype."""
    dt = _dtype(bk, case.dtype)
    y0 = bk.asarray(case.y0, dtype=dt)
    t = bk.asarray(case.ts, dtype=bk.time_dtype)
    params = tuple(bk.asarray(p, dtype=dt) for p in case.params)
    return y0, t, params


def solver_kwargs(variant: Variant, bk) -> dict:
    case = variant.case
    return {
        "rtol": case.rtol,
        "atol": case.atol,
        "method": variant.method,
        "batch_axis": case.batch_axis,
        "backend": bk.name,
    }


def solve_variant(bk, variant: Variant) -> np.ndarray:
    """The variant's outputs on ``bk``, checked for success, dtype and shape."""
    case = variant.case
    y0, t, params = inputs(bk, case)
    sol = odecore.solve(case.dynamics, y0, t, params=params, **solver_kwargs(variant, bk))
    assert sol.success, f"the solve did not succeed: {sol.message}"
    assert sol.ys.dtype == _dtype(bk, case.dtype), (
        f"ys has dtype {sol.ys.dtype}, the state {case.dtype}"
    )
    ys = to_numpy(bk, sol.ys)
    expected_shape = (len(case.times), *case.y0.shape)
    assert ys.shape == expected_shape, f"ys has shape {ys.shape}, expected {expected_shape}"
    return ys


@functools.cache
def reference_backend_values(variant: Variant) -> np.ndarray:
    return solve_variant(odecore.get_backend(REFERENCE_BACKEND), variant)


def assert_close(actual, expected, rtol: float, atol: float, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape}, expected {expected.shape}"
    )
    bound = atol + rtol * np.abs(expected)
    excess = np.abs(actual - expected) / bound
    if not np.all(np.isfinite(excess)):
        raise AssertionError(f"{what}: non-finite values")
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.ndim else ()
    if excess[worst] > 1.0:
        err = abs(float(actual[worst]) - float(expected[worst]))
        raise AssertionError(
            f"{what}: error {err:.3g} at index {tuple(int(i) for i in worst)} is "
            f"{float(excess[worst]):.3g} times the bound atol + rtol |ref| "
            f"(rtol={rtol:g}, atol={atol:g})"
        )


def assert_gradient_close(grad: dict, ref: dict, rtol: float, what: str) -> None:
    """Each gradient (y0, every parameter, t) within ``rtol`` of its largest entry."""
    pairs = [("y0", grad["y0"], ref["y0"]), ("t", grad["t"], ref["t"])]
    assert len(grad["params"]) == len(ref["params"]), (
        f"{what}: {len(grad['params'])} parameter gradients for {len(ref['params'])} parameters"
    )
    for k, (g, r) in enumerate(zip(grad["params"], ref["params"], strict=True)):
        pairs.append((f"params[{k}]", g, r))
    for name, g, r in pairs:
        r = np.asarray(r, dtype=np.float64)
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        assert_close(g, r, rtol=0.0, atol=rtol * max(scale, 1e-300), what=f"{what} d/d{name}")


# --------------------------------------------------------------------------------------------
# The checks


def check_values(bk, variant: Variant) -> None:
    case = variant.case
    ys = solve_variant(bk, variant)
    ref = case.reference(case.ts)
    assert_close(ys, ref, case.values_rtol, case.values_atol, "ys vs reference")


def check_cross_backend(bk, variant: Variant) -> None:
    if bk.name == REFERENCE_BACKEND:
        pytest.skip(f"{REFERENCE_BACKEND} is the backend the others are compared with")
    ys = solve_variant(bk, variant)
    expected = reference_backend_values(variant)
    rtol = CROSS_BACKEND_RTOL[variant.case.dtype]
    scale = float(np.max(np.abs(expected)))
    assert_close(ys, expected, rtol, rtol * scale, f"ys vs the {REFERENCE_BACKEND} backend")


def check_vjp(bk, variant: Variant) -> None:
    """The hand-written VJP against central differences of ``func``, both on ``bk`` in
    float64, at the initial state and two points of the reference trajectory."""
    case = variant.case
    ts = case.ts
    ys_ref = case.reference(ts)
    rng = np.random.default_rng(7)
    for i in (0, len(ts) // 2, len(ts) - 1):
        y = np.asarray(ys_ref[i], dtype=np.float64)
        cot = rng.uniform(-1.0, 1.0, size=y.shape)
        _check_vjp_at(bk, case, float(ts[i]), y, cot)


def _check_vjp_at(bk, case, t_value: float, y: np.ndarray, cot: np.ndarray) -> None:
    f64 = _dtype(bk, "float64")
    t = case.time_argument(t_value, bk.xp, f64)
    params = [np.asarray(p, dtype=np.float64) for p in case.params]

    def on_backend(a):
        return bk.asarray(np.asarray(a, dtype=np.float64), dtype=f64)

    def f(y_np, params_np):
        out = case.func(t, on_backend(y_np), tuple(on_backend(p) for p in params_np))
        return to_numpy(bk, out)

    def f_of_param(k):
        return lambda value: f(y, [value if j == k else q for j, q in enumerate(params)])

    cot_y, cot_params = case.vjp(
        t, on_backend(y), tuple(on_backend(p) for p in params), on_backend(cot)
    )
    assert len(cot_params) == len(params), (
        f"vjp returned {len(cot_params)} parameter cotangents for {len(params)} parameters"
    )
    fd_y = _fd_vjp(lambda value: f(value, params), y, cot)
    assert_close(to_numpy(bk, cot_y), fd_y, 1e-7, 1e-7 * _scale(fd_y), f"cot_y at t={t_value}")
    for k, p in enumerate(params):
        fd_p = _fd_vjp(f_of_param(k), p, cot)
        got = to_numpy(bk, cot_params[k])
        assert_close(got, fd_p, 1e-7, 1e-7 * _scale(fd_p), f"cot_params[{k}] at t={t_value}")


def _scale(x) -> float:
    return max(float(np.max(np.abs(x))), 1.0)


def _fd_vjp(f, x: np.ndarray, cot: np.ndarray) -> np.ndarray:
    """``cot . df/dx`` by central differences, one component of ``x`` at a time."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    for j in np.ndindex(x.shape):
        h = 1e-6 * max(1.0, abs(float(x[j])))
        plus, minus = x.copy(), x.copy()
        plus[j] += h
        minus[j] -= h
        out[j] = np.sum(cot * (f(plus) - f(minus))) / (2 * h)
    return out


def check_gradient(bk, variant: Variant, mode: str) -> None:
    case = variant.case
    if mode == "direct" and bk.has_autodiff and bk.default_adjoint != "direct":
        # A framework that cannot reverse through the loop (JAX) must say so, not fail later.
        with pytest.raises(ValueError, match="'direct' is not available.*checkpoint.*backsolve"):
            odecore_gradient(bk, variant, mode)
        pytest.skip(f"{bk.name!r} has no 'direct' mode; asking for it raises, as checked")
    grad = odecore_gradient(bk, variant, mode)
    assert_gradient_close(grad, reference_gradient(case), case.gradient_rtol, f"{mode}")


def odecore_gradient(bk, variant: Variant, mode: str) -> dict:
    """The loss gradient from odecore on ``bk``, as NumPy arrays ``{"y0", "params", "t"}``."""
    case = variant.case
    y0, t, params = inputs(bk, case)
    weights = bk.asarray(case.loss_weights(), dtype=_dtype(bk, case.dtype))
    kwargs = solver_kwargs(variant, bk)
    if not bk.has_autodiff:
        if mode not in GRADIENT_MODES_WITHOUT_AUTODIFF:
            pytest.skip(
                f"{mode!r} differentiates through the framework, and {bk.name!r} has no autodiff"
            )
        vjp_odeint = getattr(odecore, "vjp_odeint", None)
        if vjp_odeint is None:
            pytest.skip(NO_GRADIENT_API_REASON)
        ys, pullback = vjp_odeint(case.dynamics, y0, t, params, adjoint=mode, **kwargs)
        y0_bar, params_bar, t_bar = pullback(loss_cotangent(ys, weights))
    else:
        backend_vjp = getattr(bk, "vjp", None)
        if backend_vjp is None:
            pytest.skip(
                f"{bk.name!r} has autodiff but its Backend has no vjp(fn, *primals) -> "
                f"(out, pullback) (DESIGN.md) for the suite to drive it"
            )

        def solve(y0_, t_, *params_):
            return odecore.odeint(case.dynamics, y0_, t_, params=params_, adjoint=mode, **kwargs)

        ys, pullback = backend_vjp(solve, y0, t, *params)
        y0_bar, t_bar, *params_bar = pullback(loss_cotangent(ys, weights))
    return {
        "y0": to_numpy(bk, y0_bar),
        "params": tuple(to_numpy(bk, g) for g in params_bar),
        "t": to_numpy(bk, t_bar),
    }


def check_reference_gradient(bk, variant: Variant) -> None:
    if bk.name != REFERENCE_BACKEND:
        pytest.skip(
            f"checks the case's reference data, not a backend: runs on the {REFERENCE_BACKEND} row"
        )
    case = variant.case
    fd = finite_difference_gradient(case)
    assert_gradient_close(fd, reference_gradient(case), FD_RTOL, "finite differences")


@functools.cache
def finite_difference_gradient(case) -> dict:
    """The loss gradient by central differences of odecore's NumPy solve in float64."""
    bk = odecore.get_backend(REFERENCE_BACKEND)
    weights = case.loss_weights()
    y0 = np.asarray(case.y0, dtype=np.float64)
    params = [np.asarray(p, dtype=np.float64) for p in case.params]
    ts = case.ts

    def total_loss(y0_, ts_, params_):
        ys = odecore.odeint(
            case.dynamics,
            y0_,
            ts_,
            params=tuple(params_),
            rtol=FD_SOLVE_TOL,
            atol=FD_SOLVE_TOL,
            method=FD_METHOD,
            batch_axis=case.batch_axis,
            backend=bk.name,
        )
        return 0.5 * float(np.sum(weights * ys * ys))

    def central(x, evaluate):
        out = np.zeros(x.shape)
        for j in np.ndindex(x.shape):
            h = FD_RELATIVE_STEP * max(1.0, abs(float(x[j])))
            plus, minus = x.copy(), x.copy()
            plus[j] += h
            minus[j] -= h
            out[j] = (evaluate(plus) - evaluate(minus)) / (2 * h)
        return out

    g_y0 = central(y0, lambda v: total_loss(v, ts, params))

    def with_param(k, value):
        return [value if j == k else q for j, q in enumerate(params)]

    g_params = tuple(
        central(p, lambda v, k=k: total_loss(y0, ts, with_param(k, v)))
        for k, p in enumerate(params)
    )
    g_t = central(ts, lambda v: total_loss(y0, v, params))
    return {"y0": g_y0, "params": g_params, "t": g_t}


CHECK_FUNCTIONS = {
    "values": check_values,
    "cross-backend": check_cross_backend,
    "vjp": check_vjp,
    "gradient[checkpoint]": functools.partial(check_gradient, mode="checkpoint"),
    "gradient[backsolve]": functools.partial(check_gradient, mode="backsolve"),
    "gradient[direct]": functools.partial(check_gradient, mode="direct"),
    "reference-gradient": check_reference_gradient,
}
assert tuple(CHECK_FUNCTIONS) == CHECKS


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_conformance(backend_name: str, variant: Variant, check: str) -> None:
    bk = backend_or_skip(backend_name)
    with bk.float64():
        CHECK_FUNCTIONS[check](bk, variant)
