"""The ``odecore`` command: list the classic problems and solve one against its reference.

    odecore problems
    odecore solve lorenz --method tsit5 --rtol 1e-10 --atol 1e-12
    odecore solve kepler --method rk4 --step-size 0.01 --backend numpy

``solve`` reports the final state, the solver's statistics, the error against the problem's
reference value of ``y(t1)`` and the wall time. Bad arguments exit with status 2 and one line
on stderr; a solve that fails (``odecore.SolveError``) exits with status 1; a warning of the
solve (an rtol below the dtype's roundoff) is one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np

import odecore
from odecore.backend.host import host_array
from odecore.problems import PROBLEMS, Problem

# The backends that run the problems' dynamics, array-API functions; the numba backend
# compiles its dynamics and cannot compile those.
CLI_BACKENDS = tuple(name for name in odecore.BACKEND_NAMES if name != "numba")


class _UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits; one line is enough to say what is wrong,
    # and raising lets main() return the status instead of ending the interpreter.
    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.run(args)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version end here
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:
        # The reader went away (``odecore problems | head``). Point stdout at devnull so that
        # the interpreter's final flush does not fail again, as the Python docs recommend.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="odecore", description="Classic ODE problems solved with odecore.")
    parser.add_argument("--version", action="version", version=f"odecore {odecore.__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    listing = commands.add_parser("problems", help="list the problems and their references")
    listing.set_defaults(run=_run_problems)

    solving = commands.add_parser(
        "solve",
        help="solve a problem and compare with its reference",
        description="Solve PROBLEM from t0 to t1 and report the error against its reference.",
    )
    solving.add_argument("problem", metavar="PROBLEM", help="a name from 'odecore problems'")
    solving.add_argument(
        "--method",
        default="dopri5",
        help=f"one of: {', '.join(odecore.METHODS)} (fixed step: "
        f"{', '.join(odecore.FIXED_STEP_METHODS)}); default: dopri5",
    )
    solving.add_argument("--rtol", type=float, default=1e-7, help="default: 1e-7")
    solving.add_argument("--atol", type=float, default=1e-9, help="default: 1e-9")
    solving.add_argument(
        "--backend",
        default=None,
        help=f"one of: auto, {', '.join(CLI_BACKENDS)}; default: the configured one "
        f"(ODECORE_BACKEND, else numpy)",
    )
    solving.add_argument("--max-steps", type=int, default=None, help="options['max_num_steps']")
    solving.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="the step: a fixed-step method's (without it, as odecore.solve without "
        "options['step_size'], the method takes one step from t0 to t1), or the fixed step "
        "an adaptive method then takes instead of adapting",
    )
    solving.set_defaults(run=_run_solve)
    return parser


# --------------------------------------------------------------------------------------------
# odecore problems


def _run_problems(args) -> int:
    width = max(len(name) for name in PROBLEMS)
    print(f"{'name':<{width}}  dim  {'interval':<18}  description")
    for problem in PROBLEMS.values():
        interval = f"[{problem.t0:g}, {problem.t1:g}]"
        stiff = " (stiff)" if problem.stiff else ""
        print(
            f"{problem.name:<{width}}  {problem.dim:>3}  {interval:<18}  "
            f"{problem.description}{stiff}"
        )
        print(f"{'':<{width + 25}}  reference: {problem.reference_source}")
    return 0


# --------------------------------------------------------------------------------------------
# odecore solve


def _run_solve(args) -> int:
    problem = _checked_problem(args.problem)
    options = _checked_options(args)
    backend = _checked_backend(args.backend)

    y0 = np.asarray(problem.y0, dtype=np.float64)
    t = np.asarray([problem.t0, problem.t1], dtype=np.float64)
    # The problems are float64; a backend that must be told so (JAX's x64 mode) is, before it
    # makes any array.
    precision = odecore.get_backend(backend).float64() if backend != "auto" else nullcontext()
    start = time.perf_counter()
    try:
        with precision, _warnings_as_lines():
            solution = odecore.solve(
                problem.func,
                y0,
                t,
                params=problem.params,
                rtol=args.rtol,
                atol=args.atol,
                method=args.method,
                options=options or None,
                backend=args.backend,
            )
            final = _to_numpy(solution.ys[-1])  # converting waits for asynchronous backends
    except odecore.SolveError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (ValueError, TypeError, ImportError) as exc:
        # odecore checks its inputs and says what to change; show that, not a traceback.
        raise _UsageError(f"odecore solve: error: {exc}") from None
    elapsed = time.perf_counter() - start

    _report(problem, args, backend, solution, final, elapsed)
    return 0


@contextmanager
def _warnings_as_lines():
    """Warnings raised by the solve, one line each on stderr as the errors are. Python's own
    format points at the line that warned (here the console script's ``sys.exit(main())``)
    and shows its source, which tells a command-line user nothing."""
    with warnings.catch_warnings():

        def show(message, category, filename, lineno, file=None, line=None):
            print(f"odecore solve: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _checked_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise _UsageError(
            f"odecore solve: error: unknown problem {name!r}; "
            f"valid names are: {', '.join(PROBLEMS)}"
        )
    return PROBLEMS[name]


def _checked_backend(name: str | None) -> str:
    valid = ("auto", *CLI_BACKENDS)
    if name is not None and name not in valid and name not in odecore.BACKEND_NAMES:
        raise _UsageError(
            f"odecore solve: error: unknown backend {name!r}; valid backends are: "
            f"{', '.join(valid)}"
        )
    try:
        name = name or odecore.backend_name()
    except ValueError as exc:  # a bad ODECORE_BACKEND
        raise _UsageError(f"odecore solve: error: {exc}") from None
    if name not in valid:
        raise _UsageError(
            f"odecore solve: error: the {name!r} backend compiles the dynamics it solves, and "
            f"the problems' are written against the array API, which it cannot compile; "
            f"valid backends here are: {', '.join(valid)}"
        )
    if name != "auto":
        # Load it now, so that a missing or broken framework install (an ImportError, or an
        # OSError from a shared library) is reported as such, not as a failed solve.
        try:
            odecore.get_backend(name)
        except Exception as exc:
            why = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            raise _UsageError(
                f"odecore solve: error: the {name!r} backend cannot be used: {why}"
            ) from None
    return name


def _checked_options(args) -> dict:
    if args.method not in odecore.METHODS:
        raise _UsageError(
            f"odecore solve: error: unknown method {args.method!r}; "
            f"valid methods are: {', '.join(odecore.METHODS)}"
        )
    # rtol may be 0, as in the library (the error against atol alone); atol may not.
    if not (math.isfinite(args.rtol) and args.rtol >= 0):
        raise _UsageError(
            f"odecore solve: error: --rtol must be a finite number >= 0, got {args.rtol!r}"
        )
    if not (math.isfinite(args.atol) and args.atol > 0):
        raise _UsageError(
            f"odecore solve: error: --atol must be a finite number > 0, got {args.atol!r}"
        )
    options = {}
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise _UsageError(
                f"odecore solve: error: --max-steps must be a positive integer, "
                f"got {args.max_steps}"
            )
        options["max_num_steps"] = args.max_steps
    if args.step_size is not None:
        if not (math.isfinite(args.step_size) and args.step_size > 0):
            raise _UsageError(
                f"odecore solve: error: --step-size must be positive, got {args.step_size!r}"
            )
        options["step_size"] = args.step_size
    return options


def _report(problem, args, backend, solution, final, elapsed) -> None:
    stats = {key: int(_to_numpy(value)) for key, value in solution.stats.items()}
    if backend == "auto":
        backend = "auto (numpy)"
    rows = [
        ("problem", f"{problem.name}: {problem.description}"),
        ("interval", f"[{problem.t0!r}, {problem.t1!r}], dimension {problem.dim}"),
        ("method", args.method),
        _step_row(args),
        ("backend", backend),
        ("final state", _vector(final)),
    ]
    if problem.reference is not None:
        reference = np.asarray(problem.reference, dtype=np.float64)
        abs_error = float(np.max(np.abs(final - reference)))
        # Norm-wise: a component of the reference may be zero (the Arenstorf orbit's).
        rel_error = abs_error / max(float(np.max(np.abs(reference))), np.finfo(np.float64).tiny)
        rows += [
            ("reference", _vector(reference)),
            ("max abs error", f"{abs_error:.3e}"),
            ("rel error", f"{rel_error:.3e}  (max abs error / max |reference|)"),
            ("reference from", problem.reference_source),
        ]
    rows += [
        (
            "stats",
            f"nfev={stats.get('nfev')}, steps={stats.get('nsteps')}, "
            f"accepted={stats.get('naccept')}, rejected={stats.get('nreject')}",
        ),
        ("wall time", f"{elapsed:.4f} s (including any compilation)"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        print(f"{label + ':':<{width}} {value}")


def _step_row(args) -> tuple[str, str]:
    if args.step_size is not None:
        return ("step size", f"{args.step_size:g}")
    if args.method not in odecore.FIXED_STEP_METHODS:
        return ("tolerances", f"rtol={args.rtol:g}, atol={args.atol:g}")
    # odecore.solve steps a fixed-step method without step_size from each output time to
    # the next; the command's only output times are t0 and t1.
    return ("step size", "none given: one step from t0 to t1 (see --step-size)")


def _vector(values) -> str:
    return "[" + ", ".join(f"{v:.16g}" for v in np.ravel(values)) + "]"


def _to_numpy(x):
    """A float64 NumPy copy of an array of any backend (GPU and autodiff arrays included)."""
    return host_array(x).astype(np.float64)


if __name__ == "__main__":
    sys.exit(main())
