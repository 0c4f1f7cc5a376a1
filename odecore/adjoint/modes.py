"""The gradient modes as objects: ``odecore.Direct()``, ``odecore.Backsolve(...)``,
``odecore.Checkpoint()``.

Each checks its settings when it is made, so a bad setting fails where it is written. The
strings ``"direct"``, ``"backsolve"`` and ``"checkpoint"`` and torchdiffeq's ``adjoint_rtol``,
``adjoint_atol``, ``adjoint_method`` and ``adjoint_options`` keywords keep working: they map
onto these objects (:func:`from_arguments`), whose fields hold the one set of defaults.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from odecore.solvers.tableaus import ADAPTIVE_METHODS, FIXED_STEP_METHODS


@dataclass(frozen=True)
class Direct:
    """Backpropagation through the solver's operations, as ``adjoint=odecore.Direct()``.

    The exact gradient of the discrete solve, with memory growing with the number of steps. The
    framework's autodiff must be able to reverse a loop of unknown length (torch can; JAX's
    reverse mode cannot). The default mode on frameworks with autodiff; the only one that
    supports second-order gradients (``create_graph=True``). It has no settings.

    Attributes
    ----------
    name : str
        ``"direct"``, the mode's name as ``adjoint=`` also takes it.

    Examples
    --------
    >>> import torch
    >>> import odecore
    >>> y0 = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    >>> ys = odecore.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
    ...                     adjoint=odecore.Direct(), rtol=1e-10, atol=1e-12)
    >>> ys[-1, 0].backward()
    >>> round(y0.grad.item(), 6), round(torch.exp(torch.tensor(-1.0)).item(), 6)
    (0.367879, 0.367879)
    """

    name: ClassVar[str] = "direct"


@dataclass(frozen=True)
class Checkpoint:
    """The exact gradient of the discrete solve, from stored steps, as
    ``adjoint=odecore.Checkpoint()``.

    The accepted steps are stored and each is replayed backward with local VJPs, so the
    gradient is that of the discrete solve, with no autodiff graph kept across steps. On a
    tracing backend (JAX) its buffers hold ``options['max_num_steps']`` steps. It has no
    settings.

    Attributes
    ----------
    name : str
        ``"checkpoint"``, the mode's name as ``adjoint=`` also takes it.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Decay:
    ...     def __call__(self, t, y, a):
    ...         return a * y
    ...     def vjp(self, t, y, a, cotangent):
    ...         return a * cotangent, np.sum(cotangent * y)
    >>> ys, pullback = odecore.vjp_odeint(Decay(), np.array([1.0]), np.array([0.0, 1.0]),
    ...                                   np.array(-1.0), adjoint=odecore.Checkpoint())
    >>> y0_bar, a_bar, t_bar = pullback(np.array([[0.0], [1.0]]))
    >>> bool(np.isclose(y0_bar[0], ys[-1, 0]))  # d y(1) / d y0 = exp(-1) = y(1)
    True
    """

    name: ClassVar[str] = "checkpoint"


def _tolerance(value, name):
    if value is None or not isinstance(value, numbers.Real) or isinstance(value, bool):
        # Arrays are checked with the solve, where their backend is known.
        if value is not None and not hasattr(value, "shape"):
            raise TypeError(f"Backsolve({name}=...) must be a positive number, got {value!r}")
        return
    if not (math.isfinite(value) and (value >= 0 if name == "rtol" else value > 0)):
        need = "non-negative and finite" if name == "rtol" else "positive and finite"
        raise ValueError(f"Backsolve({name}=...) must be {need}, got {value!r}")


@dataclass(frozen=True)
class Backsolve:
    """The continuous adjoint, as ``adjoint=odecore.Backsolve(...)``.

    The gradient comes from a backward solve of the adjoint ODE, with memory independent of the
    number of steps. It approximates the gradient of the exact solution to the backward solve's
    tolerance, not the discrete solve's gradient.

    Parameters
    ----------
    rtol, atol : float or array, optional
        The backward solve's tolerances. None takes the forward solve's (a per-element forward
        tolerance becomes its strictest value, since the backward state is not shaped like
        ``y0``).
    method : str, optional
        The backward solve's method, one of [`METHODS`][odecore.METHODS]; None takes the
        forward's.
    options : dict, optional
        The backward solve's options; None takes the forward's, except its ``norm`` (not
        carried over); its ``step_t`` and ``jump_t`` are carried over unless ``options`` names
        its own.
    seminorm : bool, default False
        Measure the backward error on the state and the adjoint only, not on the parameters'
        gradients (Kidger, Chen & Lyons, 2021): usually fewer steps, the same accuracy.

    Attributes
    ----------
    name : str
        ``"backsolve"``, the mode's name as ``adjoint=`` also takes it.

    Raises
    ------
    TypeError
        A tolerance is neither a number nor an array, ``options`` is not a mapping, or
        ``seminorm`` is not a bool.
    ValueError
        ``rtol`` is negative, ``atol`` is not positive, a tolerance is not finite,
        ``method`` is unknown, or ``seminorm=True`` comes with a ``norm`` in ``options``.

    Examples
    --------
    >>> import odecore
    >>> odecore.Backsolve(rtol=1e-8, atol=1e-10, method="dopri8", seminorm=True)
    Backsolve(rtol=1e-08, atol=1e-10, method='dopri8', options=None, seminorm=True)
    >>> odecore.Backsolve(rtol=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: Backsolve(rtol=...) must be non-negative and finite, got -1.0
    """

    rtol: Any = None
    atol: Any = None
    method: str | None = None
    options: Mapping | None = field(default=None, hash=False)
    seminorm: bool = False
    name: ClassVar[str] = "backsolve"

    def __post_init__(self):
        _tolerance(self.rtol, "rtol")
        _tolerance(self.atol, "atol")
        if self.method is not None and (
            not isinstance(self.method, str)
            or self.method not in (*ADAPTIVE_METHODS, *FIXED_STEP_METHODS)
        ):
            raise ValueError(
                f"Backsolve(method=...) got the unknown method {self.method!r}; valid methods "
                f"are: fixed-step {', '.join(FIXED_STEP_METHODS)}; adaptive "
                f"{', '.join(ADAPTIVE_METHODS)}"
            )
        if self.options is not None and not isinstance(self.options, Mapping):
            raise TypeError(
                f"Backsolve(options=...) must be a dict of the backward solve's options, got "
                f"{type(self.options).__name__}"
            )
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"Backsolve(seminorm=...) must be True or False, got {self.seminorm!r}")
        if self.seminorm and self.options is not None and "norm" in self.options:
            raise ValueError(
                "Backsolve(seminorm=True) sets the backward solve's norm, and options also names "
                f"one ({self.options['norm']!r}); pass one of them"
            )

    def backward_options(self) -> dict | None:
        """The backward solve's options as the ``adjoint_options`` keyword gives them."""
        if not self.seminorm:
            return None if self.options is None else dict(self.options)
        return {**(self.options or {}), "norm": "seminorm"}


MODES: dict[str, type] = {mode.name: mode for mode in (Direct, Backsolve, Checkpoint)}


def given_keywords(rtol=None, atol=None, method=None, options=None) -> list[str]:
    """The names of the ``adjoint_*`` keywords a call passed (those that are not None)."""
    given = {
        "adjoint_rtol": rtol,
        "adjoint_atol": atol,
        "adjoint_method": method,
        "adjoint_options": options,
    }
    return [name for name, value in given.items() if value is not None]


def as_keywords(adjoint, rtol=None, atol=None, method=None, options=None) -> tuple:
    """``(adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)`` with a mode
    object spelled as the string and keywords that the solve checks against the backend and
    the forward solve. Strings and None pass through; a mode object together with
    ``adjoint_*`` keywords is ambiguous and refused."""
    if not isinstance(adjoint, (Direct, Backsolve, Checkpoint)):
        return adjoint, rtol, atol, method, options
    given = given_keywords(rtol, atol, method, options)
    if given:
        raise ValueError(
            f"{', '.join(given)} and adjoint={adjoint!r} both configure the gradient; put the "
            f"settings in the mode object, odecore.Backsolve(rtol=..., atol=..., method=..., "
            f"options=...)"
        )
    if isinstance(adjoint, Backsolve):
        return "backsolve", adjoint.rtol, adjoint.atol, adjoint.method, adjoint.backward_options()
    return adjoint.name, None, None, None, None
