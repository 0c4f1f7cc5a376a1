"""The README's examples run as written: a user copies them first."""

import math
import re
from pathlib import Path

import pytest

from odecore import _config

README = Path(__file__).resolve().parents[1] / "README.md"
COMING_FROM_TORCHDIFFEQ = README.parent / "docs" / "coming_from_torchdiffeq.md"


@pytest.fixture(autouse=True)
def restore_backend_choice():
    """The README's examples call odecore.set_backend("numpy"); the tests that run after
    this module must not inherit that choice (a torch array would then be refused). There
    is no public way back to "nothing chosen", so the module's record of the choice is
    restored, as in test_config."""
    saved = _config._global_choice
    try:
        yield
    finally:
        _config._global_choice = saved


def _python_blocks(page=README):
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 3


def test_readme_examples_run():
    blocks = _python_blocks()
    if any("import torch" in b for b in blocks):
        pytest.importorskip("torch", reason="the README's gradient example uses torch")
    if any("import jax" in b for b in blocks):
        pytest.importorskip("jax", reason="the README's JAX example uses jax")
    namespace: dict = {}
    for block in blocks:  # one namespace: later blocks may use earlier imports
        exec(compile(block, str(README), "exec"), namespace)
    # The NumPy pullback example computes a parameter gradient; check it against central
    # finite differences of the same solve, so the example shows a correct result.
    np, odecore = namespace["np"], namespace["odecore"]
    lin, ts, A = namespace["Linear"](), np.linspace(0, 1, 5), namespace["A"]
    y0 = np.array([1.0, 0.0])

    def loss(matrix):
        ys = odecore.odeint(
            lambda t, y, p: lin(t, y, p), y0, ts, params=(matrix,), rtol=1e-12, atol=1e-12
        )
        return ys.sum()

    eps, fd = 1e-6, np.zeros_like(A)
    for i in range(2):
        for j in range(2):
            d = np.zeros_like(A)
            d[i, j] = eps
            fd[i, j] = (loss(A + d) - loss(A - d)) / (2 * eps)
    np.testing.assert_allclose(namespace["A_bar"], fd, rtol=1e-6, atol=1e-8)


def test_readme_jax_example_gives_the_gradient():
    """The JAX example's gradient against central differences of its own jitted loss."""
    pytest.importorskip("jax", reason="the README's JAX example uses jax")
    (block,) = [b for b in _python_blocks() if "import jax" in b]
    namespace: dict = {}
    import odecore

    with odecore.use_backend("auto"):  # the README's later blocks set a backend globally
        exec(compile(block, str(README), "exec"), namespace)
    jnp, loss, p = namespace["jnp"], namespace["loss"], namespace["p"]
    y0, eps = jnp.array([1.0, 0.0]), 1e-2  # float32: a large step, a loose comparison
    for i in range(2):
        d = jnp.zeros(2).at[i].set(eps)
        plus = float(loss({**p, "b": p["b"] + d}, y0, 1e-5))
        minus = float(loss({**p, "b": p["b"] - d}, y0, 1e-5))
        fd = (plus - minus) / (2 * eps)
        assert abs(float(namespace["grads"]["b"][i]) - fd) < 1e-2 * max(1.0, abs(fd))


def test_coming_from_torchdiffeq_example_gives_the_gradient():
    """The page's before and after examples run, and both give the closed-form gradient:
    ``x(T) = cos(w T)`` with ``w = sqrt(k)``, so ``dx(T)/dk = -sin(w T) T / (2 w)``."""
    pytest.importorskip("torch", reason="the page's example uses torch")
    pytest.importorskip("torchdiffeq", reason="the page's example compares with torchdiffeq")
    blocks = _python_blocks(COMING_FROM_TORCHDIFFEQ)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(COMING_FROM_TORCHDIFFEQ), "exec"), namespace)
    w, end = 2.0**0.5, 2.0
    exact = -math.sin(w * end) * end / (2 * w)
    # Both solve at rtol 1e-8: the gradient's error is of that order times the O(1) state.
    for name in ("k_grad_torchdiffeq", "k_grad_odecore"):
        assert abs(float(namespace[name]) - exact) < 1e-6, name


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_each_readme_example_runs_alone(index):
    """A reader copies one block, not the page: each runs in a fresh namespace, with the
    imports it needs."""
    block = _python_blocks()[index]
    if "import torch" in block:
        pytest.importorskip("torch", reason="this README example uses torch")
    if "import jax" in block:
        pytest.importorskip("jax", reason="this README example uses jax")
    if 'backend="numba"' in block:
        pytest.importorskip("numba", reason="this README example uses numba")
    import odecore

    with odecore.use_backend("auto"):  # not what an earlier block chose globally
        exec(compile(block, f"{README}, python block {index + 1}", "exec"), {})
