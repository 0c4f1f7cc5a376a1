"""Deep-equilibrium fixed points: ``z* = f(z*, params)``, found per sample, differentiated by
the implicit function theorem (or by one step, or by a few unrolled steps).

Everything here is written once against the Backend protocol. The forward solvers share one
init / cond / body loop over a fixed-shape state dict (the internal state is ``(B, N)``);
every update is masked, so a sample that has converged stops changing while the others go on,
and the body has no Python ``if`` on array values. The gradient is one framework-neutral rule
(:class:`FixedPointRule`): ``Backend.custom_vjp`` attaches it to torch's autograd, and NumPy
users get its backward as a pullback from :func:`vjp_fixed_point`, built on ``f``'s own VJP.

The implicit backward solves ``u = w + u J_f(z*)`` (``w`` the cotangent of ``z*``) by running
the same loop on the map ``u -> w + u J_f(z*)``, or by GMRES on ``u (I - J_f) = w``; the
parameter gradient is then ``u df/dparams``.
"""

from __future__ import annotations

import enum
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from odecore._config import resolve_backend
from odecore._solution import SolveError
from odecore.backend import differentiate
from odecore.backend.tree import leaves as tree_leaves

SOLVERS = ("picard", "anderson", "broyden")
BACKWARD_MODES = ("implicit", "one_step", "unrolled")
BACKWARD_SOLVERS = ("picard", "anderson", "broyden", "gmres")
STOP_MODES = ("abs", "rel")


class FixedPointStatus(enum.IntEnum):
    """Per-sample outcome of a fixed-point solve. ``RUNNING`` only appears inside the loop."""

    RUNNING = -1
    CONVERGED = 0
    MAX_ITER_REACHED = 1
    NONFINITE = 3

    def describe(self) -> str:
        return {
            FixedPointStatus.RUNNING: "still running",
            FixedPointStatus.CONVERGED: "converged",
            FixedPointStatus.MAX_ITER_REACHED: (
                "max_iter reached before the residual fell below tol; raise max_iter, loosen "
                "tol, try solver='anderson' or 'broyden', or check that f is a contraction "
                "(odecore.spectral_radius)"
            ),
            FixedPointStatus.NONFINITE: (
                "non-finite residual: f returned NaN or inf; the best finite iterate is kept"
            ),
        }[self]


RUNNING = int(FixedPointStatus.RUNNING)
CONVERGED = int(FixedPointStatus.CONVERGED)
MAX_ITER_REACHED = int(FixedPointStatus.MAX_ITER_REACHED)
NONFINITE = int(FixedPointStatus.NONFINITE)


@dataclass
class FixedPointSolution:
    """The result of :func:`solve_fixed_point`.

    ``z`` is each sample's best iterate (the one with the lowest residual in the stopping
    mode), in the shape of ``z0``. Per sample (arrays of shape ``(B,)``; ``(1,)`` without
    ``batch_axis``): ``iterations``, the final ``abs_residual`` ``||f(z) - z||`` and
    ``rel_residual`` ``||f(z) - z|| / ||f(z)||`` of ``z``, and ``status`` (a
    :class:`FixedPointStatus` code). ``trace[k]`` is the stopping-mode residual after
    iteration ``k`` (row 0 is ``z0``'s), NaN once a sample has stopped. ``stats`` holds
    ``nfev`` (calls of ``f`` on the whole batch) and, after a backward pass through the
    implicit rule, ``backward_iterations`` and ``backward_status``.
    """

    z: Any
    iterations: Any
    abs_residual: Any
    rel_residual: Any
    status: Any
    trace: Any
    solver: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(int(s) == CONVERGED for s in _to_list(self.status))

    @property
    def message(self) -> str:
        codes = sorted({int(s) for s in _to_list(self.status)})
        return "; ".join(FixedPointStatus(c).describe() for c in codes)


def _to_list(x):
    return [x[i] for i in range(x.shape[0])]


class FixedPointError(SolveError):
    """A fixed-point solve did not converge: ``max_iter`` was reached, or ``f`` returned
    NaN or inf. The message names the failed samples, the residual and the iterations;
    ``solution`` holds the :class:`FixedPointSolution`, with each sample's best iterate and
    status. A :class:`~odecore.SolveError`, so that one ``except`` catches every failed
    solve of the library."""


def _failure_message(bk, solution: FixedPointSolution, opts: _Options, batched: bool) -> str:
    status = [int(s) for s in _to_list(solution.status)]
    failed = [i for i, s in enumerate(status) if s != CONVERGED]
    first = failed[0]
    residuals = solution.abs_residual if opts.stop_mode == "abs" else solution.rel_residual
    residual = bk.to_host_float(residuals[first])
    measure = "||f(z) - z||" if opts.stop_mode == "abs" else "||f(z) - z|| / ||f(z)||"
    reasons = "; ".join(FixedPointStatus(c).describe() for c in sorted({status[i] for i in failed}))
    if batched:
        shown = ", ".join(str(i) for i in failed[:10]) + (", ..." if len(failed) > 10 else "")
        where = (
            f" for {len(failed)} of {len(status)} samples (indices {shown}); the best iterate "
            f"of sample {first}"
        )
    else:
        where = ": its best iterate"
    return (
        f"odecore: the fixed-point solve ({solution.solver}) did not converge{where} has "
        f"residual {measure} = {residual:.6g} (tol {opts.tol:g}) after "
        f"{int(solution.iterations[first])} iterations: {reasons}. Pass throw=False to get "
        f"the best iterates with a per-sample status instead"
    )


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class _Options:
    solver: str
    tol: float
    stop_mode: str
    max_iter: int
    m: int
    lam: float
    beta: float
    damping: float
    backward: str
    backward_solver: str
    backward_tol: float
    backward_max_iter: int
    unroll_steps: int
    unroll_damping: float
    throw: bool


