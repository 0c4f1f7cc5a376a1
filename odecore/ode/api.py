"""The public solve API: ``solve``, ``odeint``, ``odeint_adjoint`` and ``vjp_odeint``.

They check the arguments, choose the gradient mode and hand the prepared problem to the loop,
directly (``direct`` mode, or no gradients) or through the solve's rule
(``odecore.adjoint.solve_rule``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Literal

from odecore import _validate
from odecore._config import resolve_backend
from odecore._ops import ArrayOps
from odecore.adjoint import modes
from odecore.adjoint.failed import FailedSolvePolicy
from odecore.adjoint.scipy_solver import METHOD as SCIPY_METHOD
from odecore.adjoint.scipy_solver import scipy_solve
from odecore.adjoint.solve_rule import SolveRule
from odecore.backend import differentiate, tree
from odecore.backend.host import host_array
from odecore.backend.layout import layout as make_layout
from odecore.backend.parameters import check_params_tree
from odecore.backend.structured import StructuredFunc, is_structured, unwrap
from odecore.ode import progress as progress_reports
from odecore.ode.callbacks import dynamics_name
from odecore.ode.event_gradients import (
    add_leaves,
    check_event_vjps,
    event_gradients,
    event_pullback,
)
from odecore.ode.events import (
    DEFAULT_MAX_EVENTS,
    Event,
    EventFunctions,
    as_events,
    events_at_start,
    explain_event_call,
    init_events,
    structured_events,
)
from odecore.ode.events import record as event_record
from odecore.ode.flat_call import flat_call
from odecore.ode.loop import LoopResult, run_loop, solve_prepared, trivial_solution
from odecore.ode.problem import check_parameters_are_known, prepare
from odecore.ode.solution import Solution, SolveError, Status, failure_message

#: What ``adjoint=`` takes: a gradient mode, or its name.
AdjointMode = (
    modes.Direct | modes.Backsolve | modes.Checkpoint | Literal["direct", "backsolve", "checkpoint"]
)


def solve(
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    *,
    params: Any = None,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
    batch_axis: int | None = None,
    backend: str | None = None,
    throw: bool = True,
    adjoint: AdjointMode | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_method: str | None = None,
    adjoint_options: Mapping[str, Any] | None = None,
    adjoint_params: Sequence[Any] | None = None,
    event: Any = None,
    progress: Any = None,
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` (or ``func(t, y, params)``) and report how it went.

    The arguments are those of [`odeint`][odecore.odeint], plus ``throw``. Returns a
    [`Solution`][odecore.Solution] with the outputs ``ys`` at the requested times ``ts``,
    statistics and a per-sample status. With ``throw=True`` (the default) a failed solve raises
    [`SolveError`][odecore.SolveError] on eager backends (a batch's message lists the failed
    samples, each with its status and the time it reached); with ``throw=False`` the failure is
    reported in ``status`` and the outputs the solve did not reach are NaN. Gradients then reach
    the outputs it did reach as if it had stopped there; a nonzero cotangent on an unreached
    output makes that sample's ``y0`` gradient, and the parameter and time gradients, NaN. For a
    structured ``y0`` (a tuple, list or dict of arrays), ``ys`` has its structure, each part with
    a leading time axis.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, or ``func(t, y, params)`` when ``params`` is given, returning ``dy/dt``
        shaped like ``y`` (see [`odeint`][odecore.odeint]).
    y0 : array or pytree of arrays
        Initial state, real floating dtype; a structured state (a tuple, list, dict or
        NamedTuple of arrays) is passed to ``func`` in its structure.
    t : 1-D array
        Output times, strictly increasing or strictly decreasing; ``t[0]`` is the initial time.
    params : pytree of arrays, optional
        Passed to ``func`` as its third argument; gradients reach its arrays.
    rtol, atol : float or array, default 1e-7 and 1e-9
        Relative and absolute tolerances of the adaptive methods.
    method : str, optional
        One of [`METHODS`][odecore.METHODS] (``"dopri5"`` by default), or ``"scipy_solver"``.
    options : dict, optional
        Solver options (``step_size``, ``max_num_steps``, ``step_t``, ``jump_t``, the
        controller's settings, ...), listed under [`odeint`][odecore.odeint]; with ``event``,
        also ``event_tol`` and ``max_events``.
    batch_axis : int, optional
        The axis of ``y0`` that indexes independent samples, each with its own steps and
        status.
    backend : str, optional
        Overrides the configured backend for this call (see
        [`set_backend`][odecore.set_backend]).
    throw : bool, default True
        Raise [`SolveError`][odecore.SolveError] when the solve fails; with False, report the
        failure in ``Solution.status`` and return NaN for the unreached outputs.
    adjoint : Direct, Backsolve, Checkpoint or {"direct", "backsolve", "checkpoint"}, optional
        How gradients are computed (see [`odeint`][odecore.odeint] and the gradient modes).
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options : optional
        torchdiffeq's spelling of ``Backsolve(rtol=..., atol=..., method=..., options=...)``:
        the settings of the backsolve's backward solve.
    adjoint_params : sequence of arrays, optional
        The arrays to compute parameter gradients for, instead of those found in ``params`` or
        on an ``nn.Module`` func.
    event : callable, Event, or a list of them, optional
        A function ``g(t, y)`` (``g(t, y, params)`` with ``params``), an
        [`Event`][odecore.Event], or a list of them. A plain function is a terminal event in
        either direction. Each sample stops at its first terminal event (status ``EVENT``, a
        success; its outputs after the event are NaN); every crossing is recorded.
        ``Solution.events`` (an [`EventRecord`][odecore.EventRecord]) says which terminal event
        stopped each sample, when and in which state; the event time and state are
        differentiable in every gradient mode (by the implicit function theorem). Options:
        ``event_tol`` (the root's tolerance in time; default a few units in the last place of
        the time) and ``max_events`` (how many crossings are kept, 64 by default).
    progress : bool, tqdm bar or ProgressTarget, optional
        ``True`` shows the time reached and the steps taken while the solve runs (a tqdm
        bar, or without tqdm a line on stderr every few seconds); a tqdm bar, or an object
        with ``update(t, accepted, rejected, note)`` and ``close()``
        (``odecore.ode.progress.ProgressTarget``), is told them instead. On the numba
        backend the compiled solve publishes them from a thread of its own, and Ctrl-C
        stops it. See the progress page of the documentation.

    Returns
    -------
    Solution
        ``ys`` (shaped as [`odeint`][odecore.odeint] returns it), ``ts``, ``stats``,
        ``status`` (one [`Status`][odecore.Status] code, or one per sample with
        ``batch_axis``), ``t_reached``, ``method`` and, with ``event``, ``events``.

    Raises
    ------
    TypeError
        An argument has the wrong type (a ``func`` or event function that is not callable, a
        ``y0`` that is not of a real floating dtype, an array of another library than the
        configured backend's).
    ValueError
        An argument has a wrong value (an ``atol`` or step size that is not positive and
        finite, an ``rtol`` that is negative or not finite, an unknown method, option or
        ``adjoint`` mode, ``t`` not strictly monotonic, a ``y0`` that is not finite with
        ``throw=True``, an empty ``event`` list).
    SolveError
        With ``throw=True``, on an eager backend, the solve failed: ``max_num_steps`` reached,
        step-size underflow, or a non-finite state. Its ``solution`` holds the partial result.
    BackendNotAvailableError
        The backend asked for is not installed, or its device is missing.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> sol = odecore.solve(lambda t, y: -y, np.array([1.0]), np.linspace(0.0, 1.0, 3))
    >>> odecore.Status(int(sol.status)).name, sol.method, sol.success
    ('SUCCESS', 'dopri5', True)
    >>> bool(np.allclose(sol.ys[:, 0], np.exp(-sol.ts), rtol=1e-6))
    True

    A failure with ``throw=False`` is reported in ``status``:

    >>> sol = odecore.solve(lambda t, y: -y, np.array([1.0]), np.linspace(0.0, 1.0, 3),
    ...                     options={"max_num_steps": 2}, throw=False)
    >>> odecore.Status(int(sol.status)).name, bool(np.isnan(sol.ys[-1, 0]))
    ('MAX_STEPS_REACHED', True)

    A terminal event stops the solve where ``g`` crosses zero:

    >>> def ball(t, y):
    ...     return np.array([y[1], -9.81])
    >>> ground = odecore.Event(lambda t, y: y[0], direction=-1)
    >>> sol = odecore.solve(ball, np.array([1.0, 0.0]), np.linspace(0.0, 1.0, 5), event=ground)
    >>> odecore.Status(int(sol.status)).name, round(float(sol.events.t), 6)
    ('EVENT', 0.451524)
    """
    progress_reports.check(progress)
    events = as_events(event)
    keywords = {
        "params": params,
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "options": options,
        "batch_axis": batch_axis,
        "backend": backend,
        "throw": throw,
        "adjoint": adjoint,
        "adjoint_rtol": adjoint_rtol,
        "adjoint_atol": adjoint_atol,
        "adjoint_method": adjoint_method,
        "adjoint_options": adjoint_options,
        "adjoint_params": adjoint_params,
        "event": events,
        "progress": progress,
    }
    if isinstance(method, str) and method == SCIPY_METHOD:
        if progress not in (None, False):
            raise ValueError(
                "progress= is not available with method='scipy_solver', which hands the "
                "whole solve to scipy; use an odecore method to watch the progress"
            )
        keywords.pop("progress")
        return scipy_solve(func, y0, t, keywords)
    solution = _solve_any_state(func, y0, t, keywords)
    if solution.events is not None:
        bk = resolve_backend(backend, {"y0": y0, "t": t, "params": params})
        _validate.warn_if_events_dropped(bk, solution.events)
    return solution


