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
"""

from __future__ import annotations

from odecore.deq.residual import norm


def broyden_memory(xp, B, m, N, dtype):
    """The empty memory of ``B`` samples of size ``N``: no terms in use."""
    return {
        "mem_a": xp.zeros((B, m, N), dtype=dtype),
        "mem_b": xp.zeros((B, m, N), dtype=dtype),
    }


def broyden_proposal(bk, s, m):
    """The quasi-Newton step ``z - H r(z)`` of each sample."""
    r = s["gz"] - s["z"]
    return s["z"] - _apply_inverse(bk.xp, s, r, _in_use(bk.xp, s["k"], m))


def broyden_update(bk, s, m, update, z, gz, z_new, gz_new):
    """The 'good' Broyden update of the inverse, where ``update``: it maps the new residual
    difference onto the step just taken. Updates ``s`` in place."""
    xp = bk.xp
    in_use = _in_use(xp, s["k"], m)
    dz = z_new - z
    dr = (gz_new - z_new) - (gz - z)
    h_dr = _apply_inverse(xp, s, dr, in_use)
    v = _apply_inverse(xp, s, dz, in_use, transposed=True)
    denom = xp.sum(v * dr, axis=-1)
    eps = xp.finfo(z.dtype).eps
    scale = norm(xp, dz) * norm(xp, dr) + xp.finfo(z.dtype).tiny
    # Skip the update where it would divide by (nearly) zero: a zero term.
    update = update & (xp.abs(denom) > eps * scale)
    safe = xp.where(update, denom, 1.0)
    u = xp.where(update[:, None], (dz - h_dr) / safe[:, None], 0.0)
    v = xp.where(update[:, None], v, 0.0)
    slot = s["k"] % m
    s["mem_a"] = bk.write(s["mem_a"], (slice(None), slot), u)
    s["mem_b"] = bk.write(s["mem_b"], (slice(None), slot), v)


def _in_use(xp, k, m):
    """``(m,)``: the terms iteration ``k`` reads, those written since the last restart: up
    to term ``(k - 1) mod m``, and none at ``k = 0``."""
    return (xp.arange(m, dtype=k.dtype) <= (k - 1) % m) & (k > 0)


def _apply_inverse(xp, s, x, in_use, transposed=False):
    """``H x`` (or ``H^T x``), ``H = -I + sum_i u_i v_i^T`` over the terms in use. Terms out
    of use hold finite values of an earlier cycle (or zeros), so masking their coefficients
    leaves them out."""
    a, b = (s["mem_b"], s["mem_a"]) if transposed else (s["mem_a"], s["mem_b"])
    coeff = xp.where(in_use, (b @ x[:, :, None])[..., 0], 0.0)  # (B, m)
    return (coeff[:, None, :] @ a)[:, 0, :] - x
