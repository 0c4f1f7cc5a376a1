"""The solve: checks the inputs, then runs one init / cond / body loop for every backend.

The loop state is a dict of fixed-shape arrays. Every sample (a row of the internal (B, N)
state) has its own time, step size, status and counters; updates are masked with ``where``, so
a finished or failed sample stops changing while the others go on. Requested output times are
filled by interpolation after each accepted step and never change the steps taken. The body
has no Python ``if`` on array values, so a tracing backend (JAX) can run it unchanged under
its own ``while_loop``.

Time runs forward inside the loop. A decreasing ``t`` is solved as ``s = -t`` with
``dy/ds = -f(-s, y)``, so nothing else needs to know about direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from odecore import _validate
from odecore._config import resolve_backend
from odecore._dynamics import Dynamics
from odecore._grad import (
    FailedSolvePolicy,
    SolveRule,
    check_params_tree,
    refuse_hidden_parameters,
)
from odecore._ops import ArrayOps, ScalarOps
from odecore._rk import ListStages, RKMethod, prepared
from odecore._solution import Solution, SolveError, Status
from odecore.adjoint import modes
from odecore.backend import Backend, differentiate, tree
from odecore.backend.layout import Layout
from odecore.backend.layout import layout as make_layout
from odecore.control.controller import Controller
from odecore.control.initial_step import initial_step
from odecore.control.norms import error_ratio

# The codes as plain ints: the loop body writes them every step.
RUNNING = int(Status.RUNNING)
SUCCESS = int(Status.SUCCESS)
MAX_STEPS_REACHED = int(Status.MAX_STEPS_REACHED)
DT_UNDERFLOW = int(Status.DT_UNDERFLOW)
NONFINITE_STATE = int(Status.NONFINITE_STATE)
NONFINITE_ERROR = int(Status.NONFINITE_ERROR)


@dataclass
class _Problem:
    """Everything the loop needs, checked and converted once."""

    backend: Backend
    dynamics: Dynamics
    t_user_dtype: Any
    ops: ArrayOps | ScalarOps  # how per-sample control values are held (odecore._ops)
    method: RKMethod
    fn: Any  # the Dynamics: fn(t, y) in internal (forward) time and layout, and its VJP
    rhs: Any  # the same evaluation, by its fastest path (Dynamics.fast_path)
    # error_ratio(err, err2, y, y_new) -> per-sample scaled error norm as control values: the
    # backend's fused kernel for the built-in rms norm, else odecore._control.error_ratio
    error_ratio: Any
    stage_store: Any  # start(method, y, first, h, hy): a step's stage store (Backend.stage_store)
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
    min_step: float
    max_step: float
    layout: Layout
    direction: float  # +1 when the user's t increases, -1 when it decreases
    # Under jit: whether the inputs the checks could not look at are valid (a 0-d boolean
    # array); None when they were checked before the solve.
    valid: Any = None
    # Accepted steps (start time, size, end time, start state, accept mask), recorded for the
    # checkpoint gradient; None when not recording.
    tape: list | None = None
    # After the loop: the step size the controller proposed last, per sample (control
    # values). The backsolve starts its backward solve with it.
    dt_next: Any = None


def solve(
    func,
    y0,
    t,
    *,
    params=None,
    rtol=1e-7,
    atol=1e-9,
    method=None,
    options=None,
    batch_axis=None,
    backend=None,
    throw=True,
    adjoint=None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method=None,
    adjoint_options=None,
    adjoint_params=None,
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` (or ``func(t, y, params)``) and report how it went.

    Arguments are those of :func:`odeint`. Returns a :class:`~odecore.Solution` with the
    outputs ``ys`` at the requested times ``ts``, statistics and a per-sample status. With
    ``throw=True`` (the default) a failed solve raises :class:`~odecore.SolveError` on eager
    backends (a batch's message lists the failed samples, each with its status and the time
    it reached); with ``throw=False`` the failure is reported in ``status`` and the outputs
    the solve did not reach are NaN. Gradients then reach the outputs it did reach as if it
    had stopped there; a nonzero cotangent on an unreached output makes that sample's ``y0``
    gradient, and the parameter and time gradients, NaN.
    """
    adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options = modes.as_keywords(
        adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options
    )
    _validate.call_arguments(func, throw, adjoint_params)
    bk = resolve_backend(backend, {"y0": y0, "t": t, "params": params})
    # Everything the solve allocates lives where y0 does (a CUDA device, say), and so do
    # the times.
    with bk.device_scope(y0):
        if bk.owns(y0):
            t = _validate.as_array(bk, t, "t", _validate.TIMES_NEED, like=y0)
        mode = _validate.adjoint_mode(adjoint, bk)
        # Checked on every call, not only when a gradient is asked for: a bad setting must fail
        # where it is written, not later in training.
        settings = _validate.adjoint_settings(
            bk,
            rtol,
            atol,
            method,
            options,
            adjoint_rtol,
            adjoint_atol,
            adjoint_method,
            adjoint_options,
            mode,
        )
        _validate.warn_unresolvable_rtol(bk, y0, rtol, adjoint_rtol if settings else None)
        arguments = {
            "rtol": rtol,
            "atol": atol,
            "method": method,
            "options": options,
            "batch_axis": batch_axis,
            "adjoint": adjoint,
            "adjoint_rtol": adjoint_rtol,
            "adjoint_atol": adjoint_atol,
            "adjoint_method": adjoint_method,
            "adjoint_options": adjoint_options,
            "adjoint_params": adjoint_params,
        }
        compiled = (
            bk.tracing.compiled_solve(solve, func, y0, t, params, arguments)
            if bk.tracing is not None
            else None
        )
        if compiled is not None:

            def check_inputs():
                _prepare(
                    bk, func, y0, t, params, rtol, atol, method, options, batch_axis, None, throw
                )

            return _raise_compiled_failures(bk, compiled, throw, check_inputs)

        def prepare(y0_, t_, leaves=None):
            # A rule's forward passes its own primals as ``leaves`` (see Backend.with_leaves).
            params_ = params if leaves is None else differentiate.with_leaves(bk, params, leaves)
            leaves = adjoint_params if leaves is None else leaves
            return _prepare(
                bk, func, y0_, t_, params_, rtol, atol, method, options, batch_axis, leaves, throw
            )

        def run(y0_, t_, record=False, leaves=None):
            problem = prepare(y0_, t_, leaves)
            if problem is None:  # a single output time: the answer is y0, with no work done
                return None, _trivial_solution(bk, y0_, t_, method, batch_axis), None
            return _run_loop(problem, record, throw)

        if mode is None or not bk.has_autodiff:
            return run(y0, t)[1]
        leaves = (
            differentiate.param_leaves(bk, func, params)
            if adjoint_params is None
            else list(adjoint_params)
        )
        y0_arr, t_arr = bk.asarray(y0), bk.asarray(t)
        wants_grad = differentiate.requires_grad(
            bk, {"y0": y0_arr, "t": t_arr, "params": params, "p": leaves}
        )
        several_times = t_arr.ndim == 1 and t_arr.shape[0] >= 2
        if mode != "direct" and several_times and not wants_grad:
            solution = run(y0_arr, t_arr)[1]
            # What func uses besides y0, t and the parameters the rules know of would get no
            # gradient from this solve, even where nothing else asks for one.
            if adjoint_params is None:
                _check_parameters_are_known(bk, func, params, leaves, t_arr, y0_arr, batch_axis)
            return solution
        if not wants_grad or not several_times:
            return run(y0_arr, t_arr)[1]
        if mode == "direct":
            solution = _direct_with_time_gradients(bk, run, y0_arr, t_arr)
            # A parameter the dynamics never touch gets a zero gradient rather than None, as in
            # the other modes.
            solution.ys = bk.autodiff.attach_zero_gradients(solution.ys, leaves)
            if not solution.success:
                policy = FailedSolvePolicy(bk, make_layout(bk.xp, y0_arr, batch_axis))
                solution.ys, _ = bk.autodiff.custom_vjp(policy)(solution.ys, y0_arr, t_arr, *leaves)
            return solution
        if adjoint_params is None:
            _check_parameters_are_known(bk, func, params, leaves, t_arr, y0_arr, batch_axis)
        rule = SolveRule(mode, run, settings, prepare)
        ys, report = bk.autodiff.custom_vjp(rule)(y0_arr, t_arr, *leaves)
        solution = Solution(ys=ys, method=_validate.tableau(method).name, **report)
        # A backend that traces the rule's forward (JAX) learns the status only here.
        if throw and not bk.is_traced(solution.status) and not solution.success:
            raise SolveError(_failure_message(solution), solution)
        return solution


