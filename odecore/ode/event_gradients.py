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

from odecore.backend import differentiate


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
    denominator = g_t + xp.sum(g_y * f, axis=axes)
    numerator = xp.where(stopped, g - sg(g), 0.0)
    denominator = xp.where(stopped, sg(denominator), 1.0)
    t_star = t_stop - xp.astype(numerator / denominator, time_dtype)
    moved = xp.astype(t_star - sg(t_star), y_stop.dtype)
    y_star = y_stop + _per_sample(xp, moved, y_stop, batch_axis) * f
    nan = math.nan
    return record._replace(
        t=xp.where(stopped, t_star, nan),
        y=xp.where(_per_sample(xp, stopped, y_stop, batch_axis), y_star, nan),
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
    parameters: one solve with output times ``[t[0], sorted t_stop]``."""
    xp, sg = bk.xp, bk.stop_gradient
    if batch_axis is None:
        ys = solve_again(xp.stack([t[0], xp.astype(t_stop, t.dtype)]))
        return ys[1]
    sign = xp.where(t[-1] > t[0], 1.0, -1.0)
    sign = xp.astype(sign, t_stop.dtype)
    t0 = xp.astype(sg(t[0]), t_stop.dtype)
    distance = (t_stop - t0) * sign
    order = xp.argsort(distance)
    rank = xp.argsort(order)
    batch = distance.shape[0]
    # Output times must increase strictly: equal event times are spread by a few units in
    # the last place, far below any tolerance.
    eps = float(xp.finfo(t_stop.dtype).eps)
    spread = 1.0 + 4 * eps * xp.astype(xp.arange(1, batch + 1), t_stop.dtype)
    later = t0 + sign * xp.take(distance, order) * spread
    ys = solve_again(xp.concat([t[:1], xp.astype(later, t.dtype)]))
    ys = xp.moveaxis(ys, batch_axis + 1, 1)
    picked = ys[1 + rank, xp.arange(batch)]
    return xp.moveaxis(picked, 0, batch_axis)
