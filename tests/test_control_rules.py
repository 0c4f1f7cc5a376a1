"""The loop's pure rules (odecore.control.rules): one source, three kinds of values.

Each rule is called on Python numbers, bound to arrays (NumPy, torch and JAX, one value per
sample), and compiled by ``numba.njit``; all must give the same answer, bit for bit, on the
same arguments, including NaN and infinite ones. The arguments cover every branch of each
rule: landing or not, a jump or not, accepted and rejected steps, I and PI controllers,
zero, NaN and infinite error ratios, underflowing steps and each status.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import odecore
from odecore.control import primitives, rules

NAN, INF = math.nan, math.inf

# Arguments per rule: every combination of the listed values of each parameter.
CASES = {
    "land_on_stop": [
        [0.0, 0.7],  # t
        [0.3, 1.0, 0.99999999, INF],  # dt
        [1.0, 0.8],  # next_stop
        [0.25, INF],  # max_step
        [True, False],  # running
    ],
    "step_factor": [
        [0.0, 1e-12, 0.5, 1.0, 3.0, 1e6, NAN, INF],  # ratio
        [1.0, 0.3],  # ratio_prev
        [True, False],  # accept
        [0.9],  # safety
        [10.0],  # ifactor
        [0.2],  # dfactor
        [1.0, 0.7],  # icoeff
        [0.0, 0.2],  # pcoeff
        [5],  # k
        [False, True],  # shrink
    ],
    "held_after_rejection": [
        [0.2, 1.0, 3.0, NAN],  # factor
        [True, False],  # accept
        [True, False],  # last_rejected
    ],
    "remembered_ratio": [[0.0, 0.5, 2.0, NAN], [1.0, 0.2], [True, False]],
    "next_step": [
        [0.1],  # h
        [0.3, 0.05],  # dt
        [0.02, 0.2, 5.0],  # dt_wanted
        [True, False],  # accept
        [True, False],  # lands
        [0.0, 0.03],  # min_step
        [INF, 0.25],  # max_step
    ],
    "stalled": [
        [True, False],  # rejected
        [1.0, 1e20],  # t
        [0.3, 0.5],  # h
        [0.1, 1e-30],  # dt_wanted
        [0.0, 0.5],  # min_step
        [True, False],  # lands
    ],
    "failure_status": [[True, False], [True, False]],
    "status_after_step": [
        [rules.RUNNING, rules.SUCCESS, rules.NONFINITE_STATE],  # status
        [True, False],  # accept
        [0.5, 1.0],  # t_new
        [1.0],  # t_end
        [True, False],  # stall
        [rules.DT_UNDERFLOW, rules.NONFINITE_ERROR],  # failure
        [3, 10],  # nsteps
        [10],  # max_num_steps
    ],
    "combined_error_ratio": [[0.0, 0.3, 2.0, NAN, INF, 1e200], [0.0, 0.5, NAN, INF, 1e200]],
    "error_scale": [[1.0, -3.0, 0.0], [2.0, -0.5, NAN], [1e-6], [1e-9]],
    "initial_step_guess": [[0.0, 1e-6, 2.0, INF, NAN], [0.0, 3.0, 1e-7, INF, NAN]],
    "initial_step": [[1e-6, 0.01], [0.0, 2.0, NAN], [0.0, 1e-20, 0.5, INF, NAN], [4, 7]],
}


def test_every_rule_is_covered():
    assert set(CASES) == set(rules.RULES)


def _arguments(name):
    return list(itertools.product(*CASES[name]))


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN, bool equal to bool."""
    a, b = np.asarray(a).item(), np.asarray(b).item()
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b and type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b


def _results(value):
    return value if isinstance(value, tuple) else (value,)


def _scalar_results(name):
    fn = rules.bound(None).__dict__[name]
    return [_results(fn(*args)) for args in _arguments(name)]


@pytest.mark.parametrize("name", sorted(rules.RULES))
def test_python_numbers_call_the_source(name):
    # bound(None) is the source itself, rebound to the same primitives.
    source = rules.RULES[name]
    for args in _arguments(name):
        got, expected = _results(rules.bound(None).__dict__[name](*args)), _results(source(*args))
        assert all(_same(g, e) for g, e in zip(got, expected, strict=True)), args


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name", sorted(rules.RULES))
def test_array_rules_match_the_scalar_rules(backend_name, name):
    """Every combination at once, as one array per argument: one value per sample. The
    Python-number arguments that set up a rule (the controller's coefficients) stay numbers,
    as in the loop."""
    try:
        bk = odecore.get_backend(backend_name)
    except odecore.BackendNotAvailableError as exc:
        pytest.skip(str(exc))
    settings = {"step_factor": range(3, 10), "initial_step": [3], "error_scale": [2, 3]}
    kept = settings.get(name, ())
    arguments = _arguments(name)
    expected = _scalar_results(name)
    with bk.float64():
        columns = []
        for i, column in enumerate(zip(*arguments, strict=True)):
            if i in kept:
                columns.append(column[0])
                continue
            values = np.array(column)
            dtype = values.dtype if values.dtype != np.int64 else np.int32
            columns.append(bk.asarray(values.astype(dtype)))
        # A kept column must be constant across the cases that are compared at once.
        cases = [k for k, args in enumerate(arguments) if all(args[i] == columns[i] for i in kept)]
        got = _results(rules.bound(bk.xp).__dict__[name](*columns))
        for j, out in enumerate(got):
            out = np.asarray(bk.stop_gradient(out)) if not isinstance(out, (int, float)) else out
            out = np.broadcast_to(out, (len(arguments),))
            for k in cases:
                assert _same(out[k], expected[k][j]), (arguments[k], out[k], expected[k][j])


