"""The conformance catalogue: problems that every backend must solve alike.

A :class:`Case` is an initial value problem ``y' = func(t, y, params)`` with

- dynamics written only against the Python array API (the namespace comes from the state,
  through array-api-compat), so that one function runs on every backend;
- a hand-written vector-Jacobian product ``vjp(t, y, params, cotangent) -> (cot_y,
  cot_params)``: backends without autodiff take their gradients from it (DESIGN.md,
  "Dynamics"), and the suite checks it against finite differences of ``func``;
- a reference solution computed without odecore: a closed form, or scipy's DOP853 at
  rtol = atol = 1e-13 (``reference_source`` says which);
- reference sensitivities ``dy(t_i)/dy0`` and ``dy(t_i)/dparams`` (``gradient_source`` says how
  they were obtained), from which :func:`reference_gradient` builds the exact gradient of the
  suite's loss.

The loss is the same for every case, ``L(ys) = 0.5 * sum(W * ys**2)`` over all output times,
with weights ``W`` drawn once per case: its cotangent ``W * ys`` weighs every output time and
component differently, so a gradient that drops or swaps an output is caught.

Everything here except the dynamics (the references, the weights) is NumPy and SciPy, float64.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import array_api_compat
import numpy as np
from scipy.integrate import solve_ivp
from scipy.linalg import expm, expm_frechet

__all__ = [
    "CASES",
    "VARIANTS",
    "Case",
    "CaseDynamics",
    "Variant",
    "loss",
    "loss_cotangent",
    "reference_gradient",
]

# scipy's DOP853 at this tolerance is the "high precision" reference for problems without a
# closed form; its global error on the cases below is around 1e-12 relative.
SCIPY_REFERENCE_TOL = 1e-13


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
    methods: tuple[str, ...] = ("dopri5",)
    dtype: str = "float64"
    batch_axis: int | None = None
    # The solver's tolerances.
    rtol: float = 1e-10
    atol: float = 1e-12
    # Accepted error of the outputs: |ys - reference| <= values_atol + values_rtol * |reference|,
    # 100 times the solver's tolerances. The tolerances bound the local error; on these short
    # horizons the measured global errors stay below 1/20 of these bounds for every method.
    values_rtol: float = 1e-8
    values_atol: float = 1e-10
    # Accepted error of each gradient (y0, every parameter, t), relative to its largest entry;
    # the measured errors of both gradient modes stay below 1/15 of it.
    gradient_rtol: float = 1e-7

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
    """A case solved by one method: one row of the summary table per backend."""

    case: Case
    method: str

    @property
    def id(self) -> str:
        return f"{self.case.name}/{self.method}"


def loss(ys, weights):
    """``0.5 * sum(W * ys**2)``, in the namespace of ``ys``."""
    xp = array_api_compat.array_namespace(ys)
    return 0.5 * xp.sum(weights * ys * ys)


def loss_cotangent(ys, weights):
    """``dL/dys``."""
    return weights * ys


def _contract(cot: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """``sum_{i, state} cot[i, state] * jac[i, state, ...]``."""
    return np.tensordot(cot, jac, axes=cot.ndim)


@functools.cache
def reference_gradient(case: Case) -> dict:
    """The exact gradient of the loss at the reference solution: ``{"y0", "params", "t"}``.

    ``y0`` and ``params`` come from the case's sensitivities. The time gradient follows from
    the flow: moving an output time ``t_i`` (i >= 1) moves ``y(t_i)`` at rate
    ``f(t_i, y(t_i))``; moving ``t_0`` with ``y0`` fixed shifts the whole solution, which
    gives ``-(dL/dy0 - W_0 y0) . f(t_0, y0)`` (the adjoint at ``t_0`` without the direct term
    of the output at ``t_0``, which is ``y0`` itself).
    """
    ts = case.ts
    ys = case.reference(ts)
    cot = loss_cotangent(ys, case.loss_weights())
    s_y0, s_params = case.sensitivities(ts)
    g_y0 = _contract(cot, s_y0)
    g_params = tuple(_contract(cot, s) for s in s_params)

    def f(i, y):
        return np.asarray(case.func(case.time_argument(ts[i]), y, case.params))

    g_t = np.empty_like(ts)
    for i in range(1, len(ts)):
        g_t[i] = np.sum(cot[i] * f(i, ys[i]))
    g_t[0] = -np.sum((g_y0 - cot[0]) * f(0, case.y0))
    return {"y0": g_y0, "params": g_params, "t": g_t}


# --------------------------------------------------------------------------------------------
# Exponential decay y' = -k y with a rate parameter: closed-form values and gradient.


def _decay_func(t, y, params):
    (k,) = params
    return -k * y


def _decay_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (k,) = params
    return -k * cotangent, (-xp.sum(cotangent * y),)


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
        func=_decay_func,
        vjp=_decay_vjp,
        y0=y0,
        params=(np.asarray(k),),
        times=tuple(np.linspace(0.0, 3.0, 7)),
        reference=reference,
        reference_source="closed form y0 exp(-k t)",
        sensitivities=sensitivities,
        gradient_source="closed form: dy/dy0 = exp(-k t) I, dy/dk = -t y0 exp(-k t)",
        methods=("dopri5", "bosh3"),
    )


# --------------------------------------------------------------------------------------------
# Linear system y' = A y with the matrix A as the parameter: expm and its Fréchet derivative.


def _linear_func(t, y, params):
    xp = array_api_compat.array_namespace(y)
    (a,) = params
    return xp.matmul(a, y)


def _linear_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (a,) = params
    # d(A y)/dy = A, so cot_y = A^T cot; d(A y)_i/dA_jl = delta_ij y_l, so cot_A = cot y^T.
    return xp.matmul(cotangent, a), (cotangent[:, None] * y[None, :],)


def _linear_case() -> Case:
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
        func=_linear_func,
        vjp=_linear_vjp,
        y0=y0,
        params=(a,),
        times=tuple(np.linspace(0.0, 3.0, 7)),
        reference=reference,
        reference_source="scipy.linalg.expm(t A) @ y0",
        sensitivities=sensitivities,
        gradient_source=(
            "dy/dy0 = expm(t A); dy/dA_jm = expm_frechet(t A, t E_jm) @ y0 (scipy.linalg)"
        ),
        methods=("dopri5", "dopri8"),
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
        func=_harmonic_func,
        vjp=_harmonic_vjp,
        y0=y0,
        params=(np.asarray(omega),),
        times=tuple(np.linspace(0.0, 5.0, 11)),
        reference=reference,
        reference_source="closed form x0 cos(w t) + v0 sin(w t) / w",
        sensitivities=sensitivities,
        gradient_source="closed form: derivatives of the solution in x0, v0 and omega",
        methods=("dopri5",) if float32 else ("dopri5", "tsit5", "dopri8"),
        dtype=dtype,
        # float32: machine epsilon is 6e-8, so the tolerances and the accepted errors are
        # those a float32 state can honour.
        rtol=1e-6 if float32 else 1e-10,
        atol=1e-8 if float32 else 1e-12,
        values_rtol=1e-4 if float32 else 1e-8,
        values_atol=1e-5 if float32 else 1e-10,
        gradient_rtol=1e-4 if float32 else 1e-7,
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
        func=_forced_func,
        vjp=_forced_vjp,
        y0=y0,
        params=(np.asarray(a),),
        times=tuple(np.linspace(0.0, 4.0, 9)),
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
        func=_lotka_volterra_func,
        vjp=_lotka_volterra_vjp,
        y0=y0,
        params=tuple(np.asarray(x) for x in p),
        times=tuple(np.linspace(0.0, 4.0, 9)),
        reference=lambda ts: reference_cached(tuple(ts)),
        reference_source=f"scipy solve_ivp DOP853, rtol = atol = {tol:g}",
        sensitivities=lambda ts: sensitivities_cached(tuple(ts)),
        gradient_source=(
            f"forward variational equations solved by scipy DOP853, rtol = atol = {tol:g}"
        ),
        methods=("dopri5", "dopri8"),
    )


# --------------------------------------------------------------------------------------------
# A batch of decays (batch_axis=0): each sample has its own rate, so its own steps.


def _batched_decay_vjp(t, y, params, cotangent):
    xp = array_api_compat.array_namespace(y)
    (k,) = params
    return -k * cotangent, (-xp.sum(cotangent * y, axis=1, keepdims=True),)


def _batched_decay_case() -> Case:
    y0 = np.array([[1.0, 2.0], [1.0, -1.0], [0.5, 0.5], [2.0, 1.0]])
    k = np.array([[0.3], [0.8], [1.5], [4.0]])  # one rate per sample, shape (4, 1)
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
        description="4 samples of y' = -k_b y (2 components each), batch_axis=0",
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


CASES: tuple[Case, ...] = (
    _decay_case(),
    _linear_case(),
    _harmonic_case(),
    _forced_case(),
    _lotka_volterra_case(),
    _batched_decay_case(),
    _harmonic_case("float32"),
)

VARIANTS: tuple[Variant, ...] = tuple(Variant(c, m) for c in CASES for m in c.methods)

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
