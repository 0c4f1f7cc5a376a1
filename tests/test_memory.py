"""Memory of the gradient modes: backsolve does not grow with the number of steps.

Each measurement runs in a fresh interpreter, so that nothing the test process allocated
before (other tests, caches) shows up in it:

- NumPy (``vjp_odeint``): ``tracemalloc``, which sees every NumPy array buffer; its peak is
  reset before each solve, so the number is the peak of that forward-and-pullback alone.
- torch: torch's CPU tensors come from ``malloc``, which ``tracemalloc`` does not see and
  whose resident-set size is too noisy for a 10% criterion. The child reads glibc's
  ``mallinfo2`` (bytes currently allocated) inside the dynamics, which the solver calls at
  every stage of the forward and backward passes, and once more between the two; the
  largest reading minus the reading before the solve is the peak.

Checkpoint (and direct) mode is measured the same way and must grow with the number of
steps: this is what shows that the measurement can see growth at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HORIZONS = (1.0, 10.0)  # rk4 with step 0.1: 10 and 100 steps

NUMPY_CHILD = textwrap.dedent(
    """
    import json, tracemalloc
    import numpy as np
    import odecore

    class Field:
        def __call__(self, t, y, params):
            (k,) = params
            return -k * y + 0.1 * np.sin(t)

        def vjp(self, t, y, params, cotangent):
            (k,) = params
            return -k * cotangent, (np.asarray(-np.vdot(cotangent, y)),)

    y0 = np.linspace(-1.0, 1.0, 20_000)
    k = np.asarray(0.3)
    tracemalloc.start()
    peaks = {}
    for mode in ("backsolve", "checkpoint"):
        for horizon in HORIZONS:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            ys, pullback = odecore.vjp_odeint(
                Field(), y0, np.array([0.0, horizon]), (k,), adjoint=mode,
                method="rk4", options={"step_size": 0.1},
            )
            pullback(np.ones_like(ys))
            peaks[f"{mode}-{horizon}"] = tracemalloc.get_traced_memory()[1] - base
            del ys, pullback
    print(json.dumps(peaks))
    """
).replace("HORIZONS", repr(HORIZONS))

TORCH_CHILD = textwrap.dedent(
    """
    import ctypes, gc, json
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2
    except (OSError, AttributeError) as exc:
        print(json.dumps({"unavailable": f"glibc mallinfo2 is not available: {exc}"}))
        raise SystemExit(0)
    import torch
    import odecore

    torch.set_num_threads(1)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2

    def in_use():
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    peak = [0]

    def sample():
        peak[0] = max(peak[0], in_use())

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

        def forward(self, t, y):
            sample()
            return -self.k * y + 0.1 * torch.sin(t)

    field = Field()
    STATE = 50_000  # 0.4 MB a state

    def solve_and_backward(mode, horizon):
        y0 = torch.linspace(-1.0, 1.0, STATE, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.0, horizon], dtype=torch.float64)
        ys = odecore.odeint(field, y0, t, adjoint=mode, method="rk4",
                            options={"step_size": 0.1})
        sample()
        ys[-1].sum().backward()
        sample()

    solve_and_backward("backsolve", 0.3)  # allocate what is allocated once
    gc.collect()
    result = {}
    for mode in ("backsolve", "checkpoint", "direct"):
        for horizon in HORIZONS:
            gc.collect()
            base = in_use()
            peak[0] = base
            solve_and_backward(mode, horizon)
            result[f"{mode}-{horizon}"] = peak[0] - base

    # What a solve leaves allocated once its outputs are gone, before and after the cyclic
    # garbage collector runs.
    gc.collect()
    gc.disable()
    base = in_use()
    solve_and_backward("checkpoint", HORIZONS[-1])
    result["retained"] = in_use() - base
    gc.collect()
    result["retained_after_gc"] = in_use() - base
    gc.enable()
    print(json.dumps(result))
    """
).replace("HORIZONS", repr(HORIZONS))


def run_child(script: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def numpy_peaks():
    return run_child(NUMPY_CHILD)


@pytest.fixture(scope="module")
def torch_peaks():
    pytest.importorskip("torch", reason="the torch memory measurement needs torch")
    result = run_child(TORCH_CHILD)
    if "unavailable" in result:
        pytest.skip(result["unavailable"])
    return result


def growth(peaks, mode):
    short, long = (peaks[f"{mode}-{h}"] for h in HORIZONS)
    assert short > 0, peaks
    return long / short


def test_numpy_backsolve_memory_does_not_grow_with_steps(numpy_peaks):
    assert growth(numpy_peaks, "backsolve") < 1.10, numpy_peaks


def test_numpy_checkpoint_memory_grows_with_steps(numpy_peaks):
    # 10x the steps: the tape (one state per step) dominates; at least 2x overall.
    assert growth(numpy_peaks, "checkpoint") > 2.0, numpy_peaks


def test_torch_backsolve_memory_does_not_grow_with_steps(torch_peaks):
    assert growth(torch_peaks, "backsolve") < 1.10, torch_peaks


@pytest.mark.parametrize("mode", ["checkpoint", "direct"])
def test_torch_memory_of_stored_modes_grows_with_steps(torch_peaks, mode):
    assert growth(torch_peaks, mode) > 2.0, torch_peaks


def test_torch_backsolve_uses_less_memory_than_stored_modes(torch_peaks):
    long = HORIZONS[-1]
    backsolve = torch_peaks[f"backsolve-{long}"]
    assert backsolve < torch_peaks[f"checkpoint-{long}"] / 2
    assert backsolve < torch_peaks[f"direct-{long}"] / 2


def test_torch_checkpoint_tape_is_freed_with_its_outputs(torch_peaks):
    # Freed by reference counting, without waiting for the cyclic GC: within 1 MB of what
    # is left after a full collection.
    assert torch_peaks["retained"] - torch_peaks["retained_after_gc"] < 1e6, torch_peaks
