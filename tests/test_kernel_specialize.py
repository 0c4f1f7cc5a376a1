"""The kernel loop's sums written out per method (odecore.kernels.specialize) against the
generic functions that read the coefficients from arrays: the same numbers, to the last bit,
for every method. Both run here as plain Python, uncompiled; tests/test_numba.py checks the
compiled kernel against the generic solve."""

from __future__ import annotations

import math

import numpy as np
import pytest

import odecore
from odecore.control.primitives import bind
from odecore.kernels import loop
from odecore.kernels.specialize import specialized
from odecore.kernels.tableau import (
    DENSE_STAGES,
    EXTRA_STAGES,
    STAGES,
    TWO_ESTIMATES,
    kernel_tableau,
)
from odecore.solvers.tableaus import TABLEAUS


def _work(tab, size, seed):
    rng = np.random.default_rng(seed)
    # Values of mixed sign and magnitude, so that a changed order of summation would show
    # in the last bits.
    return rng.standard_normal((loop.work_rows(tab.sizes), size)) * np.exp(
        rng.uniform(-3.0, 3.0, (loop.work_rows(tab.sizes), size))
    )


@pytest.mark.parametrize("method", odecore.METHODS)
def test_written_sums_equal_the_generic_ones(method):
    tab = kernel_tableau(TABLEAUS[method])
    sums = specialized(method, tab)
    stages = int(tab.sizes[STAGES])
    h = 0.0123456789
    for seed in range(3):
        work = _work(tab, 4, seed)
        for stage in range(1, stages):
            generic, written = work.copy(), work.copy()
            loop.stage_sum(generic, h, stage, tab.a)
            sums["stage_sum"](written, h, stage, tab.a)
            np.testing.assert_array_equal(written, generic, err_msg=f"stage {stage}")
        generic, written = work.copy(), work.copy()
        loop.solution_sum(generic, h, tab.b, stages)
        sums["solution_sum"](written, h, tab.b, stages)
        np.testing.assert_array_equal(written, generic)
        if tab.sizes[loop.ADAPTIVE]:
            two = bool(tab.sizes[TWO_ESTIMATES])
            generic, written = work.copy(), work.copy()
            loop.error_estimates(generic, h, tab.b, stages, two)
            sums["error_estimates"](written, h, tab.b, stages, two)
            np.testing.assert_array_equal(written, generic)
        first_extra = int(tab.sizes[DENSE_STAGES] - tab.sizes[EXTRA_STAGES])
        for extra in range(int(tab.sizes[EXTRA_STAGES])):
            generic, written = work.copy(), work.copy()
            loop.dense_stage_sum(generic, h, extra, tab.dense_a, first_extra + extra)
            sums["dense_stage_sum"](written, h, extra, tab.dense_a, first_extra + extra)
            np.testing.assert_array_equal(written, generic, err_msg=f"extra stage {extra}")
        for theta in (0.1, 0.5, 0.93):
            weights = np.empty((1, int(tab.sizes[DENSE_STAGES])))
            generic, written = np.zeros((2, 4)), np.zeros((2, 4))
            loop.interpolate(generic, 1, theta, h, tab.dense, work, weights)
            sums["interpolate"](written, 1, theta, h, tab.dense, work, weights)
            np.testing.assert_array_equal(written, generic, err_msg=f"theta {theta}")


def test_the_written_rk4_step_is_rk4():
    """The written sums hold the method's own coefficients: odecore's rk4 (Kutta's 3/8 rule)
    against its closed form, y + h (k1 + 3 k2 + 3 k3 + k4) / 8."""
    tab = kernel_tableau(TABLEAUS["rk4"])
    sums = specialized("rk4", tab)
    work = _work(tab, 3, 7)
    written = work.copy()
    sums["solution_sum"](written, 0.5, tab.b, 4)
    k = work[loop.FIRST_DENSE_ROW : loop.FIRST_DENSE_ROW + 4]
    expected = work[loop.Y] + 0.5 * (k[0] + 3 * k[1] + 3 * k[2] + k[3]) / 8
    # The written sum scales each weight by h first; the closed form groups differently, so
    # they agree to rounding: a few ulps of the largest term.
    ulps = 1e-14 * (np.abs(k).max() + np.abs(work[loop.Y]).max())
    np.testing.assert_allclose(written[loop.Y_NEW], expected, rtol=0, atol=ulps)


