"""The loop: one init / cond / body for every backend.

The loop state (:class:`LoopState`) is a record of fixed-shape arrays. Every sample (a row
of the internal (B, N) state) has its own time, step size, status and counters; updates are
masked with ``where``, so a finished or failed sample stops changing while the others go on.
Requested output times are filled by interpolation after each accepted step and never change
the steps taken. The body has no Python ``if`` on array values, so a tracing backend (JAX) can
run it unchanged under its own ``while_loop``. Its decisions are the pure rules of
``odecore.control.rules``; the step itself is the solver's (``odecore.solvers``).

Time runs forward inside the loop. A decreasing ``t`` is solved as ``s = -t`` with
``dy/ds = -f(-s, y)``, so nothing else needs to know about direction.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from odecore import _validate
from odecore.backend.layout import layout as make_layout
from odecore.control.initial_step import initial_step
from odecore.ode import events as ev
from odecore.ode.outputs import fill_outputs
from odecore.ode.problem import Problem
from odecore.ode.progress import run_reported
from odecore.ode.solution import Solution, SolveError, Status, failure_message
from odecore.ode.tape import record_step, tape_buffers

# The codes as plain ints: the loop body writes them every step.
RUNNING = int(Status.RUNNING)
EVENT = int(Status.EVENT)
NONFINITE_EVENT = int(Status.NONFINITE_EVENT)
DT_UNDERFLOW = int(Status.DT_UNDERFLOW)


class LoopState(NamedTuple):
    """What the loop carries from one step to the next. Per-sample fields are control values
    (see odecore._ops): Python numbers for one eager sample, (B,) arrays otherwise. As a
    NamedTuple it is a pytree, so a tracing backend carries it through its ``while_loop``."""

    t: Any  # each sample's time, internal (increasing)
    y: Any  # its state at t, (B, N) internal layout (one eager sample: the user's shape)
    f: Any  # f(t, y), the next step's first stage (right limit after a jump)
    dt: Any  # the step the controller proposes next (fixed-step: the step size)
    ratio_prev: Any  # the last accepted step's error ratio, for the PI controller
    last_rejected: Any  # whether the last attempted step was rejected (bool)
    status: Any  # RUNNING until the sample finishes or fails (odecore.Status codes)
    out: Any  # (T, B, N) the outputs so far; NaN where not reached
    out_idx: Any  # the index of each sample's next output to fill
    nfev: Any  # evaluations of f, shared by the batch (one count: f sees the whole batch)
    nsteps: Any  # steps attempted, per sample
    naccept: Any
    nreject: Any
    # The checkpoint tape (odecore.ode.tape): a list of StepRecord on an eager backend,
    # TapeBuffers on a tracing one; None when the solve records nothing.
    tape: Any
    events: Any = None  # odecore.ode.events.EventState, or None for a solve without events


class LoopResult(NamedTuple):
    """What a solve found, besides its Solution: the tape, for the checkpoint gradient; and
    each sample's next proposed step (control values), with which the backsolve starts its
    backward solve; and ``f`` at each sample's final state (internal layout), which the time
    gradient of the last output reuses (None where the solve does not keep it)."""

    solution: Solution
    tape: Any
    dt_next: Any
    f_end: Any = None


def solve_prepared(
    problem: Problem, options, record: bool, throw: bool, progress=None
) -> LoopResult:
    """Solve a prepared problem (``options``: the user's, as ``prepare`` got them). The one
    place a solve leaves the generic loop: a backend that compiles whole solves (Numba,
    ``Backend.kernels.solve``) runs it as one call, taking the same steps, and records the
    checkpoint tape where the backend replays it (``Backend.kernels.replay``). ``progress``:
    a :class:`~odecore.ode.progress.Reporter`, or None."""
    kernels = problem.backend.kernels
    # The compiled loop has no event phase: a solve with events runs the generic loop.
    if kernels.solve is None or (record and kernels.replay is None) or problem.events is not None:
        return run_loop(problem, record, throw, progress)
    if record:
        result = kernels.solve(problem, options, progress, record=True)
    else:
        result = kernels.solve(problem, options, progress)
    if throw and not result.solution.success:
        raise SolveError(failure_message(result.solution, problem.solver.adaptive), result.solution)
    return result


def run_loop(problem: Problem, record: bool, throw: bool, progress=None) -> LoopResult:
    """Run the loop over a prepared problem, recording the accepted steps in the result's
    tape when ``record`` (for the checkpoint gradient), and reporting to ``progress`` (a
    :class:`~odecore.ode.progress.Reporter`) after every step when it is given."""
    bk = problem.backend
    state = init_state(problem, record, throw)

    def running(s):
        return problem.ops.any(s.status == RUNNING)

    def body(s):
        return step(problem, s)

    if progress is None:
        state = bk.while_loop(running, body, state)
    else:
        state = run_reported(problem, running, body, state, progress)
    solution = finish(problem, state)
    # Under jit the status is not known until run time: it stays in the Solution, and the
    # outputs the solve did not reach are NaN.
    if throw and not bk.is_traced(solution.status) and not solution.success:
        raise SolveError(failure_message(solution, problem.solver.adaptive), solution)
    return LoopResult(solution, state.tape, state.dt, state.f)


def init_state(p: Problem, record: bool, throw: bool = True) -> LoopState:
    bk, xp, ops, lay = p.backend, p.backend.xp, p.ops, p.layout
    B, T = lay.batch, p.ts_array.shape[0]
    t0 = ops.full(B, p.ts[0])
    t_first = t0
    if p.jumps is not None:
        # A solve that starts on a jump starts on its far side: its right limit.
        t_first = ops.where(ops.is_member(t0, p.jumps), ops.jump_above(t0), t0)
    f0 = p.solver.init(p.dynamics.first_call, t_first, p.y0)
    nfev = 1
    if p.controller is None:
        dt = ops.full(B, p.step_size if p.step_size is not None else math.inf)
    elif p.first_step is not None:
        dt = ops.full(B, p.first_step)
    else:
        # The exponent is the error estimate's, 1/(q+1): Hairer's HINIT (IORD=5 for DOPRI5),
        # scipy and torchdiffeq all use it; the method's own order p gave 1/(p+1).
        order = p.solver.error_exponent_order - 1
        dt = initial_step(xp, ops, p.dynamics, t0, p.y0, f0, order, p.rtol, p.atol, p.norm)
        nfev += 1
    dt = ops.minimum(ops.maximum(dt, p.min_step), p.max_step)
    finite = ops.all_rows(xp.isfinite(f0))
    status = ops.where(
        finite, ops.full(B, RUNNING, "int"), ops.full(B, int(Status.NONFINITE_STATE), "int")
    )
    if p.valid is not None:
        status = ops.where(p.valid, status, int(Status.INVALID_INPUT))
    events = None
    if p.events is not None:
        g0, events_valid = ev.events_at_start(p, t0, p.y0, throw)
        if events_valid is not None:
            status = ops.where(events_valid, status, int(Status.INVALID_INPUT))
        events = ev.init_events(p, t0, p.y0, g0)
    out = xp.full((T, *lay.internal_shape), math.nan, dtype=lay.dtype)
    # An invalid sample's state is a placeholder (prepare): its outputs stay NaN.
    first = p.y0 if p.valid is None else xp.where(p.valid[..., None], p.y0, math.nan)
    tape = None
    y0 = p.y0
    if record:
        tape = [] if bk.eager else tape_buffers(p)
        if bk.eager:
            # The tape keeps each step's start for the replay, and the first is y0's own
            # memory (the layout only reshapes it): a change of y0 in place between the
            # solve and its backward changed the replayed first step, and the gradient.
            # The replay differentiates the copy by local VJPs, never through it.
            y0 = xp.asarray(bk.stop_gradient(p.y0), copy=True)
    return LoopState(
        t=t0,
        y=y0,
        f=f0,
        dt=dt,
        ratio_prev=ops.full(B, 1.0),
        last_rejected=ops.full(B, 0, "int") != 0,
        status=status,
        out=bk.write(out, 0, first),
        out_idx=ops.full(B, 1, "int"),
        nfev=ops.full(1, nfev, "int") if not ops.scalar else nfev,
        nsteps=ops.full(B, 0, "int"),
        naccept=ops.full(B, 0, "int"),
        nreject=ops.full(B, 0, "int"),
        tape=tape,
        events=events,
    )


def step(p: Problem, s: LoopState) -> LoopState:
    ops, solver, rules = p.ops, p.solver, p.ops.rules
    running = s.status == RUNNING
    t, y = s.t, s.y

    # Every step lands exactly on the next stop (end time, step_t, jump_t, fixed-grid output)
    # rather than overshoot it.
    next_stop = ops.next_stop(p.stops, t)
    h, t_new, lands = rules.land_on_stop(t, s.dt, next_stop, p.max_step, running)
    hy = ops.to_state(h)

    # A step that ends on a discontinuity sees the left limit there: its stages at c = 1
    # (and f at its end) are evaluated just before the jump, never on the far side of it.
    t_left, cap = None, None
    if p.jumps is not None:
        t_left = ops.left_limit(t_new, running & lands & ops.is_member(next_stop, p.jumps))
        cap = capped_at(ops, t_left)

    if p.callbacks is not None:
        p.callbacks.before(running, t, y, h)
    trial = solver.step(p.evaluate, t, y, s.f, h, hy, p.stage_store, cap)
    y_new = trial.y_new
    if p.controller is not None:
        ratio = p.error_ratio(trial.error, trial.error2, y, y_new)
        finite = ops.isfinite(ratio)
        accept = running & (ratio <= 1.0)
        norm_failed, estimates_finite = _ratio_blame(p, ratio, trial, y_new)
        norm_failed = running & norm_failed
    else:
        finite = estimates_finite = ops.all_rows(p.backend.xp.isfinite(y_new))
        accept = running & finite
    # A step too short to move time (t + h == t, or h == 0) is not taken: it would change y
    # but not t, and every step after it would be the same.
    no_progress = accept & (t_new <= t)
    accept = accept & ops.not_(no_progress)
    if p.callbacks is not None:
        p.callbacks.after(running, accept, t, y, h)
    if _records_graph(p, y_new):
        trial, nfev_redo = _unpoison_rejected(p, s, running, accept, finite, t, y, h, cap, trial)
        y_new = trial.y_new
    else:
        nfev_redo = 0
    if solver.fsal:
        f_new = trial.stages[-1]
    else:
        f_new = p.evaluate(t_new if t_left is None else t_left, y_new)
    nfev = s.nfev + solver.nfev_per_step + nfev_redo

    events, stop, t_end, lost = s.events, None, t_new, None
    if p.events is not None:
        # A terminal event ends the step early for its sample: no output after it is filled.
        events, stop, t_end, y_stop, nfev, lost = ev.event_phase(
            p, s.events, accept, t, t_new, h, hy, y, trial, f_new, nfev
        )
        # A step that leaves an event value NaN is rejected and retried shorter, as
        # one to a non-finite state is: a long first step may leave the event's domain (a log
        # of a state that turns negative) where shorter steps stay in it.
        accept = accept & ops.not_(lost)
        if p.controller is not None:
            ratio = ops.where(lost, math.inf, ratio)
    tape = s.tape if s.tape is None else record_step(p, s.tape, t, h, t_new, y, accept)
    out, out_idx, nfev = fill_outputs(p, s, accept, t, t_new, h, hy, y, trial, f_new, nfev, t_end)
    if p.jumps is not None:
        # Only now, with the step's outputs interpolated from the left limit, does the next
        # step get the right limit as its first stage.
        f_new, nfev = _reevaluate_after_jump(p, t_new, y_new, f_new, accept, nfev)

    rejected = running & ops.not_(accept)
    if p.controller is not None:
        dt_wanted = p.controller.next_dt(ops, h, ratio, s.ratio_prev, accept, s.last_rejected)
        stalled = rules.stalled(rejected, t, h, dt_wanted, p.min_step, lands) | norm_failed
        dt_next = rules.next_step(h, s.dt, dt_wanted, accept, lands, p.min_step, p.max_step)
        ratio_prev = rules.remembered_ratio(ratio, s.ratio_prev, accept)
    else:
        dt_next, ratio_prev = s.dt, s.ratio_prev
        stalled = rejected
        # A fixed-step solve has no error norm to fail.
        norm_failed = rejected & ops.not_(rejected)
    failure = rules.failure_status(estimates_finite, norm_failed)
    nsteps = s.nsteps + ops.count(running)
    status = rules.status_after_step(
        s.status,
        accept,
        t_new,
        p.ts[-1],
        stalled | no_progress,
        failure,
        nsteps,
        p.max_num_steps,
    )
    t_next, y_next = ops.where(accept, t_new, t), ops.select_rows(accept, y_new, y)
    if stop is not None:
        # No shorter step kept the event finite: the failure is the event's.
        lost_for_good = lost & (status == DT_UNDERFLOW)
        status = ops.where(stop, EVENT, ops.where(lost_for_good, NONFINITE_EVENT, status))
        t_next, y_next = ops.where(stop, t_end, t_next), ops.select_rows(stop, y_stop, y_next)
    # In field order, not by keyword: keywords make a NamedTuple's constructor several times
    # slower, and this runs once per step.
    return LoopState(
        t_next,  # t
        y_next,  # y
        ops.select_rows(accept, f_new, s.f),  # f
        ops.where(running, dt_next, s.dt),  # dt
        ratio_prev,
        rejected,  # last_rejected
        status,
        out,
        out_idx,
        nfev,
        nsteps,
        s.naccept + ops.count(accept),  # naccept
        s.nreject + ops.count(rejected),  # nreject
        tape,
        events,
    )


def _records_graph(p, y_new) -> bool:
    """Whether this step of a batch is being recorded by an eager framework's autodiff (a
    direct-mode gradient through a batched torch solve)."""
    bk = p.backend
    return (
        bk.eager
        and bk.autodiff is not None
        and not p.ops.scalar
        and (bk.autodiff.requires_grad(y_new))
    )


def _unpoison_rejected(p, s, running, accept, finite, t, y, h, cap, trial):
    """The trial again, with a zero step for the samples it rejected with non-finite values,
    when there are any; and the evaluations that cost (else the trial itself, and 0).

    A recorded batch step keeps every sample's stages in the graph, the rejected ones too:
    ``select_rows`` then sends them a zero cotangent, but zero times an infinite partial
    derivative of their overflowed stages is NaN, and a parameter shared by the batch gets
    NaN from one sample's rejected step. A zero step evaluates those samples at their
    current, finite state instead; the other samples' values are those of the first trial.
    It is rare (a trial step that overflows), so the first trial is not made safe up front."""
    ops, solver = p.ops, p.solver
    poisoned = running & ops.not_(accept) & ops.not_(finite)
    if not ops.any(poisoned):
        return trial, 0
    h_safe = ops.where(poisoned, 0.0, h)
    trial = solver.step(p.evaluate, t, y, s.f, h_safe, ops.to_state(h_safe), p.stage_store, cap)
    return trial, solver.nfev_per_step


def capped_at(ops, t_left):
    """The ``cap`` a solver applies to its evaluation times: none later than ``t_left``."""

    def cap(t_stage):
        return ops.minimum(t_stage, t_left)

    return cap


def _ratio_blame(p, ratio, trial, y_new):
    """Per sample, who is to blame for an error ratio that is not finite: ``(norm_failed,
    estimates_finite)``. NaN from a finite trial state and finite error estimates is the
    norm's failure (a user norm returning NaN, say), which no smaller step can mend. +inf
    from finite estimates is the scaled error overflowing (an ``atol`` of 1e-200 with ``y``
    near zero): shorter steps shrink it, and a solve that still stalls has asked for more
    than the dtype resolves, not met a non-finite ``f``. The estimates are looked at only when
    some ratio is not finite."""
    ops, xp = p.ops, p.backend.xp
    finite = ops.isfinite(ratio)

    def blame(finite, *estimates):
        estimates_finite = xp.isfinite(estimates[0])
        for e in estimates[1:]:
            estimates_finite = estimates_finite & xp.isfinite(e)
        estimates_finite = finite | ops.all_rows(estimates_finite)
        return estimates_finite & ops.isnan(ratio), estimates_finite

    def none_to_blame(finite, *estimates):
        return ops.not_(finite), finite

    estimates = (y_new, trial.error)
    if trial.error2 is not None:
        estimates += (trial.error2,)
    return p.backend.cond(ops.any(ops.not_(finite)), blame, none_to_blame, finite, *estimates)


def _reevaluate_after_jump(p, t_new, y_new, f_new, accept, nfev):
    """After landing on a discontinuity, the carried-over f(t_new, y_new) is the left limit;
    the next step needs the right one, evaluated just after the jump. A jump at the end
    time has no next step, and ``func`` is not called past the end."""
    ops = p.ops
    on_jump = accept & ops.is_member(t_new, p.jumps) & (t_new < p.ts[-1])

    def fresh(f_new, nfev):
        f_after = p.evaluate(ops.jump_above(t_new), y_new)
        return ops.select_rows(on_jump, f_after, f_new), nfev + 1

    return p.backend.cond(ops.any(on_jump), fresh, lambda f_new, nfev: (f_new, nfev), f_new, nfev)


def finish(p: Problem, s: LoopState) -> Solution:
    """The loop's state as the user's :class:`Solution`: per-sample values stay arrays for a
    batch and become Python numbers for a single eager solve."""
    lay, ops = p.layout, p.ops

    def per_sample(value):
        if ops.scalar or lay.batched:
            return value
        value = value[0]
        return int(value) if p.backend.eager else value

    nfev = s.nfev
    if not ops.scalar:
        nfev = int(nfev[0]) if p.backend.eager else nfev[0]
    stats = {
        "nfev": nfev,
        "nsteps": per_sample(s.nsteps),
        "naccept": per_sample(s.naccept),
        "nreject": per_sample(s.nreject),
    }
    t_reached = s.t if (ops.scalar or lay.batched) else s.t[0]
    return Solution(
        ts=p.ts_array * p.direction,
        ys=lay.outputs_to_user(p.backend.xp, s.out),
        stats=stats,
        status=per_sample(s.status),
        t_reached=t_reached * p.direction,
        method=p.solver.name,
        events=None if s.events is None else ev.record(p, s.events),
    )


def trivial_solution(bk, y0, t, method, batch_axis) -> Solution:
    """The solution of a solve with a single output time, ``t[0]``: ``y0``, reached with no
    work. As in a solve, a sample of a batch whose ``y0`` is not finite (``prepare`` has
    refused it unless ``throw=False``) has status INVALID_INPUT and NaN outputs."""
    xp = bk.xp
    y0_arr = _validate.initial_state(bk, y0, finite=batch_axis is None)
    layout = make_layout(xp, y0_arr, batch_axis)
    t0 = xp.astype(bk.asarray(t)[0], bk.time_dtype)
    if not layout.batched:
        # As a solve's: a Python number where the loop keeps its times on the host.
        t_reached = float(t0) if bk.eager and bk.host_control_values else t0
        zero = 0
        status = int(Status.SUCCESS)
        ys = y0_arr[None, ...]
    else:
        y = layout.to_internal(xp, y0_arr)
        valid = xp.all(xp.isfinite(y), axis=1)
        zero = xp.zeros((layout.batch,), dtype=bk.int_dtype)
        status = xp.where(valid, zero + int(Status.SUCCESS), zero + int(Status.INVALID_INPUT))
        ys = layout.to_user(xp, xp.where(valid[:, None], y, math.nan))[None, ...]
        t_reached = xp.full((layout.batch,), t0, dtype=bk.time_dtype)
    stats = {"nfev": 0, "nsteps": zero, "naccept": zero, "nreject": zero}
    return Solution(
        ts=t,
        ys=ys,
        stats=stats,
        status=status,
        t_reached=t_reached,
        method=method or "dopri5",
    )
