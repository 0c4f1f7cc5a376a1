"""The checkpoint tape: the steps a solve records for the checkpoint gradient's replay."""

from __future__ import annotations

import math

from odecore.ode.problem import Problem


def tape_buffers(p: Problem) -> dict:
    """The checkpoint tape of a tracing backend, in fixed-size buffers: every step's times and
    accept mask (``max_num_steps`` rows, the most steps a solve can take), and the states of
    only some of them (see ``checkpoint_rows``), with the count of steps recorded and the
    stride between kept states."""
    xp, lay, K = p.backend.xp, p.layout, p.max_num_steps
    time = xp.zeros((K, lay.batch), dtype=p.backend.time_dtype)
    kept, _ = checkpoint_rows(K)
    count = xp.asarray(0, dtype=p.backend.int_dtype)
    return {
        "t": time,
        "h": time,
        "t_new": time,
        "y": xp.zeros((kept, *lay.internal_shape), dtype=lay.dtype),
        "accept": xp.zeros((K, lay.batch), dtype=xp.bool),
        "n": count,
        "stride": count + 1,
    }


def checkpoint_rows(max_num_steps: int) -> tuple[int, int]:
    """(states kept, longest run of steps between two of them) for a tape of
    ``max_num_steps`` steps: both powers of two near its square root, whose product covers
    it. The tape keeps the state of every step until it holds ``kept``, then of every other
    step, every fourth, and so on; the backward pass recomputes the states in between, a
    run at a time, so recording costs ``kept + run`` states instead of one per step (128
    instead of 4096, 768 instead of 100000), and at most one more forward evaluation of
    every step, only for solves longer than ``kept`` steps."""
    kept = min(max_num_steps, 1 << math.ceil(math.log2(math.sqrt(max_num_steps))))
    run = 1 << max(0, math.ceil(math.log2(max_num_steps / kept)))
    return kept, run


def record_step(p, s, t, h, t_new, y, accept):
    """Keep the step for the checkpoint replay. Eager backends append to a Python list; a
    tracing backend writes the next row of the buffers in ``s["tape"]`` and returns them (a
    step that no sample accepted leaves its row to be overwritten)."""
    if p.backend.eager:
        if p.ops.scalar and not accept:
            return None
        p.tape.append((t, h, t_new, y, accept))
        return None
    bk, xp, tape = p.backend, p.backend.xp, dict(s["tape"])
    n = tape["n"]
    for key, value in (("t", t), ("h", h), ("t_new", t_new), ("accept", accept)):
        tape[key] = bk.write(tape[key], n, value)
    # The state of step n is kept when n is a multiple of the stride. When its slot would be
    # past the end, every other kept state is dropped and the stride doubles.
    kept = tape["y"].shape[0]
    full = n == kept * tape["stride"]
    tape["y"], tape["stride"] = bk.cond(
        full,
        lambda ys, stride: (bk.write(ys, slice(0, (kept + 1) // 2), ys[::2]), stride * 2),
        lambda ys, stride: (ys, stride),
        tape["y"],
        tape["stride"],
    )
    slot = n // tape["stride"]
    keep = n % tape["stride"] == 0
    tape["y"] = bk.write(tape["y"], slot, xp.where(keep, y, tape["y"][slot]))
    tape["n"] = n + xp.astype(xp.any(accept), n.dtype)
    return tape
