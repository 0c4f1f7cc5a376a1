"""The checkpoint gradient of one trajectory as plain scalar Python, for compilers of such code.

:func:`replay_trajectory` is ``odecore.adjoint.checkpoint`` for one trajectory solved by the
kernel loop (``odecore.kernels.loop``), whose tape holds every accepted step's times and
start state. Last step first, it recomputes the step's stages, keeping each stage's input,
and sends the cotangents back through the outputs inside the step, the new state and the
stage equations ``Y_i = y + h sum_j a_ij K_j``, ``K_i = f(t_i, Y_i)``, with one VJP of the
dynamics per stage. Step sizes are constants, as in the generic replay: the error control is
not differentiated.

It is written like the loop (loops over state elements, scalar arithmetic, no allocation)
and calls the loop's own functions for the stage inputs and evaluations, so the step it
differentiates is the step the solve took. ``odecore.kernels.compile.compiled_replay``
binds them with the dynamics and their VJP in place, ``vjp(t, y, params, cotangent, y_bar,
params_bar)``, which writes the cotangents of ``y`` and ``params`` for ``cotangent`` on
``f(t, y, params)``.
"""

from __future__ import annotations

from odecore.kernels.loop import (
    DIRECTION,
    FIRST_DENSE_ROW,
    TAPE_H,
    TAPE_T,
    TAPE_T_NEW,
    Y_NEW,
    Y_STAGE,
    Y,
    dense_stage_sum,
    evaluate,
    interpolant_weights,
    is_member,
    jump_above,
    jump_below,
    solution_sum,
    stage_sum,
    state_size,
    state_time,
    time_of_stage,
)
from odecore.kernels.tableau import DENSE_STAGES, EXTRA_STAGES, FSAL, STAGES, B

# Rows of the cotangent array (rows, state size), in the state's dtype.
ADJOINT = 0  # the cotangent of the state at the end of the step being replayed
Y_BAR = 1  # of the step's start state, summed over its uses
NEW_BAR = 2  # of y_new
VJP_Y = 3  # a VJP's cotangent of its state
COTANGENT_ROWS = 4


def vjp(t, y, params, cotangent, y_bar, params_bar):
    """The VJP of the user's dynamics, in place; ``compiled_replay`` binds it."""
    raise NotImplementedError("the replay runs with the VJP bound by compiled_replay()")


def pull(t, inputs, node, params, direction, k_bar, cot, params_bar, params_vjp):
    """The cotangent of node ``node``'s stage ``K = f(t, inputs[node])`` (``k_bar[node]``)
    sent to its input, into ``cot[VJP_Y]``, and to the parameters, added to
    ``params_bar``. The loop evaluates ``direction * f(direction * t, Y)``, so both turn
    with the time; the VJP is linear in its cotangent, so turning its results suffices."""
    for i in range(state_size(inputs)):
        cot[VJP_Y, i] = 0.0
    for p in range(params_vjp.shape[0]):
        params_vjp[p] = 0.0
    vjp(
        state_time(direction * t),
        inputs[node],
        params,
        k_bar[node],
        cot[VJP_Y],
        params_vjp,
    )
    for p in range(params_vjp.shape[0]):
        params_bar[p] += direction * params_vjp[p]
    if direction < 0:
        for i in range(state_size(inputs)):
            cot[VJP_Y, i] = -cot[VJP_Y, i]


def spread(cot, row, h, table, table_row, count, k_bar):
    """A stage input's cotangent ``cot[row]`` sent to what it was formed from, ``y + sum_j
    (h table[table_row, j]) K_j``: added to ``cot[Y_BAR]`` and to ``k_bar[j]``."""
    for i in range(state_size(cot)):
        value = cot[row, i]
        cot[Y_BAR, i] += value
        for j in range(count):
            w = table[table_row, j]
            if w != 0.0:
                k_bar[j, i] += (h * w) * value


