"""Gradient requests that cannot be honoured raise, naming the problem and the remedy.

- A tensor ``func`` captures, or hides in a ``params`` object the rules cannot see into,
  would get no gradient from ``backsolve`` or ``checkpoint``: refused.
- Tensors made under ``torch.inference_mode()``: data prepared there is solved; a
  gradient that would need such a tensor saved is refused, and so are parameters made
  there that require grad, which can get no gradient.
- A NumPy dynamics' ``vjp`` that returns the wrong shape would be broadcast into a wrong
  gradient: refused on its first call, naming the output.
- Second-order gradients exist in ``direct`` mode only; the other modes say so.

References for the values checked along the way: closed forms of ``y' = -k y``,
``y' = a y``, ``y' = -k t y`` and ``y' = t A y``.
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest

import odecore

RULE_MODES = ("backsolve", "checkpoint")
K = 0.7
T_END = 1.3
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# The solve is accurate to about rtol; a derivative of the discrete solve (steps held
# constant) follows the sensitivity equation to the same order, so 1e3 * rtol is a wide margin.
CLOSED_FORM_TOL = 1e-7


# --------------------------------------------------------------------------------------------
# Tensors the gradient rules would not see (torch)


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_a_captured_tensor_is_refused_when_nothing_else_requires_grad(mode):
    import torch

    k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    with pytest.raises(ValueError, match="adjoint_params"):
        odecore.odeint(lambda t, y: -k * y, y0, t, adjoint=mode)


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_a_captured_tensor_is_fine_without_grad_mode(mode):
    import torch

    k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    with torch.no_grad():
        ys = odecore.odeint(lambda t, y: -k * y, y0, t, adjoint=mode, **TIGHT)
    expected = y0 * math.exp(-K * T_END)
    assert torch.allclose(ys[-1], expected, rtol=CLOSED_FORM_TOL, atol=0)


@pytest.mark.backend("torch")
def test_a_captured_tensor_gets_its_gradient_in_direct_mode():
    import torch

    k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    ys = odecore.odeint(lambda t, y: -k * y, y0, t, adjoint="direct", **TIGHT)
    ys[-1].sum().backward()
    # d/dk of sum(y0) e^{-k T} = -T sum(y0) e^{-k T}
    expected = -T_END * float(y0.sum()) * math.exp(-K * T_END)
    assert abs(float(k.grad) - expected) < CLOSED_FORM_TOL * abs(expected)


# --------------------------------------------------------------------------------------------
# Tensors made under torch.inference_mode() (torch)
#
# Such a tensor cannot require grad outside inference_mode, nor be saved for a backward.
# Data prepared there is solved in every mode; a gradient that would need such a tensor
# saved is refused, and so are parameters made there that require grad, which can get no
# gradient. The dynamics are y' = t A y with
# A = [[-K, OMEGA], [-OMEGA, -K]] = -K I + OMEGA J, J^2 = -I, so that, with s = T^2 / 2,
# y(T) = exp(A s) y0 = e^{-K s} [[cos OMEGA s, sin OMEGA s], [-sin OMEGA s, cos OMEGA s]] y0.

OMEGA = 0.9
Y0 = [1.0, -2.0]


def _flow_matrix():
    """exp(A T_END^2 / 2), the closed form above."""
    s = T_END**2 / 2
    c, r = math.cos(OMEGA * s), math.sin(OMEGA * s)
    return math.exp(-K * s) * np.array([[c, r], [-r, c]])


def _rotation(torch):
    """``t A y`` as a model whose weight, like a linear layer's, is saved for the gradient
    with respect to y, and a time that is saved for the gradient through the layer."""

    class Rotation(torch.nn.Module):
        def __init__(self):
            super().__init__()
            weight = torch.tensor([[-K, OMEGA], [-OMEGA, -K]], dtype=torch.float64)
            self.weight = torch.nn.Parameter(weight)

        def forward(self, t, y):
            return t * torch.nn.functional.linear(y, self.weight)

    return Rotation()


def _frozen_rotation(torch, built_in_inference_mode):
    if not built_in_inference_mode:
        return _rotation(torch).requires_grad_(False)
    with torch.inference_mode():
        return _rotation(torch).requires_grad_(False)


def _inference_data(torch):
    with torch.inference_mode():
        y0 = torch.tensor(Y0, dtype=torch.float64)
        t = torch.tensor([0.0, T_END], dtype=torch.float64)
    return y0, t


def _solve(mode, func, y0, t, **kwargs):
    if mode == "odeint_adjoint":  # torchdiffeq's name for backsolve
        return odecore.odeint_adjoint(func, y0, t, **TIGHT, **kwargs)
    return odecore.odeint(func, y0, t, adjoint=mode, **TIGHT, **kwargs)


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
@pytest.mark.parametrize("mode", ["direct", *RULE_MODES, "odeint_adjoint"])
@pytest.mark.backend("torch")
def test_a_frozen_model_solves_data_made_under_inference_mode(mode, built_in_inference_mode):
    # Nothing asks for a gradient. The check for tensors func uses without declaring them
    # set requires_grad on y0's copy, which torch refuses for an inference tensor; and a
    # model built under inference_mode, whose weight cannot be saved for a backward, must
    # be evaluated there as in the solve itself.
    import torch

    field = _frozen_rotation(torch, built_in_inference_mode)
    y0, t = _inference_data(torch)
    ys = _solve(mode, field, y0, t)
    np.testing.assert_allclose(ys[-1].numpy(), _flow_matrix() @ Y0, rtol=CLOSED_FORM_TOL)


@pytest.mark.parametrize("mode", ["direct", *RULE_MODES])
@pytest.mark.backend("torch")
def test_the_gradient_for_y0_cloned_from_inference_data(mode):
    # y0 is cloned to be differentiated, t stays as prepared, and the check for hidden
    # tensors still evaluates func with y requiring grad. d sum(y(T)) / d y0 =
    # exp(A T^2 / 2)^T 1.
    import torch

    field = _frozen_rotation(torch, built_in_inference_mode=False)
    data, t = _inference_data(torch)
    y0 = data.clone().requires_grad_(True)
    _solve(mode, field, y0, t)[-1].sum().backward()
    np.testing.assert_allclose(y0.grad.numpy(), _flow_matrix().T @ np.ones(2), rtol=CLOSED_FORM_TOL)


def _decay(torch, requires_grad):
    """``y' = -k t y``, k a 0-d parameter: y(T) = y0 exp(-k T^2 / 2)."""

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(K, dtype=torch.float64))

        def forward(self, t, y):
            return -self.k * t * y

    return Decay().requires_grad_(requires_grad)


