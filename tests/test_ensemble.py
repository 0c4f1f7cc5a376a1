"""Ensembles in chunks (``odecore.ensemble.solve``), in this process and on a Dask
``LocalCluster`` of two worker processes.

The reference is the single-process batched solve of every trajectory at once
(``odecore.solve`` with ``batch_axis=0``, ``throw=False``): each trajectory's solve depends on
its own row only, so any split into chunks, run anywhere, must give the same bits. One row is
also checked against scipy's DOP853 at tight tolerances, so that the reference is a solution.

The dynamics come from a module: the workers import it by name and find
the kernel the test process compiled in the disk cache (tests/conftest.py's cache directory),
instead of compiling it again (tens of seconds each).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import warnings

import numpy as np
import pytest
from backend_params import framework_module, optional_module
from kernel_dynamics import lorenz
from scipy.integrate import solve_ivp

import odecore
from odecore import ensemble

pytestmark = pytest.mark.backend("numba")

framework_module("numba")
distributed = optional_module("dask", "distributed")
da = optional_module("dask", "dask.array")


# 48 chunks of 64: enough work per chunk (a few tens of ms) that a worker can be killed while
# others are still queued.
COUNT, CHUNK = 3072, 64
T = np.linspace(0.0, 4.0, 5)
TOLERANCES = {"rtol": 1e-8, "atol": 1e-8}
# A trajectory that starts at NaN fails (INVALID_INPUT) without failing the others.
INVALID = 7


def sweep() -> tuple[np.ndarray, np.ndarray]:
    """The Lorenz rho-sweep: rho evenly in [0, 28], the initial state nudged per row."""
    rho = np.linspace(0.0, 28.0, COUNT)
    params = np.stack([np.full(COUNT, 10.0), rho, np.full(COUNT, 8.0 / 3.0)], axis=1)
    y0 = np.tile([1.0, 0.0, 0.0], (COUNT, 1)) + 1e-3 * np.arange(COUNT)[:, None] / COUNT
    y0[INVALID] = np.nan
    return y0, params


@pytest.fixture(scope="module")
def inputs():
    return sweep()


@pytest.fixture(scope="module")
def reference(inputs):
    y0, params = inputs
    return odecore.solve(
        lorenz, y0, T, params=params, batch_axis=0, backend="numba", throw=False, **TOLERANCES
    )


@pytest.fixture(scope="module")
def client():
    # Spawned worker processes inherit sys.path and the environment (the kernel cache
    # directory); one thread each, as numba's kernel uses the process's cores itself.
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
        distributed.Client(cluster) as connected,
    ):
        yield connected


def assert_equals_reference(solution, reference) -> None:
    np.testing.assert_array_equal(np.asarray(solution.ys), reference.ys)
    np.testing.assert_array_equal(np.asarray(solution.status), reference.status)
    np.testing.assert_array_equal(np.asarray(solution.t_reached), reference.t_reached)
    for name in ("nsteps", "naccept", "nreject"):
        np.testing.assert_array_equal(np.asarray(solution.stats[name]), reference.stats[name])


def test_reference_is_a_solution_and_reports_the_invalid_row(inputs, reference):
    y0, params = inputs
    row = COUNT - 1
    tight = solve_ivp(
        lambda t, y: [
            params[row, 0] * (y[1] - y[0]),
            y[0] * (params[row, 1] - y[2]) - y[1],
            y[0] * y[1] - params[row, 2] * y[2],
        ],
        (T[0], T[-1]),
        y0[row],
        method="DOP853",
        t_eval=T,
        rtol=1e-13,
        atol=1e-13,
    )
    # rtol = atol = 1e-8 per step, over a few hundred steps of a system whose errors grow by
    # about e^(0.9 t) (its largest Lyapunov exponent): well inside 1e-5 at t = 4.
    np.testing.assert_allclose(reference.ys[:, row], tight.y.T, rtol=1e-5, atol=1e-5)
    expected = np.zeros(COUNT, dtype=np.int64)
    expected[INVALID] = odecore.Status.INVALID_INPUT
    np.testing.assert_array_equal(reference.status, expected)


def test_local_chunks_equal_one_batched_solve(inputs, reference):
    y0, params = inputs
    solution = ensemble.solve(lorenz, y0, T, params=params, chunk_size=1000, **TOLERANCES)
    assert solution.ys.shape == (len(T), COUNT, 3)
    assert not solution.success
    assert_equals_reference(solution, reference)


def test_cluster_equals_one_batched_solve_and_compiles_once_per_worker(client, inputs, reference):
    y0, params = inputs
    solution = ensemble.solve(
        lorenz, y0, T, params=params, chunk_size=CHUNK, client=client, **TOLERANCES
    )
    assert_equals_reference(solution, reference)

    def functions_with_kernels():
        from odecore.adapters import numba as adapter

        return sum(func.__name__ == "lorenz" for func in adapter._kernels)

    # The numba backend keeps its kernels per function object: one object per worker, however
    # many of the 48 chunks it ran, is one kernel built per worker.
    assert list(client.run(functions_with_kernels).values()) == [1, 1]


def test_dask_inputs_and_outputs(client, inputs, reference):
    y0, params = inputs
    solution = ensemble.solve(
        lorenz,
        da.from_array(y0, chunks=(500, 3)),
        T,
        params=da.from_array(params, chunks=(700, 3)),
        chunk_size=1000,
        client=client,
        output="dask",
        **TOLERANCES,
    )
    assert isinstance(solution.ys, da.Array)
    assert solution.ys.chunks[1] == (1000, 1000, 1000, 72)
    assert_equals_reference(solution, reference)


def test_a_killed_worker_is_retried_without_losing_or_repeating_rows(client, inputs, reference):
    y0, params = inputs
    pids = client.run(os.getpid)
    solution = ensemble.solve(
        lorenz,
        y0,
        T,
        params=params,
        chunk_size=CHUNK,
        client=client,
        output="dask",
        **TOLERANCES,
    )
    futures = distributed.futures_of(solution.ys)
    victim = first_holder(client, futures)
    assert sum(future.done() for future in futures) < len(futures), "nothing left to retry"
    os.kill(pids[victim], signal.SIGKILL)
    assert_equals_reference(solution, reference)
    assert victim not in client.scheduler_info()["workers"]
    client.wait_for_workers(2, timeout=120)


def first_holder(client, futures, timeout: float = 60.0) -> str:
    """The address of a worker holding a finished chunk, as soon as there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for holders in client.who_has(futures).values():
            if holders:
                return holders[0]
        time.sleep(0.005)
    raise AssertionError(f"no chunk finished within {timeout} s")


