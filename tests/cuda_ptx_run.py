"""Run by tests/test_cuda_ensemble.py in a process of its own: every GPU ensemble kernel
compiled to PTX for a Hopper GPU by numba-cuda, with no device present. The simulator runs
the kernel's Python as Python and so cannot see what only the device compiler refuses (a
local array whose shape is not made of integer literals failed on a device this way); this
types and lowers the kernel as a device would. Prints one line per kernel; exits non-zero
if one fails.

numba-cuda asks the current device for its compute capability when it compiles a device
function; with no device, that answer is given here (9.0), the only change to numba-cuda.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import numba
import numba.cuda.dispatcher as dispatcher
import numpy as np
from numba import cuda

import odecore

CC = (9, 0)
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)

from kernel_dynamics import chain  # noqa: E402
from kernel_dynamics import lorenz_in_place as lorenz  # noqa: E402
from odecore.adapters import cuda_ensemble  # noqa: E402


class _Prepared(Exception):
    pass


def prepared(backend, dtype, settings, func=lorenz):
    def capture(problem, options, *args, **kwargs):
        raise _Prepared(problem, options)

    backend.kernels = replace(backend.kernels, solve=capture)
    if func is chain:
        y0, params = np.ones((4, 20), dtype=dtype), np.ones((4, 1), dtype=dtype)
    else:
        y0 = np.tile(np.array([1.0, 0.0, 0.0], dtype=dtype), (4, 1))
        params = np.tile(np.array([10.0, 28.0, 8.0 / 3.0], dtype=dtype), (4, 1))
    t = np.array([0.0, 0.5, 1.0], dtype=dtype)
    try:
        odecore.solve(func, y0, t, params=params, batch_axis=0, backend=backend, **settings)
    except _Prepared as prepared:
        return prepared.args
    raise AssertionError("the solve did not reach the kernel")


def main() -> int:
    failed = 0
    runs = {
        "tsit5": {"method": "tsit5", "rtol": 1e-6, "atol": 1e-6},
        "tsit5-fixed": {"method": "tsit5", "options": {"step_size": 1e-3}},
        "dopri8": {"method": "dopri8", "rtol": 1e-6, "atol": 1e-6},
        "chain20": {"method": "tsit5", "rtol": 1e-6, "atol": 1e-6, "func": chain},
    }
    for scratch in cuda_ensemble.SCRATCH:
        for dtype in (np.float32, np.float64):
            for name, settings in runs.items():
                backend = cuda_ensemble.CudaEnsembleBackend(scratch)
                settings = dict(settings)
                func = settings.pop("func", lorenz)
                problem, options = prepared(backend, dtype, settings, func)
                kernel, arguments, _ = cuda_ensemble._arguments(
                    problem, options, scratch, np.empty, np.asarray
                )
                signature = tuple(numba.typeof(argument) for argument in arguments)
                label = f"{scratch} {np.dtype(dtype).name} {name}"
                try:
                    ptx, _ = cuda.compile_ptx(kernel.launch.py_func, signature, cc=CC)
                except Exception as exc:  # report every kernel, then fail
                    failed += 1
                    print(f"{label}: FAILED {type(exc).__name__}: {exc}")
                    continue
                print(f"{label}: {len(ptx)} characters of PTX, entry present: {'.entry' in ptx}")
                failed += ".entry" not in ptx
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
