"""Helpers shared by the benchmark scripts: the environment banner, alternating timings,
errors against a reference, the "time at equal error" comparison and the summary table.
Scripts import this as ``_common`` (run them as ``python benchmarks/bench_X.py``, which puts
this directory on ``sys.path``)."""

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
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu_name()})",
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def alternating_best_times(
    fns: Sequence[Callable[[], object]],
    min_time: float,
    min_repeats: int,
    finish: Callable[[object], object] = lambda result: result,
) -> list[float]:
    """The best seconds of one call of each function, after one warm-up call of each.

    The calls alternate (a, b, a, b, ...) until each function has had ``min_repeats`` calls
    and ``min_time`` seconds: a change in the machine's load during the run then disturbs
    both sides of a ratio alike, rather than whichever was measured at the wrong moment. The
    best call is the one least disturbed by the rest of the machine. ``finish`` is applied
    to each result inside the timed region (JAX: ``jax.block_until_ready``).
    """
    for fn in fns:
        finish(fn())
    best = [math.inf] * len(fns)
    spent = [0.0] * len(fns)
    count = 0
    while count < min_repeats or min(spent) < min_time:
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            finish(fn())
            elapsed = time.perf_counter() - start
            best[i] = min(best[i], elapsed)
            spent[i] += elapsed
        count += 1
    return best


def relative_error(values: Sequence, references: Sequence) -> float:
    """The largest ``max|value - reference| / max|reference|`` over matching arrays (the
    outputs of a solve, or the gradient of each parameter): the worst array's error relative
    to its own scale. Arrays are anything ``np.asarray`` accepts."""
    worst = 0.0
    for value, reference in zip(values, references, strict=True):
        value = np.asarray(value, dtype=np.float64)
        reference = np.asarray(reference, dtype=np.float64)
        scale = max(float(np.max(np.abs(reference))), 1e-300)
        worst = max(worst, float(np.max(np.abs(value - reference))) / scale)
    return worst


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


def print_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)
) -> None:
    """Columns aligned to their widest cell: those numbered in ``left`` left-aligned (text),
    the others right-aligned (numbers)."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def print_summary(peer: str, rows: Sequence[tuple]) -> None:
    """The table each script ends with: ``rows`` of ``(measurement, odecore seconds, odecore
    error, peer seconds, peer error, note)``, the ratio odecore / peer first."""
    print(f"summary: time odecore / {peer} (below 1: odecore faster), each time beside the")
    print("error of its result against the reference")
    print_table(
        ("measurement", "ratio", "odecore", "error", peer, "error", ""),
        [
            (name, f"{ours / theirs:.2f}", fmt_time(ours), f"{e_ours:.1e}", fmt_time(theirs))
            + (f"{e_theirs:.1e}", note)
            for name, ours, e_ours, theirs, e_theirs, note in rows
        ],
        left=(0, 6),
    )


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"
