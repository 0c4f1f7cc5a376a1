"""The loop's decisions as pure rules: functions of numbers, one value per sample.

Each rule is plain Python over numbers and the few operations of
``odecore.control.primitives``, called as module globals. No rule takes an object, a closure
or a dict, and none calls another, so :func:`bound` can re-create every one of them for arrays
(a batch, or any solve on a tracing backend) and ``numba.njit`` can compile the same source
for a kernel loop. Called directly, they work on Python numbers (one sample on an eager
backend).

Status codes are plain ints, so that compiled code can use them as constants;
``odecore.Status`` gives them names.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

from odecore.control.primitives import (  # noqa: F401  (the globals ``bind`` replaces)
    SCALAR,
    array_primitives,
    bind,
    isfinite,
    logical_not,
    maximum,
    minimum,
    power_unless_kept,
    where,
)

RUNNING = -1
SUCCESS = 0
MAX_STEPS_REACHED = 1
DT_UNDERFLOW = 2
NONFINITE_STATE = 3
INVALID_INPUT = 4
NONFINITE_ERROR = 5
EVENT = 6
NONFINITE_EVENT = 7

# A step within this fraction of the next stop is stretched onto it: a fixed step that divides
# the interval then lands exactly instead of leaving a rounding-sized last step.
LANDING_SLACK = 1e-7

# The largest relative change rounding the clock may make to a step (land_on_stop): 2^-10.
ROUNDED_STEP = 1.0 / 1024.0


def land_on_stop(t, dt, next_stop, max_step, running):
    """``(h, t_new, lands)``: the step to take from ``t`` when the controller proposes ``dt``
    and the next time every step must land on is ``next_stop``. A step that would reach or
    pass the stop is cut (or stretched) to end exactly on it; a sample that is not running
    takes a step of zero."""
    gap = next_stop - t
    dt = minimum(dt, max_step)
    lands = dt >= gap * (1.0 - LANDING_SLACK)
    # The clock moves to t + dt, rounded: by (t + dt) - t, exactly, which the state must
    # advance by too, or y and t drift apart by up to half a unit in the last place of t
    # each step (6e-7 over 100 steps of 0.1 from t = 1e8). Only where that changes the step
    # by a small fraction: within a thousand units of t's last place, rounding is a large
    # part of the step (up to twice dt), the solve is failing anyway, and a rejected step's
    # retry could round up to the same step again and again.
    moved = (t + dt) - t
    close = (moved >= dt * (1.0 - ROUNDED_STEP)) & (moved <= dt * (1.0 + ROUNDED_STEP))
    h = where(running, where(lands, gap, where(close, moved, dt)), 0.0)
    t_new = where(running & lands, next_stop, t + h)
    return h, t_new, lands


def step_factor(ratio, ratio_prev, accept, safety, ifactor, dfactor, icoeff, pcoeff, k, shrink):
    """The factor from this step's size to the next: an I controller (``pcoeff = 0``) or a PI
    controller, ``safety * ratio**(-(icoeff + pcoeff)/k) * ratio_prev**(pcoeff/k)`` clipped to
    ``[dfactor, ifactor]``. ``k`` is the error estimate's order plus one. The defaults of the
    PI controller, ``icoeff = 0.3, pcoeff = 0.4``, are Gustafsson's exponents ``0.7/k`` and
    ``0.4/k`` (Gustafsson, ACM TOMS 17, 1991; Hairer & Wanner II, section IV.2, eq. (2.43c);
    Soderlind's PI.3.4, ACM TOMS 29, 2003). The PI form sizes the step after an accepted one
    only: a rejected step's retry uses the error it just measured, ``ratio**(-(icoeff +
    pcoeff)/k)``, as Hairer's DOPRI5 and DOP853 do (``hnew = h / min(facc1, fac11 / safe)``),
    since the remembered ratio belongs to a step the rejection has already overruled.
    Without ``shrink`` an accepted step never shrinks the next one (torchdiffeq's rule). A
    zero error ratio would make the power infinite: the clip to ``ifactor`` is the limit, and
    the floor only avoids the floating-point warning. A non-finite ratio (NaN or inf in the
    trial state) retries with ``dfactor``.

    An accepted step of the I controller without ``shrink`` keeps its size whenever
    ``safety * ratio**(-icoeff/k) <= 1``, which is ``ratio >= safety**(k/icoeff)``. One
    sample then skips the power (``power_unless_kept``), a fifth of a compiled step's time,
    on 40% of tsit5's steps on a Lorenz sweep at 1e-8, and the clip gives the same factor 1.
    """
    finite = isfinite(ratio)
    safe = where(finite, maximum(ratio, 1e-10), 1.0)
    exponent = (icoeff + pcoeff) / k
    # With safety > 1 the bound exceeds 1, where no step is accepted: nothing skips.
    keep_from = math.inf
    if not shrink and pcoeff == 0.0 and icoeff > 0.0:
        keep_from = safety ** (1.0 / exponent)
    factor = safety * power_unless_kept(safe, -exponent, accept, keep_from)
    if pcoeff != 0.0:
        factor = factor * where(accept, ratio_prev ** (pcoeff / k), 1.0)
    if shrink:
        factor = minimum(maximum(factor, dfactor), ifactor)
    else:
        # Not ``maximum(factor, where(accept, 1.0, dfactor))``: a choice between two numbers
        # would make an array in the library's default dtype, float32 in torch.
        factor = minimum(where(accept, maximum(factor, 1.0), maximum(factor, dfactor)), ifactor)
    return where(finite, factor, dfactor)


def held_after_rejection(factor, accept, last_rejected):
    """The factor after an accepted step that follows a rejected one, capped at 1: the step
    that just failed showed the previous factor too large, so the next step may not grow
    (Hairer's DOPRI5 and DOP853, ``IF (REJECT) HNEW = MIN(ABS(HNEW), ABS(H))``; scipy's
    ``solve_ivp`` RK45 and DOP853 likewise)."""
    return where(accept & last_rejected, minimum(factor, 1.0), factor)


def remembered_ratio(ratio, ratio_prev, accept):
    """The error ratio a PI controller remembers: an accepted step's, floored so that one
    nearly exact step cannot make the next factor huge."""
    return where(accept, maximum(ratio, 1e-4), ratio_prev)


def next_step(h, dt, dt_wanted, accept, lands, min_step, max_step):
    """The step to propose next, from the step ``dt_wanted`` the error asks for. A step
    shortened to land on a stop says nothing about the step the error allows, so the proposal
    then keeps at least the step ``dt`` proposed before it."""
    dt_next = where(accept & lands, maximum(dt_wanted, dt), dt_wanted)
    return minimum(maximum(dt_next, min_step), max_step)


def stalled(rejected, t, h, dt_wanted, min_step, lands):
    """A rejected step whose retry could not advance time, or would fall below ``min_step``.
    A step shortened to land on a stop may legitimately be that short; but once such a step
    ``h`` is itself no longer than ``min_step``, its retry (raised to ``min_step``, cut to the
    stop) is the same step again, and would be rejected again until the step budget ran out."""
    too_small = (dt_wanted < min_step) & (logical_not(lands) | (h <= min_step))
    return rejected & ((t + dt_wanted <= t) | too_small)


def failure_status(finite, norm_failed):
    """Why a stalled sample stopped: the error norm failed on a finite state (a norm that
    returns NaN, say), which no step can mend; the step size underflowed although the trial
    state and the error estimates were finite (``finite``), also where their scaled norm
    overflowed; or the state went non-finite."""
    return where(norm_failed, NONFINITE_ERROR, where(finite, DT_UNDERFLOW, NONFINITE_STATE))


def status_after_step(status, accept, t_new, t_end, stall, failure, nsteps, max_num_steps):
    """The sample's status after a step: success once an accepted step reaches the end time,
    ``failure`` when it stalled, and out of steps when it is still running after
    ``max_num_steps`` attempts."""
    status = where(accept & (t_new >= t_end), SUCCESS, status)
    status = where(stall, failure, status)
    return where((status == RUNNING) & (nsteps >= max_num_steps), MAX_STEPS_REACHED, status)


def combined_error_ratio(n1, n2):
    """Two scaled error norms as one, ``n1**2 / sqrt(n1**2 + 0.01 n2**2)``: Hairer's DOP853
    estimate, which uses the low-order estimate ``n2`` to avoid overestimating the error of
    the high-order one ``n1`` (Hairer, Norsett & Wanner I, section II.10). Zero only when
    both vanish; a NaN stays NaN, so the step is rejected; an overflow stays infinite rather
    than becoming inf / inf."""
    squared = n1 * n1 + 0.01 * n2 * n2
    zero = squared == 0
    combined = n1 * n1 / where(zero, 1.0, squared) ** 0.5
    return where(zero, 0.0, where(isfinite(squared), combined, n1 + n2))


def error_scale(y, y_new, rtol, atol):
    """The scale the local error is measured against, ``atol + rtol max(|y|, |y_new|)``,
    element-wise."""
    return atol + rtol * maximum(abs(y), abs(y_new))


def initial_step_guess(d0, d1):
    """Hairer's first guess ``0.01 d0 / d1`` (Hairer, Norsett & Wanner I, section II.4) from
    the scaled norms of ``y0`` and ``f(t0, y0)``; a nominal ``1e-6`` where they are tiny. An
    infinite or NaN derivative also gets the nominal guess, and the loop then reports the
    non-finite state instead of this heuristic dividing by zero."""
    small = (d0 < 1e-5) | (d1 < 1e-5) | logical_not(isfinite(d0 * d1))
    return where(small, 1e-6, 0.01 * d0 / where(small, 1.0, d1))


def initial_step(h0, d1, d2_times_h0, order):
    """Hairer's first step from the guess ``h0``: ``d2`` estimates the second derivative from
    one more evaluation at ``t0 + h0`` (``d2_times_h0`` is its scaled difference, not yet
    divided by ``h0``), and the step makes the local error of an order-``order`` method about
    0.01, at most 100 times the guess. A derivative that is not finite a small step on, or a
    norm that returns NaN, says nothing about the step size: the guess stands, and the loop's
    first step finds out what is wrong."""
    d2 = d2_times_h0 / where(h0 > 0, h0, 1.0)
    dmax = maximum(d1, d2)
    tiny = dmax <= 1e-15
    h1 = where(
        tiny,
        maximum(h0 * 1e-3, 1e-6),
        (0.01 / where(tiny, 1.0, dmax)) ** (1.0 / (order + 1)),
    )
    return where(isfinite(dmax), minimum(100 * h0, h1), h0)


RULES: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (
        land_on_stop,
        step_factor,
        held_after_rejection,
        remembered_ratio,
        next_step,
        stalled,
        failure_status,
        status_after_step,
        combined_error_ratio,
        error_scale,
        initial_step_guess,
        initial_step,
    )
}

_bound: dict[int, tuple[object, types.SimpleNamespace]] = {}


def bound(xp=None) -> types.SimpleNamespace:
    """Every rule, as a namespace: on Python numbers (``xp=None``), or element-wise on arrays
    of the array-API namespace ``xp``."""
    key = id(xp)
    if key not in _bound:
        primitives = SCALAR if xp is None else array_primitives(xp)
        # The namespace is kept beside the rules so that its id cannot be reused.
        _bound[key] = (
            xp,
            types.SimpleNamespace(**{n: bind(f, primitives) for n, f in RULES.items()}),
        )
    return _bound[key][1]
