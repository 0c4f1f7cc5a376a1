"""The conformance runner: every check on every variant, once per backend.

One test per (backend, variant, check); ``conftest.py`` gathers their outcomes, and the
agreements they measured, into the tables printed at the end of the run. Nothing here names a
framework but the ``vmap`` check, which is about JAX's own transformations: a backend is
whatever ``odecore.get_backend(name)`` returns for a name in ``odecore.BACKEND_NAMES``, inputs
are converted with ``backend.asarray``, and arrays come back to NumPy through DLPack.

Which backends run:

- ``ODECORE_CONFORMANCE_BACKENDS=numpy,torch`` restricts the run to those backends (the others
  are skipped, and say so); nox's ``conformance`` session sets it to what imports there.
- ``ODECORE_REQUIRED_BACKENDS=numpy,torch,jax`` names backends that must run: one that is not
  installed fails every cell with ``BackendNotAvailableError``'s message instead of skipping
  (nox's ``ci`` session sets it to its CI backends). A backend named in
  ``ODECORE_CONFORMANCE_BACKENDS`` is required too: asking for it and not getting it is a
  failure. Only a backend nobody asked for is skipped when it is missing.
- A backend whose library is installed but whose device is missing (cupy without a CUDA
  device: ``DeviceNotAvailableError``) is skipped, saying so, unless
  ``ODECORE_REQUIRED_BACKENDS`` names it: ``ODECORE_CONFORMANCE_BACKENDS=numpy,cupy`` runs the
  cupy rows where there is a GPU and skips them elsewhere.

Checks (each gradient check covers every argument: ``y0``, each parameter, the times ``t``):

- ``values``: the outputs match the variant's reference: the exact discrete solution for a
  fixed-step method (to rounding), the exact solution otherwise (to the tolerance), with the
  solve reporting success and keeping the state's dtype.
- ``grad:<mode>``: the loss gradient matches the reference gradient, element by element.
  Backends without autodiff get it from ``odecore.vjp_odeint``; the others through their
  ``Backend.autodiff.vjp(fn, *primals) -> (out, pullback)`` (DESIGN.md).
- ``cross:values`` and ``cross:<mode>``: consistency between backends: the outputs, and the
  gradient of each mode, match every other backend's, element by element, to what rounding
  and the tolerance allow (``cross_rtol``). ``direct`` and ``checkpoint`` both give the exact
  gradient of the discrete solve, so each is compared with the other mode too (a backend has
  ``direct`` only where its framework can reverse through the loop).
- ``cross:steps`` (float64 variants): every sample takes the accepted and rejected steps it
  takes on every other backend. The step-size control is the same algorithm everywhere, and
  its decisions differ only where an error ratio lies within rounding of 1, which float64's
  rounding (1e-16 against tolerances of 1e-6 and tighter) leaves to chance alone; the
  float32 case's rtol of 1e-5 is about 170 units of its rounding, and a decision flips now
  and then. An error norm weighted or averaged wrongly still meets the tolerance, so the values
  cannot show it, but it changes the steps.
- ``params-only:<mode>`` and ``y0-only:<mode>`` (float64 CI variants in
  ``PARTIAL_VARIANT_IDS``): the gradient with respect to the parameters alone, or ``y0``
  alone, with the other inputs and ``t`` held constant as a user holds them (on torch they do
  not require grad; on JAX they are not differentiated, which the gradient rule sees through
  symbolic zeros and skips their work), matches the exact gradient and the reference
  backend's full gradient. Backends without autodiff have no way to ask for part of the
  gradient (``odecore.vjp_odeint`` returns all of it), and their cells skip saying so.
- ``vmap`` (JAX, float64 CI variants with a batch): ``jax.jit(jax.vmap(...))`` of one
  sample's solve, and of its gradient, matches the batched solve on the reference backend,
  sample by sample (``check_vmap``).
- ``vjp``: the case's hand-written VJP, evaluated on the backend in float64, matches central
  finite differences of the case's ``func`` on the same backend (one row per case).
- ``reference-gradient``: the reference gradient itself matches central finite differences of
  odecore's own NumPy solve (dopri8 at rtol = atol = 1e-12). It checks the case's data, so it
  runs on the NumPy row of one variant per case.

A gradient mode that a backend does not have is not a cell: ``test_unavailable_mode_raises``
checks that asking for it raises the documented error.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import array_api_compat
import numpy as np
import pytest

import odecore
from conformance.cases import (
    VARIANTS,
    Variant,
    continuous_reference,
    loss,
    loss_cotangent,
    variant_reference,
)

# The table conftest.py prints for this module.
SUMMARY_TITLE = "ODE solves"
MODES = ("checkpoint", "backsolve", "direct")
# Modes that compute the same thing: the exact gradient of the discrete solve (step sizes
# held constant), by replaying the steps or by differentiating through the loop.
SAME_GRADIENT = {"checkpoint": ("checkpoint", "direct"), "direct": ("direct", "checkpoint")}
REFERENCE_BACKEND = "numpy"
# The inputs a partial gradient differentiates, alone.
PARTIAL_INPUTS = ("params", "y0")
# The variants with partial-gradient cells: float64 CI variants (each cell compiles twice on
# JAX) that between them have an adaptive and a fixed-step method, parameters whose
# gradients switch on and off at a jump, and times that decrease.
PARTIAL_VARIANT_IDS = ("jump/dopri5[jump_t]", "reversed/rk4[h=1/16]")
# The vmap check runs on this backend, with this gradient mode: JAX's default, the one its
# users get without asking.
VMAP_BACKEND = "jax"
VMAP_MODE = "backsolve"

# Bounds. Every comparison accepts |actual - expected| <= rtol * (|expected| + floor), element
# by element, where floor is the magnitude of what the entry is made of (see
# conformance.cases.Reference), so an entry that is small because its contributions cancel
# is held to the error those contributions carry, and every other entry to its own size.
#
# Rounding: two computations of the same arithmetic in a different summation order differ
# by a few unit roundoffs u per stage combination. A step combines s stages, a solve takes n
# steps and the gradient retraces them once; with 4 roundings per combination and a factor 4
# for the growth of earlier errors along the solve: 32 u s n. That is below 1e-12 in float64
# for every fixed-step variant here (s n <= 256).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24}
ROUNDING_FACTOR = 32
# Tolerance: an adaptive solve keeps each step's local error near rtol (relative to |y| +
# atol/rtol); over the cases' short horizons the global error stays a modest multiple of it,
# for the outputs and for both gradient modes (the backsolve controls its adjoint to the same
# tolerance; the checkpoint gradient is exact for a discrete solution that is this close).
TOLERANCE_FACTOR = 100
# fehlberg2's error estimate is the difference of its order-1 and order-2 solutions, whose
# weights differ by 1/512 only (odecore.tableaus): it measures the error of the order-1
# solution, which Fehlberg built to be small, while the order-2 solution is propagated. The
# local errors committed are then up to hundreds of times the tolerance, and so is the
# global error: ten times the common factor.
ERROR_CONSTANT = {"fehlberg2": 10}
# Adaptive backends agree to rounding while they make the same accept decisions. A decision
# that rounding flips (a step whose error ratio is within rounding of 1) changes that step's
# local error by at most about the tolerance, and the solution and gradient by about rtol.
FLIP_FACTOR = 10

# The finite-difference check of the reference gradients: a tight solve and a step h where
# the truncation error (~h^2, dominant) and the solver's noise (~tol / h) leave the measured
# differences from the references at 1e-8 relative or below (h = 1e-4 gave up to 9e-7).
FD_SOLVE_TOL = 1e-12
FD_METHOD = "dopri8"
FD_RELATIVE_STEP = 1e-5
FD_RTOL = 1e-7


# --------------------------------------------------------------------------------------------
# Backends


def _backend_names(variable: str) -> set[str] | None:
    chosen = os.environ.get(variable, "").strip()
    if not chosen:
        return None
    names = {name.strip() for name in chosen.split(",") if name.strip()}
    unknown = sorted(names - set(odecore.BACKEND_NAMES))
    if unknown:
        raise ValueError(
            f"{variable} names unknown backends {unknown}; valid names are "
            f"{', '.join(odecore.BACKEND_NAMES)}"
        )
    return names


SELECTED_BACKENDS = _backend_names("ODECORE_CONFORMANCE_BACKENDS")
# The backends that must run even where their device is missing.
DEVICE_REQUIRED_BACKENDS = _backend_names("ODECORE_REQUIRED_BACKENDS") or set()
REQUIRED_BACKENDS = DEVICE_REQUIRED_BACKENDS | (SELECTED_BACKENDS or set())


def runs(name: str) -> bool:
    """Whether this run includes the backend ``name`` (installed or not)."""
    return SELECTED_BACKENDS is None or name in SELECTED_BACKENDS | REQUIRED_BACKENDS


def backend_or_skip(name: str) -> odecore.Backend:
    """The backend ``name``; skips when this run leaves it out, or when it is missing and
    nobody required it; fails, naming it, when a required backend is missing."""
    if not runs(name):
        pytest.skip(
            f"not selected (ODECORE_CONFORMANCE_BACKENDS={','.join(sorted(SELECTED_BACKENDS))})"
        )
    try:
        return odecore.get_backend(name)
    except odecore.DeviceNotAvailableError as exc:
        if name in DEVICE_REQUIRED_BACKENDS:
            pytest.fail(
                f"the {name!r} backend is required in this run (ODECORE_REQUIRED_BACKENDS) but "
                f"its device is not available: {exc}",
                pytrace=False,
            )
        pytest.skip(str(exc))
    except odecore.BackendNotAvailableError as exc:
        if name in REQUIRED_BACKENDS:
            pytest.fail(
                f"the {name!r} backend is required in this run (ODECORE_REQUIRED_BACKENDS or "
                f"ODECORE_CONFORMANCE_BACKENDS) but is not available: {exc}",
                pytrace=False,
            )
        pytest.skip(str(exc))


def available_backend(name: str) -> odecore.Backend | None:
    """The backend, if this run includes it and it is installed; None otherwise."""
    if not runs(name):
        return None
    try:
        return odecore.get_backend(name)
    except odecore.BackendNotAvailableError:
        return None


def has_mode(bk: odecore.Backend, mode: str) -> bool:
    """Whether ``bk`` computes gradients in ``mode`` (``odecore._validate.adjoint_mode``'s
    rule): ``direct`` needs a framework that reverses through the loop itself."""
    if mode == "direct":
        return bk.has_autodiff and bk.autodiff.default_adjoint == "direct"
    return True


def backend_modes(name: str) -> tuple[str, ...]:
    """The modes the cells of backend ``name`` cover. For a backend that is not here, every
    mode: its cells then skip or fail with the reason."""
    bk = available_backend(name)
    return MODES if bk is None else tuple(m for m in MODES if has_mode(bk, m))


def precision(bk, dtype: str):
    """The context a case runs in: float64 cases in the backend's float64 mode (JAX's x64);
    float32 cases in the backend's own default, as its users get it."""
    return bk.float64() if dtype == "float64" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Conversions and solves


