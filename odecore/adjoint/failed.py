"""The gradient policy for failed solves: dropped cotangents on outputs the solve did not reach,
or NaN gradients where such an output's nonzero cotangent depends on them.
"""

from __future__ import annotations

import math

from odecore.adjoint.rule import SOLVE_CAPTURED_MESSAGE
from odecore.backend import differentiate


class FailedOutputs:
    """The outputs a failed solve did not reach, and the gradient policy for them.

    A solve that fails (``throw=False``, or any failure under jit) leaves NaN in every
    output it did not reach, per sample and time. Every gradient mode, on every backend,
    treats the cotangents of those outputs the same way:

    - a zero cotangent on an unreached output is ignored, and so is everything the
      unreached output would send back: the outputs the solve did reach get exactly the
      gradients of a solve that stopped at them;
    - a nonzero cotangent (NaN included) on an unreached output means the loss depends on a
      value the solve never computed. The gradients that output depends on become NaN: its
      sample's ``y0`` gradient (samples are independent), and the gradients of the parameters
      and of the times (every sample shares them), except a parameter array of one row per
      sample on a backend whose samples each read their own row only
      (``Backend.sample_param_rows``): there only the poisoned samples' rows become NaN.

    Where the outputs are known, a solve that reached every output skips the policy; under
    tracing (jit) it is applied with ``where``, which changes nothing then.
    """

    def __init__(self, bk, layout, ys):
        xp = bk.xp
        self.backend, self.layout = bk, layout
        self.nan = xp.isnan(ys)
        # (T, B): True where the solve did not reach output i of sample b.
        self.unreached = xp.any(_per_sample(xp, layout, self.nan), axis=-1)
        self.active = bk.is_traced(self.unreached) or bool(xp.any(self.unreached))

    def drop_cotangents(self, ys_bar):
        """``(ys_bar with zeros on the unreached outputs, poisoned)``: ``poisoned`` (B,) says
        which samples had a nonzero cotangent on one of them; None when none could."""
        if not self.active:
            return ys_bar, None
        xp = self.backend.xp
        touched = _per_sample(xp, self.layout, self.nan & (ys_bar != 0))
        poisoned = xp.any(xp.any(touched, axis=-1), axis=0)
        return xp.where(self.nan, xp.zeros_like(ys_bar), ys_bar), poisoned

    def poison(self, poisoned, y0_bar, t_bar, leaves_bar):
        """NaN for the gradients a poisoned sample reaches: its rows of ``y0_bar`` (and of a
        parameter array of one row per sample, where the backend gives each sample its own
        row), and ``t_bar`` and every other parameter gradient if any sample is poisoned.
        ``t_bar`` may be None (not wanted)."""
        bk, xp = self.backend, self.backend.xp
        if poisoned is None or (not bk.is_traced(poisoned) and not bool(xp.any(poisoned))):
            return y0_bar, t_bar, leaves_bar
        anywhere = xp.any(poisoned)

        def nan_where(mask, g):
            return xp.where(mask, xp.full_like(g, math.nan), g)

        y0_bar = nan_where(self.per_sample_mask(poisoned), y0_bar)
        t_bar = None if t_bar is None else nan_where(anywhere, t_bar)

        def leaf(g):
            return nan_where(xp.reshape(poisoned, (-1, 1)) if self._sample_rows(g) else anywhere, g)

        return y0_bar, t_bar, [leaf(g) for g in leaves_bar]

    def _sample_rows(self, gradient) -> bool:
        """Whether ``gradient`` is that of a parameter array whose row ``b`` only sample
        ``b`` reads (``Backend.sample_param_rows``)."""
        lay = self.layout
        return (
            self.backend.sample_param_rows
            and lay.batched
            and lay.batch_axis == 0
            and gradient is not None
            and gradient.ndim == 2
            and gradient.shape[0] == lay.batch
        )

    def per_sample_mask(self, mask):
        """A (B,) mask shaped to broadcast against a state in the user's layout."""
        lay = self.layout
        shape = [1] * len(lay.shape)
        if lay.batched:
            shape[lay.batch_axis] = lay.batch
        return self.backend.xp.reshape(mask, tuple(shape))

    def reached_end(self):
        """(B,): which samples reached the last output time."""
        return self.backend.xp.logical_not(self.unreached[-1])

    def last_reached(self, ys):
        """``ys[i]`` with each unreached output replaced by its sample's last reached one
        (zero for a sample that reached none): finite states the backsolve can hold a sample
        at where it did not get to, and the time gradients evaluate ``f`` at."""
        xp = self.backend.xp
        # A sample refused at the start (a NaN or infinite y0, INVALID_INPUT) reached no
        # output at all: it is held at a finite stand-in.
        held = [differentiate.finite_stand_in(xp, self.nan[0], ys[0])]
        for i in range(1, ys.shape[0]):
            held.append(xp.where(self.nan[i], held[-1], ys[i]))
        return held


def _per_sample(xp, layout, outputs):
    """(T, *shape) -> (T, B, N): the outputs of each sample as rows."""
    if layout.flat:
        return layout.outputs_to_internal(xp, outputs)
    return xp.reshape(outputs, (outputs.shape[0], 1, -1))


class FailedSolvePolicy:
    """``direct`` mode's gradient policy for a failed solve, as a rule: the identity on
    ``ys``, whose backward drops the cotangents of unreached outputs and turns a nonzero one
    into NaN gradients for ``y0``, ``t`` and the parameters (see :class:`FailedOutputs`).
    The framework differentiates the reached outputs itself; the unreached ones are
    constants of the output buffer, so without this rule a loss on them would get no NaN."""

    second_order_message = (
        "second-order gradients (create_graph=True) are not available for the outputs of a "
        "failed solve"
    )
    captured_message = SOLVE_CAPTURED_MESSAGE

    def __init__(self, bk, layout):
        self.backend, self.layout = bk, layout

    def forward(self, ys, y0, t, *leaves):
        xp, sg = self.backend.xp, self.backend.stop_gradient
        # A new array, not ys itself: the framework records this operation as its origin.
        out = xp.reshape(ys, ys.shape)
        return out, {}, (sg(ys), [sg(x) for x in (y0, t, *leaves)])

    @staticmethod
    def residual_arrays(residuals):
        return residuals

    @staticmethod
    def from_arrays(primals, arrays):
        return arrays

    @staticmethod
    def captured():
        return []

    def backward(self, residuals, ys_bar, needs=None):
        ys, (y0, t, *leaves) = residuals
        xp = self.backend.xp
        failed = FailedOutputs(self.backend, self.layout, ys)
        ys_bar, poisoned = failed.drop_cotangents(ys_bar)
        want_t = (needs is None or bool(needs[2])) and xp.isdtype(t.dtype, "real floating")
        y0_bar, t_bar, leaves_bar = failed.poison(
            poisoned,
            xp.zeros_like(y0),
            xp.zeros_like(t) if want_t else None,
            [xp.zeros_like(x) for x in leaves],
        )
        return (ys_bar, y0_bar, t_bar, *leaves_bar)