def test_dynamics_are_unpickled_once_per_worker(client):
    """A function defined inside a test travels by value (cloudpickle), with every task; each
    worker rebuilds it once, so the numba backend, which keeps its kernel per function
    object, compiles it once per worker. Each rebuilt function has its own default list,
    which it records on its worker."""
    client.wait_for_workers(2, timeout=120)
    rate = -0.5

    def decay(t, y, p, marker=[]):  # noqa: B006  (one list per function object, on purpose)
        import builtins

        seen = builtins.__dict__.setdefault("odecore_test_markers", set())
        seen.add(id(marker))
        return rate * p * y

    y0 = np.ones((40, 2))
    params = np.linspace(0.1, 1.0, 40)[:, None]
    t = np.array([0.0, 1.0])
    solution = ensemble.solve(
        decay, y0, t, params=params, backend="numpy", chunk_size=4, client=client
    )
    # The exact solution, to the solver's tolerance (default rtol 1e-7).
    np.testing.assert_allclose(solution.ys[-1], np.exp(rate * params) * y0, rtol=1e-6)

    def function_objects():
        import builtins

        return len(builtins.__dict__.get("odecore_test_markers", ()))

    # Ten chunks on two workers: at least one ran five, all with one function object.
    assert max(client.run(function_objects).values()) == 1