def _choice(name, value, valid):
    names = ", ".join(repr(v) for v in valid)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {names}; got {_describe(value)}")
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {names}")


def _integer(name, value, least=1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {least}, got {_describe(value)}")
    if value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def _number(name, value, low, high, low_open=False) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float), got {_describe(value)}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high) or (low_open and value == low):
        bracket = "(" if low_open else "["
        closing = ")" if high == math.inf else "]"
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}{closing}, got {value!r}")
    return value


def _describe(value) -> str:
    """What a wrong value is, for an error message: its type, and its value when short."""
    if value is None:
        return "None"
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    shown = repr(value)
    return f"{name} {shown}" if len(shown) <= 40 else f"a {name}"


def _options(
    solver,
    tol,
    stop_mode,
    max_iter,
    m,
    lam,
    beta,
    damping,
    backward,
    backward_solver,
    backward_tol,
    backward_max_iter,
    unroll_steps,
    unroll_damping,
    throw,
) -> _Options:
    _choice("solver", solver, SOLVERS)
    _choice("stop_mode", stop_mode, STOP_MODES)
    _choice("backward", backward, BACKWARD_MODES)
    _choice("backward_solver", backward_solver, BACKWARD_SOLVERS)
    tol = _number("tol", tol, 0.0, math.inf, low_open=True)
    max_iter = _integer("max_iter", max_iter)
    m = _integer("m", m)
    lam = _number("lam", lam, 0.0, math.inf)
    beta = _number("beta", beta, 0.0, 1.0, low_open=True)
    damping = _number("damping", damping, 0.0, 1.0, low_open=True)
    backward_tol = tol if backward_tol is None else backward_tol
    backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
    backward_tol = _number("backward_tol", backward_tol, 0.0, math.inf, low_open=True)
    backward_max_iter = _integer("backward_max_iter", backward_max_iter)
    if unroll_steps is None:
        unroll_steps = 1 if backward == "one_step" else 5
    unroll_steps = _integer("unroll_steps", unroll_steps)
    if backward == "one_step" and unroll_steps != 1:
        raise ValueError(
            f"backward='one_step' differentiates exactly one step of f; got unroll_steps="
            f"{unroll_steps}: use backward='unrolled' for more"
        )
    unroll_damping = _number("unroll_damping", unroll_damping, 0.0, 1.0, low_open=True)
    if backward == "one_step" and unroll_damping != 1.0:
        raise ValueError("backward='one_step' has no damping; use backward='unrolled'")
    if not isinstance(throw, bool):
        raise TypeError(f"throw must be True or False, got {_describe(throw)}")
    return _Options(
        solver,
        tol,
        stop_mode,
        max_iter,
        m,
        lam,
        beta,
        damping,
        backward,
        backward_solver,
        backward_tol,
        backward_max_iter,
        unroll_steps,
        unroll_damping,
        throw,
    )


# --------------------------------------------------------------------------------------------
# The map in internal (B, N) layout, and its VJP


class _Layout:
    """Between the user's shape of ``z`` and the loop's ``(B, N)``."""

    def __init__(self, bk, z0, batch_axis):
        if batch_axis is not None and (
            isinstance(batch_axis, bool) or not isinstance(batch_axis, numbers.Integral)
        ):
            raise TypeError(
                f"batch_axis must be None or the integer 0, got {_describe(batch_axis)}"
            )
        if batch_axis not in (None, 0):
            raise ValueError(
                f"batch_axis must be None (one sample) or 0 (the first axis indexes samples), "
                f"got {batch_axis!r}; move the sample axis first"
            )
        if batch_axis == 0 and z0.ndim == 0:
            raise ValueError("batch_axis=0 needs z0 with at least one axis")
        self.shape = tuple(z0.shape)
        self.dtype = z0.dtype
        self.batched = batch_axis == 0
        self.batch = self.shape[0] if self.batched else 1
        self.size = math.prod(self.shape) // max(self.batch, 1)

    def to_internal(self, xp, z):
        return xp.reshape(z, (self.batch, self.size))

    def to_user(self, xp, z):
        return xp.reshape(z, self.shape)


class _Map:
    """``f`` with its parameters bound, on internal arrays; and its VJP.

    The VJP goes through ``Backend.dynamics_vjp`` (torch autograd, or ``f.vjp`` on NumPy),
    with ``f`` seen as dynamics that ignore time."""

    def __init__(self, bk, f, params, leaves, layout):
        self.bk, self.f, self.params, self.leaves, self.layout = bk, f, params, leaves, layout
        self.as_dynamics = _AsDynamics(f)

    def rebuilt(self, leaves):
        """This map calling ``f`` with ``leaves`` in place of its params' arrays: a traced
        rule's forward and backward must not capture the caller's differentiated values."""
        leaves = list(leaves)
        return _Map(
            self.bk,
            self.f,
            differentiate.with_leaves(self.bk, self.params, leaves),
            leaves,
            self.layout,
        )

    def user(self, z_user):
        return self.f(z_user) if self.params is None else self.f(z_user, self.params)

    def __call__(self, z):
        xp = self.bk.xp
        out = self.user(self.layout.to_user(xp, z))
        _check_output(self.bk, out, self.layout)
        return self.layout.to_internal(xp, out)

    def vjp(self, z, cot):
        """``(cot J_z, [cot J_leaf, ...])`` at internal ``z`` for internal ``cot``."""
        xp, lay = self.bk.xp, self.layout
        _, cot_z, cot_leaves = differentiate.vjp(
            self.bk,
            self.as_dynamics,
            self.params,
            self.leaves,
            None,
            lay.to_user(xp, z),
            lay.to_user(xp, cot),
        )
        return lay.to_internal(xp, cot_z), cot_leaves


