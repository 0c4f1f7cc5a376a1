"""A compiled solve watched from Python while it runs: the numba backend's ``progress=``.

The kernel loop compiled watched (``odecore.kernels.loop.WATCHED``) publishes, after every
step, the time reached, the next step and its counts in a row of a float64 array, and stops
when the row's ``WATCH_STOP`` entry is set. :func:`run_watched` calls the kernel in a worker
thread (the kernel is compiled ``nogil``, so it runs while the calling thread holds the
interpreter) and reads the rows a few times a second for the reporter. A ``KeyboardInterrupt``
while it waits sets ``WATCH_STOP``, so that Ctrl-C ends a long compiled solve.

The kernel's stores and the stop flag's load are atomic, with relaxed ordering
(``numba_atomics``): plain ones the compiler may keep in registers for the whole loop.
"""

from __future__ import annotations

import threading

import numpy as np
from odecore.adapters.numba_atomics import relaxed_load, relaxed_store

from odecore.control.rules import RUNNING
from odecore.kernels import loop
from odecore.ode import progress as progress_reports


def publish(watch, index, value):
    """``loop.publish`` of a watched kernel."""
    relaxed_store(watch, index, float(value))


def watched_value(watch, index):
    """``loop.watched_value`` of a watched kernel."""
    return relaxed_load(watch, index)


# What a watched kernel binds in place of the loop's plain accesses.
REPLACEMENTS = {"publish": publish, "watched_value": watched_value}


def watch_rows(count: int, t0: float) -> np.ndarray:
    """The watch rows of ``count`` trajectories before they start: running, at ``t0``, no
    steps."""
    watch = np.zeros((count, loop.WATCH_STRIDE))
    watch[:, loop.WATCH_T] = t0
    watch[:, loop.WATCH_DT] = np.nan
    watch[:, loop.WATCH_STATUS] = RUNNING
    return watch


def summary(watch: np.ndarray) -> tuple[float, int, int, float]:
    """What the reporter takes from the rows: the time reached (``progress.time_reached``,
    the rule of every backend: the least over the trajectories still running), the summed
    counts and the least proposed step (NaN before any step)."""
    # Copied whole first: the kernel keeps stepping while they are read, and one copy of a
    # row sees its time and its counts at most a step apart, where reading the columns one
    # reduction after another saw them hundreds of steps apart.
    watch = watch.copy()
    dt = watch[:, loop.WATCH_DT]
    finite = dt[np.isfinite(dt)]
    return (
        float(
            progress_reports.time_reached(np, watch[:, loop.WATCH_STATUS], watch[:, loop.WATCH_T])
        ),
        int(watch[:, loop.WATCH_ACCEPTED].sum()),
        int(watch[:, loop.WATCH_REJECTED].sum()),
        float(finite.min()) if finite.size else float("nan"),
    )


COMPILING = "compiling the kernel (or loading it from the disk cache)"


def run_watched(
    call,
    watch: np.ndarray,
    reporting,
    t0: float,
    t1: float,
    direction: float,
    compiles: bool = False,
):
    """``call()`` (a watched kernel writing ``watch``) run in a worker thread while this one
    reports its rows to ``reporting`` every ``REPORT_INTERVAL`` seconds; returns what the
    call returns. ``compiles``: the call compiles the kernel first (seconds to a minute),
    and the reports say so until the first step is published. The reporter is told the end
    from the final rows and closed, also when the call raises. Ctrl-C stops the kernel
    after its current step and is raised here."""
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="odecore-numba-solve", daemon=True)
    reporting.begin(t0, t1, direction)
    try:
        worker.start()
        try:
            while True:
                worker.join(progress_reports.REPORT_INTERVAL)
                if not worker.is_alive():
                    break
                state = summary(watch)
                # No step published yet (every proposed step still NaN): still compiling.
                compiling = compiles and not np.isfinite(state[3])
                reporting.report(*state, note=COMPILING if compiling else "")
        except KeyboardInterrupt:
            watch[:, loop.WATCH_STOP] = 1.0
            worker.join()
            raise
        if "error" in outcome:
            raise outcome["error"]
        reporting.report(*summary(watch))
    finally:
        reporting.close()
    return outcome["value"]
