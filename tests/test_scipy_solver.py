"""``method="scipy_solver"``: scipy.integrate.solve_ivp behind odecore's (and torchdiffeq's)
calling convention.

References: scipy's solve_ivp called directly (the same solver at the same tolerances must
give the same numbers, since the state reaches it unchanged as float64), torchdiffeq's own
scipy_solver, and central finite differences of tight float64 solves for the gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import odecore

SOLVERS = ["RK45", "DOP853", "Radau", "BDF", "LSODA"]
TIMES = np.array([0.0, 0.4, 1.1, 2.0])
Y0 = np.array([1.0, -0.5])


def field(t, y):
    xp = np if isinstance(y, np.ndarray) else __import__("torch")
    return xp.stack([y[1], -1.3 * y[0] - 0.2 * y[1] ** 3 + xp.sin(t)])


@pytest.mark.parametrize("solver", SOLVERS)
def test_numpy_matches_solve_ivp(solver):
    ys = odecore.odeint(
        field, Y0, TIMES, method="scipy_solver", options={"solver": solver}, rtol=1e-8, atol=1e-10
    )
    ref = solve_ivp(field, (0.0, 2.0), Y0, t_eval=TIMES, method=solver, rtol=1e-8, atol=1e-10)
    # The same solver on the same float64 numbers: identical up to the float64 conversion of t.
    np.testing.assert_allclose(ys, ref.y.T, rtol=1e-14, atol=1e-14)


def test_decreasing_times_match_solve_ivp():
    t = TIMES[::-1].copy()
    ys = odecore.odeint(field, Y0, t, method="scipy_solver", options={"solver": "DOP853"})
    ref = solve_ivp(field, (2.0, 0.0), Y0, t_eval=t, method="DOP853", rtol=1e-7, atol=1e-9)
    # Solved in s = -t inside: the same steps up to rounding of the flipped times.
    np.testing.assert_allclose(ys, ref.y.T, rtol=1e-9, atol=1e-9)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("solver", ["RK45", "BDF", "LSODA"])
def test_torch_matches_torchdiffeq_and_keeps_dtype(solver):
    torch = pytest.importorskip("torch")
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = torch.tensor(Y0, dtype=torch.float32)
    t = torch.tensor(TIMES, dtype=torch.float32)
    kwargs = {"method": "scipy_solver", "options": {"solver": solver}, "rtol": 1e-6, "atol": 1e-8}
    ours = odecore.odeint(field, y0, t, **kwargs)
    theirs = torchdiffeq.odeint(field, y0, t, **kwargs)
    assert ours.dtype == torch.float32 and ours.device == y0.device
    # Both hand scipy the same float64 state and call func in float32; they may round t or y
    # to float32 in another order, which moves the result by a few float32 units (2**-24
    # relative) on these O(1) values.
    assert float((ours - theirs).abs().max()) < 8 * 2.0**-24


@pytest.mark.backend("torch")
def test_tuple_state_matches_solve_ivp():
    torch = pytest.importorskip("torch")

    def split(t, y):
        x, v = y
        return v, -1.3 * x - 0.2 * v**3 + torch.sin(t)

    y0 = (torch.tensor([Y0[0]], dtype=torch.float64), torch.tensor([Y0[1]], dtype=torch.float64))
    x, v = odecore.odeint(split, y0, torch.tensor(TIMES), method="scipy_solver")
    ref = solve_ivp(field, (0.0, 2.0), Y0, t_eval=TIMES, method="LSODA", rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(x.numpy()[:, 0], ref.y[0], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(v.numpy()[:, 0], ref.y[1], rtol=1e-14, atol=1e-14)


def _loss(ys):
    return (ys**2).sum() + ys[-1, 0]


@pytest.mark.backend("torch")
@pytest.mark.parametrize("solver", ["DOP853", "BDF"])
def test_adjoint_gradients_match_finite_differences(solver):
    torch = pytest.importorskip("torch")

    class Field(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))

        def forward(self, t, y):
            return torch.stack([y[1], -self.k * y[0] - 0.2 * y[1] ** 3 + torch.sin(t)])

    tight = {"method": "scipy_solver", "options": {"solver": solver}, "rtol": 1e-11, "atol": 1e-13}
    func = Field(1.3)
    y0 = torch.tensor(Y0, requires_grad=True)
    t = torch.tensor(TIMES, requires_grad=True)
    _loss(odecore.odeint_adjoint(func, y0, t, **tight)).backward()

    def loss_at(k, y0_, t_):
        with torch.no_grad():
            return float(
                _loss(odecore.odeint(Field(k), torch.tensor(y0_), torch.tensor(t_), **tight))
            )

    # Central differences with step 1e-5: truncation ~1e-10, the solve's error 1e-11 / 1e-5.
    eps = 1e-5
    fd_k = (loss_at(1.3 + eps, Y0, TIMES) - loss_at(1.3 - eps, Y0, TIMES)) / (2 * eps)
    fd_y0 = [
        (loss_at(1.3, Y0 + e, TIMES) - loss_at(1.3, Y0 - e, TIMES)) / (2 * eps)
        for e in np.eye(2) * eps
    ]
    fd_t = [
        (loss_at(1.3, Y0, TIMES + e) - loss_at(1.3, Y0, TIMES - e)) / (2 * eps)
        for e in np.eye(len(TIMES)) * eps
    ]
    np.testing.assert_allclose(float(func.k.grad), fd_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y0.grad.numpy(), fd_y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.grad.numpy(), fd_t, rtol=1e-5, atol=1e-5)


def test_invalid_solver_names_the_valid_ones():
    with pytest.raises(ValueError, match="RK45, RK23, DOP853, Radau, BDF, LSODA, got 'rk4'"):
        odecore.odeint(field, Y0, TIMES, method="scipy_solver", options={"solver": "rk4"})


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match=r"\['step_size'\] not understood"):
        odecore.odeint(field, Y0, TIMES, method="scipy_solver", options={"step_size": 0.1})


def test_max_step_is_passed_on():
    sol = odecore.solve(field, Y0, TIMES, method="scipy_solver", options={"solver": "RK45"})
    short = odecore.solve(
        field, Y0, TIMES, method="scipy_solver", options={"solver": "RK45", "max_step": 0.01}
    )
    # At most 0.01 per step over [0, 2]: at least 200 steps of 6 evaluations.
    assert short.stats["nfev"] >= 6 * 200 > sol.stats["nfev"]


@pytest.mark.backend("jax")
def test_jax_is_refused():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match="the 'jax' backend cannot use it"):
        odecore.odeint(lambda t, y: -y, jnp.ones(2), jnp.linspace(0, 1, 3), method="scipy_solver")


def blow_up(t, y):
    return y**2  # y = 1 / (1 - t) from y0 = 1: infinite at t = 1


def test_failure_raises_with_scipys_message():
    with pytest.raises(odecore.SolveError, match="scipy: Required step size"):
        odecore.odeint(
            blow_up,
            np.ones(1),
            np.array([0.0, 0.5, 2.0]),
            method="scipy_solver",
            options={"solver": "RK45"},
        )
    sol = odecore.solve(
        blow_up,
        np.ones(1),
        np.array([0.0, 0.5, 2.0]),
        method="scipy_solver",
        options={"solver": "RK45"},
        throw=False,
    )
    assert sol.status == odecore.Status.DT_UNDERFLOW
    # The latest evaluation: a trial stage within one (vanishing) step of the blow-up at 1.
    assert abs(sol.t_reached - 1.0) < 1e-3
    np.testing.assert_allclose(sol.ys[1], 2.0, rtol=1e-5)  # reached: 1 / (1 - 0.5)
    assert np.isnan(sol.ys[2]).all()


@pytest.mark.backend("torch")
def test_direct_gradients_are_refused():
    torch = pytest.importorskip("torch")
    y0 = torch.tensor(Y0, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint='backsolve'"):
        odecore.odeint(field, y0, torch.tensor(TIMES), method="scipy_solver")


@pytest.mark.backend("torch")
def test_tensors_hidden_in_func_are_refused():
    """scipy's steps carry no autograd record: a tensor func captures that requires grad
    would silently get no gradient."""
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(2, 2).double()
    y0, t = torch.tensor(Y0), torch.tensor(TIMES)
    with pytest.raises(ValueError, match="require grad but are not among its parameters"):
        odecore.odeint(lambda t, y: layer(y), y0, t, method="scipy_solver")
    with torch.no_grad():
        ys = odecore.odeint(lambda t, y: layer(y), y0, t, method="scipy_solver")
    assert ys.shape == (len(TIMES), 2)


@pytest.mark.backend("torch")
def test_backward_solver_and_tolerances_are_its_own():
    """``adjoint_options`` picks the backward solve's scipy solver; a gradient of ``x(T)``
    for ``x' = -k x`` is ``d/dk x0 exp(-kT) = -T x0 exp(-kT)`` whichever solves it."""
    torch = pytest.importorskip("torch")
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0, t = torch.tensor([1.5], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    ys = odecore.odeint_adjoint(
        lambda t, y, p: -p * y,
        y0,
        t,
        params=k,
        method="scipy_solver",
        options={"solver": "DOP853"},
        rtol=1e-11,
        atol=1e-13,
        adjoint_options={"solver": "Radau"},
        adjoint_rtol=1e-10,
    )
    ys[-1, 0].backward()
    # Radau at rtol 1e-10 on an O(1) adjoint: well inside 1e-8.
    assert abs(float(k.grad) - (-2.0 * 1.5 * math.exp(-1.4))) < 1e-8
    with pytest.raises(ValueError, match="adjoint_method must be 'scipy_solver' or None"):
        odecore.odeint_adjoint(
            lambda t, y, p: -p * y, y0, t, params=k, method="scipy_solver", adjoint_method="rk4"
        )
    with pytest.raises(ValueError, match=r"adjoint_options\['solver'\] must be one of"):
        odecore.odeint_adjoint(
            lambda t, y, p: -p * y,
            y0,
            t,
            params=k,
            method="scipy_solver",
            adjoint_options={"solver": "Euler"},
        )


@pytest.mark.backend("numba")
def test_numba_is_refused():
    pytest.importorskip("numba")
    with pytest.raises(ValueError, match="the 'numba' backend cannot use it"):
        odecore.odeint(field, Y0, TIMES, method="scipy_solver", backend="numba")


def test_events_are_refused_not_ignored():
    with pytest.raises(ValueError, match="does not locate odecore events.*'dopri5'"):
        odecore.solve(field, Y0, TIMES, method="scipy_solver", event=lambda t, y: y[0] - 0.5)
