"""Dynamics in the numba backend's kernel form shared by several test modules: a compiled
kernel is kept per function (in memory, and on disk for an importable one), so sharing the
function compiles it once for the whole run."""

from __future__ import annotations

import numpy as np


def lorenz(t, y, p):
    return np.array([p[0] * (y[1] - y[0]), y[0] * (p[1] - y[2]) - y[1], y[0] * y[1] - p[2] * y[2]])
