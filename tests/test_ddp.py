"""Training under torch DistributedDataParallel: two processes on gloo over the loopback
address, each with half of a global batch, must end one backward pass with the gradients of
one process on the whole batch.

DDP averages the ranks' gradients in hooks on each parameter, so a parameter whose gradient
arrived by another route than autograd would keep its own rank's half-batch gradient, and
differ from the single-process one by far more than rounding. Each rank's loss is the mean
over its half, so the average of the two is the gradient of the mean over the batch; what
remains is the order of the sums over samples (a few units of roundoff, 1e-12 relative is
ample in float64).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backend_params import framework_module

import odecore

torch = framework_module("torch")
nn = torch.nn

pytestmark = pytest.mark.backend("torch")

BATCH, FEATURES, HIDDEN = 8, 2, 8
WORLD = 2
T = (0.0, 0.5, 1.0)
# The backsolve's backward solve is one system over the batch (the parameters' adjoint is
# shared by every sample), so its adaptive steps depend on which samples a rank holds, and
# its gradient changes with the split by about the adjoint tolerance: "backsolve" is compared
# at that tolerance, "backsolve-fixed" (fixed backward steps) to rounding.
MODES = ("direct", "checkpoint", "backsolve-fixed", "backsolve", "deq")
ADJOINT_STEPS = {"adjoint_method": "rk4", "adjoint_options": {"step_size": 1.0 / 32}}
TOLERANCE = 1e-10


class Dynamics(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(FEATURES, HIDDEN)
        self.outer = nn.Linear(HIDDEN, FEATURES)

    def forward(self, t, y):
        return self.outer(torch.tanh(self.inner(y)))


class NeuralODE(nn.Module):
    def __init__(self, adjoint: str, **adjoint_keywords):
        super().__init__()
        self.adjoint = adjoint
        self.adjoint_keywords = adjoint_keywords
        self.dynamics = Dynamics()
        self.readout = nn.Linear(FEATURES, 1)

    def forward(self, x):
        t = torch.tensor(T, dtype=x.dtype)
        # batch_axis=0: each sample takes its own steps, so a sample's solve does not depend
        # on which other samples share its rank.
        ys = odecore.odeint(
            self.dynamics,
            x,
            t,
            batch_axis=0,
            adjoint=self.adjoint,
            rtol=TOLERANCE,
            atol=TOLERANCE,
            **self.adjoint_keywords,
        )
        return self.readout(ys[-1])


def equilibrium_map(z, params):
    weight, injection = params
    return torch.tanh(z @ weight.T + injection)


class DEQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(FEATURES, HIDDEN)
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN) * 0.3 / HIDDEN**0.5)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        injection = self.encode(x)
        z = odecore.fixed_point(
            equilibrium_map,
            torch.zeros_like(injection),
            (self.weight, injection),
            solver="anderson",
            tol=1e-14,
            backward_tol=1e-14,
            max_iter=200,
            backward_max_iter=200,
            batch_axis=0,
        )
        return self.head(z)


def build(mode: str) -> nn.Module:
    torch.manual_seed(0)
    if mode == "deq":
        model = DEQ()
    elif mode == "backsolve-fixed":
        model = NeuralODE("backsolve", **ADJOINT_STEPS)
    else:
        model = NeuralODE(mode)
    return model.double()


def global_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, FEATURES, generator=generator, dtype=torch.float64)
    target = torch.randn(BATCH, 1, generator=generator, dtype=torch.float64)
    return x, target


def gradients(model: nn.Module, trained: nn.Module, x, target) -> list:
    """One backward pass of ``model`` (``trained`` itself, or DDP around it) on the mean
    squared error; the gradients of ``trained``'s parameters."""
    loss = torch.mean((model(x) - target) ** 2)
    loss.backward()
    return [p.grad.detach().clone() for p in trained.parameters()]


def rank_gradients(rank: int, port: int, out_dir: str) -> None:
    """One rank: its half of the global batch under DDP, in every mode; the gradients
    written to ``out_dir``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        x, target = global_batch()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for mode in MODES:
            trained = build(mode)
            ddp = nn.parallel.DistributedDataParallel(trained)
            results[mode] = gradients(ddp, trained, x[half], target[half])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(rank_gradients, args=(free_port(), str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
def test_ddp_gradients_equal_single_process_ones(ranks, mode):
    torch.set_num_threads(1)
    x, target = global_batch()
    trained = build(mode)
    single = gradients(trained, trained, x, target)
    names = [name for name, _ in trained.named_parameters()]
    # The adaptive backsolve: the backward solve's error per unit of gradient is about its
    # tolerance (adjoint_rtol defaults to rtol), times the few hundred steps' growth.
    # Relative to each parameter's largest gradient too: rounding in sums over samples and
    # in the iterations is relative to the largest terms, not to a small entry.
    rtol = 100 * TOLERANCE if mode == "backsolve" else 1e-12
    for rank in range(WORLD):
        for name, got, want in zip(names, ranks[rank][mode], single, strict=True):
            scale = float(want.abs().max())
            np.testing.assert_allclose(
                got.numpy(), want.numpy(), rtol=rtol, atol=rtol * scale, err_msg=f"{mode} {name}"
            )


def test_the_ddp_example_trains_on_two_ranks():
    """examples/ddp_train.py under torchrun (``python -m torch.distributed.run``), two ranks
    on the loopback address: both finish and report their throughput."""
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run = subprocess.run(
        [*launcher, "--nproc_per_node", str(WORLD), str(example), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for rank in range(WORLD):
        assert re.search(rf"rank {rank}/{WORLD}: [0-9.]+ samples/s", run.stdout), run.stdout
    assert "test accuracy" in run.stdout
