"""Conformance of continuous normalizing flows: log-densities, regularisers and their
gradients, per backend.

The velocities are written against the array API, with the VJPs a backend without autodiff
needs (``vjp`` and the second-order ``vjp_of_vjp``), so a new backend joins without changes
(numba runs them on NumPy's generic loop, ``Backend.generic_backend``). The cells appear in
their own table at the end of the run (``conftest.py``); backends are chosen and required as
in ``test_conformance.py``.

Each case is a batch ``x`` pushed through ``z' = f(t, z)`` over ``[0, T]``; its output is the
(B, 1 + R) array of ``log p(x)`` and the requested regularisers. Hutchinson variants use
fixed probes (``eps``), the same on every backend, so the outputs are deterministic.

Checks:

- ``values``: the outputs match a reference computed without odecore: the closed form of a
  linear flow (``scipy.linalg.expm``), or scipy's DOP853 at rtol = atol = 1e-13 on the
  augmented ODE with the Jacobian written out.
- ``grad:<mode>``: the gradient of ``sum(w * outputs)`` with respect to ``x`` and each
  parameter matches central finite differences of the reference, element by element.
  Backends without autodiff get it from ``odecore.cnf.vjp_log_prob``; the others through
  ``Backend.autodiff.vjp``.
- ``cross:values`` and ``cross:<mode>``: consistency between backends.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import array_api_compat
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import odecore
from conformance.test_conformance import (
    Measurement,
    available_backend,
    backend_or_skip,
    cached,
    compare,
    precision,
    report,
    to_numpy,
)
from odecore import cnf

SUMMARY_TITLE = "continuous normalizing flows"
MODES = ("checkpoint", "backsolve", "direct")
SOLVE = {"rtol": 1e-10, "atol": 1e-12}
# dopri5 at rtol 1e-10 on these O(1) problems: global errors near 1e-9; the bound leaves a
# factor 100 for their growth along the solve and between the augmented parts.
VALUES_RTOL = 1e-7
# Finite differences of the reference: truncation h^2 f''' ~ 1e-10 at h = 1e-5 and rounding
# 1e-13 / h ~ 1e-8; the backsolve's own error adds ~1e-8 at rtol 1e-10.
GRADIENT_RTOL = 1e-5
FD_STEP = 1e-5
REFERENCE_TOL = 1e-13
# Every output and gradient entry here is O(1): errors are measured against |value| + 1.
FLOOR = 1.0


class Linear:
    """``f = A z``, ``params = (A,)``."""

    def __call__(self, t, z, params):
        (A,) = params
        return z @ array_api_compat.array_namespace(z).matrix_transpose(A)

    def vjp(self, t, z, params, u):
        (A,) = params
        xp = array_api_compat.array_namespace(z)
        return u @ A, (xp.matrix_transpose(u) @ z,)

    def vjp_of_vjp(self, t, z, params, u, w):
        xp = array_api_compat.array_namespace(z)
        return xp.zeros_like(z), (xp.matrix_transpose(u) @ w,)


class Tanh:
    """``f = tanh(z W^T + b) * (1 + t)``, ``params = (W, b)``: nonlinear and
    time-dependent."""

    def __call__(self, t, z, params):
        W, b = params
        xp = array_api_compat.array_namespace(z)
        return xp.tanh(z @ xp.matrix_transpose(W) + b) * _growth(xp, t, z)

    def _parts(self, t, z, params):
        W, b = params
        xp = array_api_compat.array_namespace(z)
        h = xp.tanh(z @ xp.matrix_transpose(W) + b)
        return xp, W, h, (1.0 - h * h) * _growth(xp, t, z)

    def vjp(self, t, z, params, u):
        xp, W, _, slope = self._parts(t, z, params)
        g = u * slope
        return g @ W, (xp.matrix_transpose(g) @ z, xp.sum(g, axis=0))

    def vjp_of_vjp(self, t, z, params, u, w):
        # sum u_bi s_bi (W w_b)_i with s = (1 - tanh(a)^2)(1 + t), a = z W^T + b; through a,
        # ds/da = -2 tanh(a) s.
        xp, W, h, slope = self._parts(t, z, params)
        mt = xp.matrix_transpose
        g = u * (w @ mt(W)) * (-2.0 * h * slope)
        return g @ W, (mt(g) @ z + mt(u * slope) @ w, xp.sum(g, axis=0))

    @staticmethod
    def jacobian(z, params, t=0.0):
        W, b = params
        slope = (1.0 - np.tanh(z @ W.T + b) ** 2) * (1.0 + t)
        return slope[:, :, None] * W[None]


def _growth(xp, t, z):
    """``1 + t`` against rows of ``z``: ``t`` is one time, or one per sample (B,) when each
    sample steps on its own."""
    t = xp.asarray(t, dtype=z.dtype)
    return 1.0 + (xp.reshape(t, (-1, 1)) if t.ndim == 1 else t)


_rng = np.random.default_rng(15)


@dataclass(frozen=True, eq=False)  # hashed by identity, for the cached references
class Case:
    name: str
    func: object
    x: np.ndarray
    params: tuple
    T: float
    trace: str = "exact"
    regularizers: tuple = ()
    eps: np.ndarray | None = None
    batch_axis: int | None = None


LINEAR = Case(
    "linear3",
    Linear(),
    _rng.standard_normal((4, 3)),
    (np.array([[-0.4, 0.7, 0.1], [-0.3, 0.2, -0.5], [0.6, 0.1, -0.1]]),),
    0.7,
)
LINEAR_HUTCHINSON = Case(
    "linear3-hutchinson",
    LINEAR.func,
    LINEAR.x,
    LINEAR.params,
    LINEAR.T,
    trace="hutchinson",
    regularizers=("jacobian_frobenius",),
    eps=_rng.standard_normal((4, 3)),
)
_TANH_PARAMS = (np.array([[0.5, -1.0], [1.2, 0.3]]), np.array([0.1, -0.2]))
TANH = Case(
    "tanh2-rnode",
    Tanh(),
    _rng.standard_normal((3, 2)),
    _TANH_PARAMS,
    0.8,
    trace="hutchinson",
    regularizers=("kinetic", "jacobian_frobenius"),
    eps=_rng.standard_normal((3, 2)),
)
TANH_PER_SAMPLE = Case(
    "tanh2-exact-per-sample",
    Tanh(),
    TANH.x,
    _TANH_PARAMS,
    0.8,
    regularizers=("kinetic", "jacobian_frobenius"),
    batch_axis=0,
)
CASES = (LINEAR, LINEAR_HUTCHINSON, TANH, TANH_PER_SAMPLE)


@dataclass(frozen=True)
class Variant:
    case: Case
    ci_modes: tuple[str, ...] = ()  # the modes CI runs; the others are marked slow

    family = "cnf"
    dtype = "float64"

    @property
    def id(self) -> str:
        return f"cnf-{self.case.name}"

    @property
    def ci(self) -> bool:
        return bool(self.ci_modes)


# CI: every case's values, every mode at least once, the nonlinear flow in every mode.
VARIANTS = (
    Variant(LINEAR, ("backsolve",)),
    Variant(LINEAR_HUTCHINSON, ("checkpoint",)),
    Variant(TANH, MODES),
    Variant(TANH_PER_SAMPLE, ("direct",)),
)


# --------------------------------------------------------------------------------------------
# References, without odecore


def _gaussian_log_prob(z):
    return -0.5 * np.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def reference_outputs(case: Case, x: np.ndarray, params: tuple) -> np.ndarray:
    """The (B, 1 + R) outputs at ``x`` and ``params``, in float64."""
    if isinstance(case.func, Linear):
        return _linear_outputs(case, x, params[0])
    return np.stack([_solved_outputs(case, x[i], params, i) for i in range(x.shape[0])])


def _linear_outputs(case: Case, x, A):
    T = case.T
    z = x @ scipy.linalg.expm(A * T).T
    if case.trace == "exact":
        trace = np.full(x.shape[0], np.trace(A))
        frobenius = np.full(x.shape[0], np.sum(A * A))
    else:
        rows = case.eps @ A
        trace = np.sum(rows * case.eps, axis=1)
        frobenius = np.sum(rows * rows, axis=1)
    columns = [_gaussian_log_prob(z) + T * trace]
    for name in case.regularizers:
        assert name == "jacobian_frobenius", "the linear cases carry no kinetic energy"
        columns.append(T * frobenius)
    return np.stack(columns, axis=1)


def _solved_outputs(case: Case, x, params, i):
    """One sample's augmented ODE with its Jacobian written out, by scipy's DOP853."""
    d = x.shape[0]
    eps = None if case.eps is None else case.eps[i]

    def rates(t, s):
        z = s[:d]
        f = case.func(t, z[None], params)[0]
        jac = case.func.jacobian(z[None], params, t)[0]
        if eps is None:
            trace, frobenius = np.trace(jac), np.sum(jac * jac)
        else:
            row = eps @ jac
            trace, frobenius = row @ eps, row @ row
        extra = {"kinetic": f @ f, "jacobian_frobenius": frobenius}
        return np.concatenate([f, [trace], [extra[n] for n in case.regularizers]])

    s0 = np.concatenate([x, np.zeros(1 + len(case.regularizers))])
    sol = scipy.integrate.solve_ivp(
        rates, (0.0, case.T), s0, method="DOP853", rtol=REFERENCE_TOL, atol=REFERENCE_TOL
    )
    s = sol.y[:, -1]
    return np.concatenate([[_gaussian_log_prob(s[:d]) + s[d]], s[d + 1 :]])


def loss_weights(case: Case) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((case.x.shape[0], 1 + len(case.regularizers)))


@functools.cache
def reference_gradient(case: Case) -> tuple[np.ndarray, ...]:
    """Central differences of ``sum(w * outputs)``: ``(x_bar, *params_bar)``."""
    w = loss_weights(case)

    def loss(x, params):
        return float(np.sum(w * reference_outputs(case, x, params)))

    arguments = [case.x, *case.params]
    grads = []
    for k, arg in enumerate(arguments):
        grad = np.empty_like(arg)
        for index in np.ndindex(arg.shape):
            shifted = []
            for sign in (1.0, -1.0):
                moved = [a.copy() for a in arguments]
                moved[k][index] += sign * FD_STEP
                shifted.append(loss(moved[0], tuple(moved[1:])))
            grad[index] = (shifted[0] - shifted[1]) / (2 * FD_STEP)
        grads.append(grad)
    return tuple(grads)


# --------------------------------------------------------------------------------------------
# odecore on a backend


def _kwargs(case: Case, bk) -> dict:
    out = {
        "trace": case.trace,
        "regularizers": case.regularizers,
        "batch_axis": case.batch_axis,
        "backend": bk.name,
        **SOLVE,
    }
    if case.eps is not None:
        out["eps"] = bk.asarray(case.eps, dtype=bk.xp.float64)
    return out


def _outputs(bk, log_prob, regularizers, case):
    xp = bk.xp
    return xp.stack([log_prob, *(regularizers[n] for n in case.regularizers)], axis=1)


@cached
def solve_values(backend_name: str, variant: Variant) -> np.ndarray:
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, "float64"):
        x = bk.asarray(case.x, dtype=bk.xp.float64)
        params = tuple(bk.asarray(p, dtype=bk.xp.float64) for p in case.params)
        got = cnf.solve_log_prob(case.func, x, (0.0, case.T), params, **_kwargs(case, bk))
        assert bool(got.solution.success), "the solve failed"
        assert got.log_prob.dtype == bk.xp.float64, f"log_prob has dtype {got.log_prob.dtype}"
        return to_numpy(bk, _outputs(bk, got.log_prob, got.regularizers, case))


@cached
def gradient(backend_name: str, variant: Variant, mode: str) -> tuple:
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, "float64"):
        x = bk.asarray(case.x, dtype=bk.xp.float64)
        params = tuple(bk.asarray(p, dtype=bk.xp.float64) for p in case.params)
        w = bk.asarray(loss_weights(case), dtype=bk.xp.float64)
        opts = _kwargs(case, bk)
        if not bk.has_autodiff:
            _, _, pullback = cnf.vjp_log_prob(
                case.func, x, (0.0, case.T), params, adjoint=mode, **opts
            )
            regs_bar = {n: w[:, 1 + k] for k, n in enumerate(case.regularizers)}
            x_bar, params_bar = pullback(w[:, 0], regs_bar)
            grads = (x_bar, *params_bar)
        else:

            def outputs(x_, *params_):
                got = cnf.solve_log_prob(
                    case.func, x_, (0.0, case.T), params_, adjoint=mode, **opts
                )
                return _outputs(bk, got.log_prob, got.regularizers, case)

            _, pullback = bk.autodiff.vjp(outputs, x, *params)
            grads = pullback(w)
        return tuple(to_numpy(bk, g).astype(np.float64) for g in grads)


def has_mode(bk, mode: str) -> bool:
    if mode == "direct":
        return bk.has_autodiff and bk.autodiff.default_adjoint == "direct"
    return True


# --------------------------------------------------------------------------------------------
# The checks


def _labels(kind, column, variant, where) -> dict:
    return {
        "kind": kind,
        "column": column,
        "family": variant.family,
        "dtype": variant.dtype,
        "where": where,
    }


def _names(case: Case) -> list[str]:
    return ["x", *(f"params[{k}]" for k in range(len(case.params)))]


def check_values(bk, variant) -> list[Measurement]:
    got = solve_values(bk.name, variant)
    case = variant.case
    expected = reference_outputs(case, case.x, case.params)
    labels = _labels("reference", "values", variant, "[log p, regularisers]")
    return [compare(got, expected, VALUES_RTOL, FLOOR, **labels)]


def check_cross_values(bk, variant) -> list[Measurement]:
    got = solve_values(bk.name, variant)
    out = []
    for peer in peers(bk.name):
        labels = _labels("cross", "values", variant, f"outputs vs {peer.name}")
        out.append(compare(got, solve_values(peer.name, variant), VALUES_RTOL, FLOOR, **labels))
    return out


def check_gradient(bk, variant, mode) -> list[Measurement]:
    got = gradient(bk.name, variant, mode)
    expected = reference_gradient(variant.case)
    return [
        compare(g, e, GRADIENT_RTOL, FLOOR, **_labels("reference", mode, variant, f"d/d{n}"))
        for g, e, n in zip(got, expected, _names(variant.case), strict=True)
    ]


def check_cross_gradient(bk, variant, mode) -> list[Measurement]:
    got = gradient(bk.name, variant, mode)
    out = []
    for peer in peers(bk.name):
        if not has_mode(peer, mode):
            continue
        expected = gradient(peer.name, variant, mode)
        for g, e, n in zip(got, expected, _names(variant.case), strict=True):
            labels = _labels("cross", mode, variant, f"d/d{n} vs {peer.name}")
            out.append(compare(g, e, GRADIENT_RTOL, FLOOR, **labels))
    return out


def peers(name: str) -> list:
    found = [available_backend(other) for other in odecore.BACKEND_NAMES if other != name]
    found = [bk for bk in found if bk is not None]
    if not found:
        pytest.skip("no other backend in this run to compare with")
    return found


CHECK_FUNCTIONS = {
    "values": check_values,
    "cross:values": check_cross_values,
    **{f"grad:{m}": functools.partial(check_gradient, mode=m) for m in MODES},
    **{f"cross:{m}": functools.partial(check_cross_gradient, mode=m) for m in MODES},
}


def _cells():
    for backend_name in odecore.BACKEND_NAMES:
        bk = available_backend(backend_name)
        modes = MODES if bk is None else tuple(m for m in MODES if has_mode(bk, m))
        for variant in VARIANTS:
            cells = [("values", variant.ci), ("cross:values", variant.ci)]
            cells += [(f"grad:{m}", m in variant.ci_modes) for m in modes]
            cells += [(f"cross:{m}", m in variant.ci_modes) for m in modes]
            for check, ci in cells:
                yield pytest.param(
                    backend_name,
                    variant,
                    check,
                    marks=() if ci else (pytest.mark.slow,),
                    id=f"{backend_name}-{variant.id}-{check}",
                )


@pytest.mark.parametrize(("backend_name", "variant", "check"), list(_cells()))
def test_cnf_conformance(backend_name: str, variant: Variant, check: str, record_property):
    bk = backend_or_skip(backend_name)
    report(record_property, CHECK_FUNCTIONS[check](bk, variant))
