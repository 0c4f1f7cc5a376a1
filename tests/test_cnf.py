"""``odecore.cnf``: divergences, log-densities, samples and RNODE regularisers.

References: closed forms of linear and time-dependent flows (``scipy.linalg.expm``), the
moments of Hutchinson's estimator, the normalisation of a density, and central finite
differences in float64. Tolerances follow from the solve's (rtol 1e-10 unless said): the
global error of a dopri5 solve is then about 1e-9 relative on these unit-scale problems.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
from array_api_compat import array_namespace
from cnf_cases import LinearFlow, ScalarFlow, TanhFlow, TimeDecay

import odecore
from odecore import cnf

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# A non-normal matrix whose symmetric part is not diagonal.
A3 = np.array([[-0.4, 0.7, 0.1], [-0.3, 0.2, -0.5], [0.6, 0.1, -0.1]])
X3 = np.array([[0.3, -1.0, 0.5], [1.2, 0.4, -0.2], [0.0, 0.5, 0.9], [-0.8, -0.6, 0.1]])


def gaussian_log_prob(z):
    return -0.5 * np.sum(z * z, axis=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def linear_log_prob(A, x, T):
    """``log N(e^{AT} x) + T tr A``: the flow ``f = A z`` over ``[0, T]``."""
    z = x @ scipy.linalg.expm(A * T).T
    return gaussian_log_prob(z) + T * np.trace(A)


def values(backend, result):
    return backend.to_numpy(result)


# ---------------------------------------------------------------- values, every backend


def test_linear_flow_exact_trace_gives_the_closed_form(backend):
    T = 0.7
    A, x = backend.asarray(A3), backend.asarray(X3)
    got = cnf.solve_log_prob(LinearFlow(), x, (0.0, T), A, **TIGHT)
    expected = linear_log_prob(A3, X3, T)
    # Solver error ~1e-9 on O(1) values.
    np.testing.assert_allclose(values(backend, got.log_prob), expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        values(backend, got.z), X3 @ scipy.linalg.expm(A3 * T).T, rtol=0, atol=1e-8
    )


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_fixed_steps_give_the_closed_form(backend, method):
    # FFJORD's --solver rk4 --step_size: the flow added an error norm to the options, which
    # a fixed-step solve refuses ("unknown option(s) 'norm'"), naming what the user never
    # passed. An adaptive method given step_size steps on the same grid.
    T = 0.7
    got = cnf.log_prob(
        LinearFlow(), backend.asarray(X3), (0.0, T), backend.asarray(A3), method=method,
        options={"step_size": 0.01},
    )  # fmt: skip
    # Global error C h^4 (rk4) or C h^5 (dopri5's solution weights) at h = 0.01, with C of
    # order the 5th power of ||A|| ~ 1: well under 1e-7.
    expected = linear_log_prob(A3, X3, T)
    np.testing.assert_allclose(values(backend, got), expected, rtol=0, atol=1e-7)


class CenteredFlow:
    """``f = A (z - mean over the batch)``: each sample's velocity depends on every other."""

    def __call__(self, t, z, A):
        xp = array_namespace(z)
        return (z - xp.mean(z, axis=0)) @ A.T


