"""Anderson mixing, one step of the fixed-point loop (:mod:`odecore.deq.iteration`).

The loop state's ``mem_a`` holds the stored iterates ``z_i`` and ``mem_b`` their residuals
``g(z_i) - z_i``, ``m`` of each per sample, written round-robin.
"""

from __future__ import annotations


def anderson_proposal(bk, s, m, lam, beta):
    """The next iterate of each sample, by Anderson mixing with its own coefficients: store
    ``z`` and its residual ``g(z) - z`` in ``s`` (updated in place), then mix the stored pairs
    with the weights ``alpha`` (summing to one) that minimise
    ``|sum_i alpha_i (g(z_i) - z_i)|^2 + lam' |alpha|^2``.

    Every running sample has done exactly ``k`` iterations (a sample that stops never
    restarts), so all of them write the same memory slot; writing into a stopped sample's
    memory is harmless, as its proposals are discarded. One slice write replaces a masked
    update of the whole memory."""
    xp = bk.xp
    z = s["z"]
    B = z.shape[0]
    k = s["k"]
    slot = k % m
    # A non-finite residual in memory would poison the batched solve; such a sample has
    # stopped already, so a zero only keeps the others' arithmetic finite.
    residual = s["gz"] - z
    residual = xp.where(xp.isfinite(residual), residual, 0.0)
    X = bk.write(s["mem_a"], (slice(None), slot), z)
    G = bk.write(s["mem_b"], (slice(None), slot), residual)
    s["mem_a"], s["mem_b"] = X, G
    slots = xp.arange(m, dtype=k.dtype)
    filled = slots <= k  # (m,): unfilled slots hold zeros
    GG = G @ xp.matrix_transpose(G)  # (B, m, m)
    eye = xp.eye(m, dtype=G.dtype)
    diag = xp.sum(GG * eye, axis=-1)
    # Regularisation relative to the residuals' size keeps the mixing scale-invariant;
    # the floor keeps the system regular once the residuals reach zero.
    floor = xp.finfo(G.dtype).smallest_normal ** 0.5
    scale = lam * xp.sum(diag, axis=-1) / m + floor  # (B,)
    both = filled[:, None] & filled[None, :]
    H = xp.where(both, GG + scale[:, None, None] * eye, eye)
    ones = xp.broadcast_to(xp.astype(filled, G.dtype), (B, m))
    top = xp.concat([xp.zeros((B, 1), dtype=G.dtype), ones], axis=1)[:, None, :]
    body = xp.concat([ones[:, :, None], H], axis=2)
    A = xp.concat([top, body], axis=1)  # (B, m + 1, m + 1)
    rhs = xp.concat([xp.ones((B, 1), dtype=G.dtype), xp.zeros((B, m), dtype=G.dtype)], axis=1)
    alpha = xp.linalg.solve(A, rhs[:, :, None])[:, 1:, 0]
    # Guard: should the system still be singular in floating point, that sample takes a
    # plain step from its newest pair instead.
    ok = xp.all(xp.isfinite(alpha), axis=-1)
    newest = xp.astype(slots == slot, G.dtype)
    alpha = xp.where(ok[:, None], alpha, newest[None, :])
    weights = alpha[:, None, :]
    mixed_x = (weights @ X)[:, 0, :]
    mixed_g = (weights @ G)[:, 0, :]
    return mixed_x + beta * mixed_g
