"""Progress reports of a running solve: ``solve(..., progress=...)``.

The loop hands its state to a :class:`Reporter` after every step (on the host: directly on
an eager backend, through the backend's host callback under tracing). The reporter looks at
the wall clock and only every ``REPORT_INTERVAL`` seconds reads the state (the least time
reached over the samples, the accepted and rejected steps summed over them, the least
proposed step) and passes it on to the target: a tqdm bar, a plain-text line on stderr, or
the user's object with the :class:`ProgressTarget` protocol. A solve without progress runs
the loop without any of this.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

from odecore.control.rules import RUNNING

# Seconds of wall time between two reports: the bar moves smoothly, and a step of a few
# microseconds pays one clock reading, not a conversion of the state.
REPORT_INTERVAL = 0.1
# Rejected steps with no accepted one between them after which a report says so.
REJECTION_RUN = 20
# The plain-text line is written at most this often (seconds), for logs.
TEXT_INTERVAL = 2.0


@runtime_checkable
class ProgressTarget(Protocol):
    """What ``progress=`` accepts besides ``True`` and a tqdm bar.

    ``update(t, accepted, rejected, note)`` is called a few times a second while the solve
    runs, and once at its end: ``t`` the time reached (a float, in the user's direction of
    time; for a batch the least over the samples still running, :func:`time_reached`),
    ``accepted`` and ``rejected`` the steps so far (ints; for a batch summed over the
    samples), ``note`` an empty string or, after ``REJECTION_RUN`` rejected steps in a row,
    ``"rejecting steps at t=...: dt=..."`` (on the numba backend, ``"compiling the kernel
    ..."`` while its first call compiles).
    ``close()`` is called once when the solve ends, also when it raises.
    """

    def update(self, t: float, accepted: int, rejected: int, note: str) -> None: ...

    def close(self) -> None: ...


PROTOCOL = "an object with update(t, accepted, rejected, note) and close()"


def check(progress) -> None:
    """Refuse a ``progress=`` value that is neither None, a bool, a tqdm bar nor a
    :class:`ProgressTarget`."""
    if isinstance(progress, type):
        # A class has the protocol's methods as attributes, so the protocol check takes it
        # (``progress=tqdm.tqdm``), and the solve failed only when it called them unbound.
        raise TypeError(
            f"progress got the class {progress.__name__}, not an instance: pass one, e.g. "
            f"progress={progress.__name__}() (the solve sets a tqdm bar's total), or True"
        )
    if progress is None or isinstance(progress, bool) or _is_tqdm(progress):
        return
    if progress is ACTIVE:
        return
    if isinstance(progress, ProgressTarget):
        return
    raise TypeError(
        f"progress must be True, False, None, a tqdm bar or {PROTOCOL} "
        f"(odecore.ode.progress.ProgressTarget), got {type(progress).__name__}"
    )


def reporter(progress) -> Reporter | None:
    """The reporter of one solve for a checked ``progress=`` value; None when it is off."""
    check(progress)
    if progress is None or progress is False:
        return None
    if progress is ACTIVE:
        return ACTIVE
    if progress is True:
        return Reporter(_default_display())
    if _is_tqdm(progress):
        return Reporter(_TqdmDisplay(progress))
    return Reporter(progress)


def _is_tqdm(obj) -> bool:
    tqdm = sys.modules.get("tqdm")
    return tqdm is not None and isinstance(obj, tqdm.tqdm)


def _default_display():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextLine(sys.stderr)
    return _TqdmDisplay(None, tqdm)


class Reporter:
    """One solve's progress: the throttle, the run of rejected steps, the target."""

    def __init__(self, target):
        self.target = target
        self._lock = threading.Lock()
        self._closed = False
        self.t0, self.direction = 0.0, 1.0
        self.accepted = self.rejected = self.rejection_run = 0
        self._next = time.monotonic() + REPORT_INTERVAL

    def begin(self, t0: float, t1: float, direction: float) -> None:
        """A solve from ``t0`` to ``t1`` in internal (increasing) time starts."""
        self.t0, self.direction = float(t0), float(direction)
        self.accepted = self.rejected = self.rejection_run = 0
        self._next = time.monotonic() + REPORT_INTERVAL
        self._closed = False
        if isinstance(self.target, _Display):
            self.target.begin(self.t0 * self.direction, float(t1) * self.direction)

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def report(self, t, accepted, rejected, dt, note: str = "") -> None:
        """Pass on the state (internal time; counts over the whole solve so far), with
        ``note`` where the solve is not rejecting steps."""
        accepted, rejected = int(accepted), int(rejected)
        with self._lock:
            if self._closed:  # under vmap JAX ends each sample in turn: the first closes
                return
            if accepted == self.accepted:
                self.rejection_run += rejected - self.rejected
            else:
                self.rejection_run = 0
            self.accepted, self.rejected = accepted, rejected
            t_user = float(t) * self.direction
            if self.rejection_run >= REJECTION_RUN:
                note = f"rejecting steps at t={t_user:.6g}: dt={float(dt):.3g}"
            self.target.update(t_user, accepted, rejected, note)
            self._next = time.monotonic() + REPORT_INTERVAL

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.target.close()

    def report_when_due(self, t, accepted, rejected, dt) -> None:
        if self.due():
            self.report(t, accepted, rejected, dt)

    def end(self, t, accepted, rejected, dt) -> None:
        self.report(t, accepted, rejected, dt)
        self.close()


class Consecutive:
    """One solve's reports, to the target of ``progress=``, from solves of parts of a batch
    that run one after another (an ensemble's chunks). Each part's solve reports to this
    object as its :class:`ProgressTarget`; the target is told what a batch solve of all the
    parts would tell it. The steps are summed over the parts so far. The least time over the
    samples is ``t0`` while a part is still to run (its samples have not left ``t0``), then
    that of the last part; once that has ended, the furthest any part reached. The target is
    closed once, by :meth:`close_all`."""

    def __init__(self, progress, t0, t1, parts: int):
        self.target = reporter(progress).target
        self.t0 = float(t0)
        if isinstance(self.target, _Display):
            self.target.begin(self.t0, float(t1))
        self._left = parts
        self._done = (0, 0)  # steps accepted and rejected in the parts that have ended
        self._part = (self.t0, 0, 0)  # the running part's last report
        self._furthest = self._shown = self.t0
        self._closed = False

    def update(self, t: float, accepted: int, rejected: int, note: str) -> None:
        self._part = (t, accepted, rejected)
        self._shown = t if self._left == 1 else self.t0
        self.target.update(self._shown, *self._steps(accepted, rejected), note)

    def close(self) -> None:
        """A part's solve has ended."""
        t, accepted, rejected = self._part
        self._done = self._steps(accepted, rejected)
        if abs(t - self.t0) > abs(self._furthest - self.t0):
            self._furthest = t
        self._part = (self.t0, 0, 0)
        self._left -= 1

    def close_all(self) -> None:
        """Every part has ended, or one has raised: the target's last report and its close."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._left == 0 and self._shown != self._furthest:
                self.target.update(self._furthest, *self._done, "")
        finally:
            self.target.close()

    def _steps(self, accepted: int, rejected: int) -> tuple[int, int]:
        return self._done[0] + accepted, self._done[1] + rejected


class _Active:
    """``progress=ACTIVE``: report to the reporter made active (:func:`active`) when the
    compiled solve runs. A compiled eager solve is kept for all its calls, each with its
    own bar, so the bar cannot be a constant of the compiled program."""

    def __repr__(self):
        return "odecore.ode.progress.ACTIVE"

    def begin(self, *args):
        if _current is not None:
            _current.begin(*args)

    def report_when_due(self, *args):
        if _current is not None:
            _current.report_when_due(*args)

    def end(self, *args):
        if _current is not None:
            _current.end(*args)

    def close(self):
        if _current is not None:
            _current.close()


ACTIVE = _Active()
_current: Reporter | None = None


@contextlib.contextmanager
def active(reporting: Reporter | None):
    """Make ``reporting`` the one ``ACTIVE`` reports to while a compiled solve runs."""
    global _current
    before, _current = _current, reporting
    try:
        yield
    finally:
        _current = before


def static(reporting) -> _Active | None:
    """What a compiled solve's key and program hold of ``reporting``: whether there is one."""
    return None if reporting is None else ACTIVE


def compiled_reporting(progress, arguments: dict):
    """The reporter of a solve that may run compiled, for ``progress=``: ``arguments`` (the
    compiled solve's static configuration) records whether there is one, and it is the
    active one while the block runs the compiled solve."""
    if (progress is None or progress is False) and _current is None:
        # The usual solve: nothing to report and no reporter to hide from it. Two
        # generator-based contexts would cost a short solve several microseconds.
        arguments["progress"] = None
        return _NO_REPORTING
    return _reporting(progress, arguments)


_NO_REPORTING = contextlib.nullcontext(None)


@contextlib.contextmanager
def _reporting(progress, arguments: dict):
    reporting = reporter(progress)
    arguments["progress"] = static(reporting)
    with active(reporting):
        yield reporting


# The loop's side -----------------------------------------------------------------------------


def run_reported(problem, cond, body, state, reporting):
    """``problem.backend.while_loop(cond, body, state)``, reporting progress to
    ``reporting`` after every step: directly on an eager backend, through the backend's
    host callback (``Tracing.host_callback``) under tracing."""
    bk = problem.backend
    ts, direction = problem.ts, problem.direction
    if bk.eager:
        reporting.begin(float(ts[0]), float(ts[-1]), float(direction))
        try:
            state = bk.while_loop(cond, _eager_body(problem, body, reporting), state)
            reporting.end(*summary(problem, state))
        finally:
            reporting.close()
        return state
    host = bk.tracing.host_callback
    host(_host_begin(reporting), ts[0], ts[-1], direction)

    def reported(state):
        state = body(state)
        host(_host(reporting.report_when_due), *summary(problem, state))
        return state

    state = bk.while_loop(cond, reported, state)
    host(_host(reporting.end), *summary(problem, state))
    return state


def report_no_steps(bk, t0, reporting) -> None:
    """Report a solve with a single output time, which ends at ``t0`` with no step: one
    update with ``t0`` and no steps, then the close, as at the end of any solve. A bar's
    total is then the zero span, and its position reaches it. Eagerly on an eager
    backend, through the backend's host callback on a tracing one (each run of a jitted
    solve reports)."""
    if bk.eager:
        t0 = float(t0)
        try:
            reporting.begin(t0, t0, 1.0)
            reporting.report(t0, 0, 0, math.nan)
        finally:
            reporting.close()
        return
    host = bk.tracing.host_callback
    host(_host_begin(reporting), t0, t0, 1.0)
    host(_host(reporting.end), t0, 0, 0, math.nan)


def _eager_body(problem, body, reporting):
    def reported(state):
        state = body(state)
        # Asked before the summary is made: most steps report nothing.
        if reporting.due():
            reporting.report(*summary(problem, state))
        return state

    return reported


def _host_begin(reporting):
    """``reporting.begin`` for a host callback (arguments arrive as arrays; batched ones
    under ``vmap``)."""

    def call(t0, t1, direction):
        return reporting.begin(np.min(t0), np.max(t1), np.ravel(direction)[0])

    return call


def _host(method):
    """``method(t, accepted, rejected, dt)`` for a host callback: under ``vmap`` the
    arguments are batched, and the least time and the summed counts are reported."""

    def call(t, accepted, rejected, dt):
        return method(np.min(t), np.sum(accepted), np.sum(rejected), np.min(dt))

    return call


def summary(problem, state):
    """The least time reached by the samples still running (once none is, the furthest
    reached), the accepted and rejected steps of all samples, and the least proposed step:
    host numbers on an eager backend, 0-d arrays under tracing. A sample that has stopped (a
    failure, a terminal event, an invalid input that never ran) does not hold the bar at
    its time: a finished batch with one invalid sample read 0%."""
    if problem.ops.scalar:
        return state.t, state.naccept, state.nreject, state.dt
    xp = problem.backend.xp
    t = time_reached(xp, state.status, state.t)
    return t, xp.sum(state.naccept), xp.sum(state.nreject), xp.min(state.dt)


def time_reached(xp, status, t):
    """The time a batch has reached, from its samples' ``status`` and (internal, increasing)
    times ``t``: the least over the samples still running, or once none is, the furthest
    reached. Every backend's report of a batch takes its time from here, the numba
    backend's watched kernel (``adapters/numba_watch``) included."""
    running = status == RUNNING
    return xp.where(xp.any(running), xp.min(xp.where(running, t, math.inf)), xp.max(t))


# Targets ---------------------------------------------------------------------------------


class _Display:
    """A target odecore makes or adapts, told the solve's time span when it starts."""

    def begin(self, t0: float, t1: float) -> None:
        raise NotImplementedError


class _TqdmDisplay(_Display):
    """A tqdm bar whose total is ``|t1 - t0|`` and whose position is the time travelled."""

    FORMAT = "{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]"

    def __init__(self, bar, make_bar=None):
        # progress=True: the bar is made when a solve starts (and anew for each run of a
        # jitted solve), so that a call that fails its checks draws none.
        self.bar, self.make_bar = bar, make_bar

    def begin(self, t0, t1):
        self.t0 = t0
        if self.make_bar is not None:
            self.bar = self.make_bar(total=abs(t1 - t0), bar_format=self.FORMAT)
        else:
            self.bar.reset(total=abs(t1 - t0))
            self.bar.bar_format = self.FORMAT

    def update(self, t, accepted, rejected, note):
        postfix = f"t={t:.6g}, accepted={accepted}, rejected={rejected}"
        self.bar.set_postfix_str(f"{postfix}, {note}" if note else postfix, refresh=False)
        self.bar.update(abs(t - self.t0) - self.bar.n)

    def close(self):
        self.bar.close()
        if self.make_bar is not None:
            self.bar = None


class _TextLine(_Display):
    """Without tqdm: one line on ``stream`` every ``TEXT_INTERVAL`` seconds and at the end,
    rewritten in place on a terminal."""

    def __init__(self, stream):
        self.stream = stream
        self.last: str | None = None
        self.pending = False
        self._written = 0.0

    def begin(self, t0, t1):
        self.t0, self.span = t0, abs(t1 - t0)

    def update(self, t, accepted, rejected, note):
        done = abs(t - self.t0) / self.span if self.span else 1.0
        self.last = f"odecore: t={t:.6g} ({done:.0%}), accepted={accepted}, rejected={rejected}"
        if note:
            self.last += f", {note}"
        self.pending = True
        if time.monotonic() - self._written >= TEXT_INTERVAL:
            self._write(self.last)

    def close(self):
        if self.pending:
            self._write(self.last)
        if self._interactive():
            self.stream.write("\n")
        self.stream.flush()

    def _write(self, line: str) -> None:
        self._written, self.pending = time.monotonic(), False
        self.stream.write(f"\r{line}" if self._interactive() else f"{line}\n")
        self.stream.flush()

    def _interactive(self) -> bool:
        isatty: Any = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())
