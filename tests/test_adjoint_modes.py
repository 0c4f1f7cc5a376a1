"""The gradient modes as objects: odecore.Direct(), odecore.Backsolve(...),
odecore.Checkpoint(), checked when made, and the same as their names and keywords."""

from __future__ import annotations

import math

import numpy as np
import pytest

import odecore

RATE = 1.3
Y0 = np.array([1.0, 2.0])


def _gradient(adjoint, **kwargs):
    """d/da of sum(y(1)) for y' = -a y on torch: the closed form is -sum(y0) e^{-a}."""
    torch = pytest.importorskip("torch")
    a = torch.tensor(RATE, dtype=torch.float64, requires_grad=True)
    ys = odecore.odeint(
        lambda t, y, a: -a * y,
        torch.tensor(Y0),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        params=a,
        rtol=1e-10,
        atol=1e-12,
        adjoint=adjoint,
        **kwargs,
    )
    (g,) = torch.autograd.grad(ys[-1].sum(), a)
    return g.item()


EXACT = -Y0.sum() * math.exp(-RATE)


@pytest.mark.parametrize(
    ("mode", "name", "keywords"),
    [
        (odecore.Direct(), "direct", {}),
        (odecore.Checkpoint(), "checkpoint", {}),
        (odecore.Backsolve(), "backsolve", {}),
        (
            odecore.Backsolve(rtol=1e-11, atol=1e-13, method="dopri8", seminorm=True),
            "backsolve",
            {
                "adjoint_rtol": 1e-11,
                "adjoint_atol": 1e-13,
                "adjoint_method": "dopri8",
                "adjoint_options": {"norm": "seminorm"},
            },
        ),
    ],
    ids=["direct", "checkpoint", "backsolve", "backsolve-settings"],
)
def test_a_mode_object_is_its_name_and_keywords(mode, name, keywords):
    got = _gradient(mode)
    assert got == _gradient(name, **keywords)
    # rtol 1e-10 on a smooth problem: the global error stays within a few hundred tolerances.
    assert got == pytest.approx(EXACT, rel=1e-7)


def test_backsolve_settings_reach_the_backward_solve():
    """A loose backward tolerance must make the gradient less accurate than a tight one."""
    loose = abs(_gradient(odecore.Backsolve(rtol=1e-3, atol=1e-5)) - EXACT)
    tight = abs(_gradient(odecore.Backsolve(rtol=1e-11, atol=1e-13)) - EXACT)
    assert tight < 1e-8 < loose


def test_mode_objects_on_numpy_through_vjp_odeint():
    class Decay:
        def __call__(self, t, y, a):
            return -a * y

        def vjp(self, t, y, a, cot):
            return -a * cot, -np.sum(cot * y)

    for mode in (odecore.Checkpoint(), odecore.Backsolve(rtol=1e-11, atol=1e-13)):
        ys, pullback = odecore.vjp_odeint(
            Decay(), Y0, np.array([0.0, 1.0]), np.array(RATE), adjoint=mode, rtol=1e-10, atol=1e-12
        )
        _, a_bar, _ = pullback(np.stack([np.zeros(2), np.ones(2)]))
        assert float(a_bar) == pytest.approx(EXACT, rel=1e-7), mode
    with pytest.raises(ValueError, match="'checkpoint' or 'backsolve'"):
        odecore.vjp_odeint(
            Decay(), Y0, np.array([0.0, 1.0]), np.array(RATE), adjoint=odecore.Direct()
        )


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"rtol": -1e-6}, ValueError, r"Backsolve\(rtol=...\) must be non-negative and fin"),
        ({"atol": math.nan}, ValueError, r"Backsolve\(atol=...\) must be positive and finite"),
        ({"rtol": "1e-6"}, TypeError, r"Backsolve\(rtol=...\) must be a positive number"),
        ({"method": "rk45"}, ValueError, r"unknown method 'rk45'; valid methods are"),
        ({"options": [("norm", "max")]}, TypeError, r"options=...\) must be a dict"),
        ({"seminorm": 1}, TypeError, r"seminorm=...\) must be True or False"),
        ({"seminorm": True, "options": {"norm": "max"}}, ValueError, "pass one of them"),
    ],
)
def test_backsolve_checks_its_settings_when_made(settings, error, match):
    with pytest.raises(error, match=match):
        odecore.Backsolve(**settings)


def test_backsolve_options_are_checked_with_the_solve():
    # Option names depend on the method, so they are checked where the method is known.
    with pytest.raises(ValueError, match="stepsize"):
        _gradient(odecore.Backsolve(options={"stepsize": 0.1}))


@pytest.mark.parametrize("mode", [odecore.Backsolve(), odecore.Checkpoint(), odecore.Direct()])
def test_a_mode_object_with_adjoint_keywords_is_ambiguous(mode):
    with pytest.raises(ValueError, match="adjoint_rtol and adjoint=.* both configure"):
        _gradient(mode, adjoint_rtol=1e-6)


