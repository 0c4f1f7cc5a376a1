"""The step-size controller's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Controller:
    """An I controller (``pcoeff = 0``) or a PI controller, in the form of Gustafsson / Hairer
    (``rules.step_factor`` has the formula). By default an accepted step never shrinks the next
    one, as in torchdiffeq, so that the two libraries take the same steps at the same
    tolerances. With ``shrink_after_accept`` it may (Hairer's DOPRI5 and scipy): an error that
    grows along the solution then shortens the steps before one fails, instead of after.
    """

    safety: float
    ifactor: float
    dfactor: float
    icoeff: float
    pcoeff: float
    k: int
    shrink_after_accept: bool = False

    def next_dt(self, ops, h, ratio, ratio_prev, accept):
        """The step the error asks for after a step ``h`` with error ratio ``ratio``; ``ops``
        is the loop's control-value namespace, whose ``rules`` fit its values."""
        factor = ops.rules.step_factor(
            ratio,
            ratio_prev,
            accept,
            self.safety,
            self.ifactor,
            self.dfactor,
            self.icoeff,
            self.pcoeff,
            self.k,
            self.shrink_after_accept,
        )
        return h * factor
