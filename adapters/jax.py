"""The JAX backend: the core's loop on ``jax.lax.while_loop``, gradients through ``jax.custom_vjp``.

Everything here is plumbing between the core and JAX; the loop and both gradient rules are the
core's own. What differs from the eager backends:

- The loop runs on ``lax.while_loop`` and ``lax.cond``, so a solve traces once and compiles to
  one XLA loop. Tolerances, step sizes and times may be traced arrays: changing them does not
  recompile. A call outside ``jit`` runs through a ``jax.jit`` kept for its ``func`` and
  configuration (``odecore.adapters._jax_cache``): repeating it compiles nothing.
- ``direct`` mode would need reverse mode through a while loop, which JAX does not have. The
  default mode is ``backsolve``; ``checkpoint`` keeps the times of up to
  ``options["max_num_steps"]`` steps and a square root's worth of their states (see
  ``odecore.ode.tape.checkpoint_rows``).
- Under ``jit`` a failed solve cannot raise: its outputs are NaN and ``Solution.status`` says
  why. Outside ``jit`` the status is concrete and ``throw=True`` raises as on other backends.
- Without x64 (JAX's default) time is float32, the widest dtype JAX then has, and a float64
  NumPy input becomes float32: a ``PrecisionWarning`` says so, once per process.
- Integer and boolean arrays in ``params`` are constants: their cotangents are ``float0``.
- Gradients reach ``y0``, ``t`` and the floating-point arrays of ``params`` (a pytree). A
  differentiated array that ``func`` captures instead raises (or, under ``grad`` of a
  ``jit``, where the capture cannot be seen, gets a NaN gradient): the rules do not see it.
  A differentiated tolerance, step size or stop time raises too.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.interpreters import ad, batching, mlir
from odecore.adapters._jax_cache import CompiledSolves, differentiated, is_constant
from odecore.adapters._jax_indices import check_indices

from odecore.backend import Autodiff, Backend, Tracing
from odecore.backend.host import available_memory
from odecore.deq.solution import FixedPointSolution
from odecore.ode.solution import PrecisionWarning, Solution

# The backward pass runs solves of its own (backsolve); they must not attach another
# custom_vjp, which nothing would differentiate. A thread-local flag, since JAX traces on the
# calling thread.
_state = threading.local()


def _recording() -> bool:
    return not getattr(_state, "no_grad", False)


class JaxAutodiff(Autodiff):
    """JAX's reverse mode: VJPs from ``jax.vjp``, rules as one ``jax.custom_vjp``."""

    default_adjoint = "backsolve"

    def param_leaves(self, func, params) -> list[Any]:
        """The floating-point arrays of the pytree ``params``."""
        if params is None:
            return []
        return [x for x in jax.tree_util.tree_leaves(params) if _is_float_array(x)]

    def requires_grad(self, values: Any) -> bool:
        # Whether a traced value will be differentiated is not known while tracing (under
        # grad(jit(...)) the solve sees plain jit tracers), so every solve outside a backward
        # pass goes through custom_vjp; undifferentiated, that costs nothing.
        return _recording()

    def linearize(self, func, params, leaves, t, y):
        if not leaves:  # params, if any, held constant: no cotangent to compute for them
            out, pull = jax.vjp(
                lambda y_: func(t, y_) if params is None else func(t, y_, params), y
            )
            pull = _unit_batched(pull)
            return out, lambda cot: (pull(cot)[0], [])

        def call(y_, *leaves_):
            return func(t, y_, _with_leaves(params, list(leaves_)))

        out, pull = jax.vjp(call, y, *leaves)
        pull = _unit_batched(pull)

        def pullback(cot):
            cot_y, *cot_leaves = pull(cot)
            return cot_y, cot_leaves

        return out, pullback

    def linearize_reusable(self, func, params, leaves, t, y):
        # A JAX pullback is a function of the residuals it holds: it may be called again.
        # Under jit the cotangents nobody reads (the leaves', from pull_y) are dead code.
        out, pullback = self.linearize(func, params, leaves, t, y)
        return out, lambda cot: pullback(cot)[0], pullback

    def vjp(self, fn, *primals):
        # Jitted: the forward and the backward each compile to one program, instead of
        # dispatching every operation (and compiling every loop) on its own.
        return jax.vjp(jax.jit(fn), *primals)

    def jvp(self, fn, primals, tangents):
        return jax.jvp(fn, tuple(primals), tuple(tangents))

    def differentiable_vjp(self, fn, x, differentiable=True):
        # Tracing records nothing that is not used: the flag has nothing to save.
        out, pull = jax.vjp(fn, x)
        return out, lambda cotangent: pull(cotangent)[0]

    def basis_products(self, fn, x, differentiable=True):
        # Columns J e_i by forward mode, vmapped over the basis: one evaluation of fn, then
        # the D tangents together, with no residuals kept for a reverse pass.
        out, push = jax.linearize(fn, x)
        size = math.prod(x.shape[1:])
        basis = jnp.eye(size, dtype=x.dtype).reshape(size, 1, *x.shape[1:])
        return out, jax.vmap(push)(jnp.broadcast_to(basis, (size, *x.shape)))

    def differentiates(self, x):
        return differentiated(x)

    def first_order_only(self, x, message):
        return _first_order_only(x, message)

    def custom_vjp(self, rule):
        """The rule as a ``jax.custom_vjp`` function. Its forward also returns the solution's
        status and statistics, which would otherwise escape the trace of the forward.

        The rule's forward and backward close over whatever the solve was called with:
        tolerances, step sizes, the user's func and what it captures, any of which may be
        traced (``jit`` arguments). ``_closure_convert`` turns both into functions of
        explicit arrays, so that a backward run later (``grad`` of a ``jit``) never sees a
        tracer of a trace that has ended."""

        def call(*primals):
            # Checks the inputs where their values are known: inside the conversion below
            # every value is traced, and the checks would be skipped.
            rule.from_arrays(primals, None)

            def forward(*primals):
                out, aux, residuals = rule.forward(*primals)
                return (out, aux), rule.residual_arrays(residuals)

            forward_arrays, forward_consts = _closure_convert(forward, *primals)
            if any(differentiated(c) for c in forward_consts):
                raise ValueError(rule.captured_message)
            (out_shape, _), arrays_shape = jax.eval_shape(forward_arrays, *primals, *forward_consts)

            def backward(primals, arrays, out_bar, needs=None):
                with _no_grad():
                    grads = rule.backward(rule.from_arrays(primals, arrays), out_bar, needs)
                return tuple(_cotangent_like(g, p) for g, p in zip(grads, primals, strict=True))

            if forward_consts or _captures_tracers(rule.captured()):
                # Traced here, while what it captures is alive, before JAX says which primals
                # it differentiates: for every cotangent but those of a compiled eager
                # solve's arguments that its caller does not differentiate.
                needs = tuple(not is_constant(p) for p in primals)
                converted, backward_consts = _closure_convert(
                    functools.partial(backward, needs=needs),
                    primals,
                    _zeros_like_shapes(arrays_shape),
                    _zeros_like_shapes(out_shape),
                )
                backward_arrays = _ignoring_needs(converted)
            else:
                # Nothing traced is captured (the backward calls the same func with the same
                # settings as the forward), so it is traced only if it is ever needed, and
                # then for the cotangents asked for.
                backward_arrays, backward_consts = backward, []
            out, aux = _apply(
                forward_arrays, backward_arrays, primals, forward_consts, backward_consts
            )
            # The aux values have no gradient; under grad without jit their values are
            # known, and the caller gets those (a failure message can read them) rather than
            # the tracers carrying them.
            return out, jax.tree_util.tree_map(_primal, aux)

        return call


