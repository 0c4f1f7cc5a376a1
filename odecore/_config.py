"""Which backend a solve runs on: ``set_backend``, ``use_backend`` and ``ODECORE_BACKEND``.

``"auto"`` (the default) follows the type of the arrays passed in. A named backend converts
plain inputs (lists, floats, NumPy arrays) to its own arrays.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from odecore.backend import BACKEND_NAMES, Backend, get_backend, infer_backend, library_of
from odecore.backend.registry import PLAIN_TYPES
from odecore.backend.tree import leaves

_ENV_VAR = "ODECORE_BACKEND"
_VALID = ("auto",) + BACKEND_NAMES

# A thread-local stack so that `use_backend` in one thread does not leak into another.
_state = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(
            f"backend must be a backend's name (a string), not "
            f"{type(name).__name__} {name!r}; valid names are {', '.join(map(repr, _VALID))}"
        )
    if name not in _VALID:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are {', '.join(map(repr, _VALID))}"
        )
    return name


def _stack() -> list[str]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


_global_choice: str | None = None


def set_backend(name: str) -> None:
    """Choose the backend for every later solve in this process.

    Parameters
    ----------
    name : {"auto", "numpy", "torch", "jax", "numba", "cupy"}
        The backend's name; ``"auto"`` restores the default, which follows the type of the
        arrays passed in. A named backend converts plain inputs (lists, floats, NumPy arrays)
        to its own arrays.

    Returns
    -------
    None

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        ``name`` is not a backend's name.

    See Also
    --------
    use_backend : the same for one ``with`` block, in one thread.

    Examples
    --------
    >>> import odecore
    >>> odecore.set_backend("numpy")
    >>> odecore.backend_name()
    'numpy'
    >>> odecore.set_backend("auto")
    >>> odecore.set_backend("tensorflow")
    Traceback (most recent call last):
    ...
    ValueError: unknown backend 'tensorflow'; valid backends are 'auto', 'numpy', ...
    """
    global _global_choice
    _global_choice = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Choose the backend for the solves inside a ``with`` block, in this thread only.

    Blocks nest: the innermost wins, and the choice before the block is restored when it ends,
    also by an exception.

    Parameters
    ----------
    name : {"auto", "numpy", "torch", "jax", "numba", "cupy"}
        The backend's name.

    Returns
    -------
    contextlib.AbstractContextManager
        A context manager that yields None.

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        ``name`` is not a backend's name.

    Examples
    --------
    >>> import odecore
    >>> with odecore.use_backend("numpy"):
    ...     print(odecore.backend_name())
    numpy
    >>> odecore.backend_name()
    'auto'
    """
    _stack().append(_check_name(name))
    try:
        yield
    finally:
        _stack().pop()


def backend_name() -> str:
    """The configured backend's name.

    The innermost [`use_backend`][odecore.use_backend], else [`set_backend`][odecore.set_backend],
    else the ``ODECORE_BACKEND`` environment variable, else ``"auto"``. A ``backend=`` argument
    of a solve overrides all of them for that call.

    Returns
    -------
    str
        ``"auto"`` or one of [`BACKEND_NAMES`][odecore.BACKEND_NAMES].

    Raises
    ------
    ValueError
        ``ODECORE_BACKEND`` names no backend.

    Examples
    --------
    >>> import odecore
    >>> odecore.backend_name()
    'auto'
    """
    if _stack():
        return _stack()[-1]
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get(_ENV_VAR)
    if env:
        try:
            return _check_name(env)
        except ValueError as exc:
            raise ValueError(f"environment variable {_ENV_VAR}: {exc}") from None
    return "auto"


def resolve_backend(requested: str | Backend | None, *inputs: Any, call: str = "solve") -> Backend:
    """The backend a call runs on: ``requested`` (an argument) wins over the configuration.
    ``call``: the kind of call, for ``Backend.check_context``'s message."""
    if isinstance(requested, Backend):
        backend = requested
    else:
        name = _check_name(requested) if requested is not None else backend_name()
        if name == "auto":
            backend = infer_backend(*inputs)
        else:
            backend = get_backend(name)
            _check_inputs_belong(backend, inputs)
    backend.check_context(inputs, call)
    return backend


def _check_inputs_belong(backend: Backend, inputs: tuple) -> None:
    """A configured backend converts plain values and NumPy arrays, but an array of a third
    library is a mistake to report, not to convert."""
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        # The usual inputs, NumPy arrays and numbers: nothing to report, and no paths to
        # spell for the messages (a few microseconds of a short solve).
        if all(type(value) in PLAIN_TYPES for value in inputs[0].values()):
            return
        # Named as the caller names them ("y0", "params[1]"), not as "[0]['y0']".
        inputs = inputs[0]
    for where, leaf in leaves(inputs):
        library = library_of(leaf)
        if library not in (None, "numpy", backend.name) and not backend.owns(leaf):
            raise TypeError(
                f"the backend is {backend.name!r} but {where} is a {library} array; convert it, "
                f"or use backend='auto' to follow the arrays' type"
            )
