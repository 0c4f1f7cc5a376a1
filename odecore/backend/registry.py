"""Which adapter serves a name or an array, loaded lazily.

The core never imports a framework. It asks this module for a backend, either by name
(``"numpy"``, ``"torch"``, ...) or by looking at the arrays a user passed in, and only then is
the adapter module (and with it the framework) imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import array_api_compat
import numpy as np

from odecore.backend.protocol import Backend
from odecore.backend.tree import leaves

# name -> (adapter module, the pip extra that installs what it needs)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "numpy": ("odecore.adapters.numpy", "odecore"),
    "torch": ("odecore.adapters.torch", "odecore[torch]"),
    "jax": ("odecore.adapters.jax", "odecore[jax]"),
    "numba": ("odecore.adapters.numba", "odecore[numba]"),
    "cupy": ("odecore.adapters.cupy", "odecore[cupy]"),
}
# The framework each adapter needs, so that a missing framework and a missing adapter get
# different messages.
_FRAMEWORK_MODULE = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "numba": "numba",
    "cupy": "cupy",
}

BACKEND_NAMES: tuple[str, ...] = tuple(_ADAPTERS)
"""The names of the backends, as ``backend=``, [`set_backend`][odecore.set_backend] and
[`get_backend`][odecore.get_backend] take them (``"auto"`` aside)."""

_loaded: dict[str, Backend] = {}


class BackendNotAvailableError(ImportError):
    """The requested backend cannot be used in this environment.

    Raised when its library is not installed or fails to import (the message names the pip
    extra that installs it), or when its adapter is not part of this release. An
    ``ImportError``.

    Examples
    --------
    >>> import odecore
    >>> issubclass(odecore.BackendNotAvailableError, ImportError)
    True
    >>> try:
    ...     backend = odecore.get_backend("numpy")
    ... except odecore.BackendNotAvailableError as error:
    ...     print("unavailable:", error)
    ... else:
    ...     print("available")
    available
    """


class DeviceNotAvailableError(BackendNotAvailableError):
    """The backend's library is installed but the device it computes on is not there.

    CuPy without a CUDA device raises it when the backend is chosen. A
    [`BackendNotAvailableError`][odecore.BackendNotAvailableError], so one ``except`` catches
    both.

    Examples
    --------
    >>> import odecore
    >>> issubclass(odecore.DeviceNotAvailableError, odecore.BackendNotAvailableError)
    True
    """


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing its adapter (and framework) on first use.

    Parameters
    ----------
    name : {"numpy", "torch", "jax", "numba", "cupy"}
        The backend's name, one of [`BACKEND_NAMES`][odecore.BACKEND_NAMES].

    Returns
    -------
    Backend
        The one [`Backend`][odecore.Backend] object of that name (the same object on every
        call).

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        ``name`` is not a backend's name.
    BackendNotAvailableError
        The backend's library is not installed, fails to import, or its adapter is not part of
        this release.
    DeviceNotAvailableError
        The library is installed but its device is not there (CuPy without a CUDA device).

    Examples
    --------
    >>> import odecore
    >>> backend = odecore.get_backend("numpy")
    >>> backend.name, backend.has_autodiff, backend is odecore.get_backend("numpy")
    ('numpy', False, True)
    """
    if not isinstance(name, str):
        raise TypeError(
            f"backend must be a backend's name (a string), not {type(name).__name__} {name!r}"
        )
    if name not in _ADAPTERS:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are "
            f"{', '.join(repr(n) for n in ('auto',) + BACKEND_NAMES)}"
        )
    if name not in _loaded:
        _loaded[name] = _load_adapter(name)
    return _loaded[name]


