"""Ensembles: many independent trajectories of one system, solved in chunks, in this process or
on a Dask cluster.

A parameter sweep or an uncertainty study solves the same dynamics from many initial states
and parameters. :func:`solve` splits the trajectories into chunks of ``chunk_size`` rows and
solves each chunk with the backend's own batched solve (``odecore.solve`` with
``batch_axis=0``; on the numba backend, the compiled kernel run in parallel over the
trajectories). Without a ``client`` the chunks run one after another here; with a
``dask.distributed.Client`` each chunk is one task on the cluster. Either way a chunk's rows
are solved independently of the others, so the results are those of one batched solve of all
the trajectories: bit for bit on the numba backend; on the generic batched solve, to
rounding (BLAS sums a batch's stages in an order that depends on its shape), which in float32
can tip a step's acceptance, so that a row takes a step more or fewer.

Every chunk is solved with ``throw=False``: a trajectory that fails (too many steps, a state
that blows up, an invalid initial state) has its :class:`~odecore.Status` in ``status`` and NaN
outputs after the time it reached, and the other trajectories are unaffected.

The dynamics travel to the workers once per chunk as bytes, but are rebuilt once per process
(:class:`_Shipped`): the numba backend keeps its compiled kernel per function object, so each
worker compiles it once (or loads it from the disk cache, for dynamics that can be imported by
name), however many chunks it runs. A task whose worker dies is run again by Dask on another
worker; its chunk is one task with one result, so nothing is lost or counted twice.

Dask is needed only with a ``client`` or for ``output="dask"``; ``import odecore`` does not
import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from odecore import _validate
from odecore._config import resolve_backend
from odecore.backend import get_backend
from odecore.ode import progress as progress_reports
from odecore.ode.api import solve as solve_batch
from odecore.ode.solution import Status

#: Rows per chunk when ``chunk_size`` is not given: large enough that a worker spends well
#: under 5% of a chunk's time on Dask's scheduling (docs/scaling_out.md has the measurement).
DEFAULT_CHUNK_SIZE = 16384

OUTPUTS = ("numpy", "dask")
_COUNTS = ("nsteps", "naccept", "nreject")
# Set by the ensemble itself: a chunk is a batch along axis 0 that never raises.
_RESERVED = ("batch_axis", "throw")
# Keywords of odecore.solve that may hold one row per trajectory, split like y0.
_TOLERANCES = ("rtol", "atol")


@dataclass
class EnsembleSolution:
    """The result of [`odecore.ensemble.solve`][odecore.ensemble.solve].

    NumPy arrays, or Dask arrays chunked like the trajectories (``output="dask"``).

    Attributes
    ----------
    ts : ndarray
        The output times, shape (T,).
    ys : array
        Shape (T, N, D): the state of trajectory ``n`` at ``ts[i]`` is ``ys[i, n]``.
    status : array of int
        Per trajectory, a [`Status`][odecore.Status] code.
    t_reached : array
        Per trajectory, the time it reached.
    stats : dict
        Per trajectory, ``nsteps``, ``naccept`` and ``nreject``.
    chunk_size : int
        The rows per chunk the solve used.

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import ensemble
    >>> def decay(t, y, rate):  # a chunk's rows: y (n, 1), rate (n, 1)
    ...     return -rate * y
    >>> rates = np.linspace(0.0, 1.0, 5)[:, None]
    >>> result = ensemble.solve(decay, np.ones((5, 1)), np.array([0.0, 1.0]), params=rates,
    ...                         backend="numpy", chunk_size=2, rtol=1e-10, atol=1e-12)
    >>> result.ys.shape, result.status.tolist(), result.success, result.chunk_size
    ((2, 5, 1), [0, 0, 0, 0, 0], True, 2)
    """

    ts: np.ndarray
    ys: Any
    status: Any
    t_reached: Any
    stats: dict[str, Any]
    chunk_size: int

    @property
    def success(self) -> bool:
        """Whether every trajectory succeeded (computes ``status`` when it is a Dask array)."""
        return bool(np.all(np.asarray(self.status) == Status.SUCCESS))


def solve(
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    *,
    params: Any = None,
    backend: str = "numba",
    chunk_size: int | None = None,
    client: Any = None,
    output: Literal["numpy", "dask"] = "numpy",
    **solve_kwargs: Any,
) -> EnsembleSolution:
    """Solve ``dy/dt = func(t, y, params)`` for every row of ``y0`` (N, D), in chunks.

    The trajectories are split into chunks of ``chunk_size`` rows, each solved with the
    backend's own batched solve ([`odecore.solve`][odecore.solve] with ``batch_axis=0``; on the
    numba backend, the compiled kernel run in parallel over the trajectories). A chunk's rows are
    solved independently of the others, so the results are those of one batched solve of all
    the trajectories: bit for bit on the numba backend, to rounding on the generic batched
    solve (BLAS sums a batch's stages in an order that depends on its shape; in float32 that
    can tip a step's acceptance, a step more or fewer for a row). Every chunk is
    solved with ``throw=False``: a trajectory that fails has its status in ``status`` and NaN
    outputs after the time it reached, and the other trajectories are unaffected.

    Parameters
    ----------
    func : callable
        The dynamics, in the form the backend's batched solve takes: on ``backend="numba"`` one
        trajectory's kernel form (``f(t, y, params) -> dy`` or ``f(t, y, dy, params)``, in
        Numba's nopython subset), on ``"numpy"``, ``"torch"`` or ``"jax"`` a function of the
        (n, D) rows of a chunk, whose ``params`` it receives as that backend's arrays, as ``y``.
    y0 : array of shape (N, D)
        One row per trajectory; a NumPy or Dask array.
    t : 1-D array
        The output times, shared by every trajectory.
    params : array, optional
        One row per trajectory (N, P), one row shared by all (P,), or None; NumPy or Dask.
    backend : str, default "numba"
        The backend each chunk is solved on.
    chunk_size : int, optional
        Rows per chunk; by default ``min(16384, N)``, and at most N
        (``EnsembleSolution.chunk_size`` is the number used).
    client : dask.distributed.Client, optional
        With a client each chunk is one task on its cluster; without one the same chunks run
        in this process.
    output : {"numpy", "dask"}, default "numpy"
        ``"numpy"`` waits for every chunk and returns NumPy arrays; ``"dask"`` returns Dask
        arrays, computing in the background on the client's cluster (``Client.persist``), or
        lazily without one.
    **solve_kwargs
        The arguments of [`odecore.solve`][odecore.solve] (``rtol``, ``atol``, ``method``,
        ``options``, ...), except ``batch_axis`` and ``throw``, which the ensemble sets, and
        ``event``; shared by every chunk, except tolerances of one row per trajectory ((N, 1)
        or (N, D), as ``odecore.solve`` takes them with ``batch_axis=0``), which are split
        with the rows. ``progress`` reports the chunks as one solve (the steps summed over
        them; the time ``t[0]`` until the last chunk runs, since the rows still to run have
        not left it), only without a ``client`` and with ``output="numpy"``.

    Returns
    -------
    EnsembleSolution
        ``ys`` (T, N, D), and per trajectory ``status``, ``t_reached`` and ``stats``.

    Raises
    ------
    TypeError
        ``y0`` is not an array, ``solve_kwargs`` names ``batch_axis`` or ``throw``, or
        ``chunk_size`` is not an integer.
    ValueError
        ``y0`` is not of shape (N, D) with N >= 1 and D >= 1, ``params`` is not (N, P) or (P,),
        ``chunk_size`` is below 1, ``rtol`` or ``atol`` is neither shared by every
        trajectory (a number, (D,) or (1, D)) nor one row per trajectory ((N, 1) or (N, D)),
        ``output`` is unknown, ``event`` is given (use
        [`odecore.solve`][odecore.solve] with ``batch_axis=0`` for events), ``progress`` is
        given with a ``client`` or ``output="dask"``, or a Dask ``y0`` or ``params`` has an
        unknown number of rows (call its ``compute_chunk_sizes()`` first).

    Examples
    --------
    ``dy/dt = -rate y`` for five rates, in chunks of two trajectories:

    >>> import numpy as np
    >>> from odecore import ensemble
    >>> def decay(t, y, rate):  # a chunk's rows: y (n, 1), rate (n, 1)
    ...     return -rate * y
    >>> rates = np.linspace(0.0, 1.0, 5)[:, None]
    >>> result = ensemble.solve(decay, np.ones((5, 1)), np.array([0.0, 1.0]), params=rates,
    ...                         backend="numpy", chunk_size=2, rtol=1e-10, atol=1e-12)
    >>> result.success, result.ys.shape
    (True, (2, 5, 1))
    >>> bool(np.allclose(result.ys[-1, :, 0], np.exp(-rates[:, 0])))
    True
    """
    _check_keywords(solve_kwargs, output)
    progress = solve_kwargs.pop("progress", None)
    _check_progress(progress, client, output)
    y0, params, count = _inputs(y0, params)
    _check_state_dtype(backend, y0.dtype)
    size = _chunk_size(chunk_size, count)
    bounds = [(start, min(start + size, count)) for start in range(0, count, size)]
    rows, shared = _split_rows(y0, params, solve_kwargs, count)
    spec = _ChunkSpec(_Shipped(func), np.asarray(t), backend, shared)
    if client is None and output == "numpy":
        return _solve_here(spec, rows, bounds, progress, size)
    return _solve_with_dask(spec, rows, bounds, client, output, size)


def _check_keywords(solve_kwargs: dict, output) -> None:
    for name in _RESERVED:
        if name in solve_kwargs:
            raise TypeError(
                f"odecore.ensemble.solve sets {name} itself (a chunk is a batch along axis 0 "
                f"whose failed trajectories are reported in status); remove {name}="
                f"{solve_kwargs[name]!r}"
            )
    if solve_kwargs.get("event") is not None:
        raise ValueError(
            "odecore.ensemble.solve does not return event records; solve the rows with "
            "odecore.solve(..., batch_axis=0, event=...), whose Solution.events has each "
            "trajectory's event"
        )
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def _check_progress(progress, client, output) -> None:
    progress_reports.check(progress)
    if progress is None or progress is False or (client is None and output == "numpy"):
        return
    # Dask tasks run on a cluster's workers, or, for output="dask", whenever and in whatever
    # order the arrays are computed: a target here could neither follow them nor be closed
    # when the last one ends.
    raise ValueError(
        "odecore.ensemble.solve reports progress= only for chunks run in this process "
        "(client=None, output='numpy'); with a client or output='dask' the chunks are Dask "
        "tasks: follow them with Dask's own tools (the dashboard at client.dashboard_link, "
        "dask.distributed.progress, or dask.diagnostics.ProgressBar without a client)"
    )


def _inputs(y0, params):
    """``y0`` and ``params`` checked: NumPy arrays, or Dask arrays with each row in one
    chunk along the state axis; the number of trajectories."""
    if not _is_dask(y0):
        # None or a string made a 0-d array, refused for its shape rather than its kind.
        need = "an array of shape (N, D), one row per trajectory"
        y0 = np.asarray(_validate.as_array(get_backend("numpy"), y0, "y0", need))
    if y0.ndim != 2 or y0.shape[0] == 0 or y0.shape[1] == 0:
        # Rows of no elements were refused by each chunk's solve, naming the chunk's shape.
        raise ValueError(
            f"y0 must be one row per trajectory, shape (N, D) with N >= 1 and D >= 1, got "
            f"shape {y0.shape}; flatten each trajectory's state into its row"
        )
    _check_rows_known("y0", y0)
    count = y0.shape[0]
    if params is not None:
        params = params if _is_dask(params) else np.asarray(params)
        if params.ndim == 2:
            _check_rows_known("params", params)
        if params.ndim > 2 or (params.ndim == 2 and params.shape[0] != count):
            raise ValueError(
                f"params must be one row per trajectory, shape ({count}, P), or one row shared "
                f"by all, shape (P,); got shape {params.shape}"
            )
    return y0, params, count


def _check_state_dtype(backend, dtype) -> None:
    """Refuse a ``y0`` dtype that every chunk's solve would refuse (an integer one, say), with
    that solve's message, at the call: a Dask array's chunks are solved only when it is
    computed, and the error would come from there, with a result of the wrong dtype before."""
    bk = resolve_backend(backend, np.zeros(0, dtype))
    _validate.initial_state(bk, np.zeros(1, dtype), finite=False)


def _check_rows_known(name: str, value) -> None:
    rows = value.shape[0]
    if isinstance(rows, float) and math.isnan(rows):
        raise ValueError(
            f"{name} has an unknown number of rows (a Dask array of shape {value.shape}, as "
            f"boolean indexing makes), so it cannot be split into chunks; call "
            f"{name} = {name}.compute_chunk_sizes() first"
        )


def _chunk_size(chunk_size, count: int) -> int:
    """The rows per chunk: the ``chunk_size`` asked for, or fewer when there are fewer rows."""
    if chunk_size is None:
        return min(DEFAULT_CHUNK_SIZE, count)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise TypeError(
            f"chunk_size must be a positive integer (trajectories per chunk), got "
            f"{type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return min(int(chunk_size), count)


def _is_dask(value) -> bool:
    dask_array = sys.modules.get("dask.array")
    return dask_array is not None and isinstance(value, dask_array.Array)


def _materialize(value):
    return np.asarray(value)


def _split_rows(y0, params, solve_kwargs: dict, count: int) -> tuple[dict, dict]:
    """The arguments with one row per trajectory, of which each chunk takes its rows (``y0``,
    and ``params`` and tolerances of N rows), and the arguments every chunk shares."""
    rows, shared = {"y0": y0}, dict(solve_kwargs)
    if params is not None and params.ndim == 2:
        rows["params"] = params
    else:
        shared["params"] = params
    for name in _TOLERANCES:
        value = shared.get(name)
        if value is None:
            continue
        _check_tolerance_shape(name, tuple(np.shape(value)), count, y0.shape[1])
        # (N, 1) or (N, D), as odecore.solve(batch_axis=0) takes per-trajectory tolerances;
        # a (D,) tolerance is one per state element, shared by every row.
        if np.ndim(value) == 2 and np.shape(value)[0] == count:
            value = shared.pop(name)
            rows[name] = value if hasattr(value, "shape") else np.asarray(value)
    return rows, shared


def _check_tolerance_shape(name: str, shape: tuple, count: int, width: int) -> None:
    """Refuse a tolerance that is neither one per trajectory nor shared by all. Each chunk
    checks its tolerance against its own rows only: a (2, 1) tolerance of a sweep of 4
    trajectories in chunks of 2 would be taken as each chunk's own two rows, and an error
    would name a chunk's shape, which the user never gave."""
    if len(shape) <= 2 and shape[-1:] in ((), (1,), (width,)):
        if len(shape) < 2 or shape[0] in (1, count):
            return
    shared = f"({width},)" if width == 1 else f"one per state element, ({width},) or (1, {width})"
    own = f"({count}, 1)" if width == 1 else f"({count}, 1) or ({count}, {width})"
    raise ValueError(
        f"{name} of shape {shape} does not fit y0 of shape ({count}, {width}): give a number "
        f"or {shared}, shared by every trajectory, or one row per trajectory, {own}"
    )


def _chunk_rows(rows: dict, lo: int, hi: int, convert) -> dict:
    """One chunk's rows of each per-trajectory argument, passed through ``convert``."""
    return {name: convert(value[lo:hi]) for name, value in rows.items()}


class _Shipped:
    """``func`` pickled (with cloudpickle, so a function of a script or a closure travels
    too) and rebuilt at most once per process: every chunk a worker runs then sees the same
    function object, under which the numba backend keeps its compiled kernel."""

    def __init__(self, func):
        self.func = func
        self._payload: bytes | None = None

    def payload(self) -> bytes:
        if self._payload is None:
            import cloudpickle

            self._payload = cloudpickle.dumps(self.func)
        return self._payload

    def __reduce__(self):
        payload = self.payload()
        return _received_dynamics, (hashlib.sha256(payload).hexdigest(), payload)

    def __dask_tokenize__(self):
        return hashlib.sha256(self.payload()).hexdigest()


_received: dict[str, Any] = {}
_received_lock = threading.Lock()


def _received_dynamics(digest: str, payload: bytes) -> _Shipped:
    with _received_lock:
        func = _received.get(digest)
        if func is None:
            import cloudpickle

            func = _received[digest] = cloudpickle.loads(payload)
    return _Shipped(func)


@dataclass(frozen=True)
class _ChunkSpec:
    """What every chunk shares: the dynamics, the output times, the backend, the keywords."""

    dynamics: _Shipped
    t: np.ndarray
    backend: Any
    solve_kwargs: dict

    def __dask_tokenize__(self):
        from dask.base import tokenize

        return self.dynamics.__dask_tokenize__(), tokenize(self.t, self.backend, self.solve_kwargs)


# A batch's kernel already runs on every core of the process (adapters/numba_threads.py): two
# chunks at once in a Dask worker with several threads would only compete for them.
_kernel_lock = threading.Lock()


def _solve_here(spec: _ChunkSpec, rows: dict, bounds, progress, size: int) -> EnsembleSolution:
    """The chunks one after another in this process, reported to ``progress`` as one solve."""
    if progress is None or progress is False:
        parts = [_solve_chunk(spec, _chunk_rows(rows, lo, hi, _materialize)) for lo, hi in bounds]
        return _assemble_numpy(spec.t, parts, size)
    reporting = progress_reports.Consecutive(progress, spec.t[0], spec.t[-1], len(bounds))
    try:
        parts = [
            _solve_chunk(spec, _chunk_rows(rows, lo, hi, _materialize), reporting)
            for lo, hi in bounds
        ]
    finally:
        reporting.close_all()
    return _assemble_numpy(spec.t, parts, size)


def _solve_chunk(spec: _ChunkSpec, rows: dict, progress=None):
    """``(ys (T, n, D), status (n,), t_reached (n,), counts (n, 3))`` of one chunk, whose
    per-trajectory arguments are ``rows``."""
    rows = dict(rows)
    y0 = rows.pop("y0")
    shared = dict(spec.solve_kwargs)
    # The solve converts y0 to the backend's arrays, but params are the user's to read:
    # func computes with both, and on torch a NumPy row of params times a tensor of states
    # fails. A chunk's params are therefore the backend's arrays too.
    owner = rows if "params" in rows else shared
    if owner.get("params") is not None:
        bk = resolve_backend(spec.backend, {"y0": y0})
        owner["params"] = bk.asarray(owner["params"])
    name = getattr(spec.backend, "name", spec.backend)
    with _kernel_lock if name == "numba" else contextlib.nullcontext():
        solution = solve_batch(
            spec.dynamics.func,
            y0,
            spec.t,
            batch_axis=0,
            backend=spec.backend,
            throw=False,
            progress=progress,
            **shared,
            **rows,
        )
    count = y0.shape[0]
    counts = np.stack(
        [np.broadcast_to(np.asarray(solution.stats[name]), (count,)) for name in _COUNTS], axis=1
    )
    return (
        np.asarray(solution.ys),
        np.asarray(solution.status).reshape(count),
        np.asarray(solution.t_reached).reshape(count),
        counts,
    )


def _assemble_numpy(ts, parts, size: int) -> EnsembleSolution:
    counts = np.concatenate([part[3] for part in parts])
    return EnsembleSolution(
        ts=ts,
        ys=np.concatenate([part[0] for part in parts], axis=1),
        status=np.concatenate([part[1] for part in parts]),
        t_reached=np.concatenate([part[2] for part in parts]),
        stats={name: counts[:, k] for k, name in enumerate(_COUNTS)},
        chunk_size=size,
    )


def _solve_with_dask(spec, rows, bounds, client, output, size) -> EnsembleSolution:
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise ImportError(
            "odecore.ensemble.solve needs Dask with a client or output='dask': "
            'pip install "odecore[dask]" (dask[distributed])'
        ) from None
    _check_client(client)
    chunk = dask.delayed(_solve_chunk, pure=True)
    parts = [chunk(spec, _chunk_rows(rows, lo, hi, _as_delayed)) for lo, hi in bounds]
    if output == "numpy":
        return _assemble_numpy(np.asarray(spec.t), client.gather(client.compute(parts)), size)
    return _dask_arrays(da, spec, rows["y0"], parts, bounds, client, size)


def _as_delayed(value):
    """A chunk's rows as a task argument: a Dask array's rows as one block (computed on the
    worker), a NumPy array's as themselves."""
    if _is_dask(value):
        return value.rechunk(value.shape).to_delayed().reshape(-1)[0]
    return value


def _check_client(client) -> None:
    if client is None:
        return
    from distributed import Client

    if not isinstance(client, Client):
        raise TypeError(
            f"client must be a dask.distributed.Client, got {type(client).__name__}; pass "
            f"client=None to solve the chunks in this process"
        )


def _dask_arrays(da, spec, y0, parts, bounds, client, size) -> EnsembleSolution:
    steps, width = len(spec.t), y0.shape[1]
    state, integer, time = _output_dtypes(spec.backend, y0.dtype)

    def column(index, shape_of, kind):
        blocks = [
            da.from_delayed(part[index], shape=shape_of(hi - lo), dtype=kind)
            for part, (lo, hi) in zip(parts, bounds, strict=True)
        ]
        return da.concatenate(blocks, axis=1 if index == 0 else 0)

    arrays = [
        column(0, lambda n: (steps, n, width), state),
        column(1, lambda n: (n,), integer),
        column(2, lambda n: (n,), time),
        column(3, lambda n: (n, len(_COUNTS)), integer),
    ]
    if client is not None:
        arrays = client.persist(arrays)
    ys, status, t_reached, counts = arrays
    return EnsembleSolution(
        ts=np.asarray(spec.t),
        ys=ys,
        status=status,
        t_reached=t_reached,
        stats={name: counts[:, k] for k, name in enumerate(_COUNTS)},
        chunk_size=size,
    )


def _output_dtypes(backend, dtype) -> tuple[np.dtype, np.dtype, np.dtype]:
    """The dtypes of a chunk's outputs on ``backend`` for a state of ``dtype``: the state as
    the backend holds it (JAX without x64 holds float64 in float32), its counters (``status``
    and the step counts) and its time (``t_reached``), as :func:`_solve_chunk` returns them."""
    bk = resolve_backend(backend, np.zeros(0, dtype))
    xp = bk.xp

    def host(array) -> np.dtype:
        return np.asarray(array).dtype

    return (
        host(xp.asarray(np.zeros(0, dtype))),
        host(xp.zeros(0, dtype=bk.int_dtype)),
        host(xp.zeros(0, dtype=bk.time_dtype)),
    )


__all__ = ["DEFAULT_CHUNK_SIZE", "OUTPUTS", "EnsembleSolution", "solve"]
