"""The neural-ODE and CNF examples run in their quick setting and reach what they claim.

Each script runs in a subprocess, as a user runs it, seeded and on one thread, in a
temporary directory that also receives its figures. Its own final ``assert`` already checks
the outcome; the test also reads the printed metrics and checks them against a reference
computed independently of the training: the untrained model's error (spiral), the least loss
of any 1-D flow in closed form (augmented ODE), and the held-out ELBO of the untrained model
and the error of predicting each series' mean (latent ODE).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from backend_params import framework_module, optional_module

framework_module("torch")
optional_module("examples", "matplotlib")
optional_module("examples", "tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUMBER = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_quick(script: str, out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--seed", "0", "--out", str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        # Seconds alone on a quiet machine; generous for a loaded one.
        timeout=600,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def metric(pattern: str, output: str) -> tuple[float, ...]:
    match = re.search(pattern, output)
    assert match, f"no line matching {pattern!r} in:\n{output}"
    return tuple(float(value) for value in match.groups())


def assert_png(path: Path):
    assert path.is_file(), f"{path} was not written"
    with path.open("rb") as figure:
        assert figure.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    # A blank 90-dpi canvas of these sizes is already several kilobytes; an image with
    # plotted lines is more.
    assert path.stat().st_size > 10_000


def test_spiral_fits_the_trajectory(tmp_path):
    output = run_quick("spiral.py", tmp_path)
    untrained, trained = metric(rf"trajectory error: untrained {NUMBER}, trained {NUMBER}", output)
    # A model that did not learn stays at the untrained error; the fitted one follows the
    # spiral to a fraction of it. The bound leaves room for another machine's rounding, which
    # changes the training as a new seed would.
    assert trained < 0.4 * untrained
    assert_png(tmp_path / "spiral.png")


def test_augmented_ode_fits_what_the_plain_one_cannot(tmp_path):
    output = run_quick("augmented_ode.py", tmp_path)
    (floor,) = metric(rf"variance of the inputs\): {NUMBER}", output)
    plain, augmented = metric(rf"final loss: plain {NUMBER}, augmented {NUMBER}", output)
    # --quick trains on 16 points evenly spread over [-1, 1]; the variance of n such points is
    # (n + 1) / (3 (n - 1)), the least mean squared error of an increasing map to -x.
    points = 16
    assert floor == pytest.approx((points + 1) / (3 * (points - 1)), abs=1e-4)
    # A 1-D flow cannot beat the floor (beyond the solve's error, near its rtol of 1e-5), and
    # the augmented flow must come far below it.
    assert plain > 0.95 * floor
    assert augmented < 0.1 * plain
    assert_png(tmp_path / "augmented_ode_plain.png")
    assert_png(tmp_path / "augmented_ode_augmented.png")


def test_latent_ode_learns_the_spirals(tmp_path):
    output = run_quick("latent_ode.py", tmp_path)
    untrained, trained = metric(
        rf"negative ELBO per series: untrained {NUMBER}, trained {NUMBER}", output
    )
    (model_error,) = metric(rf"latent ODE MSE: interpolation {NUMBER}", output)
    (mean_error,) = metric(rf"mean observation MSE: interpolation {NUMBER}", output)
    # The untrained model's reconstructions are as poor as a constant guess; a trained one
    # must bring the held-out -ELBO to a fraction of its value, and reconstruct the spirals
    # inside the observed window better than each series' mean observation does.
    assert trained < 0.25 * untrained
    assert model_error < 0.5 * mean_error
    assert_png(tmp_path / "latent_ode.png")


def test_cnf_2d_learns_a_normalized_density(tmp_path):
    output = run_quick("cnf_2d.py", tmp_path)
    (mass,) = metric(rf"density mass on the grid {NUMBER}", output)
    untrained, trained = metric(rf"held-out NLL untrained {NUMBER}, trained {NUMBER}", output)
    # The flow's density integrates to one; --quick's 30-point grid over [-4, 4]^2 sums it to
    # within a few percent, while a log-density without its trace term misses by a fifth.
    assert abs(mass - 1.0) < 0.05
    # Ten iterations already lower the NLL of held-out data by half a nat; a flow whose
    # gradients were wrong would not move it.
    assert trained < untrained - 0.1
    assert_png(tmp_path / "cnf_2d.png")
    assert_png(tmp_path / "cnf_2d_training.png")
