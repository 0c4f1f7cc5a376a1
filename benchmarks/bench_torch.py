"""odecore against torchdiffeq on a small neural ODE, on one CPU thread.

    python benchmarks/bench_torch.py              # about two minutes
    python benchmarks/bench_torch.py --quick      # shorter timings, 2 output times only
    nox -s bench -- benchmarks/bench_torch.py     # in nox's virtualenv (needs torchdiffeq)

The problem is torchdiffeq's home ground: ``dy/dt = W2 tanh(W1 y + b1) + b2`` as an
``nn.Module`` (state dimension 2, hidden width 64) on a batch of 512 initial states solved as
one state (``batch_axis=None``, as torchdiffeq does), float64, dopri5 at rtol 1e-6 and atol
1e-8, on t in [0, 1], with outputs at t = [0, 1] and again at 10 times. The weights are fixed
random numbers, scaled so that the solve takes a few dozen steps.

Printed, odecore against torchdiffeq (ratios are odecore / torchdiffeq, below 1 means odecore
is faster; each time is the best call of as many as fill --min-time seconds, after a warm-up,
and the calls compared in one row alternate, so that a change in the machine's load during
the run affects both sides of a ratio), each time beside the error of its result against the
reference (below):

- forward solve, no autograd;
- gradients of sum(y(1)**2) with respect to every parameter: odecore ``backsolve`` against
  ``torchdiffeq.odeint_adjoint``, odecore ``direct`` against ``torchdiffeq.odeint`` then
  backward, and odecore ``checkpoint`` (which has no peer) against the same;
- "floor": the ratio odecore would reach if its solver cost nothing but its function
  evaluations (forward: nfev x one bare call; backsolve: plus backward nfev x one bare VJP).
  A target below the floor cannot be met by making the solver faster, only by needing fewer
  evaluations or a faster function;
- solver overhead: the forward time over the time of the same number of bare calls of the
  function, and the solver's own time per step, measured by replaying the function's
  recorded outputs so that the function costs nothing;
- function evaluations of both libraries: odecore may not take more than 5% more. The
  forward solves take the same steps; the backsolve's backward solve takes its own (it
  starts from the forward's last step and shrinks steps after accepted ones), usually fewer;
- last, a summary table of the ratios, with each library's error beside its time.

The reference is the same network solved by odecore with dopri8 at rtol = atol = 1e-12 in
float64, stepping on the output times, and for gradients the exact gradient of that solve
(``checkpoint``). torchdiffeq's dopri8 at the same settings, with its own adjoint for the
gradients, is printed beside it: their difference bounds the reference's error. Errors are
max |result - reference| / max |reference|, for the worst output array or parameter gradient.

This is a report, not a test: it exits 0 unless --strict is given and a target or a check
is missed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch
from _common import (
    alternating_best_times,
    environment_lines,
    fmt_time,
    print_summary,
    relative_error,
)

import odecore

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench_torch.py compares with torchdiffeq: pip install torchdiffeq")

STATE, HIDDEN, BATCH = 2, 64, 512
RTOL, ATOL, METHOD = 1e-6, 1e-8, "dopri5"
DTYPE = torch.float64
SEED = 0
# W1's scale sets how sharply tanh switches across the batch, W2's how fast the state moves:
# at (4, 4) the step size varies along the solve and dopri5 takes 35 or so steps.
W1_SCALE, W2_SCALE = 4.0, 4.0

REFERENCE_METHOD, REFERENCE_TOL = "dopri8", 1e-12

TARGETS = {"forward": 0.6, "backsolve": 0.6, "overhead": 1.3}
NFEV_TOLERANCE = 0.05


class MLPDynamics(torch.nn.Module):
    """``W2 tanh(W1 y + b1) + b2``, counting its own evaluations."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(SEED)

        def draw(*shape, scale):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=DTYPE) * scale)

        self.w1 = draw(HIDDEN, STATE, scale=W1_SCALE / STATE**0.5)
        self.b1 = draw(HIDDEN, scale=1.0)
        self.w2 = draw(STATE, HIDDEN, scale=W2_SCALE / HIDDEN**0.5)
        self.b2 = draw(STATE, scale=0.1)
        self.nfev = 0

    def forward(self, t, y):
        self.nfev += 1
        return torch.tanh(y @ self.w1.T + self.b1) @ self.w2.T + self.b2


