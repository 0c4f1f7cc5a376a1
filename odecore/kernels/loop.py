"""The whole solve of one trajectory as plain scalar Python, for compilers of such code.

:func:`solve_trajectory` runs the generic loop (``odecore.ode.loop``) for one sample, decision
for decision and in the same order: the first step, landing on stops and on the left limit
of a jump, the Runge-Kutta stages, the error ratio, acceptance, dense output at the
requested times, the re-evaluation after a jump, the controller and the status. It takes the
same steps as the generic loop; only the order (and, for float32 states, the precision) of
floating-point sums may differ. Every decision is one of the pure rules of
``odecore.control.rules``, called as a module global, and the method is data
(``odecore.kernels.tableau``).

The code uses only loops over state elements, scalar arithmetic, ``math`` and array
indexing: no array operations, closures, dicts or objects, and it allocates nothing. So
``numba.njit`` compiles it for the CPU, and the same source can be compiled for one GPU
thread per trajectory. :func:`odecore.kernels.compile.compiled_loop` re-creates these
functions with compiled rules and with the user's dynamics as the global ``dynamics(t, y,
dy, params)``, which writes ``dy/dt`` into ``dy``. Run as it is, in Python, the module is
slow but correct, given a ``dynamics``.
"""

from __future__ import annotations

import math

from odecore.control.primitives import (
    isfinite,
    isnan,
    maximum,
    minimum,
    next_above,
    next_below,
)
from odecore.control.rules import (
    INVALID_INPUT,
    NONFINITE_STATE,
    RUNNING,
    combined_error_ratio,
    error_scale,
    failure_status,
    held_after_rejection,
    initial_step,
    initial_step_guess,
    land_on_stop,
    next_step,
    remembered_ratio,
    stalled,
    status_after_step,
    step_factor,
)
from odecore.kernels.tableau import (
    ADAPTIVE,
    B_ERR,
    B_ERR2,
    DENSE_STAGES,
    ERROR_ORDER,
    EXTRA_STAGES,
    FSAL,
    NFEV_PER_STEP,
    STAGES,
    TWO_ESTIMATES,
    B,
)

# Positions in the settings array (float64).
SAFETY = 0
IFACTOR = 1
DFACTOR = 2
ICOEFF = 3
PCOEFF = 4
SHRINK_AFTER_ACCEPT = 5  # 1.0 or 0.0
FIRST_STEP = 6  # NaN: Hairer's automatic first step
STEP_SIZE = 7  # a fixed-step method's step; inf: one step to each stop
MIN_STEP = 8
MAX_STEP = 9
MAX_NUM_STEPS = 10
DIRECTION = 11  # +1.0, or -1.0 when the user's times decrease
NORM = 12  # RMS_NORM or MAX_NORM
NO_GROWTH_AFTER_REJECT = 13  # 1.0 or 0.0
SETTINGS_SIZE = 14

RMS_NORM = 0.0
MAX_NORM = 1.0
PARTS_NORM = 2.0

# Rows of the work array (rows, state size). The stages K_0, K_1, ... follow: K_j is row
# FIRST_DENSE_ROW + j, and K_0 is f(t, y) at the step's start.
Y = 0
Y_NEW = 1
Y_STAGE = 2
ERR = 3
ERR2 = 4
FIRST_DENSE_ROW = 5

# Positions in the statistics array (int64).
NFEV = 0
NSTEPS = 1
NACCEPT = 2
NREJECT = 3

# A watched kernel (``compiled_loop(watched=True)`` binds 1) publishes its progress in the
# ``watch`` row after every step, for a thread of the caller to read while the solve runs,
# and stops when that thread sets its ``WATCH_STOP`` entry. A kernel compiled unwatched
# (0) has neither: the branches go at compile time, and the row is not touched.
WATCHED = 0
# Entries of the watch row (float64; counts are exact up to 2**53).
WATCH_T = 0  # the time reached (loop time)
WATCH_DT = 1  # the next proposed step
WATCH_ACCEPTED = 2
WATCH_REJECTED = 3
WATCH_STOP = 4  # set nonzero by the reader: the loop ends after its current step
# The trajectory's status: a stopped one (a failure, an event, an invalid start) no longer
# holds the batch's progress at the time it stopped at.
WATCH_STATUS = 5
# Entries per trajectory: one 64-byte cache line, so that the threads of an ensemble write
# to lines of their own.
WATCH_STRIDE = 8

# Columns of the tape's times (``solve_trajectory``'s ``tape_times``, float64): an accepted
# step's start, size and end (the stop it landed on, exactly, where it landed).
TAPE_T = 0
TAPE_H = 1
TAPE_T_NEW = 2
TAPE_COLUMNS = 3

# The number of state elements, when a kernel is compiled for one state size
# (``compiled_loop(state_size=...)`` binds it); 0: read from the arrays at run time. A
# constant trip count lets the compiler unroll the loops over a small state's elements,
# which for a three-element system more than halves the time of a step.
STATE_SIZE = 0

