"""Train a neural ODE classifier with torch DistributedDataParallel, one process per rank.

Two interleaved spirals in the plane, one class each; the features flow through
``dy/dt = f(t, y)`` (a small MLP, an ``nn.Module`` whose parameters odecore finds itself) and
a linear readout of the final state classifies them. Every rank holds the same model; each
step, the global batch is split between the ranks, each solves its part (``batch_axis=0``:
every sample takes its own steps) and DDP averages the gradients, which reach the dynamics'
parameters through odecore's autograd Function in every gradient mode.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py [--quick] [--adjoint backsolve]
    python examples/ddp_train.py --quick          # one process, no DDP

Each rank prints its throughput (samples per second of its own part); rank 0 prints the loss
and the accuracy.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

import odecore

FEATURES, HIDDEN = 2, 32
T = (0.0, 1.0)


def spirals(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points on two interleaved spirals with a little noise, and their class."""
    labels = torch.randint(0, 2, (count,), generator=generator)
    radius = torch.rand(count, generator=generator) * 0.9 + 0.1
    angle = 3 * math.pi * radius + math.pi * labels
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    points = points + 0.02 * torch.randn(count, 2, generator=generator)
    return points, labels.to(points.dtype)


class Dynamics(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES + 1, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, FEATURES)
        )

    def forward(self, t, y):
        # t is one time, or one per sample when each takes its own steps.
        time_column = torch.as_tensor(t, dtype=y.dtype).reshape(-1, 1).expand(y.shape[0], 1)
        return self.net(torch.cat([y, time_column], dim=1))


class NeuralODEClassifier(nn.Module):
    def __init__(self, adjoint: str):
        super().__init__()
        self.adjoint = adjoint
        self.dynamics = Dynamics()
        self.readout = nn.Linear(FEATURES, 1)

    def forward(self, x):
        t = torch.tensor(T, dtype=x.dtype)
        ys = odecore.odeint(
            self.dynamics, x, t, batch_axis=0, adjoint=self.adjoint, rtol=1e-5, atol=1e-6
        )
        return self.readout(ys[-1]).squeeze(1)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256, help="global batch, split over ranks")
    parser.add_argument(
        "--adjoint", default="backsolve", choices=["direct", "backsolve", "checkpoint"]
    )
    parser.add_argument("--quick", action="store_true", help="30 steps of a batch of 64")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 30, 64
    return args


def main(argv=None) -> float:
    args = parse(argv)
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide evenly over {world} ranks")
    # Ranks share one core each on a small machine; their threads would only compete.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = NeuralODEClassifier(args.adjoint)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Every rank draws the same global batches and keeps its own slice of each.
    generator = torch.Generator().manual_seed(1)
    part = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    seen, solving = 0, 0.0
    for step in range(args.steps):
        x, y = spirals(args.batch, generator)
        start = time.perf_counter()
        loss = nn.functional.binary_cross_entropy_with_logits(trained(x[part]), y[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        solving += time.perf_counter() - start
        seen += x[part].shape[0]
        if rank == 0 and (step % max(args.steps // 10, 1) == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    accuracy = evaluate(model, rank)
    print(f"rank {rank}/{world}: {seen / solving:.1f} samples/s ({seen} samples)", flush=True)
    if distributed:
        torch.distributed.destroy_process_group()
    return accuracy


def evaluate(model: nn.Module, rank: int) -> float:
    x, y = spirals(1000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = ((model(x) > 0).to(y.dtype) == y).to(x.dtype).mean().item()
    if rank == 0:
        print(f"test accuracy {accuracy:.3f}", flush=True)
    return accuracy


if __name__ == "__main__":
    main()
