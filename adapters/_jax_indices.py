"""Indices past an array's end, found before the solve runs on them.

JAX clamps an out-of-range index instead of raising: ``jnp.array([10., 28.])[2]`` is 28.0,
eagerly and under ``jit``. A Lorenz ``func`` that reads ``p[2]`` from two parameters would
solve, without a word, with ``beta = rho``. NumPy and torch raise ``IndexError`` from the
user's own line; this module makes the JAX backend do the same where it can know.

``jax.experimental.checkify`` computes, for every gather and dynamic slice of a function,
whether its index is in range. The check traces ``func`` under it and follows, through the
traced program, which of those verdicts depend on values that are not known yet (the traced
inputs of a ``jit``). A verdict that depends on none is the same for every value the solve
will see, so it is computed now, with stand-in zeros in place of the unknown values it does
not read: a static index such as ``p[2]``. Where the inputs are known (an eager call), every
index is checked at them. An index computed from traced values is left to run as JAX runs
it. Only the operations that compute the verdicts are evaluated, so a ``jax.debug.print``
or the network inside ``func`` does not run for the check.
"""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax.experimental import checkify


def check_indices(call, args: tuple, name: str) -> None:
    """Raise IndexError where ``call(*args)`` indexes past an array's end for every value of
    its traced inputs (for the given values, where they are known)."""
    message = _out_of_range(call, args)
    if message is not None:
        raise IndexError(
            f"{name} indexes past the end of an array: {message}. JAX clamps such an index "
            f"to the array's last element instead of raising, so the solve would run on "
            f"another value than the one asked for; check {name}'s indices against the "
            f"shapes of the arrays it receives"
        )


def _out_of_range(call, args: tuple) -> str | None:
    try:
        checked = checkify.checkify(call, errors=checkify.index_checks)
        closed, (error_shape, _) = jax.make_jaxpr(checked, return_shape=True)(*args)
    except Exception:  # noqa: BLE001
        # What checkify cannot trace (a primitive it does not know, a func that only runs
        # inside the solve's own trace) is left unchecked: the solve itself reports any
        # real failure of func, with func's own traceback.
        return None
    error_leaves, error_tree = jax.tree_util.tree_flatten(error_shape)
    if not error_leaves:
        return None
    jaxpr = closed.jaxpr
    inputs = jax.tree_util.tree_leaves(args)
    verdicts = jaxpr.outvars[: len(error_leaves)]
    unknown = {v for v, x in zip(jaxpr.invars, inputs, strict=True) if _is_unknown(x)}
    unknown.update(v for v, x in zip(jaxpr.constvars, closed.consts, strict=True) if _is_unknown(x))
    for eqn in jaxpr.eqns:
        # A nested program (a loop, a jit) is taken whole: any unknown input makes all of
        # its outputs unknown. That may leave a check undone; it never reports a verdict
        # that an unknown value could change.
        if any(_is_var(v) and v in unknown for v in eqn.invars):
            unknown.update(eqn.outvars)
    if any(_is_var(v) and v in unknown for v in verdicts):
        return None
    # Only the equations the verdicts need, in their order.
    needed = {v for v in verdicts if _is_var(v)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            kept.append(eqn)
            needed.update(v for v in eqn.invars if _is_var(v))
    pruned = jaxpr.replace(eqns=kept[::-1], outvars=verdicts)
    # Under the caller's jit an operation would be traced into its program instead of
    # computed; none of these reads a traced value.
    try:
        with jax.ensure_compile_time_eval():
            values = jax.core.eval_jaxpr(
                pruned, [_known(x) for x in closed.consts], *(_known(x) for x in inputs)
            )
            message = jax.tree_util.tree_unflatten(error_tree, values).get()
    except Exception:  # noqa: BLE001
        # A check that cannot be computed apart from the solve is not one to fail it on.
        return None
    return None if message is None else message.strip().rstrip(".")


def _is_unknown(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _is_var(v) -> bool:
    return not isinstance(v, jex.core.Literal)


def _known(x):
    """``x``, or zeros in its place where its value is not known (and not read)."""
    if _is_unknown(x):
        return jnp.zeros(jnp.shape(x), x.dtype)
    return x
