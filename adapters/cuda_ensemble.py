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
from functools import partial
from types import SimpleNamespace

import numba
import numpy as np
from numba import cuda
from odecore.adapters.numba import (
    _STATS,
    FORMS,
    MAX_UNROLLED_SIZE,
    NumbaBackend,
    _check_bounds,
    _positional_count,
    _user_dispatcher,
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

# Where each thread keeps its work rows (the state, the stages, the error):
# - "global": one device array, row n for thread n, as the CPU kernel keeps them. A warp's
#   accesses are a row apart, one memory transaction per thread, and the kernel is bound by
#   memory: on an H200, 1.46e9 trajectory-steps per second for tsit5 on Lorenz.
# - "interleaved": one device array with the trajectory last, so that a warp's 32 threads
#   touch 32 neighbouring elements at once.
# - "local": arrays of the thread's own (cuda.local.array), sized when the kernel is
#   compiled for one state size; the hardware interleaves them as above, caches them, and
#   small ones can live in registers.
# "global" is the default: it is the one measured on a device so far (benchmarks/bench_gpu.py
# times all three).
SCRATCH = ("global", "interleaved", "local")
DEFAULT_SCRATCH = "global"

_rules: dict | None = None
_kernels: dict = {}


def _device(fn):
    return cuda.jit(device=True)(fn)


def _device_rules() -> dict:
    global _rules
    if _rules is None:
        _rules = compiled_rules(_device)
    return _rules


def _start(n, out):
    """Thread ``n``'s output rows, NaN until reached: a row the solve does not reach says so,
    without a host array of NaNs copied to the device first."""
    for k in range(out.shape[1]):
        for i in range(out.shape[2]):
            out[n, k, i] = math.nan


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
    """One trajectory per thread; the arrays are :func:`_arguments`'. Where the thread keeps
    its work rows is decided when the kernel is compiled (bound constants, so that the
    compiler drops the branches not taken): ``work[n]`` ("global"), ``work[:, :, n]``
    ("interleaved"), or arrays of its own ("local", ``work`` and ``weights`` unused)."""
    n = cuda.grid(1)
    if n >= y0.shape[0]:
        return
    _start(n, out)  # noqa: F821  (bound)
    if OWN_ARRAYS:  # noqa: F821  (bound per kernel, like the names below)
        # numba-cuda sizes these from integer literals only: the bound names are Python ints.
        own_work = cuda.local.array((WORK_ROWS, STATE_SIZE), STATE_DTYPE)  # noqa: F821
        own_weights = cuda.local.array((1, DENSE_STAGE_COUNT), float64)  # noqa: F821
    elif INTERLEAVED:  # noqa: F821
        own_work = work[:, :, n]
        own_weights = weights[:, :, n]
    else:
        own_work = work[n]
        own_weights = weights[n]
    own = params[0] if shared else params[n]
    tab = (a, c, b, dense, dense_a, dense_c, sizes)
    s, t, dt = solve_trajectory(  # noqa: F821  (bound per dynamics)
        y0[n],
        own,
        ts,
        stops,
        jumps,
        rtol[0] if rtol.shape[0] == 1 else rtol[n],
        atol[0] if atol.shape[0] == 1 else atol[n],
        parts,
        valid[n],
        tab,
        settings,
        out[n],
        own_work,
        own_weights,
        stats[n],
        watch[n],
        tape_times,
        tape_y,
    )
    status[n] = s
    t_reached[n] = t
    dt_next[n] = dt


def _kernel(func, tableau, dtype: str, size: int, scratch: str) -> SimpleNamespace:
    """The global kernel for ``func`` under ``tableau``'s method for states of ``size``
    elements in ``dtype``, keeping its work rows as ``scratch`` says; compiled once per
    configuration."""
    key = (func, tableau.name, tableau.adaptive, dtype, size, scratch)
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
        # Small states have their size fixed per kernel, as on the CPU, so that loops over
        # elements unroll; a thread's own arrays (below) have their size fixed for any state.
        unrolled = size if size <= MAX_UNROLLED_SIZE else 0
        functions = compiled_loop(
            _device, _device_rules(), dynamics, sums, state_size=unrolled, state_dtype=dtype
        )
        names = {
            "solve_trajectory": functions.solve_trajectory,
            "_start": _device(_start),
            "OWN_ARRAYS": scratch == "local",
            "INTERLEAVED": scratch == "interleaved",
            # Python ints: numba-cuda reads NumPy integers as variables, not literals.
            "WORK_ROWS": int(loop.work_rows(arrays.sizes)),
            "STATE_SIZE": int(size),
            "DENSE_STAGE_COUNT": int(arrays.sizes[DENSE_STAGES]),
            "STATE_DTYPE": numba.from_dtype(np.dtype(dtype)),
            "float64": numba.float64,
        }
        kernel = _kernels[key] = SimpleNamespace(
            tableau=tableau, arrays=arrays, launch=cuda.jit(bind(_ensemble, names))
        )
    return kernel


def _arguments(problem, options, scratch: str, empty, send):
    """The kernel for ``problem`` and its arguments: the inputs passed through ``send``, the
    outputs and scratch made by ``empty(shape, dtype)``. Returns ``(kernel, arguments,
    outputs)``, the outputs by name as :func:`ensemble_result` takes them."""
    if scratch not in SCRATCH:
        raise ValueError(f"scratch must be one of {SCRATCH}, not {scratch!r}")
    inputs = kernel_inputs(problem, options)
    if not inputs.batched:
        raise ValueError(
            "the GPU ensemble solves a batch: y0 of shape (N, D) with batch_axis=0; solve a "
            "single trajectory on the CPU (backend='numba')"
        )
    y0 = inputs.y0
    rows, size = y0.shape
    dtype = y0.dtype
    kernel = _kernel(problem.dynamics.user_func, problem.solver.tableau, dtype.name, size, scratch)
    tab = kernel.arrays
    if scratch == "local":
        # Unused: the kernel keeps its rows in arrays of each thread's own.
        work, weights = empty((1, 1, size), dtype), empty((1, 1, 1), np.float64)
    elif scratch == "interleaved":
        work = empty((loop.work_rows(tab.sizes), size, rows), dtype)
        weights = empty((1, tab.sizes[DENSE_STAGES], rows), np.float64)
    else:
        # Scratch lives and dies on the device: nothing is copied either way.
        work = empty((rows, loop.work_rows(tab.sizes), size), dtype)
        weights = empty((rows, 1, tab.sizes[DENSE_STAGES]), np.float64)
    outputs = {
        "out": empty((rows, len(inputs.ts), size), dtype),
        "status": empty(rows, np.int64),
        "t_reached": empty(rows, np.float64),
        "dt_next": empty(rows, np.float64),
        "stats": empty((rows, len(_STATS)), np.int64),
    }
    arguments = (
        send(y0),
        send(inputs.params),
        inputs.params.shape[0] == 1 and rows > 1,
        send(inputs.ts),
        send(inputs.stops),
        send(inputs.jumps),
        send(inputs.rtol),
        send(inputs.atol),
        send(inputs.parts),
        send(inputs.valid),
        *(send(np.ascontiguousarray(array)) for array in tab),
        send(inputs.settings),
        outputs["out"],
        work,
        weights,
        outputs["status"],
        outputs["t_reached"],
        outputs["dt_next"],
        outputs["stats"],
        # The kernel is compiled unwatched (loop.WATCHED = 0): it never touches these rows;
        # nor does it keep a tape (the checkpoint gradient runs on the CPU).
        empty((rows, 1), np.float64),
        empty((0, loop.TAPE_COLUMNS), np.float64),
        empty((0, size), dtype),
    )
    return kernel, arguments, outputs


class Launch:
    """One ensemble's kernel launch, its arrays on the device: :meth:`run` solves (again),
    :meth:`result` copies the solution back. :func:`solve` is ``Launch`` then both; a
    benchmark times ``run`` alone, as the solve of arrays that already live on the device."""

    def __init__(self, problem, options, scratch: str = DEFAULT_SCRATCH):
        if not cuda.is_available():
            raise RuntimeError(
                "the GPU ensemble needs a CUDA device, and numba-cuda finds none here; solve "
                "the batch on the CPU with backend='numba', or run the kernel under "
                "numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported)"
            )
        self.problem = problem
        self.kernel, self.arguments, self.outputs = _arguments(
            problem,
            options,
            scratch,
            lambda shape, dtype: cuda.device_array(shape, dtype=dtype),
            cuda.to_device,
        )
        rows = self.outputs["status"].shape[0]
        self.blocks = (rows + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK

    def run(self) -> None:
        """Launch the kernel; it runs on while the host goes on (numba-cuda's default
        stream), until :meth:`result` or a synchronisation waits for it."""
        self.kernel.launch[self.blocks, THREADS_PER_BLOCK](*self.arguments)

    def result(self) -> LoopResult:
        host = {name: array.copy_to_host() for name, array in self.outputs.items()}
        return ensemble_result(self.problem, **host)


def solve(problem, options, scratch: str = DEFAULT_SCRATCH) -> LoopResult:
    """A batch (``batch_axis=0``, ``y0`` of shape (N, D)) solved one trajectory per GPU
    thread; the result is the CPU kernel's."""
    launch = Launch(problem, options, scratch)
    launch.run()
    return launch.result()


def _solve(problem, options, progress=None, record=False, scratch=DEFAULT_SCRATCH) -> LoopResult:
    if record or not problem.layout.batched:
        # A single trajectory has one thread's work: the CPU kernel does it sooner. A
        # gradient's forward keeps the checkpoint tape, which the CPU kernel replays.
        return numba_solve(problem, options, progress, record)
    _check_bounds_on_the_cpu(problem, options)
    if progress is not None:
        # The launch returns when every thread has finished; nothing comes back before.
        raise ValueError(
            "progress= is not available for a batch on the 'numba-cuda' backend, whose GPU "
            "kernel reports nothing until every trajectory ends; solve the batch with "
            "backend='numba' to watch it on the CPU"
        )
    return solve(problem, options, scratch)


# (func, state size, parameters per trajectory, dtype) already checked.
_checked: set = set()


def _check_bounds_on_the_cpu(problem, options) -> None:
    """A GPU thread does not check indices either: a ``func`` that reads ``params`` past
    their end would solve on with garbage. The CPU kernel's check of its reads and writes
    (``numba._check_bounds``), on the CPU compilation of ``func``, once per function and
    sizes, before any device is needed. A function the CPU does not compile or that fails
    at ``y0`` on the CPU is left to the GPU kernel."""
    func, lay = problem.dynamics.user_func, problem.layout
    # Keyed before kernel_inputs, which the launch makes again: a large batch's per-element
    # tolerances are hundreds of megabytes.
    key = (func, lay.size, np.shape(problem.dynamics.params)[-1:], lay.dtype)
    if key in _checked:
        return
    inputs = kernel_inputs(problem, options)
    y, params = inputs.y0[0], inputs.params[0]
    t = y.dtype.type(inputs.ts[0] * problem.direction)
    try:
        user = _user_dispatcher(func)
        user(t, y.copy(), np.empty_like(y), params)
    except Exception:
        _checked.add(key)
        return
    _check_bounds(user, "in place", t, y, params)
    _checked.add(key)


class CudaEnsembleBackend(NumbaBackend):
    """The numba backend with batches solved on the GPU, one trajectory per thread (a single
    trajectory stays on the CPU kernel). Pass ``backend=BACKEND`` to ``odecore.solve`` or
    ``odecore.odeint``; ``CudaEnsembleBackend(scratch="global")`` keeps the threads' work
    rows in one device array instead of their own (:data:`SCRATCH`)."""

    name = "numba-cuda"

    def __init__(self, scratch: str = DEFAULT_SCRATCH):
        if scratch not in SCRATCH:
            raise ValueError(f"scratch must be one of {SCRATCH}, not {scratch!r}")
        self.scratch = scratch
        self.kernels = replace(NumbaBackend.kernels, solve=partial(_solve, scratch=scratch))


BACKEND = CudaEnsembleBackend()
