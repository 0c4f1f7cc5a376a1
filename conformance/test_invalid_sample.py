"""One invalid sample in a batch, on every backend: the sample gets status INVALID_INPUT and NaN
outputs, and every other sample is solved as if it were alone; with ``throw=True`` the solve
raises ValueError naming the sample. Eagerly on every backend, and under the backend's
compiler where it has one (``jax.jit``). The same for a fixed point whose start is not
finite in one sample: that sample stops with status NONFINITE, the others iterate as alone.

Backends are chosen as in ``test_conformance.py`` (``ODECORE_CONFORMANCE_BACKENDS``,
``odecore.get_backend``). References: the closed form of a damped rotation, and each valid
sample solved alone on the same backend (a consistency check of the per-sample stepping).
"""

from __future__ import annotations

import importlib

import array_api_compat
import numpy as np
import pytest

import odecore
from conformance.test_conformance import backend_or_skip, to_numpy

# dy/dt = A y: a rotation at unit speed damped at rate 0.1, whose flow is
# exp(-0.1 t) [[cos t, sin t], [-sin t, cos t]].
A = np.array([[-0.1, 1.0], [-1.0, -0.1]])
Y0 = np.array([[1.0, 0.0], [np.nan, 1.0], [0.5, -2.0], [-1.0, 0.25]])
INVALID = 1
TIMES = np.array([0.0, 0.5, 1.7, 3.0])
TOLERANCES = {"rtol": 1e-10, "atol": 1e-12}
# Tracing backends compile a whole solve; each entry returns that backend's compiler.
COMPILERS = {"jax": lambda: importlib.import_module("jax").jit}


def compiled_or_skip(bk, fn):
    """``fn`` under the backend's compiler; skips where the backend has none."""
    if bk.name not in COMPILERS:
        pytest.skip(f"the {bk.name!r} backend has no compiler for a whole solve")
    return COMPILERS[bk.name]()(fn)


def rotation(t, y, params):
    (a,) = params
    return y @ a.T


def rotation_in_place(t, y, dy, p):
    """``rotation`` for backends that compile the dynamics (Numba's subset), with ``A`` row
    by row in ``p``."""
    dy[0] = p[0] * y[0] + p[1] * y[1]
    dy[1] = p[2] * y[0] + p[3] * y[1]


def closed_form(y0: np.ndarray) -> np.ndarray:
    c, s = np.cos(TIMES), np.sin(TIMES)
    decay = np.exp(-0.1 * TIMES)
    return np.stack([decay * (c * y0[0] + s * y0[1]), decay * (-s * y0[0] + c * y0[1])], axis=-1)