def _first_order_only(x, message):
    """``x``, through a ``custom_vjp`` whose backward raises when it is differentiated in
    turn. That happens at trace time, and inside a ``jit`` the values are tracers without
    tangents: the backward's derivative is found where JAX takes it, by an op with a JVP rule
    that raises (``_underived``), applied to the residual ``x``, whose tangent a second
    derivative makes nonzero. Its value enters the cotangent times zero (NaN masked first,
    a sample without an event), so a first derivative is unchanged."""

    @jax.custom_vjp
    def identity(x):
        return x

    def backward(x, cotangent):
        mark = _underived(x, message)
        return (cotangent + jnp.where(jnp.isnan(mark), 0.0, mark) * 0.0,)

    identity.defvjp(lambda x: (x, x), backward)
    return identity(x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _underived(x, message):
    return x


@_underived.defjvp
def _underived_jvp(message, primals, tangents):
    raise NotImplementedError(message)


class JaxTracing(Tracing):
    """Solves under ``jit``, and eager solves compiled once per func and configuration."""

    def with_leaves(self, params, leaves):
        return _with_leaves(params, leaves)

    def check_indices(self, call, args, name):
        check_indices(call, args, name)

    def tree_children(self, value):
        # One level only: the children are treated as leaves, so that the core walks them
        # itself (a child may be a tuple, a dict or another registered node).
        children, treedef = jax.tree_util.tree_flatten(value, is_leaf=lambda v: v is not value)
        if jax.tree_util.treedef_is_leaf(treedef):
            return None
        return children, treedef.unflatten

    def host_callback(self, function, *args):
        """Call ``function`` on the host with the values of ``args`` while the traced
        program runs (progress reports; nothing is returned to the program)."""
        jax.debug.callback(function, *args)

    def compiled_solve(self, solve, func, y0, t, params, arguments):
        """An eager call's solve through the ``jax.jit`` kept for its ``func`` and static
        configuration (``odecore.adapters._jax_cache``)."""
        _warn_if_downcast(y0, t, params, arguments)
        solution = _COMPILED_SOLVES.solve(BACKEND, solve, func, y0, t, params, arguments)
        if solution is not None:
            # Status and statistics have no gradient: the solution holds their known values
            # (under grad), not the tracers that carry them.
            for name in ("stats", "status", "t_reached", "ts"):
                setattr(solution, name, jax.tree_util.tree_map(_primal, getattr(solution, name)))
            if arguments.get("progress") is not None:
                # The solve reports through host callbacks as it runs; they must all have
                # run before the caller's reporter stops being the active one.
                jax.block_until_ready(solution.status)
        return solution


def _with_leaves(params, leaves):
    if params is None:
        if leaves:
            raise ValueError(_ADJOINT_PARAMS_MESSAGE)
        return None
    flat, tree = jax.tree_util.tree_flatten(params)
    slots = [i for i, x in enumerate(flat) if _is_float_array(x)]
    if len(slots) != len(leaves):
        raise ValueError(_ADJOINT_PARAMS_MESSAGE)
    flat = list(flat)
    for i, leaf in zip(slots, leaves, strict=True):
        flat[i] = leaf
    return jax.tree_util.tree_unflatten(tree, flat)


@contextlib.contextmanager
def _no_grad():
    before = getattr(_state, "no_grad", False)
    _state.no_grad = True
    try:
        yield
    finally:
        _state.no_grad = before


class JaxBackend(Backend):
    name = "jax"
    xp = jnp
    eager = False
    inplace_ok = False
    autodiff = JaxAutodiff()
    tracing = JaxTracing()

    def owns(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        _warn_if_downcast(x)
        return jnp.asarray(x, dtype=dtype)

    @property
    def time_dtype(self) -> Any:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    @property
    def int_dtype(self) -> Any:
        return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32

    def while_loop(self, cond, body, state):
        return jax.lax.while_loop(cond, body, state)

    def cond(self, pred, true_fn, false_fn, *operands):
        return jax.lax.cond(pred, true_fn, false_fn, *operands)

    def write(self, out, where, value):
        return out.at[where].set(value)

    def is_traced(self, x: Any) -> bool:
        # Under grad without jit, values carry tangents but are known.
        return isinstance(_primal(x), jax.core.Tracer)

    def float64(self):
        return jax.enable_x64(True)

    def no_grad(self):
        return _no_grad()

    def allocation_limit(self):
        # On the CPU, XLA's buffers are host memory that Linux overcommits: an allocation
        # too large succeeds and the process is killed when it is written. A GPU's
        # allocator raises RESOURCE_EXHAUSTED instead.
        return available_memory() if jax.default_backend() == "cpu" else None

    def stop_gradient(self, x: Any) -> Any:
        return jax.lax.stop_gradient(x)

    random_sources = (
        "a JAX key (key=...), a numpy.random.Generator (generator=...), or an int seed (seed=...)"
    )

    def random_normal(self, source, shape, dtype, like):
        if isinstance(source, jax.Array) and (
            jnp.issubdtype(source.dtype, jax.dtypes.prng_key)
            or (source.dtype == jnp.uint32 and source.shape == (2,))
        ):
            return jax.random.normal(source, shape, dtype)
        return super().random_normal(source, shape, dtype, like)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _apply(forward, backward, primals, forward_consts, backward_consts):
    return forward(*primals, *forward_consts)[0]


@jax.tree_util.register_static
class _Perturbed(tuple):
    """Which of the primals are differentiated (``CustomVJPPrimal.perturbed``): static data,
    carried among the residuals from the forward rule to the backward."""


def _apply_fwd(forward, backward, primals, forward_consts, backward_consts):
    # With symbolic_zeros every argument arrives as a CustomVJPPrimal: its value, and
    # whether it is differentiated at all. A failed solve's gradients follow the rule's own
    # policy (odecore.adjoint.failed.FailedOutputs).
    needs = tuple(any(p.perturbed for p in jax.tree_util.tree_leaves(x)) for x in primals)
    consts = jax.tree_util.tree_leaves((forward_consts, backward_consts))
    perturbed = _Perturbed((*needs, *(c.perturbed for c in consts)))
    primals, forward_consts, backward_consts = custom_vjp_primal_tree_values(
        (primals, forward_consts, backward_consts)
    )
    outputs, arrays = forward(*primals, *forward_consts)
    return outputs, ((primals, arrays, forward_consts, backward_consts), perturbed)


def _apply_bwd(forward, backward, saved, cotangents):
    (primals, arrays, forward_consts, backward_consts), perturbed = saved
    # Under vmap, a residual the batch does not vary (an unbatched parameter) can come back
    # as a typed Python scalar rather than an array; the rule reads shapes.
    primals, arrays = jax.tree_util.tree_map(_as_array, (primals, arrays))
    needs = perturbed[: len(primals)]
    out_bar = cotangents[0]
    if isinstance(out_bar, SymbolicZero) or not any(needs):
        # Only the status or statistics reached the loss, or nothing asks for a cotangent.
        grads = tuple(_cotangent_like(None, p) for p in primals)
    else:
        grads = backward(primals, arrays, out_bar, needs, *backward_consts)
        grads = tuple(_forward_differentiable(g) for g in grads)
    # The rule has no gradient for what func captures or the options hold: NaN, so that
    # differentiating one of them later (grad of a jit) cannot pass for a zero gradient.
    # Values nothing differentiates get a symbolic zero (None); integer and boolean values
    # have none.
    consts = jax.tree_util.tree_leaves((forward_consts, backward_consts))
    unknown = [
        _unknown_cotangent(c) if p else None
        for c, p in zip(consts, perturbed[len(primals) :], strict=True)
    ]
    unknown = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure((forward_consts, backward_consts)), unknown
    )
    return (grads, *unknown)


REVERSE_OVER_REVERSE = (
    "a reverse-mode derivative of an odecore gradient (jax.grad of jax.grad, or jax.jacrev "
    "or jax.vjp of one) is not available on JAX: the gradient runs loops (lax.while_loop) "
    "whose length depends on the solution, and JAX's reverse mode cannot differentiate "
    "them. Take second derivatives forward over reverse, with jax.hessian(loss) or "
    "jax.jacfwd(jax.grad(loss)): JAX's forward mode does run through those loops"
)


def _refuse_transpose(cotangent, x):
    raise NotImplementedError(REVERSE_OVER_REVERSE)


# The gradient's outputs pass through this identity. Being linear, forward mode (the jacfwd
# of jax.hessian) carries their tangents through it unchanged. Reverse mode transposes the
# gradient's program from its outputs back, so it meets this transpose before any of the
# loops and raises in odecore's words, not JAX's about lax.while_loop.
_reverse_refused = jex.core.Primitive("odecore_reverse_refused")
_reverse_refused.def_impl(lambda x: x)
_reverse_refused.def_abstract_eval(lambda x: x)
ad.deflinear2(_reverse_refused, _refuse_transpose)
batching.primitive_batchers[_reverse_refused] = lambda args, dims: (
    _reverse_refused.bind(*args),
    dims[0],
)
mlir.register_lowering(_reverse_refused, mlir.lower_fun(lambda x: x, multiple_results=False))


def _forward_differentiable(grad):
    """A gradient that reverse mode refuses to differentiate in odecore's words."""
    if grad is None or not jnp.issubdtype(grad.dtype, jnp.inexact):
        return grad
    return _reverse_refused.bind(grad)


def _as_array(x):
    if isinstance(x, (int, float, complex)) and hasattr(x, "dtype"):
        return jnp.asarray(x, dtype=x.dtype)
    return x


def _unknown_cotangent(value):
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return np.zeros(value.shape, dtype=jax.dtypes.float0)
    return jnp.full_like(value, jnp.nan)


def _ignoring_needs(backward):
    """A backward converted for every cotangent, called as one that is told which are
    needed: ``backward(primals, arrays, out_bar, needs, *consts)``."""

    def call(primals, arrays, out_bar, needs, *consts):
        return backward(primals, arrays, out_bar, *consts)

    return call


# symbolic_zeros: the forward rule learns which primals are differentiated, and the backward
# skips the cotangents nobody asked for (a time gradient's evaluations, a parameter adjoint).
_apply.defvjp(_apply_fwd, _apply_bwd, symbolic_zeros=True)


_COMPILED_SOLVES = CompiledSolves()
_downcast_warned = False


def _warn_if_downcast(*values) -> None:
    """Warn, once per process, when a float64 NumPy array among ``values`` is about to become
    float32 because JAX's x64 mode is off: JAX converts it without a word, and a solve asked
    for float64 accuracy would silently get float32's."""
    global _downcast_warned
    if _downcast_warned or jax.config.jax_enable_x64:
        return
    for value in jax.tree_util.tree_leaves(values):
        if isinstance(value, (np.ndarray, np.generic)) and value.dtype == np.float64:
            _downcast_warned = True
            warnings.warn(_DOWNCAST_MESSAGE, PrecisionWarning, stacklevel=2)
            return


_DOWNCAST_MESSAGE = (
    "odecore: float64 NumPy input becomes float32 on the 'jax' backend, since JAX's x64 mode "
    "is off; to solve in float64, enable it at startup with "
    'jax.config.update("jax_enable_x64", True), or pass float32 arrays to solve in float32 '
    "without this warning"
)


def _unit_batched(pull):
    """``pull`` run under ``vmap`` over a batch of one, on the CPU.

    A dense layer's weight cotangent is a contraction over the batch axis of two row-major
    arrays (``delta^T x``). XLA:CPU hands that transposed contraction to a generic
    multi-threaded kernel, which for small outputs costs more than the rest of the VJP.
    Under ``vmap`` the same cotangent reaches XLA with an explicit transpose and an ordinary
    matrix product, which it runs on its fast path (docs/performance.md has the timings).
    Other platforms are left as they are: nothing was measured there.

    A pullback that cannot be batched (a ``pure_callback`` without a ``vmap_method`` in a
    custom VJP, say) runs as it is; a genuine error in it then surfaces from that call."""
    if jax.default_backend() != "cpu":
        return pull

    def batched(cot):
        try:
            out = jax.vmap(pull)(cot[None])
        except Exception:
            return pull(cot)
        return jax.tree_util.tree_map(lambda g: g[0], out)

    return batched


def _closure_convert(fn, *args):
    """``(converted, hoisted)``: ``fn`` as a function of ``args`` and of every tracer it
    captures, ``converted(*args, *hoisted) == fn(*args)``; captured concrete arrays stay
    constants.

    ``jax.closure_convert`` hoists only the captured values that may carry a tangent, so an
    integer array traced by an enclosing ``jit`` stays inside, stale once that trace ends
    (``grad`` of a ``jit`` traces the backward later). Its cache also keeps every function
    it converted, and with it the user's ``func`` and what that captures."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    consts = closed.consts
    hoist = [isinstance(c, jax.core.Tracer) for c in consts]
    out_tree = jax.tree_util.tree_structure(out_shape)
    n_args = len(args)

    def converted(*args_and_hoisted):
        given = iter(args_and_hoisted[n_args:])
        values = [next(given) if h else c for c, h in zip(consts, hoist, strict=True)]
        flat_args = jax.tree_util.tree_leaves(args_and_hoisted[:n_args])
        out = jax.core.eval_jaxpr(closed.jaxpr, values, *flat_args)
        return jax.tree_util.tree_unflatten(out_tree, out)

    return converted, [c for c, h in zip(consts, hoist, strict=True) if h]


def _captures_tracers(value) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(value))


def _zeros_like_shapes(shapes):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


_ADJOINT_PARAMS_MESSAGE = (
    "on the 'jax' backend gradients reach the floating-point arrays of params (a pytree), "
    "passed to func as func(t, y, params); adjoint_params cannot name other arrays. Put "
    "every array to differentiate into params"
)


def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


def _primal(x):
    while differentiated(x):
        x = x.primal
    return x


def _cotangent_like(g, primal):
    """A cotangent as JAX requires it: the primal's shape and dtype; ``float0`` zeros for an
    integer primal (integer times)."""
    if not jnp.issubdtype(primal.dtype, jnp.inexact):
        return np.zeros(primal.shape, dtype=jax.dtypes.float0)
    if g is None:
        return jnp.zeros_like(primal)
    return jnp.asarray(g, dtype=primal.dtype).reshape(primal.shape)


def _flatten_solution(sol: Solution):
    children = (sol.ts, sol.ys, sol.stats, sol.status, sol.t_reached, sol.events)
    return children, sol.method


def _unflatten_solution(method, children):
    ts, ys, stats, status, t_reached, events = children
    return Solution(ts, ys, stats, status, t_reached, method, events)


def _flatten_fixed_point(sol: FixedPointSolution):
    children = (sol.z, sol.iterations, sol.abs_residual, sol.rel_residual, sol.status, sol.trace)
    return (*children, sol.stats), sol.solver


def _unflatten_fixed_point(solver, children):
    *arrays, stats = children
    return FixedPointSolution(*arrays, solver=solver, stats=stats)


# So that a jitted function can return a whole Solution or FixedPointSolution (status and
# statistics included).
jax.tree_util.register_pytree_node(Solution, _flatten_solution, _unflatten_solution)
jax.tree_util.register_pytree_node(FixedPointSolution, _flatten_fixed_point, _unflatten_fixed_point)

BACKEND = JaxBackend()