@pytest.mark.parametrize(
    ("keywords", "error", "match"),
    [
        ({"batch_axis": 0}, TypeError, "sets batch_axis itself"),
        ({"throw": True}, TypeError, "sets throw itself"),
        ({"output": "xarray"}, ValueError, "output must be one of"),
        ({"event": lambda t, y, p: y[0]}, ValueError, "does not return event records"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size must be a positive integer"),
        ({"params": np.ones((3, 3))}, ValueError, r"params must be one row per trajectory"),
        ({"client": "tcp://127.0.0.1:8786"}, TypeError, "client must be a dask.distributed"),
        (
            {"client": "tcp://127.0.0.1:8786", "output": "dask"},
            TypeError,
            "client must be a dask.distributed",
        ),
    ],
)
def test_bad_arguments_are_refused(keywords, error, match):
    with pytest.raises(error, match=match):
        ensemble.solve(lorenz, np.ones((4, 3)), T, **{"params": np.ones(3), **keywords})


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy y0", "dask y0"])
@pytest.mark.parametrize("output", ["numpy", "dask"])
def test_integer_y0_is_refused_at_the_call(dtype, lazy, output):
    """As odecore.solve refuses it. A Dask result is computed only later, and its chunks'
    solves refused it only then, after the call had returned arrays declared integer."""
    y0 = np.ones((4, 3), dtype=dtype)
    y0 = da.from_array(y0, chunks=2) if lazy else y0
    match = rf"^y0 must have a real floating dtype, got {np.dtype(dtype)}; convert it to float64"
    with pytest.raises(TypeError, match=match):
        ensemble.solve(lorenz, y0, T, params=np.ones(3), chunk_size=2, output=output)


@pytest.mark.parametrize("shape", [(3,), (0, 3), (2, 3, 1)])
def test_y0_must_be_rows(shape):
    with pytest.raises(ValueError, match=r"y0 must be one row per trajectory"):
        ensemble.solve(lorenz, np.ones(shape), T, params=np.ones(3))


# Rows 1 and 3 at 1e-12, rows 0 and 2 at 1e-3: tolerances that differ by row change the steps,
# so a chunk solved with another row's tolerances shows in nsteps as well as in ys.
ROW_TOLERANCE = np.array([[1e-3], [1e-12], [1e-3], [1e-12]])


@pytest.mark.parametrize(("chunk_size", "output"), [(2, "numpy"), (1, "numpy"), (3, "dask")])
def test_per_trajectory_tolerances_travel_with_their_rows(chunk_size, output):
    y0, params = sweep()
    y0, params = y0[-4:], params[-4:]
    tolerances = {"rtol": ROW_TOLERANCE, "atol": ROW_TOLERANCE}
    reference = odecore.solve(
        lorenz, y0, T, params=params, batch_axis=0, backend="numba", throw=False, **tolerances
    )
    solution = ensemble.solve(
        lorenz, y0, T, params=params, chunk_size=chunk_size, output=output, **tolerances
    )
    assert len(set(reference.stats["nsteps"].tolist())) > 1, "the tolerances change no steps"
    assert_equals_reference(solution, reference)


@pytest.mark.parametrize(
    ("shape", "chunk_size"),
    [((2, 1), 2), ((4,), 2), ((4, 4), 4), ((1, 1, 3), 4)],
    ids=["half the rows", "one per trajectory in 1-D", "too wide", "3-D"],
)
def test_a_tolerance_that_fits_only_a_chunk_is_refused(shape, chunk_size):
    """Four Lorenz trajectories (D = 3). A (2, 1) tolerance fits a chunk of two rows, so each
    chunk took it as its own two rows' (trajectories 2 and 3 got those of 0 and 1); a (4,)
    one, meant one per trajectory, was refused naming a chunk's shape. The error must name
    the shapes the user gave and those that fit."""
    match = (
        rf"atol of shape {re.escape(str(shape))} does not fit y0 of shape \(4, 3\): give a "
        rf"number or one per state element, \(3,\) or \(1, 3\), shared by every "
        rf"trajectory, or one row per trajectory, \(4, 1\) or \(4, 3\)"
    )
    with pytest.raises(ValueError, match=match):
        ensemble.solve(
            lorenz,
            np.ones((4, 3)),
            T,
            params=np.ones(3),
            chunk_size=chunk_size,
            atol=np.full(shape, 1e-9),
        )


class ProgressRecorder:
    def __init__(self):
        self.reports = []
        self.closes = 0

    def update(self, t, accepted, rejected, note):
        self.reports.append((t, accepted, rejected))

    def close(self):
        self.closes += 1


def test_progress_reports_the_chunks_as_one_solve():
    y0, params = sweep()
    y0, params = y0[-6:], params[-6:]
    reference = odecore.solve(
        lorenz, y0, T, params=params, batch_axis=0, backend="numba", throw=False, **TOLERANCES
    )
    recorder = ProgressRecorder()
    ensemble.solve(lorenz, y0, T, params=params, chunk_size=2, progress=recorder, **TOLERANCES)
    assert recorder.closes == 1
    # The last report holds the whole ensemble's steps, as the batched solve counts them.
    accepted, rejected = reference.stats["naccept"].sum(), reference.stats["nreject"].sum()
    assert recorder.reports[-1] == (T[-1], accepted, rejected)
    # Times and counts of one solve only grow: a chunk's own counts, or the least time over
    # rows of which some have not started, would fall back at the start of the next chunk.
    for earlier, later in zip(recorder.reports, recorder.reports[1:], strict=False):
        assert all(b >= a for a, b in zip(earlier, later, strict=True)), (earlier, later)


def test_progress_is_refused_where_the_chunks_are_dask_tasks():
    y0, params = sweep()
    with pytest.raises(ValueError, match=r"progress= only for chunks run in this process"):
        ensemble.solve(lorenz, y0[:4], T, params=params[:4], output="dask", progress=True)
    with (
        distributed.LocalCluster(
            n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as in_process,
        pytest.raises(ValueError, match=r"with a client or output='dask'.*dashboard"),
    ):
        ensemble.solve(
            lorenz, y0[:4], T, params=params[:4], client=in_process, progress=ProgressRecorder()
        )


def decay(t, y, rate):
    return -rate * y


@pytest.mark.parametrize("case", ["numpy float32", "jax float64 without x64"])
def test_dask_output_declares_the_dtypes_the_backend_computes(case):
    backend, dtype = case.split()[:2]
    precision = contextlib.nullcontext()
    if backend == "jax":
        jax = pytest.importorskip("jax")
        precision = jax.enable_x64(False)
    y0 = np.ones((5, 1), dtype=dtype)
    rates = np.linspace(0.5, 2.5, 5, dtype=dtype)[:, None]
    with warnings.catch_warnings(), precision:
        warnings.simplefilter("ignore")  # JAX's notice that float64 becomes float32
        reference = odecore.solve(
            decay, y0, T, params=rates, batch_axis=0, backend=backend, rtol=1e-5, atol=1e-6
        )
        solution = ensemble.solve(
            decay, y0, T, params=rates, backend=backend, chunk_size=2, output="dask", rtol=1e-5
        )
        declared = [solution.ys, solution.status, solution.t_reached, solution.stats["nsteps"]]
        computed = da.compute(*declared)
    expected = [reference.ys, reference.status, reference.t_reached, reference.stats["nsteps"]]
    for lazy, value, direct in zip(declared, computed, expected, strict=True):
        assert lazy.dtype == value.dtype == np.asarray(direct).dtype
    # rtol 1e-5 per step over a few dozen steps, in float32: well inside 1e-3 of exp(-rate t).
    np.testing.assert_allclose(computed[0][:, :, 0], np.exp(-rates[:, 0] * T[:, None]), rtol=1e-3)


@pytest.mark.parametrize("shared", [False, True], ids=["rows", "shared"])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_params_reach_func_as_the_backends_arrays(backend, shared):
    # func computes with y and params together: on torch a NumPy params times a tensor of
    # states fails, so each chunk's params must be converted as its y0 is.
    framework = pytest.importorskip(backend)
    precision = framework.enable_x64(True) if backend == "jax" else contextlib.nullcontext()
    y0 = np.ones((5, 2))
    rates = np.array([0.7]) if shared else np.linspace(0.5, 2.5, 5)[:, None]
    with precision:
        solution = ensemble.solve(
            decay, y0, T, params=rates, backend=backend, chunk_size=2, rtol=1e-10, atol=1e-12
        )
    assert solution.success
    # rtol 1e-10 per step over a few dozen steps: well inside 1e-8 of exp(-rate t).
    expected = np.exp(-np.broadcast_to(rates.reshape(-1, 1), (5, 1)) * T)  # (5, T)
    np.testing.assert_allclose(solution.ys[:, :, 0], expected.T, rtol=1e-8)
    np.testing.assert_allclose(solution.ys[:, :, 1], expected.T, rtol=1e-8)


def test_dask_rows_of_unknown_number_are_refused():
    y0 = da.from_array(np.ones((4, 3)), chunks=2)
    y0 = y0[y0[:, 0] > 0]  # boolean indexing: Dask does not know the rows until it computes
    with pytest.raises(ValueError, match=r"unknown number of rows.*y0\.compute_chunk_sizes\(\)"):
        ensemble.solve(lorenz, y0, T, params=np.ones(3))


@pytest.mark.parametrize(("count", "chunk_size", "used"), [(7, 100, 7), (7, None, 7), (7, 3, 3)])
def test_chunk_size_reports_the_rows_per_chunk_used(count, chunk_size, used):
    y0, params = sweep()
    y0, params = y0[-count:], params[-count:]
    reference = odecore.solve(
        lorenz, y0, T, params=params, batch_axis=0, backend="numba", throw=False, **TOLERANCES
    )
    solution = ensemble.solve(
        lorenz, y0, T, params=params, chunk_size=chunk_size, output="dask", **TOLERANCES
    )
    assert solution.chunk_size == used
    assert solution.ys.chunks[1][0] == used
    assert_equals_reference(solution, reference)
