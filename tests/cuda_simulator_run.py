"""Run by tests/test_cuda_ensemble.py in a process of its own, with numba-cuda's simulator
switched on before Numba is imported (or, with ``--device``, on a real CUDA device): the GPU
ensemble kernel, with either place for its work rows, and the CPU kernel solve the same
batches, and the results are saved for the test to compare."""

from __future__ import annotations

import os
import sys

if "--device" not in sys.argv:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
from kernel_dynamics import chain  # noqa: E402
from kernel_dynamics import lorenz_in_place as lorenz  # noqa: E402
from odecore.adapters import cuda_ensemble  # noqa: E402

import odecore  # noqa: E402


def main(path: str) -> None:
    n = 5
    rho = np.linspace(0.0, 21.0, n)
    params = np.stack([np.full(n, 10.0), rho, np.full(n, 8.0 / 3.0)], axis=1)
    y0 = np.tile([1.0, 0.0, 0.0], (n, 1))
    # A trajectory that blows up: its own status, while the others finish.
    y0[2] = [1e200, 1e200, 1e200]
    t = np.linspace(0.0, 0.5, 4)
    runs = {
        "tsit5": dict(
            method="tsit5", rtol=1e-6, atol=1e-8, options={"step_t": [0.21]}, dtype=np.float64
        ),
        "rk4-float32": dict(method="rk4", options={"step_size": 0.01}, dtype=np.float32),
        "chain20": dict(method="tsit5", rtol=1e-6, atol=1e-9, dtype=np.float64, func=chain),
    }
    saved = {}
    for name, kwargs in runs.items():
        dtype = kwargs.pop("dtype")
        func = kwargs.pop("func", lorenz)
        y0_run, params_run = y0, params
        if func is chain:
            y0_run = np.zeros((n, 20))
            y0_run[:, 0] = np.arange(1.0, n + 1.0)
            params_run = np.linspace(0.5, 2.0, n)[:, None]
        backends = {
            f"gpu-{scratch}": cuda_ensemble.CudaEnsembleBackend(scratch)
            for scratch in cuda_ensemble.SCRATCH
        }
        for label, backend in {**backends, "cpu": "numba"}.items():
            sol = odecore.solve(
                func,
                y0_run.astype(dtype),
                t,
                params=params_run.astype(dtype),
                batch_axis=0,
                backend=backend,
                throw=False,
                **kwargs,
            )
            saved[f"{name}/{label}/ys"] = sol.ys
            saved[f"{name}/{label}/status"] = sol.status
            for stat, values in sol.stats.items():
                saved[f"{name}/{label}/{stat}"] = values
    np.savez(path, **saved)


if __name__ == "__main__":
    main(sys.argv[1])
