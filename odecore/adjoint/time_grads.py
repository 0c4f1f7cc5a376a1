"""Gradients with respect to the output times, and the finishing of every mode's cotangents.

Time gradients in every mode use the identities of the exact flow: moving an output time
``t_i`` changes ``y(t_i)`` at rate ``f(t_i, y(t_i))``, and moving ``t_0`` shifts the whole
trajectory, ``dL/dt_0 = -a(t_0) . f(t_0, y_0)`` with ``a`` the adjoint. On the discrete
solution they hold to the solver's tolerance.
"""

from __future__ import annotations

from odecore.adjoint.backsolve import user_f


def finish_gradients(problem, ys, ys_bar, a0, leaves_bar, want_t, failed, f_end=None):
    """Add the direct terms: the output at t_0 is y0 itself, and the time gradients.
    ``f_end`` is the forward solve's ``f`` at its final state (internal layout), or None."""
    bk = problem.backend
    xp = bk.xp
    y0_bar = a0 + ys_bar[0]
    T = ys.shape[0]
    t_bar = None
    if want_t:
        # An unreached output's cotangent is zero, and its rate is taken at a finite state.
        states = failed.last_reached(ys) if failed.active else ys
        t_bar = [None] * T
        for i in range(1, T - 1):
            t_bar[i] = xp.sum(ys_bar[i] * user_f(problem, i, states[i]))
        if T > 1:
            t_bar[T - 1] = xp.sum(ys_bar[T - 1] * _last_rate(problem, states, f_end, failed))
        t_bar[0] = -xp.sum(a0 * user_f(problem, 0, states[0]))
        t_bar = xp.stack([xp.astype(v, problem.t_user_dtype) for v in t_bar])
    leaves_bar = [
        xp.astype(g, leaf.dtype) if g.dtype != leaf.dtype else g
        for g, leaf in zip(leaves_bar, problem.dynamics.leaves, strict=True)
    ]
    return y0_bar, t_bar, leaves_bar


def _last_rate(problem, states, f_end, failed):
    """``f(t_end, y(t_end))`` in the user's terms: the forward solve ended there and kept it,
    so no evaluation is needed, unless a jump at the end makes its value the other side's
    (or the solve kept none). A sample that did not reach the end has a zero cotangent
    there (``failed``), and its rate, perhaps not finite, is replaced by zero."""
    if f_end is None or problem.jumps is not None:
        return user_f(problem, len(states) - 1, states[-1])
    xp, lay = problem.backend.xp, problem.layout
    rate = lay.to_user(xp, f_end) * problem.dynamics.sign
    if failed.active:
        reached = failed.per_sample_mask(xp.logical_not(failed.unreached[-1]))
        rate = xp.where(reached, rate, xp.zeros_like(rate))
    return rate
