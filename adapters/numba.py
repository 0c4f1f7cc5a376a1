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

Ensembles: with ``batch_axis=0`` and ``y0`` of shape (N, D), each trajectory takes its own
steps, in parallel over the cores (``numba_threads``), each core stepping a few trajectories
together (``loop.solve_lanes``); ``f`` sees one trajectory's (D,) state and its row of a
(N, P) ``params``, or a shared (P,) ``params``.

Continuous normalizing flows (``odecore.cnf``) take NumPy's dynamics (a batch ``f(t, z,
params)`` with ``vjp`` and ``vjp_of_vjp``) and run NumPy's generic loop
(``Backend.generic_backend``): their augmented dynamics call the velocity's VJPs from Python.

Gradients (``odecore.vjp_odeint``) use the dynamics' own ``vjp``, as on NumPy, and are
compiled: :func:`adjoint_dynamics` compiles the backsolve's adjoint system from ``f`` and
``f.vjp`` (a batch's joint one row by row), and each backward interval is one kernel solve;
the checkpoint's tape is replayed by ``odecore.kernels.replay`` compiled. What the kernels do
not cover (parameter trees, objects with ``__call__``, events) runs the generic loop on NumPy
arrays; :class:`_GenericForm` lets it call dynamics written in place.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import mmap
import sys
from types import SimpleNamespace
from typing import NamedTuple

import numba
import numpy as np
from numba.core.errors import NumbaError
from odecore.adapters import (
    numba_cache,
    numba_options,
    numba_primitives,
    numba_threads,
    numba_watch,
)
from odecore.adapters.numba_options import one_copy_per_type
from odecore.adapters.numba_threads import range_done, take_range
from odecore.adapters.numpy import BACKEND as NUMPY_BACKEND
from odecore.adapters.numpy import BufferStages, NumpyBackend, _rms_error_ratio

from odecore import _validate
from odecore.backend import Kernels
from odecore.backend.layout import layout as make_layout
from odecore.control import primitives
from odecore.control.norms import LargestPartRMS
from odecore.control.primitives import bind
from odecore.kernels import loop, specialize
from odecore.kernels.compile import compiled_loop, compiled_replay, compiled_rules
from odecore.kernels.replay import ADJOINT, COTANGENT_ROWS
from odecore.kernels.tableau import DENSE_STAGES, kernel_tableau
from odecore.ode.loop import LoopResult
from odecore.ode.solution import Solution
from odecore.ode.tape import KernelTape
from odecore.tableaus import Tableau

FORMS = (
    "f(t, y, params) -> dy (returning the rate), or f(t, y, dy, params) (writing it into dy, "
    "numbalsoda's order), in Numba's nopython subset"
)
VJP_FORMS = (
    "vjp(t, y, params, cotangent) -> (y_bar, params_bar), or vjp(t, y, params, cotangent, "
    "y_bar, params_bar) writing them, in Numba's nopython subset"
)

_rules: dict | None = None
# Per dynamics, form and method: the compiled kernel functions. They live as long as the
# process, as Numba keeps every function it compiled (their dispatchers hold the dynamics
# anyway).
_kernels: dict = {}
_forms: dict = {}
# A plain function's dispatcher, made once: each new one would compile again.
_dispatchers: dict = {}


# Numba's disk cache knows a function by its file, name and the file's time stamp, not by
# the functions it calls: a rule cached while the primitives read one way would be served
# after they changed, with the old primitives compiled into it. The rules and primitives
# are therefore compiled under names that carry a digest of the primitives' sources.
_PRIMITIVES_DIGEST = hashlib.sha256(
    (inspect.getsource(primitives) + inspect.getsource(numba_primitives)).encode()
).hexdigest()[:16]


def _jit(fn):
    """A primitive or rule compiled and kept on disk, under its name and the digest."""
    renamed = bind(fn, {})
    renamed.__qualname__ = f"{fn.__qualname__}_{_PRIMITIVES_DIGEST}"
    return one_copy_per_type(numba.njit(renamed, cache=True))


def _jit_bound(fn, nogil: bool = False):
    # A function bound to one dynamics shares its code, file and name with every other
    # binding: a disk cache would hand one dynamics' machine code to another. A watched
    # solve runs in a thread of its own without the interpreter's lock (``nogil``), while
    # the caller reads its progress.
    return one_copy_per_type(numba.njit(fn, **numba_options.loop_options(fn.__name__, nogil)))


def _wrapped(wrapper, name: str, user):
    """``wrapper`` calling the user's compiled ``user`` as ``name``, compiled to count
    references and free what the user's code allocates (``numba_options.USER_CODE``)."""
    return numba.njit(bind(wrapper, {name: user}), **numba_options.USER_CODE)


def _compiled_rules() -> dict:
    global _rules
    if _rules is None:
        _rules = compiled_rules(_jit, numba_primitives.REPLACEMENTS)
    return _rules


# The user's f as the kernel calls it, in place; the returning forms write their rate.
def _forwarding(t, y, dy, params):
    user_dynamics(t, y, dy, params)  # noqa: F821  (bound per dynamics)


def _returning(t, y, dy, params):
    rate = user_dynamics(t, y, params)  # noqa: F821  (bound per dynamics)
    for i in range(dy.shape[0]):
        dy[i] = rate[i]


def _returning_without_params(t, y, dy, params):
    rate = user_dynamics(t, y)  # noqa: F821  (bound per dynamics)
    for i in range(dy.shape[0]):
        dy[i] = rate[i]


# The backsolve's augmented dynamics [y, a, a_theta]' = [f, -a df/dy, -a df/dtheta] over
# z = [y (m), a (m), a_theta (P)], with P the length of params.
def _adjoint(t, z, dz, params):
    size = (z.shape[0] - params.shape[0]) // 2
    y = z[:size]
    dynamics_in_place(t, y, dz[:size], params)  # noqa: F821  (bound per dynamics)
    # Zeroed as the replay zeroes them: a VJP may leave its zero entries unwritten.
    for i in range(size, z.shape[0]):
        dz[i] = 0.0
    vjp_in_place(t, y, params, z[size : 2 * size], dz[size : 2 * size], dz[2 * size :])  # noqa: F821
    # The VJP is linear in its cotangent, so negating its results equals the generic
    # backsolve's VJP with -a, to the bit.
    for i in range(size, z.shape[0]):
        dz[i] = -dz[i]


def _adjoint_rows(t, z, dz, params):
    """:func:`_adjoint` of a batch of N trajectories, as the generic backsolve lays its
    joint state out: ``z = [y (N, SIZE), a (N, SIZE), a_params]``, each block row by row.
    With ``PER_ROW`` the params are (N, P) flattened and so is their adjoint; otherwise one
    shared row, whose adjoint sums the trajectories'. ``SIZE`` and ``PER_ROW`` are bound;
    N follows from the lengths, so one compiled function serves every batch size."""
    size = SIZE  # noqa: F821  (bound: one trajectory's state size)
    m = (z.shape[0] - params.shape[0]) // 2
    rows = m // size
    if PER_ROW:  # noqa: F821  (bound: one params row per trajectory)
        width = params.shape[0] // rows if rows > 0 else 0
    else:
        width = params.shape[0]
        own = np.empty(width, dtype=dz.dtype)
        for k in range(width):
            dz[2 * m + k] = 0.0
    # Zeroed as the replay zeroes them: a VJP may leave its zero entries unwritten.
    for i in range(m, 2 * m):
        dz[i] = 0.0
    if PER_ROW:  # noqa: F821
        for i in range(2 * m, z.shape[0]):
            dz[i] = 0.0
    for r in range(rows):
        lo, hi = r * size, (r + 1) * size
        y = z[lo:hi]
        p = params[r * width : (r + 1) * width] if PER_ROW else params  # noqa: F821
        dynamics_in_place(t, y, dz[lo:hi], p)  # noqa: F821  (bound per dynamics)
        a, a_bar = z[m + lo : m + hi], dz[m + lo : m + hi]
        if PER_ROW:  # noqa: F821
            p_bar = dz[2 * m + r * width : 2 * m + (r + 1) * width]
            vjp_in_place(t, y, p, a, a_bar, p_bar)  # noqa: F821  (bound per VJP)
        else:
            for k in range(width):
                own[k] = 0.0
            vjp_in_place(t, y, p, a, a_bar, own)  # noqa: F821
            for k in range(width):
                dz[2 * m + k] += own[k]
    # As in _adjoint: the VJP with a, negated, is the VJP with -a.
    for i in range(m, z.shape[0]):
        dz[i] = -dz[i]


def _vjp_forwarding(t, y, params, cotangent, y_bar, params_bar):
    user_vjp(t, y, params, cotangent, y_bar, params_bar)  # noqa: F821  (bound per VJP)


def _vjp_returning(t, y, params, cotangent, y_bar, params_bar):
    cot_y, cot_params = user_vjp(t, y, params, cotangent)  # noqa: F821  (bound per VJP)
    for i in range(y_bar.shape[0]):
        y_bar[i] = cot_y[i]
    for i in range(params_bar.shape[0]):
        params_bar[i] = cot_params[i]


def _solve_ensemble(
    y0,
    params,
    ts,
    stops,
    jumps,
    rtol,
    atol,
    parts,
    valid,
    tab,
    settings,
    out,
    status,
    t_reached,
    dt_next,
    stats,
    watch,
    tape_times,
    tape_y,
    order,
    groups,
    shared,
):
    """The trajectories of a batch in ``order`` (``_visit_order``), by the kernel loop,
    taken in ranges, rows of ``groups`` (``_lane_groups``), from the counter ``shared``
    until none is left (``numba_threads``: every thread runs this), and stepped a few at a
    time in the thread's lanes (``loop.solve_lanes``). ``out`` (N, T, D), ``status``,
    ``t_reached``, ``dt_next`` (N,) and ``stats`` (N, 4) receive the results; ``watch``
    (N, ``loop.WATCH_STRIDE``) the progress of a watched kernel; ``tape_times``
    (N, K, ``loop.TAPE_COLUMNS``) and ``tape_y`` (N, K, D) the first K accepted steps of
    each, for the checkpoint gradient (K = 0: none)."""
    size = y0.shape[1]
    rows = loop.FIRST_DENSE_ROW + tab.sizes[DENSE_STAGES]
    works = np.empty((loop.LANES, rows, size), dtype=y0.dtype)
    weights = np.empty((1, tab.sizes[DENSE_STAGES]))
    lane_t = np.empty((loop.LANES, loop.LANE_FLOATS))
    lane_n = np.empty((loop.LANES, loop.LANE_INTS), dtype=np.int64)
    results = (status, t_reached, dt_next)
    g = take_range(shared)
    while g < groups.shape[0]:
        solve_lanes(  # noqa: F821  (bound per dynamics)
            order,
            groups[g, 0],
            groups[g, 1],
            y0,
            params,
            ts,
            stops,
            jumps,
            rtol,
            atol,
            parts,
            valid,
            tab,
            settings,
            out,
            results,
            stats,
            watch,
            tape_times,
            tape_y,
            works,
            weights,
            lane_t,
            lane_n,
        )
        range_done(shared)
        g = take_range(shared)


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@functools.lru_cache(maxsize=256)
def _lane_groups(count: int, threads: int) -> np.ndarray:
    """The ranges a batch's threads take, rows ``(first, last)`` into its visiting order,
    one at a time, each to whichever thread is free (``numba_threads``); a thread steps a
    range's trajectories ``loop.LANES`` at a time (``loop.solve_lanes``). Each range is a
    share of what is left, ``1 / (2 threads)`` of it, so the ranges shrink as the batch
    nears its end: a thread that starts late (a helper thread takes 20 to 40 us to wake)
    or draws costly trajectories keeps the others waiting for at most a small last range.
    Ranges are whole lanes (a range's last lanes run idle otherwise), so not fewer than
    ``loop.LANES`` trajectories."""
    bounds = [0]
    while bounds[-1] < count:
        left = count - bounds[-1]
        share = -(-left // (2 * threads)) if threads > 1 else left
        size = -(-share // loop.LANES) * loop.LANES
        bounds.append(min(count, bounds[-1] + size))
    bounds_array = np.array(bounds, dtype=np.int64)
    groups_array = np.stack([bounds_array[:-1], bounds_array[1:]], axis=1)
    groups_array.flags.writeable = False
    return groups_array


@functools.lru_cache(maxsize=256)
def _visit_stride(count: int) -> int:
    stride = max(1, round(count * _GOLDEN))
    while math.gcd(stride, count) != 1:
        stride += 1
    return stride


def _visit_order(count: int) -> np.ndarray:
    """The order in which a batch's threads take its ``count`` trajectories. They take
    contiguous ranges of it (``_lane_groups``), sized so that the threads finish together
    if a range's cost follows its size; but the trajectories of a sweep often take more
    steps as the swept parameter grows, and visited in their own order the last, small
    ranges would hold the costliest (Numba's parallel loop, which gave each thread one
    block, took 25% longer on the Lorenz rho-sweep on two threads). Index ``i`` takes
    trajectory ``i * s mod count``, with ``s`` near ``count`` over the golden ratio and
    coprime to ``count``: a permutation under which every contiguous block of indices
    samples the whole batch evenly (a Weyl sequence)."""
    return np.arange(count, dtype=np.int64) * _visit_stride(count) % count


def _form(func, has_params: bool) -> str:
    """Which of the accepted forms ``func`` has, by its positional parameters; read once per
    function (reading a signature costs more than a short compiled solve)."""
    try:
        hash(func)
    except TypeError:
        raise TypeError(
            f"the numba backend compiles func once per function object and needs it hashable; "
            f"got an unhashable {type(func).__name__}. It expects {FORMS}"
        ) from None
    key = (func, has_params)
    form = _forms.get(key)
    if form is None:
        form = _forms[key] = _read_form(func, has_params)
    return form


def _read_form(func, has_params: bool) -> str:
    count = _positional_count(func, FORMS)
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


def _positional_count(func, forms: str) -> int:
    """How many positional parameters without defaults ``func`` has."""
    py_func = getattr(func, "py_func", func)
    try:
        signature = inspect.signature(py_func)
    except (TypeError, ValueError):
        raise TypeError(
            f"the numba backend could not read the signature of {func!r}; it expects "
            f"a function {forms}"
        ) from None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p for p in signature.parameters.values() if p.kind in kinds and p.default is p.empty
    ]
    return len(required)


def _user_dispatcher(func, forms: str = FORMS):
    if isinstance(func, numba.core.dispatcher.Dispatcher):
        return func
    if not inspect.isfunction(func):
        raise TypeError(
            f"{'func.vjp' if forms is VJP_FORMS else 'func'} must be a Python function or an "
            f"@numba.njit function on the numba backend, got {type(func).__name__}; it expects "
            f"{forms}"
        )
    dispatcher = _dispatchers.get(func)
    if dispatcher is None:
        dispatcher = _dispatchers[func] = numba.njit(func, cache=_cacheable(func))
    return dispatcher


def _cacheable(func) -> bool:
    """Whether Numba can keep ``func``'s machine code on disk: a function defined in the file
    of an imported module, not a lambda, not a function typed at a prompt or executed from a
    string (Numba's cache would import its module by name to load it again)."""
    code = func.__code__
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    return (
        func.__name__ != "<lambda>"
        and not code.co_filename.startswith("<")
        and getattr(module, "__file__", None) == code.co_filename
    )


# States of at most this many elements get a kernel compiled for their size
# (``loop.STATE_SIZE``): its loops over the elements unroll, which is where a small system's
# step spends its time. Larger states share one kernel for every size.
MAX_UNROLLED_SIZE = 16


# NumPy computes ``dtype.name`` in Python (about 2 us), and a short compiled solve's whole
# overhead is a few tens of microseconds.
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def _dtype_name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    return dtype.name if name is None else name


def _kernel(
    func, form: str, tableau: Tableau, size: int, dtype: str, watched: bool = False
) -> SimpleNamespace:
    """The kernel functions for ``func`` in ``form`` under ``tableau``'s method for states of
    ``size`` elements in ``dtype``, compiled once per dynamics, method, dtype and small size:
    the method's sums are written out (``specialize``). Dynamics that can be imported by
    name get a kernel kept on disk (``numba_cache``); others one compiled in memory, for the
    life of the process. ``watched``: the kernel that publishes its progress
    (``numba_watch``), compiled apart, only for a solve that reports it."""
    per_func = _kernels.setdefault(func, {})
    state_size = size if size <= MAX_UNROLLED_SIZE else 0
    key = (form, tableau.name, tableau.adaptive, state_size, dtype, watched)
    kernel = per_func.get(key)
    if kernel is None or kernel.tableau is not tableau:
        arrays = kernel_tableau(tableau)
        module = numba_cache.load(
            func,
            form,
            specialize.source(arrays),
            inspect.getsource(_solve_ensemble),
            state_size,
            dtype,
            watched,
        )
        if module is not None:
            user = module._user
            solve_trajectory, solve_ensemble = module.solve_trajectory, module.solve_ensemble
            functions = {fn.__name__: getattr(module, fn.__name__) for fn in loop.KERNEL_FUNCTIONS}
        else:
            user, dynamics = _in_place(func, form)
            sums = specialize.specialized(tableau.name, arrays)
            if watched:
                sums = {**sums, **numba_watch.REPLACEMENTS}
            functions = vars(
                compiled_loop(
                    functools.partial(_jit_bound, nogil=watched),
                    _compiled_rules(),
                    dynamics,
                    sums,
                    state_size,
                    dtype,
                    watched,
                )
            )
            solve_trajectory = functions["solve_trajectory"]
            ensemble = bind(_solve_ensemble, {"solve_lanes": functions["solve_lanes"]})
            solve_ensemble = numba.njit(ensemble, nogil=True)
        kernel = per_func[key] = SimpleNamespace(
            tableau=tableau,
            arrays=arrays,
            user=user,
            solve_trajectory=solve_trajectory,
            solve_ensemble=solve_ensemble,
            functions=functions,
            module=module,
            form=form,
            state_size=state_size,
            replays={},
            probed=set(),
        )
    return kernel


def _in_place(func, form: str):
    """``(the user's dispatcher, the dynamics in place)``: ``func`` compiled, and wrapped
    (writing its rate, for a returning form) in the function the kernel calls, which
    frees what ``func`` allocates (``numba_options.USER_CODE``); once per function and
    form."""
    key = ("in place", form)
    per_func = _kernels.setdefault(func, {})
    if key not in per_func:
        user = _user_dispatcher(func)
        wrapper = {
            "in place": _forwarding,
            "returning": _returning,
            "returning without params": _returning_without_params,
        }[form]
        dynamics = _wrapped(wrapper, "user_dynamics", user)
        per_func[key] = (user, dynamics)
    return per_func[key]


def adjoint_dynamics(problem):
    """``Kernels.adjoint_dynamics``: the backsolve's augmented dynamics compiled in place
    (with the user's ``func`` and ``func.vjp`` bound in) and the parameters it takes, so that
    each backward interval is one compiled solve; None where the generic backsolve serves
    instead: no ``vjp``, ``params`` that are not one array, or a batch whose samples are
    not rows. A batch's backward solve is one joint system, as in the generic backsolve:
    its augmented dynamics (:func:`_adjoint_rows`) call ``f`` and ``f.vjp`` row by row."""
    dyn, lay = problem.dynamics, problem.layout
    func, params = dyn.user_func, dyn.params
    vjp = getattr(func, "vjp", None)
    if vjp is None or not (_compilable(func) and _compilable(vjp)):
        return None
    if params is not None and not isinstance(params, np.ndarray):
        return None
    if lay.batched and (len(lay.shape) != 2 or lay.batch_axis != 0):
        return None
    form = _form(func, params is not None)
    rows = _params_array(params, lay.batch if lay.batched else None)
    per_row = lay.batched and rows.ndim == 2 and rows.shape[0] > 1
    key = ("adjoint", form, lay.size if lay.batched else None, per_row)
    per_func = _kernels.setdefault(func, {})
    if key not in per_func:
        augmented = _adjoint_rows if lay.batched else _adjoint
        constants = {"SIZE": lay.size, "PER_ROW": per_row} if lay.batched else {}
        vjp_form = _vjp_form(vjp)
        # Kept on disk where func can be imported by name, and with it the kernel solving
        # it: a new process then loads the backsolve instead of compiling it again.
        compiled = numba_cache.load_adjoint(func, form, vjp_form, augmented, constants)
        if compiled is None:
            _, dynamics = _in_place(func, form)
            names = {"dynamics_in_place": dynamics, "vjp_in_place": _vjp_in_place(vjp)}
            compiled = numba.njit(bind(augmented, {**names, **constants}))
        per_func[key] = compiled
    first_row = rows[0] if rows.ndim == 2 else rows
    y0_row = np.asarray(problem.y0).reshape(lay.batch, -1)[0]
    _probe_vjp(vjp, problem, y0_row, first_row, "backsolve")
    return per_func[key], np.ascontiguousarray(rows.reshape(-1))


def _compilable(func) -> bool:
    """A Python function or an ``@numba.njit`` function: what the kernel can compile (an
    object with a ``__call__`` serves the generic loop only)."""
    return inspect.isfunction(func) or isinstance(func, numba.core.dispatcher.Dispatcher)


def _vjp_form(vjp) -> str:
    """``"in place"`` or ``"returning"``, by the number of ``vjp``'s positional arguments."""
    count = _positional_count(vjp, VJP_FORMS)
    if count not in (4, 6):
        raise TypeError(
            f"func.vjp takes {count} positional arguments; the numba backend expects {VJP_FORMS}"
        )
    return "in place" if count == 6 else "returning"


def _vjp_in_place(vjp):
    """The user's VJP as ``vjp(t, y, params, cotangent, y_bar, params_bar)``, writing its
    results, in the wrapper the replay calls (``numba_options.USER_CODE``)."""
    user = _user_dispatcher(vjp, VJP_FORMS)
    wrapper = _vjp_forwarding if _vjp_form(vjp) == "in place" else _vjp_returning
    return _wrapped(wrapper, "user_vjp", user)


def _probe_vjp(vjp, problem, y, params, mode) -> None:
    """Compile the user's VJP alone and check the shapes it returns for one trajectory's
    state ``y`` (1-D) and ``params``, before a compiled backward pass copies them (out of
    bounds, a wrong shape would read garbage)."""
    y = np.ascontiguousarray(y)
    t = y.dtype.type(problem.ts_array[0] * problem.direction)
    user = _user_dispatcher(vjp, VJP_FORMS)
    in_place = _vjp_form(vjp) == "in place"
    try:
        if in_place:
            user(t, y.copy(), params, np.ones_like(y), np.zeros_like(y), np.zeros_like(params))
        else:
            cot_y, cot_params = user(t, y.copy(), params, np.ones_like(y))
    except NumbaError as exc:
        raise TypeError(
            f"Numba could not compile func.vjp for the numba backend's {mode}, which "
            f"expects {VJP_FORMS}. Numba said:\n{exc}"
        ) from None
    if not in_place:
        _check_cotangent_shapes(cot_y, cot_params, y, params)
    _check_vjp_bounds(user, in_place, t, y, params)


def _check_cotangent_shapes(cot_y, cot_params, y, params) -> None:
    for name, value, size in (("y", cot_y, y.shape[0]), ("params", cot_params, params.shape[0])):
        if value is None:
            # NumPy's generic loop takes None for "no parameters"; a compiled VJP always
            # receives params as an array (empty when there are none) and copies it back.
            raise ValueError(
                f"func.vjp returned None for the cotangent of {name}; the numba backend "
                f"passes params as an array (empty, shape (0,), when the solve has none) "
                f"and expects an array of shape ({size},) back: return np.zeros({size}) "
                f"where there is nothing to return"
            )
        shape = np.shape(value)
        if shape != (size,):
            raise ValueError(
                f"func.vjp returned a cotangent for {name} of shape {shape}; the numba "
                f"backend expects shape ({size},), like the flattened {name}"
            )


# (the VJP's dispatcher, state size, parameters, dtypes) already checked.
_vjps_checked: set = set()


def _check_vjp_bounds(user, in_place: bool, t, y, params) -> None:
    """Raise where the user's compiled VJP reads ``y``, ``params`` or the cotangent past
    their ends, or (in place) writes ``y_bar`` or ``params_bar`` past theirs
    (:func:`_past_the_ends`); once per VJP and sizes. Its outputs may be written in part:
    the replay and the backsolve's adjoint system zero them before each call."""
    key = (user, y.shape[0], params.shape[0], y.dtype, params.dtype)
    if key in _vjps_checked:
        return

    def call(views):
        arguments = (t, views["y"], views["params"], views["cotangent"])
        if in_place:
            user(*arguments, views["y_bar"], views["params_bar"])
            return views["y_bar"], views["params_bar"]
        return user(*arguments)

    inputs = {"y": y, "params": params, "cotangent": np.ones_like(y)}
    outputs = {"y_bar": np.zeros_like(y), "params_bar": np.zeros_like(params)}
    _past_the_ends("func.vjp", call, inputs, outputs if in_place else {}, must_write=False)
    _vjps_checked.add(key)


def _probe(kernel, form, t, y, params, dtype, user_shape=None) -> None:
    """Compile the user's function alone, on the arguments the kernel gives it, and check
    its output: its own errors then name it, not the kernel around it. Then check that it
    keeps to its arrays (:func:`_check_bounds`). ``user_shape`` is the shape of one
    trajectory's state as the user gave it, which ``y`` holds flattened."""
    key = (dtype, y.shape[0], params.shape[-1], params.dtype)
    if key in kernel.probed:
        return
    time = dtype.type(t)
    try:
        # On copies: the bounds check below must see a write into y or params.
        if form == "in place":
            kernel.user(time, y.copy(), np.full_like(y, math.nan), params.copy())
            out = None
        elif form == "returning":
            out = kernel.user(time, y.copy(), params.copy())
        else:
            out = kernel.user(time, y.copy())
    except NumbaError as exc:
        raise TypeError(
            f"Numba could not compile func for the numba backend, which expects {FORMS} "
            f"(t a number, y a 1-D {dtype} array, params a 1-D array). Numba said:\n{exc}"
        ) from None
    if out is not None:
        _check_flat_output(out, y, user_shape)
        _validate.dynamics_output(BACKEND, out, make_layout(np, y, None))
    # First: an in-place f(t, y, dy) without params returns None too, and the bounds check
    # names what it did (wrote into its third argument, read as params).
    _check_bounds(kernel.user, form, time, y, params)
    if form != "in place" and out is None:
        # Compiled, a func that returns nothing fails deep in the kernel's typing, in
        # Numba's words about the kernel rather than about func.
        raise TypeError(
            "func returned None; the numba backend expects it to return dy/dt, a 1-D array "
            "shaped like y (or to write it into dy in the in-place form f(t, y, dy, params))"
        )
    kernel.probed.add(key)


def _check_flat_output(out, y, user_shape) -> None:
    """Name the flattening where ``func``'s output does not match a state the user gave in
    more than one dimension: ``y`` is that state flattened, which the user never wrote, and
    a (N, D) ``y0`` without ``batch_axis`` is most often a batch of N trajectories meant for
    ``batch_axis=0``."""
    if user_shape is None or len(user_shape) < 2 or np.shape(out) == y.shape:
        return
    batch_hint = (
        f"if each row of y0 is a trajectory of its own, pass batch_axis=0 and func sees one "
        f"row of shape ({user_shape[1]},); otherwise "
        if len(user_shape) == 2
        else "move the trajectories to the first axis, reshape y0 to (N, D) and pass "
        "batch_axis=0 to solve them as a batch; otherwise "
    )
    raise ValueError(
        f"func returned shape {np.shape(out)}, but the numba backend passes it y0 of shape "
        f"{tuple(user_shape)} flattened, as y of shape {y.shape}; {batch_hint}return dy/dt "
        f"of shape {y.shape}, the flattened state"
    )


# Elements after the end of each array that _check_bounds passes: an index a little out of
# range lands in them rather than in whatever memory follows the array.
_PADDING = 64
# Two fills of that padding. Compiled code does not check indices: reading y[3] of a state
# of 3 elements reads the memory after it, and a solve goes on with garbage.
_FILLS = (1.5, -2.5)


def _check_bounds(user, form: str, t, y, params) -> None:
    """Raise where ``user`` (the dynamics, compiled, in ``form``) reads ``y`` or ``params``
    past their ends, writes ``dy`` past its end, or leaves an element of ``dy`` unwritten
    (:func:`_past_the_ends`)."""

    def call(views):
        if form == "in place":
            user(t, views["y"], views["dy"], views["params"])
            return (views["dy"],)
        if form == "returning":
            return (user(t, views["y"], views["params"]),)
        return (user(t, views["y"]),)

    inputs = {"y": y} if form == "returning without params" else {"y": y, "params": params}
    outputs = {"dy": np.empty_like(y)} if form == "in place" else {}
    try:
        _past_the_ends("func", call, inputs, outputs, must_write=True)
    except ValueError as error:
        if form == "returning" and params.size == 0 and "into its argument params" in str(error):
            # f(t, y, dy) without params reads as the returning form f(t, y, params).
            raise ValueError(
                "func wrote into its third argument, which odecore passes as params: with "
                "three arguments func reads as f(t, y, params) -> dy/dt. The in-place form "
                "takes four, f(t, y, dy, params): add params (and pass params=...), or "
                "return dy/dt"
            ) from None
        raise


def _past_the_ends(label: str, call, inputs: dict, outputs: dict, must_write: bool) -> None:
    """Raise a ValueError where ``call(views)``, a call of the user's compiled ``label``
    returning its outputs, reads one of ``inputs`` past its end, writes one of ``outputs``
    past its end, (with ``must_write``) leaves an element of an output unwritten, or writes
    into one of ``inputs`` (the kernel's own state, which it would corrupt). Each
    array (1-D) is passed with padding after it, filled once with one value and once with
    another: an output that changes with the fill has read it. Checked at the inputs and
    with ``y`` moved to a state near it with no zero element, where a read past the end
    multiplied by a zero element of ``y`` would not show (Lorenz's ``beta * z`` at z = 0);
    a function that fails there is checked at ``y`` alone. A function whose outputs
    change between two calls on the same inputs (one that draws random numbers, say) is not
    checked. Indices further out than the padding, and branches neither state takes, are
    not seen."""
    y = inputs["y"]
    near = {**inputs, "y": (y + (1.0 + np.abs(y)) * 1e-3).astype(y.dtype)}
    for arrays, exact in ((inputs, True), (near, False)):
        try:
            message = _out_of_bounds(call, arrays, outputs, must_write)
        except Exception:
            if exact:
                raise
            message = None
        if message is not None and message.startswith("wrote into"):
            raise ValueError(
                f"{label} {message}, evaluated at y0 or near it; the kernel passes its own "
                f"arrays, and a write changes the solve under it: compute into "
                f"{'a new array' if not outputs else ' or '.join(outputs)} instead"
            )
        if message is not None:
            raise ValueError(
                f"{label} {message}, evaluated at y0 or near it; y0 and params (each row, in "
                f"a batch) must have the elements {label} reads and writes: check their "
                f"sizes, or the indices {label} uses"
            )


def _out_of_bounds(call, inputs: dict, outputs: dict, must_write: bool) -> str | None:
    """What :func:`_past_the_ends` finds at ``inputs``: the start of a message, or None."""

    def run(fills):
        buffers, views = {}, {}
        for name, array in {**inputs, **outputs}.items():
            size = array.shape[0]
            buffer = np.full(size + _PADDING, fills[name], dtype=array.dtype)
            if name in inputs:  # an output's own elements keep the fill: unwritten ones show it
                buffer[:size] = array
            buffers[name], views[name] = buffer, buffer[:size]
        results = [np.array(result, dtype=float).ravel() for result in call(views)]
        return np.concatenate(results) if results else np.zeros(0), buffers

    first, second = _FILLS
    base = dict.fromkeys({**inputs, **outputs}, first)
    out, buffers = run(base)
    again, _ = run(base)
    if not np.array_equal(out, again, equal_nan=True):
        return None
    for name, array in inputs.items():
        # The padding written counts as well: the kernel's rows lie one after another.
        if not np.array_equal(buffers[name][: array.shape[0]], array, equal_nan=True) or np.any(
            buffers[name][array.shape[0] :] != first
        ):
            return f"wrote into its argument {name}"
    for name, array in outputs.items():
        if np.any(buffers[name][array.shape[0] :] != first):
            return f"wrote {name} past its {array.shape[0]} elements"
    for name, array in {**inputs, **outputs}.items():
        other, other_buffers = run({**base, name: second})
        if np.array_equal(out, other, equal_nan=True):
            continue
        if name in inputs:
            return (
                f"read {name} past its {array.shape[0]} elements (its output changed with "
                f"the memory after the end of {name})"
            )
        if must_write:
            size = array.shape[0]
            before, after = buffers[name][:size], other_buffers[name][:size]
            # An element written NaN in both calls was written.
            kept = (before != after) & ~(np.isnan(before) & np.isnan(after))
            unwritten = ", ".join(str(i) for i in np.flatnonzero(kept))
            return (
                f"left {name}[{unwritten}] unwritten (the in-place form must set every "
                f"element of {name}; it holds stale values otherwise)"
            )
    return None


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
        # dtype kinds: floating, signed and unsigned integers (np.issubdtype costs more).
        if array is None or array.dtype.kind not in "fiu":
            got = type(params).__name__
            if array is not None and isinstance(params, np.ndarray):
                got = f"an array of dtype {array.dtype}"
            elif array is not None and not isinstance(params, np.ndarray):
                got = f"a {got} read as an array of dtype {array.dtype}"
            raise TypeError(
                f"params must be a NumPy array of real numbers on the numba backend (f "
                f"receives it as one array), got {got}"
            )
        if array.dtype.kind != "f":
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
        given = (
            f"a {type(params).__name__} read as an array of shape {array.shape}"
            if not isinstance(params, np.ndarray)
            else f"shape {array.shape}"
        )
        raise ValueError(
            f"params for a batch of {batch} trajectories on the numba backend must be one "
            f"array, one row per trajectory, shape ({batch}, P), or one shared row (P,); "
            f"got {given}"
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


def _norm(options) -> tuple[float, np.ndarray]:
    """The kernel's norm code and part sizes for ``options['norm']``."""
    norm = "rms" if options is None else options.get("norm", "rms")
    if isinstance(norm, LargestPartRMS) and norm.sizes is not None:
        return loop.PARTS_NORM, np.asarray(norm.sizes, dtype=np.int64)
    if not isinstance(norm, str):
        raise ValueError(
            "the numba backend compiles the error norm into the solve: options['norm'] must "
            "be 'rms', 'max' or odecore.control.norms.largest_part_rms(np, sizes); use another "
            "backend for a norm of your own"
        )
    return (loop.MAX_NORM if norm == "max" else loop.RMS_NORM), _NO_PARTS


# Empty inputs every call would otherwise allocate anew: the kernels only read them, and a
# short solve's Python costs as much as its compiled steps. (Writable, as the non-empty
# arrays in their place are: Numba types read-only arrays apart and would compile again.)
_NO_PARTS = np.zeros(0, dtype=np.int64)
_NO_TIMES = np.zeros(0)
# A single trajectory's kernel is passed valid[0] as a bool.
_ONE_VALID = np.ones(1, dtype=np.bool_)


def _settings(problem, norm_code: float) -> np.ndarray:
    settings = np.zeros(loop.SETTINGS_SIZE)
    controller = problem.controller
    if controller is not None:
        settings[loop.SAFETY] = controller.safety
        settings[loop.IFACTOR] = controller.ifactor
        settings[loop.DFACTOR] = controller.dfactor
        settings[loop.ICOEFF] = controller.icoeff
        settings[loop.PCOEFF] = controller.pcoeff
        settings[loop.SHRINK_AFTER_ACCEPT] = controller.shrink_after_accept
        settings[loop.NO_GROWTH_AFTER_REJECT] = controller.no_growth_after_reject
    settings[loop.FIRST_STEP] = math.nan if problem.first_step is None else problem.first_step
    settings[loop.STEP_SIZE] = math.inf if problem.step_size is None else problem.step_size
    settings[loop.MIN_STEP] = problem.min_step
    settings[loop.MAX_STEP] = problem.max_step
    settings[loop.MAX_NUM_STEPS] = problem.max_num_steps
    settings[loop.DIRECTION] = problem.direction
    settings[loop.NORM] = norm_code
    return settings


def _per_element(tol, rows: int, size: int) -> np.ndarray:
    """The tolerance per element, a row per trajectory; one row for them all where it is one
    number (the usual case): the kernels read row 0 then. Per-row copies of one number cost
    a 2^23-trajectory GPU ensemble 200 MB each, sent to the device at every solve."""
    if isinstance(tol, float):
        return np.full((1, size), tol)
    shape = (rows, size)
    return np.ascontiguousarray(np.broadcast_to(np.asarray(tol, dtype=np.float64), shape))


def _times(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))


class KernelInputs(NamedTuple):
    """A prepared problem as the kernel loop's arguments (``odecore.kernels.loop``), one row
    per trajectory: ``y0`` (N, D), ``params`` (N, P) or one shared row (1, P) (a single
    trajectory: (P,)), ``rtol``/``atol`` (N, D) or one row for all (1, D), ``valid``
    (N,)."""

    y0: np.ndarray
    params: np.ndarray
    ts: np.ndarray
    stops: np.ndarray
    jumps: np.ndarray
    rtol: np.ndarray
    atol: np.ndarray
    parts: np.ndarray
    valid: np.ndarray
    settings: np.ndarray
    form: str
    batched: bool


def kernel_inputs(problem, options) -> KernelInputs:
    """The arrays the kernel loop takes for ``problem``, checked (the layouts, the norm and
    the dynamics' form it can compile)."""
    lay = problem.layout
    _check_layout(lay)
    norm_code, parts = _norm(options)
    batch = lay.batch if lay.batched else None
    y0 = np.ascontiguousarray(np.asarray(problem.y0).reshape(lay.batch, -1))
    rows, size = y0.shape
    if problem.valid is not None:
        valid = np.asarray(problem.valid)
    else:
        valid = _ONE_VALID if batch is None else np.ones(rows, dtype=np.bool_)
    return KernelInputs(
        y0=y0,
        params=_params_array(problem.dynamics.params, batch),
        ts=_times(problem.ts_array),
        stops=_times(problem.stops),
        jumps=_NO_TIMES if problem.jumps is None else _times(problem.jumps),
        rtol=_per_element(problem.rtol, rows, size),
        atol=_per_element(problem.atol, rows, size),
        parts=parts,
        valid=valid,
        settings=_settings(problem, norm_code),
        form=_form(problem.dynamics.user_func, problem.dynamics.params is not None),
        batched=batch is not None,
    )


def ensemble_result(problem, out, status, t_reached, dt_next, stats) -> LoopResult:
    """The Solution of a batch from the kernel's per-trajectory results: ``out`` (N, T, D),
    ``status``, ``t_reached``, ``dt_next`` (N,), ``stats`` (N, 4)."""
    solution = Solution(
        ts=problem.ts_array * problem.direction,
        ys=np.ascontiguousarray(out.transpose(1, 0, 2)),
        stats={name: stats[:, k].copy() for k, name in enumerate(_STATS)},
        status=status,
        t_reached=t_reached * problem.direction,
        method=problem.solver.name,
    )
    return LoopResult(solution, None, dt_next)


def solve(problem, options, progress=None, record=False) -> LoopResult:
    """``Kernels.solve``: the prepared problem solved by the compiled kernel loop, reporting
    to ``progress`` (a ``odecore.ode.progress.Reporter``, or None) while it runs; with
    ``record``, keeping the checkpoint tape (a :class:`~odecore.ode.tape.KernelTape`) in the
    result."""
    inputs = kernel_inputs(problem, options)
    y0, params, ts = inputs.y0, inputs.params, inputs.ts
    rows, size = y0.shape
    watched = progress is not None
    kernel = _kernel(
        problem.dynamics.user_func,
        inputs.form,
        problem.solver.tableau,
        size,
        _dtype_name(y0.dtype),
        watched,
    )
    first_params = params[0] if inputs.batched else params
    lay = problem.layout
    _probe(
        kernel,
        inputs.form,
        ts[0] * problem.direction,
        y0[0],
        first_params,
        y0.dtype,
        None if lay.batched else lay.shape,
    )
    capacity = _tape_capacity(problem, rows, size) if record else 0
    outputs = _run_kernel(kernel, problem, inputs, progress, capacity)
    out, status, t_reached, dt_next, stats, tape_times, tape_y = outputs
    tape = None
    if record:
        steps = stats[:, loop.NACCEPT].copy()
        if steps.max() > capacity:
            # The kernel takes the same steps again: now the tape holds all of them.
            outputs = _run_kernel(kernel, problem, inputs, progress, int(steps.max()))
            out, status, t_reached, dt_next, stats, tape_times, tape_y = outputs
        tape = KernelTape(tape_times, tape_y, steps)
    if inputs.batched:
        result = ensemble_result(problem, out, status, t_reached, dt_next, stats)
        return result._replace(tape=tape)
    solution = Solution(
        ts=problem.ts_array * problem.direction,
        ys=out[0].reshape(len(ts), *problem.layout.shape),
        stats=dict(zip(_STATS, stats[0].tolist(), strict=True)),
        status=int(status[0]),
        t_reached=float(t_reached[0]) * problem.direction,
        method=problem.solver.name,
    )
    return LoopResult(solution, tape, float(dt_next[0]))


# The bytes a gradient's forward may set aside for its tape at once (untouched pages cost
# nothing); a solve that needs more is run again with a tape of its exact length.
TAPE_BYTES = 1 << 30
# Steps on the tape of such a first run.
FIRST_TAPE_STEPS = 4096


def _tape_capacity(problem, rows: int, size: int) -> int:
    """How many accepted steps a recording solve keeps per trajectory: all it may take
    (``max_num_steps``), unless that needs more than :data:`TAPE_BYTES`."""
    per_step = rows * (size + loop.TAPE_COLUMNS) * 8
    if problem.max_num_steps * per_step <= TAPE_BYTES:
        return problem.max_num_steps
    return min(problem.max_num_steps, FIRST_TAPE_STEPS)


# From this size NumPy asks Linux to back an array with 2 MiB huge pages
# (madvise(MADV_HUGEPAGE) in NumPy's allocator, numpy/_core/src/multiarray/alloc.c).
_HUGE_PAGES_FROM = 1 << 22


def _untouched(shape: tuple, dtype) -> np.ndarray:
    """An empty array whose memory costs only where it is written: fresh anonymous pages,
    4 KiB each, zero until touched. An ``np.empty`` tape of 4 MiB or more gets huge pages,
    each zeroed whole on its first touch: a batch's tape, whose rows start 2 MiB or more
    apart, then cost 2 MiB of zeroing per row for the few steps each writes (14 ms of the
    Lorenz rho-sweep's 22 ms checkpoint gradient at N = 64)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _HUGE_PAGES_FROM:
        return np.empty(shape, dtype=dtype)
    # The array holds the mapping; it is unmapped when the array goes.
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


def _run_kernel(kernel, problem, inputs, progress, capacity: int) -> tuple:
    """The compiled solve of ``inputs``: ``(out, status, t_reached, dt_next, stats,
    tape_times, tape_y)``, one row per trajectory, keeping ``capacity`` steps of each."""
    y0, params, ts = inputs.y0, inputs.params, inputs.ts
    rows, size = y0.shape
    tab = kernel.arrays
    out = np.full((rows, len(ts), size), math.nan, dtype=y0.dtype)
    stats = np.zeros((rows, 4), dtype=np.int64)
    status = np.empty(rows, dtype=np.int64)
    t_reached = np.empty(rows)
    dt_next = np.empty(rows)
    tape_times = _untouched((rows, capacity, loop.TAPE_COLUMNS), np.float64)
    tape_y = _untouched((rows, capacity, size), y0.dtype)
    # An unwatched kernel never touches its watch rows.
    watched = progress is not None
    watch = numba_watch.watch_rows(rows, ts[0]) if watched else np.empty((rows, 1))
    if not inputs.batched:

        def call():
            return kernel.solve_trajectory(
                y0[0],
                params,
                ts,
                inputs.stops,
                inputs.jumps,
                inputs.rtol[0],
                inputs.atol[0],
                inputs.parts,
                bool(inputs.valid[0]),
                tab,
                inputs.settings,
                out[0],
                np.empty((loop.work_rows(tab.sizes), size), dtype=y0.dtype),
                np.empty((1, tab.sizes[DENSE_STAGES])),
                stats[0],
                watch[0],
                tape_times[0],
                tape_y[0],
            )

        dispatcher = kernel.solve_trajectory
        status[0], t_reached[0], dt_next[0] = _run(call, problem, ts, watch, progress, dispatcher)
        return out, status, t_reached, dt_next, stats, tape_times, tape_y
    arrays = (y0, params, ts, inputs.stops, inputs.jumps, inputs.rtol, inputs.atol)
    arrays += (inputs.parts, inputs.valid, tab, inputs.settings)
    results = (out, status, t_reached, dt_next, stats, watch, tape_times, tape_y)
    arguments = (*arrays, *results, _visit_order(rows))
    call = functools.partial(_in_ranges, kernel.solve_ensemble, arguments, rows)
    _run(call, problem, ts, watch, progress, kernel.solve_ensemble)
    return out, status, t_reached, dt_next, stats, tape_times, tape_y


def _in_ranges(compiled, arguments: tuple, rows: int) -> None:
    """``compiled(*arguments, groups, shared)`` on odecore's threads, each taking ranges of
    the ``rows`` trajectories (``_lane_groups``) from the counter ``shared`` until none is
    left: the batch kernels' shared way of running."""
    count = numba_threads.threads()
    groups, shared = _lane_groups(rows, count), numba_threads.counter()
    call = functools.partial(compiled, *arguments, groups, shared)
    numba_threads.run(call, len(groups), shared, count)


def _run(call, problem, ts, watch, progress, dispatcher):
    """``call()``: directly, or watched in a thread of its own when progress is reported
    (``dispatcher``: the kernel function it calls, which says whether it compiles first)."""
    if progress is None:
        return call()
    t0, t1 = float(ts[0]), float(ts[-1])
    # Asked only here: a dispatcher's signatures cost more than a short solve's kernel call.
    compiles = not dispatcher.signatures
    return numba_watch.run_watched(
        call, watch, progress, t0, t1, float(problem.direction), compiles
    )


_STATS = ("nfev", "nsteps", "naccept", "nreject")


def compiles(problem, options, record: bool) -> bool:
    """``Kernels.compiles``: whether a gradient's forward solve of ``problem`` (``record``:
    the checkpoint's, which keeps a tape) runs compiled. It does for the dynamics and
    inputs ``odeint`` compiles, and for the checkpoint when ``func.vjp`` compiles too; other
    dynamics with a ``vjp`` (an object with ``__call__``, say, or ``params`` that are not
    one array) take the generic loop, as on NumPy."""
    dyn = problem.dynamics
    func, params = dyn.user_func, dyn.params
    lay = problem.layout
    if not _compilable(func) or lay.casts or problem.callbacks is not None:
        return False
    if problem.interp == "linear" or problem.events is not None:
        return False
    if lay.batched and (len(lay.shape) != 2 or lay.batch_axis != 0):
        return False
    if params is not None and not (
        isinstance(params, np.ndarray) and np.issubdtype(params.dtype, np.number)
    ):
        return False
    norm = (options or {}).get("norm", "rms")
    if not isinstance(norm, str) and not (isinstance(norm, LargestPartRMS) and norm.sizes):
        return False
    try:
        _form(func, params is not None)
    except TypeError:
        return False
    if record:
        vjp = getattr(func, "vjp", None)
        if not _compilable(vjp):
            return False
        # A VJP of neither form is refused here, naming both, as the backsolve refuses it;
        # on the generic loop its message named odecore's wrapper and the returning form only.
        _vjp_form(vjp)
    return True


def _replay_ensemble(
    tape_times, tape_y, steps, params, ts, jumps, out_bar, tab, settings, a, params_bar, order,
    groups, shared,
):  # fmt: skip
    """The checkpoint gradient of every trajectory of a compiled solve, in ``order``
    (``_visit_order``), taken in ranges, rows of ``groups``, from the counter ``shared``
    until none is left (``numba_threads``: every thread runs this), from their tapes
    (``odecore.kernels.replay``): ``a`` (N, D) receives the cotangents of the ``y0`` rows,
    ``params_bar`` (N, P) those of each trajectory's parameters. ``out_bar`` (N, T, D) holds
    the outputs' cotangents."""
    count, size = a.shape
    shared_params = params.shape[0] == 1 and count > 1
    nodes = tab.sizes[DENSE_STAGES]
    g = take_range(shared)
    while g < groups.shape[0]:
        for k in range(groups[g, 0], groups[g, 1]):
            n = order[k]
            own = params[0] if shared_params else params[n]
            cot = np.empty((COTANGENT_ROWS, size), dtype=a.dtype)
            scratch = (
                np.empty((loop.FIRST_DENSE_ROW + nodes, size), dtype=a.dtype),
                np.empty((nodes, size), dtype=a.dtype),
                np.empty(nodes),
                np.empty((nodes, size), dtype=a.dtype),
                cot,
                np.empty_like(own),
                np.empty((1, nodes)),
            )
            replay_trajectory(  # noqa: F821  (bound per dynamics and VJP)
                tape_times[n], tape_y[n], steps[n], own, ts, jumps, out_bar[n], tab, settings,
                scratch, params_bar[n],
            )  # fmt: skip
            for i in range(size):
                a[n, i] = cot[ADJOINT, i]
        range_done(shared)
        g = take_range(shared)


def _jit_replay(fn):
    return one_copy_per_type(numba.njit(fn, **numba_options.replay_options(fn.__name__)))


def _replay_kernel(kernel, func):
    """The compiled replay of ``kernel``'s tapes with ``func.vjp``, once per kernel and VJP:
    kept on disk beside a kernel kept there (``numba_cache.load_replay``), else compiled in
    memory."""
    vjp = func.vjp
    compiled = kernel.replays.get(vjp)
    if compiled is None:
        vjp_form = _vjp_form(vjp)
        source = inspect.getsource(_replay_ensemble)
        module = numba_cache.load_replay(kernel.module, func, vjp_form, source)
        if module is not None:
            compiled = module.replay_ensemble
        else:
            functions = compiled_replay(
                _jit_replay,
                _compiled_rules(),
                kernel.functions,
                _vjp_in_place(vjp),
                kernel.state_size,
            )
            bound = bind(_replay_ensemble, {"replay_trajectory": functions.replay_trajectory})
            compiled = numba.njit(bound, nogil=True)
        kernel.replays[vjp] = compiled
    return compiled


def replay(problem, tape, ys_bar):
    """``Kernels.replay``: the checkpoint gradient from a compiled solve's tape, ``(y0_bar,
    leaves_bar)``, as ``odecore.adjoint.checkpoint.checkpoint_backward`` returns it."""
    dyn = problem.dynamics
    func = dyn.user_func
    inputs = kernel_inputs(problem, None)
    y0, params = inputs.y0, inputs.params
    rows, size = y0.shape
    kernel = _kernel(func, inputs.form, problem.solver.tableau, size, _dtype_name(y0.dtype))
    first_params = params[0] if inputs.batched else params
    _probe_vjp(func.vjp, problem, y0[0], first_params, "checkpoint")
    compiled = _replay_kernel(kernel, func)
    lay = problem.layout
    out_bar = np.asarray(lay.outputs_to_internal(np, ys_bar), dtype=y0.dtype)
    out_bar = np.ascontiguousarray(out_bar.reshape(len(inputs.ts), rows, size).transpose(1, 0, 2))
    params_rows = params if inputs.batched else params.reshape(1, -1)
    a = np.empty((rows, size), dtype=y0.dtype)
    params_bar = np.zeros((rows, params_rows.shape[1]), dtype=params_rows.dtype)
    arrays = (tape.times, tape.y, tape.steps, params_rows, inputs.ts, inputs.jumps, out_bar)
    arrays += (kernel.arrays, inputs.settings, a, params_bar, _visit_order(rows))
    _in_ranges(compiled, arrays, rows)
    a0 = lay.to_user(np, a.reshape(lay.internal_shape))
    # One array of parameters (Kernels.compiles): a row per trajectory, or one row that
    # every trajectory shares, whose cotangent is their sum.
    if params_rows.shape[0] == 1:
        params_bar = params_bar.sum(axis=0)
    leaves_bar = [
        params_bar.reshape(np.shape(leaf)).astype(leaf.dtype, copy=False) for leaf in dyn.leaves
    ]
    return a0, leaves_bar


class _GenericForm:
    """Dynamics written in place (``f(t, y, dy, params)``, or a VJP ``vjp(t, y, params,
    cotangent, y_bar, params_bar)``) in the returning forms the generic loop calls: the
    checkpoint's replay and the time gradients run there. ``y`` is seen flattened, as in the
    kernel."""

    def __init__(self, func, in_place: bool, vjp, vjp_in_place: bool):
        self.user = func
        self.in_place = in_place
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        if vjp is not None:
            self._user_vjp = vjp
            self.vjp = self._vjp_in_place if vjp_in_place else vjp

    def __call__(self, t, y, params=None):
        if not self.in_place:
            return self.user(t, y) if params is None else self.user(t, y, params)
        flat = np.ascontiguousarray(y).reshape(-1)
        dy = np.empty_like(flat)
        self.user(t, flat, dy, _NO_PARAMS if params is None else params)
        return dy.reshape(np.shape(y))

    def _vjp_in_place(self, t, y, params, cotangent):
        flat = np.ascontiguousarray(y).reshape(-1)
        y_bar = np.zeros_like(flat)
        params_bar = np.zeros_like(_NO_PARAMS if params is None else params)
        own = _NO_PARAMS if params is None else params
        self._user_vjp(t, flat, own, np.ascontiguousarray(cotangent).reshape(-1), y_bar, params_bar)
        return y_bar.reshape(np.shape(y)), (None if params is None else params_bar)

    def __repr__(self) -> str:
        return repr(self.user)


_NO_PARAMS = np.zeros(0)
_generic_forms: dict = {}


class _Rows:
    """A batch's dynamics, written for one trajectory as the kernel calls them (its (D,)
    state and its row of ``params``), in the batched form the generic loop calls, one call
    per row. On a numba batch the generic loop serves the time gradients, the backsolve and
    events; without this it would hand ``f`` the whole (N, D) batch."""

    def __init__(self, single):
        self.single = single
        self.__name__ = getattr(single, "__name__", type(single).__name__)
        if getattr(single, "vjp", None) is not None:
            self.vjp = self._vjp

    def __call__(self, t, y, params=None):
        times = np.broadcast_to(np.asarray(t), y.shape[:1])
        if params is None:
            return np.stack([self.single(times[n], y[n]) for n in range(y.shape[0])])
        return np.stack([self.single(times[n], y[n], _row(params, n)) for n in range(y.shape[0])])

    def _vjp(self, t, y, params, cotangent):
        times = np.broadcast_to(np.asarray(t), y.shape[:1])
        pairs = [
            self.single.vjp(times[n], y[n], _row(params, n), cotangent[n])
            for n in range(y.shape[0])
        ]
        y_bar = np.stack([np.asarray(pair[0]) for pair in pairs])
        if params is None:
            return y_bar, None
        rows = [np.asarray(pair[1]) for pair in pairs]
        # A shared row's cotangent is the sum of what every trajectory sends it.
        return y_bar, (np.stack(rows) if np.ndim(params) == 2 else np.sum(rows, axis=0))

    def __repr__(self) -> str:
        return repr(self.single)


def _row(params, n):
    """Trajectory ``n``'s parameters: its row of a (N, P) ``params``, or a shared (P,)."""
    return params[n] if params is not None and np.ndim(params) == 2 else params


def _generic_form(func, params, batched=False):
    """``Backend.generic_form`` for the numba backend: see :class:`_GenericForm` and, for a
    batch, :class:`_Rows`."""
    in_place = _form(func, params is not None) == "in place"
    key = (func, params is not None, batched)
    wrapped = _generic_forms.get(key)
    if wrapped is None:
        vjp = getattr(func, "vjp", None)
        vjp_in_place = vjp is not None and _positional_count(vjp, VJP_FORMS) == 6
        wrapped = func
        if in_place or vjp_in_place:
            wrapped = _GenericForm(func, in_place, vjp, vjp_in_place)
        if batched:
            wrapped = _Rows(wrapped)
        _generic_forms[key] = wrapped
    return wrapped


class NumbaBackend(NumpyBackend):
    """NumPy arrays, with every solve compiled whole (``Kernels.solve``). The gradient
    rules run the generic loop, as on NumPy."""

    name = "numba"

    # f sees one trajectory and, of a (N, P) params, that trajectory's row.
    sample_param_rows = True

    def generic_form(self, func, params, batched=False):
        return _generic_form(func, params, batched)

    @property
    def generic_backend(self):
        # The same NumPy arrays, solved by the generic loop.
        return NUMPY_BACKEND

    kernels = Kernels(
        stage_store=BufferStages,
        rms_error_ratio=_rms_error_ratio,
        solve=solve,
        replay=replay,
        compiles=compiles,
        adjoint_dynamics=adjoint_dynamics,
    )


BACKEND = NumbaBackend()
