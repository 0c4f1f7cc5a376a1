"""The solve as a rule (``odecore.adjoint.rule``): its forward runs the loop, its backward is the
backsolve or the checkpoint replay, wrapped in the failed-solve policy.
"""

from __future__ import annotations

from odecore.adjoint.backsolve import backsolve_backward
from odecore.adjoint.checkpoint import checkpoint_backward
from odecore.adjoint.failed import FailedOutputs
from odecore.adjoint.time_grads import finish_gradients
from odecore.ode.tape import TapeBuffers


class SolveRule:
    """One solve as a framework-neutral forward / backward pair."""

    def __init__(self, mode: str, run, backsolve_settings: dict | None = None, prepare=None):
        # ``run(y0, t, record, leaves)`` prepares and runs the forward loop, returning
        # (problem, LoopResult); it is the solve's own, passed in to keep one loop.
        # ``prepare(y0, t, leaves)`` only prepares: see ``from_arrays``.
        self.mode = mode
        self.run = run
        self.prepare = prepare
        self.backsolve_settings = backsolve_settings or {}
        self.second_order_message = (
            f"second-order gradients (create_graph=True) are not available with "
            f"adjoint={mode!r}: its backward pass computes first-order gradients only. "
            f"Use adjoint='direct', which differentiates through the solver's operations and "
            f"supports higher-order gradients"
        )

    def forward(self, y0, t, *leaves):
        record = self.mode == "checkpoint"
        problem, result = self.run(y0, t, record=record, leaves=list(leaves))
        ys = result.solution.ys
        # The residuals hold the outputs through a stop_gradient alias: the framework's
        # record of this operation keeps the residuals, and a reference back to its own
        # output would be a cycle that keeps the tape alive until the cyclic GC runs.
        residuals = (problem, problem.backend.stop_gradient(ys), result.tape, result.dt_next)
        return ys, result.solution.report(), residuals

    def captured(self):
        return [v for v in (self.backsolve_settings.get(k) for k in ("rtol", "atol")) if v]

    @staticmethod
    def residual_arrays(residuals):
        """The arrays among ``forward``'s residuals. A framework that traces the forward and
        the backward separately (JAX) can keep only arrays between them; ``from_arrays``
        rebuilds the rest from the primals. ``arrays=None`` only checks the primals."""
        _, ys, tape, dt_next = residuals
        return ys, (tape if isinstance(tape, TapeBuffers) else None), dt_next

    def from_arrays(self, primals, arrays):
        y0, t, *leaves = primals
        problem = self.prepare(y0, t, list(leaves))
        if arrays is None:
            return None
        ys, tape, dt_next = arrays
        return problem, ys, tape, dt_next

    def backward(self, residuals, ys_bar, needs=None):
        """One cotangent per primal of ``forward``: ``(y0_bar, t_bar, *leaves_bar)``.
        ``needs`` (one flag per primal, from the framework) says which are wanted; the
        time gradient costs one evaluation of the dynamics per output time, so it is
        skipped (None) when the times need none."""
        problem, ys, tape, dt_next = residuals
        failed = FailedOutputs(problem.backend, problem.layout, ys)
        ys_bar, poisoned = failed.drop_cotangents(ys_bar)
        if self.mode == "checkpoint":
            a0, leaves_bar = checkpoint_backward(problem, tape, ys_bar, failed)
        else:
            a0, leaves_bar = backsolve_backward(
                problem, ys, ys_bar, self.backsolve_settings, failed, dt_next
            )
        want_t = needs is None or bool(needs[1])
        y0_bar, t_bar, leaves_bar = finish_gradients(
            problem, ys, ys_bar, a0, leaves_bar, want_t, failed
        )
        y0_bar, t_bar, leaves_bar = failed.poison(poisoned, y0_bar, t_bar, leaves_bar)
        return (y0_bar, t_bar, *leaves_bar)
