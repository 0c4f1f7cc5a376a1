"""Input checks. Every bad input gets an error that names the problem and what to do.

These run once per solve, before the loop; nothing here runs per step. A value that is not
known yet (a JAX tracer under ``jit``) skips the checks on its value: a bad value then shows
in the solve's status (NaN state, steps exhausted) instead of an error here.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from odecore.adjoint.modes import MODES, given_keywords
from odecore.backend import differentiate, is_traced
from odecore.backend.layout import Layout
from odecore.control.controller import CONTROLLERS
from odecore.control.controller import preset as controller_preset
from odecore.control.norms import BUILTIN_NORMS
from odecore.ode.solution import PrecisionWarning
from odecore.solvers.explicit_rk import prepared
from odecore.solvers.tableaus import (
    ADAPTIVE_METHODS,
    FIXED_STEP_METHODS,
    TABLEAUS,
    Tableau,
    fixed_step,
)

DEFAULT_METHOD = "dopri5"
# Finite so that a solve can never hang; large enough that a well-posed non-stiff problem
# does not meet it. Raise it through options["max_num_steps"].
DEFAULT_MAX_NUM_STEPS = 100_000

_COMMON_OPTIONS = {"max_num_steps", "step_t", "jump_t", "event_tol", "max_events"}
_FIXED_OPTIONS = _COMMON_OPTIONS | {"step_size", "grid_constructor", "interp"}
INTERPOLATIONS = ("linear", "cubic")
_ADAPTIVE_OPTIONS = _COMMON_OPTIONS | {
    "first_step",
    "min_step",
    "max_step",
    "norm",
    "safety",
    "ifactor",
    "dfactor",
    "controller",
    "pcoeff",
    "icoeff",
    "shrink_after_accept",
    "no_growth_after_reject",
}


def _fails(bk, check) -> bool:
    """True when the boolean ``check`` is known to be false. Under jit even a check on a
    constant is traced; it is then left to the solve's status."""
    return not bk.is_traced(check) and not bool(check)


_KINDS = ("real floating", "integral", "complex floating", "bool")
_kinds: dict = {}
_UNKNOWN = object()


def dtype_kind(xp, dtype) -> str | None:
    """``"real floating"``, ``"integral"``, ``"complex floating"``, ``"bool"`` or None:
    ``xp.isdtype``'s answer, remembered per namespace and dtype. The checks of every solve
    ask it several times, and each asking costs more than a small solve's step."""
    key = (xp, dtype)
    kind = _kinds.get(key, _UNKNOWN)
    if kind is _UNKNOWN:
        kind = _kinds[key] = next((k for k in _KINDS if xp.isdtype(dtype, k)), None)
    return kind


def is_real(xp, dtype) -> bool:
    """A real floating or integral dtype."""
    return dtype_kind(xp, dtype) in ("real floating", "integral")


def call_arguments(func, throw, adjoint_params) -> None:
    """The arguments of a solve that are not arrays or options: checked before anything
    calls or iterates over them."""
    if not callable(func):
        raise TypeError(
            f"func must be a callable, func(t, y) or func(t, y, params), got {_shown(func)}"
        )
    if not isinstance(throw, bool):
        raise TypeError(f"throw must be True or False, got {_shown(throw)}")
    if adjoint_params is not None and (
        isinstance(adjoint_params, (str, bytes, dict)) or not isinstance(adjoint_params, Iterable)
    ):
        raise TypeError(
            f"adjoint_params must be a sequence of arrays (a list or tuple), got "
            f"{_shown(adjoint_params)}"
        )


def undifferentiated_settings(bk, settings: dict) -> None:
    """Refuse a tolerance or option that the framework differentiates: the rules give
    gradients with respect to ``y0``, ``t`` and ``params`` only, and the checks read these
    settings as numbers. ``settings`` maps each name to its value (an options dict is
    walked one level, and a list of times element by element)."""
    if bk.autodiff is None:
        return
    named = []
    for name, value in settings.items():
        if isinstance(value, dict):
            named += [(f"{name}[{k!r}]", v) for k, v in value.items()]
        else:
            named.append((name, value))
    for name, value in named:
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(bk.autodiff.differentiates(v) for v in values):
            raise differentiate.differentiated_setting(
                name,
                "a solve",
                "y0, t and the arrays in params",
                "a constant (or through jax.lax.stop_gradient)",
            )


def adjoint_params(bk, values) -> None:
    """``adjoint_params``, once the backend is known: arrays of that backend, on a backend
    that differentiates. Each is checked, since one that is not an array would otherwise
    be passed over without a word and get no gradient."""
    if values is None:
        return
    if not bk.has_autodiff:
        raise ValueError(
            f"adjoint_params names the arrays that receive gradients, and the {bk.name!r} "
            f"backend has no autodiff; drop it, and for gradients on {bk.name!r} use "
            f"odecore.vjp_odeint, which differentiates params"
        )
    for i, value in enumerate(values):
        if not bk.owns(value):
            raise TypeError(
                f"adjoint_params[{i}] must be a {bk.name} array (a parameter to "
                f"differentiate), got {_shown(value)}"
            )