@pytest.mark.parametrize("mode", ["direct", *RULE_MODES])
@pytest.mark.backend("torch")
def test_data_made_under_inference_mode_leaves_the_parameters_their_gradient(mode):
    import torch

    field = _decay(torch, requires_grad=True)
    y0, t = _inference_data(torch)
    _solve(mode, field, y0, t)[-1].sum().backward()
    # d/dk of sum(y0) exp(-k s) = -s sum(y0) exp(-k s), s = T^2 / 2
    s = T_END**2 / 2
    expected = -s * sum(Y0) * math.exp(-K * s)
    np.testing.assert_allclose(float(field.k.grad), expected, rtol=CLOSED_FORM_TOL)


@pytest.mark.parametrize("wrt", ["y0", "t"])
@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_a_gradient_through_weights_made_under_inference_mode_is_refused(mode, wrt):
    # The backward's evaluations of func save its weight for the gradient with respect to
    # y, which torch refuses: said before the solve, with what to do.
    import torch

    field = _frozen_rotation(torch, built_in_inference_mode=True)
    y0, t = _inference_data(torch)
    y0, t = (y0.clone().requires_grad_(True), t) if wrt == "y0" else (y0, t.clone())
    t.requires_grad_(wrt == "t")
    with pytest.raises(RuntimeError, match=r"created under torch\.inference_mode\(\)") as info:
        _solve(mode, field, y0, t)
    assert "Build the model outside inference_mode" in str(info.value)
    assert "torch.no_grad()" in str(info.value)


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_a_captured_tensor_is_refused_beside_weights_made_under_inference_mode(mode):
    # The check cannot evaluate func with y requiring grad, as the weight would be saved
    # for that gradient; it still finds the tensor func captures. scipy_solver checks
    # before it solves: odeint's own solve, whose y comes to require grad through that
    # tensor, meets torch's refusal to save the weight first.
    import torch

    field = _frozen_rotation(torch, built_in_inference_mode=True)
    shift = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    y0, t = _inference_data(torch)
    with pytest.raises(ValueError, match="adjoint_params"):
        odecore.odeint(lambda t, y: field(t, y) + shift, y0, t, method="scipy_solver", adjoint=mode)


