"""The numba backend's compiled kernels kept on disk, so that a new process does not compile
them again.

Numba caches a function's machine code by its source file and name, and does not look at
the globals it calls: a kernel loop bound to one dynamics (``compiled_loop``) shares file and
name with every other binding, so it cannot be cached as it is. Instead, for dynamics that
can be imported by name, :func:`load` writes one module per dynamics, form and method: the
kernel loop's source, the method's written-out sums and an import of the dynamics, each
function compiled with ``cache=True``. The module's name is a digest of everything its code
depends on (its text, the sources of the rules, the primitives, the numba backend's own
primitives (``numba_primitives``) and the atomic accesses of ``numba_watch``, the dynamics'
code, the odecore and Numba versions), so a change to any of them writes a new module
rather than reusing stale machine code. A helper function the dynamics call is not part of
the digest: edit it and Numba's cache of the dynamics serves the old one, as Numba's own
caching does.
:func:`load_replay` writes the checkpoint replay of such a kernel the same way, one module
per kernel and ``func.vjp``, taking the loop's functions from the kernel's module, and
:func:`load_adjoint` the backsolve's augmented dynamics, one module per dynamics and VJP,
whose compiled function can itself be imported by name: its kernel is then kept on disk by
:func:`load`.

The directory is ``$ODECORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/odecore``, else
``~/.cache/odecore``, with a ``numba`` folder inside; set ``ODECORE_CACHE_DIR`` to an empty
string to keep every kernel in memory only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numba
import numpy as np
from odecore.adapters import (
    numba_atomics,
    numba_options,
    numba_primitives,
    numba_threads,
    numba_watch,
)

import odecore
from odecore.control import primitives, rules
from odecore.kernels import loop, replay
from odecore.kernels.compile import BY_STATE_DTYPE
from odecore.kernels.specialize import NAMES as WRITTEN_NAMES

_RETURNING = {
    "in place": "    _user(t, y, dy, params)\n",
    "returning": "    rate = _user(t, y, params)\n"
    "    for i in range(dy.shape[0]):\n"
    "        dy[i] = rate[i]\n",
    "returning without params": "    rate = _user(t, y)\n"
    "    for i in range(dy.shape[0]):\n"
    "        dy[i] = rate[i]\n",
}


def directory() -> Path | None:
    """Where the kernel modules are written, or None when disk caching is switched off."""
    configured = os.environ.get("ODECORE_CACHE_DIR")
    if configured is not None:
        return Path(configured) / "numba" if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "odecore" / "numba"


def importable_name(func) -> tuple[str, str] | None:
    """``(module, qualified name)`` by which ``func`` can be imported, or None (a lambda, a
    function defined inside another, one typed at a prompt)."""
    py_func = getattr(func, "py_func", func)
    module_name = getattr(py_func, "__module__", None)
    qualname = getattr(py_func, "__qualname__", "")
    # A script's functions (module __main__) qualify: a later run of the script imports them
    # from its own __main__. A notebook's do not (its __main__ has no file).
    if not module_name or "<" in qualname:
        return None
    # Numba's disk cache finds a function by its code's file: code made by exec() or
    # compile() ("<string>") has none, even in a module that has one.
    code = getattr(py_func, "__code__", None)
    if code is None or code.co_filename.startswith("<"):
        return None
    module = sys.modules.get(module_name)
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if target is not func or getattr(module, "__file__", None) is None:
        return None
    return module_name, qualname


def load(
    func,
    form: str,
    sums: str,
    ensemble_source: str,
    state_size: int,
    state_dtype: str,
    watched: bool = False,
) -> ModuleType | None:
    """The generated module for ``func`` (in ``form``) with the method's written sums
    ``sums`` (their source, ``odecore.kernels.specialize.source``), the ensemble's loop
    over a range of trajectories ``ensemble_source``, the state size it is compiled for
    (``loop.STATE_SIZE``, 0 for any), the states' dtype and whether it publishes its
    progress (``loop.WATCHED``), or None where the kernel cannot be cached on disk.
    Its ``solve_trajectory`` and ``solve_ensemble`` are the kernel."""
    folder = directory()
    name = importable_name(func)
    if folder is None or name is None:
        return None
    text = _module_text(name, form, sums, ensemble_source, state_size, state_dtype, watched)
    return _written(folder, f"odecore_kernel_{_digest(text, func)}", text)


_VJP_FORMS = {
    "in place": "    _vjp_user(t, y, params, cotangent, y_bar, params_bar)\n",
    "returning": "    cot_y, cot_params = _vjp_user(t, y, params, cotangent)\n"
    "    for i in range(y_bar.shape[0]):\n"
    "        y_bar[i] = cot_y[i]\n"
    "    for i in range(params_bar.shape[0]):\n"
    "        params_bar[i] = cot_params[i]\n",
}


def load_replay(kernel, func, vjp_form: str, ensemble_source: str) -> ModuleType | None:
    """The generated module of the checkpoint replay (``odecore.kernels.replay``) of the
    tapes of ``kernel``, a module :func:`load` gave for ``func``, with ``func.vjp`` in
    ``vjp_form`` (``"in place"`` or ``"returning"``) and the loop over a range of
    trajectories ``ensemble_source``; None where it cannot be kept on disk. It takes the
    loop's functions from ``kernel``, so the steps it replays are the kernel's. Its
    ``replay_ensemble`` is the replay."""
    folder = directory()
    name = importable_name(func)
    if folder is None or name is None or kernel is None:
        return None
    lines = [
        '"""A checkpoint replay of odecore\'s numba backend, written by '
        'odecore.adapters.numba_cache."""',
        "import sys",
        "import numba",
        "import numpy as np",
        "from odecore.adapters.numba import _compiled_rules",
        "from odecore.adapters.numba_options import one_copy_per_type",
        "from odecore.adapters.numba_threads import range_done, take_range",
        "from odecore.kernels import loop",
        "from odecore.kernels.loop import *  # noqa: F403  (the constants)",
        "from odecore.kernels.replay import *  # noqa: F403  (the constants)",
        "from odecore.kernels.tableau import *  # noqa: F403  (the constants)",
        "globals().update(_compiled_rules())",
        # The kernel whose tapes this replays: its compiled loop functions, by name.
        f"_kernel = sys.modules[{kernel.__name__!r}]",
        "STATE_SIZE = _kernel.STATE_SIZE",
        f"for _name in {[fn.__name__ for fn in loop.KERNEL_FUNCTIONS]!r}:",
        "    globals()[_name] = getattr(_kernel, _name)",
        *_vjp_import(name),
        "",
        "",
        "def vjp(t, y, params, cotangent, y_bar, params_bar):",
        _VJP_FORMS[vjp_form],
        f"vjp = numba.njit(vjp, cache=True{_options_text(numba_options.USER_CODE)})",
    ]
    for fn in replay.REPLAY_FUNCTIONS:
        lines += ["", inspect.getsource(fn)]
    lines += ["", ensemble_source, ""]
    for fn in replay.REPLAY_FUNCTIONS:
        lines.append(_compiled_text(fn.__name__, numba_options.replay_options(fn.__name__)))
    lines.append("replay_ensemble = numba.njit(_replay_ensemble, cache=True, nogil=True)")
    text = "\n".join(lines) + "\n"
    digest = _digest(text, func, inspect.getsource(replay), func.vjp)
    return _written(folder, f"odecore_replay_{digest}", text)


