"""A solve of a structured state (``y0 = (x, v)``, a dict, ...) as a solve of one array.

``flat_call`` turns the call's arguments into those of an ordinary solve: ``y0`` flattened
(``odecore.backend.structured.StateStructure``), ``func`` wrapped to see the structure,
structured tolerances flattened alike, and the error norm taken per part. The caller
unflattens the outputs with the returned structure.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from odecore import _validate
from odecore.backend.structured import StateStructure, StructuredFunc, describe


class FlatCall(NamedTuple):
    func: Any  # the StructuredFunc around the user's func
    y0: Any  # the flat state: (N,), or (B, N) batched along axis 0
    keywords: dict  # the solve's keyword arguments for the flat state
    structure: StateStructure


def flat_call(bk, func, y0, keywords: dict) -> FlatCall:
    """The arguments of a solve of the structured ``y0`` as those of a solve of one array."""
    if bk.kernels.solve is not None:
        raise TypeError(
            f"the {bk.name!r} backend compiles whole solves and needs y0 as one array, got "
            f"a {type(y0).__name__} of arrays; concatenate the parts into one flat array "
            f"(and split it inside func), or use the numpy, torch or jax backend"
        )
    batch_axis = keywords["batch_axis"]
    node, found = describe(y0)
    # An empty part is solved as torchdiffeq solves it, as nothing, beside the others.
    parts = [
        (path, _validate.initial_state(bk, leaf, finite=batch_axis is None, name=path, empty=True))
        for path, leaf in found
    ]
    if all(math.prod(leaf.shape) == 0 for _, leaf in parts):
        shapes = ", ".join(f"{path}: {tuple(leaf.shape)}" for path, leaf in parts)
        raise ValueError(f"every part of y0 is empty ({shapes}); there is nothing to solve")
    structure = StateStructure(bk.xp, node, parts, batch_axis)
    wrapped = StructuredFunc(bk, func, structure)
    flat = dict(keywords)
    flat["batch_axis"] = None if batch_axis is None else 0
    for name in ("rtol", "atol"):
        flat[name] = structure.tolerance(bk, keywords[name], name, _part_check(bk, name))
    _warn_unresolvable_in_parts(bk, structure, parts, flat["rtol"])
    options = _per_part_norm(wrapped, keywords["method"], keywords["options"])
    flat["options"] = _structured_grid(options, func, y0)
    y0_flat = structure.flatten([leaf for _, leaf in parts])
    return FlatCall(wrapped, y0_flat, flat, structure)


def _warn_unresolvable_in_parts(bk, structure, parts, rtol) -> None:
    """The solve checks rtol against the dtype the parts promote to; a narrower part (float32
    beside float64) cannot hold a tighter tolerance either: its outputs come back in its
    own dtype, and func computes it there."""
    for (path, leaf), (lo, hi) in zip(parts, structure.bounds, strict=True):
        if leaf.dtype == structure.dtype or hi == lo:
            continue
        own = rtol[..., lo:hi] if getattr(rtol, "ndim", 0) else rtol
        _validate.warn_unresolvable_rtol(bk, leaf, own, name=path)


def _part_check(bk, name):
    """The check of one part of a structured tolerance ``name``, naming that part."""

    def check(arr, path):
        _validate.tolerance_part(bk, arr, name, path)

    return check


def _per_part_norm(wrapped, method, options):
    """The options with the error norm of a structured state: the largest RMS of its parts
    for "rms" (the default), a user norm called with the structure; "max" is the same on
    the flat state. Fixed-step methods have no norm."""
    if not _validate.tableau(method, options).adaptive:
        return options
    _validate.check_dict(options or {}, "options")
    options = dict(options or {})
    norm = options.get("norm", "rms")
    if isinstance(norm, str) and norm == "rms":
        options["norm"] = wrapped.structure.part_norm()
    elif callable(norm):
        options["norm"] = wrapped.norm(norm)
    return options


def _structured_grid(options, func, y0):
    """The options with a ``grid_constructor`` that receives the user's ``func`` and ``y0``
    as given, not their flat forms."""
    constructor = (options or {}).get("grid_constructor")
    if not callable(constructor):
        return options

    def grid(_, __, t):
        return constructor(func, y0, t)

    return {**options, "grid_constructor": grid}
