"""The Backend protocol and the lazy registry that maps names and array types to adapters.

The core never imports a framework. It asks this module for a :class:`Backend`, either by name
(``"numpy"``, ``"torch"``, ...) or by looking at the arrays a user passed in, and only then is
the adapter module (and with it the framework) imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import array_api_compat
import array_api_extra as xpx

# name -> (adapter module, the pip extra that installs what it needs)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "numpy": ("odecore.adapters.numpy", "odecore"),
    "torch": ("odecore.adapters.torch", "odecore[torch]"),
    "jax": ("odecore.adapters.jax", "odecore[jax]"),
    "numba": ("odecore.adapters.numba", "odecore[numba]"),
    "cupy": ("odecore.adapters.cupy", "odecore[cupy]"),
}
# The framework each adapter needs, so that a missing framework and a missing adapter get
# different messages.
_FRAMEWORK_MODULE = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "numba": "numba",
    "cupy": "cupy",
}

BACKEND_NAMES: tuple[str, ...] = tuple(_ADAPTERS)

_loaded: dict[str, Backend] = {}


class BackendNotAvailableError(ImportError):
    """The requested backend cannot be used in this environment."""


class Backend:
    """What the core needs from an array library, beyond its array-API namespace.

    Adapters subclass this and override what their framework does differently. The defaults
    here are the eager, autodiff-free behaviour, which is what NumPy needs.
    """

    name: str = "base"
    #: The array-API namespace (from array-api-compat).
    xp: Any = None
    #: True when Python control flow on array values is allowed (no tracing).
    eager: bool = True
    #: Whether the core may write into arrays it allocated itself (array-api-extra's ``at``).
    #: Frameworks that record operations for autodiff want copies instead.
    inplace_ok: bool = True

    def owns(self, x: Any) -> bool:
        """True if ``x`` is an array of this backend's library."""
        raise NotImplementedError

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        """Convert plain inputs (lists, floats, NumPy arrays) to this backend's arrays."""
        return self.xp.asarray(x, dtype=dtype)

    @property
    def time_dtype(self) -> Any:
        """The dtype time is kept in: float64 wherever the library allows it."""
        return self.xp.float64

    def scalar(self, value: float, dtype: Any) -> Any:
        """A 0-d array holding the Python number ``value``: the time a single-sample ``func``
        receives at every evaluation, so an adapter may give a cheaper constructor."""
        return self.xp.asarray(value, dtype=dtype)

    @property
    def int_dtype(self) -> Any:
        """The dtype of counters and indices inside the loop."""
        return self.xp.int64

    def while_loop(self, cond: Callable, body: Callable, state: Any) -> Any:
        while bool(cond(state)):
            state = body(state)
        return state

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    def device_scope(self, x: Any):
        """A context in which arrays the core creates without a template land on ``x``'s
        device. Libraries that put new arrays on the host by default need it for states on
        an accelerator."""
        return contextlib.nullcontext()

    def write(self, out: Any, where: Any, value: Any) -> Any:
        """``out`` with ``out[where] = value``: in place where the library allows it
        (``inplace_ok``), else as a new array (array-api-extra's ``at``)."""
        return xpx.at(out, where).set(value, copy=not self.inplace_ok)

    def stage_store(self, method, y0: Any) -> Callable:
        """Where the Runge-Kutta steps of one solve keep their stages: called once per solve
        with the initial state in loop layout, it returns ``start(method, y, first, h, hy)``,
        which each step calls for its store (see ``odecore._rk.ListStages``). A store may keep
        its buffers from one step to the next."""
        from odecore._rk import ListStages

        return ListStages

    # ---- gradients -------------------------------------------------------------------------
    #: True when the framework differentiates through array operations itself ("direct").
    has_autodiff: bool = False
    #: The gradient mode when the user names none; a framework whose reverse mode cannot run
    #: through the loop (JAX: no reverse mode through ``while_loop``) has no "direct" at all.
    default_adjoint: str = "direct"

    def param_leaves(self, func: Callable, params: Any) -> list[Any]:
        """The arrays that receive parameter gradients: the leaves of ``params``."""
        return [leaf for _, leaf in _leaves(params)] if params is not None else []

    def requires_grad(self, values: Any) -> bool:
        """Whether any array among ``values`` asks for a gradient from the framework."""
        return False

    def dynamics_vjp(self, func, params, leaves, t, y, cot, want_value=False):
        """``cot`` times the Jacobian of ``func(t, y, params)`` with respect to ``y`` and to
        each array in ``leaves``: returns ``(value, cot_y, [cot_leaf, ...])``, with ``value``
        ``func(t, y, params)`` when ``want_value`` and None otherwise.

        Without autodiff this is the dynamics' own ``vjp(t, y, params, cotangent) ->
        (cot_y, cot_params)`` method, with ``cot_params`` shaped like ``params``.
        """
        vjp = getattr(func, "vjp", None)
        if vjp is None:
            raise TypeError(
                f"gradients on the {self.name!r} backend need the dynamics' own VJP, and "
                f"{type(func).__name__} has no 'vjp' method: give it "
                f"vjp(t, y, params, cotangent) -> (cot_y, cot_params), where cot_params has "
                f"the structure of params (None when there are no params); or use a backend "
                f"with autodiff (torch, jax)"
            )
        cot_y, cot_params = vjp(t, y, params, cot)
        cot_leaves = self.param_leaves(func, cot_params) if leaves else []
        value = func(t, y, params) if want_value and params is not None else None
        if want_value and params is None:
            value = func(t, y)
        if len(cot_leaves) != len(leaves):
            raise ValueError(
                f"{type(func).__name__}.vjp returned {len(cot_leaves)} parameter cotangents "
                f"for {len(leaves)} parameter arrays; return one per array in params, in the "
                f"same structure"
            )
        return value, cot_y, cot_leaves

    def dynamics_linearize(self, func, params, leaves, t, y):
        """``(func(t, y, params), pullback)``, ``pullback(cot) -> (cot_y, cot_leaves)``. With
        autodiff one evaluation serves the value and the VJP; without, the VJP is the
        dynamics' own ``vjp`` method (see ``dynamics_vjp``)."""
        value = func(t, y) if params is None else func(t, y, params)

        def pullback(cot):
            _, cot_y, cot_leaves = self.dynamics_vjp(func, params, leaves, t, y, cot)
            return cot_y, cot_leaves

        return value, pullback

    def attach_zero_gradients(self, out: Any, leaves: list[Any]) -> Any:
        """``out`` unchanged in value, but depending on each of ``leaves`` with a zero
        derivative: in ``direct`` mode a parameter the dynamics never use then gets a zero
        gradient, as in the other modes, rather than none."""
        return out

    def check_no_hidden_parameters(self, func, params, leaves, t, y0, batch_axis) -> None:
        """Raise if ``func`` uses arrays that want gradients but are not among ``leaves``:
        backsolve and checkpoint differentiate only with respect to ``leaves``, and any
        other array would silently get no gradient."""

    def vjp(self, fn: Callable, *primals: Any):
        """``(fn(*primals), pullback)``, ``pullback(cotangent)`` giving one cotangent per
        primal, by the framework's reverse mode."""
        raise NotImplementedError(
            f"the {self.name!r} backend has no autodiff; the core uses the dynamics' own "
            f"vjp method instead (see Backend.dynamics_vjp)"
        )

    def jvp(self, fn: Callable, primals, tangents):
        """``(fn(*primals), tangent_out)`` by the framework's forward mode."""
        raise NotImplementedError(
            f"the {self.name!r} backend has no autodiff; give the dynamics a jvp method"
        )

    def custom_vjp(self, rule) -> Callable:
        """Turn a framework-neutral ``rule`` into a function of arrays that the framework's
        autodiff sees as one operation with one array output. The rule has
        ``forward(*primals) -> (out, residuals)`` and ``backward(residuals, out_bar) ->
        tuple`` with one cotangent per primal (None for a primal with no gradient). The
        solve (``odecore._grad.SolveRule``) and the fixed point use it. Backends without
        autodiff hand the rule's pullback to the user instead (``odecore.vjp_odeint``)."""
        raise NotImplementedError(f"the {self.name!r} backend has no autodiff to attach to")

    def compiled_solve(self, solve: Callable, func, y0, t, params, arguments: dict) -> Any:
        """``solve(func, y0, t, params=params, **arguments, throw=False)`` run by a compiled
        program that the backend keeps for ``func`` and the static configuration, so that
        repeating the call with new values compiles nothing; None where the backend keeps
        none (the default) or this call cannot use one (an input is being traced, so the
        call is itself being compiled). The solution's status holds any failure; the caller
        raises."""
        return None

    def float64(self):
        """A context in which float64 arrays are float64. Only JAX needs it: without its x64
        mode a float64 request silently gives float32."""
        return contextlib.nullcontext()

    def no_grad(self):
        """A context in which the framework records nothing for autodiff."""
        return contextlib.nullcontext()

    def stop_gradient(self, x: Any) -> Any:
        return x

    def to_host_float(self, x: Any) -> float:
        return float(x)

    def is_traced(self, x: Any) -> bool:
        """True when ``x`` has no value yet (a JAX tracer under ``jit``): checks on its value
        are left out, and failures are reported by the solve's status instead of raised."""
        return False

    def with_leaves(self, params: Any, leaves: list[Any]) -> Any:
        """``params`` as a rule's forward must call ``func`` with: unchanged where the
        framework hands the forward the user's own arrays (torch, NumPy); with ``leaves``
        (the rule's primals) in place of its arrays where the forward is traced separately
        from the caller (JAX), so that no differentiated value is captured from outside."""
        return params

    def __repr__(self) -> str:
        return f"<odecore backend {self.name!r}>"


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing its adapter (and framework) on first use."""
    if name not in _ADAPTERS:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are "
            f"{', '.join(repr(n) for n in ('auto',) + BACKEND_NAMES)}"
        )
    if name not in _loaded:
        _loaded[name] = _load_adapter(name)
    return _loaded[name]


def _load_adapter(name: str) -> Backend:
    module_name, extra = _ADAPTERS[name]
    framework = _FRAMEWORK_MODULE[name]
    try:
        importlib.import_module(framework)
    except ImportError as exc:
        raise BackendNotAvailableError(
            f"the {name!r} backend needs {framework}, which is not installed; "
            f"install it with: pip install '{extra}'"
        ) from exc
    except Exception as exc:  # a broken install fails with OSError and friends, not ImportError
        raise BackendNotAvailableError(
            f"the {name!r} backend needs {framework}, which is installed but fails to import "
            f"({type(exc).__name__}: {exc}); reinstall it with: pip install '{extra}'"
        ) from exc
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        shipped = ", ".join(repr(n) for n in BACKEND_NAMES if _adapter_shipped(n))
        raise BackendNotAvailableError(
            f"the {name!r} backend is planned but its adapter is not part of this release of "
            f"odecore; the adapters in this release: {shipped}"
        ) from exc
    return module.BACKEND


def _adapter_shipped(name: str) -> bool:
    try:
        return importlib.util.find_spec(_ADAPTERS[name][0]) is not None
    except ImportError:
        return False


def is_traced(x: Any) -> bool:
    """True when ``x`` is an array of a tracing framework with no concrete value yet; the
    checks in ``odecore._validate`` skip such values."""
    library = _library_of(x)
    return library is not None and library in _loaded and _loaded[library].is_traced(x)


def _library_of(x: Any) -> str | None:
    """The backend name that owns array ``x``, or None for plain Python values.

    Checked without importing any framework: array-api-compat only looks at types of modules
    already imported.
    """
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    return None


def infer_backend(*values: Any) -> Backend:
    """The backend that owns the arrays among ``values`` (nested tuples, lists and dicts are
    searched); NumPy when there are only plain Python values.

    Arrays of two libraries in one call are an error: converting silently would move data
    between devices or drop gradients. (A configured backend, by contrast, converts plain
    values and NumPy arrays; see ``odecore._config``.)
    """
    found: dict[str, str] = {}
    for where, leaf in _leaves(values):
        library = _library_of(leaf)
        if library is not None and library not in found:
            found[library] = where
    if len(found) > 1:
        (a, wa), (b, wb) = list(found.items())[:2]
        raise TypeError(
            f"arrays from two libraries in one call: {wa} is a {a} array but {wb} is a {b} "
            f"array; convert them to one library, or choose a backend (backend=... or "
            f"odecore.set_backend) to have plain inputs converted to it"
        )
    name = next(iter(found), "numpy")
    return get_backend(name)


def _leaves(values: Any, path: str = ""):
    """(name, leaf) pairs of nested containers; a top-level dict names its entries, so that
    ``{"y0": ..., "t": ...}`` reports ``y0`` and ``params[1]`` rather than positions."""
    stack = [(path, values)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, (tuple, list)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            stack.extend(
                (f"{where}[{k!r}]" if where else str(k), v) for k, v in reversed(value.items())
            )
        else:
            yield where or "argument", value
