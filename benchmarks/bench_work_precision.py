"""Work-precision of odecore's step-size controllers, for every adaptive method.

    python benchmarks/bench_work_precision.py                # every tolerance, a few minutes
    python benchmarks/bench_work_precision.py --quick        # four tolerances per method
    python benchmarks/bench_work_precision.py --out DIR      # where the PNG plots go

For each adaptive method of ``odecore.ADAPTIVE_METHODS`` and each controller:

- ``I``: the default, torchdiffeq's I controller (an accepted step never shrinks the next);
- ``PI``: ``options={"controller": "PI"}`` (Gustafsson's PI.3.4 exponents);
- ``hairer``: ``options={"controller": "hairer"}`` (DOPRI5's, or for dopri8 DOP853's, rules);
- ``shrink``: the I controller with ``shrink_after_accept`` (scipy's acceptance rule),

the tolerances are swept (atol = rtol / 100) on the problems of ``bench_numpy.py`` (their
references are closed forms or 45-digit Taylor solutions, from ``odecore.problems``) and on a
small neural ODE (``W2 tanh(W1 y + b1) + b2`` in torch, float64; its reference is scipy's
DOP853 at rtol = atol = 1e-13 on the same weights in NumPy). Each solve gives the final
state's error relative to the reference's size, the evaluations of f and the wall time (the
best of ``--repeats`` calls). Peers where they have the method: scipy's RK45 and DOP853 on
every problem; torchdiffeq (its own default controller) and diffrax (``PIDController`` with
its defaults, an I controller) on the neural ODE.

The table gives, per problem, method and controller, the evaluations it needs to reach the
error the default controller reaches, relative to the default's: its log(nfev) is
interpolated linearly along its log(error) curve at each error the default reached (never
extrapolated), and the geometric mean of the ratios over those errors is printed, with
their range; likewise for the wall time. Below 1: cheaper than the default at equal error.
The last table counts, per controller, the (problem, method) pairs on which it is at least
10% cheaper. Plots: one PNG per problem and method, error against evaluations and against
time. This is a report: it exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from _common import environment_lines, geometric_mean, print_table
from bench_numpy import ATOL_FACTOR, relative_error
from bench_numpy import problems as numpy_problems
from scipy.integrate import solve_ivp

import odecore

CONTROLLERS = {
    "I": {},
    "PI": {"controller": "PI"},
    "hairer": {"controller": "hairer"},
    "shrink": {"shrink_after_accept": True},
}
# Tolerances per method, by its order: a low-order method at 1e-10 takes millions of steps.
TOLERANCES = {
    "low": [10.0**-k for k in range(3, 8)],
    "high": [10.0**-k for k in range(4, 12)],
}
QUICK_TOLERANCES = {"low": [1e-3, 1e-4, 1e-5, 1e-6], "high": [1e-4, 1e-6, 1e-8, 1e-10]}
SCIPY_METHODS = {"dopri5": "RK45", "dopri8": "DOP853"}
TORCHDIFFEQ_METHODS = {m: m for m in ("adaptive_heun", "fehlberg2", "bosh3", "dopri5", "dopri8")}
# diffrax's solver and its evaluations per attempted step (all three are FSAL).
DIFFRAX_METHODS = {"bosh3": ("Bosh3", 3), "dopri5": ("Dopri5", 6), "tsit5": ("Tsit5", 6)}
NEURAL_STATE, NEURAL_HIDDEN, NEURAL_BATCH, NEURAL_T1 = 2, 32, 8, 2.0
REFERENCE_TOL = 1e-13


@dataclass
class Curve:
    """One solver's work-precision points over the tolerances."""

    label: str
    errors: list[float] = field(default_factory=list)
    nfev: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, error, nfev, seconds):
        self.errors.append(error)
        self.nfev.append(float(nfev))
        self.seconds.append(seconds)


