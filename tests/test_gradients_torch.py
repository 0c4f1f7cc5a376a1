"""Gradients of odecore solves under torch autograd: every method, every adjoint mode.

``direct`` and ``checkpoint`` are exact gradients of the discrete solve (step sizes held
constant), so they must agree with each other to rounding and pass ``gradcheck`` against
finite differences of the solve itself. ``backsolve`` is the continuous adjoint: it matches
the others to the solver's tolerance. Time gradients come from the flow identities
(``dL/dt_i = ybar_i . f(t_i, y_i)``), exact for the ODE and equal to the discrete ones up
to tolerance. References that do not come from odecore: ``torch.autograd.gradcheck``
(finite differences), matrix exponentials and their Frechet derivatives (SciPy) for a
linear ODE, and torchdiffeq.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
from backend_params import framework_module

pytestmark = pytest.mark.backend("torch")
torch = framework_module("torch")

from gradient_cases import (  # noqa: E402
    A_LINEAR,
    CI_METHODS,
    EXACT_ONLY,
    MODES,
    Y0_LINEAR,
    linear_gradients,
    relative_error,
    settings,
)

import odecore  # noqa: E402

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


class Field(torch.nn.Module):
    """``dy/dt = tanh(y W^T + c) (1 + sin(2t)/2) + b cos(t)``: small, nonlinear and
    non-autonomous. Accepts a batch on axis 0 (then ``t`` has one time per sample).
    ``calls`` counts evaluations, forward and backward alike."""

    def __init__(self, n=2, seed=0, dtype=F64, unused=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(0.8 * torch.randn(n, n, generator=g, dtype=dtype))
        self.c = torch.nn.Parameter(0.3 * torch.randn(n, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(0.3 * torch.randn(n, generator=g, dtype=dtype))
        if unused:
            self.unused = torch.nn.Parameter(torch.ones(3, dtype=dtype))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return field_rhs(t, y, (self.W, self.c, self.b))


def field_rhs(t, y, params):
    """The same dynamics with explicit ``params = (W, c, b)``."""
    W, c, b = params
    t = t[..., None] if t.ndim else t
    return torch.tanh(y @ W.T + c) * (1 + 0.5 * torch.sin(2 * t)) + b * torch.cos(t)


def field_params(n=2, seed=0):
    """Fresh leaf copies of a Field's parameters, for the explicit-params form."""
    return tuple(p.detach().clone().requires_grad_(True) for p in Field(n, seed).parameters())


Y0 = torch.tensor([0.3, -0.4], dtype=F64)
Y0_BATCH = torch.tensor([[0.3, -0.4], [1.2, 0.5], [-2.0, 0.1]], dtype=F64)
T = torch.tensor([0.0, 0.35, 0.7], dtype=F64)


