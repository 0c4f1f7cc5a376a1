"""The threads a batch's compiled solve runs on: Python threads, each calling a kernel
compiled ``nogil`` that takes ranges of the batch from a shared counter until none is left.

Numba's own parallel loop (``parallel=True`` with ``prange``) would do the same, at a cost:
its loop is lowered into a generated function, which took 2 to 3 of the 11 to 13 seconds
a batch's kernel took to compile, on top of the lanes' loop that it calls anyway.
Its threading layers have sharp edges too: with the ``workqueue`` layer (the one every
Numba install has) two threads running parallel kernels at once abort the process, and
with the OpenMP layer a child forked after a parallel kernel ran is killed
("fork() called from a process already using GNU OpenMP"). Here the threads are Python's,
and the ranges are handed out inside the compiled code, by an atomic counter
(:func:`take_range`), to whichever thread is free: a thread that starts late or draws costly
trajectories takes fewer, and no range costs a call from Python.

What Numba's threads did better is to wait spinning, so that the next parallel loop starts
at once: a pool thread here takes 20 to 40 us to wake. The calling thread takes ranges as
soon as it has woken the others, and then spins, outside the interpreter's lock, until the
last range is done (:func:`_wait_done`), for up to about a millisecond before it sleeps.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from odecore.adapters.numba_atomics import fetch_increment, ordered_load

# Polls of the done count before the calling thread sleeps instead (each a load and a
# compare, about a nanosecond: a millisecond or so).
SPINS = 1 << 20

# Entries of a run's counter (int64): the next range to hand out, and how many are done.
NEXT, DONE = 0, 1


def threads() -> int:
    """How many threads a batch runs on: Numba's setting (``NUMBA_NUM_THREADS``, or
    ``numba.set_num_threads`` in this thread)."""
    return numba.get_num_threads()


def counter() -> np.ndarray:
    """A fresh counter for one run of a kernel over ranges (entries :data:`NEXT`,
    :data:`DONE`)."""
    return np.zeros(2, dtype=np.int64)


def run(call, ranges: int, shared: np.ndarray, count: int | None = None) -> None:
    """``call()`` on up to ``count`` threads (default :func:`threads`), the calling thread
    among them, where ``call`` runs a kernel compiled ``nogil`` that takes ranges (out of
    ``ranges``) with :func:`take_range` on the counter ``shared`` and counts each it
    finishes with :func:`range_done`. Returns once every range is done; an exception
    raised in a range, by any of the threads, is raised here once the others are back, so
    that none still writes the results. Helper threads that are busy (with another
    thread's batch) are not waited for: the calling thread takes the ranges they would
    have taken."""
    count = min(threads() if count is None else count, ranges)
    helpers = _free_helpers(count - 1) if count > 1 else []
    for helper in helpers:
        helper.start(call)
    try:
        call()
        done = not helpers or _wait_done(shared, ranges, SPINS)
    except BaseException:
        for helper in helpers:
            helper.join()
        raise
    if not done:
        errors = [error for error in (helper.join() for helper in helpers) if error]
        if shared[DONE] < ranges:
            # A helper failed inside a range (its allocations, say), which no other
            # thread takes again.
            raise errors[0] if errors else RuntimeError("a batch's kernel left ranges unsolved")


class _Helper:
    """A thread that runs one call at a time, woken by the release of a lock (a
    ``concurrent.futures`` pool took 20 us to hand over a call, longer than the call
    itself for a small batch). ``busy`` is held from :func:`_free_helpers` until the call
    is done."""

    def __init__(self):
        self.busy = threading.Lock()
        self.busy.acquire()
        self._go = threading.Lock()
        self._go.acquire()
        self._call = None
        self._error: BaseException | None = None
        threading.Thread(target=self._serve, name="odecore-numba", daemon=True).start()

    def start(self, call) -> None:
        self._call, self._error = call, None
        self._go.release()

    def join(self) -> BaseException | None:
        """Wait for the call to end; what it raised, if anything."""
        with self.busy:
            return self._error

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            call, self._call = self._call, None
            try:
                call()
            except BaseException as exc:
                # Raised where the calling thread learns that ranges were left unsolved;
                # an error before the first range (compiling, say) reaches it from its own
                # call of the same kernel.
                self._error = exc
            finally:
                self.busy.release()


_helpers: list[_Helper] = []
_helpers_lock = threading.Lock()


def _free_helpers(count: int) -> list[_Helper]:
    """Up to ``count`` helpers that are free, each marked busy: idle ones first, and new
    ones while the process has fewer than ``NUMBA_NUM_THREADS - 1``."""
    taken = []
    with _helpers_lock:
        for helper in _helpers:
            if len(taken) == count:
                break
            if helper.busy.acquire(blocking=False):
                taken.append(helper)
        while len(taken) < count and len(_helpers) < numba.config.NUMBA_NUM_THREADS - 1:
            _helpers.append(_Helper())
            taken.append(_helpers[-1])
    return taken


def _forget_helpers() -> None:
    # A forked child has none of its parent's threads, and the parent's locks may have
    # been held at the fork.
    global _helpers_lock
    _helpers.clear()
    _helpers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_helpers)


@numba.njit(_nrt=False, forceinline=True)
def take_range(shared):
    """The next range for this thread: its index, or one past the last when none is
    left."""
    return fetch_increment(shared, NEXT)


@numba.njit(_nrt=False, forceinline=True)
def range_done(shared):
    """Count a range this thread has finished."""
    fetch_increment(shared, DONE)


@numba.njit(nogil=True, _nrt=False, cache=True)
def _wait_done(shared, ranges, spins):
    for _ in range(spins):
        if ordered_load(shared, DONE) >= ranges:
            return True
    return False
