"""Run by tests/test_progress.py in a process of its own: Ctrl-C (a simulated SIGINT) while a
watched numba kernel steps must stop the kernel after its current step and raise
KeyboardInterrupt, long before the solve could end; later solves must run. Prints one line
of results for the test to check."""

from __future__ import annotations

import _thread
import signal
import sys
import threading
import time

import numpy as np
from kernel_dynamics import lorenz_in_place

import odecore

LORENZ = np.array([10.0, 28.0, 8.0 / 3.0])


class Recorder:
    def __init__(self):
        self.closed = 0

    def update(self, t, accepted, rejected, note):
        pass

    def close(self):
        self.closed += 1


def main() -> int:
    # A shell starts a background command (`cmd &`, as a CI runner may) with SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: the simulated SIGINT would be
    # dropped before odecore could see it. The interactive disposition is restored, since
    # what is tested is odecore's answer to a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    kwargs = dict(params=LORENZ, backend="numba", method="rk4")
    # Compiled first, so that the interrupt lands while the kernel steps.
    odecore.solve(lorenz_in_place, np.ones(3), np.array([0.0, 1.0]), progress=Recorder(), **kwargs)
    # 1e10 steps of ~20 ns: minutes, were it not stopped.
    options = {"step_size": 1e-8, "max_num_steps": 10**11}
    recorder = Recorder()
    timer = threading.Timer(0.3, _thread.interrupt_main)
    start = time.monotonic()
    timer.start()
    interrupted = False
    try:
        odecore.solve(
            lorenz_in_place,
            np.ones(3),
            np.array([0.0, 100.0]),
            options=options,
            progress=recorder,
            **kwargs,
        )
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.monotonic() - start
    timer.join()
    later = odecore.solve(lorenz_in_place, np.ones(3), np.array([0.0, 1.0]), **kwargs)
    print(
        f"interrupted={interrupted} elapsed={elapsed:.3f} closed={recorder.closed} "
        f"later_success={later.success}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
