"""``odecore.vjp_odeint`` on NumPy: gradients from the dynamics' own VJP.

References: matrix exponentials and their Frechet derivatives (SciPy) for ``y' = A y``, the
closed form of exponential decay, central finite differences of odecore's own discrete
solve, and torch autograd on the same problem.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradient_cases import (
    A_LINEAR,
    B_NONLINEAR,
    W_NONLINEAR,
    Y0_LINEAR,
    Y0_NONLINEAR,
    DecayNumpy,
    LinearNumpy,
    NonlinearNumpy,
    linear_gradients,
    relative_error,
)

import odecore

ADJOINTS = ("checkpoint", "backsolve")
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
TIMES = {
    "up": np.array([0.0, 0.4, 0.9, 1.5]),
    "down": np.array([1.5, 0.6, 0.0, -0.5]),
}


def cotangents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", list(TIMES))
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_linear_system_against_matrix_exponential(adjoint, direction):
    t = TIMES[direction]
    c = cotangents((len(t), 3))
    ys, pullback = odecore.vjp_odeint(
        LinearNumpy(), Y0_LINEAR, t, (A_LINEAR,), adjoint=adjoint, **TIGHT
    )
    y0_bar, params_bar, t_bar = pullback(c)
    ys_ref, y0_ref, A_ref, t_ref = linear_gradients(A_LINEAR, Y0_LINEAR, t, c)
    assert isinstance(params_bar, tuple) and len(params_bar) == 1
    assert relative_error(ys, ys_ref) < 1e-8
    assert relative_error(y0_bar, y0_ref) < 1e-8
    assert relative_error(params_bar[0], A_ref) < 1e-8
    assert relative_error(t_bar, t_ref) < 1e-8
    assert t_bar.shape == t.shape and y0_bar.shape == Y0_LINEAR.shape


@pytest.mark.parametrize("direction", list(TIMES))
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_linear_system_batched(adjoint, direction):
    # A batch of initial states on axis 0: y0_bar per sample, A_bar and t_bar summed.
    t = TIMES[direction]
    y0 = np.stack([Y0_LINEAR, -2.0 * Y0_LINEAR[::-1], np.array([0.1, 0.0, 3.0])])
    c = cotangents((len(t), *y0.shape), seed=1)
    ys, pullback = odecore.vjp_odeint(
        LinearNumpy(), y0, t, (A_LINEAR,), adjoint=adjoint, batch_axis=0, **TIGHT
    )
    y0_bar, (A_bar,), t_bar = pullback(c)
    refs = [linear_gradients(A_LINEAR, y0[i], t, c[:, i]) for i in range(3)]
    assert relative_error(ys, np.stack([r[0] for r in refs], axis=1)) < 1e-8
    assert relative_error(y0_bar, np.stack([r[1] for r in refs])) < 1e-8
    assert relative_error(A_bar, sum(r[2] for r in refs)) < 1e-8
    assert relative_error(t_bar, sum(r[3] for r in refs)) < 1e-8


def decay_reference(y0, k, t, c):
    """``y' = -k y``: ``y_i = y0 exp(-k s_i)``, ``s_i = t_i - t_0``; gradients of
    ``sum_i c_i . y_i``."""
    s = t - t[0]
    decay = np.exp(-k * s).reshape((-1,) + (1,) * np.ndim(y0))
    ys = decay * y0
    y0_bar = np.sum(c * decay, axis=0)
    k_bar = np.sum(c * ys * -s.reshape(decay.shape))
    t_bar = np.array([np.sum(c[i] * -k * ys[i]) for i in range(len(t))])
    t_bar[0] = -t_bar[1:].sum()
    return ys, y0_bar, k_bar, t_bar


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("direction", list(TIMES))
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_exponential_decay_rate(adjoint, direction, batched):
    t = TIMES[direction]
    y0 = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.1]]) if batched else np.array([1.0, -2.0])
    k = np.asarray(0.7)
    c = cotangents((len(t), *y0.shape), seed=2)
    ys, pullback = odecore.vjp_odeint(
        DecayNumpy(), y0, t, (k,), adjoint=adjoint, batch_axis=0 if batched else None, **TIGHT
    )
    y0_bar, (k_bar,), t_bar = pullback(c)
    ys_ref, y0_ref, k_ref, t_ref = decay_reference(y0, 0.7, t, c)
    assert relative_error(ys, ys_ref) < 1e-8
    assert relative_error(y0_bar, y0_ref) < 1e-8
    assert np.shape(k_bar) == ()
    assert relative_error(k_bar, k_ref) < 1e-8
    assert relative_error(t_bar, t_ref) < 1e-8


class DecayByNumber:
    """``y' = -k y`` with ``params`` the rate itself, or ``{"k": rate}``: a Python number."""

    def __call__(self, t, y, params):
        return -self.rate(params) * y

    def vjp(self, t, y, params, cotangent):
        k_bar = np.asarray(-np.sum(cotangent * y))  # a cotangent is an array, as documented
        return -self.rate(params) * cotangent, {"k": k_bar} if isinstance(params, dict) else k_bar

    @staticmethod
    def rate(params):
        return params["k"] if isinstance(params, dict) else params


