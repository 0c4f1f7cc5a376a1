"""The conformance catalogue: problems that every backend must solve alike.

A :class:`Case` is an initial value problem ``y' = func(t, y, params)`` with

- dynamics written only against the Python array API (the namespace comes from the state,
  through array-api-compat), so that one function runs on every backend;
- a hand-written vector-Jacobian product ``vjp(t, y, params, cotangent) -> (cot_y,
  cot_params)``: backends without autodiff take their gradients from it (DESIGN.md,
  "Dynamics"), and the suite checks it against finite differences of ``func``;
- a reference solution computed without odecore: a closed form, ``scipy.linalg.expm``, or
  scipy's DOP853 at rtol = atol = 1e-13 (``reference_source`` says which);
- reference sensitivities ``dy(t_i)/dy0`` and ``dy(t_i)/dparams`` (``gradient_source`` says how
  they were obtained), from which :func:`continuous_reference` builds the exact gradient of the
  suite's loss.

A case that is linear in an extended state (:class:`LinearForm`) also has the exact solution
of a *fixed-step* method: an explicit Runge-Kutta method with as many stages as its order
``p <= 4`` advances ``z' = M z`` by the Taylor polynomial of degree ``p`` of ``h M`` (its
stability function), so the discrete solution is a product of matrix polynomials
(:func:`discrete_reference`), differentiated by the complex step. Fixed-step variants are
checked against it to rounding, not against the continuous solution at the method's order.

A :class:`Variant` is a case solved one way: a method, a step size or the grid of stops, and
options (``step_t``, ``first_step``, the backsolve's seminorm). ``VARIANTS`` lists them all;
those with ``ci=True`` form the subset CI runs (the others are marked slow).

The loss is the same for every case, ``L(ys) = 0.5 * sum(W * ys**2)`` over all output times,
with weights ``W`` drawn once per case: its cotangent ``W * ys`` weighs every output time and
component differently, so a gradient that drops or swaps an output is caught.

Everything here except the dynamics (the references, the weights) is NumPy and SciPy, float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import array_api_compat
import numpy as np
from scipy.integrate import solve_ivp
from scipy.linalg import expm, expm_frechet

from odecore import ADAPTIVE_METHODS, FIXED_STEP_METHODS, TABLEAUS

__all__ = [
    "CASES",
    "VARIANTS",
    "Case",
    "CaseDynamics",
    "LinearForm",
    "Reference",
    "Variant",
    "continuous_reference",
    "discrete_reference",
    "loss",
    "loss_cotangent",
    "reference_gradient",
    "variant_reference",
]

# scipy's DOP853 at this tolerance is the "high precision" reference for problems without a
# closed form; its global error on the cases below is around 1e-12 relative.
SCIPY_REFERENCE_TOL = 1e-13
# The complex step: d f(x)/dx = Im f(x + i h) / h + O(h^2), with no cancellation, so any
# h far below the square root of the smallest double gives the derivative to rounding.
COMPLEX_STEP = 1e-30


@dataclass(frozen=True)
class LinearForm:
    """The case as ``z' = M z`` for the extended state ``z = [y (flattened), *extra(t0)]``.

    ``matrix(params, piece)`` is ``M`` on the ``piece``-th interval between ``breaks`` (the
    times where ``func`` jumps); an inhomogeneous term rides in ``extra`` as a constant 1 (and
    ``t`` itself as a component with ``t' = 1``). ``matrix`` must accept complex parameters,
    for the complex-step derivatives.
    """

    matrix: Callable[[tuple, int], np.ndarray]
    extra: Callable[[float], np.ndarray] = lambda t0: np.zeros(0)
    breaks: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so results can be cached
class Case:
    """One initial value problem with everything needed to check a backend on it.

    ``sensitivities(ts)`` returns ``(S_y0, (S_p0, S_p1, ...))`` with ``S_y0[i]`` the Jacobian
    ``dy(ts[i]) / dy0`` of shape ``(*y0.shape, *y0.shape)`` and ``S_pk[i]`` the Jacobian
    ``dy(ts[i]) / dparams[k]`` of shape ``(*y0.shape, *params[k].shape)``.
    """

    name: str
    description: str
    func: Callable  # func(t, y, params); array API only
    vjp: Callable  # vjp(t, y, params, cotangent) -> (cot_y, cot_params)
    y0: np.ndarray
    params: tuple[np.ndarray, ...]
    times: tuple[float, ...]
    reference: Callable[[np.ndarray], np.ndarray]
    reference_source: str
    sensitivities: Callable[[np.ndarray], tuple[np.ndarray, tuple[np.ndarray, ...]]]
    gradient_source: str
    dtype: str = "float64"
    batch_axis: int | None = None
    # The adaptive solver's tolerances.
    rtol: float = 1e-10
    atol: float = 1e-12
    # Options every variant of the case gets (jump_t where func jumps).
    options: dict = field(default_factory=dict)
    # Set where the case is linear in an extended state: fixed-step variants need it.
    linear: LinearForm | None = None
    # The same dynamics for backends that compile them into the solve (numba): in Numba's
    # subset, in place, ``kernel(t, y, dy, p)`` over the flattened state and the parameters
    # flattened into one array (one row per sample for a batch, see ``kernel_params``),
    # with its VJP in place as ``kernel.vjp(t, y, p, cotangent, y_bar, p_bar)``.
    kernel: Callable | None = None

    @property
    def dynamics(self) -> CaseDynamics:
        return CaseDynamics(self.func, self.vjp, self.name)

    @property
    def ts(self) -> np.ndarray:
        return np.asarray(self.times, dtype=np.float64)

    def loss_weights(self) -> np.ndarray:
        """The fixed weights ``W`` of the loss, shaped like the outputs ``(T, *y0.shape)``."""
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        return rng.uniform(0.5, 1.5, size=(len(self.times), *self.y0.shape))

    def kernel_params(self) -> np.ndarray:
        """The parameters as ``kernel`` reads them: flattened and concatenated, per sample
        (N, P) for a batch."""
        if self.batch_axis is None:
            return np.concatenate([np.ravel(p) for p in self.params])
        batch = self.y0.shape[self.batch_axis]
        return np.concatenate([np.reshape(p, (batch, -1)) for p in self.params], axis=1)

    def split_kernel_params(self, flat: np.ndarray) -> tuple[np.ndarray, ...]:
        """A cotangent of :meth:`kernel_params` as one array per parameter, shaped like it."""
        pieces, start = [], 0
        for p in self.params:
            if self.batch_axis is None:
                size = int(np.size(p))
                pieces.append(np.reshape(flat[start : start + size], np.shape(p)))
            else:
                size = int(np.size(p)) // flat.shape[0]
                pieces.append(np.reshape(flat[:, start : start + size], np.shape(p)))
            start += size
        return tuple(pieces)

    def time_argument(self, t: float, xp=np, dtype=None):
        """``t`` as the solver passes it to ``func``: 0-d, or one value per sample when the
        solve is batched (each sample steps on its own)."""
        dtype = dtype if dtype is not None else xp.float64
        if self.batch_axis is None:
            return xp.asarray(t, dtype=dtype)
        return xp.full((self.y0.shape[self.batch_axis],), t, dtype=dtype)


class CaseDynamics:
    """A case's ``func`` and ``vjp`` as one dynamics object, the form DESIGN.md asks of
    dynamics on backends without autodiff."""

    def __init__(self, func: Callable, vjp: Callable, name: str):
        self._func = func
        self._vjp = vjp
        self.name = name

    def __call__(self, t, y, params):
        return self._func(t, y, params)

    def vjp(self, t, y, params, cotangent):
        return self._vjp(t, y, params, cotangent)

    def __repr__(self) -> str:
        return f"CaseDynamics({self.name!r})"


@dataclass(frozen=True)
class Variant:
    """A case solved one way: one row of the summary table per backend.

    ``step_size`` applies to fixed-step methods; without it they take one step between
    consecutive stops (output times, ``step_t``, ``jump_t``). ``options`` adds solver options
    to the case's own, as ``(name, value)`` pairs. ``seminorm`` runs the backsolve with
    ``adjoint_options={"norm": "seminorm"}``, which only the backsolve accepts. ``rtol`` and
    ``atol`` override the case's (low-order methods need looser ones to stay short).
    """

    case: Case
    method: str
    step_size: float | None = None
    options: tuple[tuple[str, object], ...] = ()
    seminorm: bool = False
    rtol: float | None = None
    atol: float | None = None
    ci: bool = False

    def __post_init__(self):
        if self.method not in TABLEAUS:
            raise ValueError(f"{self.id}: unknown method")
        if self.fixed_step and self.case.linear is None:
            raise ValueError(f"{self.id}: fixed-step variants need a case with a LinearForm")

    @property
    def fixed_step(self) -> bool:
        return self.method in FIXED_STEP_METHODS

    @property
    def family(self) -> str:
        return "fixed-step" if self.fixed_step else "adaptive"

    @property
    def tolerances(self) -> tuple[float, float]:
        rtol = self.case.rtol if self.rtol is None else self.rtol
        return rtol, self.case.atol if self.atol is None else self.atol

    @property
    def solver_options(self) -> dict | None:
        opts = {**self.case.options, **dict(self.options)}
        if self.step_size is not None:
            opts["step_size"] = self.step_size
        return opts or None

    @property
    def adjoint_options(self) -> dict | None:
        return {"norm": "seminorm"} if self.seminorm else None

    @property
    def modes(self) -> tuple[str, ...]:
        """The gradient modes this variant is solved with (adjoint options configure the
        backsolve only; the other modes refuse them)."""
        return ("backsolve",) if self.seminorm else ("checkpoint", "backsolve", "direct")

    @property
    def id(self) -> str:
        tags = []
        if self.fixed_step:
            tags.append("grid" if self.step_size is None else f"h={_fraction(self.step_size)}")
        tags += sorted({*self.case.options, *dict(self.options)})
        if self.seminorm:
            tags.append("seminorm")
        if self.rtol is not None:
            tags.append(f"rtol={self.rtol:g}")
        suffix = f"[{','.join(tags)}]" if tags else ""
        return f"{self.case.name}/{self.method}{suffix}"


def _fraction(x: float) -> str:
    inverse = 1.0 / x
    return f"1/{int(inverse)}" if inverse == int(inverse) else f"{x:g}"


def loss(ys, weights):
    """``0.5 * sum(W * ys**2)``, in the namespace of ``ys``."""
    xp = array_api_compat.array_namespace(ys)
    return 0.5 * xp.sum(weights * ys * ys)


def loss_cotangent(ys, weights):
    """``dL/dys``."""
    return weights * ys


# --------------------------------------------------------------------------------------------
# References: values, gradients and the magnitudes that bound their rounding


@dataclass(frozen=True)
class Reference:
    """Outputs and loss gradient of a variant, with the magnitude of every gradient entry.

    An entry of a gradient is a sum of contributions (``sum_i cot_i . S_i[:, j]``, or
    ``cot_i . f_i`` for a time); its ``magnitude`` is the same sum of their absolute values.
    An entry that is small because its contributions cancel still carries their rounding and
    truncation errors, which scale with the magnitude, not with the entry: comparisons
    accept ``|error| <= rtol * (|expected| + magnitude)``.
    """

    ys: np.ndarray
    gradient: dict  # {"y0", "params": (...), "t"}
    magnitude: dict  # the same structure
    source: str


def _contract(cot: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """``sum_{i, state} cot[i, state] * jac[i, state, ...]``."""
    return np.tensordot(cot, jac, axes=cot.ndim)


def _gradient(case: Case, ys, s_y0, s_params, source: str) -> Reference:
    """The loss gradient at outputs ``ys`` with sensitivities ``s_y0``, ``s_params``.

    The time gradient follows from the flow: moving an output time ``t_i`` (i >= 1) moves
    ``y(t_i)`` at rate ``f(t_i, y(t_i))``; moving ``t_0`` with ``y0`` fixed shifts the whole
    solution, which gives ``-(dL/dy0 - W_0 y0) . f(t_0, y0)`` (the adjoint at ``t_0``
    without the direct term of the output at ``t_0``, which is ``y0`` itself). odecore uses
    the same identities in every mode, at its own outputs: for a fixed-step method they hold
    at the discrete outputs, which is where this evaluates them.
    """
    ts = case.ts
    cot = loss_cotangent(ys, case.loss_weights())
    g_y0, m_y0 = _contract(cot, s_y0), _contract(np.abs(cot), np.abs(s_y0))
    g_params = tuple(_contract(cot, s) for s in s_params)
    m_params = tuple(_contract(np.abs(cot), np.abs(s)) for s in s_params)

    def f(i, y):
        return np.asarray(case.func(case.time_argument(ts[i]), y, case.params))

    g_t, m_t = np.empty_like(ts), np.empty_like(ts)
    for i in range(1, len(ts)):
        terms = cot[i] * f(i, ys[i])
        g_t[i], m_t[i] = np.sum(terms), np.sum(np.abs(terms))
    f0 = f(0, case.y0)
    g_t[0] = -np.sum((g_y0 - cot[0]) * f0)
    m_t[0] = np.sum((m_y0 - np.abs(cot[0])) * np.abs(f0))
    return Reference(
        ys=ys,
        gradient={"y0": g_y0, "params": g_params, "t": g_t},
        magnitude={"y0": m_y0, "params": m_params, "t": m_t},
        source=source,
    )


@functools.cache
def continuous_reference(case: Case) -> Reference:
    """The exact solution and loss gradient, from the case's reference and sensitivities."""
    ts = case.ts
    s_y0, s_params = case.sensitivities(ts)
    return _gradient(case, case.reference(ts), s_y0, s_params, case.gradient_source)


def reference_gradient(case: Case) -> dict:
    """The exact gradient of the loss at the reference solution: ``{"y0", "params", "t"}``."""
    return continuous_reference(case).gradient


@functools.cache
def discrete_reference(variant: Variant) -> Reference:
    """The exact outputs and loss gradient of a fixed-step variant's discrete solution."""
    case, form = variant.case, variant.case.linear
    stages = TABLEAUS[variant.method].stages
    assert TABLEAUS[variant.method].order == stages <= 4, "stability function is not Taylor"
    boundaries = fixed_step_boundaries(case.ts, variant.step_size, _stop_times(variant))

    def outputs(y0, params):
        return _linear_outputs(form, params, y0, case.ts, boundaries, _taylor(stages))

    ys, s_y0, s_params = _complex_step_jacobians(outputs, case.y0, case.params)
    return _gradient(case, ys, s_y0, s_params, f"exact {variant.method} steps, complex step")


@functools.cache
def discrete_backsolve_reference(variant: Variant) -> Reference:
    """The loss gradient a fixed-step backsolve computes, exactly: the continuous adjoint
    ``[y, a, a_theta]' = [f, -a df/dy, -a df/dtheta]`` advanced backward by the method's own
    steps (the forward grid, reversed), with ``y`` reset to the forward output and the
    output's cotangent added to ``a`` at every output time (Chen et al. 2018, algorithm 1).

    Each step is the textbook explicit Runge-Kutta step with the method's tableau; ``df/dtheta``
    comes from the complex step of the case's matrix. Outputs and magnitudes are those of the
    discrete solution."""
    case, form, tab = variant.case, variant.case.linear, TABLEAUS[variant.method]
    forward = discrete_reference(variant)
    ts, n = case.ts, case.y0.size
    ys_bar = loss_cotangent(forward.ys, case.loss_weights()).reshape(len(ts), n)
    pieces = range(len(form.breaks) + 1)
    matrices = [form.matrix(case.params, piece) for piece in pieces]
    # d M / d theta_j, one per parameter entry, restricted to the rows of y.
    derivatives = [
        [np.imag(form.matrix(p, piece))[:n] / COMPLEX_STEP for p in _shifted(case.params)]
        for piece in pieces
    ]

    def rates(piece, state):
        z, a, _ = state
        m = matrices[piece]
        return m @ z, -m[:n, :n].T @ a, np.array([a @ (d @ z) for d in derivatives[piece]])

    a, a_theta = np.zeros(n), np.zeros(len(derivatives[0]))
    for i in range(len(ts) - 1, 0, -1):
        a = a + ys_bar[i]
        z = np.concatenate([forward.ys[i].reshape(-1), form.extra(ts[i])])
        interval = ts[i : i - 2 if i >= 2 else None : -1]
        boundaries = fixed_step_boundaries(interval, variant.step_size, _stop_times(variant))
        for t0, t1 in zip(boundaries[:-1], boundaries[1:], strict=True):
            piece = sum(0.5 * (t0 + t1) > brk for brk in form.breaks)
            step_rates = functools.partial(rates, piece)
            z, a, a_theta = _rk_step(tab, t1 - t0, (z, a, a_theta), step_rates)
    # a_theta integrated -a df/dtheta from t_i down to t_{i-1}: the gradient is its negative.
    sizes = [p.size for p in case.params]
    flat = np.split(-a_theta, np.cumsum(sizes)[:-1])
    g_params = tuple(g.reshape(p.shape) for g, p in zip(flat, case.params, strict=True))
    a0 = a.reshape(case.y0.shape)
    f0 = np.asarray(case.func(case.time_argument(ts[0]), case.y0, case.params))
    g_t = forward.gradient["t"].copy()
    g_t[0] = -np.sum(a0 * f0)
    gradient = {"y0": a0 + ys_bar[0].reshape(case.y0.shape), "params": g_params, "t": g_t}
    source = f"exact {variant.method} backsolve steps"
    return Reference(forward.ys, gradient, forward.magnitude, source)


def _shifted(params):
    """Every parameter entry in turn shifted by the complex step."""
    for k, p in enumerate(params):
        for j in range(p.size):
            shifted = p.astype(complex).reshape(-1)
            shifted[j] += 1j * COMPLEX_STEP
            yield _replace(params, k, shifted.reshape(p.shape))


def _rk_step(tab, h, state, rates):
    """One explicit Runge-Kutta step of ``state' = rates(state)`` (a tuple of arrays)."""
    ks = []

    def advance(weights):
        return tuple(
            x + h * sum(w * k[j] for w, k in zip(weights, ks, strict=True))
            for j, x in enumerate(state)
        )

    for row in tab.a:
        ks.append(rates(advance(row)))
    return advance(tab.b)


def variant_reference(variant: Variant, mode: str | None = None) -> Reference:
    """What a variant's results are compared with: for a fixed-step method the exact result
    of its steps (the discrete solution and its gradient, or the discrete backsolve); the
    exact solution otherwise."""
    if not variant.fixed_step:
        return continuous_reference(variant.case)
    if mode == "backsolve":
        return discrete_backsolve_reference(variant)
    return discrete_reference(variant)


def _stop_times(variant: Variant) -> list[float]:
    opts = variant.solver_options or {}
    return [float(x) for key in ("step_t", "jump_t") for x in np.ravel(opts.get(key, []))]


def fixed_step_boundaries(ts, step_size, stop_times) -> np.ndarray:
    """The times a fixed-step solve steps through, from ``ts[0]`` to ``ts[-1]``.

    As documented for ``odecore.solve``: steps of ``step_size`` (or, without it, one step to
    each next output time), each landing exactly on the next stop (``step_t``, ``jump_t``, the
    end) that it would reach or pass; a step within a relative 1e-7 of a stop is stretched to
    it. Times run in the direction of ``ts``.
    """
    sign = 1.0 if ts[-1] > ts[0] else -1.0
    s = sign * np.asarray(ts, dtype=np.float64)
    stops = {sign * x for x in stop_times if s[0] < sign * x < s[-1]} | {s[-1]}
    if step_size is None:
        stops |= set(s[1:])
    stops = sorted(stops)
    here, out = s[0], [s[0]]
    while here < s[-1]:
        next_stop = min(x for x in stops if x > here)
        gap = next_stop - here
        step = math.inf if step_size is None else step_size
        here = next_stop if step >= gap * (1.0 - 1e-7) else here + step
        out.append(here)
    return sign * np.asarray(out)


def _taylor(degree: int) -> Callable[[np.ndarray], np.ndarray]:
    def polynomial(z):
        term, total = np.eye(len(z), dtype=z.dtype), np.eye(len(z), dtype=z.dtype)
        for k in range(1, degree + 1):
            term = term @ z / k
            total = total + term
        return total

    return polynomial


def _linear_outputs(form: LinearForm, params, y0, ts, boundaries, propagator) -> np.ndarray:
    """``y`` at ``ts`` for ``z' = M z``, advanced by ``propagator(h M)`` from each boundary to
    the next. Every output time must be a boundary."""
    n = y0.size
    dtype = np.result_type(y0, *params, complex if np.iscomplexobj(y0) else float)
    z = np.concatenate([np.reshape(y0, -1), form.extra(ts[0])]).astype(dtype)
    out, k = [np.reshape(z[:n], y0.shape)], 1
    for a, b in zip(boundaries[:-1], boundaries[1:], strict=True):
        piece = sum(0.5 * (a + b) > brk for brk in form.breaks)
        z = propagator((b - a) * form.matrix(params, piece)) @ z
        if k < len(ts) and b == ts[k]:
            out.append(np.reshape(z[:n], y0.shape))
            k += 1
    if k != len(ts):
        raise ValueError("an output time is not a step boundary; choose step_size to divide it")
    return np.stack(out)


def _exact_linear_outputs(form: LinearForm, params, y0, ts) -> np.ndarray:
    breaks = [b for b in form.breaks if min(ts[0], ts[-1]) < b < max(ts[0], ts[-1])]
    boundaries = np.asarray(sorted({*ts, *breaks}, reverse=bool(ts[-1] < ts[0])))
    return _linear_outputs(form, params, y0, ts, boundaries, expm)


def _complex_step_jacobians(outputs, y0, params):
    """``outputs(y0, params)`` and its Jacobians in ``y0`` and each parameter, by the
    complex step (``outputs`` is analytic in both)."""
    ys = np.real(outputs(y0, params))
    T = ys.shape[0]

    def jacobian(x, evaluate):
        jac = np.empty((T, *y0.shape, x.size))
        for j in range(x.size):
            shifted = x.astype(complex).reshape(-1)
            shifted[j] += 1j * COMPLEX_STEP
            jac[..., j] = np.imag(evaluate(shifted.reshape(x.shape))) / COMPLEX_STEP
        return jac.reshape(T, *y0.shape, *x.shape)

    s_y0 = jacobian(y0, lambda v: outputs(v, params))
    s_params = tuple(
        jacobian(p, lambda v, k=k: outputs(y0, _replace(params, k, v)))
        for k, p in enumerate(params)
    )
    return ys, s_y0, s_params


def _replace(params, k, value):
    return tuple(value if j == k else p for j, p in enumerate(params))


def _linear_case(name, description, form: LinearForm, **kwargs) -> Case:
    """A case whose reference is its LinearForm's exact flow (scipy.linalg.expm), its
    sensitivities by the complex step."""
    y0, params = kwargs["y0"], kwargs["params"]

    def reference(ts):
        return _exact_linear_outputs(form, params, y0, ts)

    def sensitivities(ts):
        _, s_y0, s_params = _complex_step_jacobians(
            lambda y, p: _exact_linear_outputs(form, p, y, ts), y0, params
        )
        return s_y0, s_params

    return Case(
        name=name,
        description=description,
        reference=reference,
        reference_source="scipy.linalg.expm of the extended linear system, piece by piece",
        sensitivities=sensitivities,
        gradient_source="complex step through scipy.linalg.expm",
        linear=form,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# Exponential decay y' = -k y with a rate parameter: closed-form values and gradient.


def _decay_func(t, y, params):
    (k,) = params
    return -k * y


def _decay_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (k,) = params
    return -k * cotangent, (-xp.sum(cotangent * y),)


def _decay_kernel(t, y, dy, p):
    for i in range(y.shape[0]):
        dy[i] = -p[0] * y[i]


def _decay_kernel_vjp(t, y, p, cotangent, y_bar, p_bar):
    p_bar[0] = 0.0
    for i in range(y.shape[0]):
        y_bar[i] = -p[0] * cotangent[i]
        p_bar[0] -= cotangent[i] * y[i]


_decay_kernel.vjp = _decay_kernel_vjp


def _decay_case() -> Case:
    y0 = np.array([1.0, 2.0, -0.5])
    k = 0.7

    def reference(ts):
        return np.exp(-k * ts)[:, None] * y0

    def sensitivities(ts):
        decay = np.exp(-k * ts)
        s_y0 = decay[:, None, None] * np.eye(3)
        s_k = (-ts * decay)[:, None] * y0  # d/dk of y0 exp(-k t)
        return s_y0, (s_k,)

    return Case(
        name="decay",
        description="y' = -k y, three components, k = 0.7",
        kernel=_decay_kernel,
        func=_decay_func,
        vjp=_decay_vjp,
        y0=y0,
        params=(np.asarray(k),),
        times=tuple(np.linspace(0.0, 2.0, 5)),
        reference=reference,
        reference_source="closed form y0 exp(-k t)",
        sensitivities=sensitivities,
        gradient_source="closed form: dy/dy0 = exp(-k t) I, dy/dk = -t y0 exp(-k t)",
        linear=LinearForm(lambda p, piece: -p[0] * np.eye(3)),
    )


# --------------------------------------------------------------------------------------------
# Linear system y' = A y with the matrix A as the parameter: expm and its Fréchet derivative.


def _matrix_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    (a,) = params
    return xp.matmul(a, y)


def _matrix_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (a,) = params
    # d(A y)/dy = A, so cot_y = A^T cot; d(A y)_i/dA_jl = delta_ij y_l, so cot_A = cot y^T.
    return xp.matmul(cotangent, a), (cotangent[:, None] * y[None, :],)


def _matrix_kernel(t, y, dy, p):
    # p is the matrix, row by row, then (for the affine case) the vector multiplying t.
    n = y.shape[0]
    for i in range(n):
        total = 0.0
        for j in range(n):
            total += p[i * n + j] * y[j]
        dy[i] = total + (t * p[n * n + i] if p.shape[0] > n * n else 0.0)


def _matrix_kernel_vjp(t, y, p, cotangent, y_bar, p_bar):
    n = y.shape[0]
    for j in range(n):
        total = 0.0
        for i in range(n):
            total += p[i * n + j] * cotangent[i]
            p_bar[i * n + j] = cotangent[i] * y[j]
        y_bar[j] = total
    if p.shape[0] > n * n:
        for i in range(n):
            p_bar[n * n + i] = t * cotangent[i]


_matrix_kernel.vjp = _matrix_kernel_vjp


def _linear3_case() -> Case:
    # Eigenvalues: a complex pair -0.24 +- 1.24i and a real decay -1.02.
    a = np.array([[-0.4, 1.2, 0.0], [-1.0, -0.2, 0.5], [0.3, -0.6, -0.9]])
    y0 = np.array([1.0, -0.5, 0.8])

    def reference(ts):
        return np.stack([expm(t * a) @ y0 for t in ts])

    def sensitivities(ts):
        s_y0 = np.stack([expm(t * a) for t in ts])
        s_a = np.zeros((len(ts), 3, 3, 3))
        for i, t in enumerate(ts):
            for j in range(3):
                for m in range(3):
                    # y(t) = expm(t A) y0 and d(t A)/dA_jm = t E_jm.
                    direction = np.zeros((3, 3))
                    direction[j, m] = t
                    frechet = expm_frechet(t * a, direction, compute_expm=False)
                    s_a[i, :, j, m] = frechet @ y0
        return s_y0, (s_a,)

    return Case(
        name="linear3",
        description="y' = A y, 3x3, A a parameter (complex pair and a decay)",
        kernel=_matrix_kernel,
        func=_matrix_func,
        vjp=_matrix_vjp,
        y0=y0,
        params=(a,),
        times=tuple(np.linspace(0.0, 2.0, 5)),
        reference=reference,
        reference_source="scipy.linalg.expm(t A) @ y0",
        sensitivities=sensitivities,
        gradient_source=(
            "dy/dy0 = expm(t A); dy/dA_jm = expm_frechet(t A, t E_jm) @ y0 (scipy.linalg)"
        ),
        linear=LinearForm(lambda p, piece: p[0]),
    )


# --------------------------------------------------------------------------------------------
# Harmonic oscillator x'' = -omega^2 x, state (x, v): closed form and its omega-derivative.


def _harmonic_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    (omega,) = params
    return xp.stack([y[1], -(omega * omega) * y[0]])


def _harmonic_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (omega,) = params
    cot_y = xp.stack([-(omega * omega) * cotangent[1], cotangent[0]])
    return cot_y, (-2.0 * omega * y[0] * cotangent[1],)


def _harmonic_matrix(params, piece):
    (omega,) = params
    return np.array([[0.0, 1.0], [-(omega * omega), 0.0]], dtype=np.result_type(omega, float))


def _harmonic_kernel(t, y, dy, p):
    dy[0] = y[1]
    dy[1] = -(p[0] * p[0]) * y[0]


def _harmonic_kernel_vjp(t, y, p, cotangent, y_bar, p_bar):
    y_bar[0] = -(p[0] * p[0]) * cotangent[1]
    y_bar[1] = cotangent[0]
    p_bar[0] = -2.0 * p[0] * y[0] * cotangent[1]


_harmonic_kernel.vjp = _harmonic_kernel_vjp


def _harmonic_case(dtype: str = "float64") -> Case:
    y0 = np.array([1.0, 0.5])
    omega = 2.0

    def reference(ts):
        c, s = np.cos(omega * ts), np.sin(omega * ts)
        x0, v0 = y0
        return np.stack([x0 * c + v0 * s / omega, -x0 * omega * s + v0 * c], axis=-1)

    def sensitivities(ts):
        c, s = np.cos(omega * ts), np.sin(omega * ts)
        x0, v0 = y0
        s_y0 = np.stack([np.stack([c, s / omega], -1), np.stack([-omega * s, c], -1)], axis=1)
        dx = -x0 * ts * s + v0 * (ts * c / omega - s / omega**2)
        dv = -x0 * (s + omega * ts * c) - v0 * ts * s
        return s_y0, (np.stack([dx, dv], axis=-1),)

    float32 = dtype == "float32"
    return Case(
        name="harmonic-float32" if float32 else "harmonic",
        description=f"x'' = -omega^2 x, omega = 2, state (x, v), {dtype}",
        kernel=_harmonic_kernel,
        func=_harmonic_func,
        vjp=_harmonic_vjp,
        y0=y0,
        params=(np.asarray(omega),),
        times=tuple(np.linspace(0.0, 4.0, 5)),
        reference=reference,
        reference_source="closed form x0 cos(w t) + v0 sin(w t) / w",
        sensitivities=sensitivities,
        gradient_source="closed form: derivatives of the solution in x0, v0 and omega",
        dtype=dtype,
        # float32: the unit roundoff is 6e-8, so these are tolerances a float32 state can
        # honour with a few dozen steps.
        rtol=1e-5 if float32 else 1e-10,
        atol=1e-7 if float32 else 1e-12,
        linear=LinearForm(_harmonic_matrix),
    )


# --------------------------------------------------------------------------------------------
# A non-autonomous scalar problem y' = -a y + sin(t), with a 0-d state.


def _forced_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    (a,) = params
    return -a * y + xp.sin(t)


def _forced_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (a,) = params
    return -a * cotangent, (-xp.sum(cotangent * y),)


def _forced_kernel(t, y, dy, p):
    dy[0] = -p[0] * y[0] + math.sin(t)


def _forced_kernel_vjp(t, y, p, cotangent, y_bar, p_bar):
    y_bar[0] = -p[0] * cotangent[0]
    p_bar[0] = -y[0] * cotangent[0]


_forced_kernel.vjp = _forced_kernel_vjp


def _forced_case() -> Case:
    y0 = np.asarray(1.0)
    a = 0.7
    d = 1.0 + a * a

    def reference(ts):
        # Variation of constants: y = (y0 + 1/d) e^{-a t} + (a sin t - cos t) / d.
        return (float(y0) + 1.0 / d) * np.exp(-a * ts) + (a * np.sin(ts) - np.cos(ts)) / d

    def sensitivities(ts):
        e = np.exp(-a * ts)
        s_y0 = e
        s_a = (
            -2.0 * a / d**2 * e
            - ts * (float(y0) + 1.0 / d) * e
            + np.sin(ts) / d
            - 2.0 * a * (a * np.sin(ts) - np.cos(ts)) / d**2
        )
        return s_y0, (s_a,)

    return Case(
        name="forced",
        description="y' = -a y + sin(t), a = 0.7, 0-d state",
        kernel=_forced_kernel,
        func=_forced_func,
        vjp=_forced_vjp,
        y0=y0,
        params=(np.asarray(a),),
        times=tuple(np.linspace(0.0, 4.0, 5)),
        reference=reference,
        reference_source="closed form (variation of constants)",
        sensitivities=sensitivities,
        gradient_source="closed form: derivatives of the variation-of-constants solution",
    )


# --------------------------------------------------------------------------------------------
# Lotka-Volterra: references from scipy's DOP853 at 1e-13.


def _lotka_volterra_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    a, b, c, d = params
    prey, predator = y[0], y[1]
    return xp.stack([a * prey - b * prey * predator, -c * predator + d * prey * predator])


def _lotka_volterra_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    a, b, c, d = params
    u, v = y[0], y[1]
    g_u, g_v = cotangent[0], cotangent[1]
    cot_y = xp.stack([g_u * (a - b * v) + g_v * d * v, -g_u * b * u + g_v * (d * u - c)])
    return cot_y, (g_u * u, -g_u * u * v, -g_v * v, g_v * u * v)


def _lotka_volterra_kernel(t, y, dy, p):
    prey, predator = y[0], y[1]
    dy[0] = p[0] * prey - p[1] * prey * predator
    dy[1] = -p[2] * predator + p[3] * prey * predator


def _lotka_volterra_kernel_vjp(t, y, p, cotangent, y_bar, p_bar):
    u, v = y[0], y[1]
    g_u, g_v = cotangent[0], cotangent[1]
    y_bar[0] = g_u * (p[0] - p[1] * v) + g_v * p[3] * v
    y_bar[1] = -g_u * p[1] * u + g_v * (p[3] * u - p[2])
    p_bar[0] = g_u * u
    p_bar[1] = -g_u * u * v
    p_bar[2] = -g_v * v
    p_bar[3] = g_v * u * v


_lotka_volterra_kernel.vjp = _lotka_volterra_kernel_vjp


def _lotka_volterra_case() -> Case:
    y0 = np.array([1.0, 1.0])
    p = (1.5, 1.0, 3.0, 1.0)
    tol = SCIPY_REFERENCE_TOL

    def rhs(t, y):
        a, b, c, d = p
        u, v = y
        return np.array([a * u - b * u * v, -c * v + d * u * v])

    def variational(t, z):
        # z = (y, S) with S = dy/d(y0, a, b, c, d), 2 x 6: S' = J_y S + [0 | J_p].
        a, b, c, d = p
        u, v = z[:2]
        s = z[2:].reshape(2, 6)
        j_y = np.array([[a - b * v, -b * u], [d * v, d * u - c]])
        j_p = np.array([[u, -u * v, 0.0, 0.0], [0.0, 0.0, -v, u * v]])
        ds = j_y @ s
        ds[:, 2:] += j_p
        return np.concatenate([rhs(t, z[:2]), ds.ravel()])

    def segments(fun, z0, ts):
        """Solve ``[ts[i-1], ts[i]]`` one after another, so every output is a step end."""
        out, z = [np.asarray(z0, dtype=float)], np.asarray(z0, dtype=float)
        for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
            sol = solve_ivp(fun, (t0, t1), z, method="DOP853", rtol=tol, atol=tol)
            if not sol.success:
                raise RuntimeError(f"scipy reference solve failed: {sol.message}")
            z = sol.y[:, -1]
            out.append(z)
        return np.stack(out)

    @functools.lru_cache(maxsize=4)
    def reference_cached(ts):
        return segments(rhs, y0, np.asarray(ts))

    @functools.lru_cache(maxsize=4)
    def sensitivities_cached(ts):
        s0 = np.concatenate([np.eye(2), np.zeros((2, 4))], axis=1)
        z = segments(variational, np.concatenate([y0, s0.ravel()]), np.asarray(ts))
        s = z[:, 2:].reshape(len(ts), 2, 6)
        return s[:, :, :2], tuple(s[:, :, 2 + k] for k in range(4))

    return Case(
        name="lotka-volterra",
        description="u' = a u - b u v, v' = -c v + d u v; (a, b, c, d) = (1.5, 1, 3, 1)",
        kernel=_lotka_volterra_kernel,
        func=_lotka_volterra_func,
        vjp=_lotka_volterra_vjp,
        y0=y0,
        params=tuple(np.asarray(x) for x in p),
        times=tuple(np.linspace(0.0, 4.0, 5)),
        reference=lambda ts: reference_cached(tuple(ts)),
        reference_source=f"scipy solve_ivp DOP853, rtol = atol = {tol:g}",
        sensitivities=lambda ts: sensitivities_cached(tuple(ts)),
        gradient_source=(
            f"forward variational equations solved by scipy DOP853, rtol = atol = {tol:g}"
        ),
    )


# --------------------------------------------------------------------------------------------
# A batch of decays (batch_axis=0): rates 25 times apart, so every sample takes its own
# number of steps.


def _batched_decay_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (k,) = params
    return -k * cotangent, (-xp.sum(cotangent * y, axis=1, keepdims=True),)


def _batched_decay_case() -> Case:
    y0 = np.array([[1.0, 2.0], [1.0, -1.0], [0.5, 0.5], [2.0, 1.0]])
    k = np.array([[0.3], [1.0], [3.0], [8.0]])  # one rate per sample, shape (4, 1)
    batch, size = y0.shape

    def reference(ts):
        return np.exp(-k[None] * ts[:, None, None]) * y0

    def sensitivities(ts):
        decay = np.exp(-k[None] * ts[:, None, None])  # (T, 4, 1)
        s_y0 = np.zeros((len(ts), batch, size, batch, size))
        s_k = np.zeros((len(ts), batch, size, batch, 1))
        for b in range(batch):
            for i in range(size):
                s_y0[:, b, i, b, i] = decay[:, b, 0]
                s_k[:, b, i, b, 0] = -ts * decay[:, b, 0] * y0[b, i]
        return s_y0, (s_k,)

    return Case(
        name="batched-decay",
        description="4 samples of y' = -k_b y (2 components each), k_b from 0.3 to 8",
        kernel=_decay_kernel,
        func=_decay_func,
        vjp=_batched_decay_vjp,
        y0=y0,
        params=(k,),
        times=tuple(np.linspace(0.0, 2.0, 5)),
        reference=reference,
        reference_source="closed form y0 exp(-k_b t) per sample",
        sensitivities=sensitivities,
        gradient_source="closed form, per sample: dy/dy0 = exp(-k t), dy/dk = -t y0 exp(-k t)",
        batch_axis=0,
    )


# --------------------------------------------------------------------------------------------
# y' = A y + t b solved backward in time, from t = 1 down to 0: the time-dependent term
# catches a sign lost when the solver runs time forward internally.


def _affine_in_time_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    a, b = params
    return xp.matmul(a, y) + t * b


def _affine_in_time_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    a, _ = params
    return xp.matmul(cotangent, a), (cotangent[:, None] * y[None, :], t * cotangent)


def _affine_in_time_matrix(params, piece):
    # z = (y, t, 1): y' = A y + t b, t' = 1.
    a, b = params
    m = np.zeros((4, 4), dtype=np.result_type(a, b, float))
    m[:2, :2] = a
    m[:2, 2] = b
    m[2, 3] = 1.0
    return m


def _reversed_case() -> Case:
    return _linear_case(
        "reversed",
        "y' = A y + t b, 2x2, solved from t = 1 down to t = 0",
        LinearForm(_affine_in_time_matrix, extra=lambda t0: np.array([t0, 1.0])),
        kernel=_matrix_kernel,
        func=_affine_in_time_func,
        vjp=_affine_in_time_vjp,
        y0=np.array([1.0, 0.5]),
        params=(np.array([[-0.5, 1.0], [-1.5, -0.3]]), np.array([0.4, -0.8])),
        times=tuple(np.linspace(1.0, 0.0, 5)),
    )


# --------------------------------------------------------------------------------------------
# A rate and a source that jump at t = 0.75: y' = -k(t) y + b(t). The solution has a kink
# there, and every parameter's sensitivity switches on or off. The jump in f is modest, so
# a backward solve that crosses it without landing, with the parameter adjoint left out of
# its error control (seminorm), takes a step long enough for the switch's quadrature error
# to exceed the tolerance a thousandfold. At t = 0.75 itself f takes the value before the
# jump (``t <= JUMP_TIME``): a step that starts on the jump must evaluate just after it, and
# one that evaluated at the jump itself would take the wrong piece.

JUMP_TIME = 0.75


def _jump_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    k1, k2, b1, b2 = params
    before = t <= JUMP_TIME
    return -xp.where(before, k1, k2) * y + xp.where(before, b1, b2)


def _jump_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    k1, k2, b1, b2 = params
    before = t <= JUMP_TIME
    zero = xp.zeros_like(k1)
    cot_rate, cot_source = -xp.sum(cotangent * y), xp.sum(cotangent)
    cot_params = (
        xp.where(before, cot_rate, zero),
        xp.where(before, zero, cot_rate),
        xp.where(before, cot_source, zero),
        xp.where(before, zero, cot_source),
    )
    return -xp.where(before, k1, k2) * cotangent, cot_params


def _jump_matrix(params, piece):
    # z = (y, 1): y' = -k y + b, with (k, b) = (k1, b1) before the jump and (k2, b2) after.
    k = params[piece]
    b = params[2 + piece]
    m = np.zeros((3, 3), dtype=np.result_type(*params, float))
    m[:2, :2] = -k * np.eye(2)
    m[:2, 2] = b
    return m


def _jump_kernel(t, y, dy, p):
    before = t <= JUMP_TIME
    rate = p[0] if before else p[1]
    source = p[2] if before else p[3]
    for i in range(y.shape[0]):
        dy[i] = -rate * y[i] + source


def _jump_kernel_vjp(t, y, p, cotangent, y_bar, p_bar):
    before = t <= JUMP_TIME
    rate = p[0] if before else p[1]
    cot_rate = 0.0
    cot_source = 0.0
    for i in range(y.shape[0]):
        y_bar[i] = -rate * cotangent[i]
        cot_rate -= cotangent[i] * y[i]
        cot_source += cotangent[i]
    for k in range(4):
        p_bar[k] = 0.0
    p_bar[0 if before else 1] = cot_rate
    p_bar[2 if before else 3] = cot_source


_jump_kernel.vjp = _jump_kernel_vjp


def _jump_case() -> Case:
    return _linear_case(
        "jump",
        f"y' = -k y + b, (k, b) = (0.8, 0.5) before t = {JUMP_TIME} and (0.9, 0.45) after",
        LinearForm(_jump_matrix, extra=lambda t0: np.ones(1), breaks=(JUMP_TIME,)),
        kernel=_jump_kernel,
        func=_jump_func,
        vjp=_jump_vjp,
        y0=np.array([1.0, -2.0]),
        params=tuple(np.asarray(x) for x in (0.8, 0.9, 0.5, 0.45)),
        times=tuple(np.linspace(0.0, 2.0, 5)),
        options={"jump_t": (JUMP_TIME,)},
        rtol=1e-8,
        atol=1e-10,
    )


# --------------------------------------------------------------------------------------------
# The catalogue

DECAY = _decay_case()
LINEAR3 = _linear3_case()
HARMONIC = _harmonic_case()
FORCED = _forced_case()
LOTKA_VOLTERRA = _lotka_volterra_case()
BATCHED_DECAY = _batched_decay_case()
REVERSED = _reversed_case()
JUMP = _jump_case()
HARMONIC_FLOAT32 = _harmonic_case("float32")

CASES: tuple[Case, ...] = (
    DECAY,
    LINEAR3,
    HARMONIC,
    FORCED,
    LOTKA_VOLTERRA,
    BATCHED_DECAY,
    REVERSED,
    JUMP,
    HARMONIC_FLOAT32,
)

# Fixed-step methods take 1/16 (a binary fraction, so the grid is exact and lands on every
# output time) or one step per interval between stops.
STEP = 1.0 / 16.0
# Order-2 adaptive methods need about tol^(-1/2) steps: at the cases' 1e-10 that would be
# tens of thousands.
LOW_ORDER_TOLERANCES = {"rtol": 1e-6, "atol": 1e-8}


def _variants() -> tuple[Variant, ...]:
    v = Variant
    grid_step_t = (("step_t", (0.25, 1.375)),)
    return (
        # Every fixed-step method with a step size, and on the grid of stops.
        *(v(LINEAR3, m, step_size=STEP) for m in FIXED_STEP_METHODS),
        *(v(JUMP, m) for m in FIXED_STEP_METHODS),
        v(DECAY, "euler", step_size=STEP),
        v(HARMONIC, "heun2"),
        v(JUMP, "rk4", step_size=STEP),
        v(JUMP, "heun3", options=grid_step_t),
        v(LINEAR3, "midpoint", options=grid_step_t),
        v(REVERSED, "rk4", step_size=STEP),
        v(REVERSED, "heun3"),
        v(HARMONIC_FLOAT32, "rk4", step_size=STEP),
        # Every adaptive method, with each option.
        *(v(DECAY, m, **LOW_ORDER_TOLERANCES) for m in ("adaptive_heun", "fehlberg2")),
        v(DECAY, "bosh3"),
        v(DECAY, "dopri5"),
        v(LINEAR3, "dopri5"),
        v(LINEAR3, "dopri8"),
        v(LINEAR3, "bosh3", options=(("step_t", (0.3, 1.1)),)),
        v(HARMONIC, "dopri5"),
        v(HARMONIC, "tsit5"),
        v(HARMONIC, "dopri8", options=(("first_step", 1e-3),)),
        v(HARMONIC_FLOAT32, "dopri5"),
        v(FORCED, "dopri5"),
        v(FORCED, "tsit5", options=(("first_step", 0.01), ("step_t", (0.3, 2.2)))),
        v(LOTKA_VOLTERRA, "dopri5"),
        v(LOTKA_VOLTERRA, "dopri8"),
        v(BATCHED_DECAY, "dopri5"),
        v(BATCHED_DECAY, "bosh3"),
        v(REVERSED, "dopri5"),
        v(REVERSED, "tsit5", options=(("first_step", 0.02),)),
        v(JUMP, "dopri5"),
        v(JUMP, "dopri5", seminorm=True),
        v(JUMP, "bosh3"),
        v(JUMP, "tsit5", seminorm=True, options=(("step_t", (0.3,)),)),
        v(JUMP, "dopri8"),
    )


# The subset CI runs: every method, and every backend x method family x gradient mode x
# option (step_t, jump_t, first_step, seminorm, step size or grid), batches, decreasing times
# and float32, each have a cell. Variants carry several of these at once where that costs
# nothing in coverage, since every compiled variant costs seconds on JAX.
CI_VARIANT_IDS = (
    "harmonic/dopri5",
    "forced/tsit5[first_step,step_t]",
    "jump/dopri5[jump_t]",
    "jump/dopri5[jump_t,seminorm]",
    "jump/bosh3[jump_t]",
    "linear3/dopri8",
    "decay/adaptive_heun[rtol=1e-06]",
    "decay/fehlberg2[rtol=1e-06]",
    "batched-decay/dopri5",
    "reversed/dopri5",
    "harmonic-float32/dopri5",
    "reversed/rk4[h=1/16]",
    "harmonic-float32/rk4[h=1/16]",
    "jump/heun3[grid,jump_t,step_t]",
    *(f"jump/{method}[grid,jump_t]" for method in ("euler", "midpoint", "heun2")),
)


def _with_ci_marks(variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
    ids = {variant.id for variant in variants}
    missing = [i for i in CI_VARIANT_IDS if i not in ids]
    assert not missing, f"CI_VARIANT_IDS names unknown variants: {missing}"
    return tuple(dataclasses.replace(v, ci=v.id in CI_VARIANT_IDS) for v in variants)


VARIANTS: tuple[Variant, ...] = _with_ci_marks(_variants())

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
assert len({v.id for v in VARIANTS}) == len(VARIANTS), "variant ids must be unique"
assert {v.method for v in VARIANTS} == {*FIXED_STEP_METHODS, *ADAPTIVE_METHODS}, (
    "a method is missing"
)
