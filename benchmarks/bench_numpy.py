"""odecore on NumPy against scipy.integrate.solve_ivp: error, work and time, side by side.

    python benchmarks/bench_numpy.py            # the full run: seven tolerances, about a minute
    python benchmarks/bench_numpy.py --quick    # two tolerances, shorter timings
    nox -s bench                                # the full run, in nox's virtualenv

Pairs: scipy RK45 vs odecore dopri5 (both Dormand-Prince 5(4)), scipy DOP853 vs odecore
dopri8 (both Dormand-Prince 8(5,3)). Both libraries get the same right-hand side (one NumPy
function), the same tolerances, only the initial and final time (no dense output), and pick
their first step themselves. For each problem, pair and tolerance, one run of each library
gives the final error against the reference, nfev, the accepted and rejected steps, and the
wall time (the best of repeated calls, repeated until they add up to --min-time seconds).

Printed ratios (odecore / scipy; below 1 means odecore is faster):
- time per step: wall time over attempted steps (accepted + rejected), the cost of one step
  of each implementation, whatever its step-size controller decides;
- time at equal error: each library's log(time) is interpolated along its log(error) curve
  (over the tolerances) at every error the other library reached (never extrapolated), and
  the ratio taken there; this includes the number of steps each controller takes.

References are scipy's DOP853 at rtol = atol = 1e-13, or a closed form. Arenstorf and Van der
Pol also have mpmath references in odecore.problems; the run prints how far scipy's
reference is from them, which bounds the smallest error that is meaningful.

NumPy's speed depends on OPENBLAS_CORETYPE, which some machines set; the script prints
whether it is set, and both libraries run under the same setting. To measure without it,
unset it for this process only:

    env -u OPENBLAS_CORETYPE python benchmarks/bench_numpy.py
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy
from _common import best_time, environment_lines, equal_error_ratios, geometric_mean
from scipy.integrate import solve_ivp

import odecore
from odecore.problems import get_problem

PAIRS = (("RK45", "dopri5"), ("DOP853", "dopri8"))
TOLERANCES = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
ATOL_FACTOR = 1e-2  # atol = rtol * ATOL_FACTOR
REFERENCE_TOL = 1e-13

# --------------------------------------------------------------------------------------------
# Problems: plain NumPy right-hand sides, shared by both libraries.


def lorenz(t, y):
    x, v, z = y
    return np.array([10.0 * (v - x), x * (28.0 - z) - v, x * v - (8.0 / 3.0) * z])


_MU = 0.012277471  # Arenstorf: the moon's mass ratio


def arenstorf(t, y):
    x, z, vx, vz = y
    earth = 1.0 - _MU
    d1 = ((x + _MU) ** 2 + z * z) ** 1.5
    d2 = ((x - earth) ** 2 + z * z) ** 1.5
    ax = x + 2.0 * vz - earth * (x + _MU) / d1 - _MU * (x - earth) / d2
    az = z - 2.0 * vx - earth * z / d1 - _MU * z / d2
    return np.array([vx, vz, ax, az])


def vanderpol(t, y):
    x, v = y
    return np.array([v, (1.0 - x * x) * v - x])


def harmonic(t, y):
    x, v = y
    return np.array([v, -4.0 * x])  # omega = 2


@dataclass
class Problem:
    name: str
    func: Callable
    y0: np.ndarray
    t1: float
    exact: np.ndarray | None = None  # closed-form y(t1)
    mpmath_problem: str | None = None  # an odecore.problems entry with this y0 and t1
    reference: np.ndarray | None = None
    reference_note: str = ""


def problems() -> list[Problem]:
    arenstorf_period = 17.0652165601579625588917206249
    return [
        Problem("lorenz", lorenz, np.array([1.0, 1.0, 1.0]), 2.0),
        Problem(
            "arenstorf",
            arenstorf,
            np.array([0.994, 0.0, 0.0, -2.00158510637908252240537862224]),
            arenstorf_period,
            mpmath_problem="arenstorf",
        ),
        Problem("vanderpol", vanderpol, np.array([2.0, 0.0]), 10.0, mpmath_problem="vanderpol"),
        Problem(
            "harmonic",
            harmonic,
            np.array([1.0, 0.0]),
            10.0,
            exact=np.array([math.cos(20.0), -2.0 * math.sin(20.0)]),
        ),
    ]


def prepare_reference(p: Problem) -> None:
    if p.exact is not None:
        p.reference, p.reference_note = p.exact, "closed form"
        return
    sol = solve_ivp(
        p.func, (0.0, p.t1), p.y0, method="DOP853", rtol=REFERENCE_TOL, atol=REFERENCE_TOL
    )
    p.reference = sol.y[:, -1]
    p.reference_note = f"scipy DOP853 at {REFERENCE_TOL:g}"
    if p.mpmath_problem is not None:
        mp = np.asarray(get_problem(p.mpmath_problem).reference)
        p.reference_note += f"; differs from mpmath by {relative_error(p.reference, mp):.1e}"


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
    seconds: float
    calls: int

    @property
    def per_step_us(self) -> float:
        return 1e6 * self.seconds / max(self.accepted + self.rejected, 1)


def run_scipy(p: Problem, method: str, rtol: float, args) -> Result:
    def once():
        atol = rtol * ATOL_FACTOR
        return solve_ivp(p.func, (0.0, p.t1), p.y0, method=method, rtol=rtol, atol=atol)

    sol = once()
    if not sol.success:
        raise RuntimeError(f"scipy {method} failed on {p.name}: {sol.message}")
    accepted = len(sol.t) - 1
    # Each attempted step costs the same evaluations (6 for RK45, 12 for DOP853) after the
    # two of the start (f(t0, y0) and the first-step heuristic).
    per_step = {"RK45": 6, "DOP853": 12}[method]
    attempted = round((sol.nfev - 2) / per_step)
    seconds, calls = best_time(once, args.min_time, args.repeats)
    return Result(
        relative_error(sol.y[:, -1], p.reference),
        sol.nfev,
        accepted,
        attempted - accepted,
        seconds,
        calls,
    )


def run_odecore(p: Problem, method: str, rtol: float, args) -> Result:
    t = np.array([0.0, p.t1])

    def once():
        return odecore.solve(
            p.func,
            p.y0,
            t,
            rtol=rtol,
            atol=rtol * ATOL_FACTOR,
            method=method,
            options={"max_num_steps": 10**7},
        )

    sol = once()
    seconds, calls = best_time(once, args.min_time, args.repeats)
    return Result(
        relative_error(sol.ys[-1], p.reference),
        int(sol.stats["nfev"]),
        int(sol.stats["naccept"]),
        int(sol.stats["nreject"]),
        seconds,
        calls,
    )


# --------------------------------------------------------------------------------------------
# Report


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

    print("odecore (NumPy backend) vs scipy.integrate.solve_ivp")
    extra = {"scipy": scipy.__version__, "odecore": odecore.__version__}
    for line in environment_lines(extra):
        print("  " + line)
    rtols = ", ".join(f"{r:g}" for r in tolerances)
    print(f"  rtol in {rtols}; atol = rtol * {ATOL_FACTOR:g}; error = max|y(t1)-ref| / max|ref|")
    print(f"  timing: best call of >= {args.repeats}, repeated for >= {args.min_time:g} s")

    selected = [p for p in problems() if not args.problems or p.name in args.problems]
    for p in selected:
        prepare_reference(p)
        print(f"  reference {p.name} (t1 = {p.t1:.6g}): {p.reference_note}")
    print()
    header = (
        f"{'problem':<10} {'scipy/odecore':<15} {'rtol':>6}  {'error sp':>8} {'error od':>8}  "
        f"{'nfev sp':>7} {'nfev od':>7}  {'steps sp':>10} {'steps od':>10}  "
        f"{'ms sp':>8} {'ms od':>8}  {'us/step sp':>10} {'us/step od':>10}  {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))

    per_step_ratios: dict[str, list[float]] = {sp: [] for sp, _ in PAIRS}
    equal_error: dict[str, list[float]] = {sp: [] for sp, _ in PAIRS}
    equal_error_lines = []
    for p in selected:
        for sp_method, od_method in PAIRS:
            sp_results, od_results = [], []
            for rtol in tolerances:
                sp = run_scipy(p, sp_method, rtol, args)
                od = run_odecore(p, od_method, rtol, args)
                sp_results.append(sp)
                od_results.append(od)
                ratio = od.per_step_us / sp.per_step_us
                per_step_ratios[sp_method].append(ratio)
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
            equal_error[sp_method] += [r for _, r in matched]
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
    print("summary (odecore / scipy; below 1: odecore faster):")
    for sp_method, od_method in PAIRS:
        steps, equal = per_step_ratios[sp_method], equal_error[sp_method]
        print(
            f"  {od_method} vs {sp_method}: time per step {geometric_mean(steps):.2f} "
            f"(geometric mean of {len(steps)}), time at equal error "
            f"{geometric_mean(equal):.2f} (of {len(equal)} matched errors)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
