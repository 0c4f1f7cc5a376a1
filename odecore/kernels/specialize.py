"""The kernel loop's tableau sums written out for one method, coefficients as literals.

The generic functions of ``odecore.kernels.loop`` read a method's coefficients from arrays
at run time: each stage sum is a loop over the stages with a test for zero per coefficient,
inside the loop over state elements. :func:`specialized` writes, for one method, functions
with the same names and signatures that hold the nonzero coefficients as literals: a
compiler then emits straight-line multiply-adds, with ``h a_ij`` formed once per step. For
the Lorenz system under DOP853 this halves the time of a compiled solve.

Each written function does the arithmetic of the one it replaces term for term, in the same
order and with the same roundings: ``(h * a_ij) * K_j`` summed left to right and then added
to ``y``, each factor cast to the state's dtype (``loop.state_time``) as the generic
functions cast it; zero coefficients are left out, as the generic functions skip them. So the
specialised kernel takes the same steps and produces the same numbers (only the sign of an
exact zero can differ: a generic sum starts at ``0.0``). tests/test_kernel_specialize.py
checks this against the generic functions.

The source is plain scalar Python, like the loop itself: it runs uncompiled, and it compiles
for the CPU (``numba.njit``) and for one GPU thread (``numba.cuda.jit``) alike.
"""

from __future__ import annotations

import linecache
from collections.abc import Callable

from odecore.kernels import loop
from odecore.kernels.tableau import (
    B_ERR,
    B_ERR2,
    DENSE_STAGES,
    EXTRA_STAGES,
    FSAL,
    STAGES,
    TWO_ESTIMATES,
    B,
    KernelTableau,
)

# The loop functions this module writes, in the loop's dependency order.
NAMES = (
    "stage_sum",
    "solution_sum",
    "error_estimates",
    "dense_stage_sum",
    "take_step",
    "take_lane_steps",
    "interpolate",
)


def source(tab: KernelTableau) -> str:
    """The source of the functions of :data:`NAMES` for the method with arrays ``tab``."""
    return "\n\n".join(
        (
            _stage_sum(tab),
            _solution_sum(tab),
            _error_estimates(tab),
            _dense_stage_sum(tab),
            _take_step(tab),
            _take_lane_steps(tab),
            _interpolate(tab),
        )
    )


def specialized(name: str, tab: KernelTableau) -> dict[str, Callable]:
    """The functions of :data:`NAMES` for the method ``name`` with arrays ``tab``, by name.
    Their globals are the loop module's, so ``odecore.control.primitives.bind`` rebinds
    them like the loop's own functions."""
    text = source(tab)
    filename = f"<odecore.kernels.specialize: {name}>"
    # Registered so that tracebacks, inspect and the compiler's messages can show the lines.
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace = dict(vars(loop))
    exec(compile(text, filename, "exec"), namespace)
    return {fn_name: namespace[fn_name] for fn_name in NAMES}


def _k(j: int) -> str:
    return f"work[{loop.FIRST_DENSE_ROW + j}, i]"


def _scaled_sum(row) -> str:
    """``(h * w_0) * K_0 + (h * w_1) * K_1 + ...`` over the nonzero weights of ``row``, each
    factor in the state's dtype (``loop.state_time``), or ``0.0`` when all are zero."""
    terms = [f"state_time(h * {float(w)!r}) * {_k(j)}" for j, w in enumerate(row) if w != 0.0]
    return " + ".join(terms) if terms else "0.0"


def _stage_sum(tab: KernelTableau) -> str:
    lines = ["def stage_sum(work, h, stage, tab_a):", "    n = state_size(work)"]
    for stage in range(1, int(tab.sizes[STAGES])):
        keyword = "if" if stage == 1 else "elif"
        lines += [
            f"    {keyword} stage == {stage}:",
            "        for i in range(n):",
            f"            work[{loop.Y_STAGE}, i] = work[{loop.Y}, i] + "
            f"({_scaled_sum(tab.a[stage, :stage])})",
        ]
    return "\n".join(lines) + "\n"


def _solution_sum(tab: KernelTableau) -> str:
    count = int(tab.sizes[STAGES])
    return (
        "def solution_sum(work, h, tab_b, count):\n"
        "    for i in range(state_size(work)):\n"
        f"        work[{loop.Y_NEW}, i] = work[{loop.Y}, i] + ({_scaled_sum(tab.b[B, :count])})\n"
    )


def _error_estimates(tab: KernelTableau) -> str:
    count = int(tab.sizes[STAGES])
    lines = [
        "def error_estimates(work, h, tab_b, count, two):",
        "    for i in range(state_size(work)):",
        f"        work[{loop.ERR}, i] = {_scaled_sum(tab.b[B_ERR, :count])}",
    ]
    if tab.sizes[TWO_ESTIMATES]:
        lines.append(f"        work[{loop.ERR2}, i] = {_scaled_sum(tab.b[B_ERR2, :count])}")
    return "\n".join(lines) + "\n"


