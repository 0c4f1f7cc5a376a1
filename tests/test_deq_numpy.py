"""Fixed points on NumPy: the forward solvers, the per-sample bookkeeping, and gradients from
``odecore.vjp_fixed_point`` with the map's own VJP.

References: closed forms (the Dottie number, sqrt 2, ``(I - W)^{-1} b`` and its gradient
``(I - W)^{-T} 1``, ``1 / (1 + sin z*)``), plain iteration to machine precision, and central
finite differences in float64.
"""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from deq_cases import (
    B_VEC,
    COS_FIXED_POINT,
    Z0,
    Affine,
    CosPlusB,
    Tanh,
    U,
    W,
    X,
    implicit_fd_gradient,
    relative_error,
    tanh_loss_weights,
    tanh_params,
    unrolled_fd_gradient,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import odecore

SOLVERS = ("picard", "anderson", "broyden")
TIGHT = {"tol": 1e-12, "max_iter": 300}


# ---------------------------------------------------------------------------------------------
# Forward: analytic fixed points
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_cos_fixed_point(solver):
    sol = odecore.solve_fixed_point(np.cos, np.array([1.0]), solver=solver, **TIGHT)
    assert sol.success, sol.message
    assert abs(sol.z[0] - COS_FIXED_POINT) < 1e-11
    assert sol.abs_residual[0] <= 1e-12
    assert sol.stats["nfev"] == sol.iterations[0] + 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_babylonian_square_root(solver):
    z0 = np.array([[1.0], [3.0], [0.5]])
    sol = odecore.solve_fixed_point(
        lambda z: (z + 2.0 / z) / 2.0, z0, solver=solver, batch_axis=0, **TIGHT
    )
    assert sol.success, sol.message
    np.testing.assert_allclose(sol.z[:, 0], np.sqrt(2.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_affine_fixed_point_is_the_linear_solve(solver):
    b = np.stack([B_VEC, -B_VEC, 2 * B_VEC])
    sol = odecore.solve_fixed_point(Affine(), Z0, (W, b), solver=solver, batch_axis=0, **TIGHT)
    expected = np.linalg.solve(np.eye(W.shape[0]) - W, b.T).T
    assert sol.success, sol.message
    assert relative_error(sol.z, expected) < 1e-10


def test_anderson_and_broyden_beat_picard_on_a_slow_contraction():
    # Dominant eigenvalue 0.95: Picard needs hundreds of iterations, the accelerated solvers
    # far fewer.
    Q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((4, 4)))
    Wslow = Q @ np.diag([0.95, 0.9, -0.8, 0.5]) @ Q.T
    b = np.stack([B_VEC])
    counts = {
        s: int(
            odecore.solve_fixed_point(
                Affine(), Z0[:1], (Wslow, b), solver=s, m=8, batch_axis=0, tol=1e-10, max_iter=2000
            ).iterations[0]
        )
        for s in SOLVERS
    }
    assert counts["anderson"] < counts["picard"] / 5
    assert counts["broyden"] < counts["picard"] / 5


def _dense_broyden_trace(g, z, m, iterations):
    """The residual norms of 'good' Broyden on one sample, with its inverse Jacobian kept
    as a dense matrix: H = -I, then H + u v^T per iteration with v = H^T dz and
    u = (dz - H dr) / (v . dr), which makes H' dr = dz; after m updates the memory restarts:
    H = -I, and the update is computed on it, so that the secant condition holds there too."""
    n = z.shape[0]
    H = -np.eye(n)
    gz = g(z)
    trace = [np.linalg.norm(gz - z)]
    for k in range(iterations):
        z_new = z - H @ (gz - z)
        gz_new = g(z_new)
        dz, dr = z_new - z, (gz_new - z_new) - (gz - z)
        if k % m == 0 and k > 0:
            H = -np.eye(n)
        v = H.T @ dz
        u = (dz - H @ dr) / (v @ dr)
        H = H + np.outer(u, v)
        z, gz = z_new, gz_new
        trace.append(np.linalg.norm(gz - z))
    return np.array(trace)


def test_broyden_takes_the_textbook_steps_through_restarts():
    """Every iteration's residual equals a dense-matrix Broyden's, over several restarts of
    a memory of 3 terms. The solver keeps H as a sum of rank-one terms and carries H r from
    one iteration to the next rather than applying H to it again; the iterates may differ
    only by rounding, which a contraction of norm 0.9 does not amplify beyond a few orders
    of magnitude over the first 20 iterations (residuals above 1e-8 compared)."""
    rng = np.random.default_rng(5)
    n = 12
    Wn = rng.standard_normal((n, n))
    Wn *= 0.9 / np.linalg.norm(Wn, 2)
    x = rng.standard_normal((2, n))
    z0 = np.zeros((2, n))
    sol = odecore.solve_fixed_point(
        lambda z, x: np.tanh(z @ Wn.T + x), z0, x, solver="broyden", m=3, batch_axis=0,
        tol=1e-14, max_iter=20, stop_mode="abs", throw=False,
    )  # fmt: skip
    for b, x_b in enumerate(x):
        expected = _dense_broyden_trace(lambda z, x_b=x_b: np.tanh(Wn @ z + x_b), z0[b], 3, 20)
        got = np.asarray(sol.trace)[: len(expected), b]
        compared = expected > 1e-8
        assert compared.sum() >= 8  # several restarts (every 3 iterations) are compared
        np.testing.assert_allclose(got[compared], expected[compared], rtol=1e-6)


@pytest.mark.parametrize("m", [1, 2])
def test_broyden_with_a_short_memory_converges_on_a_contraction(m):
    # At a restart the new term had been built on the inverse it replaced and added to -I,
    # which broke the secant condition: with m = 1 (a restart every iteration) Broyden
    # diverged to inf on this contraction of spectral radius 0.9, and blamed f.
    rng = np.random.default_rng(0)
    n = 6
    A = rng.standard_normal((n, n))
    A *= 0.9 / max(abs(np.linalg.eigvals(A)))
    b = rng.standard_normal(n)
    sol = odecore.solve_fixed_point(
        lambda z, p: p[0] @ z + p[1], np.zeros(n), (A, b), solver="broyden", m=m, tol=1e-10,
        max_iter=500,
    )  # fmt: skip
    # The residual bound 1e-10 leaves at most ||(I - A)^-1|| 1e-10 of error.
    bound = 1e-10 * np.linalg.norm(np.linalg.inv(np.eye(n) - A), 2)
    assert np.abs(sol.z - np.linalg.solve(np.eye(n) - A, b)).max() <= bound


def test_damped_picard_is_the_damped_iteration():
    z0 = np.array([1.0])
    sol = odecore.solve_fixed_point(
        np.cos, z0, solver="picard", damping=0.5, max_iter=3, tol=1e-30, throw=False
    )
    z = z0
    for _ in range(3):
        z = 0.5 * z + 0.5 * np.cos(z)
    # Each damped iterate is closer, so the best iterate is the last.
    assert sol.z[0] == z[0]
    assert sol.iterations[0] == 3


def test_relative_stopping_mode():
    scale = 1e6
    sol = odecore.solve_fixed_point(
        lambda z: scale * np.cos(z / scale), np.array([scale]), stop_mode="rel", tol=1e-10
    )
    assert sol.success
    assert sol.rel_residual[0] <= 1e-10
    assert sol.abs_residual[0] > 1e-10  # the absolute residual is larger: rel is what stopped
    assert abs(sol.z[0] / scale - COS_FIXED_POINT) < 1e-9


# ---------------------------------------------------------------------------------------------
# Per-sample behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_equals_each_sample_alone(solver):
    params = tanh_params()
    z0 = np.stack([np.zeros(4), np.ones(4), -2 * np.ones(4)])
    batch = odecore.solve_fixed_point(Tanh(), z0, params, solver=solver, batch_axis=0, tol=1e-10)
    assert batch.success
    for i in range(3):
        alone = odecore.solve_fixed_point(
            Tanh(),
            z0[i : i + 1],
            params[:3] + (X[i : i + 1],),
            solver=solver,
            batch_axis=0,
            tol=1e-10,
        )
        np.testing.assert_allclose(batch.z[i], alone.z[0], rtol=0, atol=1e-14)
        assert batch.iterations[i] == alone.iterations[0]
        assert batch.status[i] == alone.status[0]


def test_converged_sample_stops_changing():
    # Sample 0 starts at the fixed point, sample 1 far from it.
    z0 = np.array([[COS_FIXED_POINT], [3.0]])
    sol = odecore.solve_fixed_point(
        np.cos, z0, batch_axis=0, solver="picard", tol=1e-9, throw=False
    )
    assert sol.iterations[0] == 0 and sol.iterations[1] > 10
    assert sol.z[0, 0] == COS_FIXED_POINT
    # The residual trace of the finished sample is NaN from its first idle iteration on.
    assert np.isnan(sol.trace[1:, 0]).all() and np.isfinite(sol.trace[:, 1]).all()


def test_non_convergent_map_reports_max_iter():
    # z -> -z + 1 oscillates forever between z0 and 1 - z0: the residual never shrinks.
    sol = odecore.solve_fixed_point(
        lambda z: 1.0 - z, np.array([0.0]), solver="picard", max_iter=25, tol=1e-8, throw=False
    )
    assert not sol.success
    assert sol.status[0] == odecore.FixedPointStatus.MAX_ITER_REACHED
    assert sol.iterations[0] == 25
    assert sol.abs_residual[0] == 1.0 and np.isfinite(sol.z).all()
    assert "max_iter" in sol.message
    assert sol.trace.shape == (26, 1)


def test_memory_follows_the_iterations_taken_not_max_iter():
    # The residual trace was allocated for max_iter + 1 rows up front: max_iter=10**5 on a
    # batch of 64 took 51 MB for a solve of ten iterations, and 10**6 half a gigabyte.
    tracemalloc.start()
    try:
        sol = odecore.solve_fixed_point(
            lambda z, p: 0.5 * z + p,
            np.zeros((64, 8)),
            np.ones((64, 8)),
            batch_axis=0,
            tol=1e-10,
            max_iter=10**5,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sol.success and np.abs(sol.z - 2.0).max() <= 2e-10
    # The batch's own arrays (64 x 8 float64: 4 kB each; Anderson's memory of 5 pairs,
    # 41 kB) and a trace that doubles from 64 rows stay far below a megabyte.
    assert peak < 2**20, peak
    # The trace still reports every iteration: row 0 is the start, |p| = sqrt(8).
    assert sol.trace.shape == (int(sol.iterations.max()) + 1, 64)
    np.testing.assert_allclose(sol.trace[0], np.sqrt(8.0), rtol=1e-15)


def test_a_trace_longer_than_its_first_buffer_holds_every_iteration():
    # Picard on z -> 0.97 z + 1 from 0: the residual after k iterations is 0.97^k, past the
    # 64 rows an eager trace starts with.
    sol = odecore.solve_fixed_point(
        lambda z: 0.97 * z + 1.0, np.zeros(1), solver="picard", tol=1e-9, max_iter=2000
    )
    k = np.arange(sol.trace.shape[0])
    assert sol.trace.shape[0] == int(sol.iterations[0]) + 1 > 200
    # z_k = (1 - 0.97^k) / 0.03 is about 33; its rounding, 33 * 2^-53 per step, bounds the
    # residual's absolute error.
    assert np.abs(sol.trace[:, 0] - 0.97**k).max() < 1e-13


def test_best_iterate_is_returned_not_the_last():
    # z -> 2z diverges from its fixed point 0: the start is the best iterate.
    sol = odecore.solve_fixed_point(
        lambda z: 2.0 * z, np.array([1.0]), solver="picard", max_iter=5, throw=False
    )
    assert sol.z[0] == 1.0
    assert sol.abs_residual[0] == 1.0
    assert sol.trace[-1, 0] == 32.0  # the last iterate, 32, had residual 32


class Doubling:
    """``z -> 2 z + 1``: its fixed point -1 repels, so Picard from 0 runs away and its best
    iterate stays the start, with residual ``|f(0) - 0| = 1`` per component."""

    def __call__(self, z, params=None):
        return 2.0 * z + 1.0

    def vjp(self, z, params, cot):
        return 2.0 * cot, None


@pytest.mark.parametrize("entry", ["fixed_point", "solve_fixed_point", "vjp_fixed_point"])
def test_unconverged_solve_raises_with_residual_and_iterations(entry):
    with pytest.raises(odecore.FixedPointError) as info:
        getattr(odecore, entry)(Doubling(), np.zeros(2), solver="picard", max_iter=5)
    message = str(info.value)
    # The best iterate is z0 = 0: residual |(1, 1)| = sqrt(2), printed to 6 digits.
    assert f"residual ||f(z) - z|| = {np.sqrt(2.0):.6g} (tol 1e-06)" in message
    assert "after 5 iterations" in message and "max_iter reached" in message
    assert "throw=False" in message
    assert isinstance(info.value, odecore.SolveError) and isinstance(info.value, RuntimeError)
    solution = info.value.solution
    np.testing.assert_array_equal(solution.z, [0.0, 0.0])
    assert solution.status.tolist() == [odecore.FixedPointStatus.MAX_ITER_REACHED]


@pytest.mark.parametrize(
    ("solver", "suggested"),
    [("picard", "'anderson' or 'broyden'"), ("anderson", "'broyden'"), ("broyden", "'anderson'")],
)
def test_unconverged_solve_suggests_the_other_solvers(solver, suggested):
    # A map with no fixed point near z0 that any of them finds in three iterations.
    def wild(z):
        return 3.0 * np.sin(z) + 5.0 * np.cos(7.0 * z) + 1.0

    with pytest.raises(odecore.FixedPointError) as info:
        odecore.fixed_point(wild, np.ones(2), solver=solver, max_iter=3)
    assert f"({solver}) did not converge" in str(info.value)
    assert f"try solver={suggested}, or check" in str(info.value)


def test_unconverged_batch_names_the_failed_samples():
    # z -> a z + 1 per sample: a = 0.5 contracts to 1 / (1 - a) = 2, a = 2 runs away from 0.
    a = np.array([[0.5], [2.0], [0.5], [2.0]])
    with pytest.raises(odecore.FixedPointError) as info:
        odecore.fixed_point(
            lambda z: a * z + 1.0, np.zeros((4, 1)), solver="picard", batch_axis=0, tol=1e-12
        )
    message = str(info.value)
    assert "for 2 of 4 samples (indices 1, 3)" in message
    assert "sample 1 has residual ||f(z) - z|| = 1 (tol 1e-12) after 50 iterations" in message
    solution = info.value.solution
    assert solution.status.tolist() == [0, 1, 0, 1]
    # Converged: residual 2^-k <= 1e-12, so the error 2 * residual is at most 2e-12.
    np.testing.assert_allclose(solution.z[[0, 2], 0], 2.0, rtol=0, atol=2e-12)
    np.testing.assert_array_equal(solution.z[[1, 3], 0], 0.0)


def test_unconverged_batch_lists_the_first_ten_failed_indices():
    a = np.full((13, 1), 2.0)
    a[0] = 0.5
    with pytest.raises(odecore.FixedPointError, match="for 12 of 13 samples") as info:
        odecore.fixed_point(lambda z: a * z + 1.0, np.zeros((13, 1)), solver="picard", batch_axis=0)
    assert "(indices 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)" in str(info.value)


def test_non_finite_map_raises_naming_the_cause():
    # A map that grows its iterates until they overflow is named, beside one returning NaN.
    # 1.5^n overflows at n = 1751.
    with pytest.raises(odecore.FixedPointError, match=r"or the iterates grew until they over"):
        with np.errstate(over="ignore", invalid="ignore"):
            odecore.fixed_point(
                lambda z: 1.5 * z + 1.0, np.array([1.0]), solver="picard", max_iter=2000
            )
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(odecore.FixedPointError, match="non-finite residual") as info:
            odecore.fixed_point(lambda z: z * z + 1.0, np.array([2.0]), solver="picard")
    # The best iterate is the start: z^2 + 1 - z grows with z beyond 1/2.
    assert info.value.solution.z.tolist() == [2.0]
    assert "residual ||f(z) - z|| = 3 " in str(info.value)


def test_relative_mode_failure_names_the_relative_residual():
    with pytest.raises(odecore.FixedPointError) as info:
        odecore.fixed_point(
            Doubling(), np.zeros(1), solver="picard", stop_mode="rel", max_iter=3, tol=1e-3
        )
    # Picard from 0 gives z_k = 2^k - 1, whose relative residual 2^k / (2^(k+1) - 1) falls
    # towards 1/2: the best iterate is the last, z_3, with 8/15.
    expected = f"residual ||f(z) - z|| / ||f(z)|| = {8 / 15:.6g} (tol 0.001) after 3 iterations"
    assert expected in str(info.value)


@pytest.mark.parametrize("solver", SOLVERS)
def test_map_without_real_fixed_point_gets_a_status_not_an_exception(solver):
    # z -> z^2 + 1 has no real fixed point: Picard overflows, the others may wander; either
    # way the solve ends with a failure status and finite best iterates and residuals.
    with np.errstate(over="ignore", invalid="ignore"):
        sol = odecore.solve_fixed_point(
            lambda z: z * z + 1.0,
            np.array([[2.0], [3.0]]),
            batch_axis=0,
            solver=solver,
            max_iter=60,
            throw=False,
        )
    failed = (odecore.FixedPointStatus.NONFINITE, odecore.FixedPointStatus.MAX_ITER_REACHED)
    assert all(int(s) in failed for s in sol.status)
    assert np.isfinite(sol.z).all() and np.isfinite(sol.abs_residual).all()
    assert (sol.abs_residual >= 0.75).all()  # z^2 + 1 - z >= 3/4 everywhere
    if solver == "picard":
        assert (sol.status == odecore.FixedPointStatus.NONFINITE).all()
        assert "non-finite" in sol.message


def test_anderson_survives_a_singular_system():
    # A constant map: every stored residual after the first is the same vector, and once the
    # iterate lands the residuals are exactly zero; the mixing system must not break.
    sol = odecore.solve_fixed_point(lambda z: np.ones_like(z) * 0.25, np.zeros(3), m=4, lam=0.0)
    assert sol.success
    np.testing.assert_array_equal(sol.z, 0.25)


@pytest.mark.parametrize("m", [3, 5])
def test_unregularised_anderson_with_more_pairs_than_directions(m):
    # Sample 0's two components follow one map from one start, so its residuals all lie
    # along (1, 1): with lam=0 and three stored pairs its mixing system is singular, and
    # NumPy's solve raised LinAlgError at every iteration. The singular sample now takes a
    # plain step, as on JAX, and sample 1 keeps its own mixing.
    c = np.array([[1.0, 1.0], [1.0, 0.5]])
    sol = odecore.solve_fixed_point(
        lambda z, c: np.cos(c * z), np.zeros((2, 2)), c, m=m, lam=0.0, batch_axis=0, **TIGHT
    )
    # The reference: plain iteration, a contraction (|c sin(c z*)| < 0.7), to a fixed point
    # of floating point.
    z = np.zeros((2, 2))
    for _ in range(200):
        z = np.cos(c * z)
    assert abs(z[0, 0] - COS_FIXED_POINT) < 1e-15
    # |z - z*| <= tol / (1 - 0.7) per sample.
    assert np.abs(sol.z - z).max() < 1e-12 / 0.3
    one = odecore.solve_fixed_point(np.cos, np.zeros(1), m=m, lam=0.0, **TIGHT)
    assert abs(one.z[0] - COS_FIXED_POINT) < 1e-12 / 0.3


@pytest.mark.parametrize("m", [2, 3, 4])
def test_unregularised_anderson_batch_whose_samples_stop_at_different_iterations(m):
    # The second sample converges first; its memory then fills with copies of one residual,
    # a rank-one Gram matrix, and with lam=0 NumPy's solve raised LinAlgError for the whole
    # batch, though each sample alone converges.
    b = np.stack([B_VEC, 1e-6 * B_VEC])
    options = {"m": m, "lam": 0.0, "batch_axis": 0, **TIGHT}
    sol = odecore.solve_fixed_point(Affine(), np.zeros((2, 4)), (W, b), **options)
    expected = np.linalg.solve(np.eye(4) - W, b.T).T
    # |z - z*| <= tol / (1 - |W|) per sample.
    assert np.abs(sol.z - expected).max() <= 1e-12 / 0.4
    alone = [
        odecore.solve_fixed_point(Affine(), np.zeros((1, 4)), (W, row[None]), **options)
        for row in b
    ]
    assert int(sol.iterations[1]) < int(sol.iterations[0])
    assert sol.iterations.tolist() == [int(one.iterations[0]) for one in alone]


# ---------------------------------------------------------------------------------------------
# Gradients: closed forms, finite differences, one step, unrolled
# ---------------------------------------------------------------------------------------------

BACKWARD_SOLVERS = ("picard", "anderson", "broyden", "gmres")


@pytest.mark.parametrize("backward_solver", BACKWARD_SOLVERS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_affine_implicit_gradient_closed_form(solver, backward_solver):
    b = B_VEC[None, :]
    sol, pullback = odecore.vjp_fixed_point(
        Affine(),
        Z0[:1],
        (W, b),
        solver=solver,
        backward_solver=backward_solver,
        batch_axis=0,
        **TIGHT,
    )
    W_bar, b_bar = pullback(np.ones_like(sol.z))
    expected_b = np.linalg.solve((np.eye(4) - W).T, np.ones(4))
    assert relative_error(b_bar[0], expected_b) < 1e-9
    z_star = np.linalg.solve(np.eye(4) - W, B_VEC)
    assert relative_error(W_bar, np.outer(expected_b, z_star)) < 1e-9
    assert sol.stats["backward_status"].tolist() == [0]


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("backward_solver", BACKWARD_SOLVERS)
def test_cos_plus_b_implicit_derivative(backward_solver, stop_mode):
    b = np.array([0.3])
    sol, pullback = odecore.vjp_fixed_point(
        CosPlusB(),
        np.array([0.0]),
        (b,),
        backward_solver=backward_solver,
        stop_mode=stop_mode,
        **TIGHT,
    )
    (b_bar,) = pullback(np.array([1.0]))
    z = sol.z[0]
    assert abs(z - np.cos(z) - 0.3) < 1e-12
    assert abs(b_bar[0] - 1.0 / (1.0 + np.sin(z))) < 1e-10


@pytest.mark.parametrize("backward_solver", BACKWARD_SOLVERS)
def test_implicit_gradient_of_a_small_cotangent_is_as_accurate_as_of_a_large_one(backward_solver):
    # The backward's residual was measured absolutely: a cotangent below backward_tol (a
    # loss scaled down, a mean over a large batch) stopped at the start u = 0, a zero
    # gradient. Its accuracy is now relative to the cotangent's norm, per sample.
    sol, pullback = odecore.vjp_fixed_point(
        Affine(),
        Z0[:2],
        (W, np.stack([B_VEC, -B_VEC])),
        backward_solver=backward_solver,
        batch_axis=0,
        **TIGHT,
    )
    # The second sample's cotangent is 2^-50 of the first's: far below backward_tol = 1e-12.
    w = np.stack([np.ones(4), 2.0**-50 * np.array([1.0, -2.0, 0.5, 3.0])])
    _, b_bar = pullback(w)
    expected = np.linalg.solve(np.eye(4) - W.T, w.T).T
    # |u - u_exact| <= |residual| / (1 - |W|) <= 1e-12 |w| / 0.4 per sample.
    for got, ref in zip(b_bar, expected, strict=True):
        assert relative_error(got, ref) < 1e-10
    # The solve is linear in w: scaling a cotangent by a power of two scales its gradient
    # exactly.
    _, b_bar_unscaled = pullback(np.stack([w[0], 2.0**50 * w[1]]))
    assert np.array_equal(b_bar[1], 2.0**-50 * b_bar_unscaled[1])


@pytest.mark.parametrize(
    "solver,backward_solver", list(itertools.product(SOLVERS, BACKWARD_SOLVERS))
)
def test_implicit_gradient_matches_finite_differences(solver, backward_solver):
    sol, pullback = odecore.vjp_fixed_point(
        Tanh(),
        Z0,
        tanh_params(),
        solver=solver,
        backward_solver=backward_solver,
        batch_axis=0,
        **TIGHT,
    )
    grads = pullback(tanh_loss_weights())
    for got, ref, name in zip(grads, implicit_fd_gradient(), ("W", "U", "b", "x"), strict=True):
        assert relative_error(got, ref) < 1e-7, name


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward,k,d", [("one_step", 1, 1.0), ("unrolled", 4, 0.7)])
def test_one_step_and_unrolled_match_finite_differences(solver, backward, k, d):
    kwargs = {} if backward == "one_step" else {"unroll_steps": k, "unroll_damping": d}
    _, pullback = odecore.vjp_fixed_point(
        Tanh(),
        Z0,
        tanh_params(),
        solver=solver,
        backward=backward,
        batch_axis=0,
        **TIGHT,
        **kwargs,
    )
    grads = pullback(tanh_loss_weights())
    for got, ref in zip(grads, unrolled_fd_gradient(k, d), strict=True):
        # z* is the solver's to 1e-12, the FD map's to machine precision.
        assert relative_error(got, ref) < 1e-7


def test_one_step_is_exactly_one_vjp_and_differs_from_implicit():
    c = tanh_loss_weights()
    sol, pullback = odecore.vjp_fixed_point(
        Tanh(), Z0, tanh_params(), backward="one_step", batch_axis=0, **TIGHT
    )
    grads = pullback(c)
    _, expected = Tanh().vjp(sol.z, tanh_params(), c)
    for got, ref in zip(grads, expected, strict=True):
        np.testing.assert_array_equal(got, ref)
    _, implicit_pullback = odecore.vjp_fixed_point(Tanh(), Z0, tanh_params(), batch_axis=0, **TIGHT)
    assert relative_error(grads[0], implicit_pullback(c)[0]) > 0.05


def test_unrolled_converges_to_implicit():
    c = tanh_loss_weights()
    _, implicit = odecore.vjp_fixed_point(Tanh(), Z0, tanh_params(), batch_axis=0, **TIGHT)
    ref = implicit(c)[2]
    errors = []
    for k in (1, 5, 20, 60):
        _, pb = odecore.vjp_fixed_point(
            Tanh(), Z0, tanh_params(), backward="unrolled", unroll_steps=k, batch_axis=0, **TIGHT
        )
        errors.append(relative_error(pb(c)[2], ref))
    # Until the last, which is at rounding level, each longer unroll is closer.
    assert errors[:3] == sorted(errors[:3], reverse=True)
    assert errors[-1] < 1e-9 < errors[0]


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_spectral_radius_of_a_symmetric_map():
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    S = Q @ np.diag([0.9, -0.5, 0.3, 0.1]) @ Q.T
    rho = odecore.spectral_radius(Affine(), np.zeros(4), (S, B_VEC), iterations=200)
    assert abs(rho - 0.9) < 1e-8


# The dominant eigenvalues a complex pair, 0.3 +- 0.225i (modulus 0.375), the third real
# (0.2): the power iteration turns in the pair's plane and its growth does not settle.
ROTATING = np.array([[0.2, -0.3, 0.1], [0.25, 0.35, 0.0], [0.05, 0.1, -0.2]])


@pytest.mark.parametrize("iterations", [20, 40])
def test_spectral_radius_of_a_complex_dominant_pair(iterations):
    moduli = np.sort(np.abs(np.linalg.eigvals(ROTATING)))
    rho = odecore.spectral_radius(
        Affine(), np.zeros(3), (ROTATING, np.zeros(3)), iterations=iterations
    )
    # What is left of the third eigenvector shrinks as (0.2 / 0.375)^k: 3e-6 at k = 20.
    assert abs(rho - moduli[-1]) < 50 * (moduli[0] / moduli[-1]) ** iterations


def test_spectral_radius_of_a_real_dominant_eigenvalue_beside_a_complex_pair():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((5, 5))
    blocks = np.diag([0.9, 0.5, 0.5, 0.2, 0.1])
    blocks[1, 2], blocks[2, 1] = 0.2, -0.2  # the pair 0.5 +- 0.2i
    jac = basis @ blocks @ np.linalg.inv(basis)
    rho = odecore.spectral_radius(Affine(), np.zeros(5), (jac, np.zeros(5)), iterations=100)
    assert abs(rho - 0.9) < 1e-9


def test_jacobian_frobenius_needs_autodiff_on_numpy():
    with pytest.raises(TypeError, match="needs autodiff"):
        odecore.jacobian_frobenius(Affine(), np.zeros(4), (W, B_VEC), probe=np.ones(4))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "newton"}, "unknown solver 'newton'"),
        ({"m": 0}, "m must be an integer >= 1"),
        ({"tol": -1e-6}, "tol must lie in"),
        ({"tol": 0.0}, "tol must lie in"),
        ({"backward": "adjoint"}, "unknown backward 'adjoint'"),
        ({"backward_solver": "cg"}, "unknown backward_solver 'cg'"),
        ({"stop_mode": "max"}, "unknown stop_mode"),
        ({"max_iter": 0}, "max_iter must be"),
        ({"beta": 1.5}, "beta must lie in"),
        ({"damping": 0.0}, "damping must lie in"),
        ({"lam": -1.0}, "lam must lie in"),
        ({"backward": "one_step", "unroll_steps": 3}, "use backward='unrolled'"),
        ({"batch_axis": 1}, "batch_axis must be None"),
    ],
)
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        odecore.solve_fixed_point(np.cos, np.zeros((2, 2)), **kwargs)


