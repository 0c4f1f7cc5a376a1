"""The step-size controller's settings, and its named presets."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Controller:
    """An I controller (``pcoeff = 0``) or a PI controller, in the form of Gustafsson / Hairer
    (``rules.step_factor`` has the formula). By default an accepted step never shrinks the next
    one, as in torchdiffeq, so that the two libraries take the same steps at the same
    tolerances. With ``shrink_after_accept`` it may (Hairer's DOPRI5 and scipy): an error that
    grows along the solution then shortens the steps before one fails, instead of after. With
    ``no_growth_after_reject`` the step accepted right after a rejection does not let the next
    one grow (``rules.held_after_rejection``).
    """

    safety: float
    ifactor: float
    dfactor: float
    icoeff: float
    pcoeff: float
    k: int
    shrink_after_accept: bool = False
    no_growth_after_reject: bool = False

    def next_dt(self, ops, h, ratio, ratio_prev, accept, last_rejected=False):
        """The step the error asks for after a step ``h`` with error ratio ``ratio``;
        ``last_rejected``: whether the attempt before this one was rejected. ``ops`` is the
        loop's control-value namespace, whose ``rules`` fit its values."""
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
        if self.no_growth_after_reject:
            factor = ops.rules.held_after_rejection(factor, accept, last_rejected)
        return h * factor


CONTROLLERS = ("I", "PI", "hairer")

# Hairer's codes as published (dopri5.f, dop853.f; Hairer, Norsett & Wanner I, section II.4):
# safety 0.9, the factor limited to [facmin, facmax], the step allowed to shrink after an
# accepted step, and not to grow after a rejected one. DOPRI5 stabilises with beta = 0.04
# (``err**(0.2 - 0.75 beta) / errold**beta``), which is icoeff + pcoeff = 1 - 3.75 beta and
# pcoeff = 5 beta at k = 5; other orders keep those gains, so the exponents scale with 1/k as
# Gustafsson's do. DOP853 uses no stabilisation (beta = 0) and the narrower [1/3, 6].
_HAIRER_DOPRI5 = {"safety": 0.9, "dfactor": 0.2, "ifactor": 10.0, "icoeff": 0.65, "pcoeff": 0.2}
_HAIRER_DOP853 = {"safety": 0.9, "dfactor": 0.333, "ifactor": 6.0, "icoeff": 1.0, "pcoeff": 0.0}


def preset(name: str, method: str) -> dict:
    """The settings the controller named ``name`` ("I", "PI" or "hairer") gives ``method``,
    before the user's own options override them."""
    if name == "hairer":
        gains = _HAIRER_DOP853 if method == "dopri8" else _HAIRER_DOPRI5
        return {**gains, "shrink_after_accept": True, "no_growth_after_reject": True}
    icoeff, pcoeff = (0.3, 0.4) if name == "PI" else (1.0, 0.0)
    return {
        "safety": 0.9,
        "dfactor": 0.2,
        "ifactor": 10.0,
        "icoeff": icoeff,
        "pcoeff": pcoeff,
        "shrink_after_accept": False,
        "no_growth_after_reject": False,
    }


def from_options(opts: dict, method: str, k: int) -> Controller:
    """The controller of an adaptive method's validated options: the preset named by
    ``opts["controller"]`` (default "I", torchdiffeq's), overridden by any setting given."""
    overrides = tuple((key, opts[key]) for key in _SETTINGS if key in opts)
    try:
        return _cached(opts.get("controller", "I"), method, k, overrides)
    except TypeError:  # a setting given as an array, which cannot be a cache key
        return _build(opts.get("controller", "I"), method, k, overrides)


def _build(name: str, method: str, k: int, overrides: tuple) -> Controller:
    return Controller(k=k, **{**preset(name, method), **dict(overrides)})


# A controller is frozen, so one object serves every solve with the same settings: building
# it is a few microseconds of a short solve's fixed cost.
_cached = functools.lru_cache(maxsize=256)(_build)
_SETTINGS = tuple(preset("I", ""))
