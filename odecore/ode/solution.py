"""What a solve returns: the :class:`Solution`, its status codes, and :class:`SolveError`."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from odecore.control import rules


class Status(enum.IntEnum):
    """Per-sample outcome of a solve. ``RUNNING`` only appears inside the loop."""

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

    def describe(self) -> str:
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
        "norm that returns NaN rejects every step) and the tolerances; no smaller step can "
        "help"
    ),
    Status.INVALID_INPUT: (
        "invalid input: y0 is not finite, or, found under jit, t is not strictly monotonic or "
        "not finite, a tolerance or step size is not positive and finite, or step_t or jump_t "
        "is not finite; the same call outside jit with throw=True names the problem"
    ),
}


@dataclass
class Solution:
    """The result of :func:`odecore.solve`.

    ``ys[i]`` is the state at ``ts[i]``. ``stats`` counts function evaluations (``nfev``, one per
    call of ``func`` on the whole batch) and, per sample, the steps attempted (``nsteps``),
    accepted (``naccept``) and rejected (``nreject``). ``status`` is a :class:`Status` code,
    per sample when the solve was batched. Outputs after a failure are NaN, and so are those
    after a sample's terminal event (status ``EVENT``). ``events`` is an
    :class:`~odecore.ode.events.EventRecord` for a solve with ``event``, else None.
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
        return bool(is_success(self.status))

    @property
    def message(self) -> str:
        return describe_status(self.status)


SUCCESSES = (int(Status.SUCCESS), int(Status.EVENT))


def is_success(status: Any) -> bool:
    """Whether every sample succeeded: reached the end, or stopped at a terminal event."""
    try:
        return all(int(s) in SUCCESSES for s in status)
    except TypeError:
        return int(status) in SUCCESSES


def describe_status(status: Any) -> str:
    try:
        codes = sorted({int(s) for s in status})
    except TypeError:
        codes = [int(status)]
    return "; ".join(Status(c).describe() for c in codes)


class SolveError(RuntimeError):
    """A solve failed: max steps reached, step-size underflow, or a non-finite state.

    The message says where (time reached) and with what statistics; ``solution`` holds the
    partial result (outputs past the failure are NaN).
    """

    def __init__(self, message: str, solution: Solution | None = None):
        super().__init__(message)
        self.solution = solution


class PrecisionWarning(UserWarning):
    """A solve cannot give the precision it was asked for: a tolerance below what the state's
    dtype resolves (the solve may report success with a larger error than the tolerance
    promises), or float64 inputs that JAX without its x64 mode turns into float32."""


def failure_message(sol: Solution) -> str:
    """Where and why the solve failed. A batch lists its failed samples (the first
    ``_LISTED_FAILURES``), each with its status and the time it reached."""
    status, t_reached, stats = sol.status, sol.t_reached, sol.stats
    try:
        failed = [i for i, s in enumerate(status) if int(s) not in SUCCESSES]
    except TypeError:
        failed = None
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
    if len(codes) == 1:
        why = Status(codes.pop()).describe()
    else:
        why = "; ".join(f"{Status(c).name}: {Status(c).describe()}" for c in sorted(codes))
    return f"odecore: the {sol.method} solve failed {where}: {why}. Statistics: {counts}."


_LISTED_FAILURES = 10