@pytest.mark.parametrize(
    "kwargs,name,remedy",
    [
        ({"unroll_steps": 10}, "unroll_steps", "backward='unrolled'"),
        ({"unroll_damping": 0.5}, "unroll_damping", "backward='unrolled'"),
        ({"solver": "anderson", "damping": 0.5}, "damping", "solver='picard'"),
        ({"solver": "broyden", "damping": 0.5}, "damping", "solver='picard'"),
        ({"solver": "picard", "backward": "one_step", "beta": 0.5}, "beta", "solver='anderson'"),
        (
            {"solver": "broyden", "backward_solver": "gmres", "lam": 1e-2},
            "lam",
            "solver='anderson'",
        ),
        ({"solver": "picard", "backward_solver": "picard", "m": 3}, "m", "solver='anderson'"),
        ({"backward": "one_step", "backward_solver": "gmres"}, "backward_solver", "'implicit'"),
        ({"backward": "unrolled", "backward_tol": 1e-3}, "backward_tol", "'implicit'"),
        ({"backward": "one_step", "backward_max_iter": 9}, "backward_max_iter", "'implicit'"),
        (
            {"backward": "unrolled", "backward_linearization": "per_iteration"},
            "backward_linearization",
            "'implicit'",
        ),
    ],
)
@pytest.mark.parametrize("entry", ["fixed_point", "solve_fixed_point", "vjp_fixed_point"])
def test_an_option_the_solve_would_not_read_is_refused(entry, kwargs, name, remedy):
    # These were accepted and ignored: unroll_steps=10 without backward='unrolled' left the
    # implicit gradient in place, damping passed to Anderson did not damp.
    with pytest.raises(ValueError, match=rf"^{name}=.* would have no effect: .*pass .*{remedy}"):
        getattr(odecore, entry)(Affine(), np.zeros(4), (W, B_VEC), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        # Each option where something reads it: the backward's Anderson reads beta, lam and
        # m after a Picard forward; GMRES reads m; one_step reads no unroll_damping but
        # accepts its only value.
        {"solver": "picard", "beta": 0.5, "lam": 1e-3, "m": 3, "damping": 0.9},
        {"solver": "picard", "backward_solver": "gmres", "m": 2},
        {"backward": "unrolled", "unroll_steps": 3, "unroll_damping": 0.5},
        {"backward": "one_step", "unroll_steps": 1},
    ],
)
def test_options_that_are_read_are_accepted(kwargs):
    sol, pullback = odecore.vjp_fixed_point(Affine(), np.zeros(4), (W, B_VEC), **kwargs, **TIGHT)
    assert relative_error(sol.z, np.linalg.solve(np.eye(4) - W, B_VEC)) < 1e-11


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"tol": "1e-6"}, "tol"),
        ({"tol": None}, "tol"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"max_iter": True}, "max_iter"),
        ({"solver": None}, "solver"),
        ({"solver": ["anderson"]}, "solver"),
        ({"stop_mode": 1}, "stop_mode"),
        ({"m": 2.0}, "m"),
        ({"lam": "0"}, "lam"),
        ({"beta": None}, "beta"),
        ({"damping": [0.5]}, "damping"),
        ({"backward": None}, "backward"),
        ({"backward_solver": 1}, "backward_solver"),
        ({"backward_tol": "x"}, "backward_tol"),
        ({"backward_max_iter": 1.5}, "backward_max_iter"),
        ({"unroll_steps": 2.0}, "unroll_steps"),
        ({"unroll_damping": None}, "unroll_damping"),
        ({"throw": "yes"}, "throw"),
        ({"throw": None}, "throw"),
        ({"batch_axis": "0"}, "batch_axis"),
        ({"batch_axis": 0.0}, "batch_axis"),
        ({"batch_axis": True}, "batch_axis"),
    ],
)
@pytest.mark.parametrize("entry", ["fixed_point", "solve_fixed_point", "vjp_fixed_point"])
def test_option_of_the_wrong_type_raises_type_error_naming_it(entry, kwargs, name):
    with pytest.raises(TypeError, match=rf"^{name} must be "):
        getattr(odecore, entry)(Affine(), np.zeros((2, 4)), (W, B_VEC), **kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"tol": float("inf")}, "tol"),
        ({"lam": float("inf")}, "lam"),
        ({"backward_tol": float("nan")}, "backward_tol"),
        ({"beta": float("nan")}, "beta"),
    ],
)
def test_non_finite_option_raises_value_error_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must lie in"):
        odecore.fixed_point(np.cos, np.zeros(2), **kwargs)