@pytest.mark.parametrize("named", [False, True], ids=["found", "adjoint_params"])
@pytest.mark.parametrize("mode", ["direct", *RULE_MODES])
@pytest.mark.backend("torch")
def test_parameters_made_under_inference_mode_are_refused(mode, named):
    # They require grad but take part in no autograd outside inference_mode: k's gradient
    # came out zero.
    import torch

    with torch.inference_mode():
        field = _decay(torch, requires_grad=True)
    y0 = torch.tensor(Y0, dtype=torch.float64)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    kwargs = {"adjoint_params": tuple(field.parameters())} if named else {}
    with pytest.raises(RuntimeError, match=r"1 parameter\(s\) that require grad") as info:
        _solve(mode, field, y0, t, **kwargs)
    message = str(info.value)
    assert "created under torch.inference_mode()" in message
    assert "torch.nn.Parameter(p.clone())" in message
    assert "requires_grad_(False)" in message
    # Where nothing is differentiated they ask for nothing, and the solve runs.
    with torch.no_grad():
        ys = _solve(mode, field, y0, t, **kwargs)
    expected = np.array(Y0) * math.exp(-K * T_END**2 / 2)
    np.testing.assert_allclose(ys[-1].numpy(), expected, rtol=CLOSED_FORM_TOL)


@dataclasses.dataclass
class Rates:
    k: object


def _opaque_params(torch, kind):
    k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
    return types.SimpleNamespace(k=k) if kind == "namespace" else Rates(k)


@pytest.mark.parametrize("kind", ["namespace", "dataclass"])
@pytest.mark.parametrize("y0_requires_grad", [False, True])
@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_params_that_are_not_a_tree_are_refused(mode, y0_requires_grad, kind):
    import torch

    params = _opaque_params(torch, kind)
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=y0_requires_grad)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    with pytest.raises(TypeError, match="params must be an array or a nested tuple") as info:
        odecore.odeint(lambda t, y, p: -p.k * y, y0, t, params=params, adjoint=mode)
    assert type(params).__name__ in str(info.value)
    assert "adjoint_params" in str(info.value)


@pytest.mark.backend("torch")
def test_params_that_are_not_a_tree_work_in_direct_mode():
    import torch

    params = _opaque_params(torch, "namespace")
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    ys = odecore.odeint(lambda t, y, p: -p.k * y, y0, t, params=params, adjoint="direct", **TIGHT)
    ys[-1].sum().backward()
    expected = -T_END * float(y0.sum()) * math.exp(-K * T_END)
    assert abs(float(params.k.grad) - expected) < CLOSED_FORM_TOL * abs(expected)


class DecayNumpy:
    def __call__(self, t, y, params):
        return -params.k * y

    def vjp(self, t, y, params, cotangent):
        return -params.k * cotangent, types.SimpleNamespace(k=-np.sum(cotangent * y))


@pytest.mark.parametrize("mode", RULE_MODES)
def test_params_that_are_not_a_tree_are_refused_by_vjp_odeint(mode):
    params = types.SimpleNamespace(k=np.asarray(K))
    with pytest.raises(TypeError, match="params must be an array or a nested tuple"):
        odecore.vjp_odeint(DecayNumpy(), np.ones(2), np.array([0.0, T_END]), params, adjoint=mode)


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("jax")
def test_params_that_jax_cannot_flatten_are_refused(mode):
    import jax

    jnp = jax.numpy
    params = types.SimpleNamespace(k=jnp.asarray(K))
    with pytest.raises(TypeError, match="registered pytree|pytree registered"):
        odecore.odeint(
            lambda t, y, p: -p.k * y,
            jnp.ones(2),
            jnp.asarray([0.0, T_END]),
            params=params,
            adjoint=mode,
        )


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("jax")
def test_a_registered_pytree_gets_its_gradient_on_jax(mode):
    import jax

    jnp = jax.numpy

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Registered:
        k: object

    with jax.enable_x64(True):
        y0 = jnp.asarray([1.0, -2.0])

        def loss(params):
            ys = odecore.odeint(
                lambda t, y, p: -p.k * y,
                y0,
                jnp.asarray([0.0, T_END]),
                params=params,
                adjoint=mode,
                **TIGHT,
            )
            return jnp.sum(ys[-1])

        grad = jax.grad(loss)(Registered(jnp.asarray(K)))
        expected = -T_END * float(jnp.sum(y0)) * math.exp(-K * T_END)
        assert abs(float(grad.k) - expected) < CLOSED_FORM_TOL * abs(expected)


