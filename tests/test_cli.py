"""The ``odecore`` command line, driven through ``odecore.cli.main``."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import odecore
from odecore.cli import main
from odecore.problems import PROBLEMS


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reported(out: str, label: str) -> float:
    match = re.search(rf"^{label}:\s+(\S+)", out, flags=re.MULTILINE)
    assert match, f"no {label!r} line in:\n{out}"
    return float(match.group(1))


def assert_one_line_error(err: str, *needles: str):
    assert err.count("\n") == 1 and err.startswith("odecore"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_problems_lists_every_problem(capsys):
    code, out, err = run(capsys, "problems")
    assert code == 0 and err == ""
    listed = {line.split()[0] for line in out.splitlines()[1:] if line and not line[0].isspace()}
    assert listed == set(PROBLEMS)
    assert "reference: " in out and "[0, 20]" in out


def test_solve_decay_to_tight_tolerance(capsys):
    code, out, err = run(
        capsys, "solve", "decay", "--method", "dopri5", "--rtol", "1e-10", "--atol", "1e-12"
    )
    assert code == 0, err
    assert reported(out, "max abs error") < 1e-8
    assert reported(out, "rel error") < 1e-8
    assert reported(out, "wall time") >= 0
    for label in ("problem", "method", "tolerances", "backend", "final state", "stats"):
        assert re.search(rf"^{label}:", out, flags=re.MULTILINE), label
    assert re.search(r"nfev=\d+, steps=\d+, accepted=\d+, rejected=\d+", out)
    assert "rtol=1e-10, atol=1e-12" in out


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_problem_meets_its_reference(capsys, name, method):
    code, out, err = run(
        capsys, "solve", name, "--method", method, "--rtol", "1e-10", "--atol", "1e-12"
    )
    assert code == 0, err
    # The Arenstorf orbit loses most, about 3e-7 relative (its close approach to the moon);
    # DETEST A1 ends at exp(-20), below atol, so only its absolute error is small.
    assert reported(out, "rel error") < 1e-6 or reported(out, "max abs error") < 1e-11


def test_fixed_step_method_with_step_size(capsys):
    code, out, err = run(capsys, "solve", "harmonic", "--method", "rk4", "--step-size", "0.01")
    assert code == 0, err
    assert reported(out, "max abs error") < 1e-6


def test_fixed_step_method_without_step_size_is_the_library_solve(capsys):
    """Without --step-size the command does what odecore.solve does without
    options['step_size']: one step from each output time to the next, here t0 to t1."""
    problem = PROBLEMS["harmonic"]
    code, out, err = run(capsys, "solve", "harmonic", "--method", "rk4")
    assert code == 0, err
    library = odecore.solve(
        problem.func,
        np.asarray(problem.y0, dtype=np.float64),
        np.array([problem.t0, problem.t1]),
        params=problem.params,
        method="rk4",
    )
    final = re.search(r"^final state:\s+\[(.*)\]$", out, flags=re.MULTILINE).group(1)
    # The report prints 16 significant digits: equal to within one unit in the 16th.
    np.testing.assert_allclose([float(v) for v in final.split(", ")], library.ys[-1], rtol=1e-15)
    assert library.stats["nsteps"] == 1
    assert "steps=1, accepted=1, rejected=0" in out
    assert re.search(r"^step size:\s+none given: one step from t0 to t1", out, re.MULTILINE)


def test_adaptive_method_with_step_size_takes_that_fixed_step(capsys):
    code, out, err = run(capsys, "solve", "harmonic", "--method", "tsit5", "--step-size", "0.01")
    assert code == 0, err
    assert re.search(r"^step size:\s+0.01$", out, re.MULTILINE)
    problem = PROBLEMS["harmonic"]
    steps = math.ceil((problem.t1 - problem.t0) / 0.01 - 1e-9)
    assert f"steps={steps}, accepted={steps}, rejected=0" in out
    # tsit5's global error at h = 0.01 is about h**5 times the solution's scale.
    assert reported(out, "max abs error") < 1e-8


def test_unknown_problem_lists_the_names(capsys):
    code, out, err = run(capsys, "solve", "no_such_problem")
    assert code == 2 and out == ""
    assert_one_line_error(err, "no_such_problem", *PROBLEMS)


def test_unknown_method_lists_the_methods(capsys):
    code, _, err = run(capsys, "solve", "decay", "--method", "rk45")
    assert code == 2
    assert_one_line_error(err, "'rk45'", *odecore.METHODS)


@pytest.mark.parametrize(
    "flags",
    [
        ("--rtol", "-1e-6"),
        ("--atol", "0"),
        ("--atol", "-1"),
        ("--atol", "nan"),
        ("--rtol", "abc"),
        ("--max-steps", "0"),
        ("--max-steps", "ten"),
    ],
)
def test_bad_numbers_exit_2(capsys, flags):
    code, out, err = run(capsys, "solve", "decay", *flags)
    assert code == 2 and out == ""
    assert_one_line_error(err, flags[0])


def test_a_nan_rtol_is_refused_as_not_finite(capsys):
    code, out, err = run(capsys, "solve", "decay", "--rtol", "nan")
    assert code == 2 and out == ""
    assert_one_line_error(err, "--rtol", "finite")


def test_a_warning_of_the_solve_is_one_line_on_stderr(capsys):
    # rtol below float64's unit roundoff (1.1e-16): the library warns that it cannot be met.
    code, out, err = run(capsys, "solve", "decay", "--rtol", "1e-20", "--atol", "1e-12")
    assert code == 0 and "final state" in out
    assert err.startswith("odecore solve: warning: rtol=1e-20 is below the unit roundoff")
    assert err.count("\n") == 1 and "sys.exit" not in err


def test_zero_rtol_is_accepted_as_by_the_library(capsys):
    # rtol = 0 controls the error by atol alone; the command line refused it.
    code, out, err = run(capsys, "solve", "decay", "--rtol", "0", "--atol", "1e-10")
    assert code == 0, err
    error = float(re.search(r"^max abs error:\s+(\S+)$", out, flags=re.MULTILINE).group(1))
    assert error < 1e-8


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_numba_backend_is_refused_with_the_reason(capsys, monkeypatch, how):
    # The problems' dynamics are array-API functions, which numba cannot compile: the
    # solve failed with a long Numba traceback.
    if how == "flag":
        code, out, err = run(capsys, "solve", "decay", "--backend", "numba")
    else:
        # The environment applies where no set_backend choice is made (the API doctests
        # leave set_backend("auto"), which overrides it).
        monkeypatch.setattr(odecore._config, "_global_choice", None)
        monkeypatch.setenv("ODECORE_BACKEND", "numba")
        code, out, err = run(capsys, "solve", "decay")
    assert code == 2 and out == ""
    assert_one_line_error(err, "'numba' backend compiles", "valid backends here are")


def test_unknown_backend_exits_2(capsys):
    code, _, err = run(capsys, "solve", "decay", "--backend", "fortran")
    assert code == 2
    assert_one_line_error(err, "fortran", "numpy")


@pytest.mark.parametrize(
    "failure",
    [
        odecore.BackendNotAvailableError("install it with: pip install 'odecore[torch]'"),
        OSError("libtorch_global_deps.so: cannot open shared object file"),
    ],
)
def test_unusable_backend_exits_2_with_the_reason(capsys, monkeypatch, failure):
    def get_backend(name):
        raise failure

    monkeypatch.setattr(odecore, "get_backend", get_backend)
    code, out, err = run(capsys, "solve", "decay", "--backend", "torch")
    assert code == 2 and out == ""
    assert_one_line_error(err, "'torch' backend cannot be used", str(failure))


def test_explicit_numpy_backend(capsys):
    code, out, err = run(capsys, "solve", "lorenz", "--backend", "numpy")
    assert code == 0, err
    assert re.search(r"^backend:\s+numpy$", out, flags=re.MULTILINE)


def test_failed_solve_exits_1_with_the_solver_message(capsys):
    code, out, err = run(capsys, "solve", "arenstorf", "--max-steps", "5")
    assert code == 1 and out == ""
    assert "max_num_steps" in err and "Traceback" not in err


def test_no_command_prints_help_and_exits_2(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "problems" in err and "solve" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "solve", "--help")
    assert code == 0
    assert "--max-steps" in out


def test_solve_help_lists_the_methods_and_backends(capsys):
    code, out, _ = run(capsys, "solve", "--help")
    assert code == 0
    listed = set(re.findall(r"[a-z0-9_]+", out))
    assert set(odecore.METHODS) <= listed
    assert set(odecore.BACKEND_NAMES) - {"numba"} <= listed


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and err == ""
    assert out == f"odecore {odecore.__version__}\n"