def recompute_stages(t, h, t_left, clip, params, tab, settings, work, inputs, node_t):
    """The stages of the step from ``work[Y]`` at ``t`` (``K_0`` already evaluated), as
    ``loop.take_step`` forms them, keeping each stage's input in ``inputs`` and its time in
    ``node_t``; ``y_new`` into ``work[Y_NEW]``."""
    (tab_a, tab_c, tab_b, _, _, _, sizes) = tab
    direction = settings[DIRECTION]
    count = sizes[STAGES]
    for i in range(1, count):
        stage_sum(work, h, i, tab_a)
        node_t[i] = time_of_stage(t, h, tab_c[i], clip, t_left)
        for e in range(state_size(work)):
            inputs[i, e] = work[Y_STAGE, e]
        evaluate(node_t[i], work, Y_STAGE, FIRST_DENSE_ROW + i, params, direction)
    if sizes[FSAL] != 0:
        for e in range(state_size(work)):
            work[Y_NEW, e] = work[Y_STAGE, e]
    else:
        solution_sum(work, h, tab_b, count)


def dense_nodes(t, h, t_left, params, tab, settings, work, inputs, node_t):
    """The nodes only the interpolant weights, as ``loop.fill_outputs`` evaluates them: ``f``
    at ``y_new`` (a method that is not FSAL) and the extra dense stages, keeping inputs and
    times."""
    (_, _, _, _, dense_a, dense_c, sizes) = tab
    direction = settings[DIRECTION]
    count = sizes[STAGES]
    f_new = count - 1 if sizes[FSAL] != 0 else count
    if sizes[FSAL] == 0:
        node_t[f_new] = t_left
        for e in range(state_size(work)):
            inputs[f_new, e] = work[Y_NEW, e]
        evaluate(t_left, work, Y_NEW, FIRST_DENSE_ROW + f_new, params, direction)
    first_extra = sizes[DENSE_STAGES] - sizes[EXTRA_STAGES]
    for x in range(sizes[EXTRA_STAGES]):
        row = first_extra + x
        dense_stage_sum(work, h, x, dense_a, row)
        at = t + dense_c[x] * h
        node_t[row] = at
        for e in range(state_size(work)):
            inputs[row, e] = work[Y_STAGE, e]
        evaluate(at, work, Y_STAGE, FIRST_DENSE_ROW + row, params, direction)


def replay_step(
    k,
    out_index,
    tape_times,
    tape_y,
    params,
    ts,
    jumps,
    out_bar,
    tab,
    settings,
    scratch,
    params_bar,
):
    """Accepted step ``k`` replayed backward: ``cot[ADJOINT]`` holds the cotangent of its
    end state on entry and of its start state on return; ``params_bar`` gains the step's
    share. ``out_index`` is the last output not yet sent back; returns the next one.
    ``scratch``: see :func:`replay_trajectory`."""
    (tab_a, _, tab_b, dense, dense_a, _, sizes) = tab
    (work, inputs, node_t, k_bar, cot, params_vjp, weights) = scratch
    direction = settings[DIRECTION]
    n = state_size(work)
    count = sizes[STAGES]
    nodes = sizes[DENSE_STAGES]
    fsal = sizes[FSAL] != 0
    t = tape_times[k, TAPE_T]
    h = tape_times[k, TAPE_H]
    t_new = tape_times[k, TAPE_T_NEW]
    has_jumps = jumps.shape[0] > 0

    # The step as the loop took it: after a jump, K_0 is the right limit's; a step that ends
    # on one evaluates its last stages at the left limit.
    t_first = t
    t_left = t_new
    if has_jumps:
        if is_member(t, jumps):
            t_first = jump_above(t)
        if is_member(t_new, jumps):
            t_left = jump_below(t_new)
    for e in range(n):
        work[Y, e] = tape_y[k, e]
        inputs[0, e] = tape_y[k, e]
    node_t[0] = t_first
    evaluate(t_first, work, Y, FIRST_DENSE_ROW, params, direction)
    recompute_stages(t, h, t_left, has_jumps, params, tab, settings, work, inputs, node_t)

    for r in range(nodes):
        for e in range(n):
            k_bar[r, e] = 0.0
    for e in range(n):
        cot[Y_BAR, e] = 0.0
        cot[NEW_BAR, e] = cot[ADJOINT, e]

    # The outputs in (t, t_new]: y_new itself at t_new, the interpolant inside.
    interpolated = False
    first = out_index
    while out_index > 0 and ts[out_index] > t:
        if ts[out_index] == t_new:
            for e in range(n):
                cot[NEW_BAR, e] += out_bar[out_index, e]
        else:
            interpolated = True
        out_index -= 1
    if interpolated:
        dense_nodes(t, h, t_left, params, tab, settings, work, inputs, node_t)
        h_safe = h if h > 0 else 1.0
        for j in range(out_index + 1, first + 1):
            if ts[j] == t_new:
                continue
            interpolant_weights((ts[j] - t) / h_safe, dense, weights)
            for e in range(n):
                value = out_bar[j, e]
                cot[Y_BAR, e] += value
                for r in range(nodes):
                    k_bar[r, e] += (h * weights[0, r]) * value
        # Last node first: the extra stages, then f at y_new (a method that is not FSAL).
        first_extra = nodes - sizes[EXTRA_STAGES]
        for x in range(sizes[EXTRA_STAGES] - 1, -1, -1):
            row = first_extra + x
            pull(node_t[row], inputs, row, params, direction, k_bar, cot, params_bar, params_vjp)
            spread(cot, VJP_Y, h, dense_a, x, row, k_bar)
        if not fsal:
            at = node_t[count]
            pull(at, inputs, count, params, direction, k_bar, cot, params_bar, params_vjp)
            for e in range(n):
                cot[NEW_BAR, e] += cot[VJP_Y, e]

    # y_new: an FSAL method's last stage input; else the weights b.
    last = count - 1
    if fsal:
        pull(node_t[last], inputs, last, params, direction, k_bar, cot, params_bar, params_vjp)
        for e in range(n):
            cot[VJP_Y, e] += cot[NEW_BAR, e]
        spread(cot, VJP_Y, h, tab_a, last, last, k_bar)
        last -= 1
    else:
        spread(cot, NEW_BAR, h, tab_b, B, count, k_bar)
    for i in range(last, 0, -1):
        pull(node_t[i], inputs, i, params, direction, k_bar, cot, params_bar, params_vjp)
        spread(cot, VJP_Y, h, tab_a, i, i, k_bar)
    pull(node_t[0], inputs, 0, params, direction, k_bar, cot, params_bar, params_vjp)
    for e in range(n):
        cot[ADJOINT, e] = cot[Y_BAR, e] + cot[VJP_Y, e]
    return out_index


