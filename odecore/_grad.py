"""Gradients of a solve: the backsolve (continuous) adjoint and checkpointed exact gradients.

Both are written once, against the Backend protocol: ``Backend.dynamics_vjp`` gives
vector-Jacobian products of the dynamics (torch autograd, or the dynamics' own ``vjp`` on
NumPy), and ``Backend.custom_vjp`` attaches the pair ``forward`` / ``backward`` below to the
framework's autodiff. A NumPy user gets ``backward`` as a pullback from
:func:`odecore.vjp_odeint`.

Time gradients in every mode use the identities of the exact flow: moving an output time
``t_i`` changes ``y(t_i)`` at rate ``f(t_i, y(t_i))``, and moving ``t_0`` shifts the whole
trajectory, ``dL/dt_0 = -a(t_0) . f(t_0, y_0)`` with ``a`` the adjoint. On the discrete
solution they hold to the solver's tolerance.
"""

from __future__ import annotations

import functools
import math

from odecore._rk import lincomb
from odecore.backend import differentiate, library_of
from odecore.backend.tree import arrays_held_by
from odecore.backend.tree import leaves as tree_leaves


class SolveRule:
    """One solve as a framework-neutral forward / backward pair."""

    def __init__(self, mode: str, run, backsolve_settings: dict | None = None, prepare=None):
        # ``run(y0, t, record, leaves)`` prepares and runs the forward loop, returning
        # (problem, solution, tape); it is _solve's, passed in to keep one loop.
        # ``prepare(y0, t, leaves)`` only prepares: see ``from_arrays``.
        self.mode = mode
        self.run = run
        self.prepare = prepare
        self.backsolve_settings = backsolve_settings or {}
        self.second_order_message = (
            f"second-order gradients (create_graph=True) are not available with "
            f"adjoint={mode!r}: its backward pass computes first-order gradients only. "
            f"Use adjoint='direct', which differentiates through the solver's operations and "
            f"supports higher-order gradients"
        )

    def forward(self, y0, t, *leaves):
        record = self.mode == "checkpoint"
        problem, solution, tape = self.run(y0, t, record=record, leaves=list(leaves))
        # The residuals hold the outputs through a stop_gradient alias: the framework's
        # record of this operation keeps the residuals, and a reference back to its own
        # output would be a cycle that keeps the tape alive until the cyclic GC runs.
        residuals = (problem, problem.backend.stop_gradient(solution.ys), tape)
        return solution.ys, solution.report(), residuals

    def captured(self):
        return [v for v in (self.backsolve_settings.get(k) for k in ("rtol", "atol")) if v]

    @staticmethod
    def residual_arrays(residuals):
        """The arrays among ``forward``'s residuals. A framework that traces the forward and
        the backward separately (JAX) can keep only arrays between them; ``from_arrays``
        rebuilds the rest from the primals. ``arrays=None`` only checks the primals."""
        problem, ys, tape = residuals
        return ys, (tape if isinstance(tape, dict) else None), problem.dt_next

    def from_arrays(self, primals, arrays):
        y0, t, *leaves = primals
        problem = self.prepare(y0, t, list(leaves))
        if arrays is None:
            return None
        ys, tape, problem.dt_next = arrays
        return problem, ys, tape

    def backward(self, residuals, ys_bar, needs=None):
        """One cotangent per primal of ``forward``: ``(y0_bar, t_bar, *leaves_bar)``.
        ``needs`` (one flag per primal, from the framework) says which are wanted; the
        time gradient costs one evaluation of the dynamics per output time, so it is
        skipped (None) when the times need none."""
        problem, ys, tape = residuals
        failed = FailedOutputs(problem.backend, problem.layout, ys)
        ys_bar, poisoned = failed.drop_cotangents(ys_bar)
        if self.mode == "checkpoint":
            a0, leaves_bar = _checkpoint_backward(problem, tape, ys_bar, failed)
        else:
            a0, leaves_bar = _backsolve_backward(
                problem, ys, ys_bar, self.backsolve_settings, failed
            )
        want_t = needs is None or bool(needs[1])
        y0_bar, t_bar, leaves_bar = _finish_gradients(
            problem, ys, ys_bar, a0, leaves_bar, want_t, failed
        )
        y0_bar, t_bar, leaves_bar = failed.poison(poisoned, y0_bar, t_bar, leaves_bar)
        return (y0_bar, t_bar, *leaves_bar)


