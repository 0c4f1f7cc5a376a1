"""The model and data of the 2-D continuous-normalizing-flow example, shared with
benchmarks/bench_cnf.py: two toy densities and the velocity, an MLP of ``[z, t]``."""

from __future__ import annotations

import math

import numpy as np
import torch

HIDDEN = 64
TOLERANCES = {"rtol": 1e-5, "atol": 1e-5}


def two_moons(n, rng):
    """Two interleaved half circles with Gaussian noise, scaled to unit-ish variance."""
    angle = rng.uniform(0.0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x - 0.5, y - 0.25], axis=1) * 2.0
    return points + 0.1 * rng.standard_normal((n, 2))


def eight_gaussians(n, rng):
    centres = [(math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)) for k in range(8)]
    picks = np.asarray(centres)[rng.integers(0, 8, n)] * 2.0
    return picks + 0.2 * rng.standard_normal((n, 2))


DATA = {"moons": two_moons, "gaussians": eight_gaussians}


class Velocity(torch.nn.Module):
    """``f(t, z)``: an MLP of the state and the time (2 -> 64 -> 64 -> 2, tanh). It counts
    its evaluations, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, HIDDEN),
            torch.nn.Tanh(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.Tanh(),
            torch.nn.Linear(HIDDEN, 2),
        )
        self.evaluations = 0

    def forward(self, t, z):
        self.evaluations += 1
        time_column = torch.broadcast_to(torch.as_tensor(t, dtype=z.dtype), (z.shape[0], 1))
        return self.net(torch.cat([z, time_column], dim=1))