def weights(shape, seed=1):
    """Fixed, unequal cotangents: a loss ``sum(w * ys)`` sees every output differently."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64)


def leaf(x, dtype=F64):
    return x.detach().clone().to(dtype).requires_grad_(True)


def grads_of(tensors):
    """The ``.grad`` of each tensor (None stays None), cleared afterwards."""
    out = [None if x.grad is None else x.grad.detach().clone() for x in tensors]
    for x in tensors:
        x.grad = None
    return out


def solve_grads(func, y0, t, mode, params=None, loss_weights=None, **kw):
    """Gradients of ``sum(w * ys)`` with respect to y0, t and the parameter leaves
    (``params``, or the Module's parameters), by ``mode``. Returns (ys, [y0, t, *leaves])."""
    y0, t = leaf(y0), leaf(t)
    leaves = list(params) if params is not None else list(func.parameters())
    ys = odecore.odeint(func, y0, t, params=params, adjoint=mode, **kw)
    w = weights(ys.shape) if loss_weights is None else loss_weights
    (w * ys).sum().backward()
    return ys.detach(), grads_of([y0, t, *leaves])


def assert_close(actual, expected, rel, what=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a is not None, f"{what}: gradient {i} is None"
        err = relative_error(a.numpy(), e.numpy())
        assert err <= rel, f"{what}: gradient {i} relative error {err:.3g} > {rel:g}"


# ---------------------------------------------------------------------------------------------
# gradcheck: every method x every mode, against finite differences of the solve
# ---------------------------------------------------------------------------------------------


def _gradcheck_matrix():
    for method in odecore.METHODS:
        for mode in MODES:
            if method in EXACT_ONLY and mode == "backsolve":
                continue  # O(h) from the discrete solve; see the convergence test below
            marks = () if method in CI_METHODS else (pytest.mark.slow,)
            for kind in ("module", "explicit"):
                yield pytest.param(method, mode, kind, marks=marks, id=f"{method}-{mode}-{kind}")


def gradcheck_solve(method, mode, kind, y0=Y0, t=T, batch_axis=None, fast=False, **extra):
    """gradcheck of odeint with respect to y0, t (unless the method is EXACT_ONLY) and the
    parameters. For a Module, its own Parameters are gradcheck's inputs: gradcheck perturbs
    inputs in place, so the module sees the perturbation without being passed anything."""
    kw = {**settings(method), **extra}
    wrt_t = method not in EXACT_ONLY
    y0, t = leaf(y0), t.detach().clone().requires_grad_(wrt_t)
    if kind == "module":
        field = Field()
        leaves = tuple(field.parameters())

        def fn(y0, *rest):
            return odecore.odeint(
                field, y0, rest[0] if wrt_t else t, adjoint=mode, batch_axis=batch_axis, **kw
            )

    else:
        leaves = field_params()

        def fn(y0, *rest):
            tt, ps = (rest[0], rest[1:]) if wrt_t else (t, rest)
            return odecore.odeint(
                field_rhs, y0, tt, params=ps, adjoint=mode, batch_axis=batch_axis, **kw
            )

    inputs = (y0, t, *leaves) if wrt_t else (y0, *leaves)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize(("method", "mode", "kind"), list(_gradcheck_matrix()))
def test_gradcheck(method, mode, kind):
    gradcheck_solve(method, mode, kind)


def test_gradcheck_sees_a_missing_gradient():
    # The gradcheck above is not vacuous: a parameter whose gradient is dropped fails it.
    class Detached(Field):
        def forward(self, t, y):
            return field_rhs(t, y, (self.W, self.c, self.b.detach()))

    field = Detached()

    def fn(y0, *params):
        return odecore.odeint(field, y0, T, **TIGHT)

    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(fn, (leaf(Y0), *field.parameters()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("method", odecore.FIXED_STEP_METHODS)
def test_time_gradients_converge_at_method_order(method):
    # For fixed-step methods the time gradient f(t_i, y_i) and the continuous adjoint
    # (backsolve) differ from the discrete solve's exact gradients by O(h^p). Both gaps must
    # shrink by about 4^p when h is divided by 4.
    order = odecore.TABLEAUS[method].order
    params = tuple(p.detach() for p in field_params())
    t_out = torch.tensor([0.0, 0.37, 0.6], dtype=F64)
    w = weights((3, 2))

    def loss(y0, t, h, mode="direct", ps=params):
        ys = odecore.odeint(
            field_rhs, y0, t, params=ps, method=method, options={"step_size": h}, adjoint=mode
        )
        return (w * ys).sum()

    def gaps(h):
        t = leaf(t_out)
        loss(Y0, t, h).backward()
        eps = 1e-6
        fd = torch.stack(
            [
                (loss(Y0, t_out + e, h) - loss(Y0, t_out - e, h)) / (2 * eps)
                for e in eps * torch.eye(3, dtype=F64)
            ]
        )
        time_gap = float((t.grad - fd).abs().max())
        by_mode = []
        for mode in ("direct", "backsolve"):
            y0, ps = leaf(Y0), tuple(leaf(p) for p in params)
            loss(y0, t_out, h, mode, ps).backward()
            by_mode.append(torch.cat([y0.grad, *(p.grad.reshape(-1) for p in ps)]))
        return time_gap, float((by_mode[0] - by_mode[1]).abs().max())

    coarse, fine = gaps(0.04), gaps(0.01)
    for name, big, small in zip(("time gradient", "backsolve"), coarse, fine, strict=True):
        # 1e-9: the floor of the finite differences (and of rounding) at this size.
        assert small <= max(big / (0.5 * 4**order), 1e-9), (name, big, small)


def test_gradcheck_with_decreasing_time():
    t = torch.tensor([0.7, 0.3, -0.2], dtype=F64)
    for mode in MODES:
        gradcheck_solve("dopri5", mode, "explicit", t=t, fast=True)


def test_gradcheck_with_many_outputs_and_fixed_grid_outputs():
    # rk4 without step_size steps from output to output: every output is a step's end (the
    # replay's "exact" branch) rather than an interpolation.
    for mode in MODES:
        gradcheck_solve(
            "dopri5", mode, "module", t=torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5], dtype=F64)
        )
        gradcheck_solve(
            "rk4", mode, "explicit", t=torch.linspace(0, 0.3, 7, dtype=F64), options=None
        )


# ---------------------------------------------------------------------------------------------
# The three modes agree
# ---------------------------------------------------------------------------------------------

AGREEMENT_CASES = {
    "dopri5": dict(rtol=1e-6, atol=1e-8),
    "tsit5": dict(method="tsit5", rtol=1e-6, atol=1e-8),
    "dopri8": dict(method="dopri8", rtol=1e-6, atol=1e-8),
    "bosh3": dict(method="bosh3", rtol=1e-5, atol=1e-7),
    "fehlberg2": dict(method="fehlberg2", rtol=1e-4, atol=1e-6),
    "adaptive_heun": dict(method="adaptive_heun", rtol=1e-4, atol=1e-6),
    "rk4-step": dict(method="rk4", options={"step_size": 0.1}),
    "rk4-grid": dict(method="rk4"),
    "euler": dict(method="euler", options={"step_size": 0.07}),
    "midpoint": dict(method="midpoint", options={"step_size": 0.07}),
    "heun2": dict(method="heun2", options={"step_size": 0.07}),
    "heun3": dict(method="heun3", options={"step_size": 0.07}),
    "step_t": dict(rtol=1e-6, atol=1e-8, options={"step_t": [0.33, 0.77]}),
    "max_step": dict(rtol=1e-6, atol=1e-8, options={"max_step": 0.05}),
    "PI": dict(rtol=1e-6, atol=1e-8, options={"controller": "PI"}),
    "hairer": dict(rtol=1e-6, atol=1e-8, options={"controller": "hairer"}),
    "max-norm": dict(rtol=1e-6, atol=1e-8, options={"norm": "max"}),
}
T_LONG = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.3], dtype=F64)


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_checkpoint_equals_direct_to_rounding(case, batched, direction):
    # Same tolerances => same steps; both are the exact gradient of that discrete solve.
    kw = dict(AGREEMENT_CASES[case])
    t = T_LONG if direction == "increasing" else T_LONG.flip(0)
    y0 = Y0_BATCH if batched else Y0_BATCH[1]
    if batched:
        kw["batch_axis"] = 0
    params = field_params()
    _, direct = solve_grads(field_rhs, y0, t, "direct", params=params, **kw)
    _, checkpoint = solve_grads(field_rhs, y0, t, "checkpoint", params=params, **kw)
    assert_close(checkpoint, direct, 1e-12, f"{case} checkpoint vs direct")


THREE_MODES = {
    "dopri5": {"rtol": 1e-11, "atol": 1e-13},
    "tsit5": {"rtol": 1e-11, "atol": 1e-13},
    "dopri8": {"rtol": 1e-11, "atol": 1e-13},
    "bosh3": {"rtol": 1e-9, "atol": 1e-11},
    "rk4": {"options": {"step_size": 0.01}},
}


@pytest.mark.parametrize("method", list(THREE_MODES))
def test_three_modes_agree_at_tight_tolerance(method):
    kw = {"method": method, **THREE_MODES[method]}
    field = Field()
    results = {mode: solve_grads(field, Y0, T_LONG, mode, **kw) for mode in MODES}
    ys = {mode: r[0] for mode, r in results.items()}
    assert torch.equal(ys["direct"], ys["checkpoint"])
    assert torch.equal(ys["direct"], ys["backsolve"])
    assert_close(results["checkpoint"][1], results["direct"][1], 1e-12, "checkpoint")
    # backsolve: the continuous adjoint, exact to the solver's tolerance (rk4: O(h^4)).
    assert_close(results["backsolve"][1], results["direct"][1], 1e-7, "backsolve")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_batch_gradients_are_sums_of_per_sample_gradients(method, mode):
    kw = settings(method)
    field = Field()
    w = weights((3, *Y0_BATCH.shape))
    _, (y0_bar, t_bar, *leaves_bar) = solve_grads(
        field, Y0_BATCH, T, mode, loss_weights=w, batch_axis=0, **kw
    )
    per_sample = [
        solve_grads(field, Y0_BATCH[i], T, mode, loss_weights=w[:, i], **kw)[1]
        for i in range(Y0_BATCH.shape[0])
    ]
    # Each sample steps on its own, so direct and checkpoint match to rounding; backsolve
    # solves one joint adjoint for the batch, with its own steps.
    rel = 1e-7 if mode == "backsolve" else 1e-12
    assert_close([y0_bar], [torch.stack([g[0] for g in per_sample])], rel, "y0 per sample")
    summed = [sum(g[k] for g in per_sample) for k in range(1, 2 + len(leaves_bar))]
    assert_close([t_bar, *leaves_bar], summed, rel, "t and parameters summed")


