"""The numba backend: whole solves compiled from the kernel loop, against the generic loop.

The generic NumPy path is the reference: the kernel makes the same decisions in the same
order (``odecore.kernels.loop``), so it must take the same accepted and rejected steps and
agree to rounding. Its sums run in another order than NumPy's, which changes the last bits
of each stage: over n steps of an s-stage method that is a few units of roundoff times s n,
far inside 1e-12 relative for the fixed-step solves and 1e-10 for the adaptive ones here
(at most a few thousand steps).

Every dynamics is defined at module level and reused across tests, so that each is compiled
once per form for the whole module (a compile takes seconds).
"""

from __future__ import annotations

import functools
import gc
import math
import re
import time

import numpy as np
import pytest
from backend_params import framework_module
from kernel_dynamics import lorenz

import odecore
from odecore.problems import get_problem

numba = framework_module("numba")

pytestmark = pytest.mark.backend("numba")

FIXED_STEP_RTOL = 1e-12
ADAPTIVE_RTOL = 1e-10


# --------------------------------------------------------------------------------------------
# Dynamics, each usable by NumPy's generic loop too (with NumPy scalars and 0-d arrays).


def oscillator(t, y, p):
    """A damped, forced oscillator: smooth, with a time-dependent rate."""
    return np.array([y[1], -p[0] * y[0] - p[1] * y[1] + np.sin(t)])


def oscillator_in_place(t, y, dy, p):
    dy[0] = y[1]
    dy[1] = -p[0] * y[0] - p[1] * y[1] + np.sin(t)


def switched(t, y, p):
    """A rate that jumps from p[0] to p[1] at t = 1."""
    rate = p[0] if t < 1.0 else p[1]
    return np.array([-rate * y[0] + np.sin(t), y[0] - 0.5 * y[1]])


def lorenz_in_place(t, y, dy, p):
    dy[0] = p[0] * (y[1] - y[0])
    dy[1] = y[0] * (p[1] - y[2]) - y[1]
    dy[2] = y[0] * y[1] - p[2] * y[2]


def poisoned(t, y, p):
    """y' = -y, until the rate turns NaN at t = p[0]."""
    bad = math.nan if t > p[0] else 1.0
    return -y * bad


def blow_up(t, y, p):
    """y' = y^2 from y(0) = 1: infinite at t = 1."""
    return y * y


def catalogue(t, y, dy, p):
    """Problems of odecore.problems by number (p[0]), in place: DETEST A1-A5, the rigid body
    (DETEST B5), Kepler's orbit and the Arenstorf orbit, one function so that one compile
    serves them all."""
    k = int(p[0])
    if k == 0:
        dy[0] = -y[0]
    elif k == 1:
        dy[0] = -0.5 * y[0] ** 3
    elif k == 2:
        dy[0] = y[0] * math.cos(t)
    elif k == 3:
        dy[0] = 0.25 * y[0] * (1.0 - y[0] / 20.0)
    elif k == 4:
        dy[0] = (y[0] - t) / (y[0] + t)
    elif k == 5:
        dy[0] = y[1] * y[2]
        dy[1] = -y[0] * y[2]
        dy[2] = -p[1] * y[0] * y[1]
    elif k == 6:
        r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
        dy[0] = y[2]
        dy[1] = y[3]
        dy[2] = -y[0] / r3
        dy[3] = -y[1] / r3
    else:
        mu = p[1]
        x, z, vx, vz = y[0], y[1], y[2], y[3]
        d_earth = ((x + mu) ** 2 + z**2) ** 1.5
        d_moon = ((x - 1.0 + mu) ** 2 + z**2) ** 1.5
        dy[0] = vx
        dy[1] = vz
        dy[2] = x + 2.0 * vz - (1.0 - mu) * (x + mu) / d_earth - mu * (x - 1.0 + mu) / d_moon
        dy[3] = z - 2.0 * vx - (1.0 - mu) * z / d_earth - mu * z / d_moon


CATALOGUE = (
    "detest_a1",
    "detest_a2",
    "detest_a3",
    "detest_a4",
    "detest_a5",
    "rigid_body",
    "kepler",
    "arenstorf",
)

OSCILLATOR_P = np.array([4.0, 0.3])
OSCILLATOR_Y0 = np.array([1.0, 0.0])


def tolerances(method: str) -> dict:
    # The low-order methods take tens of thousands of steps at 1e-8; 1e-6 keeps them short.
    low_order = method in ("adaptive_heun", "fehlberg2", "bosh3")
    tol = 1e-6 if low_order else 1e-8
    return {"rtol": tol, "atol": tol}


def solve_both(func, y0, t, **kwargs):
    kernel = odecore.solve(func, y0, t, backend="numba", **kwargs)
    generic = odecore.solve(func, y0, t, backend="numpy", **kwargs)
    return kernel, generic