def _solve_any_state(func, y0, t, keywords) -> Solution:
    if not is_structured(y0):
        return _solve_array(func, y0, t, **keywords)
    bk = resolve_backend(keywords["backend"], {"y0": y0, "t": t, "params": keywords["params"]})
    compiled = _compiled_structured(bk, func, y0, t, keywords)
    if compiled is not None:
        return compiled
    flat = flat_call(bk, func, y0, keywords)
    flat.keywords["event"] = structured_events(keywords["event"], flat.structure)
    solution = _solve_array(flat.func, flat.y0, t, **flat.keywords)
    solution.ys = flat.structure.unflatten(solution.ys, lead=1)
    if solution.events is not None:
        solution.events = solution.events._replace(y=flat.structure.unflatten(solution.events.y))
    return solution


def _compiled_structured(bk, func, y0, t, keywords):
    """A structured solve through its backend's compiled solves (``Backend.compiled_solve``),
    filed under the user's ``func``: the compiled program flattens and unflattens the
    state itself. None where the backend compiles nothing for this call."""
    if bk.tracing is None:
        return None
    arguments = {k: v for k, v in keywords.items() if k not in ("params", "backend", "throw")}
    with progress_reports.compiled_reporting(keywords["progress"], arguments):
        compiled = bk.tracing.compiled_solve(solve, func, y0, t, keywords["params"], arguments)
    if compiled is None:
        return None

    def check_inputs():
        flat = flat_call(bk, func, y0, keywords)
        k = flat.keywords
        problem = prepare(
            bk,
            flat.func,
            flat.y0,
            t,
            k["params"],
            k["rtol"],
            k["atol"],
            k["method"],
            k["options"],
            k["batch_axis"],
            None,
            k["throw"],
            structured_events(k["event"], flat.structure),
        )
        _check_events_at_start(problem, k["throw"])

    return _raise_compiled_failures(
        bk, compiled, keywords["throw"], check_inputs, keywords["method"], keywords["options"]
    )


def _with_events_at_start(bk, solution, events, params, y0, t, batch_axis, options, throw):
    """The solution of a single output time with its ``EventRecord``: no step was taken, so
    no crossing was seen. The event functions are checked at ``t0`` as a solve checks them
    (what they return, whether it is finite); a sample where one is not finite gets status
    INVALID_INPUT where a solve gives it that (a batch with ``throw=False``, or under jit)."""
    xp = bk.xp
    y0_arr = bk.asarray(y0)
    layout = make_layout(xp, y0_arr, batch_axis)
    ops = ArrayOps(bk, layout.dtype, layout.user_dtype)
    opts = options or {}
    functions = EventFunctions(
        bk, ops, events, params, layout, 1.0, None, opts.get("max_events", DEFAULT_MAX_EVENTS)
    )
    start = SimpleNamespace(backend=bk, events=functions, layout=layout, direction=1.0)
    y0_int = layout.to_internal(xp, y0_arr)
    t0 = ops.full(layout.batch, xp.astype(bk.asarray(t)[0], bk.time_dtype))
    g0, valid = events_at_start(start, t0, y0_int, throw)
    solution.events = event_record(start, init_events(start, t0, y0_int, g0))
    if valid is not None:  # a batch solved with throw=False, or a traced check
        valid = valid if layout.batched else valid[0]
        solution.status = xp.where(valid, solution.status, int(Status.INVALID_INPUT))
    return solution


def _check_events_at_start(problem, throw) -> None:
    """The check of the event values at ``t0`` that the loop makes (``events_at_start``), on
    the concrete inputs of a compiled solve that reported INVALID_INPUT."""
    if problem is None or problem.events is None:
        return
    t0 = problem.ops.full(problem.layout.batch, problem.ts[0])
    events_at_start(problem, t0, problem.y0, throw)


def _solve_array(func, y0, t, **keywords) -> Solution:
    """:func:`solve` of a state that is one array, on the backend its inputs resolve to, run
    by that backend (``Backend.outside_compiler``): a graph compiler tracing the caller
    leaves the solve to run as it is written."""
    bk = resolve_backend(keywords["backend"], {"y0": y0, "t": t, "params": keywords["params"]})
    return bk.outside_compiler(_solve_resolved, func, y0, t, **{**keywords, "backend": bk})


