"""Gradients of event times and states, by the implicit function theorem.

The loop locates an event time ``t*`` as a number: it carries no gradient. From
``g(t*, y(t*; theta), theta) = 0``,

    dt*/dtheta = -(dg/dtheta + dg/dy . dy/dtheta) / (dg/dt + dg/dy . f(t*, y*)),

and the event state ``y* = y(t*; theta)`` moves with ``dy*/dtheta = dy/dtheta + f . dt*/dtheta``.
Both are attached as corrections of value zero: with ``s`` the stop-gradient,

    t* = s(t*) - (g(s(t*), y_s, theta) - s(g)) / s(dg/dt + dg/dy . f)
    y* = y_s + s(f) (t* - s(t*))

where ``y_s`` is the state at the fixed time ``s(t*)``, differentiable in ``y0``, ``t[0]`` and
the parameters. In ``direct`` mode ``y_s`` is the loop's own interpolated state. In the other
modes the loop runs inside a rule, so ``y_s`` comes from a second solve in the same mode with
output times ``[t[0], s(t*)]`` (for a batch, every sample's event time, sorted): its values are
those of the first solve to the solver's tolerance, and only its gradient is used. A
framework's backward then starts at ``t*`` with the cotangent ``y*_bar - c g_y / denominator``
(``c = y*_bar . f + t*_bar``), as the adjoint of an event requires.
"""

from __future__ import annotations

import math

from odecore.backend import differentiate, tree


def event_gradients(bk, func, params, t, batch_axis, events, record, solve_again, from_loop):
    """``record`` (an EventRecord from a solve of the array state ``y0``) with differentiable
    ``t`` and ``y``. ``solve_again(times)`` solves the same problem for other output times
    (the outputs, differentiable); ``from_loop``: ``record.y`` is already differentiable."""
    xp, sg = bk.xp, bk.stop_gradient
    batched = batch_axis is not None
    stopped = record.index >= 0
    time_dtype = record.t.dtype
    t_stop = xp.where(stopped, sg(record.t), xp.astype(sg(t[-1]), time_dtype))
    where_stopped = _per_sample(xp, stopped, record.y, batch_axis)
    if from_loop:
        # A sample without an event gets a finite stand-in: its results are masked below.
        y_stop = xp.where(where_stopped, record.y, xp.zeros_like(record.y))
    else:
        y_again = _state_at(bk, t, t_stop, batch_axis, solve_again)
        # The second solve contributes its gradient, the first its value.
        y_stop = sg(xp.where(where_stopped, record.y, y_again)) + (y_again - sg(y_again))
    t_call = xp.astype(t_stop, y_stop.dtype)
    f = sg(differentiate.call(func, t_call, sg(y_stop), params))
    one_hot = record.index[..., None] == xp.arange(len(events))

    def fired(t_, y_):
        values = [_value(xp, e.fn, t_, y_, params) for e in events]
        return xp.sum(xp.where(one_hot, xp.stack(values, axis=-1), 0.0), axis=-1)

    g = fired(t_call, y_stop)
    _, pullback = bk.autodiff.vjp(fired, t_call, sg(y_stop))
    g_t, g_y = pullback(xp.ones_like(sg(g)))
    axes = tuple(i for i in range(y_stop.ndim) if not (batched and i == batch_axis))
    denominator = sg(g_t + xp.sum(g_y * f, axis=axes))
    # A function flat along the solution at its crossing (a step, such as sign(y - c)) has
    # no rate there, and its time no gradient by the identity: its value stays the loop's
    # (0 / 0 made it NaN), and its gradient is what autodiff makes of the step (zero).
    moving = stopped & (denominator != 0)
    numerator = xp.where(moving, g - sg(g), 0.0)
    denominator = xp.where(moving, denominator, 1.0)
    t_star = t_stop - xp.astype(numerator / denominator, time_dtype)
    moved = xp.astype(t_star - sg(t_star), y_stop.dtype)
    y_star = y_stop + _per_sample(xp, moved, y_stop, batch_axis) * f
    nan = math.nan
    first_order = bk.autodiff.first_order_only
    return record._replace(
        t=first_order(xp.where(stopped, t_star, nan), SECOND_ORDER_MESSAGE),
        y=first_order(
            xp.where(_per_sample(xp, stopped, y_stop, batch_axis), y_star, nan),
            SECOND_ORDER_MESSAGE,
        ),
    )