def _raise_compiled_failures(bk, solution: Solution, throw: bool, check_inputs) -> Solution:
    """A compiled solve (``Backend.compiled_solve``) reports every failure in its status. Where
    that status is known, an invalid input raises what an eager solve raises for it
    (``check_inputs`` runs those checks on the concrete inputs), and with ``throw`` a failed
    solve raises SolveError."""
    status, xp = solution.status, bk.xp
    if bk.is_traced(status) or bool(xp.all(status == int(Status.SUCCESS))):
        return solution
    if bool(xp.any(status == int(Status.INVALID_INPUT))):
        check_inputs()
    if throw:
        raise SolveError(_failure_message(solution), solution)
    return solution


def _run_loop(problem: _Problem, record: bool, throw: bool):
    """Run the loop over a prepared problem: ``(problem, solution, tape)``, the tape holding
    the accepted steps when ``record`` (for the checkpoint gradient)."""
    bk = problem.backend
    problem.tape = [] if record else None
    state = bk.while_loop(
        lambda s: problem.ops.any(s["status"] == RUNNING),
        lambda s: _body(problem, s),
        _init(problem),
    )
    solution = _finish(problem, state)
    # Under jit the status is not known until run time: it stays in the Solution, and the
    # outputs the solve did not reach are NaN.
    if throw and not bk.is_traced(solution.status) and not solution.success:
        raise SolveError(_failure_message(solution), solution)
    return problem, solution, problem.tape


