"""odecore on NumPy against scipy.integrate.solve_ivp: error, work and time, side by side.

    python benchmarks/bench_numpy.py            # the full run: seven tolerances, about a minute
    python benchmarks/bench_numpy.py --quick    # two tolerances, shorter timings
    nox -s bench                                # the full run, in nox's virtualenv

Pairs: scipy RK45 vs odecore dopri5, scipy DOP853 vs odecore dopri8. Both libraries get the
same right-hand side (one NumPy function), the same tolerances, only the initial and final
time (no dense output), and pick their first step themselves. For each problem, pair and
tolerance, one run of each library gives the final error against the reference, nfev, the
accepted and rejected steps, and the wall time: the best of repeated calls, the two
libraries' calls alternating until each has had --min-time seconds.

The pairs share their Runge-Kutta stages but not all of their step-size control: odecore's
dopri5 estimates its error with Shampine's embedded weights (as torchdiffeq does), scipy's
RK45 with Dormand and Prince's own, so at the same tolerances the two take different steps
and reach different errors. Hence two ratios (odecore / scipy; below 1 means odecore is
faster):
- time per step: wall time over attempted steps (accepted + rejected), the cost of one step
  of each implementation, whatever its step-size controller decides;
- time at equal error: each library's log(time) is interpolated along its log(error) curve
  (over the tolerances) at every error the other library reached (never extrapolated), and
  the ratio taken there; this includes the number of steps each controller takes.
Then the floor at rtol 1e-8: the time of odecore's evaluations of f alone, against both
solves' times. Last, the fixed cost of a solve: a Lorenz solve so short that both take the
same two steps.

The problems and their references come from odecore.problems: a closed form, or mpmath's
Taylor-series solution at 45 digits (Arenstorf's orbit is periodic, so y(T) = y0). The run
prints how far scipy's DOP853 and odecore's dopri8 at rtol = atol = 1e-13 are from them: the
smallest errors that float64 solves of each problem reach.

NumPy's speed depends on OPENBLAS_CORETYPE, which some machines set; the script prints
whether it is set, and both libraries run under the same setting. To measure without it,
unset it for this process only:

    env -u OPENBLAS_CORETYPE python benchmarks/bench_numpy.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy
from _common import (
    alternating_best_times,
    environment_lines,
    equal_error_ratios,
    geometric_mean,
    print_table,
)
from scipy.integrate import solve_ivp

import odecore
from odecore.problems import get_problem

PAIRS = (("RK45", "dopri5"), ("DOP853", "dopri8"))
TOLERANCES = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
ATOL_FACTOR = 1e-2  # atol = rtol * ATOL_FACTOR
CHECK_TOL = 1e-13

# --------------------------------------------------------------------------------------------
# Problems: plain NumPy right-hand sides, shared by both libraries, with the constants of
# odecore.problems. The catalogue's own functions are written against the array API, whose
# namespace lookups would add the same cost to every call of both libraries.


def lorenz(sigma, rho, beta):
    def f(t, y):
        x, v, z = y
        return np.array([sigma * (v - x), x * (rho - z) - v, x * v - beta * z])

    return f


def arenstorf(mu):
    earth = 1.0 - mu

    def f(t, y):
        x, z, vx, vz = y
        d1 = ((x + mu) ** 2 + z * z) ** 1.5
        d2 = ((x - earth) ** 2 + z * z) ** 1.5
        ax = x + 2.0 * vz - earth * (x + mu) / d1 - mu * (x - earth) / d2
        az = z - 2.0 * vx - earth * z / d1 - mu * z / d2
        return np.array([vx, vz, ax, az])

    return f


def vanderpol(mu):
    def f(t, y):
        x, v = y
        return np.array([v, mu * (1.0 - x * x) * v - x])

    return f


def harmonic(omega):
    def f(t, y):
        x, v = y
        return np.array([v, -(omega**2) * x])

    return f


RIGHT_HAND_SIDES = {
    "lorenz": lorenz,
    "arenstorf": arenstorf,
    "vanderpol": vanderpol,
    "harmonic": harmonic,
}


@dataclass
class Problem:
    name: str
    func: Callable
    y0: np.ndarray
    t0: float
    t1: float
    reference: np.ndarray
    reference_source: str


def problems(names) -> list[Problem]:
    selected = []
    for name, make in RIGHT_HAND_SIDES.items():
        if names and name not in names:
            continue
        p = get_problem(name)
        func = make(*p.params)
        y0 = np.array(p.y0)
        # The plain function must be the catalogue's, or the reference would not apply.
        expected = np.asarray(p.func(p.t0, y0, p.params))
        if not np.allclose(func(p.t0, y0), expected, rtol=1e-15, atol=0.0):
            raise RuntimeError(f"the NumPy right-hand side of {name} is not the catalogue's")
        reference = np.array(p.reference)
        selected.append(Problem(name, func, y0, p.t0, p.t1, reference, p.reference_source))
    return selected


def reference_checks(p: Problem) -> str:
    """How far tight solves by both libraries are from the reference."""
    sp = solve_ivp(p.func, (p.t0, p.t1), p.y0, method="DOP853", rtol=CHECK_TOL, atol=CHECK_TOL).y[
        :, -1
    ]
    od = odecore.solve(
        p.func,
        p.y0,
        np.array([p.t0, p.t1]),
        rtol=CHECK_TOL,
        atol=CHECK_TOL,
        method="dopri8",
        options={"max_num_steps": 10**7},
    ).ys[-1]
    return (
        f"at rtol = atol = {CHECK_TOL:g}, DOP853 is {relative_error(sp, p.reference):.1e} "
        f"and dopri8 {relative_error(od, p.reference):.1e} from it"
    )


def relative_error(y, ref) -> float:
    """Max-norm error relative to the max-norm of the reference."""
    return float(np.max(np.abs(np.asarray(y) - ref)) / max(np.max(np.abs(ref)), 1e-300))


# --------------------------------------------------------------------------------------------
# One measurement


@dataclass
class Result:
    error: float
    nfev: int
    accepted: int
    rejected: int
    seconds: float = 0.0

    @property
    def per_step_us(self) -> float:
        return 1e6 * self.seconds / max(self.accepted + self.rejected, 1)


def scipy_call(p: Problem, method: str, rtol: float) -> tuple[Callable, Callable]:
    """``(solve, result)``: a call to time, and what one of its solutions measured."""

    def solve():
        atol = rtol * ATOL_FACTOR
        return solve_ivp(p.func, (p.t0, p.t1), p.y0, method=method, rtol=rtol, atol=atol)

    def result(sol) -> Result:
        if not sol.success:
            raise RuntimeError(f"scipy {method} failed on {p.name}: {sol.message}")
        accepted = len(sol.t) - 1
        # Each attempted step costs the same evaluations (6 for RK45, 12 for DOP853) after
        # the two of the start (f(t0, y0) and the first-step heuristic).
        per_step = {"RK45": 6, "DOP853": 12}[method]
        attempted = round((sol.nfev - 2) / per_step)
        error = relative_error(sol.y[:, -1], p.reference)
        return Result(error, sol.nfev, accepted, attempted - accepted)

    return solve, result


def odecore_call(p: Problem, method: str, rtol: float) -> tuple[Callable, Callable]:
    t = np.array([p.t0, p.t1])

    def solve():
        return odecore.solve(
            p.func,
            p.y0,
            t,
            rtol=rtol,
            atol=rtol * ATOL_FACTOR,
            method=method,
            options={"max_num_steps": 10**7},
        )

    def result(sol) -> Result:
        error = relative_error(sol.ys[-1], p.reference)
        stats = sol.stats
        return Result(error, int(stats["nfev"]), int(stats["naccept"]), int(stats["nreject"]))

    return solve, result


def measure(p: Problem, sp_method: str, od_method: str, rtol: float, args):
    """One run of each library for its results, then their alternating timings."""
    sp_solve, sp_result = scipy_call(p, sp_method, rtol)
    od_solve, od_result = odecore_call(p, od_method, rtol)
    sp, od = sp_result(sp_solve()), od_result(od_solve())
    sp.seconds, od.seconds = alternating_best_times(
        [sp_solve, od_solve], args.min_time, args.repeats
    )
    return sp, od


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class PairSummary:
    """What one problem and pair measured over the tolerances (ratios odecore / scipy)."""

    pair: str
    problem: str
    per_step: list[float]
    equal_error: list[tuple[float, float]]  # (error, time ratio)
    nfev: list[float]
    error: list[float]


def span(values, digits=2) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    low, high = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return low if low == high else f"{low}-{high}"


def summary_row(label: str, parts: list[PairSummary]) -> tuple[str, ...]:
    per_step = [r for s in parts for r in s.per_step]
    matched = [m for s in parts for m in s.equal_error]
    ratios = [r for _, r in matched]
    errors = [e for e, _ in matched]
    return (
        label,
        f"{geometric_mean(per_step):.2f} ({span(per_step)})",
        f"{geometric_mean(ratios):.2f} ({span(ratios)})" if matched else "no overlap",
        f"{min(errors):.0e} to {max(errors):.0e}" if matched else "-",
        span([r for s in parts for r in s.nfev]),
        span([r for s in parts for r in s.error], 1),
    )


def print_summary(summaries: list[PairSummary]) -> None:
    print("summary: odecore / scipy (below 1: odecore faster), geometric mean (range) over the")
    print("tolerances; time at equal error: where both reach the same error against the")
    print("reference, over the errors given; nfev and error: their ratios at the same rtol")
    rows = []
    for pair in dict.fromkeys(s.pair for s in summaries):
        parts = [s for s in summaries if s.pair == pair]
        rows += [summary_row(f"{pair}, {s.problem}", [s]) for s in parts]
        rows.append(summary_row(f"{pair}, all problems", parts))
    print_table(
        ("pair, problem", "time per step", "time at equal error", "over errors", "nfev", "error"),
        rows,
    )


FLOOR_RTOL = 1e-8


def floor_line(p: Problem, sp_method: str, od_method: str, sp: Result, od: Result, args) -> str:
    """What odecore's ``od.nfev`` evaluations of ``f`` cost alone, against both solves' times.
    A floor far below both says that the per-step ratio is decided by the solvers' own work
    (Python and NumPy calls around the evaluations), not by the evaluations."""
    t_mid = 0.5 * (p.t0 + p.t1)

    def evaluations():
        for _ in range(od.nfev):
            p.func(t_mid, p.y0)

    (seconds,) = alternating_best_times([evaluations], args.min_time, args.repeats)
    return (
        f"  {p.name:<10} {sp_method + '/' + od_method:<14} {od.nfev} evaluations "
        f"{1e3 * seconds:.3f} ms: {seconds / sp.seconds:.2f} of scipy's solve, "
        f"{seconds / od.seconds:.2f} of odecore's"
    )


def print_fixed_cost(args) -> None:
    """The cost of a solve apart from its steps: a Lorenz solve over so short a span that
    both libraries take the same two steps (14 evaluations each), so the difference in time
    is what each library does around its steps (checks, set-up, the first-step heuristic,
    the result), which decides the loose-tolerance cells."""
    f = lorenz(10.0, 28.0, 8.0 / 3.0)
    y0, span = np.array([1.0, 0.0, 0.0]), (0.0, 1e-3)
    t = np.array(span)

    def sp():
        return solve_ivp(f, span, y0, rtol=1e-2, atol=1e-4)

    def od():
        return odecore.solve(f, y0, t, rtol=1e-2, atol=1e-4)

    nfev_sp, nfev_od = sp().nfev, int(od().stats["nfev"])
    if nfev_sp != nfev_od:
        print(f"fixed cost: skipped, the solves differ in evaluations ({nfev_sp}, {nfev_od})")
        return
    sp_s, od_s = alternating_best_times([sp, od], max(args.min_time, 0.2), 200)
    print(
        f"fixed cost, a two-step Lorenz solve ({nfev_od} evaluations each): scipy RK45 "
        f"{1e6 * sp_s:.1f} us, odecore dopri5 {1e6 * od_s:.1f} us, ratio {od_s / sp_s:.2f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many calls")
    parser.add_argument("--quick", action="store_true", help="tolerances 1e-4, 1e-8; 0.05 s")
    parser.add_argument("--problems", nargs="*", help="a subset of the problems, by name")
    args = parser.parse_args(argv)
    tolerances = (1e-4, 1e-8) if args.quick else TOLERANCES
    if args.quick:
        args.min_time = min(args.min_time, 0.05)
    unknown = set(args.problems or ()) - set(RIGHT_HAND_SIDES)
    if unknown:
        parser.error(f"unknown problems {sorted(unknown)}; choose from {list(RIGHT_HAND_SIDES)}")

    print("odecore (NumPy backend) vs scipy.integrate.solve_ivp")
    extra = {"scipy": scipy.__version__, "odecore": odecore.__version__}
    for line in environment_lines(extra):
        print("  " + line)
    rtols = ", ".join(f"{r:g}" for r in tolerances)
    print(f"  rtol in {rtols}; atol = rtol * {ATOL_FACTOR:g}; error = max|y(t1)-ref| / max|ref|")
    print(
        f"  timing: best call of >= {args.repeats}, repeated for >= {args.min_time:g} s, "
        "the libraries' calls alternating"
    )

    selected = problems(args.problems)
    for p in selected:
        print(f"  reference {p.name} (t1 = {p.t1:.6g}): {p.reference_source}")
        print(f"    {reference_checks(p)}")
    print()
    header = (
        f"{'problem':<10} {'scipy/odecore':<15} {'rtol':>6}  {'error sp':>8} {'error od':>8}  "
        f"{'nfev sp':>7} {'nfev od':>7}  {'steps sp':>10} {'steps od':>10}  "
        f"{'ms sp':>8} {'ms od':>8}  {'us/step sp':>10} {'us/step od':>10}  {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))

    summaries, equal_error_lines, floor_lines = [], [], []
    for p in selected:
        for sp_method, od_method in PAIRS:
            summary = PairSummary(f"{od_method} / {sp_method}", p.name, [], [], [], [])
            sp_results, od_results = [], []
            for rtol in tolerances:
                sp, od = measure(p, sp_method, od_method, rtol, args)
                sp_results.append(sp)
                od_results.append(od)
                ratio = od.per_step_us / sp.per_step_us
                summary.per_step.append(ratio)
                summary.nfev.append(od.nfev / sp.nfev)
                summary.error.append(od.error / sp.error if sp.error > 0 else float("nan"))
                if rtol == FLOOR_RTOL:
                    floor_lines.append(floor_line(p, sp_method, od_method, sp, od, args))
                print(
                    f"{p.name:<10} {sp_method + '/' + od_method:<15} {rtol:>6.0e}  "
                    f"{sp.error:>8.1e} {od.error:>8.1e}  {sp.nfev:>7} {od.nfev:>7}  "
                    f"{f'{sp.accepted}+{sp.rejected}':>10} {f'{od.accepted}+{od.rejected}':>10}  "
                    f"{1e3 * sp.seconds:>8.3f} {1e3 * od.seconds:>8.3f}  "
                    f"{sp.per_step_us:>10.1f} {od.per_step_us:>10.1f}  {ratio:>5.2f}"
                )
            od_curve = ([r.error for r in od_results], [r.seconds for r in od_results])
            sp_curve = ([r.error for r in sp_results], [r.seconds for r in sp_results])
            matched = equal_error_ratios(*od_curve, *sp_curve)
            matched += [(e, 1.0 / r) for e, r in equal_error_ratios(*sp_curve, *od_curve)]
            matched.sort(reverse=True)
            summary.equal_error = matched
            summaries.append(summary)
            ratios = [r for _, r in matched]
            detail = (
                f"{geometric_mean(ratios):.2f} (geometric mean of {len(ratios)}; "
                f"{min(ratios):.2f} to {max(ratios):.2f} over errors "
                f"{min(e for e, _ in matched):.0e} to {max(e for e, _ in matched):.0e})"
                if matched
                else "no overlap"
            )
            equal_error_lines.append(f"  {p.name:<10} {sp_method + '/' + od_method:<14} {detail}")
    print("(steps: accepted+rejected; us/step: per attempted step; ratio: us/step od / sp)")
    print()
    print("time at equal error, odecore / scipy, at the errors where the curves overlap:")
    for line in equal_error_lines:
        print(line)
    print()
    print_summary(summaries)
    if floor_lines:
        print()
        print(
            f"floor at rtol {FLOOR_RTOL:g}: the time of odecore's evaluations of f alone, as a "
            "fraction of each library's solve; the rest is what the solver does around them"
        )
        for line in floor_lines:
            print(line)
    print()
    print_fixed_cost(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
