"""Events: times where a function of the solution crosses zero.

An event function ``g(t, y)`` (or ``g(t, y, params)``, as ``func`` is called) returns one value
per sample. After each accepted step the loop evaluates every ``g`` at the step's end and
compares its sign with the one at the step's start. Where it changed in the asked direction,
the root is located on the step's dense interpolant by the Illinois method (regula falsi that
halves the value kept at a stale end, so both ends converge), vectorised over samples with a
fixed-shape loop. A terminal event stops its sample at the root, with status ``EVENT``.

Crossings are seen at the steps' ends: an event function that crosses zero twice inside one
step (an even number of sign changes) is not seen. ``options["max_step"]`` bounds the step
where that matters.

The located root ``t*`` carries no gradient inside the loop. The solve (``odecore.ode.api``)
gives it the implicit function theorem's: from ``g(t*, y(t*; theta), theta) = 0``,
``dt*/dtheta = -(dg/dtheta + dg/dy . dy/dtheta) / (dg/dt + dg/dy . f)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from odecore.backend.signature import explain_signature

DIRECTIONS = (-1, 0, 1)
# The Illinois iteration stops at the tolerance, or after this many steps (it converges
# superlinearly, so this is reached only by an event function that is not continuous).
MAX_ROOT_ITERATIONS = 100
DEFAULT_MAX_EVENTS = 64


@dataclass(frozen=True)
class Event:
    """An event function and how its zero crossings count, for ``solve(..., event=...)``.

    Parameters
    ----------
    fn : callable
        ``fn(t, y)``, or ``fn(t, y, params)`` when the solve has ``params``, returning one value
        per sample (0-d for an unbatched solve, shape ``(B,)`` with ``batch_axis``); ``y`` is
        passed as ``func`` gets it (a structured state in its structure).
    terminal : bool, default True
        The sample stops at the first crossing. A non-terminal event is only recorded.
    direction : {0, 1, -1}, default 0
        ``+1`` counts crossings from negative to non-negative (rising), ``-1`` from positive to
        non-positive (falling), ``0`` both; "rising" follows the direction of integration.

    Raises
    ------
    TypeError
        ``fn`` is not callable, or ``terminal`` is not a bool.
    ValueError
        ``direction`` is not -1, 0 or +1.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> falling = odecore.Event(lambda t, y: y[0] - 0.5, direction=-1)
    >>> sol = odecore.solve(lambda t, y: -y, np.array([1.0]), np.linspace(0.0, 2.0, 3),
    ...                     event=falling)
    >>> round(float(sol.events.t), 6), round(float(np.log(2.0)), 6)
    (0.693147, 0.693147)
    >>> odecore.Event(lambda t, y: y[0], direction=2)
    Traceback (most recent call last):
    ...
    ValueError: Event direction must be +1 (rising), -1 (falling) or 0 (either), got 2
    """

    fn: Any
    terminal: bool = True
    direction: int = 0

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"event must be callable, an odecore.Event or a list of them; got an Event whose "
                f"fn is a {type(self.fn).__name__}: pass g(t, y) returning one value per sample"
            )
        if isinstance(self.terminal, np.bool_):  # from a NumPy array or comparison
            object.__setattr__(self, "terminal", bool(self.terminal))
        if not isinstance(self.terminal, bool):
            raise TypeError(f"Event terminal must be True or False, got {self.terminal!r}")
        if isinstance(self.direction, bool) or self.direction not in DIRECTIONS:
            raise ValueError(
                f"Event direction must be +1 (rising), -1 (falling) or 0 (either), got "
                f"{self.direction!r}"
            )


def as_events(event) -> tuple[Event, ...] | None:
    """The ``event`` argument of a solve as a tuple of :class:`Event`; None for none."""
    if event is None:
        return None
    given = list(event) if isinstance(event, (list, tuple)) else [event]
    if not given:
        raise ValueError("event is an empty list; pass None for no events")
    events = []
    for i, e in enumerate(given):
        if isinstance(e, Event):
            events.append(e)
        elif callable(e):
            events.append(
                _with_scipy_attributes(e, i if isinstance(event, (list, tuple)) else None)
            )
        else:
            where = "event" if not isinstance(event, (list, tuple)) else f"event[{i}]"
            raise TypeError(
                f"{where} must be a callable g(t, y) or an odecore.Event, got {type(e).__name__}"
            )
    return tuple(events)


def _with_scipy_attributes(fn, i) -> Event:
    """A plain function as an :class:`Event`, with the ``terminal`` and ``direction``
    attributes scipy's ``solve_ivp`` reads from its event functions, where it has them: a
    function written for scipy keeps its meaning (they were passed over, and its terminal,
    falling event stopped at the first rising crossing). Without them, odecore's defaults:
    terminal, either direction."""
    name = "event" if i is None else f"event[{i}]"
    terminal = getattr(fn, "terminal", True)
    if isinstance(terminal, np.bool_):  # scipy takes it, as any value that bool() reads
        terminal = bool(terminal)
    if isinstance(terminal, numbers.Integral) and not isinstance(terminal, bool):
        if terminal not in (0, 1):
            raise ValueError(
                f"{name}.terminal = {terminal}: scipy stops after that many crossings; odecore "
                f"stops at the first (terminal = True). Set terminal = False to record every "
                f"crossing (Solution.events.times), or stop at the first"
            )
        terminal = bool(terminal)
    if not isinstance(terminal, bool):
        raise TypeError(f"{name}.terminal must be True or False, got {terminal!r}")
    direction = getattr(fn, "direction", 0)
    if isinstance(direction, bool) or not isinstance(direction, numbers.Real):
        raise TypeError(f"{name}.direction must be a number (its sign is used), got {direction!r}")
    if math.isnan(direction):
        raise ValueError(f"{name}.direction is NaN; use +1 (rising), -1 (falling) or 0 (either)")
    # int(): a NumPy number's comparisons are NumPy booleans, which do not subtract.
    return Event(fn, terminal=terminal, direction=int(direction > 0) - int(direction < 0))


def structured_events(events, structure):
    """The events of a structured state's solve on its flat state: each ``fn`` receives the
    user's structure."""
    if events is None:
        return None
    return tuple(Event(StructuredEventFn(e.fn, structure), e.terminal, e.direction) for e in events)


