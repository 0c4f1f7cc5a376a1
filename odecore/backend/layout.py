"""Between the user's state and the loop's: shape, sample axis and dtype.

The loop (and the fixed-point loop) works on one row per sample, a ``(B, N)`` array; the user
gives any shape, with the samples along ``batch_axis``. A 16-bit state is kept in float32
inside the loop. :class:`Layout` converts both ways, around every call of the user's
function, and is built once per solve.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


class Layout:
    """How the user's state of shape ``shape`` maps to the loop's (batch, size) rows.

    The conversions run on every function evaluation, so everything they need is computed
    here once. With ``flat=False`` (a single sample on an eager backend, whose control values
    are Python numbers) the loop keeps the state in the user's shape.

    ``dtype`` is the loop's dtype, ``user_dtype`` that of ``y0``: they differ for a 16-bit
    state, which the loop keeps in float32 (see ``loop_dtype``). The conversions then cast
    too, so ``func``, a user norm and the outputs see the user's dtype and the loop its own.
    Otherwise a single eager sample's conversions are the identity.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        batch_axis: int | None,
        dtype: Any,
        flat: bool = True,
        user_dtype: Any = None,
    ):
        self.shape = shape
        self.batch_axis = batch_axis
        self.dtype = dtype
        self.user_dtype = dtype if user_dtype is None else user_dtype
        self.casts = self.user_dtype != dtype
        self.flat = flat
        self.batched = batch_axis is not None
        self.batch = shape[batch_axis] if self.batched else 1
        self.size = math.prod(shape) // self.batch if self.batch else 0
        self.internal_shape = (self.batch, self.size) if flat else shape
        rest = tuple(n for i, n in enumerate(shape) if i != batch_axis)
        self._moved_shape = (self.batch, *rest)
        if not flat and not self.casts:
            self.to_internal = self.to_user = self.from_user = _identity
            self.outputs_to_user = self.outputs_to_internal = _identity

    @property
    def reduce_axis(self):
        """The axes a per-sample reduction runs over in the loop's layout."""
        return 1 if self.flat else None

    def to_internal(self, xp, y):
        if self.batched and self.batch_axis != 0:
            y = xp.moveaxis(y, self.batch_axis, 0)
        y = xp.reshape(y, self.internal_shape)
        return xp.astype(y, self.dtype, copy=False) if self.casts else y

    def to_user(self, xp, y):
        if self.casts:
            y = xp.astype(y, self.user_dtype)
        return self.shaped_as_user(xp, y)

    def shaped_as_user(self, xp, y):
        """``y`` in the user's shape, keeping its dtype."""
        if not self.batched:
            return xp.reshape(y, self.shape)
        y = xp.reshape(y, self._moved_shape)
        return y if self.batch_axis == 0 else xp.moveaxis(y, 0, self.batch_axis)

    from_user = to_internal

    def outputs_to_internal(self, xp, out):
        """(T, *shape) -> (T, B, N)."""
        T = out.shape[0]
        if self.batched and self.batch_axis != 0:
            out = xp.moveaxis(out, self.batch_axis + 1, 1)
        out = xp.reshape(out, (T, *self.internal_shape))
        return xp.astype(out, self.dtype, copy=False) if self.casts else out

    def outputs_to_user(self, xp, out):
        """(T, B, N) buffer -> (T, *shape)."""
        if self.casts:
            out = xp.astype(out, self.user_dtype)
        T = out.shape[0]
        if not self.batched:
            return xp.reshape(out, (T, *self.shape))
        out = xp.reshape(out, (T, *self._moved_shape))
        return out if self.batch_axis == 0 else xp.moveaxis(out, 1, self.batch_axis + 1)


def _identity(xp, y):
    return y


def loop_dtype(xp, dtype):
    """The dtype the loop keeps a state of ``dtype`` in: its own, but at least float32.

    In a 16-bit float a step's increment ``h * k`` is often below half a unit in the last
    place of ``y``, so ``y + h * k`` rounds back to ``y``: the solve drifts or stalls while
    reporting success. The loop's stage sums, error estimate and outputs are therefore
    float32; ``func`` still sees (and returns) the user's dtype."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def layout(xp, y0, batch_axis, flat: bool = True) -> Layout:
    """The layout of ``y0`` with its samples along ``batch_axis`` (checked), or one sample."""
    shape = tuple(int(n) for n in y0.shape)
    dtype = loop_dtype(xp, y0.dtype)
    if batch_axis is None:
        return Layout(shape, None, dtype, flat, user_dtype=y0.dtype)
    check_batch_axis(shape, batch_axis)
    return Layout(shape, int(batch_axis) % len(shape), dtype, user_dtype=y0.dtype)


def check_batch_axis(shape: tuple, batch_axis) -> None:
    """A TypeError or ValueError unless ``batch_axis`` is None or an axis of ``shape``."""
    if batch_axis is None:
        return
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, numbers.Integral):
        raise TypeError(f"batch_axis must be an int or None, got {batch_axis!r}")
    if not -len(shape) <= batch_axis < len(shape):
        raise ValueError(f"batch_axis={batch_axis} is out of range for y0 of shape {shape}")