def warn_unresolvable_rtol(bk, y0, rtol, adjoint_rtol=None, name: str = "y0") -> None:
    """Warn (:class:`~odecore.PrecisionWarning`) when ``rtol``, or the backsolve's
    ``adjoint_rtol``, is below the unit roundoff of ``y0``'s dtype (half its machine
    epsilon): no solve in that dtype resolves a smaller relative error, so such a tolerance
    cannot be met, and a solve may report success with an error far above it. A value not
    known yet (traced) is not looked at; a bad one is left to the checks that name it.
    ``name``: what messages call ``y0`` (a part of a structured state, by its path)."""
    xp = bk.xp
    y0_arr = as_array(bk, y0, name, "an array of real floating numbers")
    if dtype_kind(xp, y0_arr.dtype) != "real floating":
        return
    dtype = y0_arr.dtype
    roundoff = _roundoffs.get(dtype)
    if roundoff is None:  # finfo costs a microsecond a call, and every solve asks
        roundoff = _roundoffs[dtype] = float(xp.finfo(dtype).eps) / 2
    for which, value in (("rtol", rtol), ("adjoint_rtol", adjoint_rtol)):
        smallest = _smallest_tolerance(bk, value, which)
        if smallest is None or not 0 < smallest < roundoff:
            continue
        if isinstance(value, numbers.Real):
            what = f"{which}={smallest:.3g}"
        else:
            what = f"the smallest element of {which}, {smallest:.3g},"
        bits = xp.finfo(dtype).bits
        wider = {16: f", or give {name} a wider dtype (float32 or float64)", 32: ", or use float64"}
        warnings.warn(
            f"{what} is below the unit roundoff of {name}'s dtype {_dtype_name(dtype)} "
            f"({roundoff:.3g}), the smallest relative error it resolves: the solve cannot "
            f"meet it, and its error may be far larger than {which} asks. Loosen {which} to "
            f"at least {roundoff:.3g}{wider.get(bits, '')}",
            PrecisionWarning,
            stacklevel=_stacklevel_outside_odecore(),
        )


_roundoffs: dict = {}


def _smallest_tolerance(bk, value, name) -> float | None:
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    _not_differentiated(bk, value, name)
    arr = real_numbers(bk, value, name, "a positive number")
    if math.prod(arr.shape) == 0:
        # An empty tolerance has no smallest element; the tolerance's own check refuses it.
        return None
    smallest = bk.xp.min(arr)
    return None if bk.is_traced(smallest) else float(smallest)


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1].strip("'>")


def warn_if_events_dropped(bk, events) -> None:
    """Warn where a sample crossed more events than ``Solution.events`` (an ``EventRecord``,
    or None) keeps, ``options["max_events"]``: the record holds the first ones and says how
    many there were, but a caller reading ``times`` alone would not know that it is cut
    short. Under ``jit`` the count is not known yet, and nothing is said."""
    if events is None or bk.is_traced(events.count):
        return
    kept = events.times.shape[0]
    # Under grad outside jit the count is known but carries a (zero) tangent.
    most = int(bk.to_host_float(bk.xp.max(bk.stop_gradient(events.count))))
    if most > kept:
        batched = events.times.ndim > 1
        warnings.warn(
            f"{'a sample of the solve' if batched else 'the solve'} crossed {most} events, "
            f"and Solution.events keeps the first {kept} (options['max_events']): its times "
            f"and which stop there, its count says {most}; raise max_events to keep them "
            f"all",
            UserWarning,
            stacklevel=_stacklevel_outside_odecore(),
        )


def _stacklevel_outside_odecore() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside odecore."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("odecore"):
        frame, level = frame.f_back, level + 1
    return level


def tableau(method: str | None, opts: dict | None = None, argument: str = "method") -> Tableau:
    """The method's tableau; an adaptive method given a fixed grid in ``opts``
    (``step_size`` or ``grid_constructor``) comes without its error estimate, and steps on
    that grid. ``argument``: where the user named it (``method``, ``adjoint_method``)."""
    name = DEFAULT_METHOD if method is None else method
    if name == "scipy_solver":
        # Listed below as a valid method, it read as a contradiction where it is not one.
        raise ValueError(
            f"{argument}='scipy_solver' is not available here: scipy runs the solves of "
            f"odecore.solve, odeint and odeint_adjoint on NumPy and torch, and this call "
            f"takes one of odecore's methods: fixed-step {', '.join(FIXED_STEP_METHODS)}; "
            f"adaptive {', '.join(ADAPTIVE_METHODS)}"
        )
    if not isinstance(name, str) or name not in TABLEAUS:
        hint = _OTHER_NAMES.get(name, "") if isinstance(name, str) else ""
        # scipy runs forward solves only: the backward solve takes odecore's methods.
        scipy = (
            "; and 'scipy_solver' (options={'solver': ...}: any of scipy's solve_ivp methods, "
            "LSODA and BDF for stiff problems)"
            if argument == "method"
            else ""
        )
        raise ValueError(
            f"unknown {argument} {method!r}; valid methods are: fixed-step "
            f"{', '.join(FIXED_STEP_METHODS)}; adaptive {', '.join(ADAPTIVE_METHODS)}"
            f"{scipy}{hint if scipy or 'scipy_solver' not in hint else ''}"
        )
    tab = TABLEAUS[name]
    if isinstance(opts, dict) and tab.adaptive and _fixed_grid(opts):
        return fixed_step(tab)
    return tab


# The names other libraries give their methods, and odecore's for the same or the nearest.
_SCIPY_STIFF = ", or 'scipy_solver' with options={'solver': 'LSODA'} for stiff problems"
_OTHER_NAMES = {
    "RK45": ". scipy's RK45 is 'dopri5' (the same stages)",
    "DOP853": ". scipy's DOP853 is 'dopri8' (the same stages and error estimate)",
    "RK23": ". scipy's RK23 is 'bosh3' (the same stages)",
    **{
        m: f". {m} runs through method='scipy_solver', options={{'solver': '{m}'}}"
        for m in ("LSODA", "BDF", "Radau")
    },
    **{
        m: f". torchdiffeq's {m} has no counterpart here: take an adaptive Runge-Kutta method "
        f"(dopri5){_SCIPY_STIFF}"
        for m in ("explicit_adams", "implicit_adams", "fixed_adams")
    },
}


def _fixed_grid(opts: dict) -> bool:
    return opts.get("step_size") is not None or opts.get("grid_constructor") is not None