def test_numpy_scalars_are_accepted_as_options():
    z = odecore.fixed_point(np.cos, np.zeros(1), tol=np.float32(1e-12), max_iter=np.int64(300))
    assert abs(z[0] - COS_FIXED_POINT) < 1e-11


@pytest.mark.parametrize(
    "returned,shown",
    [
        (lambda z: [0.1, 0.2, 0.3], "list [0.1, 0.2, 0.3]"),
        (lambda z: None, "None"),
        (lambda z: 0.5, "float 0.5"),
    ],
)
def test_map_returning_a_non_array_is_named(returned, shown):
    expected = "a numpy array shaped like z (3,) with z's dtype float64"
    with pytest.raises(TypeError, match="f must return") as info:
        odecore.fixed_point(returned, np.zeros(3))
    assert str(info.value) == f"f must return {expected}; it returned {shown}"


def test_map_changing_the_dtype_is_named():
    with pytest.raises(TypeError, match="f returned dtype float32 for z of dtype float64"):
        odecore.fixed_point(lambda z: np.cos(z).astype(np.float32), np.zeros(3))
    with pytest.raises(TypeError, match="f returned dtype int64 for z of dtype float64"):
        odecore.fixed_point(lambda z: np.ones(3, dtype=np.int64), np.zeros(3))