# Trajectories one thread steps together in a batch (solve_lanes), and each lane's loop
# state between its steps: times in lane_t (LANES, LANE_FLOATS) float64, counts and flags
# in lane_n (LANES, LANE_INTS) int64.
LANES = 4
LANE_T = 0
LANE_DT = 1
LANE_RATIO_PREV = 2
LANE_H = 3
LANE_T_NEW = 4
LANE_T_LEFT = 5
# The step's verdict (judge_step) and factor (size_factor), kept from the lanes' judging
# to their concluding.
LANE_RATIO = 6
LANE_FACTOR = 7
LANE_FLOATS = 8
LANE_TRAJECTORY = 0  # the trajectory the lane solves; -1: idle
LANE_STATUS = 1
LANE_OUT_INDEX = 2
LANE_STOP_INDEX = 3
LANE_NFEV = 4
LANE_NSTEPS = 5
LANE_NACCEPT = 6
LANE_NREJECT = 7
LANE_LAST_REJECTED = 8
LANE_LANDS = 9
LANE_NORM_FAILED = 10  # the rest of the verdict, as LANE_RATIO
LANE_FINITE = 11
LANE_ACCEPT = 12
LANE_NO_PROGRESS = 13
LANE_INTS = 14


def state_size(work) -> int:
    """The number of state elements: :data:`STATE_SIZE`, else ``work``'s row length."""
    return STATE_SIZE if STATE_SIZE > 0 else work.shape[1]


# The functions below address rows of 2-D arrays by number rather than taking row views: a
# view made inside the loop costs a reference count update, more than a stage's arithmetic
# on a small state.


def work_rows(sizes) -> int:
    """Rows of the work array a trajectory needs: the state rows above and every dense
    stage."""
    return FIRST_DENSE_ROW + sizes[DENSE_STAGES]


def dynamics(t, y, dy, params):
    """The user's dynamics, in place; ``odecore.kernels.compile.compiled_loop`` binds it."""
    raise NotImplementedError("the kernel loop runs with the dynamics bound by compiled_loop()")


def publish(watch, index, value):
    """``watch[index] = value`` for a reader in another thread. A compiler binds a store it
    may not defer to the end of the loop (an atomic one), where its plain store could be."""
    watch[index] = value


def watched_value(watch, index):
    """``watch[index]`` as written by another thread: a load the compiler may not hoist out
    of the loop, once bound as :func:`publish` is."""
    return watch[index]


def state_time(t):
    """``t`` in the state's dtype: a time as the dynamics see it, or a factor of the stage
    sums. This one serves float64 states; ``compiled_loop(state_dtype=...)`` binds a cast
    for float32 ones, whose stage sums are then float32 arithmetic, as the generic loop's
    are, rather than float64 converted at every term. A cast, unlike a store into a
    one-element array of that dtype, tells the compiler that the state rows in its
    registers are unchanged by the call."""
    return t


def jump_below(t):
    """The time just before the jump at ``t`` as the dynamics read time: a step that ends
    on it evaluates its last stages there, the left limit. This one serves float64
    states; ``compiled_loop(state_dtype=...)`` binds one for float32 states, taken in
    float32, since float64's neighbour of a jump rounds back onto it in float32."""
    return next_below(t)


def jump_above(t):
    """The time just after the jump at ``t`` as the dynamics read time: its right limit,
    where a step that starts on it takes its first stage (see :func:`jump_below`)."""
    return next_above(t)


def evaluate(t, work, y_row, dy_row, params, direction):
    """``work[dy_row] = f(t, work[y_row])`` in loop time, which always increases: the user's
    dynamics see ``direction * t`` in the state's dtype (:func:`state_time`), and their rate
    is turned around with the time."""
    dynamics(state_time(direction * t), work[y_row], work[dy_row], params)
    if direction < 0:
        for i in range(state_size(work)):
            work[dy_row, i] = -work[dy_row, i]


def scaled_norm(work, x_row, y_row, y_new_row, rtol, atol, norm, parts):
    """The norm of ``work[x_row]`` measured against ``error_scale(y, y_new)``, element by
    element: the root mean square, the largest magnitude, or (``PARTS_NORM``) the largest
    root mean square of the parts whose sizes ``parts`` lists, laid end to end
    (``odecore.control.norms.largest_part_rms``; elements after the last part are not
    measured)."""
    if norm != PARTS_NORM:
        return part_norm(work, x_row, y_row, y_new_row, rtol, atol, norm, 0, state_size(work))
    largest = 0.0
    start = 0
    for k in range(parts.shape[0]):
        end = start + parts[k]
        rms = part_norm(work, x_row, y_row, y_new_row, rtol, atol, RMS_NORM, start, end)
        largest = rms if k == 0 else maximum(largest, rms)
        start = end
    return largest


def part_norm(work, x_row, y_row, y_new_row, rtol, atol, norm, start, end):
    """The scaled root mean square (or, ``MAX_NORM``, largest magnitude) of
    ``work[x_row, start:end]``."""
    total = 0.0
    for i in range(start, end):
        scale = error_scale(work[y_row, i], work[y_new_row, i], rtol[i], atol[i])
        scaled = work[x_row, i] / scale
        if norm == MAX_NORM:
            total = maximum(total, abs(scaled))
        else:
            total += scaled * scaled
    if norm == MAX_NORM:
        return total
    return math.sqrt(total / (end - start))


def all_finite(work, row):
    for i in range(state_size(work)):
        if not isfinite(work[row, i]):
            return False
    return True


def combine(target, target_row, work, base_row, h, table, table_row, count):
    """``target[target_row] = work[base_row] + h * sum_j table[table_row, j] K_j`` over the
    first ``count`` stages, skipping zero weights; the sum is scaled by ``h`` once, as the
    generic loop's interpolant and dense stages do."""
    for i in range(state_size(work)):
        total = state_time(0.0)
        for j in range(count):
            w = table[table_row, j]
            if w != 0.0:
                total += state_time(w) * work[FIRST_DENSE_ROW + j, i]
        target[target_row, i] = work[base_row, i] + state_time(h) * total


