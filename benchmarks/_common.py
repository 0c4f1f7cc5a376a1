"""Helpers shared by the benchmark scripts: the environment banner, timing, and the
"time at equal error" comparison. Scripts import this as ``_common`` (run them as
``python benchmarks/bench_X.py``, which puts this directory on ``sys.path``)."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np


def environment_lines(extra: dict[str, str] | None = None) -> list[str]:
    """What a reader needs to reproduce or compare the numbers."""
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    lines = [
        f"python {platform.python_version()} ({sys.implementation.name}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        f"numpy {np.__version__}",
        "OPENBLAS_CORETYPE: "
        + (
            f"set to {coretype!r} (slows NumPy; both libraries run under it)"
            if coretype
            else "not set"
        ),
    ]
    for name, value in (extra or {}).items():
        lines.insert(1, f"{name} {value}")
    return lines


def best_time(fn: Callable[[], object], min_time: float, min_repeats: int) -> tuple[float, int]:
    """``(best seconds of one call, number of calls)``: at least ``min_repeats`` calls, and as
    many as it takes for the calls together to last ``min_time`` seconds. The best call is
    the one least disturbed by the rest of the machine."""
    best, total, count = math.inf, 0.0, 0
    while count < min_repeats or total < min_time:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        total += elapsed
        count += 1
    return best, count


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


def equal_error_ratios(
    errors_a: Sequence[float],
    times_a: Sequence[float],
    errors_b: Sequence[float],
    times_b: Sequence[float],
) -> list[tuple[float, float]]:
    """``[(error, time_a / time_b)]`` at the errors that ``b`` reached and that ``a``'s
    measured range covers: ``a``'s log(time) is interpolated linearly in log(error) (its
    work-precision curve), never extrapolated. Errors of 0 (exact to the reference) are
    dropped."""
    points = sorted(
        (math.log(e), math.log(t)) for e, t in zip(errors_a, times_a, strict=True) if e > 0
    )
    if len(points) < 2:
        return []
    log_e = np.array([p[0] for p in points])
    log_t = np.array([p[1] for p in points])
    out = []
    for e, t in zip(errors_b, times_b, strict=True):
        if e <= 0 or not (log_e[0] <= math.log(e) <= log_e[-1]):
            continue
        time_a = math.exp(float(np.interp(math.log(e), log_e, log_t)))
        out.append((e, time_a / t))
    return out
