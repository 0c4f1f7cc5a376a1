"""Dynamics in the numba backend's kernel forms shared by several test modules and the
scripts they run in processes of their own (which have tests/ on their path): a compiled
kernel is kept per function (in memory, and on disk for an importable one), so sharing the
function compiles it once for the whole run."""

from __future__ import annotations

import numpy as np


def lorenz(t, y, p):
    return np.array([p[0] * (y[1] - y[0]), y[0] * (p[1] - y[2]) - y[1], y[0] * y[1] - p[2] * y[2]])


def lorenz_in_place(t, y, dy, p):
    """``lorenz`` in the in-place form, which a GPU thread's kernel takes."""
    dy[0] = p[0] * (y[1] - y[0])
    dy[1] = y[0] * (p[1] - y[2]) - y[1]
    dy[2] = y[0] * y[1] - p[2] * y[2]


def chain(t, y, dy, p):
    """A chain of decays, each feeding the next; with 20 elements, more than the kernels
    unroll (adapters.numba.MAX_UNROLLED_SIZE), so their loops keep run-time bounds."""
    dy[0] = -p[0] * y[0]
    for i in range(1, y.shape[0]):
        dy[i] = p[0] * (y[i - 1] - y[i])
