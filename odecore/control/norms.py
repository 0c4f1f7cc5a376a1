"""Error norms: how one step's scaled error becomes one number per sample."""

from __future__ import annotations

from collections.abc import Callable


def rms_norm(xp, x, axis):
    """Root-mean-square over the state, per sample (``axis=1`` of a (B, N) state), or over
    everything for a single sample kept in its own shape (``axis=None``)."""
    if axis is None and x.ndim != 1:
        x = xp.reshape(x, (-1,))
    # vecdot is one fused reduction; mean(x * x) is three operations.
    return xp.sqrt(xp.vecdot(x, x, axis=-1) / x.shape[-1])


def max_norm(xp, x, axis):
    return xp.max(xp.abs(x), axis=axis)


BUILTIN_NORMS: dict[str, Callable] = {"rms": rms_norm, "max": max_norm}


def largest_part_rms(xp, sizes) -> LargestPartRMS:
    """A norm for a state made of parts laid end to end along its last axis (``sizes``, in
    order; a part of size 0 is skipped): the largest RMS of any part. One RMS over the whole
    vector would dilute the error of a small part by the size of the others, so that, say, a
    large parameter adjoint beside the state would loosen the state's error control. To
    leave a trailing part out of the error control (a seminorm), pass only the leading sizes.

    An entry may also be a block ``(rows, part_sizes)``: ``rows`` rows laid end to end, each
    made of parts of ``part_sizes`` (a batch of structured states, flattened). Each of those
    parts is one part of the norm, over all the rows."""
    return LargestPartRMS(xp, sizes)


class LargestPartRMS:
    """The norm :func:`largest_part_rms` returns. ``sizes``, the nonzero part sizes in order
    when every part is contiguous (no blocks; else None), is public: a backend that compiles
    the norm into its solve reads it."""

    def __init__(self, xp, sizes):
        self.xp = xp
        blocks, start = [], 0
        for entry in sizes:
            rows, parts = entry if isinstance(entry, tuple | list) else (1, (int(entry),))
            width = sum(parts)
            if rows * width:
                blocks.append((start, rows, width, _bounds(parts)))
            start += rows * width
        self.blocks = blocks
        # A block of one part is that part, contiguous; a block of several interleaves them.
        contiguous = all(bounds == [(0, width)] for _, _, width, bounds in blocks)
        self.sizes = tuple(rows * width for _, rows, width, _ in blocks) if contiguous else None

    def __call__(self, z):
        xp = self.xp
        lead = tuple(z.shape[:-1])
        rms = []
        for begin, rows, width, bounds in self.blocks:
            block = z[..., begin : begin + rows * width]
            if bounds == [(0, width)]:  # one part: the block itself
                rms.append(xp.sqrt(xp.vecdot(block, block, axis=-1) / (rows * width)))
                continue
            block = xp.reshape(block, (*lead, rows, width))
            for lo, hi in bounds:
                part = xp.reshape(block[..., lo:hi], (*lead, rows * (hi - lo)))
                rms.append(xp.sqrt(xp.vecdot(part, part, axis=-1) / (rows * (hi - lo))))
        out = rms[0]
        for r in rms[1:]:
            out = xp.maximum(out, r)
        return out


def _bounds(sizes) -> list[tuple[int, int]]:
    """``(start, stop)`` of each part of nonzero size laid end to end."""
    bounds, start = [], 0
    for size in sizes:
        if size:
            bounds.append((start, start + size))
        start += size
    return bounds


def error_ratio(xp, ops, norm, err, err2, y, y_new, rtol, atol):
    """Scaled error norm per sample, as control values; at most 1 means the step is accepted.
    With two estimates (DOP853) they are combined by ``rules.combined_error_ratio``."""
    rules = ops.rules
    scale = ops.state_rules.error_scale(y, y_new, rtol, atol)
    n1 = ops.from_norm(norm(err / scale))
    if err2 is None:
        return n1
    n2 = ops.from_norm(norm(err2 / scale))
    return rules.combined_error_ratio(n1, n2)