def replay_trajectory(
    tape_times,
    tape_y,
    steps,
    params,
    ts,
    jumps,
    out_bar,
    tab,
    settings,
    scratch,
    params_bar,
):
    """The checkpoint gradient of one trajectory's first ``steps`` taped steps: on return
    ``cot[ADJOINT]`` holds the cotangent of ``y0`` from the outputs after ``ts[0]``
    (``out_bar`` (T, state size), loop time), and ``params_bar`` (zeroed by the caller) that
    of the parameters.

    ``scratch`` is the tuple ``(work, inputs, node_t, k_bar, cot, params_vjp, weights)``:
    ``work`` (``loop.work_rows(sizes)``, state size), ``inputs`` and ``k_bar`` (dense
    stages, state size) and ``cot`` (:data:`COTANGENT_ROWS`, state size) in the state's
    dtype; ``node_t`` (dense stages,) and ``weights`` (1, dense stages) in float64;
    ``params_vjp`` shaped like ``params``."""
    work, cot = scratch[0], scratch[4]
    n = state_size(work)
    for e in range(n):
        cot[ADJOINT, e] = 0.0
    # The last output the taped steps reached: a failed solve's later ones are NaN, and
    # their cotangents are not sent back.
    out_index = ts.shape[0] - 1
    if steps > 0:
        while out_index > 0 and ts[out_index] > tape_times[steps - 1, TAPE_T_NEW]:
            out_index -= 1
    for k in range(steps - 1, -1, -1):
        out_index = replay_step(
            k, out_index, tape_times, tape_y, params, ts, jumps, out_bar, tab, settings,
            scratch, params_bar,
        )  # fmt: skip


# Functions a compiler should inline. Not pull: each of its calls is one call of the VJP,
# and inlined at its six sites it made a replay take twice as long to compile.
INLINE = ("spread",)

# In dependency order, after the loop's functions (compile.compiled_replay).
REPLAY_FUNCTIONS = (
    pull,
    spread,
    recompute_stages,
    dense_nodes,
    replay_step,
    replay_trajectory,
)