def _bound_to_dynamics():
    """``loop.evaluate`` and ``loop.take_stage`` calling dynamics that depend on time and
    nonlinearly on the state, so that a wrong stage time or input shows."""

    def dynamics(t, y, dy, params):
        for i in range(y.shape[0]):
            dy[i] = math.sin(t * (i + 1)) - params[0] * y[i] * abs(y[i])

    evaluate = bind(loop.evaluate, {"dynamics": dynamics})
    return evaluate, bind(loop.take_stage, {"evaluate": evaluate})


@pytest.mark.parametrize("method", odecore.METHODS)
@pytest.mark.parametrize("clip", [False, True])
def test_the_written_step_equals_the_generic_one(method, clip):
    """The written ``take_step`` (every stage's sum, time and evaluation in turn) against the
    generic loop over the stages, run in Python with the same dynamics: the same stage rows
    and solution, to the last bit. The dynamics depend on time and nonlinearly on the state,
    so that a wrong stage time or input shows."""
    tab = kernel_tableau(TABLEAUS[method])
    sums = specialized(method, tab)

    evaluate, take_stage = _bound_to_dynamics()
    generic = bind(loop.take_step, {"take_stage": take_stage})
    written = bind(sums["take_step"], {"evaluate": evaluate, **sums})
    settings = np.zeros(loop.SETTINGS_SIZE)
    settings[loop.DIRECTION] = 1.0
    params = np.array([0.7])
    t, h = 0.25, 0.0123456789
    # With clip, the last stages' times are cut at a left limit inside the step.
    t_left = t + 0.6 * h if clip else t + h
    for seed in range(2):
        work = _work(tab, 4, seed)
        ours, theirs = work.copy(), work.copy()
        args = (tab.a, tab.c, tab.b, tab.sizes, settings)
        generic(t, h, t_left, clip, params, *args, theirs)
        written(t, h, t_left, clip, params, *args, ours)
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("method", odecore.METHODS)
@pytest.mark.parametrize("clip", [False, True])
def test_lane_steps_equal_one_step_per_lane(method, clip):
    """``take_lane_steps``, generic and written, against ``take_step`` for each lane on its
    own: every busy lane gets the step of its own time, size, left limit and parameter row,
    to the last bit, and an idle lane's rows are not touched."""
    tab = kernel_tableau(TABLEAUS[method])
    sums = specialized(method, tab)

    evaluate, take_stage = _bound_to_dynamics()
    one_step = bind(loop.take_step, {"take_stage": take_stage})
    generic = bind(loop.take_lane_steps, {"take_stage": take_stage})
    written = bind(sums["take_lane_steps"], {"evaluate": evaluate, **sums})
    settings = np.zeros(loop.SETTINGS_SIZE)
    settings[loop.DIRECTION] = 1.0
    params = np.array([[0.7], [0.2], [1.3], [0.9], [0.5]])
    lane_t = np.zeros((loop.LANES, loop.LANE_FLOATS))
    lane_n = np.zeros((loop.LANES, loop.LANE_INTS), dtype=np.int64)
    for lane in range(loop.LANES):
        t, h = 0.25 + 0.1 * lane, 0.0123456789 * (1 + lane)
        lane_t[lane, loop.LANE_T], lane_t[lane, loop.LANE_H] = t, h
        lane_t[lane, loop.LANE_T_LEFT] = t + (0.6 if clip else 1.0) * h
        # The second lane is idle; the others solve trajectories out of order.
        lane_n[lane, loop.LANE_TRAJECTORY] = -1 if lane == 1 else (3 * lane + 1) % 5
    works = np.stack([_work(tab, 4, seed) for seed in range(loop.LANES)])
    expected = works.copy()
    for lane in range(loop.LANES):
        n = lane_n[lane, loop.LANE_TRAJECTORY]
        if n >= 0:
            t, h, t_left = lane_t[lane, [loop.LANE_T, loop.LANE_H, loop.LANE_T_LEFT]]
            args = (tab.a, tab.c, tab.b, tab.sizes, settings)
            one_step(t, h, t_left, clip, params[n], *args, expected[lane])
    assert not np.array_equal(expected[0], works[0])
    for take_lane_steps in (generic, written):
        got = works.copy()
        take_lane_steps(clip, params, tuple(tab), settings, got, lane_t, lane_n)
        np.testing.assert_array_equal(got, expected)