class FailedOutputs:
    """The outputs a failed solve did not reach, and the gradient policy for them.

    A solve that fails (``throw=False``, or any failure under jit) leaves NaN in every
    output it did not reach, per sample and time. Every gradient mode, on every backend,
    treats the cotangents of those outputs the same way:

    - a zero cotangent on an unreached output is ignored, and so is everything the
      unreached output would send back: the outputs the solve did reach get exactly the
      gradients of a solve that stopped at them;
    - a nonzero cotangent (NaN included) on an unreached output means the loss depends on a
      value the solve never computed. The gradients that output depends on become NaN: its
      sample's ``y0`` gradient (samples are independent), and the gradients of the parameters
      and of the times (every sample shares them).

    Where the outputs are known, a solve that reached every output skips the policy; under
    tracing (jit) it is applied with ``where``, which changes nothing then.
    """

    def __init__(self, bk, layout, ys):
        xp = bk.xp
        self.backend, self.layout = bk, layout
        self.nan = xp.isnan(ys)
        # (T, B): True where the solve did not reach output i of sample b.
        self.unreached = xp.any(_per_sample(xp, layout, self.nan), axis=-1)
        self.active = bk.is_traced(self.unreached) or bool(xp.any(self.unreached))

    def drop_cotangents(self, ys_bar):
        """``(ys_bar with zeros on the unreached outputs, poisoned)``: ``poisoned`` (B,) says
        which samples had a nonzero cotangent on one of them; None when none could."""
        if not self.active:
            return ys_bar, None
        xp = self.backend.xp
        touched = _per_sample(xp, self.layout, self.nan & (ys_bar != 0))
        poisoned = xp.any(xp.any(touched, axis=-1), axis=0)
        return xp.where(self.nan, xp.zeros_like(ys_bar), ys_bar), poisoned

    def poison(self, poisoned, y0_bar, t_bar, leaves_bar):
        """NaN for the gradients a poisoned sample reaches: its rows of ``y0_bar``, and
        ``t_bar`` and every parameter gradient if any sample is poisoned. ``t_bar`` may be
        None (not wanted)."""
        bk, xp = self.backend, self.backend.xp
        if poisoned is None or (not bk.is_traced(poisoned) and not bool(xp.any(poisoned))):
            return y0_bar, t_bar, leaves_bar
        anywhere = xp.any(poisoned)

        def nan_where(mask, g):
            return xp.where(mask, xp.full_like(g, math.nan), g)

        y0_bar = nan_where(self.per_sample_mask(poisoned), y0_bar)
        t_bar = None if t_bar is None else nan_where(anywhere, t_bar)
        return y0_bar, t_bar, [nan_where(anywhere, g) for g in leaves_bar]

    def per_sample_mask(self, mask):
        """A (B,) mask shaped to broadcast against a state in the user's layout."""
        lay = self.layout
        shape = [1] * len(lay.shape)
        if lay.batched:
            shape[lay.batch_axis] = lay.batch
        return self.backend.xp.reshape(mask, tuple(shape))

    def reached_end(self):
        """(B,): which samples reached the last output time."""
        return self.backend.xp.logical_not(self.unreached[-1])

    def last_reached(self, ys):
        """``ys[i]`` with each unreached output replaced by its sample's last reached one:
        finite states the backsolve can hold a sample at where it did not get to."""
        xp = self.backend.xp
        held = [ys[0]]
        for i in range(1, ys.shape[0]):
            held.append(xp.where(self.nan[i], held[-1], ys[i]))
        return held