def options(bk, opts: dict | None, rk, name: str = "options") -> dict:
    """``opts`` checked for the method ``rk``, without the keys set to None. ``name`` is the
    argument the user wrote them in (``options``, or ``adjoint_options`` for the backward
    solve), which every message names."""
    if opts is None:
        return {}
    check_dict(opts, name)
    valid = _ADAPTIVE_OPTIONS if rk.adaptive else _FIXED_OPTIONS
    unknown = sorted(set(opts) - valid, key=repr)
    if unknown:
        other = _FIXED_OPTIONS if rk.adaptive else _ADAPTIVE_OPTIONS
        hint = ""
        misplaced = [k for k in unknown if k in other]
        if misplaced and not rk.adaptive and TABLEAUS[rk.name].adaptive:
            hint = (
                f" ({', '.join(map(repr, misplaced))} only applies to adaptive steps, and "
                f"{name}['step_size'] or {name}['grid_constructor'] fixes the grid)"
            )
        elif misplaced:
            kind = "fixed-step" if rk.adaptive else "adaptive"
            hint = f" ({', '.join(map(repr, misplaced))} only applies to {kind} methods)"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} in {name} for method "
            f"{rk.name!r}{hint}; "
            f"valid options are: {', '.join(sorted(valid))}"
        )
    out = {k: v for k, v in opts.items() if v is not None}
    # Reading a meta tensor's value below failed with torch's words about .item().
    for key, value in out.items():
        holding_values(bk, value, f"{name}[{key!r}]")
    # Step sizes may be traced arrays under jit, so that changing them does not recompile.
    runtime = {k for k in ("step_size", "first_step", "min_step", "max_step") if k in out}
    runtime = {k for k in runtime if is_traced(out[k])}
    # An infinite max_step or ifactor means no limit; the other values must be finite.
    for key in ("step_size", "first_step", "max_step", "safety", "ifactor", "dfactor"):
        if key in out and key not in runtime:
            out[key] = _positive_float(
                out[key], f"{name}[{key!r}]", finite=key not in ("max_step", "ifactor")
            )
    for key in ("min_step", "pcoeff", "icoeff"):
        if key in out and key not in runtime:
            out[key] = _positive_float(out[key], f"{name}[{key!r}]", allow_zero=True, finite=True)
    if out.get("safety", 0.9) > 1:
        raise ValueError(
            f"{name}['safety'] must be in (0, 1], got {out['safety']}: it scales the step "
            f"the error estimate allows, and a factor above 1 steps past it (0.9 is usual)"
        )
    if out.get("dfactor", 0.2) >= 1:
        raise ValueError(f"{name}['dfactor'] must be in (0, 1), got {out['dfactor']}")
    if out.get("ifactor", 10.0) <= 1:
        raise ValueError(f"{name}['ifactor'] must be greater than 1, got {out['ifactor']}")
    for key in ("shrink_after_accept", "no_growth_after_reject"):
        if key in out and not isinstance(out[key], bool):
            raise TypeError(f"{name}[{key!r}] must be True or False, got {out[key]!r}")
    _fixed_grid_options(out, name)
    if "norm" in out and not callable(out["norm"]):
        if not isinstance(out["norm"], str):
            raise TypeError(
                f"{name}['norm'] must be 'rms', 'max' or a callable, got {out['norm']!r}"
            )
        if out["norm"] not in BUILTIN_NORMS:
            raise ValueError(
                f"unknown norm {out['norm']!r} in {name}['norm']; use 'rms', 'max' or a callable"
            )
    if "controller" in out and (
        not isinstance(out["controller"], str) or out["controller"] not in CONTROLLERS
    ):
        raise ValueError(
            f"{name}['controller'] must be one of {', '.join(map(repr, CONTROLLERS))}, got "
            f"{out['controller']!r}"
        )
    if rk.adaptive and sum(controller_gains(out, rk.name)) == 0:
        raise ValueError(
            f"{name}['icoeff'] and {name}['pcoeff'] are both 0, so the step size would not "
            "depend on the error estimate; make icoeff positive (1 for the I controller)"
        )
    for key in ("max_num_steps", "max_events"):
        if key in out and is_traced(out[key]):
            raise TypeError(
                f"{name}[{key!r}] is traced here; it must be a Python int, known when the "
                f"solve is traced, since it sizes the solve's buffers (make it a static "
                f"argument of jax.jit, or a constant)"
            )
    if "max_num_steps" in out:
        n = out["max_num_steps"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name}['max_num_steps'] must be a positive integer, got {n!r}")
        out["max_num_steps"] = int(n)
    if "max_events" in out:
        n = out["max_events"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(
                f"{name}['max_events'] must be a positive integer (how many event crossings "
                f"a solve keeps), got {n!r}"
            )
        out["max_events"] = int(n)
    if "event_tol" in out:
        out["event_tol"] = _positive_float(out["event_tol"], f"{name}['event_tol']", finite=True)
    if not runtime & {"min_step", "max_step"} and out.get("min_step", 0.0) > out.get(
        "max_step", math.inf
    ):
        raise ValueError(f"{name}['min_step'] is larger than {name}['max_step']")
    return out


def step_budget(bk, ts, opts: dict, events) -> None:
    """Refuse an ``options['max_step']`` too small for the solve to cover the span of the
    (internal, increasing) times ``ts`` within ``options['max_num_steps']`` steps: every step
    is at most ``max_step`` long, so it would run the whole budget and stop at
    MAX_STEPS_REACHED. Left to that status where it cannot be known here: a traced span or
    step, fixed steps (``max_step`` does not bound them), and a solve with events, which a
    terminal event may end before ``t[-1]`` (``odeint_event`` solves toward a far horizon)."""
    max_step = opts.get("max_step")
    if (
        max_step is None
        or events is not None
        or opts.get("step_size") is not None
        or opts.get("grid_constructor") is not None
        or bk.is_traced(max_step)
        or bk.is_traced(ts)
        or not math.isfinite(max_step)
    ):
        return
    budget = opts.get("max_num_steps", DEFAULT_MAX_NUM_STEPS)
    span = float(ts[-1]) - float(ts[0])
    # Steps of exactly span / budget fit; the margin keeps the rounding of the span and of
    # the division from refusing them.
    if span / max_step > budget * (1 + 1e-9):
        raise ValueError(
            f"options['max_step'] = {max_step:g} needs at least {span / max_step:.4g} steps "
            f"to cover t's span of {span:g}, more than options['max_num_steps'] = {budget} "
            f"allows: make max_step at least {span / budget:.6g} (the span over "
            f"max_num_steps), or raise options['max_num_steps']"
        )


EVENT_OPTIONS = ("event_tol", "max_events")


def event_options(opts: dict | None, where: str = "options") -> None:
    """Refuse ``event_tol`` and ``max_events`` in the options of a solve without events,
    which has no root to locate and no crossing to keep: given there, they would be
    ignored, and an event the caller meant to pass would go unnoticed."""
    given = [k for k in EVENT_OPTIONS if isinstance(opts, dict) and opts.get(k) is not None]
    if given:
        raise ValueError(
            f"{where}[{given[0]!r}] configures the events of a solve, and this solve has "
            f"none; pass the events (event=...) or drop {', '.join(map(repr, given))}"
        )


def without_event_options(opts):
    """``opts`` for a solve of the same problem without its events (the re-solve that
    differentiates an event's time, a backward solve)."""
    if not isinstance(opts, dict) or not any(k in opts for k in EVENT_OPTIONS):
        return opts
    return {k: v for k, v in opts.items() if k not in EVENT_OPTIONS}


def _fixed_grid_options(out: dict, name: str) -> None:
    """``grid_constructor`` and ``interp``, the fixed-step methods' options from torchdiffeq."""
    if "interp" in out and (
        not isinstance(out["interp"], str) or out["interp"] not in INTERPOLATIONS
    ):
        raise ValueError(f"{name}['interp'] must be 'linear' or 'cubic', got {out['interp']!r}")
    if "grid_constructor" not in out:
        return
    if not callable(out["grid_constructor"]):
        raise TypeError(
            f"{name}['grid_constructor'] must be a function (func, y0, t) -> grid, got "
            f"{out['grid_constructor']!r}"
        )
    if "step_size" in out:
        raise ValueError(
            f"{name}['step_size'] and {name}['grid_constructor'] both set the grid; pass "
            "one of them"
        )


def grid(bk, constructor, func, y0, t_user, sign):
    """The steps' grid from ``grid_constructor(func, y0, t)``, in internal time: a 1-D array
    of times from ``t[0]`` to ``t[-1]``, strictly monotone in ``t``'s direction; and, where
    the grid is traced (jit), whether it is valid (a 0-d boolean array), else None."""
    xp = bk.xp
    need = "a 1-D array of times from t[0] to t[-1]"
    name = "the grid that options['grid_constructor'] returned"
    arr = real_numbers(bk, constructor(func, y0, t_user), name, need, convert=time_array)
    arr = xp.astype(arr, bk.time_dtype)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be {need}, got shape {tuple(arr.shape)}")
    if _fails(bk, (arr[0] == t_user[0]) & (arr[-1] == t_user[-1])):
        raise ValueError(
            f"{name} must start at t[0] and end at t[-1] ({float(t_user[0])} and "
            f"{float(t_user[-1])}), got {float(arr[0])} and {float(arr[-1])}"
        )
    internal = arr * sign
    increasing = xp.all(internal[1:] > internal[:-1])
    if _fails(bk, increasing):
        raise ValueError(f"{name} must be strictly monotone in the direction of t")
    ends = (arr[0] == t_user[0]) & (arr[-1] == t_user[-1])
    valid = increasing & ends & xp.all(xp.isfinite(arr))
    return internal, (valid if bk.is_traced(valid) else None)


def check_dict(value, name: str) -> None:
    if not isinstance(value, dict):
        raise TypeError(
            f"{name} must be a dict of option names to values, not {type(value).__name__}"
        )


def controller_gains(opts: dict, method: str) -> tuple[float, float]:
    """``(icoeff, pcoeff)``: those given, else those of the named controller's preset."""
    settings = controller_preset(opts.get("controller", "I"), method)
    return opts.get("icoeff", settings["icoeff"]), opts.get("pcoeff", settings["pcoeff"])


def _positive_float(value, label: str, allow_zero: bool = False, finite: bool = False) -> float:
    """``value`` as a float; ``label`` names it as the user wrote it (``options['safety']``)."""
    # float() would read a string ("0.1") as a number, where every other argument refuses it.
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{label} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{label} must be a number, got {value!r}") from None
    if math.isnan(x) or x < 0 or (x == 0 and not allow_zero) or (finite and math.isinf(x)):
        need = "non-negative" if allow_zero else "positive"
        need = f"{need} and finite" if finite else need
        raise ValueError(f"{label} must be {need}, got {value!r}")
    return x


TIMES_NEED = "a 1-D array of output times"


def times(bk, t) -> Any:
    xp = bk.xp
    arr = time_array(bk, t, "t", TIMES_NEED)
    kind = dtype_kind(xp, arr.dtype)
    if kind not in ("real floating", "integral"):
        raise TypeError(f"t must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"t must be a 1-D array of output times, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError("t is empty; it needs at least the initial time")
    if kind == "integral":
        arr = xp.astype(arr, bk.time_dtype)
    if arr.shape[0] > 1:
        diffs = arr[1:] - arr[:-1]
        # The usual times in one reduction: differences that are all finite and positive
        # make the times increasing and finite (a NaN or an infinite time makes a difference
        # NaN or infinite). Anything else, decreasing times included, takes the checks below,
        # which name what is wrong. Each reduction costs a short solve microseconds.
        if not _fails(bk, xp.all(xp.isfinite(diffs) & (diffs > 0))):
            _span(bk, arr)
            return arr
    if _fails(bk, xp.all(xp.isfinite(arr))):
        raise ValueError("t contains NaN or infinite values")
    if arr.shape[0] > 1:
        # Decreasing times are asked about only when the times do not increase.
        if _fails(bk, xp.all(diffs > 0)) and _fails(bk, xp.all(diffs < 0)):
            raise ValueError(
                "t must be strictly increasing or strictly decreasing (no repeated times)"
            )
        _span(bk, arr)
    return arr


def initial_time(bk, t0, dtype) -> Any:
    """``odeint_event``'s ``t0`` as a 0-d array: one finite real time, in ``dtype`` (y0's)
    unless it is already a floating array of the backend. It is checked here, and not as
    ``t``, since the solve's ``t`` is made from it and would name ``t`` for a bad ``t0``."""
    xp = bk.xp
    arr = real_numbers(bk, t0, "t0", "a time", convert=time_array)
    if math.prod(arr.shape) != 1:
        raise ValueError(
            f"t0 must be one time (a float, or an array of one element), got shape "
            f"{tuple(arr.shape)}; odeint_event has no end time, the event ends the solve"
        )
    if not (bk.owns(t0) and dtype_kind(xp, arr.dtype) == "real floating"):
        arr = xp.astype(arr, dtype)
    arr = xp.reshape(arr, ())
    if _fails(bk, xp.isfinite(arr)):
        raise ValueError(f"t0 must be a finite time, got {float(arr)!r}")
    return arr


def _span(bk, arr) -> None:
    """Refuse finite times whose span overflows (-1e308 to 1e308): every step is measured
    against the distance to the end, which is then infinite, and the solve failed at its
    first step with an underflow in dt that blamed the tolerances."""
    if isinstance(arr, np.ndarray):
        # Two Python floats cost a short solve less than two array operations.
        finite = math.isfinite(float(arr[-1]) - float(arr[0]))
    else:
        finite = bk.xp.isfinite(arr[-1] - arr[0])
    if _fails(bk, finite):
        raise ValueError(
            f"t spans from {float(arr[0])!r} to {float(arr[-1])!r}, farther than the largest "
            f"number of its dtype {_dtype_name(arr.dtype)}: the solve measures its steps "
            f"against that distance. Shift or rescale time (solve in a time unit of which "
            f"the span is a finite number)"
        )


def initial_state(bk, y0, finite: bool = True, name: str = "y0", empty: bool = False) -> Any:
    """``y0`` as an array, checked; ``finite=False`` leaves its values to the caller (a batch
    is checked sample by sample). ``name`` is how messages call it (a part of a structured
    state is named by its path); ``empty``: whether it may have no elements (a part of a
    structured state, whose other parts are solved)."""
    xp = bk.xp
    arr = as_array(bk, y0, name, "an array of real floating numbers")
    kind = dtype_kind(xp, arr.dtype)
    if kind in ("integral", "bool"):
        raise TypeError(
            f"{name} must have a real floating dtype, got {arr.dtype}; convert it to float64 "
            f"or float32 first ({_conversion(bk, name)}), or write its values as floats"
        )
    if kind == "complex floating":
        raise TypeError(
            f"{name} must have a real floating dtype, got {arr.dtype}: complex states are not "
            f"solved. Solve the real and imaginary parts as a real state of twice the size "
            f"(func takes and returns them stacked; torch.view_as_real and "
            f"torch.view_as_complex convert a torch tensor)"
        )
    if kind != "real floating":
        raise TypeError(f"{name} must have a real floating dtype, got {arr.dtype}")
    if not empty and math.prod(arr.shape) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)}); there is nothing to solve")
    if finite and _fails(bk, xp.all(xp.isfinite(arr))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _conversion(bk, name: str) -> str:
    """How the array library converts an array ``name`` to float64, as its users write it."""
    return f"{name}.double()" if bk.name == "torch" else f"{name}.astype(float64)"


def tolerance_ok(xp, tol, name: str):
    """Whether each element of a tolerance is valid: finite, and positive, except that a
    relative tolerance may be 0 (the error is then measured against ``atol`` alone, as
    torchdiffeq, diffrax and scipy allow). ``atol`` must stay positive: with ``atol = 0``
    a state element at zero has no error scale, and its error ratio is 0/0."""
    return xp.isfinite(tol) & ((tol >= 0) if name.endswith("rtol") else (tol > 0))


def _tolerance_rule(name: str) -> str:
    if name.endswith("rtol"):
        return "non-negative and finite (0 measures the error against atol alone)"
    return (
        "positive and finite (with atol 0 a state element at zero would have no error "
        "scale; for a relative error alone, give atol far below the state's size)"
    )


def tolerance_part(bk, arr, name: str, path: str) -> None:
    """Refuse a part of a structured tolerance ``name`` ("rtol", "atol") that is not valid,
    naming it by ``path`` (``atol[1]['s']``)."""
    if _fails(bk, bk.xp.all(tolerance_ok(bk.xp, arr, name))):
        raise ValueError(f"every element of {path} must be {_tolerance_rule(name)}")


def _scalar_tolerance(value, name: str) -> float:
    if not (math.isfinite(value) and (value >= 0 if name.endswith("rtol") else value > 0)):
        raise ValueError(f"{name} must be {_tolerance_rule(name)}, got {value!r}")
    return float(value)


def _tolerance_array(bk, value, name: str, dtype=None):
    xp = bk.xp
    arr = real_numbers(bk, value, name, "a positive number")
    if math.prod(arr.shape) == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(arr.shape)}); give a number, or an array of "
            f"tolerances that broadcasts to y0's shape"
        )
    if dtype is not None:
        arr = xp.asarray(arr, dtype=dtype)
    if _fails(bk, xp.all(tolerance_ok(xp, arr, name))):
        raise ValueError(f"every element of {name} must be {_tolerance_rule(name)}")
    return arr