def assert_same_steps(kernel, generic, rtol):
    assert kernel.stats == generic.stats
    assert kernel.status == generic.status
    scale = np.max(np.abs(generic.ys))
    np.testing.assert_allclose(kernel.ys, generic.ys, rtol=0, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# Every method against the generic loop.


@pytest.mark.parametrize("method", odecore.METHODS)
@pytest.mark.parametrize(
    "t", [np.linspace(0.0, 4.0, 9), np.linspace(4.0, 0.0, 5)], ids=["forward", "backward"]
)
def test_every_method_takes_the_generic_steps(method, t):
    kwargs = {"params": OSCILLATOR_P, "method": method, **tolerances(method)}
    fixed = method in odecore.FIXED_STEP_METHODS
    if fixed:
        kwargs["options"] = {"step_size": 0.01}
    kernel, generic = solve_both(oscillator, OSCILLATOR_Y0, t, **kwargs)
    assert generic.success
    assert_same_steps(kernel, generic, FIXED_STEP_RTOL if fixed else ADAPTIVE_RTOL)


# FSAL with its interpolant; extra dense stages and two estimates; Hermite outputs.
@pytest.mark.parametrize("method", ["tsit5", "dopri8", "adaptive_heun"])
def test_adaptive_methods_at_a_fixed_step_take_the_generic_steps(method):
    """options['step_size'] runs an adaptive method's weights on a fixed grid: the kernel
    reads the tableau without its error estimate, as the generic loop does; outputs inside
    steps come from the method's interpolant."""
    t = np.linspace(0.0, 4.0, 9)
    kernel, generic = solve_both(
        oscillator, OSCILLATOR_Y0, t, params=OSCILLATOR_P, method=method,
        options={"step_size": 0.03},
    )  # fmt: skip
    assert generic.success and generic.stats["nreject"] == 0
    assert_same_steps(kernel, generic, FIXED_STEP_RTOL)
    # The same method, adaptive, in the same process: its own kernel, not the fixed one.
    adaptive, _ = solve_both(oscillator, OSCILLATOR_Y0, t, params=OSCILLATOR_P, method=method)
    assert adaptive.stats["nsteps"] != kernel.stats["nsteps"]


@pytest.mark.parametrize("method", ["rk4", "dopri5", "dopri8"])
def test_fixed_grid_and_first_step(method):
    """A fixed-step method without step_size steps from output to output; an adaptive one
    starts from options['first_step']."""
    options = None if method == "rk4" else {"first_step": 1e-3}
    t = np.array([0.0, 0.1, 0.25, 0.3, 0.7, 1.0])
    kernel, generic = solve_both(
        oscillator, OSCILLATOR_Y0, t, params=OSCILLATOR_P, method=method, options=options
    )
    assert_same_steps(kernel, generic, FIXED_STEP_RTOL if method == "rk4" else ADAPTIVE_RTOL)


@pytest.mark.parametrize("method", ["rk4", "bosh3", "tsit5", "dopri8"])
@pytest.mark.parametrize("key", ["jump_t", "step_t"])
def test_landing_on_stops_and_jumps(method, key):
    """With jump_t the steps land on the jump, see its left limit, and restart from the
    right one; step_t only lands."""
    t = np.linspace(0.0, 2.5, 6)
    options = {key: [1.0, 1.7]}
    if method == "rk4":
        options["step_size"] = 0.03
    kwargs = {"params": np.array([0.8, 2.5]), "method": method, "options": options}
    kernel, generic = solve_both(switched, np.array([1.0, 0.5]), t, **kwargs)
    assert generic.success
    assert_same_steps(kernel, generic, FIXED_STEP_RTOL if method == "rk4" else ADAPTIVE_RTOL)


def _kink_left(t, y, p):
    """y' = 1 up to and including t = 0.5, -1 after."""
    return np.ones_like(y) if t <= 0.5 else -np.ones_like(y)


def _kink_right(t, y, p):
    """y' = 1 before t = 0.5, -1 from t = 0.5 on."""
    return np.ones_like(y) if t < 0.5 else -np.ones_like(y)


@pytest.mark.parametrize(
    ("func", "ends"),
    [
        (_kink_left, (0.5, 1.0)),
        (_kink_right, (0.5, 0.0)),
        (_kink_right, (0.0, 0.5)),
        (_kink_left, (1.0, 0.5)),
    ],
    ids=["starts-on-it", "starts-on-it-backward", "ends-on-it", "ends-on-it-backward"],
)
@pytest.mark.parametrize(("method", "options"), [("rk4", {"step_size": 0.1}), ("dopri5", {})])
def test_jump_t_at_an_end_of_the_interval_takes_the_side_inside_it(func, ends, method, options):
    """As tests/test_solve.py's test of the generic loop: f's value at the jump is the side
    outside the interval, and f is constant inside it, so the solve is exact to rounding
    when it starts from the right limit and ends on the left one."""
    ts = np.linspace(*ends, 6)
    exact = np.where(ts < 0.5, ts, 1.0 - ts)
    kwargs = {"params": np.zeros(1), "method": method, "options": {"jump_t": [0.5], **options}}
    kernel, generic = solve_both(func, exact[:1], ts, **kwargs)
    assert np.max(np.abs(kernel.ys[:, 0] - exact)) < 1e-14
    assert_same_steps(kernel, generic, FIXED_STEP_RTOL if method == "rk4" else ADAPTIVE_RTOL)


@pytest.mark.parametrize("func", [_kink_left, _kink_right])
@pytest.mark.parametrize("ends", [(0.0, 1.0), (1.0, 0.0)], ids=["forward", "backward"])
@pytest.mark.parametrize(("method", "options"), [("rk4", {"step_size": 0.1}), ("dopri5", {})])
def test_float32_jump_t_limits_are_taken_in_float32(func, ends, method, options):
    """The dynamics of a float32 kernel get their time in float32, where float64's
    neighbours of a jump round back onto it: the kernel takes them in float32, as the
    generic loop does (tests/test_solve.py). f is constant on each side, so the solve is
    exact to the rounding of a dozen float32 steps."""
    ts = np.linspace(*ends, 5)
    exact = np.where(ts < 0.5, ts, 1.0 - ts)
    kwargs = {"params": np.zeros(1, dtype=np.float32), "method": method, "rtol": 1e-3}
    kwargs["options"] = {"jump_t": [0.5], **options}
    kernel, generic = solve_both(func, exact[:1].astype(np.float32), ts, **kwargs)
    assert kernel.ys.dtype == np.float32
    assert np.max(np.abs(kernel.ys[:, 0] - exact)) < 24 * np.finfo(np.float32).eps
    # The same steps as the generic loop; their float32 sums round in another order.
    assert kernel.stats == generic.stats


def _unit_rate(t, y, p):
    return np.ones_like(y) * p[0]


@pytest.mark.parametrize(
    ("method", "options"), [("rk4", {"step_size": 0.1}), ("dopri5", {"max_step": 0.1})]
)
def test_far_from_t_zero_the_kernel_advances_the_state_by_the_time_the_clock_moves(method, options):
    # As tests/test_solve.py's test of the generic loop: y' = 1 from t = 1e8 for 10 gives
    # exactly 10 but for the state's own rounding (100 additions below 10); the kernel's
    # steps moved the state by 0.1 and the clock by fl(t + 0.1) - t, 6e-7 apart at the end.
    t = np.array([1e8, 1e8 + 10.0])
    kwargs = {"params": np.array([1.0]), "method": method, "options": options}
    kernel, generic = solve_both(_unit_rate, np.array([0.0]), t, **kwargs)
    assert abs(kernel.ys[-1, 0] - 10.0) <= 100 * 8.9e-16
    assert_same_steps(kernel, generic, FIXED_STEP_RTOL if method == "rk4" else ADAPTIVE_RTOL)


@pytest.mark.parametrize(
    "options",
    [{"norm": "max"}, {"controller": "PI"}, {"controller": "hairer"}, {"max_step": 0.05}],
)
def test_controller_options(options):
    kernel, generic = solve_both(
        oscillator,
        OSCILLATOR_Y0,
        np.linspace(0.0, 3.0, 4),
        params=OSCILLATOR_P,
        method="dopri5",
        options={**options, "shrink_after_accept": True},
    )
    assert_same_steps(kernel, generic, ADAPTIVE_RTOL)


def test_float32_state():
    """A float32 state stays float32 and meets the tolerance. The steps need not be NumPy's:
    the kernel keeps the weights and its sums in float64, where NumPy's stage store rounds
    them to float32, and on the first small steps the error estimate is of the size of that
    rounding. So the reference is a float64 solve at a tolerance far tighter than 1e-4."""
    y0 = OSCILLATOR_Y0.astype(np.float32)
    t = np.linspace(0.0, 2.0, 5)
    kernel = odecore.solve(
        oscillator_f32,
        y0,
        t,
        params=OSCILLATOR_P.astype(np.float32),
        rtol=1e-4,
        atol=1e-6,
        backend="numba",
    )
    reference = odecore.solve(
        oscillator, OSCILLATOR_Y0, t, params=OSCILLATOR_P, rtol=1e-12, atol=1e-12
    )
    assert kernel.ys.dtype == np.float32
    # A global error of a modest multiple of rtol (relative to the solution's size, ~1).
    np.testing.assert_allclose(kernel.ys, reference.ys, rtol=0, atol=1e-3)


def oscillator_f32(t, y, p):
    return np.array([y[1], -p[0] * y[0] - p[1] * y[1] + np.sin(t)], dtype=np.float32)


def test_in_place_form_gives_the_returning_forms_result():
    """The two forms run the same kernel; only how the rate reaches it differs."""
    t = np.linspace(0.0, 10.0, 101)
    p = np.array([10.0, 28.0, 8.0 / 3.0])
    y0 = np.array([1.0, 0.0, 0.0])
    returning = odecore.solve(lorenz, y0, t, params=p, backend="numba", method="dopri8")
    in_place = odecore.solve(lorenz_in_place, y0, t, params=p, backend="numba", method="dopri8")
    assert returning.stats == in_place.stats
    np.testing.assert_array_equal(returning.ys, in_place.ys)


def _lorenz_allocating_in_place(t, y, dy, p):
    rate = np.array([p[0] * (y[1] - y[0]), y[0] * (p[1] - y[2]) - y[1], y[0] * y[1] - p[2] * y[2]])
    for i in range(3):
        dy[i] = rate[i]


@pytest.mark.parametrize(
    "func",
    [
        lorenz,  # returning: its wrapper receives a new array at every evaluation
        lorenz_in_place,
        numba.njit(_lorenz_allocating_in_place, inline="always"),  # inlined by Numba
        numba.njit(_lorenz_allocating_in_place),
    ],
    ids=["returning", "in place", "in place inlined, allocating", "in place, allocating"],
)
def test_kernels_free_what_they_allocate(func):
    """The kernel runs without reference counting and calls f through a wrapper that
    counts, in every form: what f allocates (a returning f's rate, an in-place f's scratch
    array, inlined by Numba or not) is freed inside the wrapper. Outputs inside steps make
    dopri8 evaluate f there three times per output step: any array allocated in them and
    not freed shows in the runtime's counts."""
    t = np.linspace(0.0, 10.0, 201)
    p, y0 = np.array([10.0, 28.0, 8.0 / 3.0]), np.array([1.0, 0.0, 0.0])
    kwargs = {"params": p, "backend": "numba", "method": "dopri8"}
    odecore.solve(func, y0, t, **kwargs)  # compiled
    solution, allocated, freed = _counting_allocations(lambda: odecore.solve(func, y0, t, **kwargs))
    assert solution.success
    assert allocated == freed


def _lorenz_defined_inside():
    """Lorenz in place, as a function that cannot be imported by name: its kernel is
    compiled in memory."""

    def flow(t, y, dy, p):
        dy[0] = p[0] * (y[1] - y[0])
        dy[1] = y[0] * (p[1] - y[2]) - y[1]
        dy[2] = y[0] * y[1] - p[2] * y[2]

    return flow


@pytest.mark.parametrize("where", ["on disk", "in memory"])
def test_kernel_functions_compile_once_per_type_not_per_constant(where):
    """Numba compiles a function called from compiled code once per literal argument
    unless told otherwise: part_norm(work, 0, ...) and part_norm(work, 5, ...) would be
    two compilations (fifteen of part_norm in one dopri5 kernel, and its first call took
    twice as long). Every function of the kernel and every rule is typed by plain types."""
    from odecore.adapters import numba as adapter

    func = lorenz_in_place if where == "on disk" else _lorenz_defined_inside()
    t = np.linspace(0.0, 1.0, 5)
    p, y0 = np.array([10.0, 28.0, 8.0 / 3.0]), np.array([1.0, 0.0, 0.0])
    assert odecore.solve(func, y0, t, params=p, backend="numba", method="dopri5").success
    kernels = [k for k in adapter._kernels[func].values() if hasattr(k, "functions")]
    dispatchers = [fn for k in kernels for fn in k.functions.values()]
    dispatchers += list(adapter._compiled_rules().values())
    compiled = [d for d in dispatchers if d.signatures]
    assert "solve_trajectory" in {d.py_func.__name__ for d in compiled}
    literal = [
        (d.py_func.__name__, signature)
        for d in compiled
        for signature in d.signatures
        if any(isinstance(a, numba.types.Literal) for a in signature)
    ]
    assert literal == []


def _counting_allocations(call):
    """``(call(), arrays Numba's runtime allocated during it, arrays it freed)``."""
    # Numba counts its allocations only when asked (NUMBA_NRT_STATS at import, or this).
    from numba.core.runtime import _nrt_python, rtsys

    counting = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    # The counts are the runtime's, for the whole process: a garbage collection during the
    # call would free arrays that earlier tests allocated, and count them as freed here.
    gc.collect()
    gc.disable()
    try:
        before = rtsys.get_allocation_stats()
        result = call()
        after = rtsys.get_allocation_stats()
    finally:
        gc.enable()
        if not counting:
            _nrt_python.memsys_disable_stats()
    return result, after.alloc - before.alloc, after.free - before.free


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_large_tape_is_fresh_pages_the_kernel_types_as_an_empty_array(dtype):
    """A tape of 4 MiB or more is an anonymous mapping (no huge pages, each zeroed whole on
    first touch), and the kernels see it as the array np.empty would give: the same Numba
    type, so the same compiled kernel, writable."""
    import mmap

    from odecore.adapters.numba import _HUGE_PAGES_FROM, _untouched

    for shape in ((2, 3, 3), (64, 100_000, 3)):
        tape = _untouched(shape, dtype)
        assert tape.shape == shape
        assert tape.dtype == dtype
        assert tape.flags.writeable
        assert numba.typeof(tape) == numba.typeof(np.empty(shape, dtype=dtype))
        base = tape
        while isinstance(base, np.ndarray):
            base = base.base
        base = base.obj if isinstance(base, memoryview) else base
        large = tape.nbytes >= _HUGE_PAGES_FROM
        assert isinstance(base, mmap.mmap) == large
        if large:
            assert not tape[::7919].any()  # fresh pages read as zeros


def test_an_njit_function_is_used_as_it_is():
    compiled = numba.njit(oscillator_in_place)
    t = np.linspace(0.0, 1.0, 3)
    kernel = odecore.solve(compiled, OSCILLATOR_Y0, t, params=OSCILLATOR_P, backend="numba")
    generic = odecore.solve(oscillator, OSCILLATOR_Y0, t, params=OSCILLATOR_P, backend="numpy")
    assert_same_steps(kernel, generic, ADAPTIVE_RTOL)


# --------------------------------------------------------------------------------------------
# Accuracy on the catalogue's problems, against their independent references.


@pytest.mark.parametrize("method", ["dopri5", "dopri8"])
@pytest.mark.parametrize("name", CATALOGUE)
def test_catalogue_problems_reach_the_generic_accuracy(name, method):
    """The kernel's error against the problem's reference is the generic loop's, to
    rounding: both take the same steps."""
    problem = get_problem(name)
    number = CATALOGUE.index(name)
    params = np.array([number, *problem.params], dtype=np.float64)
    y0 = np.array(problem.y0)
    t = np.array([problem.t0, problem.t1])
    kwargs = {"method": method, "rtol": 1e-10, "atol": 1e-10}
    kernel = odecore.solve(catalogue, y0, t, params=params, backend="numba", **kwargs)
    generic = odecore.solve(problem.func, y0, t, params=problem.params, backend="numpy", **kwargs)
    reference = np.array(problem.reference)
    kernel_error = np.max(np.abs(kernel.ys[-1] - reference))
    generic_error = np.max(np.abs(generic.ys[-1] - reference))
    assert kernel.stats["naccept"] == generic.stats["naccept"]
    assert kernel.stats["nreject"] == generic.stats["nreject"]
    scale = np.max(np.abs(reference))
    # The same steps make the same truncation error; what differs is rounding (catalogue's
    # f sums in another order than problem.func), amplified by the problem: on Arenstorf's
    # orbit one unit in the last place of y0 moves y(T) by up to 6e-10 at rtol 1e-10, about
    # 1e-4 of the error against the reference (5e-6). Hence 1% of the generic error, on top
    # of ADAPTIVE_RTOL * scale for problems whose error is near rounding itself.
    assert kernel_error <= 1.01 * generic_error + ADAPTIVE_RTOL * scale


# --------------------------------------------------------------------------------------------
# Failures: the generic path's statuses and messages.


def without_time(error) -> str:
    return re.sub(r"at t=[-+0-9.e]+", "at t=...", str(error))


def failure_pair(func, y0, t, **kwargs):
    outcomes = []
    for backend in ("numba", "numpy"):
        with pytest.raises(odecore.SolveError) as info:
            odecore.solve(func, y0, t, backend=backend, **kwargs)
        outcomes.append(info.value)
        report = odecore.solve(func, y0, t, backend=backend, throw=False, **kwargs)
        outcomes.append(report)
    return outcomes


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_overflowing_error_norm_is_an_underflow_as_on_the_generic_path():
    # At atol = 1e-200 the scaled error's squares overflow while the state stays finite
    # (test_reliability.py explains the case); the kernel blames the step size, not func.
    y0, t = np.array([1.0, 0.5]), np.array([1.0, 2.0])
    kwargs = {"params": OSCILLATOR_P, "method": "dopri5", "rtol": 0.0, "atol": 1e-200}
    kernel_error, kernel, generic_error, generic = failure_pair(oscillator, y0, t, **kwargs)
    assert generic.status == odecore.Status.DT_UNDERFLOW
    assert kernel.status == generic.status
    # Near the overflow the last digits decide between accepting and rejecting a step, so
    # the counts may differ by one; the diagnosis may not.
    assert "the tolerances may be too tight" in str(kernel_error)


@pytest.mark.parametrize(
    ("func", "params", "options", "status"),
    [
        (oscillator, OSCILLATOR_P, {"max_num_steps": 7}, odecore.Status.MAX_STEPS_REACHED),
        (poisoned, np.array([0.0]), None, odecore.Status.NONFINITE_STATE),
        (blow_up, np.array([0.0]), None, odecore.Status.DT_UNDERFLOW),
        (oscillator, OSCILLATOR_P, {"min_step": 0.5}, odecore.Status.DT_UNDERFLOW),
        (oscillator, OSCILLATOR_P, {"min_step": 5.0}, odecore.Status.DT_UNDERFLOW),
    ],
    ids=["max_num_steps", "nonfinite", "blow_up", "min_step", "min_step-above-span"],
)
def test_failures_match_the_generic_path(func, params, options, status):
    y0 = np.array([1.0, 0.5]) if func is not blow_up else np.array([1.0])
    # No output near the blow-up at t = 1, where y = 1 / (1 - t) magnifies rounding.
    t = np.array([0.0, 0.45, 0.9, 1.5, 2.0])
    kwargs = {"params": params, "options": options, "method": "dopri5"}
    kernel_error, kernel, generic_error, generic = failure_pair(func, y0, t, **kwargs)
    assert generic.status == status
    assert kernel.status == generic.status
    # The messages agree but for the last digits of the time reached, which the message
    # prints in full (17 digits) and rounding may change.
    assert without_time(kernel_error) == without_time(generic_error)
    assert kernel.stats == generic.stats
    # The error estimate is a sum that cancels (its weights add up to zero), so its relative
    # rounding is that of the stages times |K| / |err|, up to 1e4 on the first tiny steps,
    # and the step sizes that follow from it share it: 1e-8 relative.
    assert kernel.t_reached == pytest.approx(generic.t_reached, rel=1e-8)
    # Outputs past the failure are NaN; those reached agree.
    np.testing.assert_array_equal(np.isnan(kernel.ys), np.isnan(generic.ys))
    reached = ~np.isnan(generic.ys)
    np.testing.assert_allclose(kernel.ys[reached], generic.ys[reached], rtol=ADAPTIVE_RTOL)


# --------------------------------------------------------------------------------------------
# Ensembles.

RHO = np.linspace(0.0, 21.0, 16)
LORENZ_PARAMS = np.stack([np.full(16, 10.0), RHO, np.full(16, 8.0 / 3.0)], axis=1)


def test_ensemble_trajectories_equal_solo_solves():
    """Each trajectory of a batch is the solve of its own row, exactly: the same kernel."""
    y0 = np.tile([1.0, 0.0, 0.0], (16, 1)) + 0.01 * np.arange(16)[:, None]
    t = np.linspace(0.0, 1.0, 11)
    batch = odecore.solve(
        lorenz, y0, t, params=LORENZ_PARAMS, batch_axis=0, backend="numba", rtol=1e-8, atol=1e-8
    )
    assert batch.ys.shape == (11, 16, 3)
    assert np.all(batch.status == 0)
    # Every row: the kernel takes them in a scrambled order (_visit_order).
    for n in range(16):
        solo = odecore.solve(
            lorenz, y0[n], t, params=LORENZ_PARAMS[n], backend="numba", rtol=1e-8, atol=1e-8
        )
        np.testing.assert_array_equal(batch.ys[:, n], solo.ys)
        assert batch.stats["naccept"][n] == solo.stats["naccept"]
        assert batch.stats["nreject"][n] == solo.stats["nreject"]
    # The trajectories do take their own steps.
    assert len(set(batch.stats["naccept"].tolist())) > 1


def test_ensemble_visit_order_spreads_every_thread_block_over_the_batch():
    """The threads take contiguous ranges of indices. The order is a permutation under
    which each range's trajectories sample the whole batch: the mean position in a block of
    L indices is within the discrepancy of a golden-ratio Kronecker
    sequence, O(log L / L), of the batch's middle (in the natural order a sweep's first half
    block sits 1/4 away, and its thread gets the cheap half of the work)."""
    from odecore.adapters.numba import _visit_order

    for count in [*range(1, 600), 1000, 4096, 65536, 10**6 + 1]:
        order = _visit_order(count)
        assert order.dtype == np.int64
        np.testing.assert_array_equal(np.sort(order), np.arange(count))
        for threads in (2, 3, 4, 8, 16):
            length = count // threads
            if length < 8:
                continue
            blocks = order[: threads * length].reshape(threads, length) / count
            bound = 2.0 * (1.0 + math.log(length)) / length
            assert np.all(np.abs(blocks.mean(axis=1) - 0.5) <= bound), (count, threads)


@pytest.mark.parametrize("count", [1, 3, 5, 29])
@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("tsit5", {"rtol": 1e-8, "atol": 1e-8}),
        ("dopri8", {"rtol": 1e-7, "atol": 1e-9, "options": {"jump_t": [0.35], "step_t": [0.6]}}),
        ("rk4", {"options": {"step_size": 0.01}}),
    ],
)
def test_lanes_give_every_trajectory_its_solo_solve(count, method, kwargs):
    """A thread steps a batch's trajectories several at a time, in lanes
    (``loop.solve_lanes``), each lane taking the next trajectory when its own ends: with
    fewer trajectories than lanes or more, with trajectories that fail at their first
    evaluation among them, FSAL or not, adaptive or fixed, with stops and jumps, every
    trajectory is still the solve of its own row, to the last bit."""
    from odecore.kernels import loop

    assert loop.LANES > 1
    rho = np.linspace(0.0, 21.0, count)
    params = np.stack([np.full(count, 10.0), rho, np.full(count, 8.0 / 3.0)], axis=1)
    y0 = np.tile([1.0, 0.0, 0.0], (count, 1)) + 0.01 * np.arange(count)[:, None]
    if count > 3:
        y0[[1, count - 2], 0] = np.nan
    t = np.linspace(0.0, 1.0, 6)
    common = {"backend": "numba", "method": method, "throw": False, **kwargs}
    batch = odecore.solve(lorenz, y0, t, params=params, batch_axis=0, **common)
    failing = np.isnan(y0[:, 0])
    np.testing.assert_array_equal(batch.status != 0, failing)
    # (A single solve refuses a non-finite y0 outright.)
    for n in np.flatnonzero(~failing):
        solo = odecore.solve(lorenz, y0[n], t, params=params[n], **common)
        np.testing.assert_array_equal(batch.ys[:, n], solo.ys)
        assert batch.status[n] == solo.status
        for name in ("nfev", "naccept", "nreject"):
            assert batch.stats[name][n] == solo.stats[name], name


