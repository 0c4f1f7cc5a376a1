"""``Perturb``: which side of a discontinuity an evaluation of ``func`` is meant for."""

from __future__ import annotations

import enum
import inspect
import math


class Perturb(enum.Enum):
    """Which side of a discontinuity an evaluation of ``func`` is meant for.

    Passed as ``func(t, y, perturb=...)`` to a ``func`` that has a ``perturb`` keyword. At a time
    listed in ``options["jump_t"]`` the solver evaluates ``func`` on both sides of the jump:
    ``PREV`` for the left limit (the value just before the jump, in the direction of the user's
    time), ``NEXT`` for the right limit (just after it), and ``NONE`` for every other
    evaluation. The time passed is already the nearest representable time on that side, so a
    ``func`` that compares ``t`` with the jump time needs no keyword; the keyword is for one
    whose discontinuity is not visible from ``t`` alone.

    The side is read off concrete times, on eager backends (NumPy, torch); a traced solve (JAX)
    always passes ``NONE``. In a batch, a side is passed only when every sample is evaluated on
    it (``func`` gets one keyword for the batch). The checkpoint replay passes the same keywords
    as the forward solve; the backsolve's backward solve, and the dynamics' own ``vjp``
    (NumPy), are called without it.

    Attributes
    ----------
    NONE
        An evaluation away from any jump.
    NEXT
        The right limit: just after the jump.
    PREV
        The left limit: just before the jump.

    Examples
    --------
    A rate that switches from 1 to -1 at ``t = 0.5``, told by the keyword rather than by ``t``:

    >>> import numpy as np
    >>> import odecore
    >>> class Switch:
    ...     def __init__(self):
    ...         self.after = False
    ...     def __call__(self, t, y, perturb=odecore.Perturb.NONE):
    ...         if perturb is odecore.Perturb.NEXT:
    ...             self.after = True
    ...         return np.array([-1.0 if self.after else 1.0])
    >>> ys = odecore.odeint(Switch(), np.array([0.0]), np.array([0.0, 1.0]),
    ...                     options={"jump_t": [0.5]})
    >>> round(float(ys[-1, 0]), 9)
    0.0
    """

    NONE = 0
    NEXT = 1
    PREV = 2


def accepts_perturb(func) -> bool:
    """Whether ``func`` (an ``nn.Module``: its ``forward``) takes a ``perturb`` keyword."""
    target = getattr(func, "forward", func) if not inspect.isfunction(func) else func
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    found = parameters.get("perturb")
    return found is not None and found.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


class JumpSides:
    """The internal times at which the loop evaluates ``func`` on one side of a jump: just
    below each jump (its left limit) and just above it (the re-evaluation after landing),
    as Python floats, and the ``Perturb`` each gets. ``limit(t, toward)`` is the number next
    to ``t`` toward ``toward`` as the loop takes it (``odecore._ops.float_limit``: in the
    precision ``func`` reads time in), so that the keys are the loop's times exactly."""

    def __init__(self, jumps, sign: float, limit):
        jumps = [float(j) for j in jumps]
        below = Perturb.PREV if sign > 0 else Perturb.NEXT
        above = Perturb.NEXT if sign > 0 else Perturb.PREV
        self.sides = {limit(j, -math.inf): below for j in jumps}
        self.sides.update({limit(j, math.inf): above for j in jumps})

    def at(self, xp, t) -> Perturb:
        """The ``Perturb`` of an evaluation at internal time ``t`` (a float, or one time per
        sample: a side only when every sample is on it, since ``func`` gets one keyword)."""
        if isinstance(t, float):
            return self.sides.get(t, Perturb.NONE)
        values = {float(v) for v in xp.reshape(t, (-1,))}
        if len(values) != 1:
            return Perturb.NONE
        return self.sides.get(values.pop(), Perturb.NONE)
