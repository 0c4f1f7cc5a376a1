"""Fit a neural ODE to a 2-D spiral with torch: the first demo of Chen et al. (2018).

The data is one trajectory of the damped cubic oscillator ``dy/dt = y**3 A``, with
``A = [[-0.1, 2.0], [-2.0, -0.1]]`` (``y**3`` elementwise, ``y`` a row vector), from
``y(0) = (2, 0)``, solved tightly by ``odecore.odeint`` in float64 and optionally made noisy
(``--noise``); ``--linear`` fits ``dy/dt = y A`` instead. The model is an MLP vector field of
``y**3`` (or of ``y`` with ``--linear``). Each iteration solves the model from a batch of
points of the trajectory over a short window and fits the next observations; the gradients
come from the continuous adjoint (``adjoint="backsolve"``) by default. The figure shows the
true and the learned trajectories and the learned vector field.

The script measures the mean distance between the true trajectory and the model's, solved
from ``y(0)`` over the whole time span, once before training and once after, and asserts that
training brought it to a fraction of the untrained model's.

    python examples/spiral.py [--quick] [--iterations 1000] [--adjoint backsolve] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import odecore  # noqa: E402

TRUE_A = [[-0.1, 2.0], [-2.0, -0.1]]
Y0 = [2.0, 0.0]
# The training solves: float32 resolves about 7 digits, and the fit needs far fewer.
TOLERANCES = {"rtol": 1e-5, "atol": 1e-6, "method": "dopri5"}
# The trained model's error must be below this fraction of the untrained model's.
REQUIRED_IMPROVEMENT = 0.4


def features(y, linear):
    return y if linear else y**3


class TrueField:
    def __init__(self, linear):
        self.A = torch.tensor(TRUE_A, dtype=torch.float64)
        self.linear = linear

    def __call__(self, t, y):
        return features(y, self.linear) @ self.A


class Field(torch.nn.Module):
    """An MLP of the same features as the true field, ``y**3`` (or ``y``)."""

    def __init__(self, linear, hidden=50):
        super().__init__()
        self.linear = linear
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
        )
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                # Small weights: the untrained field is slow, and its solves short.
                torch.nn.init.normal_(layer.weight, std=0.1)
                torch.nn.init.zeros_(layer.bias)

    def forward(self, t, y):
        return self.net(features(y, self.linear))


def make_data(args):
    """The times and the (noisy) observed trajectory, float32, and the noiseless one."""
    t = torch.linspace(0.0, args.t_end, args.points, dtype=torch.float64)
    y0 = torch.tensor([Y0], dtype=torch.float64)
    truth = odecore.odeint(TrueField(args.linear), y0, t, rtol=1e-10, atol=1e-12)[:, 0]
    observed = truth + args.noise * torch.randn_like(truth)
    return t.float(), observed.float(), truth.float()


def batch(t, observed, size, window):
    """``size`` windows of ``window`` consecutive observations at random starts: their first
    points (the initial states), the window's times from 0, and the observations."""
    starts = torch.randint(0, len(t) - window, (size,))
    y0 = observed[starts]
    times = t[:window] - t[0]
    targets = torch.stack([observed[starts + i] for i in range(window)])
    return y0, times, targets


def trajectory_error(model, t, truth):
    """Mean distance from the true trajectory of the model solved from ``y(0)``."""
    with torch.no_grad():
        predicted = odecore.odeint(model, truth[:1], t, **TOLERANCES)[:, 0]
    return (predicted - truth).norm(dim=1).mean().item(), predicted


def train(model, t, observed, args):
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    # The step size decays to zero, so that the last iterations refine rather than jump
    # around the fit, whose errors compound over the long trajectory.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.iterations)
    bar = tqdm(range(args.iterations), desc="training", unit="it")
    for _ in bar:
        y0, times, targets = batch(t, observed, args.batch, args.window)
        predicted = odecore.odeint(model, y0, times, adjoint=args.adjoint, **TOLERANCES)
        loss = (predicted - targets).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


def plot(model, t, observed, truth, predicted, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].plot(t, truth[:, 0], "g-", label="true x")
    axes[0].plot(t, truth[:, 1], "b-", label="true y")
    axes[0].plot(t, predicted[:, 0], "g--", label="learned x")
    axes[0].plot(t, predicted[:, 1], "b--", label="learned y")
    axes[0].set_xlabel("t")
    axes[0].set_title("trajectories")
    axes[0].legend(loc="lower right", fontsize=8)
    if not torch.equal(observed, truth):
        axes[1].plot(observed[:, 0], observed[:, 1], ".", color="0.7", markersize=2, label="data")
    axes[1].plot(truth[:, 0], truth[:, 1], "g-", label="true")
    axes[1].plot(predicted[:, 0], predicted[:, 1], "b--", label="learned")
    axes[1].set_title("phase portrait")
    axes[1].legend(loc="lower right", fontsize=8)
    grid = torch.linspace(-2.0, 2.0, 25)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        velocity = model(None, torch.stack([xx.ravel(), yy.ravel()], dim=1))
    u, v = velocity[:, 0].reshape(xx.shape), velocity[:, 1].reshape(xx.shape)
    axes[2].streamplot(xx.numpy(), yy.numpy(), u.numpy(), v.numpy(), color="k", density=1.2)
    axes[2].set_title("learned vector field")
    for ax in axes[1:]:
        ax.set_xlim(-2.0, 2.0)
        ax.set_ylim(-2.0, 2.0)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run of seconds")
    parser.add_argument("--iterations", type=int, default=None, help="default 1000 (200 quick)")
    parser.add_argument("--points", type=int, default=None, help="default 1000 (250 quick)")
    parser.add_argument("--t-end", type=float, default=None, help="default 25 (10 quick)")
    parser.add_argument("--batch", type=int, default=20, help="windows per iteration")
    parser.add_argument("--window", type=int, default=10, help="observations per window")
    parser.add_argument("--noise", type=float, default=0.0, help="std of the observation noise")
    parser.add_argument("--linear", action="store_true", help="fit dy/dt = y A instead")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--adjoint", choices=("direct", "backsolve", "checkpoint"), default="backsolve"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    args = parser.parse_args(argv)
    quick = {"iterations": 200, "points": 250, "t_end": 10.0}
    full = {"iterations": 1000, "points": 1000, "t_end": 25.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    args = parse(argv)
    # The networks are small: one thread wastes nothing, and sums in one order, so a run
    # repeats exactly on the same machine.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    t, observed, truth = make_data(args)
    model = Field(args.linear)
    untrained, _ = trajectory_error(model, t, truth)
    start = time.perf_counter()
    final_loss = train(model, t, observed, args)
    elapsed = time.perf_counter() - start
    trained, predicted = trajectory_error(model, t, truth)
    path = args.out / "spiral.png"
    plot(model, t, observed, truth, predicted, path)
    print(f"trained {args.iterations} iterations ({args.adjoint}) in {elapsed:.0f} s")
    print(f"final batch loss (mean absolute error): {final_loss:.4f}")
    print(
        f"trajectory error: untrained {untrained:.4f}, trained {trained:.4f} "
        f"(ratio {trained / untrained:.3f})"
    )
    print(f"figure: {path}")
    assert trained < REQUIRED_IMPROVEMENT * untrained, (
        f"training did not fit the spiral: error {trained:.4f} against {untrained:.4f} untrained"
    )
    return trained / untrained


if __name__ == "__main__":
    main()