def test_ranges_are_each_solved_once_whichever_thread_takes_them():
    """``numba_threads.run``: the threads, the calling one among them, take the ranges from
    the shared counter, each range once, also when the helper threads are all busy
    elsewhere (the calling thread then takes every range) and with Numba set to one
    thread; an error in a range is raised whichever thread met it."""
    import threading

    from odecore.adapters import numba_threads

    @numba.njit(nogil=True)
    def count_ranges(hits, shared):
        g = numba_threads.take_range(shared)
        while g < hits.shape[0]:
            hits[g] += 1
            numba_threads.range_done(shared)
            g = numba_threads.take_range(shared)

    for threads in (1, 2, 3):
        hits, shared = np.zeros(2000, dtype=np.int64), numba_threads.counter()
        call = functools.partial(count_ranges, hits, shared)
        numba_threads.run(call, len(hits), shared, threads)
        np.testing.assert_array_equal(hits, 1)
        assert shared[numba_threads.DONE] == len(hits)

    busy = numba_threads._free_helpers(numba.config.NUMBA_NUM_THREADS)
    try:
        hits, shared = np.zeros(500, dtype=np.int64), numba_threads.counter()
        numba_threads.run(functools.partial(count_ranges, hits, shared), len(hits), shared, 2)
        np.testing.assert_array_equal(hits, 1)
    finally:
        for helper in busy:
            helper.busy.release()

    @numba.njit(nogil=True)
    def fail_in_range_five(shared):
        g = numba_threads.take_range(shared)
        while g < 40:
            if g == 5:
                raise ValueError("range 5")
            numba_threads.range_done(shared)
            g = numba_threads.take_range(shared)

    # Whichever thread takes range 5, the calling one or a helper (the other one waits
    # before it starts), its error is raised, never a batch with a range left unsolved.
    caller = threading.get_ident()
    for helper_fails in (True, False):
        shared = numba_threads.counter()

        def call(shared=shared, helper_fails=helper_fails):
            if (threading.get_ident() == caller) == helper_fails:
                time.sleep(0.05)
            fail_in_range_five(shared)

        with pytest.raises(ValueError, match="range 5"):
            numba_threads.run(call, 40, shared, 2)

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        callers = []
        hits, shared = np.zeros(50, dtype=np.int64), numba_threads.counter()

        def call():
            callers.append(threading.get_ident())
            count_ranges(hits, shared)

        numba_threads.run(call, len(hits), shared)
    finally:
        numba.set_num_threads(threads)
    assert callers == [threading.get_ident()]
    np.testing.assert_array_equal(hits, 1)