def stage_input(work, target_row, base_row, h, table, table_row, count):
    """``work[target_row] = work[base_row] + sum_j (h table[table_row, j]) K_j``: each
    weight scaled by ``h`` first, as the generic stage store forms a step's stage inputs;
    a ``base_row`` below 0 gives the sum alone (an error estimate)."""
    for i in range(state_size(work)):
        total = state_time(0.0)
        for j in range(count):
            w = table[table_row, j]
            if w != 0.0:
                total += state_time(h * w) * work[FIRST_DENSE_ROW + j, i]
        work[target_row, i] = total if base_row < 0 else work[base_row, i] + total


# The tableau's sums, one function per role. Each reads the coefficients from the tableau's
# arrays; odecore.kernels.specialize writes functions with the same names, signatures and
# arithmetic with the coefficients as literals, which a compiler turns into straight-line code.


def stage_sum(work, h, stage, tab_a):
    """Stage ``stage``'s input, ``y + sum_{j < stage} (h a[stage, j]) K_j``, into
    ``work[Y_STAGE]``."""
    stage_input(work, Y_STAGE, Y, h, tab_a, stage, stage)


def solution_sum(work, h, tab_b, count):
    """The step's result, ``y + sum_j (h b[j]) K_j``, into ``work[Y_NEW]``."""
    stage_input(work, Y_NEW, Y, h, tab_b, B, count)


def error_estimates(work, h, tab_b, count, two):
    """The step's error estimate, ``sum_j (h b_err[j]) K_j``, into ``work[ERR]``, and with
    ``two`` the second one into ``work[ERR2]``."""
    stage_input(work, ERR, -1, h, tab_b, B_ERR, count)
    if two:
        stage_input(work, ERR2, -1, h, tab_b, B_ERR2, count)


def dense_stage_sum(work, h, extra, dense_a, count):
    """The input of the interpolant's extra stage ``extra``, ``y + h sum_j dense_a[extra,
    j] K_j`` over the first ``count`` stages, into ``work[Y_STAGE]``."""
    combine(work, Y_STAGE, work, Y, h, dense_a, extra, count)


def is_member(t, values):
    for j in range(values.shape[0]):
        if values[j] == t:
            return True
    return False


def first_step(t, params, rtol, atol, parts, settings, sizes, work):
    """The first step size and the evaluations it took: ``step_size`` for a fixed-step
    method, ``first_step`` when given, else Hairer's rule (``rules.initial_step_guess`` and
    ``rules.initial_step``) from one more evaluation."""
    if sizes[ADAPTIVE] == 0:
        return settings[STEP_SIZE], 0
    if not isnan(settings[FIRST_STEP]):
        return settings[FIRST_STEP], 0
    norm = settings[NORM]
    f = FIRST_DENSE_ROW
    # error_scale(y, y) is the scale atol + rtol |y0| the rule is stated with.
    d0 = scaled_norm(work, Y, Y, Y, rtol, atol, norm, parts)
    d1 = scaled_norm(work, f, Y, Y, rtol, atol, norm, parts)
    h0 = initial_step_guess(d0, d1)
    for i in range(state_size(work)):
        work[Y_STAGE, i] = work[Y, i] + h0 * work[f, i]
    evaluate(t + h0, work, Y_STAGE, Y_NEW, params, settings[DIRECTION])
    for i in range(state_size(work)):
        work[ERR, i] = work[Y_NEW, i] - work[f, i]
    d2_times_h0 = scaled_norm(work, ERR, Y, Y, rtol, atol, norm, parts)
    return initial_step(h0, d1, d2_times_h0, sizes[ERROR_ORDER] - 1), 1


def time_of_stage(t, h, c, clip, t_left):
    """The time of the stage at ``t + c h``, clipped to ``t_left`` when ``clip``."""
    t_stage = t + c * h
    if clip:
        t_stage = minimum(t_stage, t_left)
    return t_stage


def take_stage(stage, t, h, t_left, clip, params, tab_a, tab_c, direction, work):
    """Stage ``stage`` (1 or later) of a step from ``work[Y]``: its input, its time and its
    evaluation into its row."""
    stage_sum(work, h, stage, tab_a)
    t_stage = time_of_stage(t, h, tab_c[stage], clip, t_left)
    evaluate(t_stage, work, Y_STAGE, FIRST_DENSE_ROW + stage, params, direction)


def finish_stages(h, tab_b, sizes, work):
    """``work[Y_NEW]`` from a step's stages."""
    if sizes[FSAL] != 0:
        # The last stage's input is y_new itself (its weights are b).
        for i in range(state_size(work)):
            work[Y_NEW, i] = work[Y_STAGE, i]
    else:
        solution_sum(work, h, tab_b, sizes[STAGES])


def take_step(t, h, t_left, clip, params, tab_a, tab_c, tab_b, sizes, settings, work):
    """The stages of one step from ``work[Y]`` with ``K_0 = f(t, y)``, into ``work[Y_NEW]``
    and the stage rows; stage times are clipped to ``t_left`` (``clip``, whenever the solve
    has jumps: a step that ends on one sees its left limit)."""
    direction = settings[DIRECTION]
    for i in range(1, sizes[STAGES]):
        take_stage(i, t, h, t_left, clip, params, tab_a, tab_c, direction, work)
    finish_stages(h, tab_b, sizes, work)


