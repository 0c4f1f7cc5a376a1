"""Per-sample norms and residuals on the loops' ``(B, N)`` rows."""

from __future__ import annotations


def norm(xp, v):
    """The Euclidean norm of each row of ``v``."""
    return xp.sqrt(xp.sum(v * v, axis=-1))


def residuals(xp, z, gz):
    """``(||g(z) - z||, ||g(z) - z|| / ||g(z)||)`` per sample, for ``gz = g(z)``."""
    abs_res = norm(xp, gz - z)
    tiny = xp.finfo(z.dtype).tiny
    rel_res = abs_res / (norm(xp, gz) + tiny)
    return abs_res, rel_res