# --------------------------------------------------------------------------------------------
# A NumPy vjp that returns the wrong shape


class Nonlinear:
    """``y' = tanh(W y) + b`` with ``params = {"W": W, "b": b}``; ``bad`` names the output
    its VJP gets wrong, and how."""

    def __init__(self, bad=None):
        self.bad = bad

    def __call__(self, t, y, params):
        return np.tanh(params["W"] @ y) + params["b"]

    def vjp(self, t, y, params, cotangent):
        u = cotangent * (1 - np.tanh(params["W"] @ y) ** 2)
        cot_y, cot_W, cot_b = params["W"].T @ u, np.outer(u, y), cotangent
        if self.bad == "cot_y":
            cot_y = cot_y[:, None]  # (2, 1): broadcasts against (2,) into (2, 2)
        elif self.bad == "W":
            cot_W = np.sum(cot_W, axis=0)  # (2,): broadcasts against (2, 2)
        elif self.bad == "b":
            cot_b = float(np.sum(cot_b))  # not an array
        return cot_y, {"W": cot_W, "b": cot_b}


W_NL = np.array([[-0.5, 1.0], [-1.0, -0.3]])
B_NL = np.array([0.1, -0.2])
Y0_NL = np.array([0.3, -0.4])
T_NL = np.array([0.0, 0.5, 1.0])


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.parametrize(
    "bad, error, words",
    [
        ("cot_y", ValueError, ["cot_y", "(2, 1)", "(2,)"]),
        ("W", ValueError, ["cot_params['W']", "(2,)", "(2, 2)"]),
        ("b", TypeError, ["cot_params['b']", "float", "(2,)"]),
    ],
)
def test_a_vjp_of_the_wrong_shape_is_named(mode, bad, error, words):
    params = {"W": W_NL, "b": B_NL}
    _, pullback = odecore.vjp_odeint(Nonlinear(bad), Y0_NL, T_NL, params, adjoint=mode)
    with pytest.raises(error) as info:
        pullback(np.ones((3, 2)))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("mode", RULE_MODES)
def test_a_right_vjp_passes_the_check(mode):
    # Consistency with central differences of the solve, so that the check cannot pass by
    # never calling the VJP.
    params = {"W": W_NL, "b": B_NL}
    _, pullback = odecore.vjp_odeint(Nonlinear(), Y0_NL, T_NL, params, adjoint=mode, **TIGHT)
    y0_bar, _, _ = pullback(np.ones((3, 2)))
    h = 1e-6  # central differences: h^2 truncation and 1e-16 / h rounding, both below 1e-9
    fd = np.zeros(2)
    for j in range(2):
        step = np.eye(2)[j] * h
        up, _ = odecore.vjp_odeint(Nonlinear(), Y0_NL + step, T_NL, params, **TIGHT)
        down, _ = odecore.vjp_odeint(Nonlinear(), Y0_NL - step, T_NL, params, **TIGHT)
        fd[j] = (up.sum() - down.sum()) / (2 * h)
    assert np.max(np.abs(y0_bar - fd)) < 1e-7 * np.max(np.abs(fd))


# --------------------------------------------------------------------------------------------
# Second-order gradients (torch)

A_RATE = 0.5
Y0_SCALAR = 1.5


