"""What a fixed-point solve reports: per-sample status, the solution, and the failure."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from odecore.deq.options import FixedPointOptions
from odecore.ode.solution import SolveError


class FixedPointStatus(enum.IntEnum):
    """Per-sample outcome of a fixed-point solve. ``RUNNING`` only appears inside the loop."""

    RUNNING = -1
    CONVERGED = 0
    MAX_ITER_REACHED = 1
    NONFINITE = 3

    def describe(self) -> str:
        return {
            FixedPointStatus.RUNNING: "still running",
            FixedPointStatus.CONVERGED: "converged",
            FixedPointStatus.MAX_ITER_REACHED: (
                "max_iter reached before the residual fell below tol; raise max_iter, loosen "
                "tol, try solver='anderson' or 'broyden', or check that f is a contraction "
                "(odecore.spectral_radius)"
            ),
            FixedPointStatus.NONFINITE: (
                "non-finite residual: f returned NaN or inf; the best finite iterate is kept"
            ),
        }[self]


RUNNING = int(FixedPointStatus.RUNNING)
CONVERGED = int(FixedPointStatus.CONVERGED)
MAX_ITER_REACHED = int(FixedPointStatus.MAX_ITER_REACHED)
NONFINITE = int(FixedPointStatus.NONFINITE)


@dataclass
class FixedPointSolution:
    """The result of :func:`solve_fixed_point`.

    ``z`` is each sample's best iterate (the one with the lowest residual in the stopping
    mode), in the shape of ``z0``. Per sample (arrays of shape ``(B,)``; ``(1,)`` without
    ``batch_axis``): ``iterations``, the final ``abs_residual`` ``||f(z) - z||`` and
    ``rel_residual`` ``||f(z) - z|| / ||f(z)||`` of ``z``, and ``status`` (a
    :class:`FixedPointStatus` code). ``trace[k]`` is the stopping-mode residual after
    iteration ``k`` (row 0 is ``z0``'s), NaN once a sample has stopped. ``stats`` holds
    ``nfev`` (calls of ``f`` on the whole batch) and, after a backward pass through the
    implicit rule, ``backward_iterations`` and ``backward_status``.
    """

    z: Any
    iterations: Any
    abs_residual: Any
    rel_residual: Any
    status: Any
    trace: Any
    solver: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(int(s) == CONVERGED for s in _to_list(self.status))

    @property
    def message(self) -> str:
        codes = sorted({int(s) for s in _to_list(self.status)})
        return "; ".join(FixedPointStatus(c).describe() for c in codes)


def _to_list(x):
    return [x[i] for i in range(x.shape[0])]


class FixedPointError(SolveError):
    """A fixed-point solve did not converge: ``max_iter`` was reached, or ``f`` returned
    NaN or inf. The message names the failed samples, the residual and the iterations;
    ``solution`` holds the :class:`FixedPointSolution`, with each sample's best iterate and
    status. A :class:`~odecore.SolveError`, so that one ``except`` catches every failed
    solve of the library."""


def failure_message(
    bk, solution: FixedPointSolution, opts: FixedPointOptions, batched: bool
) -> str:
    status = [int(s) for s in _to_list(solution.status)]
    failed = [i for i, s in enumerate(status) if s != CONVERGED]
    first = failed[0]
    residuals = solution.abs_residual if opts.stop_mode == "abs" else solution.rel_residual
    residual = bk.to_host_float(residuals[first])
    measure = "||f(z) - z||" if opts.stop_mode == "abs" else "||f(z) - z|| / ||f(z)||"
    reasons = "; ".join(FixedPointStatus(c).describe() for c in sorted({status[i] for i in failed}))
    if batched:
        shown = ", ".join(str(i) for i in failed[:10]) + (", ..." if len(failed) > 10 else "")
        where = (
            f" for {len(failed)} of {len(status)} samples (indices {shown}); the best iterate "
            f"of sample {first}"
        )
    else:
        where = ": its best iterate"
    return (
        f"odecore: the fixed-point solve ({solution.solver}) did not converge{where} has "
        f"residual {measure} = {residual:.6g} (tol {opts.tol:g}) after "
        f"{int(solution.iterations[first])} iterations: {reasons}. Pass throw=False to get "
        f"the best iterates with a per-sample status instead"
    )
