"""odecore.cnf against an FFJORD reference on torchdiffeq: one training iteration of a 2-D
continuous normalizing flow, and the RNODE regularisers' effect on the solves.

    python benchmarks/bench_cnf.py            # tens of minutes on 2 cores (RNODE trains twice)
    python benchmarks/bench_cnf.py --quick    # shorter timings, fewer training iterations

The model and data are examples/cnf_2d.py's, imported from examples/cnf_model.py: the
velocity is an MLP of ``[z, t]`` (2 -> 64 -> 64 -> 2, tanh), float32, on batches of 256
points of two moons; dopri5 at rtol = atol = 1e-5 on t in [0, 1], gradients by the
continuous adjoint, Hutchinson's trace with one Rademacher probe per sample drawn once per
solve, loss the mean negative log-likelihood.

The reference is written here the way FFJORD's code is: an ``nn.Module`` whose state is the
tuple ``(z, delta_logp)``, the divergence by one ``torch.autograd.grad`` per probe with
``create_graph=True``, solved by ``torchdiffeq.odeint_adjoint`` (which controls the error
of both parts). odecore runs ``odecore.cnf.solve_log_prob`` with ``adjoint="backsolve"``,
once with its default error control (on ``z`` alone, as RNODE does) and once on every part
(``error_control="all"``, the reference's choice).

Printed:

- time per training iteration (forward and backward, no optimiser step, the same weights
  and batch for both; the best call of as many as fill --min-time seconds, calls alternating
  between the libraries), with the evaluations of the velocity forward and backward;
- the RNODE effect: the same model trained for --iterations steps from the same weights with
  and without the kinetic and Jacobian-Frobenius penalties (weight 0.01 each); then the
  held-out NLL (exact trace) and the evaluations of one training iteration.

This is a report, not a test.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torchdiffeq
from _common import alternating_best_times, environment_lines, fmt_time, print_table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from cnf_model import TOLERANCES, Velocity  # noqa: E402
from cnf_model import two_moons as moons_array  # noqa: E402

from odecore import cnf

BATCH = 256
TOL = TOLERANCES["rtol"]


def two_moons(n, rng):
    return torch.as_tensor(moons_array(n, rng), dtype=torch.float32)


class FFJORDFunc(torch.nn.Module):
    """The reference's augmented dynamics, as FFJORD writes them: probes drawn at the first
    evaluation of a solve and kept, the divergence by one VJP per probe."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity
        self.eps = None

    def forward(self, t, state):
        z, _ = state
        with torch.enable_grad():
            z = z.requires_grad_(True)
            dz = self.velocity(t, z)
            if self.eps is None:
                self.eps = torch.randint_like(z, 0, 2) * 2 - 1
            (e_dzdx,) = torch.autograd.grad(dz, z, self.eps, create_graph=True)
        div = (e_dzdx * self.eps).sum(dim=1, keepdim=True)
        return dz, div


def ffjord_nll(func, x):
    func.eps = None
    logp0 = torch.zeros(x.shape[0], 1)
    z, delta = torchdiffeq.odeint_adjoint(
        func,
        (x, logp0),
        torch.tensor([0.0, 1.0]),
        rtol=TOL,
        atol=TOL,
        method="dopri5",
        adjoint_params=tuple(func.parameters()),
    )
    z1, delta1 = z[-1], delta[-1][:, 0]
    log_base = -0.5 * (z1 * z1).sum(1) - math.log(2 * math.pi)
    return -(log_base + delta1).mean()


def odecore_loss(model, x, generator, error_control="state", regularizers=(), weight=0.0):
    result = cnf.solve_log_prob(
        model,
        x,
        trace="hutchinson",
        generator=generator,
        regularizers=regularizers,
        error_control=error_control,
        adjoint="backsolve",
        rtol=TOL,
        atol=TOL,
    )
    nll = -result.log_prob.mean()
    penalty = sum(result.regularizers[n].mean() for n in regularizers) if regularizers else 0.0
    return nll + weight * penalty, nll


def evaluations(model, step):
    """``(forward, backward)`` evaluations of the velocity in one call of ``step``, which
    returns the loss before its backward pass."""
    model.zero_grad()
    before = model.evaluations
    loss = step()
    forward = model.evaluations - before
    loss.backward()
    return forward, model.evaluations - before - forward


def iteration_table(model, x, min_time):
    ref = FFJORDFunc(model)
    generator = torch.Generator().manual_seed(0)

    def odecore_step(control):
        return lambda: odecore_loss(model, x, generator, control)[0]

    steps = {
        "odecore, error control on z": odecore_step("state"),
        "odecore, error control on all parts": odecore_step("all"),
        "torchdiffeq FFJORD reference": lambda: ffjord_nll(ref, x),
    }

    def backward(step):
        return lambda: step().backward()

    names = list(steps)
    times = alternating_best_times([backward(steps[n]) for n in names], min_time, 3)
    nfes = [evaluations(model, steps[n]) for n in names]
    reference = times[-1]
    rows = [
        (name, fmt_time(s), f"{s / reference:.2f}", f"{f}", f"{b}")
        for name, s, (f, b) in zip(names, times, nfes, strict=True)
    ]
    print("one training iteration (forward + backward), batch 256, dopri5 at 1e-5:")
    print_table(("", "time", "ratio to reference", "NFE forward", "NFE backward"), rows)
    return times, nfes


def train(model, iterations, regularizers, seed):
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        loss, _ = odecore_loss(
            model, two_moons(BATCH, rng), generator, regularizers=regularizers, weight=0.01
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def rnode_table(initial_state, iterations):
    held_out = two_moons(2000, np.random.default_rng(123))
    batch = two_moons(BATCH, np.random.default_rng(7))
    rows = []
    for label, regs in (("plain", ()), ("RNODE", ("kinetic", "jacobian_frobenius"))):
        model = Velocity()
        model.load_state_dict(initial_state)
        start = time.perf_counter()
        train(model, iterations, regs, seed=1)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            nll = -cnf.log_prob(model, held_out, rtol=TOL, atol=TOL).mean().item()
        generator = torch.Generator().manual_seed(0)
        forward, backward = evaluations(
            model, lambda m=model, g=generator: odecore_loss(m, batch, g)[0]
        )
        rows.append((label, f"{nll:.3f}", f"{forward}", f"{backward}", f"{seconds:.0f} s"))
    print(f"RNODE effect after {iterations} training iterations from the same weights:")
    print_table(
        ("training", "held-out NLL (exact)", "NFE forward", "NFE backward", "training time"),
        rows,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    iterations = args.iterations or (40 if args.quick else 200)
    min_time = args.min_time or (2.0 if args.quick else 10.0)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    for line in environment_lines(
        {"torch": torch.__version__, "torchdiffeq": torchdiffeq.__version__}
    ):
        print(line)
    print(f"torch threads: {args.threads}")
    model = Velocity()
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    # Timings on weights trained a little: at initialisation the flow is nearly the identity
    # and every solve takes the minimum of steps.
    train(model, 30, (), seed=0)
    x = two_moons(BATCH, np.random.default_rng(0))
    iteration_table(model, x, min_time)
    print()
    rnode_table(initial_state, iterations)


if __name__ == "__main__":
    main()