def tolerance(bk, value, name: str, lay: Layout):
    """A valid float (``tolerance_ok``), or a per-element array in the loop's dtype,
    broadcast to its (B, N) layout."""
    xp = bk.xp
    # type() first: the ABC check costs a microsecond, and a float is the usual tolerance.
    if type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return _scalar_tolerance(value, name)
    _not_differentiated(bk, value, name)
    arr = _tolerance_array(bk, value, name, dtype=lay.dtype)
    if arr.ndim == 0:
        return arr
    try:
        full = xp.broadcast_to(arr, lay.shape)
    except (ValueError, RuntimeError):
        raise ValueError(
            f"{name} of shape {tuple(arr.shape)} does not broadcast to y0's shape {lay.shape}"
        ) from None
    return lay.to_internal(xp, full)


def _not_differentiated(bk, value, name: str) -> None:
    """A tolerance that asks an eager framework for its gradient (a torch tensor that
    requires grad) would get none: the solve is not differentiated with respect to its
    tolerances. JAX refuses a differentiated tolerance in its gradient rule."""
    if bk.eager and bk.has_autodiff and bk.autodiff.requires_grad(value):
        raise TypeError(
            f"{name} requires grad, and odecore does not differentiate a solve with respect "
            f"to its tolerances (the gradient would stay empty); pass {name}.detach() or a "
            f"number"
        )