def _solve_resolved(
    func,
    y0,
    t,
    *,
    params,
    rtol,
    atol,
    method,
    options,
    batch_axis,
    backend,
    throw,
    adjoint,
    adjoint_rtol,
    adjoint_atol,
    adjoint_method,
    adjoint_options,
    adjoint_params,
    event=None,
    progress=None,
) -> Solution:
    """:func:`solve` of a state that is one array (a structured state arrives flattened,
    with ``func`` a ``StructuredFunc``), on ``backend``: the Backend its inputs resolved to
    (``_solve_array``, or a compiled solve tracing this function again)."""
    adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options = modes.as_keywords(
        adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options
    )
    _validate.call_arguments(func, throw, adjoint_params)
    if adjoint_params is not None:
        # Once: a generator (module.parameters()) is read by the checks and again for the
        # rule's leaves.
        adjoint_params = differentiate.distinct(adjoint_params)
    bk = backend
    # Before y0's device becomes the one every array is made on.
    _validate.holding_values(bk, y0, "y0")
    # Everything the solve allocates lives where y0 does (a CUDA device, say), and so do
    # the times.
    with bk.device_scope(y0):
        if bk.owns(y0):
            t = _validate.time_array(bk, t, "t", _validate.TIMES_NEED, like=y0)
        mode = _validate.adjoint_mode(adjoint, bk)
        _validate.adjoint_params(bk, adjoint_params)
        _validate.undifferentiated_settings(
            bk,
            {
                "rtol": rtol,
                "atol": atol,
                "adjoint_rtol": adjoint_rtol,
                "adjoint_atol": adjoint_atol,
                "options": options if isinstance(options, dict) else None,
                "adjoint_options": adjoint_options if isinstance(adjoint_options, dict) else None,
            },
        )
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
        if settings is not None and isinstance(func, StructuredFunc):
            # The backsolve's error control then applies to each part of y and of its adjoint.
            settings["state_parts"] = func.structure.sizes
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
            "event": event,
        }
        with progress_reports.compiled_reporting(progress, arguments) as reporting:
            compiled = (
                bk.tracing.compiled_solve(_solve_resolved, func, y0, t, params, arguments)
                if bk.tracing is not None
                else None
            )

        def prepared_problem(y0_, t_, leaves=None, for_kernel=False):
            # A rule's forward passes its own primals as ``leaves`` (see Backend.with_leaves).
            params_ = params if leaves is None else differentiate.with_leaves(bk, params, leaves)
            leaves = adjoint_params if leaves is None else leaves
            return prepare(
                bk,
                func,
                y0_,
                t_,
                params_,
                rtol,
                atol,
                method,
                options,
                batch_axis,
                leaves,
                throw,
                event,
                for_kernel,
            )

        if compiled is not None:
            # A compiled solve has no adjoint_params (the cache refuses them), so the inputs
            # are checked as the eager solve prepares them.
            return _raise_compiled_failures(
                bk,
                compiled,
                throw,
                lambda: _check_events_at_start(prepared_problem(y0, t), throw),
                method,
                options,
            )

        def run(y0_, t_, record=False, leaves=None):
            compiled_backend = bk.kernels.solve is not None and not record
            # A recorded solve (a gradient's forward) and one with events run the generic loop
            # (solve_prepared): it keeps the tape and has the event phase.
            for_kernel = compiled_backend and event is None
            problem = prepared_problem(y0_, t_, leaves, for_kernel)
            if problem is None:  # a single output time: the answer is y0, with no work done
                solution = trivial_solution(bk, y0_, t_, method, batch_axis)
                if event is not None:
                    solution = _with_events_at_start(
                        bk, solution, event, params, y0_, t_, batch_axis, options, throw
                    )
                if reporting is not None:
                    progress_reports.report_no_steps(bk, t_[0], reporting)
                return None, LoopResult(solution, None, None)
            if compiled_backend:
                _check_compiled_solve_supports(bk, problem)
            return problem, solve_prepared(problem, options, record, throw, reporting)

        if mode is None or not bk.has_autodiff:
            return run(y0, t)[1].solution
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
            # Nothing this mode differentiates requires grad, so nothing is recorded. Where
            # adjoint_params lists none of the tensors func uses that require grad (or is
            # empty), autograd recorded the loop and gave those tensors the gradient of
            # direct mode, which adjoint_params was to withhold.
            with bk.no_grad():
                solution = run(y0_arr, t_arr)[1].solution
            # What func uses besides y0, t and the parameters the rules know of would get no
            # gradient from this solve, even where nothing else asks for one.
            if adjoint_params is None:
                check_parameters_are_known(bk, func, params, leaves, t_arr, y0_arr, batch_axis)
            return solution
        if not wants_grad or not several_times:
            return run(y0_arr, t_arr)[1].solution

        def differentiable_events(solution):
            """The solution with its event times and states differentiable (``event``)."""
            if event is None:
                return solution

            def solve_again(t_again):
                return _solve_array(
                    func,
                    y0_arr,
                    t_again,
                    **{**keywords_again, "throw": False},
                ).ys

            from_loop = mode == "direct"
            solution.events = event_gradients(
                bk, func, params, t_arr, batch_axis, event, solution.events, solve_again, from_loop
            )
            return solution

        keywords_again = {
            "params": params,
            "rtol": rtol,
            "atol": atol,
            "method": method,
            # The solve again is one without events.
            "options": _validate.without_event_options(options),
            "batch_axis": batch_axis,
            "backend": backend,
            "adjoint": adjoint,
            "adjoint_rtol": adjoint_rtol,
            "adjoint_atol": adjoint_atol,
            "adjoint_method": adjoint_method,
            "adjoint_options": adjoint_options,
            "adjoint_params": adjoint_params,
        }
        if mode == "direct":
            solution = _direct_with_time_gradients(bk, run, prepared_problem, y0_arr, t_arr)
            solution = differentiable_events(solution)
            # A parameter the dynamics never touch gets a zero gradient rather than None, as in
            # the other modes.
            solution.ys = bk.autodiff.attach_zero_gradients(solution.ys, leaves)
            if not solution.success:
                policy = FailedSolvePolicy(bk, make_layout(bk.xp, y0_arr, batch_axis))
                solution.ys, _ = bk.autodiff.custom_vjp(policy)(solution.ys, y0_arr, t_arr, *leaves)
            return solution
        if adjoint_params is None:
            check_parameters_are_known(bk, func, params, leaves, t_arr, y0_arr, batch_axis)
        rule = SolveRule(mode, run, settings, prepared_problem)
        ys, report = bk.autodiff.custom_vjp(rule)(y0_arr, t_arr, *leaves)
        solved_by = _validate.tableau(method, options)
        solution = Solution(ys=ys, method=solved_by.name, **report)
        # A backend that traces the rule's forward (JAX) learns the status only here.
        if throw and not bk.is_traced(solution.status) and not solution.success:
            raise SolveError(failure_message(solution, solved_by.adaptive), solution)
        return differentiable_events(solution)


def _check_compiled_solve_supports(bk, problem) -> None:
    """Refuse, or warn about, what a whole-solve kernel (``Backend.kernels.solve``) does not
    do: it interpolates outputs by the method's own interpolant and calls no Python
    callbacks."""
    if problem.interp == "linear":
        raise ValueError(
            f"options['interp']='linear' is not available on the {bk.name!r} backend, whose "
            f"compiled solve interpolates outputs by the cubic Hermite interpolant; use "
            f"interp='cubic' (the default), or the numpy backend"
        )
    if problem.callbacks is not None:
        name = dynamics_name(unwrap(problem.dynamics.user_func))
        warnings.warn(
            f"the step callbacks of {name} are not called on the {bk.name!r} backend, whose "
            f"solve is compiled; use the numpy backend to have them called",
            UserWarning,
            stacklevel=4,
        )


