"""Step-size controllers against the codes they follow: Hairer's DOPRI5 / DOP853 rules, as
scipy's ``solve_ivp`` implements them, and the PI controller's formula."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

import odecore
from odecore.problems import get_problem

scipy_integrate = pytest.importorskip("scipy.integrate")

# scipy's DOP853 is Hairer's controller with scipy's own factor limits (MIN_FACTOR 0.2,
# MAX_FACTOR 10 where DOP853 has 1/3 and 6); with those the preset should take its steps.
SCIPY_LIMITS = {"controller": "hairer", "dfactor": 0.2, "ifactor": 10.0}
CASES = [
    (name, tol)
    for name in ("arenstorf", "vanderpol", "kepler", "rigid_body", "harmonic")
    for tol in (1e-6, 1e-9)
]


def scipy_dop853_steps(problem, tol):
    """``(accepted, rejected)`` of scipy's DOP853: 12 evaluations per attempted step after
    the two of the start (f(t0, y0) and the first-step rule)."""
    sol = scipy_integrate.solve_ivp(
        lambda t, y: np.asarray(problem.func(t, y, problem.params)),
        (problem.t0, problem.t1),
        np.array(problem.y0),
        method="DOP853",
        rtol=tol,
        atol=tol,
    )
    assert sol.success
    accepted = len(sol.t) - 1
    return accepted, round((sol.nfev - 2) / 12) - accepted


def odecore_steps(problem, tol, options):
    sol = odecore.solve(
        problem.func,
        np.array(problem.y0),
        np.array([problem.t0, problem.t1]),
        params=problem.params,
        method="dopri8",
        rtol=tol,
        atol=tol,
        options=options,
    )
    return sol.stats["naccept"], sol.stats["nreject"]


def test_hairer_preset_takes_the_steps_of_scipys_dop853():
    """Same tableau, error norm, combined DOP853 estimate, first-step rule and controller:
    the two differ only in the rounding of the error ratio, which can flip a decision where
    the ratio is within rounding of 1. So each count may differ by one step plus 2%. The
    torchdiffeq-style default (no shrinking after accepts, growth after rejections) misses
    that margin on most of the same cases, so the comparison can tell the rules apart."""
    missed_by_default = 0
    for name, tol in CASES:
        problem = get_problem(name)
        expected = scipy_dop853_steps(problem, tol)
        got = odecore_steps(problem, tol, SCIPY_LIMITS)
        for g, e in zip(got, expected, strict=True):
            assert abs(g - e) <= 1 + 0.02 * e, (name, tol, got, expected)
        default = odecore_steps(problem, tol, {})
        missed_by_default += any(
            abs(g - e) > 1 + 0.02 * e for g, e in zip(default, expected, strict=True)
        )
    assert missed_by_default >= len(CASES) // 2


def _controller(**settings):
    from odecore.control.controller import Controller

    defaults = dict(safety=0.9, ifactor=10.0, dfactor=0.2, icoeff=1.0, pcoeff=0.0, k=5)
    return Controller(**{**defaults, **settings})


def _scalar_ops():
    from odecore.adapters.numpy import BACKEND

    from odecore._ops import ScalarOps

    return ScalarOps(BACKEND, np.float64)


def test_pi_retry_after_a_rejection_uses_the_current_error_only():
    """Hairer's DOPRI5: a rejected step retries with ``safety * err**(-(icoeff+pcoeff)/k)``;
    the remembered ratio only shapes the step after an accepted one."""
    ops, k = _scalar_ops(), 5
    pi = _controller(icoeff=0.3, pcoeff=0.4, shrink_after_accept=True)
    retry = pi.next_dt(ops, 0.1, 2.0, 0.01, False)
    assert retry == pytest.approx(0.1 * 0.9 * 2.0 ** (-0.7 / k), rel=1e-14)
    after_accept = pi.next_dt(ops, 0.1, 0.5, 0.01, True)
    assert after_accept == pytest.approx(0.1 * 0.9 * 0.5 ** (-0.7 / k) * 0.01 ** (0.4 / k))


def test_no_growth_after_reject_caps_the_factor_at_one():
    ops, k = _scalar_ops(), 5
    held = _controller(shrink_after_accept=True, no_growth_after_reject=True)
    # A small error would let the step grow by 0.9 * 0.01**(-1/5) = 2.26 ...
    assert held.next_dt(ops, 0.1, 0.01, 1.0, True, False) == pytest.approx(
        0.1 * 0.9 * 0.01 ** (-1 / k)
    )
    # ... but not right after a rejection; a factor below 1 is kept, and a rejection
    # following a rejection still shrinks.
    assert held.next_dt(ops, 0.1, 0.01, 1.0, True, True) == 0.1
    assert held.next_dt(ops, 0.1, 0.99, 1.0, True, True) == pytest.approx(
        0.1 * 0.9 * 0.99 ** (-1 / k)
    )
    assert held.next_dt(ops, 0.1, 2.0, 1.0, False, True) == pytest.approx(
        0.1 * 0.9 * 2.0 ** (-1 / k)
    )


@pytest.mark.parametrize(
    ("error", "match", "options"),
    [
        (ValueError, "must be one of 'I', 'PI', 'hairer'", {"controller": "dop853"}),
        (ValueError, "must be one of", {"controller": ["PI"]}),
        (
            TypeError,
            "no_growth_after_reject'] must be True or False",
            {"no_growth_after_reject": 1},
        ),
    ],
)
def test_bad_controller_options_raise(error, match, options):
    with pytest.raises(error, match=match):
        odecore.solve(lambda t, y: -y, np.ones(1), np.array([0.0, 1.0]), options=options)


def van_der_pol(t, y):
    xp = array_api_compat.array_namespace(y)
    x, v = y[..., 0], y[..., 1]
    return xp.stack([v, 5.0 * (1.0 - x * x) * v - x], axis=-1)


def test_hairer_preset_steps_each_sample_as_alone(backend):
    """A consistency check of the per-sample state the no-growth rule needs: in a batch each
    sample remembers its own last rejection, so it takes the steps it takes alone. Van der
    Pol at mu = 5 rejects steps on the way, so the rule is exercised."""
    y0 = np.array([[2.0, 0.0], [0.5, -1.0]])
    ts = backend.asarray(np.array([0.0, 6.0]))
    options = {"controller": "hairer"}
    batch = odecore.solve(
        van_der_pol, backend.asarray(y0), ts, rtol=1e-7, atol=1e-9, batch_axis=0, options=options
    )
    stats = backend.stats(batch)
    assert min(stats["nreject"]) > 0
    for i in range(2):
        alone = backend.stats(
            odecore.solve(
                van_der_pol, backend.asarray(y0[i]), ts, rtol=1e-7, atol=1e-9, options=options
            )
        )
        assert (stats["naccept"][i], stats["nreject"][i]) == (alone["naccept"], alone["nreject"])
