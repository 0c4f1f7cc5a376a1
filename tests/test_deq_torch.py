"""Fixed points on torch: values, per-sample bookkeeping, and gradients through autograd.

References: the same closed forms and float64 finite differences (of NumPy reference
iterations, ``deq_cases``) as the NumPy tests, and the regulariser's closed form.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from backend_params import framework_module
from deq_cases import (
    B_VEC,
    COS_FIXED_POINT,
    Z0,
    W,
    implicit_fd_gradient,
    relative_error,
    tanh_loss_weights,
    tanh_params,
    unrolled_fd_gradient,
)

import odecore

pytestmark = pytest.mark.backend("torch")
torch = framework_module("torch")

SOLVERS = ("picard", "anderson", "broyden")
BACKWARD_SOLVERS = ("picard", "anderson", "broyden", "gmres")
TIGHT = {"tol": 1e-12, "max_iter": 300}


def t64(x, grad=False):
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def tanh_map(z, params):
    W_, U_, b_, x_ = params
    return torch.tanh(z @ W_.T + x_ @ U_.T + b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", SOLVERS)
def test_cos_fixed_point_keeps_dtype(solver, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    sol = odecore.solve_fixed_point(
        torch.cos, torch.ones(2, 1, dtype=dtype), solver=solver, tol=tol, batch_axis=0, max_iter=300
    )
    assert sol.success, sol.message
    assert sol.z.dtype == dtype
    assert (sol.z - COS_FIXED_POINT).abs().max() < 10 * tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", SOLVERS)
def test_16_bit_states_solve_and_differentiate(solver, dtype):
    # z* = p / (1 - 0.5) = 600, exact in both dtypes. The loop kept the 16-bit dtype: the
    # first residual's squares (300^2) overflowed float16, so the start read as NONFINITE,
    # and Anderson's mixing had no linear solve in 16 bits on a CPU.
    p = torch.full((4,), 300.0, dtype=dtype, requires_grad=True)
    sol = odecore.solve_fixed_point(
        lambda z, p: 0.5 * z + p, torch.zeros(4, dtype=dtype), p, solver=solver, tol=1e-3
    )
    assert sol.success, sol.message
    # The float32 iterate is within 2 tol of 600, which rounds to 600 in either dtype.
    assert sol.z.dtype == dtype and torch.equal(sol.z, torch.full((4,), 600.0, dtype=dtype))
    sol.z.sum().backward()
    # dz*/dp = 2; the backward stops within 2 * 1e-3 * |w| = 0.004 of it, and bfloat16
    # rounds 2.004 by at most 2^-7.
    assert p.grad.dtype == dtype
    assert (p.grad.double() - 2.0).abs().max() < 0.004 + 2.0**-7


def test_a_float16_residual_below_the_squares_range_is_not_zero():
    # A residual of 1e-4 in each of 1024 components has norm 3.2e-3, above tol; its squares
    # (1e-8) vanish in float16, and the sample read as converged with a residual of 0.
    sol = odecore.solve_fixed_point(
        lambda z, p: 0.5 * z + p,
        torch.zeros(1024, dtype=torch.float16),
        torch.full((1024,), 2e-4, dtype=torch.float16),
        solver="picard",
        tol=1e-3,
        max_iter=1,
        throw=False,
    )
    assert int(sol.status[0]) == odecore.FixedPointStatus.MAX_ITER_REACHED
    # After one step z = p (p rounded to float16), so the residual is |0.5 p| * 32, up to
    # f(z) = 1.5 p rounded to float16: half a unit, 2^-23 near 3e-4, in each component.
    half_p = 0.5 * float(torch.tensor(2e-4, dtype=torch.float16))
    assert abs(float(sol.abs_residual[0]) - 32 * half_p) <= 32 * 2.0**-23 * (1 + 1e-3)


@pytest.mark.parametrize("solver", SOLVERS)
def test_square_root_and_affine(solver):
    z = odecore.fixed_point(lambda z: (z + 2 / z) / 2, t64([1.5]), solver=solver, **TIGHT)
    assert abs(float(z[0]) - 2**0.5) < 1e-12
    z = odecore.fixed_point(lambda z, p: z @ p[0].T + p[1], t64(np.zeros(4)), (t64(W), t64(B_VEC)))
    assert relative_error(z.numpy(), np.linalg.solve(np.eye(4) - W, B_VEC)) < 1e-5


@pytest.mark.parametrize("backward_solver", BACKWARD_SOLVERS)
def test_affine_and_cos_gradients_closed_form(backward_solver):
    Wt, b = t64(W, True), t64(B_VEC, True)
    z = odecore.fixed_point(
        lambda z, p: z @ p[0].T + p[1],
        t64(np.zeros(4)),
        (Wt, b),
        backward_solver=backward_solver,
        **TIGHT,
    )
    z.sum().backward()
    expected_b = np.linalg.solve((np.eye(4) - W).T, np.ones(4))
    assert relative_error(b.grad.numpy(), expected_b) < 1e-9
    z_star = np.linalg.solve(np.eye(4) - W, B_VEC)
    assert relative_error(Wt.grad.numpy(), np.outer(expected_b, z_star)) < 1e-9

    c = t64([0.3], True)
    z = odecore.fixed_point(
        lambda z, p: torch.cos(z) + p, t64([0.0]), c, backward_solver=backward_solver, **TIGHT
    )
    z.sum().backward()
    assert abs(float(c.grad[0]) - 1 / (1 + np.sin(float(z.detach()[0])))) < 1e-10


def test_a_batch_mean_loss_gets_its_implicit_gradient():
    # A mean over 1024 samples of 4 values gives each sample a cotangent of norm
    # 1 / (1024 * 2) < tol = 1e-3: the backward, measured absolutely, stopped at u = 0 and
    # b's gradient was zero. Relative to the cotangent, each sample's u is within
    # 1e-3 |w| / (1 - |W|) = 2.5e-3 |w| of (I - W)^-T w.
    b = t64(B_VEC, True)
    z = odecore.fixed_point(
        lambda z, p: z @ p[0].T + p[1],
        t64(np.zeros((1024, 4))),
        (t64(W), b),
        batch_axis=0,
        tol=1e-3,
    )
    z.mean().backward()
    expected = np.linalg.solve((np.eye(4) - W).T, np.full(4, 1 / 4))
    assert relative_error(b.grad.numpy(), expected) < 2.5e-3


@pytest.mark.parametrize(
    "solver,backward_solver", list(itertools.product(SOLVERS, BACKWARD_SOLVERS))
)
def test_implicit_gradient_matches_finite_differences(solver, backward_solver):
    params = [t64(p, True) for p in tanh_params()]
    z = odecore.fixed_point(
        tanh_map,
        t64(Z0),
        tuple(params),
        solver=solver,
        backward_solver=backward_solver,
        batch_axis=0,
        **TIGHT,
    )
    (z * t64(tanh_loss_weights())).sum().backward()
    for p, ref, name in zip(params, implicit_fd_gradient(), "WUbx", strict=True):
        assert relative_error(p.grad.numpy(), ref) < 1e-7, name


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward,k,d", [("one_step", 1, 1.0), ("unrolled", 4, 0.7)])
def test_one_step_and_unrolled_match_finite_differences(solver, backward, k, d):
    kwargs = {} if backward == "one_step" else {"unroll_steps": k, "unroll_damping": d}
    params = [t64(p, True) for p in tanh_params()]
    z = odecore.fixed_point(
        tanh_map,
        t64(Z0),
        tuple(params),
        solver=solver,
        backward=backward,
        batch_axis=0,
        **TIGHT,
        **kwargs,
    )
    (z * t64(tanh_loss_weights())).sum().backward()
    for p, ref in zip(params, unrolled_fd_gradient(k, d), strict=True):
        assert relative_error(p.grad.numpy(), ref) < 1e-7


def test_one_step_is_exactly_autograd_through_one_step():
    params = [t64(p, True) for p in tanh_params()]
    c = t64(tanh_loss_weights())
    z = odecore.fixed_point(
        tanh_map, t64(Z0), tuple(params), backward="one_step", batch_axis=0, **TIGHT
    )
    (z * c).sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (tanh_map(z.detach(), params) * c).sum().backward()
    for g, p in zip(got, params, strict=True):
        assert torch.equal(g, p.grad)


def test_module_parameters_get_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        layer.weight.mul_(0.3)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = layer

        def forward(self, z):
            return torch.tanh(self.lin(z))

    f = Layer()
    z = odecore.fixed_point(f, torch.zeros(2, 4, dtype=torch.float64), batch_axis=0, **TIGHT)
    z.sum().backward()
    # Reference: the implicit gradient by the closed form at z*: dL/db = (I - J)^{-T} 1 per
    # sample, with J = diag(1 - z*^2) W.
    Wm = layer.weight.detach().numpy()
    expected = 0.0
    for zs in z.detach().numpy():
        J = np.diag(1 - zs**2) @ Wm
        u = np.linalg.solve((np.eye(4) - J).T, np.ones(4))
        expected = expected + u * (1 - zs**2)
    assert relative_error(layer.bias.grad.numpy(), expected) < 1e-9


def test_module_with_an_injection_gives_gradients_to_both():
    """A layer and its input injection, f(z, x) = tanh(W z + b + x) with x in params: the
    module's own weights and x both get the implicit gradient, by the closed form at z*
    (u = (I - J)^{-T} c per sample with J = diag(1 - z*^2) W; dL/dx = u (1 - z*^2),
    dL/dW = sum over samples of outer(u (1 - z*^2), z*))."""
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4).double()
            with torch.no_grad():
                self.lin.weight.mul_(0.3)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    f = Layer()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64)
    z = odecore.fixed_point(f, torch.zeros(3, 4, dtype=torch.float64), x, batch_axis=0, **TIGHT)
    (z * c).sum().backward()
    Wm = f.lin.weight.detach().numpy()
    x_bar, W_bar = [], 0.0
    for zs, cs in zip(z.detach().numpy(), c.numpy(), strict=True):
        J = np.diag(1 - zs**2) @ Wm
        v = np.linalg.solve((np.eye(4) - J).T, cs) * (1 - zs**2)
        x_bar.append(v)
        W_bar = W_bar + np.outer(v, zs)
    assert relative_error(x.grad.numpy(), np.stack(x_bar)) < 1e-9
    assert relative_error(f.lin.weight.grad.numpy(), W_bar) < 1e-9
    assert relative_error(f.lin.bias.grad.numpy(), np.sum(x_bar, axis=0)) < 1e-9


def test_batch_independence_of_iterations():
    params = [t64(p) for p in tanh_params()]
    z0 = t64(np.stack([np.zeros(4), np.ones(4), -2 * np.ones(4)]))
    batch = odecore.solve_fixed_point(tanh_map, z0, tuple(params), batch_axis=0, tol=1e-10)
    for i in range(3):
        alone = odecore.solve_fixed_point(
            tanh_map, z0[i : i + 1], (*params[:3], params[3][i : i + 1]), batch_axis=0, tol=1e-10
        )
        assert torch.equal(batch.iterations[i : i + 1], alone.iterations)
        assert (batch.z[i] - alone.z[0]).abs().max() < 1e-14


def test_non_convergent_map_has_status_and_finite_residual():
    sol = odecore.solve_fixed_point(
        lambda z: 1.0 - z,
        torch.zeros(1, dtype=torch.float64),
        solver="picard",
        max_iter=10,
        throw=False,
    )
    assert int(sol.status[0]) == odecore.FixedPointStatus.MAX_ITER_REACHED
    assert float(sol.abs_residual[0]) == 1.0


def test_unconverged_solve_raises_before_any_backward():
    # z -> p z + 1 with p = 2: the fixed point -1 repels, so Picard's best iterate is z0 = 0.
    p = t64([2.0], True)
    with pytest.raises(odecore.FixedPointError) as info:
        odecore.fixed_point(lambda z, p: p * z + 1, t64([0.0]), p, solver="picard", max_iter=5)
    assert "residual ||f(z) - z|| = 1 (tol 1e-06) after 5 iterations" in str(info.value)
    assert p.grad is None
    assert info.value.solution.z.tolist() == [0.0]
    # Asked for, the best iterate is returned and differentiable: d(p z + 1)/dp at z = 0 is
    # 0, and the implicit gradient u z with u = 1 / (1 - p) is 0 too.
    z = odecore.fixed_point(
        lambda z, p: p * z + 1, t64([0.0]), p, solver="picard", max_iter=5, throw=False
    )
    z.sum().backward()
    assert z.tolist() == [0.0] and p.grad.tolist() == [0.0]


@pytest.mark.parametrize("how", ["leaf", "derived", "module"])
@pytest.mark.parametrize("params_grad", [True, False])
def test_captured_tensor_requiring_grad_is_refused(how, params_grad):
    w = t64(0.5, True)
    b = t64([1.0, 1.0], params_grad)
    if how == "leaf":
        f = lambda z, p: w * z + p  # noqa: E731
    elif how == "derived":
        scale = 2 * w  # not a leaf: the check follows its graph back to w
        f = lambda z, p: 0.5 * scale * z + p  # noqa: E731
    else:
        f = torch.nn.Linear(2, 2).double()
        b = None
        z_extra = w * torch.ones(2, dtype=torch.float64)
        f.register_forward_hook(lambda module, args, out: out * 0.1 + z_extra)
    with pytest.raises(ValueError, match="not in params") as info:
        odecore.fixed_point(f, t64([0.0, 0.0]), b)
    assert "Pass it in params" in str(info.value)
    assert w.grad is None


def test_captured_tensor_is_allowed_without_grad_mode_and_works_through_params():
    w, b = t64(0.5, True), t64([1.0, 1.0])
    with torch.no_grad():
        z = odecore.fixed_point(lambda z, p: w * z + p, t64([0.0, 0.0]), b, **TIGHT)
    # z* = b / (1 - w) = 2.
    np.testing.assert_allclose(z.numpy(), [2.0, 2.0], rtol=0, atol=1e-11)
    # The remedy: w in params. dz*/dw = b / (1 - w)^2 = 4 per component.
    z = odecore.fixed_point(lambda z, p: p[0] * z + p[1], t64([0.0, 0.0]), (w, b), **TIGHT)
    z.sum().backward()
    assert abs(float(w.grad) - 8.0) < 1e-9


def test_map_returning_another_librarys_array_or_dtype_is_named():
    with pytest.raises(TypeError, match="f must return a torch array shaped like z") as info:
        odecore.fixed_point(lambda z: np.cos(z.numpy()), torch.zeros(3))
    assert "it returned numpy.ndarray" in str(info.value)
    with pytest.raises(TypeError, match="f must return a torch array") as info:
        odecore.fixed_point(lambda z, p: [0.0, 0.0, 0.0], torch.zeros(3), torch.ones(3))
    assert "it returned list [0.0, 0.0, 0.0]" in str(info.value)
    with pytest.raises(TypeError, match="f returned dtype torch.float32 for z of dtype"):
        odecore.fixed_point(lambda z: torch.cos(z).float(), torch.zeros(3, dtype=torch.float64))


def test_z0_that_is_not_an_array_is_refused():
    with pytest.raises(TypeError, match="^z0 must be an array of real floating numbers, got None"):
        odecore.fixed_point(torch.cos, None, backend="torch")


def test_jacobian_frobenius_of_a_broadcast_z():
    """A ``z`` made by ``expand`` (one row seen B times, a common way to start a batch) gets
    the closed form ``|diag(1 - tanh^2(W z)) W probe|^2`` per sample, like a copied one."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    row = torch.randn(1, 3, dtype=torch.float64, generator=gen)
    probe = torch.randn(4, 3, dtype=torch.float64, generator=gen)

    def f(z, p):
        return torch.tanh(z @ p.T)

    est = odecore.jacobian_frobenius(f, row.expand(4, 3), W, probe=probe, batch_axis=0)
    slope = 1.0 - torch.tanh(row @ W.T) ** 2
    exact = ((slope * (probe @ W.T)) ** 2).sum(dim=1)
    torch.testing.assert_close(est, exact, rtol=1e-12, atol=0.0)


