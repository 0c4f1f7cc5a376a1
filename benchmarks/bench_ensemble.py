"""Ensembles in chunks (``odecore.ensemble.solve``): one process against a Dask cluster.

    python benchmarks/bench_ensemble.py                 # N = 2^18, a few minutes on 2 cores
    python benchmarks/bench_ensemble.py --n 1048576     # the 2^20 sweep
    python benchmarks/bench_ensemble.py --quick         # a smoke run
    nox -s bench -- benchmarks/bench_ensemble.py --n 65536

The Lorenz rho-sweep of benchmarks/bench_numba.py (sigma 10, beta 8/3, rho evenly in [0, 21],
from (1, 0, 0) on t in [0, 1], tsit5 at rtol = atol = 1e-8, the final state), N trajectories:

1. the numba kernel in this process (``odecore.solve(..., batch_axis=0, backend="numba")``,
   on every core);
2. ``odecore.ensemble.solve`` on a ``LocalCluster`` of 2 worker processes, one thread each
   (and one Numba thread each, so the cluster uses the cores the local kernel does), for
   several chunk sizes;
3. odecore's NumPy batched path on ``--numpy-n`` trajectories (it is far slower).

Trajectories per second for each. The scheduling overhead per chunk is measured apart, on
chunks of one trajectory over a short span (``OVERHEAD_SPAN``), whose solve costs almost
nothing: the cluster's time for them, times the workers, over their number, is what Dask, the
transfer of rows and results and ``odecore.solve``'s fixed cost add to each chunk. A chunk of
``c`` trajectories computes for ``c / r`` seconds (``r``: the local kernel's trajectories per
second per core), so the overhead's share is ``o / (o + c / r)``, below 5% from
``c = 19 o r``; the table of cluster runs shows what that costs at several chunk sizes (with
few chunks, the sweep's uneven trajectories also leave a worker idle at the end). Every time
is the best of ``--repeat`` runs after a small warm-up (which loads the kernel, also on each
worker). A report: it exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import numpy as np
from _common import environment_lines
from bench_numba import lorenz, lorenz_returning, sweep_params

import odecore
from odecore import ensemble

TS = np.array([0.0, 1.0])
SETTINGS = {"method": "tsit5", "rtol": 1e-8, "atol": 1e-8}
WORKERS = 2
CORES = os.cpu_count() or 1
OVERHEAD_LIMIT = 0.05
OVERHEAD_SPAN = np.array([0.0, 1e-3])
OVERHEAD_CHUNKS = 256


def inputs(n: int):
    return np.tile([1.0, 0.0, 0.0], (n, 1)), sweep_params(n)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def local_kernel(n: int, repeat: int) -> float:
    y0, params = inputs(n)
    odecore.solve(lorenz, y0[:64], TS, params=params[:64], batch_axis=0, backend="numba")
    return best(
        lambda: odecore.solve(
            lorenz, y0, TS, params=params, batch_axis=0, backend="numba", **SETTINGS
        ),
        repeat,
    )


def numpy_batched(n: int, repeat: int) -> float:
    y0, params = inputs(n)
    odecore.solve(lorenz_returning, y0[:64], TS, params=params[:64], batch_axis=0)
    return best(
        lambda: odecore.solve(
            lorenz_returning, y0, TS, params=params, batch_axis=0, backend="numpy", **SETTINGS
        ),
        repeat,
    )


def cluster_times(n: int, chunk_sizes: list[int], repeat: int) -> tuple[float, dict[int, float]]:
    """The overhead per chunk (seconds), and the cluster's time per chunk size."""
    from distributed import Client, LocalCluster

    y0, params = inputs(n)
    times = {}
    with (
        LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
            env={"NUMBA_NUM_THREADS": "1"},
        ) as cluster,
        Client(cluster) as client,
    ):
        # Each worker loads the kernel (from the disk cache) on its first chunk.
        warm = WORKERS * 64
        ensemble.solve(lorenz, y0[:warm], TS, params=params[:warm], chunk_size=64, client=client)
        y1, p1 = inputs(OVERHEAD_CHUNKS)
        overhead = best(
            lambda: ensemble.solve(
                lorenz, y1, OVERHEAD_SPAN, params=p1, chunk_size=1, client=client, **SETTINGS
            ),
            repeat,
        )
        for size in chunk_sizes:
            times[size] = best(
                lambda size=size: ensemble.solve(
                    lorenz, y0, TS, params=params, chunk_size=size, client=client, **SETTINGS
                ),
                repeat,
            )
    return overhead * WORKERS / OVERHEAD_CHUNKS, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2**18, help="trajectories (default 2^18)")
    parser.add_argument(
        "--chunk-sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[1024, 4096, 16384, 65536],
        help="comma-separated chunk sizes for the cluster",
    )
    parser.add_argument("--numpy-n", type=int, default=2**14, help="trajectories on NumPy")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs after a warm-up")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N = 16384, once")
    args = parser.parse_args()
    if args.quick:
        args.n, args.chunk_sizes, args.numpy_n, args.repeat = 16384, [2048, 8192], 1024, 1
    # The NumPy rows travel inside the task graph (so that a lost worker's chunks can be run
    # again); their transfer is part of the overhead measured, and Dask's warning says no more.
    warnings.filterwarnings("ignore", message="Sending large graph")
    print("\n".join(environment_lines()))
    print(f"Lorenz rho-sweep, N = {args.n}, t in [0, 1], tsit5 rtol = atol = 1e-8")

    local = local_kernel(args.n, args.repeat)
    print(f"{'numba kernel, this process':<44}{local:>9.2f} s {args.n / local:>12.4g} traj/s")
    numpy_n = min(args.numpy_n, args.n)
    numpy_time = numpy_batched(numpy_n, args.repeat)
    print(
        f"{f'numpy batched (N = {numpy_n})':<44}{numpy_time:>9.2f} s "
        f"{numpy_n / numpy_time:>12.4g} traj/s"
    )
    sizes = [size for size in args.chunk_sizes if size <= args.n]
    per_chunk, cluster = cluster_times(args.n, sizes, args.repeat)
    per_core = args.n / local / CORES
    threshold = (1 - OVERHEAD_LIMIT) / OVERHEAD_LIMIT * per_chunk * per_core
    print(f"\nLocalCluster, {WORKERS} workers x 1 thread")
    print(
        f"scheduling overhead per chunk {per_chunk * 1e3:.1f} ms; at {per_core:.4g} traj/s per "
        f"core it falls below {OVERHEAD_LIMIT:.0%} from {math.ceil(threshold)} trajectories a chunk"
    )
    print(f"{'chunk size':>10} {'chunks':>7} {'time':>9} {'traj/s':>12} {'overhead share':>15}")
    for size, seconds in cluster.items():
        share = per_chunk / (per_chunk + size / per_core)
        print(
            f"{size:>10} {-(-args.n // size):>7} {seconds:>8.2f}s {args.n / seconds:>12.4g} "
            f"{share:>15.1%}"
        )


if __name__ == "__main__":
    main()
