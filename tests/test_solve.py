"""The solve loop's behaviour: step counts, per-sample stepping, stop times, options, results.

Expected step and evaluation counts are derived here from the grid and the tableau's stage
count, never read back from odecore's statistics. Every test runs on every backend (the
``backend`` fixture, tests/conftest.py); the dynamics are written against the array API and
defined once at module level, so that JAX compiles each of them once per configuration.
"""

from __future__ import annotations

import math
from fractions import Fraction

import array_api_compat
import numpy as np
import pytest
from backend_params import first_only_on_jax

import odecore

namespace = array_api_compat.array_namespace


def constant(values, like):
    """``values`` as an array of ``like``'s library and dtype: the dynamics' constants."""
    return namespace(like).asarray(values, dtype=like.dtype)


def decay(t, y):
    return -y


def growth(t, y):
    return y


def cos_growth(t, y):
    """``y' = cos(t) y``: y = y0 exp(sin t)."""
    return namespace(y).cos(t) * y


def cos_growth_batched(t, y):
    """``cos_growth`` with one time per sample (batch axis 0)."""
    return namespace(y).cos(t)[:, None] * y


def stages(method):
    return odecore.TABLEAUS[method].stages


def recorded_times(recorder):
    return np.array([float(t) for t in recorder.times])


# ---------------------------------------------------------------------------------------------
# Fixed-step methods: steps and function evaluations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", odecore.FIXED_STEP_METHODS)
def test_fixed_step_methods_are_not_fsal(method):
    # The nfev formula below assumes it.
    assert not odecore.TABLEAUS[method].fsal


@pytest.mark.parametrize("decreasing", [False, True])
@pytest.mark.parametrize("method", first_only_on_jax(odecore.FIXED_STEP_METHODS))
def test_fixed_step_without_step_size_steps_between_output_times(backend, method, decreasing):
    ts = np.array([0.0, 0.1, 0.35, 0.4, 1.0, 1.7])
    if decreasing:
        ts = ts[::-1]
    rec = backend.recorder(cos_growth)
    sol = odecore.solve(rec, backend.asarray([1.0, 2.0]), backend.asarray(ts), method=method)
    stats = backend.stats(sol)
    n = len(ts) - 1
    assert stats["nsteps"] == stats["naccept"] == n
    assert stats["nreject"] == 0
    assert stats["nfev"] == 1 + stages(method) * n == len(rec.times)
    # Every step ends exactly on an output time, where f(t_new, y_new) is evaluated.
    called = {float(t) for t in rec.times}
    assert set(ts.tolist()) <= called


# (t0, t1, h): the step count is ceil(|t1 - t0| / h), computed exactly with fractions. The
# first three divide the interval exactly, so no rounding-sized extra step may appear.
STEP_SIZE_GRIDS = [
    ("0", "1", "0.1"),
    ("0", "3", "0.1"),
    ("2.5", "7.3", "0.12"),
    ("0", "1", "0.3"),
    ("0", "1", "0.07"),
    ("2", "0", "0.25"),
    ("1", "-0.5", "0.2"),
]


def _exact_steps(t0, t1, h):
    return math.ceil(abs(Fraction(t1) - Fraction(t0)) / Fraction(h))


@pytest.mark.parametrize(("t0", "t1", "h"), STEP_SIZE_GRIDS)
@pytest.mark.parametrize("method", first_only_on_jax(odecore.FIXED_STEP_METHODS))
def test_fixed_step_with_step_size_counts(backend, method, t0, t1, h):
    n = _exact_steps(t0, t1, h)
    for ts in ([float(t0), float(t1)], np.linspace(float(t0), float(t1), 9)):
        sol = odecore.solve(
            decay,
            backend.asarray([1.0]),
            backend.asarray(ts),
            method=method,
            options={"step_size": float(h)},
        )
        stats = backend.stats(sol)
        # Output times are filled by interpolation and never add steps or evaluations.
        assert stats["nsteps"] == stats["naccept"] == n
        assert stats["nfev"] == 1 + stages(method) * n
        assert sol.success


def test_step_size_steps_are_uniform_from_t0_and_land_on_t1(backend):
    # Euler evaluates f once per step, at the step's start: the call times are the grid.
    rec = backend.recorder(decay)
    odecore.solve(
        rec,
        backend.asarray([1.0]),
        backend.asarray([0.5, 1.2]),
        method="euler",
        options={"step_size": 0.1},
    )
    times = recorded_times(rec)
    np.testing.assert_allclose(times, 0.5 + 0.1 * np.arange(8), rtol=0, atol=1e-14)
    assert times[-1] == 1.2  # the last step lands exactly on t[-1]


@pytest.mark.parametrize("method", first_only_on_jax(odecore.FIXED_STEP_METHODS))
def test_step_size_outputs_are_interpolated_accurately(backend, method):
    # y' = y on [0, 2] with h = 0.1; outputs at every multiple of 0.05: the even ones are step
    # ends, the odd ones lie mid-step and come from cubic Hermite interpolation, whose own
    # error is at most h^4 / 384 * max|y^(4)| = 1e-4 / 384 * e^2 (about 1.9e-6), on top of
    # the errors at the step ends it interpolates.
    ts = np.linspace(0.0, 2.0, 41)
    sol = odecore.solve(
        growth,
        backend.asarray([1.0]),
        backend.asarray(ts),
        method=method,
        options={"step_size": 0.1},
    )
    assert backend.stats(sol)["nsteps"] == 20
    error = np.abs(backend.to_numpy(sol.ys)[:, 0] - np.exp(ts))
    at_ends, mid_step = error[::2].max(), error[1::2].max()
    assert mid_step <= 1.1 * at_ends + 0.1**4 / 384 * math.exp(2.0)


# ---------------------------------------------------------------------------------------------
# Adaptive methods at a fixed step (options["step_size"]): the steps of the method's weights
# b, no error estimate, outputs from the method's own interpolant
# ---------------------------------------------------------------------------------------------


def stability_function(method, z):
    """``R(z) = 1 + z b^T (I - z A)^-1 1``: one step of the method on y' = lambda y with
    h lambda = z multiplies y by R(z). From the tableau's numbers, not from a solve."""
    tab = odecore.TABLEAUS[method]
    s = tab.stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        a[i, : len(row)] = row
    return 1.0 + z * np.asarray(tab.b) @ np.linalg.solve(np.eye(s) - z * a, np.ones(s))


def interpolant_on_decay(method, y, h, theta):
    """The method's dense output at ``t + theta h`` for y' = -y from ``y`` at ``t``, from
    the tableau: every dense stage (the main ones, f(t + h, y_new) unless FSAL, the extra
    ones), then ``y + h sum_i b_i(theta) K_i``."""
    tab = odecore.TABLEAUS[method]
    ks = []
    for row in tab.a + ((tuple(tab.b),) if not tab.fsal else ()):
        ks.append(-(y + h * sum(w * k for w, k in zip(row, ks, strict=False))))
    if not tab.fsal:
        ks = ks[: tab.stages] + [ks[tab.stages]]  # the stages, then f(t + h, y_new)
    for row in tab.dense_a:
        ks.append(-(y + h * sum(w * k for w, k in zip(row, ks, strict=False))))
    weights = [sum(c * theta ** (m + 1) for m, c in enumerate(row)) for row in tab.dense]
    return y + h * sum(w * k for w, k in zip(weights, ks, strict=True))