def load_adjoint(func, form: str, vjp_form: str, augmented, constants: dict):
    """The backsolve's augmented dynamics of ``func`` (in ``form``) and ``func.vjp`` (in
    ``vjp_form``) kept on disk: ``augmented``'s source (``adapters.numba._adjoint`` or
    ``_adjoint_rows``) in a module of its own, with the module constants ``constants`` and
    the dynamics and VJP imported by name, compiled with ``cache=True``. Returns its compiled
    function, which is itself importable by name, so that the kernel solving it is kept on
    disk too (:func:`load`); None where ``func`` cannot be imported by name."""
    folder = directory()
    name = importable_name(func)
    if folder is None or name is None:
        return None
    lines = [
        '"""The backsolve\'s augmented dynamics of odecore\'s numba backend, written by '
        'odecore.adapters.numba_cache."""',
        "import numba",
        "import numpy as np",
        *_user_import(name),
        *_vjp_import(name),
        *(f"{key} = {value!r}" for key, value in constants.items()),
        "",
        "",
        "def dynamics_in_place(t, y, dy, params):",
        _RETURNING[form],
        "",
        "def vjp_in_place(t, y, params, cotangent, y_bar, params_bar):",
        _VJP_FORMS[vjp_form],
        "",
        inspect.getsource(augmented),
        "dynamics_in_place = numba.njit(dynamics_in_place, cache=True, inline='always')",
        "vjp_in_place = numba.njit(vjp_in_place, cache=True, inline='always')",
        # Bound to its own name, so that importable_name finds the compiled function there.
        f"{augmented.__name__} = numba.njit({augmented.__name__}, cache=True)",
    ]
    text = "\n".join(lines) + "\n"
    module = _written(folder, f"odecore_adjoint_{_digest(text, func, func.vjp)}", text)
    return None if module is None else getattr(module, augmented.__name__)