def test_jacobian_frobenius_arguments_are_checked():
    z = torch.zeros(3, dtype=torch.float64)
    probe = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="^probe must be a real floating array, got None"):
        odecore.jacobian_frobenius(torch.cos, z, probe=None)
    with pytest.raises(TypeError, match="^probe must have a real floating dtype"):
        odecore.jacobian_frobenius(torch.cos, z, probe=torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="^probe must have z's dtype torch.float64"):
        odecore.jacobian_frobenius(torch.cos, z, probe=torch.ones(3))
    with pytest.raises(ValueError, match=r"^probe must be shaped like z \(3,\)"):
        odecore.jacobian_frobenius(torch.cos, z, probe=probe[:2])
    with pytest.raises(TypeError, match="^f must be callable"):
        odecore.jacobian_frobenius(3, z, probe=probe)
    with pytest.raises(TypeError, match="^z must have a real floating dtype"):
        odecore.jacobian_frobenius(torch.cos, z.long(), probe=probe)
    with pytest.raises(TypeError, match="^f must return a torch array.*returned list"):
        odecore.jacobian_frobenius(lambda z: [1.0, 2.0, 3.0], z, probe=probe)
    with pytest.raises(ValueError, match=r"^f returned shape \(2,\) for z of shape \(3,\)"):
        odecore.jacobian_frobenius(lambda z: torch.cos(z[:2]), z, probe=probe)
    with pytest.raises(TypeError, match="^batch_axis must be None or the integer 0"):
        odecore.jacobian_frobenius(torch.cos, z, probe=probe, batch_axis="0")
    # A plain list probe takes z's dtype. The Jacobian of cos at pi/2 is -I, so the
    # estimate is |probe|^2 = 3.
    reg = odecore.jacobian_frobenius(torch.cos, z + np.pi / 2, probe=[1.0, -1.0, 1.0])
    assert abs(float(reg) - 3.0) < 1e-12