@pytest.mark.parametrize(
    "params,where",
    [
        (object(), "params is object"),
        ({1.0, 2.0}, "params is set"),
        ((W, "relu"), "params[1] is str 'relu'"),
        ({"W": W, "act": np.tanh}, "params['act'] is numpy.ufunc"),
    ],
)
@pytest.mark.parametrize("entry", ["fixed_point", "vjp_fixed_point", "spectral_radius"])
def test_params_that_are_not_arrays_raise(entry, params, where):
    with pytest.raises(TypeError, match="params must be an array or a tuple") as info:
        getattr(odecore, entry)(Affine(), np.zeros(4), params)
    assert where in str(info.value)


class ScaledCos:
    """``z = s cos z + b`` with ``s`` a Python float: ``dz*/db = 1 / (1 + s sin z*)`` and
    ``dz*/ds = cos z* / (1 + s sin z*)``."""

    def __call__(self, z, params):
        b, s = params
        return s * np.cos(z) + b

    def vjp(self, z, params, cot):
        b, s = params
        return -s * np.sin(z) * cot, (cot, float(np.sum(np.cos(z) * cot)))


def test_number_in_params_gets_its_gradient():
    sol, pullback = odecore.vjp_fixed_point(
        ScaledCos(), np.zeros(1), (np.array([0.3]), 1.0), **TIGHT
    )
    b_bar, s_bar = pullback(np.ones(1))
    z = sol.z[0]
    assert abs(b_bar[0] - 1.0 / (1.0 + np.sin(z))) < 1e-10
    assert abs(s_bar - np.cos(z) / (1.0 + np.sin(z))) < 1e-10


