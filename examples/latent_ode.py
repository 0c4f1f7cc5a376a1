"""A latent ODE on irregularly sampled, noisy 2-D spirals, with torch.

After Chen et al. (2018), section 5, and Rubanova, Chen and Duvenaud (2019), "Latent ODEs for
Irregularly-Sampled Time Series". Each series is a damped spiral
``x(t) = r exp(-decay t) (cos(s omega t + phase), sin(s omega t + phase))`` with a random
direction ``s = +-1``, radius and phase, seen with Gaussian noise at a few random times of a
fine grid over the observed window; every series has its own times.

The model is a variational autoencoder. A GRU reads a series' observations (each with its
time) from the last to the first and gives the posterior ``q(z0)``, a diagonal Gaussian
over the latent state at ``t = 0``. A sample of ``z0`` is carried through time by the latent
ODE ``dz/dt = f(z)``, an MLP, solved by ``odecore.odeint`` (rk4 at a fixed step; the
gradients by ``adjoint="direct"``, autograd through the solver, by default); a linear readout
maps ``z(t)`` to the data space. The loss is the negative ELBO: the Gaussian negative
log-likelihood of the observations (with the noise's standard deviation) plus the KL
divergence from ``q(z0)`` to ``N(0, I)``.

On held-out series, the script reconstructs the noiseless spiral from the posterior mean
inside the observed window (interpolation) and beyond it (extrapolation), compares both with
predicting each series' mean observation, plots some against the truth, and asserts that the
ELBO improved and that the interpolation beats the mean.

    python examples/latent_ode.py [--quick] [--iterations 600] [--adjoint direct] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import odecore  # noqa: E402

DECAY, OMEGA = 0.1, 1.0
T_OBSERVED, T_END, GRID_STEP = 6.0, 9.0, 0.1
# rk4's error at this step is far below the noise for spirals of period 2 pi; the outputs
# between steps come from the solver's cubic Hermite interpolation.
SOLVER_STEP = 0.25
# The held-out -ELBO must fall below this fraction of the untrained model's, and the
# interpolation error below this fraction of the mean observation's.
REQUIRED_ELBO_FACTOR = 0.25
REQUIRED_INTERPOLATION_RATIO = 0.5


class Spirals:
    """``n`` series on the grid: the noiseless values everywhere, and the indices and noisy
    values of ``observations`` random grid times inside the observed window."""

    def __init__(self, n, observations, noise, grid):
        direction = torch.randint(0, 2, (n, 1)) * 2.0 - 1.0
        radius = 1.0 + torch.rand(n, 1)
        phase = 2 * math.pi * torch.rand(n, 1)
        angle = direction * OMEGA * grid + phase
        envelope = radius * torch.exp(-DECAY * grid)
        self.truth = torch.stack([envelope * angle.cos(), envelope * angle.sin()], dim=2)
        window = int((grid <= T_OBSERVED + 1e-6).sum())
        self.index = torch.rand(n, window).argsort(dim=1)[:, :observations].sort(dim=1).values
        self.times = grid[self.index]
        self.values = gather(self.truth, self.index) + noise * torch.randn(n, observations, 2)
        self.window = window

    def __len__(self):
        return len(self.truth)


def gather(series, index):
    """``series[b, index[b, i]]``, for series of shape (batch, grid, 2)."""
    return series.gather(1, index[:, :, None].expand(-1, -1, series.shape[2]))


class LatentField(torch.nn.Module):
    """``dz/dt = MLP(z)``."""

    def __init__(self, latent, hidden):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, latent),
        )

    def forward(self, t, z):
        return self.net(z)


class LatentODE(torch.nn.Module):
    def __init__(self, latent=4, hidden=32, rnn_hidden=32):
        super().__init__()
        self.encoder = torch.nn.GRU(3, rnn_hidden, batch_first=True)
        self.posterior = torch.nn.Linear(rnn_hidden, 2 * latent)
        self.field = LatentField(latent, hidden)
        self.readout = torch.nn.Linear(latent, 2)

    def encode(self, times, values):
        """The mean and log-variance of ``q(z0)`` from the observations read backward."""
        sequence = torch.cat([values, times[:, :, None]], dim=2).flip(1)
        _, last = self.encoder(sequence)
        mean, log_var = self.posterior(last[0]).chunk(2, dim=1)
        return mean, log_var

    def decode(self, z0, grid, adjoint):
        """The readout of ``z(t)`` at every grid time, shape (batch, grid, 2)."""
        zs = odecore.odeint(
            self.field,
            z0,
            grid,
            method="rk4",
            options={"step_size": SOLVER_STEP},
            adjoint=adjoint,
        )
        return self.readout(zs).transpose(0, 1)


def negative_elbo(model, data, rows, grid, noise, adjoint):
    """The negative ELBO per series, averaged over ``rows``, from one sample of ``z0``."""
    times, values = data.times[rows], data.values[rows]
    mean, log_var = model.encode(times, values)
    z0 = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
    predicted = gather(model.decode(z0, grid, adjoint), data.index[rows])
    nll = 0.5 * ((predicted - values) / noise).square() + math.log(noise * math.sqrt(2 * math.pi))
    kl = 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var)
    return nll.sum(dim=(1, 2)).mean() + kl.sum(dim=1).mean()


def train(model, data, grid, args):
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    bar = tqdm(range(args.iterations), desc="training", unit="it")
    for _ in bar:
        rows = torch.randint(0, len(data), (args.batch,))
        loss = negative_elbo(model, data, rows, grid, args.noise, args.adjoint)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(neg_elbo=f"{loss.item():.1f}")


def evaluate(model, data, grid, args):
    """The held-out -ELBO, and the mean squared errors against the noiseless series of the
    reconstruction from the posterior mean and of each series' mean observation, inside the
    observed window and beyond it."""
    rows = torch.arange(len(data))
    with torch.no_grad():
        elbo = negative_elbo(model, data, rows, grid, args.noise, "direct").item()
        mean, _ = model.encode(data.times, data.values)
        predicted = model.decode(mean, grid, "direct")
    constant = data.values.mean(dim=1, keepdim=True)
    inside, beyond = slice(0, data.window), slice(data.window, None)
    errors = {
        name: (
            (guess[:, inside] - data.truth[:, inside]).square().mean().item(),
            (guess[:, beyond] - data.truth[:, beyond]).square().mean().item(),
        )
        for name, guess in (("model", predicted), ("mean", constant.expand_as(data.truth)))
    }
    return elbo, errors, predicted


def plot(data, grid, predicted, path, count=4):
    fig, axes = plt.subplots(1, count, figsize=(4 * count, 4.2))
    split = data.window
    for i, ax in enumerate(axes):
        ax.plot(*data.truth[i, :split].T, color="0.6", label="truth, observed window")
        ax.plot(*data.truth[i, split - 1 :].T, color="0.6", ls=":", label="truth, later")
        ax.plot(*data.values[i].T, "k.", label="observations")
        ax.plot(*predicted[i, :split].T, "b-", label="interpolation")
        ax.plot(*predicted[i, split - 1 :].T, "r--", label="extrapolation")
        ax.set_aspect("equal")
        ax.set_xlim(-2.1, 2.1)
        ax.set_ylim(-2.1, 2.1)
        ax.set_title(f"held-out series {i}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run of seconds")
    parser.add_argument("--iterations", type=int, default=None, help="default 600 (100 quick)")
    parser.add_argument("--series", type=int, default=None, help="default 500 (100 quick)")
    parser.add_argument("--observations", type=int, default=20, help="per series")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the observation noise")
    parser.add_argument("--batch", type=int, default=50, help="series per iteration")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--adjoint", choices=("direct", "backsolve", "checkpoint"), default="direct"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, weights, batches")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG")
    args = parser.parse_args(argv)
    quick = {"iterations": 100, "series": 100}
    full = {"iterations": 600, "series": 500}
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

    grid = torch.arange(0.0, T_END + GRID_STEP / 2, GRID_STEP)
    train_data = Spirals(args.series, args.observations, args.noise, grid)
    test_data = Spirals(100, args.observations, args.noise, grid)
    model = LatentODE()
    untrained, _, _ = evaluate(model, test_data, grid, args)
    start = time.perf_counter()
    train(model, train_data, grid, args)
    elapsed = time.perf_counter() - start
    trained, errors, predicted = evaluate(model, test_data, grid, args)
    path = args.out / "latent_ode.png"
    plot(test_data, grid, predicted, path)
    print(f"trained {args.iterations} iterations ({args.adjoint}) in {elapsed:.0f} s")
    print(f"held-out negative ELBO per series: untrained {untrained:.1f}, trained {trained:.1f}")
    for name, label in (("model", "latent ODE"), ("mean", "mean observation")):
        inside, beyond = errors[name]
        print(f"{label} MSE: interpolation {inside:.4f}, extrapolation {beyond:.4f}")
    print(f"figure: {path}")
    assert trained < REQUIRED_ELBO_FACTOR * untrained, (
        f"the ELBO did not improve enough: -ELBO {trained:.1f} against {untrained:.1f} untrained"
    )
    ratio = errors["model"][0] / errors["mean"][0]
    assert ratio < REQUIRED_INTERPOLATION_RATIO, (
        f"the interpolation is no better than the mean: MSE ratio {ratio:.3f}"
    )
    return trained, errors


if __name__ == "__main__":
    main()
