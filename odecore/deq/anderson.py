"""Anderson mixing, one step of the fixed-point loop (:mod:`odecore.deq.iteration`).

The loop state holds, per sample and ``m`` pairs written round-robin: ``mem_b``, the residuals
``r_i = g(z_i) - z_i``; ``mem_a``, the points ``z_i + beta r_i`` that the mixing combines;
``inv_size``, the ``s_i = ((1 + lam) |r_i|^2 + floor)^(-1/2)``; and ``gram``, the mixing's
whole system: the regularised inner products ``s_i s_j (r_i . r_j + lam |r_i|^2 delta_ij)``
(a unit diagonal), bordered by a row and column of the ``s_i``.
"""

from __future__ import annotations

import math


def anderson_memory(xp, B, m, N, dtype):
    """The empty memory of ``B`` samples of size ``N``: unfilled slots hold zeros, and the
    system an identity row and column each, so that they get weight zero."""
    gram = xp.eye(m + 1, dtype=dtype) - xp.astype(xp.arange(m + 1) == 0, dtype)[:, None]
    return {
        "mem_a": xp.zeros((B, m, N), dtype=dtype),
        "mem_b": xp.zeros((B, m, N), dtype=dtype),
        "inv_size": xp.zeros((B, m), dtype=dtype),
        # Index 0 is the border, index 1 + i slot i (anderson_proposal).
        "gram": xp.broadcast_to(gram, (B, m + 1, m + 1)) * 1,
    }


def anderson_proposal(bk, s, m, lam, beta, stopped=None):
    """The next iterate of each sample, by Anderson mixing with its own coefficients: store
    ``z`` and its residual ``g(z) - z`` in ``s`` (updated in place), then mix the stored pairs
    with the weights ``alpha`` (summing to one) that minimise
    ``|sum_i alpha_i r_i|^2 + lam sum_i |r_i|^2 alpha_i^2``, ``r_i = g(z_i) - z_i``.

    Every running sample has done exactly ``k`` iterations (a sample that stops never
    restarts), so all of them write the same memory slot; writing into a stopped sample's
    memory is harmless, as its proposals are discarded. One slice write replaces a masked
    update of the whole memory. ``stopped`` (B,), where some sample has stopped, marks the
    samples whose system is replaced by the identity: their memory fills with copies of one
    residual, whose Gram matrix has rank one, and with ``lam=0`` NumPy's and torch's solves
    raise for a singular matrix in the batch."""
    xp = bk.xp
    z = s["z"]
    B = z.shape[0]
    slot = s["k"] % m
    # Finite in every sample: the loop never lets a non-finite pair into its state.
    residual = s["gz"] - z
    # Storing z + beta r rather than z makes the proposal one product with the weights
    # instead of two and a sum.
    F = bk.write(s["mem_a"], (slice(None), slot), z + beta * residual)
    G = bk.write(s["mem_b"], (slice(None), slot), residual)
    # The weights minimise alpha^T H alpha subject to sum(alpha) = 1, with
    # H = gram + lam diag(gram): each pair is regularised relative to its own residual. One
    # penalty for all (relative to their mean, as before) is set by the oldest, largest
    # residuals once the newest are small, and pushes the weights toward uniform: m = 20
    # needed twice the iterations of m = 5. The residuals span orders of magnitude, so the
    # system is solved equilibrated, with S = diag(s_i) and alpha = S y:
    # [[0, (S 1)^T], [S 1, S H S]] [mu, y] = [1, 0]. (H^-1 1 scaled to sum to one is the same
    # in exact arithmetic, but H is singular when the residuals are linearly dependent and
    # lam = 0, and the bordered system is not.) Only the new residual's row and column
    # change, so the system is kept and updated: (B, m) dot products instead of the
    # (B, m, m) of recomputing it, and no per-iteration masks. The floor keeps s finite
    # once the residuals reach zero.
    floor = xp.finfo(G.dtype).smallest_normal ** 0.5
    row = bk.row_products(G, residual)
    s_new = ((1.0 + lam) * xp.sum(residual * residual, axis=-1) + floor) ** -0.5
    inv_size = bk.write(s["inv_size"], (slice(None), slot), s_new)
    row = row * inv_size * s_new[:, None]
    row = bk.write(row, (slice(None), slot), 1.0)
    row = xp.concat([s_new[:, None], row], axis=-1)
    gram = bk.write(s["gram"], (slice(None), slot + 1), row)
    gram = bk.write(gram, (slice(None), slice(None), slot + 1), row)
    s["mem_a"], s["mem_b"], s["inv_size"], s["gram"] = F, G, inv_size, gram
    A = gram
    if stopped is not None:
        A = xp.where(stopped[:, None, None], xp.eye(m + 1, dtype=G.dtype), A)
    border = xp.astype(xp.arange(m + 1) == 0, G.dtype)
    rhs = xp.broadcast_to(border[:, None], (B, m + 1, 1))
    alpha = inv_size * _solve(bk, A, rhs)[:, 1:, 0]
    # Guard: should the system still be singular in floating point, that sample takes a
    # plain step from its newest pair instead. (A non-finite weight makes the sum
    # non-finite: one test per sample rather than per weight.) Dividing by the sum
    # restores sum(alpha) = 1 to the last bit, which the scalings round: a single stored
    # pair, or converged iterates, mix to exactly that pair.
    # (A stopped sample's identity system gives all-zero weights; its proposal is
    # discarded, and the newest pair spares it a division by zero.)
    total = xp.sum(alpha, axis=-1)
    ok = xp.isfinite(total) & (total != 0.0)
    total = xp.where(ok, total, 1.0)
    newest = xp.astype(xp.arange(m) == slot, G.dtype)
    alpha = xp.where(ok[:, None], alpha / total[:, None], newest[None, :])
    return bk.weighted_rows(alpha, F)


def _solve(bk, A, rhs):
    """``A^-1 rhs`` per sample, non-finite where ``A`` is singular, for the guard above.

    JAX's solve gives that. NumPy's and torch's raise for the whole batch instead: with
    ``lam=0`` and more stored pairs than independent residuals (a one-dimensional map with
    ``m >= 3``), every iteration raised. Eagerly, a batch that raises is solved sample by
    sample, each singular one left non-finite."""
    xp = bk.xp
    try:
        return xp.linalg.solve(A, rhs)
    except bk.singular_matrix_errors:
        if not bk.eager:
            raise
    rows = []
    for i in range(A.shape[0]):
        try:
            rows.append(xp.linalg.solve(A[i], rhs[i]))
        except bk.singular_matrix_errors:
            rows.append(xp.full_like(rhs[i], math.nan))
    return xp.stack(rows)
