"""The NumPy backend: eager, no autodiff (gradients come from the dynamics' own VJPs)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from odecore.backend import Backend, Kernels


class BufferStages:
    """Stages written into one preallocated array, so that combining ``m`` of them is one
    dot product instead of ``2m`` small array operations.

    On a state of a few elements the cost of a step is the number of NumPy calls, so this
    store avoids every call it can. It is made once per solve and restarted by each step:
    the buffer, its leading stages and the weight rows are views made here, not per stage.
    A single sample's step scales all of the method's weight rows by ``h`` at once (in
    place, into rows these views already see), so a stage input costs one dot product and
    one addition; ``ndarray.dot`` is the same product as ``np.dot`` without the function
    dispatch, which costs more than the product itself on a few elements; 1-D states are
    stored without reshaping; weights are converted once per solve.
    """

    def __init__(self, method, y0):
        dtype = y0.dtype
        self.shape = y0.shape
        self.flat = y0.ndim == 1
        self.buffer = np.empty((method.stages, y0.size), dtype=dtype)
        weights = method.native.get(dtype)
        if weights is None:
            # Cast once per method and dtype, so that a float32 state stays float32.
            matrix = np.asarray(method.step_matrix, dtype=dtype)
            matrix.flags.writeable = False  # shared by every solve of the method
            sizes = [len(row.dense) for row in method.step_rows]
            rows = [matrix[slot, :m] for slot, m in enumerate(sizes)]
            weights = method.native[dtype] = (matrix, sizes, rows)
        matrix, sizes, self.rows = weights
        self.scaled = np.empty_like(matrix)
        # Indexed by Weights.slot, as views: each row's weights (as given, and scaled by h)
        # and the leading stages they combine.
        self.scaled_rows = [self.scaled[slot, :m] for slot, m in enumerate(sizes)]
        self.stages = [self.buffer[:m] for m in sizes]
        self.matrix = matrix

    def __call__(self, method, y, first, h, hy):
        """Start a step (the ``start`` of ``Backend.stage_store``)."""
        self.y, self.hy = y, hy
        self.buffer[0] = first if self.flat else first.reshape(-1)
        self.count = 1
        self.ks = [first]
        # One sample: h is a Python float and scales every row in one operation. A batch
        # has one h per sample, applied after the dot product instead.
        self.one_h = isinstance(h, float)
        if self.one_h:
            np.multiply(self.matrix, h, out=self.scaled)
        return self

    def add(self, k):
        self.buffer[self.count] = k if self.flat else k.reshape(-1)
        self.count += 1
        self.ks.append(k)

    def increment(self, row):
        slot = row.slot
        if self.one_h:
            out = self.scaled_rows[slot].dot(self.stages[slot])
            return out if self.flat else out.reshape(self.shape)
        out = self.rows[slot].dot(self.stages[slot])
        return self.hy * (out if self.flat else out.reshape(self.shape))

    def stage_input(self, row):
        return self.y + self.increment(row)

    def as_list(self):
        return self.ks


def _rms_error_ratio(err, y, y_new, rtol, atol, axis):
    """odecore.control.norms.error_ratio for the rms norm, ``rms(err / (atol + rtol *
    max(|y|, |y_new|)))``, by the same operations. One sample's sum of squares is
    ``ndarray.dot``, the product ``vecdot`` computes, without the dispatch that costs
    twice the product on a small state; its root in float64 is ``math.sqrt``, the same
    correctly rounded root as ``np.sqrt`` without a ufunc call. A Python float for one
    sample (axis None), else a (B,) array."""
    scaled = err / (atol + rtol * np.maximum(np.abs(y), np.abs(y_new)))
    if axis is not None:
        return np.sqrt(np.vecdot(scaled, scaled, axis=axis) / scaled.shape[axis])
    if scaled.ndim != 1:
        scaled = scaled.reshape(-1)
    mean_square = scaled.dot(scaled) / scaled.shape[0]
    if mean_square.dtype == np.float64:
        return math.sqrt(mean_square)
    return float(np.sqrt(mean_square))


class NumpyBackend(Backend):
    name = "numpy"
    # NumPy 2.x is itself an array-API namespace. Using it directly rather than through
    # array-api-compat's wrappers saves a Python call per operation, which is most of the
    # per-step cost on small states.
    xp = np
    eager = True
    inplace_ok = True
    kernels = Kernels(stage_store=BufferStages, rms_error_ratio=_rms_error_ratio)

    def owns(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        return np.asarray(x, dtype=dtype)

    def write(self, out, where, value):
        # The loop owns the output buffer, so it is written in place: a plain item
        # assignment costs a fraction of array-api-extra's general-purpose ``at``.
        out[where] = value
        return out

    def scalar_maker(self, dtype: Any):
        # The dtype's scalar type, np.float64 say: a NumPy scalar is a 0-d array to every
        # array-API function (it has ndim, shape, dtype and __array_namespace__), and it is
        # what NumPy's own ufuncs return for 0-d arrays anyway. It is made in 90 ns against
        # 250 for np.asarray through a method, at every evaluation of f.
        return np.dtype(dtype).type


BACKEND = NumpyBackend()