def _written(folder: Path, module_name: str, text: str) -> ModuleType | None:
    """The module ``module_name`` with ``text``, written into ``folder`` once and imported."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = folder / f"{module_name}.py"
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a process reading the folder meanwhile never
            # sees half a module, and two processes writing it write the same text.
            with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
                f.write(text)
            os.replace(f.name, path)
    except OSError:
        return None  # a read-only home, say: the kernel is compiled in memory instead
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _module_text(name, form, sums, ensemble_source, state_size, state_dtype, watched) -> str:
    lines = [
        '"""A kernel of odecore\'s numba backend, written by odecore.adapters.numba_cache."""',
        "import math",
        "import numba",
        "import numpy as np",
        "from odecore.adapters.numba import _compiled_rules",
        "from odecore.adapters.numba_options import one_copy_per_type",
        "from odecore.adapters.numba_threads import range_done, take_range",
        "from odecore.kernels import loop",
        "from odecore.kernels.loop import *  # noqa: F403  (the constants)",
        "from odecore.kernels.tableau import DENSE_STAGES",
        *_user_import(name),
        "globals().update(_compiled_rules())",
        f"STATE_SIZE = {int(state_size)}",
        f"WATCHED = {int(watched)}",
        "",
        "",
        "def dynamics(t, y, dy, params):",
        _RETURNING[form],
    ]
    for fn in loop.KERNEL_FUNCTIONS:
        if fn.__name__ not in WRITTEN_NAMES:
            lines += ["", inspect.getsource(fn)]
    lines += ["", sums, "", ensemble_source, ""]
    for loop_name, fn in BY_STATE_DTYPE[state_dtype].items():
        lines += ["", inspect.getsource(fn), ""]
        lines.append(f"{loop_name} = {fn.__name__}")
    if watched:
        # The atomic accesses of a watched kernel, in place of the loop's plain ones.
        lines.append("from odecore.adapters.numba_watch import publish, watched_value")
    user_code = _options_text(numba_options.USER_CODE)
    lines.append(f"dynamics = numba.njit(dynamics, cache=True{user_code})")
    for fn in loop.KERNEL_FUNCTIONS:
        lines.append(_compiled_text(fn.__name__, numba_options.loop_options(fn.__name__, watched)))
    # A batch runs on threads of odecore's (numba_threads), without the interpreter's lock.
    lines.append("solve_ensemble = numba.njit(_solve_ensemble, cache=True, nogil=True)")
    return "\n".join(lines) + "\n"