def _per_sample(xp, layout, outputs):
    """(T, *shape) -> (T, B, N): the outputs of each sample as rows."""
    if layout.flat:
        return layout.outputs_to_internal(xp, outputs)
    return xp.reshape(outputs, (outputs.shape[0], 1, -1))


class FailedSolvePolicy:
    """``direct`` mode's gradient policy for a failed solve, as a rule: the identity on
    ``ys``, whose backward drops the cotangents of unreached outputs and turns a nonzero one
    into NaN gradients for ``y0``, ``t`` and the parameters (see :class:`FailedOutputs`).
    The framework differentiates the reached outputs itself; the unreached ones are
    constants of the output buffer, so without this rule a loss on them would get no NaN."""

    second_order_message = (
        "second-order gradients (create_graph=True) are not available for the outputs of a "
        "failed solve"
    )

    def __init__(self, bk, layout):
        self.backend, self.layout = bk, layout

    def forward(self, ys, y0, t, *leaves):
        xp, sg = self.backend.xp, self.backend.stop_gradient
        # A new array, not ys itself: the framework records this operation as its origin.
        out = xp.reshape(ys, ys.shape)
        return out, {}, (sg(ys), [sg(x) for x in (y0, t, *leaves)])

    @staticmethod
    def residual_arrays(residuals):
        return residuals

    @staticmethod
    def from_arrays(primals, arrays):
        return arrays

    @staticmethod
    def captured():
        return []

    def backward(self, residuals, ys_bar, needs=None):
        ys, (y0, t, *leaves) = residuals
        xp = self.backend.xp
        failed = FailedOutputs(self.backend, self.layout, ys)
        ys_bar, poisoned = failed.drop_cotangents(ys_bar)
        want_t = (needs is None or bool(needs[2])) and xp.isdtype(t.dtype, "real floating")
        y0_bar, t_bar, leaves_bar = failed.poison(
            poisoned,
            xp.zeros_like(y0),
            xp.zeros_like(t) if want_t else None,
            [xp.zeros_like(x) for x in leaves],
        )
        return (ys_bar, y0_bar, t_bar, *leaves_bar)


def check_params_tree(bk, params, leaves, differentiated_only=True):
    """Refuse a ``params`` that hides arrays from the gradient rules: an object (a
    SimpleNamespace, a dataclass, an ``nn.Module``) that is not an array, a tuple, list or
    dict, or a pytree the backend flattens (JAX), holding arrays that are not among
    ``leaves``. They would get no gradient. With ``differentiated_only``, only arrays that
    want a gradient (``Backend.requires_grad``) count."""
    known = {id(x) for x in leaves}
    for path, leaf in tree_leaves(params, "params"):
        if library_of(leaf) is not None:
            continue
        hidden = [x for x in arrays_held_by(leaf, _is_array) if id(x) not in known]
        if not hidden or (
            differentiated_only and not differentiate.requires_grad(bk, {"hidden": hidden})
        ):
            continue
        pytree = " (or a pytree registered with JAX)" if bk.name == "jax" else ""
        remedy = {
            "jax": "register its type as a pytree (jax.tree_util.register_dataclass)",
            "torch": "make func an nn.Module that owns them, list them in adjoint_params, or "
            "use adjoint='direct'",
        }.get(bk.name)
        raise TypeError(
            f"params must be an array or a nested tuple, list or dict of arrays{pytree}; "
            f"{path} is a {type(leaf).__name__} holding {len(hidden)} array(s), which the "
            f"gradient rules cannot see into, so they would get no gradient. Pass its arrays "
            f"in a tuple or dict instead (for example params=vars(obj) or "
            f"dataclasses.asdict(obj)){', or ' + remedy if remedy else ''}"
        )


def _is_array(x) -> bool:
    return library_of(x) is not None