@pytest.mark.parametrize("method", first_only_on_jax(odecore.ADAPTIVE_METHODS))
def test_adaptive_method_at_a_fixed_step_takes_the_steps_of_its_weights(backend, method):
    h, n = 0.125, 8  # exact in binary: the grid is 0, h, ..., 1 without rounding
    sol = odecore.solve(
        decay,
        backend.asarray([1.0]),
        backend.asarray([0.0, 0.5, 1.0]),
        method=method,
        options={"step_size": h},
    )
    stats = backend.stats(sol)
    assert stats["nsteps"] == stats["naccept"] == n and stats["nreject"] == 0
    # No error estimate, no rejected step; an FSAL method reuses its last stage.
    fsal = odecore.TABLEAUS[method].fsal
    assert stats["nfev"] == 1 + (stages(method) - fsal) * n
    expected = stability_function(method, -h) ** np.array([0, 4, 8])
    # Eight steps of a few dozen operations each, on values below 1.
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[:, 0], expected, rtol=1e-13, atol=0)
    assert sol.method == method


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("dopri5", {}),
        ("dopri8", {}),
        ("bosh3", {}),
        ("rk4", {"step_size": 0.01}),
        ("rk4", {"step_size": 0.01, "interp": "linear"}),
    ],
    ids=["dopri5", "dopri8", "bosh3-hermite", "rk4-hermite", "rk4-linear"],
)
def test_a_million_output_times_are_interpolated_as_one_at_a_time(method, options):
    # Filled one at a time in Python, a million outputs took 70 s to 4 min for a solve of a
    # few hundred steps (scipy's t_eval: a fraction of a second); the outputs of one step
    # are now interpolated together, in a second or two. The output times do not move the
    # steps, so every tenth output, at most a few per step, takes the one-at-a-time path
    # from the same steps: the two agree to rounding in the interpolants' sums (dopri8's
    # coefficients reach hundreds).
    t = np.linspace(0.0, 10.0, 1_000_001)  # t[::100_000] is 0, 1, ..., 10
    settings = {"method": method, "rtol": 1e-10, "atol": 1e-10, "options": options}
    sol = odecore.solve(oscillator, np.array([1.0, 0.0]), t, **settings)
    sparse = odecore.solve(oscillator, np.array([1.0, 0.0]), t[::100_000], **settings)
    assert sparse.stats["nsteps"] == sol.stats["nsteps"]
    np.testing.assert_allclose(sol.ys[::100_000], sparse.ys, rtol=0.0, atol=1e-12)
    exact = np.stack([np.cos(t), -np.sin(t)], axis=1)
    # The adaptive solves' global error is the 1e-10 tolerance over a few hundred steps (up
    # to about 1e-8), and their interpolants' is of their order; rk4 at h = 0.01 is within
    # h^4 ~ 1e-8 on its grid, cubic Hermite between grid points within h^4 / 384 ~ 3e-11
    # more, and the linear interpolant within h^2 / 8 ~ 1.3e-5 (|y''| <= 1).
    tolerance = 2e-5 if options.get("interp") == "linear" else 1e-7
    np.testing.assert_allclose(sol.ys, exact, rtol=0.0, atol=tolerance)
    assert sol.ys[0].tolist() == [1.0, 0.0]


WITH_INTERPOLANT = [m for m in odecore.ADAPTIVE_METHODS if odecore.TABLEAUS[m].dense is not None]


