"""Operations on the loop's per-sample control values: time, step size, status, counters, masks.

The solve loop keeps one control value per sample. For a batch, or for a tracing backend, they
are arrays of shape (B,) and every update is a masked array operation. For a single sample on
an eager backend they are plain Python numbers: a NumPy call on a one-element array costs about
as much as a Runge-Kutta stage on a small state, and the bookkeeping has dozens of them per
step. The loop is written once against this small interface, so both cases run the same code.
"""

from __future__ import annotations

import bisect
import math

from odecore.control import rules
from odecore.control.primitives import SCALAR, array_primitives


def coarse_time_dtype(xp, user_dtype, time_dtype):
    """The dtype ``func`` reads its time in (the user's state's), where it is coarser than
    the loop's time dtype; None where it is not.

    The loop evaluates ``func`` just below and just above a jump (``jump_t``). Those limits,
    taken in float64, round back onto the jump when ``func`` gets its time in float32: a
    ``t <= 0.5`` test there then sees the jump's own time on both sides. They are taken in
    this dtype instead."""
    try:
        if not xp.isdtype(user_dtype, "real floating"):
            return None
        coarser = xp.finfo(user_dtype).eps > xp.finfo(time_dtype).eps
    except (TypeError, ValueError):
        return None
    return user_dtype if coarser else None


def float_limit(xp, dtype, t: float, toward: float) -> float:
    """The number next to ``t`` toward ``toward`` in ``dtype`` (``coarse_time_dtype``; None
    for the time's own precision), as a Python float. Rounding ``t`` to ``dtype`` first
    keeps the limit on the right side of ``t`` in both precisions: the nearest ``dtype``
    number to ``t`` has its neighbours on either side of ``t``."""
    if dtype is None:
        return math.nextafter(t, toward)
    near = xp.asarray(t, dtype=dtype)
    return float(xp.nextafter(near, xp.asarray(toward, dtype=dtype)))


class ArrayOps:
    """Control values as arrays of shape (B,); state arrays are (B, N)."""

    scalar = False

    def __init__(self, backend, state_dtype, user_dtype=None):
        self.xp = backend.xp
        self.time_dtype = backend.time_dtype
        self.state_dtype = state_dtype  # the loop's
        # The dtype ``func`` gets its time in: the user's state's (see Layout.user_dtype).
        self.user_dtype = state_dtype if user_dtype is None else user_dtype
        self.limit_dtype = coarse_time_dtype(self.xp, self.user_dtype, self.time_dtype)
        self.int_dtype = backend.int_dtype
        self.stop_gradient = backend.stop_gradient
        # The loop's decisions on control values, and the element-wise ones on states.
        self.rules = self.state_rules = rules.bound(self.xp)
        # The operations the rules are written against, for the loop's own bookkeeping.
        primitives = array_primitives(self.xp)
        self.where, self.minimum, self.maximum = (
            primitives["where"],
            primitives["minimum"],
            primitives["maximum"],
        )
        self.isfinite, self.isnan = primitives["isfinite"], primitives["isnan"]
        self.not_ = primitives["logical_not"]

    def any(self, x):
        return self.xp.any(x)

    def count(self, mask):
        """A mask as 0/1 counter increments."""
        return self.xp.astype(mask, self.int_dtype)

    def full(self, batch, value, kind="time"):
        dtype = {"time": self.time_dtype, "int": self.int_dtype}[kind]
        return self.xp.full((batch,), value, dtype=dtype)

    def from_norm(self, n):
        """A norm's per-sample values (an array (B,)) as control values. Step-size control
        is not differentiated (its decisions are piecewise), so autodiff stops here."""
        return self.xp.astype(self.stop_gradient(n), self.time_dtype)

    def select_rows(self, mask, a, b):
        """Per-sample choice between two state arrays."""
        return self.xp.where(mask[:, None], a, b)

    def all_rows(self, x):
        """Per sample: is every element of the state row true?"""
        return self.xp.all(x, axis=1)

    def to_state(self, h):
        """A per-sample time value as a (B, 1) factor in the state's dtype."""
        return self.xp.astype(h, self.state_dtype)[:, None]

    def times(self, ts):
        return ts

    def take(self, ts, idx):
        return self.xp.take(ts, idx)

    def next_stop(self, stops, t):
        """The first stop strictly after each sample's time."""
        xp = self.xp
        if stops.shape[0] == 1:
            return xp.broadcast_to(stops, t.shape)
        passed = xp.sum(xp.astype(stops[None, :] <= t[:, None], self.int_dtype), axis=1)
        return xp.take(stops, xp.minimum(passed, stops.shape[0] - 1))

    def is_member(self, t, values):
        return self.xp.any(values[None, :] == t[:, None], axis=1)

    def _limit(self, t, toward):
        xp, dtype = self.xp, self.limit_dtype
        if dtype is None:
            return xp.nextafter(t, xp.asarray(toward, dtype=t.dtype))
        near = xp.nextafter(xp.astype(t, dtype), xp.asarray(toward, dtype=dtype))
        return xp.astype(near, t.dtype)

    def jump_above(self, t):
        """The time just after ``t`` as ``func`` reads it: a jump's right limit."""
        return self._limit(t, math.inf)

    def left_limit(self, t_new, on_jump):
        """The time a step that ends on a jump evaluates its last stages at: just before
        it, as ``func`` reads time, so that it sees the left limit and never the far side."""
        return self.xp.where(on_jump, self._limit(t_new, -math.inf), t_new)

    def rows_index(self, batch):
        return self.xp.arange(batch)

    @staticmethod
    def out_index(slot, rows):
        """Where each sample's output goes in the (T, B, N) buffer."""
        return slot, rows

    def user_time(self, t, batched):
        """Time as ``func`` receives it: in the user's state's dtype, one per sample or 0-d."""
        t = self.xp.astype(t, self.user_dtype)
        return t if batched else self.xp.reshape(t, ())