def real_numbers(bk, value, name: str, what: str, convert=None):
    """``value`` as an array of real numbers, or a TypeError that names ``name`` and says it
    must be ``what`` or an array of them. Strings are refused even where the library would
    parse them (NumPy reads "1e-6" as a number): a quoted number is a mistake elsewhere.
    ``convert`` (default :func:`as_array`) makes the array."""
    xp = bk.xp
    need = f"{what} or an array of them"
    convert = as_array if convert is None else convert
    arr = None if isinstance(value, (str, bytes, bool)) else convert(bk, value, name, need)
    if arr is None or not is_real(xp, arr.dtype):
        raise TypeError(f"{name} must be {need}, got {_shown(value)}")
    return arr


def as_array(bk, value, name: str, need: str, like=None, dtype=None):
    """``value`` as the backend's array (on ``like``'s device), or a TypeError saying that
    ``name`` must be ``need`` where the library cannot convert it (each library words its
    own refusal, and none names the argument). ``like`` is y0: an array on another device
    that cannot be moved to y0's is refused as being there, not as the wrong kind of value."""
    # A string is never an array of numbers, and JAX reads one as a dtype's name ("01"
    # raises SyntaxError from its parser, "f8" is float64): refused before any library sees it.
    # Nor is a dict (one holding arrays is a structured state, and does not come here), which
    # NumPy would make an object array, refused for its dtype without naming the dict.
    if value is None or isinstance(value, (str, bytes, dict)):
        raise TypeError(f"{name} must be {need}, got {_shown(value)}")
    holding_values(bk, value, name)
    try:
        return bk.asarray(value, dtype=dtype, like=like)
    except (TypeError, ValueError, RuntimeError) as error:
        device, target = getattr(value, "device", None), getattr(like, "device", None)
        if device is not None and target is not None and device != target:
            raise ValueError(
                f"{name} is on device {str(device)!r} and y0 on {str(target)!r}, and {name} "
                f"could not be moved to y0's device ({error}). Create {name} on y0's device, "
                f"or move it there with .to(y0.device)"
            ) from None
        raise TypeError(f"{name} must be {need}, got {_shown(value)}") from None


