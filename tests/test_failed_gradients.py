"""Gradients of a failed solve: one policy on every backend and in every gradient mode.

A solve that fails (``throw=False``, or any failure under jit) leaves NaN in the outputs it
did not reach. A zero cotangent on such an output is ignored, so the outputs the solve did
reach get the gradients of a solve that stopped there; a nonzero one makes NaN of what that
output depends on: its sample's ``y0`` gradient, and the parameter and time gradients.

References: the closed form of ``y' = a y^2`` (``y = y0 / (1 - a y0 t)``, which blows up at
``t = 1 / (a y0)``), the same solve over the reached times alone, and central differences
of the failed solve's reached outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import odecore

A = 1.0
T = np.array([0.0, 0.5, 0.8, 2.0])
# Sample 0 blows up at t = 1 and never reaches t = 2; sample 1 decays.
Y0 = np.array([[1.0], [-0.5]])
UNREACHED = (3, 0)  # (time, sample)
# The solve fails by step-size underflow near the blow-up; every step before it is
# accurate to rtol, and the error grows with the solution's sensitivity 1 / (1 - a y0 t)^2,
# 25 at t = 0.8: 1e-6 leaves a wide margin over 25 * (steps ~ 1e3) * 1e-10.
SOLVER = {"rtol": 1e-10, "atol": 1e-10}
CLOSED_FORM_TOL = 1e-6

CASES = [
    ("numpy", "checkpoint", False),
    ("numpy", "backsolve", False),
    ("torch", "direct", False),
    ("torch", "checkpoint", False),
    ("torch", "backsolve", False),
    ("jax", "checkpoint", False),
    ("jax", "checkpoint", True),
    ("jax", "backsolve", False),
    ("jax", "backsolve", True),
]
IDS = [f"{b}-{m}" + ("-jit" if jit else "") for b, m, jit in CASES]


class Quadratic:
    """``y' = a y^2`` with ``params = (a,)``, and its VJP for NumPy."""

    def __call__(self, t, y, params):
        (a,) = params
        return a * y * y

    def vjp(self, t, y, params, cotangent):
        (a,) = params
        return 2 * a * y * cotangent, (np.asarray(np.sum(cotangent * y * y)),)


def closed_form(y0, t, a, cot):
    """``(ys, y0_bar, a_bar, t_bar)`` of ``L = sum cot * ys`` for ``y' = a y^2``, over the
    entries where ``cot`` is nonzero (the others may be past a blow-up). ``y0`` and the
    outputs are (B, 1) and (T, B, 1)."""
    s = t[:, None, None] - t[0]
    ys = y0 / (1 - a * y0 * s)
    growth = np.where(cot != 0, 1 / (1 - a * y0 * s) ** 2, 0.0)
    y0_bar = np.sum(cot * growth, axis=0)
    a_bar = np.sum(cot * np.where(cot != 0, s * ys**2, 0.0))
    rates = np.sum(cot * np.where(cot != 0, a * ys**2, 0.0), axis=(1, 2))
    # Autonomous: moving t_0 shifts the whole trajectory.
    t_bar = np.concatenate([[-rates[1:].sum()], rates[1:]])
    return ys, y0_bar, a_bar, t_bar


def gradients(backend, mode, jit, y0, t, cot, func=None, params=(A,), **kwargs):
    """``(ys, y0_bar, params_bar, t_bar)`` as NumPy arrays, for the cotangent ``cot`` on the
    outputs of a ``throw=False`` solve (``params_bar`` a list, one per parameter)."""
    kwargs = {"throw": False, **SOLVER, **kwargs}
    if backend == "numpy":
        ys, pullback = odecore.vjp_odeint(
            func or Quadratic(), y0, t, tuple(np.asarray(p) for p in params), adjoint=mode, **kwargs
        )
        y0_bar, params_bar, t_bar = pullback(cot)
        return ys, y0_bar, list(params_bar), t_bar
    if backend == "torch":
        return _torch_gradients(mode, y0, t, cot, func, params, kwargs)
    return _jax_gradients(mode, jit, y0, t, cot, func, params, kwargs)


