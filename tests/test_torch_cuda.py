"""The torch backend on a CUDA device: the same steps, values and gradients as on the CPU.

The CPU results are checked against closed forms and finite differences elsewhere
(test_gradients_torch.py); here the claim is that moving the tensors to a GPU changes nothing
but rounding, and that every tensor the solve returns lives on the input's device.
"""

from __future__ import annotations

import pytest
from backend_params import framework_module

pytestmark = pytest.mark.backend("torch")
torch = framework_module("torch")

import odecore  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device: torch.cuda.is_available() is False (CPU build of torch, or no GPU); "
        "run on a machine with a GPU to check the torch backend there",
        allow_module_level=True,
    )

F64, F32 = torch.float64, torch.float32
CUDA = torch.device("cuda")
MODES = ["direct", "backsolve", "checkpoint"]


class Field(torch.nn.Module):
    """``y' = W tanh(y) cos(t) - c y``: time-dependent, with parameters of two shapes."""

    def __init__(self, dtype=F64):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.W = torch.nn.Parameter(0.6 * torch.randn(3, 3, generator=gen, dtype=dtype))
        self.c = torch.nn.Parameter(torch.tensor(0.3, dtype=dtype))

    def forward(self, t, y):
        t = t[..., None] if t.ndim else t
        return torch.tanh(y) @ self.W.T * torch.cos(t) - self.c * y


def initial(batch=None, dtype=F64):
    gen = torch.Generator().manual_seed(11)
    shape = (3,) if batch is None else (batch, 3)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def solve_and_grads(device, mode, batch_axis, options=None):
    field = Field().to(device)
    y0 = initial(None if batch_axis is None else 4).to(device).requires_grad_(True)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64, device=device).requires_grad_(True)
    sol = odecore.solve(
        field, y0, t, rtol=1e-9, atol=1e-11, adjoint=mode, batch_axis=batch_axis, options=options
    )
    weights = torch.linspace(0.5, 1.5, sol.ys.numel(), dtype=F64, device=device)
    (weights.reshape(sol.ys.shape) * sol.ys).sum().backward()
    grads = [y0.grad, t.grad, field.W.grad, field.c.grad]
    return sol, grads


@pytest.mark.parametrize("batch_axis", [None, 0])
@pytest.mark.parametrize("mode", MODES)
def test_values_and_gradients_match_the_cpu(mode, batch_axis):
    options = {"jump_t": [0.7]}
    cpu_sol, cpu_grads = solve_and_grads("cpu", mode, batch_axis, options)
    gpu_sol, gpu_grads = solve_and_grads(CUDA, mode, batch_axis, options)
    assert gpu_sol.ys.device.type == "cuda"
    assert all(g.device.type == "cuda" for g in gpu_grads)
    # The same steps: step-size decisions are made on values equal to rounding.
    assert int(torch.as_tensor(gpu_sol.stats["nfev"]).sum()) == int(
        torch.as_tensor(cpu_sol.stats["nfev"]).sum()
    )
    torch.testing.assert_close(gpu_sol.ys.cpu(), cpu_sol.ys, rtol=1e-10, atol=1e-12)
    for gpu, cpu in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "rk4"])
def test_float32_on_the_gpu_is_accurate(method):
    # y' = cos(t) y has y = y0 exp(sin t).
    y0 = torch.tensor([1.0, -2.0], dtype=F32, device=CUDA)
    t = torch.linspace(0.0, 3.0, 4, dtype=F32, device=CUDA)
    options = {"step_size": 0.01} if method == "rk4" else None
    ys = odecore.odeint(
        lambda t, y: torch.cos(t) * y, y0, t, method=method, rtol=1e-5, atol=1e-7, options=options
    )
    assert ys.dtype == F32 and ys.device.type == "cuda"
    exact = torch.exp(torch.sin(t.double()))[:, None] * y0.double()
    assert float(((ys.double() - exact).abs() / exact.abs()).max()) < 1e-4


def test_cpu_times_follow_a_gpu_state():
    # Times given on the CPU (or as a list) are moved to the state's device, as a user who
    # moved only the model and the data would expect.
    field = Field().to(CUDA)
    y0 = initial().to(CUDA)
    on_gpu = odecore.odeint(field, y0, torch.linspace(0, 1, 3, dtype=F64, device=CUDA))
    for t in (torch.linspace(0, 1, 3, dtype=F64), [0.0, 0.5, 1.0]):
        ys = odecore.odeint(field, y0, t)
        assert ys.device.type == "cuda"
        torch.testing.assert_close(ys, on_gpu, rtol=0, atol=0)
    on_cpu = odecore.odeint(Field(), initial(), [0.0, 0.5, 1.0])
    torch.testing.assert_close(on_gpu.detach().cpu(), on_cpu.detach(), rtol=1e-10, atol=1e-12)