def best_time(call: Callable, repeats: int):
    """``(result, seconds)``: the last result and the best of ``repeats`` calls' times."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return result, best


def order_class(method: str) -> str:
    return "high" if odecore.TABLEAUS[method].order >= 5 else "low"


# --------------------------------------------------------------------------------------------
# Problems: a solve function per (library, method, options) returning (final state, nfev).


@dataclass
class Problem:
    name: str
    reference: np.ndarray
    odecore_solve: Callable  # (method, rtol, options) -> (y1, nfev)
    scipy_solve: Callable | None  # (method, rtol) -> (y1, nfev)
    torchdiffeq_solve: Callable | None = None
    diffrax_solve: Callable | None = None


def from_bench_numpy(p) -> Problem:
    t = np.array([p.t0, p.t1])

    def od(method, rtol, options):
        sol = odecore.solve(
            p.func,
            p.y0,
            t,
            rtol=rtol,
            atol=rtol * ATOL_FACTOR,
            method=method,
            options={**options, "max_num_steps": 10**7},
        )
        return sol.ys[-1], sol.stats["nfev"]

    def sp(method, rtol):
        sol = solve_ivp(
            p.func, (p.t0, p.t1), p.y0, method=method, rtol=rtol, atol=rtol * ATOL_FACTOR
        )
        return sol.y[:, -1], sol.nfev

    return Problem(p.name, p.reference, od, sp)


def neural_problem(with_diffrax: bool) -> Problem:
    import torch

    torch.set_num_threads(1)
    gen = np.random.default_rng(0)
    # Scales as in bench_torch.py: tanh switches sharply enough that the step size varies.
    w1 = gen.standard_normal((NEURAL_HIDDEN, NEURAL_STATE)) * 4.0 / NEURAL_STATE**0.5
    b1 = gen.standard_normal(NEURAL_HIDDEN)
    w2 = gen.standard_normal((NEURAL_STATE, NEURAL_HIDDEN)) * 4.0 / NEURAL_HIDDEN**0.5
    b2 = gen.standard_normal(NEURAL_STATE) * 0.1
    y0 = gen.standard_normal((NEURAL_BATCH, NEURAL_STATE))

    def f_numpy(t, y):
        return (np.tanh(y.reshape(NEURAL_BATCH, NEURAL_STATE) @ w1.T + b1) @ w2.T + b2).ravel()

    reference = solve_ivp(
        f_numpy,
        (0.0, NEURAL_T1),
        y0.ravel(),
        method="DOP853",
        rtol=REFERENCE_TOL,
        atol=REFERENCE_TOL,
    ).y[:, -1]
    tw1, tb1, tw2, tb2, ty0 = (torch.as_tensor(a) for a in (w1, b1, w2, b2, y0))
    t = torch.tensor([0.0, NEURAL_T1], dtype=torch.float64)

    class Counted:
        def __init__(self):
            self.nfev = 0

        def __call__(self, t, y):
            self.nfev += 1
            return torch.tanh(y @ tw1.T + tb1) @ tw2.T + tb2

    def od(method, rtol, options):
        f = Counted()
        with torch.no_grad():
            ys = odecore.odeint(
                f,
                ty0,
                t,
                rtol=rtol,
                atol=rtol * ATOL_FACTOR,
                method=method,
                options={**options, "max_num_steps": 10**7},
            )
        return ys[-1].numpy().ravel(), f.nfev

    def tdq(method, rtol):
        import torchdiffeq

        f = Counted()
        with torch.no_grad():
            ys = torchdiffeq.odeint(f, ty0, t, rtol=rtol, atol=rtol * ATOL_FACTOR, method=method)
        return ys[-1].numpy().ravel(), f.nfev

    def sp(method, rtol):
        sol = solve_ivp(
            f_numpy, (0.0, NEURAL_T1), y0.ravel(), method=method, rtol=rtol, atol=rtol * ATOL_FACTOR
        )
        return sol.y[:, -1], sol.nfev

    dfx = diffrax_solver(w1, b1, w2, b2, y0) if with_diffrax else None
    return Problem("neural_ode", reference, od, sp, tdq, dfx)


def diffrax_solver(w1, b1, w2, b2, y0):
    import jax

    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp

    params = tuple(jnp.asarray(a) for a in (w1, b1, w2, b2))
    jy0 = jnp.asarray(y0)
    compiled = {}

    def vector_field(t, y, args):
        a1, c1, a2, c2 = args
        return jnp.tanh(y @ a1.T + c1) @ a2.T + c2

    def build(solver_name):
        solver = getattr(diffrax, solver_name)()

        @jax.jit
        def run(rtol, atol):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vector_field),
                solver,
                0.0,
                NEURAL_T1,
                None,
                jy0,
                args=params,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                max_steps=10**6,
            )
            return sol.ys[-1], sol.stats["num_steps"]

        return run

    def solve(method, rtol):
        solver_name, per_step = DIFFRAX_METHODS[method]
        if solver_name not in compiled:
            compiled[solver_name] = build(solver_name)
            compiled[solver_name](1e-3, 1e-5)  # compile outside the timing
        y1, steps = compiled[solver_name](rtol, rtol * ATOL_FACTOR)
        # f(t0, y0) and the first-step rule's evaluation, then the attempted steps.
        return np.asarray(y1).ravel(), 2 + per_step * int(steps)

    return solve


# --------------------------------------------------------------------------------------------
# Measurement


def sweep(problem: Problem, method: str, tolerances, repeats: int) -> dict[str, Curve]:
    curves = {}
    # The first call of a solver pays for imports and caches; it is not the solve's time.
    problem.odecore_solve(method, tolerances[0], {})
    for name, options in CONTROLLERS.items():
        curve = Curve(name)
        for rtol in tolerances:
            call = partial(problem.odecore_solve, method, rtol, options)
            (y1, nfev), seconds = best_time(call, repeats)
            curve.add(relative_error(y1, problem.reference), nfev, seconds)
        curves[name] = curve
    peers = [
        ("scipy " + SCIPY_METHODS.get(method, ""), problem.scipy_solve, SCIPY_METHODS),
        ("torchdiffeq", problem.torchdiffeq_solve, TORCHDIFFEQ_METHODS),
        ("diffrax", problem.diffrax_solve, DIFFRAX_METHODS),
    ]
    for label, solve, methods in peers:
        if solve is None or method not in methods:
            continue
        peer_method = methods[method] if label.startswith("scipy") else method
        solve(peer_method, tolerances[0])
        curve = Curve(label)
        for rtol in tolerances:
            (y1, nfev), seconds = best_time(partial(solve, peer_method, rtol), repeats)
            curve.add(relative_error(y1, problem.reference), nfev, seconds)
        curves[label] = curve
    return curves


def equal_error_ratios(curve: Curve, base: Curve, cost: str) -> list[float]:
    """``curve``'s cost over ``base``'s at each error ``base`` reached within ``curve``'s
    range: log(cost) interpolated linearly in log(error). An error at the float64 floor
    (below 1e-14) is left out: it no longer follows the tolerance."""
    points = sorted(
        (math.log(e), math.log(c))
        for e, c in zip(curve.errors, getattr(curve, cost), strict=True)
        if e > 1e-14
    )
    if len(points) < 2:
        return []
    log_e, log_c = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    ratios = []
    for e, c in zip(base.errors, getattr(base, cost), strict=True):
        if e > 1e-14 and log_e[0] <= math.log(e) <= log_e[-1]:
            ratios.append(math.exp(float(np.interp(math.log(e), log_e, log_c))) / c)
    return ratios


def summary(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    return f"{geometric_mean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def plot(problem: str, method: str, curves: dict[str, Curve], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for curve in curves.values():
        style = "-o" if curve.label in CONTROLLERS else "--s"
        axes[0].loglog(curve.nfev, curve.errors, style, label=curve.label, markersize=4)
        axes[1].loglog(curve.seconds, curve.errors, style, label=curve.label, markersize=4)
    axes[0].set_xlabel("evaluations of f")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("relative error at t1")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{problem}, {method}")
    path = os.path.join(out, f"work_precision_{problem}_{method}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="four tolerances, one call each")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--methods", nargs="*", default=list(odecore.ADAPTIVE_METHODS))
    parser.add_argument("--problems", nargs="*", default=None)
    parser.add_argument("--no-diffrax", action="store_true", help="skip diffrax (compiles)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    tolerances = QUICK_TOLERANCES if args.quick else TOLERANCES
    os.makedirs(args.out, exist_ok=True)
    for line in environment_lines():
        print(line)

    selected = [from_bench_numpy(p) for p in numpy_problems(args.problems)]
    if not args.problems or "neural_ode" in args.problems:
        selected.append(neural_problem(with_diffrax=not args.no_diffrax))

    rows, cheaper = [], {name: [] for name in CONTROLLERS if name != "I"}
    for problem in selected:
        for method in args.methods:
            curves = sweep(problem, method, tolerances[order_class(method)], repeats)
            plot(problem.name, method, curves, args.out)
            base = curves["I"]
            for label, curve in curves.items():
                nfev = equal_error_ratios(curve, base, "nfev")
                secs = equal_error_ratios(curve, base, "seconds")
                rows.append(
                    (problem.name, method, label, summary(nfev), summary(secs))
                    + (f"{min(curve.errors):.0e}-{max(curve.errors):.0e}",)
                )
                if label in cheaper and nfev:
                    cheaper[label].append(geometric_mean(nfev) <= 0.9)
            sys.stdout.flush()

    print()
    print("evaluations (and time) to reach the default controller's error, relative to it;")
    print("geometric mean over the default's errors (range). Below 1: cheaper.")
    print_table(
        ("problem", "method", "controller", "nfev ratio", "time ratio", "errors"),
        rows,
        left=(0, 1, 2),
    )
    print()
    print("(problem, method) pairs where the controller is >= 10% cheaper in evaluations:")
    for label, wins in cheaper.items():
        print(f"  {label:>7}: {sum(wins)} of {len(wins)}")
    print(f"plots: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
