"""The backends' stage stores against the portable reference,
``odecore.solvers.stage_stores.ListStages``.

A store decides how a Runge-Kutta step combines its stages (NumPy: one buffer and dot
products, kept for the whole solve; torch: stacked tensors). Whatever it does, a step through
it must give the reference's new state, stages and error estimates to rounding, for every
method, one sample (``h`` a Python float) or a batch (one ``h`` per sample), and over
consecutive steps of one solve, which reuse the store.
"""

from __future__ import annotations

import numpy as np
import pytest

import odecore
from odecore.solvers.explicit_rk import prepared
from odecore.solvers.stage_stores import ListStages
from odecore.tableaus import TABLEAUS


def rhs(t, y):
    # Nonlinear, non-autonomous, couples the components: every stage differs.
    return np.sin(y[..., ::-1]) * (1.0 + 0.3 * np.asarray(t)[..., None]) - 0.5 * y


def steps(method, store, y0, t0, h, count):
    """``count`` consecutive steps through ``store``, each a different size (a store that
    kept the last step's scaled weights would show): each step's (y_new, ks, err, err2)."""
    rk = prepared(TABLEAUS[method])
    out, t, y = [], t0, y0
    for i in range(count):
        h = h * (1.0 + 0.3 * i)
        hy = h if isinstance(h, float) else h[:, None]
        result = rk.step(rhs, t, y, rhs(t, y), h, hy, store)
        out.append(result)
        t, y = t + h, result[0]
    return out


def rounding_bound(method, y, ks, h):
    """How far two summation orders of one step may differ, absolutely.

    Every combination the step makes (a stage input, the new state, an error estimate) sums at
    most ``stages + 1`` terms, ``y`` and ``h w_j K_j``. Two orders of summing ``n`` terms
    differ by at most about ``n eps`` times the sum of their magnitudes. A stage input's
    difference reaches later stages through ``rhs``, whose Lipschitz constant is below 1.7
    here (``|d sin| <= 1`` times ``1 + 0.3 t <= 1.2``, plus 0.5); a factor of 4 covers that
    and the small further growth through the stages (``h |a_ij| L`` stays below 0.5).
    """
    rk = prepared(TABLEAUS[method])
    weight_sum = max(sum(abs(w) for w in row.dense) for row in rk.step_rows)
    largest_k = max(float(np.max(np.abs(np.asarray(k)))) for k in ks)
    magnitude = float(np.max(np.abs(y))) + float(np.max(np.abs(h))) * weight_sum * largest_k
    return 4 * (rk.stages + 1) * np.finfo(np.float64).eps * magnitude


def assert_same_steps(method, got, ref, sizes):
    for (y_g, ks_g, e_g, e2_g), (y_r, ks_r, e_r, e2_r), h in zip(got, ref, sizes, strict=True):
        bound = rounding_bound(method, y_r, ks_r, h)
        np.testing.assert_allclose(y_g, y_r, rtol=0, atol=bound)
        assert len(ks_g) == len(ks_r)
        for k_g, k_r in zip(ks_g, ks_r, strict=True):
            np.testing.assert_allclose(np.asarray(k_g), k_r, rtol=0, atol=bound)
        for a, b in ((e_g, e_r), (e2_g, e2_r)):
            assert (a is None) == (b is None)
            if a is not None:
                # An error estimate is a weighted sum of O(1) stages whose weights sum to
                # zero: the two orders agree to the stages' rounding, not to its own size.
                np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=bound)


def step_sizes(h, count):
    """The sizes ``steps`` takes, for the rounding bounds."""
    sizes = []
    for i in range(count):
        h = h * (1.0 + 0.3 * i)
        sizes.append(h)
    return sizes


@pytest.mark.parametrize("method", odecore.METHODS)
@pytest.mark.parametrize("batched", [False, True], ids=["one sample", "batch"])
def test_numpy_store_matches_the_reference(method, batched):
    from odecore.adapters.numpy import BACKEND

    rk = prepared(TABLEAUS[method])
    if batched:
        y0 = np.array([[0.3, -1.1, 0.7], [2.0, 0.1, -0.4]])
        t0, h = np.array([0.0, 0.5]), np.array([0.05, 0.11])
    else:
        y0, t0, h = np.array([0.3, -1.1, 0.7]), np.asarray(0.0), 0.07
    ref = steps(method, ListStages, y0, t0, h, 3)
    got = steps(method, BACKEND.kernels.stage_store(rk, y0), y0, t0, h, 3)
    assert_same_steps(method, got, ref, step_sizes(h, 3))


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "rk4"])
@pytest.mark.backend("torch")
def test_torch_store_matches_the_reference(method):
    import torch
    from odecore.adapters.torch import BACKEND

    rk = prepared(TABLEAUS[method])
    y0 = np.array([0.3, -1.1, 0.7])

    def torch_rhs(t, y):
        return torch.sin(y.flip(-1)) * (1.0 + 0.3 * t) - 0.5 * y

    out, t, y, h = [], torch.tensor(0.0, dtype=torch.float64), torch.tensor(y0), 0.07
    store = BACKEND.kernels.stage_store(rk, y)
    for i in range(3):
        h = h * (1.0 + 0.3 * i)
        result = rk.step(torch_rhs, t, y, torch_rhs(t, y), h, h, store)
        out.append(
            tuple(
                [r.numpy() for r in x]
                if isinstance(x, list)
                else (None if x is None else x.numpy())
                for x in result
            )
        )
        t, y = t + h, result[0]
    ref = steps(method, ListStages, y0, np.asarray(0.0), 0.07, 3)
    assert_same_steps(method, out, ref, step_sizes(0.07, 3))