def test_batches_solve_at_once_from_two_threads():
    """Two threads solving batches at the same time each get their own results, equal to
    the same batches solved one after the other (with Numba's ``workqueue`` threading
    layer, two parallel kernels at once aborted the process)."""
    from concurrent.futures import ThreadPoolExecutor

    count = 64
    rho = np.linspace(0.0, 21.0, count)
    params = np.stack([np.full(count, 10.0), rho, np.full(count, 8.0 / 3.0)], axis=1)
    y0s = [np.tile([1.0, 0.0, 0.0], (count, 1)), np.tile([0.5, 1.0, 2.0], (count, 1))]
    t = np.linspace(0.0, 2.0, 5)

    def solve(y0):
        return odecore.odeint(
            lorenz_in_place, y0, t, params=params, batch_axis=0, backend="numba",
            method="tsit5", rtol=1e-8, atol=1e-8,
        )  # fmt: skip

    alone = [solve(y0) for y0 in y0s]
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(solve, y0s))
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_array_equal(a, b)


def _batch_in_child(queue):
    count = 16
    params = np.stack([np.full(count, 10.0), np.linspace(0, 21, count), np.full(count, 8 / 3)], 1)
    ys = odecore.odeint(
        lorenz_in_place, np.tile([1.0, 0.0, 0.0], (count, 1)), np.linspace(0.0, 1.0, 3),
        params=params, batch_axis=0, backend="numba", method="tsit5", rtol=1e-8, atol=1e-8,
    )  # fmt: skip
    queue.put(ys)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_solves_batches_after_its_parent():
    """A child forked after its parent solved a batch inherits the parent's thread pool
    object but none of its threads; it solves batches on threads of its own, with the
    parent's results."""
    import multiprocessing

    expected = odecore.odeint(
        lorenz_in_place, np.tile([1.0, 0.0, 0.0], (16, 1)), np.linspace(0.0, 1.0, 3),
        params=np.stack([np.full(16, 10.0), np.linspace(0, 21, 16), np.full(16, 8 / 3)], 1),
        batch_axis=0, backend="numba", method="tsit5", rtol=1e-8, atol=1e-8,
    )  # fmt: skip
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_batch_in_child, args=(queue,))
    child.start()
    try:
        ys = queue.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(ys, expected)


def test_lane_groups_cover_the_batch_once():
    """The batch's ranges (``_lane_groups``): consecutive, nonempty ranges of the visiting
    order that together hold every position once; whole lanes but the last; shrinking
    (each a share of what is left), so that the last ones are short; one range on one
    thread."""
    from odecore.adapters.numba import _lane_groups

    from odecore.kernels import loop

    for count in (1, 2, 7, 64, 1000, 65536):
        for threads in (1, 2, 3, 16):
            groups = _lane_groups(count, threads)
            assert groups.dtype == np.int64
            assert groups[0, 0] == 0 and groups[-1, 1] == count
            np.testing.assert_array_equal(groups[1:, 0], groups[:-1, 1])
            sizes = groups[:, 1] - groups[:, 0]
            assert np.all(sizes > 0)
            assert np.all(sizes[:-1] % loop.LANES == 0)
            assert np.all(np.diff(sizes) <= 0)
            if threads == 1:
                assert len(groups) == 1
            else:
                assert sizes[0] <= max(loop.LANES, count / (2 * threads) + loop.LANES)
                assert sizes[-1] <= loop.LANES


def test_ensemble_shares_a_1d_params():
    y0 = np.tile([1.0, 0.0, 0.0], (4, 1)) * np.arange(1, 5)[:, None]
    t = np.linspace(0.0, 0.5, 3)
    shared = LORENZ_PARAMS[7]
    batch = odecore.solve(lorenz, y0, t, params=shared, batch_axis=0, backend="numba")
    for n in range(4):
        solo = odecore.solve(lorenz, y0[n], t, params=shared, backend="numba")
        np.testing.assert_array_equal(batch.ys[:, n], solo.ys)


def test_ensemble_tolerances_per_trajectory_or_shared():
    """One rtol for all and one per trajectory (mixed with a shared atol): each trajectory
    is the solve of its own row with its own tolerance."""
    y0 = np.tile([1.0, 0.0, 0.0], (4, 1))
    t = np.linspace(0.0, 1.0, 5)
    params = LORENZ_PARAMS[[2, 6, 10, 14]]
    rtols = np.array([1e-4, 1e-6, 1e-8, 1e-10])
    per_row = odecore.solve(
        lorenz, y0, t, params=params, batch_axis=0, backend="numba",
        rtol=rtols[:, None], atol=1e-10,
    )  # fmt: skip
    for n in range(4):
        solo = odecore.solve(
            lorenz, y0[n], t, params=params[n], backend="numba", rtol=rtols[n], atol=1e-10
        )
        np.testing.assert_array_equal(per_row.ys[:, n], solo.ys)
    # Tighter tolerances take more steps: the rows were not given one another's.
    assert np.all(np.diff(per_row.stats["naccept"]) > 0)


def test_one_failing_trajectory_does_not_disturb_the_others():
    params = np.array([[10.0], [0.3], [10.0], [10.0]])  # sample 1 turns NaN at t = 0.3
    y0 = np.ones((4, 2))
    t = np.linspace(0.0, 1.0, 5)
    batch = odecore.solve(
        poisoned, y0, t, params=params, batch_axis=0, backend="numba", throw=False
    )
    expected = [0, int(odecore.Status.NONFINITE_STATE), 0, 0]
    np.testing.assert_array_equal(batch.status, expected)
    np.testing.assert_allclose(batch.ys[:, 0], np.exp(-t)[:, None] * [1.0, 1.0], rtol=1e-6)
    assert np.all(np.isnan(batch.ys[2:, 1]))
    for n in (0, 2, 3):
        solo = odecore.solve(poisoned, y0[n], t, params=params[n], backend="numba")
        np.testing.assert_array_equal(batch.ys[:, n], solo.ys)
    with pytest.raises(odecore.SolveError, match="for 1 of 4 samples; sample 1 "):
        odecore.solve(poisoned, y0, t, params=params, batch_axis=0, backend="numba")


# --------------------------------------------------------------------------------------------
# Compilation: once per dynamics and form.


def test_other_values_do_not_recompile():
    from numba.core.event import install_recorder

    # The kernel is compiled per dynamics and method (the method's sums are written into
    # it); everything else is a run-time value.
    p = np.array([10.0, 28.0, 8.0 / 3.0])
    odecore.odeint(
        lorenz_in_place, np.ones(3), [0.0, 1.0], params=p, backend="numba", method="tsit5"
    )
    with install_recorder("numba:compile") as recorder:
        ys = odecore.odeint(
            lorenz_in_place,
            np.array([2.0, 1.0, 0.5]),
            np.linspace(0.0, 2.0, 7),
            params=p * 1.01,
            backend="numba",
            method="tsit5",
            rtol=1e-5,
            atol=1e-7,
            options={"step_t": [0.3]},
        )
    assert ys.shape == (7, 3)
    assert recorder.buffer == []