class Replay(torch.nn.Module):
    """Records a module's outputs on the first solve, then returns them in call order: the
    same solve again, with a function that costs nothing, times the solver alone."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.recorded: list[torch.Tensor] | None = None
        self.outputs: list[torch.Tensor] = []
        self.position = 0

    def forward(self, t, y):
        if self.recorded is None:
            out = self.inner(t, y)
            self.outputs.append(out)
            return out
        out = self.recorded[self.position]
        self.position += 1
        return out


def initial_state() -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(BATCH, STATE, generator=gen, dtype=DTYPE)


# --------------------------------------------------------------------------------------------
# The calls being compared


def forward_odecore(f, y0, t):
    with torch.no_grad():
        return odecore.odeint(f, y0, t, rtol=RTOL, atol=ATOL, method=METHOD)


def forward_torchdiffeq(f, y0, t):
    with torch.no_grad():
        return torchdiffeq.odeint(f, y0, t, rtol=RTOL, atol=ATOL, method=METHOD)


def odecore_mode(adjoint):
    def solve(f, y0, t):
        return odecore.odeint(f, y0, t, rtol=RTOL, atol=ATOL, method=METHOD, adjoint=adjoint)

    return solve


def torchdiffeq_direct(f, y0, t):
    return torchdiffeq.odeint(f, y0, t, rtol=RTOL, atol=ATOL, method=METHOD)


def torchdiffeq_adjoint(f, y0, t):
    return torchdiffeq.odeint_adjoint(f, y0, t, rtol=RTOL, atol=ATOL, method=METHOD)


# odecore mode: (odecore call, peer call, peer's name)
GRADIENTS = {
    "backsolve": (odecore_mode("backsolve"), torchdiffeq_adjoint, "odeint_adjoint"),
    "direct": (odecore_mode("direct"), torchdiffeq_direct, "odeint+backward"),
    "checkpoint": (odecore_mode("checkpoint"), torchdiffeq_direct, "odeint+backward"),
}


def gradient(solve, f, y0, t):
    """Gradients of ``sum(y(t_end)**2)`` with respect to every parameter."""
    ys = solve(f, y0, t)
    return torch.autograd.grad((ys[-1] ** 2).sum(), list(f.parameters()))


def count_forward(call, f, y0, t) -> int:
    f.nfev = 0
    call(f, y0, t)
    return f.nfev


def count_gradient(solve, f, y0, t) -> tuple[int, int]:
    """Evaluations in the forward solve and in the backward pass."""
    f.nfev = 0
    ys = solve(f, y0, t)
    forward = f.nfev
    torch.autograd.grad((ys[-1] ** 2).sum(), list(f.parameters()))
    return forward, f.nfev - forward


# --------------------------------------------------------------------------------------------
# The reference


def reference(f, y0, t):
    """``(ys, gradients)`` of the same network solved with dopri8 at rtol = atol = 1e-12 in
    float64, stepping on every output time so that no output is interpolated (dopri8's
    interpolant is of lower order than its steps); the gradients are those of that discrete
    solve (checkpoint), exact to rounding."""
    ys = odecore.odeint(
        f,
        y0,
        t,
        rtol=REFERENCE_TOL,
        atol=REFERENCE_TOL,
        method=REFERENCE_METHOD,
        adjoint="checkpoint",
        options={"step_t": t},
    )
    grads = torch.autograd.grad((ys[-1] ** 2).sum(), list(f.parameters()))
    return ys.detach(), grads


def reference_check(f, y0, t):
    """The same tight solve by torchdiffeq (its gradient from its own adjoint at the same
    tolerances): how far it is from the reference bounds the reference's own error."""
    ys = torchdiffeq.odeint_adjoint(
        f,
        y0,
        t,
        rtol=REFERENCE_TOL,
        atol=REFERENCE_TOL,
        method=REFERENCE_METHOD,
        options={"step_t": t},
    )
    grads = torch.autograd.grad((ys[-1] ** 2).sum(), list(f.parameters()))
    return ys.detach(), grads


def error(values, references) -> float:
    return relative_error(
        [v.detach().numpy() for v in values], [r.detach().numpy() for r in references]
    )


# --------------------------------------------------------------------------------------------
# Measuring


def timer(min_time: float, min_repeats: int):
    """``timed(*fns)``: the best time of one call of each function, their calls alternating;
    one function gives one number, several a tuple."""

    def timed(*fns):
        best = alternating_best_times(fns, min_time, min_repeats)
        return best[0] if len(fns) == 1 else tuple(best)

    return timed


def bare_work(f, y0, t0, n_calls: int, n_vjps: int = 0):
    """``n_calls`` bare calls of the dynamics, then ``n_vjps`` bare VJPs with respect to the
    state and every parameter (the unit of work of an adjoint evaluation): the function
    evaluations of a solve, without the solver."""
    params = list(f.parameters())
    cot = torch.ones_like(y0)

    def run():
        with torch.no_grad():
            for _ in range(n_calls):
                f(t0, y0)
        for _ in range(n_vjps):
            y = y0.detach().requires_grad_(True)
            torch.autograd.grad(f(t0, y), [y, *params], cot)

    return run


