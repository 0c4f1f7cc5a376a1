"""The forward loop: one init / cond / body loop for Picard, Anderson and Broyden.

The state is a fixed-shape dict of ``(B, N)`` rows; every update is masked, so a sample that
has converged stops changing while the others go on, and the body has no Python ``if`` on
array values (it runs under a tracing framework's ``while_loop``).
"""

from __future__ import annotations

import math

from odecore.deq.anderson import anderson_memory, anderson_proposal
from odecore.deq.broyden import broyden_memory, broyden_proposal, broyden_update
from odecore.deq.residual import residuals
from odecore.deq.solution import CONVERGED, MAX_ITER_REACHED, NONFINITE, RUNNING

# The rows an eager trace starts with, before it doubles.
_FIRST_TRACE_ROWS = 64


class Loop:
    """The iteration of a map ``g`` of ``(B, N)`` arrays with ``solver``, until each
    sample's residual (as ``stop_mode`` measures it) is at most ``tol``, or ``max_iter``."""

    def __init__(self, bk, g, *, solver, tol, stop_mode, max_iter, m, lam, beta, damping):
        self.bk, self.g = bk, g
        self.solver, self.tol, self.stop_mode, self.max_iter = solver, tol, stop_mode, max_iter
        self.m, self.lam, self.beta, self.damping = m, lam, beta, damping
        self.skip_identity_selects = False

    def run(self, z0, gz0=None):
        """Iterate from ``z0``; ``gz0``, when given, is ``g(z0)`` already evaluated."""
        bk = self.bk
        # While every sample runs and stays finite, as until the first one converges, the
        # body's masked selects of whole rows change nothing. Where the host reads the
        # masks cheaply, testing for that costs less than the selects: torch's masked
        # select of a (256, 128) float32 batch takes 24 us on a CPU, six multiplications.
        self.skip_identity_selects = bk.reads_cheaply(z0)
        state = bk.while_loop(self.cond, self.body, self.init(z0, gz0))
        status = state["status"]
        state["status"] = bk.xp.where(status == RUNNING, MAX_ITER_REACHED, status)
        return state

    def init(self, z0, gz0=None):
        bk, xp = self.bk, self.bk.xp
        B, N = z0.shape
        gz = self.g(z0) if gz0 is None else gz0
        abs_res, rel_res = residuals(xp, z0, gz)
        res = abs_res if self.stop_mode == "abs" else rel_res
        finite = xp.isfinite(res)
        status = xp.where(finite, xp.where(res <= self.tol, CONVERGED, RUNNING), NONFINITE)
        status = xp.astype(status, bk.int_dtype)
        # Eagerly the trace grows as the iterations go, doubling: a buffer of max_iter + 1
        # rows up front held memory for iterations never taken (max_iter=10**6 on a batch of
        # 64 allocated 512 MB for a solve of ten iterations). Under a tracing framework's
        # loop its size must be fixed.
        rows = self.max_iter + 1
        if bk.eager:
            rows = min(rows, _FIRST_TRACE_ROWS)
            self.trace_rows_used = 1
        trace = xp.full((rows, B), math.nan, dtype=z0.dtype)
        trace = bk.write(trace, 0, res)
        # The body keeps a sample's last finite pair whenever an evaluation is not finite,
        # so only the start can hold a non-finite one. Zeroed here, once, it cannot reach
        # the solvers' memory; the sample has stopped, and reports its start as best_z.
        z_kept, gz_kept = z0, gz
        if not (self.skip_identity_selects and bool(xp.all(finite))):
            z_kept, gz_kept = (xp.where(finite[:, None], a, 0.0) for a in (z0, gz))
        state = {
            "z": z_kept,
            "gz": gz_kept,
            "best_z": z0,
            "best_res": xp.where(finite, res, math.inf),
            "best_abs": abs_res,
            "best_rel": rel_res,
            "iterations": xp.zeros((B,), dtype=bk.int_dtype),
            "k": xp.asarray(0, dtype=bk.int_dtype),
            "status": status,
            "trace": trace,
        }
        if self.solver == "anderson":
            state.update(anderson_memory(xp, B, self.m, N, z0.dtype))
        if self.solver == "broyden":
            state.update(broyden_memory(xp, self.m, z_kept, gz_kept))
        return state

    def cond(self, s):
        xp = self.bk.xp
        return xp.any(s["status"] == RUNNING) & (s["k"] < self.max_iter)

    def body(self, s):
        xp, bk = self.bk.xp, self.bk
        active = s["status"] == RUNNING
        z, gz = s["z"], s["gz"]
        s = dict(s)
        every_active = self.skip_identity_selects and bool(xp.all(active))
        if self.solver == "picard":
            proposal = (1.0 - self.damping) * z + self.damping * gz
        elif self.solver == "anderson":
            stopped = None if every_active else ~active
            proposal = anderson_proposal(bk, s, self.m, self.lam, self.beta, stopped)
        else:
            proposal = broyden_proposal(bk, s, self.m)
        z_new = proposal if every_active else xp.where(active[:, None], proposal, z)
        gz_new = self.g(z_new)
        abs_res, rel_res = residuals(xp, z_new, gz_new)
        res = abs_res if self.stop_mode == "abs" else rel_res
        finite = xp.isfinite(res)
        if self.solver == "broyden":
            broyden_update(bk, s, self.m, active & finite, z, gz, z_new, gz_new)
        better = active & finite & (res < s["best_res"])
        s["best_z"] = xp.where(better[:, None], z_new, s["best_z"])
        s["best_res"] = xp.where(better, res, s["best_res"])
        s["best_abs"] = xp.where(better, abs_res, s["best_abs"])
        s["best_rel"] = xp.where(better, rel_res, s["best_rel"])
        # A non-finite sample keeps its last finite iterate, so the next step starts from it.
        keep = active & finite
        if every_active and bool(xp.all(finite)):
            s["z"], s["gz"] = z_new, gz_new
        else:
            s["z"] = xp.where(keep[:, None], z_new, z)
            s["gz"] = xp.where(keep[:, None], gz_new, gz)
        s["iterations"] = s["iterations"] + xp.astype(active, bk.int_dtype)
        status = xp.where(active & ~finite, NONFINITE, s["status"])
        status = xp.where(active & finite & (res <= self.tol), CONVERGED, status)
        s["status"] = xp.astype(status, bk.int_dtype)
        s["k"] = s["k"] + 1
        trace = s["trace"]
        if bk.eager:
            # The body runs once per iteration, in order: the row it writes is a count
            # kept on the host, with no read of k from the device.
            if self.trace_rows_used == trace.shape[0]:
                more = min(trace.shape[0], self.max_iter + 1 - trace.shape[0])
                trace = xp.concat([trace, xp.full_like(trace[:more], math.nan)], axis=0)
            self.trace_rows_used += 1
        s["trace"] = bk.write(trace, s["k"], xp.where(active, res, math.nan))
        return s
