"""Step callbacks, as torchdiffeq calls them: methods of the dynamics object, when present.

``callback_step(t0, y0, dt)`` before each step is attempted, then
``callback_accept_step(t0, y0, dt)`` or ``callback_reject_step(t0, y0, dt)`` once the error
control has decided (adaptive methods). ``t0`` is the step's start in the user's time,
``y0`` the state there in the user's shape (or structure), ``dt`` the size of the step
attempted (positive, also when time decreases, as in torchdiffeq). The backsolve's backward
solve calls the ``_adjoint`` counterparts with its state ``(y, a, a_params)``.

They are called from the loop of an eager solve of one sample (NumPy, torch, without
``batch_axis``), whose control values are Python numbers. A batched solve, and any traced
solve (JAX, whose eager calls are compiled too), cannot call Python per sample and step:
there they are not called, and the solve warns that they are not.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from odecore.backend.signature import explain_signature
from odecore.backend.structured import StructuredFunc, unwrap

NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


class StepCallbacks(NamedTuple):
    """The callbacks found on a dynamics object, and how to show it the loop's values."""

    step: Any
    accept: Any
    reject: Any
    user_state: Any  # the loop's state as the callbacks receive it
    user_time: Any  # the loop's time as they receive it (the direction applied)
    user_step: Any  # a step size as they receive it

    def before(self, running, t, y, h):
        if running and self.step is not None:
            self.step(self.user_time(t), self.user_state(y), self.user_step(h))

    def after(self, running, accept, t, y, h):
        chosen = self.accept if accept else self.reject
        if running and chosen is not None:
            chosen(self.user_time(t), self.user_state(y), self.user_step(h))


def step_callbacks(bk, ops, func, layout, dynamics, adaptive: bool) -> StepCallbacks | None:
    """The callbacks of ``func`` for a solve, or None where it has none or where they
    cannot be called (then with a warning)."""
    owner = unwrap(func)
    found = {name: getattr(owner, name, None) for name in NAMES}
    if not any(callable(c) for c in found.values()):
        return None
    _check_signatures(owner, found)
    if not ops.scalar:
        _warn_not_called(owner, found)
        return None
    xp = bk.xp

    def user_state(y):
        y = layout.to_user(xp, y)
        return func.structure.unflatten(y) if isinstance(func, StructuredFunc) else y

    return StepCallbacks(
        step=found["callback_step"],
        accept=found["callback_accept_step"] if adaptive else None,
        reject=found["callback_reject_step"] if adaptive else None,
        user_state=user_state,
        user_time=dynamics.user_time,
        user_step=lambda h: ops.user_time(h, False),
    )


def dynamics_name(owner) -> str:
    """A function's name, or an object's type name."""
    return getattr(owner, "__name__", None) or type(owner).__name__


def _check_signatures(owner, found: dict) -> None:
    """Refuse, before the solve, a callback that cannot take torchdiffeq's three arguments:
    it would fail at the first step with Python's message, which names neither the call
    nor the callback's owner."""
    for name, callback in found.items():
        if callable(callback):
            state = "(y, a, a_params)" if name.endswith("_adjoint") else "y0"
            explain_signature(
                callback,
                3,
                f"{dynamics_name(owner)}.{name}(t0, {state}, dt), as torchdiffeq does",
                "It receives the step's start time, the state there and the step size.",
                None,
            )


def _warn_not_called(owner, found: dict) -> None:
    names = ", ".join(n for n, c in found.items() if callable(c))
    warnings.warn(
        f"{dynamics_name(owner)} has step callbacks ({names}), which are not called: they "
        f"run only in an eager solve of one sample (NumPy or torch, without batch_axis; "
        f"the backsolve's backward solve is one), not in a batched or a traced (JAX) solve",
        UserWarning,
        stacklevel=3,
    )


def attach_adjoint_callbacks(bk, augmented, func, split) -> None:
    """Give the backsolve's augmented dynamics ``augmented`` the ``_adjoint`` callbacks of the
    user's ``func`` as its own step callbacks, receiving the backward state as
    ``split(z) -> (y, a, a_params)``; on a traced backend, warn that they are not called."""
    owner = unwrap(func)
    found = {f"{name}_adjoint": getattr(owner, f"{name}_adjoint", None) for name in NAMES}
    if not any(callable(c) for c in found.values()):
        return
    _check_signatures(owner, found)
    if not bk.eager:
        _warn_not_called(owner, found)
        return
    for name in NAMES:
        callback = found[f"{name}_adjoint"]
        if callable(callback):
            setattr(augmented, name, _receiving_split(callback, split))


def _receiving_split(callback, split):
    def called(t0, z, dt):
        return callback(t0, split(z), dt)

    return called
