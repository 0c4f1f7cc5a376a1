"""Velocities for the continuous-normalizing-flow tests, written against the array API, with
the VJPs a backend without autodiff needs: ``vjp(t, z, params, u) -> (u^T df/dz, u^T
df/dparams)`` and ``vjp_of_vjp(t, z, params, u, w) -> (z_bar, params_bar)``, the gradient of
``sum(w * vjp(t, z, params, u)[0])``. Samples are rows of ``z``."""

from __future__ import annotations

from array_api_compat import array_namespace


class LinearFlow:
    """``f = A z`` per sample, ``params = A`` (D, D)."""

    def __call__(self, t, z, A):
        return z @ A.T

    def vjp(self, t, z, A, u):
        return u @ A, u.T @ z

    def vjp_of_vjp(self, t, z, A, u, w):
        # sum_b u_b^T A w_b does not depend on z.
        return array_namespace(z).zeros_like(z), u.T @ w


class ScalarFlow:
    """``f = a z`` with a scalar (0-d) ``a``."""

    def __call__(self, t, z, a):
        return a * z

    def vjp(self, t, z, a, u):
        return a * u, array_namespace(z).sum(u * z)

    def vjp_of_vjp(self, t, z, a, u, w):
        xp = array_namespace(z)
        return xp.zeros_like(z), xp.sum(u * w)


class TimeDecay:
    """``f = -t z``: a divergence of ``-D t``; ``t`` is 0-d, or (B,) for a per-sample solve."""

    def __call__(self, t, z):
        return -_per_sample(t, z) * z

    def vjp(self, t, z, params, u):
        return -_per_sample(t, z) * u, None


def _per_sample(t, z):
    xp = array_namespace(z)
    t = xp.asarray(t, dtype=z.dtype)
    return t if t.ndim == 0 else xp.reshape(t, (-1,) + (1,) * (z.ndim - 1))


class TanhFlow:
    """``f = tanh(z W^T + b)``, ``params = (W, b)``: nonlinear, with a Jacobian that varies
    with ``z``."""

    def __call__(self, t, z, params):
        W, b = params
        return array_namespace(z).tanh(z @ W.T + b)

    def _slope(self, z, params):
        W, b = params
        h = array_namespace(z).tanh(z @ W.T + b)
        return h, 1.0 - h * h

    def vjp(self, t, z, params, u):
        W, _ = params
        _, slope = self._slope(z, params)
        g = u * slope
        return g @ W, (g.T @ z, array_namespace(z).sum(g, axis=0))

    def vjp_of_vjp(self, t, z, params, u, w):
        # S = sum_bi u_bi s'(a_bi) (W w_b)_i with a = z W^T + b and s' = 1 - tanh^2; its
        # derivative through a uses s'' = -2 tanh s'.
        W, _ = params
        h, slope = self._slope(z, params)
        c = u * (w @ W.T)
        g = c * (-2.0 * h * slope)
        W_bar = g.T @ z + (u * slope).T @ w
        return g @ W, (W_bar, array_namespace(z).sum(g, axis=0))
