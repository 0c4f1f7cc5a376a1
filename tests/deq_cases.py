"""Fixed-point maps shared by the DEQ tests, each with a hand-written VJP for NumPy.

Maps take a batch ``z`` of shape (B, N) (or a single (N,) sample) and ``params``.
"""

from __future__ import annotations

import functools

import numpy as np

COS_FIXED_POINT = 0.7390851332151607  # the Dottie number, z = cos z

RNG = np.random.default_rng(5)
N = 4
# A contraction: spectral norm 0.6, so Picard converges at rate 0.6 on the affine map and
# the tanh map alike.
_W = RNG.standard_normal((N, N))
W = 0.6 * _W / np.linalg.norm(_W, 2)
B_VEC = RNG.standard_normal(N)
U = RNG.standard_normal((N, 3)) * 0.5
X = RNG.standard_normal((3, 3))  # three samples of a 3-feature input
Z0 = np.zeros((3, N))


class Affine:
    """``z = z W^T + b``: ``z* = (I - W)^{-1} b``."""

    def __call__(self, z, params):
        W, b = params
        return z @ W.T + b

    def vjp(self, z, params, cot):
        W, b = params
        batched = cot.ndim == 2
        cot_W = (cot.T @ z) if batched else np.outer(cot, z)
        # b is either one vector for the whole batch or one row per sample.
        cot_b = cot.sum(axis=0) if batched and b.ndim == 1 else cot
        return cot @ W, (cot_W, cot_b)


class Tanh:
    """``z = tanh(z W^T + x U^T + b)``, with the input ``x`` carried in params."""

    def __call__(self, z, params):
        W, U, b, x = params
        return np.tanh(z @ W.T + x @ U.T + b)

    def vjp(self, z, params, cot):
        W, U, b, x = params
        c = cot * (1.0 - self(z, params) ** 2)
        return c @ W, (c.T @ z, c.T @ x, c.sum(axis=0), c @ U)


class CosPlusB:
    """``z = cos z + b``: ``dz*/db = 1 / (1 + sin z*)``."""

    def __call__(self, z, params):
        (b,) = params
        return np.cos(z) + b

    def vjp(self, z, params, cot):
        # b has z's shape (one sample), so its cotangent is the cotangent itself.
        return -np.sin(z) * cot, (cot,)


def tanh_params():
    return (W, U, B_VEC, X)


def reference_fixed_point(f, z0, params, iterations=2000):
    """Plain iteration to machine precision: the reference the solvers are held to."""
    z = np.asarray(z0, dtype=np.float64)
    for _ in range(iterations):
        z = f(z, params)
    return z


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def tanh_loss_weights():
    return np.random.default_rng(1).standard_normal((3, 4))


def _fd(fn, arrays, h=1e-6):
    """Central differences of the scalar ``fn(arrays)`` with respect to every array."""
    grads = []
    for k, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [x.copy() for x in arrays]
            minus = [x.copy() for x in arrays]
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (fn(plus) - fn(minus)) / (2 * h)
        grads.append(g)
    return grads


@functools.cache
def implicit_fd_gradient():
    c = tanh_loss_weights()

    def loss(ps):
        return float(np.sum(c * reference_fixed_point(Tanh(), Z0, tuple(ps), 200)))

    return _fd(loss, list(tanh_params()))


@functools.cache
def unrolled_fd_gradient(k, d):
    """Finite differences of ``k`` damped steps from the converged, held-fixed ``z*``."""
    c = tanh_loss_weights()
    z_star = reference_fixed_point(Tanh(), Z0, tanh_params())

    def loss(ps):
        z = z_star
        for _ in range(k):
            z = (1 - d) * z + d * Tanh()(z, tuple(ps))
        return float(np.sum(c * z))

    return _fd(loss, list(tanh_params()))