def _check_output(bk, out, layout):
    """``f``'s value must be an array like ``z``: the loop mixes it with ``z`` and would
    fail later, far from the cause, or silently change precision."""
    expected = f"a {bk.name} array shaped like z {layout.shape} with z's dtype {layout.dtype}"
    if not bk.owns(out):
        raise TypeError(f"f must return {expected}; it returned {_describe(out)}")
    if tuple(out.shape) != layout.shape:
        raise ValueError(
            f"f returned shape {tuple(out.shape)} for z of shape {layout.shape}; a "
            f"fixed-point map must return an array shaped like z"
        )
    if out.dtype != layout.dtype:
        raise TypeError(
            f"f returned dtype {out.dtype} for z of dtype {layout.dtype}; a fixed-point map "
            f"must keep z's dtype: give z0 and params the same dtype"
        )


class _AsDynamics:
    def __init__(self, f):
        self.f = f
        user_vjp = getattr(f, "vjp", None)
        if user_vjp is not None:
            self.vjp = lambda t, z, params, cot: user_vjp(z, params, cot)

    def __call__(self, t, z, params=None):
        return self.f(z) if params is None else self.f(z, params)


def _require_vjp(bk, f):
    if not bk.has_autodiff and getattr(f, "vjp", None) is None:
        raise TypeError(
            f"gradients of a fixed point on the {bk.name!r} backend need f's own VJP, and "
            f"{type(f).__name__} has no 'vjp' method: give it vjp(z, params, cotangent) -> "
            f"(cot_z, cot_params), with cot_params shaped like params; or use a backend with "
            f"autodiff (torch)"
        )


# --------------------------------------------------------------------------------------------
# The forward loop


def _norm(xp, v):
    return xp.sqrt(xp.sum(v * v, axis=-1))