def _torch_gradients(mode, y0, t, cot, func, params, kwargs):
    torch = pytest.importorskip("torch")
    y0_t = torch.tensor(y0, requires_grad=True)
    t_t = torch.tensor(t, requires_grad=True)
    p_t = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    sol = odecore.solve(func or _quadratic, y0_t, t_t, params=tuple(p_t), adjoint=mode, **kwargs)
    sol.ys.backward(torch.tensor(cot))
    grads = [x.grad.numpy() for x in (y0_t, *p_t, t_t)]
    return sol.ys.detach().numpy(), grads[0], grads[1:-1], grads[-1]


def _jax_gradients(mode, jit, y0, t, cot, func, params, kwargs):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):

        def run(y0, t, params, cot):
            def outputs(y0, t, params):
                return odecore.solve(
                    func or _quadratic, y0, t, params=params, adjoint=mode, **kwargs
                ).ys

            ys, pullback = jax.vjp(outputs, y0, t, params)
            return ys, *pullback(cot)

        run = jax.jit(run) if jit else run
        p_j = tuple(jnp.asarray(p, dtype=jnp.float64) for p in params)
        ys, y0_bar, t_bar, params_bar = run(jnp.asarray(y0), jnp.asarray(t), p_j, jnp.asarray(cot))
        return (
            np.asarray(ys),
            np.asarray(y0_bar),
            [np.asarray(g) for g in params_bar],
            np.asarray(t_bar),
        )


def _quadratic(t, y, params):
    return params[0] * y * y


def reached_cotangent(seed=0):
    """Unequal weights on every output of both samples, zero on the one never reached."""
    cot = np.random.default_rng(seed).uniform(0.5, 1.5, size=(len(T), *Y0.shape))
    cot[UNREACHED] = 0.0
    return cot


