"""Checks of the arrays and callables given to the fixed-point functions, and their layout."""

from __future__ import annotations

import numbers

from odecore import _validate
from odecore.backend.layout import Layout, loop_dtype
from odecore.backend.tree import leaves as tree_leaves
from odecore.deq.options import describe


def layout(xp, z0, batch_axis) -> Layout:
    """The layout of ``z0``: one sample, or (``batch_axis=0``) one per row of its first axis.
    ``f`` sees and returns ``z0``'s dtype; the loops keep a 16-bit one in float32, as the ODE
    loop does: in float16 a residual's squares overflow beyond 256 (a finite iterate then
    reads as NONFINITE) and vanish below 2.4e-4 (an iterate far from converged reads as
    converged), and torch has no linear solve for Anderson's mixing in 16 bits on a CPU."""
    if batch_axis is not None and (
        isinstance(batch_axis, bool) or not isinstance(batch_axis, numbers.Integral)
    ):
        raise TypeError(f"batch_axis must be None or the integer 0, got {describe(batch_axis)}")
    if batch_axis not in (None, 0):
        raise ValueError(
            f"batch_axis must be None (one sample) or 0 (the first axis indexes samples), "
            f"got {batch_axis!r}; move the sample axis first"
        )
    if batch_axis == 0 and z0.ndim == 0:
        raise ValueError("batch_axis=0 needs z0 with at least one axis")
    shape = tuple(int(n) for n in z0.shape)
    return Layout(shape, batch_axis, loop_dtype(xp, z0.dtype), user_dtype=z0.dtype)


def float_array(bk, name, value, dtype=None):
    array = _validate.as_array(bk, value, name, "a real floating array", dtype=dtype)
    if not bk.xp.isdtype(array.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype, got {array.dtype}; convert it, e.g. to "
            f"float64"
        )
    return array


def like_z(bk, name, value, z):
    """A vector shaped like ``z``, with its dtype (a probe or a start). Plain values (lists,
    NumPy arrays on another backend) take z's dtype; an array must have it already."""
    array = float_array(bk, name, value, None if bk.owns(value) else z.dtype)
    if tuple(array.shape) != tuple(z.shape):
        raise ValueError(f"{name} must be shaped like z {tuple(z.shape)}, got {tuple(array.shape)}")
    if array.dtype != z.dtype:
        raise TypeError(f"{name} must have z's dtype {z.dtype}, got {array.dtype}")
    return array


def cotangent(bk, value, z):
    """The pullback's ``z_bar``: shaped like ``z``, in its dtype, finite. Converted as it
    came, a complex one lost its imaginary part, an integer one ran the backward in integers,
    and one with NaN made the backward fail with advice about its own settings."""
    array = like_z(bk, "z_bar", value, z)
    return _validate.initial_state(bk, array, name="z_bar")


def check_callable(f):
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, params) (or f(z)), got {describe(f)}")


def check_params(params):
    """``params`` is a pytree of arrays: anything else in it would get no gradient, and the
    NumPy pullback could not give it one."""
    for where, leaf in tree_leaves({"params": params}):
        if leaf is None or isinstance(leaf, numbers.Number):
            continue
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            continue
        raise TypeError(
            f"params must be an array or a tuple, list or dict of arrays (numbers and None "
            f"may appear too); {where} is {describe(leaf)}: put its arrays into params "
            f"instead, or let f capture it if it needs no gradient"
        )