def _solve(bk, y0, t, a, **kwargs):
    func, params = rotation, (a,)
    if bk.kernels.solve is not None:
        func, params = rotation_in_place, bk.xp.reshape(a, (-1,))
    return odecore.solve(func, y0, t, params=params, backend=bk.name, **TOLERANCES, **kwargs)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_invalid_sample_does_not_stop_the_others(backend_name: str, compiled: bool) -> None:
    bk = backend_or_skip(backend_name)
    with bk.float64():
        f64 = bk.xp.float64
        y0 = bk.asarray(Y0, dtype=f64)
        t = bk.asarray(TIMES, dtype=bk.time_dtype)
        a = bk.asarray(A, dtype=f64)

        def batched(y0, t, a):
            return _solve(bk, y0, t, a, batch_axis=0, throw=False)

        if compiled:
            batched = compiled_or_skip(bk, batched)
        sol = batched(y0, t, a)
        status = [int(s) for s in to_numpy(bk, sol.status)]
        ys = to_numpy(bk, sol.ys)

        expected_status = [int(odecore.Status.SUCCESS)] * len(Y0)
        expected_status[INVALID] = int(odecore.Status.INVALID_INPUT)
        assert status == expected_status
        assert np.all(np.isnan(ys[:, INVALID]))
        for i in range(len(Y0)):
            if i == INVALID:
                continue
            alone = to_numpy(bk, _solve(bk, y0[i], t, a).ys)
            # Each sample of a batch takes its own steps, the steps it takes alone: the two
            # differ by the rounding of the error norm's sums at most.
            np.testing.assert_allclose(ys[:, i], alone, rtol=1e-12, atol=1e-14)
            # dopri5 at rtol 1e-10 over three time units: a global error within a few hundred
            # times the tolerance.
            np.testing.assert_allclose(ys[:, i], closed_form(Y0[i]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_invalid_sample_raises_with_throw(backend_name: str) -> None:
    bk = backend_or_skip(backend_name)
    with bk.float64():
        f64 = bk.xp.float64
        y0 = bk.asarray(Y0, dtype=f64)
        t = bk.asarray(TIMES, dtype=bk.time_dtype)
        a = bk.asarray(A, dtype=f64)
        with pytest.raises(ValueError, match=rf"1 of 4 samples \(batch_axis=0\): {INVALID};"):
            _solve(bk, y0, t, a, batch_axis=0)
        # A single sample has no others to solve: it raises whatever throw says.
        with pytest.raises(ValueError, match="y0 contains NaN or infinite values"):
            _solve(bk, y0[INVALID], t, a, throw=False)


# z -> tanh(z W^T + x), a contraction (|W|_2 = 0.6, |tanh'| <= 1) with one input row per
# sample; the start of sample NONFINITE_START is NaN.
FP_ROWS, FP_SIZE = 4, 5
NONFINITE_START = 2
FP_TOL = 1e-11


def tanh_layer(z, params):
    w, x = params
    xp = array_api_compat.array_namespace(z)
    return xp.tanh(z @ xp.matrix_transpose(w) + x)


def _fixed_point_inputs():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((FP_SIZE, FP_SIZE))
    w *= 0.6 / np.linalg.norm(w, ord=2)
    x = rng.standard_normal((FP_ROWS, FP_SIZE))
    z0 = rng.standard_normal((FP_ROWS, FP_SIZE))
    z0[NONFINITE_START] = np.nan
    return w, x, z0


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend_name", odecore.BACKEND_NAMES)
def test_non_finite_start_does_not_disturb_the_other_samples(
    backend_name: str, compiled: bool, solver: str
) -> None:
    bk = backend_or_skip(backend_name)
    with bk.float64():
        w_np, x_np, z0_np = _fixed_point_inputs()
        w, x, z0 = (bk.asarray(a, dtype=bk.xp.float64) for a in (w_np, x_np, z0_np))

        def solve(z0, w, x):
            return odecore.solve_fixed_point(
                tanh_layer,
                z0,
                (w, x),
                solver=solver,
                tol=FP_TOL,
                batch_axis=0,
                throw=False,
                backend=bk.name,
            )

        batched = compiled_or_skip(bk, solve) if compiled else solve
        sol = batched(z0, w, x)
        status = [int(s) for s in to_numpy(bk, sol.status)]
        z = to_numpy(bk, sol.z)
        iterations = to_numpy(bk, sol.iterations)

        expected_status = [int(odecore.FixedPointStatus.CONVERGED)] * FP_ROWS
        expected_status[NONFINITE_START] = int(odecore.FixedPointStatus.NONFINITE)
        assert status == expected_status
        assert iterations[NONFINITE_START] == 0
        for i in range(FP_ROWS):
            if i == NONFINITE_START:
                continue
            alone = solve(z0[i : i + 1], w, x[i : i + 1])
            # Every sample mixes only its own memory: the batch takes each one's own
            # iterations, and differs from it by the rounding of batched products at most.
            assert iterations[i] == int(to_numpy(bk, alone.iterations)[0])
            np.testing.assert_allclose(z[i], to_numpy(bk, alone.z)[0], rtol=0, atol=1e-13)
            # A residual below tol puts z within tol / (1 - 0.6) of the fixed point.
            residual = np.tanh(w_np @ z[i] + x_np[i]) - z[i]
            assert np.linalg.norm(residual) <= FP_TOL * (1 + 1e-6)
