"""The gradient of a fixed point, as one framework-neutral rule (see odecore/adjoint/rule.py).

The implicit backward solves ``u = w + u J_f(z*)`` (``w`` the cotangent of ``z*``) by running
the forward loop on the map ``u -> w + u J_f(z*)``, or by GMRES on ``u (I - J_f) = w``; the
parameter gradient is then ``u df/dparams``.
"""

from __future__ import annotations

import math

from odecore.backend import differentiate
from odecore.deq.gmres import gmres
from odecore.deq.iteration import Loop
from odecore.deq.residual import norm
from odecore.deq.solution import CONVERGED, FixedPointError, FixedPointSolution, FixedPointStatus


class FixedPointRule:
    """A fixed-point solve as a framework-neutral forward / backward pair.

    Primals are ``(z0, *leaves)``. The forward value is the solver's best iterate in every
    backward mode; the mode only decides the gradient. ``z0`` gets no gradient: ``z*`` does
    not depend on where the iteration started.
    """

    def __init__(self, bk, fmap, layout, options):
        self.bk, self.fmap, self.layout, self.opts = bk, fmap, layout, options
        self.solution = None

    second_order_message = (
        "second-order gradients (create_graph=True) are not available through a fixed point: "
        "its backward pass computes first-order gradients only"
    )
    captured_message = (
        "a value being differentiated reaches the fixed-point solve other than through "
        "params: f captures it, or it is tol or an option. The gradient reaches only the "
        "arrays in params; pass it in params and read it there, as f(z, params)"
    )

    @staticmethod
    def captured():
        return []

    @staticmethod
    def residual_arrays(residuals):
        return residuals

    def from_arrays(self, primals, arrays):
        _, *leaves = primals
        self.fmap = self.fmap.rebuilt(leaves)
        return arrays

    def forward(self, z0, *leaves, first_value=None):
        """The solve from ``z0``; ``first_value`` is ``f(z0)`` in internal layout, when the
        caller has evaluated it already."""
        bk, xp, opts = self.bk, self.bk.xp, self.opts
        if not bk.eager:
            self.fmap = self.fmap.rebuilt(leaves)
        with bk.no_grad():
            z0_int = self.layout.to_internal(xp, bk.stop_gradient(z0))
            loop = Loop(
                bk,
                self.fmap,
                solver=opts.solver,
                tol=opts.tol,
                stop_mode=opts.stop_mode,
                max_iter=opts.max_iter,
                m=opts.m,
                lam=opts.lam,
                beta=opts.beta,
                damping=opts.damping,
            )
            state = loop.run(z0_int, first_value)
        z_star = state["best_z"]
        self.solution = FixedPointSolution(
            z=self.layout.to_user(xp, z_star),
            iterations=state["iterations"],
            abs_residual=state["best_abs"],
            rel_residual=state["best_rel"],
            status=state["status"],
            trace=state["trace"][: int(state["k"]) + 1] if bk.eager else state["trace"],
            solver=opts.solver,
            stats={"nfev": state["k"] + 1},
        )
        sol = self.solution
        aux = {
            "iterations": sol.iterations,
            "abs_residual": sol.abs_residual,
            "rel_residual": sol.rel_residual,
            "status": sol.status,
            "trace": sol.trace,
            "stats": sol.stats,
        }
        return sol.z, aux, z_star

    def backward(self, z_star, z_bar, needs=None):
        """One cotangent per primal: ``(None, *leaves_bar)``. ``needs`` (one flag per primal,
        from the framework) is accepted for the protocol; every leaf's cotangent comes from
        the same VJP, so there is nothing to skip."""
        xp, opts = self.bk.xp, self.opts
        w = self.layout.to_internal(xp, z_bar)
        # A sample with a non-finite z* (a NaN z0) that the loss does not read is
        # linearized at a finite stand-in: f's VJP at z* is NaN even for a zero cotangent.
        unread = xp.logical_and(
            xp.logical_not(xp.all(xp.isfinite(z_star), axis=1)), xp.all(w == 0, axis=1)
        )
        z_star = differentiate.finite_stand_in(xp, unread[:, None], z_star)
        with self.bk.no_grad():
            if opts.backward == "implicit":
                pull_z, pull_all = self._pullbacks(z_star)
                u = self._implicit_cotangent(pull_z, w)
                _, leaves_bar = pull_all(u)
            else:
                leaves_bar = self._unrolled(z_star, w)
        # A number among the params (NumPy keeps it as a leaf) takes its cotangent as f.vjp
        # gives it.
        leaves_bar = [
            xp.astype(g, leaf.dtype) if hasattr(leaf, "dtype") and g.dtype != leaf.dtype else g
            for g, leaf in zip(leaves_bar, self.fmap.leaves, strict=True)
        ]
        return (None, *leaves_bar)

    def _pullbacks(self, z_star):
        """``(pull_z, pull_all)``: ``u -> u J_f(z*)`` and ``u -> (u J_f(z*), u df/dparams)``,
        from one evaluation of ``f`` kept for every call, or (``backward_linearization=
        "per_iteration"``) from a new evaluation in each call."""
        if self.opts.backward_linearization == "once":
            return self.fmap.linearized(z_star)

        def pull_all(u):
            return self.fmap.vjp(z_star, u)

        return (lambda u: pull_all(u)[0]), pull_all

    def _implicit_cotangent(self, vjp_z, w):
        """``u`` with ``u = w + u J_f(z*)``, ``vjp_z(u) = u J_f(z*)``.

        The system is solved for ``w / |w|`` per sample, and its solution scaled back: the
        scale of ``w`` is the loss's (a mean over a batch makes it small), so ``backward_tol``
        bounds the residual relative to ``|w|``. Measured absolutely, a cotangent with
        ``|w| <= backward_tol`` counted as solved by the start ``u = 0``: a zero gradient, and
        a slightly larger one stopped with few correct digits."""
        bk, xp, opts = self.bk, self.bk.xp, self.opts
        scale = norm(xp, w)
        # A zero cotangent has the solution zero, from any scale.
        scale = xp.where(scale > 0, scale, xp.ones_like(scale))
        w = w / scale[:, None]

        if opts.backward_solver == "gmres":
            u, iterations, status = gmres(
                bk,
                lambda u: u - vjp_z(u),
                w,
                opts.backward_tol,
                opts.stop_mode,
                opts.backward_max_iter,
                restart=min(opts.m * 4, 20),
            )
        else:
            loop = Loop(
                bk,
                lambda u: w + vjp_z(u),
                solver=opts.backward_solver,
                tol=opts.backward_tol,
                stop_mode=opts.stop_mode,
                max_iter=opts.backward_max_iter,
                m=opts.m,
                lam=opts.lam,
                beta=opts.beta,
                damping=1.0,
            )
            state = loop.run(xp.zeros_like(w))
            u, iterations, status = state["best_z"], state["iterations"], state["status"]
        if self.solution is not None and self.bk.eager:
            # On a tracing backend these are values of the backward's own trace, which
            # must not leak into the solution the caller holds.
            self.solution.stats["backward_iterations"] = iterations
            self.solution.stats["backward_status"] = status
        return self._checked_cotangent(u * scale[:, None], iterations, status)

    def _checked_cotangent(self, u, iterations, status):
        """``u``, where the backward converged for every sample. Where it did not, its best
        iterate would give a gradient that is wrong by any amount (a diverging Picard
        backward leaves u = 0), so with ``throw`` a known failure raises FixedPointError, as
        the forward does, and under jit, where nothing can be raised, the gradient is NaN,
        as a failed ODE solve's is. ``throw=False`` keeps the best iterate, its status in
        the solution's ``stats["backward_status"]``."""
        bk, xp, opts = self.bk, self.bk.xp, self.opts
        if not opts.throw:
            return u
        converged = xp.all(status == CONVERGED)
        if bk.is_traced(converged):
            return xp.where(converged, u, xp.full_like(u, math.nan))
        if bool(converged):
            return u
        codes = [int(c) for c in xp.reshape(status, (-1,))]
        failed = [i for i, c in enumerate(codes) if c != CONVERGED]
        first = failed[0]
        reason = FixedPointStatus(codes[first]).name
        where = (
            f" for {len(failed)} of {len(codes)} samples (first: sample {first}, {reason})"
            if self.layout.batched
            else f" ({reason})"
        )
        others = " or ".join(
            f"'{name}'" for name in ("gmres", "anderson") if name != opts.backward_solver
        )
        raise FixedPointError(
            f"odecore: the implicit backward of the fixed point (backward_solver="
            f"'{opts.backward_solver}') did not converge{where} after "
            f"{int(xp.reshape(iterations, (-1,))[first])} iterations, so its gradient would be "
            f"wrong. Raise backward_max_iter, loosen backward_tol, try backward_solver="
            f"{others}, or take backward='one_step' for an approximate gradient; "
            f"throw=False keeps the best iterate's gradient, with stats['backward_status']",
            self.solution,
        )

    def _unrolled(self, z_star, w):
        """Backpropagate through ``k`` steps ``z <- (1 - d) z + d f(z)`` from the detached
        ``z*``: the phantom gradient (``k = 1, d = 1`` is the one-step gradient)."""
        opts = self.opts
        d, k = opts.unroll_damping, opts.unroll_steps
        zs = [z_star]
        for _ in range(k - 1):
            zs.append((1.0 - d) * zs[-1] + d * self.fmap(zs[-1]))
        a = w
        total = None
        for z in reversed(zs):
            cot_z, cot_leaves = self.fmap.vjp(z, d * a)
            a = (1.0 - d) * a + cot_z
            total = (
                cot_leaves
                if total is None
                else [t + c for t, c in zip(total, cot_leaves, strict=True)]
            )
        return total
