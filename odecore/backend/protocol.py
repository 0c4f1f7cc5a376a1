"""What the core needs from an array library: a small required part, and capabilities that a
backend declares explicitly.

The required part is an array-API namespace, conversion into it, the dtypes the loop keeps
time and counters in, and the control flow the loop runs on (a Python ``while`` and ``if`` by
default; a tracing library supplies its own). The optional parts are objects, None where a
backend lacks them, so that the core asks ``backend.autodiff is not None`` instead of probing
for methods:

- :class:`Autodiff`: the framework differentiates (torch autograd, JAX). Without it the
  dynamics bring their own ``vjp`` (``odecore.backend.differentiate``).
- :class:`Tracing`: the solve may run while its inputs are traced (JAX under ``jit``).
- :class:`Kernels`: fast paths for the loop's hot operations; each defaults to the portable
  array-API version, against which it is tested.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np


class Autodiff:
    """The framework's automatic differentiation, as the core uses it."""

    #: The gradient mode when the user names none. A framework whose reverse mode cannot run
    #: through the loop (JAX: no reverse mode through ``while_loop``) has no "direct" at all.
    default_adjoint: str = "direct"

    def param_leaves(self, func: Callable, params: Any) -> list[Any]:
        """The arrays that receive parameter gradients: the floating-point arrays of
        ``params`` (and, where the framework has them, the parameters ``func`` owns)."""
        raise NotImplementedError

    def requires_grad(self, values: Any) -> bool:
        """Whether any array among ``values`` asks the framework for a gradient."""
        raise NotImplementedError

    def linearize(self, func, params, leaves, t, y):
        """``(func(t, y[, params]), pullback)`` from one evaluation, with ``pullback(cot) ->
        (cot_y, [cot_leaf, ...])`` the vector-Jacobian product with respect to ``y`` and to
        each array of ``leaves``."""
        raise NotImplementedError

    def linearize_reusable(self, func, params, leaves, t, y):
        """``(func(t, y[, params]), pull_y, pull_all)`` from one evaluation, for a caller that
        pulls many cotangents back through the same point (a fixed point's implicit
        backward): ``pull_y(cot) -> cot_y`` and ``pull_all(cot) -> (cot_y, [cot_leaf, ...])``
        may each be called any number of times. What the evaluation recorded is kept until
        both are dropped; ``pull_y`` does none of the parameters' work."""
        raise NotImplementedError

    def vjp(self, fn: Callable, *primals: Any):
        """``(fn(*primals), pullback)``, ``pullback(cotangent)`` giving one cotangent per
        primal."""
        raise NotImplementedError

    def jvp(self, fn: Callable, primals, tangents):
        """``(fn(*primals), tangent_out)`` by forward mode."""
        raise NotImplementedError

    def differentiable_vjp(self, fn: Callable, x: Any, differentiable: bool = True):
        """``(fn(x), pullback)``, ``pullback(cotangent)`` the cotangent times the Jacobian of
        ``fn`` at ``x``. Unlike :meth:`vjp`, with ``differentiable`` the result stays
        differentiable with respect to ``x`` and to every array ``fn`` captures whenever the
        caller is itself being differentiated: a divergence built from it (``odecore.cnf``)
        has gradients. ``differentiable=False`` says that no gradient will be asked for, so
        that an eager framework need not record one."""
        raise NotImplementedError

    def basis_products(self, fn: Callable, x: Any, differentiable: bool = True):
        """``(fn(x), products)`` for a batch ``x`` of shape (B, *event_shape) whose samples
        ``fn`` treats independently: ``products[i]`` (shaped like ``x``) is each sample's
        Jacobian times the ``i``-th basis vector of one sample's flattened state, as rows
        ``e_i^T J`` or as columns ``J e_i``, whichever the framework computes better; shape
        (D, B, *event_shape). Differentiable as :meth:`differentiable_vjp`. This portable
        version takes one pullback per basis vector; a framework that can batch them over
        the basis (``vmap``) does so."""
        out, pull = self.differentiable_vjp(fn, x, differentiable)
        xp = array_api_compat.array_namespace(x)
        size = math.prod(x.shape[1:])
        eye = xp.eye(size, dtype=x.dtype)
        rows = [
            pull(xp.broadcast_to(xp.reshape(eye[i], (1, *x.shape[1:])), x.shape))
            for i in range(size)
        ]
        return out, xp.stack(rows)

    def custom_vjp(self, rule) -> Callable:
        """``rule`` (``odecore.adjoint.rule.Rule``) as a function of arrays that the framework
        sees as one differentiable operation."""
        raise NotImplementedError

    def attach_zero_gradients(self, out: Any, leaves: list[Any]) -> Any:
        """``out`` unchanged in value but depending on each of ``leaves`` with a zero
        derivative, so that a parameter the dynamics never use gets a zero gradient rather
        than none."""
        return out

    def hidden_parameters(self, func, params, leaves, t0, y0) -> list[Any]:
        """The arrays ``func(t0, y0[, params])`` uses that want a gradient but are not among
        ``leaves``: rules that differentiate only ``leaves`` would give them none. ``t0`` and
        ``y0`` come as the solve has them, wanting a gradient where it may be taken."""
        return []

    def differentiates(self, x: Any) -> bool:
        """Whether ``x`` carries a tangent the framework will differentiate while its value
        is known (a JAX value under ``grad`` without ``jit``): the checks that read such a
        setting as a number refuse it, since the rules differentiate only ``y0``, ``t`` and
        ``params``."""
        return False

    def first_order_only(self, x: Any, message: str) -> Any:
        """``x`` unchanged, for a value whose gradient the core builds correctly to first
        order only (an event time from the implicit function theorem, with its second-order
        terms left out): a second derivative through it raises NotImplementedError with
        ``message`` instead of coming out wrong. Unchanged by default, for a framework that
        takes no second derivatives."""
        return x

    def residual(self, x: Any) -> Any:
        """What a rule keeps of its own output ``x`` for its backward. Unchanged by default:
        a framework that differentiates the backward itself by forward mode (JAX's
        ``hessian``, forward over reverse) needs the residual to carry the output's tangent,
        or the second derivative misses how the outputs move with the inputs. An eager
        framework that records the rule with its residuals, and whose backward is never
        differentiated, detaches it (a residual referring back to the output would make a
        cycle that keeps the record alive until the cyclic collector runs)."""
        return x


