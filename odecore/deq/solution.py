"""What a fixed-point solve reports: per-sample status, the solution, and the failure."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from odecore.backend.host import host_array
from odecore.deq.options import FixedPointOptions
from odecore.ode.solution import SolveError


class FixedPointStatus(enum.IntEnum):
    """Per-sample outcome of a fixed-point solve: the codes of ``FixedPointSolution.status``.

    Attributes
    ----------
    RUNNING
        -1: still running; only appears inside the loop.
    CONVERGED
        0: the residual fell to ``tol``.
    MAX_ITER_REACHED
        1: ``max_iter`` iterations without converging.
    NONFINITE
        3: ``f`` returned NaN or inf, or the iterates overflowed; the best finite iterate
        is kept.

    Examples
    --------
    >>> import odecore
    >>> odecore.FixedPointStatus(1).name
    'MAX_ITER_REACHED'
    >>> odecore.FixedPointStatus.NONFINITE.describe().split(":")[0]
    'non-finite residual'
    """

    RUNNING = -1
    CONVERGED = 0
    MAX_ITER_REACHED = 1
    NONFINITE = 3

    def describe(self, solver: str | None = None) -> str:
        """What the status means and, for a failure, what to try.

        Parameters
        ----------
        solver : str, optional
            The solver that failed, left out of the ones suggested instead.

        Returns
        -------
        str
            One sentence.

        Examples
        --------
        >>> import odecore
        >>> odecore.FixedPointStatus.CONVERGED.describe()
        'converged'
        """
        others = " or ".join(f"'{s}'" for s in ("anderson", "broyden") if s != solver)
        return {
            FixedPointStatus.RUNNING: "still running",
            FixedPointStatus.CONVERGED: "converged",
            FixedPointStatus.MAX_ITER_REACHED: (
                f"max_iter reached before the residual fell below tol; raise max_iter, loosen "
                f"tol, try solver={others}, or check that f is a contraction "
                f"(odecore.spectral_radius)"
            ),
            FixedPointStatus.NONFINITE: (
                f"non-finite residual: f returned NaN or inf, or the iterates grew until they "
                f"overflowed (f is not a contraction there: check odecore.spectral_radius, "
                f"take damping below 1, or try solver={others}); the best finite iterate is "
                f"kept"
            ),
        }[self]


RUNNING = int(FixedPointStatus.RUNNING)
CONVERGED = int(FixedPointStatus.CONVERGED)
MAX_ITER_REACHED = int(FixedPointStatus.MAX_ITER_REACHED)
NONFINITE = int(FixedPointStatus.NONFINITE)


@dataclass
class FixedPointSolution:
    """The result of [`solve_fixed_point`][odecore.solve_fixed_point].

    Per-sample fields are arrays of shape ``(B,)``, and ``(1,)`` without ``batch_axis``.

    Parameters
    ----------
    z : array
        Each sample's best iterate (the one with the lowest residual in the stopping mode), in
        the shape of ``z0``.
    iterations : array of int
        Per sample, the iterations it took.
    abs_residual : array
        Per sample, ``||f(z) - z||`` of ``z``.
    rel_residual : array
        Per sample, ``||f(z) - z|| / ||f(z)||`` of ``z``.
    status : array of int
        Per sample, a [`FixedPointStatus`][odecore.FixedPointStatus] code.
    trace : array
        ``trace[k]`` is the stopping-mode residual after iteration ``k`` (row 0 is ``z0``'s),
        NaN once a sample has stopped.
    solver : str
        The forward solver's name.
    stats : dict
        ``nfev`` (calls of ``f`` on the whole batch) and, after a backward pass through the
        implicit rule, ``backward_iterations`` and ``backward_status``.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Affine:  # f(z) = A z + b, with its VJP
    ...     def __call__(self, z, params):
    ...         A, b = params
    ...         return A @ z + b
    ...     def vjp(self, z, params, u):
    ...         A, b = params
    ...         return A.T @ u, (np.outer(u, z), u)
    >>> A, b = np.array([[0.5, 0.1], [0.0, 0.3]]), np.array([1.0, 2.0])
    >>> sol = odecore.solve_fixed_point(Affine(), np.zeros(2), (A, b), tol=1e-10)
    >>> sol.success, sol.message, sol.status.tolist()
    (True, 'converged', [0])
    >>> bool(sol.abs_residual[0] <= 1e-10), sol.trace.shape[1]
    (True, 1)
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
        """Whether every sample converged."""
        return bool(np.all(host_array(self.status) == CONVERGED))

    @property
    def message(self) -> str:
        """What ``status`` means in words: the descriptions of its codes."""
        codes = np.unique(host_array(self.status)).tolist()
        return "; ".join(FixedPointStatus(c).describe() for c in codes)


class FixedPointError(SolveError):
    """A fixed-point solve did not converge: ``max_iter`` was reached, or ``f`` returned NaN or inf.

    The message names the failed samples, the residual and the iterations; ``solution`` holds the
    [`FixedPointSolution`][odecore.FixedPointSolution], with each sample's best iterate and
    status. A [`SolveError`][odecore.SolveError], so that one ``except`` catches every failed
    solve of the library.

    Attributes
    ----------
    solution : FixedPointSolution
        Each sample's best iterate and its status.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Affine:  # f(z) = A z + b, with its VJP
    ...     def __call__(self, z, params):
    ...         A, b = params
    ...         return A @ z + b
    ...     def vjp(self, z, params, u):
    ...         A, b = params
    ...         return A.T @ u, (np.outer(u, z), u)
    >>> A, b = np.array([[0.5, 0.1], [0.0, 0.3]]), np.array([1.0, 2.0])
    >>> try:
    ...     odecore.solve_fixed_point(Affine(), np.zeros(2), (A, b), max_iter=2)
    ... except odecore.FixedPointError as error:
    ...     print(error.solution.status.tolist(), "did not converge" in str(error))
    [1] True
    """


def failure_message(
    bk, solution: FixedPointSolution, opts: FixedPointOptions, batched: bool
) -> str:
    status = host_array(solution.status).tolist()
    failed = [i for i, s in enumerate(status) if s != CONVERGED]
    first = failed[0]
    residuals = solution.abs_residual if opts.stop_mode == "abs" else solution.rel_residual
    residual = bk.to_host_float(residuals[first])
    measure = "||f(z) - z||" if opts.stop_mode == "abs" else "||f(z) - z|| / ||f(z)||"
    reasons = "; ".join(
        FixedPointStatus(c).describe(solution.solver) for c in sorted({status[i] for i in failed})
    )
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