def refuse_hidden_parameters(bk, func, params, leaves, t, y0, batch_axis):
    """Refuse arrays ``func`` uses that want a gradient without being among ``leaves``:
    backsolve and checkpoint differentiate only ``leaves``, and would give them none."""
    if bk.autodiff is None:
        return
    xp = bk.xp
    t0 = xp.astype(bk.stop_gradient(t[0]), y0.dtype)
    if batch_axis is not None:
        t0 = xp.broadcast_to(t0, (y0.shape[batch_axis],))
    hidden = bk.autodiff.hidden_parameters(func, params, leaves, t0, y0)
    if hidden:
        shapes = ", ".join(str(tuple(x.shape)) for x in hidden[:5])
        raise ValueError(
            f"func uses {len(hidden)} tensor(s) that require grad but are not among its "
            f"parameters (shapes {shapes}); adjoint='backsolve' and 'checkpoint' "
            f"differentiate only with respect to parameters they know of, so these would "
            f"get no gradient. Pass them with params=... (func(t, y, params)), list them "
            f"in adjoint_params=..., or make func an nn.Module that owns them"
        )


def _user_f(problem, i, y_user):
    """``f(t_i, y)`` in the user's terms (time, shape and sign), for output ``i``."""
    bk, dyn, lay = problem.backend, problem.dynamics, problem.layout
    xp = bk.xp
    s_i = problem.ts_array[i]
    t_ctl = problem.ops.full(lay.batch, 0.0) + s_i if not problem.ops.scalar else float(s_i)
    f = lay.to_user(xp, dyn(t_ctl, lay.to_internal(xp, y_user)))
    return f * dyn.sign


def _finish_gradients(problem, ys, ys_bar, a0, leaves_bar, want_t, failed):
    """Add the direct terms: the output at t_0 is y0 itself, and the time gradients."""
    bk = problem.backend
    xp = bk.xp
    y0_bar = a0 + ys_bar[0]
    T = ys.shape[0]
    t_bar = None
    if want_t:
        # An unreached output's cotangent is zero, and its rate is taken at a finite state.
        states = failed.last_reached(ys) if failed.active else ys
        t_bar = [None] * T
        for i in range(1, T):
            t_bar[i] = xp.sum(ys_bar[i] * _user_f(problem, i, states[i]))
        t_bar[0] = -xp.sum(a0 * _user_f(problem, 0, ys[0]))
        t_bar = xp.stack([xp.astype(v, problem.t_user_dtype) for v in t_bar])
    leaves_bar = [
        xp.astype(g, leaf.dtype) if g.dtype != leaf.dtype else g
        for g, leaf in zip(leaves_bar, problem.dynamics.leaves, strict=True)
    ]
    return y0_bar, t_bar, leaves_bar


# --------------------------------------------------------------------------------------------
# Backsolve: the continuous adjoint (Pontryagin; Chen et al. 2018)


