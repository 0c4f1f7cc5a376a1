"""The solve as a rule (``odecore.adjoint.rule``): its forward runs the loop, its backward is the
backsolve or the checkpoint replay, wrapped in the failed-solve policy.
"""

from __future__ import annotations

import dataclasses

from odecore.adjoint.backsolve import backsolve_backward
from odecore.adjoint.checkpoint import checkpoint_backward
from odecore.adjoint.failed import FailedOutputs
from odecore.adjoint.rule import SOLVE_CAPTURED_MESSAGE
from odecore.adjoint.time_grads import finish_gradients
from odecore.ode.tape import TapeBuffers


class SolveRule:
    """One solve as a framework-neutral forward / backward pair."""

    captured_message = SOLVE_CAPTURED_MESSAGE

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
        # The residuals hold the outputs as the framework keeps them for a backward
        # (``Autodiff.residual``: detached on torch, with their tangents on JAX).
        bk = problem.backend
        keep = bk.autodiff.residual if bk.autodiff is not None else bk.stop_gradient
        f_end = None if result.f_end is None else keep(result.f_end)
        residuals = (problem, keep(ys), result.tape, result.dt_next, f_end)
        return ys, result.solution.report(), residuals

    @staticmethod
    def rereads(primals, out):
        # The outputs (the backsolve's restarts, the time gradients' states) and the
        # parameters (the dynamics' VJPs); y0 and t are read from copies.
        return [out, *primals[2:]]

    def captured(self):
        # ``is not None``: a per-element tolerance's strictest value is an array, traced
        # under jit, whose truth value cannot be asked.
        settings = self.backsolve_settings
        return [v for v in (settings.get(k) for k in ("rtol", "atol")) if v is not None]

    @staticmethod
    def residual_arrays(residuals):
        """The arrays among ``forward``'s residuals. A framework that traces the forward and
        the backward separately (JAX) can keep only arrays between them; ``from_arrays``
        rebuilds the rest from the primals. ``arrays=None`` only checks the primals."""
        _, ys, tape, dt_next, f_end = residuals
        return ys, (tape if isinstance(tape, TapeBuffers) else None), dt_next, f_end

    def from_arrays(self, primals, arrays):
        y0, t, *leaves = primals
        problem = self.prepare(y0, t, list(leaves))
        if arrays is None:
            return None
        ys, tape, dt_next, f_end = arrays
        return problem, ys, tape, dt_next, f_end

    def backward(self, residuals, ys_bar, needs=None):
        """One cotangent per primal of ``forward``: ``(y0_bar, t_bar, *leaves_bar)``.
        ``needs`` (one flag per primal, from the framework) says which are wanted, and the
        others are None: the time gradient costs one evaluation of the dynamics per output
        time; without parameter cotangents the adjoint solve carries no parameter adjoint
        and its VJPs differentiate with respect to the state only."""
        problem, ys, tape, dt_next, f_end = residuals
        n_leaves = len(problem.dynamics.leaves)
        want = [True] * (2 + n_leaves) if needs is None else [bool(n) for n in needs]
        want_leaves = any(want[2:])
        if not any(want):
            return (None,) * (2 + n_leaves)
        if not want_leaves:
            problem = dataclasses.replace(problem, dynamics=problem.dynamics.with_constant_params())
        failed = FailedOutputs(problem.backend, problem.layout, ys)
        ys_bar, poisoned = failed.drop_cotangents(ys_bar)
        if self.mode == "checkpoint":
            a0, leaves_bar = checkpoint_backward(problem, tape, ys_bar)
        else:
            a0, leaves_bar = backsolve_backward(
                problem, ys, ys_bar, self.backsolve_settings, failed, dt_next
            )
        y0_bar, t_bar, leaves_bar = finish_gradients(
            problem, ys, ys_bar, a0, leaves_bar, want[1], failed, f_end
        )
        y0_bar, t_bar, leaves_bar = failed.poison(poisoned, y0_bar, t_bar, leaves_bar)
        if not want_leaves:
            leaves_bar = [None] * n_leaves
        return (y0_bar if want[0] else None, t_bar, *leaves_bar)