def _raise_compiled_failures(
    bk, solution: Solution, throw: bool, check_inputs, method, options
) -> Solution:
    """A compiled solve (``Backend.compiled_solve``) reports every failure in its status. Where
    that status is known, an invalid input raises what an eager solve raises for it
    (``check_inputs`` runs those checks on the concrete inputs; a solve that ran out of
    steps is checked too), and with ``throw`` a failed
    solve raises SolveError, whose remedies depend on whether ``method`` with ``options``
    stepped adaptively."""
    status, xp = solution.status, bk.xp
    if bk.is_traced(status) or bool(
        xp.all((status == int(Status.SUCCESS)) | (status == int(Status.EVENT)))
    ):
        return solution
    # The compiled solve traces the times and the step sizes, so an options['max_step']
    # too small for max_num_steps (_validate.step_budget) shows as the steps running out.
    checked = (int(Status.INVALID_INPUT), int(Status.MAX_STEPS_REACHED))
    if bool(xp.any((status == checked[0]) | (status == checked[1]))):
        check_inputs()
    if throw:
        adaptive = _validate.tableau(method, options).adaptive
        raise SolveError(failure_message(solution, adaptive), solution)
    return solution


def _direct_with_time_gradients(bk, run, prepared_problem, y0, t) -> Solution:
    """``direct`` mode: the framework differentiates through the loop for ``y0`` and the
    parameters. Time gradients come from the flow instead of from the step arithmetic
    (whose step sizes are not differentiable). With ``d_i = t_i - stop_gradient(t_i)``, zero
    in value, each output becomes ``y_i`` moved along the flow by ``d_i``, and the solve
    starts from ``y0`` moved back by ``d_0``. The move is one midpoint step: its first and
    second derivatives in ``d`` are the flow's, so a gradient is ``f(t_i, y_i)``, and second
    derivatives (``d/dt_i`` of ``f``, mixed with ``y0`` or the parameters) hold as well."""
    xp = bk.xp
    sg = bk.stop_gradient
    if not differentiate.requires_grad(bk, {"t": t}):
        return run(y0, t)[1].solution
    t_const = sg(t)
    with bk.no_grad():
        problem = prepared_problem(sg(y0), t_const)
    f = problem.dynamics.at_user_time
    invalid = ~xp.isfinite(sg(y0))
    if bk.is_traced(invalid) or bool(xp.any(invalid)):
        # A sample refused for its non-finite y0 (throw=False) moves by nothing.
        y0_finite = differentiate.finite_stand_in(xp, invalid, y0)
        step = _flow_increment(xp, f, t[0], y0_finite, t_const[0] - t[0])
        start = xp.where(invalid, 0.0, step)
    else:
        start = _flow_increment(xp, f, t[0], y0, t_const[0] - t[0])
    solution = run(y0 + start, t_const)[1].solution
    ys = solution.ys
    moved = []
    for i in range(1, ys.shape[0]):
        y = ys[i]
        unreached = None if solution.success else xp.isnan(sg(y))
        if unreached is not None:
            # An output the solve did not reach has no rate: its time gradient is left to
            # FailedSolvePolicy.
            y = differentiate.finite_stand_in(xp, unreached, y)
        step = _flow_increment(xp, f, t_const[i], y, t[i] - t_const[i])
        if unreached is not None:
            step = xp.where(unreached, xp.zeros_like(step), step)
        moved.append(ys[i] + step)
    solution.ys = xp.stack([y0, *moved])
    return solution


def _flow_increment(xp, f, t, y, h):
    """How far the flow moves ``y`` from time ``t`` in time ``h``, by the midpoint rule: exact
    in value at ``h = 0``, and in its first and second derivatives with respect to ``h``
    (the method's order is 2), which is what time gradients and their derivatives read."""
    h_state = xp.astype(h, y.dtype)
    k1 = f(t, y)
    k2 = f(t + h / 2, y + (h_state / 2) * k1)
    return h_state * k2


