"""Train a continuous normalizing flow (FFJORD-style) on a 2-D toy density with torch.

The velocity ``f(t, z)`` is a small MLP of ``[z, t]``; ``odecore.cnf.log_prob`` carries each
data point ``x`` at ``t = 0`` to ``z`` at ``t = 1`` and returns ``log p(x) = log N(z) +
integral tr(df/dz) dt``. Training uses Hutchinson's trace estimator (one Rademacher probe per
sample, drawn once per solve) and RNODE's kinetic-energy and Jacobian-Frobenius penalties,
which keep the learned dynamics simple and the solves short; gradients come from the
continuous adjoint (``adjoint="backsolve"``). The evaluation uses the exact trace. The
figures (in ``--out``) show the data, the learned density and samples of the flow side by
side, and the training loss and the velocity's evaluations per iteration.

    python examples/cnf_2d.py [--quick] [--data moons|gaussians] [--iterations 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cnf_model import DATA, TOLERANCES, Velocity  # noqa: E402
from tqdm import tqdm  # noqa: E402

from odecore import cnf  # noqa: E402


def train(model, sample_data, args):
    """Adam on the NLL plus the RNODE penalties. Returns the history per iteration: the
    training batch's NLL (Hutchinson's estimate) and the velocity's evaluations in the
    forward and the backward solve."""
    history = {"nll": [], "nfe_forward": [], "nfe_backward": []}
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.iterations), desc="training", unit="it")
    for _ in bar:
        x = torch.as_tensor(sample_data(args.batch), dtype=torch.float32)
        before = model.evaluations
        result = cnf.solve_log_prob(
            model,
            x,
            trace="hutchinson",
            generator=generator,
            regularizers=("kinetic", "jacobian_frobenius"),
            adjoint="backsolve",
            **TOLERANCES,
        )
        nll = -result.log_prob.mean()
        penalty = sum(result.regularizers[name].mean() for name in result.regularizers)
        loss = nll + args.rnode * penalty
        forward_nfe = model.evaluations - before
        optimiser.zero_grad()
        loss.backward()
        backward_nfe = model.evaluations - before - forward_nfe
        optimiser.step()
        bar.set_postfix(nll=f"{nll.item():.3f}", nfe=f"{forward_nfe}+{backward_nfe}")
        history["nll"].append(nll.item())
        history["nfe_forward"].append(forward_nfe)
        history["nfe_backward"].append(backward_nfe)
    return history


def held_out_nll(model, data):
    """The mean negative log-likelihood of ``data`` under the flow, with the exact trace."""
    with torch.no_grad():
        held_out = torch.as_tensor(data, dtype=torch.float32)
        return -cnf.log_prob(model, held_out, **TOLERANCES).mean().item()


def evaluate(model, data, args):
    """The exact-trace NLL of held-out data, the density on a grid, and samples."""
    nll = held_out_nll(model, data)
    with torch.no_grad():
        grid = np.linspace(-4.0, 4.0, args.grid)
        xx, yy = np.meshgrid(grid, grid)
        points = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=torch.float32)
        density = cnf.log_prob(model, points, **TOLERANCES).exp().reshape(xx.shape).numpy()
        samples = cnf.sample(
            model,
            2000,
            2,
            generator=torch.Generator().manual_seed(args.seed),
            dtype=torch.float32,
            backend="torch",
            **TOLERANCES,
        ).numpy()
    mass = density.sum() * (grid[1] - grid[0]) ** 2
    return nll, density, samples, mass


def plot(data, density, samples, path):
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    extent = (-4.0, 4.0, -4.0, 4.0)
    axes[0].hist2d(data[:, 0], data[:, 1], bins=100, range=[extent[:2], extent[2:]])
    axes[0].set_title("data")
    axes[1].imshow(density, origin="lower", extent=extent)
    axes[1].set_title("learned density (exact trace)")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=100, range=[extent[:2], extent[2:]])
    axes[2].set_title("samples of the flow")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(history, path):
    iterations = range(1, len(history["nll"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(iterations, history["nll"])
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("training NLL (nats, Hutchinson)")
    axes[1].plot(iterations, history["nfe_forward"], label="forward solve")
    axes[1].plot(iterations, history["nfe_backward"], label="backward solve (adjoint)")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("velocity evaluations")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run of seconds")
    parser.add_argument("--data", choices=sorted(DATA), default="moons")
    parser.add_argument("--iterations", type=int, default=None, help="default 200 (10 quick)")
    parser.add_argument("--batch", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rnode", type=float, default=0.01, help="weight of both penalties")
    parser.add_argument("--grid", type=int, default=None, help="default 120 (30 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs")
    args = parser.parse_args(argv)
    for name, full, quick in (("iterations", 200, 10), ("batch", 256, 64), ("grid", 120, 30)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.iterations, args.batch, args.grid) < 1:
        parser.error("--iterations, --batch and --grid must be positive")
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = Velocity()
    untrained = copy.deepcopy(model)
    start = time.perf_counter()
    history = train(model, lambda n: DATA[args.data](n, rng), args)
    trained = time.perf_counter() - start
    data = DATA[args.data](5000, rng)
    nll, density, samples, mass = evaluate(model, data, args)
    untrained_nll = held_out_nll(untrained, data)
    figures = args.out / "cnf_2d.png", args.out / "cnf_2d_training.png"
    plot(data, density, samples, figures[0])
    plot_training(history, figures[1])
    first, last = slice(0, 10), slice(-10, None)
    print(
        f"trained {args.iterations} iterations in {trained:.0f} s; held-out NLL {nll:.3f} "
        f"(exact trace); density mass on the grid {mass:.3f}"
    )
    for name, part in (("first", first), ("last", last)):
        forward, backward = history["nfe_forward"][part], history["nfe_backward"][part]
        mean_forward, mean_backward = sum(forward) / len(forward), sum(backward) / len(backward)
        print(
            f"{name} {len(forward)} iterations: mean NFE forward {mean_forward:.1f}, "
            f"backward {mean_backward:.1f}"
        )
    print("figures:", ", ".join(str(path) for path in figures))
    print(f"held-out NLL untrained {untrained_nll:.3f}, trained {nll:.3f}")
    # A density must integrate to one: a wrong divergence (the log-density's change) misses
    # it by far more than the grid's quadrature error over [-4, 4]^2. And training must
    # lower the NLL of data it never saw.
    assert abs(mass - 1.0) < 0.05, f"the density's mass on the grid is {mass:.3f}, not 1"
    assert nll < untrained_nll - 0.1, "training did not lower the held-out NLL"


if __name__ == "__main__":
    main()