# --------------------------------------------------------------------------------------------
# Bad input.


class Settings:
    rate = -1.0


SETTINGS = Settings()


def not_compilable(t, y, p):
    # Numba has no type for an instance of a Python class.
    return SETTINGS.rate * y


def test_a_dynamics_numba_cannot_compile_is_refused_clearly():
    with pytest.raises(TypeError, match=r"(?s)f\(t, y, params\) -> dy.*f\(t, y, dy, params\)"):
        odecore.odeint(not_compilable, np.ones(2), [0.0, 1.0], params=np.ones(1), backend="numba")
    with pytest.raises(TypeError, match="Numba said"):
        odecore.odeint(not_compilable, np.ones(2), [0.0, 1.0], params=np.ones(1), backend="numba")


def test_wrong_arity_and_callables_are_refused():
    with pytest.raises(TypeError, match="takes 1 positional arguments"):
        odecore.odeint(lambda y: y, np.ones(2), [0.0, 1.0], params=np.ones(1), backend="numba")

    class Rate:
        def __call__(self, t, y, p):
            return -y

    with pytest.raises(TypeError, match="Python function or an @numba.njit function"):
        odecore.odeint(Rate(), np.ones(2), [0.0, 1.0], params=np.ones(1), backend="numba")


@pytest.mark.parametrize(
    ("y0", "params", "batch_axis", "error", "match"),
    [
        (np.ones((2, 2, 2)), np.ones(1), 0, ValueError, r"shape \(N, D\) with batch_axis=0"),
        (np.ones((3, 2)), np.ones((2, 1)), 0, ValueError, r"shape \(3, P\)"),
        (np.ones(2), np.ones((2, 2)), None, ValueError, "1-D array for a single"),
        (np.ones(2), "fast", None, TypeError, "params must be a NumPy array"),
        # Said "got ndarray" of a complex array, and "got shape (1, 1)" of a tuple.
        (np.ones(2), np.ones(1) + 0j, None, TypeError, "got an array of dtype complex128"),
        (np.ones((3, 2)), (np.ones(1),), 0, ValueError, r"got a tuple read as an array of"),
        pytest.param(
            np.ones(2, dtype=np.float16),
            np.ones(1),
            None,
            TypeError,
            "float32 and float64",
            marks=pytest.mark.filterwarnings("ignore::odecore.PrecisionWarning"),
        ),
        (np.ones(2, dtype=np.int64), np.ones(1), None, TypeError, "real floating dtype"),
    ],
)
def test_wrong_shapes_and_dtypes_raise_before_compiling(y0, params, batch_axis, error, match):
    # not_compilable would fail to compile: the input errors must come first.
    with pytest.raises(error, match=match):
        odecore.odeint(
            not_compilable, y0, [0.0, 1.0], params=params, batch_axis=batch_axis, backend="numba"
        )


def three_rates(t, y, p):
    return np.zeros(3)


def test_wrong_rate_shape_is_reported_by_name():
    with pytest.raises(ValueError, match=r"func returned shape \(3,\) but the state y has shape"):
        odecore.odeint(three_rates, np.ones(2), [0.0, 1.0], params=np.ones(1), backend="numba")


def no_rate(t, y, p):
    y[0] + p[0]  # noqa: B018  (computes, and forgets to return)


def no_rate_without_params(t, y):
    y[0]  # noqa: B018


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no-params"])
def test_a_func_that_returns_nothing_is_told_so(with_params):
    # It compiled on its own, returning None, and failed in the kernel's typing with
    # Numba's TypingError about the kernel's variables.
    func, kwargs = (
        (no_rate, {"params": np.ones(1)}) if with_params else (no_rate_without_params, {})
    )
    with pytest.raises(TypeError, match=r"^func returned None; the numba backend expects it"):
        odecore.odeint(func, np.ones(2), [0.0, 1.0], backend="numba", **kwargs)


@pytest.mark.parametrize(
    ("shape", "hint"),
    [((2, 3), r"pass batch_axis=0 and func sees one row of shape \(3,\)"), ((2, 3, 1), "")],
    ids=["rows", "3-D"],
)
def test_a_state_of_several_dimensions_is_told_it_is_seen_flattened(shape, hint):
    """Two Lorenz states stacked as y0 (2, 3) without batch_axis: func, written for one
    trajectory, returns 3 rates for the 6 elements it is given. The error must say that y
    is y0 flattened (the user never wrote a (6,) state) and how to solve the rows as a
    batch, not only that the shapes differ."""
    match = (
        rf"func returned shape \(3,\), but the numba backend passes it y0 of shape "
        rf"{re.escape(str(shape))} flattened, as y of shape \(6,\); .*{hint}"
    )
    with pytest.raises(ValueError, match=match):
        odecore.odeint(
            lorenz_returning, np.ones(shape), [0.0, 1.0], params=np.ones(3), backend="numba"
        )


def lorenz_returning(t, y, p):
    return np.array([p[0] * (y[1] - y[0]), y[0] * (p[1] - y[2]) - y[1], y[0] * y[1] - p[2] * y[2]])


def first_rate_only(t, y, dy, p):
    dy[0] = -p[0] * y[0]


def reads_past_y(t, y, p):
    # Returns the state's shape, but reads a third element of a state of two.
    return np.array([y[1], -y[0] - y[2]])


LORENZ_Y0 = np.array([1.0, 0.0, 0.0])
TWO_PARAMS = np.array([10.0, 28.0])


@pytest.mark.parametrize("func", [lorenz_in_place, lorenz_returning])
def test_a_function_reading_params_past_their_end_is_refused(func):
    # Lorenz reads p[2]; compiled code does not check indices, so two parameters would
    # solve on with whatever memory follows them. At y0 = (1, 0, 0) the read is multiplied
    # by z = 0: only the check near y0 sees it.
    with pytest.raises(ValueError, match="func read params past its 2 elements"):
        odecore.odeint(func, LORENZ_Y0, [0.0, 1.0], params=TWO_PARAMS, backend="numba")
    with pytest.raises(ValueError, match="func read params past its 2 elements"):
        odecore.odeint(
            func,
            np.tile(LORENZ_Y0, (4, 1)),
            [0.0, 1.0],
            params=np.tile(TWO_PARAMS, (4, 1)),
            batch_axis=0,
            backend="numba",
        )


def test_a_function_writing_past_the_state_or_leaving_rates_unwritten_is_refused():
    with pytest.raises(ValueError, match="func wrote dy past its 2 elements"):
        odecore.odeint(lorenz_in_place, np.ones(2), [0.0, 1.0], params=np.ones(3), backend="numba")
    with pytest.raises(ValueError, match=r"func left dy\[1, 2\] unwritten"):
        odecore.odeint(first_rate_only, np.ones(3), [0.0, 1.0], params=np.ones(1), backend="numba")
    with pytest.raises(ValueError, match="func read y past its 2 elements"):
        odecore.odeint(reads_past_y, np.ones(2), [0.0, 1.0], params=np.ones(1), backend="numba")


def halves_its_state(t, y, dy, p):
    y[0] *= 0.5  # the kernel's own state
    dy[0] = -p[0] * y[0]


def sets_its_rate(t, y, p):
    p[0] = 2.0  # the kernel's (and the caller's) parameters
    return -p[0] * y


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_a_function_writing_into_its_state_or_params_is_refused(batch_axis):
    """Writes into ``y`` corrupted the solve, writes into ``params`` changed the caller's
    array: both are refused before the solve, and the caller's params are left as given."""
    shape = (3, 1) if batch_axis == 0 else (1,)
    with pytest.raises(ValueError, match="func wrote into its argument y.*compute into dy"):
        odecore.odeint(
            halves_its_state,
            np.ones(shape),
            [0.0, 1.0],
            params=np.ones(1),
            batch_axis=batch_axis,
            backend="numba",
        )
    params = np.ones(shape)
    with pytest.raises(ValueError, match="func wrote into its argument params"):
        odecore.odeint(
            sets_its_rate,
            np.ones(shape),
            [0.0, 1.0],
            params=params,
            batch_axis=batch_axis,
            backend="numba",
        )
    np.testing.assert_array_equal(params, np.ones(shape))


def decays_in_place_without_params(t, y, dy):
    dy[0] = -y[0]


def test_an_in_place_function_without_params_is_told_the_form():
    # f(t, y, dy) reads as f(t, y, params) -> dy/dt; it was told it wrote into params,
    # which the user never passed.
    with pytest.raises(ValueError, match=r"third argument.* in-place form takes four"):
        odecore.odeint(decays_in_place_without_params, np.ones(1), [0.0, 1.0], backend="numba")


def noisy_decay(t, y, dy, p):
    # Numba's nopython mode draws from NumPy's legacy functions, not from a Generator.
    dy[0] = -p[0] * y[0] + 1e-3 * np.random.random()  # noqa: NPY002


def test_a_function_with_noise_is_left_unchecked_not_refused():
    # The check compares two calls on equal inputs first; these differ.
    ys = odecore.odeint(
        noisy_decay,
        np.ones(1),
        [0.0, 1.0],
        params=np.ones(1),
        method="rk4",
        options={"step_size": 0.01},
        backend="numba",
    )
    # The noise adds between 0 and 1e-3 * (1 - 1/e) to exp(-1); rk4's own error is ~1e-10.
    assert 0.0 <= ys[-1, 0] - math.exp(-1.0) <= 1e-3 * (1 - math.exp(-1.0)) + 1e-9