def odeint(
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    *,
    params: Any = None,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
    batch_axis: int | None = None,
    backend: str | None = None,
    adjoint: AdjointMode | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_method: str | None = None,
    adjoint_options: Mapping[str, Any] | None = None,
    adjoint_params: Sequence[Any] | None = None,
    event: Any = None,
    progress: Any = None,
    event_fn: Callable[..., Any] | None = None,
) -> Any:
    """Solve an initial value problem and return the state at every time in ``t``.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, or ``func(t, y, params)`` when ``params`` is given, returning
        ``dy/dt`` with the shape and dtype of ``y``. As in torchdiffeq, a ``func`` with a
        ``perturb`` keyword is told which side of a ``jump_t`` it is evaluated on
        ([`Perturb`][odecore.Perturb]), and its methods ``callback_step(t0, y0, dt)``,
        ``callback_accept_step`` and ``callback_reject_step`` (and their ``_adjoint``
        counterparts, in the backsolve's backward solve, with ``y0 = (y, a, a_params)``) are
        called around every step of an eager solve of one sample; a batched or traced (JAX)
        solve does not call them, and warns (``odecore.ode.callbacks``). With
        ``batch_axis``, ``t`` is a vector with one time per sample (each sample steps on
        its own); otherwise a 0-d array (on NumPy a NumPy scalar, ``np.float64`` say,
        which has the 0-d array's ``shape``, ``dtype`` and array-API namespace). ``t`` is
        passed in the state's dtype.
    y0 : array or pytree of arrays
        Initial state, any shape, real floating dtype: an array, or a tuple, list, dict or
        NamedTuple of arrays (nested as deep as needed); on JAX also any registered pytree
        type (``jax.tree_util.register_pytree_node``, ``register_dataclass``), whose type the
        outputs keep. A float16 or bfloat16 state is
        solved in float32 (the state, the stage sums, the error estimate and the outputs
        buffer), since a 16-bit ``y + h * dy/dt`` rounds back to ``y`` for small steps;
        ``func`` still receives and returns the 16-bit dtype, and the outputs (and
        gradients) come back in it. A structured state (``(x, v)``, as in torchdiffeq, or
        any pytree of arrays) is passed to ``func`` in its structure, and ``func`` returns
        the same structure, each part in its part's shape and dtype. The solver integrates
        the parts together in the dtype they promote to (a float32 part beside a float64
        one is integrated in float64, and rounded to float32 for ``func`` and the outputs);
        the outputs, and gradients, come back part by part in each part's own dtype. The
        error norm is the largest RMS of any part (torchdiffeq's, for a tuple), and ``rtol``
        / ``atol`` may be structured like ``y0`` (one value per part). With
        ``batch_axis``, every part has its samples along that axis.
    t : 1-D array
        Output times, strictly increasing or strictly decreasing; ``t[0]`` is the initial
        time.
    params : pytree of arrays, optional
        Passed to ``func`` as its third argument; gradients reach its arrays (torch tensors
        that require grad, JAX arrays under ``jax.grad``). Any nesting of tuples, lists and
        dicts.
    rtol, atol : float or array, default 1e-7 and 1e-9
        Relative and absolute tolerances (arrays broadcast against ``y0``): ``atol``
        positive, ``rtol`` non-negative (``rtol=0`` measures the error against ``atol``
        alone); both finite. An ``rtol`` below the unit roundoff of ``y0``'s dtype (half its
        machine epsilon: 5.96e-8 for float32, 4.9e-4 for float16, 3.9e-3 for bfloat16)
        cannot be met, and gets a [`PrecisionWarning`][odecore.PrecisionWarning]; so does
        such an ``adjoint_rtol``.
    method : str, optional
        One of [`odecore.METHODS`][odecore.METHODS]; ``"dopri5"`` by default.
        ``"scipy_solver"`` hands the solve to ``scipy.integrate.solve_ivp`` on the CPU
        (NumPy and torch, one sample, outputs on the input's device and dtype), with
        ``options`` ``solver`` (``"RK45"``, ``"RK23"``, ``"DOP853"``, ``"Radau"``, ``"BDF"``,
        ``"LSODA"``, the default), ``min_step`` and ``max_step``; its gradients come from
        ``adjoint="backsolve"``, whose backward solve scipy runs too.
    options : dict, optional
        ``step_size`` (fixed-step methods), ``grid_constructor`` (fixed-step methods:
        ``grid_constructor(func, y0, t) -> grid``, the times to step between, from ``t[0]``
        to ``t[-1]``, as in torchdiffeq; not with ``step_size``), ``interp`` (fixed-step
        methods: outputs between grid points by ``"cubic"`` Hermite interpolation on ``y``
        and ``f`` at both ends, the default, or ``"linear"``, torchdiffeq's default),
        ``first_step``, ``max_num_steps``, ``step_t``
        (times every step must land on), ``jump_t`` (discontinuities of ``func``: landed on,
        and ``func`` is evaluated afresh after them; a ``func`` with a ``perturb`` keyword
        is told the side, [`Perturb`][odecore.Perturb]), ``min_step``, ``max_step``, ``norm``
        (``"rms"``, ``"max"`` or a callable, which receives the scaled error in the structure
        of ``y0``), ``safety``, ``ifactor``, ``dfactor``,
        ``controller``: ``"I"``, the default, torchdiffeq's I controller (safety 0.9, the
        factor in [0.2, 10], ``err**(-1/k)`` with ``k`` the error estimate's order plus one),
        so that both libraries take the same steps; ``"PI"``, Gustafsson's PI controller
        (``icoeff = 0.3, pcoeff = 0.4``: ``err**(-0.7/k) * err_prev**(0.4/k)`` after an
        accepted step); ``"hairer"``, the rules of Hairer's DOPRI5 (for ``dopri8``: DOP853,
        which scipy's ``solve_ivp`` also follows), factor in [0.2, 10] with ``beta = 0.04``
        (DOP853: [0.333, 6], ``beta = 0``), ``shrink_after_accept`` and
        ``no_growth_after_reject``. ``safety``, ``ifactor``, ``dfactor``, ``pcoeff``,
        ``icoeff``, ``shrink_after_accept`` (``False``: as in torchdiffeq, an accepted step
        never shrinks the next one; ``True``: it may, as in scipy, which rejects fewer steps
        where the error grows along the solution) and ``no_growth_after_reject`` (``True``:
        the step accepted right after a rejection may not let the next one grow) override
        the named controller's settings. With ``event``, also ``event_tol`` and
        ``max_events``, as in [`solve`][odecore.solve].
    batch_axis : int, optional
        The axis of ``y0`` that indexes independent samples; each sample gets its own steps
        and the result for one sample equals solving it alone.
    backend : str, optional
        Overrides the configured backend for this call.
    adjoint : Direct, Backsolve, Checkpoint or {"direct", "backsolve", "checkpoint"}, optional
        A gradient mode: [`Direct()`][odecore.Direct], [`Backsolve(...)`][odecore.Backsolve],
        [`Checkpoint()`][odecore.Checkpoint], or their names. How the framework's autodiff
        gets gradients of the result with respect to ``y0``, ``t`` and the parameters
        (``params``, or the parameters of an ``nn.Module`` func).
        ``"direct"`` (the default on frameworks with autodiff) differentiates through the
        solver's operations; ``"backsolve"`` solves the continuous adjoint backward in time,
        in memory independent of the number of steps; ``"checkpoint"`` stores the accepted
        steps and replays each backward for the exact gradient of the discrete solve.
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options : optional
        torchdiffeq's spelling of ``odecore.Backsolve(rtol=..., atol=..., method=...,
        options=...)``: the backsolve's own tolerances, method and options (default: the
        forward ones, with ``shrink_after_accept=True``); ``adjoint_options={"norm":
        "seminorm"}``, or ``Backsolve(seminorm=True)``, leaves the parameter adjoint out of its
        error control; a callable ``norm`` there receives the backward state's scaled error
        as torchdiffeq passes it, the tuple ``(t, *y, *adj_y, *adj_params)`` (``y`` and
        ``adj_y`` one array, or the parts of a structured state; ``t`` a zero, since time
        gradients are not integrated).
    adjoint_params : sequence of arrays, optional
        The arrays to compute parameter gradients for, instead of those found in ``params``
        or on an ``nn.Module`` func.
    event : callable, Event, or a list of them, optional
        Event functions, as in [`solve`][odecore.solve]: a sample stops at its first
        terminal event, and its outputs after it are NaN. [`solve`][odecore.solve] also
        reports when and where.
    progress : bool, tqdm bar or ProgressTarget, optional
        Shows the time reached and the steps taken while the solve runs, as in
        [`solve`][odecore.solve].
    event_fn : callable, optional
        torchdiffeq's event mode: ``t`` is ``[t0, t1]``, only its direction counts, and the
        solve runs from ``t0`` until ``event_fn(t, y)`` crosses zero; returns ``(event_t,
        states)`` as [`odeint_event`][odecore.odeint_event] does, which it calls.

    Returns
    -------
    ys : array or pytree of arrays
        The states at the times ``t``, shape ``(len(t), *y0.shape)``; for a structured ``y0``,
        its structure with each part of shape ``(len(t), *part.shape)``. Arrays of ``y0``'s
        library, dtype and device. With ``event_fn``: ``(event_t, states)``.

    Raises
    ------
    TypeError
        An argument has the wrong type: ``func`` or an event function is not callable,
        ``y0`` is not of a real floating dtype, ``backend`` is not a name, or an array of
        another library is passed to a configured backend.
    ValueError
        An argument has a wrong value: an ``atol`` or step size that is not positive and
        finite, an ``rtol`` that is negative or not finite, an unknown ``method``, option or
        ``adjoint`` mode, ``t`` not strictly monotonic, a ``y0`` that is not finite, or
        ``adjoint_*`` settings with a mode that takes none.
    SolveError
        The solve failed (``max_num_steps`` reached, step-size underflow, a non-finite state)
        on an eager backend; the message says where and why.
    BackendNotAvailableError
        The backend asked for is not installed, or its device is missing.

    See Also
    --------
    solve : the same solve, returning a [`Solution`][odecore.Solution] with statistics.

    Examples
    --------
    Exponential decay, against its closed form:

    >>> import numpy as np
    >>> import odecore
    >>> t = np.linspace(0.0, 1.0, 5)
    >>> ys = odecore.odeint(lambda t, y: -0.5 * y, np.array([1.0, 2.0]), t, rtol=1e-10, atol=1e-12)
    >>> ys.shape
    (5, 2)
    >>> bool(np.allclose(ys[-1], np.exp(-0.5) * np.array([1.0, 2.0]), rtol=1e-8))
    True
    """
    keywords = {
        "params": params,
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "options": options,
        "batch_axis": batch_axis,
        "backend": backend,
        "adjoint": adjoint,
        "adjoint_rtol": adjoint_rtol,
        "adjoint_atol": adjoint_atol,
        "adjoint_method": adjoint_method,
        "adjoint_options": adjoint_options,
        "adjoint_params": adjoint_params,
        "progress": progress,
    }
    if event_fn is not None:
        return _odeint_until_event(func, y0, t, event_fn, event, keywords)
    return solve(func, y0, t, event=event, **keywords).ys