class _Loop:
    """One init / cond / body loop for every solver, on a map ``g`` of ``(B, N)`` arrays."""

    def __init__(self, bk, g, solver, tol, stop_mode, max_iter, m, lam, beta, damping):
        self.bk, self.g = bk, g
        self.solver, self.tol, self.stop_mode, self.max_iter = solver, tol, stop_mode, max_iter
        self.m, self.lam, self.beta, self.damping = m, lam, beta, damping

    def residuals(self, z, gz):
        xp = self.bk.xp
        abs_res = _norm(xp, gz - z)
        tiny = xp.finfo(z.dtype).tiny
        rel_res = abs_res / (_norm(xp, gz) + tiny)
        return abs_res, rel_res

    def run(self, z0, gz0=None):
        """Iterate from ``z0``; ``gz0``, when given, is ``g(z0)`` already evaluated."""
        bk = self.bk
        state = bk.while_loop(self.cond, self.body, self.init(z0, gz0))
        status = state["status"]
        state["status"] = bk.xp.where(status == RUNNING, MAX_ITER_REACHED, status)
        return state

    def init(self, z0, gz0=None):
        bk, xp = self.bk, self.bk.xp
        B, N = z0.shape
        gz = self.g(z0) if gz0 is None else gz0
        abs_res, rel_res = self.residuals(z0, gz)
        res = abs_res if self.stop_mode == "abs" else rel_res
        finite = xp.isfinite(res)
        status = xp.where(finite, xp.where(res <= self.tol, CONVERGED, RUNNING), NONFINITE)
        status = xp.astype(status, bk.int_dtype)
        trace = xp.full((self.max_iter + 1, B), math.nan, dtype=z0.dtype)
        trace = bk.write(trace, 0, res)
        state = {
            "z": z0,
            "gz": gz,
            "best_z": z0,
            "best_res": xp.where(finite, res, math.inf),
            "best_abs": abs_res,
            "best_rel": rel_res,
            "iterations": xp.zeros((B,), dtype=bk.int_dtype),
            "k": xp.asarray(0, dtype=bk.int_dtype),
            "status": status,
            "trace": trace,
        }
        if self.solver == "broyden":
            state["n_updates"] = xp.zeros((B,), dtype=bk.int_dtype)
        if self.solver in ("anderson", "broyden"):
            state["mem_a"] = xp.zeros((B, self.m, N), dtype=z0.dtype)
            state["mem_b"] = xp.zeros((B, self.m, N), dtype=z0.dtype)
        return state

    def cond(self, s):
        xp = self.bk.xp
        return xp.any(s["status"] == RUNNING) & (s["k"] < self.max_iter)

    def body(self, s):
        xp, bk = self.bk.xp, self.bk
        active = s["status"] == RUNNING
        z, gz = s["z"], s["gz"]
        s = dict(s)
        if self.solver == "picard":
            proposal = (1.0 - self.damping) * z + self.damping * gz
        elif self.solver == "anderson":
            proposal = self._anderson(s, active)
        else:
            proposal = self._broyden_step(s)
        col = active[:, None]
        z_new = xp.where(col, proposal, z)
        gz_new = self.g(z_new)
        abs_res, rel_res = self.residuals(z_new, gz_new)
        res = abs_res if self.stop_mode == "abs" else rel_res
        finite = xp.isfinite(res)
        if self.solver == "broyden":
            self._broyden_update(s, active & finite, z, gz, z_new, gz_new)
        better = active & finite & (res < s["best_res"])
        s["best_z"] = xp.where(better[:, None], z_new, s["best_z"])
        s["best_res"] = xp.where(better, res, s["best_res"])
        s["best_abs"] = xp.where(better, abs_res, s["best_abs"])
        s["best_rel"] = xp.where(better, rel_res, s["best_rel"])
        # A non-finite sample keeps its last finite iterate, so the next step starts from it.
        keep = active & finite
        s["z"] = xp.where(keep[:, None], z_new, z)
        s["gz"] = xp.where(keep[:, None], gz_new, gz)
        s["iterations"] = s["iterations"] + xp.astype(active, bk.int_dtype)
        status = xp.where(active & ~finite, NONFINITE, s["status"])
        status = xp.where(active & finite & (res <= self.tol), CONVERGED, status)
        s["status"] = xp.astype(status, bk.int_dtype)
        s["k"] = s["k"] + 1
        s["trace"] = bk.write(s["trace"], s["k"], xp.where(active, res, math.nan))
        return s

    # ---- Anderson ---------------------------------------------------------------------------

    def _anderson(self, s, active):
        """Anderson mixing with each sample's own coefficients: store ``z`` and its residual
        ``g(z) - z``, then mix the stored pairs with the weights ``alpha`` (summing to one)
        that minimise ``|sum_i alpha_i (g(z_i) - z_i)|^2 + lam' |alpha|^2``.

        Every running sample has done exactly ``k`` iterations (a sample that stops never
        restarts), so all of them write the same memory slot; writing into a stopped
        sample's memory is harmless, as its proposals are discarded. One slice write
        replaces a masked update of the whole memory."""
        bk, xp = self.bk, self.bk.xp
        m = self.m
        z = s["z"]
        B = z.shape[0]
        k = s["k"]
        slot = k % m
        # A non-finite residual in memory would poison the batched solve; such a sample has
        # stopped already, so a zero only keeps the others' arithmetic finite.
        residual = s["gz"] - z
        residual = xp.where(xp.isfinite(residual), residual, 0.0)
        X = bk.write(s["mem_a"], (slice(None), slot), z)
        G = bk.write(s["mem_b"], (slice(None), slot), residual)
        s["mem_a"], s["mem_b"] = X, G
        slots = xp.arange(m, dtype=k.dtype)
        filled = slots <= k  # (m,): unfilled slots hold zeros
        GG = G @ xp.matrix_transpose(G)  # (B, m, m)
        eye = xp.eye(m, dtype=G.dtype)
        diag = xp.sum(GG * eye, axis=-1)
        # Regularisation relative to the residuals' size keeps the mixing scale-invariant;
        # the floor keeps the system regular once the residuals reach zero.
        floor = xp.finfo(G.dtype).smallest_normal ** 0.5
        scale = self.lam * xp.sum(diag, axis=-1) / m + floor  # (B,)
        both = filled[:, None] & filled[None, :]
        H = xp.where(both, GG + scale[:, None, None] * eye, eye)
        ones = xp.broadcast_to(xp.astype(filled, G.dtype), (B, m))
        top = xp.concat([xp.zeros((B, 1), dtype=G.dtype), ones], axis=1)[:, None, :]
        body = xp.concat([ones[:, :, None], H], axis=2)
        A = xp.concat([top, body], axis=1)  # (B, m + 1, m + 1)
        rhs = xp.concat([xp.ones((B, 1), dtype=G.dtype), xp.zeros((B, m), dtype=G.dtype)], axis=1)
        alpha = xp.linalg.solve(A, rhs[:, :, None])[:, 1:, 0]
        # Guard: should the system still be singular in floating point, that sample takes a
        # plain step from its newest pair instead.
        ok = xp.all(xp.isfinite(alpha), axis=-1)
        newest = xp.astype(slots == slot, G.dtype)
        alpha = xp.where(ok[:, None], alpha, newest[None, :])
        weights = alpha[:, None, :]
        mixed_x = (weights @ X)[:, 0, :]
        mixed_g = (weights @ G)[:, 0, :]
        return mixed_x + self.beta * mixed_g

    # ---- Broyden ----------------------------------------------------------------------------
    # The inverse Jacobian of r(z) = g(z) - z is kept as -I + sum_i u_i v_i^T (mem_a holds u,
    # mem_b holds v), with at most m terms: the oldest is overwritten when memory is full.

    def _apply_inverse(self, s, x):
        xp = self.bk.xp
        coeff = xp.sum(s["mem_b"] * x[:, None, :], axis=-1)
        return -x + xp.sum(coeff[:, :, None] * s["mem_a"], axis=1)

    def _apply_inverse_transposed(self, s, x):
        xp = self.bk.xp
        coeff = xp.sum(s["mem_a"] * x[:, None, :], axis=-1)
        return -x + xp.sum(coeff[:, :, None] * s["mem_b"], axis=1)

    def _broyden_step(self, s):
        r = s["gz"] - s["z"]
        return s["z"] - self._apply_inverse(s, r)

    def _broyden_update(self, s, update, z, gz, z_new, gz_new):
        """The 'good' Broyden update of the inverse: it maps the new residual difference
        onto the step just taken."""
        xp = self.bk.xp
        dz = z_new - z
        dr = (gz_new - z_new) - (gz - z)
        h_dr = self._apply_inverse(s, dr)
        v = self._apply_inverse_transposed(s, dz)
        denom = xp.sum(v * dr, axis=-1)
        eps = xp.finfo(z.dtype).eps
        scale = _norm(xp, dz) * _norm(xp, dr) + xp.finfo(z.dtype).tiny
        # Skip the update where it would divide by (nearly) zero.
        update = update & (xp.abs(denom) > eps * scale)
        safe = xp.where(update, denom, 1.0)
        u = (dz - h_dr) / safe[:, None]
        m = self.m
        count = s["n_updates"]
        slots = xp.arange(m, dtype=count.dtype)
        # With the memory full, the sample restarts from -I: the terms of the product form
        # build on each other, so dropping only the oldest would leave an inconsistent rest.
        restart = update & (count % m == 0)
        mem_a = xp.where(restart[:, None, None], 0.0, s["mem_a"])
        mem_b = xp.where(restart[:, None, None], 0.0, s["mem_b"])
        write = (slots[None, :] == (count % m)[:, None]) & update[:, None]
        s["mem_a"] = xp.where(write[:, :, None], u[:, None, :], mem_a)
        s["mem_b"] = xp.where(write[:, :, None], v[:, None, :], mem_b)
        s["n_updates"] = count + xp.astype(update, count.dtype)


