"""The divergence ``tr(df/dz)`` of the dynamics, per sample, from vector-Jacobian products.

Every quantity here comes from pullbacks ``u -> u^T J`` of ``f(t, .)`` at ``z``, where
``J = df/dz`` is the Jacobian of one sample's velocity with respect to that sample's state
(``f`` must treat the samples of a batch independently):

- exact: ``tr J = sum_i e_i^T J e_i`` over the ``D`` basis vectors, one pullback each. The rows
  ``e_i^T J`` also give ``||J||_F^2 = sum_i ||e_i^T J||^2`` exactly.
- Hutchinson (1989): ``tr J = E[eps^T J eps]`` for probes with ``E[eps eps^T] = I``
  (Rademacher or standard normal), one pullback per probe. The same pullback gives
  ``||eps^T J||^2``, an unbiased estimate of ``||J||_F^2``, at no extra cost.

With a framework's autodiff the products come from ``Autodiff.differentiable_vjp`` and, for
the exact trace, ``Autodiff.basis_products`` (the ``D`` products batched over the basis, by
VJPs or JVPs, whichever the framework does better), so the divergence can itself be
differentiated (a CNF's log-density gradient needs that). Without autodiff (NumPy, Numba)
they come from the dynamics' own ``vjp(t, z, params, u) -> (u^T J, ...)``, one call per
basis vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from odecore._config import resolve_backend
from odecore.backend import differentiate
from odecore.cnf.checks import (
    batch_state,
    check_frobenius_range,
    check_probes_for_trace,
    check_time,
    check_trace,
    check_velocity,
    check_velocity_value,
    probes,
)


def pullback(bk, f, t, z, params, differentiable=True):
    """``(f(t, z[, params]), pull)`` with ``pull(u) = u^T df/dz`` for a batch ``z``;
    ``differentiable=False`` promises that no gradient of the result will be asked for."""
    if bk.autodiff is not None:
        return bk.autodiff.differentiable_vjp(_velocity(bk, f, t, params), z, differentiable)
    user_vjp = own_method(bk, f, "vjp", "vjp(t, z, params, u) -> (u^T df/dz, u^T df/dparams)")
    value = _velocity(bk, f, t, params)(z)
    return value, lambda u: user_vjp(t, z, params, u)[0]


def _velocity(bk, f, t, params):
    """``z -> f(t, z[, params])``, its value checked at every call (a shape and a dtype to
    compare: under a tracing framework, once, when it is traced)."""

    def velocity(z):
        value = differentiate.call(f, t, z, params)
        check_velocity_value(bk, value, z)
        return value

    return velocity


def own_method(bk, f, name: str, signature: str):
    """The dynamics' own ``name`` method, which a backend without autodiff needs."""
    method = getattr(f, name, None)
    if method is None:
        raise TypeError(
            f"a continuous normalizing flow on the {bk.name!r} backend needs the dynamics' "
            f"own {name!r} method, and {type(f).__name__} has none: give it {signature}; or "
            f"use a backend with autodiff (torch, jax)"
        )
    return method


def velocity_and_trace(bk, f, t, z, params, method: str, eps, differentiable=True):
    """``(f(t, z), div, frobenius)``: the velocity and, each of shape (B,), ``tr J`` and
    ``||J||_F^2`` exactly, or their Hutchinson estimates ``eps^T J eps`` and
    ``||eps^T J||^2``. ``differentiable=False`` promises that no gradient of the results
    will be asked for."""
    if method == "exact" and bk.autodiff is not None:
        value, products = bk.autodiff.basis_products(_velocity(bk, f, t, params), z, differentiable)
        return (value, *_exact_terms(bk.xp, products, z))
    value, pull = pullback(bk, f, t, z, params, differentiable)
    return (value, *trace_terms(bk.xp, pull, z, method, eps))


def _exact_terms(xp, products, z):
    """``(tr J, ||J||_F^2)`` from the products of ``J`` with every basis vector, (D, B,
    *event_shape): rows ``e_i^T J`` or columns ``J e_i`` alike, since the trace takes their
    ``i``-th entries and the Frobenius norm every entry."""
    size = math.prod(z.shape[1:])
    products = xp.reshape(products, (size, z.shape[0], size))
    diagonal = xp.eye(size, dtype=products.dtype)[:, None, :]
    return xp.sum(products * diagonal, axis=(0, 2)), xp.sum(products * products, axis=(0, 2))