class Tracing:
    """A library that traces: the solve may run on values not known yet (JAX under ``jit``).
    Checks on such values are left out (``Backend.is_traced``), failures are reported by the
    status, and a rule's forward and backward are traced apart from the caller."""

    def with_leaves(self, params: Any, leaves: list[Any]) -> Any:
        """``params`` with its floating-point arrays replaced by ``leaves``, in order: a
        traced rule must call ``func`` with its own primals, never with values it captured
        from the caller's trace."""
        raise NotImplementedError

    def compiled_solve(self, solve: Callable, func, y0, t, params, arguments: dict) -> Any:
        """An eager call's solution from a compiled program kept for ``func`` and its static
        configuration, or None where none applies (the inputs are traced already). The
        solution's status holds any failure; the caller raises."""
        return None

    def check_indices(self, call: Callable, args: tuple, name: str) -> None:
        """Raise IndexError where ``call(*args)`` indexes past the end of an array, for a
        library whose indexing clamps instead of raising (JAX). ``name`` is what the error
        calls the user's function."""
        return None

    def tree_children(self, value: Any) -> tuple[list, Callable] | None:
        """``(children, rebuild)`` when the library registers ``value``'s type as a container
        of arrays (a JAX pytree node), ``rebuild(children)`` making one like it; None for
        anything else. Tuples, lists and dicts are the core's own business."""
        return None


@dataclass(frozen=True)
class Kernels:
    """A backend's fast paths; None means the portable version.

    ``stage_store(method, y0) -> start``: where the Runge-Kutta steps of one solve keep their
    stages, called once per solve (``odecore.solvers.stage_stores``). ``rms_error_ratio(err,
    y, y_new, rtol, atol, axis)``: the scaled RMS error of one estimate, per sample, as
    control values (``odecore.control.norms``). ``solve(problem, options, progress) ->
    LoopResult``: the whole solve of a prepared problem (``odecore.ode.problem.Problem``,
    with the user's ``options``) as one compiled call, taking the generic loop's steps
    (``odecore.kernels.loop``) and reporting to ``progress`` (an
    ``odecore.ode.progress.Reporter``, or None); the caller raises on failure. Called
    as ``solve(problem, options, progress, record=True)``, it also keeps the checkpoint
    tape (``odecore.ode.tape.KernelTape``), which ``replay(problem, tape, ys_bar) ->
    (y0_bar, leaves_bar)`` turns into the checkpoint gradient. ``compiles(problem, options,
    record) -> bool``: whether ``solve`` takes a gradient's forward solve of ``problem``;
    where it does not, the generic loop serves.
    ``adjoint_dynamics(problem) -> (func, params) | None``: the backsolve's augmented
    dynamics for ``problem`` in a form ``solve`` compiles, or None where the backsolve's
    portable dynamics must serve. ``dense_output(method) -> interpolate``: the dense output
    of one solve's steps, with the signature of ``ExplicitRK.interpolate``
    (``odecore.solvers.explicit_rk``), called once per solve."""

    stage_store: Callable | None = None
    rms_error_ratio: Callable | None = None
    solve: Callable | None = None
    replay: Callable | None = None
    compiles: Callable | None = None
    adjoint_dynamics: Callable | None = None
    dense_output: Callable | None = None


