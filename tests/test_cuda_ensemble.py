"""The GPU ensemble kernel (adapters/cuda_ensemble.py: the kernel loop compiled by
numba-cuda, one trajectory per thread) under numba-cuda's simulator, against the CPU kernel:
the same steps and the same numbers. The simulator must be switched on before Numba is
imported, so the solves run in a process of their own (tests/cuda_simulator_run.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import odecore

pytest.importorskip("numba", reason="the GPU ensemble kernel is compiled by numba-cuda")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("cudasim") / "results.npz"
    script = Path(__file__).with_name("cuda_simulator_run.py")
    done = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(np.load(path))


@pytest.mark.parametrize("run", ["tsit5", "rk4-float32"])
def test_simulated_gpu_ensemble_takes_the_cpu_kernels_steps(results, run):
    for stat in ("nfev", "nsteps", "naccept", "nreject", "status"):
        np.testing.assert_array_equal(
            results[f"{run}/gpu/{stat}"], results[f"{run}/cpu/{stat}"], err_msg=stat
        )
    # One source, the same IEEE operations in the same order: the same numbers, NaN where a
    # trajectory failed.
    np.testing.assert_array_equal(results[f"{run}/gpu/ys"], results[f"{run}/cpu/ys"])


def test_the_blown_up_trajectory_fails_alone(results):
    status = results["tsit5/gpu/status"]
    assert status[2] != 0
    assert np.all(np.delete(status, 2) == 0)
    assert np.all(np.isfinite(np.delete(results["tsit5/gpu/ys"], 2, axis=1)))


def test_without_a_device_the_ensemble_says_what_to_do():
    from numba import cuda

    if cuda.is_available():
        pytest.skip("a CUDA device (or the simulator) is available in this process")
    from odecore.adapters import cuda_ensemble

    def decay(t, y, dy, p):
        dy[0] = -y[0]

    with pytest.raises(RuntimeError, match=r"CUDA device.*backend='numba'.*NUMBA_ENABLE_CUDASIM"):
        odecore.solve(
            decay,
            np.ones((3, 1)),
            [0.0, 1.0],
            params=np.zeros(0),
            batch_axis=0,
            backend=cuda_ensemble.BACKEND,
        )
