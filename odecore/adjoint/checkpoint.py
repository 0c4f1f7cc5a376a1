"""The checkpoint gradient: the exact gradient of the discrete solve, replaying the recorded steps
backward with local vector-Jacobian products.
"""

from __future__ import annotations

from odecore._rk import lincomb
from odecore.ode.tape import checkpoint_rows


def checkpoint_backward(problem, tape, ys_bar, failed):
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
    """Replay a tracing backend's tape (``odecore.ode.tape_buffers``) in loops: its
    steps fall into runs of ``stride`` steps, of which only the first state was kept.
    For each run, last to first, the other states are recomputed forward into a buffer,
    then the run's steps are replayed backward."""
    bk, ops, xp = problem.backend, problem.ops, problem.backend.xp

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
    odecore.ode.step); a replay must see the same left limit."""
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