def test_a_callable_norm_is_refused():
    with pytest.raises(ValueError, match="options\\['norm'\\] must be 'rms', 'max' or"):
        odecore.odeint(
            oscillator,
            OSCILLATOR_Y0,
            [0.0, 1.0],
            params=OSCILLATOR_P,
            backend="numba",
            options={"norm": lambda x: np.max(np.abs(x))},
        )


# --------------------------------------------------------------------------------------------
# Gradients: vjp_odeint with the dynamics' own VJP. Both modes are compiled: the forward
# solve is a kernel solve (the checkpoint's keeps its tape), every backward interval of the
# backsolve is a kernel solve of the augmented dynamics compiled from func and func.vjp,
# and the checkpoint's replay is compiled from the same kernel and func.vjp.


def damped(t, y, p):
    return np.array([y[1], -p[0] * y[0] - p[1] * y[1] + np.sin(t)])


def damped_vjp(t, y, p, cotangent):
    """cotangent^T df/dy and cotangent^T df/dp of ``damped``."""
    cot_y = np.array([-p[0] * cotangent[1], cotangent[0] - p[1] * cotangent[1]])
    return cot_y, np.array([-y[0] * cotangent[1], -y[1] * cotangent[1]])


damped.vjp = damped_vjp


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_vjp_odeint_against_finite_differences(adjoint):
    t = np.linspace(0.0, 2.0, 5)
    tight = {"rtol": 1e-10, "atol": 1e-10}
    weights = np.linspace(0.5, 1.5, 10).reshape(5, 2)
    ys, pullback = odecore.vjp_odeint(
        damped, OSCILLATOR_Y0, t, OSCILLATOR_P, adjoint=adjoint, backend="numba", **tight
    )
    _, p_bar, _ = pullback(weights)
    _, numpy_pullback = odecore.vjp_odeint(
        damped, OSCILLATOR_Y0, t, OSCILLATOR_P, adjoint=adjoint, backend="numpy", **tight
    )
    if adjoint == "checkpoint":
        # The same steps, replayed in another summation order (and sin compiled): rounding,
        # about eps times stages times steps (7 x ~60 here), not the tolerance.
        np.testing.assert_allclose(p_bar, numpy_pullback(weights)[1], rtol=1e-11, atol=0)
    else:
        # The same steps and arithmetic, but compiled: sin and the norm's sums may round
        # differently, and the difference grows at most like the solve's own error.
        np.testing.assert_allclose(p_bar, numpy_pullback(weights)[1], rtol=1e-8, atol=0)

    def loss(p):
        ys = odecore.odeint(damped, OSCILLATOR_Y0, t, params=p, backend="numba", **tight)
        return float(np.sum(weights * ys))

    # Central differences with h = 1e-5 on O(1) derivatives: truncation h^2 ~ 1e-10, the
    # solves' noise 1e-10 / h ~ 1e-5 relative at most; the gradients' own error ~ tolerance.
    h = 1e-5
    fd = [(loss(OSCILLATOR_P + h * e) - loss(OSCILLATOR_P - h * e)) / (2 * h) for e in np.eye(2)]
    np.testing.assert_allclose(p_bar, fd, rtol=1e-5, atol=1e-7)


def damped_in_place(t, y, dy, p):
    dy[0] = y[1]
    dy[1] = -p[0] * y[0] - p[1] * y[1] + np.sin(t)


def damped_vjp_in_place(t, y, p, cotangent, y_bar, p_bar):
    y_bar[0] = -p[0] * cotangent[1]
    y_bar[1] = cotangent[0] - p[1] * cotangent[1]
    p_bar[0] = -y[0] * cotangent[1]
    p_bar[1] = -y[1] * cotangent[1]


damped_in_place.vjp = damped_vjp_in_place


def damped_batch(t, y, p):
    """``damped`` on a NumPy batch (N, 2), with per-sample ``t`` and ``p`` (N, 2) or (2,)."""
    p = np.broadcast_to(p, y.shape)
    return np.stack([y[:, 1], -p[:, 0] * y[:, 0] - p[:, 1] * y[:, 1] + np.sin(t)], axis=1)


def damped_batch_vjp(t, y, p, cotangent):
    shared = np.ndim(p) == 1
    p = np.broadcast_to(p, y.shape)
    cot_y = np.stack([-p[:, 0] * cotangent[:, 1], cotangent[:, 0] - p[:, 1] * cotangent[:, 1]], 1)
    cot_p = np.stack([-y[:, 0] * cotangent[:, 1], -y[:, 1] * cotangent[:, 1]], axis=1)
    return cot_y, (cot_p.sum(axis=0) if shared else cot_p)


damped_batch.vjp = damped_batch_vjp


@pytest.fixture
def generic_loop_forbidden(monkeypatch):
    """Fail if a gradient's forward solve or its checkpoint replay runs the generic loop."""
    import odecore.adjoint.backsolve as backsolve
    import odecore.adjoint.checkpoint as checkpoint
    import odecore.ode.api as api

    def forbidden(*args, **kwargs):
        raise AssertionError("the generic loop ran where the compiled one should")

    monkeypatch.setattr(api, "run_loop", forbidden)
    monkeypatch.setattr(checkpoint, "_replay_step", forbidden)
    monkeypatch.setattr(backsolve, "run_loop", forbidden)
    return monkeypatch


@pytest.mark.parametrize(
    "method",
    [
        "dopri5",  # FSAL, its own interpolant
        "dopri8",  # f(t_new, y_new) and three extra stages for the interpolant, two estimates
        pytest.param("rk4", marks=pytest.mark.slow),  # fixed steps, the Hermite interpolant
    ],
)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_compiled_checkpoint_equals_the_generic_replay(generic_loop_forbidden, method, direction):
    """The kernel's tape replayed compiled against NumPy's generic checkpoint on the same
    problem: the same steps, so the gradients of y0, params and t agree to rounding. Outputs
    fall inside steps and, at jump_t (jumps of a smooth f), on them; t runs both ways."""
    t = direction * np.array([0.0, 0.35, 0.7, 1.1, 1.6, 2.0])
    weights = np.linspace(0.5, 1.5, 12).reshape(6, 2)
    kwargs = {"rtol": 1e-9, "atol": 1e-9, "method": method}
    kwargs["options"] = {"jump_t": [0.7 * direction]}
    if method == "rk4":
        kwargs["options"]["step_size"] = 0.05
    ys, pullback = odecore.vjp_odeint(
        damped, OSCILLATOR_Y0, t, OSCILLATOR_P, adjoint="checkpoint", backend="numba", **kwargs
    )
    compiled = pullback(weights)
    generic_loop_forbidden.undo()
    generic_ys, generic_pullback = _numpy_checkpoint(damped, t, OSCILLATOR_P, kwargs)
    generic = generic_pullback(weights)
    # The same steps in another summation order: rounding, eps times stages times the
    # steps (at most 13 x 200), with room for the growth of the state's perturbations.
    np.testing.assert_allclose(ys, generic_ys, rtol=1e-11, atol=1e-13)
    for ours, theirs in zip(compiled, generic, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-12)


def _numpy_checkpoint(func, t, params, kwargs, y0=OSCILLATOR_Y0):
    return odecore.vjp_odeint(func, y0, t, params, adjoint="checkpoint", backend="numpy", **kwargs)


