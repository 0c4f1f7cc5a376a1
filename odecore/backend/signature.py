"""Errors that say how odecore calls a user's function, when its signature cannot take that."""

from __future__ import annotations

import inspect


def explain_signature(
    func, count: int, call: str, hint: str, error: TypeError | None, keywords=(), in_place=False
) -> None:
    """After calling ``func`` with ``count`` positional arguments (and the ``keywords``)
    raised ``error`` (None: before any call, to refuse early): when ``func``'s signature
    cannot take those arguments (rather than a TypeError raised inside it), raise one that
    says how odecore calls it (``call``) and what to write (``hint``). Python's own message
    says neither, and Numba's (``not enough arguments: expected 4, got 3``) does not name the
    function. ``in_place``: ``func`` is an ODE's rate, which the numba backend also takes in
    numbalsoda's in-place form. Call it on the error path where there is one: reading a
    signature costs more than a short solve's evaluation."""
    target = getattr(func, "py_func", func)  # a Numba dispatcher's Python function
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (some builtins and extensions)
        return
    try:
        signature.bind(*range(count), **dict.fromkeys(keywords))
    except TypeError as mismatch:
        required = [
            p
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        if in_place and len(required) == 4:
            hint = (
                "Four arguments read as numbalsoda's in-place form f(t, y, dy, params), which "
                "only backend='numba' compiles; the other backends take the rate as f's "
                "return value: f(t, y, params) -> dy/dt."
            )
        raise TypeError(
            f"odecore calls {call}, and the signature {signature} cannot take that "
            f"({mismatch}). {hint}"
        ) from error