def _backsolve_backward(problem, ys, ys_bar, settings, failed):
    """Solve ``[y, a, a_theta]`` backward from the last output time to the first:
    ``y' = f``, ``a' = -a df/dy``, ``a_theta' = -a df/dtheta``. At every output time ``y`` is
    reset to the stored forward value (so the backward ``y`` never drifts from the forward
    one) and the output's cotangent is added to ``a``. One joint solve serves the whole
    batch; memory does not grow with the number of steps.

    A sample that a failed solve did not take to output ``i`` is frozen over the interval
    from ``t_i`` back: held at its last reached state with ``y' = 0``, and its adjoint is
    zero there (``failed`` has dropped the cotangents of unreached outputs), so it can
    neither fail nor disturb the others. Its backward starts at its last reached output."""
    from odecore._solve import _prepare, _run_loop

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
    parts = [m, m, sum(sizes)]
    if options.get("norm") == "seminorm":
        # The parameter adjoint does not influence the step size, it only accumulates
        # (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE").
        options["norm"] = _max_of_part_norms(xp, parts[:2])
    elif "norm" not in options and settings["adaptive"]:
        options["norm"] = _max_of_part_norms(xp, parts)
    # The backward solve starts with the step the forward solve would have taken next, and
    # each later interval with the one before's: the trajectory is the same, and Hairer's
    # automatic first step misjudges the augmented state, whose parameter adjoint starts at
    # zero (its error scale is then atol alone): on a neural ODE it chose a step 10^4 times
    # too small and spent four steps growing it back.
    seed = settings["adaptive"] and "first_step" not in options and problem.controller
    dt_next = _usable_step(bk, _finished_steps(bk, problem.dt_next, failed)) if seed else None
    a = xp.zeros(shape, dtype=dtype)
    a_theta = xp.zeros((sum(sizes),), dtype=dtype)
    t_user = problem.ts_array * dyn.sign

    def interval(i, a, a_theta, dt_next):
        """Solve back from ``t_i`` to ``t_{i-1}``."""
        moving = None
        if failed.active:
            moving = failed.per_sample_mask(xp.logical_not(failed.unreached[i]))
        aug = _augmented_dynamics(bk, dyn, shape, m, leaves, sizes, moving)
        z0 = xp.concat([xp.reshape(held[i], (-1,)), xp.reshape(a, (-1,)), a_theta])
        first = options if dt_next is None else {**options, "first_step": dt_next}
        backward = _prepare(
            bk,
            aug,
            z0,
            xp.stack([t_user[i], t_user[i - 1]]),
            None,
            settings["rtol"],
            settings["atol"],
            settings["method"],
            first,
            None,
            None,
        )
        backward, sol, _ = _run_loop(backward, record=False, throw=True)
        dt_next = _usable_step(bk, backward.dt_next) if seed else None
        z = sol.ys[-1]
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
            anything, functools.partial(interval, i), _unchanged, a, a_theta, dt_next
        )
    leaves_bar, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        leaves_bar.append(xp.reshape(a_theta[start : start + size], leaf.shape))
        start += size
    return a, leaves_bar


def _unchanged(*operands):
    return operands


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


def _max_of_part_norms(xp, sizes):
    """The backward state's error norm: the largest RMS of its parts ``[y, a, a_theta]``
    (or of the leading parts only). One RMS over the whole vector would dilute the errors
    of ``y`` and ``a`` by the number of parameters, so a large parameter vector, even one
    the dynamics never use, would loosen the backward solve."""
    bounds, start = [], 0
    for size in sizes:
        if size:
            bounds.append((start, start + size))
        start += size

    def norm(z):
        rms = [
            xp.sqrt(xp.vecdot(z[..., lo:hi], z[..., lo:hi], axis=-1) / (hi - lo))
            for lo, hi in bounds
        ]
        out = rms[0]
        for r in rms[1:]:
            out = xp.maximum(out, r)
        return out

    return norm


# --------------------------------------------------------------------------------------------
# Checkpoint: the exact gradient of the discrete solve


def _checkpoint_backward(problem, tape, ys_bar, failed):
    """Replay every recorded step backward with local VJPs of the dynamics.

    Each record holds a step's start ``(t, y)``, its size and whether it was accepted. The
    step's stages are recomputed, then the cotangents flow backward through the stage
    equations ``Y_i = y + h sum_j a_ij K_j``, ``K_i = f(t + c_i h, Y_i)``, the new state and
    the interpolated outputs inside the step. Step sizes are treated as constants, as the
    error control is not differentiable.

    A failed sample's rejected steps are replayed with size zero: what they send back is
    zero either way, and the stages of the steps that made it fail may not be finite.
    """
    bk, lay = problem.backend, problem.layout
    xp = bk.xp
    out_bar = lay.outputs_to_internal(xp, ys_bar)
    a = xp.zeros(lay.internal_shape, dtype=lay.dtype)
    leaves_bar = [xp.zeros(leaf.shape, dtype=lay.dtype) for leaf in problem.dynamics.leaves]
    # A single eager sample records accepted steps only.
    finished = failed.reached_end() if failed.active and not problem.ops.scalar else None
    if isinstance(tape, dict):
        a, leaves_bar = _replay_buffers(problem, tape, a, leaves_bar, out_bar, finished)
        return lay.to_user(xp, a), leaves_bar
    for record in reversed(tape):
        a, grads = _replay_step(problem, record, a, out_bar, finished)
        leaves_bar = [g + xp.astype(d, g.dtype) for g, d in zip(leaves_bar, grads, strict=True)]
    # NumPy turns 0-d arithmetic into scalars; hand back arrays like the other mode does.
    return lay.to_user(xp, a), [xp.asarray(g) for g in leaves_bar]


