"""Tests of the problem catalogue, and the script that computed its mpmath references.

The references in ``odecore/problems.py`` that have no closed form were computed by this file:

    python tests/test_problems.py --dps 45            # every mpmath problem
    python tests/test_problems.py --dps 35 lorenz     # just one

which runs ``mpmath.odefun(F, t0, y0)(t1)`` with ``mpmath.mp.dps`` set to ``--dps`` and the
right-hand sides ``F`` written out below in mpmath arithmetic. They are written independently
of ``problems.py``, and a test checks that both versions of each right-hand side agree.

Nothing here needs odecore's solver: the cross-check integrates with SciPy's DOP853.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest

from odecore.problems import PROBLEMS, Problem, get_problem

REQUIRED = (
    "decay",
    "harmonic",
    "nonautonomous",
    "detest_a1",
    "detest_a2",
    "detest_a3",
    "detest_a4",
    "detest_a5",
    "arenstorf",
    "lorenz",
    "vanderpol",
)
NAMES = tuple(PROBLEMS)
WITH_EXACT = tuple(name for name, p in PROBLEMS.items() if p.exact is not None)
# The problems whose reference comes from mpmath.odefun (see _mpmath_systems).
MPMATH_NAMES = ("arenstorf", "brusselator", "detest_a5", "lorenz", "lotka_volterra", "vanderpol")


# --------------------------------------------------------------------------------------------
# The mpmath side: right-hand sides in mpmath arithmetic and the reference computation.


def _mpmath_systems(mp):
    """name -> (F(t, y) -> list, t0, y0, t1), with every constant exact at mp's precision."""
    mpf = mp.mpf
    mu = mpf("0.012277471")

    def arenstorf(t, y):
        x, z, vx, vz = y
        d_earth = ((x + mu) ** 2 + z**2) ** mpf(1.5)
        d_moon = ((x - (1 - mu)) ** 2 + z**2) ** mpf(1.5)
        ax = x + 2 * vz - (1 - mu) * (x + mu) / d_earth - mu * (x - (1 - mu)) / d_moon
        az = z - 2 * vx - (1 - mu) * z / d_earth - mu * z / d_moon
        return [vx, vz, ax, az]

    beta = mpf(8) / 3
    return {
        "detest_a5": (lambda t, y: [(y[0] - t) / (y[0] + t)], 0, [mpf(4)], 20),
        "lorenz": (
            lambda t, y: [10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1], y[0] * y[1] - beta * y[2]],
            0,
            [mpf(1), mpf(1), mpf(1)],
            1,
        ),
        "vanderpol": (lambda t, y: [y[1], (1 - y[0] ** 2) * y[1] - y[0]], 0, [mpf(2), mpf(0)], 10),
        "lotka_volterra": (
            lambda t, y: [mpf(3) / 2 * y[0] - y[0] * y[1], -3 * y[1] + y[0] * y[1]],
            0,
            [mpf(1), mpf(1)],
            10,
        ),
        "brusselator": (
            lambda t, y: [1 + y[0] ** 2 * y[1] - 4 * y[0], 3 * y[0] - y[0] ** 2 * y[1]],
            0,
            [mpf(3) / 2, mpf(3)],
            20,
        ),
        "arenstorf": (
            arenstorf,
            0,
            [mpf("0.994"), mpf(0), mpf(0), mpf("-2.00158510637908252240537862224")],
            mpf("17.0652165601579625588917206249"),
        ),
    }


def mpmath_reference(name: str, dps: int) -> list:
    """y(t1) of problem ``name`` from ``mpmath.odefun`` at ``dps`` digits."""
    import mpmath

    with mpmath.workdps(dps):
        func, t0, y0, t1 = _mpmath_systems(mpmath.mp)[name]
        return mpmath.odefun(func, t0, y0)(t1)


# --------------------------------------------------------------------------------------------
# Helpers


def numpy_rhs(problem: Problem):
    """``problem.func`` as the ``fun(t, y)`` that SciPy expects."""
    return lambda t, y: np.asarray(problem.func(t, np.asarray(y), problem.params))


def random_states(problem: Problem, shape, seed=0):
    """States near y0, where every right-hand side is smooth (A5 needs y + t away from 0)."""
    rng = np.random.default_rng(seed)
    y0 = np.asarray(problem.y0, dtype=np.float64)
    return y0 + 0.1 * rng.standard_normal((*shape, problem.dim))


def max_rel_error(y, reference):
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(y) - reference)) / max(np.max(np.abs(reference)), 1e-300))


# --------------------------------------------------------------------------------------------
# The catalogue itself


