"""What the loop and the checkpoint replay ask of a solver.

The loop (``odecore.ode.loop``) owns time, the step size, the error control and the outputs; a
solver owns one step. Every call is in the loop's terms: ``evaluate(t, y)`` is the dynamics in
internal (forward) time and layout, ``t`` and ``h`` are control values (one per sample: Python
floats for one eager sample, arrays otherwise), ``hy`` is ``h`` as a factor in the state's
dtype, and ``cap(t)``, when given, bounds every evaluation time (a step that ends on a
discontinuity must see the left limit there).

:class:`~odecore.solvers.explicit_rk.ExplicitRK` is the one implementation today. An implicit
(stiff) solver fits the same protocol: its ``init`` would also return the Jacobian it keeps, its
``step`` would solve its stage equations inside, and its replay pieces would differentiate
through that solve; events need only ``interpolate`` on the step just taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol


class StepResult(NamedTuple):
    """One attempted step.

    ``stages`` are what the interpolant and the next step reuse (for an FSAL method the last is
    ``f(t + h, y_new)``); ``error`` and ``error2`` are the local error estimates in the state's
    units (``error2`` for a method with a second estimator, else None; both None for a
    fixed-step method)."""

    y_new: Any
    stages: list
    error: Any
    error2: Any


class Solver(Protocol):
    name: str
    order: int
    adaptive: bool
    # Whether the last stage of a step is f(t + h, y_new), so that the next step starts from it.
    fsal: bool
    # q + 1 for an error estimate of order q: the controller's exponent is 1 / (q + 1).
    error_exponent_order: int
    # Evaluations of f per attempted step, and the dense output's extra ones per interpolated step.
    nfev_per_step: int
    nfev_dense_extra: int
    # The interpolant's coefficients, (dense stages, degree): stage i's weight at theta is
    # sum_m dense[i][m] theta^(m+1).
    dense: Sequence[Sequence[float]]

    def init(self, first_call: Callable, t0: Any, y0: Any) -> Any:
        """What the first step needs besides ``(t0, y0)``; ``first_call`` is the dynamics'
        checked first evaluation (it counts as one evaluation of f)."""

    def step(
        self, evaluate: Callable, t, y, f0, h, hy, store: Callable, cap=None
    ) -> StepResult: ...

    def dense_stages(self, evaluate: Callable, t, y, h, hy, stages, f_new, cap=None) -> list:
        """Every stage the interpolant weights, evaluating the ones the step did not need."""

    def interpolate(self, values, coeffs, theta, y, hy, dense) -> Any:
        """``y(t + theta h)`` from the dense stages; ``coeffs`` is ``dense`` as an array."""

    def dense_weights(self, values, theta) -> list:
        """Each dense stage's weight at ``theta``, for the replay of an interpolated output."""

    # The checkpoint replay: the step as nodes (see odecore.solvers.explicit_rk), recomputed
    # with pullbacks and walked backward.
    new_node: int
    nodes: Sequence

    def linearized(self, linearize: Callable, t, y, h, hy, stop, known=None, cap=None): ...

    def node_input(self, i: int, y, hy, stages) -> Any: ...

    def pull_back(self, hy, nodes, pulls, k_bar, input_bar, y_bar, grads): ...
