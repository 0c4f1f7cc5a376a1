"""examples/odenet_vs_resnet.py runs as a user would run it, and its models learn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from backend_params import framework_module, optional_module

framework_module("torch")
optional_module("examples", "sklearn")
optional_module("examples", "matplotlib")
optional_module("examples", "tqdm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "odenet_vs_resnet.py"


def run_quick(out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def table_row(out: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}\s+(.*)$", out, re.M)
    assert match, f"no {label!r} row in:\n{out}"
    return match.group(1)


def test_quick_run_learns_and_backsolve_saves_less(tmp_path):
    out = run_quick(tmp_path)
    assert (tmp_path / "odenet_vs_resnet_error.png").stat().st_size > 0
    assert (tmp_path / "odenet_vs_resnet_nfe.png").stat().st_size > 0

    # Ten classes: chance is a 90% error. Three epochs take both models far below it with
    # any seed; an untrained model stays near chance.
    errors = [float(e) for e in re.findall(r"([\d.]+)%", table_row(out, "test error"))]
    assert len(errors) == 2 and max(errors) < 15.0, errors

    # The ODE-Net uses one block where the ResNet uses six of the same shape.
    ode_blocks, res_blocks = map(int, table_row(out, "in the blocks").split())
    assert res_blocks == 6 * ode_blocks

    # backsolve keeps the solve's input and output for the backward pass; direct keeps the
    # stages of every step, at least one block evaluation's activations per stage.
    backsolve, direct, _ = map(
        int, re.findall(r"\d+", table_row(out, "saved for backward (bytes)"))
    )
    assert backsolve < direct

    # The continuous adjoint and the gradient of the discrete solve differ by the solves'
    # errors: at the quick run's tolerance (1e-3) a few degrees, far less than a wrong or
    # missing term would turn the gradient (0.9 is 26 degrees).
    cosine = float(table_row(out, "ODE block gradient, cosine between backsolve and direct:"))
    assert cosine > 0.9

    # dopri5 spends at least one step of six evaluations (plus the first-step estimate)
    # on each solve, forward and backward.
    forward = [
        float(x) for x in re.findall(r"[\d.]+", table_row(out, "NFE per forward, epoch 1 -> last"))
    ]
    backward = [
        float(x) for x in re.findall(r"[\d.]+", table_row(out, "NFE per backward, epoch 1 -> last"))
    ]
    assert min(forward) >= 7 and min(backward) >= 7
    assert "Chen et al. (2018)" in out
