"""The public fixed-point functions: solve, differentiate, and the NumPy pullback."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from odecore import _validate
from odecore._config import resolve_backend
from odecore.backend import differentiate, tree
from odecore.deq.arguments import check_callable, check_params, cotangent, layout
from odecore.deq.mapping import Map, check_output, require_vjp
from odecore.deq.options import FixedPointOptions
from odecore.deq.rule import FixedPointRule
from odecore.deq.solution import (
    CONVERGED,
    FixedPointError,
    FixedPointSolution,
    failure_message,
)


def solve_fixed_point(
    f: Callable[..., Any],
    z0: Any,
    params: Any = None,
    *,
    batch_axis: int | None = None,
    backend: str | None = None,
    **options: Any,
) -> FixedPointSolution:
    """Find ``z* = f(z*, params)`` and report how it went, per sample.

    Parameters
    ----------
    f : callable
        ``f(z, params)``, or ``f(z)`` when ``params`` is None, returning an array shaped
        like ``z``. Inputs such as ``x`` travel in ``params``; an ``nn.Module`` carries its
        own parameters, with or without ``params``. With ``batch_axis=0`` it is called on
        the whole batch, and must treat samples independently. On NumPy,
        [`vjp_fixed_point`][odecore.vjp_fixed_point] needs its method
        ``vjp(z, params, cotangent) -> (cot_z, cot_params)``.
    z0 : array
        The starting iterate, real floating dtype.
    params : pytree of arrays, optional
        Everything ``f`` depends on that should get a gradient.
    batch_axis : None or 0, optional
        With 0, the first axis indexes independent samples, each converging on its own.
    backend : str, optional
        Overrides the configured backend.
    **options
        The solver's and the gradient's options, below (the fields of
        ``odecore.deq.FixedPointOptions``).

    Other Parameters
    ----------------
    solver : {"picard", "anderson", "broyden"}, default "anderson"
        Plain iteration (with ``damping``, default 1: ``z <- (1 - damping) z + damping
        f(z)``); Anderson mixing with memory ``m`` (default 5), regularisation ``lam``
        (default 1e-4, relative to the stored residuals' size) and mixing ``beta`` (default
        1); or Broyden's method with at most ``m`` low-rank terms in the inverse Jacobian.
    tol : float, default 1e-6
        A sample has converged once its residual, measured as ``stop_mode`` says, is at
        most ``tol``.
    stop_mode : {"abs", "rel"}, default "abs"
        The residual: ``||f(z) - z||`` (``"abs"``) or ``||f(z) - z|| / ||f(z)||``
        (``"rel"``); norms are per sample.
    max_iter : int, default 50
        At most this many iterations; samples still running then get status
        ``MAX_ITER_REACHED``.
    backward : {"implicit", "one_step", "unrolled"}, default "implicit"
        The gradient. ``"implicit"``: the implicit-function-theorem gradient, solving
        ``u = w + u J_f(z*)`` with ``backward_solver`` (``"picard"``, ``"anderson"`` (the
        default), ``"broyden"``, with the forward's ``m`` and ``lam``; or ``"gmres"``,
        restarted every ``min(4 m, 20)`` vectors) to ``backward_tol`` (relative to ``|w|``,
        per sample) within ``backward_max_iter`` (default: the forward ``tol`` and
        ``max_iter``).
        ``backward_linearization`` (default ``"once"``) says how the iterations get the
        products ``u J_f(z*)``: ``"once"`` evaluates ``f`` at ``z*`` once and pulls every
        iteration's ``u`` back through what the framework recorded (torch's graph, JAX's
        residuals), kept for the whole backward; ``"per_iteration"`` evaluates ``f`` again
        in each iteration and frees that record after the product, for when memory is
        tight, at the cost of one evaluation of ``f`` per iteration.
        ``"one_step"``: the gradient of one step ``f(z*)`` from the detached ``z*``.
        ``"unrolled"``: backpropagation through ``unroll_steps`` (default 5) steps
        ``z <- (1 - unroll_damping) z + unroll_damping f(z)`` (default 1) from the detached
        ``z*``.
    throw : bool, default True
        With True, a sample that did not converge raises
        [`FixedPointError`][odecore.FixedPointError] (on a tracing backend, only where the
        status is known: under ``jax.jit`` it is reported in ``status`` only). With False,
        the solution holds each sample's best iterate and its ``status``.
    m : int, default 5
        The memory of Anderson (stored pairs) and Broyden (low-rank terms).
    lam, beta, damping : float
        Anderson's regularisation (default 1e-4; each stored pair's weight is penalised
        relative to its own residual) and mixing (default 1); Picard's damping
        (default 1).
    backward_solver, backward_linearization, backward_tol, backward_max_iter : optional
        The implicit gradient's solver and its settings, described under ``backward``.
    unroll_steps, unroll_damping : optional
        The steps of ``backward="unrolled"`` (default 5) and their damping (default 1).

    Returns
    -------
    FixedPointSolution
        ``z`` (each sample's best iterate, differentiable on frameworks with autodiff), and per
        sample ``iterations``, residuals and ``status``; see
        [`FixedPointSolution`][odecore.FixedPointSolution].

    Raises
    ------
    TypeError
        ``f`` is not callable, ``z0`` is not a real floating array, an option is unknown or of
        the wrong type, or ``f`` returns something not shaped like ``z``.
    ValueError
        An option has a wrong value (an unknown solver, a ``tol`` that is not positive, ...)
        or would not be read (``damping`` without Picard, ``unroll_steps`` without
        ``backward="unrolled"``, ...), ``batch_axis`` is not None or 0, ``z0`` is empty or,
        without ``batch_axis``, holds NaN or inf, or, on torch, ``f`` uses a tensor that
        requires grad outside ``params``.
    FixedPointError
        With ``throw=True``, a sample did not converge within ``max_iter`` iterations, or ``f``
        returned NaN or inf.

    Notes
    -----
    On torch, ``f`` must not use a tensor that requires grad other than through ``params``
    (or, for an ``nn.Module``, its own parameters): the gradient reaches only those, so
    such a tensor raises ``ValueError`` while grad mode is on.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Affine:  # f(z) = A z + b, with the VJP NumPy needs for gradients
    ...     def __call__(self, z, params):
    ...         A, b = params
    ...         return A @ z + b
    ...     def vjp(self, z, params, u):
    ...         A, b = params
    ...         return A.T @ u, (np.outer(u, z), u)
    >>> A, b = np.array([[0.5, 0.1], [0.0, 0.3]]), np.array([1.0, 2.0])
    >>> sol = odecore.solve_fixed_point(Affine(), np.zeros(2), (A, b), tol=1e-10)
    >>> sol.success, sol.solver, sol.status.tolist()
    (True, 'anderson', [0])
    >>> bool(np.allclose(sol.z, np.linalg.solve(np.eye(2) - A, b)))
    True
    """
    opts = FixedPointOptions.from_keywords("solve_fixed_point", options)
    bk, z0, lay, leaves, fmap = _setup(f, z0, params, backend, batch_axis, opts)
    rule = FixedPointRule(bk, fmap, lay, opts)
    if differentiate.requires_grad(bk, {"params": params, "leaves": leaves}):
        z, aux = bk.autodiff.custom_vjp(rule)(z0, *leaves)
        # Eagerly the rule's own solution also collects the backward's statistics.
        solution = rule.solution if bk.eager else FixedPointSolution(z, solver=opts.solver, **aux)
        solution.z = z
        # After the solve, where f has run: a ValueError from the check is the check's own.
        _refuse_hidden_parameters(bk, fmap, z0, leaves)
    else:
        rule.forward(z0, *leaves, first_value=_first_value(bk, fmap, z0))
        solution = rule.solution
    _raise_if_failed(bk, solution, opts, lay)
    return solution


def fixed_point(f: Callable[..., Any], z0: Any, params: Any = None, **kwargs: Any) -> Any:
    """The fixed point ``z* = f(z*, params)``, differentiable on frameworks with autodiff.

    [`solve_fixed_point`][odecore.solve_fixed_point]'s ``z``. On torch and JAX its gradient with
    respect to ``params`` comes from the implicit function theorem by default
    (``backward="implicit"``): the linear system ``u = w + u J_f(z*)`` is solved in the
    backward pass, so memory does not grow with the forward iterations. ``backward="one_step"``
    and ``backward="unrolled"`` differentiate one or a few steps from the detached ``z*``
    instead. On NumPy, [`vjp_fixed_point`][odecore.vjp_fixed_point] returns the same gradient
    as a pullback.

    Parameters
    ----------
    f : callable
        ``f(z, params)``, or ``f(z)`` when ``params`` is None, returning an array shaped like
        ``z``.
    z0 : array
        The starting iterate, real floating dtype.
    params : pytree of arrays, optional
        Everything ``f`` depends on that should get a gradient.
    **kwargs
        ``batch_axis``, ``backend`` and the options of
        [`solve_fixed_point`][odecore.solve_fixed_point] (``solver``, ``tol``, ``stop_mode``,
        ``max_iter``, ``backward``, ``throw``, ...).

    Returns
    -------
    array
        Each sample's best iterate, shaped like ``z0``.

    Raises
    ------
    TypeError
        ``f`` is not callable, ``z0`` is not a real floating array, or an option is unknown or
        of the wrong type.
    ValueError
        An option has a wrong value, or, on torch, ``f`` uses a tensor that requires grad
        outside ``params``.
    FixedPointError
        A sample did not converge, unless ``throw=False``.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Affine:  # f(z) = A z + b, with the VJP NumPy needs for gradients
    ...     def __call__(self, z, params):
    ...         A, b = params
    ...         return A @ z + b
    ...     def vjp(self, z, params, u):
    ...         A, b = params
    ...         return A.T @ u, (np.outer(u, z), u)
    >>> A, b = np.array([[0.5, 0.1], [0.0, 0.3]]), np.array([1.0, 2.0])
    >>> z = odecore.fixed_point(Affine(), np.zeros(2), (A, b), tol=1e-10)
    >>> np.round(z, 6)
    array([2.571429, 2.857143])

    With torch the gradient flows through the fixed point (here ``z* = b / (1 - a)``):

    >>> import torch
    >>> a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> z = odecore.fixed_point(lambda z, a: a * z + 1.0, torch.zeros(1, dtype=torch.float64), a,
    ...                         tol=1e-12)
    >>> z.sum().backward()
    >>> round(z.item(), 6), round(a.grad.item(), 6)  # dz*/da = 1 / (1 - a)**2
    (2.0, 4.0)
    """
    return solve_fixed_point(f, z0, params, **kwargs).z


def vjp_fixed_point(
    f: Callable[..., Any],
    z0: Any,
    params: Any = None,
    *,
    batch_axis: int | None = None,
    backend: str | None = None,
    **options: Any,
) -> tuple[FixedPointSolution, Callable[[Any], Any]]:
    """Solve, and return ``(solution, pullback)``: gradients for backends without autodiff.

    The implicit gradient of [`solve_fixed_point`][odecore.solve_fixed_point], from ``f``'s own
    VJP (NumPy, Numba, CuPy).

    Parameters
    ----------
    f : callable
        ``f(z, params)`` with a method ``vjp(z, params, cotangent) -> (cot_z, cot_params)``,
        ``cot_params`` shaped like ``params``.
    z0 : array
        The starting iterate, real floating dtype.
    params : pytree of arrays, optional
        The parameters the pullback differentiates.
    batch_axis : None or 0, optional
        With 0, the first axis indexes independent samples.
    backend : str, optional
        Overrides the configured backend.
    **options
        The options of [`solve_fixed_point`][odecore.solve_fixed_point].

    Returns
    -------
    solution : FixedPointSolution
        As [`solve_fixed_point`][odecore.solve_fixed_point] returns it.
    pullback : callable
        ``pullback(z_bar) -> params_bar``, the gradient of ``sum(z_bar * z*)`` in the structure
        of ``params``; it raises ``TypeError`` for a ``z_bar`` that is not a real floating
        array of ``z``'s dtype, and ``ValueError`` for one not shaped like ``z`` or holding
        NaN or inf.

    Raises
    ------
    TypeError
        ``f`` has no ``vjp`` method on a backend without autodiff, is not callable, or an
        option is unknown or of the wrong type.
    ValueError
        An option has a wrong value.
    FixedPointError
        A sample did not converge, unless ``throw=False``.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> class Affine:  # f(z) = A z + b, with the VJP NumPy needs for gradients
    ...     def __call__(self, z, params):
    ...         A, b = params
    ...         return A @ z + b
    ...     def vjp(self, z, params, u):
    ...         A, b = params
    ...         return A.T @ u, (np.outer(u, z), u)
    >>> A, b = np.array([[0.5, 0.1], [0.0, 0.3]]), np.array([1.0, 2.0])
    >>> sol, pullback = odecore.vjp_fixed_point(Affine(), np.zeros(2), (A, b), tol=1e-12)
    >>> A_bar, b_bar = pullback(np.array([1.0, 0.0]))
    >>> bool(np.allclose(b_bar, np.linalg.solve((np.eye(2) - A).T, [1.0, 0.0])))
    True
    """

    opts = FixedPointOptions.from_keywords("vjp_fixed_point", options)
    bk, z0, lay, leaves, fmap = _setup(f, z0, params, backend, batch_axis, opts)
    require_vjp(bk, f)
    rule = FixedPointRule(bk, fmap, lay, opts)
    _, _, z_star = rule.forward(z0, *leaves)
    _raise_if_failed(bk, rule.solution, opts, lay)

    def pullback(z_bar):
        z_bar = cotangent(bk, z_bar, rule.solution.z)
        _, *leaves_bar = rule.backward(z_star, z_bar)
        return tree.unflatten_like(params, leaves_bar)

    return rule.solution, pullback


def _setup(f, z0, params, backend, batch_axis, opts):
    bk = resolve_backend(backend, {"z0": z0, "params": params}, call="fixed point")
    # As an ODE's y0: NaN in the start read as f returning NaN, and an empty z0 "converged".
    # A batch's samples are left to their own statuses, as a batched ODE solve's are.
    z0 = _validate.initial_state(bk, z0, finite=batch_axis is None, name="z0")
    check_callable(f)
    check_params(params)
    lay = layout(bk.xp, z0, batch_axis)
    leaves = differentiate.param_leaves(bk, f, params)
    return bk, z0, lay, leaves, Map(bk, f, params, leaves, lay)


def _raise_if_failed(bk, solution, opts, lay):
    """With ``throw``, a failed solve raises. Under jit (or vmap) the status has no value
    yet and nothing can raise: it stays in the solution, and a failed sample's ``z`` is NaN,
    and so is its gradient, as a failed ODE solve's outputs are. Its last iterate is not the
    fixed point, and ``fixed_point``, which returns ``z`` alone, would pass it on as one."""
    if not opts.throw:
        return
    if bk.is_traced(solution.status):
        xp = bk.xp
        z = solution.z
        converged = solution.status == CONVERGED
        if lay.batched:
            converged = xp.reshape(converged, (converged.shape[0],) + (1,) * (z.ndim - 1))
        else:
            converged = xp.all(converged)
        # A factor rather than a choice: the gradient of a failed sample is NaN too, where
        # xp.where would give it a zero one.
        solution.z = z * xp.where(converged, xp.ones_like(z), xp.full_like(z, math.nan))
    elif not solution.success:
        raise FixedPointError(failure_message(bk, solution, opts, lay.batched), solution)


_HIDDEN_GRADIENT_MESSAGE = (
    "f uses a tensor that requires grad but is not in params: the fixed point's gradient "
    "reaches only the arrays in params (and the own parameters of an nn.Module f), so "
    "that tensor would silently get no gradient. Pass it in params and "
    "read it there, as f(z, params); or detach it if it needs no gradient"
)


def _refuse_hidden_parameters(bk, fmap, z0, leaves):
    """On an eager framework with autodiff, refuse an ``f`` that uses a tensor wanting a
    gradient other than through ``leaves``. (A tracing framework's ``custom_vjp`` refuses
    such a capture itself.)"""
    if not bk.eager:
        return
    z0 = bk.stop_gradient(z0)
    time = bk.xp.zeros((), dtype=z0.dtype)  # f is seen as dynamics that ignore time
    if bk.autodiff.hidden_parameters(fmap.as_dynamics, fmap.params, leaves, time, z0):
        raise ValueError(_HIDDEN_GRADIENT_MESSAGE)


def _first_value(bk, fmap, z0):
    """``f(z0)`` in the caller's grad mode, in internal layout, for the loop to start from;
    None where nothing needs checking. It is called when nothing the rule differentiates
    wants a gradient, so a value that does (grad mode on, on an eager framework with
    autodiff) comes from a tensor ``f`` uses outside params."""
    if not (bk.has_autodiff and bk.eager):
        return None
    value = fmap.user(bk.stop_gradient(z0))
    check_output(bk, value, fmap.layout)
    if differentiate.requires_grad(bk, {"f(z0)": value}):
        raise ValueError(_HIDDEN_GRADIENT_MESSAGE)
    return fmap.layout.to_internal(bk.xp, bk.stop_gradient(value))
