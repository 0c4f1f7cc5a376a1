"""What a solve returns: the :class:`Solution`, its status codes, and :class:`SolveError`."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from odecore.backend.host import host_array
from odecore.control import rules


class Status(enum.IntEnum):
    """Per-sample outcome of a solve: the codes of ``Solution.status``.

    An ``IntEnum``: ``Solution.status`` holds its integer codes (an array of them for a batch),
    and ``Status(code)`` names one. ``SUCCESS`` and ``EVENT`` are successes; the others say why a
    sample stopped early.

    Attributes
    ----------
    RUNNING
        -1: still running; only appears inside the loop.
    SUCCESS
        0: reached the last output time.
    MAX_STEPS_REACHED
        1: ``options["max_num_steps"]`` steps were taken before the end.
    DT_UNDERFLOW
        2: the step size became too small to advance time, or fell below
        ``options["min_step"]``.
    NONFINITE_STATE
        3: the dynamics returned NaN or inf and no smaller step avoided it.
    INVALID_INPUT
        4: a sample of a batch solved with ``throw=False`` whose ``y0``, or an event
        function's value at ``t0``, is not finite; under ``jit``, also what the checks before
        an eager solve would have raised for.
    NONFINITE_ERROR
        5: the error estimate is not finite although the state is (check ``options["norm"]``).
    EVENT
        6: stopped at a terminal event (``solve(..., event=...)``): a success.
    NONFINITE_EVENT
        7: an event function returned NaN after ``t0``, where its sign change cannot
        be found, at the end of every step tried, down to the shortest.

    Examples
    --------
    >>> import odecore
    >>> odecore.Status(0).name, int(odecore.Status.EVENT)
    ('SUCCESS', 6)
    >>> odecore.Status.MAX_STEPS_REACHED.describe()
    "max_num_steps reached; raise options['max_num_steps'], ..."
    """

    # The values are the pure rules' (odecore.control.rules), which compiled loops use.
    RUNNING = rules.RUNNING
    SUCCESS = rules.SUCCESS
    MAX_STEPS_REACHED = rules.MAX_STEPS_REACHED
    DT_UNDERFLOW = rules.DT_UNDERFLOW
    NONFINITE_STATE = rules.NONFINITE_STATE
    #: A sample of a batch solved with ``throw=False`` whose y0 is not finite; under jit, also
    #: what the checks before an eager solve would have raised for.
    INVALID_INPUT = rules.INVALID_INPUT
    NONFINITE_ERROR = rules.NONFINITE_ERROR
    #: Stopped at a terminal event (``solve(..., event=...)``): a success.
    EVENT = rules.EVENT
    NONFINITE_EVENT = rules.NONFINITE_EVENT

    def describe(self) -> str:
        """What the status means and, for a failure, what to try: the text of error messages.

        Returns
        -------
        str
            One sentence.

        Examples
        --------
        >>> import odecore
        >>> odecore.Status.SUCCESS.describe()
        'success'
        """
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Status.RUNNING: "still running",
    Status.SUCCESS: "success",
    Status.EVENT: "stopped at a terminal event (a success)",
    Status.MAX_STEPS_REACHED: (
        "max_num_steps reached; raise options['max_num_steps'], loosen rtol/atol, or check "
        "whether the problem is stiff (explicit methods need tiny steps on stiff problems)"
    ),
    Status.DT_UNDERFLOW: (
        "underflow in dt: the step size is too small to advance time (the step the error "
        "control asked for, or options['step_size'] or options['first_step']), or fell below "
        "options['min_step']; the solution may blow up here, or the tolerances may be too "
        "tight for the dtype"
    ),
    Status.NONFINITE_STATE: (
        "non-finite state: the dynamics returned NaN or inf and no smaller step avoided it; "
        "check func near this time"
    ),
    Status.NONFINITE_ERROR: (
        "the error estimate is not finite although the state is: check options['norm'] (a "
        "norm that returns NaN or a negative value rejects every step) and the tolerances; "
        "no smaller step can help"
    ),
    Status.NONFINITE_EVENT: (
        "an event function returned NaN at the end of every step tried from here, down "
        "to the shortest (with fixed steps: at the end of the next step), where its crossing "
        "of zero cannot be found; check where the event function is defined (a log, a square "
        "root or a division of the state)"
    ),
    Status.INVALID_INPUT: (
        "invalid input: y0 is not finite, or an event function is not finite at t0, or, "
        "found under jit, t is not strictly monotonic or not finite, rtol is negative, atol "
        "or a step size is not positive, a tolerance is not finite, or step_t or jump_t is "
        "not finite; the same call outside jit with throw=True names the problem"
    ),
}


@dataclass
class Solution:
    """The result of [`solve`][odecore.solve].

    ``ys[i]`` is the state at ``ts[i]``. Outputs after a failure are NaN, and so are those after
    a sample's terminal event (status ``EVENT``).

    Parameters
    ----------
    ts : array
        The output times (the ``t`` of the call).
    ys : array or pytree of arrays
        The states at ``ts``, shape ``(len(ts), *y0.shape)`` (a structured ``y0``: its
        structure, each part with a leading time axis).
    stats : dict
        ``nfev``: function evaluations (one per call of ``func`` on the whole batch; per
        trajectory in the numba backend's ensembles, whose trajectories call it on their
        own); per sample, the steps attempted (``nsteps``), accepted (``naccept``) and
        rejected (``nreject``).
    status : int or array of int
        A [`Status`][odecore.Status] code, one per sample when the solve was batched.
    t_reached : float or array, optional
        The time each sample reached: the last output time, or where it stopped.
    method : str, optional
        The method's name (``"dopri5"``, ...).
    events : EventRecord, optional
        The [`EventRecord`][odecore.EventRecord] of a solve with ``event``, else None.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> sol = odecore.solve(lambda t, y: -y, np.array([1.0, 2.0]), np.linspace(0.0, 1.0, 3))
    >>> sol.ys.shape, sol.ts.shape, sorted(sol.stats)
    ((3, 2), (3,), ['naccept', 'nfev', 'nreject', 'nsteps'])
    >>> sol.success, sol.message, float(sol.t_reached)
    (True, 'success', 1.0)
    """

    ts: Any
    ys: Any
    stats: dict[str, Any]
    status: Any
    t_reached: Any = None
    method: str = ""
    events: Any = None

    def report(self) -> dict[str, Any]:
        """Everything but the outputs and the method: what a gradient rule hands back
        beside ``ys``, with no gradient."""
        return {
            "ts": self.ts,
            "stats": self.stats,
            "status": self.status,
            "t_reached": self.t_reached,
            "events": self.events,
        }

    @property
    def success(self) -> bool:
        """Whether every sample succeeded: reached the end, or stopped at a terminal event."""
        return bool(is_success(self.status))

    @property
    def message(self) -> str:
        """What ``status`` means in words: the descriptions of its codes, ``"; "``-joined."""
        return describe_status(self.status)


SUCCESSES = (int(Status.SUCCESS), int(Status.EVENT))


def is_success(status: Any) -> bool:
    """Whether every sample succeeded: reached the end, or stopped at a terminal event."""
    if isinstance(status, int):
        # A single sample solved eagerly: checked at the end of every call, where np.isin
        # alone would cost a short compiled solve a tenth of its time.
        return status in SUCCESSES
    return bool(np.all(_succeeded(host_array(status))))


def _succeeded(codes: np.ndarray) -> np.ndarray:
    """Per sample, whether its status code is a success (np.isin costs more)."""
    return (codes == SUCCESSES[0]) | (codes == SUCCESSES[1])


def describe_status(status: Any) -> str:
    codes = np.unique(host_array(status)).tolist()
    return "; ".join(Status(c).describe() for c in codes)


class SolveError(RuntimeError):
    """A solve failed: max steps reached, step-size underflow, or a non-finite state.

    The message says where (the time reached; for a batch, the failed samples) and with what
    statistics. Fixed-point solves raise its subclass [`FixedPointError`][odecore.FixedPointError],
    so one ``except SolveError`` catches every failed solve of the library.

    Parameters
    ----------
    message : str
        What failed, where and why.
    solution : Solution, optional
        The partial result.

    Attributes
    ----------
    solution : Solution or None
        The partial result: outputs past the failure are NaN; ``status`` says why each sample
        stopped.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> try:
    ...     odecore.solve(lambda t, y: -y, np.array([1.0]), np.linspace(0.0, 1.0, 3),
    ...                   options={"max_num_steps": 2})
    ... except odecore.SolveError as error:
    ...     print(odecore.Status(int(error.solution.status)).name)
    MAX_STEPS_REACHED
    """

    def __init__(self, message: str, solution: Solution | None = None):
        super().__init__(message)
        self.solution = solution


class PrecisionWarning(UserWarning):
    """A solve cannot give the precision it was asked for.

    Warned for a tolerance below what the state's dtype resolves (the solve may report success
    with a larger error than the tolerance promises), or for float64 inputs that JAX without its
    x64 mode turns into float32. A ``UserWarning``, so the ``warnings`` filters apply.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> import odecore
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = odecore.odeint(lambda t, y: -y, np.array([1.0], dtype=np.float32),
    ...                        np.array([0.0, 1.0], dtype=np.float32), rtol=1e-9)
    >>> any(issubclass(w.category, odecore.PrecisionWarning) for w in caught)
    True
    """


def failure_message(sol: Solution, adaptive: bool = True) -> str:
    """Where and why the solve failed. A batch lists its failed samples (the first
    ``_LISTED_FAILURES``), each with its status and the time it reached. ``adaptive``: whether
    the steps were the error control's; a fixed-step solve is told other remedies."""
    # On the host once: a failed batch on a GPU is not read one sample at a time.
    status, t_reached = host_array(sol.status), host_array(sol.t_reached)
    stats = sol.stats
    failed = None if status.ndim == 0 else np.flatnonzero(~_succeeded(status)).tolist()
    if failed is None:
        where = f"at t={float(t_reached):.17g}"
        counts = (
            f"nfev={stats['nfev']}, steps={stats['nsteps']} "
            f"(accepted {stats['naccept']}, rejected {stats['nreject']})"
        )
        codes = {int(status)}
    else:
        listed = ", ".join(
            f"sample {i} ({Status(int(status[i])).name} at t={float(t_reached[i]):.9g})"
            for i in failed[:_LISTED_FAILURES]
        )
        unlisted = len(failed) - _LISTED_FAILURES
        more = f" and {unlisted} more" if unlisted > 0 else ""
        where = f"for {len(failed)} of {len(status)} samples; {listed}{more}"
        i = failed[0]
        counts = (
            f"nfev={stats['nfev']}, sample {i}: steps={int(stats['nsteps'][i])} "
            f"(accepted {int(stats['naccept'][i])}, rejected {int(stats['nreject'][i])})"
        )
        codes = {int(status[i]) for i in failed}

    def describe(code):
        if code == Status.MAX_STEPS_REACHED and not adaptive:
            # Tolerances and stiffness do not choose fixed steps: only their size does.
            return _FIXED_MAX_STEPS
        return Status(code).describe()

    if len(codes) == 1:
        why = describe(codes.pop())
    else:
        why = "; ".join(f"{Status(c).name}: {describe(c)}" for c in sorted(codes))
    return f"odecore: the {sol.method} solve failed {where}: {why}. Statistics: {counts}."


_FIXED_MAX_STEPS = (
    "max_num_steps reached; the fixed steps (options['step_size'], options['grid_constructor'] "
    "or the output times) are more than that: raise options['max_num_steps'], or take larger "
    "steps"
)


_LISTED_FAILURES = 10