class JitteredFlow(LinearFlow):
    """``f = A z`` plus noise of 1e-13, new at every call, as dropout would be; its VJPs are
    those of ``A z``."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __call__(self, t, z, A):
        noise = self.rng.standard_normal(tuple(z.shape)) * 1e-13
        return z @ A.T + array_namespace(z).asarray(noise, dtype=z.dtype)


def test_a_velocity_that_mixes_samples_is_refused(backend):
    """The log-density takes each sample's own trace: with the batch mean subtracted, the
    trace of each sample's block is (1 - 1/B) tr A, not the tr A of the whole system's
    Jacobian, and the log-densities were silently wrong. A velocity whose calls differ by
    noise is left unchecked, and solves to the closed form within the noise."""
    A, x = backend.asarray(A3), backend.asarray(X3)
    with pytest.raises(ValueError, match=r"f mixes samples: moving another .* of x\[1\]"):
        cnf.log_prob(CenteredFlow(), x, (0.0, 0.7), A, **TIGHT)
    # Sample 0's rate reads sample 1: moving sample 0 changes no other rate, moving the last
    # changes sample 0's (that move was missing, and the log-densities were wrong).
    xp = backend.xp

    def reads_the_next(t, z):
        return -z + 0.5 * xp.concat([z[1:2], xp.zeros_like(z[1:])])

    with pytest.raises(ValueError, match=r"f mixes samples: moving another .* of x\[0\]"):
        cnf.log_prob(reads_the_next, x[:2], (0.0, 0.7), **TIGHT)
    # A velocity not shaped like x is named before the solve's reshapes fail inside it.
    with pytest.raises(ValueError, match=r"f returned shape \(4,\) for x of shape \(4, 3\)"):
        cnf.log_prob(lambda t, z: z[:, 0], x, (0.0, 0.7), **TIGHT)
    if backend.name == "jax":
        return  # NumPy noise cannot enter a traced JAX function
    got = cnf.log_prob(JitteredFlow(), x, (0.0, 0.7), A, **TIGHT)
    np.testing.assert_allclose(values(backend, got), linear_log_prob(A3, X3, 0.7), atol=1e-8)


def test_rademacher_hutchinson_is_exact_when_the_symmetric_part_is_diagonal(backend):
    # eps^T A eps = eps^T S eps = sum_i S_ii eps_i^2 = tr A for eps_i = +-1, whatever K adds.
    K = np.array([[0.0, 0.8, -0.3], [-0.8, 0.0, 0.5], [0.3, -0.5, 0.0]])
    A = np.diag([-0.5, 0.2, 0.3]) + K
    T = 0.6
    got = cnf.solve_log_prob(
        LinearFlow(),
        backend.asarray(X3),
        (0.0, T),
        backend.asarray(A),
        trace="hutchinson",
        seed=3,
        **TIGHT,
    )
    probes = values(backend, got.probes)
    assert set(np.unique(probes)) == {-1.0, 1.0}
    np.testing.assert_allclose(
        values(backend, got.log_prob), linear_log_prob(A, X3, T), rtol=0, atol=1e-8
    )


def test_time_dependent_flow_changes_the_log_density_by_minus_d_t_squared_over_two(backend):
    # f = -t z: div f = -d t, so the integral over [0, T] is -d T^2 / 2; z(T) = x e^{-T^2/2}.
    T = 1.3
    x = backend.asarray(X3)
    got = cnf.solve_log_prob(TimeDecay(), x, (0.0, T), **TIGHT)
    z = X3 * math.exp(-(T**2) / 2)
    expected = gaussian_log_prob(z) - 3 * T**2 / 2
    np.testing.assert_allclose(values(backend, got.log_prob), expected, rtol=0, atol=1e-8)


@pytest.mark.slow_on("jax")
def test_each_sample_may_step_on_its_own(backend):
    # batch_axis=0: f sees one time per sample; the closed form is the same.
    T = 1.3
    got = cnf.log_prob(TimeDecay(), backend.asarray(X3), (0.0, T), batch_axis=0, **TIGHT)
    expected = gaussian_log_prob(X3 * math.exp(-(T**2) / 2)) - 3 * T**2 / 2
    np.testing.assert_allclose(values(backend, got), expected, rtol=0, atol=1e-8)


def test_rnode_kinetic_energy_and_exact_frobenius_norm(backend):
    # Diagonal A: z_i = x_i e^{a_i t}, so int ||A z||^2 dt = sum a_i^2 x_i^2 (e^{2 a_i T} - 1) /
    # (2 a_i); the exact trace's Frobenius rate is ||A||_F^2 at every time.
    a = np.array([-0.7, 0.3, 0.5])
    T = 0.8
    _, regs = cnf.log_prob(
        LinearFlow(),
        backend.asarray(X3),
        (0.0, T),
        backend.asarray(np.diag(a)),
        regularizers=("kinetic", "jacobian_frobenius"),
        **TIGHT,
    )
    kinetic = np.sum(a**2 * X3**2 * np.expm1(2 * a * T) / (2 * a), axis=1)
    np.testing.assert_allclose(values(backend, regs["kinetic"]), kinetic, rtol=1e-8, atol=0)
    frobenius = np.full(X3.shape[0], T * np.sum(a**2))
    np.testing.assert_allclose(
        values(backend, regs["jacobian_frobenius"]), frobenius, rtol=1e-8, atol=0
    )


# ---------------------------------------------------------------- Hutchinson's statistics


def _hutchinson_estimates(noise, n, seed):
    """``eps^T A eps`` for ``n`` probes drawn by the library: for ``f = A z`` the log-density
    change is ``T eps^T A eps`` exactly, so the estimate is read off the solve."""
    T = 1.0
    x = np.zeros((n, 3))  # the state stays at 0; only the estimate moves
    got = cnf.solve_log_prob(
        LinearFlow(), x, (0.0, T), A3, trace="hutchinson", noise=noise, seed=seed, **TIGHT
    )
    return (got.log_prob - gaussian_log_prob(np.asarray(got.z))) / T


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_mean_and_variance_match_the_formulas(noise):
    S = (A3 + A3.T) / 2
    variance = 2 * np.sum(S * S)
    if noise == "rademacher":
        variance -= 2 * np.sum(np.diag(S) ** 2)
    n = 4000
    est = _hutchinson_estimates(noise, n, seed=11)
    # Two-sided 4-sigma bounds: the mean's standard error sqrt(var / n), and the sample
    # variance's, sqrt((m4 - s^4) / n) with the sample's own fourth central moment.
    assert abs(est.mean() - np.trace(A3)) < 4 * math.sqrt(variance / n)
    s2 = est.var()
    m4 = np.mean((est - est.mean()) ** 4)
    assert abs(s2 - variance) < 4 * math.sqrt((m4 - s2**2) / n)


def test_hutchinson_frobenius_estimate_is_unbiased():
    # E ||eps^T A||^2 = ||A||_F^2 for Gaussian probes; 4-sigma with the sample's own spread.
    n, T = 4000, 1.0
    _, regs = cnf.log_prob(
        LinearFlow(),
        np.zeros((n, 3)),
        (0.0, T),
        A3,
        trace="hutchinson",
        noise="gaussian",
        seed=5,
        regularizers=("jacobian_frobenius",),
        **TIGHT,
    )
    est = regs["jacobian_frobenius"] / T
    assert abs(est.mean() - np.sum(A3 * A3)) < 4 * est.std() / math.sqrt(n)


def test_the_same_seed_gives_the_same_probes_and_another_seed_others():
    run = [
        cnf.solve_log_prob(LinearFlow(), X3, (0.0, 1.0), A3, trace="hutchinson", seed=s)
        for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(run[0].probes, run[1].probes)
    np.testing.assert_array_equal(run[0].log_prob, run[1].log_prob)
    assert not np.array_equal(run[0].probes, run[2].probes)


# ---------------------------------------------------------------- the noise is drawn once


class Redrawn:
    """The augmented dynamics with fresh probes at every evaluation: the torchdiffeq #120
    mistake, as a negative control for the bound below."""

    def __init__(self, aug, rng):
        self.aug, self.rng = aug, rng

    def __call__(self, t, s, params):
        self.aug.eps = self.rng.standard_normal(self.aug.eps.shape)
        return self.aug(t, s, params)


def test_probes_held_fixed_keep_the_adaptive_solve_cheap():
    # With the log-density under error control (error_control="all"), probes held for the
    # whole solve give a smooth integrand: the step count stays within a factor 2 of the
    # exact trace's. Redrawn at every evaluation, the integrand is noise and the steps
    # collapse.
    W = np.array([[0.5, -1.0], [1.2, 0.3]])
    b = np.array([0.1, -0.2])
    x = np.random.default_rng(0).standard_normal((64, 2))
    kwargs = {"rtol": 1e-6, "atol": 1e-8, "error_control": "all"}
    exact = cnf.solve_log_prob(TanhFlow(), x, (0.0, 1.0), (W, b), **kwargs)
    held = cnf.solve_log_prob(
        TanhFlow(),
        x,
        (0.0, 1.0),
        (W, b),
        trace="hutchinson",
        noise="gaussian",
        seed=0,
        **kwargs,
    )
    nfe_exact = exact.solution.stats["nfev"]
    assert held.solution.stats["nfev"] <= 2 * nfe_exact

    aug = cnf.augmented_dynamics(TanhFlow(), (2,), "hutchinson", eps=np.ones((64, 2)))
    redrawn = odecore.solve(
        Redrawn(aug, np.random.default_rng(0)),
        aug.initial_state(np, x),
        [0.0, 1.0],
        params=(W, b),
        rtol=1e-6,
        atol=1e-8,
        options={"max_num_steps": 20 * nfe_exact},
        throw=False,
    )
    assert not redrawn.success or redrawn.stats["nfev"] > 5 * nfe_exact


# ---------------------------------------------------------------- gradients


X1 = np.array([[0.3], [1.2], [-0.7]])
A1, T1 = 0.4, 0.9


def scalar_gradient():
    """d/da sum_b log p(x_b) for f = a z: log p = log N(x e^{aT}) + aT."""
    return float(np.sum(T1 - X1[:, 0] ** 2 * T1 * math.exp(2 * A1 * T1)))


def numpy_log_prob_sum(a, trace):
    kwargs = {"seed": 4} if trace == "hutchinson" else {}
    return float(
        np.sum(
            cnf.log_prob(ScalarFlow(), X1, (0.0, T1), np.asarray(a), trace=trace, **kwargs, **TIGHT)
        )
    )


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_numpy_gradient_in_one_dimension(adjoint, trace):
    # In 1-D a Rademacher probe is +-1 and its estimate exact, so both traces have the
    # closed form.
    kwargs = {"seed": 4} if trace == "hutchinson" else {}
    value, _, pullback = cnf.vjp_log_prob(
        ScalarFlow(),
        X1,
        (0.0, T1),
        np.asarray(A1),
        trace=trace,
        adjoint=adjoint,
        **kwargs,
        **TIGHT,
    )
    x_bar, a_bar = pullback(np.ones(3))
    # Checkpoint is the discrete solve's exact gradient, backsolve the continuous one at
    # rtol 1e-10: both within 1e-8 of the closed form.
    assert float(a_bar) == pytest.approx(scalar_gradient(), rel=1e-8)
    h = 1e-5  # central differences: truncation h^2 ~ 1e-10, solver noise 1e-11 / h ~ 1e-6
    fd = (numpy_log_prob_sum(A1 + h, trace) - numpy_log_prob_sum(A1 - h, trace)) / (2 * h)
    assert float(a_bar) == pytest.approx(fd, rel=1e-5)
    # d log p / dx = -x e^{2aT}
    np.testing.assert_allclose(x_bar, -X1 * math.exp(2 * A1 * T1), rtol=1e-8)


def test_numpy_gradient_of_a_nonlinear_flow_with_regularisers_matches_finite_differences():
    W = np.array([[0.5, -1.0], [1.2, 0.3]])
    b = np.array([0.1, -0.2])
    x = np.array([[0.4, -0.3], [-1.0, 0.8]])
    regs = ("kinetic", "jacobian_frobenius")

    def loss(W_, b_):
        lp, r = cnf.log_prob(
            TanhFlow(),
            x,
            (0.0, 1.0),
            (W_, b_),
            trace="hutchinson",
            noise="gaussian",
            seed=2,
            regularizers=regs,
            **TIGHT,
        )
        return float(
            np.sum(lp) + 0.3 * np.sum(r["kinetic"]) + 0.2 * np.sum(r["jacobian_frobenius"])
        )

    _, _, pullback = cnf.vjp_log_prob(
        TanhFlow(),
        x,
        (0.0, 1.0),
        (W, b),
        trace="hutchinson",
        noise="gaussian",
        seed=2,
        regularizers=regs,
        **TIGHT,
    )
    _, (W_bar, b_bar) = pullback(
        np.ones(2), {"kinetic": np.full(2, 0.3), "jacobian_frobenius": np.full(2, 0.2)}
    )
    h = 1e-5
    for i, j in [(0, 0), (0, 1), (1, 0)]:
        E = np.zeros_like(W)
        E[i, j] = h
        fd = (loss(W + E, b) - loss(W - E, b)) / (2 * h)
        assert W_bar[i, j] == pytest.approx(fd, rel=1e-5, abs=1e-7)
    e = np.array([h, 0.0])
    assert b_bar[0] == pytest.approx((loss(W, b + e) - loss(W, b - e)) / (2 * h), rel=1e-5)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("adjoint", ["direct", "backsolve", "checkpoint"])
def test_torch_gradient_in_one_dimension(adjoint, trace):
    import torch

    a = torch.tensor(A1, dtype=torch.float64, requires_grad=True)
    kwargs = {"seed": 4} if trace == "hutchinson" else {}

    def total(a_):
        return cnf.log_prob(
            lambda t, z, p: p * z,
            torch.as_tensor(X1),
            (0.0, T1),
            a_,
            trace=trace,
            adjoint=adjoint,
            **kwargs,
            **TIGHT,
        ).sum()

    (grad,) = torch.autograd.grad(total(a), a)
    assert float(grad) == pytest.approx(scalar_gradient(), rel=1e-8)
    h = 1e-5
    with torch.no_grad():
        fd = (
            total(torch.tensor(A1 + h, dtype=torch.float64))
            - total(torch.tensor(A1 - h, dtype=torch.float64))
        ) / (2 * h)
    assert float(grad) == pytest.approx(float(fd), rel=1e-5)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("adjoint", ["direct", "backsolve", "checkpoint"])
def test_torch_data_that_requires_grad_keeps_the_log_density_right(adjoint):
    # FFJORD's training step: the data requires grad, the solve runs inside the gradient
    # rule's no-grad forward. There a view of the data still said requires_grad, and the
    # trace's Jacobian came out zero at the first evaluation: log-densities 1e-4 off in
    # backsolve and checkpoint, with the same steps. Closed forms of f = A z over [0, T]:
    # the log-density, the Frobenius regulariser T ||A||_F^2, and d/dx = -E^T E x, E = e^{AT}.
    import torch

    T = 0.7
    x = torch.tensor(X3, requires_grad=True)
    lp, regs = cnf.log_prob(
        LinearFlow(),
        x,
        (0.0, T),
        torch.tensor(A3, requires_grad=True),
        regularizers=("jacobian_frobenius",),
        adjoint=adjoint,
        **TIGHT,
    )
    np.testing.assert_allclose(lp.detach().numpy(), linear_log_prob(A3, X3, T), atol=1e-8)
    frobenius = np.full(X3.shape[0], T * np.sum(A3**2))
    np.testing.assert_allclose(regs["jacobian_frobenius"].detach().numpy(), frobenius, rtol=1e-8)
    (grad,) = torch.autograd.grad(lp.sum(), x)
    E = scipy.linalg.expm(A3 * T)
    np.testing.assert_allclose(grad.numpy(), -X3 @ (E.T @ E).T, atol=1e-7)


def torch_scale():
    """``f = a z`` as an ``nn.Module`` owning ``a = A1``: the velocity of scalar_gradient()."""
    import torch

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(A1, dtype=torch.float64))

        def forward(self, t, z):
            return self.a * z

    return Scale()


@pytest.mark.backend("torch")
@pytest.mark.parametrize("data", ["plain", "inference_mode"])
@pytest.mark.parametrize("adjoint", ["direct", "backsolve", "checkpoint"])
def test_torch_module_parameters_get_gradients(adjoint, data):
    # An nn.Module's own parameters are found although the augmented dynamics wrap it. The
    # divergence differentiates f with respect to a leaf made from the data, and torch
    # refuses requires_grad on a tensor made under inference_mode: the leaf is a clone.
    import torch

    module = torch_scale()
    x = torch.as_tensor(X1)
    if data == "inference_mode":
        with torch.inference_mode():
            x = x.clone()
    lp = cnf.log_prob(module, x, (0.0, T1), adjoint=adjoint, **TIGHT)
    lp.sum().backward()
    assert float(module.a.grad) == pytest.approx(scalar_gradient(), rel=1e-8)


@pytest.mark.backend("torch")
def test_torch_module_capturing_a_tensor_is_refused_naming_the_velocity():
    # A tensor wanting a gradient that the module uses but does not own would get none from
    # the backsolve. The refusal writes the velocity as the CNF documents it, f(t, z, params).
    import torch

    b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(A1, dtype=torch.float64))

        def forward(self, t, z):
            return self.a * z + b

    with pytest.raises(ValueError, match=r"^f uses 1 tensor.*params=\.\.\. \(f\(t, z, params\)\)"):
        cnf.log_prob(Shifted(), torch.as_tensor(X1), (0.0, T1), adjoint="backsolve")


@pytest.mark.backend("torch")
@pytest.mark.parametrize("adjoint", ["direct", "backsolve", "checkpoint"])
def test_torch_closure_capturing_weights_is_refused_in_every_mode(adjoint):
    # A plain function closing over a layer's weights: the flow records its divergence only
    # where x, t or the known parameters want a gradient, so the log-density came back
    # without one in every mode (backward() then failed in torch's words, naming nothing).
    import torch

    a = torch.tensor(A1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"^f uses 1 tensor.*z and its parameters alone"):
        cnf.log_prob(lambda t, z: a * z, torch.as_tensor(X1), (0.0, T1), adjoint=adjoint)
    # Given as params, the same weight gets the gradient of the closed form.
    lp = cnf.log_prob(lambda t, z, p: p * z, torch.as_tensor(X1), (0.0, T1), a, **TIGHT)
    lp.sum().backward()
    assert float(a.grad) == pytest.approx(scalar_gradient(), rel=1e-8)


@pytest.mark.backend("torch")
def test_torch_sample_follows_a_module_velocity():
    # With nothing but the module to say which backend, the draws were NumPy arrays and the
    # module's first layer failed on them in torch's words.
    import torch

    module = torch_scale()
    inferred = cnf.sample(module, 5, (1,), (0.0, T1), seed=3, **TIGHT)
    named = cnf.sample(module, 5, (1,), (0.0, T1), seed=3, backend="torch", **TIGHT)
    assert isinstance(inferred, torch.Tensor)
    assert torch.equal(inferred, named)


@pytest.mark.backend("torch")
def test_torch_backsolve_reuses_the_forward_probes():
    # For f = A z the Hutchinson log-density is log N(e^{AT} x) + T sum_b eps_b^T A eps_b, so
    # its A-gradient holds T sum_b eps_b eps_b^T for the forward's probes: a backward solve
    # with other probes would give another matrix. The rest comes from finite differences
    # of the closed form.
    import torch

    T = 0.5
    A = torch.tensor(A3, requires_grad=True)
    got = cnf.solve_log_prob(
        LinearFlow(),
        torch.as_tensor(X3),
        (0.0, T),
        A,
        trace="hutchinson",
        noise="gaussian",
        generator=torch.Generator().manual_seed(0),
        adjoint="backsolve",
        **TIGHT,
    )
    got.log_prob.sum().backward()
    eps = got.probes.numpy()
    h = 1e-6
    expected = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            E = np.zeros((3, 3))
            E[i, j] = h
            up = gaussian_log_prob(X3 @ scipy.linalg.expm((A3 + E) * T).T).sum()
            down = gaussian_log_prob(X3 @ scipy.linalg.expm((A3 - E) * T).T).sum()
            expected[i, j] = (up - down) / (2 * h)
    expected += T * eps.T @ eps
    np.testing.assert_allclose(A.grad.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.backend("jax")
@pytest.mark.parametrize(
    "adjoint", ["backsolve", pytest.param("checkpoint", marks=pytest.mark.slow)]
)
def test_jax_gradient_in_one_dimension_under_jit(adjoint):
    import jax

    with jax.enable_x64(True):
        x = jax.numpy.asarray(X1)

        def total(a, key):
            return cnf.log_prob(
                lambda t, z, p: p * z,
                x,
                (0.0, T1),
                a,
                trace="hutchinson",
                key=key,
                adjoint=adjoint,
                **TIGHT,
            ).sum()

        grad = jax.jit(jax.grad(total))(A1, jax.random.key(0))
        assert float(grad) == pytest.approx(scalar_gradient(), rel=1e-8)


@pytest.mark.backend("jax")
def test_jax_eager_calls_reuse_one_compiled_solve_with_their_own_probes():
    # An eager call runs through a compiled solve kept per dynamics object: the velocity is
    # traced by the first call only, and later calls still use their own data and probes.
    # Reference: for f = A z with a diagonal symmetric part every Rademacher probe's
    # estimate is exact, and the Frobenius integral is T ||eps^T A||^2 for each probe.
    import jax

    K = np.array([[-0.5, 0.8, -0.3], [-0.8, 0.2, 0.5], [0.3, -0.5, 0.3]])
    T = 0.6
    traces = []

    def velocity(t, z, A):
        traces.append(1)  # Python runs this while tracing, never in the compiled program
        return z @ A.T

    with jax.enable_x64(True):
        for i, seed in enumerate((0, 1, 2)):
            x = X3 + i
            got = cnf.solve_log_prob(
                velocity,
                jax.numpy.asarray(x),
                (0.0, T),
                jax.numpy.asarray(K),
                trace="hutchinson",
                key=jax.random.key(seed),
                regularizers=("jacobian_frobenius",),
                **TIGHT,
            )
            if i == 0:
                first_traces = len(traces)
            eps = np.asarray(got.probes)
            np.testing.assert_allclose(got.log_prob, linear_log_prob(K, x, T), rtol=0, atol=1e-8)
            frobenius = T * np.sum((eps @ K) ** 2, axis=1)
            np.testing.assert_allclose(got.regularizers["jacobian_frobenius"], frobenius, rtol=1e-9)
    assert len(traces) == first_traces


# ---------------------------------------------------------------- flows as maps


def test_reversibility_with_the_same_probes_and_not_with_others():
    W = np.array([[0.5, -1.0], [1.2, 0.3]])
    b = np.array([0.1, -0.2])
    x = np.array([[0.4, -0.3], [-1.0, 0.8], [0.2, 1.5]])
    forward = cnf.solve_log_prob(
        TanhFlow(),
        x,
        (0.0, 1.0),
        (W, b),
        trace="hutchinson",
        noise="gaussian",
        seed=7,
        **TIGHT,
    )
    back = cnf.sample(TanhFlow(), 3, (2,), (0.0, 1.0), (W, b), z=forward.z, **TIGHT)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-8)

    def change_back(probes):
        aug = cnf.augmented_dynamics(TanhFlow(), (2,), "hutchinson", eps=probes)
        s = odecore.odeint(
            aug, aug.initial_state(np, forward.z), [1.0, 0.0], params=(W, b), **TIGHT
        )[-1]
        return aug.split(np, s)[1]

    delta = forward.log_prob - gaussian_log_prob(forward.z)
    # Back along the same path with the same probes: the change cancels to solver error.
    np.testing.assert_allclose(change_back(forward.probes) + delta, 0.0, atol=1e-8)
    # With other probes each sample's estimate differs by O(1).
    other = np.random.default_rng(99).standard_normal(x.shape)
    assert np.max(np.abs(change_back(other) + delta)) > 1e-2


def test_sample_carries_base_draws_back_through_the_flow():
    # f = A z: x = e^{-AT} z for the seed's standard normal draws.
    T = 0.6
    x = cnf.sample(LinearFlow(), 5, 3, (0.0, T), A3, seed=8, **TIGHT)
    z = np.random.default_rng(8).standard_normal((5, 3))
    np.testing.assert_allclose(x, z @ scipy.linalg.expm(-A3 * T).T, rtol=0, atol=1e-8)


def test_a_two_dimensional_density_integrates_to_one():
    # A nonlinear 2-D flow; its density on a 121 x 121 grid over [-7, 7]^2. The midpoint sum
    # of a smooth density that vanishes at the edges converges faster than any power of the
    # spacing, and the mass outside the box is below 1e-10 (the flow moves points by less
    # than 1.5 from a standard normal); solver error at rtol 1e-8 is about 1e-7.
    W = np.array([[0.5, -1.0], [1.2, 0.3]])
    b = np.array([0.1, -0.2])
    grid = np.linspace(-7.0, 7.0, 121)
    spacing = grid[1] - grid[0]
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    lp = cnf.log_prob(TanhFlow(), points, (0.0, 1.0), (W, b), rtol=1e-8, atol=1e-10)
    assert np.sum(np.exp(lp)) * spacing**2 == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- divergence alone


def test_divergence_exact_and_hutchinson_on_a_nonlinear_field(backend):
    # Reference: the Jacobian tanh'(a) W per sample, written out.
    W = np.array([[0.5, -1.0], [1.2, 0.3]])
    b = np.array([0.1, -0.2])
    z = np.array([[0.4, -0.3], [-1.0, 0.8]])
    eps = np.array([[1.0, -1.0], [0.5, 2.0]])
    slope = 1 - np.tanh(z @ W.T + b) ** 2
    jac = slope[:, :, None] * W[None]
    params = (backend.asarray(W), backend.asarray(b))
    div, frob = cnf.divergence(TanhFlow(), 0.0, backend.asarray(z), params)
    np.testing.assert_allclose(values(backend, div), np.trace(jac, axis1=1, axis2=2), rtol=1e-14)
    np.testing.assert_allclose(values(backend, frob), np.sum(jac**2, axis=(1, 2)), rtol=1e-14)
    div, frob = cnf.divergence(
        TanhFlow(), 0.0, backend.asarray(z), params, "hutchinson", backend.asarray(eps)
    )
    rows = np.einsum("bi,bij->bj", eps, jac)
    np.testing.assert_allclose(values(backend, div), np.sum(rows * eps, axis=1), rtol=1e-14)
    np.testing.assert_allclose(values(backend, frob), np.sum(rows**2, axis=1), rtol=1e-14)


def test_divergence_refuses_float16_whose_range_the_frobenius_term_outgrows(backend):
    # ||A||_F^2 = 20 * 20 * 20^2 = 160000 is beyond float16's 65504: the Frobenius term came
    # back inf, without a word, where the solve refuses float16 for that regularizer.
    A = backend.asarray(np.full((20, 20), 20.0), dtype="float16")
    z = backend.asarray(np.ones((2, 20)), dtype="float16")
    with pytest.raises(
        TypeError,
        match=r"^cnf\.divergence cannot compute frobenius in .*float16.*65504.*z in float32",
    ):
        cnf.divergence(LinearFlow(), 0.0, z, A)
    for method, eps in (("exact", None), ("hutchinson", z)):
        with pytest.raises(TypeError, match="cannot compute frobenius"):
            cnf.divergence(LinearFlow(), 0.0, z, A, method, eps)


@pytest.mark.backend("torch")
def test_divergence_in_bfloat16_has_float32s_range():
    # The fix the float16 refusal names. Entries 20 and their squares 400 are exact in
    # bfloat16 and their float32 sum 160000 too; one rounding to bfloat16's 8 bits remains.
    import torch

    A = torch.full((20, 20), 20.0, dtype=torch.bfloat16)
    div, frob = cnf.divergence(LinearFlow(), 0.0, torch.ones(2, 20, dtype=torch.bfloat16), A)
    np.testing.assert_allclose(div.double().numpy(), 400.0, rtol=2.0**-8)
    np.testing.assert_allclose(frob.double().numpy(), 160000.0, rtol=2.0**-8)


class CubicCoupling:
    """``f(z) = tanh(z W^T) * (1 + t)`` on samples of event shape (2, 2), flattened inside:
    a Jacobian without zeros, for the trace over an event of more than one axis; with the
    VJP NumPy needs."""

    def __init__(self, xp, W):
        self.xp, self.W = xp, W

    def __call__(self, t, z):
        xp = self.xp
        flat = xp.reshape(z, (z.shape[0], 4))
        return xp.reshape(xp.tanh(flat @ xp.matrix_transpose(self.W)) * (1.0 + t), z.shape)

    def vjp(self, t, z, params, u):
        xp = self.xp
        flat = xp.reshape(z, (z.shape[0], 4))
        slope = (1.0 - xp.tanh(flat @ xp.matrix_transpose(self.W)) ** 2) * (1.0 + t)
        return xp.reshape((xp.reshape(u, flat.shape) * slope) @ self.W, z.shape), None


def test_exact_trace_batched_over_the_basis_equals_one_product_per_basis_vector(backend):
    # A consistency check of the exact trace, which frameworks batch over the basis
    # (Autodiff.basis_products; NumPy loops over the velocity's vjp), against Hutchinson's
    # path with each basis vector as the probe, one pullback each: sum_i e_i^T J e_i and
    # sum_i ||e_i^T J||^2. Both sum the same Jacobian entries, in another order: equal to a
    # few roundings. Reference values:
    # the Jacobian tanh'(a) W (1 + t), written out.
    W = np.array(
        [[0.5, -1.0, 0.2, 0.3], [1.2, 0.3, -0.4, 0.1], [0.0, 0.7, 0.9, -0.6], [0.4, 0.2, 0.1, 1.1]]
    )
    z = np.random.default_rng(5).standard_normal((3, 2, 2))
    t = 0.4
    f = CubicCoupling(backend.xp, backend.asarray(W))
    div, frob = cnf.divergence(f, t, backend.asarray(z))
    looped_div = looped_frob = 0.0
    for i in range(4):
        e = np.zeros((3, 4))
        e[:, i] = 1.0
        d, r = cnf.divergence(
            f, t, backend.asarray(z), method="hutchinson", eps=backend.asarray(e.reshape(z.shape))
        )
        looped_div, looped_frob = looped_div + values(backend, d), looped_frob + values(backend, r)
    np.testing.assert_allclose(values(backend, div), looped_div, rtol=1e-14)
    np.testing.assert_allclose(values(backend, frob), looped_frob, rtol=1e-14)
    flat = z.reshape(3, 4)
    jac = (1 - np.tanh(flat @ W.T) ** 2)[:, :, None] * W[None] * (1 + t)
    np.testing.assert_allclose(values(backend, div), np.trace(jac, axis1=1, axis2=2), rtol=1e-14)
    np.testing.assert_allclose(values(backend, frob), np.sum(jac**2, axis=(1, 2)), rtol=1e-14)


# ---------------------------------------------------------------- bad input


class NoVjp:
    def __call__(self, t, z):
        return -z


class FirstOrderOnly:
    def __call__(self, t, z, a):
        return a * z

    def vjp(self, t, z, a, u):
        return a * u, np.sum(u * z)


@pytest.mark.backend("torch")
def test_a_source_of_another_library_is_refused_naming_torchs():
    import torch

    x = torch.tensor(X3)
    with pytest.raises(TypeError, match=r"come from a torch.Generator or a numpy.random.Gen"):
        cnf.log_prob(LinearFlow(), x, (0.0, 1.0), torch.tensor(A3), trace="hutchinson",
                     generator=object())  # fmt: skip


def test_an_int_key_is_refused_naming_seed(backend):
    # key=0 was read as seed=0 on every backend; key is a JAX PRNG key.
    A, x = backend.asarray(A3), backend.asarray(X3)
    match = r"^key must be a JAX PRNG key \(jax\.random\.key\(0\)\), got the int 0.*seed=0"
    with pytest.raises(TypeError, match=match):
        cnf.log_prob(LinearFlow(), x, (0.0, 1.0), A, trace="hutchinson", key=0)
    with pytest.raises(TypeError, match=match + r".*torch\.Generator goes in generator="):
        cnf.sample(LinearFlow(), 2, 3, (0.0, 1.0), A, key=0)


def test_a_generator_given_as_key_is_refused_naming_generator(backend):
    # A numpy.random.Generator (or a torch.Generator) in key drew the probes as if given as
    # generator=; key is a JAX PRNG key.
    A, x = backend.asarray(A3), backend.asarray(X3)
    sources = [(np.random.default_rng(0), "numpy.random.Generator")]
    if backend.name == "torch":
        import torch

        sources.append((torch.Generator().manual_seed(0), "torch.Generator"))
    for source, kind in sources:
        match = rf"^key must be a JAX PRNG key, got a {re.escape(kind)}: pass .* as generator="
        with pytest.raises(TypeError, match=match):
            cnf.log_prob(LinearFlow(), x, (0.0, 1.0), A, trace="hutchinson", key=source)
        with pytest.raises(TypeError, match=match):
            cnf.sample(LinearFlow(), 2, 3, (0.0, 1.0), A, key=source)


@pytest.mark.backend("torch")
def test_a_state_dtype_the_parameters_do_not_have_is_refused_naming_both():
    # torch's matmul raised "mat1 and mat2 must have the same dtype" from the velocity, deep
    # inside the solve.
    import torch

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)  # float32 weights

        def forward(self, t, z):
            return torch.tanh(self.layer(z))

    velocity = Velocity()

    both = r"is torch\.float64, and f's parameters are torch\.float32.*\.to\(torch\.float64\)"
    with pytest.raises(TypeError, match=r"^z's dtype " + both):
        cnf.sample(velocity, 2, 3, z=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^the draws' dtype \(dtype=\) " + both):
        cnf.sample(velocity, 2, 3, seed=0, dtype=torch.float64, backend="torch")
    with pytest.raises(TypeError, match=r"^x's dtype " + both):
        cnf.log_prob(velocity, torch.zeros(2, 3, dtype=torch.float64))
    # Parameters given as params are the parameters too.
    with pytest.raises(TypeError, match=r"^z's dtype " + both):
        cnf.sample(LinearFlow(), 2, 3, params=torch.tensor(A3, dtype=torch.float32),
                   z=torch.zeros(2, 3, dtype=torch.float64))  # fmt: skip


@pytest.mark.backend("torch")
def test_the_frobenius_regularizer_is_refused_in_float16_and_exact_in_bfloat16():
    # In float16 its rate, ||A||_F^2 = 64 * 64 * 36 on average here, overflowed to inf and
    # the solve failed blaming the velocity.
    import torch

    rng = np.random.default_rng(0)
    A = rng.standard_normal((64, 64)) * 6.0
    x = rng.standard_normal((2, 64)) * 0.01
    T = 1e-4

    def solve(dtype):
        return cnf.solve_log_prob(
            LinearFlow(), torch.tensor(x, dtype=dtype), (0.0, T), torch.tensor(A, dtype=dtype),
            regularizers=("jacobian_frobenius",), method="rk4", options={"step_size": T},
            rtol=1e-2,  # fixed steps: no error control, and no warning about bfloat16's
        )  # fmt: skip

    with pytest.raises(TypeError, match=r"'jacobian_frobenius' .* torch\.float16.*65504.*bfloat16"):
        solve(torch.float16)
    # bfloat16 has float32's range. The exact term is T ||A||_F^2 for the bfloat16-rounded
    # A: products and the result rounded to bfloat16 (2^-9 each) and a float32 sum, so a
    # relative error of a few 2^-9.
    got = solve(torch.bfloat16).regularizers["jacobian_frobenius"].double().numpy()
    A_rounded = torch.tensor(A, dtype=torch.bfloat16).double().numpy()
    np.testing.assert_allclose(got, T * np.sum(A_rounded**2), rtol=4 * 2.0**-9)


def test_vjp_log_prob_names_the_probe_sources_it_takes():
    with pytest.raises(TypeError, match=r"key is a JAX random key.*seed= \(an int\)"):
        cnf.vjp_log_prob(LinearFlow(), X3, (0.0, 1.0), A3, trace="hutchinson", key=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"trace": "stochastic"}, ValueError, "trace must be 'exact' or 'hutchinson'"),
        ({"trace": "hutchinson", "noise": "uniform"}, ValueError, "noise must be"),
        ({"regularizers": "kinetic"}, TypeError, "regularizers must be a tuple"),
        ({"regularizers": ("energy",)}, ValueError, "unknown regularizer 'energy'"),
        ({"regularizers": ("kinetic", "kinetic")}, ValueError, "twice"),
        ({"error_control": "none"}, ValueError, "error_control must be"),
        ({"seed": 1}, ValueError, "seed is for trace='hutchinson'"),
        ({"noise": "gaussian"}, ValueError, "noise='gaussian' is for trace='hutchinson'"),
        ({"trace": "hutchinson", "seed": 1, "eps": np.ones((4, 3))}, ValueError, "at most one"),
        ({"trace": "hutchinson", "seed": 1.5}, TypeError, "seed must be an int"),
        ({"trace": "hutchinson", "eps": np.ones((4, 2))}, ValueError, "eps must have the shape"),
        ({"batch_axis": 1}, ValueError, "batch_axis must be None"),
        ({"t": (0.0, 0.5, 1.0)}, ValueError, "t must be a pair"),
        ({"base": "normal"}, TypeError, "base must be a callable"),
        ({"base": lambda z: z}, ValueError, r"base must return one log-density per sample.*"),
        # These three were accepted and ignored: given probes are used as they are, a fixed
        # step has no error control, and a norm of the caller's replaces the one built.
        (
            {"trace": "hutchinson", "eps": np.ones((4, 3)), "noise": "gaussian"},
            ValueError,
            "noise='gaussian' chooses how probes are drawn, and eps gives them",
        ),
        (
            {"error_control": "all", "method": "rk4", "options": {"step_size": 0.1}},
            ValueError,
            "error_control='all' .* method='rk4' takes fixed steps",
        ),
        (
            {"error_control": "all", "options": {"norm": lambda v: np.sqrt(np.mean(v * v))}},
            ValueError,
            r"error_control='all' builds .*options\['norm'\] gives one",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    kwargs = {"t": (0.0, 1.0), **kwargs}
    with pytest.raises(error, match=match):
        cnf.log_prob(LinearFlow(), X3, params=A3, **kwargs)


def test_bad_data_is_refused():
    with pytest.raises(ValueError, match=r"shape \(batch, \*event_shape\)"):
        cnf.log_prob(LinearFlow(), X3[0], params=A3)
    with pytest.raises(TypeError, match="real floating"):
        cnf.log_prob(LinearFlow(), np.ones((2, 3), dtype=np.int64), params=A3)
    with pytest.raises(ValueError, match="needs the probes"):
        cnf.divergence(LinearFlow(), 0.0, X3, A3, "hutchinson")
    with pytest.raises(ValueError, match="n must be a positive int"):
        cnf.sample(LinearFlow(), 0, 3, params=A3)


def test_a_velocity_whose_signature_does_not_fit_gets_a_clear_error(backend):
    A, x = backend.asarray(A3), backend.asarray(X3)
    with pytest.raises(TypeError, match=r"calls f\(t, x\) when no params .* \(t, z, A\)"):
        cnf.log_prob(LinearFlow(), x)
    with pytest.raises(TypeError, match=r"calls f\(t, x, params\) .* \(t, z\) cannot"):
        cnf.log_prob(lambda t, z: -z, x, params=A)
    # Sampling solves the velocity as the ODE's func, whose message named func(t, y).
    with pytest.raises(TypeError, match=r"calls f\(t, x\) when no params .* \(t, z, A\)"):
        cnf.sample(LinearFlow(), 2, 3, seed=0, backend=backend.name)
    with pytest.raises(TypeError, match=r"calls f\(t, x, params\) .* \(t, z\) cannot"):
        cnf.sample(lambda t, z: -z, 2, 3, params=A, seed=0)


def test_numpy_dynamics_without_the_needed_vjp_get_a_clear_error():
    with pytest.raises(TypeError, match="needs the dynamics' own 'vjp' method"):
        cnf.log_prob(NoVjp(), X3)
    _, _, pullback = cnf.vjp_log_prob(FirstOrderOnly(), X1, params=np.asarray(0.3))
    with pytest.raises(TypeError, match="vjp_of_vjp"):
        pullback(np.ones(3))


# ---------------------------------------------------------------- numba


@pytest.mark.backend("numba")
def test_numba_log_prob_and_sample_give_the_closed_forms():
    # The numba backend runs NumPy's generic loop with the velocity's own vjp (its whole-solve
    # kernel cannot call the velocity's VJPs from Python). Errors as in the closed-form tests
    # above.
    T = 0.7
    expected = linear_log_prob(A3, X3, T)
    got = cnf.solve_log_prob(LinearFlow(), X3, (0.0, T), A3, backend="numba", **TIGHT)
    assert isinstance(got.log_prob, np.ndarray)
    np.testing.assert_allclose(got.log_prob, expected, rtol=0, atol=1e-8)
    per_sample = cnf.log_prob(
        LinearFlow(), X3, (0.0, T), A3, batch_axis=0, backend="numba", **TIGHT
    )
    np.testing.assert_allclose(per_sample, expected, rtol=0, atol=1e-8)
    # A skew-symmetric part only: every Rademacher probe's estimate is exact.
    K = np.array([[-0.5, 0.8, -0.3], [-0.8, 0.2, 0.5], [0.3, -0.5, 0.3]])
    lp, regs = cnf.log_prob(
        LinearFlow(),
        X3,
        (0.0, T),
        K,
        trace="hutchinson",
        seed=3,
        regularizers=("jacobian_frobenius",),
        backend="numba",
        **TIGHT,
    )
    np.testing.assert_allclose(lp, linear_log_prob(K, X3, T), rtol=0, atol=1e-8)
    # ||eps^T K||^2 integrated over [0, T], for the probes seed 3 draws (Rademacher signs of
    # standard normal draws, as documented).
    eps = np.where(np.random.default_rng(3).standard_normal(X3.shape) < 0, -1.0, 1.0)
    frobenius = T * np.sum((eps @ K) ** 2, axis=1)
    np.testing.assert_allclose(regs["jacobian_frobenius"], frobenius, rtol=1e-10)
    x = cnf.sample(LinearFlow(), 5, 3, (0.0, T), A3, seed=8, backend="numba", **TIGHT)
    z = np.random.default_rng(8).standard_normal((5, 3))
    np.testing.assert_allclose(x, z @ scipy.linalg.expm(-A3 * T).T, rtol=0, atol=1e-8)


@pytest.mark.backend("numba")
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_numba_gradient_in_one_dimension(adjoint, trace):
    kwargs = {"seed": 4} if trace == "hutchinson" else {}
    _, _, pullback = cnf.vjp_log_prob(
        ScalarFlow(),
        X1,
        (0.0, T1),
        np.asarray(A1),
        trace=trace,
        adjoint=adjoint,
        backend="numba",
        **kwargs,
        **TIGHT,
    )
    x_bar, a_bar = pullback(np.ones(3))
    # As on NumPy: within 1e-8 of the closed forms at rtol 1e-10.
    assert float(a_bar) == pytest.approx(scalar_gradient(), rel=1e-8)
    np.testing.assert_allclose(x_bar, -X1 * math.exp(2 * A1 * T1), rtol=1e-8)
