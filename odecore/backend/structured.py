"""States made of several arrays: ``(x, v)``, a dict, a list, or any nesting of them.

The loop works on one array. :class:`StateStructure` lays the parts of a structured state end
to end along one axis (per sample, when the state is batched), in the dtype the parts promote
to, and takes them apart again, each in its own shape and dtype: around every call of the
user's function (:class:`StructuredFunc`), of a user norm, and for the outputs. Everything
between those calls (the loop, the solvers, the gradient rules) sees one array.

The default error norm of a structured state is the largest RMS of its parts
(``odecore.control.norms.largest_part_rms``), so that a small part's error is not diluted by
a large one's, as in torchdiffeq.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from odecore.backend.registry import container_children, library_of
from odecore.control.norms import largest_part_rms


class Node(NamedTuple):
    """One level of a structure: ``kind`` is the container's type (None for an array),
    ``keys`` a dict's keys in order, ``children`` the nodes inside."""

    kind: Any
    keys: tuple = ()
    children: tuple = ()


LEAF = Node(None)


class Registered(NamedTuple):
    """The ``kind`` of a container a framework registers (a JAX pytree node): its type, and
    how to build one from children (``Backend.tracing.tree_children``)."""

    type: type
    rebuild: Any


def is_structured(y0) -> bool:
    """Whether ``y0`` is a structure of arrays (a tuple, list or dict, or a container a
    framework registers, such as a JAX pytree class, holding at least one array) rather than
    one array. A list of plain numbers stays an array, as it always was, and so does one of
    NumPy's scalars (``list(a)`` of a float64 array), which are numbers, not arrays."""
    if not isinstance(y0, (tuple, list, dict)) and container_children(y0) is None:
        return False
    stack = [y0]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
        elif library_of(value) is not None and not isinstance(value, np.generic):
            return True
        else:
            registered = container_children(value)
            if registered is not None:
                stack.extend(registered[0])
    return False


def describe(value, path: str = "y0") -> tuple[Node, list[tuple[str, Any]]]:
    """The structure of ``value`` and its ``(path, leaf)`` pairs in order."""
    found: list[tuple[str, Any]] = []

    def walk(value, path):
        if isinstance(value, dict):
            keys = tuple(value)
            # An OrderedDict comes back as one, as JAX keeps it; other dicts as a dict.
            kind = OrderedDict if isinstance(value, OrderedDict) else dict
            return Node(kind, keys, tuple(walk(value[k], f"{path}[{k!r}]") for k in keys))
        if isinstance(value, (tuple, list)):
            return Node(
                type(value), (), tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(value))
            )
        registered = container_children(value)
        if registered is not None:
            children, rebuild = registered
            kind = Registered(type(value), rebuild)
            return Node(kind, (), tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(children)))
        found.append((path, value))
        return LEAF

    return walk(value, path), found


def leaves_as(
    node: Node, value, path: str, who: str, remedy: str = "; return the same structure as y0"
) -> list[tuple[str, Any]]:
    """The leaves of ``value``, read in the order of ``node``. Where ``value`` is not built
    like ``node``, an error naming ``who`` (what gave ``value``: "func returned") and ending
    with ``remedy``: a TypeError for another kind of container, a ValueError for other
    lengths or keys."""
    found: list[tuple[str, Any]] = []

    def walk(node, value, path):
        if node.kind is None:
            if isinstance(value, (tuple, list, dict)):
                raise TypeError(
                    f"{who} {_kind(value)} at {path}, where the state has an array{remedy}"
                )
            found.append((path, value))
            return
        if isinstance(node.kind, Registered):
            registered = container_children(value)
            if type(value) is not node.kind.type or registered is None:
                raise TypeError(
                    f"{who} {_kind(value)} at {path}, where the state has a "
                    f"{node.kind.type.__name__}{remedy}"
                )
            value = registered[0]
            if len(value) != len(node.children):
                raise ValueError(
                    f"{who} a {node.kind.type.__name__} of {len(value)} parts at {path}, where "
                    f"the state has {len(node.children)}{remedy}"
                )
            for i, (child, v) in enumerate(zip(node.children, value, strict=True)):
                walk(child, v, f"{path}[{i}]")
            return
        wanted = dict if node.kind in _DICTS else (tuple, list)
        if not isinstance(value, wanted):
            shown = "dict" if node.kind in _DICTS else node.kind.__name__
            raise TypeError(
                f"{who} {_kind(value)} at {path}, where the state has a {shown}{remedy}"
            )
        if node.kind in _DICTS:
            if set(value) != set(node.keys):
                raise ValueError(
                    f"{who} a dict with keys {_keys(value)} at {path}, where the state has "
                    f"keys {_keys(node.keys)}{remedy}"
                )
            for key, child in zip(node.keys, node.children, strict=True):
                walk(child, value[key], f"{path}[{key!r}]")
            return
        if len(value) != len(node.children):
            raise ValueError(
                f"{who} {_kind(value)} at {path}, where the state has a "
                f"{node.kind.__name__} of {len(node.children)} parts{remedy}"
            )
        for i, (child, v) in enumerate(zip(node.children, value, strict=True)):
            walk(child, v, f"{path}[{i}]")

    walk(node, value, path)
    return found


