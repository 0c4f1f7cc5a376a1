"""The backend fixture: every test that is not about one framework runs on every backend.

A test that takes the ``backend`` fixture runs once per backend, with an :class:`ArrayBackend`
that makes the test's arrays on that backend and brings results back to NumPy for the
assertions. A test about one framework (torch autograd, JAX's jit and vmap, NumPy's stage
stores) is marked ``@pytest.mark.backend("torch")`` instead, and runs where that backend runs.

Which backends run:

- ``ODECORE_TEST_BACKEND=numpy,torch`` selects backends (nox's ``tests(backend=...)`` session
  sets it to its one backend); the tests of the others are left out, and marked tests of the
  others are skipped, saying so. Unset, every backend of ``odecore.BACKEND_NAMES`` that loads
  here runs, and the header of the run names those that do not, and why.
- A backend that compiles the dynamics into the solve (``Kernels.solve``: numba) is not in
  the fixture; its own tests are marked ``backend(name)``.
- A selected backend, or one named in ``ODECORE_REQUIRED_BACKENDS`` (nox's ``ci`` session),
  must load: where it does not, every test of it fails with the reason, instead of being
  left out or skipped.

A case that is slow on one backend only (JAX compiles every solve configuration, seconds
each) can be marked ``@pytest.mark.slow_on("jax")``, on the test or on one of its
``pytest.param`` values: on that backend the case is then also marked ``slow``, so that
``-m "not slow"`` leaves it out there and still runs it on the other backends.

Float64 is float64 on every backend: the fixture runs JAX's tests in its x64 mode and restores
the mode afterwards. ``ArrayBackend.default_precision`` gives a test the mode JAX users get by
default, where time is float32.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import pytest
from backend_params import REQUIRED, SELECTED

import odecore

# The numba backend keeps compiled kernels on disk (adapters/numba_cache.py); a test run
# keeps its own, apart from the user's cache and from other runs, and removes it at exit. The
# first conftest to load makes it; a run of tests/ and conformance/ together shares it.
if "ODECORE_CACHE_DIR" not in os.environ:
    os.environ["ODECORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="odecore-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ODECORE_CACHE_DIR"], ignore_errors=True)


def _load(name: str) -> tuple[odecore.Backend | None, str]:
    """The backend and "", or None and why it does not load."""
    try:
        return odecore.get_backend(name), ""
    except odecore.BackendNotAvailableError as exc:
        return None, str(exc)


def _fixture_backends() -> tuple[list[str], dict[str, str]]:
    """The backends the fixture yields, and the reason each unselected-but-wanted backend is
    left out. A required backend that does not load stays in: its tests fail with the reason."""
    names, missing = [], {}
    for name in SELECTED or odecore.BACKEND_NAMES:
        bk, why = _load(name)
        if bk is not None and bk.kernels.solve is not None:
            # Its dynamics must be in a compiler's subset; the fixture's tests write theirs
            # against the array API and call them from Python.
            continue
        if why and name not in REQUIRED:
            missing[name] = why
        else:
            names.append(name)
    return names, missing


FIXTURE_BACKENDS, MISSING_BACKENDS = _fixture_backends()


def pytest_report_header(config) -> list[str]:
    lines = [f"odecore test backends: {', '.join(FIXTURE_BACKENDS)}"]
    if SELECTED:
        lines[0] += " (selected by ODECORE_TEST_BACKEND)"
    lines += [f"  not available, left out: {name}: {why}" for name, why in MISSING_BACKENDS.items()]
    return lines


def pytest_runtest_setup(item) -> None:
    """A test marked ``backend(name)``, or run by the fixture on ``name``, runs only where
    ``name`` is selected, and fails, naming it, where ``name`` is required but does not
    load."""
    for marker in item.iter_markers("backend"):
        (name,) = marker.args
        if name not in odecore.BACKEND_NAMES:
            pytest.fail(f"@pytest.mark.backend names an unknown backend {name!r}", pytrace=False)
        if SELECTED is not None and name not in SELECTED:
            pytest.skip(f"the {name} backend is not selected (ODECORE_TEST_BACKEND)")
        _, why = _load(name)
        if why and name in REQUIRED:
            pytest.fail(
                f"the {name!r} backend is required in this run (ODECORE_TEST_BACKEND or "
                f"ODECORE_REQUIRED_BACKENDS) but does not load: {why}",
                pytrace=False,
            )
        if why:
            pytest.skip(why)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    """Mark ``slow`` the cases whose ``slow_on`` marker names their backend, before ``-m``
    deselects."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec else None
        if name and any(m.args == (name,) for m in item.iter_markers("slow_on")):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(
    params=[pytest.param(name, marks=pytest.mark.backend(name)) for name in FIXTURE_BACKENDS],
    ids=FIXTURE_BACKENDS,
)
def backend(request):
    """The backend under test, in float64 mode (JAX's x64) for the test's duration."""
    bk = odecore.get_backend(request.param)
    with bk.float64():
        yield ArrayBackend(bk)


