"""The checkpoint tape: the steps a solve records for the checkpoint gradient's replay."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from odecore.ode.problem import Problem


class StepRecord(NamedTuple):
    """One step as the replay needs it (control values per sample, and the state)."""

    t: Any  # the step's start
    h: Any  # its size
    t_new: Any  # its end (the stop it landed on, exactly, where it landed)
    y: Any  # the state at t
    accept: Any  # whether each sample accepted it


class TapeBuffers(NamedTuple):
    """The checkpoint tape of a tracing backend, in fixed-size buffers: every step's times and
    accept mask (``max_num_steps`` rows, the most steps a solve can take), and the states of
    only some of them (see :func:`checkpoint_rows`)."""

    t: Any  # (max_num_steps, B)
    h: Any
    t_new: Any
    y: Any  # (kept, B, N) the start states of steps 0, stride, 2 stride, ...
    accept: Any  # (max_num_steps, B)
    n: Any  # steps recorded so far (0-d)
    stride: Any  # steps between two kept states (0-d, a power of two)

    def record(self, i, y):
        """Step ``i`` as a :class:`StepRecord`, whose start state the replay recomputed."""
        return StepRecord(self.t[i], self.h[i], self.t_new[i], y, self.accept[i])


class KernelTape(NamedTuple):
    """The tape of a whole-solve kernel (``Backend.kernels.solve`` with ``record``): for each
    of N trajectories, its accepted steps' times (N, K, 3: start, size, end) and start states
    (N, K, state size), and how many steps it took (N,), all of them on the tape. The
    backend replays it (``Backend.kernels.replay``)."""

    times: Any
    y: Any
    steps: Any


def tape_buffers(p: Problem) -> TapeBuffers:
    """An empty tape for a tracing backend."""
    xp, lay, K = p.backend.xp, p.layout, p.max_num_steps
    kept, run = checkpoint_rows(K)
    _check_tape_fits(p.backend, K, kept + run, lay)
    time = xp.zeros((K, lay.batch), dtype=p.backend.time_dtype)
    count = xp.asarray(0, dtype=p.backend.int_dtype)
    return TapeBuffers(
        t=time,
        h=time,
        t_new=time,
        y=xp.zeros((kept, *lay.internal_shape), dtype=lay.dtype),
        accept=xp.zeros((K, lay.batch), dtype=xp.bool),
        n=count,
        stride=count + 1,
    )


def _check_tape_fits(bk, max_num_steps: int, states: int, lay) -> None:
    """A tracing backend's tape is allocated whole, for ``max_num_steps`` steps, before the
    solve runs. Where an allocation larger than the memory left does not fail cleanly (JAX
    on the CPU: the operating system kills the process as the pages are touched), it is
    refused here, with what to change."""
    limit = bk.allocation_limit()
    if limit is None:
        return
    time_bytes = np.dtype(bk.time_dtype).itemsize
    state_bytes = np.dtype(lay.dtype).itemsize * math.prod(lay.internal_shape)
    needed = max_num_steps * lay.batch * (3 * time_bytes + 1) + states * state_bytes
    if needed > limit:
        raise ValueError(
            f"adjoint='checkpoint' keeps the times of every step the solve may take, "
            f"options['max_num_steps'] = {max_num_steps}, and {states} states: "
            f"{needed / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB of memory "
            f"left. Lower max_num_steps to what the solve needs (too few fails with "
            f"Status.MAX_STEPS_REACHED, not silently), or use adjoint='backsolve', whose "
            f"memory does not grow with the number of steps"
        )


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


def record_step(p, tape, t, h, t_new, y, accept):
    """The tape with this step kept for the checkpoint replay. An eager backend's tape is a
    list, appended to; a tracing backend's is :class:`TapeBuffers`, whose next row is
    written (a step that no sample accepted leaves its row to be overwritten)."""
    if p.backend.eager:
        if not (p.ops.scalar and not accept):
            tape.append(StepRecord(t, h, t_new, y, accept))
        return tape
    bk, xp, n = p.backend, p.backend.xp, tape.n
    rows = {
        key: bk.write(getattr(tape, key), n, value)
        for key, value in (("t", t), ("h", h), ("t_new", t_new), ("accept", accept))
    }
    # The state of step n is kept when n is a multiple of the stride. When its slot would be
    # past the end, every other kept state is dropped and the stride doubles.
    kept = tape.y.shape[0]
    ys, stride = bk.cond(
        n == kept * tape.stride,
        lambda ys, stride: (bk.write(ys, slice(0, (kept + 1) // 2), ys[::2]), stride * 2),
        lambda ys, stride: (ys, stride),
        tape.y,
        tape.stride,
    )
    slot = n // stride
    ys = bk.write(ys, slot, xp.where(n % stride == 0, y, ys[slot]))
    return TapeBuffers(**rows, y=ys, n=n + xp.astype(xp.any(accept), n.dtype), stride=stride)