# The corrections above are exact to first order: their stop-gradients drop the terms that a
# second derivative needs (the curvature of g along the trajectory, the motion of f with the
# event time), which would come out wrong rather than fail.
SECOND_ORDER_MESSAGE = (
    "second-order derivatives of an event's time or state (create_graph=True, "
    "jax.hessian) are not available: their gradients come from the implicit function "
    "theorem to first order. Differentiate them once; the states at output times before "
    "the event have second derivatives (in torch's 'direct' mode, and on JAX)"
)


def _value(xp, fn, t, y, params):
    return fn(t, y) if params is None else fn(t, y, params)


def _per_sample(xp, values, like, batch_axis):
    """Per-sample ``values`` ((B,) or 0-d) shaped to broadcast against a state ``like``."""
    if batch_axis is None:
        return values
    shape = [1] * like.ndim
    shape[batch_axis] = values.shape[0]
    return xp.reshape(values, tuple(shape))


def _state_at(bk, t, t_stop, batch_axis, solve_again):
    """The state at each sample's ``t_stop``, differentiable in ``y0``, ``t[0]`` and the
    parameters: one solve with output times ``[t[0], the stop times]`` (``_grid``)."""
    xp = bk.xp
    later, rows = _grid(xp, bk.stop_gradient(t), t_stop, bk.int_dtype)
    ys = solve_again(xp.concat([t[:1], later]))
    if batch_axis is None:
        return ys[rows[0]]
    ys = xp.moveaxis(ys, batch_axis + 1, 1)
    picked = ys[rows, xp.arange(rows.shape[0])]
    return xp.moveaxis(picked, 0, batch_axis)


def check_event_vjps(events) -> None:
    """Without autodiff (NumPy) an event's gradient needs the event function's own VJP."""
    for i, e in enumerate(events):
        if getattr(e.fn, "vjp", None) is None:
            name = "event" if len(events) == 1 else f"event[{i}]"
            raise TypeError(
                f"vjp_odeint with {name} needs its VJP: give the event function a method "
                f"vjp(t, y, params, g_bar) -> (t_bar, y_bar, params_bar), the cotangents of "
                f"sum(g_bar * g(t, y, params)) (one value of g per sample)"
            )


