"""The few operations the pure rules (``odecore.control.rules``) are written against.

A rule is an ordinary Python function of numbers. It calls ``where``, ``minimum``,
``maximum``, ``isfinite``, ``power_unless_kept``, ``isnan`` and ``logical_not`` as module
globals, and :func:`bind` re-creates it with other globals, so one source serves three kinds
of values (``next_below`` and ``next_above`` serve the kernel loop's float64 jump limits
only; the generic loop takes its limits in ``odecore._ops``):

- Python numbers (the functions below): one sample on an eager backend, where a NumPy call on
  a one-element array would cost more than the whole rule;
- arrays of one value per sample (:func:`array_primitives`): batches, and every solve on a
  tracing backend;
- Numba-compiled scalars: the kernel loop, which compiles each rule with ``numba.njit`` after
  binding it to compiled versions of the functions below.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable


def where(condition, a, b):
    return a if condition else b


def minimum(a, b):
    # NaN propagates, as in the array version.
    return a if (a <= b or a != a) else b


def maximum(a, b):
    return a if (a >= b or a != a) else b


def isfinite(x):
    return math.isfinite(x)


def power_unless_kept(x, exponent, accept, keep_from):
    """``x ** exponent``, except 1.0 for an accepted step with ``x >= keep_from``: where a
    rule (``rules.step_factor``) knows the power would be clipped to the same factor. One
    sample skips the power there; the array version computes every element's."""
    return 1.0 if (accept and x >= keep_from) else x**exponent


def isnan(x):
    return x != x


def logical_not(x):
    return not x


def next_below(x):
    """The largest number below ``x`` in its own precision."""
    return math.nextafter(x, -math.inf)


def next_above(x):
    """The smallest number above ``x`` in its own precision."""
    return math.nextafter(x, math.inf)


SCALAR: dict[str, Callable] = {
    "where": where,
    "minimum": minimum,
    "maximum": maximum,
    "isfinite": isfinite,
    "power_unless_kept": power_unless_kept,
    "isnan": isnan,
    "logical_not": logical_not,
    "next_below": next_below,
    "next_above": next_above,
}


def array_primitives(xp) -> dict[str, Callable]:
    """The same operations on arrays of the array-API namespace ``xp``, element-wise."""

    def power_unless_kept_array(x, exponent, accept, keep_from):
        # Choosing per element would add operations, where one sample's skip saves one.
        return x**exponent

    return {
        "where": xp.where,
        "minimum": xp.minimum,
        "maximum": xp.maximum,
        "isfinite": xp.isfinite,
        "power_unless_kept": power_unless_kept_array,
        "isnan": xp.isnan,
        "logical_not": xp.logical_not,
    }


def bind(function: Callable, primitives: dict[str, Callable]) -> Callable:
    """``function`` with the same code, calling ``primitives`` instead of the scalar ones."""
    namespace = {**function.__globals__, **primitives}
    bound = types.FunctionType(
        function.__code__,
        namespace,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    bound.__doc__ = function.__doc__
    bound.__qualname__ = function.__qualname__
    return bound