def _replay_buffers(problem, tape, a, leaves_bar, out_bar, finished):
    """Replay a tracing backend's tape (``odecore._solve._tape_buffers``) in loops: its
    steps fall into runs of ``stride`` steps, of which only the first state was kept.
    For each run, last to first, the other states are recomputed forward into a buffer,
    then the run's steps are replayed backward."""
    bk, ops, xp = problem.backend, problem.ops, problem.backend.xp
    from odecore._solve import checkpoint_rows

    n, stride = tape["n"], tape["stride"]
    _, longest = checkpoint_rows(tape["t"].shape[0])
    states = xp.zeros((longest, *problem.layout.internal_shape), dtype=problem.layout.dtype)

    def record(i, y):
        return tuple(tape[k][i] for k in ("t", "h", "t_new")) + (y, tape["accept"][i])

    def advance(c):
        k, start, states = c
        t, h, t_new, y, accept = record(start + k - 1, states[k - 1])
        Y = _stages(problem, t, h, t_new, y, problem.method.new_node + 1, linearize=False)[0]
        y_next = ops.select_rows(accept, Y[problem.method.new_node], y)
        return k + 1, start, bk.write(states, k, y_next)

    def replay(c):
        k, start, states, a, leaves_bar = c
        a, grads = _replay_step(problem, record(start + k, states[k]), a, out_bar, finished)
        leaves_bar = [g + xp.astype(d, g.dtype) for g, d in zip(leaves_bar, grads, strict=True)]
        return k - 1, start, states, a, leaves_bar

    def run(c):
        j, states, a, leaves_bar = c
        start = j * stride
        length = xp.minimum(stride, n - start)
        states = bk.write(states, 0, tape["y"][j])
        _, _, states = bk.while_loop(lambda c: c[0] < length, advance, (1, start, states))
        carry = (length - 1, start, states, a, leaves_bar)
        _, _, states, a, leaves_bar = bk.while_loop(lambda c: c[0] >= 0, replay, carry)
        return j - 1, states, a, leaves_bar

    runs = (n + stride - 1) // stride
    _, _, a, leaves_bar = bk.while_loop(lambda c: c[0] >= 0, run, (runs - 1, states, a, leaves_bar))
    return a, leaves_bar


def _stages(problem, t, h, t_new, y, n_nodes, linearize, known=None, evaluate_last=False):
    """``(Y, K, pulls)``: the stage inputs ``Y_i`` and stages ``K_i`` of the step from
    ``(t, y)`` of size ``h``, for the first ``n_nodes`` nodes. The last node's stage is
    evaluated only with ``evaluate_last`` (otherwise it feeds no later node); ``known``
    continues from an earlier call's result. With ``linearize``, ``pulls`` holds each
    evaluation's pullback.

    A step that ended on a jump evaluated its stages at c = 1 just before it (see
    odecore._solve._body); a replay must see the same left limit."""
    ops, rk, dyn = problem.ops, problem.method, problem.dynamics
    t_cap = None
    if problem.jumps is not None:
        on_jump = ops.is_member(t_new, problem.jumps)
        t_cap = ops.where(on_jump, ops.nextafter_down(t_new), t_new)

    def node_time(i):
        t_i = t if i == 0 else t + rk.node_c[i] * h
        return t_i if t_cap is None else ops.minimum(t_i, t_cap)

    hy = ops.to_state(h)
    Y, K, pulls = ([y], [], []) if known is None else (list(part) for part in known)
    for i in range(len(K), n_nodes if evaluate_last else n_nodes - 1):
        if i == len(Y):
            Y.append(y + hy * lincomb(rk.node_rows[i], K))
        if linearize:
            k, pull = dyn.linearize(node_time(i), Y[i])
        else:
            k, pull = dyn(node_time(i), Y[i]), None
        K.append(k)
        pulls.append(pull)
    if len(Y) < n_nodes:
        Y.append(y + hy * lincomb(rk.node_rows[n_nodes - 1], K))
    return Y, K, pulls


