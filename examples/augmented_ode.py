"""A plain neural ODE against an augmented one on the 1-D map g(x) = -x, with torch.

After Dupont, Doucet and Teh (2019), "Augmented Neural ODEs", section 4: the flow of an ODE
in one dimension cannot carry ``x = 1`` to ``-1`` and ``x = -1`` to ``1``, since two
trajectories that met would coincide from then on, so its map ``x -> h(1)`` is increasing. The
best increasing fit of ``-x`` in the mean-square sense is the constant ``-mean(x)``, so the
plain model's loss cannot go below the variance of the inputs (1/3 for inputs spread evenly
over ``[-1, 1]``). Padding the state with a zero (``h(0) = (x, 0)``) lets trajectories pass
each other in the plane, and the augmented model fits ``g``.

Both models are MLP vector fields of ``(h, t)``, solved by ``odecore.odeint`` (dopri5) from
``t = 0`` to ``1``; the output is the first coordinate of ``h(1)``, with no trained readout
that could do the flow's work. Gradients come from ``adjoint="checkpoint"`` (the exact
gradient of the discrete solve, from the stored steps) by default. The figures show the
trajectories of several inputs through each flow.

    python examples/augmented_ode.py [--quick] [--iterations 300] [--adjoint checkpoint] [--out DIR]
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

# An accurate solve: a loose one could let 1-D trajectories jump past each other, which the
# exact flow cannot.
TOLERANCES = {"rtol": 1e-5, "atol": 1e-6, "method": "dopri5"}
# The augmented model's final loss must be below this fraction of the plain model's.
REQUIRED_RATIO = 0.1


class Field(torch.nn.Module):
    """``dh/dt = MLP(h, t)`` for a state of ``dim`` coordinates."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, t, h):
        return self.net(torch.cat([h, t.expand(len(h), 1)], dim=1))


class FlowModel(torch.nn.Module):
    """``x -> h(1)[:, 0]`` with ``h(0) = (x, 0, ..., 0)``: ``augment`` zeros padded on."""

    def __init__(self, augment, hidden):
        super().__init__()
        self.augment = augment
        self.field = Field(1 + augment, hidden)

    def trajectories(self, x, times, adjoint="direct"):
        h0 = torch.cat([x, x.new_zeros(len(x), self.augment)], dim=1)
        return odecore.odeint(self.field, h0, times, adjoint=adjoint, **TOLERANCES)

    def forward(self, x, adjoint="direct"):
        return self.trajectories(x, torch.tensor([0.0, 1.0]), adjoint)[-1, :, :1]


def train(model, x, name, args):
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    bar = tqdm(range(args.iterations), desc=f"training {name}", unit="it")
    for _ in bar:
        loss = (model(x, args.adjoint) + x).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        return (model(x) + x).square().mean().item()


def plot(model, title, path):
    """The trajectories of inputs across [-1, 1]: the readout coordinate against time and,
    for an augmented model, the path through the plane of the first two coordinates."""
    x = torch.linspace(-1.0, 1.0, 15)[:, None]
    times = torch.linspace(0.0, 1.0, 60)
    with torch.no_grad():
        h = model.trajectories(x, times)
    colours = plt.cm.coolwarm((x[:, 0] + 1.0) / 2.0)
    panels = 2 if model.augment else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    for i in range(len(x)):
        axes[0, 0].plot(times, h[:, i, 0], color=colours[i])
    axes[0, 0].set_xlabel("t")
    axes[0, 0].set_ylabel("h(t) (first coordinate)")
    axes[0, 0].set_title(f"{title}: x at t = 0 to g(x) = -x at t = 1")
    if model.augment:
        for i in range(len(x)):
            axes[0, 1].plot(h[:, i, 0], h[:, i, 1], color=colours[i])
            axes[0, 1].plot(h[-1, i, 0], h[-1, i, 1], "o", color=colours[i], markersize=4)
        axes[0, 1].set_xlabel("h first coordinate")
        axes[0, 1].set_ylabel("h augmented coordinate")
        axes[0, 1].set_title("paths through the augmented plane (dot: t = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run of seconds")
    parser.add_argument("--iterations", type=int, default=None, help="default 300 (60 quick)")
    parser.add_argument("--points", type=int, default=None, help="default 64 (16 quick)")
    parser.add_argument("--augment", type=int, default=1, help="zeros padded onto the state")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--adjoint", choices=("direct", "backsolve", "checkpoint"), default="checkpoint"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs")
    args = parser.parse_args(argv)
    if args.augment < 1:
        parser.error(f"--augment must be at least 1, got {args.augment}")
    quick = {"iterations": 60, "points": 16}
    full = {"iterations": 300, "points": 64}
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

    x = torch.linspace(-1.0, 1.0, args.points)[:, None]
    # The least loss of an increasing map: that of the best constant, -mean(x).
    floor = x.var(unbiased=False).item()
    losses = {}
    start = time.perf_counter()
    for name, augment in (("plain", 0), ("augmented", args.augment)):
        model = FlowModel(augment, args.hidden)
        losses[name] = train(model, x, name, args)
        plot(model, f"{name} ODE", args.out / f"augmented_ode_{name}.png")
    elapsed = time.perf_counter() - start
    print(f"trained {args.iterations} iterations per model ({args.adjoint}) in {elapsed:.0f} s")
    print(f"least loss of any 1-D flow (variance of the inputs): {floor:.4f}")
    print(f"final loss: plain {losses['plain']:.4f}, augmented {losses['augmented']:.2e}")
    print(f"figures: {args.out / 'augmented_ode_plain.png'}, ", end="")
    print(args.out / "augmented_ode_augmented.png")
    assert losses["augmented"] < REQUIRED_RATIO * losses["plain"], (
        f"the augmented ODE did not fit g(x) = -x: loss {losses['augmented']:.4f} against "
        f"{losses['plain']:.4f} for the plain one"
    )
    # The solve's error, near rtol, moves the loss by far less than this margin; a plain loss
    # well below the floor would mean trajectories crossed, which no exact 1-D flow does.
    assert losses["plain"] > 0.95 * floor, (
        f"the plain ODE went below the least loss of a 1-D flow: {losses['plain']:.4f} < "
        f"{floor:.4f}"
    )
    return losses


if __name__ == "__main__":
    main()