# --------------------------------------------------------------------------------------------
# GMRES for the implicit backward


def _gmres(bk, apply_op, w, tol, stop_mode, max_iter, restart):
    """Restarted GMRES, per sample, for ``apply_op(u) = w`` on ``(B, N)`` arrays. Each cycle
    builds a Krylov basis of ``restart`` vectors and solves its small least-squares problem;
    converged samples stop changing. Returns ``(u, iterations, residual, status)``, with
    iterations counting operator applications."""
    xp = bk.xp
    B, N = w.shape
    restart = max(1, min(restart, N))
    tiny = xp.finfo(w.dtype).tiny
    # "rel" measures the linear residual against the right-hand side, per sample.
    tol = tol * _norm(xp, w) if stop_mode == "rel" else tol

    def residual(u):
        return w - apply_op(u)

    def init():
        r = w  # u = 0
        res = _norm(xp, r)
        status = xp.where(res <= tol, CONVERGED, RUNNING)
        return {
            "u": xp.zeros_like(w),
            "res": res,
            "status": xp.astype(status, bk.int_dtype),
            "iterations": xp.zeros((B,), dtype=bk.int_dtype),
            "k": xp.asarray(0, dtype=bk.int_dtype),
        }

    def cond(s):
        return xp.any(s["status"] == RUNNING) & (s["k"] < max_iter)

    def body(s):
        active = s["status"] == RUNNING
        r = residual(s["u"])
        beta = _norm(xp, r)
        basis = [r / (beta + tiny)[:, None]]
        h_cols = []
        for j in range(restart):
            v = apply_op(basis[j])
            col = []
            for i in range(j + 1):  # modified Gram-Schmidt
                hij = xp.sum(v * basis[i], axis=-1)
                v = v - hij[:, None] * basis[i]
                col.append(hij)
            hnext = _norm(xp, v)
            col.append(hnext)
            col += [xp.zeros_like(hnext)] * (restart - j - 1)
            h_cols.append(xp.stack(col, axis=-1))  # (B, restart + 1)
            basis.append(v / (hnext + tiny)[:, None])
        H = xp.stack(h_cols, axis=-1)  # (B, restart + 1, restart)
        Ht = xp.matrix_transpose(H)
        normal = Ht @ H + tiny**0.5 * xp.eye(restart, dtype=w.dtype)
        rhs = Ht[:, :, 0] * beta[:, None]
        y = xp.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
        V = xp.stack(basis[:restart], axis=1)  # (B, restart, N)
        u_new = s["u"] + xp.sum(y[:, :, None] * V, axis=1)
        res = _norm(xp, residual(u_new))
        finite = xp.isfinite(res)
        s = dict(s)
        s["u"] = xp.where((active & finite)[:, None], u_new, s["u"])
        s["res"] = xp.where(active & finite, res, s["res"])
        status = xp.where(active & ~finite, NONFINITE, s["status"])
        status = xp.where(active & finite & (res <= tol), CONVERGED, status)
        s["status"] = xp.astype(status, bk.int_dtype)
        s["iterations"] = s["iterations"] + xp.astype(active, bk.int_dtype) * (restart + 2)
        s["k"] = s["k"] + 1
        return s

    s = bk.while_loop(cond, body, init())
    status = xp.where(s["status"] == RUNNING, MAX_ITER_REACHED, s["status"])
    return s["u"], s["iterations"], status


# --------------------------------------------------------------------------------------------
# The gradient rule


