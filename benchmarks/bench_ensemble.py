"""Ensembles in chunks (``odecore.ensemble.solve``): one process against a Dask cluster.

    python benchmarks/bench_ensemble.py                 # N = 2^18, a few minutes on 2 cores
    python benchmarks/bench_ensemble.py --n 1048576     # the 2^20 sweep
    nox -s bench -- benchmarks/bench_ensemble.py --n 65536

The Lorenz rho-sweep of benchmarks/bench_numba.py (sigma 10, beta 8/3, rho evenly in [0, 21],
from (1, 0, 0) on t in [0, 1], tsit5 at rtol = atol = 1e-8, the final state), N trajectories:

1. the numba kernel in this process (``odecore.solve(..., batch_axis=0, backend="numba")``:
   ``prange`` over every core);
2. ``odecore.ensemble.solve`` on a ``LocalCluster`` of 2 worker processes, one thread each
   (and one Numba thread each, so the cluster uses the cores the local kernel does), for
   several chunk sizes;
3. odecore's NumPy batched path on ``--numpy-n`` trajectories (it is far slower).

Trajectories per second for each. The scheduling overhead per chunk is the cluster's time
beyond the local kernel's, shared over the chunks each worker runs in turn:
``(T_cluster - T_local) * workers / chunks``; its share of the cluster's time falls as the
chunks grow, and the table marks the first chunk size where it is below 5%. Every time is the
best of ``--repeat`` runs after a warm-up (which loads the kernel on the workers). A report:
it exits 0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import environment_lines
from bench_numba import lorenz, lorenz_returning, sweep_params

import odecore
from odecore import ensemble

TS = np.array([0.0, 1.0])
SETTINGS = {"method": "tsit5", "rtol": 1e-8, "atol": 1e-8}
WORKERS = 2
OVERHEAD_LIMIT = 0.05


def inputs(n: int):
    return np.tile([1.0, 0.0, 0.0], (n, 1)), sweep_params(n)


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def local_kernel(n: int, repeat: int) -> float:
    y0, params = inputs(n)
    return best(
        lambda: odecore.solve(
            lorenz, y0, TS, params=params, batch_axis=0, backend="numba", **SETTINGS
        ),
        repeat,
    )


def numpy_batched(n: int, repeat: int) -> float:
    y0, params = inputs(n)
    return best(
        lambda: odecore.solve(
            lorenz_returning, y0, TS, params=params, batch_axis=0, backend="numpy", **SETTINGS
        ),
        repeat,
    )


def cluster_times(n: int, chunk_sizes: list[int], repeat: int) -> dict[int, float]:
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
        for size in chunk_sizes:
            times[size] = best(
                lambda size=size: ensemble.solve(
                    lorenz, y0, TS, params=params, chunk_size=size, client=client, **SETTINGS
                ),
                repeat,
            )
    return times


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
    args = parser.parse_args()
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
    cluster = cluster_times(args.n, sizes, args.repeat)
    print(f"\nLocalCluster, {WORKERS} workers x 1 thread; overhead against the kernel above")
    print(f"{'chunk size':>10} {'chunks':>7} {'time':>9} {'traj/s':>12} {'per chunk':>11} share")
    below = None
    for size, seconds in cluster.items():
        chunks = -(-args.n // size)
        extra = max(seconds - local, 0.0)
        share = extra / seconds
        per_chunk = extra * WORKERS / chunks
        if below is None and share < OVERHEAD_LIMIT:
            below = size
        print(
            f"{size:>10} {chunks:>7} {seconds:>8.2f}s {args.n / seconds:>12.4g} "
            f"{per_chunk * 1e3:>8.1f} ms {share:>6.1%}"
        )
    if below is None:
        print(f"overhead stays above {OVERHEAD_LIMIT:.0%} at every chunk size measured")
    else:
        print(f"overhead below {OVERHEAD_LIMIT:.0%} from chunk size {below}")


if __name__ == "__main__":
    main()