def to_numpy(bk, x) -> np.ndarray:
    """A backend array (or a Python or NumPy scalar) as a NumPy array on the host."""
    if isinstance(x, (int, float, np.generic)):
        return np.asarray(x)
    x = bk.stop_gradient(x)
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError, ValueError):
        # Device arrays (CuPy, GPU torch) do not export to NumPy through DLPack.
        return np.asarray(array_api_compat.to_device(x, "cpu"))


def _dtype(bk, name: str):
    return getattr(bk.xp, name)


def inputs(bk, case):
    """``(y0, t, params)`` of a case as the backend's arrays: the state and the parameters in
    the case's dtype, time in the backend's time dtype."""
    dt = _dtype(bk, case.dtype)
    y0 = bk.asarray(case.y0, dtype=dt)
    t = bk.asarray(case.ts, dtype=bk.time_dtype)
    params = tuple(bk.asarray(p, dtype=dt) for p in case.params)
    return y0, t, params


def solver_kwargs(variant: Variant, bk) -> dict:
    rtol, atol = variant.tolerances
    return {
        "rtol": rtol,
        "atol": atol,
        "method": variant.method,
        "options": variant.solver_options,
        "batch_axis": variant.case.batch_axis,
        "backend": bk.name,
    }


def cached(fn):
    """``functools.cache`` that also remembers a failure: a cell that needs another
    backend's result does not recompute (and recompile) one that has already failed in its
    own cell, and reports the same error."""
    results = {}

    @functools.wraps(fn)
    def wrapper(*args):
        if args not in results:
            try:
                results[args] = (True, fn(*args))
            except Exception as exc:
                results[args] = (False, exc)
        ok, value = results[args]
        if not ok:
            raise value
        return value

    return wrapper