class ArrayBackend:
    """One odecore backend, seen from a test: arrays made on it, results read back to NumPy.

    Dtypes are named as in NumPy (``"float32"``, ``"bfloat16"``, ``"int64"``), so one test
    names the same dtype on every backend.
    """

    def __init__(self, backend: odecore.Backend):
        self.backend = backend
        self.name = backend.name
        self.xp = backend.xp

    def __repr__(self) -> str:
        return f"ArrayBackend({self.name!r})"

    def dtype(self, name: str) -> Any:
        if name == "bfloat16" and self.name == "numpy":
            raise ValueError("NumPy has no bfloat16")
        return getattr(self.backend.xp, name)

    def asarray(self, values: Any, dtype: str | None = "float64") -> Any:
        """``values`` (numbers, lists, NumPy arrays) as an array of this backend; ``dtype``
        None keeps the dtype the library itself gives them."""
        values = np.asarray(values)
        return self.backend.asarray(values, dtype=None if dtype is None else self.dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        """An array of this backend (or a number) as a NumPy array, bfloat16 as float32 (which
        holds every bfloat16 value exactly, and which NumPy has)."""
        if isinstance(x, (int, float, np.generic, np.ndarray)):
            return np.asarray(x)
        x = self.backend.stop_gradient(x)
        if self.dtype_name(x) == "bfloat16":
            x = self.xp.astype(x, self.xp.float32)
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, ValueError):
            # Arrays on an accelerator do not export to NumPy through DLPack.
            return np.asarray(array_api_compat.to_device(x, "cpu"))

    def dtype_text(self, name: str) -> str:
        """How the library prints the dtype ``name`` (``torch.float32``, ``float32``): what an
        error message about an array of that dtype shows."""
        return str(self.asarray(np.zeros(0), dtype=name).dtype)

    @staticmethod
    def dtype_name(x: Any) -> str:
        """The dtype's name without the library's prefix (``torch.float32`` -> ``float32``)."""
        return str(x.dtype).rsplit(".", 1)[-1]

    def stats(self, solution) -> dict[str, Any]:
        """A solution's statistics as Python ints (one sample) or NumPy arrays (per sample)."""
        return {key: _host_value(self.to_numpy(v)) for key, v in solution.stats.items()}

    def status(self, solution) -> Any:
        """The status as an int (one sample) or a NumPy array (per sample)."""
        return _host_value(self.to_numpy(solution.status))

    def default_precision(self):
        """A context with the library's default precision: JAX without x64 (time and every
        float64 input become float32), as its users get it; nothing elsewhere."""
        if self.name == "jax":
            import jax

            return jax.enable_x64(False)
        return contextlib.nullcontext()

    def recorder(self, func: Callable) -> Recorder:
        return Recorder(self, func)


def _host_value(x: np.ndarray) -> Any:
    return x.item() if x.ndim == 0 else x


class Recorder:
    """``func``, recording the time and state of every evaluation as NumPy copies.

    On JAX the solve runs compiled, where ``func`` sees traced values; the record is then made
    when the compiled program runs (``jax.debug.callback``, in order), so it holds the
    evaluations that happened, as on the eager backends.
    """

    def __init__(self, backend: ArrayBackend, func: Callable):
        self.backend = backend
        self.func = func
        self.times: list[np.ndarray] = []
        self.states: list[np.ndarray] = []

    def _record(self, t, y) -> None:
        self.times.append(np.array(self.backend.to_numpy(t), dtype=np.float64, copy=True))
        self.states.append(np.array(self.backend.to_numpy(y), copy=True))

    def __call__(self, t, y, *params):
        if self.backend.name == "jax":
            import jax

            jax.debug.callback(self._record, t, y, ordered=True)
        else:
            self._record(t, y)
        return self.func(t, y, *params)
