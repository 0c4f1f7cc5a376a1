"""The solve loop's behaviour: step counts, per-sample stepping, stop times, options, results.

Expected step and evaluation counts are derived here from the grid and the tableau's stage
count, never read back from odecore's statistics.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import odecore


def decay(t, y):
    return -y


class Recorder:
    """Wraps a func and records the times (and states) it is called with."""

    def __init__(self, func):
        self.func = func
        self.times = []
        self.states = []

    def __call__(self, t, y, *params):
        self.times.append(np.array(t, dtype=np.float64, copy=True))
        self.states.append(np.array(y, copy=True))
        return self.func(t, y, *params)


def stages(method):
    return odecore.TABLEAUS[method].stages


# ---------------------------------------------------------------------------------------------
# Fixed-step methods: steps and function evaluations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", odecore.FIXED_STEP_METHODS)
def test_fixed_step_methods_are_not_fsal(method):
    # The nfev formula below assumes it.
    assert not odecore.TABLEAUS[method].fsal


@pytest.mark.parametrize("decreasing", [False, True])
@pytest.mark.parametrize("method", odecore.FIXED_STEP_METHODS)
def test_fixed_step_without_step_size_steps_between_output_times(method, decreasing):
    ts = np.array([0.0, 0.1, 0.35, 0.4, 1.0, 1.7])
    if decreasing:
        ts = ts[::-1]
    rec = Recorder(lambda t, y: np.cos(t) * y)
    sol = odecore.solve(rec, np.array([1.0, 2.0]), ts, method=method)
    n = len(ts) - 1
    assert sol.stats["nsteps"] == sol.stats["naccept"] == n
    assert sol.stats["nreject"] == 0
    assert sol.stats["nfev"] == 1 + stages(method) * n == len(rec.times)
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
@pytest.mark.parametrize("method", odecore.FIXED_STEP_METHODS)
def test_fixed_step_with_step_size_counts(method, t0, t1, h):
    n = _exact_steps(t0, t1, h)
    for ts in ([float(t0), float(t1)], np.linspace(float(t0), float(t1), 9)):
        sol = odecore.solve(decay, np.array([1.0]), ts, method=method, options={"step_size": h})
        # Output times are filled by interpolation and never add steps or evaluations.
        assert sol.stats["nsteps"] == sol.stats["naccept"] == n
        assert sol.stats["nfev"] == 1 + stages(method) * n
        assert sol.success


def test_step_size_steps_are_uniform_from_t0_and_land_on_t1():
    # Euler evaluates f once per step, at the step's start: the call times are the grid.
    rec = Recorder(decay)
    odecore.solve(rec, np.array([1.0]), [0.5, 1.2], method="euler", options={"step_size": 0.1})
    times = np.array([float(t) for t in rec.times])
    np.testing.assert_allclose(times, 0.5 + 0.1 * np.arange(8), rtol=0, atol=1e-14)
    assert times[-1] == 1.2  # the last step lands exactly on t[-1]


@pytest.mark.parametrize("method", odecore.FIXED_STEP_METHODS)
def test_step_size_outputs_are_interpolated_accurately(method):
    # y' = y on [0, 2] with h = 0.1; outputs at every multiple of 0.05: the even ones are step
    # ends, the odd ones lie mid-step and come from cubic Hermite interpolation, whose own
    # error is at most h^4 / 384 * max|y^(4)| = 1e-4 / 384 * e^2 (about 1.9e-6), on top of
    # the errors at the step ends it interpolates.
    ts = np.linspace(0.0, 2.0, 41)
    sol = odecore.solve(
        lambda t, y: y, np.array([1.0]), ts, method=method, options={"step_size": 0.1}
    )
    assert sol.stats["nsteps"] == 20
    error = np.abs(sol.ys[:, 0] - np.exp(ts))
    at_ends, mid_step = error[::2].max(), error[1::2].max()
    assert mid_step <= 1.1 * at_ends + 0.1**4 / 384 * math.exp(2.0)


# ---------------------------------------------------------------------------------------------
# Per-sample stepping
# ---------------------------------------------------------------------------------------------

RATES = np.array([0.1, 1.0, 30.0, 5.0])
Y0_BATCH = np.array([[1.0, 2.0], [3.0, -1.0], [1e3, 1e-3], [-2.0, 0.5]])
FORCING = np.array([1.0, 0.5])


def batched_rhs(t, y):
    # Non-autonomous: each sample reads its own time from the (B,) vector t.
    return -RATES[:, None] * y + np.cos(t)[:, None] * FORCING


def single_rhs(rate):
    return lambda t, y: -rate * y + np.cos(t) * FORCING


BATCH_METHODS = [
    ("dopri5", None),
    ("tsit5", None),
    ("dopri8", None),
    ("bosh3", None),
    ("fehlberg2", None),
    ("rk4", None),
    ("rk4", {"step_size": 0.01}),
]


@pytest.mark.parametrize(("method", "options"), BATCH_METHODS)
def test_each_sample_equals_solving_it_alone(method, options):
    ts = np.linspace(0.0, 3.0, 7)
    batch = odecore.solve(batched_rhs, Y0_BATCH, ts, method=method, options=options, batch_axis=0)
    assert batch.ys.shape == (7, 4, 2)
    assert batch.stats["nsteps"].shape == (4,)
    for i, rate in enumerate(RATES):
        alone = odecore.solve(single_rhs(rate), Y0_BATCH[i], ts, method=method, options=options)
        for key in ("nsteps", "naccept", "nreject"):
            assert int(batch.stats[key][i]) == alone.stats[key], key
        assert int(batch.status[i]) == alone.status == odecore.Status.SUCCESS
        # Not bit-identical: NumPy's matrix product sums the stages in an order that depends
        # on the number of columns, and the error estimate (a difference of nearly equal
        # stage combinations) amplifies that to ~1e-7 relative in the step size. The steps
        # stay the same, the outputs move by ~rtol * 1e-6 (observed up to 5e-13 relative).
        # Cross-talk between samples would show at the rtol level (1e-7).
        scale = np.max(np.abs(alone.ys))
        assert np.max(np.abs(batch.ys[:, i] - alone.ys)) <= 1e-10 * scale


def test_samples_get_their_own_times_and_steps():
    rec = Recorder(batched_rhs)
    sol = odecore.solve(rec, Y0_BATCH, [0.0, 3.0], batch_axis=0)
    assert all(t.shape == (4,) for t in rec.times)
    # The fastest sample needs many more steps than the slowest.
    assert sol.stats["nsteps"][2] > 5 * sol.stats["nsteps"][0]
    # At some call the samples are at different times.
    assert any(len(set(t.tolist())) > 1 for t in rec.times)


def test_finished_samples_stop_changing():
    rec = Recorder(batched_rhs)
    sol = odecore.solve(rec, Y0_BATCH, [0.0, 3.0], batch_axis=0)
    slow = 0  # the sample that finishes first
    final = sol.ys[-1, slow]
    changing = [i for i, y in enumerate(rec.states) if not np.array_equal(y[slow], final)]
    tail = range(changing[-1] + 1, len(rec.states))
    # Once finished, the sample sits at t1 with its final state while the others go on.
    assert len(tail) > 10
    assert all(rec.times[i][slow] == 3.0 for i in tail)
    assert len({float(rec.times[i][2]) for i in tail}) > 10  # the fast sample moves on


@pytest.mark.parametrize("batch_axis", [1, -1])
def test_batch_axis_last(batch_axis):
    y0 = Y0_BATCH.T  # (N, B)

    def rhs(t, y):
        assert t.shape == (4,) and y.shape == (2, 4)
        return -RATES[None, :] * y + np.cos(t)[None, :] * FORCING[:, None]

    ts = np.linspace(0.0, 3.0, 5)
    sol = odecore.solve(rhs, y0, ts, batch_axis=batch_axis)
    assert sol.ys.shape == (5, 2, 4)
    first = odecore.solve(batched_rhs, Y0_BATCH, ts, batch_axis=0)
    np.testing.assert_allclose(sol.ys, np.moveaxis(first.ys, 1, 2), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(sol.stats["nsteps"], first.stats["nsteps"])


def test_batched_decreasing_time():
    ts = np.linspace(3.0, 0.0, 5)
    batch = odecore.solve(batched_rhs, Y0_BATCH, ts, batch_axis=0)
    for i, rate in enumerate(RATES):
        alone = odecore.solve(single_rhs(rate), Y0_BATCH[i], ts)
        assert int(batch.stats["nsteps"][i]) == alone.stats["nsteps"]
        scale = np.max(np.abs(alone.ys))
        assert np.max(np.abs(batch.ys[:, i] - alone.ys)) <= 1e-10 * scale
    np.testing.assert_array_equal(batch.t_reached, np.zeros(4))


def test_batched_params_and_per_sample_tolerances():
    rates = np.array([0.5, 2.0])

    def rhs(t, y, params):
        (k,) = params
        return -k[:, None] * y

    y0 = np.array([[1.0], [1.0]])
    atol = np.array([[1e-12], [1e-3]])  # sample 1 gets a loose tolerance
    sol = odecore.solve(rhs, y0, [0.0, 2.0], params=(rates,), batch_axis=0, rtol=1e-12, atol=atol)
    exact = np.exp(-rates * 2.0)
    err = np.abs(sol.ys[-1, :, 0] - exact)
    assert err[0] < 1e-11
    assert sol.stats["nsteps"][1] < sol.stats["nsteps"][0]


# ---------------------------------------------------------------------------------------------
# Inputs: a single time, decreasing time, plain Python values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [None, "rk4", "dopri8"])
def test_single_time_returns_y0_with_no_work(method):
    rec = Recorder(decay)
    y0 = np.array([[1.5, -2.25], [3.0, 1e-300]])
    sol = odecore.solve(rec, y0, np.array([0.7]), method=method)
    assert sol.ys.shape == (1, 2, 2)
    np.testing.assert_array_equal(sol.ys[0], y0)
    assert sol.stats["nfev"] == 0 and rec.times == []
    assert sol.success and sol.status == odecore.Status.SUCCESS
    assert odecore.odeint(rec, y0, [0.7]).shape == (1, 2, 2)


def test_single_time_batched():
    sol = odecore.solve(decay, Y0_BATCH, [1.0], batch_axis=0)
    np.testing.assert_array_equal(sol.ys[0], Y0_BATCH)
    assert sol.stats["nfev"] == 0
    assert sol.success


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3", "rk4"])
def test_decreasing_time(method):
    ts = np.linspace(2.0, -1.0, 7)
    y_start = np.exp(np.sin(2.0))
    ys = odecore.odeint(lambda t, y: np.cos(t) * y, np.array([y_start]), ts, method=method)
    # rk4 steps exactly between the outputs (0.5 apart): error ~1e-4.
    tol = 1e-3 if method == "rk4" else 1e-6
    np.testing.assert_allclose(ys[:, 0], np.exp(np.sin(ts)), rtol=tol)


def test_lists_and_floats_as_inputs():
    ys = odecore.odeint(decay, [1.0, 2.0], [0, 1, 2])  # int times are fine
    np.testing.assert_allclose(ys, np.exp(-np.array([0, 1, 2]))[:, None] * [1.0, 2.0], rtol=1e-6)
    scalar = odecore.odeint(decay, 1.0, [0.0, 1.0])  # a 0-d state
    assert scalar.shape == (2,)
    np.testing.assert_allclose(scalar[-1], math.exp(-1.0), rtol=1e-6)
    nested = odecore.odeint(decay, [[1.0], [2.0]], [0.0, 1.0])
    assert nested.shape == (2, 2, 1)


def test_params_reach_func():
    seen = []

    def rhs(t, y, params):
        seen.append(params)
        k, c = params
        return -k * y + c

    params = (2.0, np.array([0.5, 1.0]))
    ys = odecore.odeint(rhs, np.array([0.0, 0.0]), [0.0, 3.0], params=params)
    assert all(p is params for p in seen)
    expected = params[1] / 2.0 * (1 - math.exp(-6.0))
    np.testing.assert_allclose(ys[-1], expected, rtol=1e-6)


def test_state_shape_is_kept():
    y0 = np.arange(6.0).reshape(2, 3) + 1.0
    shapes = set()

    def rhs(t, y):
        shapes.add(y.shape)
        return -y

    ys = odecore.odeint(rhs, y0, [0.0, 0.5, 1.0])
    assert ys.shape == (3, 2, 3) and shapes == {(2, 3)}
    np.testing.assert_allclose(ys[-1], y0 * math.exp(-1.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# step_t and jump_t
# ---------------------------------------------------------------------------------------------

STEP_T = [0.123456789, 0.7, 1.3, 2.9]


@pytest.mark.parametrize(
    ("method", "options"),
    [("dopri8", {}), ("rk4", {"step_size": 0.25}), ("euler", {}), ("adaptive_heun", {})],
)
def test_steps_land_on_step_t(method, options):
    # These methods evaluate f(t_new, y_new) after each step, at exactly the step's end.
    rec = Recorder(lambda t, y: np.cos(t) * y)
    sol = odecore.solve(
        rec, np.array([1.0]), [0.0, 3.0], method=method, options={**options, "step_t": STEP_T}
    )
    called = {float(t) for t in rec.times}
    assert set(STEP_T) <= called
    plain = Recorder(lambda t, y: np.cos(t) * y)
    odecore.solve(plain, np.array([1.0]), [0.0, 3.0], method=method, options=options)
    assert not set(STEP_T) & {float(t) for t in plain.times}
    assert sol.success


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_fsal_steps_land_on_step_t(method):
    # FSAL methods reach t_new as t + 1.0 * h with h = t_stop - t: within an ulp or two.
    rec = Recorder(lambda t, y: np.cos(t) * y)
    odecore.solve(rec, np.array([1.0]), [0.0, 3.0], method=method, options={"step_t": STEP_T})
    times = np.array([float(t) for t in rec.times])
    for stop in STEP_T:
        assert np.min(np.abs(times - stop)) <= 4 * np.spacing(stop)


def test_step_t_outside_the_interval_is_ignored():
    base = odecore.solve(decay, np.array([1.0]), [0.0, 1.0])
    sol = odecore.solve(decay, np.array([1.0]), [0.0, 1.0], options={"step_t": [-1.0, 0.0, 5.0]})
    assert sol.stats == base.stats
    np.testing.assert_array_equal(sol.ys, base.ys)


def test_step_t_with_decreasing_time():
    rec = Recorder(lambda t, y: np.cos(t) * y)
    sol = odecore.solve(
        rec, np.array([1.0]), [3.0, 0.0], method="dopri8", options={"step_t": [2.5, 0.4]}
    )
    called = {float(t) for t in rec.times}
    assert {2.5, 0.4} <= called
    np.testing.assert_allclose(sol.ys[-1, 0], math.exp(-math.sin(3.0)), rtol=1e-6)


def kink_exact(t):
    t = np.asarray(t, dtype=np.float64)
    return np.where(t < 0.5, t, 1.0 - t)


def left_continuous(t, y):
    # y' = 1 up to and including t = 0.5, -1 after.
    return np.where(t <= 0.5, 1.0, -1.0) * np.ones_like(y)


def right_continuous(t, y):
    # y' = 1 before t = 0.5, -1 from t = 0.5 on: the usual way to write it.
    return np.where(t < 0.5, 1.0, -1.0) * np.ones_like(y)


KINK_TIMES = np.linspace(0.0, 1.0, 11)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2"])
def test_jump_t_integrates_a_discontinuity_cheaply(method):
    kwargs = dict(method=method, rtol=1e-8, atol=1e-10)
    with_jump = odecore.solve(
        left_continuous, np.array([0.0]), [0.0, 1.0], options={"jump_t": [0.5]}, **kwargs
    )
    without = odecore.solve(left_continuous, np.array([0.0]), [0.0, 1.0], **kwargs)
    # Piecewise constant f: every method is exact on each piece.
    assert abs(with_jump.ys[-1, 0] - 0.0) < 1e-14
    assert abs(without.ys[-1, 0]) > 1e-13  # without jump_t the kink costs accuracy
    assert with_jump.stats["nreject"] <= 2
    assert without.stats["nreject"] >= 10 * max(with_jump.stats["nreject"], 1)
    assert with_jump.stats["nfev"] < without.stats["nfev"] / 2


@pytest.mark.parametrize(
    ("func", "ts"),
    [(right_continuous, [0.0, 1.0]), (left_continuous, [1.0, 0.0])],
    ids=["right-continuous-forward", "left-continuous-backward"],
)
def test_jump_t_does_not_depend_on_the_value_at_the_jump(func, ts):
    y0 = np.array([float(kink_exact(ts[0]))])
    kwargs = dict(method="dopri5", rtol=1e-8, atol=1e-10)
    with_jump = odecore.solve(func, y0, ts, options={"jump_t": [0.5]}, **kwargs)
    without = odecore.solve(func, y0, ts, **kwargs)
    assert with_jump.stats["nreject"] <= 2
    assert with_jump.stats["nfev"] < without.stats["nfev"] / 2
    assert abs(with_jump.ys[-1, 0] - float(kink_exact(ts[-1]))) < 1e-14


NON_FSAL = [m for m in odecore.METHODS if not odecore.TABLEAUS[m].fsal]
FSAL = [m for m in odecore.METHODS if odecore.TABLEAUS[m].fsal]


def _dense_around_jump(method):
    ts = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 1.0])
    options = {"jump_t": [0.5]}
    if method in odecore.FIXED_STEP_METHODS:
        options["step_size"] = 0.25  # outputs 0.3, 0.4, 0.45 lie inside the step [0.25, 0.5]
    sol = odecore.solve(left_continuous, np.array([0.0]), ts, method=method, options=options)
    return np.max(np.abs(sol.ys[:, 0] - kink_exact(ts)))


def _interpolant_rounding(method):
    """The rounding error an interpolant can add on this O(1) solution: a few eps times its
    largest coefficient (DOP853's reach the hundreds; Hermite's basis has 3)."""
    dense = odecore.TABLEAUS[method].dense or ((3.0,),)
    return 8 * np.finfo(float).eps * max(3.0, float(np.max(np.abs(dense))))


@pytest.mark.parametrize("method", FSAL)
def test_dense_output_before_a_jump(method):
    assert _dense_around_jump(method) < _interpolant_rounding(method)


@pytest.mark.parametrize("method", NON_FSAL)
def test_dense_output_before_a_jump_non_fsal(method):
    # Observed errors: 0.016 to 0.11 on a solution of size 0.5.
    assert _dense_around_jump(method) < _interpolant_rounding(method)


def test_jump_t_reevaluates_func_just_after_the_jump():
    rec = Recorder(left_continuous)
    odecore.solve(rec, np.array([0.0]), [0.0, 1.0], method="dopri5", options={"jump_t": [0.5]})
    times = [float(t) for t in rec.times]
    assert math.nextafter(0.5, math.inf) in times


# ---------------------------------------------------------------------------------------------
# Tolerances, norms and the controller
# ---------------------------------------------------------------------------------------------


def two_speeds(t, y):
    # Decoupled: a fast oscillation (component 0) and exp(sin t) (component 1).
    return np.stack([8.0 * np.cos(8.0 * t) * y[0], np.cos(t) * y[1]])


def two_speeds_exact(t):
    return np.array([math.exp(math.sin(8.0 * t)), math.exp(math.sin(t))])


def test_per_element_atol():
    # Component 0 gets a huge atol and rtol: only component 1 controls the steps. With the
    # max norm the scaled error of a loose component cannot move the steps at all, so they
    # are exactly those of solving component 1 alone at its tolerances.
    y0 = np.array([1.0, 1.0])
    kwargs = dict(options={"norm": "max"}, method="dopri5")
    sol = odecore.solve(
        two_speeds,
        y0,
        [0.0, 5.0],
        rtol=np.array([1.0, 1e-10]),
        atol=np.array([1.0, 1e-12]),
        **kwargs,
    )
    err = np.abs(sol.ys[-1] - two_speeds_exact(5.0))
    assert err[1] < 1e-8
    assert err[0] > 1000 * err[1]  # the loose component is much less accurate
    alone = odecore.solve(
        lambda t, y: np.cos(t) * y, y0[1:], [0.0, 5.0], rtol=1e-10, atol=1e-12, **kwargs
    )
    assert sol.stats["nsteps"] == alone.stats["nsteps"]
    np.testing.assert_allclose(sol.ys[:, 1], alone.ys[:, 0], rtol=1e-14)


def test_per_element_rtol_broadcasts():
    y0 = np.ones((3, 2))
    rtol = np.array([1e-3, 1e-11])  # broadcasts over the leading axis

    def rhs(t, y):
        return np.cos(t) * y

    sol = odecore.solve(rhs, y0, [0.0, 5.0], rtol=rtol, atol=1e-14)
    tight = odecore.solve(rhs, y0, [0.0, 5.0], rtol=1e-11, atol=1e-14)
    loose = odecore.solve(rhs, y0, [0.0, 5.0], rtol=1e-3, atol=1e-14)
    # The tightest component controls the steps (RMS over the state).
    assert loose.stats["nsteps"] < sol.stats["nsteps"] <= tight.stats["nsteps"]
    np.testing.assert_allclose(sol.ys[-1], math.exp(math.sin(5.0)), rtol=1e-8)


def oscillator(t, y):
    return np.stack([y[1], -y[0]])


def oscillator_exact(ts):
    return np.stack([np.cos(ts) + 0.5 * np.sin(ts), -np.sin(ts) + 0.5 * np.cos(ts)], axis=-1)


OSC_Y0 = np.array([1.0, 0.5])
OSC_TS = np.linspace(0.0, 5.0, 11)


@pytest.mark.parametrize(
    "options",
    [
        {"controller": "PI"},
        {"controller": "PI", "pcoeff": 0.2, "icoeff": 0.5},
        {"norm": "max"},
        {"norm": lambda x: np.sqrt(np.sum(x * x))},
        {"safety": 0.8, "ifactor": 5.0, "dfactor": 0.3},
    ],
    ids=["PI", "PI-coeffs", "max", "callable", "factors"],
)
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_controller_options_are_accurate_and_used(method, options):
    rtol = 1e-8
    sol = odecore.solve(oscillator, OSC_Y0, OSC_TS, method=method, options=options, rtol=rtol)
    default = odecore.solve(oscillator, OSC_Y0, OSC_TS, method=method, rtol=rtol)
    assert sol.success
    assert np.max(np.abs(sol.ys - oscillator_exact(OSC_TS))) < 100 * rtol
    assert sol.stats != default.stats  # the option changed the steps


def test_pi_controller_uses_the_previous_error():
    # Same total exponent (icoeff + pcoeff = 0.7): only the ratio_prev**(pcoeff/k) factor of
    # the PI controller can make these two take different steps.
    pi = odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"controller": "PI"}, rtol=1e-8)
    i_only = odecore.solve(
        oscillator,
        OSC_Y0,
        OSC_TS,
        options={"controller": "PI", "icoeff": 0.7, "pcoeff": 0.0},
        rtol=1e-8,
    )
    assert pi.stats != i_only.stats
    # The PI controller's point: fewer rejected steps than the I controller.
    default = odecore.solve(oscillator, OSC_Y0, OSC_TS, rtol=1e-8)
    assert pi.stats["nreject"] < default.stats["nreject"]


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


def test_shrink_after_accept_rejects_fewer_steps_where_the_error_grows():
    """y' = y(1 + t)^3: the error per step grows along the solution, so holding the step
    after each accepted one ends in rejections that shrinking avoids. Both stay accurate."""

    def f(t, y):
        return y * (1.0 + t) ** 3

    def exact(t):
        return np.exp(((1.0 + t) ** 4 - 1.0) / 4.0)

    ts = np.array([0.0, 1.2])
    held = odecore.solve(f, np.array([1.0]), ts, rtol=1e-8, atol=1e-10)
    shrunk = odecore.solve(
        f, np.array([1.0]), ts, rtol=1e-8, atol=1e-10, options={"shrink_after_accept": True}
    )
    for sol in (held, shrunk):
        assert abs(sol.ys[-1, 0] / exact(1.2) - 1.0) < 1e-6
    assert shrunk.stats["nreject"] < held.stats["nreject"]


def test_callable_norm_equal_to_builtin_gives_identical_steps():
    seen = []

    def rms(x):
        # The same arithmetic as the built-in norm, so the two solves must agree bitwise.
        seen.append(x.shape)
        flat = x.reshape(-1)
        return np.sqrt(np.vecdot(flat, flat) / flat.shape[0])

    def maxabs(x):
        return np.max(np.abs(x))

    y0 = np.ones((2, 3))

    def rhs(t, y):
        return np.cos(t) * y * np.array([1.0, 2.0, 3.0])

    for builtin, user in (("rms", rms), ("max", maxabs)):
        a = odecore.solve(rhs, y0, [0.0, 4.0], options={"norm": builtin})
        b = odecore.solve(rhs, y0, [0.0, 4.0], options={"norm": user})
        assert a.stats == b.stats
        np.testing.assert_array_equal(a.ys, b.ys)
    assert set(seen) == {(2, 3)}  # the user's norm sees the state's shape


def test_batched_callable_norm_returns_one_value_per_sample():
    seen = []

    def norm(x):
        seen.append(x.shape)
        return np.max(np.abs(x), axis=1)

    y0 = np.array([[1.0, 0.5], [2.0, 0.0]])

    def rhs(t, y):
        return np.stack([y[:, 1], -y[:, 0]], axis=1)

    sol = odecore.solve(rhs, y0, OSC_TS, options={"norm": norm}, batch_axis=0, rtol=1e-8)
    assert set(seen) == {(2, 2)}
    np.testing.assert_allclose(sol.ys[:, 0], oscillator_exact(OSC_TS), atol=1e-6)


def test_max_step_is_respected():
    rec = Recorder(oscillator)
    sol = odecore.solve(rec, OSC_Y0, [0.0, 5.0], options={"max_step": 0.05})
    assert sol.stats["nsteps"] >= 100
    np.testing.assert_allclose(sol.ys[-1], oscillator_exact(5.0), atol=1e-7)


def test_first_step_is_used():
    # dopri5's second stage is at t0 + h/5; with first_step the initial-step probe is skipped.
    rec = Recorder(oscillator)
    odecore.solve(rec, OSC_Y0, [1.0, 5.0], options={"first_step": 0.02})
    assert float(rec.times[0]) == 1.0
    assert float(rec.times[1]) == pytest.approx(1.0 + 0.2 * 0.02, rel=1e-12)


def test_invalid_controller_options_raise():
    with pytest.raises(ValueError, match="controller"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"controller": "PID"})
    with pytest.raises(TypeError, match="shrink_after_accept'] must be True or False"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"shrink_after_accept": 1})
    with pytest.raises(ValueError, match="norm"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"norm": "l2"})
    with pytest.raises(TypeError, match="norm"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"norm": 2})
    with pytest.raises(ValueError, match="ifactor"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"ifactor": 0.5})
    with pytest.raises(ValueError, match="dfactor"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"dfactor": 1.5})
    with pytest.raises(ValueError, match="safety"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"safety": -0.9})
    with pytest.raises(ValueError, match="min_step"):
        odecore.solve(oscillator, OSC_Y0, OSC_TS, options={"min_step": 1.0, "max_step": 0.1})


# ---------------------------------------------------------------------------------------------
# The Solution on success
# ---------------------------------------------------------------------------------------------


def test_solution_on_success():
    ts = np.array([0.0, 0.5, 2.0])
    sol = odecore.solve(decay, np.array([1.0]), ts, method="tsit5")
    assert sol.success is True
    assert sol.status == odecore.Status.SUCCESS == 0
    assert sol.message == "success"
    assert sol.method == "tsit5"
    assert float(sol.t_reached) == 2.0
    np.testing.assert_array_equal(sol.ts, ts)
    assert set(sol.stats) == {"nfev", "nsteps", "naccept", "nreject"}
    assert sol.stats["nsteps"] == sol.stats["naccept"] + sol.stats["nreject"]
    np.testing.assert_array_equal(
        sol.ys, odecore.odeint(decay, np.array([1.0]), ts, method="tsit5")
    )
    assert odecore.solve(decay, np.array([1.0]), ts).method == "dopri5"  # the default


def test_batched_solution_on_success():
    sol = odecore.solve(batched_rhs, Y0_BATCH, [0.0, 1.0], batch_axis=0)
    assert sol.success
    np.testing.assert_array_equal(sol.status, np.zeros(4))
    assert sol.message == "success"
    np.testing.assert_array_equal(sol.stats["nsteps"], sol.stats["naccept"] + sol.stats["nreject"])
    np.testing.assert_array_equal(sol.t_reached, np.ones(4))


# ---------------------------------------------------------------------------------------------
# Statistics count what really happened
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", odecore.METHODS)
def test_nfev_counts_the_calls_of_func(method):
    tab = odecore.TABLEAUS[method]
    fixed = method in odecore.FIXED_STEP_METHODS
    options = {"step_size": 0.1} if fixed else None
    rec = Recorder(lambda t, y: np.cos(t) * y)
    sol = odecore.solve(rec, np.array([1.0, 2.0]), [0.0, 3.0], method=method, options=options)
    assert sol.stats["nfev"] == len(rec.times)
    # f(t0); the initial-step probe (adaptive only); per attempted step, stages 1..s-1 and
    # f(t_new) unless FSAL. The last step lands on t1, so the interpolant (and its extra
    # stages) is never needed.
    per_step = tab.stages - 1 + (0 if tab.fsal else 1)
    expected = 1 + (0 if fixed else 1) + per_step * sol.stats["nsteps"]
    assert sol.stats["nfev"] == expected

    batch = Recorder(lambda t, y: np.cos(t)[:, None] * y)
    sol = odecore.solve(
        batch, np.array([[1.0], [5.0]]), [0.0, 3.0], method=method, options=options, batch_axis=0
    )
    assert sol.stats["nfev"] == len(batch.times)  # one per call on the whole batch


def test_step_size_larger_than_the_interval():
    sol = odecore.solve(decay, np.array([1.0]), [0.0, 0.3], method="rk4", options={"step_size": 5})
    assert sol.stats["nsteps"] == 1
    assert sol.stats["nfev"] == 1 + 4


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
def test_batched_jump_t_and_step_t_match_single_solves(method):
    def batched(t, y):
        return np.where((t <= 0.5)[:, None], 1.0, -1.0) * np.cos(3 * t)[:, None] * y

    def single(t, y):
        return np.where(t <= 0.5, 1.0, -1.0) * np.cos(3 * t) * y

    options = {"jump_t": [0.5], "step_t": [0.25, 0.8]}
    y0 = np.array([[1.0], [-3.0], [1e-3]])
    ts = np.linspace(0.0, 1.0, 6)
    batch = odecore.solve(batched, y0, ts, method=method, options=options, batch_axis=0)
    for i in range(3):
        alone = odecore.solve(single, y0[i], ts, method=method, options=options)
        assert int(batch.stats["nsteps"][i]) == alone.stats["nsteps"]
        np.testing.assert_allclose(batch.ys[:, i], alone.ys, rtol=1e-10)


def test_single_time_still_checks_the_tolerances():
    with pytest.raises(ValueError, match="^rtol must be positive"):
        odecore.solve(decay, np.array([1.0]), [0.0], rtol=-1.0)