def _growth(torch, mode):
    a = torch.tensor(A_RATE, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([Y0_SCALAR], dtype=torch.float64)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    ys = odecore.odeint(lambda t, y, p: p[0] * y, y0, t, params=(a,), adjoint=mode, **TIGHT)
    return a, ys[-1].sum()


@pytest.mark.backend("torch")
def test_direct_mode_second_derivative_matches_the_closed_form():
    import torch

    a, y_end = _growth(torch, "direct")
    (first,) = torch.autograd.grad(y_end, a, create_graph=True)
    (second,) = torch.autograd.grad(first, a)
    # y(T) = y0 e^{aT}: dy/da = T y0 e^{aT}, d2y/da2 = T^2 y0 e^{aT}.
    grows = Y0_SCALAR * math.exp(A_RATE * T_END)
    assert abs(float(first.detach()) - T_END * grows) < CLOSED_FORM_TOL * T_END * grows
    assert abs(float(second) - T_END**2 * grows) < CLOSED_FORM_TOL * T_END**2 * grows


@pytest.mark.backend("torch")
def test_direct_mode_hessian_in_times_parameter_and_y0_matches_the_closed_form():
    import torch

    # dy/dt = -k (1 + t) y: y(t) = y0 exp(-k (t - t0 + (t^2 - t0^2) / 2)). Its time
    # dependence makes every block of the Hessian over (t, k, y0) non-zero, d2/dt_i^2 among
    # them (the rate's own change along the flow, f_t + f_y f).
    def closed_form(x):
        t, k, y0 = x[:3], x[3], x[4]
        ys = y0 * torch.exp(-k * (t - t[0] + (t**2 - t[0] ** 2) / 2))
        return torch.sum(ys**2)

    def solved(x):
        t, k, y0 = x[:3], x[3], x[4:]
        ys = odecore.odeint(
            lambda s, y, p: -p * (1 + s) * y, y0, t, params=k, adjoint="direct", **TIGHT
        )
        return torch.sum(ys**2)

    x = torch.tensor([0.2, 0.9, 1.5, K, 1.3], dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(solved, x)
    expected = torch.autograd.functional.hessian(closed_form, x)
    # The solve is accurate to rtol 1e-10 over this interval; its second derivatives in the
    # parameters, computed through the steps, to a few times that.
    np.testing.assert_allclose(hessian.numpy(), expected.numpy(), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_second_order_gradients_name_direct_mode(mode):
    import torch

    a, y_end = _growth(torch, mode)
    (first,) = torch.autograd.grad(y_end, a, create_graph=True)
    # The first derivative is still right (the backsolve to its tolerance) ...
    grows = Y0_SCALAR * math.exp(A_RATE * T_END)
    assert abs(float(first.detach()) - T_END * grows) < CLOSED_FORM_TOL * T_END * grows
    # ... and differentiating it again raises, naming the mode that can.
    with pytest.raises(NotImplementedError, match="adjoint='direct'"):
        torch.autograd.grad(first, a)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_second_order_through_backward_names_direct_mode(mode):
    import torch

    a, y_end = _growth(torch, mode)
    y_end.backward(create_graph=True)
    with pytest.raises(NotImplementedError, match="adjoint='direct'"):
        (a.grad**2).backward()


# --------------------------------------------------------------------------------------------
# A tolerance that requires grad


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.backend("torch")
def test_a_tolerance_that_requires_grad_is_refused(name):
    """The solve is not differentiated with respect to its tolerances: a tolerance tensor
    that requires grad used to solve, with two torch warnings and a gradient left empty.
    Detached, the same tensor solves y' = -k y to its closed form."""
    import torch

    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    tolerance = torch.tensor(TIGHT[name], dtype=torch.float64, requires_grad=True)
    kwargs = {**TIGHT, name: tolerance}
    with pytest.raises(TypeError, match=rf"{name} requires grad.*{name}\.detach\(\)"):
        odecore.odeint(lambda t, y: -K * y, y0, t, **kwargs)
    kwargs[name] = tolerance.detach()
    ys = odecore.odeint(lambda t, y: -K * y, y0, t, **kwargs)
    exact = y0.detach().numpy() * math.exp(-K * T_END)
    np.testing.assert_allclose(ys[-1].detach().numpy(), exact, rtol=CLOSED_FORM_TOL)


@pytest.mark.parametrize("mode", RULE_MODES)
@pytest.mark.backend("torch")
def test_adjoint_params_given_as_a_generator_get_their_gradients(mode):
    """``adjoint_params=module.parameters()`` is a generator: the argument check read it
    once, and the gradient rule found it empty (no gradient at all). Against the closed
    form of d sum(y) / dk for y' = -k y + c, y = c/k + (y0 - c/k) exp(-k t), with only k
    named."""
    import torch

    def f(t, y, p):
        return -p[0] * y + p[1]

    t = torch.tensor([0.0, 0.5, T_END], dtype=torch.float64)
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def total(k, c, adjoint_params=None):
        ys = odecore.odeint(
            f, y0, t, params=(k, c), adjoint=mode, adjoint_params=adjoint_params, **TIGHT
        )
        return ys.sum()

    k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.2, dtype=torch.float64)
    total(k, c, adjoint_params=(leaf for leaf in [k])).backward()
    a, tt, y00 = 0.2 / K, t.numpy(), y0.numpy()[:, None]
    exact = -a / K + a / K * np.exp(-K * tt) - (y00 - a) * tt * np.exp(-K * tt)
    np.testing.assert_allclose(float(k.grad), exact.sum(), rtol=CLOSED_FORM_TOL)