def _pull_back_nodes(problem, hy, nodes, pulls, K_bar, Y_bar, y_bar, grads):
    """Reverse mode through the step's nodes, last first: each stage's cotangent through
    its pullback into its input ``Y_i = y + h sum_j a_ij K_j``, and from there into ``y``
    and the earlier stages (``K_bar`` and ``Y_bar`` are updated in place). Returns
    ``(y_bar, grads)``."""
    for i in nodes:
        if K_bar[i] is not None:
            cot_y, cot_leaves = pulls[i](K_bar[i])
            Y_bar[i] = _add(Y_bar[i], cot_y)
            grads = [_add(g, d) for g, d in zip(grads, cot_leaves, strict=True)]
        if Y_bar[i] is None:
            continue
        y_bar = y_bar + Y_bar[i]
        if i > 0:
            for j, w in problem.method.node_rows[i].terms:
                K_bar[j] = _add(K_bar[j], hy * (w * Y_bar[i]))
    return y_bar, grads


def _replay_step(problem, record, a, out_bar, finished=None):
    bk, ops, rk, dyn = problem.backend, problem.ops, problem.method, problem.dynamics
    xp = bk.xp
    t, h, t_new, y, accept = record
    if finished is not None:
        h = ops.where(accept | finished, h, 0.0)
        record = (t, h, t_new, y, accept)
    hy = ops.to_state(h)
    a_in = ops.select_rows(accept, a, a * 0.0)
    outputs = _outputs_in_step(problem, t, t_new, accept)
    interpolated = [o for o in outputs if not o[2]]

    # Recompute the stage inputs Y_i and stages K_i of the step through y_new, keeping each
    # evaluation's pullback: the VJPs below reuse these evaluations instead of repeating
    # them. The stages past y_new serve only the interpolant (see _interpolated_cotangents).
    main = rk.new_node + 1
    stages = _stages(problem, t, h, t_new, y, main, linearize=True)

    K_bar = [None] * main
    Y_bar = [None] * main
    Y_bar[rk.new_node] = a_in
    y_bar = a_in * 0.0
    grads = [None] * len(dyn.leaves)
    rows = ops.rows_index(problem.layout.batch)
    for index, mask, exact in outputs:
        if exact:  # the forward pass wrote y_new itself, not the interpolant
            cot = ops.select_rows(mask, out_bar[ops.out_index(index, rows)], a_in * 0.0)
            Y_bar[rk.new_node] = Y_bar[rk.new_node] + cot
    if interpolated:
        # A tracing backend does not know which steps hold an interpolated output (most do
        # not): the interpolant's cotangents, with the evaluation of f(t_new, y_new) and any
        # further dense stages, run only where one does.
        def through_interpolant():
            return _interpolated_cotangents(problem, record, stages, interpolated, out_bar)

        if bk.eager:
            dense = through_interpolant()
        else:
            any_output = interpolated[0][1]
            for _, mask, _ in interpolated[1:]:
                any_output = any_output | mask
            zero = y * 0.0
            nothing = (
                zero,
                [zero] * rk.new_node,
                [xp.zeros(leaf.shape, dtype=leaf.dtype) for leaf in dyn.leaves],
            )
            dense = bk.cond(ops.any(any_output), through_interpolant, lambda: nothing)
        y_bar, K_bar[: rk.new_node], grads = dense

    y_bar, grads = _pull_back_nodes(
        problem, hy, range(rk.new_node, -1, -1), stages[2], K_bar, Y_bar, y_bar, grads
    )
    grads = [
        xp.zeros(leaf.shape, dtype=problem.layout.dtype) if g is None else g
        for g, leaf in zip(grads, dyn.leaves, strict=True)
    ]
    return ops.select_rows(accept, y_bar, a), grads