@pytest.mark.parametrize("mode", MODES)
def test_batch_gradcheck(mode):
    gradcheck_solve("dopri5", mode, "module", y0=Y0_BATCH, batch_axis=0, fast=True)
    gradcheck_solve("rk4", mode, "explicit", y0=Y0_BATCH, batch_axis=0, fast=True)


@pytest.mark.parametrize("mode", MODES)
def test_batch_on_the_last_axis(mode):
    # batch_axis=1 of a (n, B) state: t arrives as one time per sample (B,), broadcasting
    # against the last axis.
    def rate(t, y, params):
        (k,) = params
        return -k[:, None] * y * (1 + 0.5 * torch.sin(t))

    def rate_one(t, y, params):
        (k,) = params
        return -k * y * (1 + 0.5 * torch.sin(t))

    k = torch.tensor([0.7, 0.2, 0.4], dtype=F64)
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.1, 0.3]], dtype=F64)
    w = weights((3, 3, 2))
    _, (y0_bar, t_bar, k_bar) = solve_grads(
        rate, y0, T, mode, params=(leaf(k),), loss_weights=w, batch_axis=1, **TIGHT
    )
    per = [
        solve_grads(
            rate_one, y0[:, j], T, mode, params=(leaf(k),), loss_weights=w[..., j], **TIGHT
        )[1]
        for j in range(2)
    ]
    rel = 1e-8 if mode == "backsolve" else 1e-12
    assert_close([y0_bar], [torch.stack([g[0] for g in per], dim=1)], rel, "y0")
    assert_close([t_bar, k_bar], [per[0][1] + per[1][1], per[0][2] + per[1][2]], rel, "t, k")


# ---------------------------------------------------------------------------------------------
# Output times, partial losses, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_decreasing_time_matches_reversed_problem(mode):
    # Solving backward from t=0.7 to 0 is solving z' = -f(0.7 - s, z) forward in s.
    params = field_params()
    t = T.flip(0)
    _, (y0_bar, t_bar, *p_bar) = solve_grads(field_rhs, Y0, t, mode, params=params, **TIGHT)

    def reversed_rhs(s, z, ps):
        return -field_rhs(0.7 - s, z, ps)

    s = 0.7 - t
    _, (y0_ref, s_bar, *p_ref) = solve_grads(reversed_rhs, Y0, s, mode, params=params, **TIGHT)
    # dL/dt = -dL/ds under s = 0.7 - t.
    assert_close([y0_bar, t_bar, *p_bar], [y0_ref, -s_bar, *p_ref], 1e-8, "reversed")


@pytest.mark.parametrize("mode", MODES)
def test_loss_on_some_outputs_only(mode):
    # A loss on output 2 of 5 has the gradient of a solve that stops there; the outputs the
    # loss does not touch get zero time gradients.
    field = Field()
    w = torch.zeros(5, 2, dtype=F64)
    w[2] = torch.tensor([0.8, -1.3], dtype=F64)
    _, (y0_bar, t_bar, *p_bar) = solve_grads(field, Y0, T_LONG, mode, loss_weights=w, **TIGHT)
    _, (y0_ref, t_ref, *p_ref) = solve_grads(
        field, Y0, T_LONG[:3], mode, loss_weights=w[:3], **TIGHT
    )
    assert_close([y0_bar, *p_bar], [y0_ref, *p_ref], 1e-8, "y0 and parameters")
    assert_close([t_bar[:3]], [t_ref], 1e-8, "time")
    assert torch.equal(t_bar[3:], torch.zeros(2, dtype=F64))
    assert t_bar[1] == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_loss_on_the_initial_output_only(mode):
    # ys[0] is y0 itself: the gradient is the cotangent, and nothing reaches the parameters.
    field = Field()
    w = torch.zeros(3, 2, dtype=F64)
    w[0] = torch.tensor([0.8, -1.3], dtype=F64)
    _, (y0_bar, t_bar, *p_bar) = solve_grads(field, Y0, T, mode, loss_weights=w, **TIGHT)
    assert torch.equal(y0_bar, w[0])
    assert torch.equal(t_bar, torch.zeros(3, dtype=F64))
    for g in p_bar:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", MODES)
def test_float32_state(mode):
    field64 = Field()
    field32 = Field().to(torch.float32)
    _, ref = solve_grads(field64, Y0, T_LONG, mode, **TIGHT)
    y0, t = leaf(Y0, torch.float32), leaf(T_LONG, torch.float32)
    ys = odecore.odeint(field32, y0, t, adjoint=mode, rtol=1e-6, atol=1e-8)
    assert ys.dtype == torch.float32
    (weights(ys.shape).float() * ys).sum().backward()
    got = grads_of([y0, t, *field32.parameters()])
    for g in got:
        assert g.dtype == torch.float32
        assert torch.isfinite(g).all()
    assert_close([g.double() for g in got], ref, 1e-4, "float32 vs float64")


# ---------------------------------------------------------------------------------------------
# Closed form: y' = A y
# ---------------------------------------------------------------------------------------------