def trace_terms(xp, pull, z, method: str, eps):
    """``(div, frobenius)`` from the pullback ``pull``: one call for Hutchinson's probes
    ``eps``, one per basis vector for the exact trace."""
    batch = z.shape[0]
    if method == "hutchinson":
        row = xp.reshape(pull(eps), (batch, -1))
        flat_eps = xp.reshape(eps, (batch, -1))
        return row_dot(xp, row, flat_eps), row_dot(xp, row, row)
    size = math.prod(z.shape[1:])
    div = frobenius = xp.zeros((batch,), dtype=z.dtype)
    for i, e in enumerate(basis(xp, z)):
        row = xp.reshape(pull(e), (batch, size))
        div = div + row[:, i]
        frobenius = frobenius + row_dot(xp, row, row)
    return div, frobenius


def row_dot(xp, a, b):
    """The dot products of the rows of two (B, D) arrays. Written as a product and a sum:
    array-api-compat's ``vecdot`` on torch is a batched matrix product of (1, D) by (D, 1)
    per row, several times slower on a CNF's short rows."""
    return xp.sum(a * b, axis=-1)


def basis(xp, z):
    """The unit vectors ``e_i`` of one sample's state, each repeated over the batch."""
    size = math.prod(z.shape[1:])
    eye = xp.eye(size, dtype=z.dtype)
    for i in range(size):
        yield xp.broadcast_to(xp.reshape(eye[i], (1, *z.shape[1:])), z.shape)


def divergence(
    f: Callable[..., Any],
    t: Any,
    z: Any,
    params: Any = None,
    method: Literal["exact", "hutchinson"] = "exact",
    eps: Any = None,
    *,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """The divergence ``tr(df/dz)`` of ``f(t, z[, params])`` for each sample of ``z``.

    Parameters
    ----------
    f : callable
        The velocity, ``f(t, z)`` or ``f(t, z, params)``, returning an array shaped like
        ``z``. Samples must not interact: the Jacobian of one sample's output with respect
        to another sample's state is taken to be zero. On a backend without autodiff
        (NumPy), ``f`` brings ``vjp(t, z, params, u) -> (u^T df/dz, u^T df/dparams)``.
    t : array or float
        The time ``f`` is evaluated at.
    z : array of shape (B, *event_shape)
        The states, samples along the first axis.
    params : pytree of arrays, optional
        The velocity's parameters, passed as its third argument.
    method : {"exact", "hutchinson"}, default "exact"
        ``"exact"`` takes ``D = prod(event_shape)`` VJPs, one per basis vector;
        ``"hutchinson"`` takes one, with the probes ``eps``.
    eps : array shaped like z, optional
        For ``"hutchinson"``: one probe per sample, with ``E[eps eps^T] = I`` for an unbiased
        estimate.
    backend : str, optional
        Overrides the configured backend.

    Returns
    -------
    div : array of shape (B,)
        Exact: ``tr J``. Hutchinson: ``eps^T J eps``, an unbiased estimate of it.
    frobenius : array of shape (B,)
        Exact: ``||J||_F^2``. Hutchinson: ``||eps^T J||^2``, an unbiased estimate of it, from
        the same VJP.

    Raises
    ------
    TypeError
        ``f`` is not callable, has no ``vjp`` on a backend without autodiff, or returns no
        array of the backend or one of a dtype that is not real floating, ``z`` is not a
        real floating array, ``t`` or ``eps`` does not hold real numbers, or ``z`` is float16,
        whose range ``||J||_F^2`` outgrows once the root mean square of the entries of ``J``
        reaches ``256 / D`` (bfloat16 has float32's range).
    ValueError
        ``method`` is unknown, ``z`` has no samples along its first axis, ``f`` returns an
        array not shaped like ``z``, ``t`` is NaN or infinite, ``eps`` is missing for
        ``"hutchinson"`` (or given for ``"exact"``), or ``eps`` is not shaped like ``z`` or
        not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJP NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> div, frobenius = cnf.divergence(LinearFlow(), 0.0, x, M)
    >>> div.tolist(), bool(np.allclose(frobenius, np.sum(M**2)))  # tr M = -0.4
    ([-0.4, -0.4], True)
    """
    bk = resolve_backend(backend, {"t": t, "z": z, "params": params})
    check_velocity(f)
    # NaN in z gives NaN where it is, as any function of z does; no solve fails on it.
    z = batch_state(bk, z, "z", finite=False)
    check_time(bk, t)
    # The Frobenius term is always returned: in float16 it was inf, without a word.
    check_frobenius_range(
        bk.xp,
        z.dtype,
        math.prod(z.shape[1:]),
        "cnf.divergence cannot compute frobenius",
        "frobenius",
        "Give z in float32 or bfloat16 (float32's range), and f's parameters with it",
    )
    check_trace(method, "method")
    check_probes_for_trace(method, eps, "method")
    if eps is not None:
        eps = probes(bk, eps, z)
    _, div, frobenius = velocity_and_trace(bk, f, t, z, params, method, eps)
    return div, frobenius