def holding_values(bk, value, name: str) -> None:
    """Refuse an array without values (a torch 'meta' tensor) before anything reads one:
    the first read failed with torch's words about ``.item()``, which name no argument."""
    if not bk.holds_values(value):
        raise ValueError(
            f"{name} is a meta tensor (device 'meta'): meta tensors have a shape and a dtype "
            f"but hold no values, and a solve computes with its values. Create {name} "
            f"on a real device ('cpu' or 'cuda')"
        )


def time_array(bk, value, name: str, need: str, like=None):
    """Times as :func:`as_array` makes them, except that Python floats (alone or in
    sequences) are read at the backend's time dtype directly: through the library's default
    float (torch's float32) they would be rounded before reaching float64 time. Arrays keep
    their dtype, and so do values that are not real floating (the caller refuses those).
    Python ints beyond int64, which no integer dtype holds (NumPy makes an object array of
    them, torch and JAX refuse them), are read as floats, as scipy's ``solve_ivp`` reads
    them."""
    try:
        arr = as_array(bk, value, name, need, like=like)
    except (TypeError, OverflowError):
        if not _python_reals(value):
            raise
        return _python_times(bk, value, name, need, like)
    if hasattr(value, "dtype"):
        return arr
    kind = dtype_kind(bk.xp, arr.dtype)
    if kind == "real floating":
        return as_array(bk, value, name, need, like=like, dtype=bk.time_dtype)
    if kind is None and _python_reals(value):
        return _python_times(bk, value, name, need, like)
    return arr


