"""The prepared problem: every input checked and converted once, into what the loop reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from odecore import _validate
from odecore._dynamics import Dynamics, explain_call
from odecore._ops import ArrayOps, ScalarOps
from odecore.backend import Backend, differentiate
from odecore.backend.layout import Layout, check_batch_axis
from odecore.backend.layout import layout as make_layout
from odecore.backend.parameters import check_params_tree, refuse_hidden_parameters
from odecore.control.controller import Controller
from odecore.control.controller import from_options as controller_from_options
from odecore.control.norms import error_ratio
from odecore.ode.callbacks import step_callbacks
from odecore.ode.events import DEFAULT_MAX_EVENTS, EventFunctions
from odecore.solvers.explicit_rk import ExplicitRK, prepared
from odecore.solvers.stage_stores import ListStages


@dataclass(frozen=True)
class Problem:
    """Everything the loop needs, checked and converted once. Nothing writes to it after
    :func:`prepare`: the loop returns what it found (``odecore.ode.loop.LoopResult``)."""

    backend: Backend
    # f(t, y) in internal (forward) time and layout, with its first-call checks and its VJP.
    dynamics: Dynamics
    # The same evaluation by its fastest path (Dynamics.fast_path): what the steps call.
    evaluate: Any
    t_user_dtype: Any
    ops: ArrayOps | ScalarOps  # how per-sample control values are held (odecore._ops)
    solver: ExplicitRK
    # error_ratio(err, err2, y, y_new) -> per-sample scaled error norm as control values: the
    # backend's fused kernel for the built-in rms norm, else odecore.control.norms.error_ratio
    error_ratio: Any
    stage_store: Any  # start(solver, y, first, h, hy): a step's stage store (Backend.stage_store)
    # interpolate(ops, dense_coeffs, theta, y, hy, dense_stages) -> y(t + theta h): the
    # backend's fused kernel (Kernels.dense_output), else the solver's own
    interpolate: Any
    y0: Any  # (B, N)
    ts: Any  # (T,) internal output times, increasing, as control values
    ts_array: Any  # the same as an array
    stops: Any  # (M,) times every step must land on, increasing, the last is the end time
    jumps: Any  # (J,) times where f is re-evaluated after landing, or None
    dense_coeffs: Any  # the interpolant's coefficients, (dense stages, degree)
    rtol: Any
    atol: Any
    norm: Any
    controller: Controller | None
    first_step: float | None
    step_size: float | None
    max_num_steps: int
    # The dynamics' step callbacks (odecore.ode.callbacks), or None.
    callbacks: Any
    # Outputs between a fixed-step method's grid points: "cubic" (Hermite on y and f at both
    # ends, the methods' own dense output) or "linear" (options["interp"]).
    interp: str
    min_step: float
    max_step: float
    layout: Layout
    direction: float  # +1 when the user's t increases, -1 when it decreases
    # Under jit: whether the inputs the checks could not look at are valid (a 0-d boolean
    # array); None when they were checked before the solve.
    valid: Any = None
    # The event functions in loop terms (odecore.ode.events.EventFunctions), or None.
    events: Any = None


def check_parameters_are_known(bk, func, params, leaves, t, y0, batch_axis):
    """Refuse arrays that ``backsolve`` and ``checkpoint`` would silently give no gradient:
    inside a ``params`` object they cannot see into, or used by ``func`` without being among
    its parameters."""
    # The probe evaluation needs a valid batch_axis: its errors come first, as in a solve.
    check_batch_axis(tuple(int(n) for n in y0.shape), batch_axis)
    check_params_tree(bk, params, leaves)
    try:
        refuse_hidden_parameters(bk, func, params, leaves, t, y0, batch_axis)
    except TypeError as error:  # this is func's first call
        explain_call(func, params is not None, error)
        raise


def prepare(
    bk,
    func,
    y0,
    t,
    params,
    rtol,
    atol,
    method,
    options,
    batch_axis,
    leaves=None,
    throw=True,
    events=None,
    for_kernel=False,
    user_func=True,
    options_name="options",
):
    """The checked, converted :class:`Problem`, or None for a single output time. A batch
    with samples whose y0 is not finite raises with ``throw``; without, those samples get
    status INVALID_INPUT and the others are solved.

    ``for_kernel``: the problem goes to the backend's whole-solve kernel
    (``Kernels.solve``), which reads the times as arrays and keeps its own stages, so the
    generic loop's stage store and per-step time lists are not built. Every check is made
    all the same.

    ``user_func``: False for odecore's own dynamics (the backsolve's adjoint system), whose
    first call need not be checked for what users' functions get wrong (``Dynamics``).

    ``options_name``: the argument ``options`` came from, which errors name
    (``adjoint_options`` for the backsolve's backward solve)."""
    xp = bk.xp
    rk = prepared(_validate.tableau(method, options))
    opts = _validate.options(bk, options, rk, options_name)
    if events is None:
        _validate.event_options(opts)
    ts_user = _validate.times(bk, t)
    y0_arr = _validate.initial_state(bk, y0, finite=batch_axis is None)
    # A single sample on an eager backend keeps its control values as Python numbers and its
    # state in its own shape (see odecore._ops): the cheapest bookkeeping per step, unless
    # the backend keeps them on its device (Backend.host_control_values). The event phase
    # works on arrays.
    scalar = bk.eager and bk.host_control_values and batch_axis is None and events is None
    layout = make_layout(xp, y0_arr, batch_axis, flat=not scalar)
    rtol = _validate.tolerance(bk, rtol, "rtol", layout)
    atol = _validate.tolerance(bk, atol, "atol", layout)
    norm = _validate.norm(bk, opts.get("norm", "rms"), layout, options_name)
    y0_int = layout.to_internal(xp, y0_arr)
    samples_valid = _sample_validity(bk, y0_int, rtol, atol, layout, throw)
    if ts_user.shape[0] == 1:
        return None
    time_dtype = bk.time_dtype
    ts_in_dtype = ts_user.dtype
    ts_user = xp.astype(ts_user, time_dtype)
    forward = ts_user[1] > ts_user[0]
    if bk.is_traced(forward):
        # Under jit the direction is a run-time value too (see Dynamics.flip).
        sign = xp.astype(xp.where(forward, 1.0, -1.0), time_dtype)
    else:
        sign = 1.0 if bool(forward) else -1.0
    ts = ts_user * sign
    _validate.step_budget(bk, ts, opts, events)
    ops_class = ScalarOps if scalar else ArrayOps
    ops = ops_class(bk, layout.dtype, layout.user_dtype)
    step_size = opts.get("step_size")
    stops = [ts[-1:]]
    for key in ("step_t", "jump_t"):
        if opts.get(key) is not None:
            label = f"{options_name}[{key!r}]"
            stops.append(_validate.stop_times(bk, opts[key], label, ts, sign))
    grid_valid = None
    if opts.get("grid_constructor") is not None:
        # The steps go from grid point to grid point; outputs between them are interpolated.
        grid, grid_valid = _validate.grid(bk, opts["grid_constructor"], func, y0, ts_user, sign)
        stops.append(grid[1:])
    elif not rk.adaptive and step_size is None:
        stops.append(ts[1:])  # a fixed grid without step_size steps between output times
    # A repeated stop is harmless to the loop; a tracing backend cannot drop it (fixed shapes).
    merge = xp.unique_values if bk.eager else xp.sort
    stops = merge(xp.concat(stops)) if len(stops) > 1 else stops[0]
    jumps = (
        _validate.stop_times(bk, opts["jump_t"], f"{options_name}['jump_t']", ts, sign, ends=True)
        if opts.get("jump_t") is not None
        else None
    )

    fn = Dynamics(bk, ops, func, params, layout, sign, leaves, jumps, checked=user_func)

    controller = None
    if rk.adaptive:
        controller = controller_from_options(opts, rk.name, rk.error_exponent_order)
    valid = _combine_validity(samples_valid, _traced_shared_validity(bk, ts, rtol, atol, opts))
    valid = _combine_validity(valid, grid_valid)
    if valid is not None:
        # An invalid sample is not solved: all its outputs are NaN (init_state). Its state
        # is a placeholder that f is still evaluated at, with the batch, before the loop
        # stops it. Where autodiff may go through those evaluations (torch's direct mode),
        # it is a finite stand-in; elsewhere it is NaN, which, unlike zero or inf, passes
        # through f without NumPy's floating-point warnings.
        invalid = xp.logical_not(valid[..., None])
        if bk.has_autodiff:
            y0_int = differentiate.finite_stand_in(xp, invalid, y0_int)
        else:
            y0_int = xp.where(invalid, math.nan, y0_int)
    return Problem(
        backend=bk,
        valid=valid,
        dynamics=fn,
        evaluate=fn.fast_path(),
        error_ratio=_error_ratio_fn(bk, ops, opts, norm, rtol, atol, layout),
        stage_store=None if for_kernel else _stage_store(bk, rk, y0_int),
        interpolate=rk.interpolate
        if bk.kernels.dense_output is None
        else bk.kernels.dense_output(rk),
        t_user_dtype=ts_in_dtype,
        ops=ops,
        solver=rk,
        y0=y0_int,
        ts=ts if for_kernel else ops.times(ts),
        ts_array=ts,
        stops=stops if for_kernel else ops.times(stops),
        jumps=jumps if for_kernel or jumps is None else ops.times(jumps),
        # The kernel interpolates with its own tableau arrays, and a single eager sample sums
        # the interpolant's weights in Python from the tableau (ExplicitRK.interpolate):
        # neither reads an array of them, which costs a short solve microseconds to make.
        dense_coeffs=None if for_kernel or scalar else xp.asarray(rk.dense, dtype=time_dtype),
        rtol=rtol,
        atol=atol,
        norm=norm,
        controller=controller,
        first_step=opts.get("first_step"),
        step_size=step_size,
        max_num_steps=opts.get("max_num_steps", _validate.DEFAULT_MAX_NUM_STEPS),
        interp=opts.get("interp", "cubic"),
        callbacks=step_callbacks(bk, ops, func, layout, fn, rk.adaptive),
        min_step=opts.get("min_step", 0.0),
        max_step=opts.get("max_step", math.inf),
        layout=layout,
        direction=sign,
        events=None
        if events is None
        else EventFunctions(
            bk,
            ops,
            events,
            params,
            layout,
            sign,
            opts.get("event_tol"),
            opts.get("max_events", DEFAULT_MAX_EVENTS),
        ),
    )


def _stage_store(bk, solver, y0):
    """The step's stage store: the backend's kernel where it has one, else the reference."""
    if bk.kernels.stage_store is None:
        return ListStages
    return bk.kernels.stage_store(solver, y0)


def _error_ratio_fn(bk, ops, opts, norm, rtol, atol, layout):
    """The step's scaled error norm: the backend's fused kernel where it has one for the
    built-in rms norm and a single error estimate, the portable composition otherwise."""
    xp = bk.xp
    fused = bk.kernels.rms_error_ratio
    axis = layout.reduce_axis

    def portable(err, err2, y, y_new):
        return error_ratio(xp, ops, norm, err, err2, y, y_new, rtol, atol)

    if fused is None or opts.get("norm", "rms") != "rms":
        return portable

    def ratio(err, err2, y, y_new):
        if err2 is not None:
            return portable(err, err2, y, y_new)
        return ops.from_norm(fused(err, y, y_new, rtol, atol, axis))

    return ratio


def _sample_validity(bk, y0, rtol, atol, lay, throw):
    """Whether each sample's y0 is finite and its per-element tolerances are valid
    (``_validate.tolerance_ok``), as a (B,) boolean array for the loop's initial status; None
    when every sample is known to be valid (the state of a single eager sample, which
    ``_validate`` checked whole).

    Known values are checked now: a batch whose y0 has non-finite samples raises, naming them,
    with ``throw``, and otherwise solves the others. Under jit the flags are traced, and each
    invalid sample starts with status INVALID_INPUT."""
    if not lay.flat:
        return None
    xp = bk.xp
    valid = xp.all(xp.isfinite(y0), axis=1)
    for tol, name in ((rtol, "rtol"), (atol, "atol")):
        if not isinstance(tol, float) and tol.ndim == 2:  # per element, in (B, N) layout
            valid = valid & xp.all(_validate.tolerance_ok(xp, tol, name), axis=1)
    if bk.is_traced(valid):
        return valid
    if bool(xp.all(valid)):
        return None
    if throw or not lay.batched:
        raise ValueError(_invalid_samples_message(bk, valid, lay))
    return valid


def _invalid_samples_message(bk, valid, lay) -> str:
    bad = [int(i) for i in bk.xp.nonzero(bk.xp.logical_not(valid))[0]]
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    return (
        f"y0 contains NaN or infinite values in {len(bad)} of {lay.batch} samples "
        f"(batch_axis={lay.batch_axis}): {shown}; replace or drop them, or pass throw=False "
        f"to solve the other samples, and these get status INVALID_INPUT"
    )


def _traced_shared_validity(bk, ts, rtol, atol, opts):
    """What every sample shares (the times, scalar tolerances, step sizes, step_t and jump_t)
    checked as one 0-d boolean array where the checks in ``_validate`` were traced (jit);
    None where they ran. An invalid shared input makes every sample INVALID_INPUT."""
    if bk.eager:
        return None
    xp = bk.xp
    checks = [xp.all(xp.isfinite(ts)), xp.all(ts[1:] > ts[:-1]), xp.isfinite(ts[-1] - ts[0])]
    for tol, name in ((rtol, "rtol"), (atol, "atol")):
        if not isinstance(tol, float) and tol.ndim == 0:
            checks.append(_validate.tolerance_ok(xp, tol, name))
    for key in ("step_t", "jump_t"):
        if opts.get(key) is not None:
            stops = xp.astype(bk.asarray(opts[key]), bk.time_dtype)
            checks.append(xp.all(xp.isfinite(stops)))
    for key in ("step_size", "first_step", "max_step"):
        if bk.is_traced(opts.get(key)):
            checks.append(opts[key] > 0)
    low, high = opts.get("min_step", 0.0), opts.get("max_step", math.inf)
    if bk.is_traced(low) or bk.is_traced(high):
        checks.append((low >= 0) & (low <= high))
    ok = checks[0]
    for check in checks[1:]:
        ok = ok & check
    return ok if bk.is_traced(ok) else None


def _combine_validity(samples, shared):
    if samples is None or shared is None:
        return shared if samples is None else samples
    return samples & shared
