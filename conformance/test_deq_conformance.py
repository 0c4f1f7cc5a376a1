"""Conformance of fixed points: every DEQ case, forward solver and backward mode, per backend.

The maps are written against the array API (``array_api_compat.array_namespace``), with
hand-written VJPs for backends without autodiff, so a new backend joins without changes. Its
cells appear in their own tables at the end of the run (``conftest.py``); backends are chosen
and required as in ``test_conformance.py``.

Checks:

- ``values``: ``z*`` matches the closed form (or a dense linear solve, or a long Picard run in
  float64), with success and the dtype kept.
- ``grad:<mode>``: the loss gradient with respect to every parameter matches a dense-algebra
  reference at the reference ``z*``, element by element: for ``implicit/<solver>`` the
  implicit-function-theorem gradient ``u df/dparams`` with ``u (I - J) = w``; for
  ``one_step`` the map's VJP at ``z*`` applied to the loss weights ``w``; for ``unrolled``
  ``d sum_{j<k} w M^j df/dparams`` with ``M = (1 - d) I + d J`` (k steps, damping d).
  Backends without autodiff get it from ``odecore.vjp_fixed_point``; the others through
  ``Backend.autodiff.vjp(fn, *primals)``.
- ``cross:values`` and ``cross:<mode>``: consistency between backends: ``z*`` and each mode's
  gradient match every other backend's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import array_api_compat
import numpy as np
import pytest

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

SUMMARY_TITLE = "fixed points"
SOLVERS = ("picard", "anderson", "broyden")
BACKWARD_SOLVERS = ("picard", "anderson", "broyden", "gmres")
MODES = (*(f"implicit/{s}" for s in BACKWARD_SOLVERS), "one_step", "unrolled")
UNROLL_STEPS = 5
UNROLL_DAMPING = 0.8
MAX_ITER = 300
# Every map below is a contraction with Lipschitz constant at most RHO (W has spectral norm
# 0.7, |tanh'| <= 1, |sin(z*)| = 0.67 at the Dottie number).
RHO = 0.7
# A solve stopped at residual ||f(z) - z|| <= tol is within tol / (1 - rho) of z*; the
# gradients inherit that error through J and df/dparams, and the implicit backward solve
# adds its own, also stopped at tol: a few times tol / (1 - rho). Two backends that stop
# after different iterations (a stop decision flipped by rounding) differ by as much.
TOLERANCE_FACTOR = 10


def deq_rtol(case) -> float:
    return TOLERANCE_FACTOR * case.tol / (1.0 - RHO)


class CosPlusB:
    """``z = cos z + b``."""

    def __call__(self, z, params):
        xp = array_api_compat.array_namespace(z)
        return xp.cos(z) + params[0]

    def vjp(self, z, params, cot):
        xp = array_api_compat.array_namespace(z)
        return -xp.sin(z) * cot, (cot,)

    def jacobian(self, z, params, i):
        return np.diag(-np.sin(z))

    def reference_vjp(self, z, params, u, absolute=False):
        return (np.abs(u) if absolute else u,)


class Affine:
    """``z = z W^T + b`` on a batch: ``z* = (I - W)^{-1} b``."""

    def __call__(self, z, params):
        W, b = params
        return z @ array_api_compat.array_namespace(z).matrix_transpose(W) + b

    def vjp(self, z, params, cot):
        xp = array_api_compat.array_namespace(z)
        W, _ = params
        return cot @ W, (xp.matrix_transpose(cot) @ z, xp.sum(cot, axis=0))

    def jacobian(self, z, params, i):
        return params[0]

    def reference_vjp(self, z, params, u, absolute=False):
        if absolute:
            u, z = np.abs(u), np.abs(z)
        return (u.T @ z, u.sum(axis=0))


class Tanh:
    """``z = tanh(z W^T + x U^T + b)``, the input ``x`` carried in params."""

    def __call__(self, z, params):
        xp = array_api_compat.array_namespace(z)
        W, U, b, x = params
        return xp.tanh(z @ xp.matrix_transpose(W) + x @ xp.matrix_transpose(U) + b)

    def vjp(self, z, params, cot):
        xp = array_api_compat.array_namespace(z)
        W, U, _, x = params
        c = cot * (1.0 - self(z, params) ** 2)
        mt = xp.matrix_transpose
        return c @ W, (mt(c) @ z, mt(c) @ x, xp.sum(c, axis=0), c @ U)

    def jacobian(self, z, params, i):
        W, U, b, x = params
        s = 1.0 - np.tanh(W @ z + U @ x[i] + b) ** 2
        return np.diag(s) @ W

    def reference_vjp(self, z, params, u, absolute=False):
        W, U, b, x = params
        c = u * (1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2)
        if absolute:
            c, z, x, U = np.abs(c), np.abs(z), np.abs(x), np.abs(U)
        return (c.T @ z, c.T @ x, c.sum(axis=0), c @ U)


_rng = np.random.default_rng(11)
_W = _rng.standard_normal((4, 4))
_W = RHO * _W / np.linalg.norm(_W, 2)


@dataclass(frozen=True, eq=False)  # hashed by identity, for the cached references
class Case:
    name: str
    func: object
    z0: np.ndarray
    params: tuple
    batched: bool
    expected: np.ndarray | None = None  # a closed form, when there is one
    dtype: str = "float64"
    # The forward and backward stopping tolerance: float64 far below what the checks need;
    # float32 a hundred unit roundoffs of the state, which its residuals can reach.
    tol: float = 1e-12


_TANH_PARAMS = (
    _W,
    0.5 * _rng.standard_normal((4, 2)),
    _rng.standard_normal(4),
    _rng.standard_normal((3, 2)),
)
COS_B = Case(
    "cos+b", CosPlusB(), np.zeros(1), (np.array([0.0]),), False, np.array([0.7390851332151607])
)
AFFINE = Case("affine", Affine(), np.zeros((3, 4)), (_W, _rng.standard_normal(4)), True)
TANH = Case("tanh", Tanh(), np.zeros((3, 4)), _TANH_PARAMS, True)
TANH_FLOAT32 = Case(
    "tanh-float32", Tanh(), np.zeros((3, 4)), _TANH_PARAMS, True, dtype="float32", tol=1e-5
)
CASES = (COS_B, AFFINE, TANH, TANH_FLOAT32)


@dataclass(frozen=True)
class Variant:
    case: Case
    solver: str
    ci_modes: tuple[str, ...] = ()  # the modes CI runs; the others are marked slow

    family = "fixed point"

    @property
    def id(self) -> str:
        return f"deq-{self.case.name}/{self.solver}"

    @property
    def ci(self) -> bool:
        return bool(self.ci_modes)


# CI: every forward solver, every backward mode, and float32, at least once.
_CI_MODES = {
    (TANH, "anderson"): MODES,
    (AFFINE, "broyden"): ("implicit/broyden", "unrolled"),
    (COS_B, "picard"): ("implicit/picard", "one_step"),
    (TANH_FLOAT32, "anderson"): ("implicit/anderson", "one_step"),
}
VARIANTS = tuple(Variant(c, s, _CI_MODES.get((c, s), ())) for c in CASES for s in SOLVERS)


# --------------------------------------------------------------------------------------------
# References, by dense linear algebra on NumPy in float64


@functools.cache
def reference_z(case: Case) -> np.ndarray:
    if case.expected is not None:
        return case.expected
    if isinstance(case.func, Affine):
        W, b = case.params
        return np.tile(np.linalg.solve(np.eye(4) - W, b), (case.z0.shape[0], 1))
    z = case.z0
    for _ in range(3000):  # a 0.7-contraction: far below rounding
        z = case.func(z, case.params)
    return z


def loss_weights(case: Case) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(case.z0.shape)


@functools.cache
def reference_gradient(case: Case, mode: str) -> tuple[tuple, tuple]:
    """The parameter gradient of ``sum(w * z*)`` in ``mode``, and the magnitudes of its
    entries (the same contraction over absolute values)."""
    z = reference_z(case)
    w = loss_weights(case)
    zs, ws = (z, w) if case.batched else (z[None], w[None])
    eye = np.eye(zs.shape[1])
    us = []
    for i in range(zs.shape[0]):
        jac = case.func.jacobian(zs[i], case.params, i)
        if mode.startswith("implicit/"):
            # u (I - J) = w.
            us.append(np.linalg.solve((eye - jac).T, ws[i]))
        elif mode == "one_step":
            us.append(ws[i])
        else:
            step = (1.0 - UNROLL_DAMPING) * eye + UNROLL_DAMPING * jac
            powers = [np.linalg.matrix_power(step, j) for j in range(UNROLL_STEPS)]
            us.append(UNROLL_DAMPING * ws[i] @ sum(powers))
    u = np.stack(us) if case.batched else us[0]
    gradient = case.func.reference_vjp(z, case.params, u)
    # The stopping test is absolute: u and z* carry errors relative to themselves and also
    # an absolute one per component, so the floor holds |u| df/dparams and 1 df/dparams.
    relative = case.func.reference_vjp(z, case.params, u, absolute=True)
    absolute = case.func.reference_vjp(z, case.params, np.ones_like(u), absolute=True)
    magnitude = tuple(r + a for r, a in zip(relative, absolute, strict=True))
    return gradient, magnitude


# --------------------------------------------------------------------------------------------
# odecore on a backend


def inputs(bk, case):
    dtype = getattr(bk.xp, case.dtype)
    z0 = bk.asarray(case.z0, dtype=dtype)
    params = tuple(bk.asarray(p, dtype=dtype) for p in case.params)
    return z0, params


def kwargs(variant: Variant, bk, mode: str | None = None) -> dict:
    out = {
        "solver": variant.solver,
        "tol": variant.case.tol,
        "max_iter": MAX_ITER,
        "batch_axis": 0 if variant.case.batched else None,
        "backend": bk.name,
    }
    if mode is None:
        return out
    backward, _, backward_solver = mode.partition("/")
    out["backward"] = backward
    if backward_solver:
        out["backward_solver"] = backward_solver
    if backward == "unrolled":
        out.update(unroll_steps=UNROLL_STEPS, unroll_damping=UNROLL_DAMPING)
    return out


@cached
def solve_values(backend_name: str, variant: Variant) -> np.ndarray:
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, case.dtype):
        z0, params = inputs(bk, case)
        sol = odecore.solve_fixed_point(case.func, z0, params, **kwargs(variant, bk))
        assert sol.success, sol.message
        assert sol.z.dtype == getattr(bk.xp, case.dtype), f"z has dtype {sol.z.dtype}"
        return to_numpy(bk, sol.z).astype(np.float64)


@cached
def gradient(backend_name: str, variant: Variant, mode: str) -> tuple:
    """The parameter gradient on a backend: one solve and pullback per (backend, variant,
    mode), shared by every check."""
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, case.dtype):
        z0, params = inputs(bk, case)
        w = bk.asarray(loss_weights(case), dtype=getattr(bk.xp, case.dtype))
        opts = kwargs(variant, bk, mode)
        if not bk.has_autodiff:
            _, pullback = odecore.vjp_fixed_point(case.func, z0, params, **opts)
            grads = pullback(w)
        else:

            def solve(*params_):
                return odecore.fixed_point(case.func, z0, params_, **opts)

            _, pullback = bk.autodiff.vjp(solve, *params)
            grads = pullback(w)
        return tuple(to_numpy(bk, g).astype(np.float64) for g in grads)


# --------------------------------------------------------------------------------------------
# The checks


def _labels(kind, column, variant, where) -> dict:
    return {
        "kind": kind,
        "column": column,
        "family": variant.family,
        "dtype": variant.case.dtype,
        "where": where,
    }


# The stopping test is absolute: every component of z* may be off by tol / (1 - rho)
# whatever its size.
Z_FLOOR = 1.0


def check_values(bk, variant) -> list[Measurement]:
    got = solve_values(bk.name, variant)
    case = variant.case
    labels = _labels("reference", "values", variant, "z*")
    return [compare(got, reference_z(case), deq_rtol(case), Z_FLOOR, **labels)]


def check_cross_values(bk, variant) -> list[Measurement]:
    got = solve_values(bk.name, variant)
    case = variant.case
    out = []
    for peer in peers(bk.name):
        labels = _labels("cross", "values", variant, f"z* vs {peer.name}")
        expected = solve_values(peer.name, variant)
        out.append(compare(got, expected, deq_rtol(case), Z_FLOOR, **labels))
    return out


def check_gradient(bk, variant, mode) -> list[Measurement]:
    got = gradient(bk.name, variant, mode)
    expected, magnitude = reference_gradient(variant.case, mode)
    out = []
    for i, (g, e, m) in enumerate(zip(got, expected, magnitude, strict=True)):
        labels = _labels("reference", mode, variant, f"d/dparams[{i}]")
        out.append(compare(g, e, deq_rtol(variant.case), m, **labels))
    return out


def check_cross_gradient(bk, variant, mode) -> list[Measurement]:
    got = gradient(bk.name, variant, mode)
    _, magnitude = reference_gradient(variant.case, mode)
    out = []
    for peer in peers(bk.name):
        expected = gradient(peer.name, variant, mode)
        for i, (g, e, m) in enumerate(zip(got, expected, magnitude, strict=True)):
            labels = _labels("cross", mode, variant, f"d/dparams[{i}] vs {peer.name}")
            out.append(compare(g, e, deq_rtol(variant.case), m, **labels))
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
        for variant in VARIANTS:
            cells = [("values", variant.ci), ("cross:values", variant.ci)]
            cells += [(f"grad:{m}", m in variant.ci_modes) for m in MODES]
            cells += [(f"cross:{m}", m in variant.ci_modes) for m in MODES]
            for check, ci in cells:
                yield pytest.param(
                    backend_name,
                    variant,
                    check,
                    marks=() if ci else (pytest.mark.slow,),
                    id=f"{backend_name}-{variant.id}-{check}",
                )


@pytest.mark.parametrize(("backend_name", "variant", "check"), list(_cells()))
def test_deq_conformance(backend_name: str, variant: Variant, check: str, record_property):
    bk = backend_or_skip(backend_name)
    report(record_property, CHECK_FUNCTIONS[check](bk, variant))


def _affine_rows(z, params):
    w, b = params
    xp = array_api_compat.array_namespace(z)
    return z @ xp.matrix_transpose(w) + b


# The tolerance of the termination tests below, between the residuals just before the
# termination (0.1 to 1 for Anderson, 3e-4 to 0.4 for Broyden, on these maps) and just after
# it (at most 1e-10).
TERMINATION_TOL = 1e-8


def _solve_affine_map(backend_name: str, n: int, **options) -> int:
    """Iterations of the solve from 0 of an ``n``-dimensional affine map ``z -> W z + b``,
    slow for Picard (eigenvalues out to 0.95 and -0.9, made non-normal), on the backend in
    float64, to :data:`TERMINATION_TOL`; its ``z`` is checked against the exact solution."""
    bk = backend_or_skip(backend_name)
    rng = np.random.default_rng(n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = q @ np.diag(np.linspace(0.95, -0.9, n)) @ q.T + 0.05 * rng.standard_normal((n, n))
    b = rng.standard_normal((1, n))
    with bk.float64():
        f64 = bk.xp.float64
        sol = odecore.solve_fixed_point(
            _affine_rows,
            bk.asarray(np.zeros((1, n)), dtype=f64),
            (bk.asarray(w, dtype=f64), bk.asarray(b, dtype=f64)),
            tol=TERMINATION_TOL,
            max_iter=200,
            batch_axis=0,
            backend=bk.name,
            **options,
        )
        z = to_numpy(bk, sol.z)[0]
    # z* - z = (I - W)^-1 (W z + b - z), and that residual is below the tolerance.
    inverse = np.linalg.inv(np.eye(n) - w)
    error = np.linalg.norm(z - inverse @ b[0])
    assert error <= np.linalg.norm(inverse, ord=2) * TERMINATION_TOL
    return int(to_numpy(bk, sol.iterations)[0])


@pytest.mark.parametrize("n", [4, 7])
@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_anderson_solves_an_affine_map_in_n_plus_one_iterations(backend_name: str, n: int):
    """Unregularised Anderson mixing with a memory beyond the dimension ``n`` is GMRES on an
    affine map ``z -> W z + b`` (Walker and Ni, SIAM J. Numer. Anal. 49(4), 2011): after the
    first plain step, ``n`` mixing steps leave a residual at the level of rounding (1e-14 to
    1e-10 here: the normal equations square the residuals' conditioning). A wrong entry in
    the mixing's normal equations costs it this: it then needs well over a hundred
    iterations on the same map."""
    iterations = _solve_affine_map(backend_name, n, solver="anderson", m=n + 1, lam=0.0)
    assert iterations == n + 1


@pytest.mark.parametrize("n", [3, 4, 7])
@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_broyden_solves_an_affine_map_in_2n_iterations(backend_name: str, n: int):
    """Broyden's good method on a linear system terminates in at most ``2 n`` steps (Gay,
    SIAM J. Numer. Anal. 16(4), 1979), given the memory never to restart (``m >= 2 n``); on
    these maps it takes all ``2 n``. A memory that loses a term (the newest one left unread,
    say) no longer terminates."""
    assert _solve_affine_map(backend_name, n, solver="broyden", m=2 * n) == 2 * n