class ScalarOps:
    """Control values as Python floats, ints and bools, for one sample on an eager backend.

    Each method mirrors :class:`ArrayOps` exactly; the tests compare a batched solve (array
    path) with the same samples solved one at a time (this path).
    """

    scalar = True

    def __init__(self, backend, state_dtype, user_dtype=None):
        self.xp = backend.xp
        self.time_dtype = backend.time_dtype
        self.state_dtype = state_dtype
        self.user_dtype = state_dtype if user_dtype is None else user_dtype
        self.limit_dtype = coarse_time_dtype(self.xp, self.user_dtype, self.time_dtype)
        self.int_dtype = backend.int_dtype
        # Reading a value to the host must not drag autodiff along (the step-size control is
        # not differentiated), so the backend supplies the conversion.
        self.from_norm = backend.to_host_float
        # The time as func receives it, from a Python float (Backend.scalar_maker).
        self.make_user_time = backend.scalar_maker(self.user_dtype)
        self.rules = rules.bound(None)
        self.state_rules = rules.bound(self.xp)

    # The operations the rules are written against, on Python numbers.
    where = staticmethod(SCALAR["where"])
    minimum = staticmethod(SCALAR["minimum"])
    maximum = staticmethod(SCALAR["maximum"])
    isfinite = staticmethod(SCALAR["isfinite"])
    isnan = staticmethod(SCALAR["isnan"])
    not_ = staticmethod(SCALAR["logical_not"])

    @staticmethod
    def any(x):
        return bool(x)

    @staticmethod
    def count(mask):
        return int(mask)

    @staticmethod
    def full(batch, value, kind="time"):
        return float(value) if kind == "time" else int(value)

    @staticmethod
    def select_rows(mask, a, b):
        return a if mask else b

    def all_rows(self, x):
        return bool(self.xp.all(x))

    @staticmethod
    def to_state(h):
        # A Python float is a "weak" scalar for array libraries: it takes the state's dtype.
        return h

    @staticmethod
    def times(ts):
        # ``tolist`` converts in one call; a comprehension converts element by element, which
        # on a long time grid costs more than a short solve.
        return ts.tolist() if hasattr(ts, "tolist") else [float(v) for v in ts]

    @staticmethod
    def take(ts, idx):
        return ts[idx]

    @staticmethod
    def next_stop(stops, t):
        i = bisect.bisect_right(stops, t)
        return stops[min(i, len(stops) - 1)]

    @staticmethod
    def is_member(t, values):
        return t in values

    def jump_above(self, t):
        return float_limit(self.xp, self.limit_dtype, t, math.inf)

    def left_limit(self, t_new, on_jump):
        return float_limit(self.xp, self.limit_dtype, t_new, -math.inf) if on_jump else t_new

    @staticmethod
    def rows_index(batch):
        return None

    @staticmethod
    def out_index(slot, rows):
        # A single sample's buffer is (T, *shape): no row axis.
        return slot

    def user_time(self, t, batched):
        return self.make_user_time(t)
