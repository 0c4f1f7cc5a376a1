"""The checkpoint gradient: the exact gradient of the discrete solve, replaying the recorded steps
backward with local vector-Jacobian products.
"""

from __future__ import annotations

from odecore.ode.tape import KernelTape, TapeBuffers, checkpoint_rows


def checkpoint_backward(problem, tape, ys_bar):
    """Replay every recorded step backward with local VJPs of the dynamics.

    Each record holds a step's start ``(t, y)``, its size and whether it was accepted. The
    step's stages are recomputed, then the cotangents flow backward through the stage
    equations ``Y_i = y + h sum_j a_ij K_j``, ``K_i = f(t + c_i h, Y_i)``, the new state and
    the interpolated outputs inside the step. Step sizes are treated as constants, as the
    error control is not differentiable.

    A batch records a step for every sample, also for those that rejected it: those are
    replayed with size zero. What they send back is zero either way, but the stages of the
    rejected trial may have overflowed, and zero times their infinite partial derivatives
    is NaN, which a parameter shared by the batch would sum.
    """
    bk, lay = problem.backend, problem.layout
    if isinstance(tape, KernelTape):  # a compiled solve's: replayed compiled, the same way
        return bk.kernels.replay(problem, tape, ys_bar)
    xp = bk.xp
    out_bar = lay.outputs_to_internal(xp, ys_bar)
    a = xp.zeros(lay.internal_shape, dtype=lay.dtype)
    leaves_bar = [xp.zeros(leaf.shape, dtype=lay.dtype) for leaf in problem.dynamics.leaves]
    if isinstance(tape, TapeBuffers):
        a, leaves_bar = _replay_buffers(problem, tape, a, leaves_bar, out_bar)
        return lay.to_user(xp, a), leaves_bar
    for record in reversed(tape):
        a, grads = _replay_step(problem, record, a, out_bar)
        leaves_bar = [g + xp.astype(d, g.dtype) for g, d in zip(leaves_bar, grads, strict=True)]
    # NumPy turns 0-d arithmetic into scalars; hand back arrays like the other mode does.
    return lay.to_user(xp, a), [xp.asarray(g) for g in leaves_bar]


def _replay_buffers(problem, tape, a, leaves_bar, out_bar):
    """Replay a tracing backend's tape (``odecore.ode.tape.TapeBuffers``) in loops: its
    steps fall into runs of ``stride`` steps, of which only the first state was kept.
    For each run, last to first, the other states are recomputed forward into a buffer,
    then the run's steps are replayed backward."""
    bk, ops, xp = problem.backend, problem.ops, problem.backend.xp
    solver, dyn = problem.solver, problem.dynamics

    n, stride = tape.n, tape.stride
    _, longest = checkpoint_rows(tape.t.shape[0])
    states = xp.zeros((longest, *problem.layout.internal_shape), dtype=problem.layout.dtype)

    def evaluate(t, y):
        return dyn(t, y), None

    def advance(c):
        k, start, states = c
        t, h, t_new, y, accept = tape.record(start + k - 1, states[k - 1])
        hy = ops.to_state(h)
        stages, _ = solver.linearized(
            evaluate, t, y, h, hy, solver.new_node, cap=_replayed_times(problem, t, t_new)
        )
        y_new = solver.node_input(solver.new_node, y, hy, stages)
        return k + 1, start, bk.write(states, k, ops.select_rows(accept, y_new, y))

    def replay(c):
        k, start, states, a, leaves_bar = c
        a, grads = _replay_step(problem, tape.record(start + k, states[k]), a, out_bar)
        leaves_bar = [g + xp.astype(d, g.dtype) for g, d in zip(leaves_bar, grads, strict=True)]
        return k - 1, start, states, a, leaves_bar

    def run(c):
        j, states, a, leaves_bar = c
        start = j * stride
        length = xp.minimum(stride, n - start)
        states = bk.write(states, 0, tape.y[j])
        _, _, states = bk.while_loop(lambda c: c[0] < length, advance, (1, start, states))
        carry = (length - 1, start, states, a, leaves_bar)
        _, _, states, a, leaves_bar = bk.while_loop(lambda c: c[0] >= 0, replay, carry)
        return j - 1, states, a, leaves_bar

    runs = (n + stride - 1) // stride
    _, _, a, leaves_bar = bk.while_loop(lambda c: c[0] >= 0, run, (runs - 1, states, a, leaves_bar))
    return a, leaves_bar


def _replayed_times(problem, t, t_new):
    """The bound on a replayed step's evaluation times, or None, so that the replay
    evaluates where the forward step did (see odecore.ode.loop.step): a step that ended on
    a jump evaluated its stages at c = 1 just before it (the left limit), and a step that
    starts on one took as its first stage f just after it (the right limit)."""
    if problem.jumps is None:
        return None
    ops = problem.ops
    t_left = ops.left_limit(t_new, ops.is_member(t_new, problem.jumps))
    start = ops.where(ops.is_member(t, problem.jumps), ops.jump_above(t), t)

    def cap(t_stage):
        return ops.maximum(ops.minimum(t_stage, t_left), start)

    return cap