def _check_parameters_are_known(bk, func, params, leaves, t, y0, batch_axis):
    """Refuse arrays that ``backsolve`` and ``checkpoint`` would silently give no gradient:
    inside a ``params`` object they cannot see into, or used by ``func`` without being among
    its parameters."""
    check_params_tree(bk, params, leaves)
    refuse_hidden_parameters(bk, func, params, leaves, t, y0, batch_axis)


def _direct_with_time_gradients(bk, run, y0, t) -> Solution:
    """``direct`` mode: the framework differentiates through the loop for ``y0`` and the
    parameters. Time gradients come from the flow's identities instead of from the step
    arithmetic (whose step sizes are not differentiable): each output gets
    ``(t_i - stop_gradient(t_i)) * f(t_i, y_i)``, zero in value with gradient ``f``, and the
    start ``y0 - (t_0 - stop_gradient(t_0)) * f(t_0, y0)`` gives ``-a(t_0) . f(t_0, y_0)``."""
    xp = bk.xp
    sg = bk.stop_gradient
    if not differentiate.requires_grad(bk, {"t": t}):
        return run(y0, t)[1]
    t_const = sg(t)
    with bk.no_grad():
        problem, _, _ = run(sg(y0), t_const)
    f0 = sg(_user_f_at(problem, t_const[0], y0))
    shift = xp.astype(t[0] - t_const[0], y0.dtype)
    _, solution, _ = run(y0 - shift * f0, t_const)
    ys = solution.ys
    rates = [sg(_user_f_at(problem, t_const[i], ys[i])) for i in range(1, ys.shape[0])]
    if not solution.success:
        # An output the solve did not reach has no rate: its time gradient is left to
        # FailedSolvePolicy.
        unreached = xp.isnan(sg(ys[1:]))
        rates = [xp.where(unreached[i], xp.zeros_like(r), r) for i, r in enumerate(rates)]
    moved = [
        ys[i] + xp.astype(t[i] - t_const[i], ys.dtype) * rates[i - 1] for i in range(1, ys.shape[0])
    ]
    solution.ys = xp.stack([y0, *moved])
    return solution


def _user_f_at(problem, t_user, y):
    """``f(t, y)`` in the user's terms, for ``t`` an output time (a 0-d array)."""
    dyn = problem.dynamics
    t_ctl = problem.backend.xp.astype(t_user, problem.backend.time_dtype) * dyn.sign
    with problem.backend.no_grad():
        t_ctl = (
            float(t_ctl)
            if problem.ops.scalar
            else problem.ops.full(problem.layout.batch, 0.0) + t_ctl
        )
        lay, xp = problem.layout, problem.backend.xp
        return lay.to_user(xp, dyn(t_ctl, lay.to_internal(xp, y))) * dyn.sign


def odeint(
    func,
    y0,
    t,
    *,
    params=None,
    rtol=1e-7,
    atol=1e-9,
    method=None,
    options=None,
    batch_axis=None,
    backend=None,
    adjoint=None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method=None,
    adjoint_options=None,
    adjoint_params=None,
):
    """Solve an initial value problem and return the state at every time in ``t``.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, or ``func(t, y, params)`` when ``params`` is given, returning
        ``dy/dt`` with the shape and dtype of ``y``. With ``batch_axis``, ``t`` is a vector
        with one time per sample (each sample steps on its own); otherwise a 0-d array.
        ``t`` is passed in the state's dtype.
    y0 : array
        Initial state, any shape, real floating dtype. A float16 or bfloat16 state is
        solved in float32 (the state, the stage sums, the error estimate and the outputs
        buffer), since a 16-bit ``y + h * dy/dt`` rounds back to ``y`` for small steps;
        ``func`` still receives and returns the 16-bit dtype, and the outputs (and
        gradients) come back in it.
    t : 1-D array
        Output times, strictly increasing or strictly decreasing; ``t[0]`` is the initial
        time.
    rtol, atol : float or array
        Relative and absolute tolerances (positive; arrays broadcast against ``y0``). An
        ``rtol`` below the unit roundoff of ``y0``'s dtype (half its machine epsilon:
        5.96e-8 for float32, 4.9e-4 for float16, 3.9e-3 for bfloat16) cannot be met, and
        gets a :class:`~odecore.PrecisionWarning`; so does such an ``adjoint_rtol``.
    method : str
        One of :data:`odecore.METHODS`; ``"dopri5"`` by default.
    options : dict
        ``step_size`` (fixed-step methods), ``first_step``, ``max_num_steps``, ``step_t``
        (times every step must land on), ``jump_t`` (discontinuities of ``func``: landed on,
        and ``func`` is evaluated afresh after them), ``min_step``, ``max_step``, ``norm``
        (``"rms"``, ``"max"`` or a callable), ``safety``, ``ifactor``, ``dfactor``,
        ``controller`` (``"I"`` or ``"PI"``), ``pcoeff``, ``icoeff``, ``shrink_after_accept``
        (``False``: as in torchdiffeq, an accepted step never shrinks the next one, and the
        two libraries take the same steps; ``True``: it may, as in scipy, which rejects fewer
        steps where the error grows along the solution).
    batch_axis : int, optional
        The axis of ``y0`` that indexes independent samples; each sample gets its own steps
        and the result for one sample equals solving it alone.
    backend : str, optional
        Overrides the configured backend for this call.
    adjoint : odecore.Direct(), odecore.Backsolve(...), odecore.Checkpoint(), or their names
    "direct", "backsolve", "checkpoint"; optional
        How the framework's autodiff gets gradients of the result with respect to ``y0``,
        ``t`` and the parameters (``params``, or the parameters of an ``nn.Module`` func).
        ``"direct"`` (the default on frameworks with autodiff) differentiates through the
        solver's operations; ``"backsolve"`` solves the continuous adjoint backward in time,
        in memory independent of the number of steps; ``"checkpoint"`` stores the accepted
        steps and replays each backward for the exact gradient of the discrete solve.
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options
        torchdiffeq's spelling of ``odecore.Backsolve(rtol=..., atol=..., method=...,
        options=...)``: the backsolve's own tolerances, method and options (default: the
        forward ones, with ``shrink_after_accept=True``); ``adjoint_options={"norm":
        "seminorm"}``, or ``Backsolve(seminorm=True)``, leaves the parameter adjoint out of its
        error control.
    adjoint_params : sequence of arrays, optional
        The arrays to compute parameter gradients for, instead of those found in ``params``
        or on an ``nn.Module`` func.

    Returns
    -------
    array of shape ``(len(t), *y0.shape)``.
    """
    return solve(
        func,
        y0,
        t,
        params=params,
        rtol=rtol,
        atol=atol,
        method=method,
        options=options,
        batch_axis=batch_axis,
        backend=backend,
        adjoint=adjoint,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
        adjoint_params=adjoint_params,
    ).ys


