"""Step-size control: error norms, the I/PI controller, and the automatic first step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def rms_norm(xp, x, axis):
    """Root-mean-square over the state, per sample (``axis=1`` of a (B, N) state), or over
    everything for a single sample kept in its own shape (``axis=None``)."""
    if axis is None and x.ndim != 1:
        x = xp.reshape(x, (-1,))
    # vecdot is one fused reduction; mean(x * x) is three operations.
    return xp.sqrt(xp.vecdot(x, x, axis=-1) / x.shape[-1])


def max_norm(xp, x, axis):
    return xp.max(xp.abs(x), axis=axis)


BUILTIN_NORMS: dict[str, Callable] = {"rms": rms_norm, "max": max_norm}


@dataclass(frozen=True)
class Controller:
    """An I controller (``pcoeff = 0``) or a PI controller, in the form of Gustafsson / Hairer:
    ``factor = safety * ratio**(-(icoeff + pcoeff)/k) * ratio_prev**(pcoeff/k)``, clipped to
    ``[dfactor, ifactor]``. By default an accepted step never shrinks the next one, as in
    torchdiffeq, so that the two libraries take the same steps at the same tolerances. With
    ``shrink_after_accept`` it may (Hairer's DOPRI5 and scipy): an error that grows along the
    solution then shortens the steps before one fails, instead of after.
    """

    safety: float
    ifactor: float
    dfactor: float
    icoeff: float
    pcoeff: float
    k: int
    shrink_after_accept: bool = False

    def next_dt(self, ops, h, ratio, ratio_prev, accept):
        """``ops`` is the loop's control-value namespace (see ``odecore._ops``)."""
        finite = ops.isfinite(ratio)
        # A zero error ratio would make the power infinite; the clip to ifactor handles the
        # limit, the floor only avoids the floating-point warning. A non-finite trial step
        # (NaN or inf in the state) is rejected and retried smaller.
        safe = ops.where(finite, ops.maximum(ratio, 1e-10), 1.0)
        factor = self.safety * safe ** (-(self.icoeff + self.pcoeff) / self.k)
        if self.pcoeff:
            factor = factor * ratio_prev ** (self.pcoeff / self.k)
        if self.shrink_after_accept:
            factor = ops.minimum(ops.maximum(factor, self.dfactor), self.ifactor)
        else:
            lower = ops.where(accept, 1.0, self.dfactor)
            factor = ops.minimum(ops.maximum(factor, lower), self.ifactor)
        factor = ops.where(finite, factor, self.dfactor)
        return h * factor


def error_ratio(xp, ops, norm, err, err2, y, y_new, rtol, atol):
    """Scaled error norm per sample, as control values; at most 1 means the step is accepted.

    The scale follows ``atol + rtol * max(|y_n|, |y_n+1|)``. With two estimates (DOP853),
    they are combined as ``n1**2 / sqrt(n1**2 + 0.01 * n2**2)``, Hairer's formula that uses the
    low-order estimate to avoid overestimating the error of the high-order one.
    """
    scale = atol + rtol * xp.maximum(xp.abs(y), xp.abs(y_new))
    n1 = ops.from_norm(norm(err / scale))
    if err2 is None:
        return n1
    n2 = ops.from_norm(norm(err2 / scale))
    squared = n1 * n1 + 0.01 * n2 * n2
    # Zero only when both estimates vanish; a NaN must stay NaN so the step is rejected, and
    # an overflow stays infinite rather than becoming inf / inf.
    zero = squared == 0
    combined = n1 * n1 / ops.where(zero, 1.0, squared) ** 0.5
    return ops.where(zero, 0.0, ops.where(ops.isfinite(squared), combined, n1 + n2))


def initial_step(xp, ops, fn, t0, y0, f0, order, rtol, atol, norm) -> Any:
    """Hairer, Norsett & Wanner I, section II.4: pick h so that the first step's error is
    about right, from one extra function evaluation. One value per sample."""
    scale = atol + xp.abs(y0) * rtol
    d0 = ops.from_norm(norm(y0 / scale))
    d1 = ops.from_norm(norm(f0 / scale))
    # An infinite or NaN derivative gets a nominal guess; the loop then reports the
    # non-finite state instead of this heuristic dividing by zero.
    small = (d0 < 1e-5) | (d1 < 1e-5) | ops.not_(ops.isfinite(d0 * d1))
    h0 = ops.where(small, 1e-6, 0.01 * d0 / ops.where(small, 1.0, d1))
    f1 = fn(t0 + h0, y0 + ops.to_state(h0) * f0)
    d2 = ops.from_norm(norm((f1 - f0) / scale)) / ops.where(h0 > 0, h0, 1.0)
    dmax = ops.maximum(d1, d2)
    tiny = dmax <= 1e-15
    h1 = ops.where(
        tiny,
        ops.maximum(h0 * 1e-3, 1e-6),
        (0.01 / ops.where(tiny, 1.0, dmax)) ** (1.0 / (order + 1)),
    )
    # A derivative that is not finite a small step on, or a norm that returns NaN, says
    # nothing about the step size (it would give 0 or NaN): the first guess stands, and the
    # loop's first step finds out what is wrong.
    return ops.where(ops.isfinite(dmax), ops.minimum(100 * h0, h1), h0)