def test_required_problems_present():
    assert set(REQUIRED) <= set(PROBLEMS)


@pytest.mark.parametrize("name", NAMES)
def test_problem_record_is_consistent(name):
    problem = PROBLEMS[name]
    assert problem.name == name
    assert get_problem(name) is problem
    assert problem.description and problem.reference_source
    assert problem.t1 > problem.t0
    assert problem.dim == len(problem.y0) >= 1
    assert problem.reference is not None and len(problem.reference) == problem.dim
    assert all(math.isfinite(v) for v in (*problem.y0, *problem.reference, *problem.params))
    assert isinstance(problem.params, tuple)
    assert not problem.stiff


def test_unknown_problem_lists_valid_names():
    with pytest.raises(ValueError, match="unknown problem 'nope'") as info:
        get_problem("nope")
    for name in NAMES:
        assert name in str(info.value)


def test_detest_a_problems_follow_the_paper():
    # Hull et al. 1972: every class A problem runs over [0, 20]; A5 starts at 4, the rest at 1.
    for i in range(1, 6):
        problem = PROBLEMS[f"detest_a{i}"]
        assert (problem.t0, problem.t1) == (0.0, 20.0)
        assert problem.y0 == ((4.0,) if i == 5 else (1.0,))


# --------------------------------------------------------------------------------------------
# Dynamics: array-API behaviour


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_func_keeps_batch_axes(name, batch):
    problem = PROBLEMS[name]
    y = random_states(problem, batch)
    t = 0.7
    dy = problem.func(t, y, problem.params)
    assert dy.shape == y.shape and dy.dtype == np.float64
    flat_y = y.reshape(-1, problem.dim)
    flat_dy = np.asarray(dy).reshape(-1, problem.dim)
    for row, drow in zip(flat_y, flat_dy, strict=True):
        np.testing.assert_allclose(drow, problem.func(t, row, problem.params), rtol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_func_accepts_array_time_and_keeps_state_dtype(name):
    problem = PROBLEMS[name]
    y = random_states(problem, (4,)).astype(np.float32)
    dy = problem.func(np.asarray(0.7, dtype=np.float64), y, problem.params)
    assert dy.dtype == np.float32
    expected = problem.func(0.7, y.astype(np.float64), problem.params)
    np.testing.assert_allclose(dy, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if PROBLEMS[n].params])