class LinearField(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(torch.as_tensor(A, dtype=F64).clone())

    def forward(self, t, y):
        return y @ self.A.T


@pytest.mark.parametrize("times", [[0.0, 0.4, 1.5], [1.5, 0.6, -0.5]], ids=["up", "down"])
@pytest.mark.parametrize("mode", MODES)
def test_linear_ode_against_matrix_exponential(mode, times):
    field = LinearField(A_LINEAR)
    t = torch.tensor(times, dtype=F64)
    c = weights((3, 3), seed=5)
    ys, (y0_bar, t_bar, A_bar) = solve_grads(
        field, torch.as_tensor(Y0_LINEAR), t, mode, loss_weights=c, **TIGHT
    )
    ys_ref, y0_ref, A_ref, t_ref = linear_gradients(A_LINEAR, Y0_LINEAR, times, c.numpy())
    assert relative_error(ys.numpy(), ys_ref) < 1e-8
    assert relative_error(y0_bar.numpy(), y0_ref) < 1e-8
    assert relative_error(A_bar.numpy(), A_ref) < 1e-8
    assert relative_error(t_bar.numpy(), t_ref) < 1e-8


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("mode", MODES)
def test_unused_parameter_gets_zero_gradient(mode, batched):
    y0 = Y0_BATCH if batched else Y0
    kw = {"batch_axis": 0} if batched else {}
    field = Field(unused=True)
    _, grads = solve_grads(field, y0, T, mode, **kw, **TIGHT)
    assert torch.equal(grads[-1], torch.zeros(3, dtype=F64))

    def rhs(t, y, params):
        return field_rhs(t, y, params[:3])

    params = (*field_params(), leaf(torch.ones(4, dtype=F64)))
    _, grads = solve_grads(rhs, y0, T, mode, params=params, **kw, **TIGHT)
    assert torch.equal(grads[-1], torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("mode", MODES)
def test_explicit_params_in_nested_containers(mode):
    # params may be a dict with nested tuples, and hold non-float or non-grad entries.
    W, c, b = field_params()

    def rhs(t, y, p):
        return field_rhs(t, y, (p["W"], *p["cb"])) * p["scale"] + 0.0 * p["n"]

    frozen = torch.tensor(1.5, dtype=F64)
    p = {"W": W, "cb": (c, b), "scale": frozen, "n": torch.tensor(2)}
    y0, t = leaf(Y0), leaf(T)
    ys = odecore.odeint(rhs, y0, t, params=p, adjoint=mode, **TIGHT)
    (weights(ys.shape) * ys).sum().backward()
    got = grads_of([y0, t, W, c, b])
    assert frozen.grad is None
    _, ref = solve_grads(
        lambda t, y, ps: 1.5 * field_rhs(t, y, ps), Y0, T, mode, params=field_params(), **TIGHT
    )
    assert_close(got, ref, 1e-8 if mode == "backsolve" else 1e-12, "dict")


@pytest.mark.parametrize("mode", MODES)
def test_gradient_only_for_parameters(mode):
    # y0 and t without requires_grad: the parameters still get their gradients.
    field = Field()
    ys = odecore.odeint(field, Y0, T, adjoint=mode, **TIGHT)
    (weights(ys.shape) * ys).sum().backward()
    got = grads_of(list(field.parameters()))
    _, ref = solve_grads(field, Y0, T, "direct", **TIGHT)
    assert_close(got, ref[2:], 1e-8, "parameters only")


@pytest.mark.parametrize("mode", MODES)
def test_backward_twice_with_retain_graph(mode):
    field = Field()
    y0 = leaf(Y0)
    ys = odecore.odeint(field, y0, T, adjoint=mode, **TIGHT)
    ys.sum().backward(retain_graph=True)
    first = y0.grad.clone()
    ys.sum().backward()
    assert torch.allclose(y0.grad, 2 * first, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# odeint_adjoint and the adjoint's own settings
# ---------------------------------------------------------------------------------------------


class MLPField(torch.nn.Module):
    """Many parameters next to a small state: where a seminorm saves backward steps."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(16, 3, generator=g, dtype=F64))
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(16, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(3, 16, generator=g, dtype=F64))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return torch.tanh(y @ self.w1.T + self.b1) @ self.w2.T * torch.cos(t) - 0.1 * y


class BenchMLP(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.lin1 = torch.nn.Linear(2, 64, dtype=F64)
        self.lin2 = torch.nn.Linear(64, 2, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.lin2(torch.tanh(self.lin1(y)))


Y0_MLP = torch.tensor([0.3, -0.4, 0.8], dtype=F64)
T_MLP = torch.linspace(0, 2, 5, dtype=F64)


def backward_calls(field, y0, t, solver=odecore.odeint, **kw):
    """(forward calls, backward calls, gradients) of sum(w * ys)."""
    field.calls = 0
    y0 = leaf(y0)
    ys = solver(field, y0, t, **kw)
    forward = field.calls
    (weights(ys.shape) * ys).sum().backward()
    return forward, field.calls - forward, grads_of([y0, *field.parameters()])


def test_odeint_adjoint_is_backsolve():
    field = Field()
    y0a, y0b = leaf(Y0), leaf(Y0)
    a = odecore.odeint_adjoint(field, y0a, T, **TIGHT)
    a.sum().backward()
    ga = grads_of([y0a, *field.parameters()])
    b = odecore.odeint(field, y0b, T, adjoint="backsolve", **TIGHT)
    b.sum().backward()
    gb = grads_of([y0b, *field.parameters()])
    assert torch.equal(a, b)
    for x, y in zip(ga, gb, strict=True):
        assert torch.equal(x, y)
    # The mode can still be chosen under the alias.
    c = odecore.odeint_adjoint(field, leaf(Y0), T, adjoint="checkpoint", **TIGHT)
    assert torch.equal(c, a)


def test_adjoint_tolerances_control_the_backward_solve():
    field = MLPField()
    ref = backward_calls(field, Y0_MLP, T_MLP, adjoint="direct", rtol=1e-12, atol=1e-14)[2]
    fwd = {"rtol": 1e-11, "atol": 1e-13}
    _, loose_calls, loose = backward_calls(
        field, Y0_MLP, T_MLP, adjoint="backsolve", adjoint_rtol=1e-4, adjoint_atol=1e-6, **fwd
    )
    _, tight_calls, tight = backward_calls(
        field, Y0_MLP, T_MLP, adjoint="backsolve", adjoint_rtol=1e-10, adjoint_atol=1e-12, **fwd
    )
    assert loose_calls < tight_calls
    loose_err = max(relative_error(a.numpy(), b.numpy()) for a, b in zip(loose, ref, strict=True))
    tight_err = max(relative_error(a.numpy(), b.numpy()) for a, b in zip(tight, ref, strict=True))
    assert tight_err < 1e-8
    assert tight_err < loose_err < 1e-2


def test_adjoint_method_and_options():
    field = MLPField()
    ref = backward_calls(field, Y0_MLP, T_MLP, adjoint="direct", rtol=1e-12, atol=1e-14)[2]
    kw = {"adjoint": "backsolve", "rtol": 1e-10, "atol": 1e-12}
    _, calls, got = backward_calls(field, Y0_MLP, T_MLP, adjoint_method="dopri8", **kw)
    assert_close(got, ref, 1e-7, "adjoint_method=dopri8")
    # A fixed-step adjoint: 4 evaluations per rk4 step, 2.0 / 0.01 steps at least.
    _, calls, got = backward_calls(
        field,
        Y0_MLP,
        T_MLP,
        adjoint_method="rk4",
        adjoint_options={"step_size": 0.01},
        **kw,
    )
    assert calls >= 4 * 200
    assert_close(got, ref, 1e-7, "adjoint_method=rk4")


class PaddedField(Field):
    """Field with an extra Parameter of ``pad`` entries that the dynamics never use: its
    adjoint stays exactly zero, so it should change nothing about the backward solve."""

    def __init__(self, pad):
        super().__init__()
        self.pad = torch.nn.Parameter(torch.zeros(pad, dtype=F64))


T_PAD = torch.tensor([0.0, 3.0], dtype=F64)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
def test_seminorm_gives_the_same_gradient(batched):
    field = MLPField()
    y0 = torch.stack([Y0_MLP, -Y0_MLP]) if batched else Y0_MLP
    kw = {"rtol": 1e-8, "atol": 1e-10, "batch_axis": 0 if batched else None}

    if batched:

        class BatchMLP(MLPField):
            def forward(self, t, y):
                return super().forward(t[:, None], y)

        field = BatchMLP()
    _, plain_calls, plain = backward_calls(field, y0, T_MLP, odecore.odeint_adjoint, **kw)
    _, semi_calls, semi = backward_calls(
        field, y0, T_MLP, odecore.odeint_adjoint, adjoint_options={"norm": "seminorm"}, **kw
    )
    assert semi_calls > 0 and plain_calls > 0
    assert_close(semi, plain, 1e-6, "seminorm")


def test_seminorm_ignores_the_parameter_adjoint():
    # With the seminorm the parameter adjoint takes no part in step-size control: a large
    # parameter whose adjoint is zero changes neither the steps nor the gradients.
    kw = {"rtol": 1e-6, "atol": 1e-8, "adjoint_options": {"norm": "seminorm"}}
    small, large = PaddedField(1), PaddedField(10_000)
    _, calls_small, grads_small = backward_calls(small, Y0, T_PAD, odecore.odeint_adjoint, **kw)
    _, calls_large, grads_large = backward_calls(large, Y0, T_PAD, odecore.odeint_adjoint, **kw)
    assert calls_small == calls_large
    assert_close(grads_large[:4], grads_small[:4], 1e-12, "seminorm, padded")


def test_unused_parameters_do_not_loosen_the_backsolve():
    ref = backward_calls(PaddedField(1), Y0, T_PAD, adjoint="direct", rtol=1e-12, atol=1e-14)[2]
    kw = {"rtol": 1e-6, "atol": 1e-8}
    errors = []
    for pad in (1, 10_000):
        _, _, grads = backward_calls(PaddedField(pad), Y0, T_PAD, odecore.odeint_adjoint, **kw)
        errors.append(max(relative_error(a, b) for a, b in zip(grads[:4], ref[:4], strict=True)))
    assert errors[1] <= 3 * errors[0] + 1e-10, errors


def test_seminorm_takes_no_more_backward_evaluations():
    field = PaddedField(10_000)
    kw = {"rtol": 1e-6, "atol": 1e-8}
    _, plain_calls, _ = backward_calls(field, Y0, T_PAD, odecore.odeint_adjoint, **kw)
    _, semi_calls, _ = backward_calls(
        field, Y0, T_PAD, odecore.odeint_adjoint, adjoint_options={"norm": "seminorm"}, **kw
    )
    assert semi_calls <= plain_calls, (semi_calls, plain_calls)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_adjoint_params_restricts_gradients(mode):
    field = Field()
    _, full = solve_grads(field, Y0, T, mode, **TIGHT)
    y0 = leaf(Y0)
    ys = odecore.odeint(field, y0, T, adjoint=mode, adjoint_params=(field.W,), **TIGHT)
    (weights(ys.shape) * ys).sum().backward()
    y0_bar, W_bar, c_bar, b_bar = grads_of([y0, field.W, field.c, field.b])
    # backsolve: a smaller augmented state is another error norm, hence other steps.
    rel = 1e-8 if mode == "backsolve" else 1e-12
    assert_close([y0_bar, W_bar], [full[0], full[2]], rel, "adjoint_params")
    assert c_bar is None and b_bar is None


@pytest.mark.parametrize("mode", MODES)
def test_adjoint_params_for_a_closure(mode):
    # A plain function closing over tensors gets their gradients through adjoint_params.
    W, c, b = field_params()

    def closure(t, y):
        return field_rhs(t, y, (W, c, b))

    _, ref = solve_grads(field_rhs, Y0, T, "direct", params=field_params(), **TIGHT)
    y0 = leaf(Y0)
    ys = odecore.odeint(closure, y0, T, adjoint=mode, adjoint_params=(W, c, b), **TIGHT)
    (weights(ys.shape) * ys).sum().backward()
    got = grads_of([y0, W, c, b])
    rel = 1e-8 if mode == "backsolve" else 1e-12
    assert_close(got, [ref[0], *ref[2:]], rel, "closure with adjoint_params")


class Cubic(torch.nn.Module):
    """``y' = -k y**3 + 0 * b``: ``y(T) = y0 / sqrt(1 + 2 k y0**2 T)``, so ``dy(T)/dy0 =
    (1 + 2 k y0**2 T)**-1.5`` and ``dy(T)/dk = -y0**3 T (1 + 2 k y0**2 T)**-1.5``. ``b``
    is a second parameter that requires grad."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(0.8, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(0.0, dtype=F64))

    def forward(self, t, y):
        return -self.k * y**3 + self.b * 0.0


CUBIC_Y0 = torch.tensor([1.0, 0.5], dtype=F64)
CUBIC_T = torch.tensor([0.0, 0.7, 1.5], dtype=F64)


def cubic_gradients(k=0.8, y0=CUBIC_Y0, T=1.5):
    """(dy(T)/dy0 elementwise, d(sum y(T))/dk) in closed form."""
    s = 1 + 2 * k * y0**2 * T
    return s**-1.5, float((-(y0**3) * T * s**-1.5).sum())


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_a_parameter_listed_twice_in_adjoint_params_gets_its_gradient_once(mode):
    cubic = Cubic()
    ys = odecore.odeint(
        cubic, CUBIC_Y0, CUBIC_T, adjoint=mode, adjoint_params=(cubic.k, cubic.k), **TIGHT
    )
    ys[-1].sum().backward()
    # Solved to rtol 1e-10: the gradient is good to about that, relative.
    assert relative_error(cubic.k.grad, cubic_gradients()[1]) < 1e-8


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("listed", ["none", "a frozen one"])
def test_adjoint_params_that_need_no_gradient_leave_the_module_without_one(mode, listed):
    # adjoint_params replaces the module's parameters: when none of those it lists requires
    # grad, nothing gets a gradient, as when they do only they get one; the module's other
    # parameters were differentiated through the recorded loop instead.
    cubic = Cubic()
    frozen = torch.tensor(1.0, dtype=F64)
    params = () if listed == "none" else (frozen,)
    ys = odecore.odeint(cubic, CUBIC_Y0, CUBIC_T, adjoint=mode, adjoint_params=params, **TIGHT)
    assert not ys.requires_grad
    exact = CUBIC_Y0 / torch.sqrt(1 + 2 * 0.8 * CUBIC_Y0**2 * 1.5)
    assert relative_error(ys[-1], exact) < 1e-8


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_changing_y0_in_place_after_the_solve_leaves_its_gradient(mode):
    # The rules do not read y0 again (direct mode's operations save it, and autograd
    # refuses the change there).
    y0 = leaf(CUBIC_Y0)
    start = y0 * 1.0
    ys = odecore.odeint(Cubic(), start, CUBIC_T, adjoint=mode, **TIGHT)
    with torch.no_grad():
        start.mul_(3.0)
    ys[-1].sum().backward()
    assert relative_error(y0.grad, cubic_gradients()[0]) < 1e-8


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("changed", ["outputs", "parameter"])
def test_a_backward_after_what_it_reads_was_changed_in_place_raises(mode, changed):
    # The backsolve restarts from the outputs and both modes evaluate func at the
    # parameters: changed, the backward failed to converge or gave a wrong gradient.
    cubic = Cubic()
    ys = odecore.odeint(cubic, CUBIC_Y0, CUBIC_T, adjoint=mode, **TIGHT)
    with torch.no_grad():
        (ys if changed == "outputs" else cubic.k).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ys[-1].sum().backward()


def test_a_compiled_module_runs_its_solve_eagerly():
    # torch.compile traced the solve's loop, with a graph break at every step and a
    # recompilation for each new step size: a model around a two-element ODE took minutes
    # to compile (ten seconds in checkpoint mode, nine minutes in direct mode). The solve
    # now runs as written, and func with it.
    traced = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cubic = Cubic()

        def rate(self, t, y):
            traced.append(torch.compiler.is_compiling())
            return self.cubic(t, y)

        def forward(self, y0):
            ys = odecore.odeint(
                self.rate,
                y0,
                CUBIC_T,
                adjoint="checkpoint",
                adjoint_params=(self.cubic.k,),
                **TIGHT,
            )
            return ys[-1]

    net = Net()
    torch._dynamo.reset()
    try:
        y_T = torch.compile(net)(CUBIC_Y0)
        y_T.sum().backward()
    finally:
        torch._dynamo.reset()
    assert traced and not any(traced)
    exact = CUBIC_Y0 / torch.sqrt(1 + 2 * 0.8 * CUBIC_Y0**2 * 1.5)
    assert relative_error(y_T.detach(), exact) < 1e-8
    assert relative_error(net.cubic.k.grad, cubic_gradients()[1]) < 1e-8


# ---------------------------------------------------------------------------------------------
# Against torchdiffeq
# ---------------------------------------------------------------------------------------------


def test_forward_values_and_work_match_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = Field(n=4)
    y0 = torch.linspace(-0.5, 0.7, 4, dtype=F64)
    t = torch.linspace(0, 10, 11, dtype=F64)
    with torch.no_grad():
        field.calls = 0
        ours = odecore.odeint(field, y0, t, rtol=1e-6, atol=1e-8)
        our_calls = field.calls
        field.calls = 0
        theirs = torchdiffeq.odeint(field, y0, t, rtol=1e-6, atol=1e-8)
        their_calls = field.calls
        exact = odecore.odeint(field, y0, t, rtol=1e-12, atol=1e-14)
    scale = float(exact.abs().max())
    # Both are accurate to the tolerance's order, and do about the same work (the same
    # controller and, for dopri5, the same embedded weights; they end the solve differently).
    assert float((ours - exact).abs().max()) < 1e-5 * scale
    assert float((ours - theirs).abs().max()) < 1e-5 * scale
    assert 0.85 < our_calls / their_calls < 1.15


@pytest.mark.parametrize("problem", ["field", "mlp"])
def test_function_evaluations_within_5_percent_of_torchdiffeq(problem):
    # Same controller, same first-step rule; the embedded error weights differ (see above),
    # which on other problems and tolerances leaves odecore 0-10% above (closing notes).
    torchdiffeq = pytest.importorskip("torchdiffeq")
    gen = torch.Generator().manual_seed(3)
    if problem == "field":
        field = Field(n=4)
        y0 = torch.linspace(-0.5, 0.7, 4, dtype=F64)
        t = torch.linspace(0, 10, 11, dtype=F64)
    else:  # benchmarks/bench_torch.py's problem: a tanh MLP, width 64, 512 2-d states
        field = BenchMLP(gen)
        y0 = torch.randn(512, 2, generator=gen, dtype=F64)
        t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        field.calls = 0
        odecore.odeint(field, y0, t, rtol=1e-6, atol=1e-8)
        ours, field.calls = field.calls, 0
        torchdiffeq.odeint(field, y0, t, rtol=1e-6, atol=1e-8)
        theirs = field.calls
    assert abs(ours / theirs - 1) <= 0.05, (ours, theirs)


def test_adjoint_gradients_match_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = MLPField()
    t = leaf(T_MLP)
    y0 = leaf(Y0_MLP)
    ys = odecore.odeint_adjoint(field, y0, t, rtol=1e-10, atol=1e-12)
    (ys**2).sum().backward()
    ours = grads_of([y0, t, *field.parameters()])
    ys_theirs = torchdiffeq.odeint_adjoint(field, y0, t, rtol=1e-10, atol=1e-12)
    (ys_theirs**2).sum().backward()
    theirs = grads_of([y0, t, *field.parameters()])
    assert relative_error(ys.detach().numpy(), ys_theirs.detach().numpy()) < 1e-8
    assert_close(ours, theirs, 1e-6, "odecore vs torchdiffeq odeint_adjoint")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_adjoint_mode_lists_the_modes():
    with pytest.raises(ValueError) as info:
        odecore.odeint(Field(), leaf(Y0), T, adjoint="adjoint")
    for mode in MODES:
        assert repr(mode) in str(info.value)


# 0 is a valid rtol (the error against atol alone), for the backward solve too.
@pytest.mark.parametrize("bad", [-1e-6, math.nan, math.inf, [1e-6, -1.0]])
def test_bad_adjoint_rtol_is_named(bad):
    with pytest.raises(ValueError, match="adjoint_rtol"):
        odecore.odeint(Field(), leaf(Y0), T, adjoint="backsolve", adjoint_rtol=bad)


def test_bad_adjoint_atol_method_and_options():
    with pytest.raises(ValueError, match="adjoint_atol"):
        odecore.odeint(Field(), leaf(Y0), T, adjoint="backsolve", adjoint_atol=-1.0)
    with pytest.raises(ValueError, match="nope"):
        odecore.odeint(Field(), leaf(Y0), T, adjoint="backsolve", adjoint_method="nope")
    with pytest.raises(TypeError, match="adjoint_options"):
        odecore.odeint(Field(), leaf(Y0), T, adjoint="backsolve", adjoint_options=["norm"])
    with pytest.raises(ValueError, match="bogus"):
        odecore.odeint(Field(), leaf(Y0), T, adjoint="backsolve", adjoint_options={"bogus": 1})


BAD_ADJOINT_OPTIONS = [
    ({"bogus": 1}, ValueError, r"unknown option\(s\) 'bogus' in adjoint_options"),
    ({"max_step": "x"}, TypeError, r"adjoint_options\['max_step'\] must be a number"),
    ({"safety": 2.0}, ValueError, r"adjoint_options\['safety'\] must be in \(0, 1\]"),
    ({"first_step": "meta"}, ValueError, r"adjoint_options\['first_step'\] is a meta tensor"),
    ({"norm": "l2"}, ValueError, r"unknown norm 'l2' in adjoint_options\['norm'\]"),
    ({"norm": 3}, TypeError, r"adjoint_options\['norm'\] must be 'rms', 'max' or a callable"),
]


@pytest.mark.parametrize("call", ["keywords", "odeint_adjoint", "Backsolve"])
@pytest.mark.parametrize(("bad", "error", "message"), BAD_ADJOINT_OPTIONS)
def test_bad_adjoint_options_name_adjoint_options(call, bad, error, message):
    """Refused at the call, in the name of the argument the backward solve's options came
    in, never as the forward solve's ``options[...]``."""
    bad = {k: torch.empty((), device="meta") if v == "meta" else v for k, v in bad.items()}
    with pytest.raises(error, match=message) as info:
        if call == "keywords":
            odecore.odeint(Field(), leaf(Y0), T, adjoint="backsolve", adjoint_options=bad)
        elif call == "odeint_adjoint":
            odecore.odeint_adjoint(Field(), leaf(Y0), T, adjoint_options=bad)
        else:
            odecore.odeint(Field(), leaf(Y0), T, adjoint=odecore.Backsolve(options=bad))
    assert not re.search(r"(?<!adjoint_)options\[", str(info.value))


@pytest.mark.parametrize(
    ("step_t", "message"),
    [([math.nan], "contains NaN or infinite values"), ([[0.2]], "must be a 1-D array of times")],
)
def test_bad_adjoint_stop_times_name_adjoint_options(step_t, message):
    """Stop times are read against the interval when the backward solve starts."""
    ys = odecore.odeint(
        Field(), leaf(Y0), T, adjoint="backsolve", adjoint_options={"step_t": step_t}
    )
    with pytest.raises(ValueError, match=rf"^adjoint_options\['step_t'\] {message}"):
        ys.sum().backward()


def test_forward_options_the_backward_solve_inherits_keep_their_name():
    """Without adjoint_options the backward solve takes the forward's: an option that the
    backward method cannot take is reported in ``options``, where the user wrote it."""
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'first_step' in options for"):
        odecore.odeint(
            Field(),
            leaf(Y0),
            T,
            options={"first_step": 0.01},
            adjoint="backsolve",
            adjoint_method="rk4",
        )


# ---------------------------------------------------------------------------------------------
# Regressions: each of these once failed
# ---------------------------------------------------------------------------------------------


def test_direct_mode_output_with_non_finite_parameter_entry():
    def masked_decay(t, y, params):
        k, log_mask = params
        return -k * y * torch.exp(log_mask)

    k = torch.tensor(2.0, dtype=F64, requires_grad=True)
    log_mask = torch.tensor([0.0, -math.inf], dtype=F64)
    y0 = torch.tensor([0.3, -0.4], dtype=F64)
    ys = odecore.odeint(masked_decay, y0, T, params=(k, log_mask), adjoint="direct")
    expected = odecore.odeint(masked_decay, y0, T, params=(k, log_mask), adjoint="checkpoint")
    assert torch.isfinite(ys).all()
    assert torch.allclose(ys, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_closure_tensors_get_gradients_or_an_error(mode):
    W, c, b = field_params()

    def closure(t, y):
        return field_rhs(t, y, (W, c, b))

    _, ref = solve_grads(field_rhs, Y0, T, "direct", params=field_params(), **TIGHT)
    # They would silently get no gradient, so the solve refuses and names the remedy;
    # test_adjoint_params_for_a_closure checks the gradients once they are named.
    with pytest.raises(ValueError, match="adjoint_params") as info:
        odecore.odeint(closure, leaf(Y0), T, adjoint=mode, **TIGHT)
    assert "3 tensor(s)" in str(info.value)


@pytest.mark.parametrize("mode", ["direct", "checkpoint"])
def test_backsolve_settings_refused_by_other_modes(mode):
    with pytest.raises(ValueError, match="adjoint_rtol.*adjoint='backsolve'"):
        odecore.odeint(Field(), leaf(Y0), T, adjoint=mode, adjoint_rtol=1e-6)


def test_a_module_using_only_its_own_parameters_passes_the_check():
    # The check for hidden tensors must not flag a Module's own parameters, nor a
    # requires-grad y0 (detached for the check).
    field = Field()
    y0 = leaf(Y0)
    ys = odecore.odeint(field, y0, T, adjoint="checkpoint", **TIGHT)
    ys.sum().backward()
    assert all(p.grad is not None for p in field.parameters())


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_module_parameters_with_explicit_params(mode):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))

        def forward(self, t, y, params):
            return -self.c * y * params[0]

    grads = {}
    for m in ("direct", mode):
        field, k = Scaled(), torch.tensor(2.0, dtype=F64, requires_grad=True)
        ys = odecore.odeint(field, leaf(Y0), T, params=(k,), adjoint=m, **TIGHT)
        ys.sum().backward()
        grads[m] = (field.c.grad, k.grad)
    assert grads[mode][0] is not None
    assert_close(list(grads[mode]), list(grads["direct"]), 1e-8, "module and params")


def test_bad_adjoint_rtol_is_named_without_gradients():
    with pytest.raises(ValueError, match="adjoint_rtol"):
        odecore.odeint(Field().requires_grad_(False), Y0, T, adjoint="backsolve", adjoint_rtol=-1)


def test_checkpoint_with_jump_times_in_a_batch():
    params = field_params()
    kw = {"rtol": 1e-6, "atol": 1e-8, "options": {"jump_t": [0.33, 0.77]}, "batch_axis": 0}
    _, direct = solve_grads(field_rhs, Y0_BATCH, T_LONG, "direct", params=params, **kw)
    _, got = solve_grads(field_rhs, Y0_BATCH, T_LONG, "checkpoint", params=params, **kw)
    assert_close(got, direct, 1e-12, "jump_t batch")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("times", [[0.0, 0.5, 1.2], [0.0, 0.5]], ids=["inside", "at-the-end"])
def test_gradients_through_an_output_on_a_jump(mode, times):
    """y' = -k_0 y before t = 0.5 and -k_1 y from it on (jump_t = [0.5]), with an output on
    the jump: y(t) = y0 exp(-k_0 min(t, 0.5) - k_1 max(t - 0.5, 0)). The backsolve's
    intervals end on the output times, so each saw the jump from its far side there: rk4
    stages on the wrong side of it cost 1.7e-3 in dL/dy0 (and an interval ending on the
    solve's end time the forward solve as much)."""
    rates = torch.tensor([0.7, 2.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)

    def switched(t, y, k):
        return torch.where(t < 0.5, -k[0] * y, -k[1] * y)

    ys = odecore.odeint(
        switched,
        y0,
        torch.tensor(times, dtype=F64),
        params=rates,
        method="rk4",
        options={"step_size": 0.01, "jump_t": [0.5]},
        adjoint=mode,
    )
    weights = [0.3, 1.0, 2.0][: len(times)]
    sum(w * y.sum() for w, y in zip(weights, ys, strict=True)).backward()
    k0, k1 = 0.7, 2.0
    y0_bar, k_bar = 0.0, np.zeros(2)
    for w, t in zip(weights, times, strict=True):
        before, after = min(t, 0.5), max(t - 0.5, 0.0)
        growth = math.exp(-k0 * before - k1 * after)
        y0_bar += w * growth
        k_bar += w * growth * -0.5 * np.array([before, after])  # sum(y0) = 0.5
    # rk4 at h = 0.01 on rates up to 2: the global error is about (k h)^4 / 120, 1e-9
    # relative; the backsolve's continuous adjoint differs from the discrete one as much.
    np.testing.assert_allclose(y0.grad.numpy(), [y0_bar, y0_bar], rtol=1e-8)
    np.testing.assert_allclose(rates.grad.numpy(), k_bar, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_time_gradient_reuses_the_forward_rate_at_the_end(mode):
    """``dL/dt_end = c . f(t_end, y_end)`` takes the rate the forward solve ended with: the
    time gradient costs one evaluation per output time but the last. The values are the
    closed form of a linear ODE."""
    A = torch.tensor(A_LINEAR, dtype=F64)
    times = [0.0, 0.4, 0.9, 1.5]
    cotangents = np.random.default_rng(3).standard_normal((len(times), len(Y0_LINEAR)))
    calls = {"n": 0}

    def linear(t, y):
        calls["n"] += 1
        return A @ y

    backward_calls = {}
    for with_t in (False, True):
        t = torch.tensor(times, dtype=F64, requires_grad=with_t)
        y0 = torch.tensor(Y0_LINEAR, dtype=F64, requires_grad=True)
        ys = odecore.odeint(linear, y0, t, adjoint=mode, **TIGHT)
        calls["n"] = 0
        (ys * torch.tensor(cotangents)).sum().backward()
        backward_calls[with_t] = calls["n"]
    # One evaluation for each output time but the last (t_0's included).
    assert backward_calls[True] - backward_calls[False] == len(times) - 1
    _, y0_bar, _, t_bar = linear_gradients(A_LINEAR, Y0_LINEAR, times, cotangents)
    # The solve's tolerance (rtol 1e-10) bounds the error of the rates and the adjoint.
    np.testing.assert_allclose(t.grad.numpy(), t_bar, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(y0.grad.numpy(), y0_bar, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dual", ["y0", "t", "params"])
def test_forward_mode_dual_tensors_are_refused_naming_reverse_mode(dual):
    # A dual tensor failed in the step-size control's out= kernels, with torch's words.
    import torch.autograd.forward_ad as fwAD

    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    k = torch.tensor(0.5, dtype=F64)
    with fwAD.dual_level():
        inputs = {"y0": y0, "t": t, "params": k}
        inputs[dual] = fwAD.make_dual(inputs[dual], torch.ones_like(inputs[dual]))
        with pytest.raises(RuntimeError, match="forward-mode autodiff.*Use reverse mode"):
            odecore.odeint(
                lambda t, y, k: -k * y, inputs["y0"], inputs["t"], params=inputs["params"]
            )
        # Plain tensors inside a dual level are solved.
        ys = odecore.odeint(lambda t, y, k: -k * y, y0, t, params=k, **TIGHT)
    np.testing.assert_allclose(ys[-1].numpy(), y0.numpy() * math.exp(-0.5), rtol=1e-8)
    # The Jacobian the message names, against y(1) = e^{-k} y0.
    jac = torch.autograd.functional.jacobian(
        lambda y: odecore.odeint(lambda t, y, k: -k * y, y, t, params=k, **TIGHT)[-1], y0
    )
    np.testing.assert_allclose(jac.numpy(), math.exp(-0.5) * np.eye(2), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev", "hessian"])
def test_torch_func_transforms_are_refused_naming_what_to_use(transform):
    # Each failed deep inside with a message about torch's internals (functorch refusing
    # an autograd.Function without setup_context, a missing batching rule for moveaxis).
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def loss(k):
        return odecore.odeint(lambda t, y, k: -k * y, y0, t, params=k)[-1].sum()

    k = torch.tensor([1.0, 2.0] if transform == "vmap" else 1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torch\.func's transforms.*torch\.autograd\.grad"):
        getattr(torch.func, transform)(loss)(k)
    # torch.func.functional_call is no transform, and the solve runs under it.
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 2).double()
    params = {name: p.detach() * 0.5 for name, p in layer.named_parameters()}
    ys = odecore.odeint(
        lambda t, y: torch.func.functional_call(layer, params, (y,)), y0, t, rtol=1e-10,
        atol=1e-12,
    )  # fmt: skip
    W, b = params["weight"].numpy(), params["bias"].numpy()
    # y' = W y + b: y(1) = e^W y0 + W^-1 (e^W - I) b.
    expm = scipy.linalg.expm(W)
    exact = expm @ y0.numpy() + np.linalg.solve(W, (expm - np.eye(2)) @ b)
    np.testing.assert_allclose(ys[-1].numpy(), exact, rtol=0, atol=1e-8)
