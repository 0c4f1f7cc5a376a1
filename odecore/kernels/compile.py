"""The kernel loop re-created for a compiler: its rules, its functions and the dynamics bound.

Nothing here imports a compiler. The adapter passes its decorator (``numba.njit``, say), and
each function is re-created by ``odecore.control.primitives.bind`` with compiled callees as
its globals, then compiled: the primitives first, then the rules that call them, then the
loop's functions in dependency order (``odecore.kernels.loop.KERNEL_FUNCTIONS``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from odecore.control import primitives, rules
from odecore.kernels import loop


def compiled_rules(jit: Callable) -> dict[str, Callable]:
    """The scalar primitives and every pure rule, compiled by ``jit``, by name."""
    namespace = {name: jit(fn) for name, fn in primitives.SCALAR.items()}
    for name, fn in rules.RULES.items():
        namespace[name] = jit(primitives.bind(fn, namespace))
    return namespace


def compiled_loop(
    jit: Callable,
    rule_namespace: dict[str, Callable],
    dynamics,
    replacements: dict[str, Callable] | None = None,
) -> SimpleNamespace:
    """The kernel loop's functions compiled by ``jit``, calling the compiled rules and
    ``dynamics(t, y, dy, params)``, by name. ``replacements`` stand in for the loop's
    functions of the same name: one method's sums (``odecore.kernels.specialize``)."""
    namespace = {**rule_namespace, "dynamics": dynamics}
    replacements = replacements or {}
    for fn in loop.KERNEL_FUNCTIONS:
        source = replacements.get(fn.__name__, fn)
        namespace[fn.__name__] = jit(primitives.bind(source, namespace))
    return SimpleNamespace(**{fn.__name__: namespace[fn.__name__] for fn in loop.KERNEL_FUNCTIONS})