@pytest.mark.parametrize("shared", [False, True])
def test_compiled_checkpoint_of_a_batch_equals_solo_gradients(generic_loop_forbidden, shared):
    """A batch's compiled checkpoint, f seeing one trajectory: each row's gradients equal
    its solo solve's, and a shared params row gets the sum of theirs."""
    scales = np.array([1.0, 0.5, 2.0])
    y0 = OSCILLATOR_Y0 * scales[:, None] + np.array([0.0, 0.3])
    params = OSCILLATOR_P if shared else OSCILLATOR_P * np.array([[1.0], [1.2], [0.8]])
    t = np.linspace(0.0, 2.0, 5)
    weights = np.linspace(0.5, 1.5, 30).reshape(5, 3, 2)
    tight = {"rtol": 1e-9, "atol": 1e-9}
    ys, pullback = odecore.vjp_odeint(
        damped, y0, t, params, adjoint="checkpoint", backend="numba", batch_axis=0, **tight
    )
    y0_bar, p_bar, t_bar = pullback(weights)
    solo_t_bar = np.zeros_like(t)
    solo_p_bar = np.zeros(2)
    for n in range(3):
        own = params if shared else params[n]
        solo_ys, solo = odecore.vjp_odeint(
            damped, y0[n], t, own, adjoint="checkpoint", backend="numba", **tight
        )
        g_y0, g_p, g_t = solo(weights[:, n])
        # Each trajectory takes its own steps in the kernel, alone or in a batch: the same
        # arithmetic, so the same numbers.
        np.testing.assert_array_equal(ys[:, n], solo_ys)
        np.testing.assert_array_equal(y0_bar[n], g_y0)
        if not shared:
            np.testing.assert_array_equal(p_bar[n], g_p)
        solo_p_bar = solo_p_bar + g_p
        solo_t_bar = solo_t_bar + g_t
    if shared:
        np.testing.assert_allclose(p_bar, solo_p_bar, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(t_bar, solo_t_bar, rtol=1e-14, atol=1e-14)


def test_compiled_checkpoint_of_a_batch_equals_the_numpy_batch():
    """Against NumPy's generic batch replay of the same batch (f vectorized there): the
    batch steps together on NumPy, one trajectory at a time in the kernel, and each
    trajectory's accepted steps are the same."""
    y0 = np.array([[1.0, 0.0], [0.5, 0.3], [2.0, -0.4]])
    params = OSCILLATOR_P * np.array([[1.0], [1.2], [0.8]])
    t = np.linspace(0.0, 2.0, 5)
    weights = np.linspace(0.5, 1.5, 30).reshape(5, 3, 2)
    kwargs = {"rtol": 1e-9, "atol": 1e-9, "batch_axis": 0}
    _, pullback = odecore.vjp_odeint(
        damped, y0, t, params, adjoint="checkpoint", backend="numba", **kwargs
    )
    _, numpy_pullback = _numpy_checkpoint(damped_batch, t, params, kwargs, y0=y0)
    for ours, theirs in zip(pullback(weights), numpy_pullback(weights), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("form", ["returning", "in place"])
def test_compiled_backsolve_of_a_batch_equals_the_numpy_batch(generic_loop_forbidden, shared, form):
    """A batch's backsolve is one joint backward solve of every trajectory's y and adjoint
    and the parameter adjoint, as on NumPy; compiled, its augmented dynamics call f and
    f.vjp row by row. The same joint system under the same norm takes the same steps, so
    the gradients agree to rounding: per-row params get their rows, a shared row the sum."""
    func = damped if form == "returning" else damped_in_place
    y0 = np.array([[1.0, 0.0], [0.5, 0.3], [2.0, -0.4]])
    params = OSCILLATOR_P if shared else OSCILLATOR_P * np.array([[1.0], [1.2], [0.8]])
    t = np.linspace(0.0, 2.0, 5)
    weights = np.linspace(0.5, 1.5, 30).reshape(5, 3, 2)
    kwargs = {"rtol": 1e-9, "atol": 1e-9, "batch_axis": 0, "adjoint": "backsolve"}
    _, pullback = odecore.vjp_odeint(func, y0, t, params, backend="numba", **kwargs)
    compiled = pullback(weights)
    generic_loop_forbidden.undo()
    _, numpy_pullback = odecore.vjp_odeint(damped_batch, y0, t, params, backend="numpy", **kwargs)
    for ours, theirs in zip(compiled, numpy_pullback(weights), strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-12)


def blowing_up(t, y, p):
    """``y0' = p y0^2`` (it reaches infinity at ``t = 1 / (p y0(0))``) and ``y1' = -y1``."""
    return np.array([p[0] * y[0] * y[0], -y[1]])


def blowing_up_vjp(t, y, p, cotangent):
    return (
        np.array([2.0 * p[0] * y[0] * cotangent[0], -cotangent[1]]),
        np.array([y[0] * y[0] * cotangent[0]]),
    )


blowing_up.vjp = blowing_up_vjp


def blowing_up_batch(t, y, p):
    return np.stack([p[0] * y[:, 0] ** 2, -y[:, 1]], axis=1)


def blowing_up_batch_vjp(t, y, p, cotangent):
    cot_y = np.stack([2.0 * p[0] * y[:, 0] * cotangent[:, 0], -cotangent[:, 1]], axis=1)
    return cot_y, np.array([np.sum(y[:, 0] ** 2 * cotangent[:, 0])])


blowing_up_batch.vjp = blowing_up_batch_vjp


def test_backsolve_of_a_batch_with_a_failed_sample_freezes_it_as_numpy_does():
    """Trajectory 1 blows up at t = 1 and stops there (throw=False); the others reach the
    end. The backward solve must hold the failed one still over the outputs it did not
    reach, which the row-by-row compiled dynamics do not do: such a batch takes the generic
    backsolve, and its gradients equal NumPy's."""
    y0 = np.array([[0.5, 1.0], [1.0, 1.0], [0.2, 1.0]])
    params = np.array([1.0])
    # Trajectory 1's last output, at 0.99, is 100. Moved backward from there rather than
    # held, it would fall to about 4.5 over the first interval, and the joint solve would
    # take other steps.
    t = np.array([0.0, 0.3, 0.99, 1.2, 1.5])
    weights = np.ones((5, 3, 2))
    weights[3:, 1] = 0.0  # no cotangent on the outputs trajectory 1 does not reach
    kwargs = {"rtol": 1e-9, "atol": 1e-9, "batch_axis": 0, "adjoint": "backsolve"}
    kwargs["throw"] = False
    ys, pullback = odecore.vjp_odeint(blowing_up, y0, t, params, backend="numba", **kwargs)
    assert np.isnan(ys[3:, 1]).all() and np.isfinite(ys[:, [0, 2]]).all()
    ours = pullback(weights)
    _, numpy_pullback = odecore.vjp_odeint(
        blowing_up_batch, y0, t, params, backend="numpy", **kwargs
    )
    for mine, theirs in zip(ours, numpy_pullback(weights), strict=True):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, theirs, rtol=1e-11, atol=1e-12)


def decay_rows(t, y, dy, p):
    for i in range(y.shape[0]):
        dy[i] = -p[0] * y[i]


def decay_rows_vjp(t, y, p, cotangent, y_bar, p_bar):
    p_bar[0] = 0.0
    for i in range(y.shape[0]):
        y_bar[i] = -p[0] * cotangent[i]
        p_bar[0] -= y[i] * cotangent[i]


decay_rows.vjp = decay_rows_vjp


@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_a_failed_trajectory_spoils_only_its_own_row_of_per_trajectory_params(adjoint):
    """A sweep over k in y' = -k y where one k is so stiff that its trajectory runs out of
    steps, with a loss on every output: that trajectory's gradients are NaN, but each of
    the others reads only its own row of params, so its gradient is its own, in closed
    form: dL/dk = -sum_i t_i e^{-k t_i} sum_d y0_d, dL/dy0_d = sum_i e^{-k t_i}."""
    rates = np.array([0.5, 1.0, 1e6, 2.0])
    y0 = np.array([[1.0, 2.0], [0.5, 1.5], [1.0, 1.0], [2.0, 0.25]])
    t = np.linspace(0.0, 1.0, 3)
    ys, pullback = odecore.vjp_odeint(
        decay_rows,
        y0,
        t,
        rates[:, None],
        adjoint=adjoint,
        backend="numba",
        batch_axis=0,
        rtol=1e-10,
        atol=1e-12,
        options={"max_num_steps": 100},
        throw=False,
    )
    y0_bar, p_bar, t_bar = pullback(np.ones_like(ys))
    ok = np.array([True, True, False, True])
    assert np.isnan(ys[-1, ~ok]).all() and np.isfinite(ys[:, ok]).all()
    assert np.isnan(y0_bar[~ok]).all() and np.isnan(p_bar[~ok]).all() and np.isnan(t_bar).all()
    decays = np.exp(-rates[ok][None, :] * t[:, None])  # (T, trajectories)
    # The gradients are the solve's to about its tolerance: relative errors of a few 1e-10.
    expected_k = -np.sum(t[:, None] * decays, axis=0) * y0[ok].sum(axis=1)
    np.testing.assert_allclose(p_bar[ok, 0], expected_k, rtol=1e-8)
    np.testing.assert_allclose(y0_bar[ok], np.sum(decays, axis=0)[:, None] * [1, 1], rtol=1e-8)


@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_compiled_gradients_of_in_place_forms_against_the_closed_form(adjoint):
    """y' = -k y, loss sum_i y(t_i): dL/dk = -sum_i t_i y0 e^{-k t_i}, dL/dy0 = sum_i
    e^{-k t_i}; both forms of f and of the VJP written in place."""

    def decay(t, y, dy, p):
        dy[0] = -p[0] * y[0]

    def decay_vjp(t, y, p, cotangent, y_bar, p_bar):
        y_bar[0] = -p[0] * cotangent[0]
        p_bar[0] = -y[0] * cotangent[0]

    decay.vjp = decay_vjp
    k, y0 = 0.7, 1.3
    t = np.linspace(0.0, 2.0, 6)
    ys, pullback = odecore.vjp_odeint(
        decay,
        np.array([y0]),
        t,
        np.array([k]),
        adjoint=adjoint,
        backend="numba",
        rtol=1e-11,
        atol=1e-12,
    )
    y0_bar, p_bar, _ = pullback(np.ones_like(ys))
    # Both are the solve's gradient to about its tolerance: relative errors of a few 1e-10.
    np.testing.assert_allclose(ys[:, 0], y0 * np.exp(-k * t), rtol=1e-9)
    np.testing.assert_allclose(y0_bar, [np.sum(np.exp(-k * t))], rtol=1e-9)
    np.testing.assert_allclose(p_bar, [-np.sum(t * y0 * np.exp(-k * t))], rtol=1e-9)


def feeding_with(vjp):
    """y0' = -k y0, y1' = y0 with ``vjp`` as its VJP: a function object of its own, since
    the kernels are kept per function."""

    def feeding(t, y, dy, p):
        dy[0] = -p[0] * y[0]
        dy[1] = y[0]

    feeding.vjp = vjp
    return feeding


def feeding_vjp_in_part(t, y, p, cotangent, y_bar, p_bar):
    # y_bar[1] is zero (f does not read y[1]) and left unwritten.
    y_bar[0] = -p[0] * cotangent[0] + cotangent[1]
    p_bar[0] = -y[0] * cotangent[0]


feeding = feeding_with(feeding_vjp_in_part)


@pytest.mark.parametrize(
    ("adjoint", "batched"), [("backsolve", False), ("checkpoint", False), ("backsolve", True)]
)
def test_an_in_place_vjp_may_leave_its_zero_entries_unwritten(adjoint, batched):
    """y0' = -k y0, y1' = y0, loss y1(T) = v + u (1 - e^{-kT}) / k for y(0) = (u, v):
    dL/du = (1 - e^{-kT}) / k, dL/dv = 1, dL/dk = u (T e^{-kT} / k - (1 - e^{-kT}) / k^2).
    The backsolve's adjoint system had used whatever its buffer held for y_bar[1]."""
    k = np.array([0.7, 1.9]) if batched else np.array([0.7])
    u, v, T = np.array([1.3, 0.4]), 0.5, 2.0
    y0 = np.stack([u, np.full(2, v)], axis=1) if batched else np.array([u[0], v])
    params = k[:, None] if batched else k
    ys, pullback = odecore.vjp_odeint(
        feeding,
        y0,
        np.array([0.0, T]),
        params,
        adjoint=adjoint,
        backend="numba",
        rtol=1e-11,
        atol=1e-12,
        batch_axis=0 if batched else None,
    )
    cotangent = np.zeros_like(ys)
    cotangent[-1, ..., 1] = 1.0
    y0_bar, k_bar, _ = pullback(cotangent)
    uu = u if batched else u[:1]
    decayed = np.exp(-k * T)
    expected_y0 = np.stack([(1 - decayed) / k, np.ones_like(k)], axis=-1)
    expected_k = uu * (T * decayed / k - (1 - decayed) / k**2)
    # The gradients of a solve at rtol 1e-11: relative errors near 1e-10.
    np.testing.assert_allclose(y0_bar, expected_y0.reshape(np.shape(y0)), rtol=1e-8)
    np.testing.assert_allclose(k_bar, expected_k.reshape(np.shape(params)), rtol=1e-8)


def feeding_vjp_reads_p1(t, y, p, cotangent, y_bar, p_bar):
    y_bar[0] = -p[0] * cotangent[0] + p[1] * cotangent[1]
    y_bar[1] = 0.0
    p_bar[0] = -y[0] * cotangent[0]


def test_a_vjp_reading_params_past_their_end_is_refused():
    ys, pullback = odecore.vjp_odeint(
        feeding_with(feeding_vjp_reads_p1),
        np.array([1.3, 0.5]),
        np.array([0.0, 1.0]),
        np.array([0.7]),
        adjoint="backsolve",
        backend="numba",
    )
    with pytest.raises(ValueError, match="func.vjp read params past its 1 elements"):
        pullback(np.ones_like(ys))


def test_compiled_backsolve_with_an_in_place_vjp_matches_the_returning_one():
    t = np.linspace(0.0, 2.0, 5)
    weights = np.linspace(0.5, 1.5, 10).reshape(5, 2)
    grads = []
    for func in (damped, damped_in_place):
        _, pullback = odecore.vjp_odeint(
            func, OSCILLATOR_Y0, t, OSCILLATOR_P, adjoint="backsolve", backend="numba"
        )
        grads.append(pullback(weights)[:2])
    # One compiled arithmetic, two ways of writing it: the same numbers.
    for returning, in_place in zip(*grads, strict=True):
        np.testing.assert_array_equal(in_place, returning)


def _damped_vjp_allocating(t, y, p, cotangent, y_bar, p_bar):
    rows = np.array(
        [[-p[0] * cotangent[1], cotangent[0] - p[1] * cotangent[1]],
         [-y[0] * cotangent[1], -y[1] * cotangent[1]]]
    )  # fmt: skip
    for i in range(2):
        y_bar[i] = rows[0, i]
        p_bar[i] = rows[1, i]


# damped_in_place, callable from compiled code.
_damped_rate = numba.njit(damped_in_place)


def damped_vjp_allocates(t, y, dy, p):
    _damped_rate(t, y, dy, p)


def damped_inlined_vjp_allocates(t, y, dy, p):
    _damped_rate(t, y, dy, p)


damped_vjp_allocates.vjp = numba.njit(_damped_vjp_allocating)
damped_inlined_vjp_allocates.vjp = numba.njit(_damped_vjp_allocating, inline="always")


@pytest.mark.parametrize(
    "func", [damped_vjp_allocates, damped_inlined_vjp_allocates], ids=["vjp", "inlined vjp"]
)
def test_the_checkpoint_replay_frees_what_its_vjp_allocates(func):
    """The replay's functions run without reference counting where f and its VJP write in
    place and Numba does not inline them: a VJP called apart counts and frees its own
    arrays, one inlined into them needs theirs. The gradient is that of a VJP that
    allocates nothing: the same arithmetic."""
    t = np.linspace(0.0, 2.0, 5)
    weights = np.linspace(0.5, 1.5, 10).reshape(5, 2)

    def gradient(func):
        _, pullback = odecore.vjp_odeint(
            func, OSCILLATOR_Y0, t, OSCILLATOR_P, adjoint="checkpoint", backend="numba"
        )
        return pullback(weights)[:2]

    gradient(func)  # compiled
    grads, allocated, freed = _counting_allocations(lambda: gradient(func))
    assert allocated == freed
    assert allocated > 0  # the VJP's arrays were made, one per call
    for got, want in zip(grads, gradient(damped_in_place), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_a_vjp_numba_cannot_compile_is_refused_clearly(adjoint):
    def rate(t, y, p):
        return -p[0] * y

    def vjp(t, y, p, cotangent):
        return SETTINGS.rate * cotangent, np.zeros(1)

    rate.vjp = vjp
    # The message names the mode that compiles it (checkpoint's said "backsolve").
    match = rf"(?s)func.vjp for the numba backend's {adjoint}.*vjp\(t, y, params, cotangent\).*said"
    with pytest.raises(TypeError, match=match):
        odecore.vjp_odeint(
            rate, np.ones(2), [0.0, 1.0], np.ones(1), adjoint=adjoint, backend="numba"
        )[1](np.ones((2, 2)))


@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_a_vjp_of_neither_form_is_told_both(adjoint):
    # Five arguments are neither vjp(t, y, params, cotangent) nor the in-place six. The
    # checkpoint ran on the generic loop, whose message named an internal wrapper
    # (_GenericForm.vjp) and the returning form only.
    def rate(t, y, p):
        return -p[0] * y

    def vjp(t, y, p, cotangent, y_bar):
        y_bar[:] = -p[0] * cotangent

    rate.vjp = vjp
    with pytest.raises(TypeError, match=r"func.vjp takes 5 positional arguments; .* writing them"):
        odecore.vjp_odeint(
            rate, np.ones(2), [0.0, 1.0], np.ones(1), adjoint=adjoint, backend="numba"
        )[1](np.ones((2, 2)))


def test_a_vjp_of_the_wrong_shape_is_refused_before_the_compiled_solve():
    def rate(t, y, p):
        return -p[0] * y

    def vjp(t, y, p, cotangent):
        return cotangent[:1], -y[:1] * cotangent[:1]

    rate.vjp = vjp
    _, pullback = odecore.vjp_odeint(
        rate, np.ones(2), [0.0, 1.0], np.ones(1), adjoint="backsolve", backend="numba"
    )
    with pytest.raises(ValueError, match=r"cotangent for y of shape \(1,\).*\(2,\)"):
        pullback(np.ones((2, 2)))


@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_a_vjp_returning_none_for_absent_params_is_told_what_to_return(adjoint):
    def rate(t, y):
        return -0.5 * y

    def vjp(t, y, params, cotangent):
        return -0.5 * cotangent, None

    rate.vjp = vjp
    _, pullback = odecore.vjp_odeint(
        rate, np.ones(2), [0.0, 1.0], None, adjoint=adjoint, backend="numba"
    )
    with pytest.raises(ValueError, match=r"returned None for the cotangent of params.*zeros\(0\)"):
        pullback(np.ones((2, 2)))


def test_the_partitioned_norm_takes_the_generic_steps():
    """largest_part_rms compiled into the kernel: the same accepted and rejected steps as
    the generic loop, on a state whose small part would be diluted by one RMS over all."""
    from odecore.control.norms import largest_part_rms

    def rates(t, y, p):
        return np.array([-p[0] * y[0], -p[1] * y[1], np.cos(t) * y[2], y[0] - y[1]])

    y0 = np.array([1.0, 2.0, 0.5, 0.0])
    p = np.array([0.3, 40.0])
    t = np.linspace(0.0, 2.0, 9)
    solutions = [
        odecore.solve(
            rates,
            y0,
            t,
            params=p,
            backend=backend,
            rtol=1e-6,
            atol=1e-9,
            options={"norm": largest_part_rms(np, [1, 2, 1])},
        )
        for backend in ("numba", "numpy")
    ]
    compiled, generic = solutions
    assert compiled.stats == generic.stats
    np.testing.assert_allclose(compiled.ys, generic.ys, rtol=1e-10, atol=1e-14)
    # The parts are honoured: a seminorm (the last part left out) takes other steps.
    semi = odecore.solve(
        rates,
        y0,
        t,
        params=p,
        backend="numba",
        rtol=1e-6,
        atol=1e-9,
        options={"norm": largest_part_rms(np, [1, 2])},
    )
    generic_semi = odecore.solve(
        rates,
        y0,
        t,
        params=p,
        backend="numpy",
        rtol=1e-6,
        atol=1e-9,
        options={"norm": largest_part_rms(np, [1, 2])},
    )
    assert semi.stats == generic_semi.stats
    assert semi.stats["nsteps"] != compiled.stats["nsteps"]


@pytest.mark.parametrize(
    ("func", "dtype", "rtol", "atol"),
    [(oscillator_f32, np.float32, 1e-5, 1e-7), (oscillator, np.float64, 1e-8, 1e-10)],
    ids=["float32", "float64"],
)
def test_jump_t_on_a_smooth_solve_costs_at_most_one_step_and_the_reevaluation(
    func, dtype, rtol, atol
):
    """The kernel loop as the generic one (tests/test_solve.py): landing on a jump splits one
    step (six evaluations for tsit5, FSAL) and re-evaluates the right limit once; float32 at
    an rtol it resolves (its unit roundoff is 6e-8)."""
    y0, t = OSCILLATOR_Y0.astype(dtype), np.linspace(0.0, 4.0, 5).astype(dtype)
    kwargs = {"params": OSCILLATOR_P.astype(dtype), "method": "tsit5", "rtol": rtol}
    kwargs.update(atol=atol, backend="numba")
    without = odecore.solve(func, y0, t, **kwargs).stats["nfev"]
    for jump in (0.37, 0.5, 1.9, 3.3):
        with_jump = odecore.solve(func, y0, t, options={"jump_t": [jump]}, **kwargs)
        assert with_jump.stats["nfev"] <= without + 6 + 1, jump
