"""Shared problems and reference gradients for the gradient tests (NumPy and SciPy only).

Nothing here imports a framework: the torch tests build their own modules, and use these
closed forms and solver settings.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

import odecore

MODES = ("direct", "backsolve", "checkpoint")

# The methods whose gradients are checked in every CI run; the rest run under -m slow.
CI_METHODS = ("dopri5", "tsit5", "dopri8", "rk4", "bosh3")

# Solver settings under which a finite difference of the solve (eps 1e-6) matches the
# analytic gradient to gradcheck's atol 1e-5. Adaptive methods: tolerances tight enough that
# the step-size dependence (ignored by direct/checkpoint) and the continuous-vs-discrete gap
# (backsolve) stay far below 1e-5, loose enough that low orders do not take thousands of
# steps. Fixed-step methods: steps small enough that the O(h^p) gap between the flow
# identities used for time gradients (and the continuous adjoint) and the discrete solve is
# below 1e-5.
GRADCHECK_SETTINGS: dict[str, dict] = {
    "dopri5": {"rtol": 1e-10, "atol": 1e-12},
    "tsit5": {"rtol": 1e-10, "atol": 1e-12},
    "dopri8": {"rtol": 1e-10, "atol": 1e-12},
    "bosh3": {"rtol": 1e-7, "atol": 1e-9},
    "fehlberg2": {"rtol": 1e-7, "atol": 1e-9},
    "adaptive_heun": {"rtol": 1e-5, "atol": 1e-7},
    "rk4": {"options": {"step_size": 0.05}},
    "heun3": {"options": {"step_size": 0.05}},
    "midpoint": {"options": {"step_size": 0.005}},
    "heun2": {"options": {"step_size": 0.005}},
    # First order: the time gradient f(t_i, y_i) and the continuous adjoint differ from the
    # discrete Euler solve by O(h), so only the exact gradients (y0 and parameters, direct
    # and checkpoint) are gradchecked; test_time_gradients_converge_at_method_order covers
    # the rest.
    "euler": {"options": {"step_size": 0.05}},
}
EXACT_ONLY = {"euler"}

assert set(GRADCHECK_SETTINGS) == set(odecore.METHODS), "a method without gradcheck settings"


def settings(method: str) -> dict:
    """Solve keyword arguments (method included) for a gradcheck of ``method``."""
    return {"method": method, **GRADCHECK_SETTINGS[method]}


# --------------------------------------------------------------------------------------------
# Closed forms


A_LINEAR = np.array(
    [
        [-0.3, 1.0, 0.2],
        [-1.0, -0.2, 0.1],
        [0.3, 0.0, -0.5],
    ]
)
Y0_LINEAR = np.array([1.0, -0.5, 0.3])


def linear_solution(A, y0, dt):
    """``y(t0 + dt)`` for ``y' = A y``."""
    return scipy.linalg.expm(A * dt) @ y0


def linear_gradients(A, y0, times, cotangents):
    """Gradients of ``L = sum_i c_i . y(t_i)`` for ``y' = A y``, ``y(t_0) = y0``.

    ``y(t_i) = expm(A s_i) y0`` with ``s_i = t_i - t_0``; ``dL/dy0 = sum_i expm(A s_i)^T c_i``
    and, by the adjoint of the Frechet derivative (``L(X, .)^* = L(X^T, .)``),
    ``dL/dA = sum_i s_i L(A^T s_i, c_i y0^T)``. Time: ``dL/dt_i = c_i . A y(t_i)`` for
    ``i >= 1`` and ``dL/dt_0 = -sum_{i>=1} dL/dt_i`` (the flow is autonomous; ``c_0`` pairs
    with ``y0`` itself, which does not move with ``t_0``).
    Returns ``(ys, y0_bar, A_bar, t_bar)``.
    """
    times = np.asarray(times, dtype=np.float64)
    ys, y0_bar, A_bar = [], np.zeros_like(y0), np.zeros_like(A)
    t_bar = np.zeros_like(times)
    for i, (t, c) in enumerate(zip(times, cotangents, strict=True)):
        s = t - times[0]
        E = scipy.linalg.expm(A * s)
        y = E @ y0
        ys.append(y)
        y0_bar += E.T @ c
        if i > 0:
            _, frechet = scipy.linalg.expm_frechet((A * s).T, np.outer(c, y0))
            A_bar += s * frechet
            t_bar[i] = c @ (A @ y)
    t_bar[0] = -t_bar[1:].sum()
    return np.stack(ys), y0_bar, A_bar, t_bar


# --------------------------------------------------------------------------------------------
# NumPy dynamics with their own VJPs


class LinearNumpy:
    """``y' = A y`` with ``params = (A,)``; ``y`` is (n,) or, batched on axis 0, (B, n)."""

    def __call__(self, t, y, params):
        (A,) = params
        return y @ A.T

    def vjp(self, t, y, params, cotangent):
        (A,) = params
        # y (.., n) -> y A^T: d/dA of sum(cot * y A^T) = cot^T y summed over the batch.
        return cotangent @ A, (_outer_sum(cotangent, y),)


class DecayNumpy:
    """``y' = -k y`` with a scalar rate, ``params = (k,)``."""

    def __call__(self, t, y, params):
        (k,) = params
        return -k * y

    def vjp(self, t, y, params, cotangent):
        (k,) = params
        return -k * cotangent, (np.asarray(-np.sum(cotangent * y)),)


class NonlinearNumpy:
    """``y' = tanh(y W^T) + b sin(2 t)``: nonlinear and non-autonomous. ``params = {"W": W,
    "b": b}`` (a dict, so that the structure of ``params_bar`` is checked too)."""

    def __call__(self, t, y, params):
        W, b = params["W"], params["b"]
        t = np.asarray(t)
        s = np.sin(2 * t)[..., None] if t.ndim else np.sin(2 * t)
        return np.tanh(y @ W.T) + b * s

    def vjp(self, t, y, params, cotangent):
        W = params["W"]
        t = np.asarray(t)
        s = np.sin(2 * t)[..., None] if t.ndim else np.sin(2 * t)
        u = cotangent * (1.0 - np.tanh(y @ W.T) ** 2)
        cot_y = u @ W
        cot_W = _outer_sum(u, y)
        cot_b = np.sum(cotangent * s, axis=tuple(range(cotangent.ndim - 1)))
        return cot_y, {"W": cot_W, "b": cot_b}


def _outer_sum(u, v):
    """``sum_batch outer(u, v)`` for (n,) or (B, n) arrays."""
    n = u.shape[-1]
    return np.reshape(u, (-1, n)).T @ np.reshape(v, (-1, n))


W_NONLINEAR = np.array([[-0.5, 1.0], [-1.0, -0.3]])
B_NONLINEAR = np.array([0.1, -0.2])
Y0_NONLINEAR = np.array([0.3, -0.4])


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    return float(np.max(np.abs(actual - expected))) / scale
