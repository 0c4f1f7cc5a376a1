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

import math

from odecore._rk import lincomb

ADJOINT_MODES = ("direct", "backsolve", "checkpoint")


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
        self.solution = None

    def forward(self, y0, t, *leaves):
        record = self.mode == "checkpoint"
        problem, solution, tape = self.run(y0, t, record=record, leaves=list(leaves))
        self.solution = solution
        # The residuals hold the outputs through a stop_gradient alias: the framework's
        # record of this operation keeps the residuals, and a reference back to its own
        # output would be a cycle that keeps the tape alive until the cyclic GC runs.
        return solution.ys, (problem, problem.backend.stop_gradient(solution.ys), tape)

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
        if self.mode == "checkpoint":
            a0, leaves_bar = _checkpoint_backward(problem, tape, ys_bar)
        else:
            a0, leaves_bar = _backsolve_backward(problem, ys, ys_bar, self.backsolve_settings)
        want_t = needs is None or bool(needs[1])
        y0_bar, t_bar, leaves_bar = _finish_gradients(problem, ys, ys_bar, a0, leaves_bar, want_t)
        return (y0_bar, t_bar, *leaves_bar)


def _user_f(problem, i, y_user):
    """``f(t_i, y)`` in the user's terms (time, shape and sign), for output ``i``."""
    bk, dyn, lay = problem.backend, problem.dynamics, problem.layout
    xp = bk.xp
    s_i = problem.ts_array[i]
    t_ctl = problem.ops.full(lay.batch, 0.0) + s_i if not problem.ops.scalar else float(s_i)
    f = lay.to_user(xp, dyn(t_ctl, lay.to_internal(xp, y_user)))
    return f * dyn.sign


def _finish_gradients(problem, ys, ys_bar, a0, leaves_bar, want_t=True):
    """Add the direct terms: the output at t_0 is y0 itself, and the time gradients."""
    bk = problem.backend
    xp = bk.xp
    y0_bar = a0 + ys_bar[0]
    T = ys.shape[0]
    t_bar = None
    if want_t:
        t_bar = [None] * T
        for i in range(1, T):
            t_bar[i] = xp.sum(ys_bar[i] * _user_f(problem, i, ys[i]))
        t_bar[0] = -xp.sum(a0 * _user_f(problem, 0, ys[0]))
        t_bar = xp.stack([xp.astype(v, problem.t_user_dtype) for v in t_bar])
    leaves_bar = [
        xp.astype(g, leaf.dtype) if g.dtype != leaf.dtype else g
        for g, leaf in zip(leaves_bar, problem.dynamics.leaves, strict=True)
    ]
    return y0_bar, t_bar, leaves_bar


# --------------------------------------------------------------------------------------------
# Backsolve: the continuous adjoint (Pontryagin; Chen et al. 2018)