def take_lane_steps(clip, params, tab, settings, works, lane_t, lane_n):
    """One step of every busy lane (:func:`solve_lanes`), stage by stage across the lanes:
    each lane's stages wait for one another, and the next lane's stage, independent of
    them, fills the wait. Lane ``l`` steps from ``works[l, Y]`` by ``lane_t[l, LANE_H]``."""
    (tab_a, tab_c, tab_b, _, _, _, sizes) = tab
    direction = settings[DIRECTION]
    for i in range(1, sizes[STAGES]):
        for lane in range(LANES):
            n = lane_n[lane, LANE_TRAJECTORY]
            if n >= 0:
                take_stage(
                    i,
                    lane_t[lane, LANE_T],
                    lane_t[lane, LANE_H],
                    lane_t[lane, LANE_T_LEFT],
                    clip,
                    row_of(params, n),
                    tab_a,
                    tab_c,
                    direction,
                    works[lane],
                )
    for lane in range(LANES):
        if lane_n[lane, LANE_TRAJECTORY] >= 0:
            finish_stages(lane_t[lane, LANE_H], tab_b, sizes, works[lane])


def error_ratio(h, tab_b, rtol, atol, parts, sizes, settings, work):
    """The scaled error of the step just taken: one estimate, or two combined
    (``rules.combined_error_ratio``); whether the norm alone failed (NaN from finite
    estimates and a finite trial state); and whether the trial state and the estimates are
    finite."""
    norm = settings[NORM]
    two = sizes[TWO_ESTIMATES] != 0
    error_estimates(work, h, tab_b, sizes[STAGES], two)
    ratio = scaled_norm(work, ERR, Y, Y_NEW, rtol, atol, norm, parts)
    if two:
        ratio = combined_error_ratio(
            ratio, scaled_norm(work, ERR2, Y, Y_NEW, rtol, atol, norm, parts)
        )
    norm_failed = False
    estimates_finite = True
    if not isfinite(ratio):
        # As ode/loop.py's _ratio_blame: NaN from finite estimates is the norm's failure,
        # +inf from finite estimates the scaled error's overflow, which shorter steps shrink.
        estimates_finite = all_finite(work, Y_NEW) and all_finite(work, ERR)
        estimates_finite = estimates_finite and (not two or all_finite(work, ERR2))
        norm_failed = estimates_finite and isnan(ratio)
    return ratio, norm_failed, estimates_finite


def fill_outputs(ts, out, out_index, t, t_new, h, params, tab, work, weights, settings):
    """Write every output time in ``(t, t_new]`` from the accepted step, of which there is
    at least one (``ts[out_index]``): by the interpolant, whose extra stages are computed
    first, or ``y_new`` itself at the step's end. Returns the next output index and the
    evaluations made. ``weights`` is (1, dense stages)."""
    (_, _, _, dense, dense_a, dense_c, sizes) = tab
    count = ts.shape[0]
    nfev = 0
    # Outputs come in increasing time: when the first is the step's end, none lies inside.
    interpolating = ts[out_index] < t_new
    if interpolating:
        first_extra = sizes[DENSE_STAGES] - sizes[EXTRA_STAGES]
        direction = settings[DIRECTION]
        for x in range(sizes[EXTRA_STAGES]):
            row = first_extra + x
            dense_stage_sum(work, h, x, dense_a, row)
            at = t + dense_c[x] * h
            evaluate(at, work, Y_STAGE, FIRST_DENSE_ROW + row, params, direction)
        nfev = sizes[EXTRA_STAGES]
    h_safe = h if h > 0 else 1.0
    while out_index < count and ts[out_index] <= t_new:
        at_time = ts[out_index]
        if interpolating and at_time != t_new:
            interpolate(out, out_index, (at_time - t) / h_safe, h, dense, work, weights)
        else:
            for i in range(state_size(work)):
                out[out_index, i] = work[Y_NEW, i]
        out_index += 1
    return out_index, nfev


def record_step(tape_times, tape_y, k, t, h, t_new, work):
    """Keep accepted step ``k`` on the tape: its times and its start state."""
    tape_times[k, TAPE_T] = t
    tape_times[k, TAPE_H] = h
    tape_times[k, TAPE_T_NEW] = t_new
    for i in range(state_size(work)):
        tape_y[k, i] = work[Y, i]


def interpolant_weights(theta, dense, weights):
    """``weights[0, i] = b_i(theta) = sum_m dense[i, m] theta**(m + 1)``."""
    for r in range(dense.shape[0]):
        # Powers by products, as the generic loop's batched interpolant forms them: a
        # power function per coefficient would cost more than the rest of the output.
        w = 0.0
        power = theta
        for m in range(dense.shape[1]):
            w += dense[r, m] * power
            power *= theta
        weights[0, r] = w


def interpolate(out, out_row, theta, h, dense, work, weights):
    """``out[out_row] = y + h sum_i b_i(theta) K_i``; ``weights[0]`` receives the
    ``b_i(theta)`` (:func:`interpolant_weights`)."""
    interpolant_weights(theta, dense, weights)
    combine(out, out_row, work, Y, h, weights, 0, dense.shape[0])


def row_of(a, n):
    """Trajectory ``n``'s row of a batch's ``a``, or its one row, shared by all."""
    return a[0] if a.shape[0] == 1 else a[n]


def loop_constants(ts, jumps, tab, settings):
    """What every step reads of the settings, the method and the times, read once: values
    the loop does not store to, so that the compiler may compute what the rules derive
    from them (step_factor's bound) before the loop. Read inside it, any store to a work
    row might have changed them."""
    sizes = tab[6]
    return (
        settings[DIRECTION],
        settings[MIN_STEP],
        settings[MAX_STEP],
        int(settings[MAX_NUM_STEPS]),
        sizes[ADAPTIVE] != 0,
        jumps.shape[0] > 0,
        settings[SAFETY],
        settings[IFACTOR],
        settings[DFACTOR],
        settings[ICOEFF],
        settings[PCOEFF],
        sizes[ERROR_ORDER],
        settings[SHRINK_AFTER_ACCEPT] != 0.0,
        settings[NO_GROWTH_AFTER_REJECT] != 0.0,
        ts[ts.shape[0] - 1],
    )