@pytest.mark.parametrize("params", [0.7, 2, {"k": 0.7}], ids=["float", "int", "dict"])
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_python_number_parameters_get_gradients(adjoint, params):
    """A rate given as a Python number, as users write ``params=0.7``: its gradient comes
    back as a 0-d array in its place (the backward had sized each parameter by its
    ``shape``, which a number lacks)."""
    t = TIMES["up"]
    y0 = np.array([1.0, -2.0])
    k = float(DecayByNumber.rate(params))
    c = cotangents((len(t), *y0.shape), seed=3)
    ys, pullback = odecore.vjp_odeint(DecayByNumber(), y0, t, params, adjoint=adjoint, **TIGHT)
    y0_bar, params_bar, _ = pullback(c)
    ys_ref, y0_ref, k_ref, _ = decay_reference(y0, k, t, c)
    k_bar = params_bar["k"] if isinstance(params, dict) else params_bar
    assert relative_error(ys, ys_ref) < 1e-8
    assert relative_error(y0_bar, y0_ref) < 1e-8
    assert np.shape(k_bar) == ()
    assert relative_error(k_bar, k_ref) < 1e-8


def test_pullback_checks_its_cotangent():
    """``ys_bar`` is the gradient with respect to real outputs: a complex one had lost its
    imaginary part with a warning per evaluation (gradients of the wrong kind), and None
    was read as an object array; an integer one is read as the numbers it holds."""
    t = TIMES["up"]
    y0 = np.array([1.0, -2.0])
    ys, pullback = odecore.vjp_odeint(DecayNumpy(), y0, t, (np.asarray(0.7),), **TIGHT)
    with pytest.raises(TypeError, match=r"^pullback expects a real cotangent.*complex128"):
        pullback(np.ones(ys.shape) * 1j)
    with pytest.raises(TypeError, match=r"^ys_bar must be an array shaped like ys, got None"):
        pullback(None)
    with pytest.raises(ValueError, match=r"^pullback expects a cotangent shaped like ys"):
        pullback(np.ones((1, 2)))
    c = np.arange(ys.size).reshape(ys.shape)
    _, y0_ref, k_ref, _ = decay_reference(y0, 0.7, t, c.astype(float))
    y0_bar, (k_bar,), _ = pullback(c)
    assert relative_error(y0_bar, y0_ref) < 1e-8
    assert relative_error(k_bar, k_ref) < 1e-8


# ---------------------------------------------------------------------------------------------
# Finite differences of odecore's own solve
# ---------------------------------------------------------------------------------------------


def nonlinear_params(W=W_NONLINEAR, b=B_NONLINEAR):
    return {"W": np.array(W, dtype=np.float64), "b": np.array(b, dtype=np.float64)}