def _odeint_until_event(func, y0, t, event_fn, event, keywords):
    """torchdiffeq's ``odeint(..., event_fn=...)``: ``t = [t0, t1]`` gives the start and the
    direction, and the solve runs until the event (:func:`odeint_event`)."""
    if event is not None:
        raise ValueError(
            "odeint got both event= and event_fn=; event_fn (torchdiffeq's) solves until its "
            "event and returns (event_t, states), event= records events on the way to t[-1]: "
            "pass one"
        )
    bk = resolve_backend(keywords["backend"], {"y0": y0, "t": t, "params": keywords["params"]})
    t_arr = bk.asarray(t) if not bk.owns(t) else t
    if t_arr.ndim != 1 or t_arr.shape[0] != 2:
        raise ValueError(
            f"with event_fn, t must be [t0, t1] (two times: the start, and a time that gives "
            f"the direction), as torchdiffeq requires; got shape {tuple(t_arr.shape)}"
        )
    backward = t_arr[1] < t_arr[0]
    if bk.is_traced(backward):
        raise ValueError(
            "with event_fn, odeint reads the direction off t, which is traced here; call "
            "odecore.odeint_event(func, y0, t0, event_fn=..., reverse_time=...) instead"
        )
    return odeint_event(
        func, y0, t_arr[0], event_fn=event_fn, reverse_time=bool(backward), **keywords
    )