def test_mode_objects_are_values():
    assert odecore.Backsolve(rtol=1e-6) == odecore.Backsolve(rtol=1e-6)
    assert odecore.Checkpoint() == odecore.Checkpoint()
    with pytest.raises(AttributeError):
        odecore.Backsolve().rtol = 1.0


class _Decay:
    def __call__(self, t, y, a):
        return -a * y

    def vjp(self, t, y, a, cotangent):
        return -a * cotangent, -(cotangent * y).sum()


def test_linear_outputs_between_fixed_steps_get_their_own_gradient(backend):
    # rk4 at h = 0.4 with an output at t = 0.25, inside the first step, interpolated
    # linearly: y(0.25) = y0 (1 - theta + theta R(-a h)), theta = 0.25 / h, with R the
    # stability polynomial of any four-stage fourth-order method. checkpoint sent the
    # output's cotangent through the cubic interpolant instead (24% off in a).
    a, h, theta = 1.3, 0.4, 0.625
    z = -a * h
    R = 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
    dR = 1 + z + z**2 / 2 + z**3 / 6  # dR/dz
    ys, pullback = odecore.vjp_odeint(
        _Decay(),
        backend.asarray(Y0),
        backend.asarray([0.0, 0.25, 0.8]),
        params=backend.asarray(a),
        method="rk4",
        options={"step_size": h, "interp": "linear"},
        adjoint="checkpoint",
    )
    out = 1 - theta + theta * R
    np.testing.assert_allclose(backend.to_numpy(ys[1]), Y0 * out, rtol=1e-14)
    cotangent = np.zeros((3, 2))
    cotangent[1] = 1.0
    y0_bar, a_bar, t_bar = (backend.to_numpy(g) for g in pullback(backend.asarray(cotangent)))
    np.testing.assert_allclose(y0_bar, [out, out], rtol=1e-14)
    np.testing.assert_allclose(a_bar, Y0.sum() * theta * dR * -h, rtol=1e-13)
    # An output time's gradient is f there (the flow's, not the discrete step's).
    np.testing.assert_allclose(t_bar[1], -a * Y0.sum() * out, rtol=1e-13)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_a_nan_cotangent_gives_nan_gradients(backend, mode):
    # A NaN loss sends NaN cotangents into the solve. Checkpoint's gradients are NaN, as
    # IEEE arithmetic makes them; the backsolve started its backward solve from the NaN
    # adjoint and raised that "y0 contains NaN or infinite values", naming an input the
    # caller never gave.
    ys, pullback = odecore.vjp_odeint(
        _Decay(),
        backend.asarray(Y0),
        backend.asarray([0.0, 0.5, 1.0]),
        params=backend.asarray(RATE),
        rtol=1e-10,
        atol=1e-12,
        adjoint=mode,
    )
    cotangent = np.zeros((3, 2))
    cotangent[1, 0] = math.nan
    y0_bar, a_bar, _ = (backend.to_numpy(g) for g in pullback(backend.asarray(cotangent)))
    assert np.isnan(y0_bar[0]) and np.isnan(a_bar)


def test_backsolve_gradients_beside_a_sample_with_a_nan_y0(backend):
    # throw=False solves the other samples of a batch whose sample 1 has a NaN y0 (status
    # INVALID_INPUT); a loss that leaves that sample out gets the others' gradients, the
    # cotangent of its unreached outputs (zero) being dropped. The backsolve held the sample
    # at its NaN y0 in the joint backward solve, whose state was then not finite: NaN
    # gradients for every sample and the parameter.
    if backend.name not in ("torch", "jax"):
        pytest.skip("the backsolve through the framework's autodiff")
    starts = [2.0, math.nan, 1.0]

    def loss(y0, a):
        sol = odecore.solve(
            lambda t, y, a: -a * y,
            y0,
            backend.asarray([0.0, 1.0]),
            params=a,
            batch_axis=0,
            throw=False,
            rtol=1e-10,
            atol=1e-12,
            adjoint="backsolve",
        )
        last = sol.ys[-1, :, 0]
        return backend.xp.sum(backend.xp.where(backend.xp.isnan(last), 0.0, last))

    if backend.name == "torch":
        import torch

        y0 = torch.tensor(starts, dtype=torch.float64)[:, None].requires_grad_(True)
        a = torch.tensor(RATE, dtype=torch.float64, requires_grad=True)
        y0_bar, a_bar = (g.numpy() for g in torch.autograd.grad(loss(y0, a), (y0, a)))
    else:
        import jax

        grads = jax.grad(loss, argnums=(0, 1))(backend.asarray(starts)[:, None], RATE)
        y0_bar, a_bar = (np.asarray(g) for g in grads)
    # y(1) = y0 e^{-a}: d/dy0 = e^{-a} for the solved samples, 0 for the invalid one, and
    # d/da = -(2 + 1) e^{-a}; the backsolve's error is that of its tolerances.
    decay = math.exp(-RATE)
    np.testing.assert_allclose(y0_bar[:, 0], [decay, 0.0, decay], atol=1e-8)
    np.testing.assert_allclose(a_bar, -3.0 * decay, atol=1e-8)