class Backend:
    """One array library as the core sees it: what [`get_backend`][odecore.get_backend] returns.

    Adapters (``odecore.adapters``) subclass it, fill in ``name``, ``xp``, ``owns`` and
    ``asarray``, and override what their library does differently; the defaults are those of an
    eager library. The solver loop, the tableaus and the gradient rules are written against this
    protocol only. Its optional parts are objects, None where a backend lacks them:
    ``autodiff`` (the framework differentiates), ``tracing`` (the solve may run on traced
    values, as JAX's under ``jit``) and ``kernels`` (fast paths, each defaulting to the portable
    array-API version).

    Attributes
    ----------
    name : str
        The backend's name, as ``backend=`` takes it.
    xp : module
        The array-API namespace (from array-api-compat, or the library's own).
    eager : bool
        True when Python control flow on array values is allowed (no tracing).
    inplace_ok : bool
        Whether the core may write into arrays it allocated itself.
    host_control_values : bool
        Whether a single eager sample keeps its time, step size and counters as Python
        numbers; False keeps them as arrays on the state's device.
    autodiff : Autodiff or None
        The framework's automatic differentiation, None without one.
    tracing : Tracing or None
        What a tracing library supplies, None for an eager one.
    kernels : Kernels
        The backend's fast paths.

    Raises
    ------
    NotImplementedError
        ``owns`` and ``asarray`` of the base class itself: an adapter must define them.

    Examples
    --------
    >>> import numpy as np
    >>> import odecore
    >>> backend = odecore.get_backend("numpy")
    >>> isinstance(backend, odecore.Backend), backend.eager, backend.has_autodiff
    (True, True, False)
    >>> backend.owns(np.zeros(2)), backend.owns([0.0, 1.0])
    (True, False)
    """

    name: str = "base"
    #: The array-API namespace (from array-api-compat, or the library's own).
    xp: Any = None
    #: True when Python control flow on array values is allowed (no tracing).
    eager: bool = True
    #: Whether the core may write into arrays it allocated itself.
    inplace_ok: bool = True
    #: What the library's linear solve raises for a singular matrix (CuPy raises NumPy's;
    #: JAX returns non-finite values instead).
    singular_matrix_errors: tuple = (np.linalg.LinAlgError,)
    #: Whether a single eager sample keeps its time, step size and counters as Python numbers
    #: (``odecore._ops.ScalarOps``). False keeps them as arrays on the state's device, where
    #: reading each step's error norm to the host would wait for the device.
    host_control_values: bool = True
    #: Whether, in a batch along axis 0, a parameter array of one row per sample (B, P) gives
    #: each sample its own row and nothing else (the numba backend's ``f`` sees one
    #: trajectory and its row). Then a sample's gradient reaches only its own row, so a
    #: failed sample's NaN gradient (``odecore.adjoint.failed``) spoils no other row; on a
    #: backend whose ``f`` sees the whole batch, any sample may read any row.
    sample_param_rows: bool = False
    #: Whether the library's products and layers promote operands of different floating
    #: dtypes (float32 weights times a float64 state) rather than refuse them.
    promotes_floats: bool = True
    autodiff: Autodiff | None = None
    tracing: Tracing | None = None
    kernels: Kernels = Kernels()

    @property
    def has_autodiff(self) -> bool:
        """Whether the framework differentiates (``autodiff`` is not None)."""
        return self.autodiff is not None

    def owns(self, x: Any) -> bool:
        """True if ``x`` is an array of this backend's library."""
        raise NotImplementedError

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        """Plain inputs (lists, floats, NumPy arrays) as this backend's arrays, on ``like``'s
        device when given."""
        raise NotImplementedError

    @property
    def time_dtype(self) -> Any:
        """The dtype time is kept in: float64 wherever the library allows it."""
        return self.xp.float64

    @property
    def int_dtype(self) -> Any:
        """The dtype of counters and indices inside the loop."""
        return self.xp.int64

    def scalar_maker(self, dtype: Any) -> Callable[[float], Any]:
        """A function of one float giving a 0-d array of ``dtype`` holding it: what makes
        the time a single-sample ``func`` receives at every evaluation, so an adapter may
        give a cheaper constructor."""
        xp = self.xp
        return lambda value: xp.asarray(value, dtype=dtype)

    def while_loop(self, cond: Callable, body: Callable, state: Any) -> Any:
        while bool(cond(state)):
            state = body(state)
        return state

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    def write(self, out: Any, where: Any, value: Any) -> Any:
        """``out`` with ``out[where] = value``: in place where the library allows it, else as
        a new array."""
        return xpx.at(out, where).set(value, copy=not self.inplace_ok)

    def row_products(self, rows: Any, x: Any) -> Any:
        """``(B, m)``: each sample's ``m`` rows (``rows``, ``(B, m, N)``) dotted with its
        ``x`` (``(B, N)``). The fixed-point solvers' memories take these products at every
        iteration, and the fastest form depends on the library."""
        return (rows @ x[:, :, None])[..., 0]

    def weighted_rows(self, weights: Any, rows: Any) -> Any:
        """``(B, N)``: each sample's rows (``(B, m, N)``) summed with its ``weights``
        (``(B, m)``)."""
        return (weights[:, None, :] @ rows)[:, 0, :]

    def device_scope(self, x: Any):
        """A context in which arrays the core creates without a template land on ``x``'s
        device."""
        return contextlib.nullcontext()

    def stop_gradient(self, x: Any) -> Any:
        return x

    #: What ``random_normal`` takes, in the words of its error message.
    random_sources = "a numpy.random.Generator (generator=...) or an int seed (seed=...)"

    def random_normal(self, source: Any, shape: tuple[int, ...], dtype: Any, like: Any) -> Any:
        """Standard normal draws of ``shape`` and ``dtype``, on ``like``'s device (None: the
        default one). ``source`` is a ``numpy.random.Generator``, drawn from on the host and
        converted; a backend with its own random numbers (a ``torch.Generator``, a JAX key)
        also accepts those."""
        if not isinstance(source, np.random.Generator):
            raise TypeError(
                f"random numbers on the {self.name!r} backend come from "
                f"{self.random_sources}, got {type(source).__name__}"
            )
        draws = source.standard_normal(shape)
        return self.asarray(draws, dtype=dtype, like=like)

    def to_host_float(self, x: Any) -> float:
        return float(x)

    def outside_compiler(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, where a compiler of the caller's code (torch.compile)
        would otherwise trace ``fn``: the backend has it run as written instead."""
        return fn(*args, **kwargs)

    def check_context(self, inputs: Any = (), call: str = "solve") -> None:
        """Raise where the caller's context, or the kind of its ``inputs`` (a tree of the
        call's arrays), cannot run a call of odecore (torch.func's transforms, forward-mode
        dual tensors), naming what to use instead; called once per call, so it must be
        cheap. ``call`` is the kind of call, ``"solve"``, ``"fixed point"`` or
        ``"diagnostic"`` (a fixed point's diagnostics): what to use instead are its
        options."""
        return None

    def allocation_limit(self) -> int | None:
        """Bytes beyond which a new array should be refused before it is allocated: where
        the library's own failure is not a clean error (a CPU process killed by the
        operating system when the pages are touched). None where the library reports an
        allocation it cannot make, or arrays grow as they are written."""
        return None

    def is_traced(self, x: Any) -> bool:
        """True when ``x`` has no value yet (a tracer under ``jit``)."""
        return False

    def holds_values(self, x: Any) -> bool:
        """False for an array that has a shape and a dtype but no values (torch's 'meta'
        tensors): every check and step of a solve reads values."""
        return True

    def reads_cheaply(self, x: Any) -> bool:
        """Whether reading values of arrays like ``x`` on the host (``bool`` of a
        reduction) costs no more than the call: an eager array in host memory. On a device
        the host would wait for the device's queue, so the core branches on array values
        only where this holds, and only to skip work whose result it knows."""
        return self.eager

    def float64(self):
        """A context in which float64 arrays are float64 (only JAX without x64 needs one)."""
        return contextlib.nullcontext()

    def no_grad(self):
        """A context in which the framework records nothing for autodiff."""
        return contextlib.nullcontext()

    @property
    def generic_backend(self) -> Backend:
        """The backend whose generic loop solves, on this backend's arrays, what this
        backend's whole-solve kernel (``Kernels.solve``) cannot: dynamics that call back
        into Python at every evaluation (``odecore.cnf``'s augmented dynamics). Itself for a
        backend without one."""
        return self

    def generic_form(self, func: Callable, params: Any, batched: bool = False) -> Callable:
        """``func`` as the generic loop calls it: ``func(t, y[, params]) -> dy``, with
        ``vjp(t, y, params, cotangent) -> (cot_y, cot_params)`` where it has one, on the
        whole batch when ``batched``. A backend whose users may write dynamics another way
        (Numba's in place ``f(t, y, dy, params)``, for one trajectory of a batch) wraps
        them here; :class:`odecore._dynamics.Dynamics` keeps the user's own as
        ``user_func``."""
        return func

    def __repr__(self) -> str:
        return f"<odecore backend {self.name!r}>"