def odeint_event(
    func: Callable[..., Any],
    y0: Any,
    t0: Any,
    *,
    event_fn: Callable[..., Any],
    reverse_time: bool = False,
    odeint_interface: Callable[..., Any] = odeint,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero, as torchdiffeq's ``odeint_event``.

    There is no end time: the solve goes on (forward, or backward with ``reverse_time``) until
    the event, or fails with [`SolveError`][odecore.SolveError] at ``max_num_steps``.
    ``event_t`` and the final state are differentiable in every gradient mode, by the implicit
    function theorem. Unlike torchdiffeq, ``batch_axis`` gives each sample its own event time.

    Parameters
    ----------
    func : callable
        The dynamics, as for [`odeint`][odecore.odeint].
    y0 : array or pytree of arrays
        The state at ``t0``.
    t0 : float or 0-d array
        The initial time.
    event_fn : callable
        ``event_fn(t, y)`` (``event_fn(t, y, params)`` with ``params``), returning one value,
        or several (an event when any of them crosses zero; ``event_fn`` is then called once
        per value). A value that is zero at ``t0`` counts once it has left zero and comes
        back.
    reverse_time : bool, default False
        Solve backward in time from ``t0``.
    odeint_interface : callable, default odeint
        [`odeint`][odecore.odeint] (gradients by ``adjoint``, ``"direct"`` by default) or
        [`odeint_adjoint`][odecore.odeint_adjoint] (``"backsolve"``).
    **kwargs
        The other keyword arguments of [`solve`][odecore.solve] (``rtol``, ``atol``,
        ``method``, ``options``, ``params``, ``batch_axis``, ``adjoint``, ...).

    Returns
    -------
    event_t : array
        The time of the event (one per sample with ``batch_axis``).
    solution : array or pytree of arrays
        The states at ``[t0, event_t]``, stacked along a new first axis (a structured ``y0``:
        each part stacked alike).

    Raises
    ------
    TypeError
        ``event_fn`` is not callable, ``t0`` is not a real number, ``reverse_time`` is not a
        bool, or an argument of the solve has the wrong type.
    ValueError
        ``odeint_interface`` is neither [`odeint`][odecore.odeint] nor
        [`odeint_adjoint`][odecore.odeint_adjoint], ``t0`` holds more than one time or is not
        finite, or an argument of the solve has a wrong value.
    SolveError
        No event before ``options["max_num_steps"]`` steps, no event at all (the steps grew
        until the solve reached the square root of the dtype's largest value; with
        ``batch_axis``, for any sample), or the solve failed otherwise. Under JAX's ``jit``
        the outcome is not known until run time: a missing event's time and state are NaN
        there.

    Examples
    --------
    A ball dropped from a height of 1 hits the ground at ``sqrt(2 / 9.81)``:

    >>> import numpy as np
    >>> import odecore
    >>> def ball(t, y):
    ...     return np.array([y[1], -9.81])
    >>> event_t, ys = odecore.odeint_event(ball, np.array([1.0, 0.0]), 0.0,
    ...                                    event_fn=lambda t, y: y[0])
    >>> round(float(event_t), 6), round(float(np.sqrt(2 / 9.81)), 6)
    (0.451524, 0.451524)
    >>> ys.shape
    (2, 2)
    """
    if odeint_interface is odeint_adjoint:
        kwargs.setdefault("adjoint", "backsolve")
    elif odeint_interface is not odeint:
        raise ValueError(
            "odeint_interface must be odecore.odeint or odecore.odeint_adjoint; pass "
            "adjoint=... to choose another gradient mode"
        )
    if not callable(event_fn):
        raise TypeError(f"event_fn must be a callable g(t, y), got {type(event_fn).__name__}")
    if not isinstance(reverse_time, bool):
        raise TypeError(f"reverse_time must be True or False, got {reverse_time!r}")
    bk = resolve_backend(kwargs.get("backend"), {"y0": y0, "t0": t0, "params": None})
    xp = bk.xp
    # The horizon is read from y0's dtype, so y0 is checked first; its values are checked by
    # the solve, sample by sample with batch_axis.
    if is_structured(y0):
        path, first = next(tree.leaves(y0, "y0"), ("y0", None))
        like = _validate.initial_state(bk, first, finite=False, name=path, empty=True)
    else:
        like = _validate.initial_state(bk, y0, finite=False)
    t0 = _validate.initial_time(bk, t0, like.dtype)
    # No end time: one far enough that only the event, or max_num_steps, ends the solve.
    # Not near the largest float: steps grow toward the horizon when the event lies behind
    # the solution, and the controller's h * factor would overflow (a RuntimeWarning on NumPy)
    # before the solve reached it. From the square root, no factor below it overflows.
    horizon = math.sqrt(float(xp.finfo(t0.dtype).max))
    far = bk.stop_gradient(t0) + (-horizon if reverse_time else horizon)
    t = xp.stack([t0, xp.astype(far, t0.dtype)])
    event = _combined_event(bk, event_fn, t0, y0, kwargs)
    try:
        solution = solve(func, y0, t, event=event, **kwargs)
    except SolveError as error:
        # A decaying solution keeps an explicit method's steps bounded by its stability:
        # without an event the solve ends at max_num_steps, not at the horizon.
        if error.solution is None or not _stopped_at_max_steps(error.solution):
            raise
        raise SolveError(
            f"{error} odeint_event: no event had been found. {_NO_EVENT_HINT}", error.solution
        ) from None
    record = solution.events
    _check_event_found(bk, record, solution)
    event_t = xp.astype(record.t, t0.dtype)

    def stacked(start, at_event):
        return xp.stack([start, xp.astype(at_event, start.dtype)])

    if is_structured(y0):
        leaves = [leaf for _, leaf in tree.leaves(y0, "y0")]
        at_event = [leaf for _, leaf in tree.leaves(record.y, "y")]
        node_values = [stacked(a, b) for a, b in zip(leaves, at_event, strict=True)]
        return event_t, tree.unflatten_like(y0, node_values)
    return event_t, stacked(bk.asarray(y0), record.y)


def _check_event_found(bk, record, solution):
    """Refuse a solve that ended without its event. The horizon is finite, and a solve
    whose steps grow without bound (``dy/dt = 1``: the event ``y = 0`` lies behind it)
    reaches it in a few hundred steps, successfully, with NaN for the event's time and
    state. Under ``jit`` the index is not known until run time, and they stay NaN."""
    if bk.is_traced(record.index):
        return
    xp = bk.xp
    # Reduced on the backend and read as one number: under grad outside jit the index is
    # known but carries a (zero) tangent, and cannot become a NumPy array.
    missing = xp.reshape(bk.stop_gradient(record.index) < 0, (-1,))
    count = int(bk.to_host_float(xp.sum(xp.astype(missing, xp.int64))))
    if count == 0:
        return
    reached = xp.reshape(bk.stop_gradient(solution.t_reached), (-1,))
    if record.index.ndim == 0:
        where = f"before the solve reached t={bk.to_host_float(reached[0]):.6g}"
    else:
        first = [int(bk.to_host_float(i)) for i in xp.nonzero(missing)[0][:5]]
        listed = ", ".join(f"{i} (t={bk.to_host_float(reached[i]):.6g})" for i in first)
        more = f" and {count - len(first)} more" if count > len(first) else ""
        where = f"for {count} of {missing.shape[0]} samples: {listed}{more}"
    raise SolveError(
        f"odeint_event: event_fn never crossed zero {where} (its sign compared at the ends "
        f"of the steps), so there is no event time to return. {_NO_EVENT_HINT}",
        solution,
    )


_NO_EVENT_HINT = (
    "Check event_fn's sign at t0 (a value that is 0 there counts once it has left zero and "
    "comes back) and that the dynamics lead to its zero (reverse_time=True solves "
    "backward), or solve to an end time with odecore.solve(..., event=odecore.Event(event_fn)). "
    "A crossing and its return within one step are not seen: where the method integrates the "
    "solution exactly (a polynomial of low degree) its steps grow without bound; bound them "
    "with options['max_step']."
)


def _stopped_at_max_steps(solution) -> bool:
    return bool((host_array(solution.status) == int(Status.MAX_STEPS_REACHED)).any())


def _combined_event(bk, event_fn, t0, y0, kwargs):
    """torchdiffeq's event: several values count as one event when any of them crosses zero.
    Each value is a terminal event of the solve, the first crossing ending it, so that each
    is watched as a single value is: one that is zero at ``t0`` from where it leaves zero.
    No single function of them all can do that: a value at zero has no sign at ``t0`` to
    compare with."""
    params = kwargs.get("params")
    with bk.no_grad():
        try:
            first = event_fn(t0, y0) if params is None else event_fn(t0, y0, params)
        except TypeError as error:
            explain_event_call(event_fn, "event_fn", params is not None, error)
            raise
    first = bk.asarray(first)
    batched = kwargs.get("batch_axis") is not None
    if first.ndim == (1 if batched else 0):
        return Event(event_fn, terminal=True, direction=0)
    count = math.prod(first.shape[1:] if batched else first.shape)
    if count == 0:
        raise ValueError(
            f"event_fn returned no values (shape {tuple(first.shape)}); return one value, or "
            f"several, whose crossing of zero ends the solve"
        )

    def value(i):
        def g(t, y, *params):
            values = event_fn(t, y, *params)
            rows = bk.xp.reshape(values, (values.shape[0], -1) if batched else (-1,))
            return rows[..., i]

        return g

    return [Event(value(i), terminal=True, direction=0) for i in range(count)]


def odeint_adjoint(
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    *,
    adjoint: modes.Backsolve | str = "backsolve",
    **kwargs: Any,
) -> Any:
    """[`odeint`][odecore.odeint] with the continuous adjoint by default, under torchdiffeq's name.

    Parameters
    ----------
    func : callable
        The dynamics, as for [`odeint`][odecore.odeint].
    y0 : array or pytree of arrays
        Initial state.
    t : 1-D array
        Output times; ``t[0]`` is the initial time.
    adjoint : Backsolve or str, default "backsolve"
        The gradient mode; torchdiffeq's ``adjoint_rtol``, ``adjoint_atol``,
        ``adjoint_method``, ``adjoint_options`` and ``adjoint_params`` configure it.
    **kwargs
        The other keyword arguments of [`odeint`][odecore.odeint].

    Returns
    -------
    ys : array or pytree of arrays
        The states at the times ``t``, as [`odeint`][odecore.odeint] returns them.

    Raises
    ------
    TypeError, ValueError, SolveError
        As [`odeint`][odecore.odeint] raises them.

    Examples
    --------
    The gradient of ``y(1) = y0 exp(a)`` with respect to ``a`` is ``y0 exp(a)``:

    >>> import torch
    >>> import odecore
    >>> a = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    >>> ys = odecore.odeint_adjoint(lambda t, y, a: a * y, torch.tensor([2.0], dtype=torch.float64),
    ...                             torch.tensor([0.0, 1.0], dtype=torch.float64), params=a,
    ...                             rtol=1e-10, atol=1e-12)
    >>> ys[-1, 0].backward()
    >>> round(a.grad.item(), 6), round(2.0 * torch.exp(torch.tensor(-0.5)).item(), 6)
    (1.213061, 1.213061)
    """
    return odeint(func, y0, t, adjoint=adjoint, **kwargs)


def vjp_odeint(
    func: Callable[..., Any],
    y0: Any,
    t: Any,
    params: Any = None,
    *,
    adjoint: AdjointMode = "checkpoint",
    throw: bool = True,
    event: Any = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Solve, and return ``(ys, pullback)``: gradients for backends without autodiff (NumPy).

    ``pullback(ys_bar) -> (y0_bar, params_bar, t_bar)`` gives the gradients of
    ``sum(ys_bar * ys)``, from the dynamics' own VJP. ``params_bar`` has the structure of
    ``params``. With ``throw=False`` a failed solve returns NaN for the outputs it did not reach
    instead of raising [`SolveError`][odecore.SolveError]; the pullback then gives the reached
    outputs' gradients, and NaN for whatever a nonzero cotangent on an unreached output depends
    on.

    A structured ``y0`` (a tuple, list or dict of arrays) gives ``ys`` in its structure (each
    part with a leading time axis); ``vjp`` then receives ``y`` and the cotangent in that
    structure and returns ``cot_y`` in it, and ``pullback`` takes ``ys_bar`` and returns
    ``y0_bar`` in it.

    Parameters
    ----------
    func : callable
        ``func(t, y, params)`` (or ``func(t, y)``) with a method ``vjp(t, y, params,
        cotangent) -> (cot_y, cot_params)``, the cotangents of ``sum(cotangent * func(t, y,
        params))``.
    y0 : array or pytree of arrays
        Initial state.
    t : 1-D array
        Output times, at least two; ``t[0]`` is the initial time.
    params : pytree of arrays, optional
        The parameters ``func`` and its ``vjp`` receive.
    adjoint : {"checkpoint", "backsolve"}, Checkpoint or Backsolve, default "checkpoint"
        ``"checkpoint"``: the exact gradient of the discrete solve; ``"backsolve"``: the
        continuous adjoint.
    throw : bool, default True
        Raise [`SolveError`][odecore.SolveError] when the solve fails.
    event : callable, Event, or a list of them, optional
        Events as in [`solve`][odecore.solve]; each event function brings ``vjp(t, y, params,
        g_bar) -> (t_bar, y_bar, params_bar)``, the cotangents of ``sum(g_bar * g)``.
        Structured states take no events here yet.
    **kwargs
        ``rtol``, ``atol``, ``method``, ``options``, ``batch_axis``, ``backend``, and the
        backsolve's ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method`` and
        ``adjoint_options``, as for [`odeint`][odecore.odeint]; ``progress`` reports the
        forward solve, as in [`solve`][odecore.solve].

    Returns
    -------
    ys : array or pytree of arrays
        The states at the times ``t``.
    events : EventRecord
        Only with ``event``: the [`EventRecord`][odecore.EventRecord] of the solve.
    pullback : callable
        ``pullback(ys_bar) -> (y0_bar, params_bar, t_bar)``; with ``event``,
        ``pullback(ys_bar, event_t_bar=None, event_y_bar=None)``, which also takes cotangents
        of the event times and states.

    Raises
    ------
    TypeError
        An unknown keyword argument, or an argument of the wrong type.
    ValueError
        ``adjoint`` is not ``"checkpoint"`` or ``"backsolve"``, ``t`` has fewer than two
        times, ``func`` (or an event function) has no ``vjp``, a structured ``y0`` comes with
        ``event``, or an argument has a wrong value. ``pullback`` raises it for a cotangent not
        shaped like ``ys``.
    SolveError
        With ``throw=True``, the solve failed.

    Examples
    --------
    ``dy/dt = a y`` has ``y(1) = y0 exp(a)``, whose gradients are ``exp(a)`` for ``y0`` and
    ``y0 exp(a)`` for ``a``:

    >>> import numpy as np
    >>> import odecore
    >>> class Decay:
    ...     def __call__(self, t, y, a):
    ...         return a * y
    ...     def vjp(self, t, y, a, cotangent):
    ...         return a * cotangent, np.sum(cotangent * y)
    >>> a, y0 = np.array(-0.5), np.array([2.0])
    >>> ys, pullback = odecore.vjp_odeint(Decay(), y0, np.array([0.0, 1.0]), a,
    ...                                   rtol=1e-10, atol=1e-12)
    >>> y0_bar, a_bar, t_bar = pullback(np.array([[0.0], [1.0]]))
    >>> bool(np.isclose(y0_bar[0], np.exp(-0.5))), bool(np.isclose(a_bar, 2.0 * np.exp(-0.5)))
    (True, True)
    """
    if not is_structured(y0):
        return _vjp_odeint_array(
            func, y0, t, params, adjoint=adjoint, throw=throw, event=event, **kwargs
        )
    if event is not None:
        raise ValueError(
            "vjp_odeint takes events only for a y0 that is one array; concatenate the parts "
            "of a structured y0 (and split them in func and the event function)"
        )
    _check_vjp_keywords(kwargs)
    bk = resolve_backend(kwargs.get("backend"), {"y0": y0, "t": t, "params": params})
    defaults = {"rtol": 1e-7, "atol": 1e-9, "method": None, "options": None, "batch_axis": None}
    keywords = {**defaults, **kwargs}
    flat = flat_call(bk, func, y0, keywords)
    ys, pullback = _vjp_odeint_array(
        flat.func, flat.y0, t, params, adjoint=adjoint, throw=throw, **flat.keywords
    )
    structure = flat.structure
    flat_ys = ys

    def structured_pullback(ys_bar):
        ys_bar = structure.flatten_returned(
            bk,
            ys_bar,
            "pullback got",
            "ys_bar",
            lead_shape=(flat_ys.shape[0],),
            exact_dtype=False,
        )
        y0_bar, params_bar, t_bar = pullback(ys_bar)
        return structure.unflatten(y0_bar), params_bar, t_bar

    return structure.unflatten(ys, lead=1), structured_pullback


def _check_vjp_keywords(kwargs) -> None:
    known = {"rtol", "atol", "method", "options", "batch_axis", "backend", "progress"}
    known |= {"adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options"}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"vjp_odeint got unexpected keyword arguments {sorted(unknown)}")