def _dense_stage_sum(tab: KernelTableau) -> str:
    extra = int(tab.sizes[EXTRA_STAGES])
    first_extra = int(tab.sizes[DENSE_STAGES]) - extra
    lines = ["def dense_stage_sum(work, h, extra, dense_a, count):", "    n = state_size(work)"]
    if extra == 0:
        lines.append("    return")
    for x in range(extra):
        row = tab.dense_a[x, : first_extra + x]
        terms = [f"state_time({float(w)!r}) * {_k(j)}" for j, w in enumerate(row) if w != 0.0]
        lines += [
            f"    {'if' if x == 0 else 'elif'} extra == {x}:",
            "        for i in range(n):",
            f"            work[{loop.Y_STAGE}, i] = work[{loop.Y}, i] + state_time(h) * "
            f"({' + '.join(terms) if terms else 'state_time(0.0)'})",
        ]
    return "\n".join(lines) + "\n"


def _take_step(tab: KernelTableau) -> str:
    """The stages one after another, without the loop over them and the choice of a stage's
    sum inside it: each stage's sum and time are written out (the generic ``stage_sum`` and
    ``t + c_i h``), then the solution's."""
    lines = [
        "def take_step(t, h, t_left, clip, params, tab_a, tab_c, tab_b, sizes, settings, work):",
        "    direction = settings[DIRECTION]",
        "    n = state_size(work)",
    ]
    for stage in range(1, int(tab.sizes[STAGES])):
        lines += _written_stage(tab, stage, "    ", "t_left", "params")
    lines += _written_solution(tab, "    ", "h", "tab_b")
    return "\n".join(lines) + "\n"


def _take_lane_steps(tab: KernelTableau) -> str:
    """``loop.take_lane_steps`` with each stage written out as in :func:`_take_step`, for
    one lane after another: a stage of every busy lane, then the next stage."""
    lines = [
        "def take_lane_steps(clip, params, tab, settings, works, lane_t, lane_n):",
        "    direction = settings[DIRECTION]",
        "    n = state_size(works[0])",
    ]
    lane = "            "
    for stage in range(1, int(tab.sizes[STAGES])):
        lines += [
            "    for lane in range(LANES):",
            "        trajectory = lane_n[lane, LANE_TRAJECTORY]",
            "        if trajectory >= 0:",
            f"{lane}work = works[lane]",
            f"{lane}t = lane_t[lane, LANE_T]",
            f"{lane}h = lane_t[lane, LANE_H]",
            *_written_stage(
                tab, stage, lane, "lane_t[lane, LANE_T_LEFT]", "row_of(params, trajectory)"
            ),
        ]
    lines += [
        "    for lane in range(LANES):",
        "        if lane_n[lane, LANE_TRAJECTORY] >= 0:",
        f"{lane}work = works[lane]",
        *_written_solution(tab, lane, "lane_t[lane, LANE_H]", "tab[2]"),
    ]
    return "\n".join(lines) + "\n"


def _written_stage(tab: KernelTableau, stage: int, indent: str, t_left: str, params: str):
    """The lines of one stage of a step from ``work``, at ``t`` by ``h``: its input, its
    time (clipped to the expression ``t_left``) and its evaluation with ``params``."""
    return [
        f"{indent}for i in range(n):",
        f"{indent}    work[{loop.Y_STAGE}, i] = work[{loop.Y}, i] + "
        f"({_scaled_sum(tab.a[stage, :stage])})",
        f"{indent}t_stage = t + {float(tab.c[stage])!r} * h",
        f"{indent}if clip:",
        f"{indent}    t_stage = minimum(t_stage, {t_left})",
        f"{indent}evaluate(t_stage, work, {loop.Y_STAGE}, {loop.FIRST_DENSE_ROW + stage}, "
        f"{params}, direction)",
    ]


def _written_solution(tab: KernelTableau, indent: str, h: str, tab_b: str):
    """The lines that form ``y_new`` from a step's stages: the last stage's input of an
    FSAL method, else the solution's sum."""
    if tab.sizes[FSAL]:
        return [
            f"{indent}for i in range(n):",
            f"{indent}    work[{loop.Y_NEW}, i] = work[{loop.Y_STAGE}, i]",
        ]
    return [f"{indent}solution_sum(work, {h}, {tab_b}, {int(tab.sizes[STAGES])})"]


def _interpolate(tab: KernelTableau) -> str:
    dense = tab.dense
    degree = dense.shape[1]
    # theta, theta**2, ... by repeated products, as the generic interpolate forms them.
    lines = ["def interpolate(out, out_row, theta, h, dense, work, weights):", "    p1 = theta"]
    lines += [f"    p{m + 1} = p{m} * theta" for m in range(1, degree)]
    terms = []
    for r in range(dense.shape[0]):
        coefficient_terms = [f"{float(c)!r} * p{m + 1}" for m, c in enumerate(dense[r]) if c != 0.0]
        if coefficient_terms:
            lines.append(f"    w{r} = state_time({' + '.join(coefficient_terms)})")
            terms.append(f"w{r} * {_k(r)}")
    total = " + ".join(terms) if terms else "state_time(0.0)"
    lines += [
        "    for i in range(state_size(work)):",
        f"        out[out_row, i] = work[{loop.Y}, i] + state_time(h) * ({total})",
    ]
    return "\n".join(lines) + "\n"
