"""Backend configuration: set_backend, use_backend, ODECORE_BACKEND, and unavailable backends."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import odecore
from odecore import _config

ENV = "ODECORE_BACKEND"
FRAMEWORK_BACKENDS = ("torch", "jax", "numba", "cupy")


@pytest.fixture(autouse=True)
def clean_config(monkeypatch):
    """Every test starts and ends with no configured backend and no ODECORE_BACKEND.

    set_backend("auto") is not a reset: an explicit choice, even "auto", outranks the
    environment variable, and there is no public way back to "nothing chosen". So the
    module's own record of the choice is saved and restored.
    """
    monkeypatch.delenv(ENV, raising=False)
    saved = _config._global_choice
    _config._global_choice = None
    try:
        yield
    finally:
        _config._global_choice = saved


def decay(t, y):
    return -y


def test_default_is_auto():
    assert odecore.backend_name() == "auto"
    ys = odecore.odeint(decay, [1.0], [0.0, 1.0])
    assert isinstance(ys, np.ndarray)


def test_set_backend():
    odecore.set_backend("numpy")
    assert odecore.backend_name() == "numpy"
    odecore.set_backend("auto")
    assert odecore.backend_name() == "auto"


def test_use_backend_nests_and_restores():
    odecore.set_backend("numpy")
    with odecore.use_backend("jax"):
        assert odecore.backend_name() == "jax"
        with odecore.use_backend("auto"):
            assert odecore.backend_name() == "auto"
        assert odecore.backend_name() == "jax"
    assert odecore.backend_name() == "numpy"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError), odecore.use_backend("torch"):
        raise RuntimeError("inside")
    assert odecore.backend_name() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(ENV, "numpy")
    assert odecore.backend_name() == "numpy"
    monkeypatch.setenv(ENV, "jax")  # read at every call, not cached at import
    assert odecore.backend_name() == "jax"
    monkeypatch.setenv(ENV, "")
    assert odecore.backend_name() == "auto"


def test_precedence_use_backend_over_set_backend_over_environment(monkeypatch):
    monkeypatch.setenv(ENV, "jax")
    assert odecore.backend_name() == "jax"
    odecore.set_backend("numpy")
    assert odecore.backend_name() == "numpy"
    with odecore.use_backend("torch"):
        assert odecore.backend_name() == "torch"
    assert odecore.backend_name() == "numpy"


def test_backend_argument_overrides_the_configuration(monkeypatch):
    monkeypatch.setenv(ENV, "jax")
    odecore.set_backend("cupy")
    with odecore.use_backend("numba"):
        ys = odecore.odeint(decay, np.array([1.0]), [0.0, 1.0], backend="numpy")
    np.testing.assert_allclose(ys[-1], np.exp(-1.0), rtol=1e-6)


def test_use_backend_is_thread_local():
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def other_thread():
        inside.wait(5)
        seen["other"] = odecore.backend_name()
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with odecore.use_backend("numpy"):
        inside.set()
        done.wait(5)
        seen["main"] = odecore.backend_name()
    thread.join(5)
    assert seen == {"main": "numpy", "other": "auto"}


def _assert_lists_valid_names(message):
    for valid in ("auto", *odecore.BACKEND_NAMES):
        assert repr(valid) in message


@pytest.mark.parametrize(
    "name, error, match",
    [
        ("tensorflow", ValueError, "unknown backend"),
        ("NumPy", ValueError, "unknown backend"),
        ("", ValueError, "unknown backend"),
        # Not a name at all: the wrong type, whatever its value.
        (None, TypeError, "backend must be a backend's name .a string., not NoneType"),
        (1, TypeError, "backend must be a backend's name .a string., not int 1"),
    ],
)
def test_unknown_backend_names_raise_listing_valid_ones(name, error, match):
    with pytest.raises(error, match=match) as info:
        odecore.set_backend(name)
    _assert_lists_valid_names(str(info.value))
    with pytest.raises(error, match=match) as info:
        with odecore.use_backend(name):
            pass
    _assert_lists_valid_names(str(info.value))
    assert odecore.backend_name() == "auto"  # nothing was half-configured


def test_unknown_backend_in_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "tensorflow")
    with pytest.raises(ValueError, match="ODECORE_BACKEND.*unknown backend 'tensorflow'"):
        odecore.backend_name()


def test_get_backend():
    numpy_backend = odecore.get_backend("numpy")
    assert isinstance(numpy_backend, odecore.Backend)
    assert numpy_backend.name == "numpy"
    assert odecore.get_backend("numpy") is numpy_backend
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'") as info:
        odecore.get_backend("tensorflow")
    _assert_lists_valid_names(str(info.value))


def test_backend_names():
    assert set(odecore.BACKEND_NAMES) == {"numpy", "torch", "jax", "numba", "cupy"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.parametrize("name", FRAMEWORK_BACKENDS)
def test_unavailable_backend_names_the_fix(name):
    """A missing framework names the pip extra; an installed framework whose adapter is not
    released yet says so. Which one applies depends on this environment."""
    framework = name
    adapter = f"odecore.adapters.{name}"
    if _installed(framework) and _installed(adapter):
        pytest.skip(f"the {name} backend is available here")
    with pytest.raises(odecore.BackendNotAvailableError) as info:
        odecore.get_backend(name)
    message = str(info.value)
    assert isinstance(info.value, ImportError)
    if not _installed(framework):
        assert f"odecore[{name}]" in message
        assert "not installed" in message
    else:
        assert "not part of this release" in message


@pytest.mark.parametrize("name", FRAMEWORK_BACKENDS)
def test_solving_on_an_unavailable_configured_backend_raises(name):
    if _installed(name) and _installed(f"odecore.adapters.{name}"):
        pytest.skip(f"the {name} backend is available here")
    for configure in ("set_backend", "use_backend", "argument"):
        with pytest.raises(odecore.BackendNotAvailableError, match=repr(name)):
            if configure == "set_backend":
                odecore.set_backend(name)
                odecore.odeint(decay, [1.0], [0.0, 1.0])
            elif configure == "use_backend":
                odecore.set_backend("auto")
                with odecore.use_backend(name):
                    odecore.odeint(decay, [1.0], [0.0, 1.0])
            else:
                odecore.odeint(decay, [1.0], [0.0, 1.0], backend=name)


def test_environment_variable_in_a_fresh_process():
    """ODECORE_BACKEND set before odecore is first imported is honoured."""
    code = (
        "import odecore, numpy as np;"
        "print(odecore.backend_name());"
        "print(type(odecore.odeint(lambda t, y: -y, [1.0], [0.0, 1.0])).__name__)"
    )
    env = {**os.environ, ENV: "numpy"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["numpy", "ndarray"]

    env[ENV] = "jax" if not _installed("jax") else "cupy"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    if out.returncode == 0:
        pytest.skip(f"{env[ENV]} is available here")
    # A missing framework, or (cupy) a missing device: DeviceNotAvailableError, a subclass.
    assert re.search(r"\b(Backend|Device)NotAvailableError\b", out.stderr), out.stderr


def _backend_or_skip(name):
    try:
        return odecore.get_backend(name)
    except odecore.BackendNotAvailableError as exc:
        pytest.skip(f"the {name} backend is not available here: {exc}")


@pytest.mark.backend("torch")
def test_configured_backend_converts_plain_inputs():
    import torch

    _backend_or_skip("torch")
    with odecore.use_backend("torch"):
        ys = odecore.odeint(decay, np.array([1.0, 2.0]), np.array([0.0, 1.0]))
    assert isinstance(ys, torch.Tensor) and ys.dtype == torch.float64
    np.testing.assert_allclose(ys[-1].numpy(), np.exp(-1.0) * np.array([1.0, 2.0]), rtol=1e-6)
    odecore.set_backend("torch")
    assert isinstance(odecore.odeint(decay, [1.0], [0.0, 1.0]), torch.Tensor)


@pytest.mark.backend("torch")
def test_auto_follows_the_array_type():
    import torch

    _backend_or_skip("torch")
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert isinstance(odecore.odeint(decay, y0, [0.0, 1.0]), torch.Tensor)
    assert isinstance(odecore.odeint(decay, y0.numpy(), [0.0, 1.0]), np.ndarray)
