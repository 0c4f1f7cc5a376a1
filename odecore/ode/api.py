"""The public solve API: ``solve``, ``odeint``, ``odeint_adjoint`` and ``vjp_odeint``.

They check the arguments, choose the gradient mode and hand the prepared problem to the loop,
directly (``direct`` mode, or no gradients) or through the solve's rule
(``odecore.adjoint.solve_rule``).
"""

from __future__ import annotations

import warnings

from odecore import _validate
from odecore._config import resolve_backend
from odecore.adjoint import modes
from odecore.adjoint.failed import FailedSolvePolicy
from odecore.adjoint.scipy_solver import METHOD as SCIPY_METHOD
from odecore.adjoint.scipy_solver import scipy_solve
from odecore.adjoint.solve_rule import SolveRule
from odecore.backend import differentiate, tree
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
from odecore.ode.events import Event, as_events, structured_events
from odecore.ode.flat_call import flat_call
from odecore.ode.loop import LoopResult, run_loop, solve_prepared, trivial_solution, user_f_at
from odecore.ode.problem import check_parameters_are_known, prepare
from odecore.ode.solution import Solution, SolveError, Status, failure_message


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
    event=None,
    progress=None,
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` (or ``func(t, y, params)``) and report how it went.

    Arguments are those of :func:`odeint`. Returns a :class:`~odecore.Solution` with the
    outputs ``ys`` at the requested times ``ts``, statistics and a per-sample status. With
    ``throw=True`` (the default) a failed solve raises :class:`~odecore.SolveError` on eager
    backends (a batch's message lists the failed samples, each with its status and the time
    it reached); with ``throw=False`` the failure is reported in ``status`` and the outputs
    the solve did not reach are NaN. Gradients then reach the outputs it did reach as if it
    had stopped there; a nonzero cotangent on an unreached output makes that sample's ``y0``
    gradient, and the parameter and time gradients, NaN. For a structured ``y0`` (a tuple,
    list or dict of arrays), ``ys`` has its structure, each part with a leading time axis.

    ``event``: a function ``g(t, y)`` (``g(t, y, params)`` with ``params``), an
    :class:`~odecore.Event`, or a list of them. A plain function is a terminal event in
    either direction. Each sample stops at its first terminal event (status ``EVENT``, a
    success; its outputs after the event are NaN); every crossing is recorded.
    ``Solution.events`` (:class:`~odecore.ode.events.EventRecord`) says which terminal event
    stopped each sample, when and in which state; the event time and state are
    differentiable in every gradient mode (by the implicit function theorem). Options:
    ``event_tol`` (the root's tolerance in time; default a few units in the last place of
    the time) and ``max_events`` (how many crossings are kept, 64 by default).

    ``progress``: ``True`` shows the time reached and the steps taken while the solve runs
    (a tqdm bar, or without tqdm a line on stderr); a tqdm bar, or an object with
    ``update(t, accepted, rejected, note)`` and ``close()``
    (:class:`~odecore.ode.progress.ProgressTarget`), is told them instead. docs/progress.md.
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
    if not is_structured(y0):
        return _solve_array(func, y0, t, **keywords)
    bk = resolve_backend(backend, {"y0": y0, "t": t, "params": params})
    compiled = _compiled_structured(bk, func, y0, t, keywords)
    if compiled is not None:
        return compiled
    flat = flat_call(bk, func, y0, keywords)
    flat.keywords["event"] = structured_events(events, flat.structure)
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
    reporting = progress_reports.reporter(keywords["progress"])
    arguments["progress"] = progress_reports.static(reporting)
    with progress_reports.active(reporting):
        compiled = bk.tracing.compiled_solve(solve, func, y0, t, keywords["params"], arguments)
    if compiled is None:
        return None

    def check_inputs():
        flat = flat_call(bk, func, y0, keywords)
        k = flat.keywords
        prepare(
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

    return _raise_compiled_failures(bk, compiled, keywords["throw"], check_inputs)


def _solve_array(
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
    with ``func`` a ``StructuredFunc``)."""
    adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options = modes.as_keywords(
        adjoint, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options
    )
    _validate.call_arguments(func, throw, adjoint_params)
    bk = resolve_backend(backend, {"y0": y0, "t": t, "params": params})
    # Everything the solve allocates lives where y0 does (a CUDA device, say), and so do
    # the times.
    with bk.device_scope(y0):
        if bk.owns(y0):
            t = _validate.time_array(bk, t, "t", _validate.TIMES_NEED, like=y0)
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
        reporting = progress_reports.reporter(progress)
        arguments["progress"] = progress_reports.static(reporting)
        with progress_reports.active(reporting):
            compiled = (
                bk.tracing.compiled_solve(_solve_array, func, y0, t, params, arguments)
                if bk.tracing is not None
                else None
            )

        def prepared_problem(y0_, t_, leaves=None):
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
            )

        if compiled is not None:
            # A compiled solve has no adjoint_params (the cache refuses them), so the inputs
            # are checked as the eager solve prepares them.
            return _raise_compiled_failures(bk, compiled, throw, lambda: prepared_problem(y0, t))

        def run(y0_, t_, record=False, leaves=None):
            problem = prepared_problem(y0_, t_, leaves)
            if problem is None:  # a single output time: the answer is y0, with no work done
                solution = trivial_solution(bk, y0_, t_, method, batch_axis)
                return None, LoopResult(solution, None, None)
            if bk.kernels.solve is not None and not record:
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
            "options": options,
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
        solution = Solution(ys=ys, method=_validate.tableau(method).name, **report)
        # A backend that traces the rule's forward (JAX) learns the status only here.
        if throw and not bk.is_traced(solution.status) and not solution.success:
            raise SolveError(failure_message(solution), solution)
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


def _raise_compiled_failures(bk, solution: Solution, throw: bool, check_inputs) -> Solution:
    """A compiled solve (``Backend.compiled_solve``) reports every failure in its status. Where
    that status is known, an invalid input raises what an eager solve raises for it
    (``check_inputs`` runs those checks on the concrete inputs), and with ``throw`` a failed
    solve raises SolveError."""
    status, xp = solution.status, bk.xp
    if bk.is_traced(status) or bool(
        xp.all((status == int(Status.SUCCESS)) | (status == int(Status.EVENT)))
    ):
        return solution
    if bool(xp.any(status == int(Status.INVALID_INPUT))):
        check_inputs()
    if throw:
        raise SolveError(failure_message(solution), solution)
    return solution


def _direct_with_time_gradients(bk, run, prepared_problem, y0, t) -> Solution:
    """``direct`` mode: the framework differentiates through the loop for ``y0`` and the
    parameters. Time gradients come from the flow's identities instead of from the step
    arithmetic (whose step sizes are not differentiable): each output gets
    ``(t_i - stop_gradient(t_i)) * f(t_i, y_i)``, zero in value with gradient ``f``, and the
    start ``y0 - (t_0 - stop_gradient(t_0)) * f(t_0, y0)`` gives ``-a(t_0) . f(t_0, y_0)``."""
    xp = bk.xp
    sg = bk.stop_gradient
    if not differentiate.requires_grad(bk, {"t": t}):
        return run(y0, t)[1].solution
    t_const = sg(t)
    with bk.no_grad():
        problem = prepared_problem(sg(y0), t_const)
    f0 = sg(user_f_at(problem, t_const[0], y0))
    shift = xp.astype(t[0] - t_const[0], y0.dtype)
    solution = run(y0 - shift * f0, t_const)[1].solution
    ys = solution.ys
    rates = [sg(user_f_at(problem, t_const[i], ys[i])) for i in range(1, ys.shape[0])]
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
    event=None,
    progress=None,
):
    """Solve an initial value problem and return the state at every time in ``t``.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, or ``func(t, y, params)`` when ``params`` is given, returning
        ``dy/dt`` with the shape and dtype of ``y``. As in torchdiffeq, a ``func`` with a
        ``perturb`` keyword is told which side of a ``jump_t`` it is evaluated on
        (:class:`~odecore.Perturb`), and its methods ``callback_step(t0, y0, dt)``,
        ``callback_accept_step`` and ``callback_reject_step`` (and their ``_adjoint``
        counterparts, in the backsolve's backward solve, with ``y0 = (y, a, a_params)``) are
        called around every step of an eager solve of one sample; a batched or traced (JAX)
        solve does not call them, and warns (``odecore.ode.callbacks``). With
        ``batch_axis``, ``t`` is a vector with one time per sample (each sample steps on
        its own); otherwise a 0-d array. ``t`` is passed in the state's dtype.
    y0 : array, or a tuple, list, dict or NamedTuple of arrays (nested as deep as needed);
    on JAX also any registered pytree type (``jax.tree_util.register_pytree_node``,
    ``register_dataclass``), whose type the outputs keep
        Initial state, any shape, real floating dtype. A float16 or bfloat16 state is
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
    rtol, atol : float or array
        Relative and absolute tolerances (positive; arrays broadcast against ``y0``). An
        ``rtol`` below the unit roundoff of ``y0``'s dtype (half its machine epsilon:
        5.96e-8 for float32, 4.9e-4 for float16, 3.9e-3 for bfloat16) cannot be met, and
        gets a :class:`~odecore.PrecisionWarning`; so does such an ``adjoint_rtol``.
    method : str
        One of :data:`odecore.METHODS`; ``"dopri5"`` by default. ``"scipy_solver"`` hands
        the solve to ``scipy.integrate.solve_ivp`` on the CPU (NumPy and torch, one sample,
        outputs on the input's device and dtype), with ``options`` ``solver`` (``"RK45"``,
        ``"RK23"``, ``"DOP853"``, ``"Radau"``, ``"BDF"``, ``"LSODA"``, the default),
        ``min_step`` and ``max_step``; its gradients come from ``adjoint="backsolve"``,
        whose backward solve scipy runs too.
    options : dict
        ``step_size`` (fixed-step methods), ``grid_constructor`` (fixed-step methods:
        ``grid_constructor(func, y0, t) -> grid``, the times to step between, from ``t[0]``
        to ``t[-1]``, as in torchdiffeq; not with ``step_size``), ``interp`` (fixed-step
        methods: outputs between grid points by ``"cubic"`` Hermite interpolation on ``y``
        and ``f`` at both ends, the default, or ``"linear"``, torchdiffeq's default),
        ``first_step``, ``max_num_steps``, ``step_t``
        (times every step must land on), ``jump_t`` (discontinuities of ``func``: landed on,
        and ``func`` is evaluated afresh after them; a ``func`` with a ``perturb`` keyword
        is told the side, :class:`~odecore.Perturb`), ``min_step``, ``max_step``, ``norm``
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
        the named controller's settings.
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
        error control; a callable ``norm`` there receives the backward state's scaled error
        as torchdiffeq passes it, the tuple ``(t, *y, *adj_y, *adj_params)`` (``y`` and
        ``adj_y`` one array, or the parts of a structured state; ``t`` a zero, since time
        gradients are not integrated).
    adjoint_params : sequence of arrays, optional
        The arrays to compute parameter gradients for, instead of those found in ``params``
        or on an ``nn.Module`` func.

    event : callable, odecore.Event, or a list of them; optional
        Event functions, as in :func:`solve`: a sample stops at its first terminal event, and
        its outputs after it are NaN. :func:`solve` also reports when and where.
    progress : bool, tqdm bar or ProgressTarget, optional
        Shows the time reached and the steps taken while the solve runs, as in
        :func:`solve`.

    Returns
    -------
    array of shape ``(len(t), *y0.shape)``; for a structured ``y0``, its structure with each
    part of shape ``(len(t), *part.shape)``.
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
        event=event,
        progress=progress,
    ).ys


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero, as torchdiffeq's
    ``odeint_event``: returns ``(event_t, solution)``, ``solution`` the states at
    ``[t0, event_t]`` (a structured ``y0``: each part stacked alike).

    There is no end time: the solve goes on (forward, or backward with ``reverse_time``)
    until the event, or fails with :class:`~odecore.SolveError` at ``max_num_steps``.
    ``event_fn`` returns one value, or several (an event when any of them changes sign from
    its value at ``t0``). ``event_t`` and the final state are differentiable in every
    gradient mode, by the implicit function theorem. ``odeint_interface`` is
    :func:`odeint` (gradients by ``adjoint``, ``direct`` by default) or
    :func:`odeint_adjoint` (``backsolve``); the other keyword arguments are those of
    :func:`solve`. Unlike torchdiffeq, ``batch_axis`` gives each sample its own event time.
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
    bk = resolve_backend(kwargs.get("backend"), {"y0": y0, "t": t0, "params": None})
    xp = bk.xp
    like = list(tree.leaves(y0, "y0"))[0][1] if is_structured(y0) else bk.asarray(y0)
    t0 = bk.asarray(t0, dtype=like.dtype) if not bk.owns(t0) else t0
    t0 = xp.reshape(t0, ())
    # No end time: one far enough that only the event, or max_num_steps, ends the solve.
    horizon = float(xp.finfo(t0.dtype).max) / 4
    far = bk.stop_gradient(t0) + (-horizon if reverse_time else horizon)
    t = xp.stack([t0, xp.astype(far, t0.dtype)])
    solution = solve(func, y0, t, event=_combined_event(bk, event_fn, t0, y0, kwargs), **kwargs)
    record = solution.events
    event_t = xp.astype(record.t, t0.dtype)

    def stacked(start, at_event):
        return xp.stack([start, xp.astype(at_event, start.dtype)])

    if is_structured(y0):
        leaves = [leaf for _, leaf in tree.leaves(y0, "y0")]
        at_event = [leaf for _, leaf in tree.leaves(record.y, "y")]
        node_values = [stacked(a, b) for a, b in zip(leaves, at_event, strict=True)]
        return event_t, tree.unflatten_like(y0, node_values)
    return event_t, stacked(bk.asarray(y0), record.y)


def _combined_event(bk, event_fn, t0, y0, kwargs):
    """torchdiffeq's event: several values count as one event when any of them changes sign
    from its sign at ``t0``; as one function, the least of the values made positive at
    ``t0``."""
    params = kwargs.get("params")
    xp = bk.xp
    with bk.no_grad():
        first = event_fn(t0, y0) if params is None else event_fn(t0, y0, params)
    first = bk.asarray(first)
    batched = kwargs.get("batch_axis") is not None
    if first.ndim == (1 if batched else 0):
        return Event(event_fn, terminal=True, direction=0)
    signs = bk.stop_gradient(xp.sign(first))

    def least(t, y, *params):
        values = event_fn(t, y, *params) * signs
        if batched:
            return xp.min(xp.reshape(values, (values.shape[0], -1)), axis=1)
        return xp.min(values)

    return Event(least, terminal=True, direction=0)


def odeint_adjoint(func, y0, t, *, adjoint="backsolve", **kwargs):
    """:func:`odeint` with the continuous adjoint by default, under torchdiffeq's name."""
    return odeint(func, y0, t, adjoint=adjoint, **kwargs)


def vjp_odeint(func, y0, t, params=None, *, adjoint="checkpoint", throw=True, event=None, **kwargs):
    """Solve, and return ``(ys, pullback)`` with ``pullback(ys_bar) -> (y0_bar, params_bar,
    t_bar)``: gradients for backends without autodiff (NumPy), from the dynamics' own VJP.

    ``func`` supplies ``vjp(t, y, params, cotangent) -> (cot_y, cot_params)``. ``adjoint``
    is ``"checkpoint"`` (exact for the discrete solve) or ``"backsolve"``; the other keyword
    arguments are those of :func:`odeint`. ``params_bar`` has the structure of ``params``.
    With ``throw=False`` a failed solve returns NaN for the outputs it did not reach instead
    of raising :class:`~odecore.SolveError`; the pullback then gives the reached outputs'
    gradients, and NaN for whatever a nonzero cotangent on an unreached output depends on.

    A structured ``y0`` (a tuple, list or dict of arrays) gives ``ys`` in its structure (each
    part with a leading time axis); ``vjp`` then receives ``y`` and the cotangent in that
    structure and returns ``cot_y`` in it, and ``pullback`` takes ``ys_bar`` and returns
    ``y0_bar`` in it.

    With ``event`` (as in :func:`solve`; each event function brings ``vjp(t, y, params,
    g_bar) -> (t_bar, y_bar, params_bar)``, the cotangents of ``sum(g_bar * g)``), returns
    ``(ys, events, pullback)``: ``events`` the :class:`~odecore.EventRecord`, and
    ``pullback(ys_bar, event_t_bar=None, event_y_bar=None)`` also takes cotangents of the
    event times and states. Structured states take no events here yet.

    ``progress`` (as in :func:`solve`) reports the forward solve.
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
        # The generic loop, for any dynamics with a vjp: a compiling backend compiles the
        # backsolve's backward intervals where it can (Kernels.adjoint_dynamics).
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
        ys_bar = bk.asarray(ys_bar)
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
        return _vjp_odeint_array(func, y0, times, params, throw=False, **given)

    t_arr = bk.asarray(t)
    record = report["events"]
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
