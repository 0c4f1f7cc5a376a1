"""The error norms of ``odecore.control.norms`` against sums written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from odecore.control.norms import largest_part_rms


def _rms(values) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


@pytest.mark.parametrize(
    "sizes",
    [(2, 3, 4), (2, 0, 5), (1, 1), (6,)],
)
def test_largest_part_rms_is_the_largest_rms_of_a_part(sizes):
    rng = np.random.default_rng(7)
    # Each part gets its own magnitude, so that which part is largest differs between rows.
    rows = [
        np.concatenate([rng.normal(size=n) * 10.0 ** rng.integers(-3, 3) for n in sizes])
        for _ in range(4)
    ]
    z = np.stack(rows)
    got = largest_part_rms(np, sizes)(z)
    for row, value in zip(rows, got, strict=True):
        bounds = np.cumsum((0, *sizes))
        parts = [
            row[lo:hi].tolist() for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo
        ]
        # The same handful of floating-point operations, in another order.
        assert value == pytest.approx(max(_rms(p) for p in parts), rel=1e-14)


def test_largest_part_rms_leaves_out_the_parts_after_the_given_sizes():
    # A seminorm: a huge trailing part must not change the norm of the leading ones.
    z = np.array([3.0, 4.0, 1e12, -1e12])
    assert largest_part_rms(np, (2,))(z) == pytest.approx(_rms([3.0, 4.0]), rel=1e-15)


def test_largest_part_rms_of_blocks_takes_each_part_over_every_row():
    # A block of 3 rows, each made of parts of sizes (1, 2): part 0 is column 0 of every
    # row, part 1 columns 1-2; then a plain part of size 2.
    rows = np.array([[1.0, 0.1, 0.1], [2.0, 0.2, 0.2], [3.0, 0.3, 0.3]])
    tail = np.array([0.5, -0.5])
    z = np.concatenate([rows.reshape(-1), tail])
    expected = max(_rms([1.0, 2.0, 3.0]), _rms(rows[:, 1:].reshape(-1).tolist()), _rms(tail))
    assert largest_part_rms(np, [(3, (1, 2)), 2])(z) == pytest.approx(expected, rel=1e-15)
    # With part 0 zero, the others decide.
    z[::3][:3] = 0.0
    expected = max(_rms(rows[:, 1:].reshape(-1).tolist()), _rms(tail))
    assert largest_part_rms(np, [(3, (1, 2)), 2])(z) == pytest.approx(expected, rel=1e-15)
