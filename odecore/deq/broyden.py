"""Broyden's method, one step of the fixed-point loop (:mod:`odecore.deq.iteration`).

The inverse Jacobian of ``r(z) = g(z) - z`` is kept as ``-I + sum_i u_i v_i^T`` (the loop
state's ``mem_a`` holds the ``u_i``, ``mem_b`` the ``v_i``), with at most ``m`` terms.

Every running sample has done exactly ``k`` iterations (a sample that stops never restarts),
so iteration ``k`` writes term ``k mod m`` of every sample, and a sample whose update is
skipped (a vanishing denominator, a non-finite evaluation) writes a zero term. With the
memory full the method restarts from ``-I``: the terms of the product form build on each
other, so dropping only the oldest would leave an inconsistent rest. The terms in use are
then those up to the one just written, the same for every sample: a slice write and a mask
of ``m`` coefficients, where per-sample term counts would need masked updates of the whole
(B, m, N) memory at every iteration.

An iteration applies the inverse twice: ``H r`` at the new iterate and ``H^T dz``. The
update needs ``H dr = H r_new - H r_old``, whose second part the proposal computed, and the
next proposal needs ``H' r_new``, which the rank-one update gives from ``H r_new`` (state
``h_r``). Written as three applications (``H r`` for the proposal, ``H dr`` and ``H^T dz``
for the update, as the textbook form has it), each a pair of batched products over the
(B, m, N) memory, a torch forward of a (256, 128) batch took 12% longer (bench_deq).
"""

from __future__ import annotations

from odecore.deq.residual import norm


def broyden_memory(xp, m, z, gz):
    """The empty memory of the samples ``z`` (B, N) with ``g(z) = gz``: no terms in use, so
    ``H = -I`` and ``H r = z - gz``."""
    B, N = z.shape
    return {
        "mem_a": xp.zeros((B, m, N), dtype=z.dtype),
        "mem_b": xp.zeros((B, m, N), dtype=z.dtype),
        "h_r": z - gz,
    }


def broyden_proposal(bk, s, m):
    """The quasi-Newton step ``z - H r(z)`` of each sample."""
    return s["z"] - s["h_r"]


def broyden_update(bk, s, m, update, z, gz, z_new, gz_new):
    """The 'good' Broyden update of the inverse, where ``update``: it maps the new residual
    difference onto the step just taken; and ``H r`` for the next proposal, at ``z_new``
    where ``update``, else at ``z`` (the iterate the loop keeps). Updates ``s`` in place."""
    xp = bk.xp
    slot = s["k"] % m
    # With the memory full, the term written now (into slot 0) starts a new cycle: the
    # inverse after it is -I plus it alone, so it must satisfy the secant condition on -I,
    # not on the inverse it replaces (H' dr = dz fails otherwise, and with m = 1 the
    # iteration diverged on a plain contraction).
    restart = (slot == 0) & (s["k"] > 0)
    in_use = _in_use(xp, s["k"], m) & xp.logical_not(restart)
    dz = z_new - z
    r_new = gz_new - z_new
    dr = r_new - (gz - z)
    h_r_new = _apply_inverse(bk, s, r_new, in_use)
    h_r_old = xp.where(restart, z - gz, s["h_r"])
    h_dr = h_r_new - h_r_old
    v = _apply_inverse(bk, s, dz, in_use, transposed=True)
    denom = xp.sum(v * dr, axis=-1)
    eps = xp.finfo(z.dtype).eps
    scale = norm(xp, dz) * norm(xp, dr) + xp.finfo(z.dtype).tiny
    # Skip the update where it would divide by (nearly) zero: a zero term.
    term = update & (xp.abs(denom) > eps * scale)
    safe = xp.where(term, denom, 1.0)
    u = xp.where(term[:, None], (dz - h_dr) / safe[:, None], 0.0)
    v = xp.where(term[:, None], v, 0.0)
    s["mem_a"] = bk.write(s["mem_a"], (slice(None), slot), u)
    s["mem_b"] = bk.write(s["mem_b"], (slice(None), slot), v)
    # The next iteration's inverse is the one the term was built on plus the term:
    # H' x = H x + u (v . x), with u = 0 where the update was skipped.
    h_r_next = h_r_new + u * xp.sum(v * r_new, axis=-1)[:, None]
    s["h_r"] = xp.where(update[:, None], h_r_next, h_r_old)


def _in_use(xp, k, m):
    """``(m,)``: the terms iteration ``k`` reads, those written since the last restart: up
    to term ``(k - 1) mod m``, and none at ``k = 0``."""
    return (xp.arange(m, dtype=k.dtype) <= (k - 1) % m) & (k > 0)


def _apply_inverse(bk, s, x, in_use, transposed=False):
    """``H x`` (or ``H^T x``), ``H = -I + sum_i u_i v_i^T`` over the terms in use. Terms out
    of use hold finite values of an earlier cycle (or zeros), so masking their coefficients
    leaves them out."""
    a, b = (s["mem_b"], s["mem_a"]) if transposed else (s["mem_a"], s["mem_b"])
    coeff = bk.xp.where(in_use, bk.row_products(b, x), 0.0)  # (B, m)
    return bk.weighted_rows(coeff, a) - x
