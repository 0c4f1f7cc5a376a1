"""Which backends a test run covers, and parametrisations shared by the tests that take the
``backend`` fixture (tests/conftest.py explains both)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from types import ModuleType

import pytest

import odecore


def backend_names(variable: str) -> list[str] | None:
    """The backend names listed (comma-separated) in the environment variable, in
    ``odecore.BACKEND_NAMES`` order; None when it is unset or empty."""
    chosen = {name.strip() for name in os.environ.get(variable, "").split(",") if name.strip()}
    if not chosen:
        return None
    unknown = sorted(chosen - set(odecore.BACKEND_NAMES))
    if unknown:
        raise pytest.UsageError(
            f"{variable} names unknown backends {unknown}; valid names are "
            f"{', '.join(odecore.BACKEND_NAMES)}"
        )
    return [name for name in odecore.BACKEND_NAMES if name in chosen]


SELECTED = backend_names("ODECORE_TEST_BACKEND")
REQUIRED = set(backend_names("ODECORE_REQUIRED_BACKENDS") or ()) | set(SELECTED or ())


def framework_module(backend: str, module: str | None = None) -> ModuleType:
    """For a test module about one framework, imported at its top: the framework's module
    (default: the backend's name). Skips the test module where the backend is not selected,
    or where the module is missing and nobody requires the backend; fails its collection,
    naming it, where a required backend's module is missing."""
    if SELECTED is not None and backend not in SELECTED:
        pytest.skip(
            f"the {backend} backend is not selected (ODECORE_TEST_BACKEND)",
            allow_module_level=True,
        )
    try:
        return importlib.import_module(module or backend)
    except ImportError as exc:
        why = f"the {backend} tests need {module or backend} installed: {exc}"
        if backend in REQUIRED:
            pytest.fail(
                f"the {backend!r} backend is required in this run (ODECORE_TEST_BACKEND or "
                f"ODECORE_REQUIRED_BACKENDS) but {why}",
                pytrace=False,
            )
        pytest.skip(why, allow_module_level=True)


SLOW_ON_JAX = pytest.mark.slow_on("jax")


def first_only_on_jax(values: Iterable) -> list:
    """``values`` for ``pytest.mark.parametrize``, all but the first marked ``slow_on("jax")``.

    JAX compiles every solve configuration (seconds each) where NumPy and torch run at once.
    The values vary what the core does the same way on every backend (the tableau, an
    option), which NumPy and torch check in full; what is JAX's own (the adapter, the
    compiled loop) the first value checks. The others run on JAX with the slow tests.
    A tuple is the values of several parameters; a ``pytest.param`` keeps its id and marks.
    """
    params = []
    for index, value in enumerate(values):
        if index == 0:
            params.append(value)
            continue
        if isinstance(value, type(pytest.param(None))):
            marks = [*value.marks, SLOW_ON_JAX]
            params.append(pytest.param(*value.values, id=value.id, marks=marks))
        else:
            args = value if isinstance(value, tuple) else (value,)
            params.append(pytest.param(*args, marks=SLOW_ON_JAX))
    return params


REQUIRED_EXTRAS = {
    name.strip()
    for name in os.environ.get("ODECORE_REQUIRED_EXTRAS", "").split(",")
    if name.strip()
}


def optional_module(extra: str, module: str) -> ModuleType:
    """For a test module about an optional dependency (a pip extra of odecore), imported at
    its top: the module. Skips the test module, saying what to install, where the module is
    missing; fails its collection instead where ``ODECORE_REQUIRED_EXTRAS`` names the extra
    (nox's ``ci`` session, which installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f'these tests need {module} (pip install "odecore[{extra}]"): {exc}'
        if extra in REQUIRED_EXTRAS:
            pytest.fail(
                f"the {extra!r} extra is required in this run (ODECORE_REQUIRED_EXTRAS) but {why}",
                pytrace=False,
            )
        pytest.skip(why, allow_module_level=True)