def test_spectral_radius_arguments_are_checked():
    args = (Affine(), np.zeros(4), (W, B_VEC))
    with pytest.raises(TypeError, match="^f must be callable"):
        odecore.spectral_radius(3, np.zeros(4))
    with pytest.raises(TypeError, match="^iterations must be an integer >= 1, got float 2.0"):
        odecore.spectral_radius(*args, iterations=2.0)
    with pytest.raises(ValueError, match="^iterations must be an integer >= 1, got 0"):
        odecore.spectral_radius(*args, iterations=0)
    with pytest.raises(ValueError, match=r"^start must be shaped like z \(4,\), got \(3,\)"):
        odecore.spectral_radius(*args, start=np.ones(3))
    with pytest.raises(TypeError, match="^start must have z's dtype float64, got float32"):
        odecore.spectral_radius(*args, start=np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="^start must be nonzero"):
        odecore.spectral_radius(*args, start=np.zeros(4))
    with pytest.raises(TypeError, match="^z must have a real floating dtype"):
        odecore.spectral_radius(Affine(), np.zeros(4, dtype=np.int64), (W, B_VEC))
    with pytest.raises(TypeError, match="^batch_axis must be None or the integer 0"):
        odecore.spectral_radius(*args, batch_axis=0.0)


def test_spectral_radius_from_a_plain_list_start():
    # S is symmetric with eigenvalues 0.9, -0.5, 0.3, 0.1, so power iteration finds 0.9.
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    S = Q @ np.diag([0.9, -0.5, 0.3, 0.1]) @ Q.T
    rho = odecore.spectral_radius(
        Affine(), np.zeros(4), (S, B_VEC), iterations=200, start=[1.0, 0.0, 0.0, 0.0]
    )
    assert abs(rho - 0.9) < 1e-8


