"""The automatic first step (Hairer, Norsett & Wanner I, section II.4)."""

from __future__ import annotations

from typing import Any


def initial_step(xp, ops, fn, t0, y0, f0, order, rtol, atol, norm) -> Any:
    """A first step whose local error is about right, from one extra function evaluation;
    one value per sample."""
    rules = ops.rules
    scale = atol + xp.abs(y0) * rtol
    d0 = ops.from_norm(norm(y0 / scale))
    d1 = ops.from_norm(norm(f0 / scale))
    h0 = rules.initial_step_guess(d0, d1)
    f1 = fn(t0 + h0, y0 + ops.to_state(h0) * f0)
    d2_times_h0 = ops.from_norm(norm((f1 - f0) / scale))
    return rules.initial_step(h0, d1, d2_times_h0, order)
