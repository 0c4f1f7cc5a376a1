"""Conformance of fixed points: every DEQ case and forward solver, once per backend.

The maps are written against the array API (``array_api_compat.array_namespace``), with
hand-written VJPs for backends without autodiff, so a new backend joins without changes. Its
cells appear in the same summary table as the ODE cases (``conftest.py``).

Checks:

- ``values``: ``z*`` matches the closed form (or a linear solve), with success and the dtype
  kept.
- ``cross-backend``: ``z*`` matches the NumPy backend's to 1e-10 relative.
- ``gradient[implicit/<solver>]``: the loss gradient with respect to every parameter matches
  the implicit-function-theorem gradient computed by a dense linear solve at the reference
  ``z*``. Backends without autodiff get it from ``odecore.vjp_fixed_point``; the others
  through ``Backend.vjp(fn, *primals)``.
- ``gradient[one_step]``: the one-step gradient matches the map's VJP at ``z*`` applied to
  the loss weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import array_api_compat
import numpy as np
import pytest

import odecore
from conformance.test_conformance import backend_or_skip, to_numpy

TOL = 1e-12
RTOL = 1e-9


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

    def reference_vjp(self, z, params, u):
        return (u,)


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

    def reference_vjp(self, z, params, u):
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

    def reference_vjp(self, z, params, u):
        W, U, b, x = params
        c = u * (1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2)
        return (c.T @ z, c.T @ x, c.sum(axis=0), c @ U)


_rng = np.random.default_rng(11)
_W = _rng.standard_normal((4, 4))
_W = 0.7 * _W / np.linalg.norm(_W, 2)


@dataclass(frozen=True, eq=False)  # hashed by identity, for the cached references
class Case:
    name: str
    func: object
    z0: np.ndarray
    params: tuple
    batched: bool
    expected: np.ndarray | None = None  # a closed form, when there is one


CASES = (
    Case(
        "cos+b",
        CosPlusB(),
        np.zeros(1),
        (np.array([0.0]),),
        False,
        np.array([0.7390851332151607]),  # the Dottie number
    ),
    Case(
        "affine",
        Affine(),
        np.zeros((3, 4)),
        (_W, _rng.standard_normal(4)),
        True,
    ),
    Case(
        "tanh",
        Tanh(),
        np.zeros((3, 4)),
        (
            _W,
            0.5 * _rng.standard_normal((4, 2)),
            _rng.standard_normal(4),
            _rng.standard_normal((3, 2)),
        ),
        True,
    ),
)


@dataclass(frozen=True)
class Variant:
    case: Case
    solver: str

    @property
    def id(self) -> str:
        return f"deq-{self.case.name}/{self.solver}"


VARIANTS = tuple(Variant(c, s) for c in CASES for s in ("picard", "anderson", "broyden"))
CHECKS = (
    "values",
    "cross-backend",
    "gradient[implicit/anderson]",
    "gradient[implicit/gmres]",
    "gradient[one_step]",
)


# --------------------------------------------------------------------------------------------
# References, by dense linear algebra on NumPy


def _samples(case):
    return case.z0 if case.batched else case.z0[None]


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


def reference_gradient(case: Case, implicit: bool) -> tuple:
    z = reference_z(case)
    c = loss_weights(case)
    if not implicit:
        return case.func.reference_vjp(z, case.params, c)
    # Per sample, u_i solves u_i (I - J_i) = c_i with J_i the map's Jacobian at z*_i.
    zs, cs = (z, c) if case.batched else (z[None], c[None])
    eye = np.eye(zs.shape[1])
    us = [
        np.linalg.solve((eye - case.func.jacobian(zs[i], case.params, i)).T, cs[i])
        for i in range(zs.shape[0])
    ]
    u = np.stack(us) if case.batched else us[0]
    return case.func.reference_vjp(z, case.params, u)


# --------------------------------------------------------------------------------------------
# odecore on a backend


def inputs(bk, case):
    z0 = bk.asarray(case.z0, dtype=bk.xp.float64)
    params = tuple(bk.asarray(p, dtype=bk.xp.float64) for p in case.params)
    return z0, params


def kwargs(variant: Variant, bk, **extra) -> dict:
    return {
        "solver": variant.solver,
        "tol": TOL,
        "max_iter": 300,
        "batch_axis": 0 if variant.case.batched else None,
        "backend": bk.name,
        **extra,
    }


def solve_values(bk, variant: Variant) -> np.ndarray:
    z0, params = inputs(bk, variant.case)
    sol = odecore.solve_fixed_point(variant.case.func, z0, params, **kwargs(variant, bk))
    assert sol.success, sol.message
    assert sol.z.dtype == bk.xp.float64
    return to_numpy(bk, sol.z)


def odecore_gradient(bk, variant: Variant, backward: str, backward_solver: str) -> tuple:
    case = variant.case
    z0, params = inputs(bk, case)
    w = bk.asarray(loss_weights(case), dtype=bk.xp.float64)
    opts = kwargs(variant, bk, backward=backward, backward_solver=backward_solver)
    if not bk.has_autodiff:
        _, pullback = odecore.vjp_fixed_point(case.func, z0, params, **opts)
        grads = pullback(w)
    else:

        def solve(*params_):
            return odecore.fixed_point(case.func, z0, params_, **opts)

        _, pullback = bk.vjp(solve, *params)
        grads = pullback(w)
    return tuple(to_numpy(bk, g) for g in grads)


def relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def check_values(bk, variant):
    got = solve_values(bk, variant)
    err = relative_error(got, reference_z(variant.case))
    assert err < 1e-10, f"z* off by {err:.2e} relative"


def check_cross_backend(bk, variant):
    if bk.name == "numpy":
        pytest.skip("numpy is the backend the others are compared with")
    ref = solve_values(odecore.get_backend("numpy"), variant)
    err = relative_error(solve_values(bk, variant), ref)
    assert err < 1e-10, f"z* differs from NumPy's by {err:.2e} relative"


def check_gradient(bk, variant, backward, backward_solver="anderson"):
    got = odecore_gradient(bk, variant, backward, backward_solver)
    ref = reference_gradient(variant.case, implicit=backward == "implicit")
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape, f"params[{i}] gradient has shape {g.shape}, expected {r.shape}"
        err = relative_error(g, r)
        assert err < RTOL, f"params[{i}] gradient off by {err:.2e} relative"


CHECK_FUNCTIONS = {
    "values": check_values,
    "cross-backend": check_cross_backend,
    "gradient[implicit/anderson]": functools.partial(check_gradient, backward="implicit"),
    "gradient[implicit/gmres]": functools.partial(
        check_gradient, backward="implicit", backward_solver="gmres"
    ),
    "gradient[one_step]": functools.partial(check_gradient, backward="one_step"),
}
assert tuple(CHECK_FUNCTIONS) == CHECKS


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_deq_conformance(backend_name: str, variant: Variant, check: str) -> None:
    bk = backend_or_skip(backend_name)
    try:
        # As in the ODE suite: the cases are float64, which JAX only has inside float64().
        with bk.float64():
            CHECK_FUNCTIONS[check](bk, variant)
    except NotImplementedError as exc:
        # A backend the fixed point does not support yet says so with this error; its cells
        # are skipped with the message rather than failed.
        if "fixed points on the" not in str(exc) and "backward_solver='gmres'" not in str(exc):
            raise
        pytest.skip(str(exc))