def central_differences(loss, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (loss(x + step) - loss(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize(
    "solver",
    [
        {"method": "rk4", "options": {"step_size": 0.05}},
        {"method": "midpoint", "options": {"step_size": 0.05}},
        {"method": "euler", "options": {"step_size": 0.05}},
        {"method": "dopri5", "rtol": 1e-10, "atol": 1e-12},
    ],
    ids=["rk4", "midpoint", "euler", "dopri5"],
)
def test_checkpoint_matches_finite_differences_of_the_discrete_solve(solver):
    # The checkpoint gradient is exact for the discrete solve: even Euler with large steps
    # matches the finite differences of odecore's own solution to ~1e-8.
    t = np.array([0.0, 0.37, 0.8])
    c = cotangents((3, 2), seed=3)

    def loss(y0, params):
        ys, _ = odecore.vjp_odeint(NonlinearNumpy(), y0, t, params, **solver)
        return float(np.sum(c * ys))

    _, pullback = odecore.vjp_odeint(
        NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), adjoint="checkpoint", **solver
    )
    y0_bar, params_bar, _ = pullback(c)
    assert set(params_bar) == {"W", "b"}
    fd_y0 = central_differences(lambda y: loss(y, nonlinear_params()), Y0_NONLINEAR)
    fd_W = central_differences(lambda W: loss(Y0_NONLINEAR, nonlinear_params(W=W)), W_NONLINEAR)
    fd_b = central_differences(lambda b: loss(Y0_NONLINEAR, nonlinear_params(b=b)), B_NONLINEAR)
    # dopri5's step sizes depend (weakly) on y0 and the parameters; at 1e-10 that is ~1e-9.
    rel = 1e-8 if solver["method"] != "dopri5" else 1e-7
    assert relative_error(y0_bar, fd_y0) < rel
    assert relative_error(params_bar["W"], fd_W) < rel
    assert relative_error(params_bar["b"], fd_b) < rel


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_time_gradients_match_finite_differences(adjoint):
    t = np.array([0.0, 0.37, 0.8])
    c = cotangents((3, 2), seed=4)

    def loss(times):
        ys, _ = odecore.vjp_odeint(
            NonlinearNumpy(), Y0_NONLINEAR, times, nonlinear_params(), **TIGHT
        )
        return float(np.sum(c * ys))

    _, pullback = odecore.vjp_odeint(
        NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), adjoint=adjoint, **TIGHT
    )
    _, _, t_bar = pullback(c)
    assert relative_error(t_bar, central_differences(loss, t)) < 1e-6


def test_backsolve_agrees_with_checkpoint():
    t = np.array([0.0, 0.37, 0.8, 2.0])
    c = cotangents((4, 2), seed=5)
    results = {}
    for adjoint in ADJOINTS:
        _, pullback = odecore.vjp_odeint(
            NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), adjoint=adjoint, **TIGHT
        )
        results[adjoint] = pullback(c)
    a, b = results["checkpoint"], results["backsolve"]
    assert relative_error(b[0], a[0]) < 1e-8
    for key in ("W", "b"):
        assert relative_error(b[1][key], a[1][key]) < 1e-8
    assert relative_error(b[2], a[2]) < 1e-8


def test_adjoint_settings_reach_the_backsolve():
    t = np.array([0.0, 2.0])
    c = cotangents((2, 2), seed=6)
    _, exact = odecore.vjp_odeint(
        NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), rtol=1e-12, atol=1e-14
    )
    ref = exact(c)[0]
    errors = {}
    for name, kw in {
        "loose": {"adjoint_rtol": 1e-3, "adjoint_atol": 1e-5},
        "tight": {"adjoint_rtol": 1e-11, "adjoint_atol": 1e-13},
        "rk4": {"adjoint_method": "rk4", "adjoint_options": {"step_size": 0.01}},
    }.items():
        _, pullback = odecore.vjp_odeint(
            NonlinearNumpy(),
            Y0_NONLINEAR,
            t,
            nonlinear_params(),
            adjoint="backsolve",
            rtol=1e-11,
            atol=1e-13,
            **kw,
        )
        errors[name] = relative_error(pullback(c)[0], ref)
    assert errors["tight"] < 1e-9
    assert errors["rk4"] < 1e-8
    assert errors["tight"] < errors["loose"] < 1e-2


