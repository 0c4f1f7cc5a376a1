"""The kernel loop re-created for a compiler: its rules, its functions and the dynamics bound.

Nothing here imports a compiler. The adapter passes its decorator (``numba.njit``, say), and
each function is re-created by ``odecore.control.primitives.bind`` with compiled callees as
its globals, then compiled: the primitives first, then the rules that call them, then the
loop's functions in dependency order (``odecore.kernels.loop.KERNEL_FUNCTIONS``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from odecore.control import primitives, rules
from odecore.kernels import loop, replay


def float32_time(t):
    """``loop.state_time`` for float32 states."""
    return np.float32(t)


def float32_jump_below(t):
    """``loop.jump_below`` for float32 states: the float32 below the jump's nearest float32,
    which lies below the jump in both precisions. ``np.nextafter`` rather than
    ``math.nextafter``, which in Python works in float64 whatever its arguments."""
    return np.float64(np.nextafter(np.float32(t), np.float32(-np.inf)))


def float32_jump_above(t):
    """``loop.jump_above`` for float32 states (see :func:`float32_jump_below`)."""
    return np.float64(np.nextafter(np.float32(t), np.float32(np.inf)))


# The loop functions each state dtype's kernel binds in place of ``odecore.kernels.loop``'s
# float64 ones, by name: how the dynamics see time.
BY_STATE_DTYPE = {
    "float64": {},
    "float32": {
        "state_time": float32_time,
        "jump_below": float32_jump_below,
        "jump_above": float32_jump_above,
    },
}


def compiled_rules(
    jit: Callable, replacements: dict[str, Callable] | None = None
) -> dict[str, Callable]:
    """The scalar primitives and every pure rule, compiled by ``jit``, by name.
    ``replacements`` stand in for primitives of the same name: a compiler's own version of
    one, with the same results."""
    sources = {**primitives.SCALAR, **(replacements or {})}
    namespace = {name: jit(fn) for name, fn in sources.items()}
    for name, fn in rules.RULES.items():
        namespace[name] = jit(primitives.bind(fn, namespace))
    return namespace


def compiled_loop(
    jit: Callable,
    rule_namespace: dict[str, Callable],
    dynamics,
    replacements: dict[str, Callable] | None = None,
    state_size: int = 0,
    state_dtype: str = "float64",
    watched: bool = False,
) -> SimpleNamespace:
    """The kernel loop's functions compiled by ``jit``, calling the compiled rules and
    ``dynamics(t, y, dy, params)``, by name. ``replacements`` stand in for the loop's
    functions of the same name: one method's sums (``odecore.kernels.specialize``). A
    positive ``state_size`` compiles them for states of that many elements only
    (``loop.STATE_SIZE``); ``state_dtype`` (``"float64"`` or ``"float32"``) is the dtype of
    the states they solve, whose time the dynamics see (``BY_STATE_DTYPE``). ``watched``
    compiles the loop that publishes its progress (``loop.WATCHED``); the compiler's
    ``publish`` and ``watched_value`` then come in ``replacements``."""
    namespace = {
        **rule_namespace,
        "dynamics": dynamics,
        "STATE_SIZE": state_size,
        "WATCHED": int(watched),
    }
    replacements = {**BY_STATE_DTYPE[state_dtype], **(replacements or {})}
    for fn in loop.KERNEL_FUNCTIONS:
        source = replacements.get(fn.__name__, fn)
        namespace[fn.__name__] = jit(primitives.bind(source, namespace))
    return SimpleNamespace(**{fn.__name__: namespace[fn.__name__] for fn in loop.KERNEL_FUNCTIONS})


def compiled_replay(
    jit: Callable,
    rule_namespace: dict[str, Callable],
    loop_functions: dict[str, Callable],
    vjp,
    state_size: int = 0,
) -> SimpleNamespace:
    """The checkpoint replay's functions (``odecore.kernels.replay``) compiled by ``jit``,
    calling the compiled rules, one kernel's compiled loop functions (``loop_functions``,
    by name: the sums and dynamics of the solve whose tape it replays) and ``vjp(t, y,
    params, cotangent, y_bar, params_bar)``, by name. ``state_size`` is the kernel's
    ``loop.STATE_SIZE``."""
    namespace = {**rule_namespace, **loop_functions, "vjp": vjp, "STATE_SIZE": state_size}
    for fn in replay.REPLAY_FUNCTIONS:
        namespace[fn.__name__] = jit(primitives.bind(fn, namespace))
    names = [fn.__name__ for fn in replay.REPLAY_FUNCTIONS]
    return SimpleNamespace(**{name: namespace[name] for name in names})