@pytest.mark.parametrize("method", first_only_on_jax(WITH_INTERPOLANT))
def test_adaptive_method_at_a_fixed_step_interpolates_with_its_own_dense_output(backend, method):
    h, theta = 0.25, 0.375
    sol = odecore.solve(
        decay,
        backend.asarray([1.0]),
        backend.asarray([0.0, h + theta * h, 1.0]),
        method=method,
        options={"step_size": h},
    )
    y1 = stability_function(method, -h)  # the state after the first step
    expected = interpolant_on_decay(method, y1, h, theta)
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[1, 0], expected, rtol=1e-13, atol=0)
    assert backend.stats(sol)["naccept"] == 4


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_adaptive_method_at_a_fixed_step_gradient(adjoint):
    # y' = -a y: on the grid y(1) = R(-a h)^8 y0, so d y(1) / d y0 = R^8 and d y(1) / d a =
    # 8 R^7 R'(-a h) (-h) y0, with R' by a complex step (R is a rational function). The
    # backsolve's adjoint takes the same fixed steps backwards: its own discretisation error,
    # of order h^5, stands between it and these discrete derivatives.
    h, a, y0 = 0.125, 1.0, 2.0

    class Decay:
        def __call__(self, t, y, rate):
            return -rate * y

        def vjp(self, t, y, rate, cotangent):
            return -rate * cotangent, -(cotangent * y).sum(keepdims=True)

    ys, pullback = odecore.vjp_odeint(
        Decay(), np.array([y0]), np.array([0.0, 1.0]), np.array([a]), method="tsit5",
        options={"step_size": h}, adjoint=adjoint,
    )  # fmt: skip
    y0_bar, a_bar, _ = pullback(np.array([[0.0], [1.0]]))
    r = stability_function("tsit5", -a * h)
    r_prime = stability_function("tsit5", complex(-a * h, 1e-20)).imag / 1e-20
    np.testing.assert_allclose(ys[-1, 0], y0 * r**8, rtol=1e-14)
    rtol = 1e-13 if adjoint == "checkpoint" else 1e-6
    np.testing.assert_allclose(y0_bar[0], r**8, rtol=rtol)
    np.testing.assert_allclose(a_bar[0], 8 * r**7 * r_prime * (-h) * y0, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Per-sample stepping
# ---------------------------------------------------------------------------------------------

RATES = np.array([0.1, 1.0, 30.0, 5.0])
Y0_BATCH = np.array([[1.0, 2.0], [3.0, -1.0], [1e3, 1e-3], [-2.0, 0.5]])
FORCING = np.array([1.0, 0.5])


def batched_rhs(t, y):
    # Non-autonomous: each sample reads its own time from the (B,) vector t.
    xp = namespace(y)
    return -constant(RATES, y)[:, None] * y + xp.cos(t)[:, None] * constant(FORCING, y)


def single_rhs(t, y, rate):
    """One sample of ``batched_rhs``, its rate a parameter."""
    return -rate * y + namespace(y).cos(t) * constant(FORCING, y)


BATCH_METHODS = [
    ("dopri5", None),
    ("tsit5", None),
    ("dopri8", None),
    ("bosh3", None),
    ("fehlberg2", None),
    ("rk4", None),
    ("rk4", {"step_size": 0.01}),
]


@pytest.mark.parametrize(("method", "options"), first_only_on_jax(BATCH_METHODS))
def test_each_sample_equals_solving_it_alone(backend, method, options):
    ts = backend.asarray(np.linspace(0.0, 3.0, 7))
    batch = odecore.solve(
        batched_rhs,
        backend.asarray(Y0_BATCH),
        ts,
        method=method,
        options=options,
        batch_axis=0,
    )
    batch_ys, batch_stats = backend.to_numpy(batch.ys), backend.stats(batch)
    assert batch_ys.shape == (7, 4, 2)
    assert batch_stats["nsteps"].shape == (4,)
    for i, rate in enumerate(RATES):
        alone = odecore.solve(
            single_rhs,
            backend.asarray(Y0_BATCH[i]),
            ts,
            params=backend.asarray(rate),
            method=method,
            options=options,
        )
        alone_stats = backend.stats(alone)
        for key in ("nsteps", "naccept", "nreject"):
            assert int(batch_stats[key][i]) == alone_stats[key], key
        assert int(backend.status(batch)[i]) == backend.status(alone) == odecore.Status.SUCCESS
        # Not bit-identical: a matrix product sums the stages in an order that may depend on
        # the number of columns, and the error estimate (a difference of nearly equal stage
        # combinations) amplifies that to ~1e-7 relative in the step size. The steps stay
        # the same, the outputs move by ~rtol * 1e-6 (observed up to 5e-13 relative).
        # Cross-talk between samples would show at the rtol level (1e-7).
        alone_ys = backend.to_numpy(alone.ys)
        scale = np.max(np.abs(alone_ys))
        assert np.max(np.abs(batch_ys[:, i] - alone_ys)) <= 1e-10 * scale


def test_samples_get_their_own_times_and_steps(backend):
    rec = backend.recorder(batched_rhs)
    sol = odecore.solve(rec, backend.asarray(Y0_BATCH), backend.asarray([0.0, 3.0]), batch_axis=0)
    assert all(t.shape == (4,) for t in rec.times)
    # The fastest sample needs many more steps than the slowest.
    nsteps = backend.stats(sol)["nsteps"]
    assert nsteps[2] > 5 * nsteps[0]
    # At some call the samples are at different times.
    assert any(len(set(t.tolist())) > 1 for t in rec.times)


def test_finished_samples_stop_changing(backend):
    rec = backend.recorder(batched_rhs)
    sol = odecore.solve(rec, backend.asarray(Y0_BATCH), backend.asarray([0.0, 3.0]), batch_axis=0)
    slow = 0  # the sample that finishes first
    final = backend.to_numpy(sol.ys)[-1, slow]
    changing = [i for i, y in enumerate(rec.states) if not np.array_equal(y[slow], final)]
    tail = range(changing[-1] + 1, len(rec.states))
    # Once finished, the sample sits at t1 with its final state while the others go on.
    assert len(tail) > 10
    assert all(rec.times[i][slow] == 3.0 for i in tail)
    assert len({float(rec.times[i][2]) for i in tail}) > 10  # the fast sample moves on


def batch_last_rhs(t, y):
    """``batched_rhs`` with the samples on the last axis: t is (4,), y is (2, 4)."""
    assert t.shape == (4,) and y.shape == (2, 4)
    xp = namespace(y)
    return -constant(RATES, y)[None, :] * y + xp.cos(t)[None, :] * constant(FORCING, y)[:, None]


@pytest.mark.parametrize("batch_axis", first_only_on_jax([-1, 1]))
def test_batch_axis_last(backend, batch_axis):
    y0 = backend.asarray(Y0_BATCH.T)  # (N, B)
    ts = backend.asarray(np.linspace(0.0, 3.0, 5))
    sol = odecore.solve(batch_last_rhs, y0, ts, batch_axis=batch_axis)
    ys = backend.to_numpy(sol.ys)
    assert ys.shape == (5, 2, 4)
    first = odecore.solve(batched_rhs, backend.asarray(Y0_BATCH), ts, batch_axis=0)
    first_ys = backend.to_numpy(first.ys)
    np.testing.assert_allclose(ys, np.moveaxis(first_ys, 1, 2), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(backend.stats(sol)["nsteps"], backend.stats(first)["nsteps"])


def test_batched_decreasing_time(backend):
    ts = backend.asarray(np.linspace(3.0, 0.0, 5))
    batch = odecore.solve(batched_rhs, backend.asarray(Y0_BATCH), ts, batch_axis=0)
    batch_ys = backend.to_numpy(batch.ys)
    for i, rate in enumerate(RATES):
        alone = odecore.solve(
            single_rhs, backend.asarray(Y0_BATCH[i]), ts, params=backend.asarray(rate)
        )
        assert int(backend.stats(batch)["nsteps"][i]) == backend.stats(alone)["nsteps"]
        alone_ys = backend.to_numpy(alone.ys)
        scale = np.max(np.abs(alone_ys))
        assert np.max(np.abs(batch_ys[:, i] - alone_ys)) <= 1e-10 * scale
    np.testing.assert_array_equal(backend.to_numpy(batch.t_reached), np.zeros(4))


def per_sample_decay(t, y, params):
    (k,) = params
    return -k[:, None] * y


def test_batched_params_and_per_sample_tolerances(backend):
    rates = np.array([0.5, 2.0])
    atol = backend.asarray([[1e-12], [1e-3]])  # sample 1 gets a loose tolerance
    sol = odecore.solve(
        per_sample_decay,
        backend.asarray([[1.0], [1.0]]),
        backend.asarray([0.0, 2.0]),
        params=(backend.asarray(rates),),
        batch_axis=0,
        rtol=1e-12,
        atol=atol,
    )
    exact = np.exp(-rates * 2.0)
    err = np.abs(backend.to_numpy(sol.ys)[-1, :, 0] - exact)
    assert err[0] < 1e-11
    nsteps = backend.stats(sol)["nsteps"]
    assert nsteps[1] < nsteps[0]


# ---------------------------------------------------------------------------------------------
# Inputs: a single time, decreasing time, plain Python values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [None, "rk4", "dopri8"])
def test_single_time_returns_y0_with_no_work(backend, method):
    rec = backend.recorder(decay)
    y0 = np.array([[1.5, -2.25], [3.0, 1e-300]])
    sol = odecore.solve(rec, backend.asarray(y0), backend.asarray([0.7]), method=method)
    ys = backend.to_numpy(sol.ys)
    assert ys.shape == (1, 2, 2)
    np.testing.assert_array_equal(ys[0], y0)
    assert backend.stats(sol)["nfev"] == 0 and rec.times == []
    assert sol.success and backend.status(sol) == odecore.Status.SUCCESS
    assert odecore.odeint(rec, backend.asarray(y0), backend.asarray([0.7])).shape == (1, 2, 2)


def test_single_time_batched(backend):
    sol = odecore.solve(decay, backend.asarray(Y0_BATCH), backend.asarray([1.0]), batch_axis=0)
    np.testing.assert_array_equal(backend.to_numpy(sol.ys)[0], Y0_BATCH)
    assert backend.stats(sol)["nfev"] == 0
    assert sol.success
    # t_reached is the last output time, as in any successful solve (it was None).
    np.testing.assert_array_equal(backend.to_numpy(sol.t_reached), [1.0] * len(Y0_BATCH))
    single = odecore.solve(decay, backend.asarray(Y0_BATCH[0]), backend.asarray([1.0]))
    assert float(backend.to_numpy(single.t_reached)) == 1.0


def test_single_time_batch_with_throw_false_marks_the_invalid_sample(backend):
    # As with several output times: the sample whose y0 is not finite gets INVALID_INPUT and
    # NaN outputs, the others y0. With one time the check raised whatever throw said.
    y0 = np.array(Y0_BATCH, dtype=float)
    y0[1, 0] = math.inf
    sol = odecore.solve(
        decay, backend.asarray(y0), backend.asarray([1.0]), batch_axis=0, throw=False
    )
    status = backend.to_numpy(sol.status).tolist()
    assert status[1] == odecore.Status.INVALID_INPUT
    assert status[:1] + status[2:] == [odecore.Status.SUCCESS] * (len(y0) - 1)
    ys = backend.to_numpy(sol.ys)[0]
    assert np.isnan(ys[1]).all()
    np.testing.assert_array_equal(np.delete(ys, 1, axis=0), np.delete(y0, 1, axis=0))


@pytest.mark.parametrize("method", first_only_on_jax(["dopri5", "dopri8", "bosh3", "rk4"]))
def test_decreasing_time(backend, method):
    ts = np.linspace(2.0, -1.0, 7)
    y_start = np.exp(np.sin(2.0))
    ys = odecore.odeint(cos_growth, backend.asarray([y_start]), backend.asarray(ts), method=method)
    # rk4 steps exactly between the outputs (0.5 apart): error ~1e-4.
    tol = 1e-3 if method == "rk4" else 1e-6
    np.testing.assert_allclose(backend.to_numpy(ys)[:, 0], np.exp(np.sin(ts)), rtol=tol)


# Plain Python floats become the library's default floating dtype: float64 in NumPy and in
# JAX's x64 mode (which the fixture enables), torch's default float32.
PLAIN_FLOAT_DTYPE = {"numpy": "float64", "torch": "float32", "jax": "float64"}
# The relative accuracy asked of a plain-input solve at the default rtol (1e-7): in float64,
# ten times rtol; in float32, 8 units of its unit roundoff (2^-24) on top, for the roundings
# of the state each step keeps (the few steps taken each round y once, and f's -y is exact).
PLAIN_FLOAT_RTOL = {"float64": 1e-6, "float32": 1e-6 + 8 * 2.0**-24}


def test_lists_and_floats_as_inputs(backend):
    # Plain inputs go to the backend named in the call.
    dtype = PLAIN_FLOAT_DTYPE[backend.name]
    rtol = PLAIN_FLOAT_RTOL[dtype]
    ys = odecore.odeint(decay, [1.0, 2.0], [0, 1, 2], backend=backend.name)  # int times are fine
    assert backend.dtype_name(ys) == dtype
    np.testing.assert_allclose(
        backend.to_numpy(ys), np.exp(-np.array([0, 1, 2]))[:, None] * [1.0, 2.0], rtol=rtol
    )
    scalar = odecore.odeint(decay, 1.0, [0.0, 1.0], backend=backend.name)  # a 0-d state
    assert scalar.shape == (2,)
    np.testing.assert_allclose(backend.to_numpy(scalar)[-1], math.exp(-1.0), rtol=rtol)
    nested = odecore.odeint(decay, [[1.0], [2.0]], [0.0, 1.0], backend=backend.name)
    assert nested.shape == (2, 2, 1)


def test_a_list_of_numpy_scalars_is_a_state_not_a_structure():
    # list(a) of a float64 array holds np.float64 scalars, numbers as much as Python's floats;
    # they were read as 0-d arrays, the state as a structure of two parts, and func got a
    # list it could not negate.
    a = np.array([1.0, 2.0])
    ys = odecore.odeint(decay, list(a), [0.0, 1.0], rtol=1e-10, atol=1e-12)
    assert isinstance(ys, np.ndarray) and ys.shape == (2, 2)
    np.testing.assert_allclose(ys[-1], a * math.exp(-1.0), rtol=1e-8)
    ys = odecore.odeint(decay, [np.float32(1.0), np.float32(2.0)], [0.0, 1.0])
    assert isinstance(ys, np.ndarray) and ys.shape == (2, 2)


def test_plain_float_times_are_exact_in_float64(backend):
    # A Python float is a float64; read through torch's default float32 first, 0.1 would
    # become 0.10000000149 and the solve would end, and evaluate func, off the asked time.
    rec = backend.recorder(decay)
    sol = odecore.solve(rec, backend.asarray([1.0]), [0.0, 0.1])
    assert backend.dtype_name(sol.ts) == "float64"
    assert backend.to_numpy(sol.ts)[-1] == 0.1
    assert max(recorded_times(rec)) == 0.1


def test_plain_float_stop_times_are_hit_exactly(backend):
    # dopri8 evaluates f(t_new, y_new) after each step, at exactly the step's end: the stop
    # time itself when step_t is read at float64, 0.699999988 when read at float32. After a
    # jump, f is evaluated just after the jump time.
    rec = backend.recorder(cos_growth)
    y0, ts = backend.asarray([1.0]), backend.asarray([0.0, 3.0])
    odecore.solve(rec, y0, ts, method="dopri8", options={"step_t": [0.7], "jump_t": 1.3})
    times = set(recorded_times(rec).tolist())
    assert 0.7 in times
    assert math.nextafter(1.3, math.inf) in times


def test_reversed_numpy_times_with_backend_state(backend):
    # A reversed view (negative stride), which torch cannot wrap without a copy.
    ts = np.linspace(0.0, 1.0, 5)[::-1]
    sol = odecore.solve(decay, backend.asarray([1.0]), ts, backend=backend.name)
    np.testing.assert_array_equal(backend.to_numpy(sol.ts), ts)
    # The default rtol 1e-7 with a few steps: ten times rtol.
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[:, 0], np.exp(1.0 - ts), rtol=1e-6)


def test_params_reach_func(backend):
    seen = []

    def rhs(t, y, params):
        seen.append(params)
        k, c = params
        return -k * y + c

    params = (2.0, backend.asarray([0.5, 1.0]))
    ys = odecore.odeint(
        rhs, backend.asarray([0.0, 0.0]), backend.asarray([0.0, 3.0]), params=params
    )
    assert seen
    if backend.name == "jax":
        # JAX traces func: its arrays and its Python float (a 0-d argument of the compiled
        # program, so that another value does not compile it again) arrive as tracers in the
        # structure of params.
        assert all(len(p) == 2 and p[0].shape == () and p[1].shape == (2,) for p in seen)
    else:
        assert all(p is params for p in seen)
    expected = np.array([0.5, 1.0]) / 2.0 * (1 - math.exp(-6.0))
    np.testing.assert_allclose(backend.to_numpy(ys)[-1], expected, rtol=1e-6)


def test_state_shape_is_kept(backend):
    y0 = np.arange(6.0).reshape(2, 3) + 1.0
    shapes = set()

    def rhs(t, y):
        shapes.add(tuple(y.shape))
        return -y

    ys = odecore.odeint(rhs, backend.asarray(y0), backend.asarray([0.0, 0.5, 1.0]))
    assert ys.shape == (3, 2, 3) and shapes == {(2, 3)}
    np.testing.assert_allclose(backend.to_numpy(ys)[-1], y0 * math.exp(-1.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# step_t and jump_t
# ---------------------------------------------------------------------------------------------

STEP_T = [0.123456789, 0.7, 1.3, 2.9]


@pytest.mark.parametrize(
    ("method", "options"),
    first_only_on_jax(
        [("dopri8", {}), ("rk4", {"step_size": 0.25}), ("euler", {}), ("adaptive_heun", {})]
    ),
)
def test_steps_land_on_step_t(backend, method, options):
    # These methods evaluate f(t_new, y_new) after each step, at exactly the step's end.
    y0, ts = backend.asarray([1.0]), backend.asarray([0.0, 3.0])
    rec = backend.recorder(cos_growth)
    sol = odecore.solve(rec, y0, ts, method=method, options={**options, "step_t": STEP_T})
    called = {float(t) for t in rec.times}
    assert set(STEP_T) <= called
    plain = backend.recorder(cos_growth)
    odecore.solve(plain, y0, ts, method=method, options=options)
    assert not set(STEP_T) & {float(t) for t in plain.times}
    assert sol.success


@pytest.mark.parametrize("method", first_only_on_jax(["dopri5", "tsit5", "bosh3"]))
def test_fsal_steps_land_on_step_t(backend, method):
    # FSAL methods reach t_new as t + 1.0 * h with h = t_stop - t: within an ulp or two.
    rec = backend.recorder(cos_growth)
    odecore.solve(
        rec,
        backend.asarray([1.0]),
        backend.asarray([0.0, 3.0]),
        method=method,
        options={"step_t": STEP_T},
    )
    times = recorded_times(rec)
    for stop in STEP_T:
        assert np.min(np.abs(times - stop)) <= 4 * np.spacing(stop)


def test_step_t_outside_the_interval_is_ignored(backend):
    y0, ts = backend.asarray([1.0]), backend.asarray([0.0, 1.0])
    base = odecore.solve(decay, y0, ts)
    sol = odecore.solve(decay, y0, ts, options={"step_t": [-1.0, 0.0, 5.0]})
    assert backend.stats(sol) == backend.stats(base)
    np.testing.assert_array_equal(backend.to_numpy(sol.ys), backend.to_numpy(base.ys))


def test_step_t_with_decreasing_time(backend):
    rec = backend.recorder(cos_growth)
    sol = odecore.solve(
        rec,
        backend.asarray([1.0]),
        backend.asarray([3.0, 0.0]),
        method="dopri8",
        options={"step_t": [2.5, 0.4]},
    )
    called = {float(t) for t in rec.times}
    assert {2.5, 0.4} <= called
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[-1, 0], math.exp(-math.sin(3.0)), rtol=1e-6)


def kink_exact(t):
    t = np.asarray(t, dtype=np.float64)
    return np.where(t < 0.5, t, 1.0 - t)


def left_continuous(t, y):
    # y' = 1 up to and including t = 0.5, -1 after.
    ones = namespace(y).ones_like(y)
    return namespace(y).where(t <= 0.5, ones, -ones)


def right_continuous(t, y):
    # y' = 1 before t = 0.5, -1 from t = 0.5 on: the usual way to write it.
    ones = namespace(y).ones_like(y)
    return namespace(y).where(t < 0.5, ones, -ones)


KINK_TIMES = np.linspace(0.0, 1.0, 11)


@pytest.mark.parametrize(
    ("method", "options"), [("rk4", {"step_size": 0.1}), ("dopri5", {"max_step": 0.1})]
)
def test_far_from_t_zero_the_state_advances_by_the_time_the_clock_moves(backend, method, options):
    # y' = 1 is integrated exactly by every method, so y(t1) - y(t0) = t1 - t0 = 10. At
    # t = 1e8 a step of 0.1 moves the clock by fl(t + 0.1) - t, up to half a unit in the last
    # place of t (7.5e-9) from 0.1; the state advanced by 0.1 regardless and drifted from its
    # clock by 6e-7 over the 100 steps. Now only the state's own rounding is left: 100
    # additions of about 0.1 to values below 10, each within half a unit in the last place
    # of 10 (8.9e-16).
    ys = odecore.odeint(
        lambda t, y: 1.0 + 0.0 * y,
        backend.asarray([0.0]),
        backend.asarray([1e8, 1e8 + 10.0]),
        method=method,
        options=options,
    )
    assert abs(backend.to_numpy(ys)[-1, 0] - 10.0) <= 100 * 8.9e-16


def test_a_fast_decay_far_from_t_zero_keeps_the_tolerance(backend):
    # y' = -1e9 y on [1, 1 + 1e-9]: the clock moves in units of 2.2e-16 at t = 1, and each
    # step's rounding showed in the state as a relative error in its step size; the solve
    # ended 2.7e-7 from the closed form at rtol 1e-10. From t = 0 it reached 3e-11.
    ts = 1.0 + np.linspace(0.0, 1e-9, 11)
    ys = odecore.odeint(
        lambda t, y: -1e9 * y, backend.asarray([1.0]), backend.asarray(ts), rtol=1e-10, atol=1e-12
    )
    exact = np.exp(-1e9 * (ts - 1.0))
    assert np.max(np.abs(backend.to_numpy(ys)[:, 0] - exact) / exact) < 1e-9


@pytest.mark.parametrize(
    "method", first_only_on_jax(["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2"])
)
def test_jump_t_integrates_a_discontinuity_cheaply(backend, method):
    kwargs = dict(method=method, rtol=1e-8, atol=1e-10)
    y0, ts = backend.asarray([0.0]), backend.asarray([0.0, 1.0])
    with_jump = odecore.solve(left_continuous, y0, ts, options={"jump_t": [0.5]}, **kwargs)
    without = odecore.solve(left_continuous, y0, ts, **kwargs)
    with_stats, without_stats = backend.stats(with_jump), backend.stats(without)
    # Piecewise constant f: every method is exact on each piece.
    assert abs(backend.to_numpy(with_jump.ys)[-1, 0] - 0.0) < 1e-14
    assert abs(backend.to_numpy(without.ys)[-1, 0]) > 1e-13  # without jump_t the kink costs
    assert with_stats["nreject"] <= 2
    assert without_stats["nreject"] >= 10 * max(with_stats["nreject"], 1)
    assert with_stats["nfev"] < without_stats["nfev"] / 2


@pytest.mark.parametrize(
    ("func", "ts"),
    [(right_continuous, [0.0, 1.0]), (left_continuous, [1.0, 0.0])],
    ids=["right-continuous-forward", "left-continuous-backward"],
)
def test_jump_t_does_not_depend_on_the_value_at_the_jump(backend, func, ts):
    y0 = backend.asarray([float(kink_exact(ts[0]))])
    kwargs = dict(method="dopri5", rtol=1e-8, atol=1e-10)
    with_jump = odecore.solve(func, y0, backend.asarray(ts), options={"jump_t": [0.5]}, **kwargs)
    without = odecore.solve(func, y0, backend.asarray(ts), **kwargs)
    with_stats = backend.stats(with_jump)
    assert with_stats["nreject"] <= 2
    assert with_stats["nfev"] < backend.stats(without)["nfev"] / 2
    assert abs(backend.to_numpy(with_jump.ys)[-1, 0] - float(kink_exact(ts[-1]))) < 1e-14


@pytest.mark.parametrize(
    ("func", "ends"),
    [
        (left_continuous, (0.5, 1.0)),
        (right_continuous, (0.5, 0.0)),
        (right_continuous, (0.0, 0.5)),
        (left_continuous, (1.0, 0.5)),
    ],
    ids=["starts-on-it", "starts-on-it-backward", "ends-on-it", "ends-on-it-backward"],
)
@pytest.mark.parametrize(
    ("method", "options"), first_only_on_jax([("rk4", {"step_size": 0.1}), ("dopri5", {})])
)
def test_jump_t_at_an_end_of_the_interval_takes_the_side_inside_it(
    backend, func, ends, method, options
):
    # Each func's value at the jump is the side outside the interval: a solve that starts
    # there must begin from the right limit, one that ends there must end on the left
    # limit. f is constant on the interval, so every method is exact up to rounding (rk4's
    # first stage from the wrong side was off by h/6 * 2 = 0.03). No evaluation may fall
    # outside the interval either.
    ts = np.linspace(*ends, 6)
    rec = backend.recorder(func)
    sol = odecore.solve(
        rec,
        backend.asarray([float(kink_exact(ts[0]))]),
        backend.asarray(ts),
        method=method,
        options={"jump_t": [0.5], **options},
    )
    assert np.max(np.abs(backend.to_numpy(sol.ys)[:, 0] - kink_exact(ts))) < 1e-14
    times = recorded_times(rec)
    assert np.all((times >= min(ends)) & (times <= max(ends)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("func", [left_continuous, right_continuous])
@pytest.mark.parametrize("ends", [(0.0, 1.0), (1.0, 0.0)], ids=["forward", "backward"])
@pytest.mark.parametrize(
    ("method", "options"), first_only_on_jax([("rk4", {"step_size": 0.1}), ("dopri5", {})])
)
def test_jump_t_limits_are_taken_in_the_precision_func_reads_time_in(
    backend, dtype, func, ends, method, options
):
    # func gets its time in the state's dtype. The limits of a jump taken in float64 round
    # back onto it in float32 and float16, and there `t <= 0.5` and `t < 0.5` see the jump
    # itself: one side is then evaluated on the far side (rk4 at step 0.1 ended 0.025 off,
    # dopri5 0.055). f is constant on each side, so every method is exact up to the
    # rounding of a dozen steps' additions of O(1) numbers in the state's dtype.
    ts = np.linspace(*ends, 5)
    y0 = backend.asarray([float(kink_exact(ts[0]))], dtype=dtype)
    ys = odecore.odeint(
        func,
        y0,
        backend.asarray(ts),
        method=method,
        rtol=1e-3,
        atol=1e-3,
        options={"jump_t": [0.5], **options},
    )
    assert backend.dtype_name(ys) == dtype
    error = np.max(np.abs(backend.to_numpy(ys).astype(np.float64)[:, 0] - kink_exact(ts)))
    assert error < 24 * float(np.finfo(dtype).eps)


NON_FSAL = [m for m in odecore.METHODS if not odecore.TABLEAUS[m].fsal]
FSAL = [m for m in odecore.METHODS if odecore.TABLEAUS[m].fsal]


def _dense_around_jump(backend, method):
    ts = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 1.0])
    options = {"jump_t": [0.5]}
    if method in odecore.FIXED_STEP_METHODS:
        options["step_size"] = 0.25  # outputs 0.3, 0.4, 0.45 lie inside the step [0.25, 0.5]
    sol = odecore.solve(
        left_continuous,
        backend.asarray([0.0]),
        backend.asarray(ts),
        method=method,
        options=options,
    )
    return np.max(np.abs(backend.to_numpy(sol.ys)[:, 0] - kink_exact(ts)))


def _interpolant_rounding(method):
    """The rounding error an interpolant can add on this O(1) solution: a few eps times its
    largest coefficient (DOP853's reach the hundreds; Hermite's basis has 3)."""
    dense = odecore.TABLEAUS[method].dense or ((3.0,),)
    return 8 * np.finfo(float).eps * max(3.0, float(np.max(np.abs(dense))))


@pytest.mark.parametrize("method", first_only_on_jax(FSAL))
def test_dense_output_before_a_jump(backend, method):
    assert _dense_around_jump(backend, method) < _interpolant_rounding(method)


@pytest.mark.parametrize("method", first_only_on_jax(NON_FSAL))
def test_dense_output_before_a_jump_non_fsal(backend, method):
    # Observed errors: 0.016 to 0.11 on a solution of size 0.5.
    assert _dense_around_jump(backend, method) < _interpolant_rounding(method)


def forced_oscillator(t, y):
    xp = namespace(y)
    return xp.stack([y[1], -2.0 * y[0] - 0.3 * y[1] + xp.sin(t)])


# float32 at rtol 1e-5 (well above its unit roundoff 6e-8, so the error estimate is not
# rounding noise), float64 at 1e-8.
JUMP_TOLERANCES = {"float32": (1e-5, 1e-7), "float64": (1e-8, 1e-10)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jump_t_on_a_smooth_solve_costs_at_most_one_step_and_the_reevaluation(backend, dtype):
    """A jump in a smooth field must not make the solve restart small. Landing on it splits
    one step in two and costs one evaluation of the right limit; the steps after it are
    those the error allows, from the step proposed before it. A restart from a small first
    step would take several accepted steps more to grow back; the grid after the jump is
    another, which may take one more by chance (or one more rejection: seen in float32 on
    NumPy 2.4, 3 rejections for 2 at jump 0.5), hence at most two accepted steps more. Every
    evaluation beyond the attempted steps' six (tsit5, FSAL) is the one reevaluation."""
    rtol, atol = JUMP_TOLERANCES[dtype]
    y0 = backend.asarray([1.0, 0.5], dtype=dtype)
    ts = backend.asarray(np.linspace(0.0, 4.0, 5), dtype=dtype)
    kwargs = dict(method="tsit5", rtol=rtol, atol=atol)
    without = backend.stats(odecore.solve(forced_oscillator, y0, ts, **kwargs))
    for jump in (0.37, 0.5, 1.9, 3.3):
        options = {"jump_t": [jump]}
        stats = backend.stats(odecore.solve(forced_oscillator, y0, ts, options=options, **kwargs))
        assert stats["naccept"] <= without["naccept"] + 2, jump
        extra_steps = stats["nsteps"] - without["nsteps"]
        assert stats["nfev"] == without["nfev"] + 6 * extra_steps + 1, jump


def test_jump_t_reevaluates_func_just_after_the_jump(backend):
    rec = backend.recorder(left_continuous)
    odecore.solve(
        rec,
        backend.asarray([0.0]),
        backend.asarray([0.0, 1.0]),
        method="dopri5",
        options={"jump_t": [0.5]},
    )
    times = [float(t) for t in rec.times]
    assert math.nextafter(0.5, math.inf) in times


# ---------------------------------------------------------------------------------------------
# Tolerances, norms and the controller
# ---------------------------------------------------------------------------------------------


def two_speeds(t, y):
    # Decoupled: a fast oscillation (component 0) and exp(sin t) (component 1).
    xp = namespace(y)
    return xp.stack([8.0 * xp.cos(8.0 * t) * y[0], xp.cos(t) * y[1]])


def two_speeds_exact(t):
    return np.array([math.exp(math.sin(8.0 * t)), math.exp(math.sin(t))])


def test_per_element_atol(backend):
    # Component 0 gets a huge atol and rtol: only component 1 controls the steps. With the
    # max norm the scaled error of a loose component cannot move the steps at all, so they
    # are exactly those of solving component 1 alone at its tolerances.
    y0 = np.array([1.0, 1.0])
    ts = backend.asarray([0.0, 5.0])
    kwargs = dict(options={"norm": "max"}, method="dopri5")
    sol = odecore.solve(
        two_speeds,
        backend.asarray(y0),
        ts,
        rtol=backend.asarray([1.0, 1e-10]),
        atol=backend.asarray([1.0, 1e-12]),
        **kwargs,
    )
    ys = backend.to_numpy(sol.ys)
    err = np.abs(ys[-1] - two_speeds_exact(5.0))
    assert err[1] < 1e-8
    assert err[0] > 1000 * err[1]  # the loose component is much less accurate
    alone = odecore.solve(cos_growth, backend.asarray(y0[1:]), ts, rtol=1e-10, atol=1e-12, **kwargs)
    assert backend.stats(sol)["nsteps"] == backend.stats(alone)["nsteps"]
    np.testing.assert_allclose(ys[:, 1], backend.to_numpy(alone.ys)[:, 0], rtol=1e-14)


def test_per_element_rtol_broadcasts(backend):
    y0 = backend.asarray(np.ones((3, 2)))
    ts = backend.asarray([0.0, 5.0])
    rtol = backend.asarray([1e-3, 1e-11])  # broadcasts over the leading axis

    sol = odecore.solve(cos_growth, y0, ts, rtol=rtol, atol=1e-14)
    tight = odecore.solve(cos_growth, y0, ts, rtol=1e-11, atol=1e-14)
    loose = odecore.solve(cos_growth, y0, ts, rtol=1e-3, atol=1e-14)
    # The tightest component controls the steps (RMS over the state).
    nsteps = [backend.stats(s)["nsteps"] for s in (loose, sol, tight)]
    assert nsteps[0] < nsteps[1] <= nsteps[2]
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[-1], math.exp(math.sin(5.0)), rtol=1e-8)


def oscillator(t, y):
    return namespace(y).stack([y[1], -y[0]])


def oscillator_exact(ts):
    return np.stack([np.cos(ts) + 0.5 * np.sin(ts), -np.sin(ts) + 0.5 * np.cos(ts)], axis=-1)


OSC_Y0 = np.array([1.0, 0.5])
OSC_TS = np.linspace(0.0, 5.0, 11)


def l2_norm(x):
    xp = namespace(x)
    return xp.sqrt(xp.sum(x * x))


@pytest.mark.parametrize(
    "options",
    first_only_on_jax(
        [
            pytest.param({"controller": "PI"}, id="PI"),
            pytest.param({"controller": "PI", "pcoeff": 0.2, "icoeff": 0.5}, id="PI-coeffs"),
            pytest.param({"controller": "hairer"}, id="hairer"),
            pytest.param({"norm": "max"}, id="max"),
            pytest.param({"norm": l2_norm}, id="callable"),
            pytest.param({"safety": 0.8, "ifactor": 5.0, "dfactor": 0.3}, id="factors"),
        ]
    ),
)
@pytest.mark.parametrize("method", first_only_on_jax(["dopri5", "bosh3"]))
def test_controller_options_are_accurate_and_used(backend, method, options):
    rtol = 1e-8
    y0, ts = backend.asarray(OSC_Y0), backend.asarray(OSC_TS)
    sol = odecore.solve(oscillator, y0, ts, method=method, options=options, rtol=rtol)
    default = odecore.solve(oscillator, y0, ts, method=method, rtol=rtol)
    assert sol.success
    assert np.max(np.abs(backend.to_numpy(sol.ys) - oscillator_exact(OSC_TS))) < 100 * rtol
    assert backend.stats(sol) != backend.stats(default)  # the option changed the steps


def test_pi_controller_uses_the_previous_error(backend):
    # Same total exponent (icoeff + pcoeff = 0.7): only the ratio_prev**(pcoeff/k) factor of
    # the PI controller can make these two take different steps.
    y0, ts = backend.asarray(OSC_Y0), backend.asarray(OSC_TS)
    pi = odecore.solve(oscillator, y0, ts, options={"controller": "PI"}, rtol=1e-8)
    i_only = odecore.solve(
        oscillator,
        y0,
        ts,
        options={"controller": "PI", "icoeff": 0.7, "pcoeff": 0.0},
        rtol=1e-8,
    )
    assert backend.stats(pi) != backend.stats(i_only)
    # The PI controller's point: fewer rejected steps than the I controller.
    default = odecore.solve(oscillator, y0, ts, rtol=1e-8)
    assert backend.stats(pi)["nreject"] < backend.stats(default)["nreject"]


def test_shrink_after_accept_follows_the_controller_formula():
    """After an accepted step with error ratio r the I controller proposes
    ``h * safety * r**(-1/k)``; by default (torchdiffeq's rule) never below h."""
    from odecore.adapters.numpy import BACKEND

    from odecore._ops import ScalarOps
    from odecore.control.controller import Controller

    ops = ScalarOps(BACKEND, np.float64)
    k = 5
    for shrink, ratio, expected in [
        (False, 0.99, 1.0),
        (True, 0.99, 0.9 * 0.99 ** (-1 / k)),
        (True, 0.01, min(10.0, 0.9 * 0.01 ** (-1 / k))),
        (False, 0.01, 0.9 * 0.01 ** (-1 / k)),
    ]:
        ctl = Controller(0.9, 10.0, 0.2, 1.0, 0.0, k, shrink_after_accept=shrink)
        got = ctl.next_dt(ops, 0.1, ratio, 1.0, True)
        assert got == pytest.approx(0.1 * expected, rel=1e-14), (shrink, ratio)
    # A rejected step shrinks either way, by the same formula, down to dfactor.
    for shrink in (False, True):
        ctl = Controller(0.9, 10.0, 0.2, 1.0, 0.0, k, shrink_after_accept=shrink)
        assert ctl.next_dt(ops, 0.1, 2.0, 1.0, False) == pytest.approx(0.1 * 0.9 * 2.0**-0.2)
        assert ctl.next_dt(ops, 0.1, 1e6, 1.0, False) == pytest.approx(0.1 * 0.2)


def cubic_growth(t, y):
    return y * (1.0 + t) ** 3


def test_shrink_after_accept_rejects_fewer_steps_where_the_error_grows(backend):
    """y' = y(1 + t)^3: the error per step grows along the solution, so holding the step
    after each accepted one ends in rejections that shrinking avoids. Both stay accurate."""

    def exact(t):
        return np.exp(((1.0 + t) ** 4 - 1.0) / 4.0)

    y0, ts = backend.asarray([1.0]), backend.asarray([0.0, 1.2])
    held = odecore.solve(cubic_growth, y0, ts, rtol=1e-8, atol=1e-10)
    shrunk = odecore.solve(
        cubic_growth, y0, ts, rtol=1e-8, atol=1e-10, options={"shrink_after_accept": True}
    )
    for sol in (held, shrunk):
        assert abs(backend.to_numpy(sol.ys)[-1, 0] / exact(1.2) - 1.0) < 1e-6
    assert backend.stats(shrunk)["nreject"] < backend.stats(held)["nreject"]


def rms_like_builtin(x):
    """The built-in rms norm by the backend's own arithmetic, so that the steps agree bitwise:
    torch's adapter computes it as ||x|| / sqrt(n), the others as sqrt(x . x / n)."""
    xp = namespace(x)
    flat = xp.reshape(x, (-1,))
    if array_api_compat.is_torch_array(x):
        return xp.linalg.vector_norm(flat) / math.sqrt(flat.shape[0])
    return xp.sqrt(xp.vecdot(flat, flat) / flat.shape[0])


def max_abs(x):
    xp = namespace(x)
    return xp.max(xp.abs(x))


def test_callable_norm_equal_to_builtin_gives_identical_steps(backend):
    seen = []

    def recording(norm):
        def wrapped(x):
            seen.append(tuple(x.shape))
            return norm(x)

        return wrapped

    y0 = backend.asarray(np.ones((2, 3)))
    ts = backend.asarray([0.0, 4.0])

    def rhs(t, y):
        return namespace(y).cos(t) * y * constant([1.0, 2.0, 3.0], y)

    for builtin, user in (("rms", rms_like_builtin), ("max", max_abs)):
        a = odecore.solve(rhs, y0, ts, options={"norm": builtin})
        b = odecore.solve(rhs, y0, ts, options={"norm": recording(user)})
        assert backend.stats(a) == backend.stats(b)
        np.testing.assert_array_equal(backend.to_numpy(a.ys), backend.to_numpy(b.ys))
    assert set(seen) == {(2, 3)}  # the user's norm sees the state's shape


def test_batched_callable_norm_returns_one_value_per_sample(backend):
    seen = []

    def norm(x):
        seen.append(tuple(x.shape))
        xp = namespace(x)
        return xp.max(xp.abs(x), axis=1)

    def rhs(t, y):
        return namespace(y).stack([y[:, 1], -y[:, 0]], axis=1)

    sol = odecore.solve(
        rhs,
        backend.asarray([[1.0, 0.5], [2.0, 0.0]]),
        backend.asarray(OSC_TS),
        options={"norm": norm},
        batch_axis=0,
        rtol=1e-8,
    )
    assert set(seen) == {(2, 2)}
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[:, 0], oscillator_exact(OSC_TS), atol=1e-6)


def test_max_step_is_respected(backend):
    rec = backend.recorder(oscillator)
    sol = odecore.solve(
        rec, backend.asarray(OSC_Y0), backend.asarray([0.0, 5.0]), options={"max_step": 0.05}
    )
    assert backend.stats(sol)["nsteps"] >= 100
    np.testing.assert_allclose(backend.to_numpy(sol.ys)[-1], oscillator_exact(5.0), atol=1e-7)


def test_first_step_is_used(backend):
    # dopri5's second stage is at t0 + h/5; with first_step the initial-step probe is skipped.
    rec = backend.recorder(oscillator)
    odecore.solve(
        rec, backend.asarray(OSC_Y0), backend.asarray([1.0, 5.0]), options={"first_step": 0.02}
    )
    assert float(rec.times[0]) == 1.0
    assert float(rec.times[1]) == pytest.approx(1.0 + 0.2 * 0.02, rel=1e-12)


@pytest.mark.parametrize(
    ("error", "match", "options"),
    [
        (ValueError, "controller", {"controller": "PID"}),
        (TypeError, "shrink_after_accept'] must be True or False", {"shrink_after_accept": 1}),
        (ValueError, "norm", {"norm": "l2"}),
        (TypeError, "norm", {"norm": 2}),
        (ValueError, "ifactor", {"ifactor": 0.5}),
        (ValueError, "dfactor", {"dfactor": 1.5}),
        (ValueError, "safety", {"safety": -0.9}),
        (ValueError, "min_step", {"min_step": 1.0, "max_step": 0.1}),
    ],
    ids=["controller", "shrink", "norm-name", "norm-type", "ifactor", "dfactor", "safety", "min"],
)
def test_invalid_controller_options_raise(backend, error, match, options):
    with pytest.raises(error, match=match):
        odecore.solve(oscillator, backend.asarray(OSC_Y0), backend.asarray(OSC_TS), options=options)


# ---------------------------------------------------------------------------------------------
# The Solution on success
# ---------------------------------------------------------------------------------------------


def test_solution_on_success(backend):
    ts = np.array([0.0, 0.5, 2.0])
    y0 = backend.asarray([1.0])
    sol = odecore.solve(decay, y0, backend.asarray(ts), method="tsit5")
    assert sol.success is True
    assert backend.status(sol) == odecore.Status.SUCCESS == 0
    assert sol.message == "success"
    assert sol.method == "tsit5"
    assert float(sol.t_reached) == 2.0
    np.testing.assert_array_equal(backend.to_numpy(sol.ts), ts)
    stats = backend.stats(sol)
    assert set(stats) == {"nfev", "nsteps", "naccept", "nreject"}
    assert stats["nsteps"] == stats["naccept"] + stats["nreject"]
    np.testing.assert_array_equal(
        backend.to_numpy(sol.ys),
        backend.to_numpy(odecore.odeint(decay, y0, backend.asarray(ts), method="tsit5")),
    )
    assert odecore.solve(decay, y0, backend.asarray(ts)).method == "dopri5"  # the default


def test_batched_solution_on_success(backend):
    sol = odecore.solve(
        batched_rhs, backend.asarray(Y0_BATCH), backend.asarray([0.0, 1.0]), batch_axis=0
    )
    assert sol.success
    np.testing.assert_array_equal(backend.status(sol), np.zeros(4))
    assert sol.message == "success"
    stats = backend.stats(sol)
    np.testing.assert_array_equal(stats["nsteps"], stats["naccept"] + stats["nreject"])
    np.testing.assert_array_equal(backend.to_numpy(sol.t_reached), np.ones(4))


# ---------------------------------------------------------------------------------------------
# Statistics count what really happened
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", first_only_on_jax(odecore.METHODS))
def test_nfev_counts_the_calls_of_func(backend, method):
    tab = odecore.TABLEAUS[method]
    fixed = method in odecore.FIXED_STEP_METHODS
    options = {"step_size": 0.1} if fixed else None
    ts = backend.asarray([0.0, 3.0])
    rec = backend.recorder(cos_growth)
    sol = odecore.solve(rec, backend.asarray([1.0, 2.0]), ts, method=method, options=options)
    stats = backend.stats(sol)
    assert stats["nfev"] == len(rec.times)
    # f(t0); the initial-step probe (adaptive only); per attempted step, stages 1..s-1 and
    # f(t_new) unless FSAL. The last step lands on t1, so the interpolant (and its extra
    # stages) is never needed.
    per_step = tab.stages - 1 + (0 if tab.fsal else 1)
    expected = 1 + (0 if fixed else 1) + per_step * stats["nsteps"]
    assert stats["nfev"] == expected

    batch = backend.recorder(cos_growth_batched)
    sol = odecore.solve(
        batch,
        backend.asarray([[1.0], [5.0]]),
        ts,
        method=method,
        options=options,
        batch_axis=0,
    )
    assert backend.stats(sol)["nfev"] == len(batch.times)  # one per call on the whole batch


def test_step_size_larger_than_the_interval(backend):
    sol = odecore.solve(
        decay,
        backend.asarray([1.0]),
        backend.asarray([0.0, 0.3]),
        method="rk4",
        options={"step_size": 5},
    )
    stats = backend.stats(sol)
    assert stats["nsteps"] == 1
    assert stats["nfev"] == 1 + 4


def switching_batched(t, y):
    xp = namespace(y)
    sign = xp.where(t <= 0.5, 1.0, -1.0)
    return sign[:, None] * xp.cos(3 * t)[:, None] * y


def switching(t, y):
    xp = namespace(y)
    return xp.where(t <= 0.5, 1.0, -1.0) * xp.cos(3 * t) * y


@pytest.mark.parametrize("method", first_only_on_jax(["dopri5", "bosh3", "dopri8"]))
def test_batched_jump_t_and_step_t_match_single_solves(backend, method):
    options = {"jump_t": [0.5], "step_t": [0.25, 0.8]}
    y0 = np.array([[1.0], [-3.0], [1e-3]])
    ts = backend.asarray(np.linspace(0.0, 1.0, 6))
    batch = odecore.solve(
        switching_batched, backend.asarray(y0), ts, method=method, options=options, batch_axis=0
    )
    batch_ys = backend.to_numpy(batch.ys)
    for i in range(3):
        alone = odecore.solve(switching, backend.asarray(y0[i]), ts, method=method, options=options)
        assert int(backend.stats(batch)["nsteps"][i]) == backend.stats(alone)["nsteps"]
        np.testing.assert_allclose(batch_ys[:, i], backend.to_numpy(alone.ys), rtol=1e-10)


def test_single_time_still_checks_the_tolerances(backend):
    with pytest.raises(ValueError, match="^rtol must be non-negative"):
        odecore.solve(decay, backend.asarray([1.0]), backend.asarray([0.0]), rtol=-1.0)


def test_zero_rtol_controls_the_error_by_atol_alone(backend):
    # y0 e^{-t} from y0 = 1000: with rtol = 0 the accepted error is atol's, absolute, and the
    # global error stays within a small multiple of it (the decay damps what each step
    # leaves). Any relative share would allow 1000 * rtol: with the default rtol, 1e-4.
    t = np.linspace(0.0, 2.0, 3)
    y0 = np.array([1000.0, 1.0])
    atol = 1e-9
    sol = odecore.solve(decay, backend.asarray(y0), backend.asarray(t), rtol=0, atol=atol)
    assert sol.success
    error = np.abs(backend.to_numpy(sol.ys) - y0 * np.exp(-t[:, None]))
    assert error.max() < 100 * atol
    # Per element, and per sample of a batch: a zero element is valid.
    rtol = backend.asarray(np.array([[0.0, 1e-6], [0.0, 0.0]]))
    batch = odecore.solve(
        decay, backend.asarray(np.stack([y0, y0])), backend.asarray(t), rtol=rtol, atol=atol,
        batch_axis=0,
    )  # fmt: skip
    batch_error = np.abs(backend.to_numpy(batch.ys)[:, 1] - y0 * np.exp(-t[:, None]))
    assert batch_error.max() < 100 * atol


@pytest.mark.backend("jax")
def test_zero_rtol_under_jit_is_valid():
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        t = jnp.linspace(0.0, 2.0, 3)
        y0 = jnp.asarray([1000.0, 1.0])

        @jax.jit
        def run(rtol):
            sol = odecore.solve(decay, y0, t, rtol=rtol, atol=1e-9, throw=False)
            return sol.status, sol.ys

        status, ys = run(jnp.asarray(0.0))
        assert int(status) == int(odecore.Status.SUCCESS)
        error = np.abs(np.asarray(ys) - np.asarray(y0) * np.exp(-np.asarray(t)[:, None]))
        assert error.max() < 1e-7
        status, _ = run(jnp.asarray(-1e-6))
        assert int(status) == int(odecore.Status.INVALID_INPUT)
