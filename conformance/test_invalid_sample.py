"""One invalid sample in a batch, on every backend: the sample gets status INVALID_INPUT and NaN
outputs, and every other sample is solved as if it were alone; with ``throw=True`` the solve
raises ValueError naming the sample. Eagerly on every backend, and under the backend's
compiler where it has one (``jax.jit``).

Backends are chosen as in ``test_conformance.py`` (``ODECORE_CONFORMANCE_BACKENDS``,
``odecore.get_backend``). References: the closed form of a damped rotation, and each valid
sample solved alone on the same backend (a consistency check of the per-sample stepping).
"""

from __future__ import annotations

import importlib

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
            if bk.name not in COMPILERS:
                pytest.skip(f"the {bk.name!r} backend has no compiler for a whole solve")
            batched = COMPILERS[bk.name]()(batched)
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
