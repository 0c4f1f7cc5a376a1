"""The backsolve: the continuous adjoint, solved backward in time with the state and the
parameter cotangents as one augmented ODE.
"""

from __future__ import annotations

import functools
import math

from odecore.backend.structured import StructuredFunc
from odecore.control.norms import largest_part_rms
from odecore.ode.callbacks import attach_adjoint_callbacks
from odecore.ode.loop import run_loop, solve_prepared
from odecore.ode.outputs import unchanged
from odecore.ode.problem import prepare


def user_f(problem, i, y_user):
    """``f(t_i, y)`` in the user's terms (time, shape and sign), for output ``i``."""
    bk, dyn, lay = problem.backend, problem.dynamics, problem.layout
    xp = bk.xp
    s_i = problem.ts_array[i]
    t_ctl = problem.ops.full(lay.batch, 0.0) + s_i if not problem.ops.scalar else float(s_i)
    f = lay.to_user(xp, dyn(t_ctl, lay.to_internal(xp, y_user)))
    return f * dyn.sign


def backsolve_backward(problem, ys, ys_bar, settings, failed, dt_next):
    """Solve ``[y, a, a_theta]`` backward from the last output time to the first:
    ``y' = f``, ``a' = -a df/dy``, ``a_theta' = -a df/dtheta``. At every output time ``y`` is
    reset to the stored forward value (so the backward ``y`` never drifts from the forward
    one) and the output's cotangent is added to ``a``. One joint solve serves the whole
    batch; memory does not grow with the number of steps.

    A sample that a failed solve did not take to output ``i`` is frozen over the interval
    from ``t_i`` back: held at its last reached state with ``y' = 0``, and its adjoint is
    zero there (``failed`` has dropped the cotangents of unreached outputs), so it can
    neither fail nor disturb the others. Its backward starts at its last reached output.

    ``dt_next`` is the step the forward solve proposed next, per sample (its LoopResult):
    the backward solve starts with it."""

    bk, dyn, lay = problem.backend, problem.dynamics, problem.layout
    xp = bk.xp
    # The backward state is in the user's dtype: for a 16-bit state its solve, like the
    # forward one, then keeps its loop in float32 and calls func in the user's dtype.
    shape, dtype = lay.shape, lay.user_dtype
    m = math.prod(shape)
    leaves = dyn.leaves
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    held = failed.last_reached(ys) if failed.active else ys

    options = dict(settings.get("options") or {})
    if settings["adaptive"]:
        # The adjoint's error grows along most of the backward solve (it accumulates
        # sensitivity), where holding the step after each accepted one ends in a rejection
        # (docs/performance.md has the evaluations this saves).
        options.setdefault("shrink_after_accept", True)
    # Each part of a structured state (settings["state_parts"]), and of its adjoint, is
    # one part of the norm, over every sample.
    state = (m // lay.size, tuple(settings.get("state_parts", (lay.size,))))
    parts = [state, state, sum(sizes)]
    if options.get("norm") == "seminorm":
        # The parameter adjoint does not influence the step size, it only accumulates
        # (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE").
        options["norm"] = largest_part_rms(xp, parts[:2])
    elif "norm" not in options and settings["adaptive"]:
        options["norm"] = largest_part_rms(xp, parts)
    elif callable(options.get("norm")):
        options["norm"] = _norm_of_parts(dyn, shape, m, leaves, options["norm"])
    # The backward solve starts with the step the forward solve would have taken next, and
    # each later interval with the one before's: the trajectory is the same, and Hairer's
    # automatic first step misjudges the augmented state, whose parameter adjoint starts at
    # zero (its error scale is then atol alone): on a neural ODE it chose a step 10^4 times
    # too small and spent four steps growing it back.
    seed = settings["adaptive"] and "first_step" not in options and problem.controller
    dt_next = _usable_step(bk, _finished_steps(bk, dt_next, failed)) if seed else None
    a = xp.zeros(shape, dtype=dtype)
    a_theta = xp.zeros((sum(sizes),), dtype=dtype)
    t_user = problem.ts_array * dyn.sign
    # A backend that compiles whole solves may compile the augmented dynamics too: each
    # interval is then one compiled call (Backend.kernels.adjoint_dynamics).
    # A batch with samples that a failed solve left behind needs them frozen (``moving``),
    # which only the generic augmented dynamics do.
    compiled = bk.kernels.adjoint_dynamics
    frozen = failed.active and lay.batched
    compiled = compiled(problem) if compiled is not None and not frozen else None

    def interval(i, a, a_theta, dt_next):
        """Solve back from ``t_i`` to ``t_{i-1}``."""
        if compiled is not None:
            # Every sample moves on every interval that is solved. A compiled solve calls no
            # Python callbacks.
            aug, aug_params = compiled
        else:
            moving = None
            if failed.active:
                moving = failed.per_sample_mask(xp.logical_not(failed.unreached[i]))
            aug = _augmented_dynamics(bk, dyn, shape, m, leaves, sizes, moving)
            split = functools.partial(_split_state, dyn, shape, m)
            attach_adjoint_callbacks(bk, aug, dyn.func, split)
            aug_params = None
        z0 = xp.concat([xp.reshape(held[i], (-1,)), xp.reshape(a, (-1,)), a_theta])
        if not bk.is_traced(z0) and not bool(xp.all(xp.isfinite(z0))):
            # A cotangent that is not finite (a NaN loss) makes the gradients NaN, as in the
            # other modes and under jit; the backward solve would refuse to start from it,
            # with a message about a y0 the user never gave.
            nan_a = xp.full(shape, math.nan, dtype=dtype)
            return nan_a, xp.full(a_theta.shape, math.nan, dtype=dtype), dt_next
        first = options if dt_next is None else {**options, "first_step": dt_next}
        backward = prepare(
            bk,
            aug,
            z0,
            xp.stack([t_user[i], t_user[i - 1]]),
            aug_params,
            settings["rtol"],
            settings["atol"],
            settings["method"],
            first,
            None,
            None,
            user_func=False,
            options_name=settings["options_name"],
        )
        if compiled is not None:
            result = solve_prepared(backward, first, record=False, throw=True)
        else:
            result = run_loop(backward, record=False, throw=True)
        dt_next = _usable_step(bk, result.dt_next) if seed else None
        z = result.solution.ys[-1]
        return xp.reshape(z[m : 2 * m], shape), z[2 * m :], dt_next

    for i in range(ys.shape[0] - 1, 0, -1):
        a = a + ys_bar[i]
        # Where no sample reached t_i there is nothing to integrate: every sample is frozen,
        # and a fixed-step method would spend (and may run out of) steps on it.
        anything = xp.any(xp.logical_not(failed.unreached[i])) if failed.active else True
        if not bk.is_traced(anything):
            if bool(anything):
                a, a_theta, dt_next = interval(i, a, a_theta, dt_next)
            continue
        if seed:  # carried through cond, so an array; inf makes the first step span it
            dt_next = xp.asarray(math.inf if dt_next is None else dt_next, dtype=bk.time_dtype)
        a, a_theta, dt_next = bk.cond(
            anything, functools.partial(interval, i), unchanged, a, a_theta, dt_next
        )
    leaves_bar, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        leaves_bar.append(xp.reshape(a_theta[start : start + size], leaf.shape))
        start += size
    return a, leaves_bar


def _split_state(dyn, shape, m, z):
    """The backward state ``z`` as ``(y, a, a_params)``, ``y`` and ``a`` as the user's state
    (in its structure, for a structured one), as the ``_adjoint`` callbacks receive it."""
    xp = dyn.backend.xp
    y, a = xp.reshape(z[:m], shape), xp.reshape(z[m : 2 * m], shape)
    if isinstance(dyn.func, StructuredFunc):
        y, a = dyn.func.structure.unflatten(y), dyn.func.structure.unflatten(a)
    return y, a, z[2 * m :]


def _norm_of_parts(dyn, shape, m, leaves, user_norm):
    """A user's adjoint norm on the backward state's scaled error, called as torchdiffeq
    calls it: with the tuple ``(t, *y, *a, *a_params)``, ``y`` and ``a`` each one array or
    the parts of a structured state, and each parameter adjoint in its parameter's shape.
    The first entry stands for the time adjoint, which torchdiffeq integrates alongside
    and odecore does not (time gradients come from the flow's identities): it is a zero,
    the value torchdiffeq's entry has when ``t`` needs no gradient."""
    xp = dyn.backend.xp
    structure = dyn.func.structure if isinstance(dyn.func, StructuredFunc) else None

    def state_parts(flat):
        flat = xp.reshape(flat, shape)
        return [flat] if structure is None else structure.parts(flat, cast=False)

    def norm(z):
        params, start = [], 2 * m
        for leaf in leaves:
            size = math.prod(leaf.shape)
            params.append(xp.reshape(z[start : start + size], leaf.shape))
            start += size
        t_part = xp.zeros((), dtype=z.dtype)
        return user_norm((t_part, *state_parts(z[:m]), *state_parts(z[m : 2 * m]), *params))

    return norm


def _finished_steps(bk, dt, failed):
    """The last proposed steps of the samples that reached the end (inf for the others, or
    None for a single sample that did not): a failed sample's says nothing about the
    trajectories the backward solve follows."""
    if not failed.active or dt is None:
        return dt
    finished = failed.reached_end()
    if isinstance(dt, float):
        return dt if bool(finished[0]) else None
    return bk.xp.where(finished, dt, math.inf)


def _usable_step(bk, dt):
    """A solve's last proposed step (per sample) as the first step of one joint backward
    solve: the smallest over the samples, or None (the automatic choice) where it is known
    to be unusable, a failed solve's NaN. A traced value is passed on; the solve's status
    covers it."""
    if dt is None:
        return None
    if not isinstance(dt, float):
        dt = bk.xp.min(dt)
        if bk.is_traced(dt):
            return dt
    dt = float(dt)
    return dt if math.isfinite(dt) and dt > 0 else None


def _augmented_dynamics(bk, dyn, shape, m, leaves, sizes, moving=None):
    """The backsolve's ``[y, a, a_theta]' = [f, -a df/dy, -a df/dtheta]``. ``moving`` (a
    per-sample mask, or None for all) leaves the other samples' ``y`` and ``a`` constant."""
    xp = bk.xp
    batch = dyn.layout.batch if dyn.layout.batched else None

    def aug(t, z):
        y = xp.reshape(z[:m], shape)
        # The VJP with -a gives -a df/dy and -a df/dtheta at once: one negation of the
        # state-sized adjoint instead of one per output part.
        neg_a = -xp.reshape(z[m : 2 * m], shape)
        t_user = xp.broadcast_to(t, (batch,)) if batch is not None else t
        f, cot_y, cot_leaves = dyn.checked_vjp(t_user, y, neg_a, want_value=True)
        if moving is not None:
            f = xp.where(moving, f, xp.zeros_like(f))
            cot_y = xp.where(moving, cot_y, xp.zeros_like(cot_y))
        parts = [xp.reshape(f, (-1,)), xp.reshape(cot_y, (-1,))]
        for g, size in zip(cot_leaves, sizes, strict=True):
            g = xp.reshape(g, (size,))
            parts.append(g if g.dtype == z.dtype else xp.astype(g, z.dtype))
        return xp.concat(parts)

    return aug