def odeint_adjoint(func, y0, t, *, adjoint="backsolve", **kwargs):
    """:func:`odeint` with the continuous adjoint by default, under torchdiffeq's name."""
    return odeint(func, y0, t, adjoint=adjoint, **kwargs)


def vjp_odeint(func, y0, t, params=None, *, adjoint="checkpoint", throw=True, **kwargs):
    """Solve, and return ``(ys, pullback)`` with ``pullback(ys_bar) -> (y0_bar, params_bar,
    t_bar)``: gradients for backends without autodiff (NumPy), from the dynamics' own VJP.

    ``func`` supplies ``vjp(t, y, params, cotangent) -> (cot_y, cot_params)``. ``adjoint``
    is ``"checkpoint"`` (exact for the discrete solve) or ``"backsolve"``; the other keyword
    arguments are those of :func:`odeint`. ``params_bar`` has the structure of ``params``.
    With ``throw=False`` a failed solve returns NaN for the outputs it did not reach instead
    of raising :class:`~odecore.SolveError`; the pullback then gives the reached outputs'
    gradients, and NaN for whatever a nonzero cotangent on an unreached output depends on.
    """
    adjoint_keys = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options")
    adjoint, *adjoint_kwargs = modes.as_keywords(
        adjoint, *(kwargs.pop(k, None) for k in adjoint_keys)
    )
    if adjoint not in ("checkpoint", "backsolve"):
        raise ValueError(
            f"vjp_odeint computes gradients by 'checkpoint' or 'backsolve' (odecore.Checkpoint() "
            f"or odecore.Backsolve(...)), got {adjoint!r}"
        )

    def run(y0_, t_, record=False, leaves=None):
        problem = _prepare(
            bk,
            func,
            y0_,
            t_,
            params,
            kwargs.get("rtol", 1e-7),
            kwargs.get("atol", 1e-9),
            kwargs.get("method"),
            kwargs.get("options"),
            kwargs.get("batch_axis"),
            None,
        )
        if problem is None:
            raise ValueError("vjp_odeint needs at least two output times in t")
        return _run_loop(problem, record, throw=throw)

    unknown = set(kwargs) - {"rtol", "atol", "method", "options", "batch_axis", "backend"}
    if unknown:
        raise TypeError(f"vjp_odeint got unexpected keyword arguments {sorted(unknown)}")
    _validate.call_arguments(func, True, None)
    bk = resolve_backend(kwargs.get("backend"), {"y0": y0, "t": t, "params": params})
    settings = _validate.adjoint_settings(
        bk,
        kwargs.get("rtol", 1e-7),
        kwargs.get("atol", 1e-9),
        kwargs.get("method"),
        kwargs.get("options"),
        *adjoint_kwargs,
        adjoint,
    )
    check_params_tree(
        bk, params, differentiate.param_leaves(bk, func, params), differentiated_only=False
    )
    _validate.warn_unresolvable_rtol(bk, y0, kwargs.get("rtol", 1e-7), adjoint_kwargs[0])
    rule = SolveRule(adjoint, run, settings)
    ys, _, residuals = rule.forward(bk.asarray(y0), bk.asarray(t))

    def pullback(ys_bar):
        ys_bar = bk.asarray(ys_bar)
        if tuple(ys_bar.shape) != tuple(ys.shape):
            raise ValueError(
                f"pullback expects a cotangent shaped like ys {tuple(ys.shape)}, "
                f"got {tuple(ys_bar.shape)}"
            )
        y0_bar, t_bar, *leaves_bar = rule.backward(residuals, ys_bar)
        return y0_bar, tree.unflatten_like(params, leaves_bar), t_bar

    return ys, pullback


# --------------------------------------------------------------------------------------------
# Preparation