def event_pullback(xp, func, params, t, batch_axis, events, record, vjp_again):
    """For a backend without autodiff: ``pullback(t_bar, y_bar) -> (y0_bar, params_leaves_bar,
    t_bar)`` of the event time and state, by the same identities as ``event_gradients``.
    ``vjp_again(times)`` is ``vjp_odeint`` of the problem at other output times."""
    batched = batch_axis is not None
    stopped = record.index >= 0
    t_stop = xp.where(stopped, record.t, t[-1])
    where_stopped = _per_sample(xp, stopped, record.y, batch_axis)
    y_stop = xp.where(where_stopped, record.y, 0.0)
    t_call = xp.astype(t_stop, y_stop.dtype)
    f = differentiate.call(func, t_call, y_stop, params)
    axes = tuple(i for i in range(y_stop.ndim) if not (batched and i == batch_axis))

    def event_vjp(weights):
        """``(g_t, g_y, params_bar)`` of the fired events weighted per sample."""
        g_t, g_y, params_bar = 0.0, xp.zeros_like(y_stop), None
        for i, e in enumerate(events):
            g_bar = xp.where(record.index == i, weights, 0.0)
            e_t, e_y, e_params = e.fn.vjp(t_call, y_stop, params, g_bar)
            g_t, g_y = g_t + e_t, g_y + e_y
            params_bar = add_leaves(params_bar, e_params)
        return g_t, g_y, params_bar

    g_t, g_y, _ = event_vjp(xp.ones_like(t_stop))
    denominator = xp.where(stopped, g_t + xp.sum(g_y * f, axis=axes), 1.0)

    def pullback(t_bar, y_bar):
        t_bar = xp.zeros_like(t_stop) if t_bar is None else xp.asarray(t_bar) + 0 * t_stop
        y_bar = xp.zeros_like(y_stop) if y_bar is None else xp.where(where_stopped, y_bar, 0.0)
        c = xp.where(stopped, t_bar + xp.sum(y_bar * f, axis=axes), 0.0)
        _, g_y_w, params_bar = event_vjp(-c / denominator)
        y_stop_bar = y_bar + g_y_w
        later, rows = _grid(xp, t, t_stop, xp.int64)
        ys, pull = vjp_again(xp.concat([t[:1], later]))
        ys_bar = xp.zeros_like(ys)
        if batched:
            ys_bar = xp.moveaxis(ys_bar, batch_axis + 1, 1)
            ys_bar[rows, xp.arange(rows.shape[0])] = xp.moveaxis(y_stop_bar, batch_axis, 0)
            ys_bar = xp.moveaxis(ys_bar, 1, batch_axis + 1)
        else:
            ys_bar[rows[0]] = y_stop_bar
        y0_bar, params_again, t_again = pull(ys_bar)
        t_grad = xp.zeros_like(t)
        t_grad[0] = t_again[0]
        return y0_bar, add_leaves(params_again, params_bar), t_grad

    return pullback


def _grid(xp, t, t_stop, int_dtype):
    """Output times after ``t[0]`` at which a second solve finds every sample's ``t_stop``
    (0-d, or (B,)), and each sample's row among ``[t[0], *times]``.

    Output times must be strictly monotonic in ``t``'s dtype, where stop times can be equal
    (samples stopped by the same event, or all at the end ``t[-1]``) or round onto ``t[0]``
    (a float32 ``t`` beside float64 event times). Nudging equal times apart does not survive
    the rounding when they lie far from zero, so each distinct time gets one row, shared by
    the samples that stop there; the rows left over take times just past the farthest, a few
    units in its last place apart, whose states are not read."""
    t0 = t[0]
    dtype = t0.dtype
    stops = xp.reshape(xp.astype(t_stop, dtype), (-1,))
    sign = xp.where(t[-1] > t0, 1.0, -1.0)
    sign = xp.astype(sign, dtype)
    order = xp.argsort(stops * sign)
    ranked = xp.take(stops, order)
    previous = xp.concat([xp.reshape(t0, (1,)), ranked[:-1]])
    repeated = ranked * sign <= previous * sign
    row = xp.cumulative_sum(xp.astype(xp.logical_not(repeated), int_dtype))
    spare = xp.cumulative_sum(xp.astype(repeated, int_dtype))
    distinct = row[-1]
    slot = xp.where(repeated, distinct + spare, row)
    # The spare times stay representable and distinct: a gap of four units in the last
    # place of the largest time in the grid outlasts the rounding of each.
    farthest = ranked[-1]
    finfo = xp.finfo(dtype)
    scale = xp.maximum(xp.abs(t0), xp.abs(farthest))
    gap = xp.maximum(4 * float(finfo.eps) * scale, float(finfo.smallest_normal))
    values = xp.where(repeated, farthest + sign * gap * xp.astype(spare, dtype), ranked)
    later = xp.take(values, xp.argsort(slot))
    rank = xp.argsort(order)
    return later, xp.take(row, rank)


def add_leaves(a, b):
    """Leafwise sum of two cotangents shaped like ``params`` (None: nothing yet)."""
    if a is None or b is None:
        return b if a is None else a
    summed = [x + y for (_, x), (_, y) in zip(tree.leaves(a), tree.leaves(b), strict=True)]
    return tree.unflatten_like(a, summed)