def _load_adapter(name: str) -> Backend:
    module_name, extra = _ADAPTERS[name]
    framework = _FRAMEWORK_MODULE[name]
    try:
        importlib.import_module(framework)
    except ImportError as exc:
        raise BackendNotAvailableError(
            f"the {name!r} backend needs {framework}, which is not installed; "
            f"install it with: pip install '{extra}'"
        ) from exc
    except Exception as exc:  # a broken install fails with OSError and friends, not ImportError
        raise BackendNotAvailableError(
            f"the {name!r} backend needs {framework}, which is installed but fails to import "
            f"({type(exc).__name__}: {exc}); reinstall it with: pip install '{extra}'"
        ) from exc
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        shipped = ", ".join(repr(n) for n in BACKEND_NAMES if _adapter_shipped(n))
        raise BackendNotAvailableError(
            f"the {name!r} backend is planned but its adapter is not part of this release of "
            f"odecore; the adapters in this release: {shipped}"
        ) from exc
    return module.BACKEND


def _adapter_shipped(name: str) -> bool:
    try:
        return importlib.util.find_spec(_ADAPTERS[name][0]) is not None
    except ImportError:
        return False


def is_traced(x: Any) -> bool:
    """True when ``x`` is an array of a tracing framework with no concrete value yet; the
    checks in ``odecore._validate`` skip such values."""
    library = library_of(x)
    return library is not None and library in _loaded and _loaded[library].is_traced(x)


# The types of most inputs, by exact type, with the backend that owns them (None: plain
# Python values, which any backend converts).
PLAIN_TYPES = {np.ndarray: "numpy", float: None, int: None, bool: None, type(None): None}


def library_of(x: Any) -> str | None:
    """The backend name that owns array ``x``, or None for plain Python values.

    Checked without importing any framework: array-api-compat only looks at types of modules
    already imported.
    """
    # Every solve asks this of each input; the common answers need no module lookups.
    if type(x) in PLAIN_TYPES:
        return PLAIN_TYPES[type(x)]
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    return None


# The frameworks whose users register their own containers of arrays (JAX's pytree nodes).
_CONTAINER_FRAMEWORKS = ("jax",)


def container_children(value: Any):
    """``(children, rebuild)`` for a value that an imported framework registers as a
    container (a class registered as a JAX pytree node, a registered dataclass), where
    ``rebuild(children)`` makes one like it; None for anything else. A framework not imported
    yet is not imported: a value of its registered type cannot exist before it is."""
    if isinstance(value, (tuple, list, dict)) or library_of(value) is not None:
        return None
    if isinstance(value, (int, float, complex, str, bytes)) or value is None:
        return None
    for name in _CONTAINER_FRAMEWORKS:
        if _FRAMEWORK_MODULE[name] in sys.modules:
            found = get_backend(name).tracing.tree_children(value)
            if found is not None:
                return found
    return None


def _arrays_in(values: Any, path: str = ""):
    """``(path, leaf)`` of nested containers, registered ones (``container_children``)
    included."""
    for where, leaf in leaves(values, path):
        registered = container_children(leaf)
        if registered is None:
            yield where, leaf
        else:
            yield from _arrays_in(list(registered[0]), where)


def infer_backend(*values: Any) -> Backend:
    """The backend that owns the arrays among ``values`` (nested tuples, lists and dicts are
    searched); NumPy when there are only plain Python values.

    Arrays of two libraries in one call are an error: converting silently would move data
    between devices or drop gradients. (A configured backend, by contrast, converts plain
    values and NumPy arrays; see ``odecore._config``.)
    """
    if len(values) == 1 and isinstance(values[0], dict):
        # The usual call, NumPy arrays and numbers: NumPy, without walking the containers
        # (several microseconds of a short solve).
        if all(type(value) in PLAIN_TYPES for value in values[0].values()):
            return get_backend("numpy")
        # Named as the caller names them ("y0", "params[1]"), not as "[0]['y0']".
        values = values[0]
    found: dict[str, str] = {}
    for where, leaf in _arrays_in(values):
        library = library_of(leaf)
        if library is not None and library not in found:
            found[library] = where
    if len(found) > 1:
        (a, wa), (b, wb) = list(found.items())[:2]
        raise TypeError(
            f"arrays from two libraries in one call: {wa} is a {a} array but {wb} is a {b} "
            f"array; convert them to one library, or choose a backend (backend=... or "
            f"odecore.set_backend) to have plain inputs converted to it"
        )
    name = next(iter(found), "numpy")
    return get_backend(name)