def _user_import(name) -> list[str]:
    """Lines binding ``_user`` to the dynamics importable as ``name`` (module, qualified
    name), compiled with ``cache=True`` unless they are a Numba function already."""
    module_name, qualname = name
    head, _, rest = qualname.partition(".")
    lines = [f"from {module_name} import {head} as _user"]
    if rest:
        lines.append(f"_user = _user.{rest}")
    return lines + [
        "if not isinstance(_user, numba.core.dispatcher.Dispatcher):",
        "    _user = numba.njit(_user, cache=True)",
    ]


def _vjp_import(name) -> list[str]:
    """Lines binding ``_vjp_user`` to the ``vjp`` of the dynamics importable as ``name``,
    compiled like them. It is read from the dynamics as imported: a plain function's
    attributes are not its compiled dispatcher's."""
    module_name, qualname = name
    return [
        f"import {module_name} as _owner",
        f"_vjp_user = _owner.{qualname}.vjp",
        "if not isinstance(_vjp_user, numba.core.dispatcher.Dispatcher):",
        "    _vjp_user = numba.njit(_vjp_user, cache=True)",
    ]


def _compiled_text(name: str, options: dict) -> str:
    """The line compiling the module's function ``name`` with Numba's ``options``
    (``numba_options``)."""
    return f"{name} = one_copy_per_type(numba.njit({name}, cache=True{_options_text(options)}))"


def _options_text(options: dict) -> str:
    """Numba options as the keyword arguments of a call written into a module."""
    return "".join(f", {key}={value!r}" for key, value in options.items())


def _digest(text: str, func, *more) -> str:
    """A name for the module ``text``: a digest of it, of what it imports, and of ``func``'s
    code (``_code_text``); ``more`` adds sources (str) and functions."""
    parts = [
        text,
        inspect.getsource(rules),
        inspect.getsource(primitives),
        inspect.getsource(numba_watch),  # imported by a watched kernel, not written out
        inspect.getsource(numba_primitives),  # compiled into every rule, not written out
        inspect.getsource(numba_options),  # how each function is typed, not written out
        inspect.getsource(numba_threads),  # the ensembles' counter, not written out
        inspect.getsource(numba_atomics),  # compiled into the counter and the watch
        odecore.__version__,
        numba.__version__,
        *(_code_text(part) for part in (func, *more)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _code_text(part) -> str:
    """A source (str) as it is; a function (or Numba dispatcher) as what its compiled code
    depends on: its bytecode and constants, its nested functions' (a comprehension, a
    lambda), and the module-level values it reads, which Numba freezes into the code as
    constants, with the code of the functions it calls. Editing a module-level constant
    then changes the digest, where the cached kernel went on with the old value; and
    nothing in it varies between processes (a nested code object's repr holds its
    address)."""
    if isinstance(part, str):
        return part
    func = getattr(part, "py_func", part)
    return _code_of(func.__code__, getattr(func, "__globals__", {}), set())


def _code_of(code, scope: dict, seen: set) -> str:
    if id(code) in seen:  # a recursive helper, or one called twice
        return "<above>"
    seen.add(id(code))
    consts = tuple(
        _code_of(c, scope, seen) if inspect.iscode(c) else repr(c) for c in code.co_consts
    )
    read = []
    for name in code.co_names:
        if name in scope:
            value = _frozen_value(scope[name], seen)
            if value is not None:
                read.append((name, value))
    return repr((code.co_code, consts, code.co_names, read))


def _frozen_value(value, seen: set) -> str | None:
    """What of a module-level value the compiled code keeps: a number, string or tuple of
    them, an array's contents, a called function's code; None for what Numba resolves by
    name (a module such as ``np`` or ``math``)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, tuple):
        parts = [_frozen_value(v, seen) for v in value]
        return None if None in parts else repr(parts)
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{value.shape}{hashlib.sha256(value.tobytes()).hexdigest()}"
    func = getattr(value, "py_func", value)
    if inspect.isfunction(func):
        return _code_of(func.__code__, func.__globals__, seen)
    return None