class StructuredEventFn:
    """An event function of the user's structured state, called on the flat state."""

    def __init__(self, fn, structure):
        self.fn = fn
        self.structure = structure

    def __call__(self, t, y, *params):
        return self.fn(t, self.structure.unflatten(y), *params)


class EventState(NamedTuple):
    """What the loop carries for the events (arrays, per sample ``B``, per event ``E``)."""

    g: Any  # (B, E) each event function at the sample's current time
    index: Any  # (B,) the terminal event that stopped the sample, -1 for none
    t: Any  # (B,) internal time of that event (NaN for none)
    y: Any  # (B, N) the state there (NaN for none)
    times: Any  # (K, B) internal times of the first K crossings of any event, NaN beyond
    which: Any  # (K, B) which event each crossing was, -1 beyond
    count: Any  # (B,) how many crossings happened (more than K: only K were kept)


class EventRecord(NamedTuple):
    """The events a solve found, in ``Solution.events``, per sample.

    Unbatched, each field is one value (a 0-d array); batched, its first axis is the sample
    (``times`` and ``which``: the second).

    Attributes
    ----------
    index : array of int
        Which terminal event stopped the sample (its position in ``event``), -1 where none did.
    t : array
        When (NaN where none).
    y : array or pytree of arrays
        The state there (NaN where none), in the structure of ``y0``.
    times : array
        Shape ``(K,)``, batched ``(K, B)``: the first ``K = options["max_events"]`` crossings
        of any event, terminal or not, in order of steps (within one step, in the order of
        ``event``), NaN beyond.
    which : array of int
        Shape as ``times``: which event each crossing was, -1 beyond.
    count : array of int
        How many crossings there were; more than ``K`` means some were not kept.

    Examples
    --------
    A non-terminal event records the crossings of ``cos(t)`` and lets the solve go on:

    >>> import numpy as np
    >>> import odecore
    >>> def oscillator(t, y):
    ...     return np.array([y[1], -y[0]])
    >>> crossing = odecore.Event(lambda t, y: y[0], terminal=False)
    >>> sol = odecore.solve(oscillator, np.array([1.0, 0.0]), np.linspace(0.0, 5.0, 3),
    ...                     event=crossing, rtol=1e-10, atol=1e-12)
    >>> int(sol.events.count), int(sol.events.index)
    (2, -1)
    >>> np.round(sol.events.times[:2] / np.pi, 6)
    array([0.5, 1.5])
    """

    index: Any
    t: Any
    y: Any
    times: Any
    which: Any
    count: Any


