"""The Numba backend: whole solves compiled for the CPU, on NumPy arrays.

The dynamics are a function in Numba's nopython subset, in one of two forms, told apart by
their signature:

- returning, ``f(t, y, params) -> dy`` (or ``f(t, y)`` without ``params``);
- in place, numbalsoda's order, ``f(t, y, dy, params)``, which allocates nothing per call.

odecore compiles a plain function itself (``numba.njit``, cached on disk where Numba can);
an ``@numba.njit`` function is used as it is. ``t`` is a number, ``y`` and ``dy`` are 1-D
arrays of the state's dtype (a state of another shape is seen flattened; the outputs have
its shape), ``params`` a 1-D array. Everything else is the generic core's:
``odecore.ode.problem.prepare`` checks and converts the inputs, and the kernel loop
(``odecore.kernels.loop``), compiled with the dynamics bound in, runs the whole solve, so
Python does nothing per step.

Ensembles: with ``batch_axis=0`` and ``y0`` of shape (N, D), each trajectory runs the
kernel on its own, in parallel over the cores (``numba.prange``); ``f`` sees one
trajectory's (D,) state and its row of a (N, P) ``params``, or a shared (P,) ``params``.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numba
import numpy as np
from numba.core.errors import NumbaError
from odecore.adapters.numpy import BufferStages, NumpyBackend, _rms_error_ratio

from odecore import _validate
from odecore.backend import Kernels
from odecore.backend.layout import layout as make_layout
from odecore.control.primitives import bind
from odecore.kernels import loop
from odecore.kernels.compile import compiled_loop, compiled_rules
from odecore.kernels.tableau import DENSE_STAGES, kernel_tableau
from odecore.ode.solution import Solution

FORMS = (
    "f(t, y, params) -> dy (returning the rate), or f(t, y, dy, params) (writing it into dy, "
    "numbalsoda's order), in Numba's nopython subset"
)

_rules: dict | None = None
# Per dynamics and form: the compiled kernel functions. They live as long as the process, as
# Numba keeps every function it compiled (their dispatchers hold the dynamics anyway).
_kernels: dict = {}


def _jit(fn):
    return numba.njit(fn, cache=True)


def _jit_bound(fn):
    # A function bound to one dynamics shares its code, file and name with every other
    # binding: a disk cache would hand one dynamics' machine code to another. The loop's
    # helpers are inlined, so that the compiler can drop the reference counting of the rows
    # they pass on; the whole solve stays one function, which a single trajectory and the
    # ensemble's parallel loop both call.
    if fn.__name__ == "solve_trajectory":
        return numba.njit(fn)
    return numba.njit(fn, inline="always")


def _compiled_rules() -> dict:
    global _rules
    if _rules is None:
        _rules = compiled_rules(_jit)
    return _rules


# The returning form, seen by the kernel as the in-place one.
def _returning(t, y, dy, params):
    rate = user_dynamics(t, y, params)  # noqa: F821  (bound per dynamics)
    for i in range(dy.shape[0]):
        dy[i] = rate[i]


def _returning_without_params(t, y, dy, params):
    rate = user_dynamics(t, y)  # noqa: F821  (bound per dynamics)
    for i in range(dy.shape[0]):
        dy[i] = rate[i]


def _solve_ensemble(
    y0, params, ts, stops, jumps, rtol, atol, valid, tab, settings, out, status, t_reached, stats
):
    """Every trajectory of a batch by the kernel loop, in parallel: ``out`` (N, T, D),
    ``status``, ``t_reached`` (N,) and ``stats`` (N, 4) receive the results."""
    count, size = y0.shape
    # No arithmetic on n: prange's index is unsigned, and mixed with a signed integer it
    # becomes a float.
    shared = params.shape[0] == 1 and count > 1
    rows = loop.FIRST_DENSE_ROW + tab.sizes[DENSE_STAGES]
    for n in numba.prange(count):
        work = np.empty((rows, size), dtype=y0.dtype)
        time_buffer = np.empty(1, dtype=y0.dtype)
        weights = np.empty((1, tab.sizes[DENSE_STAGES]))
        own = params[0] if shared else params[n]
        s, t, _ = solve_trajectory(  # noqa: F821  (bound per dynamics)
            y0[n],
            own,
            ts,
            stops,
            jumps,
            rtol[n],
            atol[n],
            valid[n],
            tab,
            settings,
            out[n],
            work,
            time_buffer,
            weights,
            stats[n],
        )
        status[n] = s
        t_reached[n] = t


def _form(func, has_params: bool) -> str:
    """Which of the accepted forms ``func`` has, by its positional parameters."""
    py_func = getattr(func, "py_func", func)
    try:
        signature = inspect.signature(py_func)
    except (TypeError, ValueError):
        raise TypeError(
            f"the numba backend could not read the signature of func {func!r}; it expects "
            f"a function {FORMS}"
        ) from None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p for p in signature.parameters.values() if p.kind in kinds and p.default is p.empty
    ]
    count = len(required)
    if count == 4:
        return "in place"
    if count == 3:
        return "returning"
    if count == 2 and not has_params:
        return "returning without params"
    raise TypeError(
        f"func takes {count} positional arguments; the numba backend expects {FORMS}"
        + ("" if has_params else ", or f(t, y) -> dy without params")
    )


def _user_dispatcher(func):
    if isinstance(func, numba.core.dispatcher.Dispatcher):
        return func
    if not inspect.isfunction(func):
        raise TypeError(
            f"func must be a Python function or an @numba.njit function on the numba backend, "
            f"got {type(func).__name__}; it expects {FORMS}"
        )
    return numba.njit(func, cache=_cacheable(func))


def _cacheable(func) -> bool:
    """Whether Numba can keep ``func``'s machine code on disk: a function defined in a
    file, not a lambda, not a function typed at a prompt."""
    code = func.__code__
    return func.__name__ != "<lambda>" and not code.co_filename.startswith("<")


def _kernel(func, form: str) -> SimpleNamespace:
    """The kernel functions for ``func`` in ``form``, compiled once per dynamics."""
    per_form = _kernels.setdefault(func, {})
    if form not in per_form:
        user = _user_dispatcher(func)
        if form == "in place":
            dynamics = user
        else:
            wrapper = _returning if form == "returning" else _returning_without_params
            dynamics = _jit_bound(bind(wrapper, {"user_dynamics": user}))
        functions = compiled_loop(_jit_bound, _compiled_rules(), dynamics)
        ensemble = bind(_solve_ensemble, {"solve_trajectory": functions.solve_trajectory})
        per_form[form] = SimpleNamespace(
            user=user,
            solve_trajectory=functions.solve_trajectory,
            solve_ensemble=numba.njit(ensemble, parallel=True),
            probed=set(),
        )
    return per_form[form]


def _probe(kernel, form, t, y, params, dtype) -> None:
    """Compile the user's function alone, on the arguments the kernel gives it, and check
    its output: its own errors then name it, not the kernel around it."""
    key = (dtype, params.ndim, params.dtype)
    if key in kernel.probed:
        return
    time = dtype.type(t)
    try:
        if form == "in place":
            kernel.user(time, y.copy(), np.full_like(y, math.nan), params)
            out = None
        elif form == "returning":
            out = kernel.user(time, y.copy(), params)
        else:
            out = kernel.user(time, y.copy())
    except NumbaError as exc:
        raise TypeError(
            f"Numba could not compile func for the numba backend, which expects {FORMS} "
            f"(t a number, y a 1-D {dtype} array, params a 1-D array). Numba said:\n{exc}"
        ) from None
    if out is not None:
        _validate.dynamics_output(BACKEND, out, make_layout(np, y, None))
    kernel.probed.add(key)


def _params_array(params, batch: int | None) -> np.ndarray:
    """``params`` as the array ``f`` receives (1-D), or for a batch as rows (N, P) or one
    shared row (1, P)."""
    if params is None:
        array = np.zeros(0)
    else:
        try:
            array = np.asarray(params)
        except (TypeError, ValueError):
            array = None
        if array is None or not (
            np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
        ):
            raise TypeError(
                f"params must be a NumPy array of numbers on the numba backend (f receives "
                f"it as one array), got {type(params).__name__}"
            )
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float64)
    if batch is None:
        if array.ndim > 1:
            raise ValueError(
                f"params must be a 1-D array for a single trajectory on the numba backend, "
                f"got shape {array.shape}"
            )
        return np.ascontiguousarray(array.reshape(-1))
    if array.ndim <= 1:
        return np.ascontiguousarray(array.reshape(1, -1))
    if array.ndim != 2 or array.shape[0] != batch:
        raise ValueError(
            f"params for a batch of {batch} trajectories on the numba backend must be one row "
            f"per trajectory, shape ({batch}, P), or one shared row (P,); got shape "
            f"{array.shape}"
        )
    return np.ascontiguousarray(array)


def _check_layout(lay) -> None:
    if lay.casts:
        raise TypeError(
            f"the numba backend solves float32 and float64 states, got y0 of dtype "
            f"{lay.user_dtype}; convert y0 to float32"
        )
    if lay.batched and (len(lay.shape) != 2 or lay.batch_axis != 0):
        raise ValueError(
            f"a batch on the numba backend is y0 of shape (N, D) with batch_axis=0, got shape "
            f"{lay.shape} with batch_axis={lay.batch_axis}; move the sample axis first "
            f"(np.moveaxis) and flatten each state"
        )


def _norm_code(options) -> float:
    norm = (options or {}).get("norm", "rms")
    if not isinstance(norm, str):
        raise ValueError(
            "the numba backend compiles the error norm into the solve: options['norm'] must "
            "be 'rms' or 'max'; use another backend for a norm of your own"
        )
    return loop.MAX_NORM if norm == "max" else loop.RMS_NORM


def _settings(problem, options) -> np.ndarray:
    settings = np.zeros(loop.SETTINGS_SIZE)
    controller = problem.controller
    if controller is not None:
        settings[loop.SAFETY] = controller.safety
        settings[loop.IFACTOR] = controller.ifactor
        settings[loop.DFACTOR] = controller.dfactor
        settings[loop.ICOEFF] = controller.icoeff
        settings[loop.PCOEFF] = controller.pcoeff
        settings[loop.SHRINK_AFTER_ACCEPT] = controller.shrink_after_accept
    settings[loop.FIRST_STEP] = math.nan if problem.first_step is None else problem.first_step
    settings[loop.STEP_SIZE] = math.inf if problem.step_size is None else problem.step_size
    settings[loop.MIN_STEP] = problem.min_step
    settings[loop.MAX_STEP] = problem.max_step
    settings[loop.MAX_NUM_STEPS] = problem.max_num_steps
    settings[loop.DIRECTION] = problem.direction
    settings[loop.NORM] = _norm_code(options)
    return settings


def _per_element(tol, shape) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(tol, dtype=np.float64), shape))


def _times(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))


def solve(problem, options) -> Solution:
    """``Kernels.solve``: the prepared problem solved by the compiled kernel loop."""
    lay = problem.layout
    _check_layout(lay)
    settings = _settings(problem, options)
    batch = lay.batch if lay.batched else None
    params = _params_array(problem.dynamics.params, batch)
    form = _form(problem.dynamics.func, problem.dynamics.params is not None)
    y0 = np.ascontiguousarray(np.asarray(problem.y0).reshape(lay.batch, -1))
    rows, size = y0.shape
    ts = _times(problem.ts_array)
    kernel = _kernel(problem.dynamics.func, form)
    _probe(kernel, form, ts[0] * problem.direction, y0[0], params[0] if batch else params, y0.dtype)
    stops = _times(problem.stops)
    jumps = _times(problem.jumps if problem.jumps is not None else [])
    rtol = _per_element(problem.rtol, (rows, size))
    atol = _per_element(problem.atol, (rows, size))
    valid = np.ones(rows, dtype=np.bool_) if problem.valid is None else np.asarray(problem.valid)
    tab = kernel_tableau(problem.solver.tableau)
    out = np.full((rows, len(ts), size), math.nan, dtype=y0.dtype)
    stats = np.zeros((rows, 4), dtype=np.int64)
    if batch is None:
        status, t_reached, _ = kernel.solve_trajectory(
            y0[0],
            params,
            ts,
            stops,
            jumps,
            rtol[0],
            atol[0],
            bool(valid[0]),
            tab,
            settings,
            out[0],
            np.empty((loop.work_rows(tab.sizes), size), dtype=y0.dtype),
            np.empty(1, dtype=y0.dtype),
            np.empty((1, tab.sizes[DENSE_STAGES])),
            stats[0],
        )
        return Solution(
            ts=problem.ts_array * problem.direction,
            ys=out[0].reshape(len(ts), *lay.shape),
            stats={name: int(stats[0, k]) for k, name in enumerate(_STATS)},
            status=int(status),
            t_reached=float(t_reached) * problem.direction,
            method=problem.solver.name,
        )
    status = np.empty(rows, dtype=np.int64)
    t_reached = np.empty(rows)
    arrays = (y0, params, ts, stops, jumps, rtol, atol, valid, tab, settings)
    kernel.solve_ensemble(*arrays, out, status, t_reached, stats)
    return Solution(
        ts=problem.ts_array * problem.direction,
        ys=np.ascontiguousarray(out.transpose(1, 0, 2)),
        stats={name: stats[:, k].copy() for k, name in enumerate(_STATS)},
        status=status,
        t_reached=t_reached * problem.direction,
        method=problem.solver.name,
    )


_STATS = ("nfev", "nsteps", "naccept", "nreject")


class NumbaBackend(NumpyBackend):
    """NumPy arrays, with every solve compiled whole (``Kernels.solve``). The gradient
    rules run the generic loop, as on NumPy."""

    name = "numba"
    kernels = Kernels(stage_store=BufferStages, rms_error_ratio=_rms_error_ratio, solve=solve)


BACKEND = NumbaBackend()
