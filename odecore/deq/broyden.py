"""Broyden's method, one step of the fixed-point loop (:mod:`odecore.deq.iteration`).

The inverse Jacobian of ``r(z) = g(z) - z`` is kept as ``-I + sum_i u_i v_i^T`` (the loop
state's ``mem_a`` holds ``u``, ``mem_b`` holds ``v``), with at most ``m`` terms; ``n_updates``
counts each sample's terms.
"""

from __future__ import annotations

from odecore.deq.residual import norm


def broyden_proposal(xp, s):
    """The quasi-Newton step ``z - H r(z)`` of each sample."""
    r = s["gz"] - s["z"]
    return s["z"] - _apply_inverse(xp, s, r)


def broyden_update(xp, s, m, update, z, gz, z_new, gz_new):
    """The 'good' Broyden update of the inverse, where ``update``: it maps the new residual
    difference onto the step just taken. Updates ``s`` in place."""
    dz = z_new - z
    dr = (gz_new - z_new) - (gz - z)
    h_dr = _apply_inverse(xp, s, dr)
    v = _apply_inverse_transposed(xp, s, dz)
    denom = xp.sum(v * dr, axis=-1)
    eps = xp.finfo(z.dtype).eps
    scale = norm(xp, dz) * norm(xp, dr) + xp.finfo(z.dtype).tiny
    # Skip the update where it would divide by (nearly) zero.
    update = update & (xp.abs(denom) > eps * scale)
    safe = xp.where(update, denom, 1.0)
    u = (dz - h_dr) / safe[:, None]
    count = s["n_updates"]
    slots = xp.arange(m, dtype=count.dtype)
    # With the memory full, the sample restarts from -I: the terms of the product form
    # build on each other, so dropping only the oldest would leave an inconsistent rest.
    restart = update & (count % m == 0)
    mem_a = xp.where(restart[:, None, None], 0.0, s["mem_a"])
    mem_b = xp.where(restart[:, None, None], 0.0, s["mem_b"])
    write = (slots[None, :] == (count % m)[:, None]) & update[:, None]
    s["mem_a"] = xp.where(write[:, :, None], u[:, None, :], mem_a)
    s["mem_b"] = xp.where(write[:, :, None], v[:, None, :], mem_b)
    s["n_updates"] = count + xp.astype(update, count.dtype)


def _apply_inverse(xp, s, x):
    coeff = xp.sum(s["mem_b"] * x[:, None, :], axis=-1)
    return -x + xp.sum(coeff[:, :, None] * s["mem_a"], axis=1)


def _apply_inverse_transposed(xp, s, x):
    coeff = xp.sum(s["mem_a"] * x[:, None, :], axis=-1)
    return -x + xp.sum(coeff[:, :, None] * s["mem_b"], axis=1)
