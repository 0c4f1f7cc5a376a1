"""The NumPy backend: eager, no autodiff (gradients come from the dynamics' own VJPs)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from odecore._backend import Backend


@functools.lru_cache(maxsize=256)
def _weights(dense: tuple[float, ...]) -> np.ndarray:
    return np.asarray(dense)


class BufferStages:
    """Stages written into one preallocated array, so that combining ``m`` of them is one
    matrix-vector product instead of ``2m`` small array operations."""

    def __init__(self, capacity: int, first: np.ndarray):
        self.shape = first.shape
        self.buffer = np.empty((capacity, first.size), dtype=first.dtype)
        self.buffer[0] = first.reshape(-1)
        self.ks = [first]

    def add(self, k: np.ndarray) -> None:
        self.buffer[len(self.ks)] = k.reshape(-1)
        self.ks.append(k)

    def combine(self, row) -> np.ndarray:
        w = _weights(row.dense)
        m = w.shape[0]
        # The weights are float64; cast them so a float32 state stays float32.
        w = w if self.buffer.dtype == w.dtype else w.astype(self.buffer.dtype)
        return (w @ self.buffer[:m]).reshape(self.shape)

    def as_list(self) -> list[np.ndarray]:
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

    def stage_store(self, capacity: int, first: Any):
        return BufferStages(capacity, first)


BACKEND = NumpyBackend()
