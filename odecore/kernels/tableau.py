"""A tableau as the flat arrays a compiled kernel reads.

A kernel cannot walk ragged tuples or objects, so every row is padded into a rectangular
float64 array and the sizes go into one integer array. The values come from the prepared
solver (``odecore.solvers.explicit_rk.prepared``), so the interpolant of a method without
its own (cubic Hermite) and the controller's exponent are the generic loop's, not copies.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from odecore.solvers.explicit_rk import prepared
from odecore.tableaus import Tableau

# Positions in KernelTableau.sizes.
STAGES = 0
FSAL = 1
ADAPTIVE = 2
TWO_ESTIMATES = 3  # a second error estimate (DOP853's b_err2)
DENSE_STAGES = 4  # main stages, f(t + h, y_new) unless FSAL, then the extra dense stages
EXTRA_STAGES = 5  # the stages only the interpolant needs
NFEV_PER_STEP = 6
ERROR_ORDER = 7  # the controller's k: the order of the error estimate plus one

# Rows of KernelTableau.b.
B = 0
B_ERR = 1
B_ERR2 = 2


class KernelTableau(NamedTuple):
    """One method as arrays. Stage ``i`` of a step has input ``y + h sum_j a[i, j] K_j`` at
    ``t + c[i] h``; ``y_new = y + h sum_j b[B, j] K_j``; the error estimates weight the
    stages by ``b[B_ERR]`` and ``b[B_ERR2]``. Dense stage
    ``sizes[DENSE_STAGES] - sizes[EXTRA_STAGES] + x`` has input
    ``y + h sum_j dense_a[x, j] K_j`` at ``t + dense_c[x] h``, and the interpolant is
    ``y + h sum_i (sum_m dense[i, m] theta**(m + 1)) K_i``."""

    a: np.ndarray  # (stages, stages), strictly lower triangular
    c: np.ndarray  # (stages,)
    # (3, stages): the rows B, B_ERR and B_ERR2; zeros where the method has no estimate
    b: np.ndarray
    dense: np.ndarray  # (dense stages, degree)
    dense_a: np.ndarray  # (extra stages, dense stages)
    dense_c: np.ndarray  # (extra stages,)
    sizes: np.ndarray  # int64, indexed by the constants above


_TABLEAUS: dict[tuple[str, bool], tuple[Tableau, KernelTableau]] = {}


def kernel_tableau(tab: Tableau) -> KernelTableau:
    """The arrays of ``tab``, built once per method."""
    key = (tab.name, tab.adaptive)  # a method at a fixed step keeps its name
    kept = _TABLEAUS.get(key)
    if kept is not None and kept[0] is tab:
        return kept[1]
    rk = prepared(tab)
    stages = rk.stages
    a = np.zeros((stages, stages))
    for i, row in enumerate(tab.a):
        a[i, : len(row)] = row
    dense_rows = len(rk.dense)
    extra = len(tab.dense_c)
    dense = np.zeros((dense_rows, max(len(row) for row in rk.dense)))
    for i, row in enumerate(rk.dense):
        dense[i, : len(row)] = row
    dense_a = np.zeros((extra, dense_rows))
    for x, row in enumerate(tab.dense_a):
        dense_a[x, : len(row)] = row
    sizes = np.zeros(8, dtype=np.int64)
    sizes[STAGES] = stages
    sizes[FSAL] = rk.fsal
    sizes[ADAPTIVE] = rk.adaptive
    sizes[TWO_ESTIMATES] = rk.b_err2 is not None
    sizes[DENSE_STAGES] = dense_rows
    sizes[EXTRA_STAGES] = extra
    sizes[NFEV_PER_STEP] = rk.nfev_per_step
    sizes[ERROR_ORDER] = rk.error_exponent_order
    arrays = KernelTableau(
        a=a,
        c=np.asarray(tab.c, dtype=np.float64),
        b=np.stack([_weights(row, stages) for row in (rk.b, rk.b_err, rk.b_err2)]),
        dense=dense,
        dense_a=dense_a,
        dense_c=np.asarray(tab.dense_c, dtype=np.float64).reshape(extra),
        sizes=sizes,
    )
    _TABLEAUS[key] = (tab, arrays)
    return arrays


def _weights(row, stages: int) -> np.ndarray:
    out = np.zeros(stages)
    if row is not None:
        out[: len(row.dense)] = row.dense
    return out