def test_backsolve_starts_with_the_forward_step(monkeypatch):
    """The backward solve starts with the forward solve's last proposed step, instead of
    Hairer's automatic choice, which sees the parameter adjoint at zero (error scale atol
    alone) and starts far too small. Same accuracy, fewer backward evaluations."""
    from odecore.adjoint import backsolve

    t = np.array([0.0, 0.7, 2.0])
    c = cotangents((3, 2), seed=7)
    _, exact = odecore.vjp_odeint(
        NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), rtol=1e-12, atol=1e-14
    )
    ref = exact(c)

    def backward_evaluations():
        field = NonlinearNumpy()
        calls = []
        vjp = field.vjp
        field.vjp = lambda *args: calls.append(1) or vjp(*args)
        _, pullback = odecore.vjp_odeint(
            field, Y0_NONLINEAR, t, nonlinear_params(), adjoint="backsolve", rtol=1e-8, atol=1e-8
        )
        grads = pullback(c)
        assert relative_error(grads[0], ref[0]) < 1e-6
        for key in ("W", "b"):
            assert relative_error(grads[1][key], ref[1][key]) < 1e-6
        return len(calls)

    seeded = backward_evaluations()
    monkeypatch.setattr(backsolve, "_usable_step", lambda bk, dt: None)
    automatic = backward_evaluations()
    assert seeded < automatic, (seeded, automatic)


def test_pullback_can_be_called_again():
    t = np.array([0.0, 0.5, 1.0])
    for adjoint in ADJOINTS:
        _, pullback = odecore.vjp_odeint(
            NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), adjoint=adjoint
        )
        c1, c2 = cotangents((3, 2), seed=7), cotangents((3, 2), seed=8)
        first = pullback(c1)
        pullback(c2)
        again = pullback(c1)
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1]["W"], again[1]["W"])
        np.testing.assert_array_equal(first[2], again[2])
        if adjoint == "checkpoint":
            # Linear in the cotangent (backsolve's adaptive steps depend on it).
            both = pullback(c1 + 2 * c2)
            np.testing.assert_allclose(both[0], first[0] + 2 * pullback(c2)[0], rtol=1e-12)


def test_float32_state():
    t = np.array([0.0, 0.5, 1.0])
    c = cotangents((3, 2), seed=9)
    _, ref = odecore.vjp_odeint(NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), **TIGHT)
    ref = ref(c)
    params32 = {k: v.astype(np.float32) for k, v in nonlinear_params().items()}
    ys, pullback = odecore.vjp_odeint(
        NonlinearNumpy(), Y0_NONLINEAR.astype(np.float32), t, params32, rtol=1e-6, atol=1e-8
    )
    assert ys.dtype == np.float32
    y0_bar, params_bar, _ = pullback(c.astype(np.float32))
    assert y0_bar.dtype == np.float32 and params_bar["W"].dtype == np.float32
    assert relative_error(y0_bar, ref[0]) < 1e-4
    assert relative_error(params_bar["W"], ref[1]["W"]) < 1e-4


