"""Diagnostics of a fixed-point map: its Jacobian's size and spectral radius at a point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from odecore._config import resolve_backend
from odecore.backend import differentiate
from odecore.deq.arguments import check_callable, check_params, float_array, layout, like_z
from odecore.deq.mapping import Map, check_output, require_vjp
from odecore.deq.options import integer
from odecore.deq.residual import norm


def jacobian_frobenius(
    f: Callable[..., Any],
    z: Any,
    params: Any = None,
    *,
    probe: Any,
    batch_axis: int | None = None,
    backend: str | None = None,
) -> Any:
    """A Hutchinson estimate of ``||J_f(z)||_F^2`` per sample, to add to a training loss.

    ``|J_f(z) probe|^2``, with one Jacobian-vector product, differentiable with respect to
    ``params`` on frameworks with autodiff. ``probe`` is drawn by the caller, with zero mean and
    identity covariance (Gaussian or Rademacher), so the estimate is unbiased.

    Parameters
    ----------
    f : callable
        ``f(z, params)``, or ``f(z)`` when ``params`` is None.
    z : array
        Where the Jacobian is taken, real floating dtype.
    params : pytree of arrays, optional
        The parameters of ``f``.
    probe : array
        Shaped like ``z``, of its dtype.
    batch_axis : None or 0, optional
        With 0, the first axis indexes independent samples.
    backend : str, optional
        Overrides the configured backend.

    Returns
    -------
    array
        Shape ``(B,)`` with ``batch_axis=0``, else a 0-d array.

    Raises
    ------
    TypeError
        The backend has no autodiff (NumPy), ``f`` is not callable, or ``probe`` does not have
        ``z``'s dtype.
    ValueError
        ``probe`` is not shaped like ``z``, or ``f`` returns a different shape.

    Examples
    --------
    For ``f(z) = A z`` the Jacobian is ``A``; the basis vectors as probes give its columns'
    squared norms, which sum to ``||A||_F^2 = 0.35``:

    >>> import torch
    >>> import odecore
    >>> A = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    >>> z = torch.zeros(2, 2, dtype=torch.float64)
    >>> estimate = odecore.jacobian_frobenius(lambda z, A: z @ A.T, z, A,
    ...                                       probe=torch.eye(2, dtype=torch.float64), batch_axis=0)
    >>> [round(v, 6) for v in estimate.tolist()], round(estimate.sum().item(), 6)
    ([0.25, 0.1], 0.35)
    """
    bk = resolve_backend(backend, {"z": z, "params": params, "probe": probe}, call="diagnostic")
    if not bk.has_autodiff:
        raise TypeError(
            f"jacobian_frobenius is a training penalty and needs autodiff to differentiate "
            f"it; the {bk.name!r} backend has none: use torch"
        )
    xp = bk.xp
    check_callable(f)
    check_params(params)
    z = float_array(bk, "z", z)
    probe = like_z(bk, "probe", probe, z)
    lay = layout(bk.xp, z, batch_axis)

    def fz(z_):
        out = f(z_) if params is None else f(z_, params)
        check_output(bk, out, lay)
        return out

    _, tangent = bk.autodiff.jvp(fz, (bk.stop_gradient(z),), (probe,))
    sq = xp.sum(lay.to_internal(xp, tangent * tangent), axis=-1)
    return sq if lay.batched else sq[0]


def spectral_radius(
    f: Callable[..., Any],
    z: Any,
    params: Any = None,
    *,
    iterations: int = 20,
    start: Any = None,
    batch_axis: int | None = None,
    backend: str | None = None,
) -> Any:
    """An estimate of the spectral radius of ``J_f(z)`` per sample, by power iteration with VJPs.

    ``u <- u J / |u J|``: below one near ``z*`` means the plain iteration contracts there.
    The last two products also give the quadratic ``lambda^2 = a lambda + b`` that best
    relates them (least squares in the plane of ``u``, ``u J``): where its roots are a
    complex pair, the estimate is their modulus ``sqrt(-b)``, since a dominant complex pair
    makes the iterates turn in that plane without settling; elsewhere it is the growth
    ``|u J^2| / |u J|``, which converges to a dominant real eigenvalue's magnitude.

    A diagnostic to read, not a penalty to train with: the estimate carries no gradient on
    any backend (a torch tensor that does not require grad; zero under ``jax.grad``), even
    where ``z`` or ``params`` do. For a differentiable measure of the Jacobian's size, add
    [`jacobian_frobenius`][odecore.jacobian_frobenius] to the loss; odecore has no
    differentiable spectral radius.

    Parameters
    ----------
    f : callable
        ``f(z, params)``, or ``f(z)`` when ``params`` is None; on a backend without autodiff,
        with a method ``vjp(z, params, cotangent) -> (cot_z, cot_params)``.
    z : array
        Where the Jacobian is taken, real floating dtype.
    params : pytree of arrays, optional
        The parameters of ``f``.
    iterations : int, default 20
        Products with the Jacobian (VJPs); the error shrinks as ``(|lambda_3| /
        |lambda_1|)^iterations`` when the two largest are a complex pair, and as
        ``(|lambda_2| / |lambda_1|)^iterations`` otherwise.
    start : array, optional
        The first vector, shaped like ``z``; ones by default.
    batch_axis : None or 0, optional
        With 0, the first axis indexes independent samples.
    backend : str, optional
        Overrides the configured backend.

    Returns
    -------
    array
        Shape ``(B,)`` with ``batch_axis=0``, else a 0-d array; without a gradient.

    Raises
    ------
    TypeError
        ``f`` is not callable, has no ``vjp`` on a backend without autodiff, or ``iterations``
        is not an integer.
    ValueError
        ``start`` is zero in a sample, ``iterations`` is below 1, or ``start`` is not shaped
        like ``z``.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Affine:  # f(z) = A z + b, with its VJP
    ...     def __call__(self, z, params):
    ...         A, b = params
    ...         return A @ z + b
    ...     def vjp(self, z, params, u):
    ...         A, b = params
    ...         return A.T @ u, (np.outer(u, z), u)
    >>> A, b = np.array([[0.5, 0.1], [0.0, 0.3]]), np.array([1.0, 2.0])
    >>> # the eigenvalues of A are 0.5 and 0.3
    >>> round(float(odecore.spectral_radius(Affine(), np.zeros(2), (A, b))), 4)
    0.5
    """
    bk = resolve_backend(backend, {"z": z, "params": params, "start": start}, call="diagnostic")
    xp = bk.xp
    check_callable(f)
    check_params(params)
    z = float_array(bk, "z", z)
    iterations = integer("iterations", iterations)
    lay = layout(bk.xp, z, batch_axis)
    require_vjp(bk, f)
    fmap = Map(bk, f, params, differentiate.param_leaves(bk, f, params), lay)
    z_int = lay.to_internal(xp, bk.stop_gradient(z))
    if start is None:
        u = xp.ones_like(z_int)
    else:
        u = lay.to_internal(xp, like_z(bk, "start", start, z))
    tiny = xp.finfo(z_int.dtype).tiny
    with bk.no_grad():
        fmap(z_int)  # checks what f returns before its VJP is asked for
        start_norm = norm(xp, u)
        if not bk.is_traced(start_norm) and not bool(xp.all(start_norm > 0)):
            raise ValueError(
                "start must be nonzero in every sample: power iteration from zero stays at zero"
            )
        u = u / (start_norm + tiny)[:, None]
        # The loop and the two products after it make ``iterations`` VJPs in all.
        for _ in range(max(iterations - 2, 0)):
            v = fmap.vjp(z_int, u)[0]
            u = v / (norm(xp, v) + tiny)[:, None]
        v = fmap.vjp(z_int, u)[0]
        growth = norm(xp, v)
        if iterations == 1:
            estimate = growth
        else:
            y = v / (growth + tiny)[:, None]
            w = fmap.vjp(z_int, y)[0]
            estimate = _radius_in_plane(xp, u, y, growth, w)
    # JAX traces through no_grad, and would differentiate the truncated power iteration: an
    # estimate's derivative that is not that of the spectral radius, and not zero as on torch.
    estimate = bk.stop_gradient(estimate)
    return estimate if lay.batched else estimate[0]


def _radius_in_plane(xp, x, y, c, w):
    """Per sample, from unit ``x``, ``y = x J / c`` with ``c = |x J|``, and ``w = y J``:
    the modulus of the complex pair of ``lambda^2 = alpha lambda + beta`` where the
    quadratic's roots are complex and the plane of ``x`` and ``y`` is well determined,
    else ``|w|``, the power iteration's growth.

    In a plane that ``J`` maps to itself, ``x J^2 = alpha x J + beta x``, i.e. ``w = alpha y
    + (beta / c) x``; ``alpha`` and ``beta / c`` are fitted by least squares. Nearly parallel
    ``x`` and ``y`` (a converged real eigenvector) determine no plane: the fit would divide
    by the vanishing determinant of their Gram matrix."""

    def dot(p, q):
        return xp.sum(p * q, axis=1)

    xx, yy, xy, wx, wy = dot(x, x), dot(y, y), dot(x, y), dot(w, x), dot(w, y)
    det = xx * yy - xy * xy
    # Below sqrt(eps) of the dtype, the determinant's cancellation leaves too few digits.
    eps = xp.finfo(x.dtype).eps
    planar = det > (eps**0.5) * xx * yy
    det = xp.where(planar, det, xp.ones_like(det))
    alpha = (wy * xx - wx * xy) / det
    beta = c * (yy * wx - xy * wy) / det
    pair = planar & (alpha * alpha + 4 * beta < 0)
    return xp.where(pair, xp.sqrt(xp.abs(beta)), norm(xp, w))