class EventFunctions:
    """The event functions in loop terms: ``(t, y) -> (B, E)`` values, time dtype."""

    def __init__(self, bk, ops, events, params, layout, sign, tol, capacity):
        self.backend = bk
        self.ops = ops
        self.events = events
        self.params = params
        self.layout = layout
        self.sign = sign
        self.tol = tol
        self.capacity = capacity
        self.terminal = [e.terminal for e in events]
        self.directions = [e.direction for e in events]

    def call_user(self, fn, t_user, y_user):
        return fn(t_user, y_user) if self.params is None else fn(t_user, y_user, self.params)

    def __call__(self, t, y, check=False):
        bk, xp, lay = self.backend, self.backend.xp, self.layout
        t_user = self.ops.user_time(_flip(xp, self.sign, t), lay.batched)
        y_user = lay.to_user(xp, y)
        values = []
        for i, e in enumerate(self.events):
            try:
                g = self.call_user(e.fn, t_user, y_user)
            except TypeError as error:
                if check:
                    self._explain_call(e.fn, i, error)
                raise
            if check:
                g = check_event_value(bk, g, lay, i, len(self.events))
                if bk.tracing is not None:
                    # JAX clamps an index past an array's end, where NumPy raises: the
                    # event would silently watch another value (Tracing.check_indices).
                    bk.tracing.check_indices(
                        lambda t_u, y_u, fn=e.fn: self.call_user(fn, t_u, y_u),
                        (t_user, y_user),
                        "event" if len(self.events) == 1 else f"event[{i}]",
                    )
            g = xp.reshape(xp.astype(bk.asarray(g), bk.time_dtype), (lay.batch,))
            values.append(bk.stop_gradient(g))
        return xp.stack(values, axis=1)

    def _explain_call(self, fn, i, error):
        name = "event" if len(self.events) == 1 else f"event[{i}]"
        explain_event_call(fn, name, self.params is not None, error)


def explain_event_call(fn, name: str, with_params: bool, error: TypeError) -> None:
    """After the event function ``fn`` (called ``name`` in messages) raised ``error`` on its
    first call: when its signature cannot take the call, say how odecore calls it."""
    if with_params:
        call = f"{name}(t, y, params) when params are given (as it calls func)"
        hint = "Take params as its third argument, as func does."
    else:
        call = f"{name}(t, y) when no params are given"
        hint = f"Write {name}(t, y), or pass what its third argument reads as params=..."
    explain_signature(fn, 3 if with_params else 2, call, hint, error)


def _flip(xp, sign, t):
    if isinstance(sign, float):
        return -t if sign < 0 else t
    return t * xp.astype(sign, t.dtype)


def check_event_value(bk, g, lay, i, count):
    """The first value of event ``i``: an array (or number) of one value per sample."""
    name = "event" if count == 1 else f"event[{i}]"
    if not (bk.owns(g) or isinstance(g, (int, float))) or isinstance(g, bool):
        raise TypeError(
            f"{name} returned {type(g).__name__}; return a {bk.name} array with one value "
            f"per sample"
        )
    if bk.xp.isdtype(bk.asarray(g).dtype, "bool"):
        # Cast to 0 and 1, a condition never goes below zero: its event never fired.
        raise TypeError(
            f"{name} returned booleans; an event is where a value crosses zero: return one "
            f"whose sign changes there (y[0] - 0.5 rather than y[0] < 0.5)"
        )
    shape = tuple(getattr(g, "shape", ()))
    want = (lay.batch,) if lay.batched else ()
    if shape != want:
        raise ValueError(
            f"{name} returned shape {shape}, expected {want}: one value per sample "
            f"({'batched along batch_axis' if lay.batched else 'a 0-d array'})"
        )
    return g


def init_events(p, t0, y0, g0):
    """The event state before the first step; ``g0``: the event values there
    (``events_at_start``)."""
    ev, xp = p.events, p.backend.xp
    B, K = p.layout.batch, ev.capacity
    nan_t = xp.full((B,), math.nan, dtype=p.backend.time_dtype)
    return EventState(
        g=g0,
        index=xp.full((B,), -1, dtype=p.backend.int_dtype),
        t=nan_t,
        y=xp.full(y0.shape, math.nan, dtype=y0.dtype),
        times=xp.full((K, B), math.nan, dtype=p.backend.time_dtype),
        which=xp.full((K, B), -1, dtype=p.backend.int_dtype),
        count=xp.zeros((B,), dtype=p.backend.int_dtype),
    )