class FixedPointRule:
    """A fixed-point solve as a framework-neutral forward / backward pair.

    Primals are ``(z0, *leaves)``. The forward value is the solver's best iterate in every
    backward mode; the mode only decides the gradient. ``z0`` gets no gradient: ``z*`` does
    not depend on where the iteration started.
    """

    def __init__(self, bk, fmap, layout, options):
        self.bk, self.fmap, self.layout, self.opts = bk, fmap, layout, options
        self.solution = None

    second_order_message = (
        "second-order gradients (create_graph=True) are not available through a fixed point: "
        "its backward pass computes first-order gradients only"
    )

    @staticmethod
    def captured():
        return []

    @staticmethod
    def residual_arrays(residuals):
        return residuals

    def from_arrays(self, primals, arrays):
        _, *leaves = primals
        self.fmap = self.fmap.rebuilt(leaves)
        return arrays

    def forward(self, z0, *leaves, first_value=None):
        """The solve from ``z0``; ``first_value`` is ``f(z0)`` in internal layout, when the
        caller has evaluated it already."""
        bk, xp, opts = self.bk, self.bk.xp, self.opts
        if not bk.eager:
            self.fmap = self.fmap.rebuilt(leaves)
        with bk.no_grad():
            z0_int = self.layout.to_internal(xp, bk.stop_gradient(z0))
            loop = _Loop(
                bk,
                self.fmap,
                opts.solver,
                opts.tol,
                opts.stop_mode,
                opts.max_iter,
                opts.m,
                opts.lam,
                opts.beta,
                opts.damping,
            )
            state = loop.run(z0_int, first_value)
        z_star = state["best_z"]
        self.solution = FixedPointSolution(
            z=self.layout.to_user(xp, z_star),
            iterations=state["iterations"],
            abs_residual=state["best_abs"],
            rel_residual=state["best_rel"],
            status=state["status"],
            trace=state["trace"][: int(state["k"]) + 1] if bk.eager else state["trace"],
            solver=opts.solver,
            stats={"nfev": state["k"] + 1},
        )
        sol = self.solution
        aux = {
            "iterations": sol.iterations,
            "abs_residual": sol.abs_residual,
            "rel_residual": sol.rel_residual,
            "status": sol.status,
            "trace": sol.trace,
            "stats": sol.stats,
        }
        return sol.z, aux, z_star

    def backward(self, z_star, z_bar, needs=None):
        """One cotangent per primal: ``(None, *leaves_bar)``. ``needs`` (one flag per primal,
        from the framework) is accepted for the protocol; every leaf's cotangent comes from
        the same VJP, so there is nothing to skip."""
        xp, opts = self.bk.xp, self.opts
        w = self.layout.to_internal(xp, z_bar)
        with self.bk.no_grad():
            if opts.backward == "implicit":
                u = self._implicit_cotangent(z_star, w)
                _, leaves_bar = self.fmap.vjp(z_star, u)
            else:
                leaves_bar = self._unrolled(z_star, w)
        # A number among the params (NumPy keeps it as a leaf) takes its cotangent as f.vjp
        # gives it.
        leaves_bar = [
            xp.astype(g, leaf.dtype) if hasattr(leaf, "dtype") and g.dtype != leaf.dtype else g
            for g, leaf in zip(leaves_bar, self.fmap.leaves, strict=True)
        ]
        return (None, *leaves_bar)

    def _implicit_cotangent(self, z_star, w):
        """``u`` with ``u = w + u J_f(z*)``."""
        bk, xp, opts = self.bk, self.bk.xp, self.opts

        def vjp_z(u):
            return self.fmap.vjp(z_star, u)[0]

        if opts.backward_solver == "gmres":
            u, iterations, status = _gmres(
                bk,
                lambda u: u - vjp_z(u),
                w,
                opts.backward_tol,
                opts.stop_mode,
                opts.backward_max_iter,
                restart=min(opts.m * 4, 20),
            )
        else:
            loop = _Loop(
                bk,
                lambda u: w + vjp_z(u),
                opts.backward_solver,
                opts.backward_tol,
                opts.stop_mode,
                opts.backward_max_iter,
                opts.m,
                opts.lam,
                opts.beta,
                1.0,
            )
            state = loop.run(xp.zeros_like(w))
            u, iterations, status = state["best_z"], state["iterations"], state["status"]
        if self.solution is not None and self.bk.eager:
            # On a tracing backend these are values of the backward's own trace, which
            # must not leak into the solution the caller holds.
            self.solution.stats["backward_iterations"] = iterations
            self.solution.stats["backward_status"] = status
        return u

    def _unrolled(self, z_star, w):
        """Backpropagate through ``k`` steps ``z <- (1 - d) z + d f(z)`` from the detached
        ``z*``: the phantom gradient (``k = 1, d = 1`` is the one-step gradient)."""
        opts = self.opts
        d, k = opts.unroll_damping, opts.unroll_steps
        zs = [z_star]
        for _ in range(k - 1):
            zs.append((1.0 - d) * zs[-1] + d * self.fmap(zs[-1]))
        a = w
        total = None
        for z in reversed(zs):
            cot_z, cot_leaves = self.fmap.vjp(z, d * a)
            a = (1.0 - d) * a + cot_z
            total = (
                cot_leaves
                if total is None
                else [t + c for t, c in zip(total, cot_leaves, strict=True)]
            )
        return total if total is not None else []


# --------------------------------------------------------------------------------------------
# Public functions


def _setup(f, z0, params, backend, batch_axis, kwargs):
    bk = resolve_backend(backend, {"z0": z0, "params": params})
    opts = _options(**kwargs)
    if not bk.eager and opts.backward == "implicit" and opts.backward_solver == "gmres":
        # GMRES decides its restarts and breakdowns on the host from concrete values.
        raise NotImplementedError(
            f"backward_solver='gmres' is not supported on the {bk.name!r} backend (a tracing "
            f"backend); use 'anderson', 'picard' or 'broyden'"
        )
    z0 = _float_array(bk, "z0", z0)
    _check_callable(f)
    _check_params(params)
    layout = _Layout(bk, z0, batch_axis)
    if params is not None and differentiate.param_leaves(bk, f, None):
        # The module's own parameters would silently get no gradient: the VJP differentiates
        # with respect to params only once params are given.
        raise TypeError(
            "f is a module with its own parameters and params is given too; pass everything "
            "through params (e.g. torch.func.functional_call(module, weights, (z, x)) with "
            "params=(weights, x)), or params=None with the inputs held by the module"
        )
    leaves = differentiate.param_leaves(bk, f, params)
    fmap = _Map(bk, f, params, leaves, layout)
    return bk, opts, z0, layout, leaves, fmap


