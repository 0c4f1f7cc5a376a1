"""CUDA source for the CuPy backend's fused kernels, generated from a tableau's numbers.

Plain Python that writes strings: it imports no CuPy, so the source can be generated and
checked on a machine without a GPU. ``odecore.adapters.cupy`` compiles each :class:`Source`
into one ``cupy.ElementwiseKernel`` or ``cupy.ReductionKernel``.

Every kernel computes what the portable array-API path computes:

- a stage combination ``y + h * sum_j w_j K_j`` (``odecore.solvers.stage_stores.lincomb``):
  each nonzero weight times its stage, summed left to right, in the state's type ``T``;
- the scaled RMS error ratio (``odecore.control.norms``):
  ``sqrt(mean((err / (atol + rtol * max(|y|, |y_new|)))**2))`` per sample, in double from the
  state's values on (the portable path rounds the scale and the quotient to the state's type
  first, and the step-size control then reads the ratio in double);
- the dense output ``y + h * sum_i b_i(theta) K_i`` with ``b_i(theta) = sum_m
  dense[i][m] theta**(m + 1)`` (``ExplicitRK.interpolate``): each weight in double, as theta
  is kept in the time dtype, then cast to ``T``.

Coefficients are written with ``repr``, the shortest decimal that reads back as the same
double, so a kernel's numbers are the tableau's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

#: Kernel arguments are named k0, k1, ...; CUDA kernels take a few thousand bytes of
#: arguments, and no method here has more stages than this.
MAX_STAGES = 64


@dataclass(frozen=True)
class Source:
    """One kernel's source, in the pieces ``cupy.ElementwiseKernel`` (``operation``) or
    ``cupy.ReductionKernel`` (``map_expr``, ``reduce_expr``, ``post_map_expr``,
    ``reduce_type``, ``identity``) take, with ``preamble`` (device functions) for either.
    ``stages`` are the stage indices the kernel reads, in the order of its ``k`` arguments."""

    name: str
    in_params: str
    out_params: str
    operation: str = ""
    map_expr: str = ""
    reduce_expr: str = ""
    post_map_expr: str = ""
    reduce_type: str = ""
    identity: str = ""
    preamble: str = ""
    stages: tuple[int, ...] = ()


def _literal(value: float, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return repr(value)


def _checked_rows(rows: Sequence[Sequence[float]], what: str) -> list[tuple[float, ...]]:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"{what} must be a sequence of coefficient rows, got {type(rows).__name__}")
    if not 0 < len(rows) <= MAX_STAGES:
        raise ValueError(f"{what} must have between 1 and {MAX_STAGES} rows, got {len(rows)}")
    checked = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{what}[{i}] must be a sequence of numbers, got {type(row).__name__}")
        if len(row) > MAX_STAGES:
            raise ValueError(f"{what}[{i}] has {len(row)} numbers, more than {MAX_STAGES}")
        checked.append(tuple(float(_literal(c, f"{what}[{i}][{m}]")) for m, c in enumerate(row)))
    return checked


def _name(prefix: str, numbers: Sequence[float]) -> str:
    # A kernel's name shows in profiles and error messages; the hash of its numbers keeps two
    # rows apart there.
    return f"odecore_{prefix}_{abs(hash(tuple(numbers))) % 10**8:08d}"


def stage_combination(weights: Sequence[float], with_y: bool = True) -> Source:
    """The kernel ``out = y + hy * sum_j w_j k_j`` (``with_y``), or ``out = hy * sum_j w_j k_j``
    (an error estimate), over the nonzero weights only; ``hy`` broadcasts (one step size per
    sample). A row of zeros gives ``0 * k0``, as the portable path does."""
    (row,) = _checked_rows([weights], "weights")
    terms = [(j, w) for j, w in enumerate(row) if w != 0.0] or [(0, 0.0)]
    stages = tuple(j for j, _ in terms)
    total = " + ".join(f"(T)({w!r}) * k{j}" for j, w in terms)
    combination = f"hy * ({total})"
    inputs = ["T y"] if with_y else []
    inputs += ["T hy", *(f"T k{j}" for j in stages)]
    return Source(
        name=_name("stage" if with_y else "increment", row),
        in_params=", ".join(inputs),
        out_params="T out",
        operation=f"out = {'y + ' if with_y else ''}{combination}",
        stages=stages,
    )


def rms_error_ratio(rtol_type: str = "R", atol_type: str = "A") -> Source:
    """The reduction ``sqrt(sum(s * s) / n)`` of ``s = err / (atol + rtol * max(|y|,
    |y_new|))`` over the reduced axis, in double, with ``n`` the number of elements reduced
    per output. ``rtol`` and ``atol`` are arrays that broadcast to the state, their types
    read from the arguments (``R``, ``A``), or ``"float64"`` for a Python number: CuPy reads
    no type placeholder from a Python number, so a kernel whose placeholder only such a
    number fills cannot be called."""
    if rtol_type not in ("R", "float64") or atol_type not in ("A", "float64"):
        raise ValueError(
            f"rtol_type must be 'R' or 'float64' and atol_type 'A' or 'float64', got "
            f"{rtol_type!r} and {atol_type!r}"
        )
    scale = "(double)atol + (double)rtol * fmax(fabs((double)y), fabs((double)y_new))"
    return Source(
        name="odecore_rms_error_ratio",
        in_params=f"T err, T y, T y_new, {rtol_type} rtol, {atol_type} atol",
        out_params="float64 out",
        map_expr=f"odecore_square((double)err / ({scale}))",
        reduce_expr="a + b",
        post_map_expr="out = sqrt(a / (double)(_in_ind.size() / _out_ind.size()))",
        reduce_type="double",
        identity="0",
        preamble="__device__ double odecore_square(double s) { return s * s; }",
    )


def _horner(coefficients: tuple[float, ...]) -> str:
    """``sum_m c_m theta**(m + 1)`` as ``theta * (c0 + theta * (c1 + ...))``."""
    inner = repr(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        inner = f"{c!r} + theta * ({inner})"
    return f"theta * ({inner})"


def tolerance_types(rtol, atol) -> tuple[str, str]:
    """The :func:`rms_error_ratio` parameter types for these tolerances: a device array's
    own (a placeholder), double for a host number."""
    return tuple(
        placeholder if hasattr(value, "__cuda_array_interface__") else "float64"
        for value, placeholder in ((rtol, "R"), (atol, "A"))
    )


def dense_output(dense: Sequence[Sequence[float]]) -> Source:
    """The kernel ``out = y + hy * sum_i (T)b_i(theta) * k_i`` over the dense stages whose
    polynomial is not zero, ``theta`` in double, one per sample (it broadcasts)."""
    rows = _checked_rows(dense, "dense")
    used = [(i, row) for i, row in enumerate(rows) if any(c != 0.0 for c in row)]
    if not used:
        raise ValueError("dense has no nonzero coefficient: the interpolant would be constant")
    total = " + ".join(f"(T)({_horner(row)}) * k{i}" for i, row in used)
    stages = tuple(i for i, _ in used)
    return Source(
        name=_name("dense", [c for _, row in used for c in row]),
        in_params=", ".join(["float64 theta", "T y", "T hy", *(f"T k{i}" for i in stages)]),
        out_params="T out",
        operation=f"out = y + hy * ({total})",
        stages=stages,
    )
