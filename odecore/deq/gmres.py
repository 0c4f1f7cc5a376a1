"""Restarted GMRES for the implicit backward's linear system ``u (I - J_f(z*)) = w``."""

from __future__ import annotations

from odecore.deq.residual import norm
from odecore.deq.solution import CONVERGED, MAX_ITER_REACHED, NONFINITE, RUNNING


def gmres(bk, apply_op, w, tol, stop_mode, max_iter, restart):
    """Restarted GMRES, per sample, for ``apply_op(u) = w`` on ``(B, N)`` arrays. Each cycle
    builds a Krylov basis of ``restart`` vectors and solves its small least-squares problem;
    converged samples stop changing. Returns ``(u, iterations, status)``, with iterations
    counting operator applications, of which ``max_iter`` bounds the total: a cycle costs
    ``restart + 1`` (its basis, then the new residual, which the next cycle starts from), so
    the cycles are as many as fit (at least one, of at least one basis vector: two
    applications).

    Like the forward loop, it is one masked ``while_loop`` whose cycle has a fixed number of
    steps: it runs under a tracing framework's ``jit`` as it runs eagerly."""
    xp = bk.xp
    B, N = w.shape
    # As the other backward solvers' iterations, max_iter bounds the operator applications,
    # the cost: a smaller budget takes shorter cycles before fewer of them.
    restart = max(1, min(restart, N, max_iter - 1))
    cycles = max(1, max_iter // (restart + 1))
    tiny = xp.finfo(w.dtype).tiny
    eps = xp.finfo(w.dtype).eps
    # "rel" measures the linear residual against the right-hand side, per sample.
    tol = tol * norm(xp, w) if stop_mode == "rel" else tol

    def residual(u):
        return w - apply_op(u)

    def init():
        res = norm(xp, w)  # the residual of u = 0
        status = xp.where(res <= tol, CONVERGED, RUNNING)
        return {
            "u": xp.zeros_like(w),
            # The residual of u, kept from the convergence test: recomputing it at the start
            # of each cycle cost one application more.
            "r": w,
            "status": xp.astype(status, bk.int_dtype),
            "iterations": xp.zeros((B,), dtype=bk.int_dtype),
            "k": xp.asarray(0, dtype=bk.int_dtype),
        }

    def cond(s):
        return xp.any(s["status"] == RUNNING) & (s["k"] < cycles)

    def body(s):
        active = s["status"] == RUNNING
        r = s["r"]
        beta = norm(xp, r)
        basis = [r / (beta + tiny)[:, None]]
        h_cols = []
        for j in range(restart):
            v = apply_op(basis[j])
            scale = norm(xp, v)
            col = []
            for i in range(j + 1):  # modified Gram-Schmidt
                hij = xp.sum(v * basis[i], axis=-1)
                v = v - hij[:, None] * basis[i]
                col.append(hij)
            hnext = norm(xp, v)
            # A breakdown: the Krylov space is invariant (J_f a multiple of the identity, or
            # fewer directions than restart), and what is left of v is rounding. Scaled up,
            # it would be a new direction of noise; the basis ends there instead (zero
            # vectors, whose columns of H are zero and whose coefficients the solve below
            # sets to zero), and the solution lies in the space built so far.
            ended = hnext <= 16 * eps * scale
            hnext = xp.where(ended, xp.zeros_like(hnext), hnext)
            col.append(hnext)
            col += [xp.zeros_like(hnext)] * (restart - j - 1)
            h_cols.append(xp.stack(col, axis=-1))  # (B, restart + 1)
            basis.append(xp.where(ended[:, None], xp.zeros_like(v), v / (hnext + tiny)[:, None]))
        H = xp.stack(h_cols, axis=-1)  # (B, restart + 1, restart)
        Ht = xp.matrix_transpose(H)
        normal = Ht @ H
        # The least-squares problem by its normal equations, regularised relative to their
        # scale: zero columns (a basis that ended early) then get zero coefficients, where
        # an absolute regularisation below rounding left the matrix singular.
        size = xp.max(xp.abs(normal), axis=(-2, -1))
        lam = eps * xp.where(size > 0, size, xp.ones_like(size))
        normal = normal + lam[:, None, None] * xp.eye(restart, dtype=w.dtype)
        rhs = Ht[:, :, 0] * beta[:, None]
        y = xp.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
        V = xp.stack(basis[:restart], axis=1)  # (B, restart, N)
        u_new = s["u"] + xp.sum(y[:, :, None] * V, axis=1)
        r_new = residual(u_new)
        res = norm(xp, r_new)
        finite = xp.isfinite(res)
        s = dict(s)
        s["u"] = xp.where((active & finite)[:, None], u_new, s["u"])
        s["r"] = xp.where((active & finite)[:, None], r_new, s["r"])
        status = xp.where(active & ~finite, NONFINITE, s["status"])
        status = xp.where(active & finite & (res <= tol), CONVERGED, status)
        s["status"] = xp.astype(status, bk.int_dtype)
        s["iterations"] = s["iterations"] + xp.astype(active, bk.int_dtype) * (restart + 1)
        s["k"] = s["k"] + 1
        return s

    s = bk.while_loop(cond, body, init())
    status = xp.where(s["status"] == RUNNING, MAX_ITER_REACHED, s["status"])
    return s["u"], s["iterations"], status