def _interpolated_cotangents(problem, record, stages, interpolated, out_bar):
    """What the step's interpolated outputs send back, through every node from the last
    to y_new's: ``(y_bar, K_bar of the stages before y_new, parameter cotangents)``.
    Evaluates (with pullbacks) the stages the interpolant adds to ``stages``:
    ``f(t_new, y_new)`` and any dense-only stages."""
    ops, rk, dyn = problem.ops, problem.method, problem.dynamics
    t, h, t_new, y, _ = record
    hy = ops.to_state(h)
    n_nodes = rk.node_count(with_dense=True)
    _, _, pulls = _stages(
        problem, t, h, t_new, y, n_nodes, linearize=True, known=stages, evaluate_last=True
    )

    K_bar = [None] * n_nodes
    y_bar = y * 0.0
    rows = ops.rows_index(problem.layout.batch)
    h_safe = ops.where(h > 0, h, 1.0)
    for index, mask, _ in interpolated:
        cot = ops.select_rows(mask, out_bar[ops.out_index(index, rows)], y * 0.0)
        theta = (problem.ts[index] - t) / h_safe
        y_bar = y_bar + cot
        for j, w in enumerate(rk.dense_weights(ops, theta)):
            K_bar[j] = _add(K_bar[j], hy * w * cot)

    # Linear: y_new's cotangent from here is carried through y_new's node now, and the
    # caller carries the rest (the state's adjoint, exact outputs) the same way.
    nodes = range(n_nodes - 1, rk.new_node - 1, -1)
    y_bar, grads = _pull_back_nodes(
        problem, hy, nodes, pulls, K_bar, [None] * n_nodes, y_bar, [None] * len(dyn.leaves)
    )
    K_bar = [y * 0.0 if k is None else k for k in K_bar[: rk.new_node]]
    grads = [
        g if g is not None else problem.backend.xp.zeros(leaf.shape, dtype=leaf.dtype)
        for g, leaf in zip(grads, dyn.leaves, strict=True)
    ]
    return y_bar, K_bar, grads


def _add(total, term):
    return term if total is None else total + term


def _outputs_in_step(problem, t, t_new, accept):
    """(output index, per-sample mask, lands exactly on the step's end) for each output
    time inside (t, t_new] of an accepted step."""
    ops = problem.ops
    ts = problem.ts
    found = []
    if ops.scalar:
        if not accept:
            return found
        for index, s in enumerate(ts):
            if t < s <= t_new:
                found.append((index, True, s == t_new))
        return found
    xp = problem.backend.xp
    for index in range(1, len(ts) if isinstance(ts, list) else ts.shape[0]):
        s = problem.ts_array[index]
        mask = accept & (t < s) & (s <= t_new)
        if not problem.backend.eager:  # masks only: which outputs a step holds is traced
            found.append((index, mask & (t_new == s), True))
            found.append((index, mask & (t_new != s), False))
            continue
        if bool(xp.any(mask)):
            exact = bool(xp.all(xp.where(mask, t_new == s, True)))
            if not exact and bool(xp.any(mask & (t_new == s))):
                # Mixed: some samples land exactly, some interpolate; split the two.
                found.append((index, mask & (t_new == s), True))
                found.append((index, mask & (t_new != s), False))
                continue
            found.append((index, mask, exact))
    return found