def _prepare(
    bk, func, y0, t, params, rtol, atol, method, options, batch_axis, leaves=None, throw=True
):
    """The checked, converted :class:`_Problem`, or None for a single output time. A batch
    with samples whose y0 is not finite raises with ``throw``; without, those samples get
    status INVALID_INPUT and the others are solved."""
    xp = bk.xp
    rk = prepared(_validate.tableau(method))
    opts = _validate.options(options, rk)
    ts_user = _validate.times(bk, t)
    y0_arr = _validate.initial_state(bk, y0, finite=batch_axis is None)
    # A single sample on an eager backend keeps its control values as Python numbers and its
    # state in its own shape (see odecore._ops): the cheapest bookkeeping per step.
    scalar = bk.eager and batch_axis is None
    layout = make_layout(xp, y0_arr, batch_axis, flat=not scalar)
    rtol = _validate.tolerance(bk, rtol, "rtol", layout)
    atol = _validate.tolerance(bk, atol, "atol", layout)
    norm = _validate.norm(bk, opts.get("norm", "rms"), layout)
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
    ops_class = ScalarOps if scalar else ArrayOps
    ops = ops_class(bk, layout.dtype, layout.user_dtype)
    fn = Dynamics(bk, ops, func, params, layout, sign, leaves)

    step_size = opts.get("step_size")
    stops = [ts[-1:]]
    for key in ("step_t", "jump_t"):
        if opts.get(key) is not None:
            stops.append(_validate.stop_times(bk, opts[key], key, ts, sign))
    if not rk.adaptive and step_size is None:
        stops.append(ts[1:])  # a fixed grid without step_size steps between output times
    # A repeated stop is harmless to the loop; a tracing backend cannot drop it (fixed shapes).
    merge = xp.unique_values if bk.eager else xp.sort
    stops = merge(xp.concat(stops)) if len(stops) > 1 else stops[0]
    jumps = (
        _validate.stop_times(bk, opts["jump_t"], "jump_t", ts, sign)
        if opts.get("jump_t") is not None
        else None
    )

    controller = None
    if rk.adaptive:
        icoeff, pcoeff = _validate.controller_gains(opts)
        controller = Controller(
            safety=opts.get("safety", 0.9),
            ifactor=opts.get("ifactor", 10.0),
            dfactor=opts.get("dfactor", 0.2),
            icoeff=icoeff,
            pcoeff=pcoeff,
            k=rk.error_exponent_order,
            shrink_after_accept=opts.get("shrink_after_accept", False),
        )
    valid = _combine_validity(samples_valid, _traced_shared_validity(bk, ts, rtol, atol, opts))
    if valid is not None:
        # An invalid sample is not solved: all its outputs are NaN. NaN, unlike inf, also
        # passes through the first evaluations of f without floating-point warnings.
        y0_int = xp.where(valid[..., None], y0_int, math.nan)
    return _Problem(
        backend=bk,
        valid=valid,
        dynamics=fn,
        rhs=fn.fast_path(),
        error_ratio=_error_ratio_fn(bk, ops, opts, norm, rtol, atol, layout),
        stage_store=_stage_store(bk, rk, y0_int),
        t_user_dtype=ts_in_dtype,
        ops=ops,
        method=rk,
        fn=fn,
        y0=y0_int,
        ts=ops.times(ts),
        ts_array=ts,
        stops=ops.times(stops),
        jumps=None if jumps is None else ops.times(jumps),
        dense_coeffs=xp.asarray(rk.dense, dtype=time_dtype),
        rtol=rtol,
        atol=atol,
        norm=norm,
        controller=controller,
        first_step=opts.get("first_step"),
        step_size=step_size,
        max_num_steps=opts.get("max_num_steps", _validate.DEFAULT_MAX_NUM_STEPS),
        min_step=opts.get("min_step", 0.0),
        max_step=opts.get("max_step", math.inf),
        layout=layout,
        direction=sign,
    )


def _stage_store(bk, method, y0):
    """The step's stage store: the backend's kernel where it has one, else the reference."""
    if bk.kernels.stage_store is None:
        return ListStages
    return bk.kernels.stage_store(method, y0)


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
    """Whether each sample's y0 is finite and its per-element tolerances are positive and
    finite, as a (B,) boolean array for the loop's initial status; None when every sample is
    known to be valid (the state of a single eager sample, which ``_validate`` checked whole).

    Known values are checked now: a batch whose y0 has non-finite samples raises, naming them,
    with ``throw``, and otherwise solves the others. Under jit the flags are traced, and each
    invalid sample starts with status INVALID_INPUT."""
    if not lay.flat:
        return None
    xp = bk.xp
    valid = xp.all(xp.isfinite(y0), axis=1)
    for tol in (rtol, atol):
        if not isinstance(tol, float) and tol.ndim == 2:  # per element, in (B, N) layout
            valid = valid & xp.all(xp.isfinite(tol) & (tol > 0), axis=1)
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
    checks = [xp.all(xp.isfinite(ts)), xp.all(ts[1:] > ts[:-1])]
    for tol in (rtol, atol):
        if not isinstance(tol, float) and tol.ndim == 0:
            checks.append(xp.isfinite(tol) & (tol > 0))
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