def _float_array(bk, name, value, dtype=None):
    try:
        array = bk.asarray(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a real floating array, got {_describe(value)}") from exc
    if not bk.xp.isdtype(array.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype, got {array.dtype}; convert it, e.g. to "
            f"float64"
        )
    return array


def _like_z(bk, name, value, z):
    """A vector shaped like ``z``, with its dtype (a probe or a start). Plain values (lists,
    NumPy arrays on another backend) take z's dtype; an array must have it already."""
    array = _float_array(bk, name, value, None if bk.owns(value) else z.dtype)
    if tuple(array.shape) != tuple(z.shape):
        raise ValueError(f"{name} must be shaped like z {tuple(z.shape)}, got {tuple(array.shape)}")
    if array.dtype != z.dtype:
        raise TypeError(f"{name} must have z's dtype {z.dtype}, got {array.dtype}")
    return array


def _check_callable(f):
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, params) (or f(z)), got {_describe(f)}")


def _check_params(params):
    """``params`` is a pytree of arrays: anything else in it would get no gradient, and the
    NumPy pullback could not give it one."""
    for where, leaf in tree_leaves({"params": params}):
        if leaf is None or isinstance(leaf, numbers.Number):
            continue
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            continue
        raise TypeError(
            f"params must be an array or a tuple, list or dict of arrays (numbers and None "
            f"may appear too); {where} is {_describe(leaf)}: put its arrays into params "
            f"instead, or let f capture it if it needs no gradient"
        )