def test_without_params():
    class Decay:
        def __call__(self, t, y):
            return -0.5 * y

        def vjp(self, t, y, params, cotangent):
            assert params is None
            return -0.5 * cotangent, None

    t = np.array([0.0, 1.0])
    for adjoint in ADJOINTS:
        _, pullback = odecore.vjp_odeint(Decay(), np.array([1.0, 2.0]), t, adjoint=adjoint)
        y0_bar, params_bar, _ = pullback(np.array([[0.0, 0.0], [1.0, 1.0]]))
        assert params_bar is None
        np.testing.assert_allclose(y0_bar, np.exp(-0.5), rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Against torch autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.backend("torch")
def test_against_torch(adjoint):
    import torch

    t = np.array([0.0, 0.37, 0.8, 1.4])
    c = cotangents((4, 2), seed=10)
    _, pullback = odecore.vjp_odeint(
        NonlinearNumpy(), Y0_NONLINEAR, t, nonlinear_params(), adjoint=adjoint, rtol=1e-8
    )
    y0_bar, params_bar, t_bar = pullback(c)

    def rhs(t, y, params):
        W, b = params
        return torch.tanh(y @ W.T) + b * torch.sin(2 * t)

    y0_t, t_t, W_t, b_t = (
        torch.tensor(x, dtype=torch.float64, requires_grad=True)
        for x in (Y0_NONLINEAR, t, W_NONLINEAR, B_NONLINEAR)
    )
    ys = odecore.odeint(rhs, y0_t, t_t, params=(W_t, b_t), adjoint=adjoint, rtol=1e-8)
    (torch.as_tensor(c) * ys).sum().backward()
    # The same algorithm on the same problem: the same steps, gradients equal to rounding.
    assert relative_error(y0_bar, y0_t.grad.numpy()) < 1e-10
    assert relative_error(params_bar["W"], W_t.grad.numpy()) < 1e-10
    assert relative_error(params_bar["b"], b_t.grad.numpy()) < 1e-10
    assert relative_error(t_bar, t_t.grad.numpy()) < 1e-10


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class NoVjp:
    def __call__(self, t, y, params):
        return -params[0] * y


class TooManyCotangents(DecayNumpy):
    def vjp(self, t, y, params, cotangent):
        cot_y, (cot_k,) = super().vjp(t, y, params, cotangent)
        return cot_y, (cot_k, np.zeros(()))


Y0 = np.array([1.0, 2.0])
T = np.array([0.0, 0.5, 1.0])
K = (np.asarray(0.7),)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_missing_vjp_is_a_type_error_naming_vjp(adjoint):
    # Raised at the latest when the pullback needs the VJP.
    with pytest.raises(TypeError, match="'vjp'") as info:
        _, pullback = odecore.vjp_odeint(NoVjp(), Y0, T, K, adjoint=adjoint)
        pullback(np.ones((3, 2)))
    assert "vjp(t, y, params, cotangent)" in str(info.value)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_wrong_number_of_parameter_cotangents(adjoint):
    _, pullback = odecore.vjp_odeint(TooManyCotangents(), Y0, T, K, adjoint=adjoint)
    with pytest.raises(ValueError, match="2 parameter cotangents for 1"):
        pullback(np.ones((3, 2)))


class VjpReturningNone(DecayNumpy):
    def vjp(self, t, y, params, cotangent):
        super().vjp(t, y, params, cotangent)  # computes the cotangents and drops them


class VjpReturningThree(DecayNumpy):
    def vjp(self, t, y, params, cotangent):
        return (*super().vjp(t, y, params, cotangent), None)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize(
    ("dynamics", "got"),
    [(VjpReturningNone(), "NoneType"), (VjpReturningThree(), "tuple of 3")],
    ids=["None", "three"],
)
def test_vjp_returning_no_pair_is_a_type_error_naming_vjp(adjoint, dynamics, got):
    # A vjp without its return used to fail with "cannot unpack non-iterable NoneType".
    _, pullback = odecore.vjp_odeint(dynamics, Y0, T, K, adjoint=adjoint)
    match = (
        rf"^{type(dynamics).__name__}\.vjp must return the pair \(cot_y, cot_params\), got {got}"
    )
    with pytest.raises(TypeError, match=match):
        pullback(np.ones((3, 2)))


@pytest.mark.parametrize("shape", [(3, 3), (2, 2), (3, 2, 1), (6,)])
def test_pullback_with_the_wrong_shape(shape):
    _, pullback = odecore.vjp_odeint(DecayNumpy(), Y0, T, K)
    with pytest.raises(ValueError, match=r"shaped like ys \(3, 2\)"):
        pullback(np.ones(shape))


def test_odeint_adjoint_on_numpy_points_to_vjp_odeint():
    for mode in ("backsolve", "checkpoint", "direct"):
        with pytest.raises(ValueError, match="vjp_odeint"):
            odecore.odeint(DecayNumpy(), Y0, T, params=K, adjoint=mode)
    with pytest.raises(ValueError, match="vjp_odeint"):
        odecore.odeint_adjoint(DecayNumpy(), Y0, T, params=K)


def test_vjp_odeint_input_errors():
    with pytest.raises(ValueError, match="'checkpoint' or 'backsolve'"):
        odecore.vjp_odeint(DecayNumpy(), Y0, T, K, adjoint="direct")
    with pytest.raises(ValueError, match="adjoint_rtol"):
        odecore.vjp_odeint(DecayNumpy(), Y0, T, K, adjoint="backsolve", adjoint_rtol=-1.0)
    with pytest.raises(ValueError, match="adjoint_atol"):
        odecore.vjp_odeint(DecayNumpy(), Y0, T, K, adjoint="backsolve", adjoint_atol=0.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        odecore.vjp_odeint(DecayNumpy(), Y0, T, K, adjiont="backsolve")
    with pytest.raises(ValueError, match="two output times"):
        odecore.vjp_odeint(DecayNumpy(), Y0, np.array([0.0]), K)