@dataclass(frozen=True)
class Solved:
    ys: np.ndarray
    steps: int  # accepted steps of the longest-running sample
    # Per sample (one entry without a batch): the accepted and rejected steps.
    naccept: np.ndarray
    nreject: np.ndarray


@cached
def solve_variant(backend_name: str, variant: Variant) -> Solved:
    """The variant's outputs on a backend, checked for success, dtype and shape."""
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, case.dtype):
        y0, t, params = inputs(bk, case)
        func = case.dynamics
        if bk.kernels.solve is not None:
            # A backend that compiles the dynamics into the solve gets them in the compiler's
            # subset, with the parameters as one array.
            func = case.kernel
            params = bk.asarray(case.kernel_params(), dtype=_dtype(bk, case.dtype))
        sol = odecore.solve(func, y0, t, params=params, **solver_kwargs(variant, bk))
        assert sol.success, f"the solve did not succeed: {sol.message}"
        assert sol.ys.dtype == _dtype(bk, case.dtype), (
            f"ys has dtype {sol.ys.dtype}, the state {case.dtype}"
        )
        ys = to_numpy(bk, sol.ys)
        naccept = np.atleast_1d(to_numpy(bk, sol.stats["naccept"])).astype(np.int64)
        nreject = np.atleast_1d(to_numpy(bk, sol.stats["nreject"])).astype(np.int64)
    expected_shape = (len(case.times), *case.y0.shape)
    assert ys.shape == expected_shape, f"ys has shape {ys.shape}, expected {expected_shape}"
    return Solved(ys.astype(np.float64), int(np.max(naccept)), naccept, nreject)


@cached
def gradient(backend_name: str, variant: Variant, mode: str) -> dict:
    """The loss gradient from odecore on a backend, as float64 NumPy arrays ``{"y0",
    "params", "t"}``. One solve and one pullback per (backend, variant, mode), shared by
    every check that needs it: on JAX each is a compilation."""
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, case.dtype):
        y0, t, params = inputs(bk, case)
        weights = bk.asarray(case.loss_weights(), dtype=_dtype(bk, case.dtype))
        kwargs = gradient_kwargs(variant, bk, mode)
        if bk.kernels.solve is not None:
            # A backend that compiles the dynamics gets them, and their VJP, in the
            # compiler's subset: its forward solve and replay are then compiled too.
            flat = bk.asarray(case.kernel_params(), dtype=_dtype(bk, case.dtype))
            ys, pullback = odecore.vjp_odeint(case.kernel, y0, t, flat, adjoint=mode, **kwargs)
            y0_bar, flat_bar, t_bar = pullback(loss_cotangent(ys, weights))
            params_bar = case.split_kernel_params(to_numpy(bk, flat_bar))
        elif not bk.has_autodiff:
            ys, pullback = odecore.vjp_odeint(case.dynamics, y0, t, params, adjoint=mode, **kwargs)
            y0_bar, params_bar, t_bar = pullback(loss_cotangent(ys, weights))
        else:

            def solve(y0_, t_, *params_):
                return odecore.odeint(
                    case.dynamics, y0_, t_, params=params_, adjoint=mode, **kwargs
                )

            ys, pullback = bk.autodiff.vjp(solve, y0, t, *params)
            y0_bar, t_bar, *params_bar = pullback(loss_cotangent(ys, weights))
        return {
            "y0": to_numpy(bk, y0_bar).astype(np.float64),
            "params": tuple(to_numpy(bk, g).astype(np.float64) for g in params_bar),
            "t": to_numpy(bk, t_bar).astype(np.float64),
        }


def gradient_kwargs(variant: Variant, bk, mode: str) -> dict:
    """The solve's keywords for a gradient in ``mode``: adjoint options go to the backsolve
    alone, since the other modes refuse them."""
    kwargs = solver_kwargs(variant, bk)
    if mode == "backsolve":
        kwargs["adjoint_options"] = variant.adjoint_options
    return kwargs


@cached
def partial_gradient(backend_name: str, variant: Variant, mode: str, wrt: str) -> dict:
    """The loss gradient with respect to ``wrt`` alone (``"params"`` or ``"y0"``), the other
    inputs and the times held constant, as ``gradient`` returns it but with that key only.

    The constants are closed over and only the differentiated inputs are the primals of
    ``Backend.autodiff.vjp``: on torch they are the only tensors that require grad, and on
    JAX the others are constants of the traced function, which is what ``jax.grad(...,
    argnums=...)`` makes of the arguments it does not select. The solve's gradient rule then
    learns that ``t`` (and ``y0`` or the parameters) need no cotangent, and skips them."""
    bk = odecore.get_backend(backend_name)
    case = variant.case
    with precision(bk, case.dtype):
        y0, t, params = inputs(bk, case)
        weights = bk.asarray(case.loss_weights(), dtype=_dtype(bk, case.dtype))
        kwargs = gradient_kwargs(variant, bk, mode)

        def solve(y0_, params_):
            return odecore.odeint(case.dynamics, y0_, t, params=params_, adjoint=mode, **kwargs)

        if wrt == "params":
            ys, pullback = bk.autodiff.vjp(lambda *params_: solve(y0, params_), *params)
        else:
            ys, pullback = bk.autodiff.vjp(lambda y0_: solve(y0_, params), y0)
        cotangents = pullback(loss_cotangent(ys, weights))
        as_numpy = tuple(to_numpy(bk, g).astype(np.float64) for g in cotangents)
    return {"params": as_numpy} if wrt == "params" else {"y0": as_numpy[0]}


# --------------------------------------------------------------------------------------------
# Bounds


def rounding_rtol(variant: Variant, steps: int) -> float:
    """What rounding alone can change, relative (see ROUNDING_FACTOR)."""
    stages = odecore.TABLEAUS[variant.method].stages
    return ROUNDING_FACTOR * UNIT_ROUNDOFF[variant.case.dtype] * stages * max(steps, 1)