@pytest.fixture(scope="module", params=["plain", "numba backend"])
def compiled(request):
    """The rules compiled from the scalar primitives as they are, and as the numba backend
    compiles them (with its own primitives, ``adapters.numba_primitives``)."""
    numba = pytest.importorskip("numba", reason="numba is not installed")
    if request.param == "numba backend":
        from odecore.adapters.numba import _compiled_rules

        return _compiled_rules()
    jitted = {name: numba.njit(fn) for name, fn in primitives.SCALAR.items()}
    return {name: numba.njit(primitives.bind(fn, jitted)) for name, fn in rules.RULES.items()}


@pytest.mark.parametrize("name", sorted(rules.RULES))
def test_numba_compiles_the_same_source(compiled, name):
    expected = _scalar_results(name)
    for args, want in zip(_arguments(name), expected, strict=True):
        got = _results(compiled[name](*args))
        assert all(_same(g, e) for g, e in zip(got, want, strict=True)), (args, got, want)


def test_status_codes_are_the_rules():
    for status in odecore.Status:
        assert getattr(rules, status.name) == int(status)


def _ulps_around(x, count):
    """``count`` floats on each side of ``x``, and ``x``."""
    below, above, values = x, x, [x]
    for _ in range(count):
        below, above = math.nextafter(below, -INF), math.nextafter(above, INF)
        values += [below, above]
    return sorted(values)


@pytest.mark.parametrize("icoeff, k", [(1.0, 5), (1.0, 8), (0.7, 5), (1.0, 4)])
def test_step_factor_skips_only_powers_the_clip_removes(compiled, icoeff, k):
    """An accepted step of the I controller without shrinking skips the power from
    ``safety**(k/icoeff)`` on. The factor is the clipped power's everywhere, on Python
    numbers and compiled, except at the bound itself, where the rounded power may leave the
    unclipped factor one ulp above 1 and the skip gives 1."""
    step_factor = rules.bound(None).step_factor
    for safety in (0.9, 0.8711127819548872, 0.95):
        bound = safety ** (k / icoeff)
        ratios = [*_ulps_around(bound, 40), *np.geomspace(1e-9, 1.0, 400)]
        for ratio in ratios:
            args = (ratio, 1.0, True, safety, 10.0, 0.2, icoeff, 0.0, k, False)
            unskipped = min(max(safety * ratio ** (-icoeff / k), 1.0), 10.0)
            for got in (step_factor(*args), compiled["step_factor"](*args)):
                if abs(ratio - bound) <= 4 * math.ulp(bound):
                    assert abs(got - unskipped) <= math.ulp(1.0), (safety, ratio, got)
                else:
                    assert got == unskipped, (safety, ratio, got, unskipped)


def test_step_factor_skips_from_the_bound_on():
    """The bound the rule hands ``power_unless_kept`` is ``safety**(k/icoeff)`` for the I
    controller without shrinking, and infinite (nothing skipped) for a PI controller or with
    shrinking, whose factor the power still decides there."""
    bounds = []

    def recording(x, exponent, accept, keep_from):
        bounds.append(keep_from)
        return primitives.power_unless_kept(x, exponent, accept, keep_from)

    step_factor = primitives.bind(
        rules.step_factor, {**primitives.SCALAR, "power_unless_kept": recording}
    )
    for pcoeff, shrink in ((0.0, False), (0.2, False), (0.0, True)):
        bounds.clear()
        step_factor(0.7, 1.0, True, 0.9, 10.0, 0.2, 1.0, pcoeff, 5, shrink)
        expected = 0.9**5.0 if (pcoeff, shrink) == (0.0, False) else INF
        assert bounds == [pytest.approx(expected, rel=4e-16)]
    # A skipped power is not computed: 0.0 ** -0.2 would raise in Python.
    assert primitives.power_unless_kept(0.0, -0.2, True, 0.0) == 1.0
    with pytest.raises(ZeroDivisionError):
        primitives.power_unless_kept(0.0, -0.2, False, 0.0)