def solve_fixed_point(
    f,
    z0,
    params=None,
    *,
    solver="anderson",
    tol=1e-6,
    stop_mode="abs",
    max_iter=50,
    m=5,
    lam=1e-4,
    beta=1.0,
    damping=1.0,
    backward="implicit",
    backward_solver="anderson",
    backward_tol=None,
    backward_max_iter=None,
    unroll_steps=None,
    unroll_damping=1.0,
    throw=True,
    batch_axis=None,
    backend=None,
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
    solver : {"picard", "anderson", "broyden"}
        Plain iteration (with ``damping``: ``z <- (1 - damping) z + damping f(z)``);
        Anderson mixing with memory ``m``, regularisation ``lam`` (relative to the stored
        residuals' size) and mixing ``beta``; or Broyden's method with at most ``m``
        low-rank terms in the inverse Jacobian.
    tol, stop_mode : float, {"abs", "rel"}
        A sample has converged once ``||f(z) - z||`` (``"abs"``) or
        ``||f(z) - z|| / ||f(z)||`` (``"rel"``) is at most ``tol``; norms are per sample.
    max_iter : int
        At most this many iterations; samples still running then get status
        ``MAX_ITER_REACHED``.
    backward : {"implicit", "one_step", "unrolled"}
        The gradient. ``"implicit"``: the implicit-function-theorem gradient, solving
        ``u = w + u J_f(z*)`` with ``backward_solver`` (``"picard"``, ``"anderson"``,
        ``"broyden"``, with the forward's ``m`` and ``lam``; or ``"gmres"``, restarted every
        ``min(4 m, 20)`` vectors) to ``backward_tol`` within ``backward_max_iter`` (default:
        the forward ``tol`` and ``max_iter``). ``"one_step"``: the gradient of one step
        ``f(z*)`` from the detached ``z*``. ``"unrolled"``: backpropagation through
        ``unroll_steps`` steps ``z <- (1 - unroll_damping) z + unroll_damping f(z)`` from the
        detached ``z*``.
    throw : bool
        With True (the default), a sample that did not converge raises
        :class:`~odecore.FixedPointError` (on a tracing backend, only where the status is
        known: under ``jax.jit`` it is reported in ``status`` only). With False, the solution
        holds each sample's best iterate and its ``status``.
    batch_axis : None or 0
        With 0, the first axis indexes independent samples, each converging on its own.
    backend : str, optional
        Overrides the configured backend.

    On torch, ``f`` must not use a tensor that requires grad other than through ``params``
    (or, for an ``nn.Module`` called without params, its own parameters): the gradient
    reaches only those, so such a tensor raises ``ValueError`` while grad mode is on.
    """
    given = locals()
    kwargs = {name: given[name] for name in _option_defaults()}
    bk, opts, z0, layout, leaves, fmap = _setup(f, z0, params, backend, batch_axis, kwargs)
    rule = FixedPointRule(bk, fmap, layout, opts)
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
    _raise_if_failed(bk, solution, opts, layout)
    return solution


def _raise_if_failed(bk, solution, opts, layout):
    # Under jit the status has no value yet: it stays in the solution.
    if opts.throw and not bk.is_traced(solution.status) and not solution.success:
        raise FixedPointError(_failure_message(bk, solution, opts, layout.batched), solution)


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
    _check_output(bk, value, fmap.layout)
    if differentiate.requires_grad(bk, {"f(z0)": value}):
        raise ValueError(_HIDDEN_GRADIENT_MESSAGE)
    return fmap.layout.to_internal(bk.xp, bk.stop_gradient(value))


def _option_defaults() -> dict:
    """The solver options of :func:`solve_fixed_point` with their defaults, read from its
    signature so that the other entry points cannot drift from it."""
    return {
        name: p.default
        for name, p in inspect.signature(solve_fixed_point).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("batch_axis", "backend")
    }


def fixed_point(f, z0, params=None, **kwargs):
    """``z* = f(z*, params)``: :func:`solve_fixed_point`'s ``z``, differentiable on
    frameworks with autodiff. Keyword arguments are those of :func:`solve_fixed_point`; a
    solve that does not converge raises :class:`~odecore.FixedPointError` unless
    ``throw=False``."""
    return solve_fixed_point(f, z0, params, **kwargs).z


def vjp_fixed_point(f, z0, params=None, **kwargs):
    """Solve, and return ``(solution, pullback)`` with ``pullback(z_bar) -> params_bar`` (the
    structure of ``params``): gradients for backends without autodiff (NumPy).

    ``f`` supplies ``vjp(z, params, cotangent) -> (cot_z, cot_params)``. Keyword arguments
    are those of :func:`solve_fixed_point`."""
    from odecore._solve import _unflatten_like

    backend = kwargs.pop("backend", None)
    batch_axis = kwargs.pop("batch_axis", None)
    defaults = _option_defaults()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"vjp_fixed_point got unexpected keyword arguments {sorted(unknown)}")
    defaults.update(kwargs)
    bk, opts, z0, layout, leaves, fmap = _setup(f, z0, params, backend, batch_axis, defaults)
    _require_vjp(bk, f)
    rule = FixedPointRule(bk, fmap, layout, opts)
    _, _, z_star = rule.forward(z0, *leaves)
    _raise_if_failed(bk, rule.solution, opts, layout)

    def pullback(z_bar):
        z_bar = bk.asarray(z_bar)
        if tuple(z_bar.shape) != layout.shape:
            raise ValueError(
                f"pullback expects a cotangent shaped like z {layout.shape}, got "
                f"{tuple(z_bar.shape)}"
            )
        _, *leaves_bar = rule.backward(z_star, z_bar)
        return _unflatten_like(params, leaves_bar, None)

    return rule.solution, pullback


# --------------------------------------------------------------------------------------------
# Diagnostics and regularisation


def jacobian_frobenius(f, z, params=None, *, probe, batch_axis=None, backend=None):
    """A Hutchinson estimate of ``||J_f(z)||_F^2`` per sample, differentiable with respect
    to ``params`` on frameworks with autodiff, to add to the loss: ``|J_f(z) probe|^2`` with
    one Jacobian-vector product. ``probe`` (shaped like ``z``) is drawn by the caller, with
    zero mean and identity covariance (Gaussian or Rademacher), so the estimate is unbiased.
    Returns shape ``(B,)`` with ``batch_axis=0``, else a 0-d array."""
    bk = resolve_backend(backend, {"z": z, "params": params, "probe": probe})
    if not bk.has_autodiff:
        raise TypeError(
            f"jacobian_frobenius is a training penalty and needs autodiff to differentiate "
            f"it; the {bk.name!r} backend has none: use torch"
        )
    xp = bk.xp
    _check_callable(f)
    _check_params(params)
    z = _float_array(bk, "z", z)
    probe = _like_z(bk, "probe", probe, z)
    layout = _Layout(bk, z, batch_axis)

    def fz(z_):
        out = f(z_) if params is None else f(z_, params)
        _check_output(bk, out, layout)
        return out

    _, tangent = bk.autodiff.jvp(fz, (bk.stop_gradient(z),), (probe,))
    sq = xp.sum(layout.to_internal(xp, tangent * tangent), axis=-1)
    return sq if layout.batched else sq[0]


def spectral_radius(f, z, params=None, *, iterations=20, start=None, batch_axis=None, backend=None):
    """An estimate of the spectral radius of ``J_f(z)`` per sample, by power iteration with
    VJPs (``u <- u J / |u J|``): below one near ``z*`` means the plain iteration contracts
    there. ``start`` (shaped like ``z``) is the first vector, ones by default. Returns shape
    ``(B,)`` with ``batch_axis=0``, else a 0-d array. The estimate is the growth of the
    dominant singular direction under repeated application, exact for a dominant real
    eigenvalue."""
    bk = resolve_backend(backend, {"z": z, "params": params, "start": start})
    xp = bk.xp
    _check_callable(f)
    _check_params(params)
    z = _float_array(bk, "z", z)
    iterations = _integer("iterations", iterations)
    layout = _Layout(bk, z, batch_axis)
    _require_vjp(bk, f)
    fmap = _Map(bk, f, params, differentiate.param_leaves(bk, f, params), layout)
    z_int = layout.to_internal(xp, bk.stop_gradient(z))
    if start is None:
        u = xp.ones_like(z_int)
    else:
        u = layout.to_internal(xp, _like_z(bk, "start", start, z))
    tiny = xp.finfo(z_int.dtype).tiny
    with bk.no_grad():
        fmap(z_int)  # checks what f returns before its VJP is asked for
        start_norm = _norm(xp, u)
        if not bk.is_traced(start_norm) and not bool(xp.all(start_norm > 0)):
            raise ValueError(
                "start must be nonzero in every sample: power iteration from zero stays at zero"
            )
        u = u / (start_norm + tiny)[:, None]
        estimate = xp.zeros((layout.batch,), dtype=z_int.dtype)
        for _ in range(iterations):
            v = fmap.vjp(z_int, u)[0]
            estimate = _norm(xp, v)
            u = v / (estimate + tiny)[:, None]
    return estimate if layout.batched else estimate[0]
