"""The public fixed-point functions: solve, differentiate, and the NumPy pullback."""

from __future__ import annotations

from odecore._config import resolve_backend
from odecore.backend import differentiate, tree
from odecore.deq.arguments import check_callable, check_params, float_array, layout
from odecore.deq.mapping import Map, check_output, require_vjp
from odecore.deq.options import FixedPointOptions
from odecore.deq.rule import FixedPointRule
from odecore.deq.solution import FixedPointError, FixedPointSolution, failure_message


def solve_fixed_point(
    f, z0, params=None, *, batch_axis=None, backend=None, **options
) -> FixedPointSolution:
    """Find ``z* = f(z*, params)`` and report how it went, per sample.

    Parameters
    ----------
    f : callable
        ``f(z, params)``, or ``f(z)`` when ``params`` is None (an ``nn.Module`` carries its
        own parameters), returning an array shaped like ``z``. Inputs such as ``x`` travel
        in ``params``. With ``batch_axis=0`` it is called on the whole batch, and must treat
        samples independently.
    z0 : array
        The starting iterate, real floating dtype.
    params : pytree of arrays, optional
        Everything ``f`` depends on that should get a gradient.
    batch_axis : None or 0
        With 0, the first axis indexes independent samples, each converging on its own.
    backend : str, optional
        Overrides the configured backend.
    **options
        The fields of :class:`~odecore.deq.options.FixedPointOptions`, with these defaults:

    solver : {"picard", "anderson", "broyden"}, default "anderson"
        Plain iteration (with ``damping``, default 1: ``z <- (1 - damping) z + damping
        f(z)``); Anderson mixing with memory ``m`` (default 5), regularisation ``lam``
        (default 1e-4, relative to the stored residuals' size) and mixing ``beta`` (default
        1); or Broyden's method with at most ``m`` low-rank terms in the inverse Jacobian.
    tol, stop_mode : float, {"abs", "rel"}, default 1e-6, "abs"
        A sample has converged once ``||f(z) - z||`` (``"abs"``) or
        ``||f(z) - z|| / ||f(z)||`` (``"rel"``) is at most ``tol``; norms are per sample.
    max_iter : int, default 50
        At most this many iterations; samples still running then get status
        ``MAX_ITER_REACHED``.
    backward : {"implicit", "one_step", "unrolled"}, default "implicit"
        The gradient. ``"implicit"``: the implicit-function-theorem gradient, solving
        ``u = w + u J_f(z*)`` with ``backward_solver`` (``"picard"``, ``"anderson"`` (the
        default), ``"broyden"``, with the forward's ``m`` and ``lam``; or ``"gmres"``,
        restarted every ``min(4 m, 20)`` vectors) to ``backward_tol`` within
        ``backward_max_iter`` (default: the forward ``tol`` and ``max_iter``).
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
        With True, a sample that did not converge raises :class:`~odecore.FixedPointError`
        (on a tracing backend, only where the status is known: under ``jax.jit`` it is
        reported in ``status`` only). With False, the solution holds each sample's best
        iterate and its ``status``.

    On torch, ``f`` must not use a tensor that requires grad other than through ``params``
    (or, for an ``nn.Module`` called without params, its own parameters): the gradient
    reaches only those, so such a tensor raises ``ValueError`` while grad mode is on.
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


def fixed_point(f, z0, params=None, **kwargs):
    """``z* = f(z*, params)``: :func:`solve_fixed_point`'s ``z``, differentiable on
    frameworks with autodiff. Keyword arguments are those of :func:`solve_fixed_point`; a
    solve that does not converge raises :class:`~odecore.FixedPointError` unless
    ``throw=False``."""
    return solve_fixed_point(f, z0, params, **kwargs).z


def vjp_fixed_point(f, z0, params=None, *, batch_axis=None, backend=None, **options):
    """Solve, and return ``(solution, pullback)`` with ``pullback(z_bar) -> params_bar`` (the
    structure of ``params``): gradients for backends without autodiff (NumPy).

    ``f`` supplies ``vjp(z, params, cotangent) -> (cot_z, cot_params)``. Keyword arguments
    are those of :func:`solve_fixed_point`."""

    opts = FixedPointOptions.from_keywords("vjp_fixed_point", options)
    bk, z0, lay, leaves, fmap = _setup(f, z0, params, backend, batch_axis, opts)
    require_vjp(bk, f)
    rule = FixedPointRule(bk, fmap, lay, opts)
    _, _, z_star = rule.forward(z0, *leaves)
    _raise_if_failed(bk, rule.solution, opts, lay)

    def pullback(z_bar):
        z_bar = bk.asarray(z_bar)
        if tuple(z_bar.shape) != lay.shape:
            raise ValueError(
                f"pullback expects a cotangent shaped like z {lay.shape}, got {tuple(z_bar.shape)}"
            )
        _, *leaves_bar = rule.backward(z_star, z_bar)
        return tree.unflatten_like(params, leaves_bar)

    return rule.solution, pullback


def _setup(f, z0, params, backend, batch_axis, opts):
    bk = resolve_backend(backend, {"z0": z0, "params": params})
    z0 = float_array(bk, "z0", z0)
    check_callable(f)
    check_params(params)
    lay = layout(z0, batch_axis)
    if params is not None and differentiate.param_leaves(bk, f, None):
        # The module's own parameters would silently get no gradient: the VJP differentiates
        # with respect to params only once params are given.
        raise TypeError(
            "f is a module with its own parameters and params is given too; pass everything "
            "through params (e.g. torch.func.functional_call(module, weights, (z, x)) with "
            "params=(weights, x)), or params=None with the inputs held by the module"
        )
    leaves = differentiate.param_leaves(bk, f, params)
    return bk, z0, lay, leaves, Map(bk, f, params, leaves, lay)


def _raise_if_failed(bk, solution, opts, lay):
    # Under jit the status has no value yet: it stays in the solution.
    if opts.throw and not bk.is_traced(solution.status) and not solution.success:
        raise FixedPointError(failure_message(bk, solution, opts, lay.batched), solution)


_HIDDEN_GRADIENT_MESSAGE = (
    "f uses a tensor that requires grad but is not in params: the fixed point's gradient "
    "reaches only the arrays in params (and the own parameters of an nn.Module f called "
    "without params), so that tensor would silently get no gradient. Pass it in params and "
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