def events_at_start(p, t0, y0, throw):
    """The event values at ``t0`` (B, E), checked, and per sample whether they are finite (a
    (B,) boolean array), or None when all are known to be.

    A NaN compares false both ways, so its event would never be found and the solve would
    end without it, silently; from an infinite value the root search brackets nothing. A
    known non-finite value raises ValueError, naming the event and the sample, unless the
    batch is solved with ``throw=False``: that sample then gets status INVALID_INPUT, as a
    non-finite ``y0`` does (whose samples are left out here). Under jit the flags are traced
    and decide the status alone."""
    bk, xp = p.backend, p.backend.xp
    g = p.events(t0, y0, check=True)
    finite = xp.isfinite(g) | xp.logical_not(xp.all(xp.isfinite(y0), axis=1))[:, None]
    valid = xp.all(finite, axis=1)
    if bk.is_traced(valid):
        return g, valid
    if bool(xp.all(valid)):
        return g, None
    if throw or not p.layout.batched:
        rows, columns = xp.nonzero(xp.logical_not(finite))
        i, sample = int(columns[0]), int(rows[0])
        name = "event" if len(p.events.events) == 1 else f"event[{i}]"
        where = f" for sample {sample}" if p.layout.batched else ""
        raise ValueError(
            f"{name} is {float(g[sample, i])} at t0{where}; an event function must be "
            f"finite where the solve starts, or its sign change cannot be found. Check it at "
            f"t0 and y0 (a log or a division that is undefined there)"
            + ("; throw=False solves the other samples" if p.layout.batched else "")
        )
    return g, valid


def crossed(direction, g_old, g_new):
    """Per sample: whether ``g`` crossed zero in ``direction`` between the two values."""
    rising = (g_old < 0) & (g_new >= 0)
    falling = (g_old > 0) & (g_new <= 0)
    return {1: rising, -1: falling, 0: rising | falling}[direction]


def event_phase(p, s_events, accept, t, t_new, h, hy, y, trial, f_new, nfev):
    """After the step from ``t`` (size ``h``): the new event state, and per sample whether a
    terminal event stops it (``stop``), where (``t_stop``, ``y_stop``), and whether an event
    value at the step's end is NaN (``lost``: the step is rejected, as one to a
    non-finite state is). ``nfev`` counts the dense output's extra evaluations when some
    event crossed."""
    ev, bk, xp, ops = p.events, p.backend, p.backend.xp, p.ops
    y_new = trial.y_new
    g_new = ev(t_new, y_new)
    # A NaN compares false with zero both ways: past it no crossing can be found, and the
    # solve would go on as if there were none. (An infinite value at a step's end has a sign,
    # and the root search brackets the crossing by bisection.)
    lost = accept & xp.any(xp.isnan(g_new), axis=1)
    accept = accept & xp.logical_not(lost)
    hits = xp.stack(
        [accept & crossed(d, s_events.g[:, i], g_new[:, i]) for i, d in enumerate(ev.directions)],
        axis=1,
    )

    def none(s_events, nfev):
        stop = xp.zeros_like(accept)
        g = xp.where(accept[:, None], g_new, s_events.g)
        return s_events._replace(g=g), stop, t_new, y_new, nfev

    def located(s_events, nfev):
        dense = p.solver.dense_stages(p.evaluate, t, y, h, hy, trial.stages, f_new)
        nfev = nfev + p.solver.nfev_dense_extra

        def y_at(theta):
            return p.interpolate(ops, p.dense_coeffs, theta, y, hy, dense)

        thetas = [
            _root(p, y_at, i, t, h, s_events.g[:, i], g_new[:, i], hits[:, i])
            for i in range(len(ev.events))
        ]
        return _update(p, s_events, hits, g_new, accept, thetas, t, t_new, h, y_at, nfev)

    return (*bk.cond(ops.any(hits), located, none, s_events, nfev), lost)


