"""The CuPy backend: the generic solve on a CUDA device, eager, no autodiff.

Gradients come from the dynamics' own VJPs, as on NumPy (``odecore.vjp_odeint`` with
``"checkpoint"`` or ``"backsolve"``; ``odecore.vjp_fixed_point``). The loop is the one every
backend runs, through array-api-compat's CuPy namespace, with three of its operations fused
into one kernel each (``odecore.adapters._cupy_source`` writes their source from the
tableau's numbers): the stage combinations of a step, the scaled RMS error ratio, and the
dense output.

Time, step sizes, counters and statuses stay on the device, also for a single sample
(``Backend.host_control_values``), so a step launches its kernels without waiting for the
device. The host waits for the device where the loop must decide in Python: its ``while``
condition (is any sample still running?), once per step; whether any output time lies in
the step (``Backend.cond`` in ``odecore.ode.outputs``) and whether any error ratio is NaN,
once per step each; and, at the end, the statistics and status read back into the
:class:`~odecore.Solution`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import array_api_compat.cupy as xp_cupy
import cupy
from odecore.adapters import _cupy_source

from odecore.backend import Backend, DeviceNotAvailableError, Kernels


def _require_device() -> None:
    """Raise DeviceNotAvailableError, saying why, where CuPy has no CUDA device to use."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise DeviceNotAvailableError(
            f"the 'cupy' backend needs a CUDA device: no CUDA device is usable here ({exc}); "
            f"run on a machine with an NVIDIA GPU and its driver, or choose another backend"
        ) from exc
    if count == 0:
        raise DeviceNotAvailableError(
            "the 'cupy' backend needs a CUDA device: no CUDA device is present; run on a "
            "machine with an NVIDIA GPU, or choose another backend"
        )


@functools.cache
def _elementwise(source: _cupy_source.Source):
    return cupy.ElementwiseKernel(
        source.in_params, source.out_params, source.operation, source.name
    )


@functools.cache
def _reduction(source: _cupy_source.Source):
    return cupy.ReductionKernel(
        source.in_params,
        source.out_params,
        source.map_expr,
        source.reduce_expr,
        source.post_map_expr,
        source.identity,
        source.name,
        reduce_type=source.reduce_type,
        preamble=source.preamble,
    )


class FusedStages:
    """The stage store of one solve (``Kernels.stage_store``): each stage input ``y + h sum_j
    a_ij K_j`` and each error increment ``h sum_j e_j K_j`` is one elementwise kernel over the
    stages it weights, where the portable store (``ListStages``) launches two kernels per
    nonzero weight. The kernels are made once per method row and cached by their source."""

    def __init__(self, method, y0):
        self.inputs = {}
        self.increments = {}
        for row in method.step_rows:
            for table, with_y in ((self.inputs, True), (self.increments, False)):
                source = _cupy_source.stage_combination(row.dense, with_y=with_y)
                table[row.slot] = (_elementwise(source), source.stages)

    def __call__(self, method, y, first, h, hy):
        return _FusedStep(self, y, first, hy)


class _FusedStep:
    """The stages of one step, combined by the solve's kernels."""

    __slots__ = ("kernels", "y", "hy", "ks")

    def __init__(self, kernels: FusedStages, y, first, hy):
        self.kernels, self.y, self.hy = kernels, y, hy
        self.ks = [first]

    def add(self, k) -> None:
        self.ks.append(k)

    def stage_input(self, row):
        kernel, stages = self.kernels.inputs[row.slot]
        return kernel(self.y, self.hy, *(self.ks[j] for j in stages))

    def increment(self, row):
        kernel, stages = self.kernels.increments[row.slot]
        return kernel(self.hy, *(self.ks[j] for j in stages))

    def as_list(self) -> list:
        return self.ks


def _rms_error_ratio(err, y, y_new, rtol, atol, axis):
    """``Kernels.rms_error_ratio`` as one reduction kernel: a (B,) float64 array for a batch
    (``axis=1``); a Python float for a single sample kept on the host (``axis=None``)."""
    source = _cupy_source.rms_error_ratio(*_cupy_source.tolerance_types(rtol, atol))
    ratio = _reduction(source)(err, y, y_new, rtol, atol, axis=axis)
    return float(ratio) if axis is None else ratio


class FusedDenseOutput:
    """The dense output of one solve (``Kernels.dense_output``): the interpolant's weights
    ``b_i(theta)`` and their combination with the stages in one elementwise kernel. A single
    sample whose theta is a Python float takes the method's own path."""

    def __init__(self, method):
        self.method = method
        source = _cupy_source.dense_output(method.dense)
        self.kernel, self.stages = _elementwise(source), source.stages

    def __call__(self, values, coeffs, theta, y, hy, dense):
        if values.scalar:
            return self.method.interpolate(values, coeffs, theta, y, hy, dense)
        return self.kernel(theta[:, None], y, hy, *(dense[i] for i in self.stages))


class CupyBackend(Backend):
    name = "cupy"
    xp = xp_cupy
    eager = True
    inplace_ok = True
    host_control_values = False
    kernels = Kernels(
        stage_store=FusedStages,
        rms_error_ratio=_rms_error_ratio,
        dense_output=FusedDenseOutput,
    )

    def owns(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray)

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        with self.device_scope(like):
            if isinstance(x, cupy.ndarray) and isinstance(like, cupy.ndarray):
                if x.device != like.device:
                    # A copy lands on the current device: like's. Left where it is, x would
                    # fail in the first kernel that also reads an array of like's device.
                    x = x.copy()
            return cupy.asarray(x, dtype=dtype)

    def device_scope(self, x: Any):
        return x.device if isinstance(x, cupy.ndarray) else contextlib.nullcontext()

    def reads_cheaply(self, x: Any) -> bool:
        return not isinstance(x, cupy.ndarray)

    def write(self, out, where, value):
        # The loop owns the output buffer, so it is written in place.
        out[where] = value
        return out


_require_device()
BACKEND = CupyBackend()