# --------------------------------------------------------------------------------------------
# The loop


def _init(p: _Problem) -> dict:
    bk, xp, ops, lay = p.backend, p.backend.xp, p.ops, p.layout
    B, T = lay.batch, p.ts_array.shape[0]
    t0 = ops.full(B, p.ts[0])
    f0 = p.fn.first_call(t0, p.y0)
    nfev = 1
    if p.controller is None:
        dt = ops.full(B, p.step_size if p.step_size is not None else math.inf)
    elif p.first_step is not None:
        dt = ops.full(B, p.first_step)
    else:
        # The exponent is the error estimate's, 1/(q+1): Hairer's HINIT (IORD=5 for DOPRI5),
        # scipy and torchdiffeq all use it; the method's own order p gave 1/(p+1).
        order = p.method.error_exponent_order - 1
        dt = initial_step(xp, ops, p.fn, t0, p.y0, f0, order, p.rtol, p.atol, p.norm)
        nfev += 1
    dt = ops.minimum(ops.maximum(dt, p.min_step), p.max_step)
    finite = ops.all_rows(xp.isfinite(f0))
    out = xp.full((T, *lay.internal_shape), math.nan, dtype=lay.dtype)
    out = bk.write(out, 0, p.y0)
    state = {
        "t": t0,
        "y": p.y0,
        "f": f0,
        "dt": dt,
        "ratio_prev": ops.full(B, 1.0),
        "status": ops.where(
            finite, ops.full(B, RUNNING, "int"), ops.full(B, int(Status.NONFINITE_STATE), "int")
        ),
        "out": out,
        "out_idx": ops.full(B, 1, "int"),
        "nfev": ops.full(1, nfev, "int") if not ops.scalar else nfev,
        "nsteps": ops.full(B, 0, "int"),
        "naccept": ops.full(B, 0, "int"),
        "nreject": ops.full(B, 0, "int"),
    }
    if p.valid is not None:
        state["status"] = ops.where(p.valid, state["status"], int(Status.INVALID_INPUT))
    if p.tape is not None and not bk.eager:
        state["tape"] = _tape_buffers(p)
    return state


def _tape_buffers(p: _Problem) -> dict:
    """The checkpoint tape of a tracing backend, in fixed-size buffers: every step's times and
    accept mask (``max_num_steps`` rows, the most steps a solve can take), and the states of
    only some of them (see ``checkpoint_rows``), with the count of steps recorded and the
    stride between kept states."""
    xp, lay, K = p.backend.xp, p.layout, p.max_num_steps
    time = xp.zeros((K, lay.batch), dtype=p.backend.time_dtype)
    kept, _ = checkpoint_rows(K)
    count = xp.asarray(0, dtype=p.backend.int_dtype)
    return {
        "t": time,
        "h": time,
        "t_new": time,
        "y": xp.zeros((kept, *lay.internal_shape), dtype=lay.dtype),
        "accept": xp.zeros((K, lay.batch), dtype=xp.bool),
        "n": count,
        "stride": count + 1,
    }


def checkpoint_rows(max_num_steps: int) -> tuple[int, int]:
    """(states kept, longest run of steps between two of them) for a tape of
    ``max_num_steps`` steps: both powers of two near its square root, whose product covers
    it. The tape keeps the state of every step until it holds ``kept``, then of every other
    step, every fourth, and so on; the backward pass recomputes the states in between, a
    run at a time, so recording costs ``kept + run`` states instead of one per step (128
    instead of 4096, 768 instead of 100000), and at most one more forward evaluation of
    every step, only for solves longer than ``kept`` steps."""
    kept = min(max_num_steps, 1 << math.ceil(math.log2(math.sqrt(max_num_steps))))
    run = 1 << max(0, math.ceil(math.log2(max_num_steps / kept)))
    return kept, run


