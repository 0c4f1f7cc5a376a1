"""Diagnostics of a fixed-point map: its Jacobian's size and spectral radius at a point."""

from __future__ import annotations

from odecore._config import resolve_backend
from odecore.backend import differentiate
from odecore.deq.arguments import check_callable, check_params, float_array, layout, like_z
from odecore.deq.mapping import Map, check_output, require_vjp
from odecore.deq.options import integer
from odecore.deq.residual import norm


def jacobian_frobenius(f, z, params=None, *, probe, batch_axis=None, backend=None):
    """A Hutchinson estimate of ``||J_f(z)||_F^2`` per sample, differentiable with respect
    to ``params`` on frameworks with autodiff, to add to the loss: ``|J_f(z) probe|^2`` with
    one Jacobian-vector product. ``probe`` (shaped like ``z``) is drawn by the caller, with
    zero mean and identity covariance (Gaussian or Rademacher), so the estimate is unbiased.
    Returns shape ``(B,)`` with ``batch_axis=0``, else a 0-d array."""
    bk = resolve_backend(backend, {"z": z, "params": params, "probe": probe})
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
    lay = layout(z, batch_axis)

    def fz(z_):
        out = f(z_) if params is None else f(z_, params)
        check_output(bk, out, lay)
        return out

    _, tangent = bk.autodiff.jvp(fz, (bk.stop_gradient(z),), (probe,))
    sq = xp.sum(lay.to_internal(xp, tangent * tangent), axis=-1)
    return sq if lay.batched else sq[0]


def spectral_radius(f, z, params=None, *, iterations=20, start=None, batch_axis=None, backend=None):
    """An estimate of the spectral radius of ``J_f(z)`` per sample, by power iteration with
    VJPs (``u <- u J / |u J|``): below one near ``z*`` means the plain iteration contracts
    there. ``start`` (shaped like ``z``) is the first vector, ones by default. Returns shape
    ``(B,)`` with ``batch_axis=0``, else a 0-d array. The estimate is the growth of the
    dominant singular direction under repeated application, exact for a dominant real
    eigenvalue."""
    bk = resolve_backend(backend, {"z": z, "params": params, "start": start})
    xp = bk.xp
    check_callable(f)
    check_params(params)
    z = float_array(bk, "z", z)
    iterations = integer("iterations", iterations)
    lay = layout(z, batch_axis)
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
        estimate = xp.zeros((lay.batch,), dtype=z_int.dtype)
        for _ in range(iterations):
            v = fmap.vjp(z_int, u)[0]
            estimate = norm(xp, v)
            u = v / (estimate + tiny)[:, None]
    return estimate if lay.batched else estimate[0]