def reference_steps(variant: Variant) -> int:
    return solve_variant(REFERENCE_BACKEND, variant).steps


def cross_rtol(variant: Variant) -> float:
    """How far two backends may differ on a variant. Fixed-step methods do the same
    arithmetic in another summation order: rounding only. Adaptive methods may also flip an
    accept decision where rounding decides it: about the tolerance (FLIP_FACTOR)."""
    rounding = rounding_rtol(variant, reference_steps(variant))
    if variant.fixed_step:
        return rounding
    return max(rounding, FLIP_FACTOR * variant.tolerances[0])


def values_rtol(variant: Variant) -> float:
    """The outputs' bound against the reference: rounding for a fixed-step method (its
    reference is the exact result of its steps), the tolerance otherwise."""
    if variant.fixed_step:
        return rounding_rtol(variant, reference_steps(variant))
    return tolerance_rtol(variant)


def tolerance_rtol(variant: Variant) -> float:
    return TOLERANCE_FACTOR * ERROR_CONSTANT.get(variant.method, 1) * variant.tolerances[0]


def values_floor(variant: Variant) -> np.ndarray:
    """The size each component reaches along the solve: rounding and the propagated local
    errors of a component scale with it, also where the component passes through zero."""
    return np.max(np.abs(variant_reference(variant).ys), axis=0)


def gradient_rtol(variant: Variant) -> float:
    """The gradient's bound against its reference: rounding for a fixed-step method, whose
    reference is the exact result of its own steps in every mode; the tolerance otherwise."""
    if variant.fixed_step:
        return rounding_rtol(variant, reference_steps(variant))
    return tolerance_rtol(variant)


# --------------------------------------------------------------------------------------------
# Comparisons and what they measured


@dataclass(frozen=True)
class Measurement:
    """One comparison: the worst element's relative error ``|a - b| / (|b| + floor)``
    against the bound ``rtol``."""

    kind: str  # "reference" or "cross"
    column: str  # "values" or a gradient mode
    family: str  # the method family (fixed-step, adaptive) or "fixed point"
    dtype: str
    error: float
    bound: float
    where: str

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.bound)

    def as_property(self) -> tuple:
        return (self.kind, self.column, self.family, self.dtype, self.error, self.bound, self.where)


