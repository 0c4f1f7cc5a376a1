"""Where a Runge-Kutta step keeps its stages: the portable reference store.

A step asks its store for node inputs ``y + h * sum_j w_j K_j`` and increments
``h * sum_j w_j K_j`` (error estimates), and hands it each new stage. Backends may supply a
faster store with the same methods (``Backend.stage_store``: the NumPy adapter keeps one
buffer per solve and combines stages with one dot product); :class:`ListStages` is the
slow, obvious reference every such store is tested against.
"""

from __future__ import annotations

from typing import Any


class Weights:
    """One row of stage weights, in the two forms stores use: the nonzero terms (for a sum of
    scaled arrays) and the dense tuple (for one matrix product). ``slot`` numbers the row
    among its method's rows (``ExplicitRK.rows``), so that a store may keep all of them
    scaled by ``h`` in one array."""

    __slots__ = ("terms", "dense", "slot")

    def __init__(self, weights):
        self.dense = tuple(float(w) for w in weights)
        self.terms = tuple((j, w) for j, w in enumerate(self.dense) if w != 0)
        self.slot = -1


def lincomb(row: Weights, ks: list[Any]) -> Any:
    """``sum_j w_j * ks[j]`` over the nonzero weights only."""
    total = None
    for j, w in row.terms:
        term = ks[j] * w
        total = term if total is None else total + term
    return total if total is not None else ks[0] * 0.0


class ListStages:
    """The portable stage store: a Python list, combined term by term.

    ``ListStages(method, y, first, h, hy)`` starts a step from ``y`` whose first stage is
    ``first``; ``ks`` instead continues from stages already computed (``first`` is then
    None).
    """

    def __init__(self, method, y: Any, first: Any, h: Any, hy: Any, ks: list | None = None):
        self.y, self.hy = y, hy
        self.ks = list(ks) if ks is not None else ([] if first is None else [first])

    def add(self, k: Any) -> None:
        self.ks.append(k)

    def stage_input(self, row: Weights) -> Any:
        return self.y + self.hy * lincomb(row, self.ks)

    def increment(self, row: Weights) -> Any:
        return self.hy * lincomb(row, self.ks)

    def as_list(self) -> list[Any]:
        return self.ks