def _body(p: _Problem, s: dict) -> dict:
    ops, rk, rules = p.ops, p.method, p.ops.rules
    running = s["status"] == RUNNING
    t, y, f = s["t"], s["y"], s["f"]

    # Every step lands exactly on the next stop (end time, step_t, jump_t, fixed-grid output)
    # rather than overshoot it.
    next_stop = ops.next_stop(p.stops, t)
    h, t_new, lands = rules.land_on_stop(t, s["dt"], next_stop, p.max_step, running)
    hy = ops.to_state(h)

    # A step that ends on a discontinuity sees the left limit there: its stages at c = 1
    # (and f at its end) are evaluated just before the jump, never on the far side of it.
    t_left, rhs = None, p.rhs
    if p.jumps is not None:
        t_left = rules.left_limit(t_new, running & lands & ops.is_member(next_stop, p.jumps))

        def rhs(t_stage, y_stage):
            return p.rhs(ops.minimum(t_stage, t_left), y_stage)

    y_new, ks, err, err2 = rk.step(rhs, t, y, f, h, hy, p.stage_store)
    if p.controller is not None:
        ratio = p.error_ratio(err, err2, y, y_new)
        finite = ops.isfinite(ratio)
        accept = running & (ratio <= 1.0)
        norm_failed = running & _norm_failed(p, ratio, err, err2, y_new)
    else:
        finite = ops.all_rows(p.backend.xp.isfinite(y_new))
        accept = running & finite
    # A step too short to move time (t + h == t, or h == 0) is not taken: it would change y
    # but not t, and every step after it would be the same.
    no_progress = accept & (t_new <= t)
    accept = accept & ops.not_(no_progress)
    f_new = ks[-1] if rk.fsal else p.rhs(t_new if t_left is None else t_left, y_new)
    nfev = s["nfev"] + rk.nfev_per_step

    tape = _record(p, s, t, h, t_new, y, accept) if p.tape is not None else None
    out, out_idx, nfev = _fill_outputs(p, s, accept, t, t_new, h, hy, y, y_new, ks, f_new, nfev)
    if p.jumps is not None:
        # Only now, with the step's outputs interpolated from the left limit, does the next
        # step get the right limit as its first stage.
        f_new, nfev = _reevaluate_after_jump(p, t_new, y_new, f_new, accept, nfev)

    rejected = running & ops.not_(accept)
    if p.controller is not None:
        dt_wanted = p.controller.next_dt(ops, h, ratio, s["ratio_prev"], accept)
        stalled = rules.stalled(rejected, t, dt_wanted, p.min_step, lands) | norm_failed
        dt_next = rules.next_step(h, s["dt"], dt_wanted, accept, lands, p.min_step, p.max_step)
        ratio_prev = rules.remembered_ratio(ratio, s["ratio_prev"], accept)
    else:
        dt_next, ratio_prev = s["dt"], s["ratio_prev"]
        stalled = rejected
        # A fixed-step solve has no error norm to fail.
        norm_failed = rejected & ops.not_(rejected)
    failure = rules.failure_status(finite, norm_failed)
    nsteps = s["nsteps"] + ops.count(running)
    status = rules.status_after_step(
        s["status"],
        accept,
        t_new,
        p.ts[-1],
        stalled | no_progress,
        failure,
        nsteps,
        p.max_num_steps,
    )
    state = {
        "t": ops.where(accept, t_new, t),
        "y": ops.select_rows(accept, y_new, y),
        "f": ops.select_rows(accept, f_new, f),
        "dt": ops.where(running, dt_next, s["dt"]),
        "ratio_prev": ratio_prev,
        "status": status,
        "out": out,
        "out_idx": out_idx,
        "nfev": nfev,
        "nsteps": nsteps,
        "naccept": s["naccept"] + ops.count(accept),
        "nreject": s["nreject"] + ops.count(rejected),
    }
    if tape is not None:
        state["tape"] = tape
    return state


def _norm_failed(p, ratio, err, err2, y_new):
    """Per sample: the error ratio is NaN although the error estimates and the trial state
    are finite. The dynamics are then not to blame but the norm (a user norm returning NaN,
    say), and no smaller step can help. The finiteness of the state is looked at only when
    some ratio is NaN."""
    ops, xp = p.ops, p.backend.xp
    nan = ops.isnan(ratio)

    def estimates_finite(nan, *estimates):
        finite = xp.isfinite(estimates[0])
        for e in estimates[1:]:
            finite = finite & xp.isfinite(e)
        return nan & ops.all_rows(finite)

    estimates = (y_new, err) if err2 is None else (y_new, err, err2)
    # Where no ratio is NaN, ``nan`` is the all-false answer.
    return p.backend.cond(ops.any(nan), estimates_finite, _first, nan, *estimates)


def _first(first, *rest):
    return first