def begin(y0, params, ts, jumps, rtol, atol, parts, valid, tab, settings, out, work):
    """A solve up to its first step: ``y0`` into ``work[Y]`` and ``out[0]``, ``f(t0, y0)``
    (its right limit where ``t0`` is a jump) and the first step size. Returns ``(status,
    step, evaluations)``."""
    sizes = tab[6]
    direction = settings[DIRECTION]
    t = ts[0]
    for i in range(state_size(work)):
        work[Y, i] = y0[i]
        out[0, i] = y0[i]
    t_first = jump_above(t) if jumps.shape[0] > 0 and is_member(t, jumps) else t
    evaluate(t_first, work, Y, FIRST_DENSE_ROW, params, direction)
    dt, extra = first_step(t, params, rtol, atol, parts, settings, sizes, work)
    dt = minimum(maximum(dt, settings[MIN_STEP]), settings[MAX_STEP])
    status = RUNNING if all_finite(work, FIRST_DENSE_ROW) else NONFINITE_STATE
    if not valid:
        status = INVALID_INPUT
    return status, dt, 1 + extra


def plan_step(t, dt, stop_index, stops, jumps, consts):
    """Where the next step from ``t`` goes: ``(stop_index, h, t_new, lands, t_left)``.
    ``stop_index`` moves to the first stop strictly after ``t``, which the step lands on
    rather than overshoot; a step that ends on a discontinuity evaluates its last stages at
    its left limit ``t_left``."""
    max_step, has_jumps = consts[2], consts[5]
    while stop_index < stops.shape[0] - 1 and stops[stop_index] <= t:
        stop_index += 1
    next_stop = stops[stop_index]
    h, t_new, lands = land_on_stop(t, dt, next_stop, max_step, True)
    t_left = t_new
    if has_jumps and lands and is_member(next_stop, jumps):
        t_left = jump_below(t_new)
    return stop_index, h, t_new, lands, t_left


def judge_step(t, h, t_new, rtol, atol, parts, tab, settings, consts, work):
    """A step's verdict from its stages: ``(ratio, norm_failed, finite, accept,
    no_progress)``, its error ratio and what :func:`error_ratio` says of it, whether it is
    accepted, and whether it was too short to move time."""
    (_, _, tab_b, _, _, _, sizes) = tab
    ratio = 0.0
    norm_failed = False
    if consts[4]:  # adaptive
        ratio, norm_failed, finite = error_ratio(h, tab_b, rtol, atol, parts, sizes, settings, work)
        accept = ratio <= 1.0
    else:
        finite = all_finite(work, Y_NEW)
        accept = finite
    # A step too short to move time is not taken: it would change y but not t.
    no_progress = accept and t_new <= t
    return ratio, norm_failed, finite, accept and not no_progress, no_progress


def size_factor(verdict, ratio_prev, last_rejected, consts):
    """The factor from the size of the step judged ``verdict`` (:func:`judge_step`) to the
    next one's; 1 for a fixed-step method."""
    (ratio, _, _, accept, _) = verdict
    (_, _, _, _, adaptive, _, safety, ifactor, dfactor, icoeff, pcoeff, error_order, shrink,
     no_growth_after_reject, _) = consts  # fmt: skip
    if not adaptive:
        return 1.0
    factor = step_factor(
        ratio, ratio_prev, accept, safety, ifactor, dfactor, icoeff, pcoeff, error_order, shrink
    )
    if no_growth_after_reject:
        factor = held_after_rejection(factor, accept, last_rejected)
    return factor


def conclude_step(
    t,
    h,
    t_new,
    t_left,
    lands,
    verdict,
    factor,
    dt,
    ratio_prev,
    status,
    out_index,
    nfev,
    nsteps,
    naccept,
    nreject,
    params,
    ts,
    jumps,
    tab,
    settings,
    consts,
    out,
    work,
    weights,
    tape_times,
    tape_y,
):
    """Everything after a step's stages, its ``verdict`` (:func:`judge_step`) and the
    factor from its size to the next one's (:func:`size_factor`): its outputs, the tape,
    the next step's size and the status. Returns the loop's state after it, ``(t, dt,
    ratio_prev, last_rejected, status, out_index, nfev, nsteps, naccept, nreject)``."""
    sizes = tab[6]
    (direction, min_step, max_step, max_num_steps, adaptive, has_jumps) = consts[:6]
    t_end = consts[14]
    f = FIRST_DENSE_ROW
    # f_new is the last stage of an FSAL method, else a dense row of its own after the stages.
    f_new = f + sizes[STAGES] - (1 if sizes[FSAL] != 0 else 0)
    (ratio, norm_failed, finite, accept, no_progress) = verdict
    if sizes[FSAL] == 0:
        evaluate(t_left, work, Y_NEW, f_new, params, direction)
    nfev += sizes[NFEV_PER_STEP]
    if accept:
        # Most steps hold no output time: the test is made here, and fill_outputs is
        # called (not inlined: OUT_OF_LINE) only for the steps that do. Inlined into
        # the loop, its interpolant and extra stages made every step slower, outputs or
        # none (rk4 on Lorenz: 77 against 47 ns a step).
        if out_index < ts.shape[0] and ts[out_index] <= t_new:
            out_index, extra = fill_outputs(
                ts, out, out_index, t, t_new, h, params, tab, work, weights, settings
            )
            nfev += extra
        if has_jumps and t_new < t_end and is_member(t_new, jumps):
            # Only now, with the step's outputs interpolated from the left limit, does
            # the next step get the right limit as its first stage (a jump at the end
            # has no next step).
            evaluate(jump_above(t_new), work, Y_NEW, f_new, params, direction)
            nfev += 1
    rejected = not accept
    if adaptive:
        dt_wanted = h * factor
        stall = stalled(rejected, t, h, dt_wanted, min_step, lands) or norm_failed
        dt_next = next_step(h, dt, dt_wanted, accept, lands, min_step, max_step)
        ratio_prev = remembered_ratio(ratio, ratio_prev, accept)
    else:
        dt_next = dt
        stall = rejected
    failure = failure_status(finite, norm_failed)
    nsteps += 1
    status = status_after_step(
        status, accept, t_new, t_end, stall or no_progress, failure, nsteps, max_num_steps
    )
    if accept:
        if naccept < tape_y.shape[0]:
            record_step(tape_times, tape_y, naccept, t, h, t_new, work)
        t = t_new
        for i in range(state_size(work)):
            work[Y, i] = work[Y_NEW, i]
            work[f, i] = work[f_new, i]
        naccept += 1
    else:
        nreject += 1
    return t, dt_next, ratio_prev, rejected, status, out_index, nfev, nsteps, naccept, nreject