def _backsolve_backward(problem, ys, ys_bar, settings):
    """Solve ``[y, a, a_theta]`` backward from the last output time to the first:
    ``y' = f``, ``a' = -a df/dy``, ``a_theta' = -a df/dtheta``. At every output time ``y`` is
    reset to the stored forward value (so the backward ``y`` never drifts from the forward
    one) and the output's cotangent is added to ``a``. One joint solve serves the whole
    batch; memory does not grow with the number of steps."""
    from odecore._solve import _prepare, _run_loop

    bk, dyn, lay = problem.backend, problem.dynamics, problem.layout
    xp = bk.xp
    # The backward state is in the user's dtype: for a 16-bit state its solve, like the
    # forward one, then keeps its loop in float32 and calls func in the user's dtype.
    shape, dtype = lay.shape, lay.user_dtype
    m = math.prod(shape)
    leaves = dyn.leaves
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    aug = _augmented_dynamics(bk, dyn, shape, m, leaves, sizes)

    options = dict(settings.get("options") or {})
    if settings["adaptive"]:
        # The adjoint's error grows along most of the backward solve (it accumulates
        # sensitivity), where holding the step after each accepted one ends in a rejection;
        # on bench_jax's neural ODE, shrinking instead saved 8% of the backward evaluations.
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
    dt_next = _usable_step(bk, problem.dt_next) if seed else None
    a = xp.zeros(shape, dtype=dtype)
    a_theta = xp.zeros((sum(sizes),), dtype=dtype)
    t_user = problem.ts_array * dyn.sign
    for i in range(ys.shape[0] - 1, 0, -1):
        a = a + ys_bar[i]
        z0 = xp.concat([xp.reshape(ys[i], (-1,)), xp.reshape(a, (-1,)), a_theta])
        interval = options if dt_next is None else {**options, "first_step": dt_next}
        backward = _prepare(
            bk,
            aug,
            z0,
            xp.stack([t_user[i], t_user[i - 1]]),
            None,
            settings["rtol"],
            settings["atol"],
            settings["method"],
            interval,
            None,
            None,
        )
        backward, sol, _ = _run_loop(backward, record=False, throw=True)
        dt_next = _usable_step(bk, backward.dt_next) if seed else None
        z = sol.ys[-1]
        a = xp.reshape(z[m : 2 * m], shape)
        a_theta = z[2 * m :]
    leaves_bar, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        leaves_bar.append(xp.reshape(a_theta[start : start + size], leaf.shape))
        start += size
    return a, leaves_bar


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


def _augmented_dynamics(bk, dyn, shape, m, leaves, sizes):
    xp = bk.xp
    batch = dyn.layout.batch if dyn.layout.batched else None

    def aug(t, z):
        y = xp.reshape(z[:m], shape)
        # The VJP with -a gives -a df/dy and -a df/dtheta at once: one negation of the
        # state-sized adjoint instead of one per output part.
        neg_a = -xp.reshape(z[m : 2 * m], shape)
        t_user = xp.broadcast_to(t, (batch,)) if batch is not None else t
        f, cot_y, cot_leaves = bk.dynamics_vjp(
            dyn.func, dyn.params, leaves, t_user, y, neg_a, want_value=True
        )
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


def _checkpoint_backward(problem, tape, ys_bar):
    """Replay every recorded step backward with local VJPs of the dynamics.

    Each record holds a step's start ``(t, y)``, its size and whether it was accepted. The
    step's stages are recomputed, then the cotangents flow backward through the stage
    equations ``Y_i = y + h sum_j a_ij K_j``, ``K_i = f(t + c_i h, Y_i)``, the new state and
    the interpolated outputs inside the step. Step sizes are treated as constants, as the
    error control is not differentiable.
    """
    bk, lay = problem.backend, problem.layout
    xp = bk.xp
    out_bar = lay.outputs_to_internal(xp, ys_bar)
    a = xp.zeros(lay.internal_shape, dtype=lay.dtype)
    leaves_bar = [xp.zeros(leaf.shape, dtype=lay.dtype) for leaf in problem.dynamics.leaves]
    if isinstance(tape, dict):
        a, leaves_bar = _replay_buffers(problem, tape, a, leaves_bar, out_bar)
        return lay.to_user(xp, a), leaves_bar
    for record in reversed(tape):
        a, grads = _replay_step(problem, record, a, out_bar)
        leaves_bar = [g + xp.astype(d, g.dtype) for g, d in zip(leaves_bar, grads, strict=True)]
    # NumPy turns 0-d arithmetic into scalars; hand back arrays like the other mode does.
    return lay.to_user(xp, a), [xp.asarray(g) for g in leaves_bar]


def _replay_buffers(problem, tape, a, leaves_bar, out_bar):
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
        a, grads = _replay_step(problem, record(start + k, states[k]), a, out_bar)
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


def _replay_step(problem, record, a, out_bar):
    bk, ops, rk, dyn = problem.backend, problem.ops, problem.method, problem.dynamics
    xp = bk.xp
    t, h, t_new, y, accept = record
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