def test_spectral_radius_refuses_a_map_returning_a_list():
    with pytest.raises(TypeError, match="^f must return a torch array.*returned list"):
        odecore.spectral_radius(lambda z: [1.0, 2.0, 3.0], torch.zeros(3))


def test_backward_statistics_are_recorded():
    b = t64(B_VEC, True)
    sol = odecore.solve_fixed_point(
        lambda z, p: z @ t64(W).T + p, t64(np.zeros(4)), b, backward_solver="picard", **TIGHT
    )
    sol.z.sum().backward()
    assert int(sol.stats["backward_status"][0]) == 0
    assert int(sol.stats["backward_iterations"][0]) > 10


def test_jacobian_frobenius_closed_form_and_gradient():
    Wt = t64(W, True)
    probe = t64([1.0, -1.0, 1.0, 1.0])
    reg = odecore.jacobian_frobenius(lambda z, p: z @ p.T, t64(np.zeros(4)), Wt, probe=probe)
    expected = float(np.sum((W @ probe.numpy()) ** 2))
    assert abs(float(reg) - expected) < 1e-12
    reg.backward()
    np.testing.assert_allclose(
        Wt.grad.numpy(), 2 * np.outer(W @ probe.numpy(), probe.numpy()), atol=1e-12
    )
    # Averaged over all Rademacher probes the estimate is exactly ||W||_F^2.
    total = 0.0
    for signs in itertools.product([1.0, -1.0], repeat=4):
        total += float(
            odecore.jacobian_frobenius(
                lambda z, p: z @ p.T, t64(np.zeros(4)), t64(W), probe=t64(signs)
            )
        )
    assert abs(total / 16 - np.sum(W**2)) < 1e-12