def publish_progress(watch, t, dt, naccept, nreject, status):
    """A watched kernel's progress after a step, for the thread that reads it; whether that
    thread asks the solve to stop."""
    publish(watch, WATCH_STATUS, status)
    publish(watch, WATCH_T, t)
    publish(watch, WATCH_DT, dt)
    publish(watch, WATCH_ACCEPTED, naccept)
    publish(watch, WATCH_REJECTED, nreject)
    return watched_value(watch, WATCH_STOP) != 0.0


def solve_trajectory(
    y0,
    params,
    ts,
    stops,
    jumps,
    rtol,
    atol,
    parts,
    valid,
    tab,
    settings,
    out,
    work,
    weights,
    stats,
    watch,
    tape_times,
    tape_y,
):
    """Solve one trajectory from ``y0`` at ``ts[0]`` (loop time), writing ``out[k]`` at each
    ``ts[k]`` it reaches (the rows it does not reach are left as they are). ``stops``: the
    times every step lands on, increasing, the last being the end; ``jumps``: those where the
    dynamics jump (possibly none). ``rtol`` and ``atol`` have one value per element;
    ``parts`` (int64) holds the part sizes of ``PARTS_NORM`` (empty for another norm). Returns
    ``(status, time reached, last proposed step)``; ``stats`` receives the counts.

    Buffers: ``work`` (``work_rows(sizes)``, state size) in the state's dtype, ``weights``
    (1, dense stages) in float64, ``stats`` four int64. ``watch``: ``WATCH_STRIDE`` float64,
    the row a watched kernel (:data:`WATCHED`) publishes its progress in; an unwatched one
    leaves it alone. A watched solve asked to stop returns after its current step, its
    status still ``RUNNING``.

    The tape, for the checkpoint gradient (``odecore.kernels.replay``): accepted step ``k``
    is kept as ``tape_times[k] = (t, h, t_new)`` and its start state ``tape_y[k]``, for as
    many steps as ``tape_y`` has rows (none, for a solve that keeps no tape); the count of
    accepted steps says whether they all fit."""
    (tab_a, tab_c, tab_b, _, _, _, sizes) = tab
    consts = loop_constants(ts, jumps, tab, settings)
    has_jumps = consts[5]
    status, dt, nfev = begin(
        y0, params, ts, jumps, rtol, atol, parts, valid, tab, settings, out, work
    )
    t = ts[0]
    ratio_prev = 1.0
    last_rejected = False
    out_index = 1
    stop_index = 0
    nsteps = 0
    naccept = 0
    nreject = 0
    while status == RUNNING:
        stop_index, h, t_new, lands, t_left = plan_step(t, dt, stop_index, stops, jumps, consts)
        take_step(t, h, t_left, has_jumps, params, tab_a, tab_c, tab_b, sizes, settings, work)
        verdict = judge_step(t, h, t_new, rtol, atol, parts, tab, settings, consts, work)
        factor = size_factor(verdict, ratio_prev, last_rejected, consts)
        (t, dt, ratio_prev, last_rejected, status, out_index, nfev, nsteps, naccept, nreject) = (
            conclude_step(
                t, h, t_new, t_left, lands, verdict, factor, dt, ratio_prev, status, out_index,
                nfev, nsteps, naccept, nreject, params, ts, jumps, tab, settings, consts, out,
                work, weights, tape_times, tape_y,
            )
        )  # fmt: skip
        if WATCHED and publish_progress(watch, t, dt, naccept, nreject, status):
            break
    record_counts(stats, nfev, nsteps, naccept, nreject)
    return status, t, dt


def record_counts(stats, nfev, nsteps, naccept, nreject):
    """A trajectory's counts into its statistics row (four int64)."""
    stats[NFEV] = nfev
    stats[NSTEPS] = nsteps
    stats[NACCEPT] = naccept
    stats[NREJECT] = nreject


def finish_trajectory(n, status, t, dt, nfev, nsteps, naccept, nreject, results, stats):
    """Trajectory ``n``'s results: ``results`` is ``(status, t_reached, dt_next)``, three
    arrays with one entry per trajectory."""
    (status_out, t_reached, dt_next) = results
    status_out[n] = status
    t_reached[n] = t
    dt_next[n] = dt
    record_counts(stats[n], nfev, nsteps, naccept, nreject)