_DICTS = (dict, OrderedDict)


def _keys(keys) -> str:
    return "[" + ", ".join(sorted(map(repr, keys))) + "]"


def _kind(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} parts"
    if isinstance(value, dict):
        return "a dict"
    return f"a {type(value).__name__}"


def rebuild(node: Node, leaves: list) -> Any:
    """The structure ``node`` around ``leaves``, in order."""
    it = iter(leaves)

    def walk(node):
        if node.kind is None:
            return next(it)
        children = [walk(child) for child in node.children]
        if node.kind in _DICTS:
            return node.kind(zip(node.keys, children, strict=True))
        if isinstance(node.kind, Registered):
            return node.kind.rebuild(children)
        if hasattr(node.kind, "_fields"):  # a NamedTuple takes its fields as arguments
            return node.kind(*children)
        return node.kind(children)

    return walk(node)


class StateStructure:
    """How a structured state maps to one array and back.

    Unbatched, the state is the concatenation of every part, flattened: shape ``(N,)``.
    Batched (``batch_axis``, the samples' axis in every part), it is ``(B, N)``: each part
    moved to put its samples first and flattened per sample, so the inner solve is batched
    along axis 0. The array's dtype is the one the parts promote to; each part comes back in
    its own dtype (``func`` receives, and must return, each part in its dtype).
    """

    def __init__(self, xp, node: Node, leaves: list[tuple[str, Any]], batch_axis):
        self.xp = xp
        self.node = node
        self.paths = [path for path, _ in leaves]
        self.shapes = [tuple(int(n) for n in leaf.shape) for _, leaf in leaves]
        self.dtypes = [leaf.dtype for _, leaf in leaves]
        self.dtype = xp.result_type(*self.dtypes)
        self.batch_axes = [
            _batch_axis_of(p, s, batch_axis) for p, s in zip(self.paths, self.shapes, strict=True)
        ]
        self.batched = batch_axis is not None
        self.batch = None
        if self.batched:
            batches = {s[a] for s, a in zip(self.shapes, self.batch_axes, strict=True)}
            if len(batches) != 1:
                sizes = ", ".join(
                    f"{p}: {s[a]}"
                    for p, s, a in zip(self.paths, self.shapes, self.batch_axes, strict=True)
                )
                raise ValueError(
                    f"with batch_axis={batch_axis} every part of y0 needs the same number of "
                    f"samples along that axis, got {sizes}"
                )
            self.batch = batches.pop()
        # Each part's shape per sample: what the flat array holds of it in one row.
        self.rest = [
            tuple(n for i, n in enumerate(s) if i != a) if self.batched else s
            for s, a in zip(self.shapes, self.batch_axes, strict=True)
        ]
        self.sizes = [math.prod(r) for r in self.rest]
        self.bounds, start = [], 0
        for size in self.sizes:
            self.bounds.append((start, start + size))
            start += size
        self.key = (
            node,
            tuple(self.shapes),
            tuple(str(d) for d in self.dtypes),
            batch_axis,
        )

    def flatten(self, leaves: list, lead: int = 0, dtype=None):
        """The parts (``leaves``, each with ``lead`` extra leading axes) as one array."""
        xp = self.xp
        dtype = self.dtype if dtype is None else dtype
        rows = []
        for leaf, axis, size in zip(leaves, self.batch_axes, self.sizes, strict=True):
            front = tuple(leaf.shape[:lead])
            if self.batched:
                leaf = xp.moveaxis(leaf, axis + lead, lead)
                leaf = xp.reshape(leaf, (*front, self.batch, size))
            else:
                leaf = xp.reshape(leaf, (*front, size))
            rows.append(leaf if leaf.dtype == dtype else xp.astype(leaf, dtype))
        return rows[0] if len(rows) == 1 else xp.concat(rows, axis=-1)

    def parts(self, flat, lead: int = 0, cast: bool = True) -> list:
        """The parts of ``flat`` (with ``lead`` extra leading axes), each in its shape, and in
        its dtype with ``cast``."""
        xp = self.xp
        front = tuple(flat.shape[:lead])
        out = []
        for (lo, hi), rest, axis, dtype in zip(
            self.bounds, self.rest, self.batch_axes, self.dtypes, strict=True
        ):
            part = flat[..., lo:hi]
            if self.batched:
                part = xp.reshape(part, (*front, self.batch, *rest))
                part = xp.moveaxis(part, lead, axis + lead)
            else:
                part = xp.reshape(part, (*front, *rest))
            if cast and part.dtype != dtype:
                part = xp.astype(part, dtype)
            out.append(part)
        return out

    def unflatten(self, flat, lead: int = 0, cast: bool = True):
        """``flat`` as the user's structure."""
        return rebuild(self.node, self.parts(flat, lead, cast))

    def flatten_returned(
        self, bk, value, who: str, path: str = "dy/dt", lead_shape=(), exact_dtype=True
    ):
        """What ``who`` returned for the state (a derivative, a cotangent), checked part by
        part against the state, as one array. ``exact_dtype=False`` accepts any real floating
        dtype. With ``lead_shape`` (one per output time) ``value`` is a cotangent of the
        outputs ``ys`` that the caller passes, and messages say so."""
        if lead_shape:
            like, remedy = "ys", f"; give {path} the structure of ys"
            fix = f"give each part of {path} the shape of its part of ys, (len(t), *part shape)"
            verb = "pass"
        else:
            like, remedy, verb = "the state", "; return the same structure as y0", "return"
            fix = "each part must have the shape of its state part"
        found = leaves_as(self.node, value, path, who, remedy)
        for (where, leaf), shape, dtype in zip(found, self.shapes, self.dtypes, strict=True):
            shape = (*lead_shape, *shape)
            if not bk.owns(leaf):
                raise TypeError(
                    f"{who} a {type(leaf).__name__} at {where}; {verb} a {bk.name} "
                    f"array shaped like that part of {like}, {shape}"
                )
            if tuple(leaf.shape) != shape:
                raise ValueError(
                    f"{who} shape {tuple(leaf.shape)} at {where} but that part of {like} "
                    f"has shape {shape}; {fix}"
                )
            if exact_dtype and leaf.dtype != dtype:
                raise TypeError(
                    f"{who} dtype {leaf.dtype} at {where} but that part of the state "
                    f"has dtype {dtype}; return each part in its state part's dtype"
                )
        return self.flatten([leaf for _, leaf in found], lead=len(lead_shape))

    def tolerance(self, bk, value, name: str, check=None):
        """A tolerance: a number or 0-d array as it is; a structure like ``y0`` (one value, or
        one array broadcasting to its part, per part) as one array like the state.
        ``check(arr, path)`` is called on each part's value, to name the part it refuses."""
        if not isinstance(value, (tuple, list, dict)):
            shape = tuple(getattr(value, "shape", ()))
            if shape:
                # An array over the parts would be read in the flattened order, which is
                # odecore's own and undocumented.
                raise ValueError(
                    f"{name} of shape {shape} for a structured y0; give {name} the structure "
                    f"of y0 (a number or an array per part), or one number for every part"
                )
            return value
        found = leaves_as(
            self.node,
            value,
            name,
            f"{name} (structured like y0) has",
            f"; give {name} the structure of y0, or one number for every part",
        )
        xp = self.xp
        arrays = []
        for (where, tol), shape in zip(found, self.shapes, strict=True):
            arr = bk.asarray(tol, dtype=self.dtype)
            if check is not None:
                check(arr, where)
            try:
                arrays.append(xp.broadcast_to(arr, shape))
            except (ValueError, RuntimeError):
                raise ValueError(
                    f"{where} of shape {tuple(arr.shape)} does not broadcast to its part of "
                    f"y0, of shape {shape}"
                ) from None
        return self.flatten(arrays)

    def part_norm(self):
        """The default error norm: the largest RMS of any part."""
        return largest_part_rms(self.xp, self.sizes)