def test_spectral_radius_on_torch():
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    S = Q @ np.diag([-0.9, 0.5, 0.3, 0.1]) @ Q.T
    rho = odecore.spectral_radius(
        lambda z, p: z @ p.T, t64(np.zeros((2, 4))), t64(S), iterations=200, batch_axis=0
    )
    np.testing.assert_allclose(rho.numpy(), [0.9, 0.9], atol=1e-8)


def test_spectral_radius_has_no_gradient_on_torch():
    """As documented: a diagnostic, computed without recording for autodiff, whatever
    requires grad among its inputs."""
    S = np.diag([0.6, -0.2, 0.1])
    w, z, start = t64(S, grad=True), t64(np.zeros(3), grad=True), t64(np.ones(3), grad=True)
    rho = odecore.spectral_radius(lambda z, p: z @ p.T, z, w, iterations=60, start=start)
    # Power iteration's error shrinks as (0.2 / 0.6)^(2 * 60) for a symmetric map.
    assert abs(float(rho) - 0.6) < 1e-12
    assert not rho.requires_grad
    assert rho.grad_fn is None


def test_spectral_radius_of_a_complex_dominant_pair_on_torch():
    # Eigenvalues 0.3 +- 0.225i and 0.2; two samples from different starts.
    jac = np.array([[0.2, -0.3, 0.1], [0.25, 0.35, 0.0], [0.05, 0.1, -0.2]])
    start = t64(np.array([[1.0, 0.0, 0.0], [0.3, -1.0, 2.0]]))
    rho = odecore.spectral_radius(
        lambda z, p: z @ p.T,
        t64(np.zeros((2, 3))),
        t64(jac),
        iterations=40,
        start=start,
        batch_axis=0,
    )
    modulus = np.max(np.abs(np.linalg.eigvals(jac)))
    np.testing.assert_allclose(rho.numpy(), [modulus, modulus], atol=1e-9)