def _replay_step(problem, record, a, out_bar):
    bk, ops, solver, dyn = problem.backend, problem.ops, problem.solver, problem.dynamics
    xp = bk.xp
    t, h, t_new, y, accept = record
    # A single eager sample records accepted steps only.
    if not ops.scalar:
        h = ops.where(accept, h, 0.0)
        # A sample that never started (a NaN y0) or stopped at a non-finite state holds it
        # in the steps it does not take: f and its VJP there give NaN even for a zero
        # cotangent, which a parameter shared by the batch would sum. Such rows are replayed
        # at zero instead; what they send back is zero either way.
        finite = xp.where(xp.isfinite(y), y, xp.zeros_like(y))
        y = ops.select_rows(accept, y, finite)
        record = record._replace(h=h, y=y)
    hy = ops.to_state(h)
    a_in = ops.select_rows(accept, a, a * 0.0)
    outputs = _outputs_in_step(problem, t, t_new, accept)
    interpolated = [o for o in outputs if not o[2]]
    new_node = solver.new_node

    # Recompute the stages of the step before y_new, keeping each evaluation's pullback: the
    # VJPs below reuse these evaluations instead of repeating them. The stages from y_new's
    # on serve only the interpolant (see _interpolated_cotangents).
    cap = _replayed_times(problem, t, t_new)
    stages = solver.linearized(dyn.linearize, t, y, h, hy, new_node, cap=cap)

    k_bar = [None] * (new_node + 1)
    input_bar = [None] * (new_node + 1)
    input_bar[new_node] = a_in
    y_bar = a_in * 0.0
    grads = [None] * len(dyn.leaves)
    rows = ops.rows_index(problem.layout.batch)
    for index, mask, exact in outputs:
        if exact:  # the forward pass wrote y_new itself, not the interpolant
            cot = ops.select_rows(mask, out_bar[ops.out_index(index, rows)], a_in * 0.0)
            input_bar[new_node] = input_bar[new_node] + cot
    if interpolated and problem.interp == "linear":
        # The output was y + theta (y_new - y) (odecore.ode.outputs): its cotangent splits
        # between y and y_new, and no stage is evaluated.
        h_safe = ops.where(h > 0, h, 1.0)
        for index, mask, _ in interpolated:
            cot = ops.select_rows(mask, out_bar[ops.out_index(index, rows)], a_in * 0.0)
            theta_cot = ops.to_state((problem.ts[index] - t) / h_safe) * cot
            input_bar[new_node] = input_bar[new_node] + theta_cot
            y_bar = y_bar + (cot - theta_cot)
        interpolated = []
    if interpolated:
        # A tracing backend does not know which steps hold an interpolated output (most do
        # not): the interpolant's cotangents, with the evaluation of f(t_new, y_new) and any
        # further dense stages, run only where one does.
        def through_interpolant():
            return _interpolated_cotangents(problem, record, stages, interpolated, out_bar, cap)

        if bk.eager:
            dense = through_interpolant()
        else:
            any_output = interpolated[0][1]
            for _, mask, _ in interpolated[1:]:
                any_output = any_output | mask
            zero = y * 0.0
            nothing = (
                zero,
                [zero] * new_node,
                [xp.zeros(leaf.shape, dtype=leaf.dtype) for leaf in dyn.leaves],
            )
            dense = bk.cond(ops.any(any_output), through_interpolant, lambda: nothing)
        y_bar, k_bar[:new_node], grads = dense

    y_bar, grads = solver.pull_back(
        hy, range(new_node, -1, -1), stages[1], k_bar, input_bar, y_bar, grads
    )
    grads = [
        xp.zeros(leaf.shape, dtype=problem.layout.dtype) if g is None else g
        for g, leaf in zip(grads, dyn.leaves, strict=True)
    ]
    return ops.select_rows(accept, y_bar, a), grads


def _interpolated_cotangents(problem, record, stages, interpolated, out_bar, cap):
    """What the step's interpolated outputs send back, through every node from the last
    to y_new's: ``(y_bar, k_bar of the stages before y_new, parameter cotangents)``.
    Evaluates (with pullbacks) the stages the interpolant adds to ``stages``:
    ``f(t_new, y_new)`` and any dense-only stages."""
    ops, solver, dyn = problem.ops, problem.solver, problem.dynamics
    t, h, _, y, _ = record
    hy = ops.to_state(h)
    n_nodes = len(solver.nodes)
    _, pulls = solver.linearized(dyn.linearize, t, y, h, hy, n_nodes, known=stages, cap=cap)

    k_bar = [None] * n_nodes
    y_bar = y * 0.0
    rows = ops.rows_index(problem.layout.batch)
    h_safe = ops.where(h > 0, h, 1.0)
    for index, mask, _ in interpolated:
        cot = ops.select_rows(mask, out_bar[ops.out_index(index, rows)], y * 0.0)
        theta = (problem.ts[index] - t) / h_safe
        y_bar = y_bar + cot
        for j, w in enumerate(solver.dense_weights(ops, theta)):
            k_bar[j] = _add(k_bar[j], hy * w * cot)

    # Linear: y_new's cotangent from here is carried through y_new's node now, and the
    # caller carries the rest (the state's adjoint, exact outputs) the same way.
    nodes = range(n_nodes - 1, solver.new_node - 1, -1)
    y_bar, grads = solver.pull_back(
        hy, nodes, pulls, k_bar, [None] * n_nodes, y_bar, [None] * len(dyn.leaves)
    )
    k_bar = [y * 0.0 if k is None else k for k in k_bar[: solver.new_node]]
    grads = [
        g if g is not None else problem.backend.xp.zeros(leaf.shape, dtype=leaf.dtype)
        for g, leaf in zip(grads, dyn.leaves, strict=True)
    ]
    return y_bar, k_bar, grads


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
