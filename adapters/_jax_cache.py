"""Compiled eager solves for the JAX backend: one ``jax.jit`` per dynamics and configuration.

An eager call (no input traced) would otherwise trace the whole solve, compile its loops and
keep what it traced, at every call. Instead it runs through a ``jax.jit`` kept for its
``func`` and static configuration, as jitted libraries do; its run-time values are the
jitted function's arguments, so new values of the same shapes and dtypes reuse the compiled
program:

- arguments: ``y0``, ``t``, the arrays among ``params``, the tolerances, the step sizes
  (``step_size``, ``first_step``, ``min_step``, ``max_step``) and ``step_t`` / ``jump_t``;
- static, part of the key: ``func`` (held weakly: a dead ``func`` frees its entry), the
  structure of ``params`` and its other leaves, the method, the other options,
  ``batch_axis``, the gradient mode and the backsolve's settings. Shapes, dtypes and JAX's
  own configuration (x64) are ``jax.jit``'s part of the key.

``func`` is traced once per entry: what it captures is a constant of the compiled program,
and a new ``func`` object (a lambda or a bound method made at every call) compiles anew. A
``func`` that captures traced values is never kept: it is made anew for every call anyway,
and the solve that traces everything (the uncached path) reports what it cannot
differentiate.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import numbers
import threading
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_RUNTIME_OPTIONS = ("step_size", "first_step", "min_step", "max_step", "step_t", "jump_t")
# Entries per func, least recently used dropped first: a configuration that changes at every
# call (a new norm function, say) must not grow memory without bound.
_ENTRIES_PER_FUNC = 16


class CompiledSolves:
    """The compiled solves of every live ``func``, keyed by identity."""

    def __init__(self):
        # id(func) -> (weak reference to func, {static key: compiled solve}, least recent first)
        self._by_func: dict[int, tuple[weakref.ref, collections.OrderedDict]] = {}
        # Set while a compiled solve runs the solve inside it, which must not come back here:
        # its inputs are traced, except under jax.disable_jit.
        self._running = threading.local()

    def solve(self, backend, solve: Callable, func, y0, t, params, arguments: dict):
        """The solution of one eager call from its compiled solve, or None where the call is
        traced or cannot be kept (see the module's docstring)."""
        if getattr(self._running, "value", False):
            return None
        call = _split(backend, y0, t, params, arguments)
        if call is None:
            return None
        key, values, config = call
        found = self._entries(func, values, config)
        if found is None:
            return None
        func_ref, entries = found
        if key not in entries:
            entries[key] = _compile(backend, self._inside(solve), func_ref, config)
            if len(entries) > _ENTRIES_PER_FUNC:
                entries.popitem(last=False)
        entries.move_to_end(key)
        return entries[key](*values)

    def _inside(self, solve: Callable) -> Callable:
        def marked(*args, **kwargs):
            self._running.value = True
            try:
                return solve(*args, **kwargs)
            finally:
                self._running.value = False

        return marked

    def _entries(self, func, values, config):
        found = self._by_func.get(id(func))
        if found is not None and found[0]() is func:
            return found
        if _captures_tracers(func, values, config):
            return None
        try:
            ref = weakref.ref(func, functools.partial(self._forget, id(func)))
        except TypeError:  # a callable that cannot be referenced weakly is not kept
            return None
        self._by_func[id(func)] = found = (ref, collections.OrderedDict())
        return found

    def _forget(self, func_id: int, ref: weakref.ref) -> None:
        found = self._by_func.get(func_id)
        if found is not None and found[0] is ref:
            del self._by_func[func_id]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_value(x) -> bool:
    """A run-time value: an array, or a real number (not a bool)."""
    return _is_array(x) or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def _is_parameter_value(x) -> bool:
    """A leaf of ``params`` the compiled solve takes as an argument: an array, or a Python
    float. A float in the key compiled the solve anew for every value of a parameter sweep
    (a second each); as an argument it is a weakly typed 0-d array, promoting as the float
    did. Ints and bools stay in the key: they may size or steer f's Python code."""
    return _is_array(x) or type(x) is float


def _split(backend, y0, t, params, arguments):
    """``(key, values, config)``: the static key, the jitted function's arguments, and the
    static configuration it is built from; None when an input is traced, or the
    configuration cannot be a key (unhashable), or the call gains nothing from compiling
    (a single output time)."""
    options = arguments["options"]
    if arguments["adjoint_params"] is not None or not isinstance(options, (dict, type(None))):
        return None
    leaves, treedef = jax.tree_util.tree_flatten(params)
    runtime = {
        k: _runtime_value(v)
        for k, v in (options or {}).items()
        if k in _RUNTIME_OPTIONS and _is_runtime_value(v)
    }
    tolerances = [arguments[k] for k in ("rtol", "atol")]
    if not all(_is_value(tol) for tol in tolerances):
        return None
    arrays = [_as_array(x) for x in leaves if _is_parameter_value(x)]
    # A structured y0 (a tuple or dict of arrays) is a pytree of the jitted function's
    # arguments like any other.
    values = (jax.tree_util.tree_map(_as_array, y0), _as_array(t), arrays, *tolerances, runtime)
    # Which inputs this call differentiates (JAX's JVP tracers, seen before the jit); the
    # compiled solve's backward then leaves the others' cotangents out. Counted on the
    # converted inputs, which the jitted function receives: a list y0 or t is one array there.
    flags = tuple(differentiated(x) for x in jax.tree_util.tree_leaves(values[:3]))
    if any(differentiated(x) for x in jax.tree_util.tree_leaves(values[3:])):
        # A differentiated tolerance or stop time: inside the jit it would be a plain
        # argument, given a NaN cotangent; the uncached path sees it and refuses it.
        return None
    if any(backend.is_traced(x) for x in jax.tree_util.tree_leaves(values)):
        return None
    if values[1].ndim != 1 or values[1].shape[0] < 2:
        return None
    settings = {k: v for k, v in arguments.items() if k not in ("rtol", "atol", "options")}
    static_options = None
    if options is not None:
        static_options = {k: v for k, v in options.items() if k not in runtime}
    config = {
        "treedef": treedef,
        "static_leaves": tuple(None if _is_parameter_value(x) else x for x in leaves),
        "options": static_options,
        "settings": settings,
        "differentiated": flags,
    }
    key = (
        flags,
        treedef,
        _typed(config["static_leaves"]),
        _typed(static_options),
        tuple(sorted(runtime)),
        _typed(settings),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key, values, config


def _is_runtime_value(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_value(v) for v in value)
    return _is_value(value)


def _runtime_value(value):
    """A run-time option as a jitted function's argument: stop times given as a list become
    an array, as the solve would make them; numbers stay Python numbers (weakly typed)."""
    return jnp.asarray(value) if isinstance(value, (list, tuple)) else value


def _as_array(x):
    """``x`` as a jitted function's argument: arrays as they are (JAX converts NumPy's),
    anything else as a JAX array, as the solve would make it."""
    return x if _is_array(x) else jnp.asarray(x)


def _typed(value):
    """``value`` as a hashable key with the type of every element, so that equal values of
    different types (``True`` and ``1``, which one option accepts and another refuses) are
    different keys."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: str(item[0]))
        return (dict, tuple((str(k), _typed(v)) for k, v in items))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_typed(v) for v in value))
    return (type(value), value)


def _compile(backend, solve: Callable, func_ref: weakref.ref, config: dict):
    """The jitted solve of one entry. It holds ``func`` weakly, so that the entry does not
    keep alive the ``func`` it is filed under."""
    options = config["options"]

    def run(y0, t, arrays, rtol, atol, runtime):
        inputs = jax.tree_util.tree_leaves((y0, t, arrays))
        constant = {id(x) for x, d in zip(inputs, config["differentiated"], strict=True) if not d}
        with _constants(constant):
            return solve(
                func_ref(),
                y0,
                t,
                params=_params(config, arrays),
                rtol=rtol,
                atol=atol,
                options=None if options is None else {**options, **runtime},
                backend=backend,
                throw=False,
                **config["settings"],
            )

    return jax.jit(run)


_held = threading.local()


@contextlib.contextmanager
def _constants(ids):
    before = getattr(_held, "ids", frozenset())
    _held.ids = frozenset(ids)
    try:
        yield
    finally:
        _held.ids = before


def is_constant(x) -> bool:
    """Whether ``x`` is an argument of the compiled solve being traced that its caller does
    not differentiate: no cotangent of it is ever asked for."""
    return id(x) in getattr(_held, "ids", frozenset())


def differentiated(x) -> bool:
    """A tracer of forward or reverse mode (JVP and linearize tracers carry a primal and a
    tangent)."""
    return isinstance(x, jax.core.Tracer) and hasattr(x, "primal") and hasattr(x, "tangent")


def _params(config, arrays):
    given = iter(arrays)
    leaves = [next(given) if x is None else x for x in config["static_leaves"]]
    return jax.tree_util.tree_unflatten(config["treedef"], leaves)


def _captures_tracers(func, values, config) -> bool:
    """Whether ``func`` captures a traced value, found from one traced evaluation at the
    initial state. An evaluation that fails says the same: the uncached path then reports
    the failure as it does."""
    y0, _, arrays = values[:3]
    batch_axis = config["settings"]["batch_axis"]
    try:
        parts = jax.tree_util.tree_leaves(y0)
        size = () if batch_axis is None else (parts[0].shape[batch_axis],)
        dtype = jnp.result_type(*parts)
        time = jnp.zeros(size, jax.dtypes.canonicalize_dtype(dtype))

        def evaluate(y, arrays):
            if config["treedef"] == _NO_PARAMS:
                return func(time, y)
            return func(time, y, _params(config, arrays))

        closed = jax.make_jaxpr(evaluate)(y0, arrays)
    except Exception:
        return True
    return any(isinstance(c, jax.core.Tracer) for c in closed.consts)


_NO_PARAMS = jax.tree_util.tree_structure(None)