def test_unregularised_anderson_with_more_pairs_than_directions():
    # A one-dimensional map stores scalar residuals: with lam=0 and m=3 the mixing system is
    # singular from the third iteration on, and torch's solve raised at each.
    sol = odecore.solve_fixed_point(torch.cos, t64([0.0]), m=3, lam=0.0, **TIGHT)
    # |z - z*| <= tol / (1 - sin z*), sin z* = 0.67.
    assert abs(float(sol.z[0]) - COS_FIXED_POINT) < 1e-12 / 0.3


def test_unregularised_anderson_batch_whose_samples_stop_at_different_iterations():
    # A stopped sample's memory fills with copies of one residual; with lam=0 its mixing
    # system is singular and torch's solve raised for the whole batch.
    b = np.stack([B_VEC, 1e-6 * B_VEC])
    sol = odecore.solve_fixed_point(
        lambda z, p: z @ p[0].T + p[1],
        t64(np.zeros((2, 4))),
        (t64(W), t64(b)),
        m=3,
        lam=0.0,
        batch_axis=0,
        **TIGHT,
    )
    # |z - z*| <= tol / (1 - |W|) per sample.
    expected = np.linalg.solve(np.eye(4) - W, b.T).T
    assert np.abs(sol.z.numpy() - expected).max() <= 1e-12 / 0.4
    assert int(sol.iterations[1]) < int(sol.iterations[0])