def replayed_solve(call, f, y0, t):
    """``(run, steps)``: ``run`` repeats the solve with the function's recorded outputs
    replayed, so that the function costs nothing and only the solver's own work is timed.
    dopri5 is FSAL: six evaluations a step after the two that start the solve."""
    replay = Replay(f)
    recorded = call(replay, y0, t)
    replay.recorded = replay.outputs

    def run():
        replay.position = 0
        return call(replay, y0, t)

    if not torch.equal(run(), recorded):
        raise RuntimeError("the replayed solve took other steps than the recorded one")
    return run, (len(replay.recorded) - 2) // 6


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Row:
    name: str
    ours: float  # seconds
    theirs: float
    error_ours: float  # against the reference
    error_theirs: float
    target: float | None = None
    floor: float | None = None
    peer: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    overhead: list = field(default_factory=list)
    nfev: list = field(default_factory=list)  # (name, ours, theirs, checked)
    references: list = field(default_factory=list)  # (name, values' error, gradients' error)


def verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return "PASS" if value <= target else "MISS"


def measure(args) -> Report:
    timed = timer(args.min_time, args.min_repeats)
    f = MLPDynamics()
    y0 = initial_state()
    t0 = torch.zeros((), dtype=DTYPE)
    grids = [("2 outputs", torch.tensor([0.0, 1.0], dtype=DTYPE))]
    if not args.quick:
        grids.append(("10 outputs", torch.linspace(0.0, 1.0, 10, dtype=DTYPE)))
    report = Report()
    one_f, one_vjp = timed(bare_work(f, y0, t0, 1), bare_work(f, y0, t0, 0, 1))
    report.overhead.append(("one bare call of f", one_f, None))
    report.overhead.append(("one bare VJP of f (state and parameters)", one_vjp, None))

    for label, t in grids:
        ys_ref, grads_ref = reference(f, y0, t)
        ys_check, grads_check = reference_check(f, y0, t)
        report.references.append(
            (label, error([ys_check], [ys_ref]), error(grads_check, grads_ref))
        )

        n_ours = count_forward(forward_odecore, f, y0, t)
        n_theirs = count_forward(forward_torchdiffeq, f, y0, t)
        ours, theirs, bare_ours, bare_theirs = timed(
            lambda t=t: forward_odecore(f, y0, t),
            lambda t=t: forward_torchdiffeq(f, y0, t),
            bare_work(f, y0, t0, n_ours),
            bare_work(f, y0, t0, n_theirs),
        )
        errors = [
            error([call(f, y0, t)], [ys_ref]) for call in (forward_odecore, forward_torchdiffeq)
        ]
        report.rows.append(
            Row(f"forward, {label}", ours, theirs, *errors, TARGETS["forward"], bare_ours / theirs)
        )
        report.nfev.append((f"forward, {label}", n_ours, n_theirs, True))
        report.overhead.append(
            (f"solve / the same bare calls, {label}", ours / bare_ours, theirs / bare_theirs)
        )
        (run_ours, steps_ours), (run_theirs, steps_theirs) = (
            replayed_solve(forward_odecore, f, y0, t),
            replayed_solve(forward_torchdiffeq, f, y0, t),
        )
        replay_ours, replay_theirs = timed(run_ours, run_theirs)
        report.overhead.append(
            (
                f"solver time per step, f replayed, {label}",
                replay_ours / steps_ours,
                replay_theirs / steps_theirs,
            )
        )

        for mode, (solve_ours, solve_theirs, peer) in GRADIENTS.items():
            fwd_ours, bwd_ours = count_gradient(solve_ours, f, y0, t)
            _, bwd_theirs = count_gradient(solve_theirs, f, y0, t)
            calls = [
                lambda s=solve_ours, t=t: gradient(s, f, y0, t),
                lambda s=solve_theirs, t=t: gradient(s, f, y0, t),
            ]
            if mode == "backsolve":
                calls.append(bare_work(f, y0, t0, fwd_ours, bwd_ours))
            ours, theirs, *bare = timed(*calls)
            floor = bare[0] / theirs if bare else None
            if mode == "backsolve":
                report.nfev.append((f"backsolve backward, {label}", bwd_ours, bwd_theirs, True))
            elif mode == "checkpoint":
                report.nfev.append((f"checkpoint backward, {label}", bwd_ours, None, False))
            errors = [error(gradient(s, f, y0, t), grads_ref) for s in (solve_ours, solve_theirs)]
            name = f"grad {mode}, {label}"
            report.rows.append(Row(name, ours, theirs, *errors, TARGETS.get(mode), floor, peer))
    return report


