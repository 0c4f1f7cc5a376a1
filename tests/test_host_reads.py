"""A batch's results are read back to the host in a fixed number of transfers, whatever its
size. On a GPU every read of one element is a device synchronisation: reading a status per
sample made a solve of 2^20 samples wait a million times. torch on the CPU stands in for a
device library here, its element reads counted."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import odecore

torch = pytest.importorskip("torch")

READS = ("item", "__int__", "__float__", "__bool__", "__index__")


def decay(t, y):
    return -y


def element_reads(monkeypatch, n: int, **kwargs) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kw):
            counts[_name] += 1
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    y0 = torch.linspace(1.0, 2.0, n, dtype=torch.float64)[:, None]
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    try:
        sol = odecore.solve(decay, y0, t, batch_axis=0, **kwargs)
        assert sol.success and "success" in sol.message.lower()
    except odecore.SolveError as error:
        assert "samples" in str(error)
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "tsit5", "options": {"step_size": 0.1}},
        {"method": "dopri5", "rtol": 1e-6},
        # Every sample fails: the error message lists some of them.
        {"method": "dopri5", "rtol": 1e-10, "options": {"max_num_steps": 3}},
    ],
    ids=["fixed", "adaptive", "failed"],
)
def test_a_batch_is_read_back_in_transfers_independent_of_its_size(monkeypatch, kwargs):
    small, large = element_reads(monkeypatch, 8, **kwargs), element_reads(monkeypatch, 64, **kwargs)
    assert small == large
    assert sum(small.values()) > 0  # the counting sees the loop's own reads


def test_the_status_is_read_once():
    status = torch.tensor([0, 0, 1])
    assert not odecore.ode.solution.is_success(status)
    assert odecore.ode.solution.is_success(np.array([0, 0]))
    assert odecore.ode.solution.is_success(0)


def fixed_point_reads(monkeypatch, cheap: bool):
    """A batched Anderson solve on CPU tensors, its host reads counted, with the backend
    saying that reads are cheap (as on a CPU) or not (as on a device)."""
    if not cheap:
        monkeypatch.setattr(type(odecore.get_backend("torch")), "reads_cheaply", lambda *_: False)
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    counts: collections.Counter = collections.Counter()
    original = torch.Tensor.__bool__

    def counted(self):
        counts["__bool__"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    sol = odecore.solve_fixed_point(
        lambda z, p: torch.tanh(z @ p[0].T + p[1]),
        torch.zeros_like(x),
        (w, x),
        batch_axis=0,
        tol=1e-10,
    )
    monkeypatch.undo()
    return counts, sol


def test_a_fixed_point_branches_on_its_masks_only_where_reads_are_cheap(monkeypatch):
    # On host memory the loop reads whether every sample still runs and stayed finite, to
    # skip selects that would change nothing; on a device that read would wait for the
    # queue each iteration. The two paths compute the same thing.
    cheap, fast = fixed_point_reads(monkeypatch, cheap=True)
    dear, masked = fixed_point_reads(monkeypatch, cheap=False)
    assert cheap["__bool__"] > dear["__bool__"]
    assert torch.equal(fast.z, masked.z)
    assert torch.equal(fast.iterations, masked.iterations)
    assert fast.success and int(fast.iterations.max()) > 5