@pytest.mark.parametrize("solver", SOLVERS)
def test_singular_mixing_system_does_not_raise(solver):
    # A constant map: after one step every residual is exactly zero, and with lam=0 the
    # Anderson system would be singular without its floor; torch's solve raises on that.
    sol = odecore.solve_fixed_point(
        lambda z: torch.full_like(z, 0.25), torch.zeros(3, 2), solver=solver, lam=0.0, batch_axis=0
    )
    assert sol.success
    assert torch.equal(sol.z, torch.full((3, 2), 0.25))


@pytest.fixture
def deq_example():
    for module in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(module)
    path = Path(__file__).resolve().parents[1] / "examples" / "deq_classifier.py"
    spec = importlib.util.spec_from_file_location("deq_classifier", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.fixture
def reproducible_torch():
    """Every generator seeded, one thread (one summation order) and torch's deterministic
    kernels; all restored afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    # NumPy's legacy global generator is the one libraries draw from when given no seed.
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])


def test_classifier_example_learns(deq_example, reproducible_torch, capsys, tmp_path):
    accuracy = deq_example.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # Ten classes: chance is 0.1. With the penalty, the clipping and the learning rate
    # decaying to zero, the two epochs end at 0.78 to 0.84 over seeds 0-5, the same with
    # the solver's sums in another order (without the decay, that reordering alone took
    # seed 0 from 0.83 to 0.56). The margin is for another machine's rounding, which
    # changes the trajectory as a new seed would.
    assert accuracy > 0.6
    assert "test accuracy" in out and "forward" in out and "backward" in out
    for figure in ("deq_classifier_training.png", "deq_classifier_confusion.png"):
        assert (tmp_path / figure).stat().st_size > 0


def test_classifier_learns_through_the_fixed_point_alone(deq_example, reproducible_torch):
    # With the head frozen, only the implicit gradient, through z* to W and the encoder,
    # can lower the loss: a zero gradient leaves it exactly where it was, a wrong-signed one
    # raises it. The bound sits far below 1 and far above what two epochs reach.
    X_train, y_train, _, _ = deq_example.load_data()
    model = deq_example.DEQClassifier()
    model.head.requires_grad_(False)
    _, before, _ = deq_example.evaluate(model, X_train, y_train)
    deq_example.train(model, X_train, y_train, epochs=2, show_progress=False)
    _, after, _ = deq_example.evaluate(model, X_train, y_train)
    assert after < 0.9 * before


class CountingTanh:
    """``tanh_map`` that counts its calls while ``counting`` is set."""

    def __init__(self):
        self.calls, self.counting = 0, False

    def __call__(self, z, params):
        self.calls += self.counting
        return tanh_map(z, params)


@pytest.mark.parametrize("backward_solver", BACKWARD_SOLVERS)
def test_linearize_once_evaluates_f_once_and_matches_per_iteration(backward_solver):
    grads, backward_calls = {}, {}
    for linearization in ("once", "per_iteration"):
        f = CountingTanh()
        params = [t64(p, True) for p in tanh_params()]
        sol = odecore.solve_fixed_point(
            f,
            t64(Z0),
            tuple(params),
            batch_axis=0,
            backward_solver=backward_solver,
            backward_linearization=linearization,
            **TIGHT,
        )
        f.counting = True
        (sol.z * t64(tanh_loss_weights())).sum().backward()
        grads[linearization] = [p.grad.numpy() for p in params]
        backward_calls[linearization] = f.calls
        iterations = int(sol.stats["backward_iterations"].max())
    # One evaluation at z* serves every iteration and the parameter cotangent.
    assert backward_calls["once"] == 1
    # Re-evaluating costs at least one evaluation per backward iteration.
    assert backward_calls["per_iteration"] >= iterations > 1
    pairs = zip(grads["once"], grads["per_iteration"], implicit_fd_gradient(), strict=True)
    for once, again, ref in pairs:
        # Consistency: the same products u J_f(z*) from the same recorded operations, so the
        # two backward solves take the same iterates, to far below the backward tolerance
        # (1e-12). Both are held to the finite differences as the other tests are.
        np.testing.assert_allclose(once, again, rtol=1e-12, atol=1e-14)
        assert relative_error(once, ref) < 1e-7


def test_backward_linearization_is_checked():
    with pytest.raises(ValueError, match="backward_linearization"):
        odecore.fixed_point(lambda z: torch.cos(z), t64([0.0]), backward_linearization="twice")
    with pytest.raises(TypeError, match="backward_linearization"):
        odecore.fixed_point(lambda z: torch.cos(z), t64([0.0]), backward_linearization=1)


def test_a_backward_that_does_not_converge_raises_instead_of_a_wrong_gradient():
    # f = c z + p: dz*/dp = 1 / (1 - c). A Picard backward on c = -1.5 diverges and left the
    # gradient at its start, 0 (for 0.4); at c = 0.99, 20 iterations gave 1 - 0.99^20 over
    # 1 - 0.99, 18.2 (for 100).
    picard = {"backward_solver": "picard"}
    for c, options in ((-1.5, picard), (0.99, {**picard, "backward_max_iter": 20})):
        p = t64(np.ones(2), grad=True)
        z = odecore.fixed_point(
            lambda z, p, c=c: c * z + p, t64(np.zeros(2)), p, solver="anderson", **options, **TIGHT
        )
        np.testing.assert_allclose(z.detach().numpy(), 1 / (1 - c), rtol=1e-10)
        with pytest.raises(odecore.FixedPointError, match="implicit backward .* did not converge"):
            z.sum().backward()
    # The same with throw=False: the best iterate's gradient, and the status says it.
    p = t64(np.ones(2), grad=True)
    sol = odecore.solve_fixed_point(
        lambda z, p: 0.99 * z + p, t64(np.zeros(2)), p, **picard, backward_max_iter=20,
        throw=False, **TIGHT,
    )  # fmt: skip
    sol.z.sum().backward()
    assert int(sol.stats["backward_status"][0]) == odecore.FixedPointStatus.MAX_ITER_REACHED
    np.testing.assert_allclose(p.grad.numpy(), (1 - 0.99**20) / (1 - 0.99), rtol=1e-10)


@pytest.mark.parametrize("c", [0.5, -1.5])
def test_gmres_backward_when_the_krylov_space_is_invariant(c):
    # J_f = c I: torch.linalg.solve refused the singular least-squares system.
    p = t64(np.ones(5), grad=True)
    z = odecore.fixed_point(
        lambda z, p: c * z + p, t64(np.zeros(5)), p, solver="anderson", backward_solver="gmres",
        **TIGHT,
    )  # fmt: skip
    z.sum().backward()
    np.testing.assert_allclose(p.grad.numpy(), 1 / (1 - c), rtol=1e-10)


@pytest.mark.parametrize("backward", ["implicit", "one_step", "unrolled"])
def test_a_nan_sample_the_loss_skips_leaves_the_shared_gradient(backward):
    """z = a z + 1 with a NaN z0 in one sample and a loss (nansum) that does not read it:
    that sample's VJP at z* = NaN summed 0 * NaN into the shared a's gradient. The others
    get theirs: dz*/da = 1 / (1 - a)^2 (implicit), z* (one step), z* (1 + a + ... + a^4)
    (the default 5 unrolled steps)."""
    a = t64(0.5, grad=True)
    z0 = t64([[0.0], [float("nan")], [1.0]])
    z = odecore.fixed_point(
        lambda z, a: a * z + 1.0,
        z0,
        a,
        batch_axis=0,
        tol=1e-13,
        max_iter=200,
        throw=False,
        backward=backward,
    )
    torch.nansum(z).backward()
    per_sample = {"implicit": 4.0, "one_step": 2.0, "unrolled": 2.0 * sum(0.5**i for i in range(5))}
    assert torch.isnan(z[1]).all()
    # Rounding of a 1e-13 fixed point, amplified by at most 1 / (1 - a) = 2.
    assert abs(a.grad.item() - 2 * per_sample[backward]) < 1e-11


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev", "hessian"])
def test_torch_func_transforms_are_refused_naming_the_fixed_points_options(transform):
    # The refusal named adjoint='direct' with create_graph=True, an ODE solve's option, for
    # second derivatives that a fixed point does not have.
    def z_star(b):
        return odecore.fixed_point(lambda z, b: 0.5 * torch.cos(z) + b, torch.zeros(2), b).sum()

    b = torch.tensor([[0.5, -1.0]] if transform == "vmap" else [0.5, -1.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torch\.func's transforms") as info:
        getattr(torch.func, transform)(z_star)(b)
    message = str(info.value)
    for words in ("torch.autograd.grad", "backward= ('implicit', 'one_step' or 'unrolled')",
                  "batch_axis=0", "first derivatives only"):  # fmt: skip
        assert words in message
    assert "adjoint" not in message and "create_graph" not in message


@pytest.mark.parametrize("diagnostic", ["jacobian_frobenius", "spectral_radius"])
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_refused_naming_the_diagnostics_options(diagnostic, transform):
    # The refusal named an ODE solve's options (adjoint='direct', batch_axis= with its own
    # steps), which the diagnostics do not take.
    z = torch.tensor([1.0, -0.5], dtype=torch.float64)
    probe = {"probe": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    extra = probe if diagnostic == "jacobian_frobenius" else {}

    def estimate(A):
        return getattr(odecore, diagnostic)(lambda z, A: A @ z, z, A, **extra)

    A = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torch\.func's transforms") as info:
        getattr(torch.func, transform)(estimate)(A[None] if transform == "vmap" else A)
    message = str(info.value)
    for words in ("torch.autograd.grad", "batch_axis=0 for one estimate per sample",
                  "jacobian_frobenius is differentiable with respect to params"):  # fmt: skip
        assert words in message
    for words in ("adjoint", "create_graph", "backward=", "its own steps"):
        assert words not in message


def test_forward_mode_is_refused_naming_what_the_diagnostics_offer():
    from torch.autograd import forward_ad

    A = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    z = torch.tensor([1.0, -0.5], dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(A, torch.ones_like(A))
        for diagnostic, extra in (("jacobian_frobenius", {"probe": torch.ones_like(z)}),
                                  ("spectral_radius", {})):  # fmt: skip
            with pytest.raises(
                RuntimeError, match=r"forward-mode autodiff.*dot product of its gradient"
            ):
                getattr(odecore, diagnostic)(lambda z, A: A @ z, z, dual, **extra)


def test_forward_mode_is_refused_naming_what_a_fixed_point_offers():
    from torch.autograd import forward_ad

    b = torch.tensor([0.5, -1.0], dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(b, torch.ones_like(b))
        with pytest.raises(RuntimeError, match=r"forward-mode autodiff.*first derivatives only"):
            odecore.fixed_point(lambda z, b: 0.5 * torch.cos(z) + b, torch.zeros(2), dual)