def _vjp_odeint_array(
    func, y0, t, params=None, *, adjoint="checkpoint", throw=True, event=None, **kwargs
):
    """:func:`vjp_odeint` of a state that is one array."""
    events = as_events(event)
    reporting = progress_reports.reporter(kwargs.pop("progress", None))
    given = {"adjoint": adjoint, **kwargs}
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
        problem = prepare(
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
            throw,
            events,
        )
        if problem is None:
            raise ValueError("vjp_odeint needs at least two output times in t")
        # A compiling backend solves forward in one call where it can compile the dynamics
        # (and for the checkpoint, their vjp), and the backsolve's backward intervals too
        # (Kernels.adjoint_dynamics); the generic loop serves any other dynamics with a vjp.
        options = kwargs.get("options")
        compiles = bk.kernels.compiles
        if compiles is not None and compiles(problem, options, record):
            return problem, solve_prepared(problem, options, record, throw, reporting)
        return problem, run_loop(problem, record, throw=throw, progress=reporting)

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
    if events is not None:
        check_event_vjps(events)
    rule = SolveRule(adjoint, run, settings)
    ys, report, residuals = rule.forward(bk.asarray(y0), bk.asarray(t))

    def pullback(ys_bar):
        ys_bar = _validate.as_array(bk, ys_bar, "ys_bar", "an array shaped like ys")
        if not _validate.is_real(bk.xp, ys_bar.dtype):
            # Converted, a complex cotangent lost its imaginary part, with a warning per
            # evaluation, and gave gradients of the wrong kind.
            raise TypeError(
                f"pullback expects a real cotangent, the gradient with respect to ys "
                f"({ys.dtype}); got dtype {ys_bar.dtype}"
            )
        if tuple(ys_bar.shape) != tuple(ys.shape):
            raise ValueError(
                f"pullback expects a cotangent shaped like ys {tuple(ys.shape)}, "
                f"got {tuple(ys_bar.shape)}"
            )
        y0_bar, t_bar, *leaves_bar = rule.backward(residuals, ys_bar)
        return y0_bar, tree.unflatten_like(params, leaves_bar), t_bar

    if events is None:
        return ys, pullback

    def vjp_again(times):
        # A solve to the event times, without the events.
        again = {**given, "options": _validate.without_event_options(given.get("options"))}
        return _vjp_odeint_array(func, y0, times, params, throw=False, **again)

    t_arr = bk.asarray(t)
    record = report["events"]
    _validate.warn_if_events_dropped(bk, record)
    events_pullback = event_pullback(
        bk.xp, func, params, t_arr, kwargs.get("batch_axis"), events, record, vjp_again
    )

    def pullback_with_events(ys_bar, event_t_bar=None, event_y_bar=None):
        y0_bar, params_bar, t_bar = pullback(ys_bar)
        if event_t_bar is None and event_y_bar is None:
            return y0_bar, params_bar, t_bar
        y0_more, params_more, t_more = events_pullback(event_t_bar, event_y_bar)
        return y0_bar + y0_more, add_leaves(params_bar, params_more), t_bar + t_more

    return ys, record, pullback_with_events