def keep_lane_state(
    lane_t, lane_n, lane, t, dt, ratio_prev, last_rejected, status, out_index, nfev, nsteps,
    naccept, nreject,
):  # fmt: skip
    """A lane's loop state between its steps, as ``conclude_step`` returns it, into its
    rows of ``lane_t`` and ``lane_n``."""
    lane_t[lane, LANE_T] = t
    lane_t[lane, LANE_DT] = dt
    lane_t[lane, LANE_RATIO_PREV] = ratio_prev
    lane_n[lane, LANE_LAST_REJECTED] = last_rejected
    lane_n[lane, LANE_STATUS] = status
    lane_n[lane, LANE_OUT_INDEX] = out_index
    lane_n[lane, LANE_NFEV] = nfev
    lane_n[lane, LANE_NSTEPS] = nsteps
    lane_n[lane, LANE_NACCEPT] = naccept
    lane_n[lane, LANE_NREJECT] = nreject


def keep_verdict(lane_t, lane_n, lane, verdict):
    """A lane's step's ``verdict`` (:func:`judge_step`) into its rows of ``lane_t`` and
    ``lane_n``, until it concludes the step."""
    (ratio, norm_failed, finite, accept, no_progress) = verdict
    lane_t[lane, LANE_RATIO] = ratio
    lane_n[lane, LANE_NORM_FAILED] = norm_failed
    lane_n[lane, LANE_FINITE] = finite
    lane_n[lane, LANE_ACCEPT] = accept
    lane_n[lane, LANE_NO_PROGRESS] = no_progress


def kept_verdict(lane_t, lane_n, lane):
    """The verdict :func:`keep_verdict` kept for ``lane``."""
    return (
        lane_t[lane, LANE_RATIO],
        lane_n[lane, LANE_NORM_FAILED] != 0,
        lane_n[lane, LANE_FINITE] != 0,
        lane_n[lane, LANE_ACCEPT] != 0,
        lane_n[lane, LANE_NO_PROGRESS] != 0,
    )


def start_lane(
    lane, next_index, last, order, y0, params, ts, jumps, rtol, atol, parts, valid, tab,
    settings, out, works, lane_t, lane_n, results, stats, watch,
):  # fmt: skip
    """Give ``lane`` the next trajectory of ``order[next_index:last]`` that has a step to
    take (one whose start fails is finished at once); the lane goes idle (trajectory -1)
    when none is left. Returns the new ``next_index``."""
    while next_index < last:
        n = order[next_index]
        next_index += 1
        status, dt, nfev = begin(
            y0[n], row_of(params, n), ts, jumps, row_of(rtol, n), row_of(atol, n), parts,
            valid[n], tab, settings, out[n], works[lane],
        )  # fmt: skip
        if status != RUNNING:
            finish_trajectory(n, status, ts[0], dt, nfev, 0, 0, 0, results, stats)
            if WATCHED:
                publish(watch[n], WATCH_STATUS, status)
            continue
        # The state solve_trajectory starts its loop with.
        lane_n[lane, LANE_TRAJECTORY] = n
        lane_n[lane, LANE_STOP_INDEX] = 0
        keep_lane_state(lane_t, lane_n, lane, ts[0], dt, 1.0, False, status, 1, nfev, 0, 0, 0)
        return next_index
    lane_n[lane, LANE_TRAJECTORY] = -1
    return next_index