def test_func_accepts_per_sample_params(name):
    problem = PROBLEMS[name]
    y = random_states(problem, (5,))
    scale = np.linspace(0.9, 1.1, 5)
    params = tuple(p * scale for p in problem.params)
    dy = problem.func(0.3, y, params)
    for i in range(5):
        own = tuple(p * scale[i] for p in problem.params)
        np.testing.assert_allclose(dy[i], problem.func(0.3, y[i], own), rtol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_func_goes_through_the_array_api_namespace(name):
    # array_api_compat's wrapped NumPy namespace is stricter than plain NumPy about scalars.
    problem = PROBLEMS[name]
    y = random_states(problem, (2,))
    xp = array_api_compat.array_namespace(y)
    dy = problem.func(xp.asarray(1.5), xp.asarray(y), problem.params)
    assert dy.shape == y.shape


# --------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("name", WITH_EXACT)
def test_exact_matches_initial_value_and_reference(name):
    problem = PROBLEMS[name]
    np.testing.assert_allclose(problem.exact(problem.t0), problem.y0, rtol=1e-15, atol=1e-15)
    assert max_rel_error(problem.exact(problem.t1), problem.reference) < 1e-14


@pytest.mark.parametrize("name", WITH_EXACT)
def test_exact_solves_the_ode(name):
    # A central difference of the closed form against func, at points across the interval.
    problem = PROBLEMS[name]
    ts = np.linspace(problem.t0, problem.t1, 9)[1:-1] + 0.123
    h = 1e-5
    derivative = (problem.exact(ts + h) - problem.exact(ts - h)) / (2 * h)
    ys = problem.exact(ts)
    assert ys.shape == (len(ts), problem.dim)
    rhs = np.stack([problem.func(t, y, problem.params) for t, y in zip(ts, ys, strict=True)])
    np.testing.assert_allclose(derivative, rhs, rtol=1e-7, atol=1e-8)


def test_exact_accepts_integer_times():
    assert PROBLEMS["decay"].exact(np.arange(3)).shape == (3, 1)


def test_closed_forms_against_mpmath():
    # Values computed here, independently of the literals embedded in problems.py.
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    with mpmath.workdps(40):
        m = mpmath.mpf("0.51")
        sn, cn, dn = (mpmath.ellipfun(kind, 20, m=m) for kind in ("sn", "cn", "dn"))
        anomaly = mpmath.findroot(lambda e: e - mp.sin(e) / 2 - 20, 20)
        root, denom = mp.sqrt(mpmath.mpf(3) / 4), 1 - mp.cos(anomaly) / 2
        kepler = [
            mp.cos(anomaly) - mpmath.mpf(1) / 2,
            root * mp.sin(anomaly),
            -mp.sin(anomaly) / denom,
            root * mp.cos(anomaly) / denom,
        ]
        expected = {
            "decay": [mp.exp(-5)],
            "harmonic": [mp.cos(20), -2 * mp.sin(20)],
            "nonautonomous": [mpmath.mpf(3) / 2 * mp.exp(-10) + (mp.sin(10) - mp.cos(10)) / 2],
            "detest_a1": [mp.exp(-20)],
            "detest_a2": [1 / mp.sqrt(21)],
            "detest_a3": [mp.exp(mp.sin(20))],
            "detest_a4": [20 / (1 + 19 * mp.exp(-5))],
            "rigid_body": [sn, cn, dn],
            "kepler": kepler,
        }
    for name, values in expected.items():
        reference = PROBLEMS[name].reference
        for got, want in zip(reference, values, strict=True):
            assert got == float(want), name


@pytest.mark.parametrize("name", MPMATH_NAMES)
def test_mpmath_rhs_matches_func(name):
    # The mpmath references are only as good as the agreement of these two right-hand sides.
    mpmath = pytest.importorskip("mpmath")
    assert sorted(_mpmath_systems(mpmath.mp)) == sorted(MPMATH_NAMES)
    problem = PROBLEMS[name]
    func, t0, y0, t1 = _mpmath_systems(mpmath.mp)[name]
    assert (float(t0), float(t1)) == (problem.t0, problem.t1)
    assert [float(v) for v in y0] == list(problem.y0)
    for y in random_states(problem, (5,), seed=1):
        want = [float(v) for v in func(mpmath.mpf(0.4), [mpmath.mpf(float(v)) for v in y])]
        np.testing.assert_allclose(problem.func(0.4, y, problem.params), want, rtol=1e-13)


# --------------------------------------------------------------------------------------------
# Every reference against an independent high-accuracy integration


# Loss of accuracy beyond rtol = 1e-13 grows with each problem's conditioning.
SCIPY_TOLERANCE = {"arenstorf": 1e-8, "kepler": 1e-10, "detest_a3": 1e-10}


@pytest.mark.parametrize("name", NAMES)
def test_reference_agrees_with_scipy_dop853(name):
    from scipy.integrate import solve_ivp

    problem = PROBLEMS[name]
    result = solve_ivp(
        numpy_rhs(problem),
        (problem.t0, problem.t1),
        np.asarray(problem.y0, dtype=np.float64),
        method="DOP853",
        rtol=1e-13,
        atol=1e-13,
    )
    assert result.success, result.message
    tolerance = SCIPY_TOLERANCE.get(name, 1e-11)
    np.testing.assert_allclose(result.y[:, -1], problem.reference, rtol=tolerance, atol=tolerance)


# --------------------------------------------------------------------------------------------
# Recomputing the embedded mpmath digits (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detest_a5", "lorenz", "vanderpol"])
def test_embedded_mpmath_reference_recomputes(name):
    pytest.importorskip("mpmath")
    recomputed = [float(v) for v in mpmath_reference(name, dps=20)]
    np.testing.assert_allclose(recomputed, PROBLEMS[name].reference, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_arenstorf_orbit_is_periodic_in_mpmath():
    pytest.importorskip("mpmath")
    recomputed = [float(v) for v in mpmath_reference("arenstorf", dps=20)]
    np.testing.assert_allclose(recomputed, PROBLEMS["arenstorf"].y0, rtol=0, atol=1e-12)


def main(argv=None) -> int:
    import argparse

    import mpmath

    parser = argparse.ArgumentParser(description="Print the mpmath.odefun references.")
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(MPMATH_NAMES)}")
    parser.add_argument("--dps", type=int, default=45, help="mpmath.mp.dps (default 45)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(MPMATH_NAMES))
    if unknown:
        parser.error(f"no mpmath reference for {unknown}; choose from {', '.join(MPMATH_NAMES)}")
    for name in args.names or MPMATH_NAMES:
        values = mpmath_reference(name, args.dps)
        print(f"{name}: mpmath.odefun at {args.dps} digits")
        for value in values:
            print("   ", mpmath.nstr(value, args.dps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
