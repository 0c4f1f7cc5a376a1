"""Nested tuples, lists and dicts of arrays (``params``, and the inputs of a call): their
leaves, and the same structure rebuilt around new leaves. One implementation for the core; a
backend whose library has its own pytrees (JAX) flattens those itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


def leaves(values: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs of nested containers, in order; a top-level dict names its
    entries, so that ``{"y0": ..., "t": ...}`` reports ``y0`` and ``params[1]`` rather than
    positions."""
    stack = [(path, values)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, (tuple, list)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            stack.extend(
                (f"{where}[{k!r}]" if where else str(k), v) for k, v in reversed(value.items())
            )
        else:
            yield where or "argument", value


def replace_leaves(structure: Any, new: list[Any], chosen: Callable[[Any], bool]) -> Any:
    """``structure`` with each leaf for which ``chosen(leaf)`` holds replaced, in order, by
    the next of ``new``; every other leaf kept."""
    it = iter(new)

    def rebuild(value):
        if isinstance(value, (tuple, list)):
            return type(value)(rebuild(v) for v in value)
        if isinstance(value, dict):
            return {k: rebuild(v) for k, v in value.items()}
        return next(it) if chosen(value) else value

    return rebuild(structure)


def unflatten_like(structure: Any, new: list[Any]) -> Any:
    """``structure`` with every leaf replaced, in order, by the next of ``new`` (gradients
    handed back in the shape of ``params``); None stays None."""
    if structure is None:
        return None
    return replace_leaves(structure, new, lambda leaf: True)


def arrays_held_by(obj: Any, is_array: Callable[[Any], bool]) -> list[Any]:
    """The arrays among an object's attributes (one level deep, through tuples, lists and
    dicts): what a ``params`` that is not a container hides from the gradient rules."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        values = list(getattr(obj, "__dict__", {}).values())
    return [x for _, x in leaves(values) if is_array(x)]