def solve_lanes(
    order,
    first,
    last,
    y0,
    params,
    ts,
    stops,
    jumps,
    rtol,
    atol,
    parts,
    valid,
    tab,
    settings,
    out,
    results,
    stats,
    watch,
    tape_times,
    tape_y,
    works,
    weights,
    lane_t,
    lane_n,
):
    """Solve trajectories ``order[first:last]`` of a batch, :data:`LANES` at a time: each
    lane holds one trajectory, all busy lanes take a step together (their stages
    interleaved, :func:`take_lane_steps`, then their errors and their step-size factors),
    and a lane whose trajectory ends takes the next.
    Each trajectory takes the steps and gets the numbers :func:`solve_trajectory` gives it
    alone; the lanes only let the processor overlap one trajectory's chain of dependent
    operations (each stage waits for the last, the next step for the controller) with
    another's. On the Lorenz rho-sweep (one thread of an AMD EPYC, 4096 trajectories) a
    tsit5 step went from 113 to 87 ns, dopri8's from 206 to 176, rk4's from 38 to 31;
    two lanes gave tsit5 93 ns, eight no more than four.

    The batch's arrays have one row per trajectory (``params``, ``rtol`` and ``atol`` may
    have one row for all); ``results`` is ``(status, t_reached, dt_next)`` (one entry per
    trajectory), ``stats`` (N, 4); the tape's and the watch's rows are as for
    :func:`solve_trajectory`. Buffers: ``works`` (``LANES``, work rows, state size),
    ``weights`` as for :func:`solve_trajectory`, ``lane_t`` (``LANES``, ``LANE_FLOATS``)
    float64 and ``lane_n`` (``LANES``, ``LANE_INTS``) int64: each lane's loop state."""
    consts = loop_constants(ts, jumps, tab, settings)
    has_jumps = consts[5]
    next_index = first
    busy = 0
    for lane in range(LANES):
        next_index = start_lane(
            lane, next_index, last, order, y0, params, ts, jumps, rtol, atol, parts, valid,
            tab, settings, out, works, lane_t, lane_n, results, stats, watch,
        )  # fmt: skip
        if lane_n[lane, LANE_TRAJECTORY] >= 0:
            busy += 1
    while busy > 0:
        for lane in range(LANES):
            if lane_n[lane, LANE_TRAJECTORY] >= 0:
                stop_index, h, t_new, lands, t_left = plan_step(
                    lane_t[lane, LANE_T],
                    lane_t[lane, LANE_DT],
                    lane_n[lane, LANE_STOP_INDEX],
                    stops,
                    jumps,
                    consts,
                )
                lane_n[lane, LANE_STOP_INDEX] = stop_index
                lane_n[lane, LANE_LANDS] = lands
                lane_t[lane, LANE_H] = h
                lane_t[lane, LANE_T_NEW] = t_new
                lane_t[lane, LANE_T_LEFT] = t_left
        take_lane_steps(has_jumps, params, tab, settings, works, lane_t, lane_n)
        # Every lane's error, then every lane's factor, then the rest, as the stages: each
        # is a chain of operations that wait for one another (the norm's divisions and
        # square root; the controller's power, most of a step's wait), and the next lane's
        # chain, independent of it, fills the wait. Judged and concluded lane after lane
        # instead, a tsit5 step on the Lorenz sweep waited for each power in turn.
        for lane in range(LANES):
            n = lane_n[lane, LANE_TRAJECTORY]
            if n >= 0:
                verdict = judge_step(
                    lane_t[lane, LANE_T], lane_t[lane, LANE_H], lane_t[lane, LANE_T_NEW],
                    row_of(rtol, n), row_of(atol, n), parts, tab, settings, consts, works[lane],
                )  # fmt: skip
                keep_verdict(lane_t, lane_n, lane, verdict)
        for lane in range(LANES):
            if lane_n[lane, LANE_TRAJECTORY] >= 0:
                lane_t[lane, LANE_FACTOR] = size_factor(
                    kept_verdict(lane_t, lane_n, lane),
                    lane_t[lane, LANE_RATIO_PREV],
                    lane_n[lane, LANE_LAST_REJECTED] != 0,
                    consts,
                )
        for lane in range(LANES):
            n = lane_n[lane, LANE_TRAJECTORY]
            if n < 0:
                continue
            (t, dt, ratio_prev, last_rejected, status, out_index, nfev, nsteps, naccept,
             nreject) = conclude_step(
                lane_t[lane, LANE_T], lane_t[lane, LANE_H], lane_t[lane, LANE_T_NEW],
                lane_t[lane, LANE_T_LEFT], lane_n[lane, LANE_LANDS] != 0,
                kept_verdict(lane_t, lane_n, lane), lane_t[lane, LANE_FACTOR],
                lane_t[lane, LANE_DT], lane_t[lane, LANE_RATIO_PREV], lane_n[lane, LANE_STATUS],
                lane_n[lane, LANE_OUT_INDEX], lane_n[lane, LANE_NFEV],
                lane_n[lane, LANE_NSTEPS], lane_n[lane, LANE_NACCEPT],
                lane_n[lane, LANE_NREJECT], row_of(params, n), ts, jumps, tab, settings, consts,
                out[n], works[lane], weights, tape_times[n], tape_y[n],
            )  # fmt: skip
            asked_to_stop = False
            if WATCHED:
                asked_to_stop = publish_progress(watch[n], t, dt, naccept, nreject, status)
            if status == RUNNING and not asked_to_stop:
                keep_lane_state(
                    lane_t, lane_n, lane, t, dt, ratio_prev, last_rejected, status, out_index,
                    nfev, nsteps, naccept, nreject,
                )  # fmt: skip
                continue
            finish_trajectory(n, status, t, dt, nfev, nsteps, naccept, nreject, results, stats)
            next_index = start_lane(
                lane, next_index, last, order, y0, params, ts, jumps, rtol, atol, parts,
                valid, tab, settings, out, works, lane_t, lane_n, results, stats, watch,
            )  # fmt: skip
            if lane_n[lane, LANE_TRAJECTORY] < 0:
                busy -= 1


# Functions a compiler should call rather than inline into the loop: code the loop runs on
# few of its steps, which inlined would cost every step its registers (and, for
# start_lane, called from two places, the compiler its time twice).
OUT_OF_LINE = ("fill_outputs", "record_step", "start_lane")

# Functions that return a view of an argument: compiled on their own without reference
# counting, the view could not be returned (Numba refuses), so they are always inlined
# where they are called.
VIEWS = ("row_of",)

# The entry points, each compiled on its own: one trajectory, and lanes of a batch.
ENTRY_POINTS = ("solve_trajectory", "solve_lanes")

# In dependency order: each is compiled after the functions it calls.
KERNEL_FUNCTIONS = (
    state_size,
    state_time,
    jump_below,
    jump_above,
    evaluate,
    part_norm,
    scaled_norm,
    all_finite,
    combine,
    stage_input,
    stage_sum,
    solution_sum,
    error_estimates,
    dense_stage_sum,
    is_member,
    first_step,
    time_of_stage,
    row_of,
    take_stage,
    finish_stages,
    take_step,
    take_lane_steps,
    error_ratio,
    interpolant_weights,
    interpolate,
    fill_outputs,
    record_step,
    publish,
    watched_value,
    loop_constants,
    begin,
    plan_step,
    judge_step,
    size_factor,
    conclude_step,
    publish_progress,
    record_counts,
    solve_trajectory,
    finish_trajectory,
    keep_lane_state,
    keep_verdict,
    kept_verdict,
    start_lane,
    solve_lanes,
)