def test_wrong_shape_from_f_is_named():
    with pytest.raises(ValueError, match="f returned shape"):
        odecore.solve_fixed_point(lambda z: z[:1], np.zeros(3))


def test_integer_start_is_rejected():
    with pytest.raises(TypeError, match="real floating dtype"):
        odecore.solve_fixed_point(np.cos, np.zeros(3, dtype=np.int64))


def test_numpy_gradient_without_vjp_says_what_to_add():
    with pytest.raises(TypeError, match=r"vjp\(z, params, cotangent\)"):
        odecore.vjp_fixed_point(lambda z, p: np.cos(z) + p[0], np.zeros(2), (np.ones(2),))


def test_pullback_checks_the_cotangent_shape():
    _, pullback = odecore.vjp_fixed_point(Affine(), np.zeros(4), (W, B_VEC))
    with pytest.raises(ValueError, match=r"^z_bar must be shaped like z \(4,\), got \(3,\)"):
        pullback(np.ones(3))


@settings(max_examples=15, deadline=None)
@given(
    order=st.permutations(range(5)),
    size=st.integers(min_value=1, max_value=5),
    solver=st.sampled_from(SOLVERS),
)
def test_iterations_do_not_depend_on_batch_composition(order, size, solver):
    starts = np.linspace(-2.0, 3.0, 5)[:, None] * np.ones((5, 4))
    inputs = np.random.default_rng(0).standard_normal((5, 3))

    def solve(rows):
        rows = list(rows)
        params = (W, U, B_VEC, inputs[rows])
        return odecore.solve_fixed_point(
            Tanh(), starts[rows], params, solver=solver, batch_axis=0, tol=1e-10
        )

    alone = [solve([i]) for i in range(5)]
    chosen = list(order)[:size]
    batch = solve(chosen)
    for j, i in enumerate(chosen):
        assert batch.iterations[j] == alone[i].iterations[0]
        np.testing.assert_allclose(batch.z[j], alone[i].z[0], rtol=0, atol=1e-14)