def _python_reals(value) -> bool:
    """A Python real number, or a list or tuple of them (bools are not times)."""
    values = value if isinstance(value, (list, tuple)) else (value,)
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def _python_times(bk, value, name: str, need: str, like):
    """Python real numbers, some of them ints beyond int64, as times at the backend's time
    dtype."""
    try:
        floats = [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)
    except OverflowError:
        raise ValueError(
            f"{name} holds a Python int too large for a float: {_shown(value)}; pass the "
            f"times as floats, in a time unit in which they are finite"
        ) from None
    return as_array(bk, floats, name, need, like=like, dtype=bk.time_dtype)


def _shown(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else f"{text[:57]}..."
    return f"{text} ({type(value).__name__})"


def norm(bk, value, lay: Layout, name: str = "options"):
    """The error norm as ``norm(x (B, N)) -> (B,)``, from a ``value`` that :func:`options`
    has checked (a built-in norm's name or a callable) in the argument ``name``."""
    xp = bk.xp
    if isinstance(value, str):
        builtin, axis = BUILTIN_NORMS[value], lay.reduce_axis
        return lambda x: builtin(xp, x, axis)

    # A user norm sees the state in the user's shape and returns a scalar, or one value per
    # sample when the solve is batched. It gets the loop's dtype: a scaled error rounded to
    # a 16-bit state's dtype would only lose digits.
    expected = f"shape ({lay.batch},) for a batch of {lay.batch}" if lay.batched else "a scalar"

    def checked(n):
        # An array as it is: torch's asarray of a tensor that requires grad warns.
        if not bk.owns(n):
            need = f"a real number per sample ({expected})"
            n = as_array(bk, n, f"the value {name}['norm'] returned", need)
        if not is_real(xp, n.dtype):
            raise TypeError(
                f"{name}['norm'] must return real numbers (one per sample, {expected}), and "
                f"it returned dtype {n.dtype}: return the norm of x as a float"
            )
        if math.prod(n.shape) != lay.batch:
            raise ValueError(
                f"{name}['norm'] must return one number per sample ({expected}), and it "
                f"returned an array of shape {tuple(n.shape)}: reduce over the state, e.g. "
                f"the root mean square of x"
            )
        # A negative value would accept every step, however large its error: it counts as
        # a failed norm, as NaN does (Status.NONFINITE_ERROR), on every backend and under
        # jit, without reading the value on the host.
        return xp.where(n >= 0, n, xp.nan)

    if not lay.flat:
        # One sample, whose control values are Python floats: a one-element array that is
        # not 0-d (a list [n], shape (1,)) would not convert to one on every backend.
        def one_sample_norm(x):
            n = checked(value(x))
            return n if n.ndim == 0 else xp.reshape(n, ())

        return one_sample_norm

    def user_norm(x):
        return xp.reshape(checked(value(lay.shaped_as_user(xp, x))), (lay.batch,))

    return user_norm


def stop_times(bk, values, label: str, ts, sign: float, ends: bool = False):
    """``step_t`` / ``jump_t`` in internal time, keeping those strictly inside the interval,
    or with ``ends`` those on its ends too: a jump at ``t[0]`` decides which side ``f`` is
    first evaluated on, and one at ``t[-1]`` which side the last step sees. ``label`` names
    the option as the user wrote it (``options['step_t']``)."""
    xp = bk.xp
    arr = real_numbers(bk, values, label, "a time", convert=time_array)
    arr = xp.astype(arr, bk.time_dtype)
    if arr.ndim > 1:
        # Flattened, a (N, 1) array meant as one time per trajectory would stop every
        # trajectory at all N times: the solve would run, only slower, and not as meant.
        raise ValueError(
            f"{label} must be a 1-D array of times, shared by every trajectory of "
            f"a batch; got shape {tuple(arr.shape)}. For times of each trajectory's own, "
            f"solve the trajectories that share them together, or pass all the times as one "
            f"1-D array (each trajectory then stops at every one)"
        )
    if arr.ndim == 0:
        arr = xp.reshape(arr, (1,))
    if _fails(bk, xp.all(xp.isfinite(arr))):
        raise ValueError(f"{label} contains NaN or infinite values")
    arr = arr * sign
    inside = ((arr >= ts[0]) & (arr <= ts[-1])) if ends else ((arr > ts[0]) & (arr < ts[-1]))
    if not bk.eager:
        # A tracing backend needs a fixed shape: a time outside the interval becomes the end
        # time, a stop the loop lands on anyway.
        return xp.sort(xp.where(inside, arr, ts[-1]))
    return xp.sort(arr[inside])


def dynamics_output(bk, out, lay: Layout) -> None:
    """Check ``func``'s first output against the state it was given."""
    if not bk.owns(out):
        raise TypeError(
            f"func must return a {bk.name} array shaped like y, got {type(out).__name__}"
        )
    if tuple(out.shape) != lay.shape:
        raise ValueError(
            f"func returned shape {tuple(out.shape)} but the state y has shape {lay.shape}; "
            f"dy/dt must have the shape of y"
        )
    if out.dtype != lay.user_dtype:
        message = (
            f"func returned dtype {out.dtype} but the state y has dtype {lay.user_dtype}; return "
            f"dy/dt in y's dtype"
        )
        xp = bk.xp
        if dtype_kind(xp, out.dtype) == "real floating" and (
            xp.finfo(out.dtype).bits > xp.finfo(lay.user_dtype).bits
        ):
            # The state is not promoted to what func computes in: the solve keeps y0's dtype,
            # and a silent cast would hide that f's arithmetic runs wider than the state.
            message += (
                f". An array of params, a constant or t in {out.dtype} promoted it: give "
                f"params (and constants) y0's dtype {lay.user_dtype}, cast what func returns "
                f"to y.dtype, or pass y0 as {out.dtype} to solve in {out.dtype}"
            )
        else:
            message += " (a float64 constant or t can promote it)"
        raise TypeError(message)


def snapshot(bk, x):
    """What ``input_kept`` compares ``x`` with after a call: a copy that shares neither its
    memory nor its autograd history; for a NumPy array its bytes, which copy and compare in
    a fraction of a microsecond (array operations took 7 us of a short solve's 132)."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    return bk.xp.asarray(bk.stop_gradient(x), copy=True)


def differing(xp, a, b):
    """Where ``a`` and ``b`` differ, elementwise, NaN counting as equal to NaN (a sample's
    NaN, an invalid sample of a batch, is not a change)."""
    return (a != b) & ~(xp.isnan(a) & xp.isnan(b))


def input_kept(bk, before, after, name: str, arg: str) -> None:
    """``after`` (the array the user's function was given) must still equal ``before``, its
    ``snapshot`` from before the call. The loop hands its own state to ``func``, so writing
    into it (``y *= 0.5``) changes the solution under the solver's feet, silently. Checked
    on the first call only, on eager backends (JAX arrays cannot be written). NaN where
    there was NaN (an invalid sample of a batch) counts as unchanged."""
    if isinstance(before, bytes):
        changed = after.tobytes() != before
    else:
        changed = bool(bk.xp.any(differing(bk.xp, after, before)))
    if changed:
        raise ValueError(
            f"{name} modified its argument {arg} in place; {arg} is the solver's own state, "
            f"and changing it corrupts the solution. Compute into a new array instead "
            f"({arg} * 0.5 rather than {arg} *= 0.5, or a copy of {arg} before writing "
            f"into it)"
        )


def adjoint_mode(adjoint, bk) -> str | None:
    """The gradient mode: None (no gradients) on backends without autodiff, whose users call
    ``odecore.vjp_odeint`` instead; "direct" by default where the framework differentiates."""
    if adjoint is None:
        return bk.autodiff.default_adjoint if bk.has_autodiff else None
    if not isinstance(adjoint, str) or adjoint not in MODES:
        raise ValueError(
            f"unknown adjoint {adjoint!r}; valid modes are {', '.join(map(repr, MODES))}, "
            f"or odecore.Direct(), odecore.Backsolve(...), odecore.Checkpoint()"
        )
    if adjoint == "direct" and bk.has_autodiff and bk.autodiff.default_adjoint != "direct":
        raise ValueError(
            f"adjoint='direct' is not available on the {bk.name!r} backend: its reverse mode "
            f"cannot differentiate through a while loop whose length depends on the solution; "
            f"use adjoint='checkpoint' (the exact gradient of the discrete solve; its buffer "
            f"holds options['max_num_steps'] steps) or adjoint='backsolve' (the continuous "
            f"adjoint, memory independent of the number of steps)"
        )
    if not bk.has_autodiff:
        raise ValueError(
            f"adjoint={adjoint!r} needs a framework with autodiff, and the {bk.name!r} backend "
            f"has none; for gradients on {bk.name!r} use odecore.vjp_odeint(func, y0, t, "
            f"params, adjoint='checkpoint' or 'backsolve') with a func that has a vjp method"
        )
    return adjoint


def adjoint_settings(
    bk, rtol, atol, method, fwd_options, adj_rtol, adj_atol, adj_method, adj_options, mode
):
    """The backsolve's tolerances, method and options, checked now rather than in the middle
    of a backward pass. Defaults are the forward solve's; a per-element tolerance becomes its
    strictest value, since the backward state is not shaped like y0. Only the backsolve
    solves a backward ODE: other modes refuse these settings rather than ignore them."""
    xp = bk.xp
    given = given_keywords(adj_rtol, adj_atol, adj_method, adj_options)
    if mode != "backsolve":
        if given:
            raise ValueError(
                f"{', '.join(given)} configure the backward solve of adjoint='backsolve', "
                f"and this solve uses adjoint={mode!r}, which has none; pass "
                f"adjoint='backsolve' or drop {'it' if len(given) == 1 else 'them'}"
            )
        return None

    def scalar_tol(value, name):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return _scalar_tolerance(value, name)
        smallest = xp.min(_tolerance_array(bk, value, name))
        return smallest if bk.is_traced(smallest) else float(smallest)

    if fwd_options is not None:
        check_dict(fwd_options, "options")
    fwd_options = fwd_options or {}
    # Messages name the argument the backward solve's options came from.
    name = "options" if adj_options is None else "adjoint_options"
    if adj_options is None:
        # The forward norm is written for y's shape, not for the augmented backward state,
        # and the backward solve has no events.
        adj_options = {k: v for k, v in without_event_options(fwd_options).items() if k != "norm"}
    check_dict(adj_options, "adjoint_options")
    event_options(adj_options, "adjoint_options")
    tab = (
        tableau(adj_method, adj_options, "adjoint_method")
        if adj_method is not None
        else tableau(method, adj_options)
    )
    # The backward solve crosses the forward's stops and discontinuities too: it lands on
    # them unless the user's adjoint_options name their own.
    landing = {
        k: fwd_options[k]
        for k in ("step_t", "jump_t")
        if fwd_options.get(k) is not None and k not in adj_options
    }
    adj_options = {**adj_options, **landing}

    seminorm = adj_options.get("norm") == "seminorm"
    rk = prepared(tab)
    options(bk, {k: v for k, v in adj_options.items() if not (seminorm and k == "norm")}, rk, name)
    # Name what the user gave: a bad forward rtol is reported as rtol, not adjoint_rtol.
    rtol_given = (adj_rtol, "adjoint_rtol") if adj_rtol is not None else (rtol, "rtol")
    atol_given = (adj_atol, "adjoint_atol") if adj_atol is not None else (atol, "atol")
    return {
        "rtol": scalar_tol(*rtol_given),
        "atol": scalar_tol(*atol_given),
        "method": tab.name,
        "adaptive": rk.adaptive,
        "options": adj_options,
        "options_name": name,
    }