def _root(p, y_at, i, t, h, g_lo, g_hi, active):
    """The Illinois iteration for event ``i`` on the step, per sample; ``theta`` in (0, 1] of
    the step, on the side where the sign has changed (so the state there is past the
    event). Samples where ``active`` is false get theta = 1."""
    bk, xp, ev = p.backend, p.backend.xp, p.events
    dtype = bk.time_dtype
    eps = float(xp.finfo(dtype).eps)
    h_safe = xp.where(h > 0, h, 1.0)
    # The time resolution at the step: a few units in the last place of its end.
    tol = ev.tol if ev.tol is not None else 4 * eps * xp.maximum(xp.abs(t + h), h)
    lo = xp.zeros_like(t)
    hi = xp.ones_like(t)
    side = xp.zeros(t.shape, dtype=bk.int_dtype)

    def width(c):
        return (c[1] - c[0]) * h_safe

    def more(c):
        return xp.any(active & (width(c) > tol)) & (c[-1] < MAX_ROOT_ITERATIONS)

    def iterate(c):
        lo, hi, g_lo, g_hi, side, n = c
        # Inactive samples have no bracket: their values may be equal, or NaN.
        spread = xp.where(active & (g_hi != g_lo), g_hi - g_lo, 1.0)
        theta = (lo * g_hi - hi * g_lo) / spread
        # Regula falsi can land on an end in floating point; the midpoint then keeps the
        # bracket shrinking.
        bad = ~((theta > lo) & (theta < hi))
        theta = xp.where(bad, 0.5 * (lo + hi), theta)
        theta = xp.where(active, theta, hi)
        g = ev(t + theta * h, y_at(theta))[:, i]
        same_as_lo = (g * g_lo) > 0
        # Illinois: when the same end is kept twice in a row, halve its value.
        g_hi = xp.where(same_as_lo & (side == 1), 0.5 * g_hi, g_hi)
        g_lo = xp.where(~same_as_lo & (side == -1), 0.5 * g_lo, g_lo)
        lo, g_lo = xp.where(same_as_lo, theta, lo), xp.where(same_as_lo, g, g_lo)
        hi, g_hi = xp.where(same_as_lo, hi, theta), xp.where(same_as_lo, g_hi, g)
        side = xp.where(same_as_lo, 1, -1)
        return lo, hi, g_lo, g_hi, side, n + 1

    state = (lo, hi, g_lo, g_hi, side, 0)
    state = bk.while_loop(more, iterate, state)
    return xp.where(active, state[1], 1.0)


def _update(p, s_events, hits, g_new, accept, thetas, t, t_new, h, y_at, nfev):
    """The event state after a step with crossings at ``thetas`` (one (B,) per event)."""
    ev, xp, bk = p.events, p.backend.xp, p.backend
    inf = math.inf
    t_cross = [xp.where(hits[:, i], t + thetas[i] * h, inf) for i in range(len(thetas))]
    t_stop = xp.full(t.shape, inf, dtype=t.dtype)
    index = xp.full(t.shape, -1, dtype=bk.int_dtype)
    for i, terminal in enumerate(ev.terminal):
        if terminal:
            # Strictly earlier wins: on a tie, the first in the list.
            earlier = t_cross[i] < t_stop
            index = xp.where(earlier, i, index)
            t_stop = xp.where(earlier, t_cross[i], t_stop)
    stop = index >= 0
    theta_stop = xp.where(stop, (t_stop - t) / xp.where(h > 0, h, 1.0), 1.0)
    y_stop = y_at(theta_stop)

    times, which, count = s_events.times, s_events.which, s_events.count
    slots = xp.arange(ev.capacity)[:, None]
    for i in range(len(thetas)):
        keep = hits[:, i] & (t_cross[i] <= t_stop)
        write = keep[None, :] & (slots == count[None, :])
        times = xp.where(write, t_cross[i][None, :], times)
        which = xp.where(write, i, which)
        count = count + xp.astype(keep, count.dtype)
    state = EventState(
        g=xp.where(accept[:, None], g_new, s_events.g),
        index=xp.where(stop, index, s_events.index),
        t=xp.where(stop, t_stop, s_events.t),
        y=xp.where(stop[:, None], y_stop, s_events.y),
        times=times,
        which=which,
        count=count,
    )
    return state, stop, xp.where(stop, t_stop, t_new), y_stop, nfev


def record(p, state: EventState) -> EventRecord:
    """The loop's event state in the user's terms (times in the user's direction, states in
    the user's layout, per sample as the Solution's other fields)."""
    xp, lay = p.backend.xp, p.layout
    direction = p.direction
    y = lay.to_user(xp, state.y)
    if lay.batched:
        return EventRecord(
            state.index, state.t * direction, y, state.times * direction, state.which, state.count
        )
    return EventRecord(
        state.index[0],
        state.t[0] * direction,
        y,
        state.times[:, 0] * direction,
        state.which[:, 0],
        state.count[0],
    )
