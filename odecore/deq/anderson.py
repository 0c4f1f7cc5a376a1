"""Anderson mixing, one step of the fixed-point loop (:mod:`odecore.deq.iteration`).

The loop state holds, per sample and ``m`` pairs written round-robin: ``mem_b``, the residuals
``r_i = g(z_i) - z_i``; ``mem_a``, the points ``z_i + beta r_i`` that the mixing combines; and
``gram``, the inner products ``r_i . r_j``, bordered by a row and column for the mixing's
system.
"""

from __future__ import annotations

import math


def anderson_memory(xp, B, m, N, dtype):
    """The empty memory of ``B`` samples of size ``N``: unfilled slots hold zeros."""
    return {
        "mem_a": xp.zeros((B, m, N), dtype=dtype),
        "mem_b": xp.zeros((B, m, N), dtype=dtype),
        # Bordered by a zero row and column, for the mixing's system (anderson_proposal).
        "gram": xp.zeros((B, m + 1, m + 1), dtype=dtype),
    }


def anderson_proposal(bk, s, m, lam, beta, stopped=None):
    """The next iterate of each sample, by Anderson mixing with its own coefficients: store
    ``z`` and its residual ``g(z) - z`` in ``s`` (updated in place), then mix the stored pairs
    with the weights ``alpha`` (summing to one) that minimise
    ``|sum_i alpha_i (g(z_i) - z_i)|^2 + lam' |alpha|^2``.

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
    k = s["k"]
    slot = k % m
    # Finite in every sample: the loop never lets a non-finite pair into its state.
    residual = s["gz"] - z
    # Storing z + beta r rather than z makes the proposal one product with the weights
    # instead of two and a sum.
    F = bk.write(s["mem_a"], (slice(None), slot), z + beta * residual)
    G = bk.write(s["mem_b"], (slice(None), slot), residual)
    # Only the new residual's inner products change the Gram matrix, one row and its
    # column: (B, m) dot products instead of the (B, m, m) of recomputing all of it.
    row = bk.row_products(G, residual)
    gram = bk.write(s["gram"], (slice(None), slot + 1, slice(1, None)), row)
    gram = bk.write(gram, (slice(None), slice(1, None), slot + 1), row)
    s["mem_a"], s["mem_b"], s["gram"] = F, G, gram
    # The weights minimise alpha^T H alpha subject to sum(alpha) = 1, H the regularised
    # Gram matrix: the bordered system [[0, 1^T], [1, H]] [mu, alpha] = [1, 0]. Index 0 of
    # the (m + 1) square is the border, index 1 + i is slot i; an unfilled slot gets an
    # identity row and no border, so weight zero. (H^-1 1 scaled to sum to one is the same
    # in exact arithmetic, but H is singular when the residuals are linearly dependent, as
    # when an unregularised mixing reaches the solution, and the bordered system is not.)
    index = xp.arange(m + 1, dtype=k.dtype)
    filled = (index >= 1) & (index <= k + 1)
    border = index == 0
    eye = xp.eye(m + 1, dtype=G.dtype)
    # Regularisation relative to the residuals' size keeps the mixing scale-invariant;
    # the floor keeps the system regular once the residuals reach zero.
    floor = xp.finfo(G.dtype).smallest_normal ** 0.5
    scale = lam * xp.sum(xp.linalg.diagonal(gram), axis=-1) / m + floor  # (B,)
    both = filled[:, None] & filled[None, :]
    edge = (border[:, None] & filled[None, :]) | (filled[:, None] & border[None, :])
    unfilled = ~filled & ~border
    frame = edge | ((eye > 0) & unfilled[:, None])
    A = xp.where(both, gram + scale[:, None, None] * eye, xp.astype(frame, G.dtype))
    if stopped is not None:
        A = xp.where(stopped[:, None, None], eye, A)
    rhs = xp.broadcast_to(xp.astype(border, G.dtype)[:, None], (B, m + 1, 1))
    alpha = _solve(bk, A, rhs)[:, 1:, 0]
    # Guard: should the system still be singular in floating point, that sample takes a
    # plain step from its newest pair instead. (A non-finite weight makes the sum
    # non-finite: one test per sample rather than per weight.)
    ok = xp.isfinite(xp.sum(alpha, axis=-1))
    newest = xp.astype(index[1:] == slot + 1, G.dtype)
    alpha = xp.where(ok[:, None], alpha, newest[None, :])
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