def test_vjp_fixed_point_rejects_unknown_options():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['tolerance'\]"):
        odecore.vjp_fixed_point(Affine(), np.zeros(4), (W, B_VEC), tolerance=1e-3)


def test_unconverged_backward_raises_or_with_throw_false_reports_its_status():
    # Two Picard iterations do not solve the backward; its best iterate would give a wrong
    # gradient, and that was returned without a word.
    kwargs = {"backward_solver": "picard", "backward_max_iter": 2, "batch_axis": 0, **TIGHT}
    sol, pullback = odecore.vjp_fixed_point(Tanh(), Z0, tanh_params(), **kwargs)
    failed = rf"backward_solver='picard'\) did not converge for {Z0.shape[0]} of {Z0.shape[0]} "
    with pytest.raises(odecore.FixedPointError, match=failed):
        pullback(tanh_loss_weights())
    assert (sol.stats["backward_status"] == odecore.FixedPointStatus.MAX_ITER_REACHED).all()
    sol, pullback = odecore.vjp_fixed_point(Tanh(), Z0, tanh_params(), throw=False, **kwargs)
    pullback(tanh_loss_weights())
    assert (sol.stats["backward_status"] == odecore.FixedPointStatus.MAX_ITER_REACHED).all()
    assert (sol.stats["backward_iterations"] == 2).all()