def compare(actual, expected, rtol: float, floor, **labels) -> Measurement:
    """Element-wise ``|actual - expected| <= rtol * (|expected| + floor)``, as the worst
    element's relative error."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    where = labels.pop("where")
    if actual.shape != expected.shape:
        problem = f"shape {actual.shape}, expected {expected.shape}"
        return Measurement(**labels, error=np.inf, bound=rtol, where=f"{where}: {problem}")
    if not np.all(np.isfinite(actual)):
        return Measurement(**labels, error=np.inf, bound=rtol, where=f"{where}: non-finite")
    scale = np.broadcast_to(np.abs(expected) + floor, expected.shape)
    difference = np.abs(actual - expected)
    # An entry whose expected value and magnitude are both zero must come out exactly zero.
    relative = np.where(scale > 0, difference / np.where(scale > 0, scale, 1.0), np.inf)
    relative = np.where(difference == 0, 0.0, relative)
    worst = np.unravel_index(int(np.argmax(relative)), relative.shape) if relative.ndim else ()
    at = f"[{','.join(str(int(i)) for i in worst)}]" if worst else ""
    return Measurement(**labels, error=float(relative[worst]), bound=rtol, where=f"{where}{at}")


def gradient_arguments(grad: dict) -> list[tuple[str, np.ndarray]]:
    return [
        ("y0", grad["y0"]),
        *((f"params[{k}]", g) for k, g in enumerate(grad["params"])),
        ("t", grad["t"]),
    ]


def report(record_property, measurements: list[Measurement]) -> None:
    """Record what was measured (for conftest's tables), then fail on the first excess."""
    record_property("odecore_measurements", [m.as_property() for m in measurements])
    failed = [m for m in measurements if not m.passed]
    if failed:
        m = failed[0]
        raise AssertionError(
            f"{m.where}: relative error {m.error:.3g} exceeds the bound {m.bound:.3g}"
            + (f" (and {len(failed) - 1} more comparisons)" if len(failed) > 1 else "")
        )


# --------------------------------------------------------------------------------------------
# The checks


def check_values(bk, variant: Variant) -> list[Measurement]:
    ys = solve_variant(bk.name, variant).ys
    ref = variant_reference(variant)
    labels = _labels("reference", "values", variant, "ys")
    return [compare(ys, ref.ys, values_rtol(variant), values_floor(variant), **labels)]


def check_cross_values(bk, variant: Variant) -> list[Measurement]:
    ys = solve_variant(bk.name, variant).ys
    floor = values_floor(variant)
    out = []
    for peer in peers(bk.name):
        expected = solve_variant(peer.name, variant).ys
        labels = _labels("cross", "values", variant, f"ys vs {peer.name}")
        out.append(compare(ys, expected, cross_rtol(variant), floor, **labels))
    return out


def check_cross_steps(bk, variant: Variant) -> list[Measurement]:
    """Each sample's accepted and rejected steps against every other backend's: equal. The
    measurement is the largest difference in either count, with a bound of zero."""
    mine = solve_variant(bk.name, variant)
    out = []
    for peer in peers(bk.name):
        theirs = solve_variant(peer.name, variant)
        labels = _labels("cross", "steps", variant, f"steps vs {peer.name}")
        out.append(compare_steps(mine, theirs, **labels))
    return out


def compare_steps(mine: Solved, theirs: Solved, **labels) -> Measurement:
    """The largest difference in either step count of any sample, against a bound of zero."""
    where = labels.pop("where")
    shapes = [(getattr(mine, n).shape, getattr(theirs, n).shape) for n in ("naccept", "nreject")]
    if any(a != b for a, b in shapes):
        return Measurement(**labels, error=np.inf, bound=0.0, where=f"{where}: shape")
    difference, detail = 0, ""
    for name in ("naccept", "nreject"):
        a, b = getattr(mine, name), getattr(theirs, name)
        gap = np.abs(a - b)
        if gap.max() > difference:
            sample = int(np.argmax(gap))
            difference = int(gap.max())
            detail = f": {name}[{sample}] {int(a[sample])} against {int(b[sample])}"
    return Measurement(**labels, error=float(difference), bound=0.0, where=where + detail)


def check_gradient(bk, variant: Variant, mode: str) -> list[Measurement]:
    grad = gradient(bk.name, variant, mode)
    ref = variant_reference(variant, mode)
    magnitude = dict(gradient_arguments(ref.magnitude))
    out = []
    for (name, g), (_, r) in zip(
        gradient_arguments(grad), gradient_arguments(ref.gradient), strict=True
    ):
        labels = _labels("reference", mode, variant, f"d/d{name}")
        out.append(compare(g, r, gradient_rtol(variant), magnitude[name], **labels))
    return out


def check_cross_gradient(bk, variant: Variant, mode: str) -> list[Measurement]:
    grad = gradient(bk.name, variant, mode)
    magnitude = dict(gradient_arguments(variant_reference(variant).magnitude))
    out = []
    for peer in peers(bk.name):
        for peer_mode in SAME_GRADIENT.get(mode, (mode,)):
            if peer_mode not in variant.modes or not has_mode(peer, peer_mode):
                continue
            expected = gradient(peer.name, variant, peer_mode)
            for (name, g), (_, e) in zip(
                gradient_arguments(grad), gradient_arguments(expected), strict=True
            ):
                where = f"d/d{name} vs {peer.name}/{peer_mode}"
                labels = _labels("cross", mode, variant, where)
                out.append(compare(g, e, cross_rtol(variant), magnitude[name], **labels))
    if not out:
        pytest.skip(f"no other backend in this run computes {mode!r} gradients")
    return out


def check_partial_gradient(bk, variant: Variant, mode: str, wrt: str) -> list[Measurement]:
    """The gradient with respect to ``wrt`` alone (see ``partial_gradient``) against the
    matching entries of the full gradient: the exact reference's, with the bound of the
    ``grad:<mode>`` check, and the reference backend's in the same mode (or one that
    computes the same gradient), with the bound of the ``cross:<mode>`` checks (but see
    ``partial_cross_rtol``)."""
    if not bk.has_autodiff:
        pytest.skip(NO_PARTIAL_GRADIENT)
    column = f"{wrt}-only:{mode}"
    partial = selected_arguments(partial_gradient(bk.name, variant, mode, wrt))
    ref = variant_reference(variant, mode)
    expected = dict(gradient_arguments(ref.gradient))
    magnitude = dict(gradient_arguments(ref.magnitude))
    out = [
        compare(
            g,
            expected[name],
            gradient_rtol(variant),
            magnitude[name],
            **_labels("reference", column, variant, f"d/d{name}"),
        )
        for name, g in partial
    ]
    reference_bk = available_backend(REFERENCE_BACKEND)
    if reference_bk is None:
        return out
    same = [m for m in SAME_GRADIENT.get(mode, (mode,)) if has_mode(reference_bk, m)]
    full = dict(gradient_arguments(gradient(REFERENCE_BACKEND, variant, same[0])))
    magnitude = dict(gradient_arguments(variant_reference(variant).magnitude))
    rtol = partial_cross_rtol(variant, mode, wrt)
    for name, g in partial:
        where = f"d/d{name} vs full {REFERENCE_BACKEND}/{same[0]}"
        labels = _labels("cross", column, variant, where)
        out.append(compare(g, full[name], rtol, magnitude[name], **labels))
    return out


def check_vmap(bk, variant: Variant) -> list[Measurement]:
    """JAX's transformations over a batched variant's samples, against the batched solve on
    the reference backend. The solve of one sample, under ``jax.jit(jax.vmap(...))`` over the
    samples (of ``y0`` along the batch axis, of each parameter along its first axis), gives
    the batched outputs (the bound of ``cross:values``) and each sample's accepted and
    rejected steps (equal, as ``cross:steps``). ``jax.jit(jax.vmap(jax.grad(...)))`` of one
    sample's loss, in ``VMAP_MODE``, gives the rows of the batched gradient of ``y0`` and the
    parameters, and per-sample time gradients that sum to the batched one, since the samples
    share ``t`` (the bound of ``cross:<mode>``).

    The batched solve is the right reference because both promise the same thing: under
    ``vmap`` each sample gets what it would get alone (docs/gradients.md, JAX), and in a
    batch each sample takes its own steps and equals its solve alone (docs/solving.md,
    ``batch_axis``). Neither shares steps between samples."""
    if bk.name != VMAP_BACKEND:
        raise ValueError(f"the vmap check is about JAX's transformations, not {bk.name!r}")
    if available_backend(REFERENCE_BACKEND) is None:
        pytest.skip(f"the vmap check compares with the batched solve on {REFERENCE_BACKEND!r}")
    import jax  # only here: the one check that is about a framework's own transformations

    case = variant.case
    axis = case.batch_axis
    with precision(bk, case.dtype):
        y0, t, params = inputs(bk, case)
        weights = bk.asarray(case.loss_weights(), dtype=_dtype(bk, case.dtype))
        kwargs = {**gradient_kwargs(variant, bk, VMAP_MODE), "batch_axis": None}

        def solve_one(y0_, params_):
            sol = odecore.solve(case.dynamics, y0_, t, params=params_, **kwargs)
            return sol.ys, sol.stats["naccept"], sol.stats["nreject"]

        def loss_one(y0_, t_, params_, weights_):
            ys_ = odecore.odeint(
                case.dynamics, y0_, t_, params=params_, adjoint=VMAP_MODE, **kwargs
            )
            return loss(ys_, weights_)

        ys, naccept, nreject = jax.jit(jax.vmap(solve_one, in_axes=(axis, 0)))(y0, params)
        per_sample = jax.vmap(
            jax.grad(loss_one, argnums=(0, 1, 2)), in_axes=(axis, None, 0, 1 + axis)
        )
        g_y0, g_t, g_params = jax.jit(per_sample)(y0, t, params, weights)
        # vmap stacks the samples first; the batched solve has them after the time axis.
        ys = np.moveaxis(to_numpy(bk, ys), 0, 1 + axis).astype(np.float64)
        grad = {
            "y0": np.moveaxis(to_numpy(bk, g_y0), 0, axis).astype(np.float64),
            "params": tuple(to_numpy(bk, g).astype(np.float64) for g in g_params),
            "t": np.sum(to_numpy(bk, g_t).astype(np.float64), axis=0),
        }
        naccept = to_numpy(bk, naccept).astype(np.int64)
        vmapped = Solved(ys, int(np.max(naccept)), naccept, to_numpy(bk, nreject).astype(np.int64))

    batched = solve_variant(REFERENCE_BACKEND, variant)
    rtol = cross_rtol(variant)
    against = f"vs batched {REFERENCE_BACKEND}"
    labels = _labels("cross", "vmap:values", variant, f"ys {against}")
    out = [compare(vmapped.ys, batched.ys, rtol, values_floor(variant), **labels)]
    out.append(compare_steps(vmapped, batched, **_labels("cross", "vmap:steps", variant, against)))
    full = gradient(REFERENCE_BACKEND, variant, VMAP_MODE)
    magnitude = dict(gradient_arguments(variant_reference(variant).magnitude))
    for (name, g), (_, e) in zip(gradient_arguments(grad), gradient_arguments(full), strict=True):
        labels = _labels("cross", f"vmap:{VMAP_MODE}", variant, f"d/d{name} {against}")
        out.append(compare(g, e, rtol, magnitude[name], **labels))
    return out


# What the partial-gradient cells of a backend without autodiff say.
NO_PARTIAL_GRADIENT = (
    "odecore.vjp_odeint's pullback returns the cotangents of y0, params and t together, with "
    "no way to ask for some of them: its partial gradient is the full one, checked by grad:<mode>"
)


def selected_arguments(grad: dict) -> list[tuple[str, np.ndarray]]:
    """``gradient_arguments`` of a gradient with some of the keys."""
    out = [("y0", grad["y0"])] if "y0" in grad else []
    out += [(f"params[{k}]", g) for k, g in enumerate(grad.get("params", ()))]
    return out


def partial_cross_rtol(variant: Variant, mode: str, wrt: str) -> float:
    """How far a partial gradient may be from a full one. Where both take the same steps it
    is ``cross_rtol``. A ``y0``-only backsolve does not: its backward solve carries no
    parameter adjoint, so its error control (unless the seminorm already leaves that adjoint
    out) measures fewer components and, adaptive, takes other steps; it then meets the full
    gradient within the tolerance, the bound both meet the exact gradient with."""
    if mode == "backsolve" and wrt == "y0" and not variant.fixed_step and not variant.seminorm:
        return max(cross_rtol(variant), tolerance_rtol(variant))
    return cross_rtol(variant)


def peers(name: str) -> list[odecore.Backend]:
    """Every other backend in this run that is installed. A required one that is missing
    fails in its own cells."""
    found = [available_backend(other) for other in odecore.BACKEND_NAMES if other != name]
    found = [bk for bk in found if bk is not None]
    if not found:
        pytest.skip("no other backend in this run to compare with")
    return found


def _labels(kind: str, column: str, variant: Variant, where: str) -> dict:
    return {
        "kind": kind,
        "column": column,
        "family": variant.family,
        "dtype": variant.case.dtype,
        "where": where,
    }


def check_vjp(bk, variant: Variant) -> list[Measurement]:
    """The hand-written VJP against central differences of ``func``, both on ``bk`` in
    float64, at the initial state and two points of the reference trajectory."""
    case = variant.case
    ts = case.ts
    ys_ref = continuous_reference(case).ys
    rng = np.random.default_rng(7)
    with bk.float64():
        for i in (0, len(ts) // 2, len(ts) - 1):
            y = np.asarray(ys_ref[i], dtype=np.float64)
            cot = rng.uniform(-1.0, 1.0, size=y.shape)
            _check_vjp_at(bk, case, float(ts[i]), y, cot)
    return []


def _check_vjp_at(bk, case, t_value: float, y: np.ndarray, cot: np.ndarray) -> None:
    f64 = _dtype(bk, "float64")
    t = case.time_argument(t_value, bk.xp, f64)
    params = [np.asarray(p, dtype=np.float64) for p in case.params]

    def on_backend(a):
        return bk.asarray(np.asarray(a, dtype=np.float64), dtype=f64)

    def f(y_np, params_np):
        out = case.func(t, on_backend(y_np), tuple(on_backend(p) for p in params_np))
        return to_numpy(bk, out)

    def f_of_param(k):
        return lambda value: f(y, [value if j == k else q for j, q in enumerate(params)])

    cot_y, cot_params = case.vjp(
        t, on_backend(y), tuple(on_backend(p) for p in params), on_backend(cot)
    )
    assert len(cot_params) == len(params), (
        f"vjp returned {len(cot_params)} parameter cotangents for {len(params)} parameters"
    )
    # Central differences with h = 1e-6 of functions with O(1) derivatives: truncation
    # h^2 ~ 1e-12 and rounding eps / h ~ 1e-10, far inside 1e-7 of the cotangent's scale.
    fd_y = _fd_vjp(lambda value: f(value, params), y, cot)
    _assert_close(to_numpy(bk, cot_y), fd_y, 1e-7, f"cot_y at t={t_value}")
    for k, p in enumerate(params):
        fd_p = _fd_vjp(f_of_param(k), p, cot)
        _assert_close(to_numpy(bk, cot_params[k]), fd_p, 1e-7, f"cot_params[{k}] at t={t_value}")


def _assert_close(actual, expected, rtol, what) -> None:
    """Within ``rtol`` of the larger of 1 and the largest expected entry."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == np.shape(expected), (
        f"{what}: shape {actual.shape}, expected {np.shape(expected)}"
    )
    bound = rtol * max(float(np.max(np.abs(expected))), 1.0)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= bound, f"{what}: error {err:.3g} exceeds {bound:.3g}"


def _fd_vjp(f, x: np.ndarray, cot: np.ndarray) -> np.ndarray:
    """``cot . df/dx`` by central differences, one component of ``x`` at a time."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    for j in np.ndindex(x.shape):
        h = 1e-6 * max(1.0, abs(float(x[j])))
        plus, minus = x.copy(), x.copy()
        plus[j] += h
        minus[j] -= h
        out[j] = np.sum(cot * (f(plus) - f(minus))) / (2 * h)
    return out


def check_reference_gradient(bk, variant: Variant) -> list[Measurement]:
    case = variant.case
    fd = finite_difference_gradient(case)
    ref = continuous_reference(case)
    magnitude = dict(gradient_arguments(ref.magnitude))
    for (name, g), (_, r) in zip(
        gradient_arguments(fd), gradient_arguments(ref.gradient), strict=True
    ):
        m = compare(
            g,
            r,
            FD_RTOL,
            magnitude[name],
            **_labels("reference", "fd", variant, f"finite differences d/d{name}"),
        )
        assert m.passed, f"{m.where}: relative error {m.error:.3g} exceeds {m.bound:.3g}"
    return []


@functools.cache
def finite_difference_gradient(case) -> dict:
    """The loss gradient by central differences of odecore's NumPy solve in float64."""
    weights = case.loss_weights()
    y0 = np.asarray(case.y0, dtype=np.float64)
    params = [np.asarray(p, dtype=np.float64) for p in case.params]
    ts = case.ts

    def total_loss(y0_, ts_, params_):
        ys = odecore.odeint(
            case.dynamics,
            y0_,
            ts_,
            params=tuple(params_),
            rtol=FD_SOLVE_TOL,
            atol=FD_SOLVE_TOL,
            method=FD_METHOD,
            options=case.options or None,
            batch_axis=case.batch_axis,
            backend=REFERENCE_BACKEND,
        )
        return 0.5 * float(np.sum(weights * ys * ys))

    def central(x, evaluate):
        out = np.zeros(x.shape)
        for j in np.ndindex(x.shape):
            h = FD_RELATIVE_STEP * max(1.0, abs(float(x[j])))
            plus, minus = x.copy(), x.copy()
            plus[j] += h
            minus[j] -= h
            out[j] = (evaluate(plus) - evaluate(minus)) / (2 * h)
        return out

    g_y0 = central(y0, lambda v: total_loss(v, ts, params))

    def with_param(k, value):
        return [value if j == k else q for j, q in enumerate(params)]

    g_params = tuple(
        central(p, lambda v, k=k: total_loss(y0, ts, with_param(k, v)))
        for k, p in enumerate(params)
    )
    g_t = central(ts, lambda v: total_loss(y0, v, params))
    return {"y0": g_y0, "params": g_params, "t": g_t}


CHECK_FUNCTIONS = {
    "values": check_values,
    "cross:values": check_cross_values,
    "cross:steps": check_cross_steps,
    "vjp": check_vjp,
    "reference-gradient": check_reference_gradient,
    "vmap": check_vmap,
    **{f"grad:{m}": functools.partial(check_gradient, mode=m) for m in MODES},
    **{f"cross:{m}": functools.partial(check_cross_gradient, mode=m) for m in MODES},
    **{
        f"{wrt}-only:{m}": functools.partial(check_partial_gradient, mode=m, wrt=wrt)
        for m in MODES
        for wrt in PARTIAL_INPUTS
    },
}


# --------------------------------------------------------------------------------------------
# The cells


def _case_rows() -> dict:
    """The variant that carries a case's per-case checks (vjp, reference data): its first
    CI variant, so CI checks every case it solves."""
    rows = {}
    for variant in sorted(VARIANTS, key=lambda v: not v.ci):
        rows.setdefault(variant.case, variant)
    return rows


def _cells():
    case_rows = _case_rows()
    for backend_name in odecore.BACKEND_NAMES:
        modes = backend_modes(backend_name)
        for variant in VARIANTS:
            checks = ["values", "cross:values"]
            if variant.case.dtype == "float64":
                checks.append("cross:steps")
            if case_rows[variant.case] is variant:
                checks.append("vjp")
                if backend_name == REFERENCE_BACKEND:
                    checks.append("reference-gradient")
            gradient_modes = [m for m in variant.modes if m in modes]
            checks += [f"grad:{m}" for m in gradient_modes]
            checks += [f"cross:{m}" for m in gradient_modes]
            if variant.id in PARTIAL_VARIANT_IDS:
                checks += [f"{wrt}-only:{m}" for wrt in PARTIAL_INPUTS for m in gradient_modes]
            float64_batch = variant.case.dtype == "float64" and variant.case.batch_axis is not None
            if backend_name == VMAP_BACKEND and variant.ci and float64_batch:
                checks.append("vmap")
            marks = () if variant.ci else (pytest.mark.slow,)
            for check in checks:
                yield pytest.param(
                    backend_name,
                    variant,
                    check,
                    marks=marks,
                    id=f"{backend_name}-{variant.id}-{check}",
                )


@pytest.mark.parametrize(("backend_name", "variant", "check"), list(_cells()))
def test_conformance(backend_name: str, variant: Variant, check: str, record_property) -> None:
    bk = backend_or_skip(backend_name)
    report(record_property, CHECK_FUNCTIONS[check](bk, variant))


@pytest.mark.parametrize(
    "backend_name",
    [n for n in odecore.BACKEND_NAMES if available_backend(n) is None or backend_modes(n) != MODES],
)
def test_unavailable_mode_raises(backend_name: str) -> None:
    """A mode a backend lacks is refused up front, with the modes it has."""
    bk = backend_or_skip(backend_name)
    missing = [m for m in MODES if not has_mode(bk, m)]
    variant = VARIANTS[0]
    case = variant.case
    with bk.float64():
        y0, t, params = inputs(bk, case)
        for mode in missing:
            with pytest.raises(ValueError, match=f"adjoint={mode!r}.*'checkpoint'.*'backsolve'"):
                odecore.odeint(
                    case.dynamics, y0, t, params=params, adjoint=mode, **solver_kwargs(variant, bk)
                )


# --------------------------------------------------------------------------------------------
# Which backends run


def _missing_backend(monkeypatch, missing: str) -> None:
    """Make ``odecore.get_backend(missing)`` fail as it does when the framework is absent."""
    real = odecore.get_backend

    def get_backend(name):
        if name == missing:
            raise odecore.BackendNotAvailableError(f"the {name!r} backend needs a framework")
        return real(name)

    monkeypatch.setattr(odecore, "get_backend", get_backend)


def _outcome(name: str) -> tuple[type, str]:
    """What ``backend_or_skip(name)`` does: skip and fail are exceptions of their own."""
    with pytest.raises(BaseException) as info:
        backend_or_skip(name)
    return info.type, str(info.value)


def test_missing_required_backend_fails_naming_it(monkeypatch) -> None:
    _missing_backend(monkeypatch, REFERENCE_BACKEND)
    monkeypatch.setattr("conformance.test_conformance.REQUIRED_BACKENDS", {REFERENCE_BACKEND})
    kind, message = _outcome(REFERENCE_BACKEND)
    assert kind is pytest.fail.Exception, f"{kind.__name__}: {message}"
    assert f"the '{REFERENCE_BACKEND}' backend is required" in message


def test_missing_backend_nobody_required_is_skipped(monkeypatch) -> None:
    _missing_backend(monkeypatch, REFERENCE_BACKEND)
    monkeypatch.setattr("conformance.test_conformance.REQUIRED_BACKENDS", set())
    monkeypatch.setattr("conformance.test_conformance.SELECTED_BACKENDS", None)
    kind, message = _outcome(REFERENCE_BACKEND)
    assert kind is pytest.skip.Exception, f"{kind.__name__}: {message}"
    assert "needs a framework" in message


def _missing_device(monkeypatch, missing: str) -> None:
    """Make ``odecore.get_backend(missing)`` fail as it does when the device is absent."""
    real = odecore.get_backend

    def get_backend(name):
        if name == missing:
            raise odecore.DeviceNotAvailableError(f"the {name!r} backend needs a CUDA device")
        return real(name)

    monkeypatch.setattr(odecore, "get_backend", get_backend)


def test_selected_backend_without_its_device_is_skipped(monkeypatch) -> None:
    _missing_device(monkeypatch, "cupy")
    monkeypatch.setattr("conformance.test_conformance.SELECTED_BACKENDS", {"numpy", "cupy"})
    monkeypatch.setattr("conformance.test_conformance.REQUIRED_BACKENDS", {"numpy", "cupy"})
    monkeypatch.setattr("conformance.test_conformance.DEVICE_REQUIRED_BACKENDS", set())
    kind, message = _outcome("cupy")
    assert kind is pytest.skip.Exception, f"{kind.__name__}: {message}"
    assert "needs a CUDA device" in message


def test_required_backend_without_its_device_fails_naming_it(monkeypatch) -> None:
    _missing_device(monkeypatch, "cupy")
    monkeypatch.setattr("conformance.test_conformance.SELECTED_BACKENDS", None)
    monkeypatch.setattr("conformance.test_conformance.REQUIRED_BACKENDS", {"cupy"})
    monkeypatch.setattr("conformance.test_conformance.DEVICE_REQUIRED_BACKENDS", {"cupy"})
    kind, message = _outcome("cupy")
    assert kind is pytest.fail.Exception, f"{kind.__name__}: {message}"
    assert "the 'cupy' backend is required" in message and "needs a CUDA device" in message


def test_backend_names_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ODECORE_REQUIRED_BACKENDS", " numpy, torch ,")
    assert _backend_names("ODECORE_REQUIRED_BACKENDS") == {"numpy", "torch"}
    monkeypatch.setenv("ODECORE_REQUIRED_BACKENDS", "")
    assert _backend_names("ODECORE_REQUIRED_BACKENDS") is None
    monkeypatch.setenv("ODECORE_REQUIRED_BACKENDS", "numpy,tensorflow")
    with pytest.raises(ValueError, match="unknown backends \\['tensorflow'\\]"):
        _backend_names("ODECORE_REQUIRED_BACKENDS")


def test_ci_subset_covers_every_family_mode_and_option() -> None:
    """The CI subset keeps a cell for every method family x gradient mode x option (and for
    every method, batches, decreasing times and float32), so that deselecting the slow cells
    drops repetitions, not coverage."""

    def features(variant: Variant) -> set[str]:
        opts = variant.solver_options or {}
        found = {key for key in ("step_t", "jump_t", "first_step") if key in opts}
        if variant.fixed_step:
            found.add("step_size" if variant.step_size is not None else "grid")
        found |= {"seminorm"} if variant.seminorm else set()
        found |= {"batch"} if variant.case.batch_axis is not None else set()
        found |= {"decreasing"} if variant.case.ts[-1] < variant.case.ts[0] else set()
        found |= {"float32"} if variant.case.dtype == "float32" else set()
        return found | {"plain", variant.method}

    def cells(variants) -> set[tuple[str, str, str]]:
        return {(v.family, m, f) for v in variants for m in v.modes for f in features(v)}

    missing = cells(VARIANTS) - cells(v for v in VARIANTS if v.ci)
    assert not missing, f"no CI variant covers {sorted(missing)}"


def test_cross_steps_fails_on_another_step_count(monkeypatch) -> None:
    """The steps check can fail: one rejected step more on one sample is a difference of 1
    against a bound of 0, and equal counts pass."""
    counts = {
        "mine": np.array([12, 30]),
        "same": np.array([12, 30]),
        "other": np.array([12, 31]),
    }

    def solved(name, variant):
        return Solved(np.zeros((2, 2)), 30, np.array([10, 25]), counts[name])

    class Peer:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr("conformance.test_conformance.solve_variant", solved)
    monkeypatch.setattr(
        "conformance.test_conformance.peers", lambda name: [Peer("same"), Peer("other")]
    )
    same, other = check_cross_steps(Peer("mine"), VARIANTS[0])
    assert same.passed and not other.passed
    assert other.error == 1.0 and "nreject[1] 30 against 31" in other.where


def test_partial_and_vmap_cells_are_on_float64_ci_variants() -> None:
    """The partial-gradient variants are float64 CI variants of both method families, and
    the vmap check has a cell on a float64 CI batch."""
    by_id = {variant.id: variant for variant in VARIANTS}
    unknown = [i for i in PARTIAL_VARIANT_IDS if i not in by_id]
    assert not unknown, f"PARTIAL_VARIANT_IDS names unknown variants: {unknown}"
    chosen = [by_id[i] for i in PARTIAL_VARIANT_IDS]
    assert all(v.ci and v.case.dtype == "float64" for v in chosen)
    assert {v.family for v in chosen} == {"adaptive", "fixed-step"}
    vmap_rows = [p.values[1] for p in _cells() if p.values[2] == "vmap"]
    assert vmap_rows and all(v.ci and v.case.batch_axis is not None for v in vmap_rows)