def relative_error(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --------------------------------------------------------------------------------------------
# A batch with one failing sample


@pytest.mark.parametrize("backend, mode, jit", CASES, ids=IDS)
def test_reached_outputs_get_their_gradients(backend, mode, jit):
    cot = reached_cotangent()
    ys, y0_bar, (a_bar,), t_bar = gradients(backend, mode, jit, Y0, T, cot, batch_axis=0)
    assert np.isnan(ys[UNREACHED]).all() and np.isfinite(ys[:3]).all()
    expected_ys, expected_y0, expected_a, expected_t = closed_form(Y0, T, A, cot)
    assert relative_error(ys[:3], expected_ys[:3]) < CLOSED_FORM_TOL
    assert relative_error(y0_bar, expected_y0) < CLOSED_FORM_TOL
    assert relative_error(a_bar, expected_a) < CLOSED_FORM_TOL
    assert relative_error(t_bar, expected_t) < CLOSED_FORM_TOL


@pytest.mark.parametrize("backend, mode, jit", CASES, ids=IDS)
def test_a_cotangent_on_an_unreached_output_poisons_its_sample(backend, mode, jit):
    cot = reached_cotangent(seed=1)
    cot[UNREACHED] = 0.5
    _, y0_bar, (a_bar,), t_bar = gradients(backend, mode, jit, Y0, T, cot, batch_axis=0)
    assert np.isnan(y0_bar[0]).all()
    assert np.isnan(a_bar).all() and np.isnan(t_bar).all()
    # The other sample is independent: its y0 gradient is that of a solve of it alone.
    _, solo, _, _ = gradients(backend, mode, jit, Y0[1], T, cot[:, 1])
    # Per-sample stepping gives sample 1 the same steps in the batch as alone, so the exact
    # modes agree to rounding; the backsolve's joint backward solve steps for both samples
    # at once, and agrees to its tolerance, amplified by the 1e3 steps at most.
    tol = 1e-6 if mode == "backsolve" else 1e-12
    assert relative_error(y0_bar[1], solo) < tol
    _, expected, _, _ = closed_form(Y0[1:], T, A, cot[:, 1:])
    assert relative_error(y0_bar[1], expected[0]) < CLOSED_FORM_TOL


# --------------------------------------------------------------------------------------------
# One sample that runs out of steps: the gradients of a solve that stopped at its last output

DECAY_T = np.array([0.0, 0.3, 0.6, 5.0])
# rk4 with steps of 0.05 reaches t = 1 in its 20 steps: outputs 0, 1 and 2, not 3.
DECAY_SOLVER = {"method": "rk4", "options": {"step_size": 0.05, "max_num_steps": 20}}
DECAY_Y0 = np.array([1.0, -2.0])
RATE = 0.7


class Decay:
    """``y' = -k y`` with ``params = (k,)``, and its VJP for NumPy."""

    def __call__(self, t, y, params):
        return -params[0] * y

    def vjp(self, t, y, params, cotangent):
        return -params[0] * cotangent, (np.asarray(-np.sum(cotangent * y)),)


def _decay(t, y, params):
    return -params[0] * y


def decay_gradients(backend, mode, jit, t, cot, y0=DECAY_Y0, rate=RATE, options=None):
    func = Decay() if backend == "numpy" else _decay
    solver = {**DECAY_SOLVER, "options": {**DECAY_SOLVER["options"], **(options or {})}}
    return gradients(backend, mode, jit, y0, t, cot, func=func, params=(rate,), **solver)


@pytest.mark.parametrize("backend, mode, jit", CASES, ids=IDS)
def test_gradients_equal_those_of_a_solve_over_the_reached_times(backend, mode, jit):
    cot = np.random.default_rng(3).standard_normal((4, 2))
    cot[3] = 0.0
    ys, y0_bar, (k_bar,), t_bar = decay_gradients(backend, mode, jit, DECAY_T, cot)
    assert np.isnan(ys[3]).all() and np.isfinite(ys[:3]).all()
    # The same steps, up to the last reached output: equal to rounding.
    _, y0_ref, (k_ref,), t_ref = decay_gradients(
        backend, mode, jit, DECAY_T[:3], cot[:3], options={"max_num_steps": 1000}
    )
    assert relative_error(y0_bar, y0_ref) < 1e-12
    assert relative_error(k_bar, k_ref) < 1e-12
    assert relative_error(t_bar[:3], t_ref) < 1e-12
    assert t_bar[3] == 0.0

    # Central differences of the failed solve's reached outputs. The step h = 1e-6 leaves a
    # truncation error ~h^2 and a rounding error ~1e-16 / h, both below 1e-9; the backsolve
    # and the flow identities behind the time gradients differ from the discrete rk4 solve
    # by its error, (0.05 * 0.7)^4 / 120 per unit time.
    def loss(y0=DECAY_Y0, k=RATE, t=DECAY_T):
        ys, _ = odecore.vjp_odeint(Decay(), y0, t, (np.asarray(k),), throw=False, **DECAY_SOLVER)
        return float(np.sum(cot[:3] * ys[:3]))

    fd_y0 = central_differences(lambda v: loss(y0=v), DECAY_Y0)
    fd_k = central_differences(lambda v: loss(k=v), np.asarray(RATE))
    fd_t = central_differences(lambda v: loss(t=np.concatenate([v, DECAY_T[3:]])), DECAY_T[:3])
    exact_tol = 1e-8 if mode != "backsolve" else 1e-7
    assert relative_error(y0_bar, fd_y0) < exact_tol
    assert relative_error(k_bar, fd_k) < exact_tol
    assert relative_error(t_bar[:3], fd_t) < 1e-7


@pytest.mark.parametrize("backend, mode, jit", CASES, ids=IDS)
def test_one_sample_poisoned_by_a_nan_cotangent(backend, mode, jit):
    # What a loss on every output, sum(ys ** 2) say, sends back: NaN on the unreached one.
    cot = np.ones((4, 2))
    cot[3] = math.nan
    _, y0_bar, (k_bar,), t_bar = decay_gradients(backend, mode, jit, DECAY_T, cot)
    assert np.isnan(y0_bar).all() and np.isnan(k_bar).all() and np.isnan(t_bar).all()


def central_differences(f, x, h=1e-6):
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


# --------------------------------------------------------------------------------------------
# A batch step rejected because it overflowed, in a solve that succeeds
#
# ``y' = -a y^3`` from y0 = 30 with a first trial step of 0.9: the trial's stages overflow
# (f ~ 1e13 after one stage, inf after two) and the step is rejected, while the other sample
# accepts it. The batch steps together, so the rejected trial is part of the recorded step.
# Zero times the infinite partial derivatives of its stages is NaN, which the shared
# parameter ``a`` collected before odecore replayed (checkpoint) or re-ran (direct) such
# samples with a zero step. Reference: ``y = y0 / sqrt(1 + 2 a y0^2 t)``.

CUBIC_Y0 = np.array([[1.0], [30.0]])
CUBIC_T = np.array([0.0, 1.0])


class Cubic:
    """``y' = -a y^3`` with ``params = (a,)``, and its VJP for NumPy."""

    def __call__(self, t, y, params):
        (a,) = params
        return -a * y * y * y

    def vjp(self, t, y, params, cotangent):
        (a,) = params
        return -3 * a * y * y * cotangent, (np.asarray(-np.sum(cotangent * y * y * y)),)


def _cubic(t, y, params):
    return -params[0] * y * y * y


# The overflow of the rejected trial is expected: NumPy warns of it in the dynamics.
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("backend, mode, jit", CASES, ids=IDS)
def test_an_overflowing_rejected_step_leaves_the_gradients_finite(backend, mode, jit):
    cot = np.zeros((2, *CUBIC_Y0.shape))
    cot[1] = 1.0
    func = Cubic() if backend == "numpy" else _cubic
    ys, y0_bar, (a_bar,), _ = gradients(
        backend,
        mode,
        jit,
        CUBIC_Y0,
        CUBIC_T,
        cot,
        func=func,
        batch_axis=0,
        options={"first_step": 0.9},
    )
    y0, t, a = CUBIC_Y0, CUBIC_T[1], A
    growth = 1.0 + 2.0 * a * y0**2 * t
    assert relative_error(ys[1], y0 / np.sqrt(growth)) < CLOSED_FORM_TOL
    assert relative_error(y0_bar, growth**-1.5) < CLOSED_FORM_TOL
    assert relative_error(a_bar, np.sum(-(y0**3) * t * growth**-1.5)) < CLOSED_FORM_TOL


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_the_cubic_batch_does_reject_an_overflowing_step():
    # What the test above relies on: the first trial of the second sample overflows (its
    # stages by dopri5's coefficients), and the solve rejects it and goes on to succeed.
    tableau = odecore.TABLEAUS["dopri5"]
    y0, h = CUBIC_Y0[1, 0], 0.9
    stages = []
    with np.errstate(over="ignore", invalid="ignore"):
        for row in tableau.a:
            y_stage = y0 + h * sum(float(c) * k for c, k in zip(row, stages, strict=False))
            stages.append(-(y_stage**3))
    assert not np.all(np.isfinite(stages))
    sol = odecore.solve(
        _cubic, CUBIC_Y0, CUBIC_T, params=(A,), batch_axis=0, options={"first_step": 0.9}
    )
    assert sol.stats["nreject"][1] >= 1 and np.all(sol.status == 0)


@pytest.mark.parametrize(
    "backend, mode, jit", CASES, ids=[f"{b}-{m}" + ("-jit" if jit else "") for b, m, jit in CASES]
)
def test_an_invalid_sample_of_a_batch_leaves_the_shared_gradient_finite(backend, mode, jit):
    """A sweep whose sample 0 has a NaN y0 (refused, status invalid) and a zero cotangent:
    it reached no output, so the others get exactly their own gradients. At its NaN state,
    the checkpoint's replay summed f's VJP, 0 * NaN, into the shared parameter's gradient,
    the time gradients f's rate, and the backsolve refused its augmented initial state.
    torch's direct mode differentiates the forward solve itself, whose first evaluations of
    f took the NaN state with the batch: 0 * NaN there too."""
    y0 = np.array([[math.nan], [-0.5]])
    cot = np.random.default_rng(3).uniform(0.5, 1.5, size=(len(T), *y0.shape))
    cot[:, 0] = 0.0
    ys, y0_bar, (a_bar,), t_bar = gradients(backend, mode, jit, y0, T, cot, batch_axis=0)
    finite_y0 = np.array([[1.0], [-0.5]])  # sample 0's value is irrelevant: its cot is zero
    ys_ref, y0_bar_ref, a_bar_ref, t_bar_ref = closed_form(finite_y0, T, A, cot)
    assert np.isnan(ys[:, 0]).all()
    assert relative_error(ys[:, 1], ys_ref[:, 1]) < CLOSED_FORM_TOL
    assert relative_error(y0_bar[1], y0_bar_ref[1]) < CLOSED_FORM_TOL
    assert relative_error(a_bar, a_bar_ref) < CLOSED_FORM_TOL
    assert relative_error(t_bar, t_bar_ref) < CLOSED_FORM_TOL