class _Linear:
    """f(z) = A z + b, with its VJP: z* = (I - A)^-1 b, and b's cotangent (I - A)^-T w."""

    def __call__(self, z, p):
        return p[0] @ z + p[1]

    def vjp(self, z, p, u):
        return p[0].T @ u, (np.outer(u, z), u)


def _linear_system(n, radius):
    """``(A, b, w)``: a random ``A`` of spectral radius ``radius`` (below one, so that
    iterating ``z = A z + b`` converges), ``b``, and a cotangent ``w``."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n))
    A *= radius / max(abs(np.linalg.eigvals(A)))
    return A, rng.standard_normal(n), rng.standard_normal(n)


def test_gmres_backward_max_iter_bounds_its_products():
    # backward_max_iter counted GMRES's restart cycles, each of restart + 2 products
    # u J_f: the reported iterations went past it, up to 22 times over.
    n = 50
    A, b, w = _linear_system(n, 0.95)
    options = {"backward_solver": "gmres", "tol": 1e-10, "max_iter": 1000}
    for budget in (3, 30, 100):
        sol, pullback = odecore.vjp_fixed_point(
            _Linear(), np.zeros(n), (A, b), backward_max_iter=budget, throw=False, **options
        )
        pullback(w)
        assert int(sol.stats["backward_iterations"][0]) <= budget
    sol, pullback = odecore.vjp_fixed_point(
        _Linear(), np.zeros(n), (A, b), backward_max_iter=2000, **options
    )
    _, b_bar = pullback(w)
    expected = np.linalg.solve((np.eye(n) - A).T, w)
    assert np.abs(b_bar - expected).max() <= 1e-8 * np.abs(expected).max()


def test_a_gmres_cycle_costs_its_basis_and_one_residual():
    # n = 5 < the default restart of 20: one cycle of 5 Krylov vectors solves the system
    # exactly. Its cost is the 5 products for the basis and the new residual's one; the
    # residual it starts from is w (u = 0) or the last cycle's, and recomputing it cost a
    # seventh.
    n = 5
    A, b, w = _linear_system(n, 0.9)
    products = []

    class Counted(_Linear):
        def vjp(self, z, p, u):
            products.append(u)
            return super().vjp(z, p, u)

    sol, pullback = odecore.vjp_fixed_point(
        Counted(), np.zeros(n), (A, b), backward_solver="gmres", tol=1e-10, max_iter=1000
    )
    products.clear()
    _, b_bar = pullback(w)
    # The products the solver made, and one more: the parameters' cotangent at the end.
    assert int(sol.stats["backward_iterations"][0]) == n + 1 == len(products) - 1
    expected = np.linalg.solve((np.eye(n) - A).T, w)
    # The exact Krylov solution, up to rounding in a system of condition ~ 1 / (1 - 0.9).
    assert np.abs(b_bar - expected).max() <= 1e-12 * np.abs(expected).max()


class _Scaled:
    """f(z) = c z + p: z* = p / (1 - c), dz*/dp = 1 / (1 - c); J_f = c I."""

    def __init__(self, c):
        self.c = c

    def __call__(self, z, p):
        return self.c * z + p

    def vjp(self, z, p, u):
        return self.c * u, u


@pytest.mark.parametrize("c", [0.5, -1.5])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_gmres_backward_when_the_krylov_space_is_invariant(c, n):
    # J_f = c I: GMRES's second basis vector is rounding. It was scaled up to a direction
    # of noise and the small least-squares system was singular (NumPy's LinAlgError).
    # -1.5 is no contraction, so the forward takes Anderson.
    sol, pullback = odecore.vjp_fixed_point(
        _Scaled(c), np.zeros(n), np.ones(n), solver="anderson", backward_solver="gmres", **TIGHT
    )
    np.testing.assert_allclose(sol.z, np.full(n, 1 / (1 - c)), rtol=1e-10)
    np.testing.assert_allclose(pullback(np.ones(n)), np.full(n, 1 / (1 - c)), rtol=1e-10)


def test_a_longer_anderson_memory_does_not_slow_the_mixing():
    # A contraction of rate 0.95, z = tanh(z W^T + x), batch of 16. The regularisation was
    # one size for every stored pair, relative to their mean residual: the oldest, largest
    # residuals set it, and once the newest were small it pushed the weights toward uniform.
    # m = 20 then needed 51 iterations where m = 5 needed 21. Relative to each pair's own
    # residual, a longer memory helps or does nothing.
    rng = np.random.default_rng(0)
    W = rng.standard_normal((40, 40))
    W *= 0.95 / np.linalg.norm(W, 2)
    x = rng.standard_normal((16, 40))

    def layer(z, p):
        return np.tanh(z @ p[0].T + p[1])

    # The reference: plain iteration of the contraction to a fixed point of floating point.
    z = np.zeros_like(x)
    for _ in range(2000):
        z = layer(z, (W, x))
    iterations = {}
    for m in (5, 20):
        sol = odecore.solve_fixed_point(
            layer, np.zeros_like(x), (W, x), m=m, tol=1e-10, max_iter=200, batch_axis=0
        )
        # |z - z*| <= tol / (1 - 0.95) per sample.
        assert np.abs(sol.z - z).max() <= 1e-10 / 0.05
        iterations[m] = np.asarray(sol.iterations)
    assert iterations[20].max() <= iterations[5].max()