def _record(p, s, t, h, t_new, y, accept):
    """Keep the step for the checkpoint replay. Eager backends append to a Python list; a
    tracing backend writes the next row of the buffers in ``s["tape"]`` and returns them (a
    step that no sample accepted leaves its row to be overwritten)."""
    if p.backend.eager:
        if p.ops.scalar and not accept:
            return None
        p.tape.append((t, h, t_new, y, accept))
        return None
    bk, xp, tape = p.backend, p.backend.xp, dict(s["tape"])
    n = tape["n"]
    for key, value in (("t", t), ("h", h), ("t_new", t_new), ("accept", accept)):
        tape[key] = bk.write(tape[key], n, value)
    # The state of step n is kept when n is a multiple of the stride. When its slot would be
    # past the end, every other kept state is dropped and the stride doubles.
    kept = tape["y"].shape[0]
    full = n == kept * tape["stride"]
    tape["y"], tape["stride"] = bk.cond(
        full,
        lambda ys, stride: (bk.write(ys, slice(0, (kept + 1) // 2), ys[::2]), stride * 2),
        lambda ys, stride: (ys, stride),
        tape["y"],
        tape["stride"],
    )
    slot = n // tape["stride"]
    keep = n % tape["stride"] == 0
    tape["y"] = bk.write(tape["y"], slot, xp.where(keep, y, tape["y"][slot]))
    tape["n"] = n + xp.astype(xp.any(accept), n.dtype)
    return tape


def _reevaluate_after_jump(p, t_new, y_new, f_new, accept, nfev):
    """After landing on a discontinuity, the carried-over f(t_new, y_new) is the left limit;
    the next step needs the right one, evaluated just after the jump."""
    ops = p.ops
    on_jump = accept & ops.is_member(t_new, p.jumps)

    def fresh(f_new, nfev):
        f_after = p.rhs(ops.nextafter_up(t_new), y_new)
        return ops.select_rows(on_jump, f_after, f_new), nfev + 1

    return p.backend.cond(ops.any(on_jump), fresh, lambda f_new, nfev: (f_new, nfev), f_new, nfev)


def _fill_outputs(p, s, accept, t, t_new, h, hy, y, y_new, ks, f_new, nfev):
    """Write every requested output time in (t, t_new] of each accepting sample, by the
    method's interpolant on the step just taken."""
    bk, ops, rk = p.backend, p.ops, p.method
    ts, T = p.ts, p.ts_array.shape[0]

    def pending(out_idx):
        at_time = ops.take(ts, ops.minimum(out_idx, T - 1))
        return accept & (out_idx < T) & (at_time <= t_new), at_time

    def fill(out, out_idx, nfev):
        rows = ops.rows_index(p.layout.batch)
        h_safe = ops.where(h > 0, h, 1.0)

        def write(out, out_idx, nfev, interpolating):
            if interpolating:
                dense = rk.dense_stages(p.rhs, t, y, h, hy, ks, f_new)
                nfev = nfev + rk.nfev_dense_extra

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
                    value = rk.interpolate(ops, p.dense_coeffs, theta, y, hy, dense)
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
    any_pending = ops.any(pending(s["out_idx"])[0])
    return bk.cond(any_pending, fill, _unchanged, s["out"], s["out_idx"], nfev)


def _unchanged(*operands):
    return operands


# --------------------------------------------------------------------------------------------
# Results


def _finish(p: _Problem, s: dict) -> Solution:
    """The loop's state as the user's :class:`Solution`: per-sample values stay arrays for a
    batch and become Python numbers for a single eager solve."""
    lay, ops = p.layout, p.ops
    if "tape" in s:  # a tracing backend's checkpoint buffers, for the rule's residuals
        p.tape = s["tape"]
    p.dt_next = s["dt"]

    def per_sample(value):
        if ops.scalar or lay.batched:
            return value
        value = value[0]
        return int(value) if p.backend.eager else value

    nfev = s["nfev"]
    if not ops.scalar:
        nfev = int(nfev[0]) if p.backend.eager else nfev[0]
    stats = {
        "nfev": nfev,
        "nsteps": per_sample(s["nsteps"]),
        "naccept": per_sample(s["naccept"]),
        "nreject": per_sample(s["nreject"]),
    }
    t_reached = s["t"] if (ops.scalar or lay.batched) else s["t"][0]
    return Solution(
        ts=p.ts_array * p.direction,
        ys=lay.outputs_to_user(p.backend.xp, s["out"]),
        stats=stats,
        status=per_sample(s["status"]),
        t_reached=t_reached * p.direction,
        method=p.method.name,
    )


def _trivial_solution(bk, y0, t, method, batch_axis) -> Solution:
    xp = bk.xp
    y0_arr = _validate.initial_state(bk, y0)
    layout = make_layout(xp, y0_arr, batch_axis)
    zero = 0 if not layout.batched else xp.zeros((layout.batch,), dtype=bk.int_dtype)
    status = int(Status.SUCCESS) if not layout.batched else zero
    stats = {"nfev": 0, "nsteps": zero, "naccept": zero, "nreject": zero}
    return Solution(
        ts=t,
        ys=y0_arr[None, ...],
        stats=stats,
        status=status,
        t_reached=None,
        method=method or "dopri5",
    )


def _failure_message(sol: Solution) -> str:
    """Where and why the solve failed. A batch lists its failed samples (the first
    ``_LISTED_FAILURES``), each with its status and the time it reached."""
    status, t_reached, stats = sol.status, sol.t_reached, sol.stats
    try:
        failed = [i for i, s in enumerate(status) if int(s) != int(Status.SUCCESS)]
    except TypeError:
        failed = None
    if failed is None:
        where = f"at t={float(t_reached):.17g}"
        counts = (
            f"nfev={stats['nfev']}, steps={stats['nsteps']} "
            f"(accepted {stats['naccept']}, rejected {stats['nreject']})"
        )
        codes = {int(status)}
    else:
        listed = ", ".join(
            f"sample {i} ({Status(int(status[i])).name} at t={float(t_reached[i]):.9g})"
            for i in failed[:_LISTED_FAILURES]
        )
        unlisted = len(failed) - _LISTED_FAILURES
        more = f" and {unlisted} more" if unlisted > 0 else ""
        where = f"for {len(failed)} of {len(status)} samples; {listed}{more}"
        i = failed[0]
        counts = (
            f"nfev={stats['nfev']}, sample {i}: steps={int(stats['nsteps'][i])} "
            f"(accepted {int(stats['naccept'][i])}, rejected {int(stats['nreject'][i])})"
        )
        codes = {int(status[i]) for i in failed}
    if len(codes) == 1:
        why = Status(codes.pop()).describe()
    else:
        why = "; ".join(f"{Status(c).name}: {Status(c).describe()}" for c in sorted(codes))
    return f"odecore: the {sol.method} solve failed {where}: {why}. Statistics: {counts}."


_LISTED_FAILURES = 10
