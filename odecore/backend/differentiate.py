"""Vector-Jacobian products of the user's dynamics, on every backend.

With a framework's autodiff they come from it (``Backend.autodiff``). Without one (NumPy,
and every backend whose library does not differentiate), the dynamics bring their own
``vjp(t, y, params, cotangent) -> (cot_y, cot_params)``, with ``cot_params`` shaped like
``params``; this module is the one place that calls it.
"""

from __future__ import annotations

from typing import Any

from odecore.backend.protocol import Backend
from odecore.backend.signature import explain_signature
from odecore.backend.structured import unwrap
from odecore.backend.tree import leaves as tree_leaves


def param_leaves(bk: Backend, func, params) -> list[Any]:
    """The arrays that receive parameter gradients, in order."""
    if bk.autodiff is not None:
        # An nn.Module's parameters are found on the user's func, not on a wrapper of it.
        return bk.autodiff.param_leaves(unwrap(func), params)
    return [leaf for _, leaf in tree_leaves(params)] if params is not None else []


def distinct(values) -> tuple[Any, ...]:
    """``values`` without repeats, by identity, in order. A tensor listed twice in
    ``adjoint_params`` is one parameter; as two primals of a rule it got its gradient once
    from each, twice in all."""
    return tuple({id(x): x for x in values}.values())


def finite_stand_in(xp, unused, y):
    """``y`` with zero where ``unused`` (a mask that broadcasts against it): the state at
    which ``f``, or its VJP, is evaluated for a sample nobody reads (refused at the start,
    not reached, or sent a zero cotangent). What comes back for that sample is discarded or
    multiplied by zero, but at a NaN or infinite state it would still reach every parameter
    the batch shares, as ``0 * NaN`` in the summed gradient; at a finite state it is an
    exact zero."""
    return xp.where(unused, xp.zeros_like(y), y)


def differentiated_setting(name: str, solve: str, inputs: str, constant: str) -> ValueError:
    """The refusal of a tolerance or option that the framework differentiates: a ``solve``
    (an ODE solve, a fixed-point solve) has gradients with respect to its ``inputs`` only,
    and its checks read the setting as a number. ``constant`` says how to pass it instead.
    The ODE solve and the fixed-point solve differ only in those words."""
    return ValueError(
        f"{name} is being differentiated, and {solve} has no gradient with respect to its "
        f"tolerances or options: only {inputs} get gradients. Pass {name} as {constant}; for "
        f"a gradient with respect to a value that the function reads, pass it in params"
    )


def requires_grad(bk: Backend, values: Any) -> bool:
    return bk.autodiff is not None and bk.autodiff.requires_grad(values)


def with_leaves(bk: Backend, params: Any, leaves: list[Any]) -> Any:
    """``params`` as a rule's forward calls ``func`` with: the rule's own primals in place of
    its arrays where the backend traces the rule apart from the caller, else unchanged."""
    return params if bk.tracing is None else bk.tracing.with_leaves(params, leaves)


def linearize(bk: Backend, func, params, leaves, t, y):
    """``(func(t, y[, params]), pullback)``, ``pullback(cot) -> (cot_y, cot_leaves)``."""
    if bk.autodiff is not None:
        return bk.autodiff.linearize(func, params, leaves, t, y)
    value = call(func, t, y, params)

    def pullback(cot):
        return _user_vjp(bk, func, params, leaves, t, y, cot)

    return value, pullback


def linearize_reusable(bk: Backend, func, params, leaves, t, y):
    """``(func(t, y[, params]), pull_y, pull_all)``: pullbacks that may be called many times,
    ``pull_y(cot) -> cot_y`` and ``pull_all(cot) -> (cot_y, cot_leaves)``. With autodiff one
    evaluation serves every call (``Autodiff.linearize_reusable``); the dynamics' own ``vjp``
    is called once per pullback."""
    if bk.autodiff is not None:
        return bk.autodiff.linearize_reusable(func, params, leaves, t, y)
    value = call(func, t, y, params)

    def pull_all(cot):
        return _user_vjp(bk, func, params, leaves, t, y, cot)

    return value, lambda cot: pull_all(cot)[0], pull_all


def vjp(bk: Backend, func, params, leaves, t, y, cot, want_value=False):
    """``(value, cot_y, cot_leaves)``: ``cot`` times the Jacobians of ``func`` with respect to
    ``y`` and each of ``leaves``; ``value`` is ``func(t, y[, params])`` when ``want_value``,
    else None (without autodiff it then costs no evaluation)."""
    if bk.autodiff is not None:
        value, pullback = bk.autodiff.linearize(func, params, leaves, t, y)
        cot_y, cot_leaves = pullback(cot)
        return (value if want_value else None), cot_y, cot_leaves
    cot_y, cot_leaves = _user_vjp(bk, func, params, leaves, t, y, cot)
    return (call(func, t, y, params) if want_value else None), cot_y, cot_leaves


def call(func, t, y, params):
    return func(t, y) if params is None else func(t, y, params)


def _user_vjp(bk, func, params, leaves, t, y, cot):
    user_vjp = getattr(func, "vjp", None)
    if user_vjp is None:
        raise TypeError(
            f"gradients on the {bk.name!r} backend need the dynamics' own VJP, and "
            f"{type(unwrap(func)).__name__} has no 'vjp' method: give it "
            f"vjp(t, y, params, cotangent) -> (cot_y, cot_params), where cot_params has "
            f"the structure of params (None when there are no params); or use a backend "
            f"with autodiff (torch, jax)"
        )
    name = f"{type(unwrap(func)).__name__}.vjp"
    try:
        returned = user_vjp(t, y, params, cot)
    except TypeError as error:
        explain_signature(
            user_vjp,
            4,
            f"{name}(t, y, params, cotangent)",
            "Write vjp(t, y, params, cotangent) -> (cot_y, cot_params); params is None where "
            "the solve has none.",
            error,
        )
        raise
    # Unpacked here rather than in the call above: a vjp that forgets its return would
    # otherwise fail with "cannot unpack non-iterable NoneType object".
    if not isinstance(returned, (tuple, list)) or len(returned) != 2:
        got = type(returned).__name__
        got += f" of {len(returned)}" if isinstance(returned, (tuple, list)) else ""
        raise TypeError(
            f"{name} must return the pair (cot_y, cot_params), got {got}; return cot_params "
            f"as None where the solve has no params"
        )
    cot_y, cot_params = returned
    cot_leaves = [leaf for _, leaf in tree_leaves(cot_params)] if leaves else []
    if len(cot_leaves) != len(leaves):
        raise ValueError(
            f"{type(unwrap(func)).__name__}.vjp returned {len(cot_leaves)} parameter cotangents "
            f"for {len(leaves)} parameter arrays; return one per array in params, in the "
            f"same structure"
        )
    return cot_y, cot_leaves
