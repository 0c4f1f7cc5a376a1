"""Ensembles on the GPU: one thread per trajectory, each running the whole adaptive solve.

This is the kernel loop of the numba backend (``odecore.kernels.loop``, with the method's
sums written out by ``odecore.kernels.specialize``) compiled for the device by numba-cuda:
every function becomes a ``numba.cuda.jit(device=True)`` function and one global kernel
runs :func:`~odecore.kernels.loop.solve_trajectory` for the trajectory of its thread. So
the GPU takes the steps the CPU kernel and the generic loop take; there is no second copy
of the algorithm. The arguments are the CPU kernel's (``adapters.numba.kernel_inputs``);
the work rows, which a device function cannot allocate, are allocated for all threads at
once.

The dynamics must be written in place, ``f(t, y, dy, params)``, in the subset numba-cuda
compiles (scalar arithmetic and ``math``: no array creation). The arrays may be NumPy
arrays (copied to the device and back) or device arrays (CuPy's, through
``__cuda_array_interface__``).

Without a GPU, numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``, set before Numba is
imported) runs the same kernel in Python threads: tests/test_cuda_ensemble.py checks there
that it gives the CPU kernel's results.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
from numba import cuda
from odecore.adapters.numba import (
    _STATS,
    FORMS,
    NumbaBackend,
    _positional_count,
    ensemble_result,
    kernel_inputs,
)
from odecore.adapters.numba import solve as numba_solve

from odecore.control.primitives import bind
from odecore.kernels import loop
from odecore.kernels.compile import compiled_loop, compiled_rules
from odecore.kernels.specialize import specialized
from odecore.kernels.tableau import DENSE_STAGES, kernel_tableau
from odecore.ode.loop import LoopResult

THREADS_PER_BLOCK = 64

_rules: dict | None = None
_kernels: dict = {}


def _device(fn):
    return cuda.jit(device=True)(fn)


def _device_rules() -> dict:
    global _rules
    if _rules is None:
        _rules = compiled_rules(_device)
    return _rules


def _ensemble(
    y0,
    params,
    shared,
    ts,
    stops,
    jumps,
    rtol,
    atol,
    parts,
    valid,
    a,
    c,
    b,
    dense,
    dense_a,
    dense_c,
    sizes,
    settings,
    out,
    work,
    weights,
    status,
    t_reached,
    dt_next,
    stats,
    watch,
    tape_times,
    tape_y,
):
    """One trajectory per thread; the arrays are :func:`solve`'s."""
    n = cuda.grid(1)
    if n >= y0.shape[0]:
        return
    own = params[0] if shared else params[n]
    tab = (a, c, b, dense, dense_a, dense_c, sizes)
    s, t, dt = solve_trajectory(  # noqa: F821  (bound per dynamics)
        y0[n],
        own,
        ts,
        stops,
        jumps,
        rtol[n],
        atol[n],
        parts,
        valid[n],
        tab,
        settings,
        out[n],
        work[n],
        weights[n],
        stats[n],
        watch[n],
        tape_times,
        tape_y,
    )
    status[n] = s
    t_reached[n] = t
    dt_next[n] = dt


def _kernel(func, tableau, dtype: str) -> SimpleNamespace:
    """The global kernel for ``func`` under ``tableau``'s method for states of ``dtype``,
    compiled once per triple."""
    key = (func, tableau.name, dtype)
    kernel = _kernels.get(key)
    if kernel is None or kernel.tableau is not tableau:
        if _positional_count(func, FORMS) != 4:
            raise TypeError(
                "a GPU ensemble needs the dynamics in place, f(t, y, dy, params), in the "
                "subset numba-cuda compiles (scalar arithmetic and math, no array creation)"
            )
        dynamics = _device(getattr(func, "py_func", func))
        arrays = kernel_tableau(tableau)
        sums = specialized(tableau.name, arrays)
        functions = compiled_loop(_device, _device_rules(), dynamics, sums, state_dtype=dtype)
        bound = bind(_ensemble, {"solve_trajectory": functions.solve_trajectory})
        kernel = _kernels[key] = SimpleNamespace(
            tableau=tableau, arrays=arrays, launch=cuda.jit(bound)
        )
    return kernel


def solve(problem, options) -> LoopResult:
    """A batch (``batch_axis=0``, ``y0`` of shape (N, D)) solved one trajectory per GPU
    thread; the result is the CPU kernel's."""
    inputs = kernel_inputs(problem, options)
    if not inputs.batched:
        raise ValueError(
            "the GPU ensemble solves a batch: y0 of shape (N, D) with batch_axis=0; solve a "
            "single trajectory on the CPU (backend='numba')"
        )
    if not cuda.is_available():
        raise RuntimeError(
            "the GPU ensemble needs a CUDA device, and numba-cuda finds none here; solve the "
            "batch on the CPU with backend='numba', or run the kernel under numba-cuda's "
            "simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported)"
        )
    kernel = _kernel(problem.dynamics.user_func, problem.solver.tableau, inputs.y0.dtype.name)
    tab = kernel.arrays
    y0 = inputs.y0
    rows, size = y0.shape
    dtype = y0.dtype
    out = np.full((rows, len(inputs.ts), size), math.nan, dtype=dtype)
    work = np.empty((rows, loop.work_rows(tab.sizes), size), dtype=dtype)
    weights = np.empty((rows, 1, tab.sizes[DENSE_STAGES]))
    status = np.empty(rows, dtype=np.int64)
    t_reached = np.empty(rows)
    dt_next = np.empty(rows)
    stats = np.zeros((rows, len(_STATS)), dtype=np.int64)
    # The kernel is compiled unwatched (loop.WATCHED = 0): it never touches these rows.
    watch = np.empty((rows, 1))
    # Nor does it keep a tape: it has no rows (the checkpoint gradient runs on the CPU).
    tape_times = np.empty((0, loop.TAPE_COLUMNS))
    tape_y = np.empty((0, size), dtype=dtype)
    shared = inputs.params.shape[0] == 1 and rows > 1
    blocks = (rows + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    kernel.launch[blocks, THREADS_PER_BLOCK](
        y0,
        inputs.params,
        shared,
        inputs.ts,
        inputs.stops,
        inputs.jumps,
        inputs.rtol,
        inputs.atol,
        inputs.parts,
        inputs.valid,
        *tab,
        inputs.settings,
        out,
        work,
        weights,
        status,
        t_reached,
        dt_next,
        stats,
        watch,
        tape_times,
        tape_y,
    )
    return ensemble_result(problem, out, status, t_reached, dt_next, stats)


def _solve(problem, options, progress=None) -> LoopResult:
    if not problem.layout.batched:
        return numba_solve(problem, options, progress)
    if progress is not None:
        # The launch returns when every thread has finished; nothing comes back before.
        raise ValueError(
            "progress= is not available for a batch on the 'numba-cuda' backend, whose GPU "
            "kernel reports nothing until every trajectory ends; solve the batch with "
            "backend='numba' to watch it on the CPU"
        )
    return solve(problem, options)


class CudaEnsembleBackend(NumbaBackend):
    """The numba backend with batches solved on the GPU, one trajectory per thread (a single
    trajectory stays on the CPU kernel). Pass ``backend=BACKEND`` to ``odecore.solve`` or
    ``odecore.odeint``."""

    name = "numba-cuda"
    kernels = replace(NumbaBackend.kernels, solve=_solve)


BACKEND = CudaEnsembleBackend()
