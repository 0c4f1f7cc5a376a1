"""Dense output: the requested output times inside an accepted step, filled by its interpolant."""

from __future__ import annotations

import bisect

import numpy as np


def fill_outputs(p, s, accept, t, t_new, h, hy, y, trial, f_new, nfev, t_end=None):
    """Write every requested output time in (t, t_end] of each accepting sample, by the
    solver's interpolant on the step just taken (``trial``, a StepResult); returns
    ``(out, out_idx, nfev)``. ``t_end`` is the step's end ``t_new`` unless a terminal event
    stops the sample inside the step."""
    t_end = t_new if t_end is None else t_end
    bk, ops, solver = p.backend, p.ops, p.solver
    y_new = trial.y_new
    ts, T = p.ts, p.ts_array.shape[0]

    def pending(out_idx):
        at_time = ops.take(ts, ops.minimum(out_idx, T - 1))
        return accept & (out_idx < T) & (at_time <= t_end), at_time

    def fill(out, out_idx, nfev):
        rows = ops.rows_index(p.layout.batch)
        h_safe = ops.where(h > 0, h, 1.0)

        def write(out, out_idx, nfev, interpolating):
            dense = None
            if interpolating and p.interp != "linear":
                dense = solver.dense_stages(p.evaluate, t, y, h, hy, trial.stages, f_new)
                nfev = nfev + solver.nfev_dense_extra
            if ops.scalar and p.interpolate == solver.interpolate:
                span = _write_span(
                    p, out, out_idx, t, t_new, t_end, h_safe, y, hy, y_new, interpolating, dense
                )
                if span is not None:
                    return (*span, nfev)

            def more(c):
                return ops.any(pending(c[1])[0])

            def one_output(c):
                out, out_idx = c
                mask, at_time = pending(out_idx)
                slot = ops.minimum(out_idx, T - 1)
                value = y_new
                if interpolating:
                    # theta stays in the time dtype: the interpolant's coefficients reach
                    # hundreds (DOP853), and their weighted sums would lose digits in a
                    # float32 state.
                    theta = (at_time - t) / h_safe
                    if p.interp == "linear":
                        value = y + ops.to_state(theta) * (y_new - y)
                    else:
                        value = p.interpolate(ops, p.dense_coeffs, theta, y, hy, dense)
                    # The step's end point is known exactly; do not replace it by the
                    # interpolant.
                    value = ops.select_rows(at_time == t_new, y_new, value)
                where = ops.out_index(slot, rows)
                value = ops.select_rows(mask, value, out[where])
                return bk.write(out, where, value), out_idx + ops.count(mask)

            out, out_idx = bk.while_loop(more, one_output, (out, out_idx))
            return out, out_idx, nfev

        def interpolated(out, out_idx, nfev):
            return write(out, out_idx, nfev, interpolating=True)

        def exact(out, out_idx, nfev):
            return write(out, out_idx, nfev, interpolating=False)

        # Outputs come in increasing time, so if each sample's first pending output is the
        # step's end, none lies inside the step: y_new is written as it is, and the
        # interpolant's extra stages (three evaluations for dopri8) are not computed.
        mask, at_time = pending(out_idx)
        inside = ops.any(mask & (at_time < t_new))
        return bk.cond(inside, interpolated, exact, out, out_idx, nfev)

    # Most steps reach no output time; everything else is set up only for those that do.
    any_pending = ops.any(pending(s.out_idx)[0])
    return bk.cond(any_pending, fill, unchanged, s.out, s.out_idx, nfev)


def unchanged(*operands):
    return operands


def _write_span(p, out, out_idx, t, t_new, t_end, h, y, hy, y_new, interpolating, dense):
    """One eager sample's outputs in ``(t, t_end]``, written together, or None when fewer
    than ``SPAN_FROM`` of them lie there. One at a time, each output costs tens of
    microseconds of Python, and a dense grid of a million outputs took minutes where its
    steps took milliseconds; together, the weights of every output come from one product
    on the host, in float64 as the Python floats of one output are, and the states from
    one more. Returns ``(out, out_idx)``."""
    last = bisect.bisect_right(p.ts, t_end, out_idx)
    if last - out_idx < SPAN_FROM or not interpolating:
        return None
    xp = p.backend.xp
    theta = (np.asarray(p.ts[out_idx:last]) - t) / h
    if dense is None:  # linear
        weights, nodes = np.stack([1.0 - theta, theta], axis=1), [y, y_new]
    else:
        coeffs = _dense_coefficients(p.solver)
        powers = theta[:, None] ** np.arange(1, coeffs.shape[0] + 1)
        weights, nodes = hy * (powers @ coeffs), dense
    # (outputs, nodes) @ (nodes, state size): every output's weighted sum at once.
    stacked = xp.reshape(xp.stack(nodes, axis=0), (len(nodes), -1))
    values = xp.matmul(xp.asarray(weights, dtype=y.dtype), stacked)
    if dense is not None:
        values = xp.reshape(y, (1, -1)) + values
    values = xp.reshape(values, (last - out_idx, *y.shape))
    if p.ts[last - 1] == t_new:
        # The step's end point is known exactly; do not replace it by the interpolant.
        values = xp.concat([values[:-1], y_new[None, ...]], axis=0)
    return p.backend.write(out, slice(out_idx, last), values), last


# The fewest outputs in one step that are written together. A single output keeps the
# per-output path (its Python sums cost less than the products' set-up).
SPAN_FROM = 3


def _dense_coefficients(solver):
    """The interpolant's coefficients as a (degree, nodes) float64 array, made once per
    prepared solver and kept with its other converted arrays (``ExplicitRK.native``)."""
    coeffs = solver.native.get("dense_float64")
    if coeffs is None:
        coeffs = solver.native["dense_float64"] = np.asarray(solver.dense, dtype=np.float64).T
    return coeffs
