"""The GPU ensemble kernel (adapters/cuda_ensemble.py: the kernel loop compiled by
numba-cuda, one trajectory per thread) under numba-cuda's simulator, against the CPU kernel:
the same steps and the same numbers. The simulator must be switched on before Numba is
imported, so the solves run in a process of their own (tests/cuda_simulator_run.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import odecore

pytest.importorskip("numba", reason="the GPU ensemble kernel is compiled by numba-cuda")


SCRIPT = Path(__file__).with_name("cuda_simulator_run.py")
RUNS = ["tsit5", "rk4-float32", "chain20"]
GPU_LABELS = ["gpu-global", "gpu-interleaved", "gpu-local"]


def run_script(path, *flags):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), *flags],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(np.load(path))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("cudasim") / "results.npz")


@pytest.fixture(scope="module")
def device_results(tmp_path_factory):
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA device: the simulator tests above run the same kernel")
    return run_script(tmp_path_factory.mktemp("cuda") / "results.npz", "--device")


@pytest.mark.parametrize("label", GPU_LABELS)
@pytest.mark.parametrize("run", RUNS)
def test_simulated_gpu_ensemble_takes_the_cpu_kernels_steps(results, run, label):
    for stat in ("nfev", "nsteps", "naccept", "nreject", "status"):
        np.testing.assert_array_equal(
            results[f"{run}/{label}/{stat}"], results[f"{run}/cpu/{stat}"], err_msg=stat
        )
    # One source, the same IEEE operations in the same order: the same numbers, NaN where a
    # trajectory failed.
    np.testing.assert_array_equal(results[f"{run}/{label}/ys"], results[f"{run}/cpu/ys"])


@pytest.mark.parametrize("label", GPU_LABELS)
def test_the_blown_up_trajectory_fails_alone(results, label):
    status = results[f"tsit5/{label}/status"]
    assert status[2] != 0
    assert np.all(np.delete(status, 2) == 0)
    assert np.all(np.isfinite(np.delete(results[f"tsit5/{label}/ys"], 2, axis=1)))


# On a device the compiler fuses a * b + c into one rounding (FMA), which the CPU kernel does
# not: a few units in the last place per operation, carried through the steps. Lorenz with
# rho <= 21 is not chaotic, and over t <= 0.5 it amplifies them by less than 1e2; 50 steps of
# some 40 operations give about 2e3 roundings. float64: 2e3 * 1.1e-16 * 1e2 ~ 2e-11;
# float32: 2e3 * 6e-8 * 1e2 ~ 1e-2 in the worst case, 1e-4 for roundings that do not all add
# up the same way (their sum grows as their count's square root). The chain of decays
# contracts (it amplifies nothing): the Lorenz bound covers it.
DEVICE_RTOL = {"tsit5": 2e-11, "rk4-float32": 1e-4, "chain20": 2e-11}


@pytest.mark.parametrize("label", GPU_LABELS)
@pytest.mark.parametrize("run", RUNS)
def test_gpu_ensemble_on_a_device_takes_the_cpu_kernels_steps(device_results, run, label):
    res = device_results
    for stat in ("nfev", "nsteps", "naccept", "nreject", "status"):
        np.testing.assert_array_equal(
            res[f"{run}/{label}/{stat}"], res[f"{run}/cpu/{stat}"], err_msg=stat
        )
    ys, reference = res[f"{run}/{label}/ys"], res[f"{run}/cpu/ys"]
    np.testing.assert_array_equal(np.isnan(ys), np.isnan(reference))
    scale = np.nanmax(np.abs(reference))
    np.testing.assert_allclose(ys, reference, rtol=0, atol=DEVICE_RTOL[run] * scale)


def test_every_ensemble_kernel_compiles_for_a_device_without_one():
    # numba-cuda (not the CUDA target Numba itself once carried) with NVVM and NVRTC: then
    # the kernels compile to PTX here as they would on a device (tests/cuda_ptx_run.py).
    script = Path(__file__).with_name("cuda_ptx_run.py")
    # A function calling into CUDA's math library needs NVVM and NVRTC both.
    probe = "\n".join(
        [
            "import math, numba_cuda",
            "from numba import cuda, float64",
            "def k(x):",
            "    x[0] = math.nextafter(x[0], 0.0)",
            "cuda.compile_ptx(k, (float64[:],), cc=(9, 0))",
        ]
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(
            "numba-cuda with NVVM and NVRTC is not installed here (pip install numba-cuda "
            "nvidia-cuda-nvrtc-cu12): the kernels' device compile is checked on a device: "
            + found.stderr.strip().splitlines()[-1]
        )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


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


def test_a_function_reading_params_past_their_end_is_refused_before_any_device():
    # A GPU thread does not check indices: with two parameters Lorenz would read its third
    # from the next trajectory's row, or past the array. The CPU check comes first.
    from kernel_dynamics import lorenz_in_place
    from odecore.adapters import cuda_ensemble

    with pytest.raises(ValueError, match="func read params past its 2 elements"):
        odecore.solve(
            lorenz_in_place,
            np.tile([1.0, 0.0, 0.0], (3, 1)),
            [0.0, 1.0],
            params=np.tile([10.0, 28.0], (3, 1)),
            batch_axis=0,
            backend=cuda_ensemble.BACKEND,
        )


def test_the_gpu_benchmark_runs_its_ensemble_part_in_the_simulator():
    # benchmarks/bench_gpu.py runs where device time is short: a script that breaks there
    # wastes it. Its ensemble part runs here in the simulator (every layout, fixed and
    # adaptive), and its other parts say why they skip.
    script = Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"
    args = ["--sizes", "3", "--t1", "0.01", "--repeat", "1"]
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("fixed", "adap"))]
    assert "failed" not in done.stdout and "steps differ" not in done.stdout, done.stdout
    assert len(rows) == 6  # three layouts, fixed and adaptive
    for case, scratch, n, *_, steps, difference in rows:
        assert int(n) == 8
        # The simulator runs the CPU kernel's operations: the same steps, the same numbers.
        assert difference == "0.0e+00", (case, scratch)
        # t1 = 0.01 at dt = 1e-3; the adaptive solve takes steps of its own.
        assert int(steps) == 10 if case == "fixed" else int(steps) >= 1
    if "torch sees no CUDA device" in done.stdout or "cupy not installed" in done.stdout:
        assert "peers: skipped" in done.stdout and "node: skipped" in done.stdout
