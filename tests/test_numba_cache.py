"""Kernels of the numba backend kept on disk (adapters/numba_cache.py): a second process
loads them instead of compiling, a changed dynamics gets a kernel of its own, and dynamics
that cannot be imported by name stay in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import odecore

pytest.importorskip("numba", reason="the numba backend needs numba")
from odecore.adapters import numba_cache  # noqa: E402

pytestmark = pytest.mark.backend("numba")

RUN = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from numba.core.event import install_recorder
    import odecore
    import decay

    with install_recorder("numba:compile") as recorder:
        sol = odecore.solve(decay.rate, np.array([1.0, 2.0]), [0.0, 1.0], params=np.array([0.5]),
                            backend="numba", method="tsit5", rtol=1e-9, atol=1e-12)
    compiled = [e.data["dispatcher"].py_func.__name__ for _, e in recorder.buffer if e.is_start]
    print(json.dumps({"compiled": compiled, "y1": sol.ys[-1].tolist()}))
    """
)

DECAY = """
def rate(t, y, dy, p):
    for i in range(y.shape[0]):
        dy[i] = {sign}p[0] * y[i]
"""


def _run(module_dir, cache_dir, script=RUN, *arguments):
    env = {**os.environ, "ODECORE_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(module_dir), *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_kernel_instead_of_compiling(tmp_path):
    (tmp_path / "decay.py").write_text(DECAY.format(sign="-"))
    cache = tmp_path / "cache"
    first = _run(tmp_path, cache)
    second = _run(tmp_path, cache)
    assert "solve_trajectory" in first["compiled"]
    assert "solve_trajectory" not in second["compiled"]
    expected = np.exp(-0.5) * np.array([1.0, 2.0])
    # rtol 1e-9 on a decaying exponential: the global error stays below a few 1e-9.
    np.testing.assert_allclose(second["y1"], expected, rtol=1e-8)
    np.testing.assert_array_equal(second["y1"], first["y1"])

    # The same file name with other code: a kernel of its own, not the stale one.
    (tmp_path / "decay.py").write_text(DECAY.format(sign="+"))
    changed = _run(tmp_path, cache)
    assert "solve_trajectory" in changed["compiled"]
    np.testing.assert_allclose(changed["y1"], np.exp(0.5) * np.array([1.0, 2.0]), rtol=1e-8)
    assert len(list((cache / "numba").glob("odecore_kernel_*.py"))) == 2


RUN_GRADIENT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from numba.core.event import install_recorder
    import odecore
    import decay

    with install_recorder("numba:compile") as recorder:
        ys, pullback = odecore.vjp_odeint(
            decay.rate, np.array([1.0, 2.0]), [0.0, 1.0], np.array([0.5]), backend="numba",
            adjoint=sys.argv[2], method="tsit5", rtol=1e-10, atol=1e-12)
        y0_bar, p_bar, _ = pullback(np.array([[0.0, 0.0], [1.0, 1.0]]))
    compiled = [e.data["dispatcher"].py_func.__name__ for _, e in recorder.buffer if e.is_start]
    print(json.dumps({"compiled": compiled, "p_bar": p_bar.tolist()}))
    """
)

DECAY_WITH_VJP = """
def rate(t, y, dy, p):
    for i in range(y.shape[0]):
        dy[i] = -p[0] * y[i]


def rate_vjp(t, y, p, cotangent, y_bar, p_bar):
    p_bar[0] = 0.0
    for i in range(y.shape[0]):
        y_bar[i] = -p[0] * cotangent[i]
        p_bar[0] -= {scale}y[i] * cotangent[i]


rate.vjp = rate_vjp
"""


def test_a_second_process_loads_the_checkpoint_replay_instead_of_compiling(tmp_path):
    """The compiled checkpoint's replay is kept on disk beside its kernel; a changed VJP
    gets a replay of its own (and the kernel it replays is still the cached one)."""
    (tmp_path / "decay.py").write_text(DECAY_WITH_VJP.format(scale=""))
    cache = tmp_path / "cache"
    runs = [_run(tmp_path, cache, RUN_GRADIENT, "checkpoint") for _ in range(2)]
    first, second = runs
    assert {"solve_trajectory", "replay_trajectory"} <= set(first["compiled"])
    assert not {"solve_trajectory", "replay_trajectory"} & set(second["compiled"])
    # d/dp sum_i y0_i e^{-p} = -3 e^{-0.5}, to the solve's tolerance.
    np.testing.assert_allclose(second["p_bar"], [-3.0 * np.exp(-0.5)], rtol=1e-8)
    np.testing.assert_array_equal(second["p_bar"], first["p_bar"])

    (tmp_path / "decay.py").write_text(DECAY_WITH_VJP.format(scale="2.0 * "))
    changed = _run(tmp_path, cache, RUN_GRADIENT, "checkpoint")
    assert "replay_trajectory" in changed["compiled"]
    assert "solve_trajectory" not in changed["compiled"]
    np.testing.assert_allclose(changed["p_bar"], [-6.0 * np.exp(-0.5)], rtol=1e-8)
    assert len(list((cache / "numba").glob("odecore_replay_*.py"))) == 2


def test_a_second_process_loads_the_backsolve_instead_of_compiling(tmp_path):
    """The compiled backsolve's augmented dynamics, and the kernel solving them, are kept on
    disk; a changed VJP gets augmented dynamics and a kernel of their own, while the forward
    kernel stays the cached one."""
    (tmp_path / "decay.py").write_text(DECAY_WITH_VJP.format(scale=""))
    cache = tmp_path / "cache"
    first, second = [_run(tmp_path, cache, RUN_GRADIENT, "backsolve") for _ in range(2)]
    # Two kernels: the forward solve's and the backward one's.
    assert first["compiled"].count("solve_trajectory") == 2
    assert "_adjoint" in first["compiled"]
    assert not {"solve_trajectory", "_adjoint"} & set(second["compiled"])
    # d/dp sum_i y0_i e^{-p} = -3 e^{-0.5}, to the solves' tolerance.
    np.testing.assert_allclose(second["p_bar"], [-3.0 * np.exp(-0.5)], rtol=1e-8)
    np.testing.assert_array_equal(second["p_bar"], first["p_bar"])

    (tmp_path / "decay.py").write_text(DECAY_WITH_VJP.format(scale="2.0 * "))
    changed = _run(tmp_path, cache, RUN_GRADIENT, "backsolve")
    assert changed["compiled"].count("solve_trajectory") == 1
    np.testing.assert_allclose(changed["p_bar"], [-6.0 * np.exp(-0.5)], rtol=1e-8)
    assert len(list((cache / "numba").glob("odecore_adjoint_*.py"))) == 2


def test_dynamics_that_cannot_be_imported_by_name_stay_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("ODECORE_CACHE_DIR", str(tmp_path))

    def local(t, y, dy, p):
        dy[0] = -y[0]

    assert numba_cache.importable_name(local) is None
    assert numba_cache.importable_name(lambda t, y, p: -y) is None
    sol = odecore.solve(local, np.array([1.0]), [0.0, 1.0], params=np.zeros(0), backend="numba")
    np.testing.assert_allclose(sol.ys[-1], [np.exp(-1.0)], rtol=1e-6)
    assert not (tmp_path / "numba").exists()


def test_a_function_made_by_exec_in_a_module_with_a_file_stays_in_memory(tmp_path, monkeypatch):
    # exec() gives the function a module that has a file and a name to import it by, but
    # its code has no file, which Numba's disk cache needs: caching it raised RuntimeError.
    monkeypatch.setenv("ODECORE_CACHE_DIR", str(tmp_path))
    namespace = {"__name__": __name__}
    exec("def made(t, y, dy, p):\n    dy[0] = -p[0] * y[0]\n", namespace)
    made = namespace["made"]
    monkeypatch.setattr(sys.modules[__name__], "made", made, raising=False)
    assert numba_cache.importable_name(made) is None
    sol = odecore.solve(made, np.array([1.0]), [0.0, 1.0], params=np.array([0.5]), backend="numba")
    np.testing.assert_allclose(sol.ys[-1], [np.exp(-0.5)], rtol=1e-6)
    assert not (tmp_path / "numba").exists()


def test_an_empty_cache_dir_switches_disk_caching_off(monkeypatch):
    monkeypatch.setenv("ODECORE_CACHE_DIR", "")
    assert numba_cache.directory() is None


def test_the_rules_are_kept_under_a_digest_of_the_primitives():
    """Numba's disk cache knows a compiled rule by its file, name and the file's time stamp,
    not by the primitives compiled into it: after an edit to the primitives alone, it would
    serve the rule with the old ones inside (seen: an edited primitive whose kernels kept
    running the code it replaced). The rules and primitives are compiled under names that
    carry a digest of both primitive modules' sources, so such an edit compiles them anew."""
    import hashlib
    import inspect

    from odecore.adapters import numba as numba_adapter
    from odecore.adapters import numba_primitives

    from odecore.control import primitives, rules

    sources = inspect.getsource(primitives) + inspect.getsource(numba_primitives)
    digest = hashlib.sha256(sources.encode()).hexdigest()[:16]
    compiled = numba_adapter._compiled_rules()
    for name in (*rules.RULES, *primitives.SCALAR):
        assert compiled[name].py_func.__qualname__ == f"{name}_{digest}", name
    # The numba backend's own power is the one compiled in.
    assert compiled["power_unless_kept"].py_func.__code__ is (
        numba_primitives.power_unless_kept.__code__
    )


def _function_from(source: str, **module_values):
    """The function ``f`` of ``source`` run in a namespace of its own, as a module would be
    imported in a new process: its code objects are new ones, at new addresses."""
    namespace = {"np": np, **module_values}
    exec(compile(source, "<dynamics>", "exec"), namespace)
    return namespace["f"]


COMPREHENSION = """
def f(t, y, p):
    return np.array([-p[0] * y[i] for i in range(y.shape[0])])
"""

CONSTANT_AND_HELPER = """
def helper(x):
    return SCALE * x


def f(t, y, dy, p):
    dy[0] = -K * helper(p[0]) * y[0]
"""


def test_the_digest_of_a_function_is_the_same_in_every_process():
    # A comprehension (or lambda) is a nested code object, whose repr holds its address:
    # each process named the kernel anew and compiled it again (8 s), the cache growing.
    first, second = _function_from(COMPREHENSION), _function_from(COMPREHENSION)
    assert repr(first.__code__.co_consts) != repr(second.__code__.co_consts)  # addresses
    assert numba_cache._code_text(first) == numba_cache._code_text(second)


def test_the_digest_follows_the_module_values_that_numba_freezes():
    # Numba compiles module-level numbers and arrays into the kernel as constants, and the
    # helpers' code with them: an edit of K = 2.0 to 4.0 kept loading the kernel of 2.0,
    # and solved with it, silently.
    values = {"K": 2.0, "SCALE": 1.0}
    base = numba_cache._code_text(_function_from(CONSTANT_AND_HELPER, **values))
    same = numba_cache._code_text(_function_from(CONSTANT_AND_HELPER, **values))
    assert base == same
    for edited in ({"K": 4.0}, {"SCALE": 3.0}, {"K": np.array([2.0])}):
        text = numba_cache._code_text(_function_from(CONSTANT_AND_HELPER, **{**values, **edited}))
        assert text != base, edited
    arrays = [{**values, "K": np.array([2.0, v])} for v in (1.0, 5.0)]
    texts = [numba_cache._code_text(_function_from(CONSTANT_AND_HELPER, **a)) for a in arrays]
    assert texts[0] != texts[1]