def _batch_axis_of(path, shape, batch_axis):
    if batch_axis is None:
        return None
    if not -len(shape) <= batch_axis < len(shape):
        raise ValueError(
            f"batch_axis={batch_axis} is out of range for {path} of shape {shape}; every part "
            f"of y0 needs its samples along batch_axis"
        )
    return batch_axis % len(shape)


class StructuredFunc:
    """The user's ``func`` on one array: it unflattens ``y``, calls ``func`` with the user's
    structure, and flattens what ``func`` returns (checked part by part). A ``vjp`` of the
    dynamics (NumPy) is wrapped alike: it receives and returns the structure."""

    def __init__(self, bk, func, structure: StateStructure):
        self.backend = bk
        self.func = func
        self.structure = structure
        if getattr(func, "vjp", None) is not None:
            self.vjp = self._vjp

    def __call__(self, t, y, *params, **keywords):
        out = self.func(t, self.structure.unflatten(y), *params, **keywords)
        return self.structure.flatten_returned(self.backend, out, "func returned")

    def _vjp(self, t, y, params, cot):
        s = self.structure
        cot_y, cot_params = self.func.vjp(t, s.unflatten(y), params, s.unflatten(cot))
        who = f"{type(self.func).__name__}.vjp returned"
        return s.flatten_returned(self.backend, cot_y, who, "cot_y"), cot_params

    def norm(self, user_norm):
        """A norm on the flat state from one on the user's structure."""
        structure = self.structure

        def norm(x):
            # The loop's dtype: a scaled error rounded to a narrower part's dtype would only
            # lose digits.
            return user_norm(structure.unflatten(x, cast=False))

        return norm


def unwrap(func):
    """The user's own ``func`` behind a :class:`StructuredFunc` (for what is found on it, such
    as an ``nn.Module``'s parameters), or ``func`` itself."""
    return func.func if isinstance(func, StructuredFunc) else func