def print_report(report: Report) -> int:
    misses = 0
    head = (
        f"{'measurement':<28}{'odecore':>11}{'error':>9}{'torchdiffeq':>13}{'error':>9}"
        f"{'ratio':>7}{'floor':>7}{'target':>9}  verdict"
    )
    print(head)
    print("-" * len(head))
    for row in report.rows:
        ratio = row.ours / row.theirs
        mark = verdict(ratio, row.target)
        misses += mark == "MISS"
        floor_s = f"{row.floor:.2f}" if row.floor is not None else ""
        target_s = f"<= {row.target:.2f}" if row.target is not None else ""
        peer_s = f"vs {row.peer}" if row.peer else ""
        print(
            f"{row.name:<28}{fmt_time(row.ours):>11}{row.error_ours:>9.1e}"
            f"{fmt_time(row.theirs):>13}{row.error_theirs:>9.1e}{ratio:>7.2f}{floor_s:>7}"
            f"{target_s:>9}  {mark:<4} {peer_s}".rstrip()
        )
    print(
        "(error: max |result - reference| / max |reference|, the worst output or parameter "
        "gradient)"
    )
    print()

    head = f"{'solver overhead':<46}{'odecore':>11}{'torchdiffeq':>13}{'target':>9}  verdict"
    print(head)
    print("-" * len(head))
    for name, ours, theirs in report.overhead:
        if name.startswith("solve /"):
            mark = verdict(ours, TARGETS["overhead"])
            misses += mark == "MISS"
            target_s = f"<= {TARGETS['overhead']:.2f}"
            print(f"{name:<46}{ours:>10.2f}x{theirs:>12.2f}x{target_s:>9}  {mark}")
        elif theirs is None:
            print(f"{name:<46}{ours * 1e6:>8.1f} us")
        else:
            print(f"{name:<46}{ours * 1e6:>8.1f} us{theirs * 1e6:>10.1f} us")
    print()

    head = f"{'function evaluations':<34}{'odecore':>9}{'torchdiffeq':>13}{'gap':>7}  (<= +5%)"
    print(head)
    print("-" * len(head))
    for name, ours, theirs, checked in report.nfev:
        if not checked:
            print(f"{name:<34}{ours:>9}{'-':>13}{'':>7}  (no peer)")
            continue
        gap = (ours - theirs) / max(theirs, 1)
        mark = "MORE" if gap > NFEV_TOLERANCE else ("fewer" if gap < -NFEV_TOLERANCE else "ok")
        misses += mark == "MORE"
        print(f"{name:<34}{ours:>9}{theirs:>13}{gap:>+7.1%}  {mark}")
    print()

    print(
        f"reference: odecore {REFERENCE_METHOD} at rtol = atol = {REFERENCE_TOL:g}, stepping on "
        "the output times; gradients of that"
    )
    print(
        f"solve (checkpoint). torchdiffeq's {REFERENCE_METHOD} at the same settings (gradients "
        "by its adjoint) differs from it by:"
    )
    for label, values, grads in report.references:
        print(f"  {label}: values {values:.1e}, gradients {grads:.1e}")
    print()
    print(f"{misses} target(s) or check(s) missed" if misses else "all targets and checks met")
    print()
    print_summary(
        "torchdiffeq",
        [
            (
                r.name,
                r.ours,
                r.error_ours,
                r.theirs,
                r.error_theirs,
                f"vs {r.peer}" if r.peer else "",
            )
            for r in report.rows
        ],
    )
    return misses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 output times, shorter timings")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--min-repeats", type=int, default=5, help="calls per measurement")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any MISS or MORE")
    args = parser.parse_args(argv)
    if args.min_time is None:
        args.min_time = 0.1 if args.quick else 0.3

    torch.set_num_threads(1)
    print("odecore vs torchdiffeq: neural ODE dy/dt = W2 tanh(W1 y + b1) + b2 (an nn.Module)")
    print(
        f"  state {STATE}, hidden {HIDDEN}, y0 {BATCH}x{STATE} solved as one state, "
        f"{str(DTYPE).removeprefix('torch.')}, t in [0, 1], {METHOD}, rtol {RTOL:g}, atol {ATOL:g}"
    )
    print(
        f"  odecore {odecore.__version__}, torchdiffeq {torchdiffeq.__version__}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    for line in environment_lines():
        print(f"  {line}")
    print(
        f"  each time: the best of >= {args.min_repeats} calls lasting >= {args.min_time:g} s "
        f"together, after a warm-up call; the calls compared in one row alternate"
    )
    print()
    misses = print_report(measure(args))
    return 1 if (args.strict and misses) else 0


if __name__ == "__main__":
    sys.exit(main())
