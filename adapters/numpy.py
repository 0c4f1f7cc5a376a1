"""The NumPy backend: eager, no autodiff (gradients come from the dynamics' own VJPs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from odecore._backend import Backend


class BufferStages:
    """Stages written into one preallocated array, so that combining ``m`` of them is one
    dot product instead of ``2m`` small array operations.

    On a state of a few elements the cost of a step is the number of NumPy calls, so this
    store avoids every call it can: a single sample's step scales all of the method's
    weight rows by ``h`` at once, so a stage input costs one dot product and one addition;
    1-D states are stored without reshaping; weights are converted once per solve.
    """

    def __init__(self, method, y, first, h, hy):
        self.y, self.hy = y, hy
        self.shape = first.shape
        self.flat = first.ndim == 1
        dtype = first.dtype
        self.buffer = np.empty((method.stages, first.size), dtype=dtype)
        self.buffer[0] = first if self.flat else first.reshape(-1)
        self.count = 1
        self.ks = [first]
        matrix = method.native.get(dtype)
        if matrix is None:
            # Cast once, so that a float32 state stays float32.
            matrix = method.native[dtype] = np.asarray(method.step_matrix, dtype=dtype)
        # One sample: h is a Python float and scales every row in one operation. A batch
        # has one h per sample, applied after the dot product instead.
        self.scaled = matrix * h if isinstance(h, float) else None
        self.matrix = matrix

    def add(self, k):
        self.buffer[self.count] = k if self.flat else k.reshape(-1)
        self.count += 1
        self.ks.append(k)

    def increment(self, row):
        m = len(row.dense)
        if self.scaled is not None:
            out = np.dot(self.scaled[row.slot, :m], self.buffer[:m])
            return out if self.flat else out.reshape(self.shape)
        out = np.dot(self.matrix[row.slot, :m], self.buffer[:m])
        return self.hy * (out if self.flat else out.reshape(self.shape))

    def stage_input(self, row):
        return self.y + self.increment(row)

    def as_list(self):
        return self.ks


class NumpyBackend(Backend):
    name = "numpy"
    # NumPy 2.x is itself an array-API namespace. Using it directly rather than through
    # array-api-compat's wrappers saves a Python call per operation, which is most of the
    # per-step cost on small states.
    xp = np
    eager = True
    inplace_ok = True

    def owns(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        return np.asarray(x, dtype=dtype)

    def write(self, out, where, value):
        # The loop owns the output buffer, so it is written in place: a plain item
        # assignment costs a fraction of array-api-extra's general-purpose ``at``.
        out[where] = value
        return out

    def stage_store(self, method, y, first, h, hy):
        return BufferStages(method, y, first, h, hy)


BACKEND = NumpyBackend()
